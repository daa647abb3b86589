//! Durable Raft state of this node: the replicated log, the `HardState`
//! (term, vote, commit), the `ConfState` (membership), the metadata and bytes
//! of the latest snapshot, and the state machine's applied index. It is the
//! `raft::Storage` behind the node's `RawNode`.
//!
//! # Durability contract
//!
//! Every mutating method writes one RocksDB `WriteBatch` with `sync = true`
//! and returns only after the write-ahead log is fsync'd, so when it returns
//! `Ok` the change survives a crash or power loss; when it returns `Err`
//! nothing of it was written. A batch is atomic across both column families,
//! so a crash never leaves entries without the `HardState` persisted with them
//! (invariant 6 in PRODUCT.md: term, vote and log are durable before they are
//! acted on).
//!
//! The writers also refuse changes that would make the stored state
//! inconsistent or unsafe to restart from (a gap in the log, a second vote in
//! one term, a commit index going backwards or past the log, a snapshot older
//! than what is committed): such a call returns [`StorageError::Rejected`] and
//! writes nothing. raft-rs never asks for these; a rejection means a bug in
//! the caller, and halting is better than voting twice.
//!
//! # On-disk layout (pinned by the `golden_*` test; changing it needs a migration)
//!
//! * column family [`CF_ENTRIES`]: key [`entry_key`]`(index)` (8-byte
//!   big-endian, so RocksDB's byte order is log order), value the protobuf
//!   encoding of the `Entry`.
//! * column family [`CF_STATE`]: [`KEY_HARD_STATE`], [`KEY_CONF_STATE`],
//!   [`KEY_SNAPSHOT_META`] hold protobuf-encoded `HardState`, `ConfState`,
//!   `SnapshotMetadata`; [`KEY_SNAPSHOT_DATA`] holds the state machine's
//!   snapshot bytes as given; [`KEY_APPLIED`] holds a u64 big-endian.
//!
//! The log always covers exactly `snapshot index + 1 ..= last index`, with no
//! holes; the term of the entry at the snapshot index is kept in the snapshot
//! metadata, as raft requires.
//!
//! # Caching
//!
//! First and last index, the last entry's term, `HardState`, `ConfState`,
//! snapshot metadata and applied index live in memory behind an `RwLock`, so
//! the hot `term`/`first_index`/`last_index` calls do not touch RocksDB. The
//! cache is only updated after the batch is durable, and writers hold the
//! write lock across the write, so readers never see state that is not on
//! disk.

use std::cmp;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use protobuf::Message as PbMessage;
use raft::prelude::{ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, DBWithThreadMode, Direction,
    IteratorMode, Options, ReadOptions, SingleThreaded, WriteBatch, WriteOptions,
};

use crate::raft::core::LogStore;

/// Pinned to single-threaded column-family mode so that a feature flag turned
/// on elsewhere (`multi-threaded-cf`) cannot change the `cf_handle` types here.
type Db = DBWithThreadMode<SingleThreaded>;

/// Column family of log entries, keyed by [`entry_key`].
pub const CF_ENTRIES: &str = "entries";
/// Column family of the single-valued node state keys below.
pub const CF_STATE: &str = "state";
/// `HardState` (term, vote, commit), protobuf.
pub const KEY_HARD_STATE: &[u8] = b"hard_state";
/// `ConfState` (membership), protobuf.
pub const KEY_CONF_STATE: &[u8] = b"conf_state";
/// `SnapshotMetadata` of the latest compaction or installed snapshot, protobuf.
pub const KEY_SNAPSHOT_META: &[u8] = b"snapshot_meta";
/// State machine snapshot bytes belonging to [`KEY_SNAPSHOT_META`], raw.
pub const KEY_SNAPSHOT_DATA: &[u8] = b"snapshot_data";
/// State machine's applied index, u64 big-endian.
pub const KEY_APPLIED: &[u8] = b"applied";
/// The membership directory (`core::members::Directory`), JSON: addresses
/// and kinds of members added at runtime.
pub const KEY_MEMBERS: &[u8] = b"members";
/// Why this node no longer belongs to the cluster (UTF-8), once it learned
/// it was removed; absent while it is a member.
pub const KEY_REMOVED: &[u8] = b"removed";

/// The context to read entries with their data (`RaftStore::entries` gives
/// other contexts only headers): the applier, diagnostics and tests.
pub fn with_data() -> GetEntriesContext {
    GetEntriesContext::empty(true)
}

/// Key of the log entry at `index` in [`CF_ENTRIES`]: big-endian, so that the
/// byte order RocksDB sorts by is the numeric order of indexes.
pub fn entry_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Exclusive end key of a range that ends with `last`, without overflowing.
fn end_key(last: u64) -> [u8; 8] {
    entry_key(last.saturating_add(1))
}

/// Why the Raft store could not do what was asked. Each message names the
/// store's directory and what the operator (or developer) should do.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The directory could not be created.
    #[error("cannot create the Raft store directory {}: {source}; check that data_dir is on a writable filesystem and owned by the clusterd user", .path.display())]
    CreateDir {
        /// The store directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// RocksDB refused to open the database.
    #[error("cannot open the Raft store in {}: {source}; check that it is writable by clusterd and that no other clusterd process uses the same data_dir", .path.display())]
    Open {
        /// The store directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rocksdb::Error,
    },
    /// A read or write of RocksDB failed.
    #[error("{op} in the Raft store at {} failed: {source}; check free space and disk health under data_dir, then restart clusterd", .path.display())]
    Db {
        /// The store directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: rocksdb::Error,
    },
    /// A stored value does not decode, or the stored values contradict each other.
    #[error("the Raft store at {} holds a corrupt value under {key}: {reason}; restore data_dir from a backup, or move it aside so the node rejoins and receives a snapshot from the leader", .path.display())]
    Corrupt {
        /// The store directory.
        path: PathBuf,
        /// Column family and key, e.g. `state/hard_state` or `entries/42`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value could not be encoded (a bug: in-memory messages always encode).
    #[error("cannot encode {key} for the Raft store at {}: {source}; this is a bug in clusterd, please report it", .path.display())]
    Encode {
        /// The store directory.
        path: PathBuf,
        /// Column family and key being written.
        key: String,
        /// The underlying error.
        #[source]
        source: protobuf::ProtobufError,
    },
    /// Another thread panicked while holding the in-memory cache.
    #[error("the in-memory view of the Raft store at {} is unusable (another thread panicked while updating it) while accessing {key}; restart clusterd", .path.display())]
    Poisoned {
        /// The store directory.
        path: PathBuf,
        /// Column family and key being accessed.
        key: &'static str,
    },
    /// `bootstrap` was called on a store that already holds Raft state.
    #[error("refusing to bootstrap the Raft store at {}: it already holds Raft state ({what}); a node is bootstrapped only once, so start it normally, or move data_dir aside to join as a new member", .path.display())]
    AlreadyInitialized {
        /// The store directory.
        path: PathBuf,
        /// What was found.
        what: String,
    },
    /// A snapshot from the leader is older than what this store already has.
    #[error("snapshot at index {index} is older than the Raft store at {} (first index {first_index}, commit {commit}); nothing was written, the leader will send a newer one", .path.display())]
    SnapshotOutOfDate {
        /// The store directory.
        path: PathBuf,
        /// Index of the rejected snapshot.
        index: u64,
        /// First index of the log in the store.
        first_index: u64,
        /// Durable commit index in the store.
        commit: u64,
    },
    /// `compact` asked for an index the log was already compacted past.
    #[error("cannot compact the Raft store at {} to index {index}: it is already compacted to {snapshot_index}; nothing was written, compact to a later index", .path.display())]
    AlreadyCompacted {
        /// The store directory.
        path: PathBuf,
        /// Requested index.
        index: u64,
        /// Current snapshot index.
        snapshot_index: u64,
    },
    /// A write that would leave the store inconsistent or unsafe.
    #[error("rejected a write to the Raft store at {}: {reason}; nothing was written, this is a bug in the caller", .path.display())]
    Rejected {
        /// The store directory.
        path: PathBuf,
        /// What was wrong with the request.
        reason: String,
    },
}

impl From<StorageError> for raft::Error {
    fn from(e: StorageError) -> Self {
        raft::Error::Store(RaftStorageError::Other(Box::new(e)))
    }
}

/// What `term`/`first_index`/`last_index` and the writers' checks need,
/// mirrored from disk.
#[derive(Debug, Clone, Default)]
struct Cache {
    hard_state: HardState,
    conf_state: ConfState,
    /// Index/term/conf state of the latest compaction or installed snapshot;
    /// index 0 means none.
    snapshot_meta: SnapshotMetadata,
    /// Always `snapshot_meta.index + 1`; kept for readability at call sites.
    first_index: u64,
    /// `snapshot_meta.index` when the log is empty.
    last_index: u64,
    /// Term of the entry at `last_index` (the snapshot term when empty):
    /// raft asks for it on every append and vote.
    last_term: u64,
    applied: u64,
    /// Terms of the entries written since the store opened, so `term` never
    /// reads an entry back (with its payload) from RocksDB: the leader asks
    /// for a term on every append response, and on a full sync those reads
    /// were 5 % of its CPU (perf).
    terms: TermRuns,
    /// Indexes of the membership (conf-change) entries among those `terms`
    /// covers: [`RaftStore::headers`] must not stand in for them, since
    /// raft-rs reads their type and data (its pending-change checks, and a
    /// `Ready`'s committed entries, which the core applies itself).
    membership_entries: std::collections::BTreeSet<u64>,
    /// The index of the membership in `conf_state` (its change's entry, or
    /// the installed snapshot's index); 0 when it came from bootstrap or a
    /// reopen. A compaction below it would store a membership that is not
    /// the one in force at its index.
    conf_state_at: u64,
}

/// The terms of a suffix of the log, one run per term: entries
/// `from ..= last` where run `i` starts at `runs[i].0` with term `runs[i].1`.
/// A term changes only on election, so this holds a handful of pairs however
/// long the log.
#[derive(Debug, Clone, Default)]
struct TermRuns {
    /// First index covered; `u64::MAX` when nothing is.
    from: u64,
    runs: Vec<(u64, u64)>,
}

impl TermRuns {
    /// Covering nothing: lookups fall back to reading the entry.
    fn empty() -> TermRuns {
        TermRuns {
            from: u64::MAX,
            runs: Vec::new(),
        }
    }

    /// Term of `index`, if covered (the caller checks `index <= last`).
    fn get(&self, index: u64) -> Option<u64> {
        if index < self.from {
            return None;
        }
        let at = self.runs.partition_point(|&(start, _)| start <= index);
        at.checked_sub(1).map(|i| self.runs[i].1)
    }

    /// Entries `first ..` (with `terms`, in order) replaced the log from
    /// `first` on.
    fn append(&mut self, first: u64, terms: impl Iterator<Item = u64>) {
        if first < self.from {
            self.from = first;
            self.runs.clear();
        } else {
            let keep = self.runs.partition_point(|&(start, _)| start < first);
            self.runs.truncate(keep);
        }
        for (offset, term) in terms.enumerate() {
            if self.runs.last().map(|&(_, t)| t) != Some(term) {
                self.runs.push((first + offset as u64, term));
            }
        }
    }

    /// The log now starts at `first`: runs wholly below it go.
    fn compact(&mut self, first: u64) {
        if first <= self.from {
            return;
        }
        self.from = first;
        let below = self.runs.partition_point(|&(start, _)| start <= first);
        if below > 1 {
            self.runs.drain(..below - 1);
        }
    }
}

struct Inner {
    db: Db,
    path: PathBuf,
    cache: RwLock<Cache>,
}

/// The durable Raft log and node state, on RocksDB. Cheap to clone; clones
/// share the database and the cache. The database closes when the last clone
/// is dropped.
#[derive(Clone)]
pub struct RaftStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for RaftStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RaftStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl RaftStore {
    /// Opens the store in `dir`, creating the directory (mode 0700) and the
    /// column families [`CF_ENTRIES`] and [`CF_STATE`] if missing, and loads
    /// the cache. Fails with [`StorageError::Corrupt`] if stored values do not
    /// decode or contradict each other (for example a commit index beyond the
    /// log), rather than letting raft panic on them later.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        create_private_dir(dir)?;

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        // The state column family is written rarely and would otherwise pin
        // old WAL files until its memtable fills; this forces a flush instead.
        // Room for a full entries memtable (see `cf_options`) before a flush is forced.
        db_opts.set_max_total_wal_size(160 << 20);
        db_opts.set_keep_log_file_num(4);

        // Open every column family already present, so a data_dir written by
        // a newer clusterd with extra families still opens.
        let mut names: Vec<String> = vec![
            rocksdb::DEFAULT_COLUMN_FAMILY_NAME.to_string(),
            CF_ENTRIES.to_string(),
            CF_STATE.to_string(),
        ];
        if let Ok(existing) = Db::list_cf(&Options::default(), dir) {
            for name in existing {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        let descriptors = names
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, cf_options()));
        let db = Db::open_cf_descriptors(&db_opts, dir, descriptors).map_err(|source| {
            StorageError::Open {
                path: dir.to_path_buf(),
                source,
            }
        })?;
        let cache = load_cache(&db, dir)?;
        Ok(RaftStore {
            inner: Arc::new(Inner {
                db,
                path: dir.to_path_buf(),
                cache: RwLock::new(cache),
            }),
        })
    }

    /// The directory this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Writes the memtables out to disk so their memory is freed (after a
    /// burst, so an idle node stays small). Everything was durable already
    /// through the WAL; this changes only where it is kept.
    pub fn flush_memtables(&self) {
        for cf in [CF_ENTRIES, CF_STATE] {
            if let Ok(handle) = self.cf(cf) {
                let _ = self.inner.db.flush_cf(handle);
            }
        }
    }

    /// Whether this node has a membership: a `ConfState` was stored by
    /// [`bootstrap`](Self::bootstrap), [`set_conf_state`](Self::set_conf_state)
    /// or [`apply_snapshot`](Self::apply_snapshot). An uninitialized node
    /// waits for a leader to send it a snapshot.
    pub fn is_initialized(&self) -> bool {
        self.cache_or_recover().conf_state != ConfState::default()
    }

    /// Makes a brand-new store the seed of a cluster by storing
    /// `ConfState { voters }`; durable when it returns. Every founding member
    /// must be bootstrapped with the same voters. Refuses with
    /// [`StorageError::AlreadyInitialized`] if the store already has a
    /// membership, log entries or a snapshot: bootstrapping over existing
    /// state could fork the cluster's history.
    pub fn bootstrap(&self, voters: &[u64]) -> Result<(), StorageError> {
        let mut cache = self.write_cache("state/conf_state")?;
        let what = if cache.conf_state != ConfState::default() {
            Some(format!("membership {:?}", cache.conf_state.voters))
        } else if cache.snapshot_meta.index > 0 {
            Some(format!("a snapshot at index {}", cache.snapshot_meta.index))
        } else if cache.last_index > 0 {
            Some(format!("log entries up to index {}", cache.last_index))
        } else {
            None
        };
        if let Some(what) = what {
            return Err(StorageError::AlreadyInitialized {
                path: self.inner.path.clone(),
                what,
            });
        }
        if voters.is_empty() || voters.contains(&0) {
            return Err(self.rejected(format!(
                "bootstrap needs a non-empty list of non-zero voter ids, got {voters:?}"
            )));
        }
        let cs = ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_STATE)?,
            KEY_CONF_STATE,
            self.encode(&cs, "state/conf_state")?,
        );
        self.write(batch, "bootstrap")?;
        cache.conf_state = cs;
        Ok(())
    }

    /// The stored membership (empty when not initialized).
    pub fn conf_state(&self) -> ConfState {
        self.cache_or_recover().conf_state.clone()
    }

    /// The stored term, vote and commit index.
    pub fn hard_state(&self) -> HardState {
        self.cache_or_recover().hard_state.clone()
    }

    /// Metadata of the latest compaction or installed snapshot (index 0: none).
    pub fn snapshot_metadata(&self) -> SnapshotMetadata {
        self.cache_or_recover().snapshot_meta.clone()
    }

    /// The latest snapshot with its data, as stored by
    /// [`compact`](Self::compact) or [`apply_snapshot`](Self::apply_snapshot);
    /// a default (index 0, empty) snapshot if there was none. Used at startup
    /// to restore the state machine when [`applied`](Self::applied) is below
    /// the snapshot index.
    pub fn last_snapshot(&self) -> Result<Snapshot, StorageError> {
        let cache = self.read_cache("state/snapshot_meta")?;
        self.load_snapshot(&cache)
    }

    /// Persists one `Ready`: appends `entries` and stores `hard_state`, in one
    /// fsync'd batch; both are durable when it returns, so messages of that
    /// `Ready` may be sent afterwards.
    ///
    /// Like `MemStorage::append`, entries that overlap the log replace it from
    /// `entries[0].index` on and the old suffix beyond the new last entry is
    /// dropped. Rejected (nothing written) if `entries` would overwrite
    /// compacted entries, leave a gap after the last index, are not
    /// consecutive, or change a committed entry. For the `HardState`, the
    /// commit index never goes backwards (the stored one is kept if higher)
    /// and must not pass the last index; a lower term, or a different vote in
    /// the same term once one was cast, is rejected: that would be a second
    /// vote.
    pub fn persist(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageError> {
        let mut cache = self.write_cache("entries")?;
        let mut batch = WriteBatch::default();
        let mut last_index = cache.last_index;
        let mut last_term = cache.last_term;

        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            if first.index < cache.first_index {
                return Err(self.rejected(format!(
                    "appending entry {} would overwrite the log compacted up to {}",
                    first.index,
                    cache.first_index - 1
                )));
            }
            if first.index > cache.last_index + 1 {
                return Err(self.rejected(format!(
                    "appending entry {} would leave a gap after the last index {}",
                    first.index, cache.last_index
                )));
            }
            for (offset, e) in entries.iter().enumerate() {
                if e.index != first.index + offset as u64 {
                    return Err(self.rejected(format!(
                        "entries to append are not consecutive: index {} follows {}",
                        e.index,
                        first.index + offset as u64 - 1
                    )));
                }
            }
            // Committed entries may be re-sent but never changed: by Log
            // Matching an entry with the same index and term is identical.
            for e in entries
                .iter()
                .take_while(|e| e.index <= cache.hard_state.commit)
            {
                if e.index <= cache.last_index {
                    let stored = self.term_in(&cache, e.index)?;
                    if stored != e.term {
                        return Err(self.rejected(format!(
                            "entry {} is committed with term {stored}, refusing to replace it with term {}",
                            e.index, e.term
                        )));
                    }
                }
            }
            let cf = self.cf(CF_ENTRIES)?;
            if last.index < cache.last_index {
                batch.delete_range_cf(cf, entry_key(last.index + 1), end_key(cache.last_index));
            }
            for e in entries {
                let key = entry_key(e.index);
                batch.put_cf(cf, key, self.encode(e, "entries")?);
            }
            last_index = last.index;
            last_term = last.term;
        }

        let new_hs = match hard_state {
            Some(hs) => {
                let old = &cache.hard_state;
                if hs.term < old.term {
                    return Err(self.rejected(format!(
                        "term would go back from {} to {}",
                        old.term, hs.term
                    )));
                }
                if hs.term == old.term && old.vote != 0 && hs.vote != old.vote {
                    return Err(self.rejected(format!(
                        "vote in term {} would change from {} to {}",
                        hs.term, old.vote, hs.vote
                    )));
                }
                let mut hs = hs.clone();
                hs.commit = cmp::max(hs.commit, old.commit);
                if hs.commit > last_index {
                    return Err(self.rejected(format!(
                        "commit index {} is beyond the last log index {last_index}",
                        hs.commit
                    )));
                }
                batch.put_cf(
                    self.cf(CF_STATE)?,
                    KEY_HARD_STATE,
                    self.encode(&hs, "state/hard_state")?,
                );
                Some(hs)
            }
            None => {
                // A truncation must not cut below the stored commit either.
                if cache.hard_state.commit > last_index {
                    return Err(self.rejected(format!(
                        "truncating the log to {last_index} would drop committed entries up to {}",
                        cache.hard_state.commit
                    )));
                }
                None
            }
        };

        if entries.is_empty() && new_hs.is_none() {
            return Ok(());
        }
        self.write(batch, "persisting log entries and hard state")?;
        if let Some(first) = entries.first() {
            cache
                .terms
                .append(first.index, entries.iter().map(|e| e.term));
            cache.membership_entries.split_off(&first.index);
            cache.membership_entries.extend(
                entries
                    .iter()
                    .filter(|e| e.get_entry_type() != EntryType::EntryNormal)
                    .map(|e| e.index),
            );
        }
        cache.last_index = last_index;
        cache.last_term = last_term;
        if let Some(hs) = new_hs {
            cache.hard_state = hs;
        }
        Ok(())
    }

    /// Raises the durable commit index to `commit` (from a `LightReady`);
    /// durable when it returns. A lower or equal value is a no-op, so the
    /// commit index never goes backwards. Rejected if `commit` is beyond the
    /// last index: raft refuses to restart from such a state.
    pub fn set_commit(&self, commit: u64) -> Result<(), StorageError> {
        let mut cache = self.write_cache("state/hard_state")?;
        if commit <= cache.hard_state.commit {
            return Ok(());
        }
        if commit > cache.last_index {
            return Err(self.rejected(format!(
                "commit index {commit} is beyond the last log index {}",
                cache.last_index
            )));
        }
        let mut hs = cache.hard_state.clone();
        hs.commit = commit;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_STATE)?,
            KEY_HARD_STATE,
            self.encode(&hs, "state/hard_state")?,
        );
        self.write(batch, "storing the commit index")?;
        cache.hard_state = hs;
        Ok(())
    }

    /// Stores the membership after the conf change at entry `at` was
    /// applied, and raises the applied index to `at` in the same write (when
    /// it is below it and `at` is committed): a crash then never leaves the
    /// stored membership ahead of the applied index, so a restart never
    /// applies that change a second time. Durable when it returns. Rejected
    /// if it has no voters (raft never produces one, and it would make the
    /// node look uninitialized).
    pub fn set_conf_state(&self, cs: &ConfState, at: u64) -> Result<(), StorageError> {
        let mut cache = self.write_cache("state/conf_state")?;
        if cs.voters.is_empty() {
            return Err(self.rejected(format!("a membership without voters: {cs:?}")));
        }
        let mut batch = WriteBatch::default();
        let state_cf = self.cf(CF_STATE)?;
        batch.put_cf(
            state_cf,
            KEY_CONF_STATE,
            self.encode(cs, "state/conf_state")?,
        );
        let raise_applied = at > cache.applied && at <= cache.hard_state.commit;
        if raise_applied {
            batch.put_cf(state_cf, KEY_APPLIED, at.to_be_bytes());
        }
        self.write(batch, "storing the membership")?;
        cache.conf_state = cs.clone();
        cache.conf_state_at = at;
        if raise_applied {
            cache.applied = at;
        }
        Ok(())
    }

    /// Installs a snapshot received from the leader (`Ready::snapshot`), as
    /// `MemStorage::apply_snapshot` does: drops every log entry, stores the
    /// snapshot's metadata and data, takes its `ConfState`, and raises the
    /// `HardState` to commit = snapshot index and term >= snapshot term (the
    /// vote is kept). All in one fsync'd batch, durable when it returns.
    ///
    /// Fails with [`StorageError::SnapshotOutOfDate`] (nothing written) if
    /// the snapshot index is below the first index or below the commit index.
    /// The applied index is left alone: the caller restores the state machine
    /// from the data and then calls [`set_applied`](Self::set_applied); a
    /// crash in between shows as `applied() < snapshot_metadata().index`.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> Result<(), StorageError> {
        let mut cache = self.write_cache("state/snapshot_meta")?;
        let meta = snap.get_metadata();
        if meta.index < cache.first_index || meta.index < cache.hard_state.commit {
            return Err(StorageError::SnapshotOutOfDate {
                path: self.inner.path.clone(),
                index: meta.index,
                first_index: cache.first_index,
                commit: cache.hard_state.commit,
            });
        }
        if meta.get_conf_state().voters.is_empty() {
            return Err(self.rejected(format!(
                "snapshot at index {} has a membership without voters",
                meta.index
            )));
        }
        let mut hs = cache.hard_state.clone();
        hs.term = cmp::max(hs.term, meta.term);
        hs.commit = meta.index;

        let mut batch = WriteBatch::default();
        let entries_cf = self.cf(CF_ENTRIES)?;
        let state_cf = self.cf(CF_STATE)?;
        batch.delete_range_cf(
            entries_cf,
            entry_key(0),
            end_key(cmp::max(cache.last_index, meta.index)),
        );
        batch.put_cf(
            state_cf,
            KEY_SNAPSHOT_META,
            self.encode(meta, "state/snapshot_meta")?,
        );
        batch.put_cf(state_cf, KEY_SNAPSHOT_DATA, &snap.data[..]);
        batch.put_cf(
            state_cf,
            KEY_CONF_STATE,
            self.encode(meta.get_conf_state(), "state/conf_state")?,
        );
        batch.put_cf(
            state_cf,
            KEY_HARD_STATE,
            self.encode(&hs, "state/hard_state")?,
        );
        self.write(batch, "installing a snapshot")?;

        cache.snapshot_meta = meta.clone();
        cache.conf_state = meta.get_conf_state().clone();
        cache.conf_state_at = meta.index;
        cache.hard_state = hs;
        cache.first_index = meta.index + 1;
        cache.last_index = meta.index;
        cache.last_term = meta.term;
        cache.terms = TermRuns::empty();
        cache.membership_entries.clear();
        Ok(())
    }

    /// Log compaction: removes the entries at and below `index` and records
    /// the snapshot metadata (index, term of that entry, current `ConfState`)
    /// with `data`, the state machine's snapshot bytes at `index` (may be
    /// empty), in one fsync'd batch; durable when it returns. Followers that
    /// fall behind `index` are then sent this snapshot.
    ///
    /// Call it with `index` = the applied index, so the stored `ConfState`
    /// is the one in force at `index`. Rejected if `index` is 0, beyond the
    /// last index, the commit index or the applied index; fails with
    /// [`StorageError::AlreadyCompacted`] if below the current snapshot
    /// index. `index` equal to the current snapshot index only replaces the
    /// data and `ConfState`.
    pub fn compact(&self, index: u64, data: Vec<u8>) -> Result<(), StorageError> {
        let mut cache = self.write_cache("state/snapshot_meta")?;
        if index < cache.snapshot_meta.index {
            return Err(StorageError::AlreadyCompacted {
                path: self.inner.path.clone(),
                index,
                snapshot_index: cache.snapshot_meta.index,
            });
        }
        if index == 0 {
            return Err(self.rejected("compacting to index 0 (nothing to compact)".to_string()));
        }
        if index > cache.last_index {
            return Err(self.rejected(format!(
                "compacting to {index} beyond the last log index {}",
                cache.last_index
            )));
        }
        if index > cache.hard_state.commit || index > cache.applied {
            return Err(self.rejected(format!(
                "compacting to {index} beyond the commit index {} or the applied index {}",
                cache.hard_state.commit, cache.applied
            )));
        }
        if index < cache.conf_state_at {
            return Err(self.rejected(format!(
                "compacting to {index}, below the membership change at entry {} (the snapshot would carry a membership that was not in force at its index); take a new snapshot",
                cache.conf_state_at
            )));
        }
        let term = self.term_in(&cache, index)?;
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        meta.set_conf_state(cache.conf_state.clone());

        let mut batch = WriteBatch::default();
        let state_cf = self.cf(CF_STATE)?;
        batch.delete_range_cf(self.cf(CF_ENTRIES)?, entry_key(0), end_key(index));
        batch.put_cf(
            state_cf,
            KEY_SNAPSHOT_META,
            self.encode(&meta, "state/snapshot_meta")?,
        );
        batch.put_cf(state_cf, KEY_SNAPSHOT_DATA, data);
        self.write(batch, "compacting the log")?;

        cache.snapshot_meta = meta;
        cache.first_index = index + 1;
        cache.terms.compact(index + 1);
        cache.membership_entries = cache.membership_entries.split_off(&(index + 1));
        Ok(())
    }

    /// The membership directory: every member added at runtime, with its
    /// address (empty when none was ever added).
    pub fn directory(&self) -> Result<crate::core::members::Directory, StorageError> {
        match get_state(&self.inner.db, &self.inner.path, KEY_MEMBERS)? {
            None => Ok(Default::default()),
            Some(bytes) => {
                crate::core::members::Directory::decode(&bytes).map_err(|e| StorageError::Corrupt {
                    path: self.inner.path.clone(),
                    key: state_key_name(KEY_MEMBERS),
                    reason: e.to_string(),
                })
            }
        }
    }

    /// Stores `directory` (replacing the stored one); durable when it returns.
    pub fn set_directory(
        &self,
        directory: &crate::core::members::Directory,
    ) -> Result<(), StorageError> {
        let _cache = self.write_cache("state/members")?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_STATE)?, KEY_MEMBERS, directory.encode());
        self.write(batch, "storing the membership directory")
    }

    /// Why this node was removed from the cluster, if it learned it was.
    pub fn removed(&self) -> Result<Option<String>, StorageError> {
        Ok(get_state(&self.inner.db, &self.inner.path, KEY_REMOVED)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Records that this node was removed (`why`, for status and the log
    /// after a restart); durable when it returns.
    pub fn set_removed(&self, why: &str) -> Result<(), StorageError> {
        let _cache = self.write_cache("state/removed")?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_STATE)?, KEY_REMOVED, why.as_bytes());
        self.write(batch, "recording the removal of this node")
    }

    /// The state machine's applied index as last stored by
    /// [`set_applied`](Self::set_applied) (0 if never), for
    /// `raft::Config::applied` so a restart does not re-apply entries.
    ///
    /// If it is below `snapshot_metadata().index`, a snapshot was installed
    /// but the state machine was not restored from it before a crash: restore
    /// from [`last_snapshot`](Self::last_snapshot) and call `set_applied`
    /// first, since raft refuses an applied index below the snapshot.
    pub fn applied(&self) -> u64 {
        self.cache_or_recover().applied
    }

    /// Records that the state machine has applied everything up to `index`;
    /// durable when it returns. Applied entries are committed by definition,
    /// so if the stored commit index lags it is raised to `index` in the same
    /// batch (raft refuses to restart with applied > commit). Rejected if
    /// `index` is below the stored applied index or beyond the last index.
    pub fn set_applied(&self, index: u64) -> Result<(), StorageError> {
        let mut cache = self.write_cache("state/applied")?;
        if index < cache.applied {
            return Err(self.rejected(format!(
                "applied index would go back from {} to {index}",
                cache.applied
            )));
        }
        if index > cache.last_index {
            return Err(self.rejected(format!(
                "applied index {index} is beyond the last log index {}",
                cache.last_index
            )));
        }
        if index == cache.applied {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        let state_cf = self.cf(CF_STATE)?;
        batch.put_cf(state_cf, KEY_APPLIED, index.to_be_bytes());
        let raised = if index > cache.hard_state.commit {
            let mut hs = cache.hard_state.clone();
            hs.commit = index;
            batch.put_cf(
                state_cf,
                KEY_HARD_STATE,
                self.encode(&hs, "state/hard_state")?,
            );
            Some(hs)
        } else {
            None
        };
        self.write(batch, "storing the applied index")?;
        cache.applied = index;
        if let Some(hs) = raised {
            cache.hard_state = hs;
        }
        Ok(())
    }

    // ---- internals ----

    fn read_cache(&self, key: &'static str) -> Result<RwLockReadGuard<'_, Cache>, StorageError> {
        self.inner.cache.read().map_err(|_| StorageError::Poisoned {
            path: self.inner.path.clone(),
            key,
        })
    }

    fn write_cache(&self, key: &'static str) -> Result<RwLockWriteGuard<'_, Cache>, StorageError> {
        self.inner
            .cache
            .write()
            .map_err(|_| StorageError::Poisoned {
                path: self.inner.path.clone(),
                key,
            })
    }

    /// For the infallible getters. The cache is only changed after a durable
    /// write and with no panicking code in between, so a poisoned lock still
    /// holds a state that matches the disk.
    fn cache_or_recover(&self) -> RwLockReadGuard<'_, Cache> {
        self.inner
            .cache
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cf(&self, name: &'static str) -> Result<&ColumnFamily, StorageError> {
        self.inner
            .db
            .cf_handle(name)
            .ok_or_else(|| StorageError::Corrupt {
                path: self.inner.path.clone(),
                key: name.to_string(),
                reason: "the column family is missing".to_string(),
            })
    }

    fn rejected(&self, reason: String) -> StorageError {
        StorageError::Rejected {
            path: self.inner.path.clone(),
            reason,
        }
    }

    fn encode<M: PbMessage>(&self, m: &M, key: &str) -> Result<Vec<u8>, StorageError> {
        m.write_to_bytes().map_err(|source| StorageError::Encode {
            path: self.inner.path.clone(),
            key: key.to_string(),
            source,
        })
    }

    fn write(&self, batch: WriteBatch, op: &'static str) -> Result<(), StorageError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.inner
            .db
            .write_opt(batch, &opts)
            .map_err(|source| StorageError::Db {
                path: self.inner.path.clone(),
                op,
                source,
            })
    }

    fn read_entry(&self, index: u64) -> Result<Entry, StorageError> {
        let key = entry_key(index);
        let value = self
            .inner
            .db
            .get_cf(self.cf(CF_ENTRIES)?, key)
            .map_err(|source| StorageError::Db {
                path: self.inner.path.clone(),
                op: "reading a log entry",
                source,
            })?;
        match value {
            Some(v) => decode_entry(&self.inner.path, &key, &v),
            None => Err(StorageError::Corrupt {
                path: self.inner.path.clone(),
                key: format!("entries/{index}"),
                reason: "the entry is missing inside the log range".to_string(),
            }),
        }
    }

    /// Entries `[low, high)` without their data (see `entries`), if the
    /// terms kept in memory cover them (after a restart, older ones are
    /// read from the log once, in one pass, by the caller).
    fn headers(cache: &Cache, low: u64, high: u64) -> Option<Vec<Entry>> {
        if cache.membership_entries.range(low..high).next().is_some() {
            return None;
        }
        (low..high)
            .map(|index| {
                let term = if index == cache.last_index {
                    cache.last_term
                } else {
                    cache.terms.get(index)?
                };
                Some(Entry {
                    index,
                    term,
                    ..Default::default()
                })
            })
            .collect()
    }

    /// Term of `index`, which the caller has checked is in
    /// `snapshot index ..= last index`.
    fn term_in(&self, cache: &Cache, index: u64) -> Result<u64, StorageError> {
        if index == cache.snapshot_meta.index {
            Ok(cache.snapshot_meta.term)
        } else if index == cache.last_index {
            Ok(cache.last_term)
        } else if let Some(term) = cache.terms.get(index) {
            Ok(term)
        } else {
            Ok(self.read_entry(index)?.term)
        }
    }

    fn load_snapshot(&self, cache: &Cache) -> Result<Snapshot, StorageError> {
        let mut snap = Snapshot::default();
        if cache.snapshot_meta.index == 0 {
            return Ok(snap);
        }
        let data = self
            .inner
            .db
            .get_cf(self.cf(CF_STATE)?, KEY_SNAPSHOT_DATA)
            .map_err(|source| StorageError::Db {
                path: self.inner.path.clone(),
                op: "reading the snapshot data",
                source,
            })?
            .ok_or_else(|| StorageError::Corrupt {
                path: self.inner.path.clone(),
                key: "state/snapshot_data".to_string(),
                reason: format!(
                    "missing although a snapshot at index {} is recorded",
                    cache.snapshot_meta.index
                ),
            })?;
        snap.set_metadata(cache.snapshot_meta.clone());
        snap.data = data.into();
        Ok(snap)
    }
}

impl raft::Storage for RaftStore {
    /// The stored `HardState` and `ConfState`.
    fn initial_state(&self) -> raft::Result<RaftState> {
        let cache = self.read_cache("state/hard_state")?;
        Ok(RaftState::new(
            cache.hard_state.clone(),
            cache.conf_state.clone(),
        ))
    }

    /// Entries `[low, high)` read with one RocksDB iterator, cut to
    /// `max_size` bytes by `raft::util::limit_size` (at least one entry).
    /// `Compacted` if `low` is below the first index; `Unavailable` if `high`
    /// is beyond last index + 1 (raft checks bounds first, so this is a bug).
    ///
    /// Only a context that [can be served asynchronously](GetEntriesContext::can_async)
    /// gets the entries' data: raft-rs sending appends, and callers that
    /// pass [`with_data`]. Every other raft-rs context (the committed entries
    /// of a `Ready`, the pending-membership checks of a transfer or a vote)
    /// gets [headers](Self::headers): index, term, a normal entry type and no
    /// data, from memory, except for membership entries, which are read
    /// whole. The node's applier reads committed commands back itself
    /// (`replication::apply`), so reading every committed entry a second time
    /// for the `Ready` was pure cost (a tenth of a follower's CPU during a
    /// full sync, perf).
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let cache = self.read_cache("entries")?;
        if low < cache.first_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if high > cache.last_index + 1 {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        if low >= high {
            return Ok(Vec::new());
        }
        let headers_only = !context.can_async();
        if headers_only {
            if let Some(headers) = Self::headers(&cache, low, high) {
                return Ok(headers);
            }
        }

        let path = &self.inner.path;
        let mut read_opts = ReadOptions::default();
        read_opts.set_iterate_upper_bound(entry_key(high).to_vec());
        // Entries are read back whole right after they were written (to send
        // and to apply). This build of RocksDB computes CRC32C in software,
        // the largest CPU cost of a bulk transfer; file content carries its
        // own blake3 hash, checked before anything is written, and every
        // entry is decoded strictly, so the per-block re-check on reads is
        // skipped (writes keep their checksums).
        read_opts.set_verify_checksums(false);
        let start = entry_key(low);
        let iter = self.inner.db.iterator_cf_opt(
            self.cf(CF_ENTRIES)?,
            read_opts,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut ents = Vec::with_capacity(cmp::min(high - low, 1024) as usize);
        let mut size: u64 = 0;
        let mut expected = low;
        for item in iter {
            let (key, value) = item.map_err(|source| StorageError::Db {
                path: path.clone(),
                op: "reading log entries",
                source,
            })?;
            let e = decode_entry(path, &key, &value)?;
            if e.index != expected {
                return Err(StorageError::Corrupt {
                    path: path.clone(),
                    key: format!("entries/{expected}"),
                    reason: format!("the log has a hole: the next stored entry is {}", e.index),
                }
                .into());
            }
            // Stop reading once the limit is passed; limit_size below makes
            // the exact cut so the result matches MemStorage byte for byte.
            size += u64::from(e.compute_size());
            let over = matches!(max_size, Some(max) if size > max);
            ents.push(e);
            expected += 1;
            if over {
                break;
            }
        }
        let complete = expected == high || matches!(max_size, Some(max) if size > max);
        if !complete {
            return Err(StorageError::Corrupt {
                path: path.clone(),
                key: format!("entries/{expected}"),
                reason: format!("missing although the log reaches {}", cache.last_index),
            }
            .into());
        }
        raft::util::limit_size(&mut ents, max_size);
        if headers_only {
            for e in ents
                .iter_mut()
                .filter(|e| e.get_entry_type() == EntryType::EntryNormal)
            {
                e.data = Default::default();
            }
        }
        Ok(ents)
    }

    /// Term of entry `idx`: the snapshot term at the snapshot index,
    /// `Compacted` below it, `Unavailable` beyond the last index.
    fn term(&self, idx: u64) -> raft::Result<u64> {
        let cache = self.read_cache("entries")?;
        if idx == cache.snapshot_meta.index {
            return Ok(cache.snapshot_meta.term);
        }
        if idx < cache.first_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if idx > cache.last_index {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        Ok(self.term_in(&cache, idx)?)
    }

    /// Snapshot index + 1 (1 for a new store).
    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read_cache("entries")?.first_index)
    }

    /// Index of the last stored entry (the snapshot index when the log is empty).
    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.read_cache("entries")?.last_index)
    }

    /// The stored snapshot (from [`RaftStore::compact`] or
    /// [`RaftStore::apply_snapshot`]) with its data. If there is none, or it
    /// is older than `request_index`, `SnapshotTemporarilyUnavailable`: raft
    /// then retries later instead of sending an empty snapshot.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let cache = self.read_cache("state/snapshot_meta")?;
        if cache.snapshot_meta.index == 0 || cache.snapshot_meta.index < request_index {
            return Err(raft::Error::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.load_snapshot(&cache)?)
    }
}

/// A small block cache: the log is read mostly right after it is written
/// (from memtables and the OS page cache), and an idle node must stay small.
pub fn small_block_cache() -> rocksdb::BlockBasedOptions {
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(&rocksdb::Cache::new_lru_cache(2 << 20));
    table
}

fn cf_options() -> Options {
    let mut opts = Options::default();
    // Built without compression libraries; say so rather than rely on
    // RocksDB's fallback.
    opts.set_compression_type(DBCompressionType::None);
    // Most Raft log writes are small, but file chunks are 1 MiB each. Values
    // from 16 KiB go to blob files (RocksDB's integrated BlobDB), so large
    // transfers do not churn SST compactions or stall writes (a stalled
    // write stalls the node task and its heartbeats). Memtables fill on
    // demand: an idle node stays small (PRODUCT.md: under 64 MiB resident),
    // and idle nodes flush them. They are eight times the byte trigger of
    // log compaction (`CoreOptions::compact_bytes`), so during a bulk
    // transfer most entries are deleted while still in the memtable and
    // the flush never writes them out again.
    opts.set_write_buffer_size(64 << 20);
    opts.set_enable_blob_files(true);
    opts.set_min_blob_size(16 << 10);
    opts.set_enable_blob_gc(true);
    opts.set_level_zero_slowdown_writes_trigger(40);
    opts.set_level_zero_stop_writes_trigger(80);
    opts.set_block_based_table_factory(&small_block_cache());
    opts
}

fn create_private_dir(dir: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StorageError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    // Make the new directory entry itself durable, not only RocksDB's files.
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(f) = fs::File::open(parent) {
            f.sync_all().map_err(|source| StorageError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
    }
    Ok(())
}

fn decode_entry(path: &Path, key: &[u8], value: &[u8]) -> Result<Entry, StorageError> {
    let corrupt = |reason: String| StorageError::Corrupt {
        path: path.to_path_buf(),
        key: match <[u8; 8]>::try_from(key) {
            Ok(k) => format!("entries/{}", u64::from_be_bytes(k)),
            Err(_) => format!("entries/{key:02x?}"),
        },
        reason,
    };
    let index = <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| corrupt(format!("the key is {} bytes, not 8", key.len())))?;
    let e = Entry::parse_from_bytes(value).map_err(|e| corrupt(e.to_string()))?;
    if e.index != index {
        return Err(corrupt(format!("it holds entry {}", e.index)));
    }
    Ok(e)
}

fn get_state(db: &Db, path: &Path, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
    let cf = db
        .cf_handle(CF_STATE)
        .ok_or_else(|| StorageError::Corrupt {
            path: path.to_path_buf(),
            key: CF_STATE.to_string(),
            reason: "the column family is missing".to_string(),
        })?;
    db.get_cf(cf, key).map_err(|source| StorageError::Db {
        path: path.to_path_buf(),
        op: "reading the node state",
        source,
    })
}

fn state_key_name(key: &[u8]) -> String {
    format!("state/{}", String::from_utf8_lossy(key))
}

fn get_message<M: PbMessage + Default>(
    db: &Db,
    path: &Path,
    key: &[u8],
) -> Result<M, StorageError> {
    match get_state(db, path, key)? {
        None => Ok(M::default()),
        Some(v) => M::parse_from_bytes(&v).map_err(|e| StorageError::Corrupt {
            path: path.to_path_buf(),
            key: state_key_name(key),
            reason: e.to_string(),
        }),
    }
}

/// Reads the state keys and the ends of the log, and checks they agree, so
/// inconsistencies surface as a clear error at open instead of a raft panic.
fn load_cache(db: &Db, path: &Path) -> Result<Cache, StorageError> {
    let corrupt = |key: &[u8], reason: String| StorageError::Corrupt {
        path: path.to_path_buf(),
        key: state_key_name(key),
        reason,
    };
    let hard_state: HardState = get_message(db, path, KEY_HARD_STATE)?;
    let conf_state: ConfState = get_message(db, path, KEY_CONF_STATE)?;
    let snapshot_meta: SnapshotMetadata = get_message(db, path, KEY_SNAPSHOT_META)?;
    let applied = match get_state(db, path, KEY_APPLIED)? {
        None => 0,
        Some(v) => u64::from_be_bytes(
            <[u8; 8]>::try_from(v.as_slice())
                .map_err(|_| corrupt(KEY_APPLIED, format!("{} bytes instead of 8", v.len())))?,
        ),
    };

    let entries_cf = db
        .cf_handle(CF_ENTRIES)
        .ok_or_else(|| StorageError::Corrupt {
            path: path.to_path_buf(),
            key: CF_ENTRIES.to_string(),
            reason: "the column family is missing".to_string(),
        })?;
    let edge = |mode: IteratorMode| -> Result<Option<Entry>, StorageError> {
        match db.iterator_cf(entries_cf, mode).next() {
            None => Ok(None),
            Some(Err(source)) => Err(StorageError::Db {
                path: path.to_path_buf(),
                op: "reading the ends of the log",
                source,
            }),
            Some(Ok((k, v))) => decode_entry(path, &k, &v).map(Some),
        }
    };
    let first = edge(IteratorMode::Start)?;
    let last = edge(IteratorMode::End)?;

    let first_index = snapshot_meta.index + 1;
    // The one entry `terms` covers below: headers must not stand in for it
    // if it is a membership change.
    let last_is_membership = last
        .as_ref()
        .filter(|e| e.get_entry_type() != EntryType::EntryNormal)
        .map(|e| e.index);
    let (last_index, last_term) = match (first, last) {
        (Some(first), Some(last)) => {
            if first.index != first_index {
                return Err(StorageError::Corrupt {
                    path: path.to_path_buf(),
                    key: format!("entries/{}", first.index),
                    reason: format!(
                        "the log should start right after the snapshot index {}",
                        snapshot_meta.index
                    ),
                });
            }
            (last.index, last.term)
        }
        _ => (snapshot_meta.index, snapshot_meta.term),
    };
    if hard_state.commit > last_index || hard_state.commit < snapshot_meta.index {
        return Err(corrupt(
            KEY_HARD_STATE,
            format!(
                "commit index {} is outside the log {}..={last_index}",
                hard_state.commit, snapshot_meta.index
            ),
        ));
    }
    Ok(Cache {
        hard_state,
        conf_state,
        snapshot_meta,
        first_index,
        last_index,
        last_term,
        applied,
        // Older entries' terms are read from the log when asked for.
        terms: TermRuns {
            from: last_index,
            runs: vec![(last_index, last_term)],
        },
        membership_entries: last_is_membership.into_iter().collect(),
        // Every membership change is applied by now (the applied index
        // was raised with it), so a snapshot taken from here on is past it.
        conf_state_at: 0,
    })
}

impl LogStore for RaftStore {
    type Error = StorageError;
    fn persist(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), Self::Error> {
        RaftStore::persist(self, entries, hard_state)
    }
    fn set_commit(&self, commit: u64) -> Result<(), Self::Error> {
        RaftStore::set_commit(self, commit)
    }
    fn apply_snapshot(&self, snapshot: &Snapshot) -> Result<(), Self::Error> {
        RaftStore::apply_snapshot(self, snapshot)
    }
    fn compact(&self, index: u64, data: Vec<u8>) -> Result<(), Self::Error> {
        RaftStore::compact(self, index, data)
    }
    fn applied(&self) -> u64 {
        RaftStore::applied(self)
    }
    fn set_applied(&self, index: u64) -> Result<(), Self::Error> {
        RaftStore::set_applied(self, index)
    }
    fn set_conf_state(&self, conf_state: &ConfState, at: u64) -> Result<(), Self::Error> {
        RaftStore::set_conf_state(self, conf_state, at)
    }
    fn snapshot_conf_state(&self) -> ConfState {
        self.snapshot_metadata().get_conf_state().clone()
    }
}

#[cfg(test)]
mod tests;
