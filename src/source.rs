//! The leader half of replication: while this node leads, it watches every
//! sync set (inotify through the notify crate, debounced, plus a periodic
//! full rescan), turns what changed into file batches planned against the
//! committed manifest, and proposes them through Raft.
//!
//! Invariants owned here:
//! * Only the leader proposes, and only in the term it was elected in: every
//!   proposal carries that term and the node task refuses it once the term
//!   moved on (a deposed leader stops proposing at once).
//! * One batch at a time: the next batch is planned only after the previous
//!   one applied here, so every delta is against the committed version that
//!   followers hold when they apply it.
//! * A file that changes while it is read is read again (`Root::read_file`),
//!   so no torn version is ever proposed; a set with a `skip_while` marker
//!   present is not read at all.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::{ReplicationConfig, SyncMode};
use crate::delta::{self, FileDigest, FileHasher};
use crate::fsroot::{FileMeta, Kind, Root};
use crate::manifest::{
    check_xattrs, Chunk, Content, Entry, EntryKind, FileBatch, FileOp, WireDigest, Xattrs,
    CHUNK_LEN,
};
use crate::node::{NodeHandle, RequestError};
use crate::paths::SetPath;
use crate::raft_core::{Command, Role};
use crate::replica::{
    meta_from_local, record_of, unchanged_since, unix_ms, walk_keeping, Found, OwnerNames,
    SeenPaths, SetRuntime, Shared, StagedVersion,
};
use crate::transport::Transport;

/// Patches of at least this size travel beside the log (staged on the
/// followers before the batch that references them is proposed); smaller
/// ones inside the batch's entry, where an edit costs no extra round trip.
const BLOB_MIN: usize = 32 * 1024;
/// The largest piece of staged content in one `Stage` call.
const STAGE_PIECE: usize = 4 << 20;
/// After a batch not every active follower staged, content goes through
/// the log this long before staging is tried again.
const STAGING_PAUSE: Duration = Duration::from_secs(60);
/// Patches carried inside a batch's entry when its content goes through
/// the log; larger ones as chunks first.
const INLINE_LIMIT: usize = 256 * 1024;
/// How long one `Stage` call may take before that follower counts as not
/// holding the content.
const STAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// A batch is proposed once its patches reach this size.
const BATCH_BYTES: usize = 4 << 20;
/// Or once it holds this many ops.
const BATCH_OPS: usize = 2000;
/// Most batches whose content is staged at once: each follower finishes
/// (writes and fsyncs) several uploads side by side, which keeps its disk
/// busy where one at a time left the source waiting most of a first sync
/// (9.3 s of 12.5 s, measured in the 1 GiB benchmark).
const STAGING_DEPTH: usize = 8;
/// Unless their content passes this (a batch holding one huge file).
const STAGING_BYTES: usize = 64 << 20;
/// Chunk entries per proposal.
const CHUNK_WINDOW: usize = 4;
/// Proposals of one pass in flight at once (each at most ~4 MiB): the
/// pipeline that keeps disks and links busy during a first full sync.
const MAX_IN_FLIGHT: usize = 3;
/// Entries a follower's applier may be behind this leader's before the
/// source waits for it (see [`wait_for_followers`]): with proposals of at
/// most 4 MiB, about 12 MiB of content. While content went through the
/// log this kept it in the followers' 64 MiB log memtable until applied
/// (measured in a 1 GiB first sync: 0.5 GB flushed to blob files per
/// follower with 3, 0.9 GB with 8, 1.2 GB without the wait).
const FOLLOWER_APPLY_WINDOW: u64 = 3;
/// A follower further behind than this is catching up (it was down, or
/// restored a snapshot): it is not waited for, so its catch-up never delays
/// new changes.
const FOLLOWER_CATCHING_UP: u64 = 64;
/// A follower whose applied index did not move for this long is not
/// waited for.
const FOLLOWER_STALL: Duration = Duration::from_secs(2);
/// A follower whose last reply is older than this is not active: not
/// staged on, not waited for. (raft-rs's `recent_active` is reset every
/// election timeout under check_quorum, and would drop live followers now
/// and then.)
const ANSWERED_WITHIN: Duration = Duration::from_secs(1);
// Idle heartbeats go unacked for up to this long (plus a heartbeat).
const _: () =
    assert!(crate::transport::ACK_AT_LEAST_EVERY.as_millis() * 2 <= ANSWERED_WITHIN.as_millis());
/// How long a new leader waits for missing content to be fetched before it
/// takes its own tree as the truth for those paths.
const MISSING_GRACE: Duration = Duration::from_secs(5);

/// What changed where, as the watcher reports it.
#[derive(Debug, Default)]
struct Dirty {
    paths: BTreeMap<String, BTreeSet<SetPath>>,
    /// Sets to rescan whole (watcher overflow, a new watch, a marker gone).
    full: BTreeSet<String>,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.full.is_empty()
    }
}

pub struct Source {
    shared: Arc<Shared>,
    node: NodeHandle,
    config: ReplicationConfig,
}

impl Source {
    pub fn new(shared: Arc<Shared>, node: NodeHandle, config: ReplicationConfig) -> Source {
        Source {
            shared,
            node,
            config,
        }
    }

    /// Runs for the life of the node: idle while following, the source while leading.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        if self.shared.sets.is_empty() {
            return;
        }
        loop {
            let lead = self
                .node
                .wait_view(Duration::from_secs(3600), |v| v.role == Role::Leader);
            let view = tokio::select! {
                v = lead => v,
                _ = stop.changed() => return,
            };
            let Some(view) = view else { continue };
            let term = view.term;
            tokio::select! {
                _ = self.lead(term) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn lead(&self, term: u64) {
        // The no-op of this term applied here means the manifest is current.
        if let Err(e) = self.node.local_barrier(Duration::from_secs(10)).await {
            debug!(term, "not starting as the source yet: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        self.settle_missing(term).await;
        info!(
            term,
            sets = self.shared.sets.len(),
            "leading: watching the sync sets and reconciling them with the committed manifest"
        );
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, PathBuf)>();
        let _watchers = self.watch(tx);
        let mut dirty = Dirty::default();
        for set in &self.shared.sets {
            dirty.full.insert(set.name.clone());
        }
        let mut rescan = tokio::time::interval(self.config.rescan);
        rescan.tick().await;
        let mut retry = tokio::time::interval(Duration::from_millis(500));
        loop {
            if !dirty.is_empty() {
                let work = std::mem::take(&mut dirty);
                let shared = self.shared.clone();
                let node = self.node.clone();
                let rt = tokio::runtime::Handle::current();
                let result = tokio::task::spawn_blocking(move || {
                    let mut left = Dirty::default();
                    let r = process(&shared, &node, &rt, term, work, &mut left);
                    (r, left)
                })
                .await;
                match result {
                    Ok((Ok(()), left)) => {
                        dirty = left;
                        self.shared
                            .start_reconciled
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok((Err(e), _)) => {
                        info!(term, "stopped proposing: {e}");
                        return;
                    }
                    Err(e) => {
                        warn!(term, "the change planner failed: {e}");
                        return;
                    }
                }
            }
            if self.node.view().term != term || self.node.view().role != Role::Leader {
                return;
            }
            tokio::select! {
                ev = rx.recv() => {
                    let Some((set, path)) = ev else { return };
                    self.note(&mut dirty, set, path);
                    // Debounce: take everything that arrives while it stays quiet.
                    let until = Instant::now() + self.config.debounce * 10;
                    loop {
                        match tokio::time::timeout(self.config.debounce, rx.recv()).await {
                            Ok(Some((s, p))) => self.note(&mut dirty, s, p),
                            Ok(None) => return,
                            Err(_) => break,
                        }
                        if Instant::now() >= until {
                            break;
                        }
                    }
                }
                _ = rescan.tick() => {
                    for set in &self.shared.sets {
                        dirty.full.insert(set.name.clone());
                    }
                }
                _ = retry.tick(), if !dirty.is_empty() => {}
                _ = self.node.wait_view(Duration::from_secs(1), |v| v.term != term || v.role != Role::Leader) => {}
            }
        }
    }

    /// Gives the fetcher a moment to bring missing content before this
    /// node's tree becomes the source; what no peer could supply is taken
    /// as it is here.
    async fn settle_missing(&self, term: u64) {
        let deadline = Instant::now() + MISSING_GRACE;
        while !self.shared.missing.lock().unwrap().is_empty() && Instant::now() < deadline {
            self.shared.fetch_wakeup.notify_one();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Paths still missing are never proposed from this tree (their local
        // copy is older than what the cluster committed, or absent): they
        // stay as committed until a peer supplies them.
        for (set, path) in self.shared.missing.lock().unwrap().keys() {
            warn!(term, set = %set, path = %path, "this leader lacks the committed version of {path}; it is not proposed from here until a peer supplies it, or every data node has said it lacks that version too");
        }
    }

    fn note(&self, dirty: &mut Dirty, set: usize, full: PathBuf) {
        let rt = &self.shared.sets[set];
        if full == rt.root_dir || full == rt.path {
            if rt.single_file.is_some() {
                dirty.full.insert(rt.name.clone());
            } else {
                dirty.full.insert(rt.name.clone());
            }
            return;
        }
        match SetPath::from_local(&rt.root_dir, &full) {
            Ok(p) => {
                if let Some(name) = &rt.single_file {
                    if &p != name {
                        return;
                    }
                }
                if crate::fsroot::is_temp_name(p.file_name()) {
                    return;
                }
                let s = dirty.paths.entry(rt.name.clone()).or_default();
                // A child's event changes its directory's mtime too.
                if let Some(parent) = p.parent() {
                    s.insert(parent);
                }
                s.insert(p);
            }
            Err(_) => {
                dirty.full.insert(rt.name.clone());
            }
        }
    }

    fn watch(
        &self,
        tx: mpsc::UnboundedSender<(usize, PathBuf)>,
    ) -> Vec<notify::RecommendedWatcher> {
        let mut out = Vec::new();
        for (i, set) in self.shared.sets.iter().enumerate() {
            let tx = tx.clone();
            let handler = move |res: notify::Result<notify::Event>| match res {
                Ok(ev) => {
                    // Opens and read-only closes change nothing, and our own
                    // reads cause them: following them would rescan forever.
                    use notify::event::{AccessKind, AccessMode, EventKind};
                    if matches!(ev.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write))
                    {
                        return;
                    }
                    if ev.need_rescan() {
                        let _ = tx.send((i, PathBuf::new()));
                    }
                    for p in ev.paths {
                        let _ = tx.send((i, p));
                    }
                }
                Err(_) => {
                    let _ = tx.send((i, PathBuf::new()));
                }
            };
            let mut w = match notify::recommended_watcher(handler) {
                Ok(w) => w,
                Err(e) => {
                    warn!(set = %set.name, "cannot watch sync set {:?}: {e}; relying on the periodic rescan", set.name);
                    continue;
                }
            };
            let (target, mode) = match set.single_file {
                Some(_) => (&set.root_dir, RecursiveMode::NonRecursive),
                None => (&set.root_dir, RecursiveMode::Recursive),
            };
            if let Err(e) = w.watch(target, mode) {
                warn!(set = %set.name, "cannot watch {}: {e}; relying on the periodic rescan (raise fs.inotify.max_user_watches for large trees)", target.display());
            }
            out.push(w);
        }
        out
    }
}

/// Plans and proposes everything in `work`, one batch at a time.
fn process(
    shared: &Arc<Shared>,
    node: &NodeHandle,
    rt: &tokio::runtime::Handle,
    term: u64,
    work: Dirty,
    left: &mut Dirty,
) -> Result<(), RequestError> {
    let mut sets: BTreeSet<String> = work.full.clone();
    sets.extend(work.paths.keys().cloned());
    for name in sets {
        let Some(set) = shared.set(&name).cloned() else {
            continue;
        };
        let root = match set.open_root() {
            Ok(r) => r,
            Err(e) => {
                shared.note_error(&name, format!("cannot open sync set {name:?}: {e}"));
                continue;
            }
        };
        let full = work.full.contains(&name);
        // A full pass keeps, of what it walks, only what is not settled
        // (see `settled`); the rest are only marked as seen, to tell the
        // committed paths that are gone.
        let mut walked = SeenPaths::default();
        let mut names = OwnerNames::default();
        let (found, marker) = if full || set.filter.has_skip_while() {
            let keep = |f: &Found| {
                if !full {
                    return false; // only looking for a skip_while marker
                }
                walked.insert(&f.path);
                !settled(shared, &set, &f.path, &f.meta, &mut names)
            };
            match walk_keeping(&set, &root, keep) {
                Ok(w) => w,
                Err(e) => {
                    shared.note_error(&name, format!("cannot scan sync set {name:?}: {e}"));
                    continue;
                }
            }
        } else {
            (Vec::new(), false)
        };
        if marker {
            debug!(set = %name, "a skip_while marker exists; leaving the set alone for now");
            shared.set_skipping(&name, true);
            // Come back to it: a full pass once the marker is gone.
            left.full.insert(name.clone());
            continue;
        }
        shared.set_skipping(&name, false);
        let paths: Vec<SetPath> = if full {
            let m = shared.manifest.read().unwrap();
            let gone = m
                .set(&name)
                .map(|m| m.entries.keys())
                .into_iter()
                .flatten()
                .filter(|p| !walked.contains(p));
            merge_sorted(found.iter().map(|f| &f.path), gone)
        } else {
            let mut paths: BTreeSet<SetPath> = work.paths.get(&name).cloned().unwrap_or_default();
            // A directory new to the manifest may have been filled before its
            // watch existed (`mkdir -p a/b && echo > a/b/c`, or a tree moved
            // in whole): take its whole subtree.
            let new_dirs: Vec<SetPath> = {
                let m = shared.manifest.read().unwrap();
                paths
                    .iter()
                    .filter(|p| {
                        m.get(&name, p)
                            .is_none_or(|e| e.meta.kind != EntryKind::Dir)
                    })
                    .filter(|p| {
                        root.stat(&p.components().collect::<Vec<_>>())
                            .ok()
                            .flatten()
                            .is_some_and(|st| st.kind == Kind::Dir)
                    })
                    .cloned()
                    .collect()
            };
            for d in new_dirs {
                crate::replica::local_subtree(&set, &root, &d, &mut paths);
            }
            let paths: Vec<SetPath> = paths.into_iter().collect();
            if set.hard_links {
                with_other_names(shared, &set, &root, paths)
            } else {
                paths
            }
        };
        plan_and_propose(shared, node, rt, term, &set, &root, paths, &found, left)?;
    }
    Ok(())
}

/// The union of two sorted sequences of paths, sorted, each path once.
fn merge_sorted<'p>(
    a: impl Iterator<Item = &'p SetPath>,
    b: impl Iterator<Item = &'p SetPath>,
) -> Vec<SetPath> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    let mut out = Vec::with_capacity(a.size_hint().0.max(b.size_hint().0));
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => match x.cmp(y) {
                std::cmp::Ordering::Less => a.next(),
                std::cmp::Ordering::Greater => b.next(),
                std::cmp::Ordering::Equal => {
                    b.next();
                    a.next()
                }
            },
            (Some(_), None) => a.next(),
            (None, _) => b.next(),
        };
        match next {
            Some(p) => out.push(p.clone()),
            None => return out,
        }
    }
}

/// A batch being built.
struct Builder {
    ops: Vec<FileOp>,
    /// The patches of the batch's [`Content::Blob`]s, one after another,
    /// staged on the followers before the batch is proposed.
    blob: Vec<u8>,
    /// The staged upload `blob` becomes.
    blob_upload: u64,
    /// Batches whose content is being staged, oldest first, each proposed
    /// once its content is staged and every batch before it was proposed.
    staged: std::collections::VecDeque<ReadyBatch>,
    bytes: usize,
    pending: Vec<(SetPath, crate::files_store::LocalRecord)>,
    /// Paths gone from the tree, by the inode they had, for rename detection.
    gone: Vec<(SetPath, crate::files_store::LocalRecord)>,
    /// Block signatures of the versions being proposed (a cache keyed by
    /// digest, so written without waiting for an fsync).
    signatures: crate::files_store::StoreBatch,
    /// Proposals of this pass not yet applied here. Every path appears once
    /// per pass, so they may be in flight together; the next pass starts only
    /// once all applied, keeping every delta against the committed version.
    in_flight:
        std::collections::VecDeque<tokio::sync::oneshot::Receiver<Result<u64, RequestError>>>,
    /// Where this pass's time went, for the debug log of each proposal.
    waited: Waited,
}

/// Time a pass spent waiting rather than reading and planning.
#[derive(Debug, Default)]
struct Waited {
    /// For followers to hold a batch's staged content.
    staging: Duration,
    /// For this node to apply earlier proposals ([`MAX_IN_FLIGHT`]).
    own_apply: Duration,
    /// For followers to apply ([`wait_for_followers`]).
    followers: Duration,
}

fn plan_and_propose(
    shared: &Arc<Shared>,
    node: &NodeHandle,
    rt: &tokio::runtime::Handle,
    term: u64,
    set: &SetRuntime,
    root: &Root,
    paths: Vec<SetPath>,
    walked: &[Found],
    left: &mut Dirty,
) -> Result<(), RequestError> {
    let mut names = OwnerNames::default();
    let mut b = Builder {
        ops: Vec::new(),
        blob: Vec::new(),
        blob_upload: 0,
        staged: Default::default(),
        bytes: 0,
        waited: Waited::default(),
        pending: Vec::new(),
        gone: Vec::new(),
        signatures: Default::default(),
        in_flight: Default::default(),
    };
    // Deletions first (so a rename can find its source), then the rest in order.
    let mut present = Vec::new();
    let mut removed_roots: Vec<SetPath> = Vec::new();
    // Paths this node lacks the committed content of, except those no node
    // holds any more: those this tree proposes again (see `unobtainable`).
    let gone = shared.unobtainable.lock().unwrap().clone();
    let missing: BTreeSet<SetPath> = shared
        .missing
        .lock()
        .unwrap()
        .iter()
        .filter(|((s, p), d)| *s == set.name && gone.get(&(s.clone(), p.clone())) != Some(&d.get()))
        .map(|((_, p), _)| p.clone())
        .collect();
    for path in paths {
        if removed_roots.iter().any(|r| r.is_ancestor_of(&path)) {
            continue;
        }
        if missing.contains(&path) || missing.iter().any(|m| path.is_ancestor_of(m)) {
            // This node lacks the committed content: its tree is not the truth here.
            left.paths
                .entry(set.name.clone())
                .or_default()
                .insert(path.clone());
            continue;
        }
        // A walk just before this pass stat'ed what it found: stat again
        // only what it did not (deletions, paths from events).
        let stat = match walked.binary_search_by(|f| f.path.cmp(&path)) {
            Ok(i) => Some(walked[i].meta),
            Err(_) => match root.stat(&path.components().collect::<Vec<_>>()) {
                Ok(s) => s,
                Err(e) => {
                    shared.note_error(&set.name, format!("{path}: {e}"));
                    continue;
                }
            },
        };
        match stat {
            None => {
                let known = shared
                    .manifest
                    .read()
                    .unwrap()
                    .set(&set.name)
                    .is_some_and(|m| m.entries.contains_key(&path));
                if known {
                    if let Some(r) = shared.record(&set.name, &path) {
                        b.gone.push((path.clone(), r));
                    }
                    removed_roots.push(path);
                }
            }
            Some(meta) if settled(shared, set, &path, &meta, &mut names) => {}
            Some(meta) => present.push((path, meta)),
        }
    }
    // New names of files that just left another name: renames (`mv`, a
    // rotated log), found by the inode the old name had.
    let mut renames: BTreeMap<SetPath, SetPath> = BTreeMap::new();
    for (path, meta) in &present {
        if meta.kind != Kind::File || !set.holds(path, false) {
            continue;
        }
        if shared
            .manifest
            .read()
            .unwrap()
            .get(&set.name, path)
            .is_some()
        {
            continue;
        }
        if let Some(i) = b.gone.iter().position(|(_, r)| {
            r.ino == meta.ino && r.len == meta.len && r.mtime_ns == meta.mtime_ns
        }) {
            let (from, _) = b.gone.remove(i);
            renames.insert(path.clone(), from);
        }
    }
    let renamed: BTreeSet<SetPath> = renames.values().cloned().collect();
    let mut links = if set.hard_links {
        LinkPlan::new(shared, set, &present, &renames, &removed_roots)
    } else {
        LinkPlan::default()
    };
    for (path, meta) in present {
        if !set.holds(&path, meta.kind == Kind::Dir) {
            continue;
        }
        if let Some(from) = renames.get(&path) {
            b.ops.push(FileOp::Rename {
                from: from.as_bytes().to_vec(),
                to: path.as_bytes().to_vec(),
            });
            continue;
        }
        if links.primary_of.contains_key(&path) {
            // Another name of a file whose primary name is examined: it
            // becomes a link of that name below.
            continue;
        }
        let committed = links.effective(shared, set, &path);
        let ops_before = b.ops.len();
        let done = examine(
            shared, set, root, &path, &meta, committed, &mut names, &mut b,
        );
        if !done {
            left.paths
                .entry(set.name.clone())
                .or_default()
                .insert(path.clone());
        }
        if links.primaries.contains(&path) {
            let planned = b.ops[ops_before..].iter().find_map(|op| match op {
                FileOp::Put {
                    path: p, digest, ..
                } if p == path.as_bytes() => Some(*digest),
                _ => None,
            });
            links.note_examined(shared, set, &path, done, planned);
        }
        if b.bytes >= BATCH_BYTES || b.ops.len() >= BATCH_OPS {
            flush(shared, node, rt, term, set, &mut b, false)?;
        }
    }
    links.propose(shared, set, &mut b, left);
    for r in removed_roots {
        if renamed.contains(&r) {
            continue;
        }
        b.ops.push(match set.mode {
            SyncMode::Mirror => FileOp::Remove {
                path: r.as_bytes().to_vec(),
            },
            SyncMode::Append => FileOp::Forget {
                path: r.as_bytes().to_vec(),
            },
        });
    }
    // Renames and removals must precede puts that reuse their names, and
    // links follow the new versions of their primaries.
    b.ops.sort_by_key(|op| match op {
        FileOp::Rename { .. } => 0,
        FileOp::Remove { .. } | FileOp::Forget { .. } => 1,
        FileOp::Link { .. } => 3,
        _ => 2,
    });
    flush(shared, node, rt, term, set, &mut b, true)
}

/// Whether `path`, found locally as `meta`, is exactly what the cluster
/// committed and this node last recorded, so that [`examine`] would
/// propose nothing for it: left out of a pass before anything more is
/// kept of it, which is what keeps a rescan of a large, unchanged set
/// small. Sets that replicate extended attributes or hard links are always
/// examined (neither shows in `lstat`).
fn settled(
    shared: &Shared,
    set: &SetRuntime,
    path: &SetPath,
    meta: &FileMeta,
    names: &mut OwnerNames,
) -> bool {
    if set.xattrs || set.hard_links || !set.holds(path, meta.kind == Kind::Dir) {
        return false;
    }
    match meta.kind {
        Kind::File => {
            let committed = {
                let m = shared.manifest.read().unwrap();
                match m.get(&set.name, path) {
                    Some(e) if e.meta.kind == EntryKind::File && e.link.is_none() => e.digest,
                    _ => None,
                }
            };
            committed.is_some_and(|d| {
                shared
                    .record(&set.name, path)
                    .is_some_and(|r| unchanged_since(&r, meta) && r.digest.get() == d.get())
            })
        }
        Kind::Dir => {
            let local = meta_from_local(meta, EntryKind::Dir, names);
            shared
                .manifest
                .read()
                .unwrap()
                .get(&set.name, path)
                .is_some_and(|e| e.meta == local)
        }
        _ => false,
    }
}

/// Sets with `hard_links = true`: `paths` with the other names of the
/// files among them, which must be examined together (inotify reports a
/// change only under the name it was made through): the names the cluster
/// has for the same file (its primary and links), and the names this node
/// last saw on the same inode (by the node-local records: the old name of
/// a new link, or the names left holding an inode whose other name was
/// replaced). Taken to a fixed point, in path order.
fn with_other_names(
    shared: &Shared,
    set: &SetRuntime,
    root: &Root,
    paths: Vec<SetPath>,
) -> Vec<SetPath> {
    let mut all: BTreeSet<SetPath> = paths.into_iter().collect();
    let mut fresh: Vec<SetPath> = all.iter().cloned().collect();
    // A few rounds reach every name of every group in practice; the next
    // change or rescan picks up anything further.
    for _ in 0..3 {
        if fresh.is_empty() {
            break;
        }
        let mut inodes: HashSet<u64> = HashSet::new();
        for p in &fresh {
            if let Some(r) = shared.record(&set.name, p) {
                inodes.insert(r.ino);
            }
            if let Ok(Some(m)) = root.stat(&p.components().collect::<Vec<_>>()) {
                if m.kind == Kind::File && m.nlink > 1 {
                    inodes.insert(m.ino);
                }
            }
        }
        let mut found = BTreeSet::new();
        {
            let m = shared.manifest.read().unwrap();
            if let Some(sm) = m.set(&set.name) {
                let primaries: HashSet<SetPath> = fresh
                    .iter()
                    .filter_map(|p| {
                        sm.entries
                            .get(p)
                            .map(|e| e.link.clone().unwrap_or_else(|| p.clone()))
                    })
                    .collect();
                for (p, e) in &sm.entries {
                    if let Some(t) = e.link.as_ref().filter(|t| primaries.contains(*t)) {
                        found.insert(p.clone());
                        found.insert(t.clone());
                    }
                }
            }
        }
        if !inodes.is_empty() {
            found.extend(
                shared
                    .store
                    .records_of_set(&set.name)
                    .into_iter()
                    .filter(|(_, r)| inodes.contains(&r.ino))
                    .map(|(p, _)| p),
            );
        }
        fresh = found
            .into_iter()
            .filter(|p| all.insert(p.clone()))
            .collect();
    }
    all.into_iter().collect()
}

/// The hard links one pass of a set with `hard_links = true` proposes.
/// Names of one inode found in the pass form a group; one of them is the
/// primary, examined like any file (a new version of it travels as usual),
/// and every other name becomes a [`FileOp::Link`] of it unless the cluster
/// already has it so. The primary is the name the cluster already has as
/// the file (so nothing needs proposing), else a name moved from it, else
/// the first other name (proposed as a file of its own first).
#[derive(Default)]
struct LinkPlan {
    /// New name → old name, for the renames of this pass.
    renames: BTreeMap<SetPath, SetPath>,
    /// Old name → new name.
    moved: BTreeMap<SetPath, SetPath>,
    /// Paths this pass removes.
    removed: Vec<SetPath>,
    /// Every other name of a group → its primary.
    primary_of: BTreeMap<SetPath, SetPath>,
    /// Primaries examined in this pass.
    primaries: BTreeSet<SetPath>,
    /// Primaries usable as a link target once this pass applied, with the
    /// digest they will have.
    ok: BTreeMap<SetPath, WireDigest>,
    /// Primaries that get a new version (a `Put`) in this pass: a `Put`
    /// ends the links of a name, so they are proposed again.
    rewritten: BTreeSet<SetPath>,
    /// Primaries that could not be read this time: retried with their names.
    retry: BTreeSet<SetPath>,
    /// `lstat` of every grouped name.
    metas: BTreeMap<SetPath, FileMeta>,
}

impl LinkPlan {
    fn new(
        shared: &Shared,
        set: &SetRuntime,
        present: &[(SetPath, FileMeta)],
        renames: &BTreeMap<SetPath, SetPath>,
        removed: &[SetPath],
    ) -> LinkPlan {
        let mut plan = LinkPlan {
            renames: renames.clone(),
            moved: renames
                .iter()
                .map(|(t, f)| (f.clone(), t.clone()))
                .collect(),
            removed: removed.to_vec(),
            ..LinkPlan::default()
        };
        let mut by_inode: BTreeMap<(u64, u64), Vec<SetPath>> = BTreeMap::new();
        for (p, m) in present {
            if m.kind == Kind::File && m.nlink > 1 && set.holds(p, false) {
                by_inode.entry((m.dev, m.ino)).or_default().push(p.clone());
                plan.metas.insert(p.clone(), *m);
            }
        }
        for members in by_inode.into_values().filter(|v| v.len() > 1) {
            let is_file = |p: &SetPath| {
                plan.effective(shared, set, p)
                    .is_some_and(|e| e.meta.kind == EntryKind::File && e.link.is_none())
            };
            let moved_here = |p: &SetPath| plan.renames.contains_key(p);
            let Some(primary) = members
                .iter()
                .find(|p| !moved_here(p) && is_file(p))
                .or_else(|| members.iter().find(|p| moved_here(p) && is_file(p)))
                .or_else(|| members.iter().find(|p| !moved_here(p)))
                .cloned()
            else {
                continue;
            };
            if moved_here(&primary) {
                // Moved from the committed primary: it stays the file.
                if let Some(d) = plan.effective(shared, set, &primary).and_then(|e| e.digest) {
                    plan.ok.insert(primary.clone(), d);
                }
            } else {
                plan.primaries.insert(primary.clone());
            }
            for m in members.into_iter().filter(|m| *m != primary) {
                plan.primary_of.insert(m, primary.clone());
            }
        }
        plan
    }

    /// The committed entry of `path` as it will be once this pass's renames
    /// and removals applied: a moved name has its source's entry, and a
    /// link whose primary is removed is a file of its own.
    fn effective(&self, shared: &Shared, set: &SetRuntime, path: &SetPath) -> Option<Entry> {
        let m = shared.manifest.read().unwrap();
        let src = self.renames.get(path).unwrap_or(path);
        let mut e = m.get(&set.name, src)?.clone();
        if let Some(t) = e.link.take() {
            let t = self.moved.get(&t).cloned().unwrap_or(t);
            if !self.removed.iter().any(|r| *r == t || r.is_ancestor_of(&t)) {
                e.link = Some(t);
            }
        }
        Some(e)
    }

    /// The primary `path` was examined (`done`: not to be retried), and
    /// `planned` is the digest of the new version proposed for it, if any.
    fn note_examined(
        &mut self,
        shared: &Shared,
        set: &SetRuntime,
        path: &SetPath,
        done: bool,
        planned: Option<WireDigest>,
    ) {
        if !done {
            self.retry.insert(path.clone());
        } else if let Some(d) = planned {
            self.ok.insert(path.clone(), d);
            self.rewritten.insert(path.clone());
        } else if let Some(e) = self
            .effective(shared, set, path)
            .filter(|e| e.meta.kind == EntryKind::File && e.link.is_none())
        {
            if let Some(d) = e.digest {
                self.ok.insert(path.clone(), d);
            }
        }
    }

    /// Adds the links of this pass to `b` (after every other op of the
    /// pass); the names of primaries to retry go to `left` with them.
    fn propose(&self, shared: &Shared, set: &SetRuntime, b: &mut Builder, left: &mut Dirty) {
        for (name, primary) in &self.primary_of {
            let Some(digest) = self.ok.get(primary) else {
                if self.retry.contains(primary) {
                    left.paths
                        .entry(set.name.clone())
                        .or_default()
                        .insert(name.clone());
                }
                continue;
            };
            let linked = !self.rewritten.contains(primary)
                && self
                    .effective(shared, set, name)
                    .is_some_and(|e| e.link.as_ref() == Some(primary));
            if linked {
                continue;
            }
            b.ops.push(FileOp::Link {
                path: name.as_bytes().to_vec(),
                target: primary.as_bytes().to_vec(),
            });
            if let Some(m) = self.metas.get(name) {
                b.pending.push((name.clone(), record_of(m, &digest.get())));
            }
            // A link puts none of the file's bytes on the wire.
            shared
                .counters
                .bytes_saved
                .fetch_add(digest.get().len, Ordering::Relaxed);
        }
    }
}

/// Examines one present path against its `committed` entry (as it will be
/// once this pass's renames and removals applied); returns false when it
/// must be tried again later (it was changing while read, or could not be
/// read this time).
#[allow(clippy::too_many_arguments)]
fn examine(
    shared: &Shared,
    set: &SetRuntime,
    root: &Root,
    path: &SetPath,
    meta: &FileMeta,
    mut committed: Option<Entry>,
    names: &mut OwnerNames,
    b: &mut Builder,
) -> bool {
    let comps: Vec<&[u8]> = path.components().collect();
    let local_kind = match meta.kind {
        Kind::Dir => Some(EntryKind::Dir),
        Kind::Symlink => Some(EntryKind::Symlink),
        Kind::File => Some(EntryKind::File),
        _ => None,
    };
    if let (Some(c), Some(k)) = (&committed, local_kind) {
        if c.meta.kind != k {
            // The path changed kind: followers drop the old entry (and what
            // was under it) first, as the committed thing it is.
            b.ops.push(FileOp::Remove {
                path: path.as_bytes().to_vec(),
            });
            committed = None;
        }
    }
    let result: Result<(), Problem> = (|| {
        // Sets with `xattrs = true`: a file's or directory's replicated
        // extended attributes, read first so that a list too large to
        // replicate refuses the whole path rather than half of it.
        let local_xattrs = match meta.kind {
            Kind::File | Kind::Dir if set.xattrs => match root.read_xattrs(&comps)? {
                Some(x) => Some(x),
                None => return Ok(()), // gone meanwhile: its deletion event follows
            },
            _ => None,
        };
        if let Some(Err(why)) = local_xattrs.as_deref().map(check_xattrs) {
            return Err(Problem::Permanent(format!(
                "its extended attributes cannot be replicated: {why}; the path is not replicated until they are reduced"
            )));
        }
        let ops_before = b.ops.len();
        match meta.kind {
            Kind::Dir => {
                let m = meta_from_local(meta, EntryKind::Dir, names);
                if committed.as_ref().map(|e| &e.meta) != Some(&m) {
                    b.ops.push(FileOp::Dir {
                        path: path.as_bytes().to_vec(),
                        meta: m,
                    });
                }
            }
            Kind::Symlink => {
                let target = root.read_link(&comps)?.unwrap_or_default();
                let mut m = meta_from_local(meta, EntryKind::Symlink, names);
                m.mode = 0o777;
                let same = committed.as_ref().is_some_and(|e| {
                    e.target.as_deref() == Some(&target[..])
                        && e.meta.uid == m.uid
                        && e.meta.gid == m.gid
                });
                if !same {
                    b.ops.push(FileOp::Symlink {
                        path: path.as_bytes().to_vec(),
                        target,
                        meta: m,
                    });
                }
            }
            Kind::File => {
                examine_file(shared, set, root, path, meta, committed.as_ref(), names, b)?
            }
            _ => {
                debug!(set = %set.name, path = %path, "not replicated: {} (only files, directories and symlinks are)", meta.kind.describe())
            }
        }
        if let Some(xattrs) = local_xattrs {
            let op = xattrs_op(path, xattrs, &b.ops[ops_before..], committed.as_ref());
            b.ops.extend(op);
        }
        Ok(())
    })();
    match result {
        Ok(()) => true,
        Err(Problem::Permanent(e)) => {
            shared.note_error(&set.name, format!("{path}: {e}"));
            true
        }
        Err(Problem::Retry(e)) => {
            debug!(set = %set.name, path = %path, "{e}; trying again shortly");
            false
        }
    }
}

/// The [`FileOp::Xattrs`] to propose for `path`, whose local replicated
/// extended attributes are `local`, after `planned` (the ops just planned
/// for it) against its `committed` entry. A new version (`Put`, `Dir`)
/// commits a path without attributes, so it is followed by its attributes
/// unless it has none; otherwise they are proposed alone when they differ
/// from the committed ones (an `IN_ATTRIB` event: `setfattr`, `setfacl`).
fn xattrs_op(
    path: &SetPath,
    local: Xattrs,
    planned: &[FileOp],
    committed: Option<&Entry>,
) -> Option<FileOp> {
    let rewritten = planned.iter().any(|op| {
        matches!(op, FileOp::Put { path: p, .. } | FileOp::Dir { path: p, .. } if p == path.as_bytes())
    });
    let needed = if rewritten {
        !local.is_empty()
    } else {
        // Nothing committed (the path could not be read this time): nothing
        // to attach attributes to yet.
        committed.is_some_and(|e| e.xattrs != local)
    };
    needed.then(|| FileOp::Xattrs {
        path: path.as_bytes().to_vec(),
        xattrs: local,
    })
}

/// Why a path was not proposed.
enum Problem {
    /// It will not change by itself (too large, unreadable by policy).
    Permanent(String),
    /// It was changing or briefly unreadable: retried from the dirty list.
    Retry(String),
}

impl From<String> for Problem {
    fn from(s: String) -> Self {
        Problem::Retry(s)
    }
}

impl From<crate::fsroot::FsError> for Problem {
    fn from(e: crate::fsroot::FsError) -> Self {
        Problem::Retry(e.to_string())
    }
}

#[allow(clippy::too_many_arguments)]
fn examine_file(
    shared: &Shared,
    set: &SetRuntime,
    root: &Root,
    path: &SetPath,
    meta: &FileMeta,
    committed: Option<&Entry>,
    names: &mut OwnerNames,
    b: &mut Builder,
) -> Result<(), Problem> {
    let comps: Vec<&[u8]> = path.components().collect();
    let committed_digest = committed.and_then(|e| e.digest).map(|d| d.get());
    let record = shared.record(&set.name, path);
    // Committed as a hard link of another name, but examined as a file of
    // its own (its links are gone, or it is the primary now): a `Put` makes
    // it one, even with the same content and metadata.
    let own = committed.is_some_and(|e| e.link.is_some());
    if let (Some(r), Some(c)) = (record, committed_digest) {
        if unchanged_since(&r, meta)
            && r.digest.get() == c
            && committed.is_some_and(|e| e.meta.kind == EntryKind::File)
            && !own
        {
            return Ok(());
        }
    }
    if meta.len > set.max_file_size {
        return Err(Problem::Permanent(format!(
            "{} bytes is more than the set's max_file_size ({}); not replicated",
            meta.len, set.max_file_size
        )));
    }
    // An append set's file that only grew: read and send the new bytes only.
    if set.mode == SyncMode::Append {
        if let (Some(r), Some(c)) = (record, committed_digest) {
            if r.digest.get() == c && r.ino == meta.ino && meta.len > r.len {
                return append_tail(shared, set, root, path, &comps, c, r.len, names, b)
                    .map_err(Problem::Retry);
            }
        }
    }
    let Some(p) = prepare_file(shared, set, root, path, committed_digest)? else {
        return Ok(()); // gone meanwhile: its deletion event follows
    };
    let m = meta_from_local(&p.now, EntryKind::File, names);
    let Some(patch) = p.patch else {
        // The committed content.
        if committed.map(|e| &e.meta) != Some(&m) || own {
            b.pending.push((path.clone(), record_of(&p.now, &p.digest)));
            b.ops.push(FileOp::Put {
                path: path.as_bytes().to_vec(),
                meta: m,
                digest: WireDigest::new(&p.digest),
                content: Content::Unchanged,
            });
        } else {
            // Same bytes, same metadata (say, a touch undone): just remember it.
            shared.remember_record(&set.name, path, &record_of(&p.now, &p.digest));
        }
        return Ok(());
    };
    if let Some(sig) = p.signature {
        b.signatures.put_signature(&set.name, path, &sig);
    }
    add_put(shared, path, m, p.digest, &patch, p.len, b);
    b.pending.push((path.clone(), record_of(&p.now, &p.digest)));
    Ok(())
}

/// A file read and planned: everything of [`examine_file`] that costs a
/// pass over the content, with the content hashed once.
struct Prepared {
    /// Metadata of the very bytes read.
    now: FileMeta,
    digest: FileDigest,
    len: usize,
    /// The patch against the committed version; `None` when the content is
    /// the committed one. Encoded only where it goes (see [`add_put`]).
    patch: Option<delta::Patch>,
    /// The block signature of the new version (mirror sets, files of
    /// [`delta::SMALL_FILE_LEN`] and more), stored once proposed.
    signature: Option<Vec<u8>>,
}

/// Reads `path` (again if it changes meanwhile), hashes it once and plans
/// its patch against `committed`. `None`: the file is gone.
fn prepare_file(
    shared: &Shared,
    set: &SetRuntime,
    root: &Root,
    path: &SetPath,
    committed: Option<FileDigest>,
) -> Result<Option<Prepared>, crate::fsroot::FsError> {
    let comps: Vec<&[u8]> = path.components().collect();
    let Some((data, now)) = root.read_file(&comps, set.max_file_size)? else {
        return Ok(None);
    };
    let digest = delta::digest(&data);
    if committed == Some(digest) {
        return Ok(Some(Prepared {
            now,
            digest,
            len: data.len(),
            patch: None,
            signature: None,
        }));
    }
    let sig = committed.and_then(|c| shared.signature(&set.name, path, &c));
    let patch = delta::plan_from(sig.as_ref(), &data);
    let signature = set
        .keeps_signature(data.len() as u64)
        .then(|| delta::BlockSignature::compute_hashed(&data, digest).to_bytes());
    Ok(Some(Prepared {
        now,
        digest,
        len: data.len(),
        patch: Some(patch),
        signature,
    }))
}

#[allow(clippy::too_many_arguments)]
fn append_tail(
    shared: &Shared,
    set: &SetRuntime,
    root: &Root,
    path: &SetPath,
    comps: &[&[u8]],
    base: FileDigest,
    base_len: u64,
    names: &mut OwnerNames,
    b: &mut Builder,
) -> Result<(), String> {
    let key = (set.name.clone(), path.clone());
    let Some((file, _)) = root.open_file(comps).map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let mut hasher = match shared
        .append_hashers
        .lock()
        .unwrap()
        .get(&key)
        .filter(|(h, _)| h.digest() == base)
        .cloned()
        .filter(|(_, fp)| crate::replica::fingerprint(&file, base_len).is_ok_and(|now| now == *fp))
    {
        Some((h, _)) => h,
        None => {
            // Once per file and leadership: hash the committed prefix.
            let mut h = FileHasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            while off < base_len {
                let want = ((base_len - off) as usize).min(buf.len());
                let n = file
                    .read_at(&mut buf[..want], off)
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                off += n as u64;
            }
            if h.digest() != base {
                // Not an append after all (rewritten in place): send it as a new version.
                drop(file);
                let mut record = shared
                    .record(&set.name, path)
                    .expect("append needs a record");
                record.ino = u64::MAX;
                shared.remember_record(&set.name, path, &record);
                let meta = root.stat(comps).map_err(|e| e.to_string())?.ok_or("gone")?;
                let committed = shared
                    .manifest
                    .read()
                    .unwrap()
                    .get(&set.name, path)
                    .cloned();
                let mut mirror = set.clone();
                mirror.mode = SyncMode::Mirror;
                return examine_file(
                    shared,
                    &mirror,
                    root,
                    path,
                    &meta,
                    committed.as_ref(),
                    names,
                    b,
                )
                .map_err(|e| match e {
                    Problem::Permanent(s) | Problem::Retry(s) => s,
                });
            }
            h
        }
    };
    // Read the tail until the size holds still, so a writer mid-line is not torn.
    let mut attempts = 0;
    let (tail, meta) = loop {
        let before = rustix::fs::fstat(&file).map_err(|e| e.to_string())?;
        let len = (before.st_size as u64).max(base_len);
        let mut tail = vec![0u8; (len - base_len) as usize];
        file.read_exact_at(&mut tail, base_len)
            .map_err(|e| e.to_string())?;
        let after = rustix::fs::fstat(&file).map_err(|e| e.to_string())?;
        // The record must describe exactly the bytes read: its length is
        // where the next tail starts.
        if after.st_size == before.st_size
            && after.st_mtime == before.st_mtime
            && after.st_mtime_nsec == before.st_mtime_nsec
        {
            break (tail, FileMeta::from_stat(&after));
        }
        attempts += 1;
        if attempts >= 5 {
            return Err(format!(
                "{path} kept growing during each of 5 reads; trying again at the next change"
            ));
        }
    };
    hasher.update(&tail);
    let new_digest = hasher.digest();
    let patch = delta::plan_append(&base, &tail);
    if let Ok(fp) = crate::replica::fingerprint(&file, base_len + tail.len() as u64) {
        shared
            .append_hashers
            .lock()
            .unwrap()
            .insert(key, (hasher, fp));
    }
    let m = meta_from_local(&meta, EntryKind::File, names);
    add_put(shared, path, m, new_digest, &patch, tail.len(), b);
    b.pending
        .push((path.clone(), record_of(&meta, &new_digest)));
    Ok(())
}

fn add_put(
    shared: &Shared,
    path: &SetPath,
    meta: crate::manifest::Meta,
    digest: FileDigest,
    patch: &delta::Patch,
    raw_len: usize,
    b: &mut Builder,
) {
    let len = patch.encoded_len();
    shared.counters.bytes_saved.fetch_add(
        (raw_len as u64).saturating_sub(len as u64),
        Ordering::Relaxed,
    );
    let content = if len >= BLOB_MIN {
        if b.blob.is_empty() {
            b.blob_upload = rand::random();
            shared.own_uploads.lock().unwrap().insert(b.blob_upload);
            // All of the batch at once (it is proposed past BATCH_BYTES):
            // growing it copied every byte of a full sync again.
            b.blob.reserve(BATCH_BYTES + len);
        }
        let offset = b.blob.len() as u64;
        patch.encode_into(&mut b.blob);
        Content::Blob {
            upload: b.blob_upload,
            offset,
            len: len as u64,
        }
    } else {
        Content::Inline(patch.encode())
    };
    b.bytes += match &content {
        Content::Inline(p) => p.len(),
        Content::Staged { len, .. } | Content::Blob { len, .. } => *len as usize,
        Content::Unchanged => 0,
    };
    b.ops.push(FileOp::Put {
        path: path.as_bytes().to_vec(),
        meta,
        digest: WireDigest::new(&digest),
        content,
    });
}

/// Proposes what `b` holds (chunks first, in windows, then the batch), in
/// order, keeping at most [`MAX_IN_FLIGHT`] proposals unapplied; with
/// `wait_all`, returns once everything proposed in this pass applied here.
fn flush(
    shared: &Shared,
    node: &NodeHandle,
    rt: &tokio::runtime::Handle,
    term: u64,
    set: &SetRuntime,
    b: &mut Builder,
    wait_all: bool,
) -> Result<(), RequestError> {
    if !b.signatures.is_empty() {
        let _ = shared
            .store
            .write_relaxed(std::mem::take(&mut b.signatures));
    }
    if !b.ops.is_empty() {
        // Stage this batch's content in the background while the next ones
        // are read; the batch itself is proposed at a later flush, when
        // [`STAGING_DEPTH`] batches (or [`STAGING_BYTES`]) are staging, after
        // those before it.
        while b.staged.len() >= STAGING_DEPTH
            || (!b.staged.is_empty() && staging_bytes(&b.staged) + b.blob.len() > STAGING_BYTES)
        {
            let oldest = b.staged.pop_front().expect("non-empty");
            propose_batch(shared, node, rt, term, set, oldest, b)?;
        }
        let blob = std::mem::take(&mut b.blob);
        let staging = (!blob.is_empty()).then(|| {
            // Shared by every follower's pieces without a copy.
            let blob = prost::bytes::Bytes::from(blob);
            let paused = shared
                .staging_paused_until
                .lock()
                .unwrap()
                .is_some_and(|until| Instant::now() < until);
            let versions = Arc::new(staged_versions(&b.ops));
            let task = (!paused)
                .then(|| start_staging(shared, node, rt, b.blob_upload, blob.clone(), versions));
            (b.blob_upload, blob, task)
        });
        let batch = ReadyBatch {
            ops: std::mem::take(&mut b.ops),
            pending: std::mem::take(&mut b.pending),
            staging,
        };
        b.bytes = 0;
        b.staged.push_back(batch);
    }
    if wait_all {
        while let Some(oldest) = b.staged.pop_front() {
            propose_batch(shared, node, rt, term, set, oldest, b)?;
        }
        while let Some(rx) = b.in_flight.pop_front() {
            await_applied(rt, rx)?;
        }
    }
    Ok(())
}

/// Bytes of the staged content `staged` holds.
fn staging_bytes(staged: &std::collections::VecDeque<ReadyBatch>) -> usize {
    staged
        .iter()
        .filter_map(|r| r.staging.as_ref())
        .map(|(_, blob, _)| blob.len())
        .sum()
}

/// A batch whose content is being staged, proposed once that is done.
struct ReadyBatch {
    ops: Vec<FileOp>,
    /// What the source read of each path (see `Shared::pending_local`).
    pending: Vec<(SetPath, crate::files_store::LocalRecord)>,
    /// The upload its `Content::Blob`s point into, its bytes and the task
    /// staging them (true: enough followers hold them; none: staging is
    /// paused, the content goes through the log).
    staging: Option<(
        u64,
        prost::bytes::Bytes,
        Option<tokio::task::JoinHandle<bool>>,
    )>,
}

/// Proposes `batch` once its staging finished: its content through the log
/// first (as chunks) if too few followers hold it.
fn propose_batch(
    shared: &Shared,
    node: &NodeHandle,
    rt: &tokio::runtime::Handle,
    term: u64,
    set: &SetRuntime,
    batch: ReadyBatch,
    b: &mut Builder,
) -> Result<(), RequestError> {
    let mut ops = batch.ops;
    if let Some((upload, blob, task)) = batch.staging {
        let started = Instant::now();
        let staged = match task {
            Some(task) => rt.block_on(task).unwrap_or(false),
            None => false,
        };
        b.waited.staging += started.elapsed();
        if staged {
            // Proposed beside the log: counted here, as the node task counts
            // what it proposes in entries.
            shared
                .counters
                .bytes_proposed
                .fetch_add(blob.len() as u64, Ordering::Relaxed);
        } else {
            let mut paused = shared.staging_paused_until.lock().unwrap();
            if paused.is_none_or(|until| Instant::now() >= until) {
                info!(set = %set.name, upload, bytes = blob.len(), "not every active follower could stage a batch's content (see their logs); sending it, and content for the next {}s, through the log", STAGING_PAUSE.as_secs());
                *paused = Some(Instant::now() + STAGING_PAUSE);
            }
            drop(paused);
            let chunks = through_the_log(&mut ops, &blob);
            let mut own = shared.own_uploads.lock().unwrap();
            own.extend(chunks.iter().map(|c| c.upload));
            drop(own);
            let mut chunks = chunks.into_iter().peekable();
            while chunks.peek().is_some() {
                let commands: Vec<Command> = chunks
                    .by_ref()
                    .take(CHUNK_WINDOW)
                    .map(Command::Chunk)
                    .collect();
                submit(
                    shared,
                    node,
                    rt,
                    term,
                    commands,
                    Duration::from_secs(120),
                    b,
                )?;
            }
        }
    }
    {
        let mut pending = shared.pending_local.lock().unwrap();
        for (p, r) in batch.pending {
            pending.insert((set.name.clone(), p), r);
        }
    }
    debug!(set = %set.name, ops = ops.len(), waited = ?b.waited, "proposing a batch");
    let command = Command::Files(FileBatch {
        set: set.name.clone(),
        origin: shared.node_id,
        proposed_at_ms: unix_ms(),
        ops,
    });
    submit(
        shared,
        node,
        rt,
        term,
        vec![command],
        Duration::from_secs(120),
        b,
    )
}

/// Rewrites the [`Content::Blob`]s of `ops` (pointing into `blob`) to
/// carry their patches through the log, exactly as releases before staged
/// content did: inline up to [`INLINE_LIMIT`], else as [`Chunk`]s of an
/// upload of their own (returned, to be proposed before the batch) and a
/// [`Content::Staged`] reference. So a batch that could not be staged on
/// every active follower is also one that any older release applies.
fn through_the_log(ops: &mut [FileOp], blob: &[u8]) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    for op in ops {
        let FileOp::Put { content, .. } = op else {
            continue;
        };
        let Content::Blob { offset, len, .. } = *content else {
            continue;
        };
        let patch = &blob[offset as usize..(offset + len) as usize];
        *content = if patch.len() <= INLINE_LIMIT {
            Content::Inline(patch.to_vec())
        } else {
            let upload: u64 = rand::random();
            for (i, piece) in patch.chunks(CHUNK_LEN).enumerate() {
                chunks.push(Chunk {
                    upload,
                    offset: (i * CHUNK_LEN) as u64,
                    data: piece.to_vec(),
                });
            }
            Content::Staged { upload, len }
        };
    }
    chunks
}

/// The file versions whose patches `ops`' [`Content::Blob`]s point to, as
/// followers need them to write whole new content as finished files when
/// they stage it (see [`Shared::finish_upload`](crate::replica::Shared::finish_upload)).
fn staged_versions(ops: &[FileOp]) -> Vec<StagedVersion> {
    ops.iter()
        .filter_map(|op| match op {
            FileOp::Put {
                digest,
                content: Content::Blob { offset, len, .. },
                meta,
                ..
            } => Some(StagedVersion {
                offset: *offset,
                len: *len,
                digest: digest.get(),
                meta: Some(meta.clone()),
            }),
            _ => None,
        })
        .collect()
}

/// Sends the content of a batch about to be proposed (`blob`, the patches
/// its [`Content::Blob`]s point into) to every data follower Raft sees as
/// active, in pieces, the last one durable (`Stage` RPC), in a task. The
/// task is true when every one of them holds it, and they are enough that
/// any majority of the cluster without this leader includes one (at least
/// as many as the cluster tolerates failures, and at least one). Only then
/// may the batch reference it, so a committed change survives this leader
/// dying right after the commit; a follower that was down meanwhile
/// fetches the file from one that holds it. False: the caller sends it
/// through the log instead ([`through_the_log`]), as older releases did,
/// which also keeps a follower that refused it (an older release has no
/// `Stage`, a full disk) applying every batch.
fn start_staging(
    shared: &Shared,
    node: &NodeHandle,
    rt: &tokio::runtime::Handle,
    upload: u64,
    blob: prost::bytes::Bytes,
    versions: Arc<Vec<StagedVersion>>,
) -> tokio::task::JoinHandle<bool> {
    let view = node.view();
    let voters = view.progress.len();
    let needed = voters.saturating_sub(voters / 2 + 1).max(1);
    let data_peers: Vec<u64> = view
        .progress
        .iter()
        .filter(|p| p.id != view.id && !shared.witness_peers.contains(&p.id))
        .map(|p| p.id)
        .collect();
    let targets: Vec<u64> = data_peers
        .iter()
        .copied()
        .filter(|&p| {
            node.peer_applied(p)
                .is_some_and(|(_, age)| age <= ANSWERED_WITHIN)
        })
        .collect();
    // A follower that was down meanwhile applies the batch from the log
    // later: only a data peer known to stage (so running a release that
    // knows `Content::Blob`) may miss it.
    let all_capable = {
        let capable = shared.stage_capable.lock().unwrap();
        data_peers
            .iter()
            .all(|p| targets.contains(p) || capable.contains(p))
    };
    let transport = node.transport().cloned();
    let capable = shared.stage_capable.clone();
    rt.spawn(async move {
        let Some(transport) = transport else {
            return false;
        };
        if targets.len() < needed {
            return false;
        }
        let sends = targets
            .iter()
            .map(|&peer| stage_on(&transport, peer, upload, &blob, &versions));
        let held = futures::future::join_all(sends).await;
        {
            let mut capable = capable.lock().unwrap();
            for (&peer, &ok) in targets.iter().zip(&held) {
                if ok {
                    capable.insert(peer);
                }
            }
        }
        all_capable && held.iter().all(|&ok| ok)
    })
}

/// Sends `blob` to `peer` as staged upload `upload`, listing `versions` in
/// the last piece; true once it holds it durably.
async fn stage_on(
    transport: &Transport,
    peer: u64,
    upload: u64,
    blob: &prost::bytes::Bytes,
    versions: &[StagedVersion],
) -> bool {
    let Some(mut client) = transport.bulk_client(peer) else {
        return false;
    };
    let pieces = blob.len().div_ceil(STAGE_PIECE);
    for i in 0..pieces {
        let last = i + 1 == pieces;
        let piece = blob.slice(i * STAGE_PIECE..blob.len().min((i + 1) * STAGE_PIECE));
        let mut req = tonic::Request::new(crate::proto::peer::StageRequest {
            upload,
            offset: (i * STAGE_PIECE) as u64,
            data: piece.clone(),
            durable: last,
            versions_follow: true,
            versions: match last {
                true => versions.iter().map(Into::into).collect(),
                false => Vec::new(),
            },
        });
        // The last call writes back and fsyncs the whole upload (and the
        // files made of it), beside up to STAGING_DEPTH others.
        req.set_timeout(match last {
            true => STAGE_TIMEOUT + Duration::from_secs(blob.len() as u64 / (5 << 20)),
            false => STAGE_TIMEOUT,
        });
        if let Err(e) = client.stage(req).await {
            debug!(
                peer,
                upload,
                "staging content on node {peer} failed: {}",
                e.message()
            );
            return false;
        }
        crate::transport::WIRE_BYTES_SENT.fetch_add(piece.len() as u64, Ordering::Relaxed);
    }
    true
}

/// Hands `commands` to the node task (in order) and tracks the reply.
fn submit(
    shared: &Shared,
    node: &NodeHandle,
    rt: &tokio::runtime::Handle,
    term: u64,
    commands: Vec<Command>,
    wait: Duration,
    b: &mut Builder,
) -> Result<(), RequestError> {
    let started = Instant::now();
    while b.in_flight.len() >= MAX_IN_FLIGHT {
        let rx = b.in_flight.pop_front().expect("non-empty");
        await_applied(rt, rx)?;
    }
    let applied = Instant::now();
    b.waited.own_apply += applied - started;
    wait_for_followers(shared, node);
    b.waited.followers += applied.elapsed();
    let rx = rt.block_on(node.propose_start(term, commands, wait))?;
    b.in_flight.push_back(rx);
    Ok(())
}

/// Waits while a follower that is answering and keeping up falls more than
/// [`FOLLOWER_APPLY_WINDOW`] entries behind what this leader applied.
///
/// Without it a bulk transfer commits as fast as followers can append to
/// their logs, and their appliers (which write and fsync every file) fall
/// hundreds of MiB behind: what `promote` waits for and a failover to them
/// has to catch up (and, for content in the log, entries that outlive the
/// log's memtable and are written twice). A follower that stopped
/// answering (no report for a second), that is catching up (more than
/// [`FOLLOWER_CATCHING_UP`] behind) or whose applier stopped advancing (for
/// [`FOLLOWER_STALL`]) holds nobody back.
fn wait_for_followers(shared: &Shared, node: &NodeHandle) {
    loop {
        let view = node.view();
        if view.role != Role::Leader {
            return;
        }
        let ours = view.applied_index;
        let mut waiting = false;
        for p in view
            .progress
            .iter()
            .filter(|p| p.id != view.id && p.recent_active)
        {
            let Some((applied, age)) = node.peer_applied(p.id) else {
                continue;
            };
            // When each follower's applied index last moved, across calls:
            // a stalled one must not cost every proposal FOLLOWER_STALL.
            let unmoved = {
                let mut moved = shared.follower_applied_moved.lock().unwrap();
                let (last, since) = moved.entry(p.id).or_insert((applied, Instant::now()));
                if applied != *last {
                    (*last, *since) = (applied, Instant::now());
                }
                since.elapsed()
            };
            waiting |= holds_back(ours.saturating_sub(applied), age, unmoved);
        }
        if !waiting {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a follower `behind` entries behind, whose last report is
/// `report_age` old and whose applied index has not moved for `unmoved`,
/// makes the source wait (see [`wait_for_followers`]).
fn holds_back(behind: u64, report_age: Duration, unmoved: Duration) -> bool {
    report_age <= ANSWERED_WITHIN
        && behind > FOLLOWER_APPLY_WINDOW
        && behind <= FOLLOWER_CATCHING_UP
        && unmoved < FOLLOWER_STALL
}

fn await_applied(
    rt: &tokio::runtime::Handle,
    rx: tokio::sync::oneshot::Receiver<Result<u64, RequestError>>,
) -> Result<(), RequestError> {
    rt.block_on(rx).map_err(|_| RequestError::ShuttingDown)??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_that_was_not_staged_goes_through_the_log_in_the_old_format() {
        let small = vec![1u8; 1000];
        let large: Vec<u8> = (0..INLINE_LIMIT + CHUNK_LEN + 5).map(|i| i as u8).collect();
        let mut blob = small.clone();
        blob.extend_from_slice(&large);
        let put = |name: &str, content| FileOp::Put {
            path: name.as_bytes().to_vec(),
            meta: entry(Vec::new()).meta,
            digest: WireDigest::new(&delta::digest(b"")),
            content,
        };
        let mut ops = vec![
            put(
                "s",
                Content::Blob {
                    upload: 9,
                    offset: 0,
                    len: 1000,
                },
            ),
            FileOp::Remove {
                path: b"gone".to_vec(),
            },
            put(
                "l",
                Content::Blob {
                    upload: 9,
                    offset: 1000,
                    len: large.len() as u64,
                },
            ),
        ];
        let chunks = through_the_log(&mut ops, &blob);
        let FileOp::Put {
            content: Content::Inline(inline),
            ..
        } = &ops[0]
        else {
            panic!("{:?}", ops[0])
        };
        assert_eq!(inline, &small);
        assert_eq!(
            ops[1],
            FileOp::Remove {
                path: b"gone".to_vec()
            }
        );
        let FileOp::Put {
            content: Content::Staged { upload, len },
            ..
        } = &ops[2]
        else {
            panic!("{:?}", ops[2])
        };
        assert_eq!(*len, large.len() as u64);
        assert_eq!(chunks.len(), 2);
        let mut rebuilt = vec![0u8; large.len()];
        for c in &chunks {
            assert_eq!(c.upload, *upload);
            rebuilt[c.offset as usize..c.offset as usize + c.data.len()].copy_from_slice(&c.data);
        }
        assert_eq!(rebuilt, large);
    }

    #[test]
    fn only_followers_keeping_up_hold_the_source_back() {
        let fresh = Duration::from_millis(50);
        let moving = Duration::from_millis(10);
        // Within the window: no wait.
        assert!(!holds_back(FOLLOWER_APPLY_WINDOW, fresh, moving));
        // Just past it, answering and applying: wait.
        assert!(holds_back(FOLLOWER_APPLY_WINDOW + 1, fresh, moving));
        assert!(holds_back(FOLLOWER_CATCHING_UP, fresh, moving));
        // Catching up from far behind: its catch-up never delays changes.
        assert!(!holds_back(FOLLOWER_CATCHING_UP + 1, fresh, moving));
        // Silent for over a second (dead, cut off): not waited for.
        assert!(!holds_back(10, Duration::from_secs(2), moving));
        // An applier that stopped advancing (a huge file, a stuck disk).
        assert!(!holds_back(10, fresh, FOLLOWER_STALL));
    }
    use crate::manifest::Meta;

    fn entry(xattrs: Xattrs) -> Entry {
        Entry {
            meta: Meta {
                kind: EntryKind::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                user: None,
                group: None,
                mtime_ns: 1,
            },
            digest: None,
            target: None,
            xattrs,
            link: None,
        }
    }

    fn x(pairs: &[(&str, &str)]) -> Xattrs {
        pairs
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn only_changed_xattrs_are_proposed_as_a_metadata_only_op() {
        let p = SetPath::from_network(b"etc/conf").unwrap();
        let committed = entry(x(&[("user.a", "1")]));
        // Unchanged: nothing.
        assert_eq!(
            xattrs_op(&p, x(&[("user.a", "1")]), &[], Some(&committed)),
            None
        );
        // Changed or removed with the content untouched: the op alone.
        for local in [x(&[("user.a", "2")]), x(&[])] {
            assert_eq!(
                xattrs_op(&p, local.clone(), &[], Some(&committed)),
                Some(FileOp::Xattrs {
                    path: p.as_bytes().to_vec(),
                    xattrs: local
                })
            );
        }
        // Nothing committed and nothing planned: nothing to attach them to.
        assert_eq!(xattrs_op(&p, x(&[("user.a", "1")]), &[], None), None);
    }

    #[test]
    fn a_new_version_carries_its_xattrs_unless_it_has_none() {
        let p = SetPath::from_network(b"conf").unwrap();
        let put = FileOp::Put {
            path: p.as_bytes().to_vec(),
            meta: entry(vec![]).meta,
            digest: WireDigest::new(&delta::digest(b"x")),
            content: Content::Unchanged,
        };
        let committed = entry(x(&[("user.a", "1")]));
        // Even when equal to the committed ones: a Put clears them.
        assert!(matches!(
            xattrs_op(&p, x(&[("user.a", "1")]), &[put.clone()], Some(&committed)),
            Some(FileOp::Xattrs { .. })
        ));
        assert_eq!(
            xattrs_op(&p, x(&[]), &[put.clone()], Some(&committed)),
            None
        );
        // A Put of another path does not count.
        let other = SetPath::from_network(b"conf2").unwrap();
        assert_eq!(
            xattrs_op(&other, x(&[]), &[put], Some(&entry(x(&[])))),
            None
        );
    }
}
