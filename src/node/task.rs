//! The node task: the sole owner of the Raft core. It reads the closed
//! `NodeMsg` inbox and the transport's link events, handles each `Ready` in
//! order (persist, send, apply, advance), hands committed entries to the
//! applier thread, and answers proposals, barriers and transfers.

use super::*;
/// How long a leader that is shutting down waits for its successor.
const SHUTDOWN_HANDOVER: Duration = Duration::from_secs(3);
/// How often the applier is sent [`crate::replication::apply::ApplyMsg::Tick`].
const APPLIER_TICK: Duration = Duration::from_secs(1);
/// A proposal or barrier waiting for its entry to be applied here.
pub(super) struct Waiter {
    /// The term the entry was proposed in: another term at its index means it was lost.
    term: u64,
    deadline: Instant,
    /// Its entry committed with the right term; waiting for the apply.
    committed: bool,
    reply: oneshot::Sender<Result<u64, RequestError>>,
}

/// Lets [`RaftCore::new`] restore the manifest from a snapshot at start-up,
/// before the applier thread runs.
impl StateMachine for Applier {
    fn apply(&mut self, _entry: &CommittedEntry) -> Result<(), CoreError> {
        Err(CoreError::BadEntry(
            "entries are applied by the applier thread".into(),
        ))
    }
    fn snapshot_data(&self) -> Vec<u8> {
        self.snapshot_now().1
    }
    fn restore(&mut self, index: u64, data: &[u8]) -> Result<(), CoreError> {
        // `run` took the membership directory in before the core started.
        let (_, data) = crate::core::members::unwrap_snapshot(data)
            .map_err(|e| CoreError::BadEntry(e.to_string()))?;
        self.restore_now(index, data)
            .map_err(|e| CoreError::BadEntry(crate::core::error_text::error_chain(&e)))
    }
}

pub(super) struct PendingTransfer {
    target: NodeId,
    deadline: Instant,
    reply: oneshot::Sender<Result<(), RequestError>>,
    /// When raft-rs was last asked to transfer; it aborts after an election timeout.
    started: Option<Instant>,
}

pub(super) struct NodeTask {
    pub(super) core: RaftCore<RaftStore>,
    pub(super) inbox: mpsc::Receiver<NodeMsg>,
    pub(super) links: mpsc::Receiver<LinkEvent>,
    pub(super) transport: Transport,
    pub(super) view: watch::Sender<NodeView>,
    /// Proposals and barriers by the index of their (last) entry.
    pub(super) waiters: std::collections::BTreeMap<u64, Waiter>,
    pub(super) next_token: u64,
    pub(super) applier: mpsc::UnboundedSender<ApplyMsg>,
    pub(super) applied_rx: mpsc::UnboundedReceiver<Applied>,
    /// `on_change` runner: sets changed by another node's batch.
    pub(super) changed_sets: mpsc::UnboundedSender<String>,
    /// A compaction snapshot asked of the applier and not yet received.
    pub(super) snapshot_rx: Option<oneshot::Receiver<(u64, Vec<u8>)>>,
    /// A compaction snapshot that a live follower does not hold the index
    /// of yet (`RaftCore::compactable`): tried again on every tick.
    pub(super) held_compaction: Option<(u64, Vec<u8>)>,
    /// This node lost leadership: reconcile its trees once the new leader's
    /// first entry is applied here.
    pub(super) reconcile_pending: bool,
    /// File replication state (its `leading` flag is kept here).
    pub(super) files: Option<Arc<Shared>>,
    /// Role changes, for the role hooks (run in order by their own task).
    pub(super) role_events: mpsc::UnboundedSender<crate::ops::hooks::RoleEvent>,
    pub(super) was_leader: bool,
    pub(super) transfers: Vec<PendingTransfer>,
    /// Members that vote but must never lead.
    pub(super) witnesses: BTreeSet<NodeId>,
    pub(super) tick: Duration,
    pub(super) election_timeout: Duration,
    /// The Raft storage, for the membership directory and the removal marker.
    pub(super) store: RaftStore,
    /// Members added at runtime (addresses, kinds), as stored; it travels
    /// in every compaction snapshot.
    pub(super) directory: Directory,
    /// The configuration last published, to notice changes.
    pub(super) members: crate::raft::core::MemberView,
    /// Why this node is no longer a member, once it knows: it then neither
    /// ticks (so never campaigns) nor replicates.
    pub(super) removed: Option<String>,
    /// `node.allow_two_node`: whether a change may leave two voters without a witness.
    pub(super) allow_two_node: bool,
    /// This node and its `[[peer]]` list, sorted: what status compares
    /// with the committed members.
    pub(super) configured: Vec<NodeId>,
    /// How `configured` differs from the committed members, when it does.
    pub(super) config_differs: Option<String>,
    /// How often a follower reconciles its trees with the manifest (the
    /// leader rescans on the same period), so a hand edit on a follower is
    /// set aside and replaced even if the leader never touches that file.
    pub(super) rescan: Duration,
    pub(super) last_reconcile: Instant,
}

impl NodeTask {
    pub(super) async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), NodeError> {
        let mut ticker = tokio::time::interval(self.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut handover_until: Option<Instant> = None;
        let mut ticks: u64 = 0;
        // The applier's housekeeping (deferred paths, staging, memory) runs
        // about once a second, whatever the tick.
        let ticks_per_applier_tick =
            (APPLIER_TICK.as_millis() / self.tick.as_millis().max(1)).max(1) as u64;
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if self.removed.is_none() {
                        self.core.tick();
                    }
                    if self.joiner_needs_a_snapshot() {
                        self.request_snapshot();
                    }
                    self.expire_requests();
                    self.try_compact();
                    ticks += 1;
                    if ticks % ticks_per_applier_tick == 0 {
                        let _ = self.applier.send(ApplyMsg::Tick);
                    }
                }
                Some(done) = self.applied_rx.recv() => self.on_applied(done)?,
                snap = async { self.snapshot_rx.as_mut().expect("guarded").await }, if self.snapshot_rx.is_some() => {
                    self.snapshot_rx = None;
                    if let Ok(snap) = snap {
                        self.held_compaction = Some(snap);
                        self.try_compact();
                    }
                }
                Some(msg) = self.inbox.recv() => {
                    self.handle(msg);
                    // Take whatever else is queued, so one Ready covers a burst.
                    for _ in 0..256 {
                        match self.inbox.try_recv() {
                            Ok(m) => self.handle(m),
                            Err(_) => break,
                        }
                    }
                }
                Some(ev) = self.links.recv() => self.handle(NodeMsg::Link(ev)),
                changed = shutdown.changed(), if handover_until.is_none() => {
                    let _ = changed;
                    handover_until = Some(Instant::now() + SHUTDOWN_HANDOVER);
                    if !self.start_handover() {
                        break;
                    }
                }
            }
            self.ready()?;
            if let Some(until) = handover_until {
                if !self.core.is_leader() || Instant::now() >= until {
                    if self.core.is_leader() {
                        warn!(term = self.core.term(), "no follower took over leadership in time; exiting as leader, the others will elect after a timeout");
                    } else {
                        info!(term = self.core.term(), leader = ?self.core.leader(), "handed leadership over; exiting");
                    }
                    break;
                }
            }
        }
        for (_, w) in std::mem::take(&mut self.waiters) {
            let _ = w.reply.send(Err(RequestError::ShuttingDown));
        }
        for t in self.transfers.drain(..) {
            let _ = t.reply.send(Err(RequestError::ShuttingDown));
        }
        Ok(())
    }

    /// On shutdown, a leader hands over to the most caught-up active follower.
    /// Returns false when there is nothing to wait for.
    fn start_handover(&mut self) -> bool {
        if !self.core.is_leader() {
            return false;
        }
        let view = self.core.view();
        match self.successor() {
            Some(p) => {
                info!(
                    term = view.term,
                    target = p,
                    "shutting down: handing leadership to node {p}"
                );
                self.core.transfer_leader(p);
                true
            }
            None => {
                warn!(
                    term = view.term,
                    "shutting down as leader with no active follower to hand over to"
                );
                false
            }
        }
    }

    /// The voter a leader hands over to: the most caught-up data node of
    /// the configuration that stays (not one a joint change removes),
    /// preferring those that answered within an election timeout.
    fn successor(&self) -> Option<NodeId> {
        let view = self.core.view();
        let staying = self.core.incoming_voters();
        view.progress
            .iter()
            .filter(|p| {
                p.id != view.id && !self.witnesses.contains(&p.id) && staying.contains(&p.id)
            })
            .max_by_key(|p| (p.recent_active, p.match_index))
            .map(|p| p.id)
    }

    /// Whether a learner that never reported holding anything has no
    /// snapshot listing it to start from: the log must be compacted anew
    /// (see `RaftCore::learners_needing_a_snapshot`).
    fn joiner_needs_a_snapshot(&self) -> bool {
        self.core
            .learners_needing_a_snapshot()
            .into_iter()
            .any(|id| {
                self.transport
                    .peer_applied(id)
                    .is_none_or(|(applied, _)| applied == 0)
            })
    }

    /// The committed configuration, as a membership change is checked against.
    fn membership_state(&self) -> MembershipState {
        let view = self.core.view();
        MembershipState {
            voters: view.members.voters.iter().copied().collect(),
            learners: view.members.learners.iter().copied().collect(),
            witnesses: self.witnesses.clone(),
            reachable: view
                .progress
                .iter()
                .filter(|p| p.recent_active || p.id == view.id)
                .map(|p| p.id)
                .collect(),
            allow_two_node: self.allow_two_node,
        }
    }

    /// Checks a membership change against the committed configuration and
    /// proposes it; a change that removes this leader first hands
    /// leadership over and asks the caller to retry with the next leader.
    fn change_membership(
        &mut self,
        change: MemberChange,
        deadline: Instant,
        reply: oneshot::Sender<Result<u64, RequestError>>,
    ) {
        if !self.core.is_leader() {
            let _ = reply.send(Err(RequestError::NotLeader {
                leader: self.core.leader(),
            }));
            return;
        }
        if self.core.membership_change_in_flight() {
            // Retried by the caller until its deadline: the change in
            // flight (a promotion, leaving a joint configuration, a new
            // leader's first entry) is usually done within a round trip.
            let _ = reply.send(Err(RequestError::Retry(
                "another membership change is in flight (proposed and not yet applied, or a joint configuration not yet left)".to_string(),
            )));
            return;
        }
        if let Err(why) = change.check(&self.membership_state()) {
            let _ = reply.send(Err(RequestError::Invalid(why)));
            return;
        }
        let me = self.core.id();
        if change.removes_voter() == Some(me) {
            let why = match self.successor() {
                Some(next) => {
                    if self.transfers.is_empty() {
                        info!(
                            term = self.core.term(),
                            target = next,
                            "this leader is to be removed: handing leadership to node {next} first"
                        );
                        self.core.transfer_leader(next);
                    }
                    format!("node {me} leads and is the one to be removed: it is handing leadership to node {next} first")
                }
                None => format!("node {me} leads and is the one to be removed, but no other voter can take over now"),
            };
            let _ = reply.send(Err(RequestError::Retry(why)));
            return;
        }
        let term = self.core.term();
        match self.core.propose_member_change(&change) {
            Ok(()) => {
                info!(
                    term,
                    index = self.core.last_index(),
                    "proposed membership change {change:?}"
                );
                self.waiters.insert(
                    self.core.last_index(),
                    Waiter {
                        term,
                        deadline,
                        committed: false,
                        reply,
                    },
                );
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }

    /// Takes in the members a committed change (at `index`) or an
    /// installed snapshot adds: stored before anything uses them, then a
    /// link to each, and they count as peers of the replication.
    fn learn_members(
        &mut self,
        mut infos: Vec<MemberInfo>,
        index: Option<u64>,
    ) -> Result<(), NodeError> {
        if let Some(index) = index {
            for info in &mut infos {
                info.added_at = index;
            }
        }
        let changed = self.directory.merge(&infos);
        if changed.is_empty() {
            return Ok(());
        }
        self.store.set_directory(&self.directory)?;
        for info in &changed {
            info!(
                peer = info.id,
                "learned member node {} at {}{}",
                info.id,
                info.addr,
                if info.witness {
                    " (a witness)"
                } else if info.keep_learner {
                    " (a permanent learner)"
                } else {
                    ""
                }
            );
            if info.witness {
                self.witnesses.insert(info.id);
            }
        }
        self.transport.learn(&changed);
        self.update_peers();
        Ok(())
    }

    /// Tells replication which members hold files and which are witnesses.
    fn update_peers(&self) {
        let Some(files) = &self.files else { return };
        let me = self.core.id();
        let members: BTreeSet<NodeId> = if self.members.voters.is_empty() {
            self.transport.peers().into_iter().collect()
        } else {
            self.members.all().into_iter().collect()
        };
        *files.data_peers.write().unwrap() = members
            .iter()
            .copied()
            .filter(|id| *id != me && !self.witnesses.contains(id))
            .collect();
        *files.witness_peers.write().unwrap() = self.witnesses.clone();
    }

    /// This node is no longer a member: it stops ticking (so never
    /// campaigns) and says so, now and after every restart.
    fn become_removed(&mut self, why: String) {
        if self.removed.is_some() {
            return;
        }
        if let Err(e) = self.store.set_removed(&why) {
            warn!("cannot record the removal of this node: {e}");
        }
        warn!("this node is no longer a member of the cluster ({why}): it neither replicates nor campaigns any more, and its files stay as they are; to bring it back, empty its data_dir, set `[node] join = true` and run `clusterctl member add`");
        self.removed = Some(why);
    }

    /// Asks the applier for a snapshot to compact the log with, unless one
    /// is on its way or held.
    fn request_snapshot(&mut self) {
        if self.snapshot_rx.is_none() && self.held_compaction.is_none() {
            let (tx, rx) = oneshot::channel();
            let _ = self.applier.send(ApplyMsg::Snapshot(tx));
            self.snapshot_rx = Some(rx);
        }
    }

    fn handle(&mut self, msg: NodeMsg) {
        match msg {
            NodeMsg::Raft(messages) => {
                for m in messages {
                    if let Err(e) = self.core.step(m) {
                        warn!(term = self.core.term(), error = %e, "raft refused a peer message");
                    }
                }
            }
            NodeMsg::Barrier { deadline, reply } => {
                self.next_token += 1;
                let command = Command::Barrier {
                    origin: self.core.id(),
                    token: self.next_token,
                };
                let term = self.core.term();
                self.propose_all(term, vec![command], deadline, reply);
            }
            NodeMsg::Propose {
                term,
                commands,
                deadline,
                reply,
            } => self.propose_all(term, commands, deadline, reply),
            NodeMsg::Transfer {
                target,
                deadline,
                reply,
            } => self.begin_transfer(target, deadline, reply),
            NodeMsg::ChangeMembership {
                change,
                deadline,
                reply,
            } => self.change_membership(change, deadline, reply),
            NodeMsg::Removed(why) => self.become_removed(why),
            NodeMsg::Link(LinkEvent::Unreachable(peer)) => self.core.report_unreachable(peer),
            NodeMsg::Link(LinkEvent::Snapshot(peer, status)) => {
                self.core.report_snapshot(peer, status)
            }
            NodeMsg::Ping(reply) => {
                let _ = reply.send(());
            }
        }
    }

    fn propose_all(
        &mut self,
        term: u64,
        commands: Vec<Command>,
        deadline: Instant,
        reply: oneshot::Sender<Result<u64, RequestError>>,
    ) {
        if self.core.term() != term || !self.core.is_leader() {
            // A deposed leader stops proposing at once (invariant 1).
            let _ = reply.send(Err(RequestError::NotLeader {
                leader: self.core.leader(),
            }));
            return;
        }
        for c in &commands {
            match self.core.propose(c) {
                Ok(len) => {
                    if let (Some(files), Command::Files(_) | Command::Chunk(_)) = (&self.files, c) {
                        files
                            .counters
                            .bytes_proposed
                            .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                    return;
                }
            }
        }
        let index = self.core.last_index();
        self.waiters.insert(
            index,
            Waiter {
                term,
                deadline,
                committed: false,
                reply,
            },
        );
    }

    fn on_applied(&mut self, done: Applied) -> Result<(), NodeError> {
        match done {
            Applied::Index(index) => {
                self.core.applied_to(index)?;
                let ready: Vec<u64> = self
                    .waiters
                    .range(..=index)
                    .filter(|(_, w)| w.committed)
                    .map(|(i, _)| *i)
                    .collect();
                for i in ready {
                    if let Some(w) = self.waiters.remove(&i) {
                        let _ = w.reply.send(Ok(i));
                    }
                }
                self.try_compact();
                if self.core.compaction_due() {
                    self.request_snapshot();
                }
            }
            Applied::SetChanged(set) => {
                let _ = self.changed_sets.send(set);
            }
            Applied::Failed(why) => return Err(NodeError::Apply(why)),
        }
        Ok(())
    }

    fn begin_transfer(
        &mut self,
        target: NodeId,
        deadline: Instant,
        reply: oneshot::Sender<Result<(), RequestError>>,
    ) {
        let voters = self.core.voters();
        if !voters.contains(&target) {
            let _ = reply.send(Err(RequestError::Invalid(format!(
                "node {target} is not a member of this cluster (members: {})",
                join_ids(&voters)
            ))));
            return;
        }
        if self.core.leader() == Some(target) {
            let _ = reply.send(Ok(()));
            return;
        }
        if self.witnesses.contains(&target) {
            let _ = reply.send(Err(RequestError::Invalid(format!(
                "node {target} is a witness: it votes but holds no files, so it cannot lead"
            ))));
            return;
        }
        if !self.core.is_leader() {
            let _ = reply.send(Err(RequestError::NotLeader {
                leader: self.core.leader(),
            }));
            return;
        }
        info!(
            term = self.core.term(),
            target, "leadership transfer to node {target} requested"
        );
        self.transfers.push(PendingTransfer {
            target,
            deadline,
            reply,
            started: None,
        });
    }

    /// Drives pending transfers: raft-rs catches the target up (pausing new
    /// proposals meanwhile) and hands over once it has every entry; we finish
    /// once it leads, re-arm a transfer raft-rs gave up on after an election
    /// timeout, and fail at the deadline with what stood in the way.
    fn drive_transfers(&mut self) {
        let now = Instant::now();
        let last = self.core.last_index();
        let leader = self.core.leader();
        let is_leader = self.core.is_leader();
        let mut still = Vec::new();
        for mut t in self.transfers.drain(..) {
            if leader == Some(t.target) {
                info!(
                    term = self.core.term(),
                    target = t.target,
                    "leadership transferred to node {}",
                    t.target
                );
                let _ = t.reply.send(Ok(()));
                continue;
            }
            if !is_leader {
                // Leadership went elsewhere (or an election is running): the caller re-checks.
                let _ = t.reply.send(Err(RequestError::NotLeader { leader }));
                continue;
            }
            let matched = self.core.match_index(t.target).unwrap_or(0);
            if now >= t.deadline {
                let why = if !self.core.peer_active(t.target) {
                    format!("node {} is unreachable: the leader has not heard from it within an election timeout", t.target)
                } else if matched < last {
                    format!("node {} had not caught up (it has entry {matched} of {last}); is it reachable?", t.target)
                } else {
                    format!("node {} had caught up but did not take over", t.target)
                };
                let _ = t.reply.send(Err(RequestError::TimedOut(why)));
                continue;
            }
            let restart = t
                .started
                .is_none_or(|s| now.duration_since(s) > self.election_timeout * 2);
            if restart {
                self.core.transfer_leader(t.target);
                t.started = Some(now);
            }
            still.push(t);
        }
        self.transfers = still;
    }

    fn expire_requests(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.deadline <= now)
            .map(|(i, _)| *i)
            .collect();
        for index in expired {
            if let Some(w) = self.waiters.remove(&index) {
                let _ = w.reply.send(Err(RequestError::TimedOut(
                    "the entry was not committed and applied in time; is a majority reachable?"
                        .to_string(),
                )));
            }
        }
    }

    fn ready(&mut self) -> Result<(), NodeError> {
        self.ready_once()?;
        self.drive_transfers();
        // A transfer started just now has messages ready: send them without
        // waiting for the next tick.
        if self.core.has_ready() {
            self.ready_once()?;
        }
        let mut view = self.core.view();
        if view.members != self.members {
            self.members_changed(&view);
        }
        if self.removed.is_some() {
            view.members.member = crate::raft::core::Membership::Removed;
        }
        view.members.config_differs = self.config_differs.clone();
        view.members.witnesses = view
            .members
            .voters
            .iter()
            .copied()
            .filter(|v| self.witnesses.contains(v))
            .collect();
        if self.reconcile_pending
            && view.leader.is_some()
            && !self.core.is_leader()
            && view.applied_index >= view.commit_index
            && self.core.committed_in_current_term()
        {
            self.reconcile_pending = false;
            self.last_reconcile = Instant::now();
            let _ = self.applier.send(ApplyMsg::Reconcile);
        }
        if !self.core.is_leader() && self.last_reconcile.elapsed() >= self.rescan {
            self.reconcile_pending = true;
            self.last_reconcile = Instant::now();
        }
        self.view.send_if_modified(|v| {
            if *v != view {
                *v = view;
                true
            } else {
                false
            }
        });
        Ok(())
    }

    /// The applied configuration changed (a committed change, a snapshot):
    /// say so, follow it in replication, and notice this node's removal.
    fn members_changed(&mut self, view: &NodeView) {
        let joining = self.members.member == crate::raft::core::Membership::Joining;
        self.members = view.members.clone();
        info!(
            voters = %join_ids(&view.members.voters),
            learners = %join_ids(&view.members.learners),
            "members now: voters [{}], learners [{}]; this node is a {}",
            join_ids(&view.members.voters),
            join_ids(&view.members.learners),
            view.members.member.as_str()
        );
        if joining && view.members.member != crate::raft::core::Membership::Joining {
            info!(
                "this node was added to the cluster as a {}",
                view.members.member.as_str()
            );
        }
        self.update_peers();
        self.config_differs = None;
        if view.members.member.belongs() {
            let committed = view.members.all();
            if committed != self.configured {
                self.config_differs = Some(format!(
                    "its [[peer]] list names nodes {} but the committed members are {}; the committed membership rules (update the [[peer]] lists when convenient)",
                    join_ids(&self.configured),
                    join_ids(&committed)
                ));
            }
        }
        if view.members.member == crate::raft::core::Membership::Removed {
            self.become_removed(format!(
                "the configuration applied at entry {} no longer lists it",
                view.applied_index
            ));
        }
    }

    /// Compacts the log with the held snapshot once no live follower still
    /// needs the entries it replaces.
    fn try_compact(&mut self) {
        let Some((index, _)) = &self.held_compaction else {
            return;
        };
        // A member that needs a snapshot listing it waits for nobody.
        if !self.core.compactable(*index) && !self.joiner_needs_a_snapshot() {
            return;
        }
        let (index, data) = self.held_compaction.take().expect("checked above");
        let data = crate::core::members::wrap_snapshot(&self.directory, &data);
        if let Err(e) = self.core.compact(index, data) {
            warn!(index, "log compaction skipped: {e}");
        }
    }

    fn ready_once(&mut self) -> Result<(), NodeError> {
        let out = self.core.handle_ready_deferred()?;
        for peer in self.transport.send(out.messages) {
            self.core
                .report_snapshot(peer, raft::SnapshotStatus::Failure);
        }
        if let Some((index, data)) = out.snapshot {
            let data = match crate::core::members::unwrap_snapshot(&data) {
                Ok((directory, rest)) => {
                    let rest = rest.to_vec();
                    if let Some(directory) = directory {
                        self.learn_members(directory.members.into_values().collect(), None)?;
                    }
                    rest
                }
                Err(e) => {
                    return Err(NodeError::BadSnapshot {
                        index,
                        why: e.to_string(),
                    })
                }
            };
            let _ = self.applier.send(ApplyMsg::Restore(index, data));
        }
        for entry in &out.applied {
            if let Some(m) = &entry.membership {
                match crate::core::members::decode_context(&m.context) {
                    Ok(infos) => self.learn_members(infos, Some(entry.index))?,
                    Err(e) => warn!(index = entry.index, "the membership change at entry {} carries no readable addresses ({e}); its new members stay unknown here", entry.index),
                }
            }
        }
        for entry in &out.applied {
            if let Some(w) = self.waiters.get_mut(&entry.index) {
                if w.term == entry.term {
                    w.committed = true;
                } else if let Some(w) = self.waiters.remove(&entry.index) {
                    let _ = w.reply.send(Err(RequestError::NotLeader {
                        leader: self.core.leader(),
                    }));
                }
            }
        }
        if let Some(last) = out.applied.last() {
            let _ = self.applier.send(ApplyMsg::Committed(last.index));
        }
        if let Some(change) = out.role_change {
            info!(term = change.term, role = change.role.as_str(), leader = ?change.leader, "role or leader changed");
            if self.was_leader && change.role != Role::Leader {
                self.reconcile_pending = true;
            }
            let _ = self.role_events.send(crate::ops::hooks::RoleEvent {
                role: change.role,
                term: change.term,
                leader: change.leader,
            });
            self.was_leader = change.role == Role::Leader;
            if let Some(files) = self.files.as_ref() {
                files
                    .leading
                    .store(self.was_leader, std::sync::atomic::Ordering::SeqCst);
                files
                    .term
                    .store(change.term, std::sync::atomic::Ordering::SeqCst);
                // An accounts set's first pass as leader takes in what it
                // has not merged yet, before an admin's next useradd.
                files.accounts_wakeup.notify_one();
            }
            if change.role != Role::Leader {
                // A deposed leader's pending entries may still commit under the new
                // leader, but this node can no longer tell: let the callers retry.
                let pending: Vec<u64> = self
                    .waiters
                    .iter()
                    .filter(|(_, w)| !w.committed)
                    .map(|(i, _)| *i)
                    .collect();
                for i in pending {
                    if let Some(w) = self.waiters.remove(&i) {
                        let _ = w.reply.send(Err(RequestError::NotLeader {
                            leader: change.leader,
                        }));
                    }
                }
            }
        }
        Ok(())
    }
}
