//! Role hooks on real processes: `on_promote` / `on_demote` run with the
//! documented environment, in order, and `role_file` always says "1" on the
//! leader and "0" elsewhere (a drop-in for scripts that read a PROMOTE file).

use std::fs;
use std::time::Duration;

use crate::harness::*;

const HOOKS: &str = r#"
[hooks]
on_promote = "echo promote $CLUSTERD_ROLE $CLUSTERD_TERM $CLUSTERD_LEADER_ID $CLUSTERD_NODE_ID >> {node_dir}/hooks.log"
on_demote = "echo demote $CLUSTERD_ROLE $CLUSTERD_TERM $CLUSTERD_LEADER_ID $CLUSTERD_NODE_ID >> {node_dir}/hooks.log"
role_file = "{node_dir}/PROMOTE"
"#;

fn read(c: &Cluster, id: u64, name: &str) -> String {
    fs::read_to_string(c.node(id).dir.join(name)).unwrap_or_default()
}

#[test]
fn role_hooks_run_in_order_with_their_environment_and_the_role_file_follows() {
    let mut b = Cluster::builder(3);
    for id in 1..=3 {
        b = b.extra_toml(id, HOOKS);
    }
    let c = b.start();
    let all = c.ids();
    let first = c.wait_for_leader(&all);
    let term = c.view_now(first).term;
    wait_until(
        scaled(Duration::from_secs(10)),
        "role files and the promote hook",
        || {
            let mut problems = Vec::new();
            for &id in &all {
                let want = if id == first { "1\n" } else { "0\n" };
                let got = read(&c, id, "PROMOTE");
                if got != want {
                    problems.push(format!("node {id}: PROMOTE is {got:?}, want {want:?}"));
                }
            }
            let log = read(&c, first, "hooks.log");
            let want = format!("promote leader {term} {first} {first}\n");
            if log != want {
                problems.push(format!("node {first}: hooks.log is {log:?}, want {want:?}"));
            }
            if problems.is_empty() {
                Ok(())
            } else {
                Err(problems.join("; "))
            }
        },
    );
    for &id in all.iter().filter(|&&i| i != first) {
        assert_eq!(
            read(&c, id, "hooks.log"),
            "",
            "node {id} never led, so no hook ran"
        );
    }

    // A planned switchover: the old leader is demoted, the target promoted.
    let target = *all.iter().find(|&&i| i != first).unwrap();
    let out = c.promote(first, target);
    assert!(out.success(), "{out:?}");
    let term2 = c.view_now(target).term;
    wait_until(
        scaled(Duration::from_secs(10)),
        "the hooks of the switchover",
        || {
            let old = read(&c, first, "hooks.log");
            let new = read(&c, target, "hooks.log");
            let ok = old.starts_with(&format!(
                "promote leader {term} {first} {first}\ndemote follower {term2} "
            )) && new == format!("promote leader {term2} {target} {target}\n")
                && read(&c, first, "PROMOTE") == "0\n"
                && read(&c, target, "PROMOTE") == "1\n";
            if ok {
                Ok(())
            } else {
                Err(format!("node {first}: {old:?}; node {target}: {new:?}"))
            }
        },
    );
}
