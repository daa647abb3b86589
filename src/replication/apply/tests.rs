use super::*;
use std::path::Path;

use crate::core::config::Config;
use crate::core::config::{SyncMode, SyncSetConfig};
use crate::core::manifest::{StagedVersion, WireDigest};

fn set(path: &Path, exclude: &[&str], skip_while: &[&str]) -> SetRuntime {
    SetRuntime::from_config(
        &SyncSetConfig {
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
            validate: None,
            validate_timeout: std::time::Duration::from_secs(10),
            on_change_failure: Default::default(),
            history: true,
            accounts: None,
        },
        path,
    )
}

/// Node 1 of a three-node cluster syncing set "mail" at `d/root`, its
/// data in `d/data` (one filesystem, as in a typical install).
pub(crate) fn node_one_of_three(d: &Path) -> Config {
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
    let gap = shared
        .finish_upload(46, &[at(0, &eb, db)])
        .unwrap_err()
        .to_string();
    assert!(gap.contains("lacks bytes"), "{gap}");
    // A later piece of an upload of which nothing is held or on file
    // (this node restarted meanwhile) is refused, past 64 MiB too.
    let lost = shared.stage_before_finish(50, third as u64, eb_bytes.slice(third..));
    assert!(lost.unwrap_err().to_string().contains("lacks bytes 0.."));
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
    applier.apply_up_to(1).unwrap();

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
    // The tree's name, and the history's: the first version is linked,
    // not copied.
    assert_eq!(st.nlink(), 2);
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

    applier.apply_up_to(3).expect("gives way to the restore");
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
