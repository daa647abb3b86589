//! Durable file-replication state of one node, in its own RocksDB under
//! `data_dir/files`: the committed manifest, the index it was applied up to,
//! and node-local knowledge that is never replicated (what this node last
//! wrote or read for each path, block signatures of committed versions, and
//! paths whose content it still has to fetch).
//!
//! Invariant owned here: the manifest and the applied index move together,
//! in one fsync'd write batch, so after a crash the manifest is exactly the
//! one at the stored applied index and re-applying later entries is safe.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rocksdb::{IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::core::history::{Revision, Version};
use crate::core::manifest::{Entry, Manifest, Pause, SetProgress, WireDigest};
use crate::core::paths::SetPath;

#[derive(Debug, thiserror::Error)]
pub enum FilesStoreError {
    #[error("cannot open the file state in {path}: {source}")]
    Open {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("cannot write the file state in {path}: {source}; the node stops rather than act on state that is not durable")]
    Write {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("the file state in {path} is damaged at key {key:?}: {why}")]
    Corrupt {
        path: PathBuf,
        key: String,
        why: String,
    },
}

/// What this node last put at (or read from) a path: lets it notice, by
/// `lstat` alone, that someone changed the file since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalRecord {
    pub digest: WireDigest,
    pub len: u64,
    pub mtime_ns: i128,
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

const KEY_APPLIED: &[u8] = b"a";
const P_ENTRY: u8 = b'm';
const P_PROGRESS: u8 = b'p';
const P_RECORD: u8 = b'r';
const P_SIGNATURE: u8 = b'g';
const P_MISSING: u8 = b'x';
const P_PAUSE: u8 = b'u';
const P_HELD: u8 = b'h';
/// History (`crate::core::history`): a set's revisions, each path's
/// versions, and the content of small versions.
const P_REVISION: u8 = b'v';
const P_VERSION: u8 = b'w';
const P_OBJECT: u8 = b'o';

fn revision_key(set: &str, rev: u64) -> Vec<u8> {
    let mut k = set_key(P_REVISION, set);
    k.push(0);
    k.extend_from_slice(&rev.to_be_bytes());
    k
}

/// Versions of `path` sort by revision under this prefix.
fn version_prefix(set: &str, path: &SetPath) -> Vec<u8> {
    let mut k = path_key(P_VERSION, set, path);
    k.push(0);
    k
}

fn object_key(digest: &WireDigest) -> Vec<u8> {
    let mut k = vec![P_OBJECT];
    k.extend_from_slice(&digest.0);
    k
}

fn rev_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

fn path_key(prefix: u8, set: &str, path: &SetPath) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + set.len() + path.as_bytes().len());
    k.push(prefix);
    k.extend_from_slice(set.as_bytes());
    k.push(0);
    k.extend_from_slice(path.as_bytes());
    k
}

fn set_key(prefix: u8, set: &str) -> Vec<u8> {
    let mut k = vec![prefix];
    k.extend_from_slice(set.as_bytes());
    k
}

fn split_path_key(key: &[u8]) -> Option<(String, SetPath)> {
    let rest = &key[1..];
    let nul = rest.iter().position(|&b| b == 0)?;
    let set = String::from_utf8(rest[..nul].to_vec()).ok()?;
    let path = SetPath::from_network(&rest[nul + 1..]).ok()?;
    Some((set, path))
}

pub struct FilesStore {
    db: DB,
    path: PathBuf,
    /// Records put into (or deleted from, `None`) batches that are not
    /// written yet, by key. Records live on disk only: with 100,000 files a
    /// copy in memory would be most of an idle node's heap. This overlay
    /// lets every reader (the applier reading back what an earlier entry of
    /// the same page recorded, the leader's source) see a record from the
    /// moment it is put, as the in-memory map once did. It holds one page of
    /// batches at most: [`FilesStore::write`] drops what it wrote.
    unwritten: Mutex<HashMap<Vec<u8>, Option<LocalRecord>>>,
}

/// Changes written together by [`FilesStore::write`].
#[derive(Default)]
pub struct StoreBatch {
    wb: WriteBatch,
    /// The records this batch puts or deletes, to leave the store's
    /// overlay once written.
    records: Vec<(Vec<u8>, Option<LocalRecord>)>,
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("state always serializes")
}

impl StoreBatch {
    pub fn put_entry(&mut self, set: &str, path: &SetPath, entry: &Entry) {
        // Entries without xattrs keep the format older releases wrote.
        self.wb
            .put(path_key(P_ENTRY, set, path), entry.encode_stored());
    }
    pub fn delete_entry(&mut self, set: &str, path: &SetPath) {
        self.wb.delete(path_key(P_ENTRY, set, path));
    }
    pub fn put_progress(&mut self, set: &str, progress: &SetProgress) {
        self.wb.put(set_key(P_PROGRESS, set), enc(progress));
    }
    pub fn put_signature(&mut self, set: &str, path: &SetPath, signature: &[u8]) {
        self.wb.put(path_key(P_SIGNATURE, set, path), signature);
    }
    pub fn delete_signature(&mut self, set: &str, path: &SetPath) {
        self.wb.delete(path_key(P_SIGNATURE, set, path));
    }
    pub fn put_missing(&mut self, set: &str, path: &SetPath, want: &WireDigest) {
        self.wb.put(path_key(P_MISSING, set, path), enc(want));
    }
    pub fn delete_missing(&mut self, set: &str, path: &SetPath) {
        self.wb.delete(path_key(P_MISSING, set, path));
    }
    /// Records `set` as paused (`Some`) or resumed (`None`).
    pub fn put_pause(&mut self, set: &str, pause: Option<&Pause>) {
        match pause {
            Some(p) => self.wb.put(set_key(P_PAUSE, set), enc(p)),
            None => self.wb.delete(set_key(P_PAUSE, set)),
        }
    }
    /// Records that this node holds `set` (`Some((reverted, why))`: after
    /// a reverted `on_change`, or else a refusal of its own validator), or
    /// that it no longer does (`None`).
    pub fn put_held(&mut self, set: &str, held: Option<(bool, &str)>) {
        match held {
            Some(h) => self.wb.put(set_key(P_HELD, set), enc(&h)),
            None => self.wb.delete(set_key(P_HELD, set)),
        }
    }
    /// Records revision `rev` of `set` (see [`crate::core::history`]).
    pub fn put_revision(&mut self, set: &str, rev: u64, revision: &Revision) {
        self.wb.put(revision_key(set, rev), enc(revision));
    }
    pub fn delete_revision(&mut self, set: &str, rev: u64) {
        self.wb.delete(revision_key(set, rev));
    }
    /// Records `path`'s state after revision `rev`.
    pub fn put_version(&mut self, set: &str, path: &SetPath, rev: u64, version: &Version) {
        let mut k = version_prefix(set, path);
        k.extend_from_slice(&rev.to_be_bytes());
        self.wb.put(k, enc(version));
    }
    pub fn delete_version(&mut self, set: &str, path: &SetPath, rev: u64) {
        let mut k = version_prefix(set, path);
        k.extend_from_slice(&rev.to_be_bytes());
        self.wb.delete(k);
    }
    /// Stores the compressed content of a small version.
    pub fn put_object(&mut self, digest: &WireDigest, compressed: &[u8]) {
        self.wb.put(object_key(digest), compressed);
    }
    pub fn delete_object(&mut self, digest: &WireDigest) {
        self.wb.delete(object_key(digest));
    }
    pub fn set_applied(&mut self, index: u64) {
        self.wb.put(KEY_APPLIED, index.to_be_bytes());
    }
    /// Drops every manifest entry and progress counter (before a snapshot is restored).
    pub fn clear_manifest(&mut self) {
        self.wb.delete_range(vec![P_ENTRY], vec![P_ENTRY + 1]);
        self.wb.delete_range(vec![P_PROGRESS], vec![P_PROGRESS + 1]);
        self.wb.delete_range(vec![P_MISSING], vec![P_MISSING + 1]);
        self.wb.delete_range(vec![P_PAUSE], vec![P_PAUSE + 1]);
    }
    pub fn is_empty(&self) -> bool {
        self.wb.is_empty()
    }
    /// Appends `other`'s changes after this batch's.
    pub fn extend(&mut self, other: StoreBatch) {
        // WriteBatch has no append: replay the other batch's operations.
        struct Into<'a>(&'a mut WriteBatch);
        impl rocksdb::WriteBatchIterator for Into<'_> {
            fn put(&mut self, key: &[u8], value: &[u8]) {
                self.0.put(key, value);
            }
            fn delete(&mut self, key: &[u8]) {
                self.0.delete(key);
            }
        }
        other.wb.iterate(&mut Into(&mut self.wb));
        self.records.extend(other.records);
    }
}

impl FilesStore {
    pub fn open(dir: &Path) -> Result<FilesStore, FilesStoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_keep_log_file_num(2);
        opts.set_max_total_wal_size(32 << 20);
        // Small memtables: this store holds little but is written on every
        // apply, and an idle node should stay small in memory.
        opts.set_write_buffer_size(4 << 20);
        // A periodic pass looks up the record of every file in the sets; a
        // Bloom filter lets each lookup skip the tables that cannot hold
        // its key (about 1.25 bytes per key) instead of searching each.
        let mut table = crate::raft::storage::small_block_cache();
        table.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table);
        let db = DB::open(&opts, dir).map_err(|source| FilesStoreError::Open {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(FilesStore {
            db,
            path: dir.to_path_buf(),
            unwritten: Mutex::new(HashMap::new()),
        })
    }

    /// Writes `batch` durably (fsync'd) before returning.
    pub fn write(&self, batch: StoreBatch) -> Result<(), FilesStoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.write_with(batch, &opts)
    }

    fn write_with(&self, batch: StoreBatch, opts: &WriteOptions) -> Result<(), FilesStoreError> {
        self.db
            .write_opt(batch.wb, opts)
            .map_err(|source| FilesStoreError::Write {
                path: self.path.clone(),
                source,
            })?;
        if !batch.records.is_empty() {
            let mut unwritten = self.unwritten.lock().unwrap();
            for (key, record) in batch.records {
                // A later batch, not written yet, may have put the key again.
                if unwritten.get(&key) == Some(&record) {
                    unwritten.remove(&key);
                }
            }
            if unwritten.is_empty() && unwritten.capacity() > 1024 {
                *unwritten = HashMap::new();
            }
        }
        Ok(())
    }

    /// Puts `record` into `batch`; readers see it at once.
    pub fn put_record(
        &self,
        batch: &mut StoreBatch,
        set: &str,
        path: &SetPath,
        record: &LocalRecord,
    ) {
        let key = path_key(P_RECORD, set, path);
        batch.wb.put(&key, enc(record));
        self.stage_record(batch, key, Some(*record));
    }

    /// Deletes the record of `path` in `batch`; readers miss it at once.
    pub fn delete_record(&self, batch: &mut StoreBatch, set: &str, path: &SetPath) {
        let key = path_key(P_RECORD, set, path);
        batch.wb.delete(&key);
        self.stage_record(batch, key, None);
    }

    fn stage_record(&self, batch: &mut StoreBatch, key: Vec<u8>, record: Option<LocalRecord>) {
        self.unwritten.lock().unwrap().insert(key.clone(), record);
        batch.records.push((key, record));
    }

    /// What this node last put at (or read from) `path`, unwritten batches
    /// included.
    pub fn record(&self, set: &str, path: &SetPath) -> Option<LocalRecord> {
        let key = path_key(P_RECORD, set, path);
        if let Some(r) = self.unwritten.lock().unwrap().get(&key) {
            return *r;
        }
        let value = self.db.get(&key).ok().flatten()?;
        // A record that does not decode is as good as none: the file is
        // read again, and the next put replaces it.
        postcard::from_bytes(&value).ok()
    }

    /// The records of `path` and of every path below it, in path order.
    pub fn records_under(&self, set: &str, path: &SetPath) -> Vec<(SetPath, LocalRecord)> {
        let exact = path_key(P_RECORD, set, path);
        let under = |key: &[u8]| {
            key.starts_with(&exact) && (key.len() == exact.len() || key[exact.len()] == b'/')
        };
        self.records_where(&exact, under)
    }

    /// Every record of `set`, in path order.
    pub fn records_of_set(&self, set: &str) -> Vec<(SetPath, LocalRecord)> {
        let mut prefix = set_key(P_RECORD, set);
        prefix.push(0);
        self.records_where(&prefix, |_| true)
    }

    /// Records whose keys start with `prefix` and that `wanted` accepts:
    /// the disk's, overlaid with unwritten batches.
    fn records_where(
        &self,
        prefix: &[u8],
        wanted: impl Fn(&[u8]) -> bool,
    ) -> Vec<(SetPath, LocalRecord)> {
        let wanted = |k: &[u8]| k.starts_with(prefix) && wanted(k);
        let mut found: std::collections::BTreeMap<Vec<u8>, LocalRecord> = Default::default();
        let iter = self
            .db
            .iterator(IteratorMode::From(prefix, rocksdb::Direction::Forward));
        for item in iter {
            let Ok((k, v)) = item else { break };
            if !k.starts_with(prefix) {
                break;
            }
            if wanted(&k) {
                if let Ok(r) = postcard::from_bytes(&v) {
                    found.insert(k.into_vec(), r);
                }
            }
        }
        for (k, r) in self.unwritten.lock().unwrap().iter() {
            if wanted(k) {
                match r {
                    Some(r) => found.insert(k.clone(), *r),
                    None => found.remove(k),
                };
            }
        }
        found
            .into_iter()
            .filter_map(|(k, r)| split_path_key(&k).map(|(_, p)| (p, r)))
            .collect()
    }

    /// Revisions of `set`, newest first, from `before` down (exclusive;
    /// `None`: from the newest), while `more` accepts them.
    pub fn revisions(
        &self,
        set: &str,
        before: Option<u64>,
        mut more: impl FnMut(u64, Revision) -> bool,
    ) -> Result<(), FilesStoreError> {
        let mut prefix = set_key(P_REVISION, set);
        prefix.push(0);
        let start = revision_key(set, before.unwrap_or(u64::MAX));
        let iter = self
            .db
            .iterator(IteratorMode::From(&start, rocksdb::Direction::Reverse));
        for item in iter {
            let (k, v) = item.map_err(|e| self.corrupt(&start, e.to_string()))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let rev = rev_of(&k).unwrap_or(0);
            if Some(rev) == before {
                continue;
            }
            let r: Revision =
                postcard::from_bytes(&v).map_err(|e| self.corrupt(&k, e.to_string()))?;
            if !more(rev, r) {
                break;
            }
        }
        Ok(())
    }

    /// The oldest revision of `set` kept, if any.
    pub fn first_revision(&self, set: &str) -> Result<Option<u64>, FilesStoreError> {
        let mut prefix = set_key(P_REVISION, set);
        prefix.push(0);
        let mut iter = self
            .db
            .iterator(IteratorMode::From(&prefix, rocksdb::Direction::Forward));
        match iter.next() {
            Some(Ok((k, _))) if k.starts_with(&prefix) => Ok(rev_of(&k)),
            Some(Err(e)) => Err(self.corrupt(&prefix, e.to_string())),
            _ => Ok(None),
        }
    }

    /// Revisions of `set`, oldest first, as (revision, time, stored bytes).
    pub fn revision_weights(&self, set: &str) -> Result<Vec<(u64, u64, u64)>, FilesStoreError> {
        let mut out = Vec::new();
        self.revisions(set, None, |rev, r| {
            out.push((rev, r.time_ms, r.stored_bytes));
            true
        })?;
        out.reverse();
        Ok(out)
    }

    /// The state of `path` at revision `rev`: its last version at or before
    /// `rev` and the revision that made it.
    pub fn version_at(
        &self,
        set: &str,
        path: &SetPath,
        rev: u64,
    ) -> Result<Option<(u64, Version)>, FilesStoreError> {
        let prefix = version_prefix(set, path);
        let mut start = prefix.clone();
        start.extend_from_slice(&rev.to_be_bytes());
        let mut iter = self
            .db
            .iterator(IteratorMode::From(&start, rocksdb::Direction::Reverse));
        match iter.next() {
            Some(Ok((k, v))) if k.starts_with(&prefix) && k.len() == prefix.len() + 8 => {
                let version =
                    postcard::from_bytes(&v).map_err(|e| self.corrupt(&k, e.to_string()))?;
                Ok(Some((rev_of(&k).unwrap_or(0), version)))
            }
            Some(Err(e)) => Err(self.corrupt(&start, e.to_string())),
            _ => Ok(None),
        }
    }

    /// Every version of every path of `set` (path order, then revision
    /// order), for retention.
    pub fn versions_of_set(
        &self,
        set: &str,
        mut each: impl FnMut(SetPath, u64, Version),
    ) -> Result<(), FilesStoreError> {
        let mut prefix = set_key(P_VERSION, set);
        prefix.push(0);
        self.each_under(&prefix, |k, v| {
            let Some(rev) = rev_of(k) else { return Ok(()) };
            let Some((_, path)) = split_path_key(&k[..k.len() - 9]) else {
                return Ok(());
            };
            let version = postcard::from_bytes(v).map_err(|e| self.corrupt(k, e.to_string()))?;
            each(path, rev, version);
            Ok(())
        })?;
        Ok(())
    }

    /// The stored (compressed) content of a small version, if this node
    /// has it.
    pub fn object(&self, digest: &WireDigest) -> Result<Option<Vec<u8>>, FilesStoreError> {
        self.db
            .get(object_key(digest))
            .map_err(|e| self.corrupt(&object_key(digest), e.to_string()))
    }

    pub fn has_object(&self, digest: &WireDigest) -> bool {
        self.db.key_may_exist(object_key(digest)) && matches!(self.object(digest), Ok(Some(_)))
    }

    /// Every stored object's digest and size.
    pub fn objects(&self, mut each: impl FnMut(WireDigest, u64)) -> Result<(), FilesStoreError> {
        self.each_under(&[P_OBJECT], |k, v| {
            if let Ok(d) = <[u8; crate::core::delta::FileDigest::ENCODED_LEN]>::try_from(&k[1..]) {
                each(WireDigest(d), v.len() as u64);
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Writes the memtable out so its memory is freed (see
    /// [`crate::raft::storage::RaftStore::flush_memtables`]).
    pub fn flush_memtables(&self) {
        let _ = self.db.flush();
    }

    /// Writes `batch` without waiting for an fsync: only for caches that are
    /// validated when read (block signatures carry the digest they are of).
    pub fn write_relaxed(&self, batch: StoreBatch) -> Result<(), FilesStoreError> {
        self.write_with(batch, &WriteOptions::default())
    }

    fn corrupt(&self, key: &[u8], why: impl ToString) -> FilesStoreError {
        FilesStoreError::Corrupt {
            path: self.path.clone(),
            key: String::from_utf8_lossy(key).into_owned(),
            why: why.to_string(),
        }
    }

    pub fn applied(&self) -> Result<u64, FilesStoreError> {
        match self
            .db
            .get(KEY_APPLIED)
            .map_err(|e| self.corrupt(KEY_APPLIED, e))?
        {
            None => Ok(0),
            Some(v) => Ok(u64::from_be_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| self.corrupt(KEY_APPLIED, "not 8 bytes"))?,
            )),
        }
    }

    fn scan<T: DeserializeOwned>(
        &self,
        prefix: u8,
    ) -> Result<Vec<(String, SetPath, T)>, FilesStoreError> {
        self.scan_with(prefix, |v| postcard::from_bytes(v))
    }

    fn scan_with<T>(
        &self,
        prefix: u8,
        decode: impl Fn(&[u8]) -> Result<T, postcard::Error>,
    ) -> Result<Vec<(String, SetPath, T)>, FilesStoreError> {
        self.scan_prefix(prefix, |k, v| {
            let (set, path) = split_path_key(k).ok_or_else(|| self.corrupt(k, "bad key"))?;
            let value: T = decode(v).map_err(|e| self.corrupt(k, e))?;
            Ok((set, path, value))
        })
    }

    /// Every key under `prefix`, in order, read by `item` (key, value).
    fn scan_prefix<R>(
        &self,
        prefix: u8,
        mut item: impl FnMut(&[u8], &[u8]) -> Result<R, FilesStoreError>,
    ) -> Result<Vec<R>, FilesStoreError> {
        let mut out = Vec::new();
        self.each_under(&[prefix], |k, v| {
            out.push(item(k, v)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `item` with every key under the byte prefix `prefix` and its
    /// value, in key order.
    fn each_under(
        &self,
        prefix: &[u8],
        mut item: impl FnMut(&[u8], &[u8]) -> Result<(), FilesStoreError>,
    ) -> Result<(), FilesStoreError> {
        let iter = self
            .db
            .iterator(IteratorMode::From(prefix, rocksdb::Direction::Forward));
        for entry in iter {
            let (k, v) = entry.map_err(|e| self.corrupt(prefix, e))?;
            if !k.starts_with(prefix) {
                break;
            }
            item(&k, &v)?;
        }
        Ok(())
    }

    pub fn load_manifest(&self) -> Result<Manifest, FilesStoreError> {
        let mut m = Manifest::default();
        for (set, path, entry) in self.scan_with(P_ENTRY, Entry::decode_stored)? {
            m.sets.entry(set).or_default().entries.insert(path, entry);
        }
        for (set, progress) in self.scan_sets::<SetProgress>(P_PROGRESS)? {
            m.sets.entry(set).or_default().progress = progress;
        }
        m.paused = self.scan_sets::<Pause>(P_PAUSE)?.into_iter().collect();
        m.repack();
        Ok(m)
    }

    /// The sets this node holds: (set, reverted, why).
    pub fn load_held(&self) -> Result<Vec<(String, bool, String)>, FilesStoreError> {
        Ok(self
            .scan_sets::<(bool, String)>(P_HELD)?
            .into_iter()
            .map(|(set, (reverted, why))| (set, reverted, why))
            .collect())
    }

    /// Every value under `prefix` keyed by set name alone (`set_key`).
    fn scan_sets<T: DeserializeOwned>(
        &self,
        prefix: u8,
    ) -> Result<Vec<(String, T)>, FilesStoreError> {
        self.scan_prefix(prefix, |k, v| {
            let set =
                String::from_utf8(k[1..].to_vec()).map_err(|_| self.corrupt(k, "set name"))?;
            let value: T = postcard::from_bytes(v).map_err(|e| self.corrupt(k, e))?;
            Ok((set, value))
        })
    }

    pub fn load_missing(&self) -> Result<Vec<(String, SetPath, WireDigest)>, FilesStoreError> {
        self.scan(P_MISSING)
    }

    pub fn signature(&self, set: &str, path: &SetPath) -> Option<Vec<u8>> {
        self.db.get(path_key(P_SIGNATURE, set, path)).ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::{EntryKind, Meta};

    fn rec(ino: u64) -> LocalRecord {
        LocalRecord {
            digest: WireDigest::new(&crate::core::delta::digest(b"x")),
            len: 1,
            mtime_ns: 7,
            ino,
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
    }

    fn names(v: &[(SetPath, LocalRecord)]) -> Vec<(&[u8], u64)> {
        v.iter().map(|(p, r)| (p.as_bytes(), r.ino)).collect()
    }

    #[test]
    fn records_read_back_from_unwritten_batches_and_from_disk_alike() {
        let dir = tempfile::tempdir().unwrap();
        let s = FilesStore::open(dir.path()).unwrap();
        let p = |b: &[u8]| SetPath::from_network(b).unwrap();
        let mut first = StoreBatch::default();
        for (i, name) in [&b"a"[..], b"a.txt", b"a/x", b"a/y/z", b"ab", b"b"]
            .iter()
            .enumerate()
        {
            s.put_record(&mut first, "etc", &p(name), &rec(i as u64));
        }
        s.put_record(&mut first, "other", &p(b"a/x"), &rec(99));
        // Seen before it is written, as by the applier's next entry.
        assert_eq!(s.record("etc", &p(b"a/y/z")), Some(rec(3)));
        s.write(first).unwrap();
        assert!(s.unwritten.lock().unwrap().is_empty());
        assert_eq!(s.record("etc", &p(b"a/y/z")), Some(rec(3)));
        let under = s.records_under("etc", &p(b"a"));
        assert_eq!(names(&under), [(&b"a"[..], 0), (b"a/x", 2), (b"a/y/z", 3)]);

        // An unwritten deletion hides the disk's record, an unwritten put
        // shows, and both stay visible until their own batch is written,
        // even when an earlier batch with the same key is written first.
        let mut second = StoreBatch::default();
        s.delete_record(&mut second, "etc", &p(b"a/x"));
        s.put_record(&mut second, "etc", &p(b"a/w"), &rec(10));
        let mut third = StoreBatch::default();
        s.put_record(&mut third, "etc", &p(b"a/w"), &rec(11));
        assert_eq!(s.record("etc", &p(b"a/x")), None);
        let under = s.records_under("etc", &p(b"a"));
        assert_eq!(names(&under), [(&b"a"[..], 0), (b"a/w", 11), (b"a/y/z", 3)]);
        s.write(second).unwrap();
        assert_eq!(s.record("etc", &p(b"a/w")), Some(rec(11)));
        s.write(third).unwrap();
        assert_eq!(s.record("etc", &p(b"a/w")), Some(rec(11)));
        assert!(s.unwritten.lock().unwrap().is_empty());
        assert_eq!(s.records_of_set("etc").len(), 6);
        assert_eq!(names(&s.records_of_set("other")), [(&b"a/x"[..], 99)]);

        drop(s);
        let s = FilesStore::open(dir.path()).unwrap();
        assert_eq!(s.record("etc", &p(b"a/w")), Some(rec(11)));
        assert_eq!(s.record("etc", &p(b"a/x")), None);
    }

    #[test]
    fn manifest_and_applied_survive_reopen_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let p = SetPath::from_network(b"a/b").unwrap();
        let entry = Entry {
            meta: Meta {
                kind: EntryKind::File,
                mode: 0o640,
                uid: 0,
                gid: 42,
                user: None,
                group: Some("shadow".into()),
                mtime_ns: 1,
            },
            digest: Some(WireDigest::new(&crate::core::delta::digest(b"x"))),
            target: None,
            xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
            link: None,
        };
        {
            let s = FilesStore::open(dir.path()).unwrap();
            let mut b = StoreBatch::default();
            b.put_entry("etc", &p, &entry);
            b.put_missing("etc", &p, &entry.digest.unwrap());
            b.set_applied(9);
            s.write(b).unwrap();
        }
        let s = FilesStore::open(dir.path()).unwrap();
        assert_eq!(s.applied().unwrap(), 9);
        assert_eq!(s.load_manifest().unwrap().get("etc", &p), Some(&entry));
        assert_eq!(s.load_missing().unwrap().len(), 1);
        let mut b = StoreBatch::default();
        b.clear_manifest();
        s.write(b).unwrap();
        assert!(s.load_manifest().unwrap().sets.is_empty());
        assert!(s.load_missing().unwrap().is_empty());
    }
}
