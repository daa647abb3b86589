//! Tests of the manifest: pinned encodings, path checks, apply and snapshots.

use super::snapshot::*;
use super::*;

fn meta(kind: EntryKind) -> Meta {
    Meta {
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        user: Some("root".into()),
        group: None,
        mtime_ns: 1_700_000_000_000_000_000,
    }
}

fn put(path: &str, n: u8) -> FileOp {
    FileOp::Put {
        path: path.as_bytes().to_vec(),
        meta: meta(EntryKind::File),
        digest: WireDigest::new(&crate::core::delta::digest(&[n])),
        content: Content::Inline(vec![n]),
    }
}

fn batch(ops: Vec<FileOp>) -> FileBatch {
    FileBatch {
        set: "etc".into(),
        origin: 1,
        proposed_at_ms: 5,
        ops,
    }
}

#[test]
fn owner_names_are_shared_and_encode_as_plain_strings() {
    let a = OwnerName::new("postfix");
    let b: OwnerName = postcard::from_bytes(&postcard::to_allocvec("postfix").unwrap()).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&a.0, &b.0),
        "one allocation per name"
    );
    assert_eq!(
        postcard::to_allocvec(&a).unwrap(),
        postcard::to_allocvec("postfix").unwrap()
    );
    assert_eq!(serde_json::to_string(&Some(a)).unwrap(), "\"postfix\"");
    assert_eq!(b.as_str(), "postfix");
}

#[test]
fn a_packed_set_holds_the_same_entries_in_the_same_order() {
    let mut m = Manifest::default();
    let names: Vec<String> = (0..500).map(|i| format!("d{}/f{i:03}", i % 7)).collect();
    let ops = names
        .iter()
        .enumerate()
        .map(|(i, p)| put(p, i as u8))
        .collect();
    m.apply(1, &batch(ops)).unwrap();
    let before = m.clone();
    m.repack();
    assert_eq!(m, before);
    let set = m.set("etc").unwrap();
    assert!(set
        .entries
        .keys()
        .zip(set.entries.keys().skip(1))
        .all(|(a, b)| a < b));
    assert_eq!(set.entries.len(), 500);
    for p in &names {
        assert!(m
            .get("etc", &SetPath::from_network(p.as_bytes()).unwrap())
            .is_some());
    }
    let mut empty = SetManifest::default();
    empty.repack();
    assert!(empty.entries.is_empty());
}

#[test]
fn batch_encoding_is_pinned() {
    let b = batch(vec![
        put("a", 1),
        FileOp::Remove {
            path: b"d".to_vec(),
        },
    ]);
    let bytes = encode_batch(&b);
    assert_eq!(decode_batch(&bytes).unwrap(), b);
    // set "etc", origin 1, at 5, 2 ops; Put tag 0, path "a", meta...
    assert_eq!(&bytes[..8], &[3, b'e', b't', b'c', 1, 5, 2, 0]);
    assert_eq!(
        bytes.len(),
        78,
        "the batch format changed: bump the command format"
    );
    let c = Chunk {
        upload: 7,
        offset: 3,
        data: vec![9, 9],
    };
    assert_eq!(encode_chunk(&c), vec![7, 3, 2, 9, 9]);
    // Blob content: tag 3, then upload, offset and length (varints).
    let FileOp::Put {
        path, meta, digest, ..
    } = put("a", 1)
    else {
        unreachable!()
    };
    let blob = batch(vec![FileOp::Put {
        path,
        meta,
        digest,
        content: Content::Blob {
            upload: 5,
            offset: 300,
            len: 7,
        },
    }]);
    let bytes = encode_batch(&blob);
    assert_eq!(decode_batch(&bytes).unwrap(), blob);
    assert!(bytes.ends_with(&[3, 5, 0xac, 0x02, 7]), "{bytes:?}");
}

#[test]
fn remove_takes_the_subtree_and_only_it() {
    let mut m = Manifest::default();
    m.apply(
        1,
        &batch(vec![
            FileOp::Dir {
                path: b"a".to_vec(),
                meta: meta(EntryKind::Dir),
            },
            put("a/b", 2),
            put("a-c", 3),
            put("ab", 4),
        ]),
    )
    .unwrap();
    let ops = m
        .apply(
            2,
            &batch(vec![FileOp::Remove {
                path: b"a".to_vec(),
            }]),
        )
        .unwrap();
    let CheckedOp::Remove { removed, .. } = &ops[0] else {
        panic!()
    };
    assert_eq!(removed.len(), 2);
    let left: Vec<_> = m
        .set("etc")
        .unwrap()
        .entries
        .keys()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(left, vec!["a-c", "ab"]);
    assert_eq!(m.set("etc").unwrap().progress.seq, 2);
}

#[test]
fn one_bad_path_refuses_the_whole_batch() {
    let mut m = Manifest::default();
    m.apply(1, &batch(vec![put("ok", 1)])).unwrap();
    let before = m.clone();
    for bad in ["../etc/passwd", "/etc/shadow", "a/../b", "a\0b", ""] {
        let err = m
            .apply(2, &batch(vec![put("fine", 2), put(bad, 3)]))
            .unwrap_err();
        assert!(matches!(err, ManifestError::Path { .. }), "{bad:?}");
        assert_eq!(m, before, "{bad:?} changed the manifest");
    }
}

#[test]
fn a_refused_batch_undoes_removals_renames_and_replacements_before_it() {
    let dir = |p: &str| FileOp::Dir {
        path: p.as_bytes().to_vec(),
        meta: meta(EntryKind::Dir),
    };
    let mut m = Manifest::default();
    m.apply(
        1,
        &batch(vec![
            dir("a"),
            put("a/x", 1),
            put("a/y", 2),
            dir("b"),
            put("b/z", 3),
            put("f", 4),
        ]),
    )
    .unwrap();
    let before = m.clone();
    let err = m
        .apply(
            2,
            &batch(vec![
                FileOp::Remove {
                    path: b"a".to_vec(),
                },
                FileOp::Rename {
                    from: b"b".to_vec(),
                    to: b"c".to_vec(),
                },
                put("f", 9),
                put("new", 5),
                put("f/under", 6),
            ]),
        )
        .unwrap_err();
    assert!(matches!(err, ManifestError::UnderNonDir { .. }), "{err}");
    assert_eq!(m, before, "the refused batch left changes behind");
    // And the same ops without the bad one apply.
    m.apply(
        3,
        &batch(vec![
            FileOp::Remove {
                path: b"a".to_vec(),
            },
            FileOp::Rename {
                from: b"b".to_vec(),
                to: b"c".to_vec(),
            },
        ]),
    )
    .unwrap();
    let paths: Vec<String> = m
        .set("etc")
        .unwrap()
        .entries
        .keys()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(paths, ["c", "c/z", "f"]);
}

#[test]
fn nothing_is_committed_below_a_symlink_or_a_file() {
    let link = FileOp::Symlink {
        path: b"evil".to_vec(),
        target: b"/etc".to_vec(),
        meta: meta(EntryKind::Symlink),
    };
    let mut m = Manifest::default();
    m.apply(1, &batch(vec![link, put("plain", 2)])).unwrap();
    let before = m.clone();
    for ops in [
        vec![put("fine", 3), put("evil/passwd", 4)],
        vec![put("plain/x", 5)],
        vec![FileOp::Rename {
            from: b"plain".to_vec(),
            to: b"evil/plain".to_vec(),
        }],
        vec![FileOp::Rename {
            from: b"evil/shadow".to_vec(),
            to: b"stolen".to_vec(),
        }],
    ] {
        let err = m.apply(2, &batch(ops.clone())).unwrap_err();
        assert!(
            matches!(err, ManifestError::UnderNonDir { .. }),
            "{ops:?}: {err}"
        );
        assert_eq!(m, before, "{ops:?} changed the manifest");
    }
    // Replacing the link by a directory first (a kind change) is fine.
    m.apply(
        3,
        &batch(vec![
            FileOp::Dir {
                path: b"evil".to_vec(),
                meta: meta(EntryKind::Dir),
            },
            put("evil/passwd", 6),
        ]),
    )
    .unwrap();
}

#[test]
fn rename_moves_a_subtree_and_refuses_moving_into_itself() {
    let mut m = Manifest::default();
    m.apply(1, &batch(vec![put("log", 1), put("d/x", 2)]))
        .unwrap();
    m.apply(
        2,
        &batch(vec![FileOp::Rename {
            from: b"log".to_vec(),
            to: b"log.1".to_vec(),
        }]),
    )
    .unwrap();
    m.apply(
        3,
        &batch(vec![FileOp::Rename {
            from: b"d".to_vec(),
            to: b"e".to_vec(),
        }]),
    )
    .unwrap();
    let keys: Vec<_> = m
        .set("etc")
        .unwrap()
        .entries
        .keys()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(keys, vec!["e/x", "log.1"]);
    assert!(m
        .apply(
            4,
            &batch(vec![FileOp::Rename {
                from: b"e".to_vec(),
                to: b"e/f".to_vec()
            }])
        )
        .is_err());
}

#[test]
fn snapshot_round_trips_and_refuses_hostile_paths() {
    let mut m = Manifest::default();
    m.apply(1, &batch(vec![put("a", 1), put("b/c", 2)]))
        .unwrap();
    let bytes = m.encode();
    assert_eq!(Manifest::decode(&bytes, 1 << 20).unwrap(), m);
    // Hand-build a manifest whose path is "../x" by editing the encoded body.
    let body = postcard::to_allocvec(&m).unwrap();
    let pos = body.windows(3).position(|w| w == b"b/c").unwrap();
    let mut evil = body.clone();
    evil[pos..pos + 3].copy_from_slice(b"../");
    let mut framed = vec![SNAPSHOT_FORMAT_V1];
    framed.extend(zstd::bulk::compress(&evil, 1).unwrap());
    assert!(Manifest::decode(&framed, 1 << 20).is_err());
    assert!(Manifest::decode(&[9, 1, 2], 1 << 20).is_err());
    assert!(Manifest::decode(&[], 1 << 20).is_err());
}

fn xattrs_op(path: &str, pairs: &[(&str, &[u8])]) -> FileOp {
    FileOp::Xattrs {
        path: path.as_bytes().to_vec(),
        xattrs: pairs
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.to_vec()))
            .collect(),
    }
}

#[test]
fn xattrs_op_is_a_new_tag_and_leaves_old_ops_alone() {
    let b = batch(vec![xattrs_op("a", &[("user.k", b"v")])]);
    let bytes = encode_batch(&b);
    assert_eq!(decode_batch(&bytes).unwrap(), b);
    // set "etc", origin 1, at 5, 1 op; tag 6 (after Rename), path "a",
    // 1 pair: "user.k" = "v".
    assert_eq!(
        bytes,
        [
            &[3, b'e', b't', b'c', 1, 5, 1, 6, 1, b'a', 1, 6][..],
            b"user.k",
            &[1, b'v'],
        ]
        .concat()
    );
}

#[test]
fn xattrs_after_a_put_fold_into_it_and_alone_are_metadata_only() {
    let mut m = Manifest::default();
    let ops = m
        .apply(
            1,
            &batch(vec![
                put("a", 1),
                xattrs_op(
                    "a",
                    &[("system.posix_acl_access", b"acl"), ("user.k", b"v")],
                ),
                FileOp::Dir {
                    path: b"d".to_vec(),
                    meta: meta(EntryKind::Dir),
                },
                xattrs_op("d", &[("user.d", b"1")]),
            ]),
        )
        .unwrap();
    assert_eq!(ops.len(), 2, "{ops:?}");
    let CheckedOp::Put { entry, .. } = &ops[0] else {
        panic!("{ops:?}")
    };
    assert_eq!(entry.xattrs.len(), 2);
    let CheckedOp::Dir { entry, .. } = &ops[1] else {
        panic!("{ops:?}")
    };
    assert_eq!(entry.xattrs, vec![(b"user.d".to_vec(), b"1".to_vec())]);
    let a = SetPath::from_network(b"a").unwrap();
    assert_eq!(m.get("etc", &a).unwrap().xattrs.len(), 2);

    // Only the xattrs changed: a metadata-only op with the whole entry.
    let ops = m
        .apply(2, &batch(vec![xattrs_op("a", &[("user.k", b"w")])]))
        .unwrap();
    let [CheckedOp::Xattrs { path, entry }] = &ops[..] else {
        panic!("{ops:?}")
    };
    assert_eq!(path, &a);
    assert_eq!(entry.digest, m.get("etc", &a).unwrap().digest);
    assert_eq!(entry.xattrs, vec![(b"user.k".to_vec(), b"w".to_vec())]);

    // A new version without an Xattrs op has none.
    m.apply(3, &batch(vec![put("a", 2)])).unwrap();
    assert!(m.get("etc", &a).unwrap().xattrs.is_empty());
    // A rename carries them along.
    m.apply(4, &batch(vec![xattrs_op("a", &[("user.k", b"x")])]))
        .unwrap();
    m.apply(
        5,
        &batch(vec![FileOp::Rename {
            from: b"a".to_vec(),
            to: b"b".to_vec(),
        }]),
    )
    .unwrap();
    let b_path = SetPath::from_network(b"b").unwrap();
    assert_eq!(m.get("etc", &b_path).unwrap().xattrs.len(), 1);
}

#[test]
fn xattrs_outside_the_replicated_names_or_limits_refuse_the_batch() {
    let mut m = Manifest::default();
    m.apply(
        1,
        &batch(vec![
            put("a", 1),
            FileOp::Symlink {
                path: b"l".to_vec(),
                target: b"a".to_vec(),
                meta: meta(EntryKind::Symlink),
            },
        ]),
    )
    .unwrap();
    let before = m.clone();
    let big = vec![7u8; XATTR_MAX_BYTES];
    let cases: Vec<(FileOp, &str)> = vec![
        (
            xattrs_op("a", &[("security.selinux", b"x")]),
            "not a replicated",
        ),
        (xattrs_op("a", &[("trusted.x", b"x")]), "not a replicated"),
        (xattrs_op("a", &[("user.", b"x")]), "not a replicated"),
        (
            xattrs_op("a", &[("user.b", b"x"), ("user.a", b"x")]),
            "sorted",
        ),
        (
            xattrs_op("a", &[("user.a", b"x"), ("user.a", b"y")]),
            "sorted",
        ),
        (xattrs_op("a", &[("user.big", &big)]), "more than the 65536"),
        (xattrs_op("l", &[("user.a", b"x")]), "no file or directory"),
        (
            xattrs_op("gone", &[("user.a", b"x")]),
            "no file or directory",
        ),
    ];
    for (op, why) in cases {
        let err = m.apply(2, &batch(vec![put("c", 3), op])).unwrap_err();
        assert!(
            matches!(err, ManifestError::Xattrs { .. }) && err.to_string().contains(why),
            "{err}"
        );
        assert_eq!(m, before);
    }
    // Exactly at the limit is fine.
    let fits = vec![7u8; XATTR_MAX_BYTES - "user.big".len()];
    m.apply(2, &batch(vec![xattrs_op("a", &[("user.big", &fits)])]))
        .unwrap();
}

#[test]
fn snapshots_stay_format_1_without_xattrs_and_read_both_formats() {
    let mut m = Manifest::default();
    m.apply(1, &batch(vec![put("a", 1), put("b/c", 2)]))
        .unwrap();
    let v1 = m.encode();
    assert_eq!(v1[0], SNAPSHOT_FORMAT_V1);
    // Byte-identical to what a release without xattrs writes.
    #[derive(Serialize)]
    struct OldEntry<'a> {
        meta: &'a Meta,
        digest: &'a Option<WireDigest>,
        target: &'a Option<Vec<u8>>,
    }
    #[derive(Serialize)]
    struct OldSet<'a> {
        entries: BTreeMap<&'a SetPath, OldEntry<'a>>,
        progress: &'a SetProgress,
    }
    let s = m.set("etc").unwrap();
    let etc = "etc".to_string();
    let old: BTreeMap<&String, OldSet> = [(
        &etc,
        OldSet {
            entries: s
                .entries
                .iter()
                .map(|(p, e)| {
                    (
                        p,
                        OldEntry {
                            meta: &e.meta,
                            digest: &e.digest,
                            target: &e.target,
                        },
                    )
                })
                .collect(),
            progress: &s.progress,
        },
    )]
    .into_iter()
    .collect();
    let old_body = postcard::to_allocvec(&(old,)).unwrap();
    assert_eq!(zstd::bulk::decompress(&v1[1..], 1 << 20).unwrap(), old_body);
    assert_eq!(Manifest::decode(&v1, 1 << 20).unwrap(), m);

    m.apply(2, &batch(vec![xattrs_op("a", &[("user.k", b"v")])]))
        .unwrap();
    let v2 = m.encode();
    assert_eq!(v2[0], SNAPSHOT_FORMAT_V2);
    assert_eq!(Manifest::decode(&v2, 1 << 20).unwrap(), m);

    // A snapshot cannot smuggle in what a batch could not commit.
    let mut evil = m.clone();
    let a = SetPath::from_network(b"a").unwrap();
    evil.sets
        .get_mut("etc")
        .unwrap()
        .entries
        .get_mut(&a)
        .unwrap()
        .xattrs = vec![(b"security.selinux".to_vec(), b"x".to_vec())];
    assert!(Manifest::decode(&evil.encode(), 1 << 20).is_err());
}

#[test]
fn stored_entries_keep_the_old_form_without_xattrs() {
    let mut e = Entry {
        meta: meta(EntryKind::File),
        digest: Some(WireDigest::new(&crate::core::delta::digest(b"x"))),
        target: None,
        xattrs: Vec::new(),
        link: None,
    };
    let old = postcard::to_allocvec(&EntryV1Ref::from(&e)).unwrap();
    assert_eq!(e.encode_stored(), old);
    assert_eq!(Entry::decode_stored(&old).unwrap(), e);
    e.xattrs = vec![(b"user.k".to_vec(), vec![])];
    let new = e.encode_stored();
    assert_eq!(new.len(), old.len() + 1 + 1 + 6 + 1);
    assert_eq!(Entry::decode_stored(&new).unwrap(), e);
    assert!(Entry::decode_stored(&new[..new.len() - 1]).is_err());
    assert!(Entry::decode_stored(&[new.clone(), vec![0]].concat()).is_err());
}

fn link(path: &str, target: &str) -> FileOp {
    FileOp::Link {
        path: path.as_bytes().to_vec(),
        target: target.as_bytes().to_vec(),
    }
}

fn sp(p: &str) -> SetPath {
    SetPath::from_network(p.as_bytes()).unwrap()
}

#[test]
fn link_op_is_a_new_tag_and_leaves_old_ops_alone() {
    let b = batch(vec![link("b", "a")]);
    let bytes = encode_batch(&b);
    assert_eq!(decode_batch(&bytes).unwrap(), b);
    // set "etc", origin 1, at 5, 1 op; tag 7 (after Xattrs), path "b",
    // target "a".
    assert_eq!(bytes, [3, b'e', b't', b'c', 1, 5, 1, 7, 1, b'b', 1, b'a']);
}

#[test]
fn a_link_needs_a_committed_file_that_is_no_link_itself() {
    let mut m = Manifest::default();
    m.apply(
        1,
        &batch(vec![
            put("a", 1),
            FileOp::Dir {
                path: b"d".to_vec(),
                meta: meta(EntryKind::Dir),
            },
            put("d/x", 2),
            FileOp::Symlink {
                path: b"l".to_vec(),
                target: b"a".to_vec(),
                meta: meta(EntryKind::Symlink),
            },
            link("b", "a"),
        ]),
    )
    .unwrap();
    let before = m.clone();
    for (op, why) in [
        (link("c", "gone"), "no regular file"),
        (link("c", "d"), "no regular file"),
        (link("c", "l"), "no regular file"),
        (link("c", "b"), "not a link itself"),
        (link("a", "a"), "of itself"),
        (link("d", "d/x"), "under the link"),
        (link("c", "a/under"), "lies under a"),
    ] {
        let err = m.apply(2, &batch(vec![put("z", 3), op])).unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
        assert_eq!(m, before, "{err}");
    }
    // Both names pass the path policy.
    for op in [
        link("c", "../etc/shadow"),
        link("/etc/x", "a"),
        link("c", "a\0b"),
    ] {
        let err = m.apply(2, &batch(vec![op])).unwrap_err();
        assert!(matches!(err, ManifestError::Path { .. }), "{err}");
        assert_eq!(m, before);
    }

    // A link is the primary's entry with `link` set; its bytes count once.
    let (a, b) = (sp("a"), sp("b"));
    let eb = m.get("etc", &b).unwrap();
    assert_eq!(eb.link, Some(a.clone()));
    assert_eq!(
        Entry {
            link: None,
            ..eb.clone()
        },
        m.get("etc", &a).unwrap().clone()
    );
    assert_eq!(m.set("etc").unwrap().totals(), (3, 2));
    assert_eq!(m.set("etc").unwrap().link_group(&a), vec![b.clone()]);
    assert_eq!(m.set("etc").unwrap().link_group(&b), vec![a.clone()]);
    // A link replaces a file, and a directory with its subtree.
    let ops = m
        .apply(3, &batch(vec![link("d", "a"), put("z", 4), link("z", "a")]))
        .unwrap();
    let CheckedOp::Link {
        previous: Some(prev),
        target,
        ..
    } = &ops[0]
    else {
        panic!("{ops:?}")
    };
    assert_eq!((prev.meta.kind, target), (EntryKind::Dir, &a));
    assert!(m.get("etc", &sp("d/x")).is_none());
    assert_eq!(
        m.get("etc", &sp("z")).unwrap().digest,
        m.get("etc", &a).unwrap().digest
    );
    assert_eq!(
        m.set("etc").unwrap().link_group(&a),
        vec![b, sp("d"), sp("z")]
    );
}

#[test]
fn a_new_version_removal_or_move_of_the_primary_is_what_followers_disks_do() {
    let mut m = Manifest::default();
    m.apply(1, &batch(vec![put("a", 1), link("b", "a"), link("c", "a")]))
        .unwrap();
    let old = m.get("etc", &sp("a")).unwrap().digest;
    // A new version of the primary: followers rename a new inode over
    // it, the links keep the old one, as files of their own.
    let (ops, touched) = m.apply_tracked(2, &batch(vec![put("a", 2)])).unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(touched, [sp("b"), sp("c")].into_iter().collect());
    for n in ["b", "c"] {
        let e = m.get("etc", &sp(n)).unwrap();
        assert_eq!((e.link.as_ref(), e.digest), (None, old), "{n}");
    }
    // The leader links them again (here c to b, a to b).
    m.apply(3, &batch(vec![link("c", "b"), link("a", "b")]))
        .unwrap();
    assert_eq!(m.get("etc", &sp("a")).unwrap().digest, old);
    // Moving the primary takes the links' reference along; moving a
    // link keeps its target.
    let (_, touched) = m
        .apply_tracked(
            4,
            &batch(vec![
                FileOp::Rename {
                    from: b"b".to_vec(),
                    to: b"p".to_vec(),
                },
                FileOp::Rename {
                    from: b"c".to_vec(),
                    to: b"q".to_vec(),
                },
            ]),
        )
        .unwrap();
    assert!(touched.contains(&sp("a")), "{touched:?}");
    assert_eq!(m.get("etc", &sp("a")).unwrap().link, Some(sp("p")));
    assert_eq!(m.get("etc", &sp("q")).unwrap().link, Some(sp("p")));
    // Attributes are the inode's: set through any name, all names have them.
    m.apply(5, &batch(vec![xattrs_op("q", &[("user.k", b"v")])]))
        .unwrap();
    for n in ["a", "p", "q"] {
        assert_eq!(m.get("etc", &sp(n)).unwrap().xattrs.len(), 1, "{n}");
    }
    // Removing the primary leaves the links, as files.
    let (ops, touched) = m
        .apply_tracked(
            6,
            &batch(vec![FileOp::Remove {
                path: b"p".to_vec(),
            }]),
        )
        .unwrap();
    let [CheckedOp::Remove { removed, .. }] = &ops[..] else {
        panic!("{ops:?}")
    };
    assert_eq!(removed.len(), 1);
    assert_eq!(touched.len(), 2);
    for n in ["a", "q"] {
        let e = m.get("etc", &sp(n)).unwrap();
        assert_eq!((e.link.as_ref(), e.digest), (None, old), "{n}");
    }
    // A directory moved whole: links inside and outside follow.
    m.apply(
        7,
        &batch(vec![
            FileOp::Dir {
                path: b"d".to_vec(),
                meta: meta(EntryKind::Dir),
            },
            put("d/f", 3),
            link("d/g", "d/f"),
            link("h", "d/f"),
            link("d/i", "a"),
        ]),
    )
    .unwrap();
    m.apply(
        8,
        &batch(vec![FileOp::Rename {
            from: b"d".to_vec(),
            to: b"e".to_vec(),
        }]),
    )
    .unwrap();
    let link_of = |n: &str| m.get("etc", &sp(n)).unwrap().link.clone();
    assert_eq!(link_of("e/g"), Some(sp("e/f")));
    assert_eq!(link_of("h"), Some(sp("e/f")));
    assert_eq!(link_of("e/i"), Some(sp("a")));
    assert_eq!(link_of("e/f"), None);
    // The encoded snapshot holds the same, and stays readable.
    assert_eq!(Manifest::decode(&m.encode(), 1 << 20).unwrap(), m);
}

#[test]
fn snapshots_with_links_are_format_3_and_checked() {
    let mut m = Manifest::default();
    m.apply(
        1,
        &batch(vec![put("a", 1), xattrs_op("a", &[("user.k", b"v")])]),
    )
    .unwrap();
    assert_eq!(m.encode()[0], SNAPSHOT_FORMAT_V2);
    m.apply(2, &batch(vec![link("b", "a")])).unwrap();
    let v3 = m.encode();
    assert_eq!(v3[0], SNAPSHOT_FORMAT_V3);
    assert_eq!(Manifest::decode(&v3, 1 << 20).unwrap(), m);
    // A snapshot cannot bring a link a batch could not commit.
    let edit = |f: &dyn Fn(&mut SetManifest)| {
        let mut evil = m.clone();
        f(evil.sets.get_mut("etc").unwrap());
        Manifest::decode(&evil.encode(), 1 << 20)
    };
    for (what, f) in [
        (
            "target gone",
            &(|s: &mut SetManifest| {
                s.entries.remove(&SetPath::from_network(b"a").unwrap());
            }) as &dyn Fn(&mut SetManifest),
        ),
        ("target a link", &|s: &mut SetManifest| {
            let a = SetPath::from_network(b"a").unwrap();
            s.entries.get_mut(&a).unwrap().link = Some(a.clone());
        }),
        ("other content", &|s: &mut SetManifest| {
            let b = SetPath::from_network(b"b").unwrap();
            s.entries.get_mut(&b).unwrap().digest =
                Some(WireDigest::new(&crate::core::delta::digest(b"other")));
        }),
    ] {
        assert!(matches!(edit(f), Err(ManifestError::Link { .. })), "{what}");
    }
    assert!(edit(&|_: &mut SetManifest| {}).is_ok());
}

#[test]
fn stored_link_entries_take_the_full_form_and_others_keep_theirs() {
    let mut e = Entry {
        meta: meta(EntryKind::File),
        digest: Some(WireDigest::new(&crate::core::delta::digest(b"x"))),
        target: None,
        xattrs: vec![(b"user.k".to_vec(), vec![])],
        link: None,
    };
    let v2 = e.encode_stored();
    assert_eq!(v2, postcard::to_allocvec(&EntryV2Ref::from(&e)).unwrap());
    assert_eq!(Entry::decode_stored(&v2).unwrap(), e);
    e.link = Some(sp("primary"));
    let v3 = e.encode_stored();
    assert_eq!(v3.len(), v2.len() + 1 + 1 + "primary".len());
    assert_eq!(Entry::decode_stored(&v3).unwrap(), e);
    e.xattrs.clear();
    let v3 = e.encode_stored();
    assert_eq!(Entry::decode_stored(&v3).unwrap(), e);
    assert!(Entry::decode_stored(&v3[..v3.len() - 1]).is_err());
    assert!(Entry::decode_stored(&[v3.clone(), vec![0]].concat()).is_err());
    // A link's target is checked like any path.
    let mut evil = v3.clone();
    let n = evil.len();
    evil[n - 7..].copy_from_slice(b"../../x");
    assert!(Entry::decode_stored(&evil).is_err());
}

#[test]
fn lag_seconds_come_from_the_first_batch_a_node_lacks() {
    let mut m = Manifest::default();
    for i in 1..=3u64 {
        let mut b = batch(vec![put("a", i as u8)]);
        b.proposed_at_ms = 1000 * i;
        m.apply(i, &b).unwrap();
    }
    let pr = &m.set("etc").unwrap().progress;
    assert_eq!(pr.behind_since_ms(3), None);
    assert_eq!(pr.behind_since_ms(1), Some(2000));
    assert_eq!(pr.behind_since_ms(0), Some(1000));
    assert_eq!(pr.bytes, 3);
}

#[test]
fn pauses_travel_in_format_4_snapshots_only() {
    let mut m = Manifest::default();
    m.apply(1, &batch(vec![put("a", 1)])).unwrap();
    let plain = m.encode();
    assert_ne!(plain[0], SNAPSHOT_FORMAT_V4, "no pause, no new format");
    let pause = Pause {
        reason: "editing tac_plus.conf and its includes".into(),
        since_ms: 1_800_000_000_000,
        until_ms: Some(1_800_000_600_000),
        by: "admin alice".into(),
    };
    m.paused.insert("etc".into(), pause.clone());
    let with = m.encode();
    assert_eq!(with[0], SNAPSHOT_FORMAT_V4);
    let back = Manifest::decode(&with, 1 << 20).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.paused.get("etc"), Some(&pause));
    // A hostile pause is refused like a hostile path.
    let mut hostile = m.clone();
    hostile.paused.insert(
        "x".into(),
        Pause {
            reason: "r".repeat(PAUSE_TEXT_MAX + 1),
            ..pause
        },
    );
    assert!(Manifest::decode(&hostile.encode(), 1 << 20).is_err());
}

#[test]
fn a_snapshot_larger_than_the_compressors_buffer_round_trips() {
    let mut m = Manifest::default();
    let names: Vec<String> = (0..5000)
        .map(|i| format!("user{:03}/Maildir/cur/{i:06}.host:2,S", i % 100))
        .collect();
    let ops: Vec<FileOp> = names
        .iter()
        .enumerate()
        .map(|(i, n)| put(n, i as u8))
        .collect();
    m.apply(1, &batch(ops)).unwrap();
    let v1 = m.encode();
    assert_eq!(v1[0], SNAPSHOT_FORMAT_V1);
    let body = zstd::bulk::decompress(&v1[1..], 64 << 20).unwrap();
    assert!(body.len() > 4 * (64 << 10), "{} bytes", body.len());
    assert_eq!(Manifest::decode(&v1, 64 << 20).unwrap(), m);
    // The output is one frame, as the bulk compressor wrote it before.
    assert!(zstd::bulk::decompress(&v1[1..], body.len() - 1).is_err());
    // Decoded as a stream, it still stops at the limit given.
    assert!(Manifest::decode(&v1, body.len() - 1).is_err());
    assert!(Manifest::decode(&v1[..v1.len() - 1], 64 << 20).is_err());

    m.apply(2, &batch(vec![xattrs_op(&names[7], &[("user.k", b"v")])]))
        .unwrap();
    let v2 = m.encode();
    assert_eq!(v2[0], SNAPSHOT_FORMAT_V2);
    assert_eq!(Manifest::decode(&v2, 64 << 20).unwrap(), m);
}
