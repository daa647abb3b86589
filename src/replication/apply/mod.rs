//! The follower half of replication, run on every data node: it applies
//! committed file batches to the manifest and to the local sync trees, in
//! commit order, on its own thread (so a 1 GiB write never stalls Raft
//! heartbeats), and keeps the node-local state that goes with them.
//!
//! Invariants owned here:
//! * Only committed entries are applied (they are read back from the Raft
//!   store up to the commit index the node task reports), in index order,
//!   and the manifest plus the applied index are durable before the node
//!   task is told they were applied (invariant 1, 6).
//! * Every write goes through [`crate::fs::root::Root`] with the path checked
//!   by [`crate::core::manifest`] first (invariant 3), atomically and verified
//!   (invariant 2).
//! * A local file that differs from what this node last wrote and from the
//!   committed version is moved to `data_dir/quarantine` before anything
//!   replaces or deletes it (invariant 4).
//! * A change that cannot be applied from the log (a delta whose base this
//!   node lacks, a skipped set, a failed write) leaves the path "missing":
//!   its committed content is fetched from a peer later, never guessed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::Storage;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::core::config::SyncMode;
use crate::core::delta::{self, FileDigest, FileHasher, Patch};
use crate::core::manifest::{
    CheckedOp, Content, Entry, EntryKind, FileBatch, FileOp, Manifest, Meta,
};
use crate::core::paths::SetPath;
use crate::fs::root::{Expect, FileMeta, FsError, Kind, Root};
use crate::raft::core::{Command, CoreError};
use crate::raft::storage::RaftStore;
use crate::replication::files_store::{FilesStoreError, LocalRecord, StoreBatch};
use crate::replication::scan::*;
use crate::replication::shared::*;
use crate::replication::staging::*;

mod check;
mod quarantine;
mod reconcile;
mod revert;
#[cfg(test)]
pub(crate) mod tests;
mod write;

/// How long nothing must have been applied before the leader copies the
/// versions of its bulk batches into the history.
const HISTORY_CAPTURE_AFTER: Duration = Duration::from_secs(5);
/// How often retention prunes the history (a pass over its records), at a
/// quiet tick.
const HISTORY_PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Largest page of committed entries read back from the log at once.
const APPLY_PAGE_BYTES: u64 = 64 << 20;
/// Threads writing the files of one batch on a follower.
const WRITERS: usize = 8;
/// Batches of at least this many files are made durable with one `syncfs`
/// rather than an fsync per file (see [`Applier::write_files`]).
const GROUP_DURABLE_FILES: usize = 32;
/// Directories a batch fsyncs one by one; more are made durable with one
/// `syncfs`.
const DIR_FSYNCS_PER_BATCH: usize = 4;
/// Manifest entries [`Applier::reconcile_local`] copies out at a time.
const RECONCILE_SLICE: usize = 1024;
/// Time [`Applier::sign_linked`] takes of each idle applier tick (one a
/// second).
const SIGN_BUDGET: Duration = Duration::from_millis(250);
/// Committed content fetched from a peer for a missing path.
#[derive(Debug)]
pub struct Fetched {
    pub set: String,
    pub path: SetPath,
    pub want: FileDigest,
    /// An encoded [`Patch`] against this node's current local file.
    pub patch: Vec<u8>,
}

/// Fetched files the applier writes as one group at most.
const FETCHED_GROUP: usize = 256;

/// Inputs of the applier thread, in the order they must take effect.
#[derive(Debug)]
pub enum ApplyMsg {
    /// Entries up to this index are committed (and durable in the log).
    Committed(u64),
    /// A snapshot was installed in the log: replace the manifest with it.
    Restore(u64, Vec<u8>),
    /// The manifest at the applied index, for log compaction.
    Snapshot(oneshot::Sender<(u64, Vec<u8>)>),
    Fetched(Fetched),
    /// Re-check sets waiting on `skip_while` markers, and clean staging.
    Tick,
    /// This node stopped leading and has applied the new leader's first
    /// entry: whatever its tree holds that the cluster did not commit is set
    /// aside, and what it lacks is fetched.
    Reconcile,
    /// A set's `on_change`, started at `started`, succeeded or failed (why).
    OnChangeDone {
        set: String,
        ok: bool,
        started: Instant,
        why: String,
    },
}

/// Why the applier cannot go on; the node then exits, so the service manager
/// restarts it from its durable state.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot read committed entries {from}..={to} back from the Raft log: {source}")]
    ReadLog {
        from: u64,
        to: u64,
        #[source]
        source: raft::Error,
    },
    #[error("the Raft log returned no entries at {0}")]
    NoEntries(u64),
    #[error("the Raft log skipped from {from} to {to}")]
    Skipped { from: u64, to: u64 },
    #[error(transparent)]
    Entry(CoreError),
    #[error("the leader's snapshot at index {index} is unusable: {source}")]
    BadSnapshot {
        index: u64,
        #[source]
        source: crate::core::manifest::ManifestError,
    },
    #[error(transparent)]
    Store(#[from] FilesStoreError),
}

/// What the applier tells the node task.
#[derive(Debug)]
pub enum Applied {
    /// Everything up to here is applied and durable.
    Index(u64),
    /// The applier cannot go on (its store failed): the node must stop.
    Failed(ApplyError),
    /// A batch of this set was applied from another node's changes.
    SetChanged(String),
}

pub struct Applier {
    shared: Arc<Shared>,
    log: RaftStore,
    out: mpsc::UnboundedSender<Applied>,
    roots: HashMap<String, Root>,
    quarantine: Option<Root>,
    /// Sets whose local tree must be reconciled with the manifest once their
    /// `skip_while` markers are gone.
    deferred: BTreeSet<String>,
    /// The applied index at the previous tick and at the last memory trim.
    applied_at_last_tick: u64,
    applied_at_trim: u64,
    /// Signatures were stored since the last memory trim.
    signed_since_trim: bool,
    /// File ops applied since the manifest's trees were last packed
    /// ([`crate::core::manifest::SetManifest::repack`]).
    ops_since_repack: usize,
    /// Staged uploads of batches applied in this round (their
    /// [`Content::Blob`]s), removed once the round is durably applied.
    consumed_uploads: Vec<u64>,
    /// Per `on_change_failure = "revert"` set, what the paths its
    /// unconfirmed changes touched held before (see `revert`).
    kept: HashMap<String, revert::KeptVersions>,
    /// Names the kept copies.
    kept_seq: u64,
    /// Sets held here (a failed `on_change` reverted, or a change this
    /// node's validator refused): left as they are, not reconciled.
    held_here: BTreeSet<String>,
    /// Of those, the ones held after a revert, until their next change.
    reverted: BTreeSet<String>,
    /// Of those, the ones this node's validator refused, with the copy of
    /// the set as committed that later changes are laid over and checked.
    held_copies: HashMap<String, crate::replication::validate::Staged>,
    /// Per validated set, the copy the last passed check left (the set as
    /// committed) and when it was staged, reused by the next check.
    shadows: HashMap<String, (crate::replication::validate::Staged, Instant)>,
    /// When the applied index last moved (at a tick).
    applied_moved_at: Instant,
    /// When retention last pruned the history (`None`: not since start).
    history_pruned_at: Option<Instant>,
}

/// Where a put's committed content comes from ([`Applier::committed_source`]).
enum CommittedSource<'c> {
    /// Only metadata changed: the content is the committed previous one.
    Unchanged,
    /// A patch against the previous version (or whole content).
    Patch(std::borrow::Cow<'c, [u8]>),
    /// The finished file made of the patch when it was staged.
    Finished {
        file: std::path::PathBuf,
        upload: u64,
        offset: u64,
    },
}

/// Why a put could not be completed from the log alone.
enum PutOutcome {
    Done,
    /// Written under a temporary name, renamed in once the batch is
    /// durable ([`Applier::write_files`]).
    Prepared,
    /// The content must be fetched.
    Missing(String),
    /// The committed patch itself is bad (does not decode, does not verify,
    /// too large): nothing was written; it is logged loudly and counted,
    /// since an honest leader never sends one, then fetched like `Missing`.
    Refused(String),
}

impl Applier {
    pub fn new(
        shared: Arc<Shared>,
        log: RaftStore,
        out: mpsc::UnboundedSender<Applied>,
    ) -> Applier {
        let mut roots = HashMap::new();
        for set in &shared.sets {
            match set.open_root() {
                Ok(r) => {
                    roots.insert(set.name.clone(), r);
                }
                Err(e) => shared.note_error(&set.name, format!("sync set {:?} (path {}): {e}; it is not replicated here until the path exists and the node restarts", set.name, set.path.display())),
            }
        }
        let _ = std::fs::remove_dir_all(shared.data_dir.join(revert::REVERT_DIR));
        let qdir = shared.data_dir.join("quarantine");
        let quarantine = {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&qdir);
            Root::open(&qdir).ok()
        };
        let mut applier = Applier {
            shared,
            log,
            out,
            roots,
            quarantine,
            deferred: BTreeSet::new(),
            applied_at_last_tick: 0,
            applied_at_trim: 0,
            signed_since_trim: false,
            ops_since_repack: 0,
            consumed_uploads: Vec::new(),
            kept: HashMap::new(),
            kept_seq: 0,
            held_here: BTreeSet::new(),
            reverted: BTreeSet::new(),
            held_copies: HashMap::new(),
            shadows: HashMap::new(),
            history_pruned_at: None,
            applied_moved_at: Instant::now(),
        };
        applier.restore_holds();
        applier
    }

    /// Runs until the node task drops its sender.
    pub fn run(mut self, mut rx: mpsc::UnboundedReceiver<ApplyMsg>) {
        // Paths left missing by an earlier run are fetched again.
        if !self.shared.missing.lock().unwrap().is_empty() {
            self.shared.fetch_wakeup.notify_one();
        }
        // A message taken off the queue while gathering fetched files, to
        // be handled next, in order.
        let mut next: Option<ApplyMsg> = None;
        loop {
            let msg = match next.take() {
                Some(m) => m,
                None => match rx.blocking_recv() {
                    Some(m) => m,
                    None => break,
                },
            };
            let result = match msg {
                ApplyMsg::Committed(up_to) => self.apply_up_to(up_to),
                ApplyMsg::Restore(index, data) => self.restore(index, &data),
                ApplyMsg::Snapshot(reply) => {
                    let index = self.shared.applied.load(Ordering::SeqCst);
                    let data = self.shared.manifest.read().unwrap().encode();
                    let _ = reply.send((index, data));
                    Ok(())
                }
                ApplyMsg::Fetched(f) => {
                    // Fetched files queued together are written together:
                    // one store write, each directory synced once.
                    let mut group = vec![f];
                    while group.len() < FETCHED_GROUP {
                        match rx.try_recv() {
                            Ok(ApplyMsg::Fetched(f)) => group.push(f),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.apply_fetched(group);
                    Ok(())
                }
                ApplyMsg::Reconcile => {
                    for set in self.shared.sets.clone() {
                        self.deferred.insert(set.name.clone());
                    }
                    self.retry_deferred();
                    self.shared.start_reconciled.store(true, Ordering::SeqCst);
                    Ok(())
                }
                ApplyMsg::OnChangeDone {
                    set,
                    ok,
                    started,
                    why,
                } => {
                    self.on_change_done(&set, ok, started, &why);
                    Ok(())
                }
                ApplyMsg::Tick => {
                    self.retry_deferred();
                    clean_staging(&self.shared.staging_dir());
                    self.shared.drop_abandoned_uploads();
                    // Once a burst of applies is over (a quiet second after
                    // it), sign what it linked in, then give its memory
                    // back; never again while idle.
                    let applied = self.shared.applied.load(Ordering::Relaxed);
                    let quiet = applied == self.applied_at_last_tick;
                    let signed = quiet && self.sign_linked();
                    self.signed_since_trim |= signed;
                    if quiet
                        && !signed
                        && (applied != self.applied_at_trim || self.signed_since_trim)
                    {
                        self.signed_since_trim = false;
                        self.log.flush_memtables();
                        self.shared.store.flush_memtables();
                        // Packing costs a pass over the manifest: only
                        // after bursts that inserted a good part of it.
                        let mut m = self.shared.manifest.write().unwrap();
                        if self.ops_since_repack > (m.path_count() / 8).max(1024) {
                            m.repack();
                            self.ops_since_repack = 0;
                        }
                        drop(m);
                        release_idle_memory(&self.shared);
                        self.applied_at_trim = applied;
                    }
                    if !quiet {
                        self.applied_moved_at = Instant::now();
                    }
                    // Deferred history copies wait until the burst is over
                    // (a pause in a first sync, waiting for followers, is
                    // not the end of it): they would take the disk from
                    // the followers' writes.
                    if self.applied_moved_at.elapsed() >= HISTORY_CAPTURE_AFTER {
                        crate::replication::history::capture_deferred(
                            &self.shared,
                            &self.roots,
                            Duration::from_millis(200),
                        );
                    }
                    if quiet
                        && self
                            .history_pruned_at
                            .is_none_or(|at| at.elapsed() >= HISTORY_PRUNE_EVERY)
                    {
                        self.history_pruned_at = Some(Instant::now());
                        if let Err(e) =
                            crate::replication::history::prune(&self.shared, &self.shared.history)
                        {
                            warn!("cannot prune the history: {e}");
                        }
                    }
                    self.applied_at_last_tick = applied;
                    Ok(())
                }
            };
            if let Err(e) = result {
                let _ = self.out.send(Applied::Failed(e));
                return;
            }
        }
    }

    /// Makes and stores, for [`SIGN_BUDGET`], the block signatures
    /// [`Shared::defer_signature`] left to make: of each version still
    /// committed and still what its file holds (checked by its digest; an
    /// edited file keeps none, as any version this node could not read).
    /// True if it made any.
    fn sign_linked(&mut self) -> bool {
        let started = Instant::now();
        let mut batch = StoreBatch::default();
        let mut signed = 0usize;
        while started.elapsed() < SIGN_BUDGET {
            let Some((set_name, path, digest)) = self.shared.unsigned.lock().unwrap().pop_front()
            else {
                break;
            };
            let committed = (self.shared.manifest.read().unwrap())
                .get(&set_name, &path)
                .and_then(|e| e.digest)
                .map(|d| d.get());
            let (Some(set), true) = (self.shared.set(&set_name), committed == Some(digest)) else {
                continue;
            };
            let Some(root) = self.roots.get(&set_name) else {
                continue;
            };
            let Ok(Some((data, _))) = root.read_file(&comps(&path), set.max_file_size) else {
                continue;
            };
            if delta::digest(&data) == digest {
                let sig = delta::BlockSignature::compute_hashed(&data, digest).to_bytes();
                batch.put_signature(&set_name, &path, &sig);
                signed += 1;
            }
        }
        if signed > 0 {
            if let Err(e) = self.shared.store.write(batch) {
                warn!("cannot store the block signatures of {signed} linked files: {e}");
            }
            debug!(signed, took = ?started.elapsed(), "signed linked files");
        }
        signed > 0
    }

    fn apply_up_to(&mut self, up_to: u64) -> Result<(), ApplyError> {
        let mut first_page = true;
        loop {
            let applied = self.shared.applied.load(Ordering::SeqCst);
            if applied >= up_to {
                if first_page {
                    // Applied before a restart (the applier's index is
                    // stored apart from the log's): the log must still
                    // hear of it, or a membership change among these
                    // entries stays queued in the Raft core for ever.
                    let _ = self.out.send(Applied::Index(up_to));
                }
                return Ok(());
            }
            first_page = false;
            let read = self.log.entries(
                applied + 1,
                up_to + 1,
                Some(APPLY_PAGE_BYTES),
                crate::raft::storage::with_data(),
            );
            let entries = match read {
                Ok(entries) => entries,
                Err(_) if self.replaced_by_snapshot(applied) => {
                    // The node task installs a leader's snapshot (which
                    // covers more than was ever committed before it) and
                    // then queues its Restore behind this message: the
                    // entries are gone, and the restore subsumes them.
                    info!(
                        applied,
                        up_to,
                        "committed entries {}..={up_to} were replaced by the leader's snapshot; restoring that instead",
                        applied + 1
                    );
                    return Ok(());
                }
                Err(source) => {
                    return Err(ApplyError::ReadLog {
                        from: applied + 1,
                        to: up_to,
                        source,
                    })
                }
            };
            if entries.is_empty() {
                return Err(ApplyError::NoEntries(applied + 1));
            }
            let mut batch = StoreBatch::default();
            let mut last = applied;
            // Sets a `Reconcile` entry names, squared once this page's
            // entries are durable, before they count as applied.
            let mut reconcile: Vec<String> = Vec::new();
            for e in entries {
                if e.index != last + 1 {
                    return Err(ApplyError::Skipped {
                        from: last,
                        to: e.index,
                    });
                }
                // A membership change is the Raft core's to carry out
                // (`RaftCore::applied_to`); the files have nothing to do.
                let files_command = e.get_entry_type() == raft::prelude::EntryType::EntryNormal;
                if files_command && !e.data.is_empty() {
                    match Command::decode(&e.data) {
                        Ok(Command::Barrier { .. }) => {}
                        Ok(Command::Chunk(c)) => self.stage(&c),
                        Ok(Command::Files(b)) => {
                            self.apply_batch(e.index, e.term, &b, b.origin, &mut batch)
                        }
                        Ok(Command::Rollback { proposer, batch: b }) => {
                            info!(index = e.index, set = %b.set, "a rollback of sync set {:?} proposed by node {proposer}: {} changes", b.set, b.ops.len());
                            self.apply_batch(e.index, e.term, &b, proposer, &mut batch)
                        }
                        Ok(Command::Pause { set, pause }) => {
                            info!(index = e.index, set = %set, "sync set {set:?} is paused by {}{}: the leader proposes nothing of it until it is resumed", pause.by, if pause.reason.is_empty() { String::new() } else { format!(" ({})", pause.reason) });
                            batch.put_pause(&set, Some(&pause));
                            self.shared
                                .manifest
                                .write()
                                .unwrap()
                                .paused
                                .insert(set, pause);
                        }
                        Ok(Command::Reconcile { sets }) => {
                            info!(
                                index = e.index,
                                "`clusterctl sync`: squaring {} with the manifest",
                                if sets.is_empty() {
                                    "every sync set".to_string()
                                } else {
                                    format!("sync sets {sets:?}")
                                }
                            );
                            reconcile.extend(if sets.is_empty() {
                                self.shared.sets.iter().map(|s| s.name.clone()).collect()
                            } else {
                                sets
                            });
                        }
                        Ok(Command::Resume { set, by }) => {
                            info!(index = e.index, set = %set, "sync set {set:?} is resumed by {by}");
                            batch.put_pause(&set, None);
                            self.shared.manifest.write().unwrap().paused.remove(&set);
                        }
                        Err(CoreError::BadEntry(why)) => {
                            warn!(
                                index = e.index,
                                "skipping committed entry {}: {why}", e.index
                            )
                        }
                        Err(other) => return Err(ApplyError::Entry(other)),
                    }
                }
                last = e.index;
            }
            batch.set_applied(last);
            crate::replication::history::sync_objects_dir(&self.shared);
            self.shared.store.write(batch)?;
            // Only now: a crash before the write applies these batches
            // again, from the same staged content.
            for upload in self.consumed_uploads.drain(..) {
                self.shared.remove_upload(upload);
            }
            if !reconcile.is_empty() {
                for name in reconcile {
                    if self.shared.set(&name).is_some() {
                        self.deferred.insert(name);
                    }
                }
                self.retry_deferred();
            }
            self.shared.applied.store(last, Ordering::SeqCst);
            let _ = self.out.send(Applied::Index(last));
        }
    }

    /// Whether the log no longer holds the entry after `applied` because
    /// a snapshot was installed past it. Own compaction never gets there:
    /// it stops at what this applier has applied.
    fn replaced_by_snapshot(&self, applied: u64) -> bool {
        matches!(self.log.first_index(), Ok(first) if first > applied + 1)
    }

    fn stage(&mut self, chunk: &crate::core::manifest::Chunk) {
        if self
            .shared
            .own_uploads
            .lock()
            .unwrap()
            .contains(&chunk.upload)
            || self.shared.sets.is_empty()
        {
            return;
        }
        if let Err(e) =
            self.shared
                .stage_piece(chunk.upload, chunk.offset, &chunk.data, StageFlush::None)
        {
            // The batch that needs it will find it short and fetch instead.
            warn!(
                upload = chunk.upload,
                offset = chunk.offset,
                "{e}; the batch that needs it will be fetched instead"
            );
        }
    }

    /// Applies a committed batch proposed by `proposer` (for the history).
    fn apply_batch(
        &mut self,
        index: u64,
        term: u64,
        batch: &FileBatch,
        proposer: u64,
        store: &mut StoreBatch,
    ) {
        let set_name = batch.set.clone();
        for op in &batch.ops {
            if let FileOp::Put {
                content: Content::Blob { upload, .. },
                ..
            } = op
            {
                if !self.consumed_uploads.contains(upload) {
                    self.consumed_uploads.push(*upload);
                }
            }
        }
        self.ops_since_repack += batch.ops.len();
        // The manifest paths each op touches, before and after.
        let before: Vec<SetPath> = {
            let m = self.shared.manifest.read().unwrap();
            let mut v = Vec::new();
            if let Some(set) = m.set(&set_name) {
                for op in &batch.ops {
                    let mut paths = vec![op.path()];
                    if let crate::core::manifest::FileOp::Rename { from, .. } = op {
                        paths.push(from);
                    }
                    for p in paths {
                        if let Ok(p) = SetPath::from_network(p) {
                            v.extend(set.subtree(&p).map(|(k, _)| k.clone()));
                        }
                    }
                }
            }
            v
        };
        // What history compares the batch's result with.
        let keeps_history = self.shared.set(&set_name).is_some_and(|s| s.history);
        // A directory op changes the directory alone: its subtree (every
        // file of the set, for the root, which each pass of a large change
        // touches) is not compared.
        let history_before: crate::replication::history::Before = if keeps_history {
            let m = self.shared.manifest.read().unwrap();
            let mut out = crate::replication::history::Before::new();
            if let Some(set) = m.set(&set_name) {
                for op in &batch.ops {
                    let mut roots = vec![op.path()];
                    if let FileOp::Rename { from, .. } = op {
                        roots.push(from);
                    }
                    for raw in roots {
                        let Ok(p) = SetPath::from_network(raw) else {
                            continue;
                        };
                        if matches!(op, FileOp::Dir { .. }) {
                            if let Some(e) = set.entries.get(&p) {
                                out.insert(p, e.clone());
                            }
                        } else {
                            out.extend(set.subtree(&p).map(|(k, e)| (k.clone(), e.clone())));
                        }
                    }
                }
            }
            out
        } else {
            Default::default()
        };
        let mut history_after: BTreeMap<SetPath, Option<Entry>> = BTreeMap::new();
        let (checked, touched) = {
            let mut m = self.shared.manifest.write().unwrap();
            match m.apply_tracked(index, batch) {
                Ok(c) => c,
                Err(e) => {
                    drop(m);
                    warn!(index, origin = batch.origin, set = %set_name, "refused committed entry {index} proposed by node {}: {e}; skipped, the node keeps running", batch.origin);
                    self.shared
                        .note_refused(&set_name, format!("entry {index} refused: {e}"));
                    return;
                }
            }
        };
        {
            let m = self.shared.manifest.read().unwrap();
            let set = m.set(&set_name).expect("apply created the set");
            for p in &before {
                if !set.entries.contains_key(p) {
                    store.delete_entry(&set_name, p);
                    if keeps_history {
                        history_after.insert(p.clone(), None);
                    }
                }
            }
            for op in &checked {
                let (path, renamed_to) = op.paths();
                let dir_only = matches!(op, CheckedOp::Dir { .. });
                for p in std::iter::once(path).chain(renamed_to) {
                    for (k, e) in set.subtree(p) {
                        store.put_entry(&set_name, k, e);
                        if keeps_history && (!dir_only || k == p) {
                            history_after.insert(k.clone(), Some(e.clone()));
                        }
                    }
                }
            }
            // Hard links the batch changed on the side (left as files of
            // their own, following a moved primary).
            for p in &touched {
                if keeps_history {
                    history_after.insert(p.clone(), set.entries.get(p).cloned());
                }
                match set.entries.get(p) {
                    Some(e) => store.put_entry(&set_name, p, e),
                    None => store.delete_entry(&set_name, p),
                }
            }
            store.put_progress(&set_name, &set.progress);
        }
        let Some(set) = self.shared.set(&set_name).cloned() else {
            return; // Not replicated on this node (or a witness): manifest only.
        };
        if batch.origin == self.shared.node_id {
            self.adopt_own(&set_name, &checked, store);
        } else {
            self.carry_out_if_due(&set, index, term, &checked, store);
        }
        if keeps_history {
            crate::replication::history::Recorder::record(
                &self.shared,
                &set,
                self.roots.get(&set_name),
                index,
                term,
                proposer,
                batch.proposed_at_ms,
                batch.origin == crate::raft::core::NO_ORIGIN,
                &history_before,
                &history_after,
                store,
            );
        }
    }

    /// Carries a committed batch of `set` out on this node's tree, unless a
    /// skip marker, a catch-up or this node's validator defers it.
    fn carry_out_if_due(
        &mut self,
        set: &SetRuntime,
        index: u64,
        term: u64,
        checked: &[CheckedOp],
        store: &mut StoreBatch,
    ) {
        let set_name = set.name.clone();
        let Some(root) = self.roots.remove(&set_name) else {
            return;
        };
        let skip = match has_marker(set, &root) {
            Ok(m) => m,
            Err(e) => {
                self.shared.note_error(
                    &set_name,
                    format!("cannot look for skip_while markers: {e}"),
                );
                false
            }
        };
        self.release_hold(&set_name);
        if skip {
            info!(set = %set_name, index, "a skip_while marker exists in sync set {set_name:?}: its changes wait until it is gone");
            self.deferred.insert(set_name.clone());
            self.shared.set_skipping(&set_name, true);
        } else if self.deferred.contains(&set_name) && !self.held_copies.contains_key(&set_name) {
            // Still catching up on earlier skipped batches: the reconcile covers this one.
        } else if self.follower_check(set, &root, checked) {
            self.keep_before_change(set, &root, checked);
            self.carry_out(set, &root, index, term, checked, store);
            let _ = self.out.send(Applied::SetChanged(set_name.clone()));
        }
        self.roots.insert(set_name, root);
    }

    /// A batch this node proposed: its tree already holds it.
    fn adopt_own(&mut self, set: &str, checked: &[CheckedOp], store: &mut StoreBatch) {
        let mut pending = self.shared.pending_local.lock().unwrap();
        for op in checked {
            match op {
                CheckedOp::Put { path, .. } | CheckedOp::Link { path, .. } => {
                    if let Some(r) = pending.remove(&(set.to_string(), path.clone())) {
                        self.shared.store.put_record(store, set, path, &r);
                    }
                    // Our own version is the committed one now.
                    let key = (set.to_string(), path.clone());
                    if self.shared.missing.lock().unwrap().remove(&key).is_some() {
                        store.delete_missing(set, path);
                    }
                    self.shared.unobtainable.lock().unwrap().remove(&key);
                }
                CheckedOp::Remove { removed, .. } => {
                    for (p, _) in removed {
                        self.shared.store.delete_record(store, set, p);
                        store.delete_signature(set, p);
                    }
                }
                CheckedOp::Forget { path } => {
                    self.shared.store.delete_record(store, set, path);
                }
                CheckedOp::Rename { from, to, moved } => {
                    for (p, _) in moved {
                        let rest = &p.as_bytes()[from.as_bytes().len()..];
                        let mut b = to.as_bytes().to_vec();
                        b.extend_from_slice(rest);
                        let old = self.shared.store.record(set, p);
                        if let (Some(r), Ok(np)) = (old, SetPath::from_network(&b)) {
                            self.shared.store.delete_record(store, set, p);
                            self.shared.store.put_record(store, set, &np, &r);
                        }
                    }
                }
                CheckedOp::Dir { .. } | CheckedOp::Symlink { .. } | CheckedOp::Xattrs { .. } => {}
            }
        }
    }

    fn carry_out(
        &mut self,
        set: &SetRuntime,
        root: &Root,
        index: u64,
        term: u64,
        checked: &[CheckedOp],
        store: &mut StoreBatch,
    ) {
        // One batch works in a few directories; see `fs::root::held`.
        let _held = root.hold_dirs();
        let mut dirs = Vec::new();
        // Everything but file contents first, in order (renames, removals,
        // directories, links); then the files, which are independent of each
        // other within a batch, written by several threads so their fsyncs
        // overlap; then one fsync per directory that received files.
        // Hard links come last, in order: each names a file this batch may
        // have just written.
        let (puts, others): (Vec<&CheckedOp>, Vec<&CheckedOp>) = checked
            .iter()
            .partition(|op| matches!(op, CheckedOp::Put { .. }));
        let (links, others): (Vec<&CheckedOp>, Vec<&CheckedOp>) = others
            .into_iter()
            .partition(|op| matches!(op, CheckedOp::Link { .. }));
        // A batch of many files is made durable by `syncfs` (see
        // `write_files`); the directories it makes ride along instead of
        // costing two fsyncs each (a Maildir spool has one per 25 files).
        let grouped = puts.len() >= GROUP_DURABLE_FILES;
        let mut unsynced_dirs = false;
        for op in others {
            let result = match op {
                CheckedOp::Put {
                    path,
                    entry,
                    content,
                    previous,
                } => match self.put_file(
                    set,
                    root,
                    path,
                    entry,
                    content,
                    previous.as_ref(),
                    index,
                    term,
                    None,
                    store,
                ) {
                    outcome => self.settle_put(set, path, entry, index, outcome, store),
                },
                CheckedOp::Dir { path, entry } => {
                    dirs.push((path.clone(), entry.meta.clone()));
                    unsynced_dirs |= grouped;
                    self.make_dir(set, root, path, &entry.meta, index, term, !grouped)
                        .and_then(|()| self.settle_xattrs(set, root, path, entry))
                }
                CheckedOp::Symlink { path, entry } => {
                    self.make_symlink(set, root, path, entry, index, term, store)
                }
                CheckedOp::Xattrs { path, entry } => self.settle_xattrs(set, root, path, entry),
                CheckedOp::Remove { path, removed } => {
                    self.remove(set, root, path, removed, index, term, store)
                }
                CheckedOp::Forget { path } => {
                    self.forget_records(&set.name, path, store);
                    Ok(())
                }
                CheckedOp::Rename { from, to, .. } => {
                    self.rename(set, root, from, to, index, term, store)
                }
                CheckedOp::Link { .. } => unreachable!("links are carried out last"),
            };
            if let Err(e) = result {
                self.shared
                    .note_error(&set.name, format!("entry {index}: {e}"));
            }
        }
        let synced = self.write_files(set, root, index, term, &puts, store);
        if unsynced_dirs && !synced {
            if let Err(e) = root.sync_filesystem() {
                self.shared
                    .note_error(&set.name, format!("entry {index}: {e}"));
            }
        }
        for op in links {
            let CheckedOp::Link {
                path,
                entry,
                previous,
                ..
            } = op
            else {
                continue;
            };
            let result = if set.hard_links {
                self.link_file(
                    set,
                    root,
                    path,
                    entry,
                    previous.as_ref(),
                    index,
                    term,
                    store,
                )
            } else {
                // This node keeps no links in the set: the name is a file
                // of its own, with the same content.
                self.mark_missing(&set.name, path, entry, store);
                Ok(())
            };
            if let Err(e) = result {
                self.mark_missing(&set.name, path, entry, store);
                self.shared
                    .note_error(&set.name, format!("entry {index}: {e}"));
            }
        }
        // Writing a child changes its directory's mtime: set the committed
        // metadata of every directory the batch touched last, deepest first.
        let mut touched: BTreeMap<SetPath, Meta> = dirs.into_iter().collect();
        {
            let m = self.shared.manifest.read().unwrap();
            for op in checked {
                let (path, renamed_to) = op.paths();
                for p in std::iter::once(path).chain(renamed_to) {
                    if let Some(parent) = p.parent() {
                        if let Some(e) = m
                            .get(&set.name, &parent)
                            .filter(|e| e.meta.kind == EntryKind::Dir)
                        {
                            touched.insert(parent, e.meta.clone());
                        }
                    }
                }
            }
        }
        for (path, meta) in touched.iter().rev() {
            if let Err(e) = root.set_meta(&comps(path), &fs_meta(meta)) {
                self.shared
                    .note_error(&set.name, format!("entry {index}: {e}"));
            }
        }
    }

    /// Records what became of a `Put` of `path`: done (or prepared, to be
    /// swapped in with its batch), or missing (to be fetched) with why, the
    /// error passed on.
    fn settle_put(
        &self,
        set: &SetRuntime,
        path: &SetPath,
        entry: &Entry,
        index: u64,
        outcome: Result<PutOutcome, FsError>,
        store: &mut StoreBatch,
    ) -> Result<(), FsError> {
        match outcome {
            Ok(PutOutcome::Done) => self.clear_missing(&set.name, path, store),
            Ok(PutOutcome::Prepared) => {}
            Ok(PutOutcome::Missing(why)) => {
                debug!(set = %set.name, path = %path, "{why}; fetching the committed version");
                self.mark_missing(&set.name, path, entry, store);
            }
            Ok(PutOutcome::Refused(why)) => {
                self.refuse_content(&set.name, path, index, &why);
                self.mark_missing(&set.name, path, entry, store);
            }
            Err(e) => {
                self.mark_missing(&set.name, path, entry, store);
                return Err(e);
            }
        }
        Ok(())
    }

    fn mark_missing(&self, set: &str, path: &SetPath, entry: &Entry, store: &mut StoreBatch) {
        if let Some(d) = entry.digest {
            store.put_missing(set, path, &d);
            self.shared
                .missing
                .lock()
                .unwrap()
                .insert((set.to_string(), path.clone()), d);
            self.shared.fetch_wakeup.notify_one();
        }
    }

    fn clear_missing(&self, set: &str, path: &SetPath, store: &mut StoreBatch) {
        // Nearly always: nothing is missing (and the key costs two copies).
        if self.shared.missing.lock().unwrap().is_empty()
            && self.shared.unobtainable.lock().unwrap().is_empty()
        {
            return;
        }
        self.shared
            .unobtainable
            .lock()
            .unwrap()
            .remove(&(set.to_string(), path.clone()));
        if self
            .shared
            .missing
            .lock()
            .unwrap()
            .remove(&(set.to_string(), path.clone()))
            .is_some()
        {
            store.delete_missing(set, path);
        }
    }

    fn forget_records(&self, set: &str, path: &SetPath, store: &mut StoreBatch) {
        for (k, _) in self.shared.store.records_under(set, path) {
            self.shared.store.delete_record(store, set, &k);
            store.delete_signature(set, &k);
        }
        let mut missing = self.shared.missing.lock().unwrap();
        let doomed: Vec<(String, SetPath)> = missing
            .keys()
            .filter(|(s, k)| s == set && (k == path || path.is_ancestor_of(k)))
            .cloned()
            .collect();
        for k in doomed {
            store.delete_missing(set, &k.1);
            missing.remove(&k);
        }
    }

    fn put_record(&self, set: &str, path: &SetPath, rec: LocalRecord, store: &mut StoreBatch) {
        self.shared.store.put_record(store, set, path, &rec);
    }

    /// Logs and counts a committed patch that is bad in itself.
    fn refuse_content(&self, set: &str, path: &SetPath, index: u64, why: &str) {
        warn!(set, path = %path, index, "refused the committed content of {path} in sync set {set:?} (entry {index}): {why}; nothing was written, the committed version is fetched from a peer instead");
        self.shared
            .note_refused(set, format!("entry {index}: {path}: {why}"));
    }

    /// The manifest and the index it stands for.
    pub fn snapshot_now(&self) -> (u64, Vec<u8>) {
        (
            self.shared.applied.load(Ordering::SeqCst),
            self.shared.manifest.read().unwrap().encode(),
        )
    }

    /// Restores from a snapshot now (at start-up, before [`Applier::run`]).
    pub fn restore_now(&mut self, index: u64, data: &[u8]) -> Result<(), ApplyError> {
        self.restore(index, data)
    }

    fn restore(&mut self, index: u64, data: &[u8]) -> Result<(), ApplyError> {
        if self.shared.applied.load(Ordering::SeqCst) >= index {
            let _ = self.out.send(Applied::Index(index));
            return Ok(());
        }
        let manifest = Manifest::decode(data, 1 << 30)
            .map_err(|source| ApplyError::BadSnapshot { index, source })?;
        info!(
            index,
            "restoring the file manifest from the leader's snapshot at index {index}"
        );
        let mut batch = StoreBatch::default();
        batch.clear_manifest();
        for (set, sm) in &manifest.sets {
            for (p, e) in &sm.entries {
                batch.put_entry(set, p, e);
            }
            batch.put_progress(set, &sm.progress);
        }
        for (set, pause) in &manifest.paused {
            batch.put_pause(set, Some(pause));
        }
        batch.set_applied(index);
        self.shared.missing.lock().unwrap().clear();
        *self.shared.manifest.write().unwrap() = manifest;
        self.shared.store.write(batch)?;
        self.shared.applied.store(index, Ordering::SeqCst);
        for set in self.shared.sets.clone() {
            self.deferred.insert(set.name.clone());
        }
        self.retry_deferred();
        let _ = self.out.send(Applied::Index(index));
        Ok(())
    }
}
/// After a burst (a first sync of 100,000 files) the maps that carried it
/// keep their capacity and the allocator keeps freed pages: give both back
/// so an idle node stays small.
fn release_idle_memory(shared: &Shared) {
    {
        let mut pending = shared.pending_local.lock().unwrap();
        if pending.is_empty() && pending.capacity() > 1024 {
            *pending = HashMap::new();
        }
    }
    {
        let mut uploads = shared.own_uploads.lock().unwrap();
        if uploads.len() > 4096 {
            // Uploads are staged and applied within seconds; old ids are only
            // there to spare the proposer staging its own chunks.
            uploads.clear();
        }
    }
    // glibc keeps freed memory in its heap until asked to give back whole
    // free pages (clusterd runs it with one arena: src/bin/clusterd.rs).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs `on_change` commands on followers: debounced per set, one at a time
/// per set, time-limited, exit status and output logged.
/// Each outcome goes to the applier (`applier`, held weakly so it never
/// keeps the applier running), which undoes a failed change of a set with
/// `on_change_failure = "revert"`.
pub async fn run_on_change(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<String>,
    applier: mpsc::WeakUnboundedSender<ApplyMsg>,
) {
    const DEBOUNCE: Duration = Duration::from_millis(200);
    const LIMIT: Duration = Duration::from_secs(60);
    let mut due: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let next = due.values().min().copied();
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(set) => { due.insert(set, Instant::now() + DEBOUNCE); }
                None => return,
            },
            _ = async { match next { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => {
                let now = Instant::now();
                let ready: Vec<String> = due.iter().filter(|(_, t)| **t <= now).map(|(s, _)| s.clone()).collect();
                for set in ready {
                    due.remove(&set);
                    let Some(rt) = shared.set(&set) else { continue };
                    // An accounts set's on_change follows the merge into
                    // the databases (replication::accounts), not the view.
                    if rt.accounts.is_some() { continue }
                    let Some(cmd) = rt.on_change.clone() else { continue };
                    let root = rt.path.display().to_string();
                    let env = [("CLUSTERD_SET", set.as_str()), ("CLUSTERD_ROOT", root.as_str())];
                    let started = Instant::now();
                    let outcome = crate::fs::exec::run_command(&cmd, &env, LIMIT, &format!("on_change of sync set {set:?}")).await;
                    if outcome.is_err() {
                        shared.counters.on_change_failures.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(applier) = applier.upgrade() {
                        let _ = applier.send(ApplyMsg::OnChangeDone {
                            set: set.clone(),
                            ok: outcome.is_ok(),
                            started,
                            why: outcome.err().unwrap_or_default(),
                        });
                    }
                }
            }
        }
    }
}
