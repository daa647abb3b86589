//! Planned switchover with files (issue 4): `clusterctl promote` waits until
//! the target has applied everything the cluster committed, then hands
//! leadership over, so nothing is lost and nothing is quarantined; and
//! `--dry-run` says what it would wait for without changing anything.

use std::thread;
use std::time::Duration;

use crate::harness::tree::*;
use crate::harness::*;

const CONVERGE: Duration = Duration::from_secs(30);

/// A 3-node cluster with one mirror set `name` (plus `extra` lines), ready
/// to replicate; returns it with its leader, the promote target and the node
/// the admin talks to (the third).
fn cluster_with(name: &str, extra: &str) -> (Cluster, u64, u64, u64) {
    let mut b = Cluster::builder(3).sync_set(name, "mirror", extra);
    for id in 1..=3 {
        b = b.extra_toml(id, "[replication]\ndebounce_ms = 20\nrescan_secs = 300");
    }
    let c = b.start();
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);
    wait_sets_ready(&c, &all, &[name]);
    let others = c.others(&[leader]);
    let (target, via) = (others[0], others[1]);
    (c, leader, target, via)
}

/// Runs `clusterctl promote target` on node `via` in the background, checks
/// for a while that `target` is not handed leadership while it lags, then
/// lets it catch up (`release`) and expects the promote to succeed.
fn promote_waits_until(c: &Cluster, via: u64, target: u64, release: impl FnOnce()) {
    thread::scope(|s| {
        let promote = s.spawn(|| {
            c.ctl(
                via,
                &["promote", &target.to_string(), "--timeout-ms", "60000"],
                Duration::from_secs(70),
            )
        });
        hold_for(
            Duration::from_secs(3),
            &format!("node {target} must not be handed leadership while it lags"),
            || match c.view(via) {
                Ok(v) if v.leader == Some(target) => {
                    Err(format!("node {target} leads while it lags: {v:?}"))
                }
                _ => Ok(()),
            },
        );
        release();
        let out = promote.join().expect("promote thread");
        assert!(
            out.success() && out.stdout.contains(&format!("node {target} is the leader")),
            "{out:?}"
        );
    });
}

/// The target is cut off from the leader (but not from the node the admin
/// talks to) while 20 files are committed through the third node: promote
/// must not transfer to a node that lacks them. Once the link heals, the
/// target catches up, takes over, and every node ends identical with empty
/// quarantines.
#[test]
fn promote_waits_until_the_target_has_applied_everything_then_transfers() {
    let (c, leader, target, via) = cluster_with("conf", "");
    let all = c.ids();
    let root = c.set_path(leader, "conf");

    write_file(&root.join("before"), "committed everywhere\n");
    wait_trees_equal(&c, "conf", &leader_then(leader, &all), CONVERGE);

    c.cut(leader, target);
    for i in 0..20 {
        write_file(
            &root.join(format!("while-cut-{i:02}")),
            &format!("version {i}\n"),
        );
    }
    // Committed by the leader and `via`, a majority without the target.
    wait_trees_equal(&c, "conf", &[leader, via], CONVERGE);
    let behind = snapshot(&c.set_path(target, "conf"));
    assert!(
        behind.keys().all(|k| !k.contains("while-cut")),
        "node {target} got files over a cut link: {behind:?}"
    );

    let dry = c.ctl(
        via,
        &["promote", &target.to_string(), "--dry-run"],
        STATUS_TIMEOUT,
    );
    assert!(dry.success(), "{dry:?}");
    assert!(
        dry.stdout.contains(&format!("node {leader} leads term"))
            && dry.stdout.contains(&format!(
                "would first wait until node {target} has caught up"
            ))
            && dry.stdout.contains("Nothing was changed."),
        "{dry:?}"
    );
    assert_eq!(
        c.wait_for_leader(&all),
        leader,
        "a dry run must not move leadership"
    );

    promote_waits_until(&c, via, target, || c.heal(leader, target));
    c.wait_for_leader_is(&all, target);
    wait_trees_equal(&c, "conf", &leader_then(target, &all), CONVERGE);

    // The new leader is the source now.
    write_file(
        &c.set_path(target, "conf").join("after"),
        "from the new leader\n",
    );
    wait_trees_equal(&c, "conf", &leader_then(target, &all), CONVERGE);
    for id in all {
        let q = quarantine_tree(&c, id);
        assert!(
            q.is_empty(),
            "a planned switchover quarantined on node {id}: {q:?}"
        );
    }
}

/// The target holds every entry (nothing is cut) but has not applied a set
/// because a `skip_while` marker lies in it, as the seeds' Bayesian database
/// check does: raft-rs alone would hand leadership over at once, and the new
/// leader would lack the files. promote waits until the marker is gone and
/// the target has applied them.
#[test]
fn promote_waits_while_the_target_defers_a_set_for_a_skip_while_marker() {
    let (c, leader, target, via) =
        cluster_with("mail", "exclude = [\"*.lock\"]\nskip_while = [\"*.lock\"]");
    let all = c.ids();
    let root = c.set_path(leader, "mail");
    let marker = c.set_path(target, "mail").join("bayes.lock");
    write_file(&marker, "held by a training run\n");
    write_file(&root.join("aliases"), "postmaster: root\n");
    wait_trees_equal(&c, "mail", &[leader, via], CONVERGE);
    wait_until(
        CONVERGE,
        &format!("node {target} to report set mail skipping"),
        || match set_status(&c, via, target, "mail") {
            Ok(s) if s["skipping"] == true => Ok(()),
            Ok(s) => Err(format!("{s}")),
            Err(e) => Err(e),
        },
    );

    let dry = c.ctl(
        via,
        &["promote", &target.to_string(), "--dry-run"],
        STATUS_TIMEOUT,
    );
    assert!(
        dry.success()
            && dry
                .stdout
                .contains("waits there for a skip_while marker to disappear"),
        "{dry:?}"
    );
    promote_waits_until(&c, via, target, || std::fs::remove_file(&marker).unwrap());
    c.wait_for_leader_is(&all, target);
    wait_trees_equal(&c, "mail", &leader_then(target, &all), CONVERGE);
    for id in all {
        let q = quarantine_tree(&c, id);
        assert!(
            q.is_empty(),
            "a planned switchover quarantined on node {id}: {q:?}"
        );
    }
}
