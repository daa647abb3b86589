//! Secrets at rest (issue 5): `data_dir` and its quarantine are 0700 even
//! when the directory existed with looser modes, and a quarantined file
//! keeps its own mode, so a set-aside /etc/shadow stays 0640.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::harness::tree::*;
use crate::harness::*;

const CONVERGE: Duration = Duration::from_secs(30);

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn data_dir_and_quarantine_are_private_and_keep_file_modes() {
    let mut b = Cluster::builder(3)
        .sync_set("accounts", "mirror", "")
        .dont_start(3);
    for id in 1..=3 {
        b = b.extra_toml(id, "[replication]\ndebounce_ms = 20\nrescan_secs = 300");
    }
    let c = b.start();
    // A data_dir made by hand (or by an old package) with a world-readable mode.
    let data_dir = c.node(3).data_dir.clone();
    fs::create_dir_all(&data_dir).unwrap();
    fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o755)).unwrap();
    c.start_node(3);
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);
    wait_sets_ready(&c, &all, &["accounts"]);
    assert_eq!(
        mode(&data_dir),
        0o700,
        "data_dir of node 3 was not tightened"
    );
    assert!(
        c.log(3).contains("tightened") && c.log(3).contains("from mode 755 to 700"),
        "node 3 says it tightened its data_dir"
    );
    for id in all.iter().copied() {
        let d = c.node(id).data_dir.clone();
        assert_eq!(mode(&d), 0o700, "data_dir of node {id}");
        assert_eq!(
            mode(&d.join("quarantine")),
            0o700,
            "quarantine of node {id}"
        );
    }

    let ids = leader_then(leader, &all);
    let shadow = c.set_path(leader, "accounts").join("shadow");
    write_file(&shadow, "root:$6$hash:19000:0:99999:7:::\n");
    fs::set_permissions(&shadow, fs::Permissions::from_mode(0o640)).unwrap();
    wait_trees_equal(&c, "accounts", &ids, CONVERGE);
    let follower = ids[1];
    let theirs = c.set_path(follower, "accounts").join("shadow");
    assert_eq!(mode(&theirs), 0o640);
    // A hand edit on the follower, then a change from the leader: the hand
    // edit goes to quarantine with its mode.
    fs::write(&theirs, "root:edited-by-hand:19000:0:99999:7:::\n").unwrap();
    write_file(&shadow, "root:$6$new:19001:0:99999:7:::\n");
    fs::set_permissions(&shadow, fs::Permissions::from_mode(0o640)).unwrap();
    wait_trees_equal(&c, "accounts", &ids, CONVERGE);
    let q = wait_until(CONVERGE, "the hand edit in quarantine", || {
        let records = conflict_records(&c, follower)?;
        records
            .first()
            .and_then(|r| r["stored_at"].as_str().map(str::to_string))
            .ok_or_else(|| format!("no record yet: {records:?}"))
    });
    let stored = c.node(follower).data_dir.join("quarantine").join(&q);
    assert_eq!(
        mode(&stored),
        0o640,
        "the quarantined shadow keeps its mode"
    );
    assert_eq!(
        fs::read_to_string(&stored).unwrap(),
        "root:edited-by-hand:19000:0:99999:7:::\n"
    );
    // Every directory on the way to it is private too.
    let mut dir = stored.parent().unwrap().to_path_buf();
    while dir != c.node(follower).data_dir {
        assert_eq!(mode(&dir) & 0o077, 0, "{} is open to others", dir.display());
        dir = dir.parent().unwrap().to_path_buf();
    }
}
