//! Tests of the capability root: every write stays inside, atomic replaces, guarded swaps, xattrs.

use super::*;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

fn hash(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

fn file_meta(mode: u32) -> FileMeta {
    let (uid, gid) = me();
    FileMeta::new(Kind::File, mode, uid, gid, 1_600_000_000_123_456_789)
}

/// The test process's owner, read from a file it creates.
fn me() -> (u32, u32) {
    let f = tempfile::tempfile().unwrap();
    let m = f.metadata().unwrap();
    (m.uid(), m.gid())
}

fn is_root() -> bool {
    me().0 == 0
}

struct Fixture {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    root: Root,
    root_path: PathBuf,
    outside: PathBuf,
}

/// base/root is the sync root; base/outside a sentinel tree with a file,
/// a subdirectory and content, that no operation may change.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_path_buf();
    let root_path = base.join("root");
    let outside = base.join("outside");
    std::fs::create_dir(&root_path).unwrap();
    std::fs::create_dir_all(outside.join("sub")).unwrap();
    std::fs::write(outside.join("shadow"), b"root:secret:1:0\n").unwrap();
    std::fs::write(outside.join("x"), b"outside x").unwrap();
    std::fs::write(outside.join("sub/keep"), b"keep me").unwrap();
    let root = Root::open(&root_path).unwrap();
    Fixture {
        _tmp: tmp,
        base,
        root,
        root_path,
        outside,
    }
}

/// A staged version is linked in with its metadata, displacing what
/// was expected, and keeps its staged name (the copy a replay uses);
/// one that is not what the caller claims (another size) is refused;
/// one on another filesystem is left alone for the caller to copy.
#[test]
fn adopting_a_staged_file_links_it_in_or_refuses_it() {
    let f = fixture();
    let staging = f.base.join("staging");
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(staging.join("v1"), b"new content").unwrap();
    std::fs::set_permissions(staging.join("v1"), std::fs::Permissions::from_mode(0o400)).unwrap();
    std::fs::write(f.root_path.join("aliases"), b"old").unwrap();
    let ino = std::fs::metadata(staging.join("v1")).unwrap().ino();
    let before = snapshot(&f.outside);

    let meta = file_meta(0o640);
    let wrong_len = f.root.adopt_file_guarded(
        &["aliases"],
        &staging,
        "v1",
        &meta,
        3,
        None,
        Expect::Anything,
    );
    assert!(wrong_len.is_err());
    assert_eq!(std::fs::read(f.root_path.join("aliases")).unwrap(), b"old");

    let r = f
        .root
        .adopt_file_guarded(
            &["aliases"],
            &staging,
            "v1",
            &meta,
            11,
            None,
            Expect::Anything,
        )
        .unwrap()
        .expect("one filesystem, no labels");
    assert!(r.displaced.is_none());
    let m = std::fs::metadata(f.root_path.join("aliases")).unwrap();
    assert_eq!(
        std::fs::read(f.root_path.join("aliases")).unwrap(),
        b"new content"
    );
    assert_eq!((m.ino(), m.mode() & 0o7777), (ino, 0o640));
    assert_eq!(r.meta.ino, ino);
    assert!(staging.join("v1").exists(), "the staged name stays");
    let names: Vec<_> = std::fs::read_dir(&f.root_path).unwrap().collect();
    assert_eq!(names.len(), 1, "no temporary name left: {names:?}");
    assert_eq!(snapshot(&f.outside), before);

    // /dev/shm is a tmpfs where there is one: another filesystem.
    if let Ok(other) = tempfile::tempdir_in("/dev/shm") {
        let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
        if dev(other.path()) != dev(&f.root_path) {
            std::fs::write(other.path().join("v2"), b"elsewhere").unwrap();
            let r = f.root.adopt_file_guarded(
                &["aliases"],
                other.path(),
                "v2",
                &meta,
                9,
                None,
                Expect::Anything,
            );
            assert!(matches!(r, Ok(None)), "{r:?}");
            assert!(other.path().join("v2").exists());
            assert_eq!(
                std::fs::read(f.root_path.join("aliases")).unwrap(),
                b"new content"
            );
        }
    }
}

/// Content and metadata of every entry under `dir`, symlinks not followed.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let m = std::fs::symlink_metadata(dir).unwrap();
        let rel = dir.strip_prefix(base).unwrap().to_path_buf();
        let mut desc = format!(
            "mode={:o} uid={} gid={} mtime={}.{} ino={}",
            m.mode(),
            m.uid(),
            m.gid(),
            m.mtime(),
            m.mtime_nsec(),
            m.ino()
        );
        if m.file_type().is_symlink() {
            desc += &format!(" link={:?}", std::fs::read_link(dir).unwrap());
        } else if m.is_file() {
            desc += &format!(" data={:?}", std::fs::read(dir).unwrap());
        } else if m.is_dir() {
            for e in std::fs::read_dir(dir).unwrap() {
                walk(base, &e.unwrap().path(), out);
            }
        }
        out.insert(rel, desc);
    }
    walk(dir, dir, &mut out);
    out
}

fn temp_leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| is_temp_name(n.as_bytes()))
        .collect()
}

#[test]
fn replace_creates_then_replaces() {
    let fx = fixture();
    let m = file_meta(0o640);
    fx.root
        .replace_file(&["a"], b"one", &m, &hash(b"one"))
        .unwrap();
    assert_eq!(std::fs::read(fx.root_path.join("a")).unwrap(), b"one");
    let ino1 = std::fs::metadata(fx.root_path.join("a")).unwrap().ino();
    fx.root
        .replace_file(&["a"], b"two!", &m, &hash(b"two!"))
        .unwrap();
    let md = std::fs::metadata(fx.root_path.join("a")).unwrap();
    assert_eq!(std::fs::read(fx.root_path.join("a")).unwrap(), b"two!");
    assert_ne!(md.ino(), ino1, "replaced by rename, not rewritten in place");
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!(md.mtime(), 1_600_000_000);
    assert_eq!(md.mtime_nsec(), 123_456_789);
    assert!(temp_leftovers(&fx.root_path).is_empty());

    let (data, meta) = fx.root.read_file(&["a"], 1024).unwrap().unwrap();
    assert_eq!(data, b"two!");
    assert_eq!(meta.kind, Kind::File);
    assert_eq!(meta.len, 4);
    assert_eq!(meta.mtime_ns, m.mtime_ns);
    assert_eq!(fx.root.stat(&["a"]).unwrap().unwrap(), meta);
}

/// A prepared version stays under its temporary name (the old version in
/// place) until it is swapped in; one discarded leaves nothing; a wrong
/// hash is refused before anything is kept; only another run's temporary
/// names count as stale.
#[test]
fn prepared_versions_go_in_only_when_swapped() {
    let fx = fixture();
    let m = file_meta(0o600);
    fx.root
        .replace_file(&["a"], b"old", &m, &hash(b"old"))
        .unwrap();
    let old = Expect::file(&fx.root.stat(&["a"]).unwrap().unwrap());
    let mut kept = None;
    let p = fx
        .root
        .prepare_file(&["a"], b"new", &m, &hash(b"new"), None, |f| {
            kept = Some(f.metadata().unwrap().ino())
        })
        .unwrap();
    assert_eq!(std::fs::read(fx.root_path.join("a")).unwrap(), b"old");
    let temps = temp_leftovers(&fx.root_path);
    assert_eq!(temps.len(), 1, "{temps:?}");
    assert!(!is_stale_temp_name(temps[0].as_bytes()), "this run's own");
    assert_eq!(kept, Some(p.meta().ino), "keep saw the verified file");
    fx.root.sync_filesystem().unwrap();
    let r = fx.root.swap_prepared(&p, old).unwrap();
    assert!(r.displaced.is_none());
    assert_eq!(std::fs::read(fx.root_path.join("a")).unwrap(), b"new");
    assert_eq!(r.meta.ino, p.meta().ino);
    assert!(temp_leftovers(&fx.root_path).is_empty());

    let p = fx
        .root
        .prepare_file(&["b"], b"never", &m, &hash(b"never"), None, |_| {})
        .unwrap();
    fx.root.discard_prepared(&p);
    assert!(temp_leftovers(&fx.root_path).is_empty());
    assert!(!fx.root_path.join("b").exists());

    let err = fx
        .root
        .prepare_file(&["b"], b"torn", &m, &hash(b"other"), None, |_| {
            panic!("a version that does not verify is never kept")
        })
        .unwrap_err();
    assert!(matches!(err, FsError::HashMismatch { .. }), "{err}");
    assert!(temp_leftovers(&fx.root_path).is_empty());

    assert!(
        is_stale_temp_name(b".clusterd-tmp-0123456789abcdef"),
        "the old form"
    );
    assert!(is_stale_temp_name(
        format!(
            "{TEMP_PREFIX}{:08x}-0123456789abcdef",
            run_mark().wrapping_add(1)
        )
        .as_bytes()
    ));
    assert!(!is_stale_temp_name(b"inbox"));
}

#[test]
fn link_file_guarded_links_atomically_only_the_checked_file() {
    let fx = fixture();
    let m = file_meta(0o640);
    std::fs::create_dir(fx.root_path.join("d")).unwrap();
    fx.root
        .replace_file(&["a"], b"one", &m, &hash(b"one"))
        .unwrap();
    let checked = fx.root.stat(&["a"]).unwrap().unwrap();
    assert_eq!(checked.nlink, 1);
    // A new name, in another directory.
    let r = fx
        .root
        .link_file_guarded(&["d", "b"], &["a"], &checked, Expect::Absent)
        .unwrap();
    assert!(r.displaced.is_none());
    let b = std::fs::metadata(fx.root_path.join("d/b")).unwrap();
    assert_eq!((b.ino(), b.nlink()), (checked.ino, 2));
    assert_eq!(fx.root.stat(&["a"]).unwrap().unwrap().nlink, 2);
    // Again: nothing changes.
    fx.root
        .link_file_guarded(&["d", "b"], &["a"], &checked, Expect::Absent)
        .unwrap();
    assert_eq!(
        std::fs::metadata(fx.root_path.join("a")).unwrap().nlink(),
        2
    );
    // Over an existing file that was checked: it goes.
    std::fs::write(fx.root_path.join("c"), b"old c").unwrap();
    let c = fx.root.stat(&["c"]).unwrap().unwrap();
    let expect = Expect::File {
        ino: c.ino,
        dev: c.dev,
        len: c.len,
        mtime_ns: c.mtime_ns,
    };
    let r = fx
        .root
        .link_file_guarded(&["c"], &["a"], &checked, expect)
        .unwrap();
    assert!(r.displaced.is_none());
    assert_eq!(std::fs::read(fx.root_path.join("c")).unwrap(), b"one");
    assert_eq!(
        std::fs::metadata(fx.root_path.join("a")).unwrap().nlink(),
        3
    );
    // Over a file that is not the one checked: set aside, not deleted.
    std::fs::write(fx.root_path.join("e"), b"edited by hand").unwrap();
    let r = fx
        .root
        .link_file_guarded(&["e"], &["a"], &checked, Expect::Absent)
        .unwrap();
    let aside = r.displaced.expect("the unexpected file is kept");
    let aside = fx.root_path.join(std::str::from_utf8(&aside[0]).unwrap());
    assert_eq!(std::fs::read(&aside).unwrap(), b"edited by hand");
    std::fs::remove_file(&aside).unwrap();
    // A target that changed since it was checked is not linked.
    fx.root
        .replace_file(&["a"], b"two", &m, &hash(b"two"))
        .unwrap();
    let err = fx
        .root
        .link_file_guarded(&["f"], &["a"], &checked, Expect::Absent)
        .unwrap_err();
    assert!(
        err.to_string().contains("not the file that was checked"),
        "{err}"
    );
    assert!(!fx.root_path.join("f").exists());
    // Never through or to a symlink.
    symlink(&fx.outside, fx.root_path.join("evil")).unwrap();
    let x = std::fs::metadata(fx.outside.join("x")).unwrap();
    let mut outside = checked;
    outside.ino = x.ino();
    outside.dev = x.dev();
    assert!(fx
        .root
        .link_file_guarded(&["g"], &["evil", "x"], &outside, Expect::Absent)
        .is_err());
    assert!(fx
        .root
        .link_file_guarded(&["evil", "g"], &["a"], &checked, Expect::Absent)
        .is_err());
    symlink("a", fx.root_path.join("sl")).unwrap();
    assert!(fx
        .root
        .link_file_guarded(&["h"], &["sl"], &checked, Expect::Absent)
        .is_err());
    assert!(!fx.root_path.join("h").exists() && !fx.root_path.join("g").exists());
    assert_eq!(std::fs::metadata(fx.outside.join("x")).unwrap().nlink(), 1);
    assert!(temp_leftovers(&fx.root_path).is_empty());
    assert!(temp_leftovers(&fx.root_path.join("d")).is_empty());
}

#[test]
fn wrong_hash_leaves_old_file_and_no_temp() {
    let fx = fixture();
    let m = file_meta(0o600);
    fx.root
        .replace_file(&["f"], b"old", &m, &hash(b"old"))
        .unwrap();
    // The directory's own mtime moves (a temporary entry came and went);
    // every entry in it must be exactly as it was.
    let entries = |p: &Path| {
        let mut s = snapshot(p);
        s.remove(Path::new(""));
        s
    };
    let before = entries(&fx.root_path);
    let err = fx
        .root
        .replace_file(&["f"], b"new", &m, &hash(b"something else"))
        .unwrap_err();
    assert!(matches!(err, FsError::HashMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(fx.root_path.to_str().unwrap()) && msg.contains(" f "),
        "{msg}"
    );
    assert_eq!(entries(&fx.root_path), before);
    assert!(temp_leftovers(&fx.root_path).is_empty());
}

#[test]
fn missing_parent_is_an_error_and_leaves_nothing() {
    let fx = fixture();
    let m = file_meta(0o600);
    let err = fx
        .root
        .replace_file(&["nodir", "f"], b"x", &m, &hash(b"x"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(2), "{err}");
    assert!(std::fs::read_dir(&fx.root_path).unwrap().next().is_none());
}

#[test]
fn setuid_and_sticky_modes_kept() {
    let fx = fixture();
    fx.root
        .replace_file(
            &["su"],
            b"#!/bin/sh\n",
            &file_meta(0o4755),
            &hash(b"#!/bin/sh\n"),
        )
        .unwrap();
    assert_eq!(fx.root.stat(&["su"]).unwrap().unwrap().mode, 0o4755);
    fx.root
        .replace_file(&["sg"], b"", &file_meta(0o2750), &hash(b""))
        .unwrap();
    assert_eq!(fx.root.stat(&["sg"]).unwrap().unwrap().mode, 0o2750);

    let (uid, gid) = me();
    let dm = FileMeta::new(Kind::Dir, 0o1777, uid, gid, 1_500_000_000_000_000_000);
    fx.root.make_dir(&["tmp"], &dm).unwrap();
    fx.root.make_dir(&["tmp"], &dm).unwrap(); // idempotent
    let st = fx.root.stat(&["tmp"]).unwrap().unwrap();
    assert_eq!(
        (st.kind, st.mode, st.mtime_ns),
        (Kind::Dir, 0o1777, dm.mtime_ns)
    );
    let dm2 = FileMeta { mode: 0o2755, ..dm };
    fx.root.make_dir(&["tmp"], &dm2).unwrap();
    assert_eq!(fx.root.stat(&["tmp"]).unwrap().unwrap().mode, 0o2755);
}

#[test]
fn owner_set_and_setuid_survives_chown() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let fx = fixture();
    let m = FileMeta::new(Kind::File, 0o4750, 65534, 65534, 0);
    fx.root
        .replace_file(&["owned"], b"data", &m, &hash(b"data"))
        .unwrap();
    let md = std::fs::symlink_metadata(fx.root_path.join("owned")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (65534, 65534, 0o4750)
    );
    assert_eq!(md.mtime(), 0);

    let dm = FileMeta::new(Kind::Dir, 0o750, 65534, 65534, 0);
    fx.root.make_dir(&["d"], &dm).unwrap();
    let md = std::fs::symlink_metadata(fx.root_path.join("d")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (65534, 65534, 0o750)
    );

    // set_meta back to root without rewriting the content.
    let ino = fx.root.stat(&["owned"]).unwrap().unwrap().ino;
    let back = FileMeta::new(Kind::File, 0o640, 0, 0, 5_000_000_000);
    assert!(fx.root.set_meta(&["owned"], &back).unwrap());
    assert!(!fx.root.set_meta(&["owned"], &back).unwrap());
    let st = fx.root.stat(&["owned"]).unwrap().unwrap();
    assert_eq!(
        (st.uid, st.gid, st.mode, st.mtime_ns, st.ino),
        (0, 0, 0o640, 5_000_000_000, ino)
    );
}

/// Run as another user (e.g. `setpriv --reuid=65534 <test binary>`):
/// an owner it cannot set is an error, never silently dropped, and the
/// old version stays.
#[test]
fn foreign_owner_without_privilege_is_an_error() {
    if is_root() {
        eprintln!("skipped: meaningful only when not root");
        return;
    }
    let fx = fixture();
    fx.root
        .replace_file(&["f"], b"old", &file_meta(0o600), &hash(b"old"))
        .unwrap();
    let m = FileMeta::new(Kind::File, 0o600, 0, 0, 0);
    let err = fx
        .root
        .replace_file(&["f"], b"new", &m, &hash(b"new"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(1), "{err}");
    assert_eq!(std::fs::read(fx.root_path.join("f")).unwrap(), b"old");
    assert!(temp_leftovers(&fx.root_path).is_empty());
}

#[test]
fn symlink_parent_never_followed() {
    let fx = fixture();
    symlink(&fx.outside, fx.root_path.join("evil")).unwrap();
    symlink("../outside", fx.root_path.join("rel")).unwrap();
    let before = snapshot(&fx.outside);
    let m = file_meta(0o644);
    let (uid, gid) = me();
    let dm = FileMeta::new(Kind::Dir, 0o755, uid, gid, 0);

    for link in ["evil", "rel"] {
        let err = fx
            .root
            .replace_file(&[link, "x"], b"pwned", &m, &hash(b"pwned"))
            .unwrap_err();
        assert!(
            matches!(
                err,
                FsError::WrongKind {
                    found: "a symlink",
                    ..
                }
            ),
            "{err}"
        );
        let err = fx
            .root
            .replace_file(&[link, "new"], b"pwned", &m, &hash(b"pwned"))
            .unwrap_err();
        assert!(matches!(err, FsError::WrongKind { .. }), "{err}");
        assert!(fx.root.make_dir(&[link, "newdir"], &dm).is_err());
        assert!(fx.root.make_symlink(&[link, "l"], b"/etc").is_err());
        assert!(fx.root.remove(&[link, "x"]).is_err());
        assert!(fx.root.remove(&[link, "sub"]).is_err());
        assert!(fx.root.set_meta(&[link, "x"], &m).is_err());
        assert!(fx.root.read_file(&[link, "shadow"], 1024).is_err());
        assert!(fx.root.stat(&[link, "shadow"]).is_err());
        assert!(fx.root.list_dir(&[link]).is_err());
        let q = tempfile::tempdir().unwrap();
        let qroot = Root::open(q.path()).unwrap();
        assert!(fx.root.move_aside(&[link, "x"], &qroot, &["q"]).is_err());
        assert!(qroot.replace_file(&["a"], b"a", &m, &hash(b"a")).is_ok());
        assert!(fx.root.move_aside(&["nothing"], &qroot, &["q"]).is_ok());
    }
    assert_eq!(
        snapshot(&fx.outside),
        before,
        "nothing outside the root changed"
    );
    let err = fx
        .root
        .read_file(&["evil", "x"], 10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("evil is a symlink"), "{err}");
}

#[test]
fn symlink_leaf_is_replaced_or_removed_not_followed() {
    let fx = fixture();
    symlink(fx.outside.join("shadow"), fx.root_path.join("shadow")).unwrap();
    symlink(&fx.outside, fx.root_path.join("evil")).unwrap();
    let before = snapshot(&fx.outside);

    let err = fx.root.read_file(&["shadow"], 1 << 20).unwrap_err();
    assert!(
        matches!(
            err,
            FsError::WrongKind {
                found: "a symlink",
                ..
            }
        ),
        "{err}"
    );
    let err = fx.root.read_file(&["evil"], 1 << 20).unwrap_err();
    assert!(matches!(err, FsError::WrongKind { .. }), "{err}");
    let (uid, gid) = me();
    let err = fx
        .root
        .make_dir(&["evil"], &FileMeta::new(Kind::Dir, 0o700, uid, gid, 0))
        .unwrap_err();
    assert!(
        matches!(
            err,
            FsError::WrongKind {
                found: "a symlink",
                ..
            }
        ),
        "{err}"
    );
    let err = fx
        .root
        .set_meta(&["shadow"], &file_meta(0o777))
        .unwrap_err();
    assert!(matches!(err, FsError::WrongKind { .. }), "{err}");

    // Replacing the link's name replaces the link, never its target.
    fx.root
        .replace_file(&["shadow"], b"mine", &file_meta(0o600), &hash(b"mine"))
        .unwrap();
    assert_eq!(fx.root.stat(&["shadow"]).unwrap().unwrap().kind, Kind::File);
    // Removing the link removes the link only.
    assert!(fx.root.remove(&["evil"]).unwrap());
    assert!(!fx.root.remove(&["evil"]).unwrap());
    assert!(fx.root.stat(&["evil"]).unwrap().is_none());
    assert_eq!(snapshot(&fx.outside), before);
}

#[test]
fn parent_that_is_a_file_is_an_error() {
    let fx = fixture();
    let m = file_meta(0o600);
    fx.root.replace_file(&["f"], b"x", &m, &hash(b"x")).unwrap();
    let err = fx
        .root
        .replace_file(&["f", "y"], b"y", &m, &hash(b"y"))
        .unwrap_err();
    assert!(
        matches!(
            err,
            FsError::WrongKind {
                found: "a regular file",
                ..
            }
        ),
        "{err}"
    );
    assert!(fx.root.stat(&["f", "y"]).is_err());
    assert!(fx.root.remove(&["f", "y"]).is_err());
    let err = fx.root.read_file(&[] as &[&str], 1).unwrap_err();
    assert!(matches!(err, FsError::BadPath { .. }), "{err}");
}

#[test]
fn remove_tree_with_symlink_out_deletes_only_the_link() {
    let fx = fixture();
    let base = fx.root_path.join("tree");
    std::fs::create_dir_all(base.join("a/b/c")).unwrap();
    std::fs::write(base.join("a/f"), b"1").unwrap();
    std::fs::write(base.join("a/b/c/g"), b"2").unwrap();
    symlink(&fx.outside, base.join("a/b/out")).unwrap();
    symlink(fx.outside.join("shadow"), base.join("a/b/c/shadowlink")).unwrap();
    if is_root() {
        // Root removes even from a read-only directory, as `rm -rf` does.
        std::fs::set_permissions(base.join("a/b"), std::fs::Permissions::from_mode(0o500)).unwrap();
    }
    let before = snapshot(&fx.outside);
    assert!(fx.root.remove(&["tree"]).unwrap());
    assert!(!fx.root_path.join("tree").exists());
    assert_eq!(snapshot(&fx.outside), before);
    assert!(fx
        .root
        .list_dir(&[] as &[&str])
        .unwrap()
        .unwrap()
        .is_empty());
}

#[test]
fn make_symlink_stores_target_verbatim() {
    let fx = fixture();
    for target in [
        &b"../../etc/shadow"[..],
        b"/etc",
        b"no such \xff target",
        b"a//b/./c",
    ] {
        fx.root.make_symlink(&["l"], target).unwrap();
        let got = std::fs::read_link(fx.root_path.join("l")).unwrap();
        assert_eq!(got.as_os_str().as_bytes(), target);
        assert_eq!(fx.root.read_link(&["l"]).unwrap().unwrap(), target);
    }
    assert_eq!(fx.root.stat(&["l"]).unwrap().unwrap().kind, Kind::Symlink);
    // Replaces a regular file atomically too.
    fx.root
        .replace_file(&["f"], b"x", &file_meta(0o600), &hash(b"x"))
        .unwrap();
    fx.root.make_symlink(&["f"], b"target").unwrap();
    assert_eq!(fx.root.read_link(&["f"]).unwrap().unwrap(), b"target");
    assert!(fx.root.make_symlink(&["e"], b"").is_err());
    assert!(fx.root.read_link(&["nothing"]).unwrap().is_none());
    let (uid, gid) = me();
    fx.root
        .make_dir(&["d"], &FileMeta::new(Kind::Dir, 0o755, uid, gid, 0))
        .unwrap();
    assert!(fx.root.make_symlink(&["d"], b"x").is_err());
    assert!(matches!(
        fx.root.read_link(&["d"]).unwrap_err(),
        FsError::WrongKind { .. }
    ));
    assert!(temp_leftovers(&fx.root_path).is_empty());
}

#[test]
fn bad_components_refused() {
    let fx = fixture();
    let m = file_meta(0o600);
    let bad: [&[&str]; 6] = [&[".."], &[""], &["a/b"], &["."], &["ok", ".."], &["a\0b"]];
    for comps in bad {
        let err = fx
            .root
            .replace_file(comps, b"x", &m, &hash(b"x"))
            .unwrap_err();
        assert!(matches!(err, FsError::BadPath { .. }), "{comps:?}: {err}");
        assert!(matches!(
            fx.root.remove(comps).unwrap_err(),
            FsError::BadPath { .. }
        ));
        assert!(matches!(
            fx.root.stat(comps).unwrap_err(),
            FsError::BadPath { .. }
        ));
        assert!(matches!(
            fx.root.read_file(comps, 9).unwrap_err(),
            FsError::BadPath { .. }
        ));
        assert!(matches!(
            fx.root.make_symlink(comps, b"x").unwrap_err(),
            FsError::BadPath { .. }
        ));
    }
    let os: [&OsStr; 2] = [OsStr::new("ok"), OsStr::from_bytes(b"..")];
    assert!(matches!(
        fx.root.stat(&os).unwrap_err(),
        FsError::BadPath { .. }
    ));
    let raw: [&[u8]; 1] = [b"fine"];
    assert!(fx.root.stat(&raw).unwrap().is_none());
    assert!(fx.root.stat(&["a\nforged log line"]).unwrap().is_none());
    let msg = fx
        .root
        .replace_file(&["x\ny", ".."], b"", &m, &hash(b""))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("x\\ny/..") && !msg.contains('\n'), "{msg}");
}

#[test]
fn read_file_limits_and_kinds() {
    let fx = fixture();
    fx.root
        .replace_file(&["big"], &[7u8; 100], &file_meta(0o600), &hash(&[7u8; 100]))
        .unwrap();
    assert!(matches!(
        fx.root.read_file(&["big"], 99).unwrap_err(),
        FsError::TooLarge { .. }
    ));
    assert_eq!(
        fx.root.read_file(&["big"], 100).unwrap().unwrap().0.len(),
        100
    );
    assert!(fx.root.read_file(&["none"], 100).unwrap().is_none());
    assert!(fx
        .root
        .read_file(&["nodir", "none"], 100)
        .unwrap()
        .is_none());
    std::fs::create_dir(fx.root_path.join("d")).unwrap();
    let err = fx.root.read_file(&["d"], 100).unwrap_err();
    assert!(
        matches!(
            err,
            FsError::WrongKind {
                found: "a directory",
                ..
            }
        ),
        "{err}"
    );
    // A FIFO must not hang the reader.
    let fifo = fx.root_path.join("fifo");
    let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    rfs::mknodat(
        rfs::CWD,
        c.as_c_str(),
        FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let err = fx.root.read_file(&["fifo"], 100).unwrap_err();
    assert!(
        matches!(
            err,
            FsError::WrongKind {
                found: "a special file",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(fx.root.stat(&["fifo"]).unwrap().unwrap().kind, Kind::Other);
    assert!(fx.root.remove(&["fifo"]).unwrap());
}

#[test]
fn root_must_be_a_real_directory() {
    let fx = fixture();
    symlink(&fx.outside, fx.base.join("link")).unwrap();
    assert!(matches!(
        Root::open(&fx.base.join("link")).unwrap_err(),
        FsError::WrongKind { .. }
    ));
    assert!(matches!(
        Root::open(&fx.outside.join("x")).unwrap_err(),
        FsError::WrongKind { .. }
    ));
    assert_eq!(
        Root::open(&fx.base.join("none"))
            .unwrap_err()
            .raw_os_error(),
        Some(2)
    );
}

#[test]
fn move_aside_same_filesystem() {
    let fx = fixture();
    let qpath = fx.base.join("quarantine");
    std::fs::create_dir(&qpath).unwrap();
    let q = Root::open(&qpath).unwrap();
    fx.root
        .replace_file(
            &["shadow"],
            b"hand edit",
            &file_meta(0o640),
            &hash(b"hand edit"),
        )
        .unwrap();
    let orig = fx.root.stat(&["shadow"]).unwrap().unwrap();
    assert!(fx
        .root
        .move_aside(&["shadow"], &q, &["tacacs", "1-7", "shadow"])
        .unwrap());
    assert!(fx.root.stat(&["shadow"]).unwrap().is_none());
    let (data, moved) = q
        .read_file(&["tacacs", "1-7", "shadow"], 100)
        .unwrap()
        .unwrap();
    assert_eq!(data, b"hand edit");
    assert_eq!(moved, orig, "same inode, mode, owner and mtime");
    let parent = q.stat(&["tacacs", "1-7"]).unwrap().unwrap();
    assert_eq!(parent.mode, 0o700);
    // Never overwrites an earlier quarantined version.
    fx.root
        .replace_file(&["shadow"], b"again", &file_meta(0o640), &hash(b"again"))
        .unwrap();
    let err = fx
        .root
        .move_aside(&["shadow"], &q, &["tacacs", "1-7", "shadow"])
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(17), "{err}");
    assert_eq!(
        q.read_file(&["tacacs", "1-7", "shadow"], 100)
            .unwrap()
            .unwrap()
            .0,
        b"hand edit"
    );
    assert!(!fx.root.move_aside(&["absent"], &q, &["x"]).unwrap());
}

/// The copy path used across filesystems, exercised directly, and for
/// real when /dev/shm is another filesystem.
#[test]
fn move_aside_by_copy_keeps_content_mode_owner() {
    let fx = fixture();
    let (uid, gid) = me();
    let (fuid, fgid) = if is_root() {
        (65534, 65534)
    } else {
        (uid, gid)
    };
    let dm = FileMeta::new(Kind::Dir, 0o2750, fuid, fgid, 3_000_000_000);
    fx.root
        .make_dir(&["d"], &FileMeta::new(Kind::Dir, 0o755, uid, gid, 0))
        .unwrap();
    fx.root
        .make_dir(&["d", "sub"], &FileMeta::new(Kind::Dir, 0o755, uid, gid, 0))
        .unwrap();
    let fm = FileMeta::new(Kind::File, 0o4710, fuid, fgid, 1_234_567_890_000_000_001);
    fx.root
        .replace_file(&["d", "sub", "f"], b"content", &fm, &hash(b"content"))
        .unwrap();
    fx.root
        .make_symlink(&["d", "link"], b"/etc/passwd")
        .unwrap();
    fx.root.set_meta(&["d"], &dm).unwrap();
    let before = snapshot(&fx.root_path.join("d"));
    let outside_before = snapshot(&fx.outside);

    let qpath = fx.base.join("q");
    std::fs::create_dir(&qpath).unwrap();
    let q = Root::open(&qpath).unwrap();
    {
        let comps = fx.root.check(&["d"], false).unwrap();
        let (sdir, sleaf) = fx.root.open_parent(&comps, None).unwrap().unwrap();
        let st = fx.root.lstat_at(&sdir, sleaf, "d").unwrap().unwrap();
        let (ddir, _) = q.open_parent(&[b"d".as_slice()], None).unwrap().unwrap();
        fx.root
            .copy_entry(&sdir, sleaf, &st, &q, &ddir, b"copy", "d", "copy", 0)
            .unwrap();
    }
    let after = snapshot(&qpath.join("copy"));
    // Inode numbers differ on a copy; everything else must match.
    let strip = |m: BTreeMap<PathBuf, String>| -> BTreeMap<PathBuf, String> {
        m.into_iter()
            .map(|(k, v)| {
                (
                    k,
                    v.split(' ')
                        .filter(|w| !w.starts_with("ino="))
                        .collect::<Vec<_>>()
                        .join(" "),
                )
            })
            .collect()
    };
    assert_eq!(strip(after), strip(before.clone()));
    assert!(temp_leftovers(&qpath).is_empty());
    assert_eq!(snapshot(&fx.outside), outside_before);

    // Across a real filesystem boundary if this machine has one.
    let shm = Path::new("/dev/shm");
    let other_fs = std::fs::metadata(shm)
        .map(|m| m.dev() != std::fs::metadata(&fx.base).unwrap().dev())
        .unwrap_or(false);
    if other_fs {
        let qd = tempfile::tempdir_in(shm).unwrap();
        let q2 = Root::open(qd.path()).unwrap();
        assert!(fx.root.move_aside(&["d"], &q2, &["set", "d"]).unwrap());
        assert!(fx.root.stat(&["d"]).unwrap().is_none());
        assert_eq!(strip(snapshot(&qd.path().join("set/d"))), strip(before));
    } else {
        eprintln!("no second filesystem: real cross-device move not exercised");
    }
}

#[test]
fn list_dir_reports_kinds() {
    let fx = fixture();
    fx.root
        .replace_file(&["f"], b"", &file_meta(0o600), &hash(b""))
        .unwrap();
    fx.root.make_symlink(&["l"], b"f").unwrap();
    let (uid, gid) = me();
    fx.root
        .make_dir(&["d"], &FileMeta::new(Kind::Dir, 0o700, uid, gid, 0))
        .unwrap();
    let got = fx.root.list_dir(&[] as &[&str]).unwrap().unwrap();
    assert_eq!(
        got,
        vec![
            (b"d".to_vec(), Kind::Dir),
            (b"f".to_vec(), Kind::File),
            (b"l".to_vec(), Kind::Symlink)
        ]
    );
    assert!(fx.root.list_dir(&["none"]).unwrap().is_none());
    assert!(matches!(
        fx.root.list_dir(&["l"]).unwrap_err(),
        FsError::WrongKind { .. }
    ));
}

#[test]
fn bad_meta_refused() {
    let fx = fixture();
    let bad = [
        FileMeta {
            kind: Kind::Dir,
            ..file_meta(0o600)
        },
        FileMeta {
            uid: u32::MAX,
            ..file_meta(0o600)
        },
        FileMeta {
            mtime_ns: i128::MAX,
            ..file_meta(0o600)
        },
    ];
    for m in &bad {
        let err = fx
            .root
            .replace_file(&["f"], b"", m, &hash(b""))
            .unwrap_err();
        assert!(matches!(err, FsError::BadMeta { .. }), "{m:?}: {err}");
    }
    assert!(fx.root.stat(&["f"]).unwrap().is_none());
    let m = FileMeta {
        mtime_ns: -1_500_000_000,
        ..file_meta(0o600)
    };
    fx.root.replace_file(&["f"], b"", &m, &hash(b"")).unwrap();
    assert_eq!(
        fx.root.stat(&["f"]).unwrap().unwrap().mtime_ns,
        -1_500_000_000
    );
}
/// A POSIX access ACL as the kernel stores it: user rw, user 1234 r,
/// group r, mask `mask`, other none.
fn acl(mask: u16) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 4, 1234),
        (0x04, 4, u32::MAX),
        (0x10, mask, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        out.extend(tag.to_le_bytes());
        out.extend(perm.to_le_bytes());
        out.extend(id.to_le_bytes());
    }
    out
}

fn xa(pairs: &[(&str, &[u8])]) -> Xattrs {
    pairs
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.to_vec()))
        .collect()
}

/// Whether the test filesystem keeps user xattrs (tmpfs before 6.6
/// does not); the xattr tests say so and pass otherwise.
fn user_xattrs_work(dir: &Path) -> bool {
    let probe = dir.join("probe");
    std::fs::write(&probe, b"").unwrap();
    let ok = rfs::setxattr(&probe, "user.probe", b"1", XattrFlags::empty()).is_ok();
    std::fs::remove_file(&probe).unwrap();
    if !ok {
        eprintln!("skipped: {} keeps no user xattrs", dir.display());
    }
    ok
}

#[test]
fn xattrs_are_set_on_the_temporary_file_and_only_replicated_names_touched() {
    let fx = fixture();
    if !user_xattrs_work(&fx.root_path) {
        return;
    }
    let root = &fx.root;
    let want = xa(&[
        ("system.posix_acl_access", &acl(6)),
        ("user.a", b"1"),
        ("user.empty", b""),
    ]);
    let meta = file_meta(0o660);
    root.replace_file_guarded(
        &["f"],
        b"data",
        &meta,
        &hash(b"data"),
        true,
        Some(&want),
        Expect::Anything,
    )
    .unwrap();
    assert_eq!(root.read_xattrs(&["f"]).unwrap().unwrap(), want);
    let on_disk = std::fs::metadata(fx.root_path.join("f")).unwrap();
    assert_eq!(on_disk.mode() & 0o7777, 0o660);

    // Another namespace (an LSM label, say) is never read nor removed.
    let foreign = is_root()
        && rfs::setxattr(
            fx.root_path.join("f"),
            "trusted.keep",
            b"x",
            XattrFlags::empty(),
        )
        .is_ok();
    // Change one value, drop the ACL and one name.
    let want2 = xa(&[("user.a", b"2")]);
    assert!(root.set_xattrs(&["f"], &meta, &want2).unwrap());
    assert_eq!(root.read_xattrs(&["f"]).unwrap().unwrap(), want2);
    assert!(
        !root.set_xattrs(&["f"], &meta, &want2).unwrap(),
        "idempotent"
    );
    // Removing the ACL left the mode as committed.
    let on_disk = std::fs::metadata(fx.root_path.join("f")).unwrap();
    assert_eq!(on_disk.mode() & 0o7777, 0o660);
    if foreign {
        let mut buf = [0u8; 8];
        let n = rfs::getxattr(fx.root_path.join("f"), "trusted.keep", &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"x");
    }
    // A name outside the replicated ones is refused before any change.
    let err = root
        .set_xattrs(&["f"], &meta, &xa(&[("security.selinux", b"x")]))
        .unwrap_err();
    assert!(err.to_string().contains("security.selinux"), "{err}");
    assert_eq!(root.read_xattrs(&["f"]).unwrap().unwrap(), want2);
    assert!(!root.xattrs_unsupported_notice());
}

#[test]
fn xattrs_of_directories_are_kept_and_symlinks_never_followed() {
    let fx = fixture();
    if !user_xattrs_work(&fx.root_path) {
        return;
    }
    let root = &fx.root;
    let (uid, gid) = me();
    let dmeta = FileMeta::new(Kind::Dir, 0o750, uid, gid, 1_600_000_000_000_000_000);
    root.make_dir(&["d"], &dmeta).unwrap();
    let want = xa(&[("system.posix_acl_default", &acl(4)), ("user.d", b"x")]);
    assert!(root.set_xattrs(&["d"], &dmeta, &want).unwrap());
    assert_eq!(root.read_xattrs(&["d"]).unwrap().unwrap(), want);

    // A link to a file outside: read as none, never written through.
    symlink(fx.outside.join("shadow"), fx.root_path.join("l")).unwrap();
    assert_eq!(root.read_xattrs(&["l"]).unwrap().unwrap(), Xattrs::new());
    let lmeta = FileMeta::new(Kind::Symlink, 0o777, uid, gid, 0);
    assert!(!root.set_xattrs(&["l"], &lmeta, &want).unwrap());
    let err = root
        .set_xattrs(&["l"], &file_meta(0o644), &want)
        .unwrap_err();
    assert!(matches!(err, FsError::WrongKind { .. }), "{err}");
    let mut buf = [0u8; 256];
    let n = rfs::listxattr(fx.outside.join("shadow"), &mut buf[..]).unwrap();
    assert!(!buf[..n].starts_with(b"user."), "written through the link");
    assert_eq!(root.read_xattrs(&["absent"]).unwrap(), None);
}

mod listing_tests {
    use super::*;

    /// Every call shares the root handle, and with it the directory
    /// offset: a second listing must still see everything.
    #[test]
    fn the_root_lists_the_same_every_time() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "x").unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let root = Root::open(dir.path()).unwrap();
        let none: [&[u8]; 0] = [];
        let first = root.list_dir(&none).unwrap().unwrap();
        assert_eq!(first.len(), 2);
        for _ in 0..3 {
            assert_eq!(root.list_dir(&none).unwrap().unwrap(), first);
        }
    }
}

mod guarded_replace_tests {
    use super::*;

    fn new_meta() -> FileMeta {
        let uid = unsafe { libc::geteuid() };
        let gid = unsafe { libc::getegid() };
        FileMeta::new(Kind::File, 0o640, uid, gid, 1_700_000_000_000_000_000)
    }

    fn expect_of(m: &FileMeta) -> Expect {
        Expect::File {
            ino: m.ino,
            dev: m.dev,
            len: m.len,
            mtime_ns: m.mtime_ns,
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(TEMP_PREFIX))
            .collect()
    }

    /// An edit saved between the caller's check and the rename is handed
    /// back, never overwritten unseen; the checked version is replaced.
    #[test]
    fn an_edit_racing_the_rename_is_displaced_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        let new = b"committed version\n";
        let hash = *blake3::hash(new).as_bytes();
        let replace = |name: &str, expect: Expect| {
            root.replace_file_guarded(&[name], new, &new_meta(), &hash, true, None, expect)
                .unwrap()
        };

        std::fs::write(dir.path().join("a"), "old\n").unwrap();
        let checked = root.stat(&["a"]).unwrap().unwrap();
        let r = replace("a", expect_of(&checked));
        assert!(r.displaced.is_none());
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), new);
        assert!(
            leftovers(dir.path()).is_empty(),
            "the checked version is removed"
        );

        // Checked, then edited by hand before the rename.
        let checked = root.stat(&["a"]).unwrap().unwrap();
        std::fs::write(dir.path().join("a"), "edited by hand meanwhile\n").unwrap();
        let r = replace("a", expect_of(&checked));
        let at = r.displaced.expect("the edit is handed back");
        let at: Vec<&[u8]> = at.iter().map(|c| c.as_slice()).collect();
        let (kept, _) = root.read_file(&at, 1 << 20).unwrap().unwrap();
        assert_eq!(kept, b"edited by hand meanwhile\n");
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), new);

        // Nothing was there when checked, but a file appeared.
        std::fs::write(dir.path().join("b"), "created meanwhile\n").unwrap();
        let r = replace("b", Expect::Absent);
        assert!(r.displaced.is_some(), "a file that appeared is handed back");
        // Nothing there, nothing displaced.
        let r = replace("c", Expect::Absent);
        assert!(r.displaced.is_none());
        assert_eq!(std::fs::read(dir.path().join("c")).unwrap(), new);
    }
}

mod held_dirs_tests {
    use super::*;

    fn put(fx: &Fixture, comps: &[&str], data: &[u8]) {
        fx.root
            .replace_file(comps, data, &file_meta(0o644), &hash(data))
            .unwrap();
    }

    fn dir_meta() -> FileMeta {
        let (uid, gid) = me();
        FileMeta::new(Kind::Dir, 0o755, uid, gid, 1_600_000_000_000_000_000)
    }

    /// While a batch holds directories, a walk reuses the handle it kept
    /// (a directory a local user renames meanwhile is written where it now
    /// is, inside the root); one removed meanwhile is walked to again; the
    /// root's own removals and moves forget every handle; and once the
    /// guard is dropped nothing is kept.
    #[test]
    fn a_batch_reuses_its_directories_until_the_tree_changes() {
        let fx = fixture();
        let a = fx.root_path.join("a");
        std::fs::create_dir_all(a.join("b")).unwrap();
        {
            let _held = fx.root.hold_dirs();
            put(&fx, &["a", "b", "one"], b"1");

            // Kept: the renamed directory still receives the batch's files.
            std::fs::rename(a.join("b"), a.join("renamed")).unwrap();
            std::fs::create_dir(a.join("b")).unwrap();
            put(&fx, &["a", "b", "two"], b"2");
            assert!(a.join("renamed/two").exists());
            assert!(!a.join("b/two").exists());

            // Removed by someone else: walked to again.
            std::fs::remove_dir_all(a.join("renamed")).unwrap();
            put(&fx, &["a", "b", "three"], b"3");
            assert!(
                a.join("b/three").exists(),
                "written in the directory that is there now"
            );

            // The root's own removal and move forget what was kept.
            assert!(fx.root.remove(&["a", "b"]).unwrap());
            fx.root.make_dir(&["a", "b"], &dir_meta()).unwrap();
            put(&fx, &["a", "b", "four"], b"4");
            assert_eq!(std::fs::read(a.join("b/four")).unwrap(), b"4");
            assert!(fx
                .root
                .move_aside(&["a", "b"], &fx.root, &["a", "moved"])
                .unwrap());
            std::fs::create_dir(a.join("b")).unwrap();
            put(&fx, &["a", "b", "five"], b"5");
            assert!(a.join("b/five").exists());
            assert!(!a.join("moved/five").exists());
        }
        // Released: a rename after the batch is seen by the next walk.
        std::fs::rename(a.join("b"), a.join("after")).unwrap();
        std::fs::create_dir(a.join("b")).unwrap();
        put(&fx, &["a", "b", "six"], b"6");
        assert!(a.join("b/six").exists());
        assert!(!a.join("after/six").exists());
        assert!(
            snapshot(&fx.outside).len() >= 3,
            "the tree outside is untouched"
        );
        assert_eq!(std::fs::read(fx.outside.join("x")).unwrap(), b"outside x");
    }

    /// Guards nest: handles are kept until the last one is dropped.
    #[test]
    fn directories_are_kept_until_the_last_guard_is_dropped() {
        let fx = fixture();
        let a = fx.root_path.join("a");
        std::fs::create_dir(&a).unwrap();
        let outer = fx.root.hold_dirs();
        {
            let _inner = fx.root.hold_dirs();
            put(&fx, &["a", "one"], b"1");
        }
        std::fs::rename(&a, fx.root_path.join("was")).unwrap();
        std::fs::create_dir(&a).unwrap();
        put(&fx, &["a", "two"], b"2");
        assert!(
            fx.root_path.join("was/two").exists(),
            "still kept by the outer guard"
        );
        drop(outer);
        put(&fx, &["a", "three"], b"3");
        assert!(a.join("three").exists());
    }
}

mod held_dirs_race_tests {
    use super::*;

    /// A walk that began before the root moved a directory aside never keeps
    /// the handle it opened: a writer thread cannot put back a directory
    /// another one just moved to quarantine.
    #[test]
    fn a_walk_overtaken_by_a_move_keeps_nothing() {
        let fx = fixture();
        let a = fx.root_path.join("a");
        std::fs::create_dir_all(a.join("x")).unwrap();
        let _held = fx.root.hold_dirs();
        let (_, generation) = fx.root.held.nearest(&[b"a", b"x"]);
        let stale = Arc::new(rfs::open(&a.join("x"), dir_flags(), Mode::empty()).unwrap());
        assert!(fx
            .root
            .move_aside(&["a", "x"], &fx.root, &["a", "gone"])
            .unwrap());
        fx.root.held.keep(&[b"a", b"x"], &stale, generation);
        std::fs::create_dir(a.join("x")).unwrap();
        fx.root
            .replace_file(&["a", "x", "f"], b"f", &file_meta(0o644), &hash(b"f"))
            .unwrap();
        assert!(a.join("x/f").exists());
        assert!(!a.join("gone/f").exists());
    }
}
