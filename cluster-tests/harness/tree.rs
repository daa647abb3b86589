//! File trees of sync sets: snapshots of a set's root with everything
//! replication must keep (kind, content, mode bits, owner, mtime, link
//! targets), their differences, and waiting until every node holds the same
//! tree. Also the replication parts of the status JSON and a few file
//! operations the standard library lacks (nanosecond mtimes, deterministic
//! incompressible content).
//!
//! Used by the replication tests (`cluster-tests/replication.rs`) and the
//! replication benchmark (`cluster-tests/bench_replication.rs`).

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::{entry, wait_until, Cluster, POLL};

/// Names clusterd gives its temporary files while it replaces a file
/// (`fs::root::TEMP_PREFIX`): never part of a tree, whatever stage they are in.
pub const TEMP_PREFIX: &str = ".clusterd-tmp-";

/// The key of the single item of a single-file set's tree.
pub const SINGLE_FILE: &str = ".";

/// What a tree entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// One entry of a tree, with every property replication must carry over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Files and directories; `None` for symlinks, whose mtime is not kept.
    pub mtime_ns: Option<i128>,
    /// Files: their length; otherwise 0.
    pub size: u64,
    /// Files: blake3 of the content in hex (`None` in a metadata-only
    /// snapshot); symlinks: the link target; directories: `None`.
    pub content: Option<String>,
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::File => write!(f, "file {} B", self.size)?,
            Kind::Dir => write!(f, "dir")?,
            Kind::Symlink => write!(f, "symlink -> {}", self.content.as_deref().unwrap_or("?"))?,
        }
        write!(f, " mode {:04o} owner {}:{}", self.mode, self.uid, self.gid)?;
        if let Some(m) = self.mtime_ns {
            write!(f, " mtime {}", fmt_ns(m))?;
        }
        Ok(())
    }
}

fn fmt_ns(ns: i128) -> String {
    format!(
        "{}.{:09}",
        ns.div_euclid(1_000_000_000),
        ns.rem_euclid(1_000_000_000)
    )
}

/// Relative path (`/`-separated, no leading `./`) to item. A single-file
/// set's tree has the one key [`SINGLE_FILE`]; a missing root is empty.
pub type Tree = BTreeMap<String, Item>;

/// The tree under `root` (not including the root directory itself, whose
/// metadata is the node's own), content hashed. Panics on an I/O error.
#[track_caller]
pub fn snapshot(root: &Path) -> Tree {
    try_snapshot(root, true).unwrap_or_else(|e| panic!("snapshot of {}: {e}", root.display()))
}

/// As [`snapshot`] without reading content: cheap enough to poll a large
/// tree; compare the content afterwards with a full snapshot.
#[track_caller]
pub fn snapshot_meta(root: &Path) -> Tree {
    try_snapshot(root, false).unwrap_or_else(|e| panic!("snapshot of {}: {e}", root.display()))
}

/// The tree under `root`, or the error that stopped the walk. Entries that
/// vanish while the walk runs are left out (the tree is changing; a caller
/// that waits for a stable tree polls again).
pub fn try_snapshot(root: &Path, hash: bool) -> Result<Tree, String> {
    let mut tree = Tree::new();
    let meta = match fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(tree),
        Err(e) => return Err(format!("lstat {}: {e}", root.display())),
    };
    if meta.is_dir() {
        walk(root, "", hash, &mut tree)?;
    } else if let Some(item) =
        item_of(root, &meta, hash).map_err(|e| format!("{}: {e}", root.display()))?
    {
        tree.insert(SINGLE_FILE.to_string(), item);
    }
    Ok(tree)
}

fn walk(dir: &Path, prefix: &str, hash: bool, tree: &mut Tree) -> Result<(), String> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("read_dir {}: {e}", dir.display())),
    };
    for ent in entries {
        let ent = ent.map_err(|e| format!("read_dir {}: {e}", dir.display()))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name.starts_with(TEMP_PREFIX) {
            continue;
        }
        let path = ent.path();
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("lstat {}: {e}", path.display())),
        };
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let Some(item) =
            item_of(&path, &meta, hash).map_err(|e| format!("{}: {e}", path.display()))?
        else {
            continue;
        };
        let is_dir = item.kind == Kind::Dir;
        tree.insert(rel.clone(), item);
        if is_dir {
            walk(&path, &rel, hash, tree)?;
        }
    }
    Ok(())
}

/// The item for `path`; `None` if it vanished meanwhile or is neither a
/// file, a directory nor a symlink (sockets, fifos: not replicated).
fn item_of(path: &Path, meta: &fs::Metadata, hash: bool) -> io::Result<Option<Item>> {
    let ft = meta.file_type();
    let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
    let mut item = Item {
        kind: Kind::File,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: Some(mtime_ns),
        size: 0,
        content: None,
    };
    if ft.is_symlink() {
        item.kind = Kind::Symlink;
        item.mtime_ns = None;
        item.content = match fs::read_link(path) {
            Ok(t) => Some(t.to_string_lossy().into_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
    } else if ft.is_dir() {
        item.kind = Kind::Dir;
    } else if ft.is_file() {
        item.size = meta.len();
        if hash {
            item.content = match hash_file(path, meta) {
                Ok(h) => Some(h),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
        }
    } else {
        return Ok(None);
    }
    Ok(Some(item))
}

/// Cached content hashes, keyed by (device, inode), valid while size, mtime
/// and ctime are unchanged. Waiting for a 200 MiB file to converge would
/// otherwise re-read it on three nodes at every poll, starving the nodes
/// under test of CPU.
type HashCache = HashMap<(u64, u64), (u64, i128, i128, String)>;
static HASHES: Mutex<Option<HashCache>> = Mutex::new(None);

/// A file whose ctime is this close to now may still be written within the
/// same timestamp tick, unseen by ctime: its hash is not cached (git's
/// "racy clean" rule).
const RACY: Duration = Duration::from_secs(2);

fn hash_file(path: &Path, meta: &fs::Metadata) -> io::Result<String> {
    let key = (meta.dev(), meta.ino());
    let ctime = meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128;
    let mtime = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
    let stamp = (meta.len(), mtime, ctime);
    if let Some((s, m, c, h)) = HASHES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .get(&key)
    {
        if (*s, *m, *c) == stamp {
            return Ok(h.clone());
        }
    }
    let started = now_ns();
    let mut f = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let h = hasher.finalize().to_hex().to_string();
    if ctime < started - RACY.as_nanos() as i128 {
        HASHES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(key, (stamp.0, stamp.1, stamp.2, h.clone()));
    }
    Ok(h)
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Every difference between trees `a` and `b`, one line each, in path order.
/// Content is compared only where both sides were hashed, mtime only where
/// both sides keep one (not for symlinks).
pub fn diff(a: &Tree, b: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (Some(x), None) => out.push(format!("{k}: only in the first ({x})")),
            (None, Some(y)) => out.push(format!("{k}: only in the second ({y})")),
            (Some(x), Some(y)) => {
                let mut d = Vec::new();
                if x.kind != y.kind {
                    d.push(format!("kind {x} vs {y}"));
                } else {
                    if x.mode != y.mode {
                        d.push(format!("mode {:04o} vs {:04o}", x.mode, y.mode));
                    }
                    if (x.uid, x.gid) != (y.uid, y.gid) {
                        d.push(format!("owner {}:{} vs {}:{}", x.uid, x.gid, y.uid, y.gid));
                    }
                    if let (Some(m), Some(n)) = (x.mtime_ns, y.mtime_ns) {
                        if m != n {
                            d.push(format!("mtime {} vs {}", fmt_ns(m), fmt_ns(n)));
                        }
                    }
                    if x.size != y.size {
                        d.push(format!("size {} vs {}", x.size, y.size));
                    }
                    match (&x.content, &y.content) {
                        (Some(p), Some(q)) if p != q && x.kind == Kind::Symlink => {
                            d.push(format!("link target {p:?} vs {q:?}"))
                        }
                        (Some(p), Some(q)) if p != q => {
                            d.push(format!("content blake3 {}.. vs {}..", &p[..12], &q[..12]))
                        }
                        _ => {}
                    }
                }
                if !d.is_empty() {
                    out.push(format!("{k}: {}", d.join(", ")));
                }
            }
            (None, None) => unreachable!(),
        }
    }
    out
}

/// How many difference lines a timeout message shows per node.
const DIFF_LINES: usize = 40;

/// Waits until set `set` holds the same tree (content and metadata) on
/// every node of `ids` as on `ids[0]` (normally the leader), and returns
/// that tree. On timeout panics with the differences of each node.
#[track_caller]
pub fn wait_trees_equal(c: &Cluster, set: &str, ids: &[u64], deadline: Duration) -> Tree {
    wait_trees_equal_except(c, set, ids, deadline, &|_| false)
}

/// As [`wait_trees_equal`], leaving out the paths `ignore` accepts, on every
/// node (excluded files, which legitimately differ between nodes).
#[track_caller]
pub fn wait_trees_equal_except(
    c: &Cluster,
    set: &str,
    ids: &[u64],
    deadline: Duration,
    ignore: &dyn Fn(&str) -> bool,
) -> Tree {
    wait_equal(c, set, ids, deadline, ignore, true)
}

/// As [`wait_trees_equal`] comparing everything but content (kind, size,
/// mode, owner, mtime, link targets): a stat walk, cheap enough to time a
/// large transfer by. Follow it with [`wait_trees_equal`] to check content.
#[track_caller]
pub fn wait_metadata_equal(c: &Cluster, set: &str, ids: &[u64], deadline: Duration) -> Tree {
    wait_equal(c, set, ids, deadline, &|_| false, false)
}

#[track_caller]
fn wait_equal(
    c: &Cluster,
    set: &str,
    ids: &[u64],
    deadline: Duration,
    ignore: &dyn Fn(&str) -> bool,
    hash: bool,
) -> Tree {
    assert!(
        ids.len() >= 2,
        "comparing the trees of fewer than two nodes: {ids:?}"
    );
    let roots: Vec<(u64, PathBuf)> = ids.iter().map(|&i| (i, c.set_path(i, set))).collect();
    let mut polls = 0u32;
    let mut cluster_view = String::new();
    let what = format!(
        "set {set:?} to be identical{} on nodes {ids:?} (as on node {})",
        if hash { "" } else { " except content" },
        ids[0]
    );
    wait_until(deadline, &what, || {
        // Leadership moving mid-test would explain a difference: show the
        // cluster's view now and then (it costs a clusterctl per node).
        if polls.is_multiple_of(40) {
            cluster_view = c.describe();
        }
        polls += 1;
        // Metadata first: while it differs (a transfer under way) no poll
        // reads content, which would take CPU from the nodes under test.
        let passes: &[bool] = if hash { &[false, true] } else { &[false] };
        let mut trees = Vec::new();
        for &with_content in passes {
            trees = snapshots(c, &roots, ignore, with_content)?;
            let report = differences(&roots, &trees);
            if !report.is_empty() {
                return Err(format!("{report}\n  cluster:\n{cluster_view}"));
            }
        }
        Ok(trees.swap_remove(0))
    })
}

/// The trees of `roots` (node id, set root), without the ignored paths.
fn snapshots(
    c: &Cluster,
    roots: &[(u64, PathBuf)],
    ignore: &dyn Fn(&str) -> bool,
    hash: bool,
) -> Result<Vec<Tree>, String> {
    let mut trees = Vec::new();
    for (id, root) in roots {
        c.assert_alive(*id);
        let mut t = try_snapshot(root, hash).map_err(|e| format!("node {id}: {e}"))?;
        t.retain(|k, _| !ignore(k));
        trees.push(t);
    }
    Ok(trees)
}

/// How each tree differs from the first, per node; empty when all agree.
fn differences(roots: &[(u64, PathBuf)], trees: &[Tree]) -> String {
    let mut report = String::new();
    for (i, t) in trees.iter().enumerate().skip(1) {
        let d = diff(&trees[0], t);
        if !d.is_empty() {
            report.push_str(&format!(
                "\n  node {} vs node {} ({} differences):\n    {}",
                roots[0].0,
                roots[i].0,
                d.len(),
                d.iter()
                    .take(DIFF_LINES)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n    ")
            ));
        }
    }
    report
}

/// The negative of `wait_until`: checks `f` every poll for `window` and
/// panics naming `what` as soon as it returns an error. Shows that something
/// does not happen (nothing arrives while a set is skipped).
#[track_caller]
pub fn hold_for(window: Duration, what: &str, mut f: impl FnMut() -> Result<(), String>) -> u32 {
    let start = Instant::now();
    let mut checks = 0u32;
    loop {
        if let Err(e) = f() {
            panic!(
                "{what} stopped holding after {:.1?} ({checks} checks): {e}",
                start.elapsed()
            );
        }
        checks += 1;
        let elapsed = start.elapsed();
        if elapsed >= window {
            return checks;
        }
        thread::sleep(POLL.min(window - elapsed));
    }
}

// ---------------------------------------------------------------------------
// Status of sets
// ---------------------------------------------------------------------------

/// Node `id`'s entry for set `set` (`{"name","files","bytes",...}`) in the
/// status JSON node `via` prints.
pub fn set_status(c: &Cluster, via: u64, id: u64, set: &str) -> Result<Value, String> {
    let v = c.status_result(via, super::STATUS_TIMEOUT)?;
    set_status_in(&v, via, id, set)
}

/// Node `id`'s entry for set `set` in `v`, a status JSON node `via` printed:
/// several nodes' sets read from one `clusterctl status`.
pub fn set_status_in(v: &Value, via: u64, id: u64, set: &str) -> Result<Value, String> {
    let node = entry(v, id)
        .ok_or_else(|| format!("no entry for node {id} in node {via}'s status: {v}"))?;
    node.get("sets")
        .and_then(Value::as_array)
        .and_then(|sets| {
            sets.iter()
                .find(|s| s.get("name").and_then(Value::as_str) == Some(set))
        })
        .cloned()
        .ok_or_else(|| {
            format!("node {id}'s entry in node {via}'s status has no set {set:?}: {node}")
        })
}

/// A numeric field (`bytes_proposed`, `bytes_saved`, ...) of node `id`'s
/// entry in the status JSON node `via` prints.
pub fn node_counter(c: &Cluster, via: u64, id: u64, key: &str) -> Result<u64, String> {
    let v = c.status_result(via, super::STATUS_TIMEOUT)?;
    let node = entry(&v, id)
        .ok_or_else(|| format!("no entry for node {id} in node {via}'s status: {v}"))?;
    node.get(key).and_then(Value::as_u64).ok_or_else(|| {
        format!("node {id}'s entry in node {via}'s status has no numeric {key:?}: {node}")
    })
}

/// Waits until every node of `ids` lists each of `sets` in its own status:
/// it has loaded them and replication is running there.
#[track_caller]
pub fn wait_sets_ready(c: &Cluster, ids: &[u64], sets: &[&str]) {
    for &id in ids {
        for set in sets {
            wait_until(
                Duration::from_secs(20),
                &format!("node {id} to report set {set:?} in its status"),
                || {
                    c.assert_alive(id);
                    set_status(c, id, id, set)
                },
            );
        }
    }
}

// ---------------------------------------------------------------------------
// File operations
// ---------------------------------------------------------------------------

/// True when the tests run as root: only then can they give files to other
/// owners (and expect clusterd to be able to as well).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Sets `path`'s mtime to `secs`.`nsec` (atime untouched), without
/// following a symlink: nanoseconds matter, `touch -d` would round.
#[track_caller]
pub fn set_mtime(path: &Path, secs: i64, nsec: i64) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: secs as libc::time_t,
            tv_nsec: nsec as _,
        },
    ];
    // SAFETY: a NUL-terminated path and a two-element timespec array.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        rc,
        0,
        "utimensat {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
}

/// Deterministic pseudo-random bytes (splitmix64 of `seed`): incompressible,
/// so zstd cannot hide what a transfer really costs, and reproducible.
pub struct PseudoRandom(u64);

impl PseudoRandom {
    pub fn new(seed: u64) -> Self {
        PseudoRandom(seed)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }

    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        PseudoRandom::new(seed).fill(&mut v);
        v
    }
}

/// Appends `len` pseudo-random bytes from `seed` to `path` (created if
/// missing), in writes of at most 1 MiB: files of a GiB need not fit in
/// memory, and a 64-byte file costs no 1 MiB buffer.
#[track_caller]
pub fn append_pseudo_random(path: &Path, seed: u64, len: u64) {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut rng = PseudoRandom::new(seed);
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        left -= n as u64;
    }
}

// ---------------------------------------------------------------------------
// Quarantine and leadership order (failover tests)
// ---------------------------------------------------------------------------

/// Node `id`'s `data_dir/quarantine` as a tree (set aside copies and the
/// record file; the layout below it is clusterd's, not fixed here).
#[track_caller]
pub fn quarantine_tree(c: &Cluster, id: u64) -> Tree {
    snapshot(&c.node(id).data_dir.join("quarantine"))
}

/// Node `id`'s `clusterctl conflicts --json`: its quarantine records.
pub fn conflict_records(c: &Cluster, id: u64) -> Result<Vec<Value>, String> {
    let out = c.ctl(id, &["conflicts", "--json"], super::STATUS_TIMEOUT);
    if !out.success() {
        return Err(format!("node {id}: clusterctl conflicts --json: {out}"));
    }
    match serde_json::from_str::<Value>(out.stdout.trim()) {
        Ok(Value::Array(records)) => Ok(records),
        Ok(other) => Err(format!(
            "node {id}: conflicts --json is not an array: {other}"
        )),
        Err(e) => Err(format!(
            "node {id}: conflicts --json is not JSON ({e}): {out}"
        )),
    }
}

/// `leader` followed by the other nodes of `ids`: the order the tree
/// comparisons use (everyone against the source).
pub fn leader_then(leader: u64, ids: &[u64]) -> Vec<u64> {
    let mut out = vec![leader];
    out.extend(ids.iter().copied().filter(|&i| i != leader));
    out
}
