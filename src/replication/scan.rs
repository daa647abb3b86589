//! Reading a set's local tree: the walks that keep only unsettled paths,
//! `skip_while` markers, hashing a local file, and the local records that
//! tell a file this node wrote from one edited since.

use std::collections::{BTreeSet, HashSet};
use std::io::Read;
use std::os::unix::fs::FileExt;

use crate::core::delta::{FileDigest, FileHasher};
use crate::core::manifest::{EntryKind, Meta, WireDigest};
use crate::core::paths::SetPath;
use crate::fs::owners::*;
use crate::fs::root::{FileMeta, FsError, Kind, Root};
use crate::replication::files_store::LocalRecord;
use crate::replication::shared::*;
use tracing::debug;
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
            if crate::fs::root::is_temp_name(&name) {
                if kind == Kind::File && crate::fs::root::is_stale_temp_name(&name) {
                    // A version written before a crash, never renamed in.
                    let mut at = comps.clone();
                    at.push(name.as_slice());
                    if root.remove(&at).is_ok() {
                        debug!(set = %set.name, "removed a temporary file an earlier run left behind");
                    }
                }
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

pub(super) fn subtree_has_marker(
    set: &SetRuntime,
    root: &Root,
    dir: &SetPath,
) -> Result<bool, FsError> {
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

/// A file read this close to its mtime could be written again within the
/// same timestamp tick (the kernel's coarse clock: 4 ms at HZ=250, 10 ms at
/// HZ=100; kernels from 6.13 give a file stat'ed since its last change a
/// finer one) with the same length, leaving an lstat identical to the one
/// recorded: the second version would look unchanged for good.
const RACY_MTIME_NS: i128 = 30_000_000;

/// An mtime no lstat returns (seconds are 64-bit).
const SMUDGED_MTIME_NS: i128 = i128::MIN;

/// [`record_of`] for a file the leader just read: smudged, as git smudges a
/// racily clean index entry, when its mtime is within [`RACY_MTIME_NS`] of
/// now, so [`unchanged_since`] never matches it and whoever consults the
/// record next hashes the file instead. The short settle after a writer's
/// close (`SETTLED_QUIET`, 2 ms) reads files that young; the 20 ms debounce
/// alone never did.
pub fn record_of_read(meta: &FileMeta, digest: &FileDigest) -> LocalRecord {
    record_at(meta, digest, now_ns())
}

fn record_at(meta: &FileMeta, digest: &FileDigest, now_ns: i128) -> LocalRecord {
    let mut r = record_of(meta, digest);
    if (now_ns - meta.mtime_ns).abs() < RACY_MTIME_NS {
        r.mtime_ns = SMUDGED_MTIME_NS;
    }
    r
}

fn now_ns() -> i128 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
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

pub(super) fn comps(path: &SetPath) -> Vec<&[u8]> {
    path.components().collect()
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
        if crate::fs::root::is_temp_name(&name) {
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

pub(super) fn entry_kind(k: Kind) -> EntryKind {
    match k {
        Kind::Dir => EntryKind::Dir,
        Kind::Symlink => EntryKind::Symlink,
        _ => EntryKind::File,
    }
}

pub(super) fn default_dir_meta() -> FileMeta {
    let uid = unsafe { libc::geteuid() };
    let gid = unsafe { libc::getegid() };
    FileMeta::new(Kind::Dir, 0o755, uid, gid, unix_ms() as i128 * 1_000_000)
}

/// The committed metadata `meta` as this node sets it (owner names
/// resolved to its own ids).
pub(super) fn fs_meta(meta: &Meta) -> FileMeta {
    let (uid, gid) = local_ids(meta);
    let kind = match meta.kind {
        EntryKind::File => Kind::File,
        EntryKind::Dir => Kind::Dir,
        EntryKind::Symlink => Kind::Symlink,
    };
    FileMeta::new(kind, meta.mode, uid, gid, meta.mtime_ns)
}

/// Metadata equal as far as this node can set it (`want` from [`fs_meta`]).
pub(super) fn meta_matches(want: &FileMeta, have: &FileMeta) -> bool {
    have.mode == want.mode
        && have.uid == want.uid
        && have.gid == want.gid
        && have.mtime_ns == want.mtime_ns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_read_within_a_clock_tick_of_its_mtime_is_never_taken_as_unchanged() {
        let digest = crate::core::delta::digest(b"a\n");
        let mut meta = FileMeta::new(Kind::File, 0o644, 0, 0, 1_000_000_000_000);
        meta.len = 2;
        let now = meta.mtime_ns;
        // Read 2 ms after the write: a same-length rewrite in the same tick
        // would leave this very lstat, so the record must not vouch for it.
        let young = record_at(&meta, &digest, now + 2_000_000);
        assert!(!unchanged_since(&young, &meta));
        assert_eq!(young.digest.get(), digest);
        assert_eq!((young.len, young.ino), (meta.len, meta.ino));
        // A clock a little behind the file's mtime is as racy.
        assert!(!unchanged_since(
            &record_at(&meta, &digest, now - 2_000_000),
            &meta
        ));
        // Read well after the write: the lstat decides.
        let settled = record_at(&meta, &digest, now + 50_000_000);
        assert!(unchanged_since(&settled, &meta));
        let mut touched = meta;
        touched.mtime_ns += 1;
        assert!(!unchanged_since(&settled, &touched));
    }
}
