//! Replacing a dead node (the README's procedure): same id and certificate,
//! an empty data dir, and it catches up by itself.

use std::time::Duration;

use crate::harness::*;

/// Replacing a dead node: a new machine with the same id and certificate and
/// an empty data dir joins and catches up by itself (the README's procedure).
#[test]
fn a_replaced_node_with_an_empty_data_dir_catches_up() {
    let c = Cluster::start(3);
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    for _ in 0..5 {
        c.wait_barrier(leader);
    }
    let victim = c.others(&[leader])[0];
    c.kill(victim);
    c.wait_barrier(leader);
    let data = c.node(victim).data_dir.clone();
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    c.start_node(victim);
    let target = c.view_now(leader).commit_index.unwrap();
    wait_until(
        Duration::from_secs(20),
        "the replaced node to apply everything committed",
        || {
            let v = c.view(victim)?;
            match v.applied_index {
                Some(a) if a >= target && v.leader == Some(leader) => Ok(()),
                _ => Err(format!("{}", v.raw)),
            }
        },
    );
    assert!(
        c.log(victim).contains("new node: creating the Raft log"),
        "the replacement must start from an empty log"
    );
    c.wait_barrier(victim);
}
