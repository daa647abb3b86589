//! File replication between real `clusterd` processes (issue 3): the leader's
//! sync sets appear on every follower, by content and metadata.
//!
//! Every test starts its own 3-node cluster with the harness's fast Raft
//! timers, a 20 ms watcher debounce and a rescan period (300 s) far beyond
//! any deadline here, so a change the watcher misses fails the test instead
//! of being rescued by a rescan. Files are written on the leader only (the
//! source); followers are written by hand only where a test is about that
//! (excluded files, quarantine). Every wait is `wait_until` with a deadline
//! (through `wait_trees_equal`); every "nothing happens" is `hold_for`.

use std::fs::{self, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use crate::harness::tree::*;
use crate::harness::*;

/// `[replication]` of every node in these tests.
const REPLICATION: &str = "[replication]\ndebounce_ms = 20\nrescan_secs = 300";
/// Deadline for small changes to reach every follower.
const CONVERGE: Duration = Duration::from_secs(30);
/// Deadline for transfers of hundreds of MiB, or catching up after a restart,
/// on a 2-core machine that runs two of these tests at once.
const BIG_CONVERGE: Duration = Duration::from_secs(240);
const MIB: u64 = 1 << 20;

/// A 3-node cluster with `[replication]` as above and the sets `configure`
/// adds; returns it with its leader once a barrier went through and every
/// node reports the sets `names` (so replication runs before files change).
fn cluster_with(
    names: &[&str],
    configure: impl FnOnce(ClusterBuilder) -> ClusterBuilder,
) -> (Cluster, u64) {
    let mut b = Cluster::builder(3);
    for id in 1..=3 {
        b = b.extra_toml(id, REPLICATION);
    }
    let c = configure(b).start();
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);
    wait_sets_ready(&c, &all, names);
    (c, leader)
}

/// `leader` followed by the other nodes: the order `wait_trees_equal`
/// compares in (everyone against the source).
fn leader_first(c: &Cluster, leader: u64) -> Vec<u64> {
    let mut ids = vec![leader];
    ids.extend(c.others(&[leader]));
    ids
}

#[track_caller]
fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

#[track_caller]
fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[track_caller]
fn append(path: &Path, text: &str) {
    let mut f = OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

/// Node `id`'s quarantine (`data_dir/quarantine`, layout not fixed) as a tree.
fn quarantine(c: &Cluster, id: u64) -> Tree {
    snapshot(&c.node(id).data_dir.join("quarantine"))
}

/// Node `id`'s `bytes_proposed` as it reports it itself.
#[track_caller]
fn bytes_proposed(c: &Cluster, id: u64) -> u64 {
    wait_until(
        Duration::from_secs(10),
        &format!("node {id}'s bytes_proposed"),
        || node_counter(c, id, id, "bytes_proposed"),
    )
}

/// Every kind of entry and every operation an administrator or a package
/// manager performs, each phase compared by content and metadata on all nodes.
#[test]
fn every_file_kind_and_operation_replicates() {
    let (c, leader) = cluster_with(&["conf"], |b| b.sync_set("conf", "mirror", ""));
    let ids = leader_first(&c, leader);
    let root = c.set_path(leader, "conf");
    let p = |rel: &str| root.join(rel);

    // 1. Creation: files (empty, text, binary, odd names), nested
    //    directories, setuid/setgid files, setgid and sticky directories,
    //    symlinks (relative, absolute out of the set, dangling), and explicit
    //    mtimes with nanoseconds on a file and on a directory.
    write_file(&p("a.conf"), "alpha = 1\n");
    write_file(&p("empty"), "");
    fs::write(p("binary.bin"), PseudoRandom::bytes(1, 300_000)).unwrap();
    write_file(&p("name with spaces ü.txt"), "unicode\n");
    fs::create_dir_all(p("d1/d2/d3")).unwrap();
    write_file(&p("d1/d2/d3/deep.txt"), "deep\n");
    write_file(&p("d1/d2/mid.txt"), "mid\n");
    write_file(&p("suid"), "#!/bin/sh\necho suid\n");
    chmod(&p("suid"), 0o4755);
    write_file(&p("sgid"), "#!/bin/sh\necho sgid\n");
    chmod(&p("sgid"), 0o2755);
    fs::create_dir(p("shared")).unwrap();
    chmod(&p("shared"), 0o2755);
    fs::create_dir(p("tmp")).unwrap();
    chmod(&p("tmp"), 0o1777);
    write_file(&p("tmp/inside"), "in a sticky dir\n");
    symlink("a.conf", p("link-rel")).unwrap();
    symlink("../a.conf", p("d1/up")).unwrap();
    symlink("mid.txt", p("d1/d2/sibling")).unwrap();
    symlink("/etc", p("etc-link")).unwrap();
    symlink("/etc/passwd", p("passwd-link")).unwrap();
    symlink("no-such-target", p("dangling")).unwrap();
    write_file(&p("old.txt"), "old\n");
    set_mtime(&p("old.txt"), 1_000_000_000, 123_456_789);
    write_file(&p("was-file"), "a file first\n");
    fs::create_dir(p("was-dir")).unwrap();
    write_file(&p("was-dir/x"), "x\n");
    set_mtime(&p("d1/d2/d3"), 1_200_000_000, 987_654_321);
    let t = wait_trees_equal(&c, "conf", &ids, CONVERGE);
    assert_eq!(t["suid"].mode, 0o4755, "{}", t["suid"]);
    assert_eq!(t["shared"].mode, 0o2755, "{}", t["shared"]);
    assert_eq!(t["tmp"].mode, 0o1777, "{}", t["tmp"]);
    assert_eq!(t["old.txt"].mtime_ns, Some(1_000_000_000_123_456_789));
    // Links travel as links: a follower never copies what they point at.
    for &f in &ids[1..] {
        let froot = c.set_path(f, "conf");
        for (link, target) in [
            ("etc-link", "/etc"),
            ("passwd-link", "/etc/passwd"),
            ("d1/up", "../a.conf"),
        ] {
            let meta = fs::symlink_metadata(froot.join(link)).unwrap();
            assert!(
                meta.file_type().is_symlink(),
                "node {f}: {link} must be a symlink: {meta:?}"
            );
            assert_eq!(
                fs::read_link(froot.join(link)).unwrap(),
                Path::new(target),
                "node {f}: {link}"
            );
        }
    }

    // 2. Changes: in-place overwrite (same inode), append, an editor's save
    //    (new file, then rename over the old), chmod of a file and a
    //    directory, an mtime on an otherwise unchanged file, owners (as root
    //    only), and an entry changing kind at the same path.
    let bin = OpenOptions::new()
        .write(true)
        .open(p("binary.bin"))
        .unwrap();
    bin.write_all_at(b"EDITED IN PLACE", 150_000).unwrap();
    drop(bin);
    append(&p("a.conf"), "beta = 2\n");
    // Inside a directory with a set mtime: the leader's directory keeps it,
    // so a follower replacing the file must not leave its own mtime there.
    append(&p("d1/d2/d3/deep.txt"), "deeper\n");
    write_file(&p("a.conf.new"), "alpha = 1\nbeta = 2\ngamma = 3\n");
    fs::rename(p("a.conf.new"), p("a.conf")).unwrap();
    chmod(&p("a.conf"), 0o600);
    chmod(&p("d1"), 0o750);
    set_mtime(&p("empty"), 1_500_000_000, 1);
    if is_root() {
        std::os::unix::fs::chown(p("a.conf"), Some(1), Some(1)).unwrap();
        std::os::unix::fs::chown(p("d1/d2"), Some(1), Some(1)).unwrap();
        std::os::unix::fs::chown(p("sgid"), None, Some(1)).unwrap();
        // chown clears setgid on a file: set it again, as an admin would.
        chmod(&p("sgid"), 0o2755);
    }
    fs::remove_file(p("was-file")).unwrap();
    fs::create_dir(p("was-file")).unwrap();
    write_file(&p("was-file/now-inside"), "a directory now\n");
    fs::remove_dir_all(p("was-dir")).unwrap();
    symlink("a.conf", p("was-dir")).unwrap();
    let t = wait_trees_equal(&c, "conf", &ids, CONVERGE);
    assert_eq!(t["a.conf"].mode, 0o600, "{}", t["a.conf"]);
    assert_eq!(
        t["d1/d2/d3"].mtime_ns,
        Some(1_200_000_000_987_654_321),
        "{}",
        t["d1/d2/d3"]
    );
    assert_eq!(t["was-file"].kind, Kind::Dir);
    assert_eq!(t["was-dir"].kind, Kind::Symlink);
    if is_root() {
        assert_eq!(
            (t["a.conf"].uid, t["a.conf"].gid),
            (1, 1),
            "{}",
            t["a.conf"]
        );
        assert_eq!((t["d1/d2"].uid, t["d1/d2"].gid), (1, 1), "{}", t["d1/d2"]);
    }
    for &f in &ids[1..] {
        assert_eq!(
            read(&c.set_path(f, "conf").join("a.conf")),
            "alpha = 1\nbeta = 2\ngamma = 3\n",
            "node {f}"
        );
    }

    // 3. Renames: a directory with content (files, a subdirectory, a
    //    symlink), a file into it keeping its mtime, and a tree built
    //    outside the set and moved in whole (unpacked elsewhere, then `mv`).
    fs::rename(p("d1/d2"), p("moved")).unwrap();
    fs::rename(p("old.txt"), p("moved/old-renamed.txt")).unwrap();
    let outside = c.node(leader).dir.join("outside");
    fs::create_dir_all(outside.join("sub")).unwrap();
    write_file(&outside.join("top.txt"), "built outside\n");
    write_file(&outside.join("sub/inner.txt"), "built outside, nested\n");
    fs::rename(&outside, p("moved-in")).unwrap();
    let t = wait_trees_equal(&c, "conf", &ids, CONVERGE);
    assert!(
        t.contains_key("moved/d3/deep.txt") && !t.contains_key("d1/d2"),
        "{t:?}"
    );
    assert!(t.contains_key("moved-in/sub/inner.txt"), "{t:?}");
    assert_eq!(
        t["moved/old-renamed.txt"].mtime_ns,
        Some(1_000_000_000_123_456_789)
    );

    // 4. Deletions: a file, a symlink, and a whole tree (rm -rf).
    fs::remove_file(p("a.conf")).unwrap();
    fs::remove_file(p("link-rel")).unwrap();
    fs::remove_dir_all(p("moved")).unwrap();
    let t = wait_trees_equal(&c, "conf", &ids, CONVERGE);
    assert!(
        !t.keys()
            .any(|k| k == "a.conf" || k == "link-rel" || k == "moved" || k.starts_with("moved/")),
        "{t:?}"
    );
}

/// A set whose path is one file, like `/etc/aliases`: the file replicates
/// (editor saves included), its siblings never do, and deleting it deletes it.
#[test]
fn single_file_set_replicates_like_etc_aliases() {
    let (c, leader) = cluster_with(&["aliases"], |b| {
        b.sync_file("aliases", "aliases", "mirror", "")
    });
    let ids = leader_first(&c, leader);
    let file = c.set_path(leader, "aliases");
    let sibling = |path: &Path, name: &str| path.with_file_name(name);

    write_file(&file, "postmaster: root\n");
    write_file(&sibling(&file, "aliases.db"), "not part of the set\n");
    let t = wait_trees_equal(&c, "aliases", &ids, CONVERGE);
    assert_eq!(t.len(), 1, "{t:?}");

    // An editor's save (temp file next to it, renamed over it), then mode,
    // mtime and (as root) group.
    write_file(
        &sibling(&file, "aliases.tmp"),
        "postmaster: root\nabuse: root\n",
    );
    fs::rename(sibling(&file, "aliases.tmp"), &file).unwrap();
    chmod(&file, 0o640);
    if is_root() {
        std::os::unix::fs::chown(&file, Some(0), Some(1)).unwrap();
    }
    set_mtime(&file, 1_600_000_000, 5);
    let t = wait_trees_equal(&c, "aliases", &ids, CONVERGE);
    assert_eq!(t[SINGLE_FILE].mode, 0o640);
    for &f in &ids[1..] {
        let ffile = c.set_path(f, "aliases");
        assert_eq!(read(&ffile), "postmaster: root\nabuse: root\n", "node {f}");
        for name in ["aliases.db", "aliases.tmp"] {
            assert!(
                !sibling(&ffile, name).exists(),
                "node {f}: {name} is outside the set and must not be replicated"
            );
        }
    }

    fs::remove_file(&file).unwrap();
    let t = wait_trees_equal(&c, "aliases", &ids, CONVERGE);
    assert!(t.is_empty(), "{t:?}");
}

/// `exclude`: excluded paths on the leader never travel, and an excluded
/// file on a follower survives a mirror delete of the directory around it.
/// `skip_while`: while a lock file exists in the set nothing of it is
/// replicated; once it is gone the held-back edit arrives.
#[test]
fn exclude_and_skip_while() {
    let (c, leader) = cluster_with(&["tacacs"], |b| {
        b.sync_set(
            "tacacs",
            "mirror",
            "exclude = [\"*.lock\", \"secret/\", \"connection.cfg\"]\nskip_while = [\"*.lock\"]",
        )
    });
    let ids = leader_first(&c, leader);
    let followers = c.others(&[leader]);
    let root = c.set_path(leader, "tacacs");
    let excluded = |p: &str| {
        let name = p.rsplit('/').next().unwrap_or(p);
        name.ends_with(".lock")
            || name == "connection.cfg"
            || p == "secret"
            || p.starts_with("secret/")
    };

    // Excluded paths on the leader.
    write_file(&root.join("tac_plus.conf"), "key = v1\n");
    write_file(
        &root.join("connection.cfg"),
        "the leader's database password\n",
    );
    fs::create_dir(root.join("secret")).unwrap();
    write_file(&root.join("secret/key"), "s3cret\n");
    fs::create_dir(root.join("keep")).unwrap();
    write_file(&root.join("keep/users"), "u1\n");
    let t = wait_trees_equal_except(&c, "tacacs", &ids, CONVERGE, &excluded);
    assert!(t.contains_key("keep/users"), "{t:?}");
    for &f in &followers {
        let froot = c.set_path(f, "tacacs");
        for name in ["connection.cfg", "secret"] {
            assert!(
                fs::symlink_metadata(froot.join(name)).is_err(),
                "node {f}: excluded {name} was replicated"
            );
        }
    }

    // An excluded file a follower keeps for itself, in a directory the
    // leader then deletes: the directory's other files go, that file stays.
    for &f in &followers {
        write_file(
            &c.set_path(f, "tacacs").join("keep/connection.cfg"),
            &format!("node {f}'s own\n"),
        );
    }
    fs::remove_dir_all(root.join("keep")).unwrap();
    wait_trees_equal_except(&c, "tacacs", &ids, CONVERGE, &|p| {
        excluded(p) || p == "keep"
    });
    for &f in &followers {
        let keep = c.set_path(f, "tacacs").join("keep");
        assert_eq!(
            read(&keep.join("connection.cfg")),
            format!("node {f}'s own\n"),
            "node {f}"
        );
        assert!(
            !keep.join("users").exists(),
            "node {f}: keep/users must be deleted"
        );
    }

    // skip_while: an edit made while x.lock exists stays on the leader.
    write_file(&root.join("x.lock"), "an editor holds the set\n");
    write_file(&root.join("tac_plus.conf"), "key = v2\n");
    c.wait_barrier(leader);
    hold_for(
        Duration::from_secs(1),
        "followers keeping v1 while x.lock exists on the leader",
        || {
            for &f in &followers {
                let now = read(&c.set_path(f, "tacacs").join("tac_plus.conf"));
                if now != "key = v1\n" {
                    return Err(format!("node {f} has {now:?}"));
                }
            }
            Ok(())
        },
    );
    fs::remove_file(root.join("x.lock")).unwrap();
    wait_trees_equal_except(&c, "tacacs", &ids, CONVERGE, &|p| {
        excluded(p) || p == "keep"
    });
    for &f in &followers {
        assert_eq!(
            read(&c.set_path(f, "tacacs").join("tac_plus.conf")),
            "key = v2\n",
            "node {f}"
        );
    }
}

/// `mode = "append"`: a growing log stays identical, only the new bytes
/// are proposed, and both rotations (rename + new file, copy + truncate)
/// are followed.
#[test]
fn append_mode_follows_growing_and_rotated_logs() {
    let (c, leader) = cluster_with(&["logs"], |b| b.sync_set("logs", "append", ""));
    let ids = leader_first(&c, leader);
    let root = c.set_path(leader, "logs");
    let log = root.join("app.log");

    write_file(&log, "");
    for batch in 0..20 {
        let lines: String = (0..10)
            .map(|i| format!("batch {batch} line {i}: something happened\n"))
            .collect();
        append(&log, &lines);
        if batch % 5 == 4 {
            wait_trees_equal(&c, "logs", &ids, CONVERGE);
        }
    }

    // Appending 4 KiB to an 8 MiB log proposes the tail, not the file.
    append_pseudo_random(&root.join("big.log"), 7, 8 * MIB);
    wait_trees_equal(&c, "logs", &ids, BIG_CONVERGE);
    let before = bytes_proposed(&c, leader);
    append(&root.join("big.log"), &"tail line\n".repeat(410));
    wait_trees_equal(&c, "logs", &ids, CONVERGE);
    let grew = bytes_proposed(&c, leader) - before;
    assert!(
        grew < 256 * 1024,
        "appending 4 KiB to an 8 MiB log proposed {grew} bytes"
    );

    // Rotation by rename: the old log moves aside, a new one starts.
    fs::rename(&log, root.join("app.log.1")).unwrap();
    write_file(&log, "first line after rotation\n");
    append(&log, "second line after rotation\n");
    wait_trees_equal(&c, "logs", &ids, CONVERGE);

    // Rotation by copy + truncate (logrotate's copytruncate): same inode,
    // shorter than before, then growing again.
    fs::copy(&log, root.join("app.log.2")).unwrap();
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&log)
        .unwrap();
    append(&log, "after truncation\n");
    let t = wait_trees_equal(&c, "logs", &ids, CONVERGE);
    assert_eq!(t["app.log"].size, "after truncation\n".len() as u64);
    for &f in &ids[1..] {
        assert_eq!(
            read(&c.set_path(f, "logs").join("app.log")),
            "after truncation\n",
            "node {f}"
        );
    }
}

/// A one-byte change in a 100 MiB file reaches every follower as a delta:
/// the leader proposes far less than the file.
#[test]
fn one_byte_change_in_a_100_mib_file_travels_as_a_delta() {
    let (c, leader) = cluster_with(&["big"], |b| b.sync_set("big", "mirror", ""));
    let ids = leader_first(&c, leader);
    let file = c.set_path(leader, "big").join("big.bin");

    append_pseudo_random(&file, 100, 100 * MIB);
    wait_trees_equal(&c, "big", &ids, BIG_CONVERGE);
    let proposed0 = bytes_proposed(&c, leader);
    assert!(
        proposed0 >= 50 * MIB,
        "100 MiB of incompressible data were replicated, yet bytes_proposed is {proposed0}"
    );
    // It was staged beside the log: a follower refusing it (which sends
    // it through the log instead) would say so.
    for &id in &ids[1..] {
        assert!(
            !c.log(id).contains("did not stage content"),
            "node {id} refused the 100 MiB file's staged content: {}",
            c.log_tail(id, 40)
        );
    }
    let saved0 = wait_until(Duration::from_secs(10), "the leader's bytes_saved", || {
        node_counter(&c, leader, leader, "bytes_saved")
    });

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    let offset = 50 * MIB + 7;
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0xff;
    f.write_all_at(&byte, offset).unwrap();
    drop(f);
    wait_trees_equal(&c, "big", &ids, BIG_CONVERGE);

    let grew = bytes_proposed(&c, leader) - proposed0;
    assert!(
        grew < MIB,
        "a one-byte change in 100 MiB proposed {grew} bytes (must be < 1 MiB)"
    );
    let saved1 = wait_until(Duration::from_secs(10), "the leader's bytes_saved", || {
        node_counter(&c, leader, leader, "bytes_saved")
    });
    assert!(
        saved1 > saved0,
        "bytes_saved must grow with a delta ({saved0} -> {saved1})"
    );
}

/// A follower SIGKILLed while a 200 MiB file is on its way restarts and
/// ends identical, without setting anything aside as a conflict (it only
/// ever held what the cluster committed).
#[test]
fn follower_killed_during_a_large_transfer_ends_identical() {
    let (c, leader) = cluster_with(&["big"], |b| b.sync_set("big", "mirror", ""));
    let ids = leader_first(&c, leader);
    let victim = ids[1];
    let applied0 = c.view_now(victim).applied_index.unwrap_or(0);
    let file = c.set_path(leader, "big").join("large.bin");

    append_pseudo_random(&file, 200, 200 * MIB);
    // Kill it once the transfer has reached it: its applied index moved.
    // The test is about a follower: a leader that lost its leadership while
    // reading the file (heartbeats starved) fails it here, by name.
    wait_until(
        Duration::from_secs(60),
        &format!("node {victim} to start applying the transfer"),
        || {
            let v = c.view(victim)?;
            if v.leader.is_some_and(|l| l != leader) {
                panic!("leadership moved from node {leader} during the transfer: {v}");
            }
            match v.applied_index {
                Some(a) if a > applied0 => Ok(()),
                _ => Err(v.to_string()),
            }
        },
    );
    c.kill(victim);
    let had = fs::metadata(c.set_path(victim, "big").join("large.bin"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "node {victim} killed holding {had} of {} bytes of large.bin",
        200 * MIB
    );

    c.wait_barrier(leader);
    c.start_node(victim);
    c.wait_for_leader_is(&ids, leader);
    wait_trees_equal(&c, "big", &ids, BIG_CONVERGE);
    let q = quarantine(&c, victim);
    assert!(
        q.is_empty(),
        "node {victim} quarantined files it only ever got from the cluster: {q:?}"
    );
}

/// Files of 32 KiB and more travel beside the Raft log: the leader stages
/// a batch's content on the followers and proposes the batch once enough
/// of them hold it. Killed right after such batches committed, the leader
/// leaves nothing unrecoverable: both survivors end with every file, byte
/// for byte, as the dead leader's disk has it.
#[test]
fn staged_content_survives_the_leader_dying_right_after_the_commit() {
    let (c, leader) = cluster_with(&["bulk"], |b| b.sync_set("bulk", "mirror", ""));
    let ids = leader_first(&c, leader);
    let survivors = [ids[1], ids[2]];
    let root = c.set_path(leader, "bulk");
    for i in 0..40u64 {
        append_pseudo_random(&root.join(format!("f{i:02}")), 300 + i, 64 * 1024 + i * 999);
    }
    // Kill the leader as soon as one follower has the last file.
    let last = c.set_path(survivors[0], "bulk").join("f39");
    wait_until(
        CONVERGE,
        "a follower to apply the last file",
        || match fs::metadata(&last) {
            Ok(m) if m.len() == 64 * 1024 + 39 * 999 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    c.kill(leader);
    let before = snapshot(&root);
    let new_leader = c.wait_for_leader(&survivors);
    c.wait_barrier(new_leader);
    let t = wait_trees_equal(
        &c,
        "bulk",
        &leader_then(new_leader, &survivors),
        BIG_CONVERGE,
    );
    assert_eq!(
        diff(&before, &t),
        Vec::<String>::new(),
        "the survivors' trees differ from the dead leader's"
    );
    // The content took the staged path: the survivor that had every file
    // linked them into place from finished files, written once.
    let linked = node_counter(&c, survivors[0], survivors[0], "files_linked").unwrap();
    assert!(
        linked > 0,
        "node {} linked no file from staging",
        survivors[0]
    );
}

/// When a follower cannot stage content (here, each one's staging
/// directory is a file), the batch's content goes through the Raft log
/// instead, and whatever a follower cannot keep even from there (patches
/// over 256 KiB, staged from chunks) it fetches: the trees still end
/// identical.
#[test]
fn content_that_cannot_be_staged_still_arrives() {
    let (c, leader) = cluster_with(&["bulk"], |b| b.sync_set("bulk", "mirror", ""));
    let ids = leader_first(&c, leader);
    for &f in &ids[1..] {
        let staging = c.node(f).data_dir.join("staging");
        fs::remove_dir_all(&staging).unwrap();
        fs::write(&staging, "not a directory").unwrap();
    }
    let root = c.set_path(leader, "bulk");
    for i in 0..10u64 {
        append_pseudo_random(&root.join(format!("f{i}")), 500 + i, 100 * 1024);
    }
    append_pseudo_random(&root.join("large"), 510, 600 * 1024);
    wait_trees_equal(&c, "bulk", &ids, CONVERGE);
    let log = fs::read_to_string(&c.node(leader).log_path).unwrap_or_default();
    assert!(
        log.contains("could stage a batch's content"),
        "the leader never fell back to the log; its log:\n{log}"
    );
}

/// A follower down while 1,000 changes (creations, edits, deletions of
/// small files) happen catches up to the identical tree when it returns,
/// and every node's status shows the set caught up.
#[test]
fn follower_down_during_1000_changes_catches_up() {
    let (c, leader) = cluster_with(&["many"], |b| b.sync_set("many", "mirror", ""));
    let ids = leader_first(&c, leader);
    let (victim, other) = (ids[1], ids[2]);
    let root = c.set_path(leader, "many");
    let path = |i: usize| root.join(format!("d{}/f{i:04}.txt", i / 100));

    c.kill(victim);
    for d in 0..6 {
        fs::create_dir(root.join(format!("d{d}"))).unwrap();
    }
    for i in 0..600 {
        write_file(&path(i), &format!("file {i} version 1\n"));
    }
    for i in (0..600).step_by(2) {
        write_file(&path(i), &format!("file {i} version 2, a little longer\n"));
    }
    for i in (1..600).step_by(6) {
        fs::remove_file(path(i)).unwrap();
    }
    c.wait_barrier(leader);
    wait_trees_equal(&c, "many", &[leader, other], BIG_CONVERGE);

    c.start_node(victim);
    let t = wait_trees_equal(&c, "many", &ids, BIG_CONVERGE);
    assert_eq!(
        t.keys().filter(|k| k.ends_with(".txt")).count(),
        500,
        "600 created, 100 deleted"
    );

    wait_until(
        CONVERGE,
        "every node's status to show set \"many\" caught up, with the leader's file count",
        || {
            let lead = set_status(&c, leader, leader, "many")?;
            for &id in &ids {
                let s = set_status(&c, leader, id, "many")?;
                let no_error = matches!(s.get("last_error"), None | Some(serde_json::Value::Null))
                    || s["last_error"] == "";
                if s["lag_entries"] != 0
                    || s["missing"] != 0
                    || s["files"] != lead["files"]
                    || !no_error
                {
                    return Err(format!("node {id}: {s} (leader: {lead})"));
                }
            }
            Ok(())
        },
    );
}

/// A node that was never started joins a cluster that already holds
/// content beyond a compacted log (`raft.compact_after` = 10, so the leader
/// must send a snapshot: the manifest, then the files fetched) and ends
/// identical.
#[test]
fn a_new_empty_node_joins_and_gets_everything() {
    let mut b = Cluster::builder(3)
        .env("CLUSTERD_RAFT__COMPACT_AFTER", "10")
        .dont_start(3);
    for id in 1..=3 {
        b = b.extra_toml(id, REPLICATION);
    }
    let c = b.sync_set("conf", "mirror", "").start();
    let leader = c.wait_for_leader(&[1, 2]);
    c.wait_barrier(leader);
    wait_sets_ready(&c, &[1, 2], &["conf"]);
    let other = if leader == 1 { 2 } else { 1 };
    let root = c.set_path(leader, "conf");

    for d in 0..3 {
        fs::create_dir(root.join(format!("d{d}"))).unwrap();
        for i in 0..100 {
            write_file(&root.join(format!("d{d}/f{i}")), &format!("{d}/{i} v1\n"));
        }
        // Separate batches, so the changes take many entries.
        wait_trees_equal(&c, "conf", &[leader, other], CONVERGE);
    }
    for i in 0..100 {
        write_file(&root.join(format!("d1/f{i}")), &format!("1/{i} v2\n"));
    }
    fs::remove_dir_all(root.join("d2")).unwrap();
    wait_trees_equal(&c, "conf", &[leader, other], CONVERGE);
    // Enough entries after the changes that the log is compacted past them.
    for _ in 0..25 {
        c.wait_barrier(leader);
    }
    let first_index =
        entry(&c.view_now(leader).raw, leader).and_then(|n| n["first_index"].as_u64());
    assert!(
        first_index.unwrap_or(0) > 10,
        "the leader's log was not compacted (first index {first_index:?})"
    );

    c.start_node(3);
    let t = wait_trees_equal(&c, "conf", &[leader, other, 3], BIG_CONVERGE);
    assert_eq!(t.len(), 2 + 200, "d0, d1 and their 200 files: {t:?}");
}

/// `on_change` runs on each follower after it applied a batch of the set
/// (the command sees the new content), never on the leader.
#[test]
fn on_change_runs_on_followers_after_applying() {
    let hook = "on_change = \"cat {node_dir}/sets/hooked/app.conf >> {node_dir}/on_change.out\"";
    let (c, leader) = cluster_with(&["hooked"], |b| b.sync_set("hooked", "mirror", hook));
    let ids = leader_first(&c, leader);
    let out = |id: u64| c.node(id).dir.join("on_change.out");
    let conf = c.set_path(leader, "hooked").join("app.conf");

    for version in ["v1", "v2"] {
        write_file(&conf, &format!("setting = {version}\n"));
        wait_trees_equal(&c, "hooked", &ids, CONVERGE);
        for &f in &ids[1..] {
            wait_until(
                CONVERGE,
                &format!("node {f}'s on_change to see {version}"),
                || {
                    let text = fs::read_to_string(out(f)).map_err(|e| e.to_string())?;
                    if text.contains(&format!("setting = {version}")) {
                        Ok(())
                    } else {
                        Err(text)
                    }
                },
            );
        }
    }
    hold_for(
        Duration::from_secs(1),
        "the leader never running on_change",
        || {
            if out(leader).exists() {
                Err(read(&out(leader)))
            } else {
                Ok(())
            }
        },
    );
}

/// A follower's periodic reconcile that finds its tree in place runs no
/// `on_change` (a service reload every period would be churn); one that
/// puts a hand edit right does.
#[test]
fn on_change_runs_after_a_reconcile_only_when_it_changed_something() {
    let hook = "on_change = \"cat {node_dir}/sets/hooked/app.conf >> {node_dir}/on_change.out\"";
    let (c, leader) = cluster_with(&["hooked"], |b| {
        b.sync_set("hooked", "mirror", hook)
            .env("CLUSTERD_REPLICATION__RESCAN_SECS", "1")
    });
    let ids = leader_first(&c, leader);
    let f = ids[1];
    let out = || fs::read_to_string(c.node(f).dir.join("on_change.out")).unwrap_or_default();
    write_file(&c.set_path(leader, "hooked").join("app.conf"), "v1\n");
    wait_trees_equal(&c, "hooked", &ids, CONVERGE);
    wait_until(CONVERGE, &format!("node {f}'s on_change to see v1"), || {
        let text = out();
        if text.contains("v1") {
            Ok(())
        } else {
            Err(text)
        }
    });
    let before = out().lines().count();
    hold_for(
        Duration::from_secs(4),
        "no on_change while every reconcile (one a second) finds the tree in place",
        || match out().lines().count() {
            n if n == before => Ok(()),
            n => Err(format!("on_change ran {} more times", n - before)),
        },
    );
    write_file(
        &c.set_path(f, "hooked").join("app.conf"),
        "edited by hand\n",
    );
    wait_trees_equal(&c, "hooked", &ids, CONVERGE);
    wait_until(
        CONVERGE,
        &format!("node {f}'s on_change after its reconcile restored app.conf"),
        || match out().lines().count() {
            n if n > before => Ok(()),
            _ => Err(out()),
        },
    );
}

/// A file edited by hand on a follower is moved into that follower's
/// `data_dir/quarantine` before the leader's next version replaces it
/// (invariant 4); the other follower sets nothing aside.
#[test]
fn a_hand_edit_on_a_follower_is_quarantined_before_replacement() {
    let (c, leader) = cluster_with(&["conf"], |b| b.sync_set("conf", "mirror", ""));
    let ids = leader_first(&c, leader);
    let (edited, untouched) = (ids[1], ids[2]);
    let users = c.set_path(leader, "conf").join("users");
    let hand = "edited by hand on a follower\n";

    write_file(&users, "alice\n");
    wait_trees_equal(&c, "conf", &ids, CONVERGE);
    write_file(&c.set_path(edited, "conf").join("users"), hand);

    write_file(&users, "alice\nbob\n");
    wait_trees_equal(&c, "conf", &ids, CONVERGE);
    let hand_hash = blake3::hash(hand.as_bytes()).to_hex().to_string();
    wait_until(
        CONVERGE,
        &format!("node {edited}'s quarantine to hold the hand edit"),
        || {
            let q = quarantine(&c, edited);
            if q.values()
                .any(|i| i.kind == Kind::File && i.content.as_deref() == Some(hand_hash.as_str()))
            {
                Ok(())
            } else {
                Err(format!("quarantine of node {edited}: {q:?}"))
            }
        },
    );
    let q = quarantine(&c, untouched);
    assert!(
        q.is_empty(),
        "node {untouched} had no conflict, yet quarantined {q:?}"
    );

    // `clusterctl conflicts` lists the record: set, path, node, term, time.
    let out = c.ctl(edited, &["conflicts", "--json"], STATUS_TIMEOUT);
    assert!(out.success(), "{out:?}");
    let records: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(
        (r["set"].as_str(), r["path"].as_str(), r["node"].as_u64()),
        (Some("conf"), Some("users"), Some(edited)),
        "{r}"
    );
    assert!(
        r["term"].as_u64().unwrap_or(0) >= 1 && r["time_unix_ms"].as_u64().unwrap_or(0) > 0,
        "{r}"
    );
    assert_eq!(r["local_hash"].as_str(), Some(hand_hash.as_str()), "{r}");
    let table = c.ctl(edited, &["conflicts"], STATUS_TIMEOUT);
    assert!(
        table.success() && table.stdout.contains("users") && table.stdout.contains("1 conflict(s)"),
        "{table:?}"
    );
    let none = c.ctl(untouched, &["conflicts", "--json"], STATUS_TIMEOUT);
    assert_eq!(none.stdout.trim(), "[]", "{none:?}");
    // And status counts it, and the monitoring check warns about it.
    let counted = node_counter(&c, edited, edited, "quarantined").unwrap();
    assert_eq!(counted, 1);
    let check = c.ctl(leader, &["check"], STATUS_TIMEOUT);
    assert!(
        check.code == Some(1)
            && check
                .stdout
                .contains(&format!("quarantine not empty (node {edited}: 1;")),
        "{check:?}"
    );
}

/// A follower that starts with files of its own in a published mirror set
/// (left from before it joined, or edited while it was stopped) sets them
/// aside in quarantine once it has caught up, and ends identical to the
/// leader, without the leader ever touching those paths.
#[test]
fn a_follower_starting_with_stray_files_sets_them_aside_and_converges() {
    let mut b = Cluster::builder(3).dont_start(3);
    for id in 1..=3 {
        b = b.extra_toml(id, REPLICATION);
    }
    let c = b.sync_set("conf", "mirror", "").start();
    let leader = c.wait_for_leader(&[1, 2]);
    c.wait_barrier(leader);
    wait_sets_ready(&c, &[1, 2], &["conf"]);
    let other = if leader == 1 { 2 } else { 1 };
    write_file(
        &c.set_path(leader, "conf").join("real.conf"),
        "from the leader\n",
    );
    wait_trees_equal(&c, "conf", &[leader, other], CONVERGE);

    let stray_root = c.set_path(3, "conf");
    fs::create_dir_all(&stray_root).unwrap();
    write_file(&stray_root.join("stray.conf"), "only on node 3\n");
    write_file(&stray_root.join("real.conf"), "an old local copy\n");
    c.start_node(3);
    let t = wait_trees_equal(&c, "conf", &[leader, other, 3], CONVERGE);
    assert_eq!(t.keys().collect::<Vec<_>>(), vec!["real.conf"], "{t:?}");
    let q = quarantine(&c, 3);
    for content in ["only on node 3\n", "an old local copy\n"] {
        let hash = blake3::hash(content.as_bytes()).to_hex().to_string();
        assert!(
            q.values()
                .any(|i| i.content.as_deref() == Some(hash.as_str())),
            "node 3's quarantine lacks {content:?}: {q:?}"
        );
    }
}

/// A set with `xattrs = true` keeps the `user.*` extended attributes and
/// POSIX ACLs (access and default) of files and directories: new, changed,
/// removed, changed alone (a metadata-only change, applied in place) and
/// dropped by an editor's save; a set without the option never carries
/// them. ACLs are written as the raw `system.posix_acl_*` bytes `setfacl`
/// would write, so the test needs no acl package.
#[test]
fn xattrs_and_acls_replicate_only_in_sets_that_ask() {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;

    use rustix::fs::{lgetxattr, llistxattr, lremovexattr, lsetxattr, XattrFlags};

    type Attrs = BTreeMap<String, Vec<u8>>;

    /// A POSIX ACL as the kernel stores it: owner rw, user 1234 `named`,
    /// owning group r, mask `mask`, others none.
    fn acl(named: u16, mask: u16) -> Vec<u8> {
        let mut out = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (0x01u16, 6u16, u32::MAX),
            (0x02, named, 1234),
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

    #[track_caller]
    fn set_attr(path: &Path, name: &str, value: &[u8]) {
        lsetxattr(path, name, value, XattrFlags::empty())
            .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", path.display()));
    }

    /// The replicated attributes (user.* and the ACLs) of one entry, never
    /// following a symlink.
    fn attrs(path: &Path) -> Result<Attrs, String> {
        let mut names = vec![0u8; 65536];
        let n = llistxattr(path, &mut names[..]).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut out = Attrs::new();
        let mut value = vec![0u8; 65536];
        for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let name = String::from_utf8_lossy(name).into_owned();
            if !(name.starts_with("user.") || name.starts_with("system.posix_acl_")) {
                continue;
            }
            let len = lgetxattr(path, name.as_str(), &mut value[..])
                .map_err(|e| format!("{}: {name}: {e}", path.display()))?;
            out.insert(name, value[..len].to_vec());
        }
        Ok(out)
    }

    /// Relative path → attributes of every file and directory of a tree.
    fn tree_attrs(root: &Path) -> Result<BTreeMap<String, Attrs>, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let list = fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for ent in list {
                let ent = ent.map_err(|e| e.to_string())?;
                let kind = ent.file_type().map_err(|e| e.to_string())?;
                if kind.is_symlink() {
                    continue;
                }
                let rel = ent.path().strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, attrs(&ent.path())?);
                if kind.is_dir() {
                    stack.push(ent.path());
                }
            }
        }
        Ok(out)
    }

    #[track_caller]
    fn wait_attrs_equal(c: &Cluster, set: &str, ids: &[u64]) -> BTreeMap<String, Attrs> {
        let want = tree_attrs(&c.set_path(ids[0], set)).unwrap();
        for &id in &ids[1..] {
            wait_until(
                CONVERGE,
                &format!(
                    "node {id}'s extended attributes in set {set:?} equal to node {}'s",
                    ids[0]
                ),
                || {
                    let have = tree_attrs(&c.set_path(id, set))?;
                    if have == want {
                        Ok(())
                    } else {
                        Err(format!("want {want:?}\n  have {have:?}"))
                    }
                },
            );
        }
        want
    }

    let (c, leader) = cluster_with(&["acl", "plain"], |b| {
        b.sync_set("acl", "mirror", "xattrs = true")
            .sync_set("plain", "mirror", "")
    });
    let ids = leader_first(&c, leader);
    let root = c.set_path(leader, "acl");
    let p = |rel: &str| root.join(rel);

    // The test filesystem must keep user xattrs and ACLs at all.
    write_file(&p("probe"), "");
    if let Err(e) = lsetxattr(p("probe"), "user.probe", b"1", XattrFlags::empty()) {
        eprintln!("skipped: {} keeps no user xattrs ({e})", root.display());
        return;
    }
    fs::remove_file(p("probe")).unwrap();

    // 1. New: a file with two user attributes and an access ACL, a directory
    //    with an attribute and a default ACL, a file created inside it
    //    (which inherits an access ACL from that default), a link (none).
    write_file(&p("tac_plus.conf"), "key = secret\n");
    set_attr(&p("tac_plus.conf"), "user.origin", b"leader");
    set_attr(&p("tac_plus.conf"), "user.empty", b"");
    set_attr(&p("tac_plus.conf"), "system.posix_acl_access", &acl(4, 6));
    fs::create_dir(p("keys")).unwrap();
    set_attr(&p("keys"), "user.purpose", b"host keys");
    set_attr(&p("keys"), "system.posix_acl_default", &acl(4, 4));
    write_file(&p("keys/host.key"), "-----BEGIN-----\n");
    symlink("tac_plus.conf", p("current")).unwrap();
    let t = wait_trees_equal(&c, "acl", &ids, CONVERGE);
    let a = wait_attrs_equal(&c, "acl", &ids);
    assert_eq!(a["tac_plus.conf"].len(), 3, "{a:?}");
    assert_eq!(a["tac_plus.conf"]["system.posix_acl_access"], acl(4, 6));
    assert_eq!(a["keys"].len(), 2, "{a:?}");
    assert!(
        a["keys/host.key"].contains_key("system.posix_acl_access"),
        "the inherited ACL: {a:?}"
    );
    // The ACL's mask is the mode's group bits, on every node.
    assert_eq!(
        t["tac_plus.conf"].mode & 0o070,
        0o060,
        "{}",
        t["tac_plus.conf"]
    );

    // 2. Attributes change alone (setfattr, setfacl): one value changes,
    //    one is removed, the ACL narrows, the directory gains one. Followers
    //    fix them in place: the file is not rewritten.
    let follower = ids[1];
    let inode = |id: u64| {
        fs::metadata(c.set_path(id, "acl").join("tac_plus.conf"))
            .unwrap()
            .ino()
    };
    let before = inode(follower);
    set_attr(&p("tac_plus.conf"), "user.origin", b"changed on the leader");
    lremovexattr(p("tac_plus.conf"), "user.empty").unwrap();
    set_attr(&p("tac_plus.conf"), "system.posix_acl_access", &acl(0, 4));
    set_attr(&p("keys"), "user.added", b"1");
    let t = wait_trees_equal(&c, "acl", &ids, CONVERGE);
    let a = wait_attrs_equal(&c, "acl", &ids);
    assert_eq!(
        a["tac_plus.conf"].keys().collect::<Vec<_>>(),
        vec!["system.posix_acl_access", "user.origin"]
    );
    assert_eq!(a["tac_plus.conf"]["user.origin"], b"changed on the leader");
    assert_eq!(
        t["tac_plus.conf"].mode & 0o070,
        0o040,
        "{}",
        t["tac_plus.conf"]
    );
    assert_eq!(a["keys"].len(), 3, "{a:?}");
    assert_eq!(
        inode(follower),
        before,
        "an attribute change rewrote the file"
    );

    // 3. An editor's save (a new file renamed over the old one) drops the
    //    attributes on the leader, so on the followers too; an in-place
    //    append keeps them, with the new content.
    write_file(&p("tac_plus.conf.new"), "key = rotated\n");
    fs::rename(p("tac_plus.conf.new"), p("tac_plus.conf")).unwrap();
    append(&p("keys/host.key"), "more\n");
    wait_trees_equal(&c, "acl", &ids, CONVERGE);
    let a = wait_attrs_equal(&c, "acl", &ids);
    assert!(a["tac_plus.conf"].is_empty(), "{a:?}");
    assert!(!a["keys/host.key"].is_empty(), "{a:?}");

    // 4. A follower that was down while attributes changed catches up.
    let late = ids[2];
    c.kill(late);
    set_attr(&p("keys"), "user.added", b"while node was down");
    set_attr(&p("keys/host.key"), "user.new", b"1");
    c.start_node(late);
    wait_trees_equal(&c, "acl", &ids, CONVERGE);
    let a = wait_attrs_equal(&c, "acl", &ids);
    assert_eq!(a["keys"]["user.added"], b"while node was down");

    // 5. A set without the option: content and mode replicate, attributes
    //    and ACLs stay on the leader.
    let plain = c.set_path(leader, "plain");
    write_file(&plain.join("aliases"), "root: admin\n");
    set_attr(&plain.join("aliases"), "user.origin", b"leader");
    set_attr(
        &plain.join("aliases"),
        "system.posix_acl_access",
        &acl(4, 4),
    );
    wait_trees_equal(&c, "plain", &ids, CONVERGE);
    // A later change of the attributes alone proposes nothing either.
    set_attr(&plain.join("aliases"), "user.later", b"x");
    hold_for(
        Duration::from_secs(2),
        "followers of set \"plain\" without attributes",
        || {
            for &id in &ids[1..] {
                let got = attrs(&c.set_path(id, "plain").join("aliases"))?;
                if !got.is_empty() {
                    return Err(format!("node {id} has {got:?}"));
                }
            }
            Ok(())
        },
    );
}

/// A set with `hard_links = true` keeps names that share an inode on the
/// leader sharing one inode on every follower (same `st_ino`, the right
/// `st_nlink`): new links, content written through one name, the primary
/// name deleted, a name moved; a follower that missed the changes (caught up
/// by snapshot, the log being compacted) ends with the names linked too. A
/// set without the option replicates each name as a file of its own.
#[test]
fn hard_links_stay_links_only_in_sets_that_ask() {
    use std::os::unix::fs::MetadataExt;

    let mut b = Cluster::builder(3).env("CLUSTERD_RAFT__COMPACT_AFTER", "10");
    for id in 1..=3 {
        b = b.extra_toml(id, REPLICATION);
    }
    let c = b
        .sync_set("linked", "mirror", "hard_links = true")
        .sync_set("plain", "mirror", "")
        .start();
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);
    wait_sets_ready(&c, &all, &["linked", "plain"]);
    let ids = leader_first(&c, leader);
    let root = c.set_path(leader, "linked");
    let p = |rel: &str| root.join(rel);

    /// `(st_ino, st_nlink)` of each name of `set` on node `id`.
    fn inodes(c: &Cluster, id: u64, set: &str, names: &[&str]) -> Result<Vec<(u64, u64)>, String> {
        names
            .iter()
            .map(|n| {
                fs::symlink_metadata(c.set_path(id, set).join(n))
                    .map(|m| (m.ino(), m.nlink()))
                    .map_err(|e| format!("{n}: {e}"))
            })
            .collect()
    }
    /// Waits until, on every node of `ids`, the trees of set "linked" are
    /// equal and `names` are one inode with `nlink` names.
    #[track_caller]
    fn wait_linked(c: &Cluster, ids: &[u64], names: &[&str], nlink: u64) {
        wait_trees_equal(c, "linked", ids, CONVERGE);
        for &id in ids {
            wait_until(
                CONVERGE,
                &format!("node {id}: {names:?} one inode with {nlink} names"),
                || {
                    let v = inodes(c, id, "linked", names)?;
                    if v.iter().all(|x| *x == (v[0].0, nlink)) {
                        Ok(())
                    } else {
                        Err(format!("(ino, nlink): {v:?}"))
                    }
                },
            );
        }
    }

    // 1. A file gets two more names, one in a subdirectory; another file
    //    has none. (The name committed first stays the primary.)
    write_file(&p("passwd"), "root:x:0:0::/root:/bin/sh\n");
    fs::create_dir(p("backup")).unwrap();
    wait_trees_equal(&c, "linked", &ids, CONVERGE);
    fs::hard_link(p("passwd"), p("backup/passwd")).unwrap();
    fs::hard_link(p("passwd"), p("passwd.old")).unwrap();
    write_file(&p("alone"), "no links\n");
    wait_linked(&c, &ids, &["backup/passwd", "passwd", "passwd.old"], 3);
    for &id in &ids {
        assert_eq!(inodes(&c, id, "linked", &["alone"]).unwrap()[0].1, 1);
    }
    // The bytes of the file count once.
    let files = set_status(&c, leader, ids[1], "linked").unwrap();
    assert_eq!(files["files"], 4, "{files}");
    assert_eq!(
        files["bytes"].as_u64(),
        Some(("root:x:0:0::/root:/bin/sh\n".len() + "no links\n".len()) as u64),
        "{files}"
    );

    // 2. Content written in place through one name: every name has it.
    write_file(
        &p("passwd.old"),
        "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
    );
    wait_linked(&c, &ids, &["backup/passwd", "passwd", "passwd.old"], 3);
    for &id in &ids[1..] {
        assert!(read(&c.set_path(id, "linked").join("backup/passwd")).contains("alice"));
    }

    // 3. The primary is deleted: the other names stay, still linked; then
    //    one of them is moved.
    fs::remove_file(p("passwd")).unwrap();
    wait_linked(&c, &ids, &["backup/passwd", "passwd.old"], 2);
    fs::rename(p("passwd.old"), p("backup/passwd.old")).unwrap();
    wait_linked(&c, &ids, &["backup/passwd", "backup/passwd.old"], 2);
    let q = quarantine(&c, ids[1]);
    assert!(q.is_empty(), "node {} quarantined: {q:?}", ids[1]);

    // 4. A follower misses new links, a change written through a link and
    //    a deleted primary, while the log is compacted past them: it
    //    catches up by snapshot and fetch, and ends with the names linked.
    let late = ids[2];
    let up = [ids[0], ids[1]];
    let killed_at = c.view_now(leader).commit_index.unwrap_or(0);
    c.kill(late);
    fs::hard_link(p("backup/passwd"), p("group")).unwrap();
    write_file(&p("shadow"), "root:*:19000::::::\n");
    fs::hard_link(p("shadow"), p("backup/shadow")).unwrap();
    wait_linked(&c, &up, &["backup/passwd", "backup/passwd.old", "group"], 3);
    write_file(&p("group"), "root:x:0:\nwheel:x:10:alice\n");
    fs::remove_file(p("backup/passwd")).unwrap();
    wait_linked(&c, &up, &["backup/passwd.old", "group"], 2);
    wait_linked(&c, &up, &["shadow", "backup/shadow"], 2);
    for _ in 0..25 {
        c.wait_barrier(leader);
    }
    let first_index =
        entry(&c.view_now(leader).raw, leader).and_then(|n| n["first_index"].as_u64());
    assert!(
        first_index.unwrap_or(0) > killed_at + 1,
        "the leader's log was not compacted past node {late}'s last entry {killed_at} (first index {first_index:?})"
    );
    c.start_node(late);
    wait_linked(&c, &ids, &["backup/passwd.old", "group"], 2);
    wait_linked(&c, &ids, &["shadow", "backup/shadow"], 2);
    assert!(read(&c.set_path(late, "linked").join("backup/passwd.old")).contains("wheel"));
    let q = quarantine(&c, late);
    assert!(q.is_empty(), "node {late} quarantined: {q:?}");

    // 5. A set without the option: each name is a file of its own.
    let plain = c.set_path(leader, "plain");
    write_file(&plain.join("aliases"), "root: admin\n");
    fs::hard_link(plain.join("aliases"), plain.join("aliases.bak")).unwrap();
    wait_trees_equal(&c, "plain", &ids, CONVERGE);
    for &id in &ids[1..] {
        // Two inodes; each may have one more link than its name: the
        // history keeps a follower's first version as a link to it.
        let v = inodes(&c, id, "plain", &["aliases", "aliases.bak"]).unwrap();
        assert!(
            v[0].0 != v[1].0 && v[0].1 <= 2 && v[1].1 <= 2,
            "node {id}: {v:?}"
        );
    }
}
