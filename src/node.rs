//! The running node: `run(config, shutdown)` wires storage, TLS, transport,
//! the peer and admin servers around one node task, and the node task itself.
//!
//! The node task is the only owner of the [`RaftCore`]. Everything else talks
//! to it through [`NodeHandle`], which sends it a closed [`NodeMsg`] enum and
//! reads its published [`NodeView`]. Invariant owned here: the task never
//! blocks on I/O other than its own fsyncs, and on shutdown a leader hands
//! leadership to a caught-up follower before it exits.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::prelude::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn, Instrument};

use crate::config::{Config, NodeId};
use crate::raft_core::{
    Command, CommittedEntry, CoreError, CoreOptions, NodeView, RaftCore, Role, StateMachine,
};
use crate::replica::{Applied, Applier, ApplyMsg, Shared};
use crate::storage::RaftStore;
use crate::tls::PeerTls;
use crate::transport::{LinkEvent, Transport};

/// Messages waiting for the node task before peers' messages are dropped.
const INBOX: usize = 8192;
/// How long a leader that is shutting down waits for its successor.
const SHUTDOWN_HANDOVER: Duration = Duration::from_secs(3);
/// How often the applier is sent [`crate::replica::ApplyMsg::Tick`].
const APPLIER_TICK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot create {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("cannot listen for peers on {addr} (key `node.listen`): {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("admin socket {path} (key `node.admin_socket`): {reason}")]
    AdminSocket { path: String, reason: String },
    #[error("the Raft log in {path} was created for members {stored:?}, but the config lists {configured:?}; membership changes are not supported yet, so restore the original [[peer]] list")]
    Membership {
        path: String,
        stored: Vec<NodeId>,
        configured: Vec<NodeId>,
    },
    #[error("cannot serve the remote admin port on {addr} (key `admin.listen`): {source}")]
    AdminListen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr} (key `metrics.listen`): {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error("the node task failed: {0}; exiting so the service manager restarts the node from its durable state")]
    Panicked(String),
    #[error("peer server failed: {0}")]
    PeerServer(tonic::transport::Error),
    #[error(transparent)]
    Files(#[from] crate::files_store::FilesStoreError),
    #[error("applying committed file changes failed: {0}; exiting so the service manager restarts the node from its durable state")]
    Apply(String),
}

/// Why a request to the node failed, as one sentence for the user.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    #[error("{}", not_leader_text(*.leader))]
    NotLeader { leader: Option<NodeId> },
    #[error("timed out: {0}")]
    TimedOut(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("the node is shutting down")]
    ShuttingDown,
    /// Valid, but not possible this instant (e.g. during a leadership transfer).
    #[error("{0}")]
    Retry(String),
}

fn not_leader_text(leader: Option<NodeId>) -> String {
    match leader {
        Some(l) => format!("this node is not the leader; node {l} is"),
        None => "no leader is known right now (an election may be under way, or a majority is unreachable)".to_string(),
    }
}

impl From<CoreError> for RequestError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::NotLeader { leader } => RequestError::NotLeader { leader },
            CoreError::Busy(why) => RequestError::Retry(why),
            other => RequestError::Unreachable(other.to_string()),
        }
    }
}

/// The closed set of inputs of the node task.
#[derive(Debug)]
pub enum NodeMsg {
    /// Authenticated Raft messages from a peer.
    Raft(Vec<Message>),
    /// Propose file commands in `term` (leader only); reply with the last
    /// one's index once it is applied here.
    Propose {
        term: u64,
        commands: Vec<Command>,
        deadline: Instant,
        reply: oneshot::Sender<Result<u64, RequestError>>,
    },
    /// Commit a no-op; reply with its index once applied here (leader only).
    Barrier {
        deadline: Instant,
        reply: oneshot::Sender<Result<u64, RequestError>>,
    },
    /// Hand leadership to `target` once it has caught up (leader only).
    Transfer {
        target: NodeId,
        deadline: Instant,
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    /// Delivery news from the transport.
    Link(LinkEvent),
    /// Liveness probe (systemd watchdog): answered as soon as it is read.
    Ping(oneshot::Sender<()>),
}

/// A cheap, cloneable way to talk to the node task.
#[derive(Clone)]
pub struct NodeHandle {
    id: NodeId,
    inbox: mpsc::Sender<NodeMsg>,
    view: watch::Receiver<NodeView>,
    started: Instant,
    /// Expiry of this node's certificate, for status, checks and metrics.
    cert_not_after: std::time::SystemTime,
    /// File replication state, for status and for serving fetches.
    files: Option<Arc<Shared>>,
    /// Links to the peers: the source stages bulk content through them and
    /// reads the applied indexes their replies report (its flow control).
    transport: Option<Transport>,
}

impl NodeHandle {
    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn view(&self) -> NodeView {
        self.view.borrow().clone()
    }

    /// This node's applied index, without cloning the whole view.
    pub fn applied_index(&self) -> u64 {
        self.view.borrow().applied_index
    }

    /// The applied index `peer` last reported and how long ago, if it
    /// reported one since this node started.
    pub fn peer_applied(&self, peer: NodeId) -> Option<(u64, Duration)> {
        let (index, at) = self.transport.as_ref()?.peer_applied(peer)?;
        Some((index, at.elapsed()))
    }

    /// Records the applied index `peer` reported in a batch it sent.
    pub fn note_peer_applied(&self, peer: NodeId, index: u64) {
        if let Some(t) = &self.transport {
            t.note_applied(peer, index);
        }
    }

    /// The links to the peers (`None` only in tests that build no node).
    pub fn transport(&self) -> Option<&Transport> {
        self.transport.as_ref()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn cert_not_after(&self) -> std::time::SystemTime {
        self.cert_not_after
    }

    pub fn files(&self) -> Option<Arc<Shared>> {
        self.files.clone()
    }

    /// Proposes `commands` as the leader of `term`; resolves once the last
    /// is applied on this node, or fails if the term moved on or it did not
    /// commit in time.
    pub async fn propose(
        &self,
        term: u64,
        commands: Vec<Command>,
        wait: Duration,
    ) -> Result<u64, RequestError> {
        let rx = self.propose_start(term, commands, wait).await?;
        rx.await.map_err(|_| RequestError::ShuttingDown)?
    }

    /// As [`NodeHandle::propose`], but returns once the node task has the
    /// commands (so calls are proposed in the order they are made), with the
    /// receiver of the outcome.
    pub async fn propose_start(
        &self,
        term: u64,
        commands: Vec<Command>,
        wait: Duration,
    ) -> Result<oneshot::Receiver<Result<u64, RequestError>>, RequestError> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + wait;
        self.inbox
            .send(NodeMsg::Propose {
                term,
                commands,
                deadline,
                reply,
            })
            .await
            .map_err(|_| RequestError::ShuttingDown)?;
        Ok(rx)
    }

    /// Hands peer messages to the node without waiting; drops them if it is overloaded.
    pub fn deliver(&self, messages: Vec<Message>) {
        if self.inbox.try_send(NodeMsg::Raft(messages)).is_err() {
            tracing::debug!("node inbox full; dropping peer messages (raft retransmits)");
        }
    }

    /// Commits a no-op through this node, which must be the leader.
    pub async fn local_barrier(&self, wait: Duration) -> Result<u64, RequestError> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + wait;
        self.inbox
            .send(NodeMsg::Barrier { deadline, reply })
            .await
            .map_err(|_| RequestError::ShuttingDown)?;
        rx.await.map_err(|_| RequestError::ShuttingDown)?
    }

    /// Hands leadership from this node (the leader) to `target`.
    pub async fn transfer_leadership(
        &self,
        target: NodeId,
        wait: Duration,
    ) -> Result<(), RequestError> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + wait;
        self.inbox
            .send(NodeMsg::Transfer {
                target,
                deadline,
                reply,
            })
            .await
            .map_err(|_| RequestError::ShuttingDown)?;
        rx.await.map_err(|_| RequestError::ShuttingDown)?
    }

    /// Whether the node task answers within `wait`: it is alive and not stuck.
    pub async fn ping(&self, wait: Duration) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.inbox.try_send(NodeMsg::Ping(reply)).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(wait, rx).await, Ok(Ok(())))
    }

    /// Waits until the published view satisfies `pred`, or `wait` passes.
    pub async fn wait_view(
        &self,
        wait: Duration,
        mut pred: impl FnMut(&NodeView) -> bool,
    ) -> Option<NodeView> {
        let mut rx = self.view.clone();
        let result = tokio::time::timeout(wait, rx.wait_for(|v| pred(v))).await;
        match result {
            Ok(Ok(v)) => Some(v.clone()),
            _ => None,
        }
    }
}

/// A proposal or barrier waiting for its entry to be applied here.
struct Waiter {
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
        self.restore_now(index, data).map_err(CoreError::BadEntry)
    }
}

struct PendingTransfer {
    target: NodeId,
    deadline: Instant,
    reply: oneshot::Sender<Result<(), RequestError>>,
    /// When raft-rs was last asked to transfer; it aborts after an election timeout.
    started: Option<Instant>,
}

struct NodeTask {
    core: RaftCore<RaftStore>,
    inbox: mpsc::Receiver<NodeMsg>,
    links: mpsc::Receiver<LinkEvent>,
    transport: Transport,
    view: watch::Sender<NodeView>,
    /// Proposals and barriers by the index of their (last) entry.
    waiters: std::collections::BTreeMap<u64, Waiter>,
    next_token: u64,
    applier: mpsc::UnboundedSender<ApplyMsg>,
    applied_rx: mpsc::UnboundedReceiver<Applied>,
    /// `on_change` runner: sets changed by another node's batch.
    changed_sets: mpsc::UnboundedSender<String>,
    /// A compaction snapshot asked of the applier and not yet received.
    snapshot_rx: Option<oneshot::Receiver<(u64, Vec<u8>)>>,
    /// A compaction snapshot that a live follower does not hold the index
    /// of yet (`RaftCore::compactable`): tried again on every tick.
    held_compaction: Option<(u64, Vec<u8>)>,
    /// This node lost leadership: reconcile its trees once the new leader's
    /// first entry is applied here.
    reconcile_pending: bool,
    /// File replication state (its `leading` flag is kept here).
    files: Option<Arc<Shared>>,
    /// Role changes, for the role hooks (run in order by their own task).
    role_events: mpsc::UnboundedSender<crate::hooks::RoleEvent>,
    was_leader: bool,
    transfers: Vec<PendingTransfer>,
    /// Members that vote but must never lead.
    witnesses: BTreeSet<NodeId>,
    tick: Duration,
    election_timeout: Duration,
    /// How often a follower reconciles its trees with the manifest (the
    /// leader rescans on the same period), so a hand edit on a follower is
    /// set aside and replaced even if the leader never touches that file.
    rescan: Duration,
    last_reconcile: Instant,
}

impl NodeTask {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), NodeError> {
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
                    self.core.tick();
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
        // `recent_active` is reset once per election timeout until the next
        // reply, so it only breaks ties: the most caught-up data node wins.
        let best = view
            .progress
            .iter()
            .filter(|p| p.id != view.id && !self.witnesses.contains(&p.id))
            .max_by_key(|p| (p.match_index, p.recent_active));
        match best {
            Some(p) => {
                info!(
                    term = view.term,
                    target = p.id,
                    "shutting down: handing leadership to node {}",
                    p.id
                );
                self.core.transfer_leader(p.id);
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
                if self.snapshot_rx.is_none()
                    && self.held_compaction.is_none()
                    && self.core.compaction_due()
                {
                    let (tx, rx) = oneshot::channel();
                    let _ = self.applier.send(ApplyMsg::Snapshot(tx));
                    self.snapshot_rx = Some(rx);
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
        let view = self.core.view();
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

    /// Compacts the log with the held snapshot once no live follower still
    /// needs the entries it replaces.
    fn try_compact(&mut self) {
        let Some((index, _)) = &self.held_compaction else {
            return;
        };
        if !self.core.compactable(*index) {
            return;
        }
        let (index, data) = self.held_compaction.take().expect("checked above");
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
            let _ = self.applier.send(ApplyMsg::Restore(index, data));
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
            let _ = self.role_events.send(crate::hooks::RoleEvent {
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

/// On SIGHUP, reloads the certificate, key, CA and `tls.revoked_serials`
/// from the config file. Bad new material is refused with its reason and the
/// old stays in force; other config changes need a restart.
async fn reload_tls_on_sighup(source: std::path::PathBuf, id: NodeId, live: crate::tls::LiveTls) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot listen for SIGHUP; certificate reloads need a restart");
        return;
    };
    while hup.recv().await.is_some() {
        let loaded = Config::load(&source)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                PeerTls::load(&c.tls, id)
                    .map(|t| (t, c.revoked_serials))
                    .map_err(|e| e.to_string())
            });
        match loaded {
            Ok((tls, revoked)) => {
                info!(revoked = revoked.len(), "SIGHUP: reloaded certificates and the revocation list from {}; new connections use them", source.display());
                live.replace(tls, revoked);
            }
            Err(e) => {
                warn!("SIGHUP: kept the certificates in force, the new ones are unusable: {e}")
            }
        }
    }
}

pub fn join_ids(ids: &[NodeId]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Opens (or bootstraps) the Raft storage in `data_dir/raft`. A fresh node
/// whose config lists the same members as its peers forms the cluster with
/// them; a node with existing state never re-bootstraps.
pub fn open_storage(data_dir: &Path, voters: &[NodeId]) -> Result<RaftStore, NodeError> {
    create_private_dir(data_dir)?;
    create_private_dir(&data_dir.join("quarantine"))?;
    let raft_dir = data_dir.join("raft");
    let store = RaftStore::open(&raft_dir)?;
    if !store.is_initialized() {
        info!(members = %join_ids(voters), "new node: creating the Raft log with the configured members");
        store.bootstrap(voters)?;
    } else {
        let mut stored: Vec<NodeId> = store.conf_state().voters.clone();
        stored.sort_unstable();
        if stored != voters {
            return Err(NodeError::Membership {
                path: raft_dir.display().to_string(),
                stored,
                configured: voters.to_vec(),
            });
        }
    }
    Ok(store)
}

/// Creates `dir` with mode 0700, or tightens an existing one to 0700: the
/// Raft log and quarantine hold file contents such as /etc/shadow's.
fn create_private_dir(dir: &Path) -> Result<(), NodeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |source| NodeError::DataDir {
        path: dir.display().to_string(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    let mode = std::fs::metadata(dir).map_err(err)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        warn!(
            "tightened {} from mode {mode:o} to 700: it holds file contents of the sync sets",
            dir.display()
        );
    }
    Ok(())
}

/// Runs a node until `shutdown` resolves, then shuts down gracefully.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    let id = config.node.id;
    let span = tracing::info_span!("node", id);
    run_inner(config, shutdown).instrument(span).await
}

async fn run_inner(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    let id = config.node.id;
    let mut voters: Vec<NodeId> = config.peers.iter().map(|p| p.id).chain([id]).collect();
    voters.sort_unstable();
    let store = open_storage(&config.node.data_dir, &voters)?;
    let tls = PeerTls::load(&config.tls, id)?;

    let options = CoreOptions {
        witness: config.node.witness,
        compact_after: config.compact_after,
        ..CoreOptions::default()
    };
    let logger = crate::logging::raft_logger(id);
    let shared = crate::replica::open_shared(&config)?;
    let (applied_tx, applied_rx) = mpsc::unbounded_channel();
    let mut applier = Applier::new(shared.clone(), store.clone(), applied_tx);
    let core = RaftCore::new(id, &config.raft, store, options, &logger, &mut applier)?;
    let initial = core.view();
    info!(
        term = initial.term,
        vote = initial.vote,
        commit = initial.commit_index,
        applied = initial.applied_index,
        "starting node {id} of cluster [{}]",
        join_ids(&voters)
    );
    if voters.len() == 2 {
        // Only reachable with `node.allow_two_node = true` (the config check refuses it otherwise).
        warn!(
            "this cluster has only two voters (nodes {}): it cannot fail over, since losing either node stops all changes; add a third node or a witness to fix that",
            join_ids(&voters)
        );
    }

    let listener = TcpListener::bind(config.node.listen)
        .await
        .map_err(|source| NodeError::Listen {
            addr: config.node.listen.to_string(),
            source,
        })?;
    let admin_listener = crate::admin::bind_socket(&config.node.admin_socket)?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Metrics {
                    addr: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let remote_admin_listener = match config.admin_listen {
        Some(addr) => {
            Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| NodeError::AdminListen {
                        addr: addr.to_string(),
                        source,
                    })?,
            )
        }
        None => None,
    };
    let cert_not_after = tls.own_cert_not_after();

    let (link_tx, link_rx) = mpsc::channel(1024);
    let live_tls = crate::tls::LiveTls::new(tls, config.revoked_serials.clone());
    let (view_tx, view_rx) = watch::channel(initial);
    let transport = Transport::start(&config.peers, &live_tls, link_tx, view_rx.clone());
    let (inbox_tx, inbox_rx) = mpsc::channel(INBOX);
    let handle = NodeHandle {
        id,
        inbox: inbox_tx,
        view: view_rx,
        started: Instant::now(),
        cert_not_after,
        files: Some(shared.clone()),
        transport: Some(transport.clone()),
    };
    let (apply_tx, apply_rx) = mpsc::unbounded_channel();
    let applier_thread = std::thread::Builder::new()
        .name("clusterd-apply".into())
        .spawn({
            let span = tracing::Span::current();
            move || span.in_scope(|| applier.run(apply_rx))
        })
        .expect("spawn the applier thread");
    let (role_tx, role_rx) = mpsc::unbounded_channel();
    let counted = shared.clone();
    let on_failure = move || {
        counted
            .counters
            .role_hook_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    tokio::spawn(
        crate::hooks::run_role_hooks(config.hooks.clone(), id, on_failure, role_rx)
            .in_current_span(),
    );
    let (changed_tx, changed_rx) = mpsc::unbounded_channel();
    tokio::spawn(crate::replica::run_on_change(shared.clone(), changed_rx).in_current_span());

    let task = NodeTask {
        core,
        inbox: inbox_rx,
        links: link_rx,
        transport: transport.clone(),
        view: view_tx,
        waiters: std::collections::BTreeMap::new(),
        next_token: rand::random::<u64>() >> 16,
        applier: apply_tx.clone(),
        applied_rx,
        changed_sets: changed_tx,
        snapshot_rx: None,
        held_compaction: None,
        // Once caught up after a start, a follower squares its trees with
        // the manifest: stray files from before it joined, edits made while
        // it was stopped.
        reconcile_pending: !config.node.witness,
        role_events: role_tx,
        files: Some(shared.clone()),
        was_leader: false,
        transfers: Vec::new(),
        witnesses: config
            .peers
            .iter()
            .filter(|p| p.witness)
            .map(|p| p.id)
            .chain(config.node.witness.then_some(id))
            .collect(),
        tick: config.raft.tick(),
        election_timeout: config.raft.election_timeout,
        rescan: config.replication.rescan,
        last_reconcile: Instant::now(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut node_task = tokio::spawn(task.run(stop_rx).in_current_span());

    let members: Arc<BTreeSet<NodeId>> = Arc::new(config.peers.iter().map(|p| p.id).collect());
    let (servers_stop_tx, servers_stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let incoming = crate::peer::accept_loop(listener, live_tls.clone(), members);
    tokio::spawn(
        reload_tls_on_sighup(config.source.clone(), id, live_tls.clone()).in_current_span(),
    );
    let mut peer_server = tokio::spawn(
        crate::peer::serve(incoming, handle.clone(), stopped(servers_stop_rx.clone()))
            .in_current_span(),
    );
    tokio::spawn(
        crate::source::Source::new(shared.clone(), handle.clone(), config.replication)
            .run(servers_stop_rx.clone())
            .in_current_span(),
    );
    tokio::spawn(
        crate::fetch::run_fetcher(
            shared.clone(),
            handle.clone(),
            transport.clone(),
            apply_tx.clone(),
            servers_stop_rx.clone(),
        )
        .in_current_span(),
    );
    drop(apply_tx);
    let admin = crate::admin::AdminService::new(handle.clone(), transport);
    let admin_for_metrics = admin.clone();
    if let Some(listener) = remote_admin_listener {
        let incoming = crate::admin::remote_incoming(listener, live_tls.clone());
        tokio::spawn(
            admin
                .clone()
                .serve_remote(incoming, stopped(servers_stop_rx.clone()))
                .in_current_span(),
        );
    }
    let admin_server = tokio::spawn(
        admin
            .serve(admin_listener, stopped(servers_stop_rx.clone()))
            .in_current_span(),
    );
    let systemd = tokio::spawn(
        crate::systemd::supervise(handle.clone(), servers_stop_rx.clone()).in_current_span(),
    );
    if let Some(listener) = metrics_listener {
        tokio::spawn(
            crate::metrics::serve(
                listener,
                handle.clone(),
                admin_for_metrics,
                stopped(servers_stop_rx),
            )
            .in_current_span(),
        );
    }
    info!(listen = %config.node.listen, admin_socket = %config.node.admin_socket.display(), "node {id} is up");

    tokio::pin!(shutdown);
    let result = tokio::select! {
        _ = &mut shutdown => {
            info!("shutdown requested");
            crate::systemd::stopping();
            let _ = stop_tx.send(true);
            match node_task.await {
                Ok(r) => r,
                Err(e) => Err(NodeError::Panicked(e.to_string())),
            }
        }
        r = &mut node_task => match r {
            Ok(r) => r,
            Err(e) => Err(NodeError::Panicked(e.to_string())),
        },
        r = &mut peer_server => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(NodeError::PeerServer(e)),
            Err(e) => { error!(error = %e, "peer server panicked"); Ok(()) }
        },
    };
    let _ = servers_stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), admin_server).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), systemd).await;
    let _ = std::fs::remove_file(&config.node.admin_socket);
    // The node task held the last sender: the applier finishes its current
    // page and stops.
    let _ = tokio::task::spawn_blocking(move || applier_thread.join()).await;
    result
}
