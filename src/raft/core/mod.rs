//! The Raft driver core: a sans-IO wrapper around raft-rs's `RawNode`.
//!
//! It owns the order in which a `Ready` is handled (persist, then send, then
//! apply, then advance), the encoding of our commands in Raft entries, and the
//! node's view of itself for status. It does no networking and no waiting:
//! the node task in [`crate::node`] feeds it ticks and messages and ships what
//! it returns, and the tests in `raft/core/sim_tests.rs` drive several cores
//! through a fault-injecting in-memory network.
//!
//! Invariant owned here: nothing is handed to the state machine before it was
//! committed, and no message leaves before the state it depends on is durable.

use raft::prelude::*;
use raft::{GetEntriesContext, RawNode, StateRole, Storage};

use crate::core::config::{NodeId, RaftTimers};
use crate::core::manifest::{Chunk, FileBatch, Pause};
pub use crate::core::members::{MemberChange, Membership};
pub use crate::core::status::{MemberView, NodeView, PeerProgress, Role};

/// Durable storage the core needs beyond `raft::Storage`'s read side.
/// Every method returns only once what it wrote is durable (fsync'd).
pub trait LogStore: Storage {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Appends entries (truncating a conflicting suffix) and the hard state, atomically.
    fn persist(&self, entries: &[Entry], hard_state: Option<&HardState>)
        -> Result<(), Self::Error>;
    /// Records a new commit index (from a `LightReady`).
    fn set_commit(&self, commit: u64) -> Result<(), Self::Error>;
    /// Installs a snapshot received from the leader, replacing the log.
    fn apply_snapshot(&self, snapshot: &Snapshot) -> Result<(), Self::Error>;
    /// Drops entries up to `index`, keeping `data` as the snapshot at that index.
    fn compact(&self, index: u64, data: Vec<u8>) -> Result<(), Self::Error>;
    /// The state machine's applied index, restored into `raft::Config::applied` on restart.
    fn applied(&self) -> u64;
    fn set_applied(&self, index: u64) -> Result<(), Self::Error>;
    /// Records the membership the committed conf change at entry `at`
    /// produced, raising the applied index to `at` in the same durable
    /// write: a restart neither replays the change onto a membership that
    /// has it nor starts from one that lacks it.
    fn set_conf_state(&self, conf_state: &ConfState, at: u64) -> Result<(), Self::Error>;
    /// The membership of the snapshot a follower behind the log is sent.
    fn snapshot_conf_state(&self) -> ConfState;
}

/// What the state machine is told about a committed entry.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedEntry {
    pub index: u64,
    pub term: u64,
    /// `None` for the empty entry every new leader appends, and for every
    /// entry of a store that hands a `Ready` only headers (`RaftStore`: the
    /// applier reads the commands back from the log itself).
    pub command: Option<Command>,
    /// A committed membership change, which the core carries out itself
    /// once the shell reports this entry applied ([`RaftCore::applied_to`]).
    pub membership: Option<MembershipEntry>,
}

/// A committed change of the cluster's members, as raft-rs encodes it, with
/// the bytes its proposer attached (the node layer's addresses of new
/// members: the core does not read them).
#[derive(Debug, Clone, PartialEq)]
pub struct MembershipEntry {
    pub change: ConfChangeV2,
    pub context: Vec<u8>,
}

/// The receiver of committed entries. Apply must be deterministic: every node
/// applies the same entries in the same order.
pub trait StateMachine {
    fn apply(&mut self, entry: &CommittedEntry) -> Result<(), CoreError>;
    /// Bytes that stand for the whole state at the applied index (for log compaction).
    fn snapshot_data(&self) -> Vec<u8>;
    /// Replaces the state with a snapshot received from the leader.
    fn restore(&mut self, index: u64, data: &[u8]) -> Result<(), CoreError>;
}

/// Commands carried in Raft entries. The byte format is pinned by a test:
/// it is written into every node's durable log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A no-op that proves the cluster can commit; `token` lets the proposer find it.
    Barrier { origin: NodeId, token: u64 },
    /// Changes to one sync set, visible together.
    Files(FileBatch),
    /// A piece of a large patch that a later `Files` batch refers to.
    Chunk(Chunk),
    /// `clusterctl pause`: the leader proposes nothing of `set` until it
    /// is resumed (a later pause of the same set replaces this one).
    Pause { set: String, pause: Pause },
    /// `clusterctl resume` (or the end of `--for`): the set's accumulated
    /// state is proposed again.
    Resume { set: String, by: String },
    /// `clusterctl sync`: every follower squares its copy of these sets
    /// (all, when empty) with the manifest now: what differs is
    /// quarantined and replaced, what is missing is fetched.
    Reconcile { sets: Vec<String> },
    /// `clusterctl rollback`: changes that no node's tree holds yet (old
    /// versions brought back from the history), so every node, the
    /// proposing leader included, writes them through its apply path
    /// (quarantining what it holds uncommitted); `batch.origin` is
    /// [`NO_ORIGIN`], `proposer` the leader that proposed it.
    Rollback { proposer: NodeId, batch: FileBatch },
}

/// The origin of a batch whose content no node's tree holds yet.
pub const NO_ORIGIN: NodeId = 0;

/// The change a conf-change entry carries, as a `ConfChangeV2` (an empty
/// one, raft-rs's way to leave a joint configuration, included).
pub fn decode_membership(entry: &Entry) -> Result<ConfChangeV2, CoreError> {
    use protobuf::Message as _;
    let bad = |e: protobuf::ProtobufError| {
        CoreError::BadEntry(format!(
            "entry {} is a membership change that cannot be decoded: {e}",
            entry.index
        ))
    };
    match entry.get_entry_type() {
        // Never proposed by clusterd; read as raft-rs's `into_v2` would.
        EntryType::EntryConfChange => {
            let v1 = ConfChange::parse_from_bytes(&entry.data).map_err(bad)?;
            let mut single = ConfChangeSingle::default();
            single.set_change_type(v1.get_change_type());
            single.node_id = v1.node_id;
            let mut v2 = ConfChangeV2::default();
            v2.set_changes(vec![single].into());
            v2.context = v1.context;
            Ok(v2)
        }
        _ => ConfChangeV2::parse_from_bytes(&entry.data).map_err(bad),
    }
}

const COMMAND_FORMAT_V1: u8 = 1;
const KIND_BARRIER: u8 = 1;
const KIND_FILES: u8 = 2;
const KIND_CHUNK: u8 = 3;
const KIND_PAUSE: u8 = 4;
const KIND_RESUME: u8 = 5;
const KIND_RECONCILE: u8 = 6;
const KIND_ROLLBACK: u8 = 7;
/// Most sets one `Reconcile` may name.
const RECONCILE_SETS_MAX: usize = 1024;

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Command::Barrier { origin, token } => {
                let mut out = Vec::with_capacity(18);
                out.push(COMMAND_FORMAT_V1);
                out.push(KIND_BARRIER);
                out.extend_from_slice(&origin.to_be_bytes());
                out.extend_from_slice(&token.to_be_bytes());
                out
            }
            Command::Files(batch) => {
                let mut out = vec![COMMAND_FORMAT_V1, KIND_FILES];
                out.extend(crate::core::manifest::encode_batch(batch));
                out
            }
            Command::Chunk(chunk) => {
                let mut out = vec![COMMAND_FORMAT_V1, KIND_CHUNK];
                out.extend(crate::core::manifest::encode_chunk(chunk));
                out
            }
            Command::Pause { set, pause } => {
                let mut out = vec![COMMAND_FORMAT_V1, KIND_PAUSE];
                out.extend(postcard::to_allocvec(&(set, pause)).expect("a pause serializes"));
                out
            }
            Command::Resume { set, by } => {
                let mut out = vec![COMMAND_FORMAT_V1, KIND_RESUME];
                out.extend(postcard::to_allocvec(&(set, by)).expect("a resume serializes"));
                out
            }
            Command::Reconcile { sets } => {
                let mut out = vec![COMMAND_FORMAT_V1, KIND_RECONCILE];
                out.extend(postcard::to_allocvec(sets).expect("set names serialize"));
                out
            }
            Command::Rollback { proposer, batch } => {
                let mut out = vec![COMMAND_FORMAT_V1, KIND_ROLLBACK];
                out.extend_from_slice(&proposer.to_be_bytes());
                out.extend(crate::core::manifest::encode_batch(batch));
                out
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Command, CoreError> {
        match bytes {
            [COMMAND_FORMAT_V1, KIND_BARRIER, rest @ ..] if rest.len() == 16 => Ok(Command::Barrier {
                origin: u64::from_be_bytes(rest[..8].try_into().expect("8 bytes")),
                token: u64::from_be_bytes(rest[8..].try_into().expect("8 bytes")),
            }),
            [COMMAND_FORMAT_V1, KIND_FILES, rest @ ..] => crate::core::manifest::decode_batch(rest)
                .map(Command::Files)
                .map_err(|e| CoreError::BadEntry(e.to_string())),
            [COMMAND_FORMAT_V1, KIND_CHUNK, rest @ ..] => crate::core::manifest::decode_chunk(rest)
                .map(Command::Chunk)
                .map_err(|e| CoreError::BadEntry(e.to_string())),
            [COMMAND_FORMAT_V1, KIND_PAUSE, rest @ ..] => {
                let (set, pause): (String, Pause) = postcard::from_bytes(rest)
                    .map_err(|e| CoreError::BadEntry(format!("a pause does not decode: {e}")))?;
                Pause::check(&set, &pause).map_err(CoreError::BadEntry)?;
                Ok(Command::Pause { set, pause })
            }
            [COMMAND_FORMAT_V1, KIND_RESUME, rest @ ..] => {
                let (set, by): (String, String) = postcard::from_bytes(rest)
                    .map_err(|e| CoreError::BadEntry(format!("a resume does not decode: {e}")))?;
                let probe = Pause { reason: String::new(), since_ms: 0, until_ms: None, by };
                Pause::check(&set, &probe).map_err(CoreError::BadEntry)?;
                Ok(Command::Resume { set, by: probe.by })
            }
            [COMMAND_FORMAT_V1, KIND_RECONCILE, rest @ ..] => {
                let sets: Vec<String> = postcard::from_bytes(rest).map_err(|e| {
                    CoreError::BadEntry(format!("a reconcile does not decode: {e}"))
                })?;
                if sets.len() > RECONCILE_SETS_MAX
                    || sets
                        .iter()
                        .any(|s| s.is_empty() || s.len() > crate::core::manifest::SET_NAME_MAX)
                {
                    return Err(CoreError::BadEntry(format!(
                        "a reconcile names {} sets, or one of a bad length",
                        sets.len()
                    )));
                }
                Ok(Command::Reconcile { sets })
            }
            [COMMAND_FORMAT_V1, KIND_ROLLBACK, rest @ ..] if rest.len() >= 8 => {
                let proposer = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
                let batch = crate::core::manifest::decode_batch(&rest[8..])
                    .map_err(|e| CoreError::BadEntry(e.to_string()))?;
                if batch.origin != NO_ORIGIN {
                    return Err(CoreError::BadEntry(format!(
                        "a rollback of sync set {:?} names node {} as its origin",
                        batch.set, batch.origin
                    )));
                }
                Ok(Command::Rollback { proposer, batch })
            }
            [version, kind, ..] => Err(CoreError::BadEntry(format!(
                "unknown command (format {version}, kind {kind}, {} bytes); is a newer clusterd leading?",
                bytes.len()
            ))),
            _ => Err(CoreError::BadEntry(format!("command of {} bytes is too short", bytes.len()))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("the Raft log could not be written: {0}; the node stops rather than act on state that is not durable")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("not the leader (leader: {})", leader.map_or("unknown".to_string(), |l| format!("node {l}")))]
    NotLeader { leader: Option<NodeId> },
    #[error("a committed entry cannot be applied: {0}")]
    BadEntry(String),
    /// The request is valid but cannot be taken right now.
    #[error("{0}")]
    Busy(String),
}

/// A change of role or leader, for hooks and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleChange {
    pub role: Role,
    pub term: u64,
    pub leader: Option<NodeId>,
}

/// What one round of `Ready` handling produced for the shell to act on.
#[derive(Debug, Default)]
pub struct CoreOutput {
    /// Messages to send; their state is already durable.
    pub messages: Vec<Message>,
    /// Entries applied in this round, in order (by [`RaftCore::handle_ready`]),
    /// or committed and waiting for the shell to apply them (by
    /// [`RaftCore::handle_ready_deferred`]).
    pub applied: Vec<CommittedEntry>,
    /// A snapshot installed in the log; with deferred apply, the shell must
    /// restore its state machine from it before applying `applied`.
    pub snapshot: Option<(u64, Vec<u8>)>,
    pub role_change: Option<RoleChange>,
}

/// Knobs of the core that are not user configuration.
#[derive(Debug, Clone)]
pub struct CoreOptions {
    /// Compact the log once this many applied entries sit before the first index.
    pub compact_after: u64,
    /// Also compact once this many bytes of entries were written since the
    /// last compaction (or 8 × the last snapshot's size, if larger, so a
    /// large manifest is not rewritten for every few MiB), to an index every
    /// live follower has: file content then leaves RocksDB while still in
    /// its memtable, instead of being written a second time into blob files
    /// (a quarter of a node's CPU during a full sync, perf).
    pub compact_bytes: u64,
    pub witness: bool,
}

impl Default for CoreOptions {
    fn default() -> Self {
        CoreOptions {
            compact_after: 20_000,
            compact_bytes: 8 << 20,
            witness: false,
        }
    }
}

pub struct RaftCore<S: LogStore> {
    raw: RawNode<S>,
    options: CoreOptions,
    last_role: Option<RoleChange>,
    /// Messages from an older term seen since start (for status).
    stale_term_messages: u64,
    /// Answers the core makes itself, sent with the next `Ready`'s messages
    /// (a joining node's refusal of log entries).
    outbox: Vec<Message>,
    /// The stale term last logged per sender, so a deposed leader's
    /// heartbeats are logged once per term instead of ten times a second.
    stale_logged: std::collections::HashMap<NodeId, u64>,
    /// Entry data persisted since the last compaction (for `compact_bytes`).
    bytes_since_compaction: u64,
    /// Size of the last compaction's snapshot data.
    last_snapshot_len: u64,
    /// Membership changes handed out as committed and not yet applied, in
    /// log order: raft-rs's configuration follows the applied index, not
    /// the commit index.
    membership_to_apply: std::collections::VecDeque<(u64, ConfChangeV2)>,
}

/// The raft-rs configuration every node uses: pre-vote and check-quorum on;
/// the election timeout is randomized in [timeout, 1.5 × timeout).
///
/// A witness votes but must never lead: its randomized election timeout is
/// pushed out of reach (a day of ticks), while `election_tick` stays the
/// cluster's so its leader-lease checks match everyone else's.
pub fn raft_config(id: NodeId, timers: &RaftTimers, applied: u64, witness: bool) -> raft::Config {
    let election_tick = timers.election_ticks().max(3);
    let (min_election_tick, max_election_tick) = if witness {
        let never = (86_400_000 / timers.tick().as_millis().max(1)) as usize;
        (never, never + 1)
    } else {
        (election_tick, election_tick + election_tick / 2)
    };
    raft::Config {
        id,
        election_tick,
        heartbeat_tick: crate::core::config::TICKS_PER_HEARTBEAT as usize,
        min_election_tick,
        max_election_tick,
        applied,
        pre_vote: true,
        check_quorum: true,
        max_size_per_msg: 1024 * 1024,
        // With file content in entries, 16 × 1 MiB in flight per follower
        // keeps heartbeats from queueing behind hundreds of MiB.
        max_inflight_msgs: 16,
        ..Default::default()
    }
}

impl<S: LogStore> RaftCore<S> {
    /// Builds the core over already-bootstrapped storage. If a crash came
    /// between installing a snapshot and recording it as applied, the state
    /// machine is restored from that snapshot first, so raft-rs never sees an
    /// applied index below its first entry.
    pub fn new(
        id: NodeId,
        timers: &RaftTimers,
        store: S,
        options: CoreOptions,
        logger: &slog::Logger,
        sm: &mut impl StateMachine,
    ) -> Result<Self, CoreError> {
        let snapshot_index = store.first_index()? - 1;
        if store.applied() < snapshot_index {
            let snapshot = store.snapshot(snapshot_index, id)?;
            sm.restore(snapshot_index, snapshot.get_data())?;
            store.set_applied(snapshot_index).map_err(storage_err)?;
        }
        let applied = store.applied();
        let config = raft_config(id, timers, applied, options.witness);
        let raw = RawNode::new(&config, store, logger)?;
        Ok(RaftCore {
            raw,
            options,
            last_role: None,
            stale_term_messages: 0,
            outbox: Vec::new(),
            stale_logged: std::collections::HashMap::new(),
            bytes_since_compaction: 0,
            last_snapshot_len: 0,
            membership_to_apply: Default::default(),
        })
    }

    pub fn id(&self) -> NodeId {
        self.raw.raft.id
    }

    /// Advances the Raft clock by one heartbeat interval.
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Feeds a message from a peer (already authenticated by the shell).
    ///
    /// A message from an older term is rejected: raft-rs neither appends its
    /// entries nor counts its votes, and answers with the current term so a
    /// deposed leader learns it was replaced. It is counted and logged here
    /// (once per sender and term).
    pub fn step(&mut self, mut message: Message) -> Result<(), CoreError> {
        self.note_stale_term(&message);
        if self.options.witness && message.get_msg_type() == MessageType::MsgTimeoutNow {
            // A witness holds no files, so it refuses to be handed leadership.
            return Ok(());
        }
        let last = self.raw.raft.raft_log.last_index();
        if message.get_msg_type() == MessageType::MsgHeartbeat && message.commit > last {
            // The leader remembers this node having entries it no longer has: its
            // data dir was replaced. raft-rs would panic on the commit; taking
            // only what we hold is safe (nothing beyond `last` is marked
            // committed), and the next append makes the leader probe back and
            // resend the log.
            tracing::warn!(
                leader = message.from,
                commit = message.commit,
                last_index = last,
                "the leader believes this node holds entries up to {} but its log ends at {last} (was its data dir replaced?); catching up",
                message.commit
            );
            message.commit = last;
        }
        if message.get_msg_type() == MessageType::MsgAppend && self.is_joining_empty() {
            // A node that joins knows no members and holds no log: entries
            // from index 1 would replay the first membership change onto
            // an empty configuration (bootstrap stored the founders outside
            // the log), leaving it a cluster of its own. Refusing them with
            // a hint of 0 makes the leader fall back to the first index,
            // and, once it compacted past the change that added this node,
            // to a snapshot that lists it. Entries from the very start are
            // dropped without an answer: the leader then tries again once
            // per heartbeat rather than at once, until it has compacted.
            if message.index == 0 {
                return Ok(());
            }
            let mut refusal = Message::default();
            refusal.set_msg_type(MessageType::MsgAppendResponse);
            refusal.to = message.from;
            refusal.from = self.raw.raft.id;
            refusal.term = message.term;
            refusal.index = message.index;
            refusal.reject = true;
            refusal.reject_hint = 0;
            self.outbox.push(refusal);
            return Ok(());
        }
        match self.raw.step(message) {
            // Stale or misdirected messages are normal after restarts and partitions.
            Ok(()) | Err(raft::Error::StepPeerNotFound) | Err(raft::Error::StepLocalMsg) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Appends `command` to the leader's log; returns its encoded size.
    pub fn propose(&mut self, command: &Command) -> Result<usize, CoreError> {
        if self.raw.raft.state != StateRole::Leader {
            return Err(self.not_leader());
        }
        let data = command.encode();
        let len = data.len();
        match self.raw.propose(vec![], data) {
            Ok(()) => Ok(len),
            // Dropped while a leadership transfer is in flight: the caller retries.
            Err(raft::Error::ProposalDropped) => Err(CoreError::Busy(
                "a leadership transfer is in progress; retry in a moment".to_string(),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Proposes an administrator's (or a promotion's) membership change:
    /// an added member's address travels in the change's context, and a
    /// promotion that replaces a voter is one joint change that raft-rs
    /// leaves by itself once it applies.
    pub fn propose_member_change(&mut self, change: &MemberChange) -> Result<(), CoreError> {
        let single = |id: NodeId, kind: ConfChangeType| {
            let mut c = ConfChangeSingle::default();
            c.node_id = id;
            c.set_change_type(kind);
            c
        };
        let (changes, context) = match change {
            MemberChange::Add(info) => (
                vec![single(info.id, ConfChangeType::AddLearnerNode)],
                crate::core::members::encode_context(std::slice::from_ref(info)),
            ),
            MemberChange::Promote { id, replaces } => {
                let mut v = vec![single(*id, ConfChangeType::AddNode)];
                if let Some(old) = replaces {
                    v.push(single(*old, ConfChangeType::RemoveNode));
                }
                (v, Vec::new())
            }
            MemberChange::Remove(id) => (vec![single(*id, ConfChangeType::RemoveNode)], Vec::new()),
        };
        let mut cc = ConfChangeV2::default();
        cc.set_changes(changes.into());
        cc.set_transition(ConfChangeTransition::Auto);
        self.propose_membership(cc, context)
    }

    /// Whether this node knows no members and holds no log: it waits to
    /// be added, and must start from a snapshot.
    pub fn is_joining_empty(&self) -> bool {
        let conf = self.raw.raft.prs().conf().to_conf_state();
        conf.voters.is_empty()
            && conf.learners.is_empty()
            && self.raw.raft.raft_log.last_index() == 0
    }

    /// Whether a learner that holds nothing yet has no snapshot listing it
    /// to start from: the stored snapshot predates the change that added it
    /// (and raft-rs on the new node refuses a snapshot that does not list
    /// it, while log entries from the start would replay the founding
    /// membership wrong: see [`RaftCore::is_joining_empty`]). The leader
    /// then compacts anew, whatever the other followers hold.
    ///
    /// Returns those learners; a new leader knows no follower's progress
    /// yet (every match index starts at 0), so the shell keeps only those
    /// that never reported holding anything.
    pub fn learners_needing_a_snapshot(&self) -> Vec<NodeId> {
        if !self.is_leader() {
            return Vec::new();
        }
        let conf = self.raw.store().snapshot_conf_state();
        let learners = self.raw.raft.prs().conf().to_conf_state().learners;
        self.raw
            .raft
            .prs()
            .iter()
            .filter(|(id, pr)| {
                learners.contains(id)
                    && pr.matched == 0
                    && !conf.voters.contains(id)
                    && !conf.learners.contains(id)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Proposes a change of members (raft-rs's joint consensus when it
    /// changes more than one voter); `context` travels with it to every
    /// node's [`CommittedEntry::membership`]. raft-rs refuses a second
    /// change while one is pending: that is [`CoreError::Busy`].
    pub fn propose_membership(
        &mut self,
        change: ConfChangeV2,
        context: Vec<u8>,
    ) -> Result<(), CoreError> {
        if self.raw.raft.state != StateRole::Leader {
            return Err(self.not_leader());
        }
        if change.changes.is_empty() {
            return Err(CoreError::BadEntry(
                "a membership change must add, promote or remove at least one node".to_string(),
            ));
        }
        if self.raw.raft.has_pending_conf() || self.is_joint() {
            return Err(CoreError::Busy(
                "another membership change is still being committed; retry once it is done"
                    .to_string(),
            ));
        }
        let pending = self.raw.raft.pending_conf_index;
        match self.raw.propose_conf_change(context, change) {
            // raft-rs turns a conf change it will not take into an empty
            // normal entry (or drops it during a transfer) without an
            // error: only a new pending change index says it was taken.
            Ok(()) if self.raw.raft.pending_conf_index != pending => Ok(()),
            Ok(()) | Err(raft::Error::ProposalDropped) => Err(CoreError::Busy(
                "the leader did not take the membership change (a leadership transfer or another change is in flight); retry in a moment".to_string(),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the committed configuration is joint (between an old and a
    /// new set of voters).
    pub fn is_joint(&self) -> bool {
        !self
            .raw
            .raft
            .prs()
            .conf()
            .to_conf_state()
            .voters_outgoing
            .is_empty()
    }

    /// The voters of the applied configuration that stay once a joint
    /// configuration is left (all voters when it is not joint).
    pub fn incoming_voters(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.raw.raft.prs().conf().to_conf_state().voters;
        v.sort_unstable();
        v
    }

    /// Whether a membership change is under way: proposed and not applied,
    /// or joint and not yet left. A second one must wait.
    pub fn membership_change_in_flight(&self) -> bool {
        self.raw.raft.has_pending_conf() || self.is_joint()
    }

    /// The most caught-up voter of the incoming configuration that answered
    /// within an election timeout, this leader excepted.
    fn best_incoming_voter(&self) -> Option<NodeId> {
        let me = self.raw.raft.id;
        let incoming = self.incoming_voters();
        self.raw
            .raft
            .prs()
            .iter()
            .filter(|(id, pr)| **id != me && pr.recent_active && incoming.contains(id))
            .max_by_key(|(_, pr)| pr.matched)
            .map(|(id, _)| *id)
    }

    /// Learners of the applied configuration (non-voting members).
    pub fn learners(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.raw.raft.prs().conf().to_conf_state().learners;
        v.sort_unstable();
        v
    }

    fn not_leader(&self) -> CoreError {
        CoreError::NotLeader {
            leader: self.leader(),
        }
    }

    /// Starts handing leadership to `target`; raft-rs catches it up first and
    /// aborts the transfer after an election timeout.
    pub fn transfer_leader(&mut self, target: NodeId) {
        self.raw.transfer_leader(target);
    }

    /// Tells Raft a peer could not be reached, so it probes instead of streaming.
    pub fn report_unreachable(&mut self, peer: NodeId) {
        self.raw.report_unreachable(peer);
    }

    /// Tells Raft whether a snapshot reached `peer`; until then it sends that peer nothing else.
    pub fn report_snapshot(&mut self, peer: NodeId, status: raft::SnapshotStatus) {
        self.raw.report_snapshot(peer, status);
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn leader(&self) -> Option<NodeId> {
        match self.raw.raft.leader_id {
            0 => None,
            id => Some(id),
        }
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn voters(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        v.sort_unstable();
        v
    }

    /// The leader's view of how far `peer` has replicated; `None` off the leader.
    pub fn match_index(&self, peer: NodeId) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        self.raw.raft.prs().get(peer).map(|p| p.matched)
    }

    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// Whether the leader heard from `peer` within the last election timeout.
    pub fn peer_active(&self, peer: NodeId) -> bool {
        self.is_leader()
            && self
                .raw
                .raft
                .prs()
                .get(peer)
                .is_some_and(|p| p.recent_active)
    }

    /// Whether the commit index lies in the current term: a new leader's
    /// first entry committed, so everything before it is committed too.
    pub fn committed_in_current_term(&self) -> bool {
        let log = &self.raw.raft.raft_log;
        log.term(log.committed)
            .is_ok_and(|t| t == self.raw.raft.term)
    }

    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    fn note_stale_term(&mut self, message: &Message) {
        let ours = self.raw.raft.term;
        // Term 0 marks local messages (proposals, read index) that carry no term.
        if message.term == 0 || message.term >= ours {
            return;
        }
        self.stale_term_messages += 1;
        if self.stale_logged.insert(message.from, message.term) == Some(message.term) {
            return;
        }
        let from_leader = matches!(
            message.get_msg_type(),
            MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
        );
        if from_leader {
            tracing::warn!(
                peer = message.from,
                their_term = message.term,
                term = ours,
                "rejected {:?} from node {} of older term {} (this node is at term {ours}): \
                 it was deposed or cut off; nothing it proposed since then can commit",
                message.get_msg_type(),
                message.from,
                message.term
            );
        } else {
            // Late answers to an earlier election are normal after a partition.
            tracing::debug!(
                peer = message.from,
                their_term = message.term,
                term = ours,
                "rejected {:?} from node {} of older term {}",
                message.get_msg_type(),
                message.from,
                message.term
            );
        }
    }

    pub fn view(&self) -> NodeView {
        let raft = &self.raw.raft;
        let conf = raft.prs().conf().to_conf_state();
        let mut voters: Vec<NodeId> = conf.voters.clone();
        voters.extend(
            conf.voters_outgoing
                .iter()
                .filter(|v| !conf.voters.contains(v)),
        );
        voters.sort_unstable();
        let mut learners = conf.learners.clone();
        learners.extend(&conf.learners_next);
        learners.sort_unstable();
        learners.dedup();
        let member = if voters.contains(&raft.id) {
            if self.options.witness {
                Membership::Witness
            } else {
                Membership::Voter
            }
        } else if learners.contains(&raft.id) {
            Membership::Learner
        } else if voters.is_empty() {
            Membership::Joining
        } else {
            Membership::Removed
        };
        let role = match raft.state {
            StateRole::Leader => Role::Leader,
            _ if self.options.witness => Role::Witness,
            _ if member == Membership::Learner => Role::Learner,
            StateRole::Follower => Role::Follower,
            StateRole::Candidate | StateRole::PreCandidate => Role::Candidate,
        };
        let progress = if raft.state == StateRole::Leader {
            let mut p: Vec<PeerProgress> = raft
                .prs()
                .iter()
                .map(|(id, pr)| PeerProgress {
                    id: *id,
                    match_index: pr.matched,
                    recent_active: pr.recent_active,
                })
                .collect();
            p.sort_by_key(|p| p.id);
            p
        } else {
            Vec::new()
        };
        NodeView {
            id: raft.id,
            role,
            term: raft.term,
            vote: raft.vote,
            leader: self.leader(),
            commit_index: raft.raft_log.committed,
            applied_index: raft.raft_log.applied,
            stale_term_messages: self.stale_term_messages,
            first_index: raft.raft_log.first_index(),
            last_index: raft.raft_log.last_index(),
            progress,
            members: MemberView {
                voters,
                learners,
                // Known to the node layer: it fills them in.
                witnesses: Vec::new(),
                config_differs: None,
                member,
            },
        }
    }

    /// Handles everything raft-rs has ready, in the documented order:
    /// persist (snapshot, entries, hard state), then send, then apply, then
    /// advance. Applies synchronously to `sm` (the simulation tests' way).
    pub fn handle_ready(&mut self, sm: &mut impl StateMachine) -> Result<CoreOutput, CoreError> {
        let mut out = self.handle_ready_deferred()?;
        if let Some((index, data)) = &out.snapshot {
            sm.restore(*index, data)?;
            self.applied_to(*index)?;
        }
        for entry in &out.applied {
            sm.apply(entry)?;
        }
        if let Some(last) = out.applied.last() {
            self.applied_to(last.index)?;
        }
        let applied = self.raw.raft.raft_log.applied;
        if self.compaction_due() && self.compactable(applied) {
            self.compact(applied, sm.snapshot_data())?;
        }
        out.snapshot = None;
        Ok(out)
    }

    /// As [`RaftCore::handle_ready`] up to the apply step, which is left to
    /// the shell: committed entries (and an installed snapshot) are handed
    /// out once, in order, and the shell reports progress with
    /// [`RaftCore::applied_to`]. This keeps slow applies (writing a large file
    /// on a follower) from stalling heartbeats; the entries are durable in the
    /// log, so a crash before they are applied replays them.
    pub fn handle_ready_deferred(&mut self) -> Result<CoreOutput, CoreError> {
        let mut out = CoreOutput::default();
        out.messages.append(&mut self.outbox);
        self.leave_joint_if_stuck();
        if self.raw.has_ready() {
            let mut ready = self.raw.ready();
            let store = self.raw.store();
            if !ready.snapshot().is_empty() {
                let snapshot = ready.snapshot().clone();
                store.apply_snapshot(&snapshot).map_err(storage_err)?;
                // The snapshot's membership already holds every change up
                // to its index; carrying a queued one out again on top of it
                // could re-enter a joint configuration it has left.
                let index = snapshot.get_metadata().index;
                self.membership_to_apply.retain(|(at, _)| *at > index);
                out.snapshot = Some((snapshot.get_metadata().index, snapshot.get_data().to_vec()));
            }
            let hard_state = ready.hs().cloned();
            self.bytes_since_compaction += ready
                .entries()
                .iter()
                .map(|e| e.data.len() as u64)
                .sum::<u64>();
            if !ready.entries().is_empty() || hard_state.is_some() {
                store
                    .persist(ready.entries(), hard_state.as_ref())
                    .map_err(storage_err)?;
            }
            out.messages.extend(ready.take_messages());
            out.messages.extend(ready.take_persisted_messages());
            let committed = ready.take_committed_entries();
            self.decode_committed(committed, &mut out.applied)?;
            let mut light = self.raw.advance_append(ready);
            if let Some(commit) = light.commit_index() {
                self.raw.store().set_commit(commit).map_err(storage_err)?;
            }
            out.messages.extend(light.take_messages());
            let committed = light.take_committed_entries();
            self.decode_committed(committed, &mut out.applied)?;
        }
        let now = RoleChange {
            role: self.view().role,
            term: self.term(),
            leader: self.leader(),
        };
        if self.last_role.as_ref() != Some(&now) {
            self.last_role = Some(now.clone());
            out.role_change = Some(now);
        }
        Ok(out)
    }

    /// Records that the state machine has applied everything up to `index`
    /// (durably, in its own store); raft-rs hands out nothing twice.
    ///
    /// Membership changes up to `index` take effect here, in log order,
    /// each recorded durably before the applied index passes it. A change
    /// raft-rs refuses (one that would leave no voter) is logged and
    /// skipped on every node alike: the configuration stays as it was.
    pub fn applied_to(&mut self, index: u64) -> Result<(), CoreError> {
        if index <= self.raw.raft.raft_log.applied {
            return Ok(());
        }
        while let Some((at, _)) = self.membership_to_apply.front() {
            if *at > index {
                break;
            }
            let (at, change) = self.membership_to_apply.pop_front().expect("peeked");
            match self.raw.apply_conf_change(&change) {
                Ok(conf_state) => {
                    tracing::info!(index = at, "membership now {conf_state:?}");
                    self.raw
                        .store()
                        .set_conf_state(&conf_state, at)
                        .map_err(storage_err)?;
                    let me = self.raw.raft.id;
                    if self.is_leader()
                        && !conf_state.voters.contains(&me)
                        && !conf_state.voters_outgoing.contains(&me)
                    {
                        // raft-rs leaves a leader that applied its own
                        // removal leading (its check-quorum counts only
                        // the new voters): it would go on sending appends
                        // from outside the cluster.
                        tracing::warn!(
                            index = at,
                            "this leader is no longer a voter (entry {at}): stepping down so the remaining voters elect a leader"
                        );
                        let term = self.raw.raft.term;
                        self.raw.raft.become_follower(term, raft::INVALID_ID);
                    }
                }
                Err(e) => tracing::warn!(
                    index = at,
                    "the committed membership change at entry {at} cannot be carried out ({e}); the members stay as they were"
                ),
            }
        }
        self.raw.advance_apply_to(index);
        self.raw.store().set_applied(index).map_err(storage_err)
    }

    /// Whether enough applied entries (or bytes) sit in the log to compact it.
    pub fn compaction_due(&self) -> bool {
        let applied = self.raw.raft.raft_log.applied;
        let first = self.raw.raft.raft_log.first_index();
        let bytes_due = self.bytes_since_compaction
            >= self.options.compact_bytes.max(8 * self.last_snapshot_len);
        applied >= first + self.options.compact_after || (bytes_due && applied >= first)
    }

    /// Whether compacting to `index` leaves every follower that is in touch
    /// able to go on from the log: a leader's followers that answered within
    /// the last election timeout all hold `index` (a follower a few batches
    /// behind would otherwise need a snapshot and a fetch of every file it
    /// lacks). A dead follower does not hold compaction back, and only the
    /// byte trigger waits at all: past `compact_after` entries the log is
    /// compacted regardless. Other roles never serve the log.
    pub fn compactable(&self, index: u64) -> bool {
        let applied = self.raw.raft.raft_log.applied;
        let first = self.raw.raft.raft_log.first_index();
        if self.raw.raft.state != StateRole::Leader || applied >= first + self.options.compact_after
        {
            return true;
        }
        let me = self.raw.raft.id;
        self.raw
            .raft
            .prs()
            .iter()
            .all(|(&id, pr)| id == me || !pr.recent_active || pr.matched >= index)
    }

    /// Drops the log up to `index`, keeping `data` (the state machine's bytes
    /// at exactly `index`, which must be applied) as the snapshot that
    /// followers behind it receive.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Result<(), CoreError> {
        // The snapshot must stand for exactly the index it is stored at, since
        // a follower restoring it replays the entries after it.
        let len = data.len() as u64;
        self.raw.store().compact(index, data).map_err(storage_err)?;
        self.bytes_since_compaction = 0;
        self.last_snapshot_len = len;
        Ok(())
    }

    /// A leader whose applied configuration is joint, with no change
    /// pending, proposes leaving it. raft-rs does so itself only if the
    /// leader that entered the joint state applies that entry while still
    /// leading ("it may never auto_leave if leader steps down before enter
    /// joint is applied", raft.rs); a leader elected meanwhile would stay
    /// joint, needing both the old and the new majority for ever.
    fn leave_joint_if_stuck(&mut self) {
        if self.is_leader() && self.is_joint() && !self.raw.raft.has_pending_conf() {
            let me = self.raw.raft.id;
            if !self.incoming_voters().contains(&me) {
                // Leaving would remove this leader: hand over to a voter
                // of the new configuration, which then leaves.
                if let Some(next) = self.best_incoming_voter() {
                    if self.raw.raft.lead_transferee != Some(next) {
                        tracing::info!(
                            "the configuration is joint and this leader is not in the new one: handing leadership to node {next}, which will leave it"
                        );
                        self.raw.transfer_leader(next);
                    }
                }
                return;
            }
            tracing::info!(
                "the configuration is joint and no change is pending: proposing to leave it"
            );
            if let Err(e) = self
                .raw
                .propose_conf_change(Vec::new(), ConfChangeV2::default())
            {
                tracing::debug!("could not propose to leave the joint configuration yet: {e}");
            }
        }
    }

    /// Turns committed entries into what the state machine is told, and
    /// queues their membership changes for [`RaftCore::applied_to`].
    fn decode_committed(
        &mut self,
        entries: Vec<Entry>,
        out: &mut Vec<CommittedEntry>,
    ) -> Result<(), CoreError> {
        for entry in entries {
            let (command, membership) = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => (None, None),
                EntryType::EntryNormal => (Some(Command::decode(&entry.data)?), None),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let change = decode_membership(&entry)?;
                    self.membership_to_apply
                        .push_back((entry.index, change.clone()));
                    let context = entry.context.to_vec();
                    (None, Some(MembershipEntry { change, context }))
                }
            };
            out.push(CommittedEntry {
                index: entry.index,
                term: entry.term,
                command,
                membership,
            });
        }
        Ok(())
    }

    /// Entries in `[low, high)` with their data (an async-capable context:
    /// see `storage::with_data`), for tests and diagnostics.
    pub fn entries(&self, low: u64, high: u64) -> Result<Vec<Entry>, CoreError> {
        Ok(self
            .raw
            .store()
            .entries(low, high, None, GetEntriesContext::empty(true))?)
    }

    pub fn store(&self) -> &S {
        self.raw.store()
    }
}

fn storage_err(e: impl std::error::Error) -> CoreError {
    CoreError::Storage(e.to_string())
}

#[cfg(test)]
mod sim_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_encoding_is_pinned() {
        let c = Command::Barrier {
            origin: 3,
            token: 0x0102,
        };
        assert_eq!(
            c.encode(),
            vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 1, 2]
        );
        assert_eq!(Command::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn pause_and_resume_round_trip_and_refuse_oversized_text() {
        let pause = Command::Pause {
            set: "tacacs".into(),
            pause: Pause {
                reason: "multi-file edit".into(),
                since_ms: 5,
                until_ms: None,
                by: "node 2".into(),
            },
        };
        assert_eq!(&pause.encode()[..2], &[1, 4]);
        assert_eq!(Command::decode(&pause.encode()).unwrap(), pause);
        let resume = Command::Resume {
            set: "tacacs".into(),
            by: "admin alice".into(),
        };
        assert_eq!(&resume.encode()[..2], &[1, 5]);
        assert_eq!(Command::decode(&resume.encode()).unwrap(), resume);
        let long = Command::Resume {
            set: "s".repeat(300),
            by: String::new(),
        };
        assert!(matches!(
            Command::decode(&long.encode()),
            Err(CoreError::BadEntry(_))
        ));
        let reconcile = Command::Reconcile {
            sets: vec!["tacacs".into(), "mail".into()],
        };
        assert_eq!(&reconcile.encode()[..2], &[1, 6]);
        assert_eq!(Command::decode(&reconcile.encode()).unwrap(), reconcile);
        let empty_name = Command::Reconcile {
            sets: vec![String::new()],
        };
        assert!(matches!(
            Command::decode(&empty_name.encode()),
            Err(CoreError::BadEntry(_))
        ));
        let batch = crate::core::manifest::FileBatch {
            set: "tacacs".into(),
            origin: NO_ORIGIN,
            proposed_at_ms: 7,
            ops: vec![crate::core::manifest::FileOp::Remove {
                path: b"new.conf".to_vec(),
            }],
        };
        let rollback = Command::Rollback {
            proposer: 3,
            batch: batch.clone(),
        };
        assert_eq!(&rollback.encode()[..2], &[1, 7]);
        assert_eq!(Command::decode(&rollback.encode()).unwrap(), rollback);
        // A node's tree holds what an origin names: never one of these.
        let claimed = Command::Rollback {
            proposer: 3,
            batch: crate::core::manifest::FileBatch { origin: 2, ..batch },
        };
        assert!(matches!(
            Command::decode(&claimed.encode()),
            Err(CoreError::BadEntry(_))
        ));
    }

    #[test]
    fn unknown_commands_are_refused_not_misread() {
        assert!(matches!(
            Command::decode(&[2, 1, 0]),
            Err(CoreError::BadEntry(_))
        ));
        assert!(matches!(
            Command::decode(&[1, 9]),
            Err(CoreError::BadEntry(_))
        ));
        assert!(matches!(Command::decode(&[1]), Err(CoreError::BadEntry(_))));
        assert!(matches!(
            Command::decode(&[1, 1, 0, 0]),
            Err(CoreError::BadEntry(_))
        ));
    }

    #[test]
    fn default_timers_give_pre_vote_check_quorum_and_randomized_timeout() {
        // Heartbeats every 200 ms, ticks of 100 ms, elections after 1 s.
        let c = raft_config(1, &RaftTimers::default(), 0, false);
        assert!(c.pre_vote && c.check_quorum);
        assert_eq!((c.heartbeat_tick, c.election_tick), (2, 10));
        assert_eq!((c.min_election_tick, c.max_election_tick), (10, 15));
        c.validate().unwrap();
        let w = raft_config(1, &RaftTimers::default(), 0, true);
        assert_eq!(
            w.election_tick, 10,
            "a witness keeps the cluster's lease length"
        );
        assert!(
            w.min_election_tick >= 864_000,
            "a witness must never time out into a campaign"
        );
        w.validate().unwrap();
    }
}
