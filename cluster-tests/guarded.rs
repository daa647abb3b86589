//! Guarded changes on real processes (`[[sync]] validate`): a change the
//! validator refuses is held on the leader and reaches no follower while
//! other sets keep replicating; fixing it releases it; a hanging validator
//! times out and holds the change too.

use std::fs;
use std::time::Duration;

use serde_json::Value;

use crate::harness::tree::*;
use crate::harness::*;

const REPLICATION: &str = "[replication]\ndebounce_ms = 20\nrescan_secs = 300";
const CONVERGE: Duration = Duration::from_secs(30);

/// A validator in the shape of `tac_plus -P -C {}/tac_plus.conf`: refuses
/// a config holding `SYNTAX ERROR`, and proves it was given the staged
/// copy (not the live root) with the set's environment.
const VALIDATOR: &str = r#"validate = "test \"{}\" = \"$CLUSTERD_STAGED\" && test \"$CLUSTERD_ROOT\" != \"$CLUSTERD_STAGED\" && test -f {}/tac_plus.conf && ! grep -n 'SYNTAX ERROR' {}/tac_plus.conf""#;

fn cluster(validate_lines: &str) -> (Cluster, u64) {
    let mut b = Cluster::builder(3);
    for id in 1..=3 {
        b = b.extra_toml(id, REPLICATION);
    }
    let c = b
        .sync_set("tacacs", "mirror", validate_lines)
        .sync_set("mail", "mirror", "")
        .start();
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);
    wait_sets_ready(&c, &all, &["tacacs", "mail"]);
    (c, leader)
}

/// The `held` of set `set` in node `id`'s own entry of its status.
fn held(c: &Cluster, id: u64, set: &str) -> Result<Option<String>, String> {
    let status = c.status_result(id, Duration::from_secs(5))?;
    let node = entry(&status, id).ok_or("no entry for the node")?;
    let sets = node
        .get("sets")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("node {id} reports no sets: {node}"))?;
    let s = sets
        .iter()
        .find(|s| s.get("name").and_then(Value::as_str) == Some(set))
        .ok_or_else(|| format!("node {id} does not report set {set}"))?;
    match s.get("held") {
        Some(Value::Null) => Ok(None),
        Some(Value::String(why)) => Ok(Some(why.clone())),
        other => Err(format!("`held` of set {set} on node {id} is {other:?}")),
    }
}

#[track_caller]
fn wait_content(c: &Cluster, ids: &[u64], set: &str, file: &str, want: &str) {
    wait_until(
        CONVERGE,
        &format!("{set}/{file} = {want:?} on {ids:?}"),
        || {
            for &id in ids {
                let got = fs::read_to_string(c.set_path(id, set).join(file)).unwrap_or_default();
                if got != want {
                    return Err(format!("node {id} has {got:?}"));
                }
            }
            Ok(())
        },
    );
}

#[test]
fn an_invalid_change_is_held_on_the_leader_while_other_sets_go_on_and_a_fix_releases_it() {
    let (c, leader) = cluster(VALIDATOR);
    let followers = c.others(&[leader]);
    let conf = c.set_path(leader, "tacacs").join("tac_plus.conf");
    let good = "key = \"s3cret\"\nuser = alice { login = PAM }\n";
    write_file(&conf, good);
    wait_content(&c, &followers, "tacacs", "tac_plus.conf", good);
    assert_eq!(held(&c, leader, "tacacs").unwrap(), None);

    // A typo: the validator refuses it, nothing of it is proposed.
    let broken = "key = \"s3cret\"\nuser = alice { login = PAM\nSYNTAX ERROR\n";
    write_file(&conf, broken);
    fs::write(c.set_path(leader, "tacacs").join("new-include.conf"), "x\n").unwrap();
    let why = wait_until(CONVERGE, "the leader holds set tacacs", || {
        held(&c, leader, "tacacs")?.ok_or_else(|| "not held yet".to_string())
    });
    assert!(
        why.contains("validator exited 1") && why.contains("SYNTAX ERROR"),
        "held shows the validator's first line: {why:?}"
    );
    // Another set keeps replicating meanwhile.
    write_file(
        &c.set_path(leader, "mail").join("aliases"),
        "postmaster: root\n",
    );
    wait_content(&c, &followers, "mail", "aliases", "postmaster: root\n");
    c.wait_barrier(leader);
    hold_for(
        Duration::from_millis(500),
        "followers keep the last valid tacacs",
        || {
            for &id in &followers {
                let dir = c.set_path(id, "tacacs");
                let got = fs::read_to_string(dir.join("tac_plus.conf")).unwrap_or_default();
                if got != good || dir.join("new-include.conf").exists() {
                    return Err(format!("node {id} got the held change: {got:?}"));
                }
            }
            Ok(())
        },
    );
    let check = c.ctl(leader, &["check"], Duration::from_secs(10));
    assert_eq!(check.code, Some(1), "check warns: {check}");
    assert!(check.stdout.contains("held by its validator"), "{check}");
    let table = c.ctl(leader, &["status"], Duration::from_secs(10));
    assert!(table.stdout.contains("held: validator exited 1"), "{table}");

    // The fix releases the whole held change (the new include too).
    let fixed = "key = \"s3cret\"\nuser = alice { login = PAM }\nuser = bob { login = PAM }\n";
    write_file(&conf, fixed);
    wait_content(&c, &followers, "tacacs", "tac_plus.conf", fixed);
    wait_content(&c, &followers, "tacacs", "new-include.conf", "x\n");
    wait_until(CONVERGE, "the hold is released", || {
        match held(&c, leader, "tacacs")? {
            None => Ok(()),
            Some(why) => Err(format!("still held: {why}")),
        }
    });
    // The staged copies are gone; what is left is the empty directory the
    // validators' mount namespace shows the live root at (if it was made).
    let staged = c.node(leader).data_dir.join("validate");
    let left: Vec<_> = fs::read_dir(&staged)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.iter().all(|n| n == "view"),
        "staged copies left in {}: {left:?}",
        staged.display()
    );
    for view in fs::read_dir(staged.join("view"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let inside: Vec<_> = fs::read_dir(view.path()).unwrap().flatten().collect();
        assert!(
            inside.is_empty(),
            "{} holds files outside the validators' namespace",
            view.path().display()
        );
    }
}

#[test]
fn a_hanging_validator_times_out_and_holds_the_change() {
    let (c, leader) = cluster("validate = \"sleep 30\"\nvalidate_timeout_ms = 300");
    let started = std::time::Instant::now();
    write_file(
        &c.set_path(leader, "tacacs").join("tac_plus.conf"),
        "key = x\n",
    );
    let why = wait_until(CONVERGE, "the leader holds set tacacs", || {
        held(&c, leader, "tacacs")?.ok_or_else(|| "not held yet".to_string())
    });
    assert!(
        why.starts_with("validator timed out after 300 ms"),
        "{why:?}"
    );
    assert!(started.elapsed() < scaled(Duration::from_secs(20)));
    for id in c.others(&[leader]) {
        assert!(!c.set_path(id, "tacacs").join("tac_plus.conf").exists());
    }
    // The node is not stalled by it: a barrier commits at once.
    c.wait_barrier(leader);
}

/// The `paused` object of set `set` in node `id`'s own entry.
fn paused(c: &Cluster, id: u64, set: &str) -> Result<Option<Value>, String> {
    let status = c.status_result(id, Duration::from_secs(5))?;
    let node = entry(&status, id).ok_or("no entry for the node")?;
    let s = node
        .get("sets")
        .and_then(Value::as_array)
        .and_then(|sets| {
            sets.iter()
                .find(|s| s.get("name").and_then(Value::as_str) == Some(set))
        })
        .ok_or_else(|| format!("node {id} does not report set {set}"))?;
    match s.get("paused") {
        Some(Value::Null) => Ok(None),
        Some(p @ Value::Object(_)) => Ok(Some(p.clone())),
        other => Err(format!("`paused` of set {set} on node {id} is {other:?}")),
    }
}

/// Holds for a while that `file` of set tacacs stays `want` on `ids`.
#[track_caller]
fn keeps_content(c: &Cluster, ids: &[u64], file: &str, want: &str, what: &str) {
    hold_for(Duration::from_millis(700), what, || {
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
fn a_pause_holds_across_a_failover_and_resume_releases_what_accumulated() {
    let (c, leader) = cluster(VALIDATOR);
    let all = c.ids();
    let followers = c.others(&[leader]);
    let v1 = "key = one\n";
    write_file(&c.set_path(leader, "tacacs").join("tac_plus.conf"), v1);
    wait_content(&c, &followers, "tacacs", "tac_plus.conf", v1);

    // Paused from a follower: committed, so every node shows it.
    let out = c.ctl(
        followers[0],
        &["pause", "tacacs", "--reason", "rotating the TACACS+ key"],
        Duration::from_secs(15),
    );
    assert!(out.success(), "pause from a follower: {out}");
    for &id in &all {
        let p = wait_until(CONVERGE, &format!("node {id} shows the pause"), || {
            paused(&c, id, "tacacs")?.ok_or_else(|| "not paused yet".to_string())
        });
        assert_eq!(p["reason"], "rotating the TACACS+ key", "{p}");
        assert_eq!(
            p["by"],
            format!("node {} (admin socket)", followers[0]),
            "{p}"
        );
    }
    // Edits on the leader accumulate; another set goes on.
    write_file(
        &c.set_path(leader, "tacacs").join("tac_plus.conf"),
        "key = two\n",
    );
    write_file(&c.set_path(leader, "mail").join("aliases"), "root: ops\n");
    wait_content(&c, &followers, "mail", "aliases", "root: ops\n");
    keeps_content(
        &c,
        &followers,
        "tac_plus.conf",
        v1,
        "nothing of the paused set moves",
    );

    // A sync cannot bring a paused set along: it says so at once.
    let sync = c.ctl(followers[1], &["sync", "tacacs"], Duration::from_secs(70));
    assert!(
        !sync.success()
            && sync.stderr.contains("is paused")
            && sync.elapsed < scaled(Duration::from_secs(20)),
        "sync of a paused set: {sync}"
    );

    // The leader dies; the pause holds on the new one.
    c.kill(leader);
    let new = c.wait_for_leader(&followers);
    let rest = c.others(&[leader, new]);
    assert!(paused(&c, new, "tacacs").unwrap().is_some());
    let v3 = "key = three\n";
    write_file(&c.set_path(new, "tacacs").join("tac_plus.conf"), v3);
    keeps_content(
        &c,
        &rest,
        "tac_plus.conf",
        v1,
        "the new leader keeps the pause",
    );
    // Resume (again from another node): what accumulated goes out, validated.
    let out = c.ctl(rest[0], &["resume", "tacacs"], Duration::from_secs(15));
    assert!(out.success(), "resume: {out}");
    wait_content(&c, &rest, "tacacs", "tac_plus.conf", v3);
    assert_eq!(paused(&c, new, "tacacs").unwrap(), None);
    let again = c.ctl(rest[0], &["resume", "tacacs"], Duration::from_secs(15));
    assert!(
        !again.success() && again.stderr.contains("is not paused"),
        "a second resume is refused: {again}"
    );
    // The old leader comes back as a follower and gets what was committed.
    c.start_node(leader);
    wait_content(&c, &[leader], "tacacs", "tac_plus.conf", v3);
}

#[test]
fn a_pause_for_a_while_ends_by_itself() {
    let (c, leader) = cluster("");
    let followers = c.others(&[leader]);
    let out = c.ctl(
        leader,
        &["pause", "tacacs", "--for", "2s"],
        Duration::from_secs(15),
    );
    assert!(out.success(), "{out}");
    let p = paused(&c, leader, "tacacs").unwrap().expect("paused");
    assert!(p["until"].is_string(), "{p}");
    write_file(
        &c.set_path(leader, "tacacs").join("tac_plus.conf"),
        "key = x\n",
    );
    wait_content(&c, &followers, "tacacs", "tac_plus.conf", "key = x\n");
    assert_eq!(paused(&c, leader, "tacacs").unwrap(), None);
    let bad = c.ctl(leader, &["pause", "nosuchset"], Duration::from_secs(15));
    assert!(
        !bad.success() && bad.stderr.contains("no sync set is named \"nosuchset\""),
        "an unknown set is refused with the sets there are: {bad}"
    );
}

#[test]
fn sync_returns_once_every_node_holds_the_set_and_squares_a_followers_drift() {
    let (c, leader) = cluster("");
    let followers = c.others(&[leader]);
    let committed = "key = committed\n";
    write_file(
        &c.set_path(leader, "tacacs").join("tac_plus.conf"),
        committed,
    );
    wait_content(&c, &followers, "tacacs", "tac_plus.conf", committed);
    // A hand edit on a follower: nothing notices it until the set changes...
    let drifted = c.set_path(followers[0], "tacacs").join("tac_plus.conf");
    write_file(&drifted, "key = edited on a follower\n");
    // ...or until `sync`, which returns once every node holds the set.
    let out = c.ctl(followers[1], &["sync", "tacacs"], Duration::from_secs(70));
    assert!(out.success(), "sync: {out}");
    assert!(
        out.stdout.contains("in sync on every reachable node"),
        "{out}"
    );
    assert_eq!(fs::read_to_string(&drifted).unwrap(), committed);
    let conflicts = c.ctl(
        followers[0],
        &["conflicts", "--json"],
        Duration::from_secs(10),
    );
    assert!(
        conflicts.stdout.contains("tac_plus.conf"),
        "the edit is kept: {conflicts}"
    );
    // Every set at once works too, and an unknown set is refused.
    let all = c.ctl(leader, &["sync"], Duration::from_secs(70));
    assert!(all.success(), "{all}");
    let bad = c.ctl(leader, &["sync", "nosuchset"], Duration::from_secs(15));
    assert!(
        !bad.success() && bad.stderr.contains("no sync set is named"),
        "{bad}"
    );
}

#[test]
fn a_failed_on_change_is_reverted_and_the_next_change_releases_the_set() {
    let hook = r#"on_change = "echo $CLUSTERD_SET >> {node_dir}/reloads.log; grep -q '^key = ok' \"$CLUSTERD_ROOT/tac_plus.conf\""
on_change_failure = "revert""#;
    let (c, leader) = cluster(hook);
    let followers = c.others(&[leader]);
    let dir = c.set_path(leader, "tacacs");
    write_file(&dir.join("tac_plus.conf"), "key = ok-1\n");
    wait_content(&c, &followers, "tacacs", "tac_plus.conf", "key = ok-1\n");
    // The service ran with it: that is the version a revert goes back to.
    for &id in &followers {
        wait_until(CONVERGE, &format!("node {id} ran on_change"), || {
            let log = fs::read_to_string(c.node(id).dir.join("reloads.log")).unwrap_or_default();
            (log.lines().count() == 1).then_some(())
        });
    }

    // A change the service cannot reload (no validator caught it): every
    // follower puts back what it touched, runs on_change again and holds.
    write_file(&dir.join("tac_plus.conf"), "key = broken\n");
    write_file(&dir.join("extra.conf"), "x\n");
    for &id in &followers {
        let why = wait_until(CONVERGE, &format!("node {id} holds tacacs"), || {
            held(&c, id, "tacacs")?.ok_or_else(|| "not held yet".to_string())
        });
        assert!(why.contains("on_change failed (exit 1)"), "{why:?}");
        let here = c.set_path(id, "tacacs");
        assert_eq!(
            fs::read_to_string(here.join("tac_plus.conf")).unwrap(),
            "key = ok-1\n"
        );
        assert!(
            !here.join("extra.conf").exists(),
            "the new file is taken away again"
        );
    }
    // The reverted state stays while nothing new is committed...
    hold_for(Duration::from_millis(1500), "the revert holds", || {
        for &id in &followers {
            let got = fs::read_to_string(c.set_path(id, "tacacs").join("tac_plus.conf")).unwrap();
            if got != "key = ok-1\n" {
                return Err(format!("node {id} went back to {got:?}"));
            }
        }
        Ok(())
    });
    // ...and the next committed change brings the set up to date.
    write_file(&dir.join("tac_plus.conf"), "key = ok-2\n");
    wait_content(&c, &followers, "tacacs", "tac_plus.conf", "key = ok-2\n");
    wait_content(&c, &followers, "tacacs", "extra.conf", "x\n");
    for &id in &followers {
        wait_until(CONVERGE, "the hold ends", || {
            match held(&c, id, "tacacs")? {
                None => Ok(()),
                Some(why) => Err(format!("node {id} still holds: {why}")),
            }
        });
    }
}

#[test]
fn a_follower_whose_own_validator_refuses_a_change_holds_only_itself() {
    // Each node checks with what it has: here, a node with a `strict` file
    // refuses any tac_plus.conf that mentions "legacy".
    let (c, leader) =
        cluster(r#"validate = "! test -e {node_dir}/strict || ! grep -q legacy {}/tac_plus.conf""#);
    let followers = c.others(&[leader]);
    let (strict, lenient) = (followers[0], followers[1]);
    let dir = c.set_path(leader, "tacacs");
    write_file(&dir.join("tac_plus.conf"), "key = one\n");
    wait_content(&c, &followers, "tacacs", "tac_plus.conf", "key = one\n");
    write_file(&c.node(strict).dir.join("strict"), "");

    write_file(&dir.join("tac_plus.conf"), "key = two\nlegacy = yes\n");
    write_file(&dir.join("include.conf"), "acl = x\n");
    wait_content(
        &c,
        &[lenient],
        "tacacs",
        "tac_plus.conf",
        "key = two\nlegacy = yes\n",
    );
    let why = wait_until(CONVERGE, "the strict follower holds tacacs", || {
        held(&c, strict, "tacacs")?.ok_or_else(|| "not held yet".to_string())
    });
    assert!(
        why.contains("validator exited 1") && why.contains("checked here"),
        "{why:?}"
    );
    assert_eq!(held(&c, leader, "tacacs").unwrap(), None);
    assert_eq!(held(&c, lenient, "tacacs").unwrap(), None);
    // It keeps its last applied state, and other sets go on there.
    write_file(&c.set_path(leader, "mail").join("aliases"), "root: ops\n");
    wait_content(&c, &[strict], "mail", "aliases", "root: ops\n");
    let here = c.set_path(strict, "tacacs");
    assert_eq!(
        fs::read_to_string(here.join("tac_plus.conf")).unwrap(),
        "key = one\n"
    );
    assert!(!here.join("include.conf").exists());

    // A restart (even SIGKILL) does not end the hold.
    c.kill(strict);
    c.start_node(strict);
    let why = wait_until(
        CONVERGE,
        "the restarted follower still holds tacacs",
        || held(&c, strict, "tacacs")?.ok_or_else(|| "not held".to_string()),
    );
    assert!(why.contains("checked here"), "{why:?}");
    c.wait_barrier(strict);
    hold_for(
        Duration::from_millis(1500),
        "the restarted follower keeps its tree",
        || {
            let got = fs::read_to_string(here.join("tac_plus.conf")).unwrap_or_default();
            if got != "key = one\n" || here.join("include.conf").exists() {
                return Err(format!(
                    "the held change was applied after the restart: {got:?}"
                ));
            }
            Ok(())
        },
    );

    // The next committed change is checked with everything before it, and
    // once it passes the follower catches up on all of it.
    write_file(&dir.join("tac_plus.conf"), "key = three\n");
    wait_content(&c, &followers, "tacacs", "tac_plus.conf", "key = three\n");
    wait_content(&c, &[strict], "tacacs", "include.conf", "acl = x\n");
    wait_until(CONVERGE, "the hold ends", || {
        match held(&c, strict, "tacacs")? {
            None => Ok(()),
            Some(why) => Err(format!("still held: {why}")),
        }
    });
}

#[test]
fn a_validator_can_write_neither_the_live_root_nor_data_dir() {
    // Read-only views need mount namespaces (root with CAP_SYS_ADMIN).
    let probe = run_cmd(
        {
            let mut cmd = std::process::Command::new("unshare");
            cmd.args(["--mount", "true"]);
            cmd
        },
        Duration::from_secs(10),
    );
    if !probe.success() {
        eprintln!("skipped: no mount namespaces here ({probe}); validators get copies instead");
        return;
    }
    let (c, leader) = cluster(
        r#"validate = "touch \"$CLUSTERD_ROOT/from-validator\" {}/in-copy {node_dir}/data/from-validator; true""#,
    );
    write_file(
        &c.set_path(leader, "tacacs").join("tac_plus.conf"),
        "key = x\n",
    );
    wait_content(
        &c,
        &c.others(&[leader]),
        "tacacs",
        "tac_plus.conf",
        "key = x\n",
    );
    for id in c.ids() {
        let live = c.set_path(id, "tacacs");
        assert!(
            !live.join("from-validator").exists(),
            "node {id}: the validator wrote the live root"
        );
        assert!(
            !live.join("in-copy").exists(),
            "node {id}: the validator wrote through its view"
        );
        let data = c.node(id).data_dir.join("from-validator");
        assert!(!data.exists(), "node {id}: the validator wrote data_dir");
    }
}
