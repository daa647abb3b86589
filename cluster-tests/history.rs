//! History on real processes (`clusterctl history`, `show`, `diff`): every
//! node lists the same revisions of a set, shows old content from any node,
//! diffs two revisions, and keeps all of it across a SIGKILL and a failover.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::Value;

use crate::harness::tree::*;
use crate::harness::*;

const REPLICATION: &str = "[replication]\ndebounce_ms = 20\nrescan_secs = 300";
const CONVERGE: Duration = Duration::from_secs(30);
const CTL: Duration = Duration::from_secs(10);

fn cluster() -> (Cluster, u64) {
    let mut b = Cluster::builder(3);
    for id in 1..=3 {
        b = b.extra_toml(id, REPLICATION);
    }
    let c = b.sync_set("tacacs", "mirror", "").start();
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);
    wait_sets_ready(&c, &all, &["tacacs"]);
    (c, leader)
}

/// Node `id`'s history of `tacacs` as JSON.
fn history(c: &Cluster, id: u64) -> Result<Vec<Value>, String> {
    let out = c.ctl(id, &["history", "tacacs", "--limit", "0", "--json"], CTL);
    if !out.success() {
        return Err(format!("history on node {id}: {out}"));
    }
    serde_json::from_str::<Value>(&out.stdout)
        .map_err(|e| format!("history on node {id} is not JSON ({e}): {out}"))?
        .as_array()
        .cloned()
        .ok_or_else(|| format!("history on node {id} is not an array: {out}"))
}

/// The revision that made change `op` to `path`.
fn revision_of(revisions: &[Value], path: &str, op: &str) -> Option<u64> {
    revisions.iter().find_map(|r| {
        let changes = r.get("changes")?.as_array()?;
        changes
            .iter()
            .any(|c| c["path"] == path && c["op"] == op)
            .then(|| r["revision"].as_u64())
            .flatten()
    })
}

#[track_caller]
fn wait_gone(c: &Cluster, ids: &[u64], file: &str) {
    wait_until(
        CONVERGE,
        &format!("{file} is gone on {ids:?}"),
        || match ids
            .iter()
            .find(|&&id| c.set_path(id, "tacacs").join(file).exists())
        {
            Some(id) => Err(format!("node {id} still has it")),
            None => Ok(()),
        },
    );
}

#[track_caller]
fn wait_content(c: &Cluster, ids: &[u64], file: &str, want: &str) {
    wait_until(CONVERGE, &format!("{file} is {want:?} on {ids:?}"), || {
        for &id in ids {
            let got = fs::read_to_string(c.set_path(id, "tacacs").join(file)).unwrap_or_default();
            if got != want {
                return Err(format!("node {id} has {got:?}"));
            }
        }
        Ok(())
    });
}

#[test]
fn every_node_lists_the_same_revisions_shows_and_diffs_them_across_a_kill_and_a_failover() {
    let (c, leader) = cluster();
    let all = c.ids();
    let root = c.set_path(leader, "tacacs");
    let v1 = "key = \"one\"\nuser = alice { login = PAM }\n";
    let v2 = "key = \"two\"\nuser = alice { login = PAM }\nuser = bob { login = PAM }\n";
    write_file(&root.join("tac_plus.conf"), v1);
    write_file(&root.join("old.conf"), "retired\n");
    wait_content(&c, &all, "old.conf", "retired\n");
    wait_content(&c, &all, "tac_plus.conf", v1);
    write_file(&root.join("tac_plus.conf"), v2);
    wait_content(&c, &all, "tac_plus.conf", v2);
    fs::remove_file(root.join("old.conf")).unwrap();
    wait_gone(&c, &all, "old.conf");
    fs::set_permissions(
        root.join("tac_plus.conf"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    c.wait_barrier(leader);

    // Every node lists the same revisions, each change classified.
    let listed = wait_until(
        CONVERGE,
        "every node lists the same four kinds of change",
        || {
            let mine = history(&c, leader)?;
            for op in ["+", "~", "-", "m"] {
                let path = if op == "-" {
                    "old.conf"
                } else {
                    "tac_plus.conf"
                };
                revision_of(&mine, path, op)
                    .ok_or_else(|| format!("no {op} of {path} yet: {mine:?}"))?;
            }
            for &id in &all {
                let theirs = history(&c, id)?;
                if theirs != mine {
                    return Err(format!("node {id} lists {theirs:?}, the leader {mine:?}"));
                }
            }
            Ok(mine)
        },
    );
    let first = revision_of(&listed, "tac_plus.conf", "+").unwrap();
    let second = revision_of(&listed, "tac_plus.conf", "~").unwrap();
    assert!(first < second, "{listed:?}");
    for r in &listed {
        assert_eq!(r["leader"].as_u64(), Some(leader), "{r}");
        assert!(r["time"].as_u64().unwrap() > 1_700_000_000, "{r}");
    }
    let table = c.ctl(leader, &["history", "tacacs"], CTL);
    assert!(table.success(), "{table}");
    assert!(table.stdout.contains(&format!("{second:>8}")), "{table}");
    assert!(table.stdout.contains("~tac_plus.conf ("), "{table}");

    // Old content, from a follower.
    let follower = c.others(&[leader])[0];
    let shown = c.ctl(
        follower,
        &[
            "show",
            "tacacs",
            "tac_plus.conf",
            "--at",
            &first.to_string(),
        ],
        CTL,
    );
    assert!(shown.success(), "{shown}");
    assert_eq!(shown.stdout, v1);
    // A deleted file's last content.
    let before_delete = revision_of(&listed, "old.conf", "-").unwrap() - 1;
    let gone = c.ctl(
        follower,
        &[
            "show",
            "tacacs",
            "old.conf",
            "--at",
            &before_delete.to_string(),
        ],
        CTL,
    );
    assert_eq!(gone.stdout, "retired\n", "{gone}");
    // An absolute path works as well.
    let abs = c.set_path(follower, "tacacs").join("tac_plus.conf");
    let shown = c.ctl(
        follower,
        &[
            "show",
            "tacacs",
            abs.to_str().unwrap(),
            "--at",
            &second.to_string(),
        ],
        CTL,
    );
    assert_eq!(shown.stdout, v2, "{shown}");

    // The diff from the first version to now.
    let diff = c.ctl(
        follower,
        &["diff", "tacacs", "--from", &first.to_string()],
        CTL,
    );
    assert!(diff.success(), "{diff}");
    for want in [
        "--- tac_plus.conf@",
        "-key = \"one\"",
        "+key = \"two\"",
        "+user = bob { login = PAM }",
        "tac_plus.conf: mode 0644 -> 0600",
        "-retired",
    ] {
        assert!(diff.stdout.contains(want), "diff lacks {want:?}: {diff}");
    }

    // Bad input: one sentence each.
    let old = c.ctl(
        follower,
        &["show", "tacacs", "tac_plus.conf", "--at", "1"],
        CTL,
    );
    assert!(!old.success());
    assert!(old.stderr.contains("the oldest available is"), "{old}");
    let outside = c.ctl(
        follower,
        &["show", "tacacs", "/etc/passwd", "--at", &second.to_string()],
        CTL,
    );
    assert!(!outside.success());
    assert!(
        outside
            .stderr
            .contains("is not a path of sync set \"tacacs\""),
        "{outside}"
    );
    let unknown = c.ctl(follower, &["history", "nosuchset"], CTL);
    assert!(!unknown.success());
    assert!(
        unknown
            .stderr
            .contains("\"nosuchset\" is not replicated on this node"),
        "{unknown}"
    );
    let future = c.ctl(
        follower,
        &["show", "tacacs", "tac_plus.conf", "--at", "999999"],
        CTL,
    );
    assert!(
        future.stderr.contains("is not committed on this node yet"),
        "{future}"
    );

    // A SIGKILLed follower and a failover keep every revision.
    c.restart(follower);
    c.kill(leader);
    let rest = c.others(&[leader]);
    let new_leader = c.wait_for_leader(&rest);
    c.wait_barrier(new_leader);
    for &id in &rest {
        let after = wait_until(CONVERGE, "history answers after the failover", || {
            history(&c, id)
        });
        let kept: Vec<&Value> = after.iter().filter(|r| listed.contains(r)).collect();
        assert_eq!(
            kept.len(),
            listed.len(),
            "node {id} lost revisions: {after:?}"
        );
    }
    let shown = c.ctl(
        new_leader,
        &[
            "show",
            "tacacs",
            "tac_plus.conf",
            "--at",
            &first.to_string(),
        ],
        CTL,
    );
    assert_eq!(shown.stdout, v1, "{shown}");
    c.start_node(leader);
}

/// The newest revision in node `id`'s history.
fn newest(c: &Cluster, id: u64) -> u64 {
    history(c, id).unwrap()[0]["revision"].as_u64().unwrap()
}

#[test]
fn a_rollback_of_one_path_and_of_the_whole_set_reaches_every_node_from_a_follower() {
    let (c, leader) = cluster();
    let all = c.ids();
    let follower = c.others(&[leader])[0];
    let root = c.set_path(leader, "tacacs");
    write_file(&root.join("tac_plus.conf"), "key = \"one\"\n");
    write_file(&root.join("users.conf"), "user = alice\n");
    wait_content(&c, &all, "tac_plus.conf", "key = \"one\"\n");
    wait_content(&c, &all, "users.conf", "user = alice\n");
    c.wait_barrier(leader);
    let good = wait_until(CONVERGE, "the good state is in the history", || {
        let rev = newest(&c, leader);
        let h = history(&c, leader)?;
        revision_of(&h, "users.conf", "+").ok_or("users.conf not listed yet")?;
        Ok::<u64, String>(rev)
    });
    // The bad change: an edit, a deletion, a new file and a chmod.
    write_file(&root.join("tac_plus.conf"), "key = \"broken\"\n");
    fs::remove_file(root.join("users.conf")).unwrap();
    write_file(&root.join("stray.conf"), "oops\n");
    wait_content(&c, &all, "tac_plus.conf", "key = \"broken\"\n");
    wait_content(&c, &all, "stray.conf", "oops\n");
    fs::set_permissions(root.join("stray.conf"), fs::Permissions::from_mode(0o600)).unwrap();
    c.wait_barrier(leader);

    // A dry run says what would change and changes nothing.
    let dry = c.ctl(
        follower,
        &["rollback", "tacacs", "--to", &good.to_string(), "--dry-run"],
        CTL,
    );
    assert!(dry.success(), "{dry}");
    for want in ["~ tac_plus.conf", "+ users.conf", "- stray.conf"] {
        assert!(dry.stdout.contains(want), "dry run lacks {want:?}: {dry}");
    }
    assert!(root.join("stray.conf").exists());

    // One path, from a follower.
    let one = c.ctl(
        follower,
        &[
            "rollback",
            "tacacs",
            "tac_plus.conf",
            "--to",
            &good.to_string(),
        ],
        Duration::from_secs(30),
    );
    assert!(one.success(), "{one}");
    assert!(
        one.stdout.contains("~ tac_plus.conf") && !one.stdout.contains("users.conf"),
        "{one}"
    );
    assert!(one.stdout.contains("rolled back to revision"), "{one}");
    wait_content(&c, &all, "tac_plus.conf", "key = \"one\"\n");
    for &id in &all {
        assert!(
            c.set_path(id, "tacacs").join("stray.conf").exists(),
            "node {id}: only the path was rolled back"
        );
    }
    // The whole set.
    let whole = c.ctl(
        follower,
        &["rollback", "tacacs", "--to", &good.to_string()],
        Duration::from_secs(30),
    );
    assert!(whole.success(), "{whole}");
    wait_content(&c, &all, "users.conf", "user = alice\n");
    wait_gone(&c, &all, "stray.conf");
    // A new revision, proposed by the leader, listed everywhere; the
    // leader's tree was written like every other (nothing is proposed
    // again from it afterwards).
    c.wait_barrier(leader);
    let after = wait_until(CONVERGE, "the rollback is listed everywhere", || {
        let mine = history(&c, leader)?;
        for &id in &all {
            if history(&c, id)? != mine {
                return Err(format!("node {id} differs"));
            }
        }
        Ok(mine)
    });
    let rollback = &after[0];
    assert_eq!(rollback["leader"].as_u64(), Some(leader), "{rollback}");
    let again = c.ctl(
        leader,
        &["rollback", "tacacs", "--to", &good.to_string()],
        CTL,
    );
    assert!(again.stdout.contains("nothing to roll back"), "{again}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        newest(&c, leader),
        rollback["revision"].as_u64().unwrap(),
        "nothing proposed again"
    );
}

#[test]
fn a_rollback_the_validator_refuses_is_held_and_changes_nothing() {
    let strict = tempfile::tempdir().unwrap();
    let flag = strict.path().join("strict");
    let validate = format!(
        "validate = \"test ! -e {} || ! grep -q legacy {{}}/tac_plus.conf\"",
        flag.display()
    );
    let mut b = Cluster::builder(3);
    for id in 1..=3 {
        b = b.extra_toml(id, REPLICATION);
    }
    let c = b.sync_set("tacacs", "mirror", &validate).start();
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);
    wait_sets_ready(&c, &all, &["tacacs"]);
    let root = c.set_path(leader, "tacacs");
    write_file(&root.join("tac_plus.conf"), "legacy = yes\n");
    wait_content(&c, &all, "tac_plus.conf", "legacy = yes\n");
    c.wait_barrier(leader);
    let old = wait_until(CONVERGE, "the legacy config is in the history", || {
        revision_of(&history(&c, leader)?, "tac_plus.conf", "+").ok_or("not yet".to_string())
    });
    write_file(&root.join("tac_plus.conf"), "modern = yes\n");
    wait_content(&c, &all, "tac_plus.conf", "modern = yes\n");
    c.wait_barrier(leader);
    let before = newest(&c, leader);
    // The site's rules changed: the old state no longer passes.
    fs::write(&flag, "").unwrap();
    let refused = c.ctl(
        c.others(&[leader])[0],
        &["rollback", "tacacs", "--to", &old.to_string()],
        Duration::from_secs(30),
    );
    assert!(!refused.success(), "{refused}");
    assert!(
        refused
            .stderr
            .contains("held: the validator of sync set \"tacacs\" refused"),
        "{refused}"
    );
    assert!(refused.stderr.contains("nothing was changed"), "{refused}");
    c.wait_barrier(leader);
    assert_eq!(newest(&c, leader), before, "nothing was proposed");
    wait_content(&c, &all, "tac_plus.conf", "modern = yes\n");
}

/// Node `id`'s quarantine records.
fn conflicts(c: &Cluster, id: u64) -> Result<Vec<Value>, String> {
    let out = c.ctl(id, &["conflicts", "--json"], CTL);
    if !out.success() {
        return Err(format!("conflicts on node {id}: {out}"));
    }
    serde_json::from_str::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .ok_or_else(|| format!("conflicts on node {id} is not a JSON array: {out}"))
}

#[test]
fn a_quarantined_version_is_restored_from_the_node_that_holds_it_and_dropped_from_another() {
    let (c, leader) = cluster();
    let all = c.ids();
    let root = c.set_path(leader, "tacacs");
    write_file(&root.join("tac_plus.conf"), "key = \"one\"\n");
    wait_content(&c, &all, "tac_plus.conf", "key = \"one\"\n");
    // A hand edit on a follower, then a committed change: the follower's
    // version goes to quarantine.
    let holder = c.others(&[leader])[0];
    let other = c.others(&[leader, holder])[0];
    write_file(
        &c.set_path(holder, "tacacs").join("tac_plus.conf"),
        "key = \"hand fix\"\n",
    );
    write_file(&root.join("tac_plus.conf"), "key = \"two\"\n");
    wait_content(&c, &all, "tac_plus.conf", "key = \"two\"\n");
    let record = wait_until(CONVERGE, "the hand edit is quarantined", || {
        conflicts(&c, holder)?
            .into_iter()
            .find(|r| r["path"] == "tac_plus.conf")
            .ok_or_else(|| "no record yet".to_string())
    });
    assert_eq!(record["set"], "tacacs", "{record}");
    let id = record["id"].as_str().expect("records have ids").to_string();
    assert!(id.starts_with(&format!("{holder}-")), "{id}");
    let table = c.ctl(holder, &["conflicts"], CTL);
    assert!(table.stdout.contains(&id), "{table}");

    // Restored from a node that does not hold it: the content travels.
    let restored = c.ctl(
        other,
        &["conflicts", "restore", &id],
        Duration::from_secs(30),
    );
    assert!(restored.success(), "{restored}");
    assert!(
        restored.stdout.contains("restored as revision"),
        "{restored}"
    );
    wait_content(&c, &all, "tac_plus.conf", "key = \"hand fix\"\n");
    let h = history(&c, leader).unwrap();
    assert_eq!(h[0]["changes"][0]["path"], "tac_plus.conf", "{h:?}");

    // Dropped from another node: the copy and its record go.
    let stored = c
        .node(holder)
        .data_dir
        .join("quarantine")
        .join(record["stored_at"].as_str().unwrap());
    assert!(stored.exists());
    let dropped = c.ctl(leader, &["conflicts", "drop", &id], CTL);
    assert!(dropped.success(), "{dropped}");
    assert!(!stored.exists(), "{} is still there", stored.display());
    assert!(conflicts(&c, holder)
        .unwrap()
        .iter()
        .all(|r| r["id"] != id.as_str()));
    // Bad ids: one sentence each, nothing changed.
    let again = c.ctl(leader, &["conflicts", "drop", &id], CTL);
    assert!(
        !again.success() && again.stderr.contains("holds no quarantined copy with id"),
        "{again}"
    );
    let junk = c.ctl(leader, &["conflicts", "restore", "nonsense"], CTL);
    assert!(
        !junk.success() && junk.stderr.contains("is not a conflict id"),
        "{junk}"
    );
}
