//! Tests of the planner's, the pipeline's and the watcher's pure decisions.

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
use crate::core::manifest::Meta;

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

#[test]
fn only_a_file_left_whole_shortens_the_debounce() {
    use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind};
    use notify::event::{MetadataKind, RemoveKind, RenameMode};
    let debounce = Duration::from_millis(20);
    let ev = |path: &str, kind: EventKind| watch::FileEvent::of(0, PathBuf::from(path), &kind);
    let mut unsettled = watch::Unsettled::default();
    assert_eq!(unsettled.quiet(debounce), watch::SETTLED_QUIET);

    // `fs::write`: create, write, close.
    unsettled.note(&ev("/s/a", EventKind::Create(CreateKind::File)));
    assert_eq!(unsettled.quiet(debounce), debounce);
    unsettled.note(&ev(
        "/s/a",
        EventKind::Modify(ModifyKind::Data(DataChange::Any)),
    ));
    assert_eq!(unsettled.quiet(debounce), debounce);
    // Another file settling says nothing of the one still open.
    unsettled.note(&ev(
        "/s/b",
        EventKind::Access(AccessKind::Close(AccessMode::Write)),
    ));
    assert_eq!(unsettled.quiet(debounce), debounce);
    unsettled.note(&ev(
        "/s/a",
        EventKind::Access(AccessKind::Close(AccessMode::Write)),
    ));
    assert_eq!(unsettled.quiet(debounce), watch::SETTLED_QUIET);

    // An editor's save: a temporary file renamed over the original.
    unsettled.note(&ev(
        "/s/.a.swp",
        EventKind::Modify(ModifyKind::Data(DataChange::Any)),
    ));
    unsettled.note(&ev(
        "/s/.a.swp",
        EventKind::Modify(ModifyKind::Name(RenameMode::From)),
    ));
    unsettled.note(&ev(
        "/s/a",
        EventKind::Modify(ModifyKind::Name(RenameMode::To)),
    ));
    assert_eq!(unsettled.quiet(debounce), watch::SETTLED_QUIET);

    // A removal or a chmod settles at once; a directory made does too.
    for kind in [
        EventKind::Remove(RemoveKind::File),
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
        EventKind::Create(CreateKind::Folder),
    ] {
        unsettled.note(&ev("/s/c", kind));
        assert_eq!(unsettled.quiet(debounce), watch::SETTLED_QUIET, "{kind:?}");
    }
    // A shorter debounce configured is kept.
    assert_eq!(
        unsettled.quiet(Duration::from_millis(1)),
        Duration::from_millis(1)
    );
}
