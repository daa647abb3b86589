//! The file-replication state every task of a data node shares: the sets
//! and their runtime policy, per-set health, counters, the files store, and
//! what status, metrics and the peer service read of them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::Notify;
use tracing::warn;

use crate::core::config::{Config, NodeId, SyncMode, SyncSetConfig};
use crate::core::delta::{self, FileDigest, FileHasher};
use crate::core::manifest::{Entry, Manifest, WireDigest};
use crate::core::paths::{Filter, SetPath};
use crate::fs::root::{FsError, Root};
use crate::net::transport::WireBytes;
use crate::replication::files_store::{FilesStore, FilesStoreError, LocalRecord, StoreBatch};
use crate::replication::staging::*;
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
    /// The command that checks a change before it is proposed (`validate`).
    pub validate: Option<String>,
    pub validate_timeout: std::time::Duration,
    pub on_change_failure: crate::core::config::OnChangeFailure,
    /// Keep every committed version (`[[sync]] history`).
    pub history: bool,
    /// `kind = "accounts"`: the account databases this set's records come
    /// from and go to. `path` and `root_dir` are then the set's committed
    /// view under `data_dir/accounts` (see `replication::accounts`).
    pub accounts: Option<AccountsRuntime>,
}

/// What an accounts set reads and merges.
#[derive(Debug, Clone)]
pub struct AccountsRuntime {
    /// The configured `path`: the directory of `passwd`, `shadow`, `group`
    /// and `gshadow`.
    pub dir: PathBuf,
    pub policy: crate::core::accounts::Policy,
}

/// Where an accounts set's committed view lives on this node.
pub fn accounts_view_dir(data_dir: &Path, set: &str) -> PathBuf {
    let plain = !set.starts_with('.')
        && set
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let leaf = if plain {
        set.to_string()
    } else {
        format!(
            "x-{}",
            set.bytes().map(|b| format!("{b:02x}")).collect::<String>()
        )
    };
    data_dir.join("accounts").join(leaf)
}

impl SetRuntime {
    pub fn from_config(c: &SyncSetConfig, data_dir: &Path) -> SetRuntime {
        if let Some(policy) = &c.accounts {
            let view = accounts_view_dir(data_dir, &c.name);
            let mut rt = SetRuntime::from_config(
                &SyncSetConfig {
                    path: view,
                    accounts: None,
                    single_file: false,
                    ..c.clone()
                },
                data_dir,
            );
            rt.accounts = Some(AccountsRuntime {
                dir: c.path.clone(),
                policy: policy.clone(),
            });
            return rt;
        }
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
            validate: c.validate.clone(),
            validate_timeout: c.validate_timeout,
            on_change_failure: c.on_change_failure,
            history: c.history,
            accounts: None,
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

/// A `clusterctl sync` waiting on the source: a full pass of `set` (every
/// set when `None`), then a committed `Reconcile` of it; `reply` gets that
/// entry's index once applied on the leader, or why not.
pub struct SyncAsk {
    pub set: Option<String>,
    pub reply: tokio::sync::oneshot::Sender<Result<u64, String>>,
}

/// Per-set health shown by `clusterctl status`.
#[derive(Debug, Clone, Default)]
pub struct SetHealth {
    pub last_error: Option<String>,
    /// Entries refused by the path policy or as malformed.
    pub refused: u64,
    /// The set waits for a `skip_while` marker to disappear.
    pub skipping: bool,
    /// The set's last change was refused by its validator on this node:
    /// why (the validator's first line). Cleared by the next valid change.
    pub held: Option<String>,
    /// Leader only: inotify does not watch the whole set (the kernel's
    /// watch limit was reached): why, and how often it is rescanned instead.
    pub unwatched: Option<String>,
    /// How long the leader's last full walk of the set took (paces the
    /// rescans of a set inotify cannot watch whole).
    pub last_walk: Option<std::time::Duration>,
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
    /// Bytes this node sent to peers: Raft messages (counted by the
    /// transport, which `run` hands this counter), staged content and
    /// fetched files.
    pub wire_bytes_sent: WireBytes,
}

/// State shared by the applier thread, the leader's source and the fetcher.
pub struct Shared {
    pub node_id: NodeId,
    pub witness: bool,
    /// Peers that are witnesses: they hold no files, so they are never
    /// served any (a witness host, often the monitoring server, must not be
    /// able to read /etc/shadow through clusterd).
    /// Follows membership changes (the node task updates it).
    pub witness_peers: RwLock<BTreeSet<NodeId>>,
    /// The other data nodes (members that hold sync sets).
    pub data_peers: RwLock<BTreeSet<NodeId>>,
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
    pub(super) unsigned: Mutex<std::collections::VecDeque<(String, SetPath, FileDigest)>>,
    /// Pieces of uploads kept in memory until their last piece (see
    /// [`Shared::stage_before_finish`]).
    pub(super) held: Mutex<HeldUploads>,
    /// Whether some sync set is on `data_dir`'s filesystem, so staged whole
    /// content is worth finishing into files (see [`Shared::finish_upload`]).
    pub(super) finish_files: bool,
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
    /// Bytes of fetched content handed to the applier and not written yet:
    /// the fetcher waits while it is high, so a catch-up of a large set
    /// never holds more than a bounded amount in memory.
    pub fetched_queued: std::sync::atomic::AtomicU64,
    /// `clusterctl sync` requests for the source (leader only), and what
    /// wakes it for them.
    pub sync_requests: Mutex<Vec<SyncAsk>>,
    pub sync_wakeup: Notify,
    /// This node leads: its trees are the source, never reconciled.
    pub leading: std::sync::atomic::AtomicBool,
    /// The Raft term this node is in, for quarantine records made outside
    /// the apply of an entry (reconciles).
    pub term: AtomicU64,
    /// The start-up reconcile is done: as a follower, its trees were squared
    /// with what the cluster committed; as the leader, its first full pass
    /// was proposed. systemd's READY waits for it.
    pub start_reconciled: std::sync::atomic::AtomicBool,
    /// The mount namespace validators run in (`[[sync]] validate`).
    pub sandbox: crate::replication::validate::Sandbox,
    /// How long the history of the sets is kept (`[history]`).
    pub history: crate::core::config::HistoryConfig,
    /// The last kept version of recently changed paths, which the next
    /// version is stored as a delta against (see `history`).
    pub history_recent: Mutex<HashMap<(String, SetPath), (WireDigest, Vec<u8>)>>,
    /// Versions of the leader's own bulk batches still to be kept (see
    /// `history::capture_deferred`).
    pub history_deferred:
        Mutex<std::collections::VecDeque<crate::replication::history::DeferredCapture>>,
    /// Object files were added to the history since its directory was
    /// last synced.
    pub history_objects_unsynced: std::sync::atomic::AtomicBool,
    /// Hashes of objects the applier's writers linked in for the batch
    /// being applied, so its record need not look them up (cleared once
    /// per applied page).
    pub history_linked: Mutex<std::collections::HashSet<[u8; 32]>>,
    /// Per accounts set: its records here, what is held, what was confirmed
    /// (see `replication::accounts`).
    pub accounts: Mutex<BTreeMap<String, crate::replication::accounts::AccountsState>>,
    /// Wakes the accounts task (a committed view applied, a confirmation).
    pub accounts_wakeup: Notify,
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

    /// The committed entry of `path` in `set` now.
    pub fn committed_entry(&self, set: &str, path: &SetPath) -> Option<Entry> {
        self.manifest
            .read()
            .unwrap()
            .set(set)
            .and_then(|s| s.entries.get(path).cloned())
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
    pub(super) fn health_of(&self, set: &str, f: impl FnOnce(&mut SetHealth)) {
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
    pub(super) fn note_refused(&self, set: &str, msg: String) {
        self.health_of(set, |h| {
            h.refused += 1;
            h.last_error = Some(msg);
        });
    }

    /// Whether `set` waits for a `skip_while` marker to disappear.
    pub fn set_skipping(&self, set: &str, skipping: bool) {
        self.health_of(set, |h| h.skipping = skipping);
    }

    /// Holds `set` with the validator's reason, or releases it (`None`).
    pub fn set_held(&self, set: &str, reason: Option<String>) {
        self.health_of(set, |h| h.held = reason);
    }

    /// Marks `set` as not watched whole by inotify (with the reason), or
    /// watched again (`None`).
    pub fn set_unwatched(&self, set: &str, reason: Option<String>) {
        self.health_of(set, |h| h.unwatched = reason);
    }

    /// Notes how long a full walk of `set` took.
    pub fn note_walk(&self, set: &str, took: std::time::Duration) {
        self.health_of(set, |h| h.last_walk = Some(took));
    }

    /// How long the last full walk of `set` took, if one ran.
    pub fn last_walk(&self, set: &str) -> Option<std::time::Duration> {
        self.health
            .lock()
            .unwrap()
            .get(set)
            .and_then(|h| h.last_walk)
    }

    /// Whether `set`'s last change was held by its validator here.
    pub fn is_held(&self, set: &str) -> bool {
        self.health
            .lock()
            .unwrap()
            .get(set)
            .is_some_and(|h| h.held.is_some())
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
    pub fn files_view(&self) -> crate::core::status::FilesView {
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
                let accounts = s.accounts.as_ref().map(|_| {
                    let mut a = self
                        .accounts
                        .lock()
                        .unwrap()
                        .get(&s.name)
                        .cloned()
                        .unwrap_or_default();
                    a.view.pending = !self.leading.load(Ordering::Relaxed)
                        && a.view.merged_index < progress.index;
                    a
                });
                let refused_records = accounts.as_ref().map_or(0, |a| a.view.refused.len() as u64);
                crate::core::status::SetView {
                    name: s.name.clone(),
                    files,
                    bytes,
                    applied_index: progress.index,
                    seq: progress.seq,
                    committed_bytes: progress.bytes,
                    missing: missing.keys().filter(|(set, _)| *set == s.name).count() as u64,
                    last_error: h.last_error,
                    refused: h.refused + refused_records,
                    skipping: h.skipping,
                    held: h
                        .held
                        .or_else(|| accounts.as_ref().and_then(|a| a.hold.clone())),
                    unwatched: h.unwatched,
                    paused: manifest.paused.get(&s.name).cloned(),
                    recent: progress.recent.iter().copied().collect(),
                    accounts: accounts.map(|a| a.view),
                }
            })
            .collect();
        let c = &self.counters;
        crate::core::status::FilesView {
            sets,
            bytes_proposed: c.bytes_proposed.load(Ordering::Relaxed),
            bytes_saved: c.bytes_saved.load(Ordering::Relaxed),
            bytes_fetched: c.bytes_fetched.load(Ordering::Relaxed),
            wire_bytes_sent: self.counters.wire_bytes_sent.load(Ordering::Relaxed),
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
        // Each with the id `clusterctl conflicts restore/drop` take.
        let lines: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
                Ok(mut r) => {
                    if let Some(id) = crate::core::status::conflict_id(&r) {
                        r["id"] = serde_json::Value::String(id);
                    }
                    r.to_string()
                }
                Err(_) => l.to_string(),
            })
            .collect();
        let skip = lines.len().saturating_sub(limit);
        Ok(lines.into_iter().skip(skip).collect())
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
        config
            .sync
            .iter()
            .map(|s| SetRuntime::from_config(s, &config.node.data_dir))
            .collect()
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
        data_peers: RwLock::new(
            config
                .peers
                .iter()
                .filter(|p| !p.witness)
                .map(|p| p.id)
                .collect(),
        ),
        unobtainable: Mutex::new(HashMap::new()),
        witness_peers: RwLock::new(
            config
                .peers
                .iter()
                .filter(|p| p.witness)
                .map(|p| p.id)
                .collect(),
        ),
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
        fetched_queued: Default::default(),
        sync_requests: Mutex::new(Vec::new()),
        sync_wakeup: Notify::new(),
        leading: std::sync::atomic::AtomicBool::new(false),
        term: AtomicU64::new(0),
        start_reconciled: std::sync::atomic::AtomicBool::new(no_sets),
        sandbox: Default::default(),
        history: config.history,
        history_recent: Mutex::new(HashMap::new()),
        history_deferred: Mutex::new(std::collections::VecDeque::new()),
        history_objects_unsynced: std::sync::atomic::AtomicBool::new(false),
        history_linked: Mutex::new(Default::default()),
        accounts: Mutex::new(Default::default()),
        accounts_wakeup: Notify::new(),
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
