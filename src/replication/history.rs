//! Each data node's history of its sets (`[history]`, `clusterctl history`,
//! `show`, `diff`): every committed change of a set with `history = true`
//! becomes a revision (its Raft index) with the changes it made, each
//! changed path gets its version after it, and each file version's content
//! is kept once per digest.
//!
//! Where things are:
//! * Revisions and versions: in the files store, put into the very batch
//!   that carries the manifest they describe, so after a crash the history
//!   is exactly the one at the stored applied index.
//! * Content up to [`SMALL_OBJECT`]: zstd-compressed in the files store,
//!   in that same batch (one fsync for all of them).
//! * Larger content: files under `data_dir/history/objects/`, a hard link
//!   to the version the node wrote or read where the filesystem allows
//!   (no copy: the inode outlives its name in the tree when the next
//!   version replaces it), else a compressed copy; fsync'd with its
//!   directory before that batch is written.
//!
//! Invariants owned here:
//! * Content is served only if it hashes to the digest the version names;
//!   a damaged object is reported, never served.
//! * Content is kept only from a file whose content is the committed
//!   version (checked by hash, or by having just written it); a node that
//!   did not hold the version (a held, skipped or missing path) keeps the
//!   revision without its content and says so when asked.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::core::config::{HistoryConfig, SyncMode};
use crate::core::delta::{self, FileDigest};
use crate::core::history::{
    classify, drop_through, is_file, shown_size, At, Change, ChangeOp, Revision, Version,
};
use crate::core::manifest::{Entry, WireDigest};
use crate::core::paths::SetPath;
use crate::fs::root::Root;
use crate::replication::files_store::{FilesStoreError, StoreBatch};
use crate::replication::shared::{SetRuntime, Shared};

/// Content up to this size is kept compressed in the files store; larger
/// content in files of its own.
pub const SMALL_OBJECT: u64 = 1 << 20;
/// zstd level of kept content: fast, and config text compresses well.
const LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("sync set {0:?} is not replicated on this node")]
    UnknownSet(String),
    #[error("sync set {0:?} keeps no history (`history = false`); set `history = true` in its [[sync]] table to keep versions from now on")]
    Off(String),
    #[error("node {node} does not hold the content of {path} at revision {rev} (it did not hold that version when it was applied, or it was pruned); ask another node with `clusterctl --remote`")]
    NotKept { node: u64, path: SetPath, rev: u64 },
    #[error("the kept content of {path} at revision {rev} is damaged (it does not hash to {digest}); it is not shown. Another node may hold it: ask it with `clusterctl --remote`")]
    Damaged {
        path: SetPath,
        rev: u64,
        digest: String,
    },
    #[error("{path:?} is not a path of sync set {set:?}: {why}; give it relative to the set's path or as an absolute path under it")]
    BadPath {
        set: String,
        path: String,
        why: String,
    },
    #[error("revision {rev} is not committed on this node yet (it applied up to {applied})")]
    NotCommitted { rev: u64, applied: u64 },
    #[error("sync set {0:?} has no history on this node yet: it keeps versions from its first change after history was turned on")]
    Empty(String),
    #[error("revision {rev} of sync set {set:?} is older than the history this node keeps; the oldest available is {oldest}")]
    TooOld { set: String, rev: u64, oldest: u64 },
    #[error("the state of {path} at revision {rev} is older than the history this node keeps (it last changed before revision {oldest}, the oldest available)")]
    Predates {
        path: SetPath,
        rev: u64,
        oldest: u64,
    },
    #[error(transparent)]
    Store(#[from] FilesStoreError),
}

/// Where large content lives.
fn objects_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("history").join("objects")
}

/// `<hash hex>-<length>`, with `.zst` when compressed.
fn object_file(data_dir: &Path, digest: &FileDigest, compressed: bool) -> PathBuf {
    let name = format!(
        "{}-{}{}",
        digest.hex(),
        digest.len,
        if compressed { ".zst" } else { "" }
    );
    objects_dir(data_dir).join(name)
}

/// The digest an object file's name stands for.
fn object_digest(name: &str) -> Option<FileDigest> {
    let (hash, len) = name.trim_end_matches(".zst").split_once('-')?;
    Some(FileDigest {
        len: len.parse().ok()?,
        hash: *blake3::Hash::from_hex(hash).ok()?.as_bytes(),
    })
}

/// The committed entries a batch is about to change, taken before it is
/// applied (see [`Recorder::record`]).
pub type Before = BTreeMap<SetPath, Entry>;

/// Derives and stores the history of applied batches.
pub struct Recorder;

impl Recorder {
    /// Records revision `rev` of `set`: the changes from `before` to
    /// `after` (the entries of the batch's paths after it, `None` for those
    /// gone; a path only `before` names is unchanged), each changed path's version, and the content of each
    /// new file version this node holds in `root` (none without a root).
    /// `leader` proposed it; `rollback`: every node wrote it (none holds
    /// it as its own tree).
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        shared: &Shared,
        set: &SetRuntime,
        root: Option<&Root>,
        rev: u64,
        term: u64,
        leader: u64,
        time_ms: u64,
        rollback: bool,
        before: &Before,
        after: &BTreeMap<SetPath, Option<Entry>>,
        store: &mut StoreBatch,
    ) {
        let mut changes = Vec::new();
        let mut stored = 0u64;
        let mut synced_dir = false;
        let paths: BTreeSet<&SetPath> = before.keys().chain(after.keys()).collect();
        let own = leader == shared.node_id && !rollback;
        let versions = paths
            .iter()
            .filter(|p| {
                let old = before.get(**p);
                let new = match after.get(**p) {
                    Some(e) => e.as_ref(),
                    None => old,
                };
                new.is_some_and(is_file)
                    && matches!(
                        classify(old, new),
                        Some(ChangeOp::Added | ChangeOp::Content)
                    )
            })
            .count();
        let defer = own && versions > OWN_INLINE_FILES;
        let capture = if own { Capture::Own } else { Capture::Written };
        for path in paths {
            let old = before.get(path);
            // A path of the batch that `after` does not name kept its entry.
            let new = match after.get(path) {
                Some(e) => e.as_ref(),
                None => old,
            };
            let Some(op) = classify(old, new) else {
                continue;
            };
            changes.push(Change {
                path: path.clone(),
                op,
                size: shown_size(op, old, new),
            });
            store.put_version(
                &set.name,
                path,
                rev,
                &Version {
                    op,
                    entry: new.cloned(),
                },
            );
            let wanted = match new {
                Some(e) if is_file(e) && matches!(op, ChangeOp::Added | ChangeOp::Content) => {
                    e.digest
                }
                _ => None,
            };
            if let (Some(digest), true) = (wanted, defer) {
                shared
                    .history_deferred
                    .lock()
                    .unwrap()
                    .push_back(DeferredCapture {
                        set: set.name.clone(),
                        path: path.clone(),
                        digest,
                    });
            } else if let (Some(digest), Some(root)) = (wanted, root) {
                match keep_content(shared, set, root, path, &digest, op, capture, store) {
                    Ok(Kept::Already) => {}
                    Ok(Kept::Stored { bytes, file }) => {
                        stored += bytes;
                        synced_dir |= file;
                    }
                    Ok(Kept::NotHere) => {}
                    Err(e) => {
                        warn!(set = %set.name, path = %path, rev, "cannot keep the content of {path} at revision {rev} in the history: {e}")
                    }
                }
            }
        }
        if changes.is_empty() {
            return;
        }
        if synced_dir {
            // The new object files' names must be durable before the batch
            // naming them: synced once per page of applied entries
            // ([`sync_objects_dir`]), not once per batch.
            shared
                .history_objects_unsynced
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        store.put_revision(
            &set.name,
            rev,
            &Revision {
                time_ms,
                term,
                leader,
                changes,
                stored_bytes: stored,
            },
        );
    }
}

enum Kept {
    /// This node already keeps that content.
    Already,
    Stored {
        bytes: u64,
        file: bool,
    },
    /// The tree does not hold that version (any more).
    NotHere,
}

/// Makes the names of object files added since the last call durable (an
/// fsync of their directory); called before the store batch that names
/// them is written.
pub fn sync_objects_dir(shared: &Shared) {
    // The page's records were made: what they did not consume is looked up
    // the usual way from now on.
    shared.history_linked.lock().unwrap().clear();
    if shared
        .history_objects_unsynced
        .swap(false, std::sync::atomic::Ordering::Relaxed)
    {
        if let Err(e) = fs::File::open(objects_dir(&shared.data_dir)).and_then(|d| d.sync_all()) {
            warn!(
                "cannot sync {}: {e}",
                objects_dir(&shared.data_dir).display()
            );
        }
    }
}

/// How a version's content is kept, by who wrote the file and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    /// This node wrote the file itself (a follower's apply, a rollback): a
    /// first version may be a hard link to it.
    Written,
    /// The leader's own tree, an edit: kept now, never linked (an editor
    /// seeing a second link writes in place, which would change the kept
    /// version).
    Own,
}

fn keep_content(
    shared: &Shared,
    set: &SetRuntime,
    root: &Root,
    path: &SetPath,
    digest: &WireDigest,
    op: ChangeOp,
    capture: Capture,
    store: &mut StoreBatch,
) -> io::Result<Kept> {
    let want = digest.get();
    // A set that keeps hard links counts each file's names: another link
    // of ours would be one too many there.
    let linkable = set.mode == SyncMode::Mirror && capture == Capture::Written && !set.hard_links;
    if holds(shared, &want) {
        return Ok(Kept::Already);
    }
    let comps: Vec<&[u8]> = path.components().collect();
    let Some((file, meta)) = root.open_file(&comps).map_err(io::Error::other)? else {
        return Ok(Kept::NotHere);
    };
    if meta.len != want.len {
        return Ok(Kept::NotHere);
    }
    // A first version this node just wrote (a follower's first sync, or a
    // new file): a hard link costs no copy, and a later edit of the path is
    // stored as a delta against it. Appended files grow in place: never
    // linked.
    if linkable
        && (op == ChangeOp::Added || want.len > SMALL_OBJECT)
        && link_object(shared, &file, &want)?
    {
        return Ok(Kept::Stored {
            bytes: want.len,
            file: true,
        });
    }
    if want.len <= SMALL_OBJECT {
        let mut bytes = Vec::with_capacity(want.len as usize);
        (&file).take(want.len + 1).read_to_end(&mut bytes)?;
        if delta::digest(&bytes) != want {
            return Ok(Kept::NotHere);
        }
        let encoded = encode_small(shared, set, path, &bytes)?;
        let n = encoded.len() as u64;
        store.put_object(digest, &encoded);
        remember(shared, set, path, digest, bytes);
        return Ok(Kept::Stored {
            bytes: n,
            file: false,
        });
    }
    copy_object(shared, &file, &want).map(|kept| match kept {
        Some(bytes) => Kept::Stored { bytes, file: true },
        None => Kept::NotHere,
    })
}

/// Whether this node keeps content `want` already.
fn holds(shared: &Shared, want: &FileDigest) -> bool {
    // Linked by the writers of the batch being recorded: no lookup needed.
    shared.history_linked.lock().unwrap().remove(&want.hash)
        || shared.store.has_object(&WireDigest::new(want))
        || object_file(&shared.data_dir, want, false).exists()
        || object_file(&shared.data_dir, want, true).exists()
}

/// Links a first version a follower's writer is about to rename into its
/// tree (a finished staged file, on `data_dir`'s filesystem) in as the
/// object of `want`, before the rename: the writer threads do it side by
/// side, and the batch's record then finds it held. Nothing is lost if it
/// cannot be linked: the record keeps the version the usual way.
pub fn link_first_version(shared: &Shared, finished: &Path, want: &FileDigest) {
    let target = object_file(&shared.data_dir, want, false);
    let linked = match fs::hard_link(finished, &target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(objects_dir(&shared.data_dir))
                .and_then(|()| fs::hard_link(finished, &target))
        }
        other => other,
    };
    if linked.is_ok() {
        note_linked(shared, want);
    }
}

/// [`link_first_version`] for a version the applier wrote itself, still
/// under its temporary name: linked through its descriptor.
pub fn link_written(shared: &Shared, file: &fs::File, want: &FileDigest) {
    if let Ok(true) = link_object(shared, file, want) {
        note_linked(shared, want);
    }
}

/// The object of `want` was just linked in: its name is synced with the
/// page, and the batch's record knows it is held without looking.
fn note_linked(shared: &Shared, want: &FileDigest) {
    shared
        .history_objects_unsynced
        .store(true, std::sync::atomic::Ordering::Relaxed);
    shared.history_linked.lock().unwrap().insert(want.hash);
}

/// Links `file` in as the object of `want`; false where it cannot be
/// linked (another filesystem).
fn link_object(shared: &Shared, file: &fs::File, want: &FileDigest) -> io::Result<bool> {
    let target = object_file(&shared.data_dir, want, false);
    let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file));
    let link = || {
        rustix::fs::linkat(
            rustix::fs::CWD,
            proc_path.as_str(),
            rustix::fs::CWD,
            &target,
            rustix::fs::AtFlags::SYMLINK_FOLLOW,
        )
    };
    Ok(match link() {
        // Held already (the same content under another path).
        Ok(()) | Err(rustix::io::Errno::EXIST) => true,
        Err(rustix::io::Errno::NOENT) => {
            fs::create_dir_all(objects_dir(&shared.data_dir))?;
            link().is_ok()
        }
        Err(_) => false,
    })
}

/// A compressed copy of `file` as the object of `want`, hashed as it is
/// read and fsync'd: its size, or `None` when the file is not that version.
fn copy_object(shared: &Shared, file: &fs::File, want: &FileDigest) -> io::Result<Option<u64>> {
    let dir = objects_dir(&shared.data_dir);
    fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{}-{}.tmp", want.hex(), want.len));
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    let mut hasher = delta::FileHasher::new();
    let mut encoder = zstd::stream::Encoder::new(&mut out, LEVEL)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut input = file;
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        encoder.write_all(&buf[..n])?;
    }
    encoder.finish()?;
    if hasher.digest() != *want {
        let _ = fs::remove_file(&tmp);
        return Ok(None);
    }
    out.sync_all()?;
    let bytes = out.metadata()?.len();
    fs::rename(&tmp, object_file(&shared.data_dir, want, true))?;
    Ok(Some(bytes))
}

/// Most file versions one of the leader's own batches may bring for them
/// to be kept while it is applied; a larger batch (a bulk load, a first
/// sync) is kept after the burst, by [`capture_deferred`], so the leader's
/// apply (which paces its proposals) is not slowed by copying it.
const OWN_INLINE_FILES: usize = 8;

/// A version of the leader's own tree to keep once the node is idle.
#[derive(Debug, Clone)]
pub struct DeferredCapture {
    pub set: String,
    pub path: SetPath,
    pub digest: WireDigest,
}

/// Keeps deferred versions for at most `budget`: each file still holding
/// its version is copied (compressed) into the objects; one edited since
/// is not kept (the followers keep it). Returns whether any are left.
pub fn capture_deferred(
    shared: &Shared,
    roots: &std::collections::HashMap<String, Root>,
    budget: std::time::Duration,
) -> bool {
    let started = std::time::Instant::now();
    let mut copied = false;
    loop {
        if started.elapsed() >= budget {
            break;
        }
        let Some(d) = shared.history_deferred.lock().unwrap().pop_front() else {
            break;
        };
        let want = d.digest.get();
        if holds(shared, &want) {
            continue;
        }
        let Some(root) = roots.get(&d.set) else {
            continue;
        };
        let comps: Vec<&[u8]> = d.path.components().collect();
        let Ok(Some((file, meta))) = root.open_file(&comps) else {
            continue;
        };
        if meta.len != want.len {
            continue;
        }
        match copy_object(shared, &file, &want) {
            Ok(Some(_)) => copied = true,
            Ok(None) => {}
            Err(e) => {
                warn!(set = %d.set, path = %d.path, "cannot keep {} in the history: {e}", d.path)
            }
        }
    }
    if copied {
        let _ = fs::File::open(objects_dir(&shared.data_dir)).and_then(|d| d.sync_all());
    }
    !shared.history_deferred.lock().unwrap().is_empty()
}

/// How a small version is stored: whole, or as a delta against another.
const TAG_WHOLE: u8 = 0;
const TAG_DELTA: u8 = 1;
/// Most deltas in a row before a version is stored whole again: reading a
/// version decompresses at most this many others first.
const MAX_CHAIN: u8 = 64;
/// The last version of each path kept here, so the next one is compressed
/// against it without rebuilding it; cleared beyond this many bytes.
const RECENT_BYTES: usize = 16 << 20;

/// A small version as stored: `[TAG_WHOLE] zstd`, or, when it is smaller,
/// `[TAG_DELTA, depth, base digest (40 bytes)] zstd` compressed with the
/// path's previous kept version as its dictionary (an edit of one line of a
/// 100 KiB config costs tens of bytes instead of a compressed copy).
fn encode_small(
    shared: &Shared,
    set: &SetRuntime,
    path: &SetPath,
    bytes: &[u8],
) -> io::Result<Vec<u8>> {
    let mut whole = vec![TAG_WHOLE];
    whole.extend(zstd::bulk::compress(bytes, LEVEL)?);
    let Some((base, base_bytes, depth)) = previous_small(shared, set, path) else {
        return Ok(whole);
    };
    if depth >= MAX_CHAIN {
        return Ok(whole);
    }
    let mut delta = vec![TAG_DELTA, depth + 1];
    delta.extend_from_slice(&base.0);
    let mut compressor = zstd::bulk::Compressor::with_dictionary(LEVEL, &base_bytes)?;
    delta.extend(compressor.compress(bytes)?);
    Ok(if delta.len() < whole.len() {
        delta
    } else {
        whole
    })
}

/// The last kept small version of `path`: its digest, content and how many
/// deltas it lies from a whole one.
fn previous_small(
    shared: &Shared,
    set: &SetRuntime,
    path: &SetPath,
) -> Option<(WireDigest, Vec<u8>, u8)> {
    let (_, version) = shared.store.version_at(&set.name, path, u64::MAX).ok()??;
    let digest = version.entry?.digest?;
    // A base kept as a file (a linked first version) starts a chain.
    let depth = match shared.store.object(&digest).ok()? {
        Some(stored) if stored.first() == Some(&TAG_DELTA) => *stored.get(1)?,
        Some(_) => 0,
        None if holds(shared, &digest.get()) => 0,
        None => return None,
    };
    let key = (set.name.clone(), path.clone());
    let cached = shared
        .history_recent
        .lock()
        .unwrap()
        .get(&key)
        .filter(|(d, _)| *d == digest)
        .map(|(_, b)| b.clone());
    let bytes = match cached {
        Some(b) => b,
        None => kept_bytes(shared, &digest, 0).ok()?,
    };
    Some((digest, bytes, depth))
}

/// Keeps `bytes` as the last version of `path` for the next delta.
fn remember(
    shared: &Shared,
    set: &SetRuntime,
    path: &SetPath,
    digest: &WireDigest,
    bytes: Vec<u8>,
) {
    let mut recent = shared.history_recent.lock().unwrap();
    let held: usize = recent.values().map(|(_, b)| b.len()).sum();
    if held + bytes.len() > RECENT_BYTES {
        recent.clear();
    }
    recent.insert((set.name.clone(), path.clone()), (*digest, bytes));
}

/// A small version's content, rebuilt through its chain of deltas and
/// checked against its digest at every step.
fn decode_small(shared: &Shared, digest: &WireDigest, hops: u8) -> io::Result<Vec<u8>> {
    let bad = |why: &str| io::Error::other(format!("kept version {}: {why}", digest.get().hex()));
    let stored = shared
        .store
        .object(digest)
        .map_err(io::Error::other)?
        .ok_or_else(|| bad("not kept"))?;
    let want = digest.get();
    let bytes = match stored.split_first() {
        Some((&TAG_WHOLE, frame)) => zstd::bulk::decompress(frame, want.len as usize)?,
        Some((&TAG_DELTA, rest))
            if rest.len() > 1 + FileDigest::ENCODED_LEN && hops < MAX_CHAIN =>
        {
            let base = WireDigest(
                rest[1..1 + FileDigest::ENCODED_LEN]
                    .try_into()
                    .expect("digest length"),
            );
            let base_bytes = kept_bytes(shared, &base, hops + 1)?;
            let mut d = zstd::bulk::Decompressor::with_dictionary(&base_bytes)?;
            d.decompress(&rest[1 + FileDigest::ENCODED_LEN..], want.len as usize)?
        }
        _ => return Err(bad("unknown format or too long a chain")),
    };
    if delta::digest(&bytes) != want {
        return Err(bad("does not hash to its name"));
    }
    Ok(bytes)
}

/// Kept content `digest`, from the files store or an object file, checked
/// against its digest.
fn kept_bytes(shared: &Shared, digest: &WireDigest, hops: u8) -> io::Result<Vec<u8>> {
    if shared.store.has_object(digest) {
        return decode_small(shared, digest, hops);
    }
    let want = digest.get();
    let bytes = match fs::File::open(object_file(&shared.data_dir, &want, true)) {
        Ok(f) => zstd::stream::decode_all(f)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::read(object_file(&shared.data_dir, &want, false))?
        }
        Err(e) => return Err(e),
    };
    if delta::digest(&bytes) != want {
        return Err(io::Error::other(format!(
            "kept version {} does not hash to its name",
            want.hex()
        )));
    }
    Ok(bytes)
}

/// The version a stored small version is a delta against, if it is one.
fn delta_base(shared: &Shared, digest: &WireDigest) -> Option<WireDigest> {
    let stored = shared.store.object(digest).ok()??;
    match stored.split_first() {
        Some((&TAG_DELTA, rest)) if rest.len() > 1 + FileDigest::ENCODED_LEN => Some(WireDigest(
            rest[1..1 + FileDigest::ENCODED_LEN].try_into().ok()?,
        )),
        _ => None,
    }
}

/// The content of `path`'s version at `rev` (digest `digest`), checked
/// against its digest.
pub fn content(
    shared: &Shared,
    path: &SetPath,
    rev: u64,
    digest: &WireDigest,
) -> Result<Vec<u8>, HistoryError> {
    let want = digest.get();
    if !holds(shared, &want) {
        return Err(HistoryError::NotKept {
            node: shared.node_id,
            path: path.clone(),
            rev,
        });
    }
    kept_bytes(shared, digest, 0).map_err(|e| {
        warn!(path = %path, rev, "the kept content of {path} at revision {rev} cannot be served: {e}");
        HistoryError::Damaged {
            path: path.clone(),
            rev,
            digest: want.hex(),
        }
    })
}

/// Drops what retention no longer keeps, set by set: revisions older than
/// `keep` or beyond `keep_bytes` (oldest first), the versions only they
/// needed (each path keeps its last version before the oldest kept
/// revision: the state that revision starts from), and content no kept
/// version names. Runs on the applier's thread, between applies.
pub fn prune(shared: &Shared, config: &HistoryConfig) -> Result<(), HistoryError> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut batch = StoreBatch::default();
    let mut dropped_revisions = 0usize;
    let mut named: BTreeSet<[u8; FileDigest::ENCODED_LEN]> = BTreeSet::new();
    for set in &shared.sets {
        let weights = shared.store.revision_weights(&set.name)?;
        let cut = if set.history {
            drop_through(
                &weights,
                now_ms,
                config.keep.as_millis() as u64,
                config.keep_bytes,
            )
        } else {
            // History turned off: what was kept goes.
            weights.last().map(|(rev, _, _)| *rev)
        };
        if let Some(cut) = cut {
            for (rev, _, _) in weights.iter().take_while(|(rev, _, _)| *rev <= cut) {
                batch.delete_revision(&set.name, *rev);
                dropped_revisions += 1;
            }
        }
        // Per path (versions come in path, then revision order): of the
        // versions at or before the cut only the last stays, the state the
        // oldest kept revision starts from, unless it is a deletion (or
        // history is off).
        let mut at_cut: Option<(SetPath, u64, Version)> = None;
        let settle = |last: Option<(SetPath, u64, Version)>,
                      batch: &mut StoreBatch,
                      named: &mut BTreeSet<[u8; FileDigest::ENCODED_LEN]>| {
            let Some((path, rev, v)) = last else { return };
            match v.entry.as_ref() {
                Some(e) if set.history => {
                    if let Some(d) = e.digest {
                        named.insert(d.0);
                    }
                }
                _ => batch.delete_version(&set.name, &path, rev),
            }
        };
        shared.store.versions_of_set(&set.name, |path, rev, v| {
            if at_cut.as_ref().is_some_and(|(p, _, _)| *p != path) {
                settle(at_cut.take(), &mut batch, &mut named);
            }
            if cut.is_some_and(|c| rev <= c) {
                if let Some((p, r, _)) = at_cut.take() {
                    batch.delete_version(&set.name, &p, r);
                }
                at_cut = Some((path, rev, v));
            } else {
                settle(at_cut.take(), &mut batch, &mut named);
                if let Some(d) = v.entry.as_ref().and_then(|e| e.digest) {
                    named.insert(d.0);
                }
            }
        })?;
        settle(at_cut.take(), &mut batch, &mut named);
    }
    // The versions kept ones are deltas against stay too.
    let mut work: Vec<WireDigest> = named.iter().map(|d| WireDigest(*d)).collect();
    while let Some(d) = work.pop() {
        if let Some(base) = delta_base(shared, &d) {
            if named.insert(base.0) {
                work.push(base);
            }
        }
    }
    // Content no kept version names (also of sets no longer configured).
    let mut dropped_objects = 0usize;
    shared.store.objects(|digest, _| {
        if !named.contains(&digest.0) {
            batch.delete_object(&digest);
            dropped_objects += 1;
        }
    })?;
    if batch.is_empty() {
        return Ok(());
    }
    shared.store.write(batch)?;
    let dir = objects_dir(&shared.data_dir);
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let keep = object_digest(&name).is_some_and(|d| named.contains(&d.to_bytes()));
            if !keep {
                let _ = fs::remove_file(e.path());
                dropped_objects += 1;
            }
        }
    }
    info!(
        revisions = dropped_revisions,
        objects = dropped_objects,
        "history: dropped what retention no longer keeps"
    );
    Ok(())
}

/// The path of `set` an administrator named: relative to the set's root
/// (`tac_plus.conf`, `maps/virtual`), or absolute under it.
pub fn resolve_path(set: &SetRuntime, text: &str) -> Result<SetPath, HistoryError> {
    let bad = |why: &str| HistoryError::BadPath {
        set: set.name.clone(),
        path: text.to_string(),
        why: why.to_string(),
    };
    let given = Path::new(text);
    let relative: PathBuf = if given.is_absolute() {
        given
            .strip_prefix(&set.root_dir)
            .map_err(|_| {
                bad(&format!(
                    "it is not under the set's path {}",
                    set.path.display()
                ))
            })?
            .to_path_buf()
    } else {
        given.to_path_buf()
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(relative.as_os_str());
    let bytes = bytes.strip_suffix(b"/").unwrap_or(bytes);
    SetPath::from_network(bytes).map_err(|e| bad(&e.to_string()))
}

/// What `clusterctl history` lists: revisions of `set` newest first (at
/// most `limit`; those in `(after, up_to]` when given), only those that
/// changed `path` or something below it when given; and the oldest
/// revision kept.
pub fn list(
    shared: &Shared,
    set: &str,
    path: Option<&SetPath>,
    limit: usize,
    after: Option<u64>,
    up_to: Option<u64>,
) -> Result<(Vec<(u64, Revision)>, Option<u64>), HistoryError> {
    let runtime = kept_set(shared, set)?;
    let mut out = Vec::new();
    shared.store.revisions(
        &runtime.name,
        up_to.map(|r| r.saturating_add(1)),
        |rev, mut r| {
            if after.is_some_and(|a| rev <= a) {
                return false;
            }
            if let Some(p) = path {
                r.changes
                    .retain(|c| c.path == *p || p.is_ancestor_of(&c.path));
                if r.changes.is_empty() {
                    return true;
                }
            }
            out.push((rev, r));
            out.len() < limit
        },
    )?;
    Ok((out, oldest(shared, set)?))
}

/// The oldest revision kept: one seek, not a pass over the revisions
/// (`diff` asks twice per path).
fn oldest(shared: &Shared, set: &str) -> Result<Option<u64>, HistoryError> {
    Ok(shared.store.first_revision(set)?)
}

pub(crate) fn kept_set<'s>(shared: &'s Shared, set: &str) -> Result<&'s SetRuntime, HistoryError> {
    let runtime = shared
        .set(set)
        .ok_or_else(|| HistoryError::UnknownSet(set.to_string()))?;
    if !runtime.history {
        return Err(HistoryError::Off(set.to_string()));
    }
    Ok(runtime)
}

/// The state of `path` of `set` at revision `rev`, with a file's content
/// when `with_content`.
pub fn version(
    shared: &Shared,
    set: &str,
    path: &SetPath,
    rev: u64,
    with_content: bool,
) -> Result<At, HistoryError> {
    let runtime = kept_set(shared, set)?;
    let oldest = check_revision(shared, set, rev)?;
    let (changed_at, entry) = match shared.store.version_at(&runtime.name, path, rev)? {
        Some((at, v)) => (Some(at), v.entry),
        None => {
            // No version at or before `rev`: the path did not exist then if
            // its first later version adds it; it was as it is now if it
            // never changed since; otherwise its state then is older than
            // what is kept.
            match shared.store.version_at(&runtime.name, path, u64::MAX)? {
                None => (None, shared.committed_entry(set, path)),
                Some(_) => {
                    if first_op_after(shared, &runtime.name, path, rev)? == Some(ChangeOp::Added) {
                        (None, None)
                    } else {
                        return Err(HistoryError::Predates {
                            path: path.clone(),
                            rev,
                            oldest,
                        });
                    }
                }
            }
        }
    };
    let content = match (&entry, with_content) {
        (Some(e), true) if is_file(e) => {
            let digest = e.digest.expect("a file entry has a digest");
            Some(content_or_live(
                shared,
                runtime,
                path,
                changed_at.unwrap_or(rev),
                &digest,
            )?)
        }
        _ => None,
    };
    Ok(At {
        changed_at,
        entry,
        content,
    })
}

/// Refuses a revision this node cannot answer for: not applied here yet,
/// or older than the history kept. Returns the oldest revision kept.
pub(crate) fn check_revision(shared: &Shared, set: &str, rev: u64) -> Result<u64, HistoryError> {
    let applied = shared.applied.load(std::sync::atomic::Ordering::SeqCst);
    if rev > applied {
        return Err(HistoryError::NotCommitted { rev, applied });
    }
    let Some(oldest) = oldest(shared, set)? else {
        return Err(HistoryError::Empty(set.to_string()));
    };
    if rev < oldest {
        return Err(HistoryError::TooOld {
            set: set.to_string(),
            rev,
            oldest,
        });
    }
    Ok(oldest)
}

/// The first version of `path` after `rev`.
fn first_op_after(
    shared: &Shared,
    set: &str,
    path: &SetPath,
    rev: u64,
) -> Result<Option<ChangeOp>, HistoryError> {
    let mut first = None;
    let mut probe = u64::MAX;
    // Versions are few per path: walk back from the newest.
    while let Some((at, v)) = shared.store.version_at(set, path, probe)? {
        if at <= rev {
            break;
        }
        first = Some(v.op);
        if at == 0 {
            break;
        }
        probe = at - 1;
    }
    Ok(first)
}

/// Kept content, or the live file's when it is that version still (a
/// version this node fetched after it applied the revision).
pub(crate) fn content_or_live(
    shared: &Shared,
    set: &SetRuntime,
    path: &SetPath,
    rev: u64,
    digest: &WireDigest,
) -> Result<Vec<u8>, HistoryError> {
    match content(shared, path, rev, digest) {
        Err(HistoryError::NotKept { .. }) => {
            let live = fs::read(path.to_local(&set.root_dir)).ok();
            match live {
                Some(bytes) if delta::digest(&bytes) == digest.get() => Ok(bytes),
                _ => Err(HistoryError::NotKept {
                    node: shared.node_id,
                    path: path.clone(),
                    rev,
                }),
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::{EntryKind, Meta};
    use crate::replication::apply::tests::node_one_of_three;
    use crate::replication::shared::open_shared;

    fn entry_of(content: &[u8]) -> Entry {
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
            digest: Some(WireDigest::new(&delta::digest(content))),
            target: None,
            xattrs: Default::default(),
            link: None,
        }
    }

    fn p(s: &str) -> SetPath {
        SetPath::from_network(s.as_bytes()).unwrap()
    }

    /// Records revision `rev` of "mail": `path` now holds `content` (written
    /// to the tree first), at `time_ms`; returns the batch, not yet written.
    fn put(
        shared: &Shared,
        root: &Root,
        rev: u64,
        path: &str,
        before: Option<&[u8]>,
        content: &[u8],
        time_ms: u64,
    ) -> StoreBatch {
        put_by(shared, root, 1, rev, path, before, content, time_ms)
    }

    /// [`put`] as proposed by node `leader` (1 is this node: its own tree;
    /// another: this node wrote the file, as a follower does).
    #[allow(clippy::too_many_arguments)]
    fn put_by(
        shared: &Shared,
        root: &Root,
        leader: u64,
        rev: u64,
        path: &str,
        before: Option<&[u8]>,
        content: &[u8],
        time_ms: u64,
    ) -> StoreBatch {
        let set = shared.set("mail").unwrap();
        std::fs::write(p(path).to_local(&set.root_dir), content).unwrap();
        let mut store = StoreBatch::default();
        let before: Before = before.map(|b| (p(path), entry_of(b))).into_iter().collect();
        let after = [(p(path), Some(entry_of(content)))].into_iter().collect();
        Recorder::record(
            shared,
            set,
            Some(root),
            rev,
            1,
            leader,
            time_ms,
            false,
            &before,
            &after,
            &mut store,
        );
        store
    }

    fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    #[test]
    fn content_is_kept_once_per_digest_and_served_only_when_it_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let shared = open_shared(&node_one_of_three(dir.path())).unwrap();
        let root = shared.set("mail").unwrap().open_root().unwrap();
        let x = b"user = alice\n".repeat(50);
        shared
            .store
            .write(put(&shared, &root, 5, "a", None, &x, now_ms()))
            .unwrap();
        shared
            .store
            .write(put(&shared, &root, 6, "b", None, &x, now_ms()))
            .unwrap();
        let (revs, oldest) = list(&shared, "mail", None, 10, None, None).unwrap();
        assert_eq!(oldest, Some(5));
        assert_eq!(revs.len(), 2);
        assert_eq!(revs[0].0, 6, "newest first");
        assert!(
            revs[1].1.stored_bytes > 0 && revs[1].1.stored_bytes < x.len() as u64,
            "compressed"
        );
        assert_eq!(revs[0].1.stored_bytes, 0, "the same content is kept once");
        let d = WireDigest::new(&delta::digest(&x));
        assert_eq!(content(&shared, &p("b"), 6, &d).unwrap(), x);
        // Damaged: it no longer hashes to its name; never served.
        let mut bad = StoreBatch::default();
        bad.put_object(&d, &zstd::bulk::compress(b"not it", 3).unwrap());
        shared.store.write(bad).unwrap();
        assert!(matches!(
            content(&shared, &p("b"), 6, &d),
            Err(HistoryError::Damaged { .. })
        ));
        // A path's state at a revision, and bad revisions.
        shared.applied.store(6, std::sync::atomic::Ordering::SeqCst);
        let at = version(&shared, "mail", &p("a"), 6, false).unwrap();
        assert_eq!((at.changed_at, at.entry.is_some()), (Some(5), true));
        let absent = version(&shared, "mail", &p("b"), 5, false).unwrap();
        assert!(absent.entry.is_none(), "b was added after 5");
        assert!(matches!(
            version(&shared, "mail", &p("a"), 4, false),
            Err(HistoryError::TooOld { oldest: 5, .. })
        ));
        assert!(matches!(
            version(&shared, "mail", &p("a"), 7, false),
            Err(HistoryError::NotCommitted { .. })
        ));
    }

    #[test]
    fn large_content_is_linked_and_an_edit_in_place_shows_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        let shared = open_shared(&node_one_of_three(dir.path())).unwrap();
        let root = shared.set("mail").unwrap().open_root().unwrap();
        let big: Vec<u8> = (0..(SMALL_OBJECT as usize + 10))
            .map(|i| (i % 251) as u8)
            .collect();
        // As a follower keeps what it wrote.
        shared
            .store
            .write(put_by(&shared, &root, 2, 5, "big", None, &big, now_ms()))
            .unwrap();
        let d = WireDigest::new(&delta::digest(&big));
        let file = object_file(&shared.data_dir, &d.get(), false);
        assert!(file.exists(), "linked, not copied");
        assert_eq!(content(&shared, &p("big"), 5, &d).unwrap(), big);
        // The next version replaces the file: the kept inode is untouched.
        let mut next = big.clone();
        next[0] ^= 1;
        let live = p("big").to_local(&shared.set("mail").unwrap().root_dir);
        let tmp = live.with_extension("tmp");
        std::fs::write(&tmp, &next).unwrap();
        std::fs::rename(&tmp, &live).unwrap();
        assert_eq!(content(&shared, &p("big"), 5, &d).unwrap(), big);
        // Written in place (what clusterd never does, an editor may):
        // detected, not served.
        std::fs::write(&file, &next).unwrap();
        assert!(matches!(
            content(&shared, &p("big"), 5, &d),
            Err(HistoryError::Damaged { .. })
        ));
    }

    #[test]
    fn retention_keeps_the_state_at_the_oldest_kept_revision_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let shared = open_shared(&node_one_of_three(dir.path())).unwrap();
        let root = shared.set("mail").unwrap().open_root().unwrap();
        let (x, y, z) = (b"x".repeat(100), b"y".repeat(100), b"z".repeat(100));
        shared
            .store
            .write(put(&shared, &root, 5, "a", None, &x, 1_000))
            .unwrap();
        shared
            .store
            .write(put(&shared, &root, 6, "a", Some(&x), &y, 2_000))
            .unwrap();
        shared
            .store
            .write(put(&shared, &root, 7, "b", None, &z, now_ms()))
            .unwrap();
        // A large version whose batch never got written (a crash between
        // its object and the store): an orphan retention removes.
        let big = vec![9u8; SMALL_OBJECT as usize + 1];
        drop(put(&shared, &root, 8, "big", None, &big, now_ms()));
        let orphan = object_file(&shared.data_dir, &delta::digest(&big), true);
        assert!(
            orphan.exists(),
            "the leader's own large version: a compressed copy"
        );
        let keep = HistoryConfig {
            keep: std::time::Duration::from_secs(86_400),
            keep_bytes: 1 << 30,
        };
        prune(&shared, &keep).unwrap();
        let (revs, oldest) = list(&shared, "mail", None, 10, None, None).unwrap();
        assert_eq!(revs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![7]);
        assert_eq!(oldest, Some(7));
        // a's state at the cut (6) stays; its version at 5 and x go.
        assert!(shared
            .store
            .version_at("mail", &p("a"), 5)
            .unwrap()
            .is_none());
        assert_eq!(
            shared
                .store
                .version_at("mail", &p("a"), 7)
                .unwrap()
                .map(|v| v.0),
            Some(6)
        );
        assert!(!shared
            .store
            .has_object(&WireDigest::new(&delta::digest(&x))));
        assert!(shared
            .store
            .has_object(&WireDigest::new(&delta::digest(&y))));
        assert!(shared
            .store
            .has_object(&WireDigest::new(&delta::digest(&z))));
        assert!(!orphan.exists(), "the orphan is gone");
        shared.applied.store(7, std::sync::atomic::Ordering::SeqCst);
        let at = version(&shared, "mail", &p("a"), 7, true).unwrap();
        assert_eq!(at.content.as_deref(), Some(&y[..]));
        // By weight: one byte kept leaves only the newest revision.
        let tight = HistoryConfig {
            keep_bytes: 1,
            ..keep
        };
        shared
            .store
            .write(put(&shared, &root, 9, "b", Some(&z), &x, now_ms()))
            .unwrap();
        prune(&shared, &tight).unwrap();
        let (revs, _) = list(&shared, "mail", None, 10, None, None).unwrap();
        assert_eq!(revs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![9]);
    }

    #[test]
    fn edits_of_a_large_config_are_kept_as_small_deltas_that_outlive_retention() {
        // On the leader (its own tree) and on a follower (whose first
        // version is a hard link the deltas start from).
        for leader in [1, 2] {
            deltas_outlive_retention(leader);
        }
    }

    fn deltas_outlive_retention(leader: u64) {
        let dir = tempfile::tempdir().unwrap();
        let shared = open_shared(&node_one_of_three(dir.path())).unwrap();
        let root = shared.set("mail").unwrap().open_root().unwrap();
        let mut rng = 12345u64;
        let mut lines: Vec<String> = (0..1500)
            .map(|i| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                format!("user = u{i} {{ login = des \"{:016x}\" }}\n", rng)
            })
            .collect();
        let mut versions = Vec::new();
        let mut prev: Option<Vec<u8>> = None;
        for rev in 1..=100u64 {
            let at = (rev as usize * 37) % lines.len();
            lines[at] = format!("# edit {rev}\n");
            let content = lines.concat().into_bytes();
            let time = if rev <= 50 { 1_000 + rev } else { now_ms() };
            shared
                .store
                .write(put(
                    &shared,
                    &root,
                    rev,
                    "conf",
                    prev.as_deref(),
                    &content,
                    time,
                ))
                .unwrap();
            versions.push(content.clone());
            prev = Some(content);
        }
        let (revs, _) = list(&shared, "mail", None, 1000, None, None).unwrap();
        let stored: u64 = revs.iter().map(|(_, r)| r.stored_bytes).sum();
        // A linked first version counts whole.
        let whole = if leader == 1 {
            zstd::bulk::compress(&versions[0], LEVEL).unwrap().len() as u64
        } else {
            versions[0].len() as u64
        };
        assert!(versions[0].len() > 60_000, "{}", versions[0].len());
        // Two whole versions (the first, and one after MAX_CHAIN deltas),
        // the rest deltas of a few dozen bytes.
        assert!(
            stored < 3 * whole,
            "{stored} bytes for 100 versions; one whole is {whole}"
        );
        for (i, v) in versions.iter().enumerate() {
            let d = WireDigest::new(&delta::digest(v));
            assert_eq!(
                &content(&shared, &p("conf"), i as u64 + 1, &d).unwrap(),
                v,
                "version {}",
                i + 1
            );
        }
        // Retention drops revisions 1..=50: the later ones still read back,
        // through the bases they are deltas against.
        prune(
            &shared,
            &HistoryConfig {
                keep: std::time::Duration::from_secs(86_400),
                keep_bytes: 1 << 30,
            },
        )
        .unwrap();
        let (revs, _) = list(&shared, "mail", None, 1000, None, None).unwrap();
        assert_eq!(revs.len(), 50);
        for (i, v) in versions.iter().enumerate().skip(49) {
            let d = WireDigest::new(&delta::digest(v));
            assert_eq!(
                &content(&shared, &p("conf"), i as u64 + 1, &d).unwrap(),
                v,
                "version {}",
                i + 1
            );
        }
    }
}
