//! Tests of the log store: the raft::Storage contract, durability across reopen, pinned keys.

use super::*;
use raft::Storage;
use tempfile::TempDir;

#[test]
fn term_runs_follow_appends_truncations_and_compaction() {
    let mut runs = TermRuns::empty();
    assert_eq!(runs.get(1), None);
    runs.append(1, [1, 1, 2, 2, 2].into_iter());
    assert_eq!(
        (1..=5).map(|i| runs.get(i)).collect::<Vec<_>>(),
        [1, 1, 2, 2, 2].map(Some)
    );
    // A new leader overwrites 4.. with its term.
    runs.append(4, [3, 3].into_iter());
    assert_eq!(
        (1..=5).map(|i| runs.get(i).unwrap()).collect::<Vec<_>>(),
        [1, 1, 2, 3, 3]
    );
    runs.compact(3);
    assert_eq!(runs.get(2), None, "compacted away");
    assert_eq!(runs.get(3), Some(2));
    assert_eq!(runs.get(5), Some(3));
    // An append from before the covered range starts over.
    runs.append(2, [4].into_iter());
    assert_eq!(runs.get(2), Some(4));
    assert_eq!(runs.get(1), None);
}

/// raft-rs reads a membership entry's type and data even where it asks
/// for headers (its pending-change checks, a `Ready`'s committed entries):
/// a range holding one is read whole, until it is truncated or compacted
/// away; headers serve the rest as before.
#[test]
fn membership_entries_are_never_served_as_headers() {
    let (_dir, store) = new_store();
    let change = membership_entry(2, 1);
    let mut normal = new_entry(1, 1);
    normal.data = b"file content".to_vec().into();
    store
        .persist(&[normal, change.clone(), new_entry(3, 1)], None)
        .unwrap();
    let headers = || {
        store
            .entries(1, 4, None, GetEntriesContext::empty(false))
            .unwrap()
    };
    assert_eq!(headers(), vec![new_entry(1, 1), change, new_entry(3, 1)]);
    assert_eq!(
        store
            .entries(3, 4, None, GetEntriesContext::empty(false))
            .unwrap(),
        vec![new_entry(3, 1)]
    );
    // Replaced by a normal entry from another term: headers again.
    store.persist(&[new_entry(2, 2)], None).unwrap();
    assert_eq!(
        store
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .unwrap(),
        vec![new_entry(1, 1), new_entry(2, 2)]
    );
}

/// A membership change that is the log's last entry when the store
/// reopens (the one entry whose term is known without reading) is still
/// read whole.
#[test]
fn a_membership_entry_last_in_the_log_is_read_whole_after_a_reopen() {
    let (dir, store) = new_store();
    let change = membership_entry(2, 1);
    store
        .persist(&[new_entry(1, 1), change.clone()], None)
        .unwrap();
    let store = reopen(&dir, store);
    assert_eq!(
        store
            .entries(2, 3, None, GetEntriesContext::empty(false))
            .unwrap(),
        vec![change]
    );
}

#[test]
fn contexts_raft_rs_cannot_serve_async_get_headers_without_reading_data() {
    let (_dir, store) = new_store();
    let mut e = new_entry(1, 1);
    e.data = b"file content".to_vec().into();
    store.persist(&[e.clone(), new_entry(2, 2)], None).unwrap();
    assert_eq!(store.entries(1, 3, None, with_data()).unwrap()[0], e);
    let headers = store
        .entries(1, 3, None, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(headers, vec![new_entry(1, 1), new_entry(2, 2)]);
}

#[test]
fn terms_come_from_the_log_after_a_restart_and_from_memory_after_appends() {
    let dir = TempDir::new().unwrap();
    let entries = |ts: &[(u64, u64)]| ts.iter().map(|&(i, t)| new_entry(i, t)).collect::<Vec<_>>();
    {
        let store = RaftStore::open(dir.path()).unwrap();
        store
            .persist(&entries(&[(1, 1), (2, 1), (3, 2)]), None)
            .unwrap();
        assert_eq!(store.term(2).unwrap(), 1);
    }
    let store = RaftStore::open(dir.path()).unwrap();
    assert_eq!(store.term(2).unwrap(), 1, "read back from the log");
    store.persist(&entries(&[(3, 3), (4, 3)]), None).unwrap();
    assert_eq!(store.term(1).unwrap(), 1);
    assert_eq!(store.term(3).unwrap(), 3);
    assert_eq!(store.term(4).unwrap(), 3);
}

fn new_entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        ..Default::default()
    }
}

fn new_snapshot(index: u64, term: u64, voters: Vec<u64>, data: &[u8]) -> Snapshot {
    let mut s = Snapshot::default();
    s.mut_metadata().index = index;
    s.mut_metadata().term = term;
    s.mut_metadata().mut_conf_state().voters = voters;
    s.data = data.to_vec().into();
    s
}

/// A conf-change entry with a payload.
fn membership_entry(index: u64, term: u64) -> Entry {
    let mut e = new_entry(index, term);
    e.set_entry_type(EntryType::EntryConfChangeV2);
    e.data = b"conf change".to_vec().into();
    e
}

fn hs(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..Default::default()
    }
}

fn ctx() -> GetEntriesContext {
    with_data()
}

fn new_store() -> (TempDir, RaftStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = RaftStore::open(&dir.path().join("raft")).unwrap();
    (dir, store)
}

/// The MemStorage tests' fixture: log 3..=5 with term == index, reached
/// the durable way (append 1..=5, apply and compact through 2).
fn store_3_to_5() -> (TempDir, RaftStore) {
    let (dir, store) = new_store();
    store.bootstrap(&[1, 2, 3]).unwrap();
    let ents: Vec<_> = (1..=5).map(|i| new_entry(i, i)).collect();
    store.persist(&ents, None).unwrap();
    store.set_applied(2).unwrap();
    store.compact(2, Vec::new()).unwrap();
    (dir, store)
}

fn all_entries(store: &RaftStore) -> Vec<Entry> {
    let first = store.first_index().unwrap();
    let last = store.last_index().unwrap();
    store.entries(first, last + 1, None, ctx()).unwrap()
}

fn reopen(dir: &TempDir, store: RaftStore) -> RaftStore {
    drop(store);
    RaftStore::open(&dir.path().join("raft")).unwrap()
}

fn compacted() -> raft::Error {
    raft::Error::Store(RaftStorageError::Compacted)
}

fn unavailable() -> raft::Error {
    raft::Error::Store(RaftStorageError::Unavailable)
}

#[test]
fn new_store_is_empty() {
    let (_dir, store) = new_store();
    assert!(!store.is_initialized());
    assert_eq!(store.first_index(), Ok(1));
    assert_eq!(store.last_index(), Ok(0));
    assert_eq!(store.term(0), Ok(0));
    assert_eq!(store.term(1), Err(unavailable()));
    assert_eq!(store.applied(), 0);
    let rs = store.initial_state().unwrap();
    assert!(!rs.initialized());
    assert_eq!(rs.hard_state, HardState::default());
    assert_eq!(
        store.snapshot(0, 0),
        Err(raft::Error::Store(
            RaftStorageError::SnapshotTemporarilyUnavailable
        ))
    );
}

#[cfg(unix)]
#[test]
fn open_creates_private_directory() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, _store) = new_store();
    let mode = fs::metadata(dir.path().join("raft"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn term() {
    let (_dir, store) = store_3_to_5();
    // Unlike MemStorage's fixture, the entry before first_index is the
    // compaction point, so its term is retained (the trait contract).
    let tests = [
        (1, Err(compacted())),
        (2, Ok(2)),
        (3, Ok(3)),
        (4, Ok(4)),
        (5, Ok(5)),
        (6, Err(unavailable())),
    ];
    for (idx, want) in tests {
        assert_eq!(store.term(idx), want, "term({idx})");
    }
}

#[test]
fn entries_with_max_size() {
    let (_dir, store) = store_3_to_5();
    store.persist(&[new_entry(6, 6)], None).unwrap();
    let ents: Vec<_> = (3..=6).map(|i| new_entry(i, i)).collect();
    let size = |e: &Entry| u64::from(e.compute_size());
    let max = u64::MAX;
    let tests: Vec<(u64, u64, u64, raft::Result<Vec<Entry>>)> = vec![
        (2, 6, max, Err(compacted())),
        (3, 4, max, Ok(vec![new_entry(3, 3)])),
        (4, 5, max, Ok(vec![new_entry(4, 4)])),
        (4, 6, max, Ok(vec![new_entry(4, 4), new_entry(5, 5)])),
        (
            4,
            7,
            max,
            Ok(vec![new_entry(4, 4), new_entry(5, 5), new_entry(6, 6)]),
        ),
        // Even with max_size 0 the first entry is returned.
        (4, 7, 0, Ok(vec![new_entry(4, 4)])),
        (
            4,
            7,
            size(&ents[1]) + size(&ents[2]),
            Ok(vec![new_entry(4, 4), new_entry(5, 5)]),
        ),
        (
            4,
            7,
            size(&ents[1]) + size(&ents[2]) + size(&ents[3]) / 2,
            Ok(vec![new_entry(4, 4), new_entry(5, 5)]),
        ),
        (
            4,
            7,
            size(&ents[1]) + size(&ents[2]) + size(&ents[3]) - 1,
            Ok(vec![new_entry(4, 4), new_entry(5, 5)]),
        ),
        (
            4,
            7,
            size(&ents[1]) + size(&ents[2]) + size(&ents[3]),
            Ok(vec![new_entry(4, 4), new_entry(5, 5), new_entry(6, 6)]),
        ),
        (5, 5, max, Ok(vec![])),
        (4, 8, max, Err(unavailable())),
    ];
    for (i, (lo, hi, max_size, want)) in tests.into_iter().enumerate() {
        assert_eq!(store.entries(lo, hi, max_size, ctx()), want, "case {i}");
    }
    // None means no limit.
    assert_eq!(store.entries(3, 7, None, ctx()).unwrap(), ents);
}

#[test]
fn first_and_last_index() {
    let (_dir, store) = store_3_to_5();
    assert_eq!(store.first_index(), Ok(3));
    assert_eq!(store.last_index(), Ok(5));
    store.persist(&[new_entry(6, 5)], None).unwrap();
    assert_eq!(store.last_index(), Ok(6));
    store.set_applied(3).unwrap();
    store.compact(3, Vec::new()).unwrap();
    assert_eq!(store.first_index(), Ok(4));
    assert_eq!(store.last_index(), Ok(6));
}

#[test]
fn compact() {
    // (compact to, first index, term of first entry, entries left)
    let tests = [(2, 3, 3, 3), (3, 4, 4, 2), (4, 5, 5, 1), (5, 6, 0, 0)];
    for (idx, want_first, want_term, want_len) in tests {
        let (_dir, store) = store_3_to_5();
        store.set_applied(5).unwrap();
        store
            .compact(idx, format!("data@{idx}").into_bytes())
            .unwrap();
        let first = store.first_index().unwrap();
        assert_eq!(first, want_first, "compact({idx})");
        let term = store
            .entries(first, first + 1, 1, ctx())
            .map(|v| v.first().map_or(0, |e| e.term))
            .unwrap_or(0);
        assert_eq!(term, want_term, "compact({idx})");
        assert_eq!(all_entries(&store).len(), want_len, "compact({idx})");
        assert_eq!(store.term(idx), Ok(idx));
        assert_eq!(store.last_index(), Ok(5));
        let snap = store.snapshot(0, 0).unwrap();
        assert_eq!(snap.get_metadata().index, idx);
        assert_eq!(snap.get_metadata().term, idx);
        assert_eq!(&snap.data[..], format!("data@{idx}").as_bytes());
    }
}

#[test]
fn compact_rejects_bad_indexes() {
    let (_dir, store) = store_3_to_5();
    assert!(matches!(
        store.compact(1, Vec::new()),
        Err(StorageError::AlreadyCompacted {
            index: 1,
            snapshot_index: 2,
            ..
        })
    ));
    // Beyond the applied index (2).
    assert!(matches!(
        store.compact(3, Vec::new()),
        Err(StorageError::Rejected { .. })
    ));
    store.set_applied(5).unwrap();
    // Beyond the last index.
    assert!(matches!(
        store.compact(6, Vec::new()),
        Err(StorageError::Rejected { .. })
    ));
    assert_eq!(store.first_index(), Ok(3));
    assert_eq!(all_entries(&store).len(), 3);
}

#[test]
fn compact_stays_below_commit() {
    let (_dir, store) = new_store();
    store.bootstrap(&[1]).unwrap();
    store
        .persist(&[new_entry(1, 1), new_entry(2, 1)], Some(&hs(1, 1, 1)))
        .unwrap();
    store.set_applied(1).unwrap();
    assert!(matches!(
        store.compact(2, Vec::new()),
        Err(StorageError::Rejected { .. })
    ));
    store.compact(1, Vec::new()).unwrap();
    assert_eq!(store.first_index(), Ok(2));
}

#[test]
fn snapshot_returns_stored_one() {
    let (_dir, store) = store_3_to_5();
    store.set_applied(4).unwrap();
    store.compact(4, b"state".to_vec()).unwrap();
    let want = new_snapshot(4, 4, vec![1, 2, 3], b"state");
    assert_eq!(store.snapshot(0, 2), Ok(want.clone()));
    assert_eq!(store.snapshot(4, 2), Ok(want.clone()));
    assert_eq!(
        store.snapshot(5, 2),
        Err(raft::Error::Store(
            RaftStorageError::SnapshotTemporarilyUnavailable
        ))
    );
    assert_eq!(store.last_snapshot().unwrap(), want);
    assert_eq!(store.snapshot_metadata(), want.get_metadata().clone());
}

#[test]
fn append() {
    let base = || vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)];
    let tests: Vec<(Vec<Entry>, Option<Vec<Entry>>)> = vec![
        (base(), Some(base())),
        (
            vec![new_entry(3, 3), new_entry(4, 6), new_entry(5, 6)],
            Some(vec![new_entry(3, 3), new_entry(4, 6), new_entry(5, 6)]),
        ),
        (
            vec![
                new_entry(3, 3),
                new_entry(4, 4),
                new_entry(5, 5),
                new_entry(6, 5),
            ],
            Some(vec![
                new_entry(3, 3),
                new_entry(4, 4),
                new_entry(5, 5),
                new_entry(6, 5),
            ]),
        ),
        // Overwriting compacted entries is refused.
        (
            vec![new_entry(2, 3), new_entry(3, 3), new_entry(4, 5)],
            None,
        ),
        // A conflicting suffix is truncated.
        (
            vec![new_entry(4, 5)],
            Some(vec![new_entry(3, 3), new_entry(4, 5)]),
        ),
        (
            vec![new_entry(6, 6)],
            Some(vec![
                new_entry(3, 3),
                new_entry(4, 4),
                new_entry(5, 5),
                new_entry(6, 6),
            ]),
        ),
        // A gap is refused.
        (vec![new_entry(7, 6)], None),
        // Non-consecutive entries are refused.
        (vec![new_entry(6, 6), new_entry(8, 6)], None),
    ];
    for (i, (ents, want)) in tests.into_iter().enumerate() {
        let (dir, store) = store_3_to_5();
        let res = store.persist(&ents, None);
        match want {
            Some(want) => {
                res.unwrap();
                assert_eq!(all_entries(&store), want, "case {i}");
                // The truncated suffix is gone on disk too.
                let store = reopen(&dir, store);
                assert_eq!(all_entries(&store), want, "case {i} after reopen");
                let last = want.last().unwrap();
                assert_eq!(store.last_index(), Ok(last.index));
                assert_eq!(store.term(last.index), Ok(last.term));
            }
            None => {
                assert!(
                    matches!(res, Err(StorageError::Rejected { .. })),
                    "case {i}: {res:?}"
                );
                assert_eq!(all_entries(&store), base(), "case {i}: nothing written");
            }
        }
    }
}

#[test]
fn committed_entries_are_immutable() {
    let (_dir, store) = store_3_to_5();
    store.set_commit(4).unwrap();
    // Re-sending identical committed entries is harmless.
    store
        .persist(&[new_entry(4, 4), new_entry(5, 5)], None)
        .unwrap();
    assert!(matches!(
        store.persist(&[new_entry(4, 9)], None),
        Err(StorageError::Rejected { .. })
    ));
    // Truncating below the commit index is refused.
    assert!(matches!(
        store.persist(&[new_entry(3, 3)], None),
        Err(StorageError::Rejected { .. })
    ));
    assert_eq!(store.last_index(), Ok(5));
    // An uncommitted suffix may still be replaced.
    store.persist(&[new_entry(5, 7)], None).unwrap();
    assert_eq!(store.term(5), Ok(7));
}

#[test]
fn hard_state_guards() {
    let (_dir, store) = store_3_to_5();
    store.persist(&[], Some(&hs(5, 2, 3))).unwrap();
    // A second vote in the same term.
    assert!(matches!(
        store.persist(&[], Some(&hs(5, 3, 3))),
        Err(StorageError::Rejected { .. })
    ));
    // The term going back.
    assert!(matches!(
        store.persist(&[], Some(&hs(4, 0, 3))),
        Err(StorageError::Rejected { .. })
    ));
    // Commit beyond the log.
    assert!(matches!(
        store.persist(&[], Some(&hs(5, 2, 6))),
        Err(StorageError::Rejected { .. })
    ));
    assert!(matches!(
        store.set_commit(6),
        Err(StorageError::Rejected { .. })
    ));
    // A lower commit keeps the stored one.
    store.persist(&[], Some(&hs(6, 0, 1))).unwrap();
    assert_eq!(store.hard_state(), hs(6, 0, 3));
    store.set_commit(2).unwrap();
    assert_eq!(store.hard_state().commit, 3);
    // Entries and a commit covering them in one call.
    store
        .persist(&[new_entry(6, 6)], Some(&hs(6, 1, 6)))
        .unwrap();
    assert_eq!(store.hard_state(), hs(6, 1, 6));
}

#[test]
fn apply_snapshot() {
    let (dir, store) = new_store();
    let snap = new_snapshot(4, 4, vec![1, 2, 3], b"files");
    store.apply_snapshot(&snap).unwrap();
    assert!(store.is_initialized());
    assert_eq!(store.first_index(), Ok(5));
    assert_eq!(store.last_index(), Ok(4));
    assert_eq!(store.term(4), Ok(4));
    assert_eq!(store.term(3), Err(compacted()));
    assert_eq!(store.hard_state(), hs(4, 0, 4));
    assert_eq!(store.conf_state().voters, vec![1, 2, 3]);
    assert_eq!(store.snapshot(4, 0), Ok(snap.clone()));
    // The state machine has not been restored from it yet.
    assert_eq!(store.applied(), 0);

    let older = new_snapshot(3, 3, vec![1, 2, 3], b"");
    assert!(matches!(
        store.apply_snapshot(&older),
        Err(StorageError::SnapshotOutOfDate { index: 3, .. })
    ));

    let store = reopen(&dir, store);
    assert_eq!(store.first_index(), Ok(5));
    assert_eq!(store.last_index(), Ok(4));
    assert_eq!(store.term(4), Ok(4));
    assert_eq!(store.snapshot(0, 0), Ok(snap));
    store
        .persist(&[new_entry(5, 4)], Some(&hs(4, 0, 5)))
        .unwrap();
    assert_eq!(store.last_index(), Ok(5));
}

#[test]
fn apply_snapshot_drops_log_and_keeps_vote() {
    let (_dir, store) = store_3_to_5();
    store.persist(&[], Some(&hs(3, 2, 3))).unwrap();
    // Below the commit index: would lose committed entries.
    assert!(matches!(
        store.apply_snapshot(&new_snapshot(2, 2, vec![1], b"")),
        Err(StorageError::SnapshotOutOfDate { .. })
    ));
    store
        .apply_snapshot(&new_snapshot(8, 7, vec![1, 2], b"x"))
        .unwrap();
    assert_eq!(store.first_index(), Ok(9));
    assert_eq!(store.last_index(), Ok(8));
    assert!(all_entries(&store).is_empty());
    assert_eq!(store.entries(4, 5, None, ctx()), Err(compacted()));
    assert_eq!(store.hard_state(), hs(7, 2, 8));
    assert_eq!(store.conf_state().voters, vec![1, 2]);
}

#[test]
fn bootstrap_then_reopen() {
    let (dir, store) = new_store();
    store.bootstrap(&[1, 2, 3]).unwrap();
    assert!(store.is_initialized());
    let before = store.initial_state().unwrap();
    assert!(before.initialized());
    assert_eq!(before.conf_state.voters, vec![1, 2, 3]);

    let store = reopen(&dir, store);
    assert!(store.is_initialized());
    let after = store.initial_state().unwrap();
    assert_eq!(after.hard_state, before.hard_state);
    assert_eq!(after.conf_state, before.conf_state);
    assert_eq!(store.first_index(), Ok(1));
    assert_eq!(store.last_index(), Ok(0));
}

#[test]
fn bootstrap_twice_errors() {
    let (dir, store) = new_store();
    store.bootstrap(&[1, 2, 3]).unwrap();
    assert!(matches!(
        store.bootstrap(&[1]),
        Err(StorageError::AlreadyInitialized { .. })
    ));
    let store = reopen(&dir, store);
    let err = store.bootstrap(&[1, 2, 3]).unwrap_err();
    assert!(matches!(err, StorageError::AlreadyInitialized { .. }));
    assert!(err
        .to_string()
        .contains(&dir.path().join("raft").display().to_string()));
    assert_eq!(store.conf_state().voters, vec![1, 2, 3]);
}

#[test]
fn bootstrap_refuses_existing_log_or_empty_voters() {
    let (_dir, store) = new_store();
    assert!(matches!(
        store.bootstrap(&[]),
        Err(StorageError::Rejected { .. })
    ));
    store.persist(&[new_entry(1, 1)], None).unwrap();
    assert!(matches!(
        store.bootstrap(&[1]),
        Err(StorageError::AlreadyInitialized { .. })
    ));
    assert!(!store.is_initialized());
}

#[test]
fn reopen_keeps_term_and_vote() {
    let (dir, store) = new_store();
    store.bootstrap(&[1, 2, 3]).unwrap();
    store.persist(&[], Some(&hs(5, 2, 0))).unwrap();
    let store = reopen(&dir, store);
    let state = store.initial_state().unwrap().hard_state;
    assert_eq!((state.term, state.vote), (5, 2));
    // The restarted node still cannot vote for someone else in term 5.
    assert!(store.persist(&[], Some(&hs(5, 3, 0))).is_err());
}

#[test]
fn reopen_keeps_commit() {
    let (dir, store) = new_store();
    store.bootstrap(&[1]).unwrap();
    let ents: Vec<_> = (1..=12).map(|i| new_entry(i, 1)).collect();
    store.persist(&ents, Some(&hs(1, 1, 10))).unwrap();
    let store = reopen(&dir, store);
    assert!(store.hard_state().commit >= 10);
    assert!(store.initial_state().unwrap().hard_state.commit >= 10);
    store.set_commit(12).unwrap();
    let store = reopen(&dir, store);
    assert_eq!(store.hard_state().commit, 12);
}

#[test]
fn reopen_after_compaction() {
    let (dir, store) = new_store();
    store.bootstrap(&[1, 2, 3]).unwrap();
    let ents: Vec<_> = (1..=10).map(|i| new_entry(i, 1 + i / 4)).collect();
    store.persist(&ents, Some(&hs(3, 1, 8))).unwrap();
    store.set_applied(7).unwrap();
    store.compact(7, b"snap".to_vec()).unwrap();
    let (first, last, term7) = (
        store.first_index().unwrap(),
        store.last_index().unwrap(),
        store.term(7).unwrap(),
    );
    assert_eq!((first, last, term7), (8, 10, 2));

    let store = reopen(&dir, store);
    assert_eq!(store.first_index(), Ok(first));
    assert_eq!(store.last_index(), Ok(last));
    assert_eq!(store.term(7), Ok(term7));
    assert_eq!(store.term(6), Err(compacted()));
    assert_eq!(store.term(10), Ok(3));
    assert_eq!(store.applied(), 7);
    assert_eq!(all_entries(&store), ents[7..].to_vec());
    assert_eq!(&store.snapshot(7, 0).unwrap().data[..], b"snap");
}

#[test]
fn set_applied_rules() {
    let (dir, store) = store_3_to_5();
    // Raises a lagging commit with it.
    store.set_applied(4).unwrap();
    assert_eq!(store.hard_state().commit, 4);
    assert!(matches!(
        store.set_applied(3),
        Err(StorageError::Rejected { .. })
    ));
    assert!(matches!(
        store.set_applied(6),
        Err(StorageError::Rejected { .. })
    ));
    let store = reopen(&dir, store);
    assert_eq!(store.applied(), 4);
    assert_eq!(store.hard_state().commit, 4);
}

#[test]
fn set_conf_state_is_durable() {
    let (dir, store) = new_store();
    store.bootstrap(&[1]).unwrap();
    let cs = ConfState {
        voters: vec![1, 2],
        learners: vec![3],
        ..Default::default()
    };
    let ents: Vec<_> = (1..=3).map(|i| new_entry(i, 1)).collect();
    store.persist(&ents, Some(&hs(1, 0, 2))).unwrap();
    store.set_conf_state(&cs, 2).unwrap();
    assert_eq!(
        store.applied(),
        2,
        "raised to the change's entry in the same write"
    );
    assert!(matches!(
        store.set_conf_state(&ConfState::default(), 3),
        Err(StorageError::Rejected { .. })
    ));
    // Not past the commit index, never back.
    store.set_conf_state(&cs, 3).unwrap();
    store.set_conf_state(&cs, 1).unwrap();
    let store = reopen(&dir, store);
    assert_eq!(store.conf_state(), cs);
    assert_eq!(store.applied(), 2);
}

/// A compaction snapshot taken before a membership change (held back for a
/// slow follower) would store the later membership at its earlier index.
#[test]
fn a_compaction_below_the_last_membership_change_is_refused() {
    let (_dir, store) = new_store();
    store.bootstrap(&[1]).unwrap();
    let ents: Vec<_> = (1..=6).map(|i| new_entry(i, 1)).collect();
    store.persist(&ents, Some(&hs(1, 0, 6))).unwrap();
    store.set_applied(3).unwrap();
    let cs = ConfState {
        voters: vec![1],
        learners: vec![2],
        ..Default::default()
    };
    store.set_conf_state(&cs, 5).unwrap();
    let refused = store.compact(4, b"taken at 4".to_vec());
    assert!(
        matches!(&refused, Err(StorageError::Rejected { reason, .. }) if reason.contains("below the membership change at entry 5")),
        "{refused:?}"
    );
    store.compact(5, b"taken at 5".to_vec()).unwrap();
    assert_eq!(store.snapshot_metadata().get_conf_state(), &cs);
}

#[test]
fn the_membership_directory_and_the_removal_marker_are_durable() {
    let (dir, store) = new_store();
    assert!(store.directory().unwrap().members.is_empty());
    assert_eq!(store.removed().unwrap(), None);
    let mut directory = crate::core::members::Directory::default();
    directory.merge(&[crate::core::members::MemberInfo {
        id: 4,
        addr: "10.0.0.4:7700".into(),
        witness: false,
        keep_learner: true,
        replaces: None,
        added_at: 12,
    }]);
    store.set_directory(&directory).unwrap();
    store.set_removed("removed at entry 20").unwrap();
    let store = reopen(&dir, store);
    assert_eq!(store.directory().unwrap(), directory);
    assert_eq!(
        store.removed().unwrap().as_deref(),
        Some("removed at entry 20")
    );
}

#[test]
fn corrupt_value_is_an_error_naming_the_key() {
    let (dir, store) = new_store();
    store.bootstrap(&[1]).unwrap();
    let cf = store.cf(CF_STATE).unwrap();
    store
        .inner
        .db
        .put_cf(cf, KEY_HARD_STATE, b"\xff\xff\xff")
        .unwrap();
    drop(store);
    let err = RaftStore::open(&dir.path().join("raft")).unwrap_err();
    assert!(
        matches!(&err, StorageError::Corrupt { key, .. } if key == "state/hard_state"),
        "{err}"
    );
    assert!(err.to_string().contains("state/hard_state"));
}

/// Handles every Ready the way the node does, against the real raft-rs.
fn drive(node: &mut raft::RawNode<RaftStore>) {
    while node.has_ready() {
        let mut ready = node.ready();
        let store = node.store().clone();
        if !ready.snapshot().is_empty() {
            store.apply_snapshot(ready.snapshot()).unwrap();
        }
        store.persist(ready.entries(), ready.hs()).unwrap();
        if let Some(last) = ready.take_committed_entries().last() {
            store.set_applied(last.index).unwrap();
        }
        let mut light = node.advance(ready);
        if let Some(commit) = light.commit_index() {
            store.set_commit(commit).unwrap();
        }
        if let Some(last) = light.take_committed_entries().last() {
            store.set_applied(last.index).unwrap();
        }
        node.advance_apply();
    }
}

fn raw_node(store: &RaftStore) -> raft::RawNode<RaftStore> {
    let config = raft::Config {
        id: 1,
        election_tick: 10,
        heartbeat_tick: 1,
        applied: store.applied(),
        ..Default::default()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    raft::RawNode::new(&config, store.clone(), &logger).unwrap()
}

/// raft-rs itself accepts what this store hands back after a restart
/// (it panics on a commit or applied index out of range).
#[test]
fn raft_restarts_from_the_store() {
    let (dir, store) = new_store();
    store.bootstrap(&[1]).unwrap();
    let mut node = raw_node(&store);
    node.campaign().unwrap();
    drive(&mut node);
    assert_eq!(node.raft.state, raft::StateRole::Leader);
    for i in 0..5u8 {
        node.propose(vec![], vec![i]).unwrap();
        drive(&mut node);
    }
    let last = store.last_index().unwrap();
    assert_eq!(store.hard_state().commit, last);
    assert_eq!(store.applied(), last);
    store.compact(last - 2, b"sm".to_vec()).unwrap();
    drop(node);

    let store = reopen(&dir, store);
    let mut node = raw_node(&store);
    assert_eq!(node.raft.raft_log.committed, last);
    assert_eq!(node.raft.raft_log.applied, last);
    assert_eq!(node.raft.term, 1);
    node.campaign().unwrap();
    drive(&mut node);
    assert_eq!(node.raft.state, raft::StateRole::Leader);
    assert_eq!(node.raft.term, 2);
    node.propose(vec![], b"after restart".to_vec()).unwrap();
    drive(&mut node);
    assert_eq!(store.hard_state().commit, last + 2);
    assert_eq!(store.hard_state().vote, 1);
    assert_eq!(store.first_index(), Ok(last - 1));
}

/// One round of Ready handling for a node in a simulated cluster;
/// returns the messages to deliver.
fn drive_collect(node: &mut raft::RawNode<RaftStore>) -> Vec<raft::prelude::Message> {
    let mut out = Vec::new();
    while node.has_ready() {
        let mut ready = node.ready();
        let store = node.store().clone();
        if !ready.snapshot().is_empty() {
            store.apply_snapshot(ready.snapshot()).unwrap();
            // The state machine would restore ready.snapshot().data here.
            store
                .set_applied(ready.snapshot().get_metadata().index)
                .unwrap();
        }
        store.persist(ready.entries(), ready.hs()).unwrap();
        out.extend(ready.take_messages());
        out.extend(ready.take_persisted_messages());
        if let Some(last) = ready.take_committed_entries().last() {
            store.set_applied(last.index).unwrap();
        }
        let mut light = node.advance(ready);
        if let Some(commit) = light.commit_index() {
            store.set_commit(commit).unwrap();
        }
        out.extend(light.take_messages());
        if let Some(last) = light.take_committed_entries().last() {
            store.set_applied(last.index).unwrap();
        }
        node.advance_apply();
    }
    out
}

fn deliver_all(nodes: &mut std::collections::BTreeMap<u64, raft::RawNode<RaftStore>>) {
    loop {
        let msgs: Vec<_> = nodes.values_mut().flat_map(drive_collect).collect();
        if msgs.is_empty() {
            return;
        }
        for m in msgs {
            if let Some(node) = nodes.get_mut(&m.to) {
                node.step(m).unwrap();
            }
        }
    }
}

/// A follower that missed compacted entries is caught up by raft-rs with
/// the snapshot this store serves, and installs it with `apply_snapshot`.
#[test]
fn lagging_follower_catches_up_by_snapshot() {
    let dirs: Vec<TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let stores: Vec<RaftStore> = dirs
        .iter()
        .map(|d| RaftStore::open(&d.path().join("raft")).unwrap())
        .collect();
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let node_for = |id: u64| {
        let store = &stores[id as usize - 1];
        store.bootstrap(&[1, 2, 3]).unwrap();
        let config = raft::Config {
            id,
            election_tick: 10,
            heartbeat_tick: 1,
            applied: store.applied(),
            ..Default::default()
        };
        raft::RawNode::new(&config, store.clone(), &logger).unwrap()
    };
    let mut nodes = std::collections::BTreeMap::new();
    nodes.insert(1, node_for(1));
    nodes.insert(2, node_for(2));
    nodes.get_mut(&1).unwrap().campaign().unwrap();
    deliver_all(&mut nodes);
    assert_eq!(nodes[&1].raft.state, raft::StateRole::Leader);
    for i in 0..5u8 {
        nodes.get_mut(&1).unwrap().propose(vec![], vec![i]).unwrap();
        deliver_all(&mut nodes);
    }
    let leader = &stores[0];
    let applied = leader.applied();
    assert_eq!(applied, leader.last_index().unwrap());
    leader.compact(applied, b"state machine".to_vec()).unwrap();

    nodes.insert(3, node_for(3));
    for _ in 0..5 {
        nodes.get_mut(&1).unwrap().tick();
        deliver_all(&mut nodes);
    }
    let follower = &stores[2];
    assert_eq!(follower.snapshot_metadata().index, applied);
    assert_eq!(follower.applied(), applied);
    assert_eq!(follower.hard_state().commit, applied);
    assert_eq!(
        &follower.last_snapshot().unwrap().data[..],
        b"state machine"
    );

    // It then follows the log normally.
    nodes
        .get_mut(&1)
        .unwrap()
        .propose(vec![], b"next".to_vec())
        .unwrap();
    deliver_all(&mut nodes);
    assert_eq!(follower.last_index(), Ok(applied + 1));
    assert_eq!(follower.hard_state().commit, applied + 1);
}

#[test]
fn poisoned_lock_is_an_error_not_a_panic() {
    let (_dir, store) = store_3_to_5();
    let clone = store.clone();
    let _ = std::thread::spawn(move || {
        let _guard = clone.inner.cache.write().unwrap();
        panic!("poison the cache");
    })
    .join();
    assert!(store.inner.cache.is_poisoned());
    assert!(matches!(
        store.term(3),
        Err(raft::Error::Store(RaftStorageError::Other(_)))
    ));
    assert!(store.entries(3, 4, None, ctx()).is_err());
    assert!(matches!(
        store.persist(&[], None),
        Err(StorageError::Poisoned { .. })
    ));
    // Infallible getters still answer from the last durable state.
    assert_eq!(store.conf_state().voters, vec![1, 2, 3]);
}

#[test]
fn raft_error_carries_the_message() {
    let e: raft::Error = StorageError::Rejected {
        path: PathBuf::from("/var/lib/clusterd/raft"),
        reason: "test".to_string(),
    }
    .into();
    assert!(e.to_string().contains("/var/lib/clusterd/raft"), "{e}");
}

/// Pins the on-disk encoding: if this fails, existing data_dirs no
/// longer read back the same; write a migration instead of editing it.
#[test]
fn golden_keys_and_encoding() {
    assert_eq!(entry_key(0), [0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(entry_key(1), [0, 0, 0, 0, 0, 0, 0, 1]);
    assert_eq!(entry_key(0x0102_0304_0506_0708), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert!(entry_key(255) < entry_key(256));
    assert_eq!(CF_ENTRIES, "entries");
    assert_eq!(CF_STATE, "state");
    assert_eq!(KEY_HARD_STATE, b"hard_state");
    assert_eq!(KEY_CONF_STATE, b"conf_state");
    assert_eq!(KEY_SNAPSHOT_META, b"snapshot_meta");
    assert_eq!(KEY_SNAPSHOT_DATA, b"snapshot_data");
    assert_eq!(KEY_APPLIED, b"applied");

    assert_eq!(
        hs(5, 2, 10).write_to_bytes().unwrap(),
        vec![0x08, 0x05, 0x10, 0x02, 0x18, 0x0a]
    );
    let cs = ConfState {
        voters: vec![1, 2],
        ..Default::default()
    };
    assert_eq!(cs.write_to_bytes().unwrap(), vec![0x08, 0x01, 0x08, 0x02]);
    let mut e = new_entry(1, 2);
    e.data = b"x".to_vec().into();
    assert_eq!(
        e.write_to_bytes().unwrap(),
        vec![0x10, 0x02, 0x18, 0x01, 0x22, 0x01, b'x']
    );

    // And what actually lands in RocksDB.
    let (_dir, store) = new_store();
    store.bootstrap(&[1, 2]).unwrap();
    store.persist(&[e.clone()], Some(&hs(5, 2, 1))).unwrap();
    store.set_applied(1).unwrap();
    let db = &store.inner.db;
    let state = store.cf(CF_STATE).unwrap();
    let entries = store.cf(CF_ENTRIES).unwrap();
    assert_eq!(
        db.get_cf(entries, [0u8, 0, 0, 0, 0, 0, 0, 1])
            .unwrap()
            .unwrap(),
        vec![0x10, 0x02, 0x18, 0x01, 0x22, 0x01, b'x']
    );
    assert_eq!(
        db.get_cf(state, b"hard_state").unwrap().unwrap(),
        vec![0x08, 0x05, 0x10, 0x02, 0x18, 0x01]
    );
    // Snapshot metadata {conf_state {voters [1, 2]}, index 1, term 2}.
    store.compact(1, b"d".to_vec()).unwrap();
    assert_eq!(
        db.get_cf(state, b"snapshot_meta").unwrap().unwrap(),
        vec![0x0a, 0x04, 0x08, 0x01, 0x08, 0x02, 0x10, 0x01, 0x18, 0x02]
    );
    assert_eq!(
        db.get_cf(state, b"snapshot_data").unwrap().unwrap(),
        b"d".to_vec()
    );
    assert_eq!(
        db.get_cf(state, b"conf_state").unwrap().unwrap(),
        vec![0x08, 0x01, 0x08, 0x02]
    );
    assert_eq!(
        db.get_cf(state, b"applied").unwrap().unwrap(),
        vec![0, 0, 0, 0, 0, 0, 0, 1]
    );
    // Compaction really removed the entry.
    assert_eq!(db.get_cf(entries, entry_key(1)).unwrap(), None);
}
