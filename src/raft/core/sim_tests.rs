//! In-process multi-node tests: several [`RaftCore`]s over in-memory logs,
//! joined by a network that can drop links, partition nodes and crash them.
//! Time is simulated ticks, so these run without tokio and without sleeping.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use raft::prelude::*;
use raft::storage::MemStorage;
use raft::Storage;

use super::*;

/// An in-memory [`LogStore`]: MemStorage plus the applied index.
#[derive(Clone)]
struct MemLog {
    mem: MemStorage,
    applied: Arc<Mutex<u64>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct MemError(String);

impl Storage for MemLog {
    fn initial_state(&self) -> raft::Result<raft::RaftState> {
        self.mem.initial_state()
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max: impl Into<Option<u64>>,
        ctx: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max, ctx)
    }
    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }
    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }
    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        self.mem.snapshot(request_index, to)
    }
}

impl LogStore for MemLog {
    type Error = MemError;
    fn persist(&self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), MemError> {
        let mut w = self.mem.wl();
        w.append(entries).map_err(|e| MemError(e.to_string()))?;
        if let Some(hs) = hs {
            w.set_hardstate(hs.clone());
        }
        Ok(())
    }
    fn set_commit(&self, commit: u64) -> Result<(), MemError> {
        self.mem.wl().mut_hard_state().set_commit(commit);
        Ok(())
    }
    fn apply_snapshot(&self, s: &Snapshot) -> Result<(), MemError> {
        self.mem
            .wl()
            .apply_snapshot(s.clone())
            .map_err(|e| MemError(e.to_string()))
    }
    fn compact(&self, index: u64, _data: Vec<u8>) -> Result<(), MemError> {
        self.mem
            .wl()
            .compact(index)
            .map_err(|e| MemError(e.to_string()))
    }
    fn applied(&self) -> u64 {
        *self.applied.lock().unwrap()
    }
    fn set_conf_state(&self, conf_state: &ConfState, at: u64) -> Result<(), MemError> {
        self.mem.wl().set_conf_state(conf_state.clone());
        let mut applied = self.applied.lock().unwrap();
        *applied = (*applied).max(at);
        Ok(())
    }
    fn set_applied(&self, index: u64) -> Result<(), MemError> {
        *self.applied.lock().unwrap() = index;
        Ok(())
    }
    fn snapshot_conf_state(&self) -> ConfState {
        // MemStorage builds its snapshot from the current membership.
        self.mem.initial_state().expect("in memory").conf_state
    }
}

/// Records what was applied, so tests can compare nodes.
#[derive(Default)]
struct Recorder {
    applied: Vec<(u64, Option<Command>)>,
    /// Snapshot indexes the state was restored from.
    restored: Vec<u64>,
}

impl StateMachine for Recorder {
    fn apply(&mut self, e: &CommittedEntry) -> Result<(), CoreError> {
        self.applied.push((e.index, e.command.clone()));
        Ok(())
    }
    fn snapshot_data(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(&mut self, index: u64, _data: &[u8]) -> Result<(), CoreError> {
        self.restored.push(index);
        Ok(())
    }
}

struct SimNode {
    log: MemLog,
    core: Option<RaftCore<MemLog>>,
    sm: Recorder,
}

/// A cluster on a simulated network. Links are directed; a cut link drops messages.
struct Sim {
    nodes: BTreeMap<NodeId, SimNode>,
    cut: BTreeSet<(NodeId, NodeId)>,
    in_flight: VecDeque<Message>,
    logger: slog::Logger,
    options: CoreOptions,
    /// Messages lost on cut links, for tests that deliver them late.
    dropped: Vec<Message>,
}

impl Sim {
    fn new(n: u64) -> Sim {
        Self::with_options(n, CoreOptions::default())
    }

    fn with_options(n: u64, options: CoreOptions) -> Sim {
        let voters: Vec<u64> = (1..=n).collect();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut sim = Sim {
            nodes: BTreeMap::new(),
            cut: BTreeSet::new(),
            in_flight: VecDeque::new(),
            logger,
            options,
            dropped: Vec::new(),
        };
        for id in 1..=n {
            let log = MemLog {
                mem: MemStorage::new_with_conf_state(ConfState::from((voters.clone(), vec![]))),
                applied: Arc::new(Mutex::new(0)),
            };
            sim.nodes.insert(
                id,
                SimNode {
                    log,
                    core: None,
                    sm: Recorder::default(),
                },
            );
            sim.boot(id);
        }
        sim
    }

    fn boot(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).unwrap();
        node.core = Some(
            RaftCore::new(
                id,
                &RaftTimers::default(),
                node.log.clone(),
                self.options.clone(),
                &self.logger,
                &mut node.sm,
            )
            .unwrap(),
        );
    }

    /// Crash: volatile state is lost, the durable log stays.
    fn crash(&mut self, id: NodeId) {
        self.nodes.get_mut(&id).unwrap().core = None;
    }

    fn core(&self, id: NodeId) -> &RaftCore<MemLog> {
        self.nodes[&id].core.as_ref().expect("node is up")
    }

    fn core_mut(&mut self, id: NodeId) -> &mut RaftCore<MemLog> {
        self.nodes
            .get_mut(&id)
            .unwrap()
            .core
            .as_mut()
            .expect("node is up")
    }

    fn isolate(&mut self, id: NodeId) {
        let ids: Vec<_> = self.nodes.keys().copied().collect();
        for other in ids {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    /// One tick on every live node, then deliver messages until the network is quiet.
    fn tick(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(core) = node.core.as_mut() {
                core.tick();
            }
        }
        self.settle();
    }

    fn settle(&mut self) {
        for _ in 0..1000 {
            let ids: Vec<_> = self.nodes.keys().copied().collect();
            for id in ids {
                let node = self.nodes.get_mut(&id).unwrap();
                if let Some(core) = node.core.as_mut() {
                    let out = core.handle_ready(&mut node.sm).unwrap();
                    self.in_flight.extend(out.messages);
                }
            }
            if self.in_flight.is_empty() {
                return;
            }
            while let Some(m) = self.in_flight.pop_front() {
                if self.cut.contains(&(m.from, m.to)) {
                    self.dropped.push(m);
                    continue;
                }
                if let Some(core) = self.nodes.get_mut(&m.to).and_then(|n| n.core.as_mut()) {
                    core.step(m).unwrap();
                }
            }
        }
        panic!("network never went quiet");
    }

    fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.core.as_ref().is_some_and(|c| c.is_leader()))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Ticks until `f` holds, at most `ticks` times.
    fn run_until(&mut self, ticks: usize, what: &str, mut f: impl FnMut(&Sim) -> bool) {
        for _ in 0..ticks {
            if f(self) {
                return;
            }
            self.tick();
        }
        assert!(f(self), "after {ticks} ticks: {what}");
    }

    fn elect(&mut self) -> NodeId {
        self.run_until(300, "one leader elected", |s| s.leaders().len() == 1);
        self.leaders()[0]
    }

    fn barrier(&mut self, via: NodeId, token: u64) -> Result<(), CoreError> {
        self.core_mut(via)
            .propose(&Command::Barrier { origin: via, token })?;
        self.settle();
        Ok(())
    }

    fn applied_barrier(&self, id: NodeId, token: u64) -> bool {
        self.nodes[&id]
            .sm
            .applied
            .iter()
            .any(|(_, c)| matches!(c, Some(Command::Barrier { token: t, .. }) if *t == token))
    }
}

#[test]
fn three_nodes_elect_one_leader_and_commit_everywhere() {
    let mut sim = Sim::new(3);
    let leader = sim.elect();
    sim.barrier(leader, 7).unwrap();
    sim.tick();
    for id in 1..=3 {
        assert!(
            sim.applied_barrier(id, 7),
            "node {id} did not apply the barrier"
        );
        assert_eq!(sim.core(id).leader(), Some(leader));
    }
    // Every node applied the same entries in the same order.
    let reference = &sim.nodes[&1].sm.applied;
    for id in 2..=3 {
        assert_eq!(&sim.nodes[&id].sm.applied, reference);
    }
}

#[test]
fn followers_refuse_proposals_and_name_the_leader() {
    let mut sim = Sim::new(3);
    let leader = sim.elect();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    match sim.barrier(follower, 1) {
        Err(CoreError::NotLeader { leader: Some(l) }) => assert_eq!(l, leader),
        other => panic!("expected NotLeader, got {other:?}"),
    }
}

#[test]
fn isolated_leader_steps_down_and_its_proposals_never_apply() {
    let mut sim = Sim::new(3);
    let old = sim.elect();
    sim.isolate(old);
    // Proposed without a majority: must never apply anywhere (invariant 1).
    sim.barrier(old, 666).unwrap();
    sim.run_until(
        300, // randomized timeouts can split the vote a few rounds in a row
        "the majority elects a new leader and the old one steps down",
        |s| {
            let leaders = s.leaders();
            leaders.len() == 1 && leaders[0] != old
        },
    );
    assert!(
        !sim.core(old).is_leader(),
        "check_quorum must depose the isolated leader"
    );
    let new = sim.leaders()[0];
    sim.barrier(new, 42).unwrap();
    sim.heal();
    sim.run_until(
        60,
        "the old leader follows and applies the new barrier",
        |s| s.applied_barrier(old, 42),
    );
    for id in 1..=3 {
        assert!(
            !sim.applied_barrier(id, 666),
            "node {id} applied an entry proposed without a majority"
        );
    }
    assert_eq!(sim.core(old).leader(), Some(new));
}

/// A deposed leader's messages that arrive late (held up in a partition)
/// carry its old term: they are rejected, counted for status, and what they
/// carry never applies (invariant 1, and issue 4's stale-leader rule).
#[test]
fn late_messages_of_a_deposed_leader_are_rejected_and_counted() {
    let mut sim = Sim::new(3);
    let old = sim.elect();
    let old_term = sim.core(old).term();
    sim.isolate(old);
    sim.dropped.clear();
    sim.barrier(old, 777).unwrap();
    sim.tick(); // a heartbeat round, lost too
    let late: Vec<Message> = std::mem::take(&mut sim.dropped)
        .into_iter()
        .filter(|m| m.from == old && m.term == old_term)
        .collect();
    assert!(
        late.iter()
            .any(|m| m.get_msg_type() == MessageType::MsgAppend),
        "the isolated leader sent its proposal: {late:?}"
    );
    sim.run_until(300, "the majority elects a new leader", |s| {
        s.leaders().iter().any(|l| *l != old)
    });
    let new = *sim.leaders().iter().find(|l| **l != old).unwrap();
    let others: Vec<NodeId> = (1..=3).filter(|id| *id != old).collect();
    let before: Vec<u64> = others
        .iter()
        .map(|id| sim.core(*id).view().stale_term_messages)
        .collect();
    for m in &late {
        if let Some(core) = sim.nodes.get_mut(&m.to).and_then(|n| n.core.as_mut()) {
            core.step(m.clone()).unwrap();
        }
    }
    sim.settle();
    for (id, before) in others.iter().zip(before) {
        let view = sim.core(*id).view();
        assert!(
            view.stale_term_messages > before,
            "node {id} did not count the late messages of term {old_term}"
        );
        assert!(view.term > old_term);
        assert_eq!(sim.core(*id).leader(), Some(new));
    }
    sim.barrier(new, 778).unwrap();
    sim.heal();
    sim.run_until(100, "everyone applies the new leader's barrier", |s| {
        (1..=3).all(|id| s.applied_barrier(id, 778))
    });
    for id in 1..=3 {
        assert!(
            !sim.applied_barrier(id, 777),
            "node {id} applied what a deposed leader proposed"
        );
    }
}

#[test]
fn isolated_follower_neither_leads_nor_inflates_its_term() {
    let mut sim = Sim::new(3);
    let leader = sim.elect();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let term = sim.core(follower).term();
    sim.isolate(follower);
    for _ in 0..60 {
        sim.tick();
        assert!(!sim.core(follower).is_leader());
    }
    // Pre-vote: a node that cannot win never bumps its term, so it does not
    // depose the healthy leader when it comes back.
    assert_eq!(sim.core(follower).term(), term);
    sim.heal();
    sim.run_until(30, "the follower hears from the leader again", |s| {
        s.core(follower).leader() == Some(leader)
    });
    assert_eq!(sim.leaders(), vec![leader]);
}

#[test]
fn a_crashed_node_keeps_term_and_vote_and_catches_up() {
    let mut sim = Sim::new(3);
    let leader = sim.elect();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let before = sim.core(follower).view();
    sim.crash(follower);
    sim.barrier(leader, 5).unwrap();
    sim.boot(follower);
    let after = sim.core(follower).view();
    assert_eq!((after.term, after.vote), (before.term, before.vote));
    sim.run_until(30, "the restarted follower applies what it missed", |s| {
        s.applied_barrier(follower, 5)
    });
}

#[test]
fn a_node_whose_log_was_wiped_catches_up_instead_of_panicking() {
    let mut sim = Sim::new(3);
    let leader = sim.elect();
    for token in 0..5 {
        sim.barrier(leader, token).unwrap();
    }
    sim.tick();
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    sim.crash(victim);
    let node = sim.nodes.get_mut(&victim).unwrap();
    node.log = MemLog {
        mem: MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![]))),
        applied: Arc::new(Mutex::new(0)),
    };
    node.sm = Recorder::default();
    sim.boot(victim);
    sim.barrier(leader, 99).unwrap();
    sim.run_until(30, "the wiped node applies everything again", |s| {
        s.applied_barrier(victim, 99)
    });
    assert_eq!(sim.nodes[&victim].sm.applied, sim.nodes[&leader].sm.applied);
}

#[test]
fn leadership_transfer_moves_the_leader() {
    let mut sim = Sim::new(3);
    let leader = sim.elect();
    let target = (1..=3).find(|id| *id != leader).unwrap();
    sim.core_mut(leader).transfer_leader(target);
    sim.settle();
    sim.run_until(30, "the target leads", |s| s.leaders() == vec![target]);
    sim.barrier(target, 9).unwrap();
    assert!(sim.applied_barrier(leader, 9));
}

#[test]
fn the_log_is_compacted_and_a_lagging_node_catches_up_by_snapshot() {
    let mut sim = Sim::with_options(
        3,
        CoreOptions {
            compact_after: 20,
            ..CoreOptions::default()
        },
    );
    let leader = sim.elect();
    let lagging = (1..=3).find(|id| *id != leader).unwrap();
    sim.isolate(lagging);
    for token in 0..60 {
        sim.barrier(leader, token).unwrap();
    }
    let first = sim.core(leader).view().first_index;
    assert!(
        first > 20,
        "leader log was not compacted (first index {first})"
    );
    sim.heal();
    sim.run_until(
        60,
        "the lagging node catches up past the compaction point",
        |s| s.core(lagging).view().applied_index >= s.core(leader).view().commit_index,
    );
    sim.barrier(leader, 1000).unwrap();
    sim.tick();
    assert!(sim.applied_barrier(lagging, 1000));

    // A crash between installing the snapshot and recording it as applied
    // must not stop the node from starting again.
    let snapshot_index = sim.core(lagging).view().first_index - 1;
    sim.crash(lagging);
    *sim.nodes[&lagging].log.applied.lock().unwrap() = 0;
    sim.nodes.get_mut(&lagging).unwrap().sm.restored.clear();
    sim.boot(lagging);
    assert_eq!(
        sim.nodes[&lagging].sm.restored,
        vec![snapshot_index],
        "the state machine was not restored from the snapshot"
    );
    assert_eq!(sim.nodes[&lagging].log.applied(), snapshot_index);
    sim.barrier(leader, 1001).unwrap();
    sim.run_until(30, "the restarted node applies new entries", |s| {
        s.applied_barrier(lagging, 1001)
    });
}

#[test]
fn the_byte_trigger_waits_for_a_live_follower_but_not_for_a_dead_one() {
    let mut sim = Sim::with_options(
        3,
        CoreOptions {
            compact_after: 1_000_000,
            compact_bytes: 1,
            ..CoreOptions::default()
        },
    );
    let leader = sim.elect();
    let lagging = (1..=3).find(|id| *id != leader).unwrap();
    // Cut off, but heard from within the last election timeout: still live.
    sim.isolate(lagging);
    let held = sim.core(lagging).view().applied_index;
    for token in 0..5 {
        sim.barrier(leader, token).unwrap();
    }
    let view = sim.core(leader).view();
    assert!(
        view.applied_index > held + 4,
        "the barriers committed without it"
    );
    assert!(
        view.first_index <= held + 1,
        "compacted to {} past entry {held} that a live follower still needs",
        view.first_index - 1
    );
    // Once it has been silent for an election timeout it no longer counts.
    sim.run_until(60, "the leader compacts past the dead follower", |s| {
        s.core(leader).view().first_index > held + 1
    });
}

mod membership {
    use super::*;

    fn single(node: NodeId, change: ConfChangeType) -> ConfChangeSingle {
        let mut s = ConfChangeSingle::default();
        s.node_id = node;
        s.set_change_type(change);
        s
    }

    fn change(steps: Vec<ConfChangeSingle>) -> ConfChangeV2 {
        let mut cc = ConfChangeV2::default();
        cc.set_changes(steps.into());
        cc
    }

    impl Sim {
        /// Adds node `id` with an empty log and no membership, as a node
        /// started to join an existing cluster is. The leader compacts its
        /// log first: the membership the log starts from was stored at
        /// bootstrap, outside the log, so a new node learns it only from a
        /// snapshot (as TiKV's peers, whose logs start past index 5).
        fn add_empty_node(&mut self, id: NodeId) {
            let leader = self.leaders()[0];
            self.barrier(leader, 1000 + id).unwrap();
            let applied = self.core(leader).view().applied_index;
            self.core_mut(leader).compact(applied, Vec::new()).unwrap();
            self.start_empty_node(id);
        }

        /// Starts node `id` with an empty log and no membership.
        fn start_empty_node(&mut self, id: NodeId) {
            let log = MemLog {
                mem: MemStorage::new(),
                applied: Arc::new(Mutex::new(0)),
            };
            self.nodes.insert(
                id,
                SimNode {
                    log,
                    core: None,
                    sm: Recorder::default(),
                },
            );
            self.boot(id);
        }

        fn change_members(&mut self, via: NodeId, cc: ConfChangeV2) -> Result<(), CoreError> {
            self.core_mut(via)
                .propose_membership(cc, b"addresses".to_vec())?;
            self.settle();
            Ok(())
        }

        fn live(&self) -> Vec<NodeId> {
            self.nodes
                .iter()
                .filter(|(_, n)| n.core.is_some())
                .map(|(id, _)| *id)
                .collect()
        }

        /// Ticks until every live node's applied configuration is `voters`
        /// and `learners`, and not joint.
        fn settle_members(&mut self, voters: &[NodeId], learners: &[NodeId]) {
            let what = format!("every live node has voters {voters:?} and learners {learners:?}");
            self.run_until(300, &what, |s| {
                s.live().iter().all(|&id| {
                    let c = s.core(id);
                    c.voters() == voters && c.learners() == learners && !c.is_joint()
                })
            });
        }
    }

    /// Nodes `1..=voters` voters, the next node started empty and added as
    /// a learner; returns the cluster and its leader.
    fn voters_and_a_learner(voters: u64) -> (Sim, NodeId) {
        let mut sim = Sim::new(voters);
        let leader = sim.elect();
        let learner = voters + 1;
        sim.add_empty_node(learner);
        sim.change_members(
            leader,
            change(vec![single(learner, ConfChangeType::AddLearnerNode)]),
        )
        .unwrap();
        let all: Vec<NodeId> = (1..=voters).collect();
        sim.settle_members(&all, &[learner]);
        (sim, leader)
    }

    /// A node that joins empty takes no log entries while the leader's
    /// snapshot predates it: replaying the log from index 1 would apply the
    /// first membership change to no members at all (the founders were
    /// stored at bootstrap, outside the log) and leave it a cluster of its
    /// own. Once the leader compacts, it starts from a snapshot listing it.
    #[test]
    fn a_joining_node_takes_no_entries_before_a_snapshot_that_lists_it() {
        let mut sim = Sim::new(3);
        let leader = sim.elect();
        sim.barrier(leader, 7).unwrap();
        assert_eq!(sim.core(leader).view().first_index, 1, "never compacted");
        sim.start_empty_node(4);
        sim.change_members(
            leader,
            change(vec![single(4, ConfChangeType::AddLearnerNode)]),
        )
        .unwrap();
        for _ in 0..30 {
            sim.tick();
            let joiner = sim.core(4);
            assert!(
                joiner.is_joining_empty(),
                "node 4 took entries without a snapshot: {:?}",
                joiner.view().members
            );
        }
        // (The simulation's storage builds each snapshot from the current
        // membership, so `snapshot_predates_a_member` is RaftStore's to test.)
        let applied = sim.core(leader).view().applied_index;
        sim.core_mut(leader).compact(applied, Vec::new()).unwrap();
        sim.settle_members(&[1, 2, 3], &[4]);
        assert_eq!(
            sim.nodes[&4].sm.restored.len(),
            1,
            "it started from a snapshot"
        );
    }

    /// A leader that applies its own removal steps down (raft-rs would
    /// leave it leading, and heartbeating, from outside the cluster), and
    /// the remaining voters elect one of their own and commit.
    #[test]
    fn a_leader_that_applies_its_own_removal_steps_down() {
        let mut sim = Sim::new(4);
        let leader = sim.elect();
        sim.change_members(
            leader,
            change(vec![single(leader, ConfChangeType::RemoveNode)]),
        )
        .unwrap();
        sim.run_until(300, "a remaining voter leads", |s| {
            s.leaders().len() == 1 && s.leaders()[0] != leader
        });
        let rest: Vec<NodeId> = (1..=4).filter(|&i| i != leader).collect();
        sim.settle_members(&rest, &[]);
        let new = sim.leaders()[0];
        sim.barrier(new, 99).unwrap();
        for _ in 0..50 {
            sim.tick();
            assert!(
                !sim.core(leader).is_leader(),
                "the removed node leads again"
            );
        }
    }

    /// Two voters and a learner: with the other voter down, the leader and
    /// the learner would be two of three if the learner counted; nothing
    /// commits until the voter is back.
    #[test]
    fn a_learners_ack_does_not_count_in_the_quorum() {
        let (mut sim, leader) = voters_and_a_learner(2);
        let other = if leader == 1 { 2 } else { 1 };
        sim.crash(other);
        sim.core_mut(leader)
            .propose(&Command::Barrier {
                origin: leader,
                token: 3,
            })
            .unwrap();
        for _ in 0..3 {
            sim.tick();
        }
        assert!(
            !sim.applied_barrier(leader, 3),
            "a learner's ack committed an entry"
        );
        sim.boot(other);
        sim.run_until(300, "the barrier commits once the voter is back", |s| {
            s.live().iter().all(|&id| s.applied_barrier(id, 3))
        });
    }

    /// A change that changes nothing is refused up front.
    #[test]
    fn an_empty_membership_change_is_refused() {
        let mut sim = Sim::new(3);
        let leader = sim.elect();
        let refused = sim
            .core_mut(leader)
            .propose_membership(ConfChangeV2::default(), vec![]);
        assert!(
            matches!(refused, Err(CoreError::BadEntry(_))),
            "{refused:?}"
        );
    }

    /// A fourth node starts empty, joins as a learner, receives the log
    /// after a snapshot, becomes a voter, and its vote counts: with one old
    /// node removed and another stopped, the last old node and the new one
    /// still commit.
    #[test]
    fn a_learner_joins_is_promoted_and_its_vote_counts() {
        let (mut sim, leader) = voters_and_a_learner(3);
        sim.barrier(leader, 2).unwrap();
        sim.run_until(50, "the learner applied the barrier", |s| {
            s.applied_barrier(4, 2)
        });
        let joined = &sim.nodes[&4].sm;
        assert_eq!(
            joined.restored.len(),
            1,
            "the learner started from a snapshot"
        );
        let learned: Vec<u64> = joined.applied.iter().map(|(i, _)| *i).collect();
        let reference: Vec<u64> = sim.nodes[&leader]
            .sm
            .applied
            .iter()
            .map(|(i, _)| *i)
            .filter(|&i| i > joined.restored[0])
            .collect();
        assert_eq!(
            learned, reference,
            "the learner applied the log after it, in order"
        );

        // Promoted: a voter like the others.
        sim.change_members(leader, change(vec![single(4, ConfChangeType::AddNode)]))
            .unwrap();
        sim.settle_members(&[1, 2, 3, 4], &[]);

        // Remove one old node (not the leader), stop another: the leader and
        // node 4 are two of three voters.
        let old: Vec<NodeId> = (1..=3).filter(|&id| id != leader).collect();
        sim.change_members(
            leader,
            change(vec![single(old[0], ConfChangeType::RemoveNode)]),
        )
        .unwrap();
        let mut voters: Vec<NodeId> = vec![leader, old[1], 4];
        voters.sort_unstable();
        sim.crash(old[0]);
        sim.settle_members(&voters, &[]);
        sim.crash(old[1]);
        sim.barrier(leader, 4).unwrap();
        sim.run_until(50, "node 4's vote commits with the leader's", |s| {
            s.applied_barrier(4, 4) && s.applied_barrier(leader, 4)
        });
    }

    /// The leader goes down after sending a joint change (promote a
    /// learner, remove the leader itself) but before hearing it was
    /// committed: the next leader commits it and leaves the joint
    /// configuration by itself. Every node then restarts with the committed
    /// membership from its own log.
    #[test]
    fn a_joint_change_cut_short_by_leader_loss_is_finished_by_the_next_leader() {
        let (mut sim, leader) = voters_and_a_learner(3);
        let mut joint = change(vec![
            single(4, ConfChangeType::AddNode),
            single(leader, ConfChangeType::RemoveNode),
        ]);
        joint.set_transition(ConfChangeTransition::Explicit);
        sim.core_mut(leader)
            .propose_membership(joint, Vec::new())
            .unwrap();
        // The leader persists and sends its appends, then dies before any ack.
        let out = {
            let node = sim.nodes.get_mut(&leader).unwrap();
            node.core
                .as_mut()
                .unwrap()
                .handle_ready(&mut node.sm)
                .unwrap()
        };
        sim.crash(leader);
        for m in out.messages {
            if let Some(core) = sim.nodes.get_mut(&m.to).and_then(|n| n.core.as_mut()) {
                core.step(m).unwrap();
            }
        }
        let mut rest: Vec<NodeId> = (1..=4).filter(|&id| id != leader).collect();
        rest.sort_unstable();
        sim.settle_members(&rest, &[]);
        let new_leader = sim.elect();
        assert_ne!(new_leader, leader);

        // A second change while one is pending is refused.
        sim.core_mut(new_leader)
            .propose_membership(
                change(vec![single(9, ConfChangeType::AddLearnerNode)]),
                vec![],
            )
            .unwrap();
        let busy = sim.core_mut(new_leader).propose_membership(
            change(vec![single(8, ConfChangeType::AddLearnerNode)]),
            vec![],
        );
        assert!(matches!(busy, Err(CoreError::Busy(_))), "{busy:?}");
        sim.settle_members(&rest, &[9]);

        for id in rest.clone() {
            sim.crash(id);
        }
        for id in rest.clone() {
            sim.boot(id);
        }
        sim.settle_members(&rest, &[9]);
        let leader = sim.elect();
        sim.barrier(leader, 5).unwrap();
        sim.run_until(50, "the restarted cluster commits", |s| {
            s.live().iter().all(|&id| s.applied_barrier(id, 5))
        });
    }
}
