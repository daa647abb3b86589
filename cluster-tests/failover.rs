//! Failover with file replication between real `clusterd` processes
//! (issue 4): after the leader dies the new leader is the source and its
//! changes reach everyone, the old leader comes back as a follower and
//! converges; an edit a partitioned old leader could never commit ends in
//! that node's quarantine and nowhere else; two data nodes and a witness
//! survive the loss of either data node; and a plain two-node cluster is
//! refused at start unless the user accepts that it cannot fail over.
//!
//! As in `replication.rs`: the harness's fast Raft timers, a 20 ms watcher
//! debounce and a 300 s rescan (so nothing is rescued by a rescan within a
//! deadline); files are written only on the node that leads, except where a
//! test is about an old leader's stale edit. Every wait is `wait_until` with a
//! deadline; every "nothing happens" is `hold_for`.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::Value;

use crate::harness::tree::*;
use crate::harness::*;

/// `[replication]` of every node in these tests.
const REPLICATION: &str = "[replication]\ndebounce_ms = 20\nrescan_secs = 300";
/// Deadline for small changes to reach every follower, including a node
/// that restarted and catches up.
const CONVERGE: Duration = Duration::from_secs(30);
/// How long the quarantines are watched for a late, unwanted entry.
const QUIET: Duration = Duration::from_secs(1);

/// A cluster of `n` nodes with `[replication]` as above, the sets and
/// options `configure` adds; returns it with its leader once a barrier went
/// through and the data nodes `data` report the sets `names`.
fn start_cluster(
    n: u64,
    data: &[u64],
    names: &[&str],
    configure: impl FnOnce(ClusterBuilder) -> ClusterBuilder,
) -> (Cluster, u64) {
    let mut b = Cluster::builder(n);
    for id in 1..=n {
        b = b.extra_toml(id, REPLICATION);
    }
    let c = configure(b).start();
    let leader = c.wait_for_leader(&c.ids());
    c.wait_barrier(leader);
    wait_sets_ready(&c, data, names);
    (c, leader)
}

#[track_caller]
fn read(path: &std::path::Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Panics unless every node of `ids` has an empty quarantine and lists no
/// conflict, watching the directories for `QUIET` first (a set-aside may
/// come from a reconcile that runs just after the trees matched).
#[track_caller]
fn assert_no_quarantine(c: &Cluster, ids: &[u64]) {
    hold_for(
        QUIET,
        &format!("nodes {ids:?} quarantining nothing"),
        || {
            for &id in ids {
                let q = quarantine_tree(c, id);
                if !q.is_empty() {
                    return Err(format!("node {id} quarantined {q:?}"));
                }
            }
            Ok(())
        },
    );
    for &id in ids {
        let records = wait_until(
            Duration::from_secs(10),
            &format!("node {id}'s conflicts"),
            || conflict_records(c, id),
        );
        assert!(
            records.is_empty(),
            "node {id} lists conflicts though nothing was edited outside the leader: {records:?}"
        );
    }
}

/// The leader's own status entry for `set`: (`seq`, `bytes`), its count of
/// applied (so committed) batches of the set and their total file bytes.
fn set_progress(c: &Cluster, leader: u64, set: &str) -> Result<(u64, u64), String> {
    let s = set_status(c, leader, leader, set)?;
    match (s["seq"].as_u64(), s["bytes"].as_u64()) {
        (Some(seq), Some(bytes)) => Ok((seq, bytes)),
        _ => Err(format!(
            "node {leader}'s set {set:?} has no numeric seq/bytes: {s}"
        )),
    }
}

/// Total length of the regular files in `tree`.
fn file_bytes(tree: &Tree) -> u64 {
    tree.values()
        .filter(|i| i.kind == Kind::File)
        .map(|i| i.size)
        .sum()
}

/// Waits until `follower` has everything `leader` has (same last log index,
/// applied up to the leader's commit index, both agreeing who leads): the
/// steady state in which losing `leader` must cost nothing. With a witness
/// this matters: a committed entry held only by the leader and the witness
/// (which keeps no payloads) would make the witness refuse its vote to the
/// other data node, and nobody could lead until the leader returned.
#[track_caller]
fn wait_caught_up(c: &Cluster, leader: u64, follower: u64) {
    wait_until(
        CONVERGE,
        &format!("node {follower} to hold node {leader}'s whole log"),
        || {
            let l = c.view(leader)?;
            let f = c.view(follower)?;
            let last = |v: &View| entry(&v.raw, v.id).and_then(|e| e["last_index"].as_u64());
            let ok = l.is_leader()
                && f.leader == Some(leader)
                && last(&l).is_some()
                && last(&l) == last(&f)
                && f.applied_index.is_some()
                && f.applied_index == l.commit_index;
            if ok {
                Ok(())
            } else {
                Err(format!("{l} | {f}"))
            }
        },
    );
}

/// Pull the power on the leader: a follower takes over and is the source
/// (its edits, creations and deletions reach the other survivor); the old
/// leader restarts, rejoins as a follower, converges to everything changed
/// while it was dead, and follows live changes. Nothing was edited outside
/// the leader, so no node quarantines anything.
#[test]
fn leader_sigkill_then_new_leaders_edits_reach_all_and_old_leader_converges() {
    let (c, old) = start_cluster(3, &[1, 2, 3], &["conf"], |b| {
        b.sync_set("conf", "mirror", "")
    });
    let all = c.ids();
    let root = c.set_path(old, "conf");
    write_file(&root.join("tac_plus.conf"), "key = v1\n");
    write_file(&root.join("keep.conf"), "unchanged\n");
    write_file(&root.join("doomed.conf"), "deleted while node is dead\n");
    fs::create_dir_all(root.join("users/old")).unwrap();
    write_file(&root.join("users/old/alice"), "alice\n");
    write_file(&root.join("users/bob"), "bob v1\n");
    wait_trees_equal(&c, "conf", &leader_then(old, &all), CONVERGE);

    c.kill(old);
    let survivors = c.others(&[old]);
    let new = c.wait_for_leader(&survivors);
    let follower = c.others(&[old, new])[0];

    // The new leader's tree is the source now: an edit, an editor-style
    // save, a creation in a new directory, a file and a directory deleted.
    let nroot = c.set_path(new, "conf");
    write_file(
        &nroot.join("tac_plus.conf"),
        "key = v2, set on the new leader\n",
    );
    write_file(&nroot.join("users/bob.tmp"), "bob v2\n");
    fs::rename(nroot.join("users/bob.tmp"), nroot.join("users/bob")).unwrap();
    fs::create_dir_all(nroot.join("new-dir")).unwrap();
    write_file(
        &nroot.join("new-dir/created.conf"),
        "created on the new leader\n",
    );
    fs::remove_file(nroot.join("doomed.conf")).unwrap();
    fs::remove_dir_all(nroot.join("users/old")).unwrap();
    let t = wait_trees_equal(&c, "conf", &[new, follower], CONVERGE);
    let froot = c.set_path(follower, "conf");
    assert_eq!(
        read(&froot.join("tac_plus.conf")),
        "key = v2, set on the new leader\n"
    );
    assert_eq!(read(&froot.join("users/bob")), "bob v2\n");
    assert!(t.contains_key("new-dir/created.conf"), "{t:?}");
    assert!(
        !t.contains_key("doomed.conf") && !t.contains_key("users/old"),
        "{t:?}"
    );

    // The old leader returns with its pre-crash tree and follows.
    c.start_node(old);
    c.wait_for_leader_is(&all, new);
    let order = leader_then(new, &all);
    wait_trees_equal(&c, "conf", &order, CONVERGE);
    let oroot = c.set_path(old, "conf");
    assert_eq!(
        read(&oroot.join("tac_plus.conf")),
        "key = v2, set on the new leader\n"
    );
    assert!(!oroot.join("doomed.conf").exists());
    assert_eq!(c.view_now(old).role, "follower");

    // And the direction stays reversed for live changes.
    write_file(
        &nroot.join("keep.conf"),
        "changed after the old leader returned\n",
    );
    wait_trees_equal(&c, "conf", &order, CONVERGE);
    assert_eq!(
        read(&oroot.join("keep.conf")),
        "changed after the old leader returned\n"
    );
    assert_no_quarantine(&c, &all);
}

/// An old leader cut off from both peers keeps an edit (and a new file) it
/// could never commit: it may still believe it leads for up to an election
/// timeout and propose them, but no majority accepts them. The majority
/// elects a leader that edits the same file differently. Once healed, the
/// old leader converges to the majority's content; its own versions lie in
/// its quarantine, listed by `clusterctl conflicts`, and nowhere else, and
/// no other node ever held them (invariants 1 and 4).
#[test]
fn an_edit_on_a_partitioned_old_leader_is_quarantined_there_only() {
    let (c, old) = start_cluster(3, &[1, 2, 3], &["conf"], |b| {
        b.sync_set("conf", "mirror", "")
    });
    let all = c.ids();
    let majority = c.others(&[old]);
    let oroot = c.set_path(old, "conf");
    write_file(&oroot.join("users"), "alice\n");
    wait_trees_equal(&c, "conf", &leader_then(old, &all), CONVERGE);

    const STALE: &str = "alice\nmallory, added on the partitioned old leader\n";
    const STRAY: &str = "created on the partitioned old leader\n";
    const MAJORITY: &str = "alice\nbob, added by the majority's new leader\n";

    // Samples the majority's copies for the whole test: neither stale
    // version may ever appear there, not even for a moment.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let sampler = {
        let roots: Vec<(u64, PathBuf)> = majority
            .iter()
            .map(|&id| (id, c.set_path(id, "conf")))
            .collect();
        let (stop, seen) = (stop.clone(), seen.clone());
        thread::spawn(move || {
            let mut samples = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (id, root) in &roots {
                    if fs::read_to_string(root.join("users")).is_ok_and(|s| s == STALE) {
                        seen.lock()
                            .unwrap()
                            .push(format!("node {id} held the stale users"));
                    }
                    if root.join("stray.conf").exists() {
                        seen.lock()
                            .unwrap()
                            .push(format!("node {id} held stray.conf"));
                    }
                }
                samples += 1;
                thread::sleep(Duration::from_millis(5));
            }
            samples
        })
    };

    c.isolate(old);
    write_file(&oroot.join("users"), STALE);
    write_file(&oroot.join("stray.conf"), STRAY);
    // Whether it proposed before check-quorum deposed it (the usual case)
    // or only after (then they are plain local edits on a follower), the
    // outcome below must be the same; say which path this run took.
    let proposed = wait_until(
        Duration::from_secs(10),
        &format!("isolated node {old} to propose the edit or step down"),
        || {
            let v = c.view(old)?;
            let last = entry(&v.raw, old).and_then(|e| e["last_index"].as_u64());
            match (v.is_leader(), last, v.commit_index) {
                (true, Some(l), Some(ci)) if l > ci => Ok(true),
                (false, _, _) => Ok(false),
                _ => Err(v.to_string()),
            }
        },
    );
    eprintln!(
        "isolated old leader {old} {}",
        if proposed {
            "proposed the edit (uncommitted) while it still led"
        } else {
            "stepped down before proposing"
        }
    );

    let new = c.wait_for_leader(&majority);
    let nroot = c.set_path(new, "conf");
    write_file(&nroot.join("users"), MAJORITY);
    wait_trees_equal(&c, "conf", &leader_then(new, &majority), CONVERGE);
    // Check-quorum: the cut-off node no longer claims to lead.
    wait_until(
        CONVERGE,
        &format!("isolated node {old} to stop leading"),
        || {
            let v = c.view(old)?;
            if v.is_leader() {
                Err(v.to_string())
            } else {
                Ok(())
            }
        },
    );

    c.heal_all();
    c.wait_for_leader_is(&all, new);
    let t = wait_trees_equal(&c, "conf", &leader_then(new, &all), CONVERGE);
    assert_eq!(read(&oroot.join("users")), MAJORITY);
    assert!(!t.contains_key("stray.conf"), "{t:?}");

    // The old leader's versions are in its quarantine, with records.
    let records = wait_until(
        CONVERGE,
        &format!("node {old}'s conflicts to list users and stray.conf"),
        || {
            let r = conflict_records(&c, old)?;
            let has = |p: &str| r.iter().any(|x| x["path"] == p);
            if has("users") && has("stray.conf") {
                Ok(r)
            } else {
                Err(format!("{r:?}"))
            }
        },
    );
    for (path, content) in [("users", STALE), ("stray.conf", STRAY)] {
        let matching: Vec<&Value> = records.iter().filter(|r| r["path"] == path).collect();
        assert_eq!(matching.len(), 1, "one record for {path}: {records:?}");
        let r = matching[0];
        assert_eq!(
            (r["set"].as_str(), r["node"].as_u64()),
            (Some("conf"), Some(old)),
            "{r}"
        );
        assert!(
            r["term"].as_u64().is_some_and(|t| t >= 1)
                && r["time_unix_ms"].as_u64().is_some_and(|t| t > 0),
            "{r}"
        );
        let hash = blake3::hash(content.as_bytes()).to_hex().to_string();
        assert_eq!(r["local_hash"].as_str(), Some(hash.as_str()), "{r}");
        let stored = r["stored_at"]
            .as_str()
            .unwrap_or_else(|| panic!("record without stored_at: {r}"));
        let copy = c.node(old).data_dir.join("quarantine").join(stored);
        assert_eq!(read(&copy), content, "the quarantined copy of {path} ({r})");
    }
    assert_eq!(records.len(), 2, "only the two stale versions: {records:?}");
    assert_eq!(
        node_counter(&c, old, old, "quarantined").ok(),
        Some(2),
        "node {old}'s status counts its conflicts"
    );

    // Nowhere else, and the majority never held them.
    assert_no_quarantine(&c, &majority);
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().expect("sampler thread");
    let seen = seen.lock().unwrap();
    assert!(
        seen.is_empty(),
        "the majority held an uncommitted version ({samples} samples): {seen:?}"
    );
    assert!(samples > 10, "the sampler barely ran ({samples} samples)");
}

/// Nodes 1 and 2 hold the data, node 3 is a witness. Each data node in turn
/// is SIGKILLed: the other one leads (never the witness), commits an edit
/// with only the witness's vote beside its own, and the killed node, once
/// restarted, gets that edit.
#[test]
fn a_witness_cluster_survives_the_loss_of_either_data_node() {
    // The set only on the data nodes: a witness refuses [[sync]] sets.
    let set = "[[sync]]\nname = \"conf\"\npath = \"{node_dir}/sets/conf\"\nmode = \"mirror\"";
    let (c, first) = start_cluster(3, &[1, 2], &["conf"], |b| {
        b.witness(3).extra_toml(1, set).extra_toml(2, set)
    });
    let all = c.ids();
    assert_ne!(first, 3, "the witness must not lead");
    let root = c.set_path(first, "conf");
    write_file(&root.join("tac_plus.conf"), "written before any failure\n");
    let other = if first == 1 { 2 } else { 1 };
    wait_trees_equal(&c, "conf", &[first, other], CONVERGE);

    // The first leader dies first, then the node that replaced it: each
    // data node is lost once, whichever role it has by then.
    let mut killed = Vec::new();
    for victim in [first, other] {
        let survivor = if victim == 1 { 2 } else { 1 };
        let leader = c.wait_for_leader(&all);
        wait_caught_up(&c, leader, if leader == victim { survivor } else { victim });

        c.kill(victim);
        killed.push(victim);
        c.wait_for_leader_is(&[survivor, 3], survivor);
        assert_eq!(c.view_now(3).role, "witness");

        // An edit on the survivor is committed by it and the witness: its
        // applier (which applies only committed batches) counts the batch.
        let sroot = c.set_path(survivor, "conf");
        let (seq0, _) = wait_until(
            Duration::from_secs(10),
            "the survivor's set progress",
            || set_progress(&c, survivor, "conf"),
        );
        let text = format!("edited on node {survivor} while node {victim} is dead\n");
        write_file(&sroot.join("tac_plus.conf"), &text);
        write_file(
            &sroot.join(format!("added-while-{victim}-dead.conf")),
            "new file\n",
        );
        let want_bytes = file_bytes(&snapshot(&sroot));
        wait_until(
            CONVERGE,
            &format!("node {survivor} to commit the edit with the witness"),
            || match set_progress(&c, survivor, "conf")? {
                (seq, bytes) if seq > seq0 && bytes == want_bytes => Ok(()),
                p => Err(format!(
                    "(seq, bytes) = {p:?}, want seq > {seq0}, bytes {want_bytes}"
                )),
            },
        );
        c.wait_barrier(survivor);

        c.start_node(victim);
        c.wait_for_leader_is(&all, survivor);
        wait_trees_equal(&c, "conf", &[survivor, victim], CONVERGE);
        assert_eq!(
            read(&c.set_path(victim, "conf").join("tac_plus.conf")),
            text
        );
    }
    assert_eq!(killed.len(), 2);
    assert_ne!(killed[0], killed[1], "both data nodes were lost once");
    assert_no_quarantine(&c, &[1, 2]);
}

/// Two voters cannot lose either one and keep a majority: without a witness
/// both nodes refuse to start, naming `allow_two_node`; with it set they
/// start, form a cluster, and warn that it cannot fail over.
#[test]
fn a_two_node_cluster_without_a_witness_refuses_to_start_unless_allowed() {
    let c = Cluster::builder(2).start();
    for id in c.ids() {
        let st = wait_until(
            Duration::from_secs(20),
            &format!("node {id} of a two-voter cluster to exit"),
            || c.exited(id),
        );
        assert!(
            st.code().is_some_and(|code| code != 0),
            "node {id} must exit non-zero: {st:?}"
        );
        let log = c.log(id);
        assert!(
            log.contains("allow_two_node") && log.contains("two voters"),
            "node {id} must say why, naming allow_two_node:\n{log}"
        );
    }
    drop(c);

    let c = Cluster::builder(2)
        .node_option(1, "allow_two_node = true")
        .node_option(2, "allow_two_node = true")
        .start();
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);
    for id in all {
        wait_until(
            Duration::from_secs(10),
            &format!("node {id} to warn that a two-node cluster cannot fail over"),
            || {
                let log = c.log(id);
                log.lines()
                    .find(|l| l.contains("WARN") && l.contains("cannot fail over"))
                    .map(str::to_string)
                    .ok_or_else(|| c.log_tail(id, 20))
            },
        );
    }
}
