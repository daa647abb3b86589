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
//! * Every write goes through [`crate::fsroot::Root`] with the path checked
//!   by [`crate::manifest`] first (invariant 3), atomically and verified
//!   (invariant 2).
//! * A local file that differs from what this node last wrote and from the
//!   committed version is moved to `data_dir/quarantine` before anything
//!   replaces or deletes it (invariant 4).
//! * A change that cannot be applied from the log (a delta whose base this
//!   node lacks, a skipped set, a failed write) leaves the path "missing":
//!   its committed content is fetched from a peer later, never guessed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use raft::Storage;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, info, warn};

use crate::config::{Config, NodeId, SyncMode, SyncSetConfig};
use crate::delta::{self, FileDigest, FileHasher, Patch};
use crate::files_store::{FilesStore, FilesStoreError, LocalRecord, StoreBatch};
use crate::fsroot::{Expect, FileMeta, FsError, Kind, Root};
use crate::manifest::{
    CheckedOp, Content, Entry, EntryKind, FileBatch, FileOp, Manifest, Meta, OwnerName, WireDigest,
};
use crate::paths::{Filter, SetPath};
use crate::raft_core::{Command, CoreError};
use crate::storage::RaftStore;

/// Largest page of committed entries read back from the log at once.
const APPLY_PAGE_BYTES: u64 = 64 << 20;
/// Threads writing the files of one batch on a follower.
const WRITERS: usize = 8;
/// How [`Shared::stage_piece`] flushes what it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageFlush {
    /// Not at all: a `Chunk` from the log, which is itself the durable copy.
    None,
    /// This piece (the `Stage` RPC): one fsync of a whole 1 GiB upload at
    /// the end held this node's Raft log writes (and with them its
    /// heartbeat answers) behind it for seconds, long enough for an
    /// election.
    Piece,
    /// The whole upload and the staging directory: the last piece, after
    /// which the caller may report the upload held.
    Upload,
}

/// A file version whose patch a staged upload holds, as the leader lists it
/// in the upload's last piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedVersion {
    /// Where its patch starts in the upload.
    pub offset: u64,
    /// The patch's length.
    pub len: u64,
    /// The content the patch makes.
    pub digest: FileDigest,
    /// The version's metadata, given to the finished file ahead of its
    /// fsync when this node can set it.
    pub meta: Option<Meta>,
}

/// Uploads larger than this (a batch holding one large file) are flushed
/// piece by piece as they arrive and not made into finished files: left
/// unflushed, a 1 GiB upload's write-back held the shared disk long enough
/// for the leader to miss its heartbeats (measured: an election in the
/// append benchmark), and rebuilding it would hold all of it in memory at
/// once. Its content is written twice on the follower, as before.
const FINISH_UPLOAD_MAX: u64 = 64 << 20;
/// Versions waiting for [`Applier::sign_linked`] at most: past it (a
/// sync of millions of files) the rest go unsigned, and their next change
/// travels whole should this node lead.
const UNSIGNED_MAX: usize = 1 << 17;
/// Manifest entries [`Applier::reconcile_local`] copies out at a time.
const RECONCILE_SLICE: usize = 1024;
/// Time [`Applier::sign_linked`] takes of each idle applier tick (one a
/// second).
const SIGN_BUDGET: Duration = Duration::from_millis(250);
/// Threads fsyncing one upload's finished files.
const FSYNC_THREADS: usize = 4;
/// Finished files larger than this are flushed every [`FINISH_FLUSH_STEP`]
/// bytes as they are written, for the reason [`StageFlush::Piece`] gives.
const FINISH_FLUSH_STEP: usize = 4 << 20;

/// Most bytes of pieces held in memory at once, over all uploads (see
/// [`Shared::stage_before_finish`]): twice what a leader stages at once
/// (`source::STAGING_BYTES`), so a slow upload does not push the next ones
/// out to disk.
const HELD_BYTES_MAX: usize = 128 << 20;
/// A held upload that got no piece for this long was abandoned (its leader
/// died or gave up on it, `source::STAGE_TIMEOUT` per piece): its memory is
/// freed; a last piece arriving after that finds it incomplete.
const HELD_MAX_IDLE: Duration = Duration::from_secs(60);

/// The pieces of uploads held in memory until their last piece.
#[derive(Default)]
struct HeldUploads {
    uploads: HashMap<u64, HeldUpload>,
    /// Bytes of every piece held.
    bytes: usize,
}

/// One upload's pieces, by offset.
struct HeldUpload {
    pieces: BTreeMap<u64, prost::bytes::Bytes>,
    last_piece: Instant,
}

impl HeldUploads {
    /// Takes upload `upload`'s pieces out.
    fn take(&mut self, upload: u64) -> Option<HeldUpload> {
        let held = self.uploads.remove(&upload)?;
        self.bytes -= held.len_held();
        Some(held)
    }
}

impl HeldUpload {
    fn len_held(&self) -> usize {
        self.pieces.values().map(|p| p.len()).sum()
    }
}

/// A staged upload's bytes as [`Shared::finish_upload`] reads them: its
/// pieces held in memory, or its file.
enum UploadBytes {
    Held(BTreeMap<u64, prost::bytes::Bytes>),
    File(std::fs::File),
}

impl UploadBytes {
    /// The upload's length; for held pieces, refuses a gap (this node
    /// restarted, or dropped the upload as abandoned, while it arrived).
    fn len(&self, upload: u64) -> Result<u64, String> {
        match self {
            UploadBytes::File(f) => f.metadata().map(|m| m.len()).map_err(|e| e.to_string()),
            UploadBytes::Held(pieces) => {
                let mut end = 0u64;
                for (&offset, piece) in pieces {
                    if offset != end {
                        return Err(format!(
                            "staged upload {upload:016x} lacks bytes {end}..{offset} (its pieces overlap or arrived out of order); the leader sends the batch through the log instead"
                        ));
                    }
                    end += piece.len() as u64;
                }
                Ok(end)
            }
        }
    }

    /// Bytes `offset..offset + len`, which the caller checked lie inside
    /// [`len`](Self::len): borrowed when one held piece has them all.
    fn read(&self, offset: u64, len: u64) -> std::io::Result<std::borrow::Cow<'_, [u8]>> {
        let end = offset + len;
        match self {
            UploadBytes::File(f) => {
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, offset)?;
                Ok(buf.into())
            }
            UploadBytes::Held(pieces) => {
                let first = pieces.range(..=offset).next_back().map_or(0, |(&at, _)| at);
                let mut out = Vec::new();
                for (&at, piece) in pieces.range(first..end) {
                    let piece_end = at + piece.len() as u64;
                    let from = offset.saturating_sub(at) as usize;
                    let to = (end.min(piece_end) - at) as usize;
                    if at <= offset && piece_end >= end {
                        return Ok(piece[from..to].into());
                    }
                    out.extend_from_slice(&piece[from..to]);
                }
                if out.len() as u64 != len {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                Ok(out.into())
            }
        }
    }
}

/// Staged uploads no applied batch consumed (the leader that staged them
/// died before proposing, the batch was never committed) are removed after
/// this.
const STAGING_MAX_AGE: Duration = Duration::from_secs(3600);

/// One configured sync set, ready to use.
#[derive(Debug, Clone)]
pub struct SetRuntime {
    pub name: String,
    /// The configured path (a directory, or a single file).
    pub path: PathBuf,
    /// The directory a [`Root`] is opened on: `path` itself, or its parent
    /// for a single-file set.
    pub root_dir: PathBuf,
    /// `Some(file name)` for a single-file set.
    pub single_file: Option<SetPath>,
    pub mode: SyncMode,
    pub filter: Filter,
    pub max_file_size: u64,
    pub on_change: Option<String>,
    /// Replicate extended attributes and POSIX ACLs (`xattrs = true`).
    pub xattrs: bool,
    /// Keep hard links between names of the set (`hard_links = true`).
    pub hard_links: bool,
}

impl SetRuntime {
    pub fn from_config(c: &SyncSetConfig) -> SetRuntime {
        let filter = Filter::new(&c.exclude, &c.skip_while)
            .expect("patterns were validated with the config");
        let single_file = c.single_file.then(|| {
            let name = c
                .path
                .file_name()
                .expect("validated: a single-file set path has a file name");
            SetPath::from_network(std::os::unix::ffi::OsStrExt::as_bytes(name))
                .expect("validated file name")
        });
        let root_dir = if single_file.is_some() {
            c.path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("/"))
        } else {
            c.path.clone()
        };
        SetRuntime {
            name: c.name.clone(),
            path: c.path.clone(),
            root_dir,
            single_file,
            mode: c.mode,
            filter,
            max_file_size: c.max_file_size,
            on_change: c.on_change.clone(),
            xattrs: c.xattrs,
            hard_links: c.hard_links,
        }
    }

    /// Whether a node keeps the block signature of a `len`-byte version of a
    /// file of this set, to plan the next change as a delta: mirror sets
    /// only (append sets ship the new bytes), and not small files, which
    /// travel whole.
    pub fn keeps_signature(&self, len: u64) -> bool {
        self.mode == SyncMode::Mirror && len >= delta::SMALL_FILE_LEN as u64
    }

    /// Opens the root, creating a missing set directory (it is a configured
    /// sync path, so clusterd may write it).
    pub fn open_root(&self) -> Result<Root, FsError> {
        if self.single_file.is_none() && !self.root_dir.exists() {
            let _ = std::fs::create_dir_all(&self.root_dir);
        }
        Root::open(&self.root_dir)
    }

    /// Whether `path` belongs to the set: not excluded, and for a
    /// single-file set, the file itself.
    pub fn holds(&self, path: &SetPath, is_dir: bool) -> bool {
        match &self.single_file {
            Some(name) => path == name,
            None => !self.filter.is_excluded(path, is_dir),
        }
    }
}

/// Per-set health shown by `clusterctl status`.
#[derive(Debug, Clone, Default)]
pub struct SetHealth {
    pub last_error: Option<String>,
    /// Entries refused by the path policy or as malformed.
    pub refused: u64,
    /// The set waits for a `skip_while` marker to disappear.
    pub skipping: bool,
}

/// Node-wide counters (metrics and status).
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes of file commands this node proposed as leader.
    pub bytes_proposed: AtomicU64,
    /// File bytes those commands stood for, minus their size.
    pub bytes_saved: AtomicU64,
    /// Patch bytes received by fetching (catch-up outside the log).
    pub bytes_fetched: AtomicU64,
    /// Records in `data_dir/quarantine/records.jsonl`.
    pub quarantined: AtomicU64,
    pub on_change_failures: AtomicU64,
    /// on_promote/on_demote runs that failed, timed out or could not start.
    pub role_hook_failures: AtomicU64,
    /// New versions put in place by linking the finished file staged for
    /// them (see [`Shared::finish_upload`]) rather than by writing them.
    pub files_linked: AtomicU64,
}

/// State shared by the applier thread, the leader's source and the fetcher.
pub struct Shared {
    pub node_id: NodeId,
    pub witness: bool,
    /// Peers that are witnesses: they hold no files, so they are never
    /// served any (a witness host, often the monitoring server, must not be
    /// able to read /etc/shadow through clusterd).
    pub witness_peers: BTreeSet<NodeId>,
    /// The other data nodes (voters that hold sync sets).
    pub data_peers: BTreeSet<NodeId>,
    /// Missing paths whose committed version every other data node said it
    /// does not hold either (value: that digest): the version is gone from
    /// every tree (each node's copy was edited before it arrived), so a
    /// leader proposes its own copy rather than freeze the path forever;
    /// followers set their differing copies aside as usual.
    pub unobtainable: Mutex<HashMap<(String, SetPath), FileDigest>>,
    pub sets: Vec<SetRuntime>,
    pub manifest: RwLock<Manifest>,
    pub missing: Mutex<BTreeMap<(String, SetPath), WireDigest>>,
    pub health: Mutex<BTreeMap<String, SetHealth>>,
    pub counters: Counters,
    /// What the leader's source read for paths it proposed, taken when the
    /// batch applies here (its own tree is the source: nothing is written).
    pub pending_local: Mutex<HashMap<(String, SetPath), LocalRecord>>,
    /// Uploads this node proposed: its chunks need no staging here.
    pub own_uploads: Mutex<HashSet<u64>>,
    /// Versions linked in from staging whose block signature is still to
    /// be made (see [`Shared::defer_signature`]).
    unsigned: Mutex<std::collections::VecDeque<(String, SetPath, FileDigest)>>,
    /// Pieces of uploads kept in memory until their last piece (see
    /// [`Shared::stage_before_finish`]).
    held: Mutex<HeldUploads>,
    /// Whether some sync set is on `data_dir`'s filesystem, so staged whole
    /// content is worth finishing into files (see [`Shared::finish_upload`]).
    finish_files: bool,
    /// As leader: until when content goes through the log without trying
    /// to stage it first, after a batch some active follower did not stage
    /// (an older release, a full disk): retrying each batch would send its
    /// content twice and leave an orphaned upload on the others.
    pub staging_paused_until: Mutex<Option<Instant>>,
    /// As leader: the data peers that staged content for this node, so run
    /// a release that applies `Content::Blob`. A batch references staged
    /// content only if every data peer is among them or holds it.
    pub stage_capable: Arc<Mutex<HashSet<NodeId>>>,
    /// As leader: each follower's last reported applied index and when it
    /// last changed (the source's flow control).
    pub follower_applied_moved: Mutex<BTreeMap<NodeId, (u64, Instant)>>,
    /// Blake3 states of append-set files as last written, so an append is
    /// verified without re-reading the whole log.
    /// With each, [`fingerprint`] of the file's last bytes at that length: a
    /// file rewritten in place (`cp new.log app.log` keeps the inode) is
    /// caught before its old hash state is trusted.
    pub append_hashers: Mutex<HashMap<(String, SetPath), (FileHasher, [u8; 32])>>,
    pub store: FilesStore,
    pub applied: AtomicU64,
    pub data_dir: PathBuf,
    /// Wakes the fetcher when paths become missing.
    pub fetch_wakeup: Notify,
    /// This node leads: its trees are the source, never reconciled.
    pub leading: std::sync::atomic::AtomicBool,
    /// The Raft term this node is in, for quarantine records made outside
    /// the apply of an entry (reconciles).
    pub term: AtomicU64,
    /// The start-up reconcile is done: as a follower, its trees were squared
    /// with what the cluster committed; as the leader, its first full pass
    /// was proposed. systemd's READY waits for it.
    pub start_reconciled: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// The most a staged patch may hold: the largest `max_file_size` of the
    /// sets here, plus what a delta's instructions may add (as in
    /// `delta::apply`). Chunks beyond it are refused, so a hostile offset
    /// cannot make a huge sparse file that is later read into memory.
    pub fn staging_limit(&self) -> u64 {
        let largest = self.sets.iter().map(|s| s.max_file_size).max().unwrap_or(0);
        largest.saturating_add(largest / 8).saturating_add(1 << 20)
    }

    /// The most a staged upload may hold: a batch's patches (proposed once
    /// they pass 4 MiB) plus one patch of [`staging_limit`](Self::staging_limit).
    pub fn upload_limit(&self) -> u64 {
        self.staging_limit().saturating_add(8 << 20)
    }

    pub fn set(&self, name: &str) -> Option<&SetRuntime> {
        self.sets.iter().find(|s| s.name == name)
    }

    pub fn record(&self, set: &str, path: &SetPath) -> Option<LocalRecord> {
        self.store.record(set, path)
    }

    /// Records what the source just read at `path` outside any applied
    /// batch (the same bytes as committed, or a rewrite in place that must
    /// not pass for an append). Not fsync'd: a record is checked against
    /// `lstat` before it is trusted, and a lost one only costs a re-read.
    pub fn remember_record(&self, set: &str, path: &SetPath, record: &LocalRecord) {
        let mut batch = StoreBatch::default();
        self.store.put_record(&mut batch, set, path, record);
        if let Err(e) = self.store.write_relaxed(batch) {
            warn!(set, path = %path, "{e}");
        }
    }

    /// Runs `f` on the health record of `set` (created if new).
    fn health_of(&self, set: &str, f: impl FnOnce(&mut SetHealth)) {
        f(self
            .health
            .lock()
            .unwrap()
            .entry(set.to_string())
            .or_default())
    }

    /// Logs `msg` and keeps it as the set's last error.
    pub fn note_error(&self, set: &str, msg: String) {
        warn!(set, "{msg}");
        self.health_of(set, |h| h.last_error = Some(msg));
    }

    /// Counts a refused entry or patch of `set`, keeping `msg` as its last error.
    fn note_refused(&self, set: &str, msg: String) {
        self.health_of(set, |h| {
            h.refused += 1;
            h.last_error = Some(msg);
        });
    }

    /// Whether `set` waits for a `skip_while` marker to disappear.
    pub fn set_skipping(&self, set: &str, skipping: bool) {
        self.health_of(set, |h| h.skipping = skipping);
    }

    pub fn signature(
        &self,
        set: &str,
        path: &SetPath,
        committed: &FileDigest,
    ) -> Option<delta::BlockSignature> {
        let bytes = self.store.signature(set, path)?;
        let sig = delta::BlockSignature::from_bytes(&bytes).ok()?;
        (sig.base_digest() == *committed).then_some(sig)
    }

    /// What `clusterctl status` shows of this node's sets.
    pub fn files_view(&self) -> crate::status::FilesView {
        let manifest = self.manifest.read().unwrap();
        let missing = self.missing.lock().unwrap();
        let health = self.health.lock().unwrap();
        let sets = self
            .sets
            .iter()
            .map(|s| {
                let m = manifest.set(&s.name);
                let (files, bytes) = m.map(|m| m.totals()).unwrap_or_default();
                let h = health.get(&s.name).cloned().unwrap_or_default();
                let progress = m.map(|m| m.progress.clone()).unwrap_or_default();
                crate::status::SetView {
                    name: s.name.clone(),
                    files,
                    bytes,
                    applied_index: progress.index,
                    seq: progress.seq,
                    committed_bytes: progress.bytes,
                    missing: missing.keys().filter(|(set, _)| *set == s.name).count() as u64,
                    last_error: h.last_error,
                    refused: h.refused,
                    skipping: h.skipping,
                    recent: progress.recent.iter().copied().collect(),
                }
            })
            .collect();
        let c = &self.counters;
        crate::status::FilesView {
            sets,
            bytes_proposed: c.bytes_proposed.load(Ordering::Relaxed),
            bytes_saved: c.bytes_saved.load(Ordering::Relaxed),
            bytes_fetched: c.bytes_fetched.load(Ordering::Relaxed),
            wire_bytes_sent: crate::transport::WIRE_BYTES_SENT.load(Ordering::Relaxed),
            quarantined: c.quarantined.load(Ordering::Relaxed),
            on_change_failures: c.on_change_failures.load(Ordering::Relaxed),
            role_hook_failures: c.role_hook_failures.load(Ordering::Relaxed),
            files_linked: c.files_linked.load(Ordering::Relaxed),
        }
    }

    /// The quarantine records, oldest first (at most the last `limit`).
    pub fn conflicts(&self, limit: usize) -> std::io::Result<Vec<String>> {
        let file = self.data_dir.join("quarantine").join("records.jsonl");
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let lines: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        let skip = lines.len().saturating_sub(limit);
        Ok(lines.into_iter().skip(skip).collect())
    }

    fn staging_dir(&self) -> PathBuf {
        self.data_dir.join("staging")
    }

    fn staged_path(&self, upload: u64) -> PathBuf {
        self.staging_dir().join(format!("{upload:016x}"))
    }

    /// The directory of the finished files made from upload `upload`.
    fn finished_dir(&self, upload: u64) -> PathBuf {
        self.staging_dir().join(format!("{upload:016x}.d"))
    }

    /// The name, in [`finished_dir`](Self::finished_dir), of the finished
    /// file holding `digest`'s content made from the patch at `offset`. The
    /// name carries the digest because a file gets it only once its content
    /// was checked against that digest, written and fsynced.
    fn finished_name(offset: u64, digest: &FileDigest) -> String {
        format!(
            "{offset:016x}-{}",
            blake3::Hash::from_bytes(digest.hash).to_hex()
        )
    }

    /// Removes staged upload `upload` and what was made from it.
    fn remove_upload(&self, upload: u64) {
        let _ = std::fs::remove_file(self.staged_path(upload));
        let _ = std::fs::remove_dir_all(self.finished_dir(upload));
    }

    /// Notes that `set`'s `path` now holds `digest`, linked in from staging
    /// without being read, and lacks the block signature this node keeps
    /// for when it leads. Making it there took a tenth of a follower's CPU
    /// in a first full sync; [`Applier::sign_linked`] makes it once
    /// nothing is applied (seconds later), from the file. Until then (or
    /// after a restart, as the list is not kept) that version's next change
    /// travels whole should this node lead meanwhile.
    fn defer_signature(&self, set: &str, path: &SetPath, digest: FileDigest) {
        let mut unsigned = self.unsigned.lock().unwrap();
        if unsigned.len() < UNSIGNED_MAX {
            unsigned.push_back((set.to_string(), path.clone(), digest));
        }
    }

    /// Makes staged upload `upload` durable after its last piece, whose
    /// pieces were written without a flush of their own. Each version in
    /// `versions` whose patch is whole content (a new file, the first full
    /// sync) is rebuilt, checked against its digest and written as a
    /// finished file of its own in the upload's [`finished_dir`]
    /// (Self::finished_dir) (written under a part name, fsynced, then
    /// renamed): applying it is then a link into the set, so this node
    /// writes its content once, not once here and again when applied. Only
    /// where some set shares `data_dir`'s filesystem ([`Shared::finish_files`]).
    /// The rest of the upload (patches against a base) is fsynced; an
    /// upload the finished files cover entirely is removed unflushed, so
    /// its pieces mostly never reach the disk.
    pub fn finish_upload(&self, upload: u64, versions: &[StagedVersion]) -> Result<(), String> {
        let path = self.staged_path(upload);
        let dir = self.finished_dir(upload);
        let fail = |what: &str, e: std::io::Error| {
            format!(
                "cannot {what} staged upload {upload:016x} in {}: {e}",
                path.display()
            )
        };
        let started = Instant::now();
        let limit = self.staging_limit();
        let held = self.held.lock().unwrap().take(upload);
        let upload_bytes = match held {
            Some(h) => UploadBytes::Held(h.pieces),
            None => UploadBytes::File(std::fs::File::open(&path).map_err(|e| fail("open", e))?),
        };
        let upload_len = upload_bytes.len(upload)?;
        // The byte ranges of the upload made into finished files.
        let mut finished_ranges = BTreeMap::new();
        let mut written = Vec::new();
        let finish = self.finish_files && upload_len <= FINISH_UPLOAD_MAX;
        for v in versions.iter().filter(|_| finish) {
            if finished_ranges.contains_key(&v.offset) {
                continue;
            }
            if v.len > limit || v.digest.len > limit || v.offset.saturating_add(v.len) > upload_len
            {
                return Err(format!(
                    "staged upload {upload:016x} lists a version of {} bytes from a {}-byte patch at {}, outside the upload or larger than any sync set's max_file_size allows",
                    v.digest.len, v.len, v.offset
                ));
            }
            let patch = upload_bytes
                .read(v.offset, v.len)
                .map_err(|e| fail("read", e))?;
            let body = delta::whole_body(&patch).map_err(|e| {
                format!(
                    "staged upload {upload:016x} holds an unusable patch at {}: {e}",
                    v.offset
                )
            })?;
            // A delta or an append: applied from the upload, against its base.
            let Some(body) = body else {
                continue;
            };
            let content = delta::apply_whole(body, &v.digest, limit).map_err(|e| {
                format!(
                    "the patch at {} of staged upload {upload:016x} does not make the version the leader listed: {e}",
                    v.offset
                )
            })?;
            if written.is_empty() {
                std::fs::create_dir_all(&dir).map_err(|e| fail("make the directory for", e))?;
            }
            // Its own name only once complete and fsynced (below): a crash
            // before leaves a part file no batch ever uses.
            let name = dir.join(Self::finished_name(v.offset, &v.digest));
            let part = name.with_extension("part");
            let staged_meta = (v.meta.as_ref())
                .filter(|m| m.kind == EntryKind::File)
                .map(fs_meta);
            let write = || -> std::io::Result<std::fs::File> {
                let mut f = std::fs::File::create(&part)?;
                for step in content.chunks(FINISH_FLUSH_STEP) {
                    std::io::Write::write_all(&mut f, step)?;
                    if content.len() > FINISH_FLUSH_STEP {
                        f.sync_data()?;
                    }
                }
                // Best effort (an owner this node cannot give, say): what is
                // not set here is set, and fsynced, when it is applied.
                if let Some(meta) = &staged_meta {
                    let _ = crate::fsroot::set_staged_meta(&f, meta);
                }
                // Start the write-back now; the fsync below then mostly
                // waits for what is already on its way.
                // SAFETY: a plain syscall on a descriptor we own.
                let _ = unsafe {
                    libc::sync_file_range(
                        std::os::fd::AsRawFd::as_raw_fd(&f),
                        0,
                        0,
                        libc::SYNC_FILE_RANGE_WRITE,
                    )
                };
                Ok(f)
            };
            written.push((
                write().map_err(|e| fail("write a finished file of", e))?,
                part,
                name,
            ));
            finished_ranges.insert(v.offset, v.len);
        }
        let wrote = started.elapsed();
        // Side by side: the disk then merges their cache flushes, where one
        // after the other each waited for a flush of its own.
        let fsync_and_name = |files: &[(std::fs::File, PathBuf, PathBuf)]| {
            files.iter().try_for_each(|(f, part, name)| {
                f.sync_all().and_then(|()| std::fs::rename(part, name))
            })
        };
        let per_thread = written.len().div_ceil(FSYNC_THREADS).max(1);
        std::thread::scope(|s| {
            let threads: Vec<_> = written
                .chunks(per_thread)
                .map(|files| s.spawn(move || fsync_and_name(files)))
                .collect();
            threads
                .into_iter()
                .try_for_each(|t| t.join().expect("an fsync thread panicked"))
        })
        .map_err(|e| fail("fsync a finished file of", e))?;
        if !written.is_empty() {
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| fail("fsync the finished files' directory of", e))?;
        }
        // Whatever the finished files do not cover (deltas, appends) is
        // still needed from the upload.
        let mut covered = 0u64;
        for (&offset, &len) in &finished_ranges {
            if offset == covered {
                covered += len;
            }
        }
        match upload_bytes {
            // A file left by an earlier attempt at the same upload.
            UploadBytes::Held(_) if covered == upload_len => {
                let _ = std::fs::remove_file(&path);
            }
            UploadBytes::File(f) if covered == upload_len => {
                drop(f);
                let _ = std::fs::remove_file(&path);
            }
            UploadBytes::File(f) => f.sync_all().map_err(|e| fail("fsync", e))?,
            UploadBytes::Held(pieces) => {
                let write = || -> std::io::Result<()> {
                    let f = std::fs::File::create(&path)?;
                    for (&offset, piece) in &pieces {
                        f.write_all_at(piece, offset)?;
                    }
                    f.sync_all()
                };
                write().map_err(|e| fail("write", e))?;
            }
        }
        std::fs::File::open(self.staging_dir())
            .and_then(|d| d.sync_all())
            .map_err(|e| fail("fsync the staging directory for", e))?;
        debug!(upload, finished = written.len(), bytes = upload_len, ?wrote, took = ?started.elapsed(), "finished a staged upload");
        Ok(())
    }

    /// Takes a piece of upload `upload` whose last piece will list its
    /// versions, so [`finish_upload`](Self::finish_upload) makes it all
    /// durable then. Up to [`FINISH_UPLOAD_MAX`], the pieces are held in
    /// memory (at most [`HELD_BYTES_MAX`] over all uploads): most of an
    /// upload becomes finished files, and writing it to the staged file
    /// first, to read it back and delete it, cost a follower a fifth of its
    /// CPU in a full sync. What does not fit goes to the file, unflushed;
    /// past [`FINISH_UPLOAD_MAX`] each piece is flushed (see
    /// [`StageFlush::Piece`]).
    pub fn stage_before_finish(
        &self,
        upload: u64,
        offset: u64,
        data: prost::bytes::Bytes,
    ) -> Result<(), String> {
        let end = offset.saturating_add(data.len() as u64);
        self.check_piece_end(upload, end)?;
        if end > FINISH_UPLOAD_MAX {
            // Too large to finish: what was held of it goes to its file too.
            let spilled = self.held.lock().unwrap().take(upload);
            return self.spill_and_stage(spilled, upload, offset, &data, StageFlush::Piece);
        }
        let mut held = self.held.lock().unwrap();
        let room = held.bytes + data.len() <= HELD_BYTES_MAX;
        let HeldUploads { uploads, bytes } = &mut *held;
        match uploads.get_mut(&upload) {
            Some(h) if room => {
                *bytes -= h.pieces.get(&offset).map_or(0, |p| p.len());
                *bytes += data.len();
                h.pieces.insert(offset, data);
                h.last_piece = Instant::now();
                Ok(())
            }
            // Its first piece, unless it is already on file (this node
            // took earlier pieces there).
            None if room && self.finish_files && offset == 0 => {
                *bytes += data.len();
                let pieces = BTreeMap::from([(offset, data)]);
                let last_piece = Instant::now();
                uploads.insert(upload, HeldUpload { pieces, last_piece });
                Ok(())
            }
            _ => {
                // No room: what is held of it goes to the file too.
                let spilled = held.take(upload);
                drop(held);
                self.spill_and_stage(spilled, upload, offset, &data, StageFlush::None)
            }
        }
    }

    /// Writes what was held of upload `upload`, then `data` at `offset`, to
    /// its file. Refuses a piece past the start of an upload of which
    /// nothing is held or on file: its first pieces are gone (this node
    /// restarted, or dropped the upload as abandoned), and a file starting
    /// with zeros must never be reported as holding the upload.
    fn spill_and_stage(
        &self,
        held: Option<HeldUpload>,
        upload: u64,
        offset: u64,
        data: &[u8],
        flush: StageFlush,
    ) -> Result<(), String> {
        if held.is_none() && offset != 0 && !self.staged_path(upload).exists() {
            return Err(format!(
                "staged upload {upload:016x} lacks bytes 0..{offset} (this node restarted or dropped it while it arrived); the leader sends the batch through the log instead"
            ));
        }
        for (at, piece) in held.iter().flat_map(|h| &h.pieces) {
            self.stage_piece(upload, *at, piece, flush)?;
        }
        self.stage_piece(upload, offset, data, flush)
    }

    /// Refuses a piece ending past [`upload_limit`](Self::upload_limit): a
    /// hostile offset cannot make a huge sparse file, nor a held upload,
    /// that is later read into memory.
    fn check_piece_end(&self, upload: u64, end: u64) -> Result<(), String> {
        match end > self.upload_limit() {
            true => Err(format!(
                "a staged piece ending at byte {end} of upload {upload:016x} is larger than any sync set here allows (max_file_size)"
            )),
            false => Ok(()),
        }
    }

    /// Frees held uploads that got no piece for [`HELD_MAX_IDLE`].
    fn drop_abandoned_uploads(&self) {
        let mut held = self.held.lock().unwrap();
        let abandoned: Vec<u64> = (held.uploads.iter())
            .filter(|(_, h)| h.last_piece.elapsed() >= HELD_MAX_IDLE)
            .map(|(&upload, _)| upload)
            .collect();
        for upload in abandoned {
            held.take(upload);
        }
    }

    /// Writes `data` at `offset` of the staged upload `upload` (created if
    /// new), flushed as `flush` says. Refuses anything ending past
    /// [`upload_limit`](Self::upload_limit): a hostile offset cannot make a
    /// huge sparse file that is later read into memory.
    pub fn stage_piece(
        &self,
        upload: u64,
        offset: u64,
        data: &[u8],
        flush: StageFlush,
    ) -> Result<(), String> {
        self.check_piece_end(upload, offset.saturating_add(data.len() as u64))?;
        let path = self.staged_path(upload);
        let write = || -> std::io::Result<()> {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&path)?;
            f.write_all_at(data, offset)?;
            match flush {
                StageFlush::None => {}
                StageFlush::Piece => f.sync_data()?,
                StageFlush::Upload => {
                    f.sync_all()?;
                    std::fs::File::open(self.staging_dir())?.sync_all()?;
                }
            }
            Ok(())
        };
        write().map_err(|e| {
            format!(
                "cannot stage upload {upload:016x} in {}: {e}",
                path.display()
            )
        })
    }
}

/// Opens the file state and loads it; `None` sets for a witness.
pub fn open_shared(config: &Config) -> Result<Arc<Shared>, FilesStoreError> {
    let store = FilesStore::open(&config.node.data_dir.join("files"))?;
    let manifest = store.load_manifest()?;
    let missing = store
        .load_missing()?
        .into_iter()
        .map(|(s, p, d)| ((s, p), d))
        .collect();
    let applied = store.applied()?;
    let sets = if config.node.witness {
        Vec::new()
    } else {
        config.sync.iter().map(SetRuntime::from_config).collect()
    };
    let _ = std::fs::create_dir_all(config.node.data_dir.join("staging"));
    let finish_files = {
        use std::os::unix::fs::MetadataExt;
        let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
        let staging = dev(&config.node.data_dir.join("staging"));
        staging.is_some() && sets.iter().any(|s| dev(&s.root_dir) == staging)
    };
    let no_sets = sets.is_empty();
    let shared = Arc::new(Shared {
        node_id: config.node.id,
        witness: config.node.witness,
        data_peers: config
            .peers
            .iter()
            .filter(|p| !p.witness)
            .map(|p| p.id)
            .collect(),
        unobtainable: Mutex::new(HashMap::new()),
        witness_peers: config
            .peers
            .iter()
            .filter(|p| p.witness)
            .map(|p| p.id)
            .collect(),
        sets,
        manifest: RwLock::new(manifest),
        missing: Mutex::new(missing),
        health: Mutex::new(BTreeMap::new()),
        counters: Counters::default(),
        pending_local: Mutex::new(HashMap::new()),
        own_uploads: Mutex::new(HashSet::new()),
        unsigned: Mutex::new(std::collections::VecDeque::new()),
        held: Mutex::new(HeldUploads::default()),
        finish_files,
        staging_paused_until: Mutex::new(None),
        stage_capable: Arc::new(Mutex::new(HashSet::new())),
        follower_applied_moved: Mutex::new(BTreeMap::new()),
        append_hashers: Mutex::new(HashMap::new()),
        store,
        applied: AtomicU64::new(applied),
        data_dir: config.node.data_dir.clone(),
        fetch_wakeup: Notify::new(),
        leading: std::sync::atomic::AtomicBool::new(false),
        term: AtomicU64::new(0),
        start_reconciled: std::sync::atomic::AtomicBool::new(no_sets),
    });
    // Quarantine records are never deleted automatically: the count shown
    // is of all of them, not only of this run's.
    let on_disk = shared.conflicts(usize::MAX).map_or(0, |r| r.len() as u64);
    shared
        .counters
        .quarantined
        .store(on_disk, Ordering::Relaxed);
    Ok(shared)
}

/// Committed content fetched from a peer for a missing path.
#[derive(Debug)]
pub struct Fetched {
    pub set: String,
    pub path: SetPath,
    pub want: FileDigest,
    /// An encoded [`Patch`] against this node's current local file.
    pub patch: Vec<u8>,
}

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
}

/// What the applier tells the node task.
#[derive(Debug)]
pub enum Applied {
    /// Everything up to here is applied and durable.
    Index(u64),
    /// The applier cannot go on (its store failed): the node must stop.
    Failed(String),
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
    /// ([`crate::manifest::SetManifest::repack`]).
    ops_since_repack: usize,
    /// Staged uploads of batches applied in this round (their
    /// [`Content::Blob`]s), removed once the round is durably applied.
    consumed_uploads: Vec<u64>,
}

/// A local entry found while walking a tree.
pub struct Found {
    pub path: SetPath,
    pub meta: FileMeta,
}

/// The paths a pass walked, as 64-bit hashes: what lets a pass keep only
/// the entries that need attention and still tell which committed paths
/// are gone (about 10 bytes a path, where keeping each path and its
/// metadata took over 130). Hashes are keyed afresh for each pass, so a
/// collision, which would hide one deletion from one pass, does not repeat.
#[derive(Default)]
pub struct SeenPaths {
    hasher: std::collections::hash_map::RandomState,
    hashes: HashSet<u64>,
}

impl SeenPaths {
    pub fn insert(&mut self, path: &SetPath) {
        use std::hash::BuildHasher;
        self.hashes.insert(self.hasher.hash_one(path));
    }

    pub fn contains(&self, path: &SetPath) -> bool {
        use std::hash::BuildHasher;
        self.hashes.contains(&self.hasher.hash_one(path))
    }
}

/// Walks a set's local tree (never following symlinks), skipping excluded
/// subtrees and temporary files. Returns entries in manifest order and
/// whether a `skip_while` marker exists.
/// Keeps only the entries `keep` returns true for (it sees every entry):
/// a pass over a large set holds only what needs its attention, not a
/// copy of the whole tree.
pub fn walk_keeping(
    set: &SetRuntime,
    root: &Root,
    mut keep: impl FnMut(&Found) -> bool,
) -> Result<(Vec<Found>, bool), FsError> {
    let mut out = Vec::new();
    let mut marker = false;
    if let Some(name) = &set.single_file {
        if let Some(meta) = root.stat(&[name.as_bytes()])? {
            let found = Found {
                path: name.clone(),
                meta,
            };
            if keep(&found) {
                out.push(found);
            }
        }
        return Ok((out, false));
    }
    let mut stack: Vec<Option<SetPath>> = vec![None];
    while let Some(dir) = stack.pop() {
        let comps: Vec<&[u8]> = dir
            .as_ref()
            .map(|d| d.components().collect())
            .unwrap_or_default();
        let Some(opened) = root.open_dir(&comps)? else {
            continue;
        };
        let mut subdirs = Vec::new();
        for (name, kind) in opened.list()? {
            if crate::fsroot::is_temp_name(&name) {
                continue;
            }
            let path = match &dir {
                Some(d) => d.join(&name),
                None => SetPath::from_network(&name),
            };
            let Ok(path) = path else { continue };
            let is_dir = kind == Kind::Dir;
            if set.filter.has_skip_while() && set.filter.is_skip_marker(&path, is_dir) {
                marker = true;
            }
            let excluded = set.filter.is_excluded(&path, is_dir);
            if excluded {
                if is_dir && set.filter.has_skip_while() {
                    subdirs.push((path, true));
                }
                continue;
            }
            let Some(meta) = opened.stat(&name)? else {
                continue;
            };
            if is_dir {
                subdirs.push((path.clone(), false));
            }
            let found = Found { path, meta };
            if keep(&found) {
                out.push(found);
            }
        }
        // Excluded directories are only searched for markers.
        for (d, excluded_only) in subdirs.into_iter().rev() {
            if excluded_only {
                if subtree_has_marker(set, root, &d)? {
                    marker = true;
                }
            } else {
                stack.push(Some(d));
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((out, marker))
}

fn subtree_has_marker(set: &SetRuntime, root: &Root, dir: &SetPath) -> Result<bool, FsError> {
    let comps: Vec<&[u8]> = dir.components().collect();
    let Some(listing) = root.list_dir(&comps)? else {
        return Ok(false);
    };
    for (name, kind) in listing {
        let Ok(p) = dir.join(&name) else { continue };
        if set.filter.is_skip_marker(&p, kind == Kind::Dir) {
            return Ok(true);
        }
        if kind == Kind::Dir && subtree_has_marker(set, root, &p)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether a `skip_while` marker exists in the set right now.
pub fn has_marker(set: &SetRuntime, root: &Root) -> Result<bool, FsError> {
    if !set.filter.has_skip_while() {
        return Ok(false);
    }
    // Only the flag is wanted: keep none of what the walk finds (this runs
    // for every applied batch of a set with markers).
    Ok(walk_keeping(set, root, |_| false)?.1)
}

/// Streams a local file through blake3 (never through a symlink).
pub fn hash_local(root: &Root, comps: &[&[u8]]) -> Result<Option<(FileHasher, FileMeta)>, FsError> {
    let Some((mut file, meta)) = root.open_file(comps)? else {
        return Ok(None);
    };
    let mut hasher = FileHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| FsError::Io {
            root: root.path().display().to_string(),
            path: String::from_utf8_lossy(&comps.join(&b'/')).into_owned(),
            op: "read",
            error: e,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Some((hasher, meta)))
}

/// The record of a file as it now is on disk, with the digest it holds.
pub fn record_of(meta: &FileMeta, digest: &FileDigest) -> LocalRecord {
    LocalRecord {
        digest: WireDigest::new(digest),
        len: meta.len,
        mtime_ns: meta.mtime_ns,
        ino: meta.ino,
        mode: meta.mode,
        uid: meta.uid,
        gid: meta.gid,
    }
}

/// Whether `meta` (an `lstat` now) is still the file `record` describes.
pub fn unchanged_since(record: &LocalRecord, meta: &FileMeta) -> bool {
    meta.kind == Kind::File
        && meta.len == record.len
        && meta.mtime_ns == record.mtime_ns
        && meta.ino == record.ino
        && meta.mode == record.mode
        && meta.uid == record.uid
        && meta.gid == record.gid
}

/// Owner and group as this node names them.
pub fn meta_from_local(m: &FileMeta, kind: EntryKind, names: &mut OwnerNames) -> Meta {
    Meta {
        kind,
        mode: m.mode & 0o7777,
        uid: m.uid,
        gid: m.gid,
        user: names.user(m.uid),
        group: names.group(m.gid),
        mtime_ns: m.mtime_ns,
    }
}

/// uid/gid ↔ name lookups, cached for one pass (user databases change when
/// /etc/passwd itself is replicated, so nothing is cached for longer).
#[derive(Default)]
pub struct OwnerNames {
    users: HashMap<u32, Option<OwnerName>>,
    groups: HashMap<u32, Option<OwnerName>>,
}

impl OwnerNames {
    pub fn user(&mut self, uid: u32) -> Option<OwnerName> {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                uzers::get_user_by_uid(uid).map(|u| OwnerName::new(&u.name().to_string_lossy()))
            })
            .clone()
    }
    pub fn group(&mut self, gid: u32) -> Option<OwnerName> {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                uzers::get_group_by_gid(gid).map(|g| OwnerName::new(&g.name().to_string_lossy()))
            })
            .clone()
    }
}

/// name → uid/gid lookups, cached across batches and threads. Each
/// lookup through NSS opens and reads the whole user or group database: a
/// tenth of finishing a staged upload's files went to it, and 2 to 3 % of
/// the nodes' CPU in a first full sync when each applied file did two.
///
/// The cache is dropped whenever `/etc/passwd` or `/etc/group` changes
/// (inode, size, mtime or ctime), so a user this node just got (say a
/// replicated `useradd`, applied one batch before the files it owns) is
/// found at once; and at the latest after [`OWNER_IDS_MAX_AGE`], for
/// databases that are not those files (LDAP, sssd). The files are stat'ed
/// at most every [`OWNER_STAMPS_RECHECK`]: two `stat`s per lookup were a
/// twentieth of a reconcile pass over 100,000 files. A file applied in that
/// window, right after a replicated `useradd`, gets the leader's number for
/// a new name, which is the right one exactly when the databases are
/// replicated, the one case where they change under the applier.
#[derive(Default)]
struct LocalIds {
    users: HashMap<OwnerName, Option<u32>>,
    groups: HashMap<OwnerName, Option<u32>>,
    /// The databases' stamps when the maps were started.
    stamps: [Option<FileStamp>; 2],
    /// When the maps were started (`None`: never).
    started: Option<Instant>,
    /// When `stamps` were last compared with the files.
    checked: Option<Instant>,
}

/// How long a cached owner lookup stands when the user and group files do
/// not change (see [`LocalIds`]).
const OWNER_IDS_MAX_AGE: Duration = Duration::from_secs(1);

/// How long the user and group files' stamps are taken as unchanged
/// without a `stat` (see [`LocalIds`]).
const OWNER_STAMPS_RECHECK: Duration = Duration::from_millis(100);

/// The files NSS's `files` source reads; a change to either drops the cache.
const OWNER_DATABASES: [&str; 2] = ["/etc/passwd", "/etc/group"];

/// What tells one version of a file from the next without reading it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(path: &str) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(FileStamp {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

static LOCAL_IDS: Mutex<Option<LocalIds>> = Mutex::new(None);

impl LocalIds {
    /// The numeric owner to give `meta` here, from `users` and `groups`
    /// (name → number) unless cached since the databases were last seen as
    /// `stamps` at `now`.
    fn of_with(
        &mut self,
        meta: &Meta,
        stamps: [Option<FileStamp>; 2],
        now: Instant,
        users: impl FnOnce(&str) -> Option<u32>,
        groups: impl FnOnce(&str) -> Option<u32>,
    ) -> (u32, u32) {
        let fresh = self.stamps == stamps
            && self
                .started
                .is_some_and(|t| now.saturating_duration_since(t) < OWNER_IDS_MAX_AGE);
        if !fresh {
            self.users.clear();
            self.groups.clear();
            self.stamps = stamps;
            self.started = Some(now);
        }
        let uid = meta.user.as_ref().and_then(|name| {
            *self
                .users
                .entry(name.clone())
                .or_insert_with(|| users(&**name))
        });
        let gid = meta.group.as_ref().and_then(|name| {
            *self
                .groups
                .entry(name.clone())
                .or_insert_with(|| groups(&**name))
        });
        (uid.unwrap_or(meta.uid), gid.unwrap_or(meta.gid))
    }
}

/// The numeric owner to give `meta` here: by name when this node knows the
/// name, else the leader's number (see [`LocalIds`]).
pub fn local_ids(meta: &Meta) -> (u32, u32) {
    if meta.user.is_none() && meta.group.is_none() {
        return (meta.uid, meta.gid);
    }
    let now = Instant::now();
    let mut ids = LOCAL_IDS.lock().unwrap_or_else(|e| e.into_inner());
    let ids = ids.get_or_insert_with(LocalIds::default);
    let recent = ids
        .checked
        .is_some_and(|t| now.saturating_duration_since(t) < OWNER_STAMPS_RECHECK);
    let stamps = if recent {
        ids.stamps
    } else {
        ids.checked = Some(now);
        OWNER_DATABASES.map(FileStamp::of)
    };
    ids.of_with(
        meta,
        stamps,
        now,
        |name| uzers::get_user_by_name(name).map(|u| u.uid()),
        |name| uzers::get_group_by_name(name).map(|g| g.gid()),
    )
}

fn fs_meta(meta: &Meta) -> FileMeta {
    let (uid, gid) = local_ids(meta);
    let kind = match meta.kind {
        EntryKind::File => Kind::File,
        EntryKind::Dir => Kind::Dir,
        EntryKind::Symlink => Kind::Symlink,
    };
    FileMeta::new(kind, meta.mode, uid, gid, meta.mtime_ns)
}

/// Metadata equal as far as this node can set it (`want` from [`fs_meta`]).
fn meta_matches(want: &FileMeta, have: &FileMeta) -> bool {
    have.mode == want.mode
        && have.uid == want.uid
        && have.gid == want.gid
        && have.mtime_ns == want.mtime_ns
}

fn comps(path: &SetPath) -> Vec<&[u8]> {
    path.components().collect()
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a put could not be completed from the log alone.
enum PutOutcome {
    Done,
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
        let qdir = shared.data_dir.join("quarantine");
        let quarantine = {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&qdir);
            Root::open(&qdir).ok()
        };
        Applier {
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
        }
    }

    /// Runs until the node task drops its sender.
    pub fn run(mut self, mut rx: mpsc::UnboundedReceiver<ApplyMsg>) {
        // Paths left missing by an earlier run are fetched again.
        if !self.shared.missing.lock().unwrap().is_empty() {
            self.shared.fetch_wakeup.notify_one();
        }
        while let Some(msg) = rx.blocking_recv() {
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
                    self.apply_fetched(f);
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

    fn apply_up_to(&mut self, up_to: u64) -> Result<(), String> {
        loop {
            let applied = self.shared.applied.load(Ordering::SeqCst);
            if applied >= up_to {
                return Ok(());
            }
            let read = self.log.entries(
                applied + 1,
                up_to + 1,
                Some(APPLY_PAGE_BYTES),
                crate::storage::with_data(),
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
                Err(e) => {
                    return Err(format!(
                        "cannot read committed entries {}..={up_to} back from the Raft log: {e}",
                        applied + 1
                    ))
                }
            };
            if entries.is_empty() {
                return Err(format!(
                    "the Raft log returned no entries at {}",
                    applied + 1
                ));
            }
            let mut batch = StoreBatch::default();
            let mut last = applied;
            for e in entries {
                if e.index != last + 1 {
                    return Err(format!("the Raft log skipped from {last} to {}", e.index));
                }
                if !e.data.is_empty() {
                    match Command::decode(&e.data) {
                        Ok(Command::Barrier { .. }) => {}
                        Ok(Command::Chunk(c)) => self.stage(&c),
                        Ok(Command::Files(b)) => self.apply_batch(e.index, e.term, &b, &mut batch),
                        Err(CoreError::BadEntry(why)) => {
                            warn!(
                                index = e.index,
                                "skipping committed entry {}: {why}", e.index
                            )
                        }
                        Err(other) => return Err(other.to_string()),
                    }
                }
                last = e.index;
            }
            batch.set_applied(last);
            self.shared.store.write(batch).map_err(|e| e.to_string())?;
            // Only now: a crash before the write applies these batches
            // again, from the same staged content.
            for upload in self.consumed_uploads.drain(..) {
                self.shared.remove_upload(upload);
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

    fn stage(&mut self, chunk: &crate::manifest::Chunk) {
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

    fn apply_batch(&mut self, index: u64, term: u64, batch: &FileBatch, store: &mut StoreBatch) {
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
                    if let crate::manifest::FileOp::Rename { from, .. } = op {
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
                }
            }
            for op in &checked {
                let paths: Vec<&SetPath> = match op {
                    CheckedOp::Put { path, .. }
                    | CheckedOp::Dir { path, .. }
                    | CheckedOp::Symlink { path, .. }
                    | CheckedOp::Remove { path, .. }
                    | CheckedOp::Forget { path }
                    | CheckedOp::Xattrs { path, .. }
                    | CheckedOp::Link { path, .. } => vec![path],
                    CheckedOp::Rename { from, to, .. } => vec![from, to],
                };
                for p in paths {
                    for (k, e) in set.subtree(p) {
                        store.put_entry(&set_name, k, e);
                    }
                }
            }
            // Hard links the batch changed on the side (left as files of
            // their own, following a moved primary).
            for p in &touched {
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
            return;
        }
        let Some(root) = self.roots.remove(&set_name) else {
            return;
        };
        let skip = match has_marker(&set, &root) {
            Ok(m) => m,
            Err(e) => {
                self.shared.note_error(
                    &set_name,
                    format!("cannot look for skip_while markers: {e}"),
                );
                false
            }
        };
        if skip {
            info!(set = %set_name, index, "a skip_while marker exists in sync set {set_name:?}: its changes wait until it is gone");
            self.deferred.insert(set_name.clone());
            self.shared.set_skipping(&set_name, true);
        } else if self.deferred.contains(&set_name) {
            // Still catching up on earlier skipped batches: the reconcile covers this one.
        } else {
            self.carry_out(&set, &root, index, term, &checked, store);
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
                    store,
                ) {
                    Ok(PutOutcome::Done) => {
                        self.clear_missing(&set.name, path, store);
                        Ok(())
                    }
                    Ok(PutOutcome::Missing(why)) => {
                        debug!(set = %set.name, path = %path, "{why}; fetching the committed version");
                        self.mark_missing(&set.name, path, entry, store);
                        Ok(())
                    }
                    Ok(PutOutcome::Refused(why)) => {
                        self.refuse_content(&set.name, path, index, &why);
                        self.mark_missing(&set.name, path, entry, store);
                        Ok(())
                    }
                    Err(e) => {
                        self.mark_missing(&set.name, path, entry, store);
                        Err(e)
                    }
                },
                CheckedOp::Dir { path, entry } => {
                    dirs.push((path.clone(), entry.meta.clone()));
                    self.make_dir(set, root, path, &entry.meta, index, term)
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
        self.write_files(set, root, index, term, &puts, store);
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
                let (a, b) = match op {
                    CheckedOp::Rename { from, to, .. } => (Some(from), Some(to)),
                    CheckedOp::Put { path, .. }
                    | CheckedOp::Dir { path, .. }
                    | CheckedOp::Symlink { path, .. }
                    | CheckedOp::Remove { path, .. }
                    | CheckedOp::Forget { path }
                    | CheckedOp::Xattrs { path, .. }
                    | CheckedOp::Link { path, .. } => (Some(path), None),
                };
                for p in [a, b].into_iter().flatten() {
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

    /// Writes the files of one batch, [`WRITERS`] at a time, then fsyncs
    /// each directory that received one.
    fn write_files(
        &self,
        set: &SetRuntime,
        root: &Root,
        index: u64,
        term: u64,
        puts: &[&CheckedOp],
        store: &mut StoreBatch,
    ) {
        if puts.is_empty() {
            return;
        }
        let started = Instant::now();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let workers = WRITERS.min(puts.len());
        let results: Vec<(StoreBatch, Vec<String>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut local = StoreBatch::default();
                        let mut errors = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(CheckedOp::Put { path, entry, content, previous }) = puts.get(i).copied() else {
                                break;
                            };
                            match self.put_file(set, root, path, entry, content, previous.as_ref(), index, term, &mut local) {
                                Ok(PutOutcome::Done) => self.clear_missing(&set.name, path, &mut local),
                                Ok(PutOutcome::Missing(why)) => {
                                    debug!(set = %set.name, path = %path, "{why}; fetching the committed version");
                                    self.mark_missing(&set.name, path, entry, &mut local);
                                }
                                Ok(PutOutcome::Refused(why)) => {
                                    self.refuse_content(&set.name, path, index, &why);
                                    self.mark_missing(&set.name, path, entry, &mut local);
                                }
                                Err(e) => {
                                    self.mark_missing(&set.name, path, entry, &mut local);
                                    errors.push(format!("entry {index}: {e}"));
                                }
                            }
                        }
                        (local, errors)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a file writer panicked"))
                .collect()
        });
        for (local, errors) in results {
            store.extend(local);
            for e in errors {
                self.shared.note_error(&set.name, e);
            }
        }
        let parents: BTreeSet<Option<SetPath>> = puts
            .iter()
            .filter_map(|op| match op {
                CheckedOp::Put { path, .. } => Some(path.parent()),
                _ => None,
            })
            .collect();
        for parent in parents {
            let c: Vec<&[u8]> = parent
                .as_ref()
                .map(|p| p.components().collect())
                .unwrap_or_default();
            if let Err(e) = root.sync_dir(&c) {
                self.shared
                    .note_error(&set.name, format!("entry {index}: {e}"));
            }
        }
        debug!(set = %set.name, index, files = puts.len(), took = ?started.elapsed(), "wrote a batch's files");
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

    /// Moves whatever is at `path` into quarantine, with a record line.
    fn quarantine(
        &self,
        set: &str,
        root: &Root,
        path: &SetPath,
        index: u64,
        term: u64,
        why: &str,
    ) -> Result<(), FsError> {
        self.quarantine_at(set, root, &comps(path), path, index, term, why)
    }

    /// Quarantines what a guarded swap displaced (an edit that landed
    /// between the check and the rename), if anything.
    #[allow(clippy::too_many_arguments)]
    /// Sets aside what a replacement displaced unexpectedly: an edit saved
    /// while the committed version was being written.
    fn set_aside_edited_during_write(
        &self,
        set: &str,
        root: &Root,
        replaced: &crate::fsroot::Replaced,
        path: &SetPath,
        index: u64,
        term: u64,
    ) -> Result<(), FsError> {
        self.quarantine_displaced(
            set,
            root,
            &replaced.displaced,
            path,
            index,
            term,
            "it was edited while the committed version was being written",
        )
    }

    fn quarantine_displaced(
        &self,
        set: &str,
        root: &Root,
        displaced: &Option<Vec<Vec<u8>>>,
        path: &SetPath,
        index: u64,
        term: u64,
        why: &str,
    ) -> Result<(), FsError> {
        let Some(at) = displaced else {
            return Ok(());
        };
        let at: Vec<&[u8]> = at.iter().map(|c| c.as_slice()).collect();
        self.quarantine_at(set, root, &at, path, index, term, why)
    }

    /// [`Applier::quarantine`] of an entry that stands at `at` (a temporary
    /// name a guarded replace left it under) but belongs to `path`.
    #[allow(clippy::too_many_arguments)]
    fn quarantine_at(
        &self,
        set: &str,
        root: &Root,
        at: &[&[u8]],
        path: &SetPath,
        index: u64,
        term: u64,
        why: &str,
    ) -> Result<(), FsError> {
        let Some(q) = &self.quarantine else {
            return Err(FsError::Io {
                root: self
                    .shared
                    .data_dir
                    .join("quarantine")
                    .display()
                    .to_string(),
                path: ".".into(),
                op: "open quarantine",
                error: std::io::Error::other(
                    "the quarantine directory is unusable; refusing to overwrite a local change",
                ),
            });
        };
        let stamp = format!("{}-{index}", unix_ms());
        let mut dest: Vec<Vec<u8>> = vec![set.as_bytes().to_vec(), stamp.clone().into_bytes()];
        dest.extend(path.components().map(|c| c.to_vec()));
        let local = root.stat(at)?;
        let local_hash = match local {
            Some(m) if m.kind == Kind::File => hash_local(root, at)?.map(|(h, _)| h.digest().hex()),
            _ => None,
        };
        if !root.move_aside(at, q, &dest)? {
            return Ok(());
        }
        self.shared
            .counters
            .quarantined
            .fetch_add(1, Ordering::Relaxed);
        let record = serde_json::json!({
            "set": set, "path": path.to_string(), "node": self.shared.node_id, "term": term, "index": index,
            "local_hash": local_hash, "reason": why, "time_unix_ms": unix_ms(),
            "stored_at": format!("{set}/{stamp}/{path}"),
        });
        let line = format!("{record}\n");
        let file = self
            .shared
            .data_dir
            .join("quarantine")
            .join("records.jsonl");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, line.as_bytes())?;
                f.sync_all()
            });
        if let Err(e) = written {
            warn!("cannot append to {}: {e}", file.display());
        }
        warn!(set, path = %path, index, term, "moved the local version of {path} in sync set {set:?} to quarantine ({why}); `clusterctl conflicts` lists it");
        Ok(())
    }

    /// Removes what stands at `path` when the cluster knows it (`known`: it
    /// is what this node last wrote or the committed version), else moves it
    /// to quarantine with `why`.
    #[allow(clippy::too_many_arguments)]
    fn clear_way(
        &self,
        known: bool,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        index: u64,
        term: u64,
        why: &str,
    ) -> Result<(), FsError> {
        if known {
            root.remove(&comps(path))?;
            Ok(())
        } else {
            self.quarantine(&set.name, root, path, index, term, why)
        }
    }

    /// Whether the local file at `path` is one the cluster knows: what this
    /// node last wrote or read there, or the committed `previous` version.
    fn local_is_known(
        &self,
        set: &str,
        path: &SetPath,
        local: &FileDigest,
        previous: Option<&Entry>,
    ) -> bool {
        self.shared
            .record(set, path)
            .is_some_and(|r| r.digest.get() == *local)
            || previous
                .and_then(|p| p.digest)
                .is_some_and(|d| d.get() == *local)
    }

    /// The `len` bytes at `offset` of staged upload `upload` (removed
    /// afterwards when `remove`), or why the put cannot use them.
    fn read_staged(
        &self,
        upload: u64,
        offset: u64,
        len: u64,
        remove: bool,
    ) -> Result<Vec<u8>, PutOutcome> {
        if len > self.shared.staging_limit()
            || offset.saturating_add(len) > self.shared.upload_limit()
        {
            return Err(PutOutcome::Refused(format!(
                "its staged patch claims {len} bytes at {offset}, more than any sync set's max_file_size allows"
            )));
        }
        let staged = self.shared.staged_path(upload);
        // Read exactly `len` bytes, never what a sparse file claims.
        let read = std::fs::File::open(&staged).and_then(|f| {
            let mut b = vec![0u8; len as usize];
            f.read_exact_at(&mut b, offset)?;
            Ok(b)
        });
        match read {
            Ok(b) => {
                if remove {
                    let _ = std::fs::remove_file(&staged);
                }
                Ok(b)
            }
            Err(_) => Err(PutOutcome::Missing(
                "its staged content is not here (this node was not reachable when the leader staged it)".into(),
            )),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn put_file(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        entry: &Entry,
        content: &Content,
        previous: Option<&Entry>,
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<PutOutcome, FsError> {
        let target = entry.digest.expect("a put carries a digest").get();
        let c = comps(path);
        let meta = fs_meta(&entry.meta);
        let local = root.stat(&c)?;
        // What the final rename may displace without a second look: the
        // file checked here, or nothing once it was moved aside.
        let mut expect = match local {
            Some(m) if m.kind == Kind::File => Expect::File {
                ino: m.ino,
                dev: m.dev,
                len: m.len,
                mtime_ns: m.mtime_ns,
            },
            _ => Expect::Absent,
        };
        // What the local file holds, by record when lstat says it is untouched.
        let mut local_digest: Option<FileDigest> = None;
        let mut local_hasher: Option<FileHasher> = None;
        match local {
            Some(m) if m.kind == Kind::File => {
                let rec = self.shared.record(&set.name, path);
                if let Some(r) = rec.filter(|r| unchanged_since(r, &m)) {
                    local_digest = Some(r.digest.get());
                } else if let Some((h, _)) = hash_local(root, &c)? {
                    local_digest = Some(h.digest());
                    local_hasher = Some(h);
                }
            }
            Some(m) => {
                let known = previous.is_some_and(|p| p.meta.kind == entry_kind(m.kind));
                self.clear_way(
                    known,
                    set,
                    root,
                    path,
                    index,
                    term,
                    "a different kind of entry stood where the cluster put a file",
                )?;
            }
            None => {}
        }
        if let (Some(m), true) = (local, local_digest == Some(target)) {
            if set.hard_links && m.nlink > 1 {
                // Other names share this inode here, but the committed
                // version is this name's own (a `Put` ends its links, see
                // `FileOp::Link`): give it an inode of its own first, so
                // the others keep their metadata.
                return self.own_inode(set, root, path, entry, expect, index, term, store);
            }
            // Replayed, or the same bytes: only metadata may differ.
            let now = self.settle_meta(root, &c, &m, &entry.meta)?;
            self.settle_xattrs(set, root, path, entry)?;
            self.put_record(&set.name, path, record_of(&now, &target), store);
            return Ok(PutOutcome::Done);
        }
        if let Some(d) = local_digest {
            if !self.local_is_known(&set.name, path, &d, previous) {
                self.quarantine(
                    &set.name,
                    root,
                    path,
                    index,
                    term,
                    "it differed from what the cluster last committed",
                )?;
                local_digest = None;
                local_hasher = None;
                expect = Expect::Absent;
            }
        }
        let patch_bytes = match content {
            Content::Unchanged => {
                return Ok(PutOutcome::Missing(
                    "metadata-only change, but the local content is not the committed one".into(),
                ))
            }
            Content::Inline(b) => std::borrow::Cow::Borrowed(&b[..]),
            // A `Staged` upload holds this one patch and goes with it; a
            // `Blob`'s is the batch's, removed once the batch applied.
            Content::Staged { upload, len } => match self.read_staged(*upload, 0, *len, true) {
                Ok(b) => std::borrow::Cow::Owned(b),
                Err(outcome) => return Ok(outcome),
            },
            Content::Blob {
                upload,
                offset,
                len,
            } => {
                // Made into a finished file when it was staged: linked in.
                let dir = self.shared.finished_dir(*upload);
                let name = Shared::finished_name(*offset, &target);
                if dir.join(&name).symlink_metadata().is_ok() {
                    return self.put_finished(
                        set, root, path, entry, *upload, *offset, expect, index, term, store,
                    );
                }
                match self.read_staged(*upload, *offset, *len, false) {
                    Ok(b) => std::borrow::Cow::Owned(b),
                    Err(outcome) => return Ok(outcome),
                }
            }
        };
        let patch = match Patch::decode(&patch_bytes) {
            Ok(p) => p,
            Err(e) => return Ok(PutOutcome::Refused(format!("its patch is unusable: {e}"))),
        };
        if let Some(base) = patch.base() {
            if local_digest != Some(*base) {
                return Ok(PutOutcome::Missing(format!(
                    "the patch is against {base}, which this node does not hold"
                )));
            }
        }
        self.ensure_parents(set, root, path, index, term)?;
        let written: FileMeta;
        if let Patch::Append { base, .. } = &patch {
            let key = (set.name.clone(), path.clone());
            let hasher = match local_hasher.or_else(|| {
                self.shared
                    .append_hashers
                    .lock()
                    .unwrap()
                    .get(&key)
                    .filter(|(h, _)| h.digest() == *base)
                    .map(|(h, _)| h.clone())
            }) {
                Some(h) => h,
                None => match hash_local(root, &c)? {
                    Some((h, _)) => h,
                    None => return Ok(PutOutcome::Missing("the file to append to is gone".into())),
                },
            };
            let tail = match delta::apply_tail(&hasher, &patch, &target, set.max_file_size) {
                Ok(t) => t,
                Err(e) => {
                    return Ok(PutOutcome::Refused(format!(
                        "the appended bytes do not verify: {e}"
                    )))
                }
            };
            written = root.append_file(&c, base.len, &tail, &meta)?;
            // Extended in place, so the attributes are too.
            self.settle_xattrs(set, root, path, entry)?;
            let mut h = hasher;
            h.update(&tail);
            if let Ok(Some((file, _))) = root.open_file(&c) {
                if let Ok(fp) = fingerprint(&file, h.len()) {
                    self.shared
                        .append_hashers
                        .lock()
                        .unwrap()
                        .insert(key, (h, fp));
                }
            }
        } else {
            let base_bytes = match patch.base() {
                Some(_) => match root.read_file(&c, set.max_file_size)? {
                    Some((b, _)) => Some(b),
                    None => return Ok(PutOutcome::Missing("the base file vanished".into())),
                },
                None => None,
            };
            let new = match delta::apply(base_bytes.as_deref(), &patch, &target, set.max_file_size)
            {
                Ok(n) => n,
                Err(e) => {
                    return Ok(PutOutcome::Refused(format!(
                        "the patch does not rebuild the committed version: {e}"
                    )))
                }
            };
            // The caller fsyncs the directory once for the whole batch.
            let xattrs = set.xattrs.then_some(&entry.xattrs[..]);
            let replaced =
                root.replace_file_guarded(&c, &new, &meta, &target.hash, false, xattrs, expect)?;
            self.set_aside_edited_during_write(&set.name, root, &replaced, path, index, term)?;
            written = replaced.meta;
            self.xattrs_notice(set, root);
            if set.keeps_signature(new.len() as u64) {
                store.put_signature(
                    &set.name,
                    path,
                    &delta::BlockSignature::compute_hashed(&new, target).to_bytes(),
                );
            }
        }
        // Recorded from the descriptor we wrote through, never by name: an
        // edit made a moment later must still look like an edit.
        self.put_record(&set.name, path, record_of(&written, &target), store);
        Ok(PutOutcome::Done)
    }

    /// Puts the committed version of `entry` at `path` from the finished
    /// file made from the patch at `offset` of `upload` (see
    /// [`Shared::finish_upload`]): linked in when
    /// the set is on the same filesystem as `data_dir`, else copied. Its
    /// content was checked against the digest before it got that name.
    #[allow(clippy::too_many_arguments)]
    fn put_finished(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        entry: &Entry,
        upload: u64,
        offset: u64,
        expect: Expect,
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<PutOutcome, FsError> {
        let target = entry.digest.expect("a put carries a digest").get();
        let c = comps(path);
        let meta = fs_meta(&entry.meta);
        let xattrs = set.xattrs.then_some(&entry.xattrs[..]);
        let dir = self.shared.finished_dir(upload);
        let name = Shared::finished_name(offset, &target);
        let finished = dir.join(&name);
        let unreadable = |e: std::io::Error| {
            PutOutcome::Missing(format!("its finished file cannot be read: {e}"))
        };
        if target.len > set.max_file_size {
            return Ok(PutOutcome::Refused(format!(
                "it is {} bytes, more than the set's max_file_size ({})",
                target.len, set.max_file_size
            )));
        }
        self.ensure_parents(set, root, path, index, term)?;
        let adopted =
            root.adopt_file_guarded(&c, &dir, &name, &meta, target.len, xattrs, expect)?;
        // With the content, when it passed through memory.
        let (replaced, content) = match adopted {
            Some(r) => {
                self.shared
                    .counters
                    .files_linked
                    .fetch_add(1, Ordering::Relaxed);
                (r, None)
            }
            None => {
                // Another filesystem, or a labelling directory: copied, as
                // any other version.
                let data = match std::fs::read(&finished) {
                    Ok(b) => b,
                    Err(e) => return Ok(unreadable(e)),
                };
                let r = root.replace_file_guarded(
                    &c,
                    &data,
                    &meta,
                    &target.hash,
                    false,
                    xattrs,
                    expect,
                )?;
                (r, Some(data))
            }
        };
        self.set_aside_edited_during_write(&set.name, root, &replaced, path, index, term)?;
        self.xattrs_notice(set, root);
        // The signature is kept for when this node leads.
        if set.keeps_signature(target.len) {
            match content {
                Some(data) => {
                    let sig = delta::BlockSignature::compute_hashed(&data, target).to_bytes();
                    store.put_signature(&set.name, path, &sig);
                }
                // Linked in without passing through memory: signed once this
                // node is idle (see `sign_linked`).
                None => self.shared.defer_signature(&set.name, path, target),
            }
        }
        self.put_record(&set.name, path, record_of(&replaced.meta, &target), store);
        Ok(PutOutcome::Done)
    }

    /// Replaces the file at `path`, which holds the committed content of
    /// `entry` but shares its inode with other names here, by a copy of its
    /// own (atomically, verified, with the committed metadata), leaving the
    /// other names on the old inode.
    #[allow(clippy::too_many_arguments)]
    fn own_inode(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        entry: &Entry,
        expect: Expect,
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<PutOutcome, FsError> {
        let target = entry.digest.expect("a file has a digest").get();
        let c = comps(path);
        let Some((data, _)) = root.read_file(&c, set.max_file_size)? else {
            return Ok(PutOutcome::Missing("the file vanished".into()));
        };
        if delta::digest(&data) != target {
            return Ok(PutOutcome::Missing(
                "the file changed while it was copied".into(),
            ));
        }
        let xattrs = set.xattrs.then_some(&entry.xattrs[..]);
        let replaced = root.replace_file_guarded(
            &c,
            &data,
            &fs_meta(&entry.meta),
            &target.hash,
            true,
            xattrs,
            expect,
        )?;
        self.set_aside_edited_during_write(&set.name, root, &replaced, path, index, term)?;
        self.put_record(&set.name, path, record_of(&replaced.meta, &target), store);
        Ok(PutOutcome::Done)
    }

    /// The metadata of `target` when it holds `want` here (by its record
    /// when `lstat` says it is untouched, else by hashing it): the file a
    /// hard link to it may share.
    fn holds_committed(
        &self,
        set: &SetRuntime,
        root: &Root,
        target: &SetPath,
        want: &FileDigest,
    ) -> Result<Option<FileMeta>, FsError> {
        let tc = comps(target);
        let Some(m) = root.stat(&tc)?.filter(|m| m.kind == Kind::File) else {
            return Ok(None);
        };
        if let Some(r) = self
            .shared
            .record(&set.name, target)
            .filter(|r| unchanged_since(r, &m))
        {
            return Ok((r.digest.get() == *want).then_some(m));
        }
        Ok(match hash_local(root, &tc)? {
            Some((h, now)) if h.digest() == *want && now == m => Some(m),
            _ => None,
        })
    }

    /// Makes `path` a hard link of its committed primary (`entry.link`),
    /// atomically: a local file that differs from what the cluster last
    /// committed is quarantined first, as before any replace. When the
    /// primary does not hold the committed content here, the path is
    /// marked missing; the fetcher brings the primary's content and the
    /// link is made then.
    #[allow(clippy::too_many_arguments)]
    fn link_file(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        entry: &Entry,
        previous: Option<&Entry>,
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<(), FsError> {
        let target = entry.link.as_ref().expect("a link entry names its primary");
        let want = entry.digest.expect("a link is a file").get();
        let Some(tm) = self.holds_committed(set, root, target, &want)? else {
            debug!(set = %set.name, path = %path, "the primary {target} of hard link {path} lacks its committed content here; fetching it first");
            self.mark_missing(&set.name, path, entry, store);
            return Ok(());
        };
        let c = comps(path);
        self.ensure_parents(set, root, path, index, term)?;
        let mut expect = Expect::Absent;
        match root.stat(&c)? {
            Some(m) if m.kind == Kind::File => {
                if m.ino != tm.ino || m.dev != tm.dev {
                    let local = match self
                        .shared
                        .record(&set.name, path)
                        .filter(|r| unchanged_since(r, &m))
                    {
                        Some(r) => Some(r.digest.get()),
                        None => hash_local(root, &c)?.map(|(h, _)| h.digest()),
                    };
                    let known = local.is_some_and(|d| {
                        d == want || self.local_is_known(&set.name, path, &d, previous)
                    });
                    if known {
                        expect = Expect::File {
                            ino: m.ino,
                            dev: m.dev,
                            len: m.len,
                            mtime_ns: m.mtime_ns,
                        };
                    } else {
                        self.quarantine(
                            &set.name,
                            root,
                            path,
                            index,
                            term,
                            "it differed from what the cluster last committed",
                        )?;
                    }
                }
            }
            Some(m) => {
                let known = previous.is_some_and(|p| p.meta.kind == entry_kind(m.kind));
                self.clear_way(
                    known,
                    set,
                    root,
                    path,
                    index,
                    term,
                    "a different kind of entry stood where the cluster put a hard link",
                )?;
            }
            None => {}
        }
        let replaced = root.link_file_guarded(&c, &comps(target), &tm, expect)?;
        self.quarantine_displaced(
            &set.name,
            root,
            &replaced.displaced,
            path,
            index,
            term,
            "it was edited while the hard link was being made",
        )?;
        self.put_record(&set.name, path, record_of(&replaced.meta, &want), store);
        self.clear_missing(&set.name, path, store);
        Ok(())
    }

    /// Gives an existing file the committed metadata and returns what its
    /// record must say: the `lstat` taken before, with the fields we set, so
    /// an edit racing with us still differs from the record.
    fn settle_meta(
        &self,
        root: &Root,
        c: &[&[u8]],
        before: &FileMeta,
        want: &Meta,
    ) -> Result<FileMeta, FsError> {
        let set = fs_meta(want);
        if meta_matches(&set, before) {
            return Ok(*before);
        }
        root.set_meta(c, &set)?;
        Ok(FileMeta {
            mode: set.mode,
            uid: set.uid,
            gid: set.gid,
            mtime_ns: set.mtime_ns,
            ..*before
        })
    }

    /// Gives an existing file or directory the committed extended
    /// attributes, in sets with `xattrs = true` (others' are never touched).
    /// Like mode or owner, a local difference is fixed, not quarantined.
    fn settle_xattrs(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        entry: &Entry,
    ) -> Result<(), FsError> {
        if !set.xattrs || entry.meta.kind == EntryKind::Symlink {
            return Ok(());
        }
        root.set_xattrs(&comps(path), &fs_meta(&entry.meta), &entry.xattrs)?;
        self.xattrs_notice(set, root);
        Ok(())
    }

    /// Says once per set (and process) that its filesystem here keeps no
    /// extended attributes; applying goes on without them.
    fn xattrs_notice(&self, set: &SetRuntime, root: &Root) {
        if set.xattrs && root.xattrs_unsupported_notice() {
            let msg = format!("sync set {:?} has xattrs = true, but the filesystem of {} on this node does not support extended attributes (ENOTSUP); files are replicated without them here. Put the set on a filesystem with xattr and ACL support (ext4, xfs, btrfs) or set xattrs = false on every node", set.name, set.path.display());
            self.shared.note_error(&set.name, msg);
        }
    }

    /// Creates missing parent directories (their metadata comes with their
    /// own Dir ops; until then they are 0755).
    fn ensure_parents(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        index: u64,
        term: u64,
    ) -> Result<(), FsError> {
        let all = comps(path);
        for depth in 1..all.len() {
            let prefix = &all[..depth];
            match root.stat(prefix)? {
                Some(m) if m.kind == Kind::Dir => {}
                Some(_) => {
                    let p =
                        SetPath::from_network(&prefix.join(&b'/')).expect("prefix of a valid path");
                    self.quarantine(
                        &set.name,
                        root,
                        &p,
                        index,
                        term,
                        "a non-directory stood where the cluster has a directory",
                    )?;
                    root.make_dir(prefix, &default_dir_meta())?;
                }
                None => root.make_dir(prefix, &default_dir_meta())?,
            }
        }
        Ok(())
    }

    fn make_dir(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        meta: &Meta,
        index: u64,
        term: u64,
    ) -> Result<(), FsError> {
        let c = comps(path);
        self.ensure_parents(set, root, path, index, term)?;
        if let Some(m) = root.stat(&c)? {
            if m.kind != Kind::Dir {
                self.quarantine(
                    &set.name,
                    root,
                    path,
                    index,
                    term,
                    "a non-directory stood where the cluster has a directory",
                )?;
            }
        }
        root.make_dir(&c, &fs_meta(meta))
    }

    #[allow(clippy::too_many_arguments)]
    fn make_symlink(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        entry: &Entry,
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<(), FsError> {
        let c = comps(path);
        let target = entry.target.clone().unwrap_or_default();
        self.ensure_parents(set, root, path, index, term)?;
        match root.stat(&c)? {
            Some(m) if m.kind == Kind::Symlink => {
                if root.read_link(&c)?.as_deref() == Some(&target[..]) {
                    return Ok(());
                }
            }
            Some(m) if m.kind == Kind::File => {
                let known = match hash_local(root, &c)? {
                    Some((h, _)) => self.local_is_known(&set.name, path, &h.digest(), None),
                    None => true,
                };
                self.clear_way(
                    known,
                    set,
                    root,
                    path,
                    index,
                    term,
                    "it differed from what the cluster last committed",
                )?;
            }
            Some(_) => self.quarantine(
                &set.name,
                root,
                path,
                index,
                term,
                "a directory stood where the cluster has a symlink",
            )?,
            None => {}
        }
        self.forget_records(&set.name, path, store);
        root.make_symlink(&c, &target)
    }

    #[allow(clippy::too_many_arguments)]
    fn remove(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        removed: &[(SetPath, Entry)],
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<(), FsError> {
        // Files under the path that someone changed here go to quarantine first.
        for (p, e) in removed {
            if e.meta.kind != EntryKind::File {
                continue;
            }
            let c = comps(p);
            if let Some(m) = root.stat(&c)? {
                if m.kind != Kind::File {
                    continue;
                }
                let rec = self.shared.record(&set.name, p);
                if rec.is_some_and(|r| unchanged_since(&r, &m)) {
                    continue;
                }
                if let Some((h, _)) = hash_local(root, &c)? {
                    if !self.local_is_known(&set.name, p, &h.digest(), Some(e)) {
                        self.quarantine(
                            &set.name,
                            root,
                            p,
                            index,
                            term,
                            "it was changed here, and the cluster deleted it",
                        )?;
                    }
                }
            }
        }
        // Files under the path that the cluster never had (made here) go to
        // quarantine too, rather than out with the directory.
        let known: HashSet<&SetPath> = removed.iter().map(|(p, _)| p).collect();
        let mut local = BTreeSet::new();
        local_subtree(set, root, path, &mut local);
        for p in local {
            if known.contains(&p) {
                continue;
            }
            if let Some(m) = root.stat(&comps(&p))? {
                if m.kind != Kind::Dir {
                    self.quarantine(
                        &set.name,
                        root,
                        &p,
                        index,
                        term,
                        "the cluster deleted the directory holding it",
                    )?;
                }
            }
        }
        // Excluded entries under a removed directory are this node's own:
        // keep the directory if any remain.
        if set.filter.is_excluded(path, true) {
            return Ok(());
        }
        let is_dir = root
            .stat(&comps(path))?
            .is_some_and(|m| m.kind == Kind::Dir);
        if is_dir && self.has_excluded_inside(set, root, path)? {
            for (p, _) in removed.iter().rev() {
                let c = comps(p);
                match root.stat(&c)? {
                    Some(m) if m.kind == Kind::Dir => {
                        let empty = root.list_dir(&c)?.is_none_or(|l| l.is_empty());
                        if empty {
                            root.remove(&c)?;
                        }
                    }
                    Some(_) => {
                        root.remove(&c)?;
                    }
                    None => {}
                }
            }
        } else {
            root.remove(&comps(path))?;
        }
        self.forget_records(&set.name, path, store);
        Ok(())
    }

    fn has_excluded_inside(
        &self,
        set: &SetRuntime,
        root: &Root,
        dir: &SetPath,
    ) -> Result<bool, FsError> {
        let c = comps(dir);
        let Some(listing) = root.list_dir(&c)? else {
            return Ok(false);
        };
        for (name, kind) in listing {
            let Ok(p) = dir.join(&name) else { continue };
            if set.filter.is_excluded(&p, kind == Kind::Dir) {
                return Ok(true);
            }
            if kind == Kind::Dir && self.has_excluded_inside(set, root, &p)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    #[allow(clippy::too_many_arguments)]
    fn rename(
        &self,
        set: &SetRuntime,
        root: &Root,
        from: &SetPath,
        to: &SetPath,
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<(), FsError> {
        let from_here = root.stat(&comps(from))?.is_some();
        let to_here = root.stat(&comps(to))?.is_some();
        if !from_here && to_here {
            // Replayed after a crash that came after the rename: done already.
            return Ok(());
        }
        if to_here {
            self.quarantine(
                &set.name,
                root,
                to,
                index,
                term,
                "something stood where the cluster moved another path",
            )?;
        }
        self.ensure_parents(set, root, to, index, term)?;
        // A rename within one root: move_aside onto the same root renames.
        let moved = root.move_aside(&comps(from), root, &comps(to))?;
        for (k, r) in self.shared.store.records_under(&set.name, from) {
            self.shared.store.delete_record(store, &set.name, &k);
            let mut b = to.as_bytes().to_vec();
            b.extend_from_slice(&k.as_bytes()[from.as_bytes().len()..]);
            if let (true, Ok(nk)) = (moved, SetPath::from_network(&b)) {
                self.shared.store.put_record(store, &set.name, &nk, &r);
            }
        }
        if !moved {
            // Nothing to move here: the content under `to` is fetched.
            let m = self.shared.manifest.read().unwrap();
            let entries: Vec<(SetPath, Entry)> = m
                .set(&set.name)
                .map(|s| s.subtree(to).map(|(k, e)| (k.clone(), e.clone())).collect())
                .unwrap_or_default();
            drop(m);
            for (k, e) in entries {
                self.mark_missing(&set.name, &k, &e, store);
            }
        }
        Ok(())
    }

    /// The manifest and the index it stands for.
    pub fn snapshot_now(&self) -> (u64, Vec<u8>) {
        (
            self.shared.applied.load(Ordering::SeqCst),
            self.shared.manifest.read().unwrap().encode(),
        )
    }

    /// Restores from a snapshot now (at start-up, before [`Applier::run`]).
    pub fn restore_now(&mut self, index: u64, data: &[u8]) -> Result<(), String> {
        self.restore(index, data)
    }

    fn restore(&mut self, index: u64, data: &[u8]) -> Result<(), String> {
        if self.shared.applied.load(Ordering::SeqCst) >= index {
            let _ = self.out.send(Applied::Index(index));
            return Ok(());
        }
        let manifest = Manifest::decode(data, 1 << 30)
            .map_err(|e| format!("the leader's snapshot at index {index} is unusable: {e}"))?;
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
        batch.set_applied(index);
        self.shared.missing.lock().unwrap().clear();
        *self.shared.manifest.write().unwrap() = manifest;
        self.shared.store.write(batch).map_err(|e| e.to_string())?;
        self.shared.applied.store(index, Ordering::SeqCst);
        for set in self.shared.sets.clone() {
            self.deferred.insert(set.name.clone());
        }
        self.retry_deferred();
        let _ = self.out.send(Applied::Index(index));
        Ok(())
    }

    fn retry_deferred(&mut self) {
        if self.shared.leading.load(Ordering::SeqCst) {
            // The leader's trees are the source: nothing to square them with.
            for name in std::mem::take(&mut self.deferred) {
                self.shared.set_skipping(&name, false);
            }
            return;
        }
        for name in std::mem::take(&mut self.deferred) {
            let Some(set) = self.shared.set(&name).cloned() else {
                continue;
            };
            let Some(root) = self.roots.remove(&name) else {
                continue;
            };
            match has_marker(&set, &root) {
                Ok(true) => {
                    self.deferred.insert(name.clone());
                }
                Ok(false) => {
                    self.shared.set_skipping(&name, false);
                    let mut store = StoreBatch::default();
                    let touched = match self.reconcile_local(&set, &root, &mut store) {
                        Ok(touched) => touched,
                        Err(e) => {
                            self.shared
                                .note_error(&name, format!("reconciling with the manifest: {e}"));
                            self.deferred.insert(name.clone());
                            true
                        }
                    };
                    if let Err(e) = self.shared.store.write(store) {
                        let _ = self.out.send(Applied::Failed(e.to_string()));
                    }
                    // A periodic pass that found everything in place must
                    // not reload the service (`on_change`) every period.
                    if touched {
                        let _ = self.out.send(Applied::SetChanged(name.clone()));
                    }
                }
                Err(e) => {
                    self.shared
                        .note_error(&name, format!("cannot look for skip_while markers: {e}"));
                    self.deferred.insert(name.clone());
                }
            }
            self.roots.insert(name, root);
        }
    }

    /// Makes the local tree match the manifest where it can without content
    /// (directories, links, metadata, deletions) and marks the files whose
    /// content must be fetched. Returns whether it found anything not in
    /// place (and so may have changed the tree).
    fn reconcile_local(
        &mut self,
        set: &SetRuntime,
        root: &Root,
        store: &mut StoreBatch,
    ) -> Result<bool, FsError> {
        let index = self.shared.applied.load(Ordering::SeqCst);
        let term = self.shared.term.load(Ordering::SeqCst);
        // The walk keeps only what needs attention: paths the manifest does
        // not have, and committed paths not settled here (see
        // `Applier::settled`); the rest are only marked as seen.
        let mut walked = SeenPaths::default();
        let missing_here: HashSet<SetPath> = self
            .shared
            .missing
            .lock()
            .unwrap()
            .keys()
            .filter(|(s, _)| *s == set.name)
            .map(|(_, p)| p.clone())
            .collect();
        let (found, _) = {
            let m = self.shared.manifest.read().unwrap();
            let committed = m.set(&set.name);
            walk_keeping(set, root, |f| {
                walked.insert(&f.path);
                match committed.and_then(|sm| sm.entries.get(&f.path)) {
                    None => true,
                    Some(e) => missing_here.contains(&f.path) || !self.settled(set, e, f),
                }
            })?
        };
        // Directories whose entries this pass changed, to be given their
        // committed metadata (an mtime) again at the end.
        let mut parents: BTreeSet<SetPath> = BTreeSet::new();
        // A set the cluster has never committed anything for is one the
        // leader has not published yet (a fresh cluster whose nodes already
        // hold the files): nothing here is stray until it has.
        let strays: Vec<&Found> = {
            let m = self.shared.manifest.read().unwrap();
            match m.set(&set.name) {
                Some(sm) if set.mode == SyncMode::Mirror && sm.progress.seq > 0 => found
                    .iter()
                    .filter(|f| {
                        !sm.entries.contains_key(&f.path)
                            && set.holds(&f.path, f.meta.kind == Kind::Dir)
                    })
                    .collect(),
                _ => Vec::new(),
            }
        };
        let mut touched = !strays.is_empty();
        // Deepest first, so a directory's contents go before it.
        for f in strays.iter().rev() {
            let ours = f.meta.kind == Kind::File
                && self
                    .shared
                    .record(&set.name, &f.path)
                    .is_some_and(|r| unchanged_since(&r, &f.meta));
            let c = comps(&f.path);
            parents.extend(f.path.parent());
            // A symlink carries no record of who made it: set it aside
            // like any local edit rather than let it vanish unrecorded.
            if ours {
                root.remove(&c)?;
            } else if f.meta.kind == Kind::Dir {
                if root.list_dir(&c)?.is_none_or(|l| l.is_empty()) {
                    root.remove(&c)?;
                }
            } else {
                self.quarantine(
                    &set.name,
                    root,
                    &f.path,
                    index,
                    term,
                    "the cluster does not have it",
                )?;
            }
        }
        drop(strays);
        // Missing paths the manifest no longer has (deleted or renamed since)
        // have nothing left to fetch.
        {
            let m = self.shared.manifest.read().unwrap();
            let mut missing = self.shared.missing.lock().unwrap();
            let gone: Vec<(String, SetPath)> = missing
                .keys()
                .filter(|(s, p)| *s == set.name && m.get(s, p).is_none())
                .cloned()
                .collect();
            for k in gone {
                store.delete_missing(&k.0, &k.1);
                missing.remove(&k);
            }
        }
        let mut dirs = Vec::new();
        // Sets with `hard_links`: links are made once every file is
        // settled, and an inode here may be the file of one committed name
        // only (with its links): any other name on it gets its own.
        let mut links = Vec::new();
        let mut claimed: HashMap<(u64, u64), SetPath> = HashMap::new();
        // The manifest is read a slice at a time, so a pass over a large set
        // never holds a copy of it, nor its lock while files are written.
        let mut after: Option<SetPath> = None;
        loop {
            let slice: Vec<(SetPath, Entry)> = {
                let m = self.shared.manifest.read().unwrap();
                let Some(sm) = m.set(&set.name) else { break };
                let from = match &after {
                    Some(a) => std::ops::Bound::Excluded(a),
                    None => std::ops::Bound::Unbounded,
                };
                sm.entries
                    .range::<SetPath, _>((from, std::ops::Bound::Unbounded))
                    .take(RECONCILE_SLICE)
                    .map(|(k, e)| (k.clone(), e.clone()))
                    .collect()
            };
            let Some((last, _)) = slice.last() else { break };
            after = Some(last.clone());
            for (path, entry) in slice {
                if !set.holds(&path, entry.meta.kind == EntryKind::Dir) {
                    continue;
                }
                if set.hard_links && entry.link.is_some() {
                    links.push((path, entry));
                    continue;
                }
                let local = match found.binary_search_by(|f| f.path.cmp(&path)) {
                    Ok(i) => Some(found[i].meta),
                    Err(_) if walked.contains(&path) => continue, // settled
                    Err(_) => None,
                };
                touched = true;
                if entry.meta.kind != EntryKind::Dir {
                    parents.extend(path.parent());
                }
                let result = self.reconcile_entry(
                    set,
                    root,
                    &path,
                    &entry,
                    local,
                    &mut claimed,
                    &mut dirs,
                    index,
                    term,
                    store,
                );
                if let Err(e) = result {
                    self.shared.note_error(&set.name, format!("{path}: {e}"));
                }
            }
        }
        touched |= !links.is_empty();
        for (path, entry) in &links {
            parents.extend(path.parent());
            if let Err(e) = self.link_file(set, root, path, entry, None, index, term, store) {
                self.mark_missing(&set.name, path, entry, store);
                self.shared.note_error(&set.name, format!("{path}: {e}"));
            }
        }
        for (path, meta) in dirs.iter().rev() {
            parents.remove(path);
            let _ = root.set_meta(&comps(path), &fs_meta(meta));
        }
        for path in parents.iter().rev() {
            self.settle_dir_meta(&set.name, root, path);
        }
        Ok(touched)
    }

    /// Whether the committed `entry` is exactly what the walk `found` at
    /// its path, as far as a reconcile pass would check it, so the pass
    /// need not look at it again. Sets that keep extended attributes or
    /// hard links are always checked in full (neither shows in `lstat`).
    fn settled(&self, set: &SetRuntime, entry: &Entry, found: &Found) -> bool {
        if set.xattrs || set.hard_links {
            return false;
        }
        let same_meta = || meta_matches(&fs_meta(&entry.meta), &found.meta);
        match (entry.meta.kind, found.meta.kind) {
            (EntryKind::Dir, Kind::Dir) => same_meta(),
            (EntryKind::File, Kind::File) => {
                entry.link.is_none()
                    && entry.digest.is_some_and(|d| {
                        self.shared
                            .record(&set.name, &found.path)
                            .is_some_and(|r| unchanged_since(&r, &found.meta) && r.digest == d)
                    })
                    && same_meta()
            }
            _ => false,
        }
    }

    /// [`Applier::reconcile_local`] for one committed entry that is not a
    /// hard link: makes the tree hold it, or marks it missing. `walked` is
    /// what the pass's walk found at `path` (`None`: stat it now).
    #[allow(clippy::too_many_arguments)]
    fn reconcile_entry(
        &mut self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        entry: &Entry,
        walked: Option<FileMeta>,
        claimed: &mut HashMap<(u64, u64), SetPath>,
        dirs: &mut Vec<(SetPath, Meta)>,
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<(), FsError> {
        let c = comps(path);
        match entry.meta.kind {
            EntryKind::Dir => {
                dirs.push((path.clone(), entry.meta.clone()));
                self.make_dir(set, root, path, &entry.meta, index, term)?;
                self.settle_xattrs(set, root, path, entry)
            }
            EntryKind::Symlink => self.make_symlink(set, root, path, entry, index, term, store),
            // Per path: one path that cannot be checked (a symlink
            // planted where a directory should be, say) must not keep
            // the rest of the set from converging.
            EntryKind::File => {
                let want = entry.digest.expect("files have digests").get();
                let local = match walked {
                    Some(m) => Some(m),
                    None => root.stat(&c)?,
                };
                let mut recorded = None;
                let have = match local {
                    Some(m) if m.kind == Kind::File => {
                        recorded = self
                            .shared
                            .record(&set.name, path)
                            .filter(|r| unchanged_since(r, &m));
                        match recorded {
                            Some(r) => Some(r.digest.get()),
                            None => hash_local(root, &c)?.map(|(h, _)| h.digest()),
                        }
                    }
                    _ => None,
                };
                let Some(m) = local.filter(|_| have == Some(want)) else {
                    self.mark_missing(&set.name, path, entry, store);
                    return Ok(());
                };
                if set.hard_links && m.nlink > 1 {
                    if let Some(other) = claimed.get(&(m.dev, m.ino)) {
                        debug!(set = %set.name, path = %path, "{path} shares its inode with {other} here, but the cluster has them as separate files");
                        let expect = Expect::File {
                            ino: m.ino,
                            dev: m.dev,
                            len: m.len,
                            mtime_ns: m.mtime_ns,
                        };
                        match self.own_inode(set, root, path, entry, expect, index, term, store)? {
                            PutOutcome::Done => self.clear_missing(&set.name, path, store),
                            _ => self.mark_missing(&set.name, path, entry, store),
                        }
                        return Ok(());
                    }
                    claimed.insert((m.dev, m.ino), path.clone());
                }
                let now = self.settle_meta(root, &c, &m, &entry.meta)?;
                self.settle_xattrs(set, root, path, entry)?;
                // An unchanged file keeps its record: rewriting every record
                // of a large set on every pass is most of what a pass wrote.
                let record = record_of(&now, &want);
                if recorded != Some(record) {
                    self.put_record(&set.name, path, record, store);
                }
                self.clear_missing(&set.name, path, store);
                Ok(())
            }
        }
    }

    /// Gives the directory holding `path` its committed metadata again
    /// (writing an entry in it changed its mtime).
    fn settle_parent_meta(&self, set: &str, root: &Root, path: &SetPath) {
        if let Some(parent) = path.parent() {
            self.settle_dir_meta(set, root, &parent);
        }
    }

    /// Gives the directory `dir` its committed metadata, if the manifest
    /// has it as a directory.
    fn settle_dir_meta(&self, set: &str, root: &Root, dir: &SetPath) {
        let meta = self
            .shared
            .manifest
            .read()
            .unwrap()
            .get(set, dir)
            .map(|e| e.meta.clone());
        if let Some(meta) = meta.filter(|m| m.kind == EntryKind::Dir) {
            let _ = root.set_meta(&comps(dir), &fs_meta(&meta));
        }
    }

    fn apply_fetched(&mut self, f: Fetched) {
        let key = (f.set.clone(), f.path.clone());
        let still_wanted = self
            .shared
            .missing
            .lock()
            .unwrap()
            .get(&key)
            .map(|d| d.get())
            == Some(f.want);
        let entry = self
            .shared
            .manifest
            .read()
            .unwrap()
            .get(&f.set, &f.path)
            .cloned();
        let (Some(entry), true) = (entry, still_wanted) else {
            return;
        };
        if entry.digest.map(|d| d.get()) != Some(f.want) {
            return;
        }
        let Some(set) = self.shared.set(&f.set).cloned() else {
            return;
        };
        if self.deferred.contains(&f.set) {
            return;
        }
        let Some(root) = self.roots.remove(&f.set) else {
            return;
        };
        let mut store = StoreBatch::default();
        let index = self.shared.applied.load(Ordering::SeqCst);
        if let Some(primary) = entry.link.as_ref().filter(|_| set.hard_links) {
            // A hard link travels as none of its bytes: the fetcher asks for
            // it (with no content) once its primary is no longer missing.
            match self.holds_committed(&set, &root, primary, &f.want) {
                Ok(Some(_)) => {
                    let term = self.shared.term.load(Ordering::SeqCst);
                    if let Err(e) =
                        self.link_file(&set, &root, &f.path, &entry, None, index, term, &mut store)
                    {
                        self.shared.note_error(&f.set, format!("{}: {e}", f.path));
                    } else {
                        // Linking changed the directory's mtime.
                        self.settle_parent_meta(&f.set, &root, &f.path);
                        info!(set = %f.set, path = %f.path, "linked {} to {primary}", f.path);
                        let _ = self.out.send(Applied::SetChanged(f.set.clone()));
                    }
                }
                Ok(None) => {
                    // The primary here is not the committed version (edited
                    // by hand, say): it is fetched first.
                    let pentry = self
                        .shared
                        .manifest
                        .read()
                        .unwrap()
                        .get(&f.set, primary)
                        .cloned();
                    if let Some(pentry) = pentry {
                        self.mark_missing(&f.set, primary, &pentry, &mut store);
                    }
                }
                Err(e) => self.shared.note_error(&f.set, format!("{}: {e}", f.path)),
            }
            self.roots.insert(f.set.clone(), root);
            if let Err(e) = self.shared.store.write(store) {
                let _ = self.out.send(Applied::Failed(e.to_string()));
            }
            return;
        }
        self.shared
            .counters
            .bytes_fetched
            .fetch_add(f.patch.len() as u64, Ordering::Relaxed);
        match self.put_file(
            &set,
            &root,
            &f.path,
            &entry,
            &Content::Inline(f.patch),
            None,
            index,
            0,
            &mut store,
        ) {
            Ok(PutOutcome::Done) => {
                self.clear_missing(&f.set, &f.path, &mut store);
                let parent: Vec<Vec<u8>> = f
                    .path
                    .parent()
                    .map(|p| p.components().map(<[u8]>::to_vec).collect())
                    .unwrap_or_default();
                if let Err(e) = root.sync_dir(&parent) {
                    self.shared.note_error(&f.set, format!("{}: {e}", f.path));
                }
                self.settle_parent_meta(&f.set, &root, &f.path);
                info!(set = %f.set, path = %f.path, "fetched the committed version of {}", f.path);
                let _ = self.out.send(Applied::SetChanged(f.set.clone()));
            }
            Ok(PutOutcome::Missing(why)) => {
                debug!(set = %f.set, path = %f.path, "fetched content unusable: {why}")
            }
            Ok(PutOutcome::Refused(why)) => {
                warn!(set = %f.set, path = %f.path, "refused the content a peer served for {} in sync set {:?}: {why}; nothing was written, another peer is asked next", f.path, f.set)
            }
            Err(e) => self.shared.note_error(&f.set, format!("{}: {e}", f.path)),
        }
        self.roots.insert(f.set.clone(), root);
        if let Err(e) = self.shared.store.write(store) {
            let _ = self.out.send(Applied::Failed(e.to_string()));
        }
    }
}

/// blake3 of the (up to) 4 KiB of `file` that end at `len`.
pub fn fingerprint(file: &std::fs::File, len: u64) -> std::io::Result<[u8; 32]> {
    let start = len.saturating_sub(4096);
    let mut buf = vec![0u8; (len - start) as usize];
    file.read_exact_at(&mut buf, start)?;
    Ok(*blake3::hash(&buf).as_bytes())
}

/// Every entry under `dir` here that belongs to the set (excluded ones left
/// out), never following symlinks and skipping temporary names.
pub fn local_subtree(set: &SetRuntime, root: &Root, dir: &SetPath, out: &mut BTreeSet<SetPath>) {
    let c = comps(dir);
    let Ok(Some(listing)) = root.list_dir(&c) else {
        return;
    };
    for (name, kind) in listing {
        if crate::fsroot::is_temp_name(&name) {
            continue;
        }
        let Ok(p) = dir.join(&name) else { continue };
        if !set.holds(&p, kind == Kind::Dir) {
            continue;
        }
        if kind == Kind::Dir {
            local_subtree(set, root, &p, out);
        }
        out.insert(p);
    }
}

fn entry_kind(k: Kind) -> EntryKind {
    match k {
        Kind::Dir => EntryKind::Dir,
        Kind::Symlink => EntryKind::Symlink,
        _ => EntryKind::File,
    }
}

fn default_dir_meta() -> FileMeta {
    let uid = unsafe { libc::geteuid() };
    let gid = unsafe { libc::getegid() };
    FileMeta::new(Kind::Dir, 0o755, uid, gid, unix_ms() as i128 * 1_000_000)
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

fn clean_staging(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STAGING_MAX_AGE);
        if old {
            let _ = match e.file_type().is_ok_and(|t| t.is_dir()) {
                true => std::fs::remove_dir_all(e.path()),
                false => std::fs::remove_file(e.path()),
            };
        }
    }
}

/// Runs `on_change` commands on followers: debounced per set, one at a time
/// per set, time-limited, exit status and output logged.
pub async fn run_on_change(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<String>) {
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
                    let Some(cmd) = shared.set(&set).and_then(|s| s.on_change.clone()) else { continue };
                    let ok = crate::hooks::run_command(&cmd, &[("CLUSTERD_SET", set.as_str())], LIMIT, &format!("on_change of sync set {set:?}")).await;
                    if !ok {
                        shared.counters.on_change_failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SyncMode, SyncSetConfig};

    #[test]
    fn owner_lookups_are_cached_until_the_user_database_changes_or_a_second_passes() {
        let meta = Meta {
            kind: EntryKind::File,
            mode: 0o640,
            uid: 1000,
            gid: 1000,
            user: Some(OwnerName::new("postfix")),
            group: Some(OwnerName::new("postdrop")),
            mtime_ns: 0,
        };
        let stamp = |ino| {
            Some(FileStamp {
                ino,
                len: 1,
                mtime_ns: 2,
                ctime_ns: 3,
            })
        };
        let lookups = std::cell::Cell::new(0);
        let mut ids = LocalIds::default();
        let t0 = Instant::now();
        let mut of = |stamps, now, uid: Option<u32>| {
            ids.of_with(
                &meta,
                stamps,
                now,
                |name| {
                    assert_eq!(name, "postfix");
                    lookups.set(lookups.get() + 1);
                    uid
                },
                |name| {
                    assert_eq!(name, "postdrop");
                    Some(90)
                },
            )
        };
        // Unknown here: the leader's numbers, and the answer is cached.
        assert_eq!(of([stamp(1), stamp(2)], t0, None), (1000, 90));
        assert_eq!(of([stamp(1), stamp(2)], t0, Some(7)), (1000, 90));
        assert_eq!(lookups.get(), 1);
        // /etc/passwd replaced (a replicated useradd): looked up again.
        assert_eq!(of([stamp(3), stamp(2)], t0, Some(7)), (7, 90));
        assert_eq!(lookups.get(), 2);
        assert_eq!(of([stamp(3), stamp(2)], t0, Some(8)), (7, 90));
        // Databases that are not those files: at the latest a second on.
        let later = t0 + OWNER_IDS_MAX_AGE;
        assert_eq!(of([stamp(3), stamp(2)], later, Some(8)), (8, 90));
        assert_eq!(lookups.get(), 3);
        // A database that vanished counts as a change too.
        assert_eq!(of([None, stamp(2)], later, Some(9)), (9, 90));
    }

    #[test]
    fn a_file_stamp_tells_a_rewritten_file_from_the_same_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let p = path.to_str().unwrap();
        std::fs::write(&path, "root:x:0:0::/root:/bin/sh\n").unwrap();
        let a = FileStamp::of(p);
        assert!(a.is_some());
        assert_eq!(FileStamp::of(p), a);
        std::fs::write(&path, "root:x:0:0::/root:/bin/bash\n").unwrap();
        assert_ne!(FileStamp::of(p), a, "a longer rewrite");
        assert_eq!(
            FileStamp::of(dir.path().join("gone").to_str().unwrap()),
            None
        );
    }

    fn set(path: &Path, exclude: &[&str], skip_while: &[&str]) -> SetRuntime {
        SetRuntime::from_config(&SyncSetConfig {
            name: "mail".into(),
            path: path.to_path_buf(),
            mode: SyncMode::Mirror,
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            skip_while: skip_while.iter().map(|s| s.to_string()).collect(),
            on_change: None,
            single_file: false,
            xattrs: false,
            hard_links: false,
            max_file_size: 1 << 30,
        })
    }

    /// Node 1 of a three-node cluster syncing set "mail" at `d/root`, its
    /// data in `d/data` (one filesystem, as in a typical install).
    fn node_one_of_three(d: &Path) -> Config {
        for f in ["ca.crt", "n1.crt", "n1.key"] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        std::fs::create_dir(d.join("root")).unwrap();
        let text = format!(
            "[node]\nid = 1\nlisten = \"127.0.0.1:7700\"\ndata_dir = \"{d}/data\"\n\
             [[peer]]\nid = 2\naddr = \"127.0.0.1:7701\"\n[[peer]]\nid = 3\naddr = \"127.0.0.1:7702\"\n\
             [tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/n1.crt\"\nkey = \"{d}/n1.key\"\n\
             [[sync]]\nname = \"mail\"\npath = \"{d}/root\"\n",
            d = d.display()
        );
        Config::parse(&text, &d.join("clusterd.toml"), Vec::new()).unwrap()
    }

    /// A follower stages a batch's content as the leader sends it: whole
    /// new content becomes finished files (checked against the digests the
    /// leader listed), a delta stays in the fsynced upload; the committed
    /// batch then renames the finished files into the set with their
    /// metadata and keeps their signatures, and leaves nothing staged.
    #[test]
    fn whole_content_is_staged_as_finished_files_and_renamed_into_place() {
        use raft::eraftpb::{Entry, HardState};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let shared = open_shared(&node_one_of_three(d)).unwrap();
        let log = RaftStore::open(&d.join("raft")).unwrap();

        let a: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let b = vec![7u8; 50_000];
        let base = vec![1u8; 100_000];
        let mut c = base.clone();
        c[500] = 2;
        let (pa, da) = delta::plan(None, &a);
        let (pb, db) = delta::plan(None, &b);
        let (pc, dc) = delta::plan(Some((&base, &delta::BlockSignature::compute(&base))), &c);
        assert!(pc.base().is_some(), "c travels as a delta");
        let (ea, eb, ec) = (pa.encode(), pb.encode(), pc.encode());
        let blob = [&ea[..], &eb[..], &ec[..]].concat();
        // SAFETY: plain getters without arguments.
        let me = unsafe { libc::getuid() };
        let group = unsafe { libc::getgid() };
        let meta = Meta {
            kind: EntryKind::File,
            mode: 0o640,
            uid: me,
            gid: group,
            user: None,
            group: None,
            mtime_ns: 1_600_000_000_123_456_789,
        };
        let at = |offset: usize, e: &[u8], digest| StagedVersion {
            offset: offset as u64,
            len: e.len() as u64,
            digest,
            meta: Some(meta.clone()),
        };
        let versions = [
            at(0, &ea, da),
            StagedVersion {
                meta: None,
                ..at(ea.len(), &eb, db)
            },
            at(ea.len() + eb.len(), &ec, dc),
        ];
        let upload = 42;
        // In pieces, as the leader sends them, held in memory; the middle
        // one ends inside one patch and starts inside another, so they
        // are read across pieces.
        let bytes = prost::bytes::Bytes::from(blob.clone());
        let cuts = [0, ea.len() - 7, ea.len() + 5, blob.len()];
        for w in cuts.windows(2) {
            shared
                .stage_before_finish(upload, w[0] as u64, bytes.slice(w[0]..w[1]))
                .unwrap();
        }
        assert!(!shared.staged_path(upload).exists(), "held in memory");
        shared.finish_upload(upload, &versions).unwrap();
        assert_eq!(shared.held.lock().unwrap().bytes, 0);
        let finished = |offset: u64, digest: &FileDigest| {
            shared
                .finished_dir(upload)
                .join(Shared::finished_name(offset, digest))
        };
        assert_eq!(std::fs::read(finished(0, &da)).unwrap(), a);
        use std::os::unix::fs::MetadataExt;
        let staged_a = std::fs::metadata(finished(0, &da)).unwrap();
        assert_eq!(staged_a.mode() & 0o7777, 0o640, "metadata set when staged");
        assert_eq!(std::fs::read(finished(ea.len() as u64, &db)).unwrap(), b);
        assert!(
            !finished(versions[2].offset, &dc).exists(),
            "a delta is not finished"
        );
        assert_eq!(
            std::fs::read(shared.staged_path(upload)).unwrap(),
            blob,
            "the delta stays in the upload, written out"
        );

        // A version that does not match its listed digest is refused.
        let wrong = StagedVersion {
            digest: db,
            ..versions[0].clone()
        };
        shared.stage_piece(43, 0, &ea, StageFlush::None).unwrap();
        assert!(shared.finish_upload(43, &[wrong]).is_err());
        let parts: Vec<_> = std::fs::read_dir(shared.finished_dir(upload))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
            .collect();
        assert!(parts.is_empty(), "{parts:?}");
        // A version listed twice does not make the upload look covered.
        let mixed = [&ea[..], &ec[..]].concat();
        shared.stage_piece(45, 0, &mixed, StageFlush::None).unwrap();
        let twice = at(0, &ea, da);
        let delta = at(ea.len(), &ec, dc);
        shared
            .finish_upload(45, &[twice.clone(), twice, delta])
            .unwrap();
        assert!(shared.staged_path(45).exists(), "the delta is still needed");
        // Nothing but whole content: the upload itself is not kept.
        shared.stage_piece(44, 0, &eb, StageFlush::None).unwrap();
        shared.finish_upload(44, &[at(0, &eb, db)]).unwrap();
        assert!(!shared.staged_path(44).exists());
        // Held pieces with a gap (this node restarted meanwhile) are refused.
        let eb_bytes = prost::bytes::Bytes::from(eb.clone());
        let third = eb.len() / 3;
        shared
            .stage_before_finish(46, 0, eb_bytes.slice(..third))
            .unwrap();
        shared
            .stage_before_finish(46, 2 * third as u64, eb_bytes.slice(2 * third..))
            .unwrap();
        let gap = shared.finish_upload(46, &[at(0, &eb, db)]).unwrap_err();
        assert!(gap.contains("lacks bytes"), "{gap}");
        // A later piece of an upload of which nothing is held or on file
        // (this node restarted meanwhile) is refused, past 64 MiB too.
        let lost = shared.stage_before_finish(50, third as u64, eb_bytes.slice(third..));
        assert!(lost.unwrap_err().contains("lacks bytes 0.."));
        let past = FINISH_UPLOAD_MAX - 10;
        assert!(shared
            .stage_before_finish(51, past, eb_bytes.slice(..20))
            .is_err());
        assert!(!shared.staged_path(50).exists() && !shared.staged_path(51).exists());
        // A later piece with no room left sends what is held to the file.
        shared
            .stage_before_finish(47, 0, eb_bytes.slice(..third))
            .unwrap();
        shared.held.lock().unwrap().bytes += HELD_BYTES_MAX;
        shared
            .stage_before_finish(47, third as u64, eb_bytes.slice(third..))
            .unwrap();
        shared.held.lock().unwrap().bytes -= HELD_BYTES_MAX;
        assert_eq!(std::fs::read(shared.staged_path(47)).unwrap(), eb);
        shared.finish_upload(47, &[at(0, &eb, db)]).unwrap();
        assert!(!shared.staged_path(47).exists());
        // Past FINISH_UPLOAD_MAX (one large file) the upload is on file,
        // with what was held of it before.
        shared
            .stage_before_finish(49, 0, eb_bytes.slice(..third))
            .unwrap();
        shared
            .stage_before_finish(49, FINISH_UPLOAD_MAX - 10, eb_bytes.slice(..20))
            .unwrap();
        assert!(shared.held.lock().unwrap().uploads.is_empty());
        let on_file = std::fs::File::open(shared.staged_path(49)).unwrap();
        assert_eq!(on_file.metadata().unwrap().len(), FINISH_UPLOAD_MAX + 10);
        let mut head = vec![0u8; third];
        on_file.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(head, eb[..third]);
        shared.remove_upload(49);
        // An upload abandoned mid-way is freed.
        shared
            .stage_before_finish(48, 0, eb_bytes.slice(..third))
            .unwrap();
        let long_ago = Instant::now().checked_sub(HELD_MAX_IDLE * 2).unwrap();
        shared
            .held
            .lock()
            .unwrap()
            .uploads
            .get_mut(&48)
            .unwrap()
            .last_piece = long_ago;
        shared.drop_abandoned_uploads();
        assert_eq!(shared.held.lock().unwrap().bytes, 0);
        assert!(shared.finish_upload(48, &[at(0, &eb, db)]).is_err());
        let inode_of_a = staged_a.ino();

        let put = |path: &str, digest: &FileDigest, v: &StagedVersion| FileOp::Put {
            path: path.as_bytes().to_vec(),
            meta: meta.clone(),
            digest: WireDigest::new(digest),
            content: Content::Blob {
                upload,
                offset: v.offset,
                len: v.len,
            },
        };
        let batch = Command::Files(FileBatch {
            set: "mail".into(),
            origin: 2,
            proposed_at_ms: 0,
            ops: vec![put("a", &da, &versions[0]), put("sub/b", &db, &versions[1])],
        });
        let entry = Entry {
            index: 1,
            term: 1,
            data: batch.encode().into(),
            ..Default::default()
        };
        let hs = HardState {
            term: 1,
            vote: 2,
            commit: 1,
            ..Default::default()
        };
        log.persist(&[entry], Some(&hs)).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut applier = Applier::new(shared.clone(), log.clone(), tx);
        assert_eq!(applier.apply_up_to(1), Ok(()));

        let root = d.join("root");
        assert_eq!(std::fs::read(root.join("a")).unwrap(), a);
        assert_eq!(std::fs::read(root.join("sub/b")).unwrap(), b);
        let st = std::fs::metadata(root.join("a")).unwrap();
        assert_eq!(st.ino(), inode_of_a, "renamed into place, not copied");
        assert_eq!(st.mode() & 0o7777, 0o640);
        assert_eq!(
            i128::from(st.mtime()) * 1_000_000_000 + i128::from(st.mtime_nsec()),
            meta.mtime_ns
        );
        assert_eq!(st.nlink(), 1);
        let path_a = SetPath::from_network(b"a").unwrap();
        assert!(
            shared.signature("mail", &path_a, &da).is_none(),
            "linked in unread: signed later"
        );
        // Edited here before it was signed: no signature of a version the
        // file no longer holds.
        std::fs::write(root.join("sub/b"), b"edited by hand").unwrap();
        assert!(applier.sign_linked(), "signed once idle");
        assert!(
            shared.signature("mail", &path_a, &da).is_some(),
            "signature kept"
        );
        let path_b = SetPath::from_network(b"sub/b").unwrap();
        assert!(shared.signature("mail", &path_b, &db).is_none());
        assert!(!applier.sign_linked(), "nothing left to sign");
        assert_eq!(shared.counters.files_linked.load(Ordering::Relaxed), 2);
        assert!(!shared.finished_dir(upload).exists(), "nothing left staged");
        assert!(!shared.staged_path(upload).exists(), "nothing left staged");
    }

    /// The CI failure of 2026-11-22: entries committed (and queued for the
    /// applier) before a leader's snapshot was installed are gone from the
    /// log when the applier gets to them; the queued restore covers them.
    #[test]
    fn entries_replaced_by_an_installed_snapshot_give_way_to_its_restore() {
        use raft::eraftpb::{Entry, HardState, Snapshot};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let shared = open_shared(&node_one_of_three(d)).unwrap();
        let log = RaftStore::open(&d.join("raft")).unwrap();
        let entries: Vec<Entry> = (1..=3)
            .map(|index| Entry {
                index,
                term: 1,
                ..Default::default()
            })
            .collect();
        let hs = HardState {
            term: 1,
            vote: 2,
            commit: 3,
            ..Default::default()
        };
        log.persist(&entries, Some(&hs)).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut applier = Applier::new(shared.clone(), log.clone(), tx);

        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 9;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        let data = Manifest::default().encode();
        snap.data = data.clone().into();
        log.apply_snapshot(&snap).unwrap();

        assert_eq!(applier.apply_up_to(3), Ok(()), "gives way to the restore");
        assert_eq!(shared.applied.load(Ordering::SeqCst), 0);
        applier.restore(9, &data).unwrap();
        assert_eq!(shared.applied.load(Ordering::SeqCst), 9);
        let mut reported = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            if let Applied::Index(i) = msg {
                reported.push(i);
            }
        }
        assert_eq!(reported, [9], "only the restore reports an index");

        // Entries that are merely missing (no snapshot past them) still
        // stop the applier: that is corruption, not a race.
        let r = applier.apply_up_to(12);
        assert!(r.is_err(), "{r:?}");
    }

    #[test]
    fn a_skip_while_marker_is_found_even_when_excluded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("aliases"), "x").unwrap();
        let root = Root::open(dir.path()).unwrap();
        let s = set(dir.path(), &["*.lock"], &["*.lock"]);
        assert!(!has_marker(&s, &root).unwrap());
        std::fs::write(dir.path().join("bayes.lock"), "x").unwrap();
        assert!(has_marker(&s, &root).unwrap(), "marker at the root");
        std::fs::remove_file(dir.path().join("bayes.lock")).unwrap();
        std::fs::create_dir_all(dir.path().join("spool/.ssh")).unwrap();
        std::fs::write(dir.path().join("spool/db.lock"), "x").unwrap();
        assert!(has_marker(&s, &root).unwrap(), "marker in a subdirectory");
    }
}
