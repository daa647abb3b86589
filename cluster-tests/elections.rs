//! Leader election on real `clusterd` processes: one leader agreed by all,
//! a new one after the leader is SIGKILLed, `clusterctl promote` (and its
//! refusals), a restarted node keeping its term and vote, isolated nodes
//! (a leader steps down, a follower neither leads nor raises its term), and
//! a SIGTERMed leader handing leadership over before it exits.

use std::time::Duration;

use crate::harness::*;

#[test]
fn elects_one_leader() {
    let c = Cluster::start(3);
    let all = c.ids();
    // Exactly one node says it is leader, the others say follower, and every
    // node's view names that leader, in the same term.
    let (leader, views) = wait_until(
        ELECTION_DEADLINE,
        "one leader and two followers, all agreeing",
        || {
            let (l, views) = c.leader_agreement_views(&all)?;
            let summary = views.iter().map(|v| v.to_string()).collect::<Vec<_>>();
            let leaders = views.iter().filter(|v| v.is_leader()).count();
            let followers = views.iter().filter(|v| v.role == "follower").count();
            if leaders == 1 && followers == 2 {
                Ok((l, views))
            } else {
                Err(format!("roles: {}", summary.join(" | ")))
            }
        },
    );
    assert!(all.contains(&leader));
    for v in &views {
        assert_eq!(
            v.raw.get("node_id").and_then(|n| n.as_u64()),
            Some(v.id),
            "status of node {} must carry its own node_id: {}",
            v.id,
            v.raw
        );
    }

    // The leader lists every member, all reachable.
    wait_until(
        ELECTION_DEADLINE,
        "the leader's status to list all 3 nodes as reachable",
        || {
            let v = c.view(leader)?;
            let nodes = v.raw["nodes"].as_array().cloned().unwrap_or_default();
            if nodes.len() != 3 {
                return Err(format!("expected 3 entries in nodes: {}", v.raw));
            }
            if all.iter().all(|&i| v.reachable(i) == Some(true)) {
                Ok(())
            } else {
                Err(format!("not all reachable: {}", v.raw))
            }
        },
    );

    // Accepting proposals, through the leader and through each follower.
    for &i in &all {
        c.wait_barrier(i);
    }
    // Still the same leader afterwards.
    c.wait_for_leader_is(&all, leader);
}

#[test]
fn sigkill_of_leader_elects_another() {
    let c = Cluster::start(3);
    let all = c.ids();
    let old = c.wait_for_leader(&all);
    c.wait_barrier(old);
    let old_term = c.view_now(old).term;

    c.kill(old);
    let survivors = c.others(&[old]);
    let new = c.wait_for_leader(&survivors);
    assert_ne!(new, old, "a killed node cannot be leader");
    let new_term = c.view_now(new).term;
    assert!(
        new_term > old_term,
        "the new leader's term {new_term} must exceed the old one {old_term}"
    );

    for &s in &survivors {
        c.wait_barrier(s);
    }

    // The survivors' status lists the dead node as unreachable.
    wait_until(
        ELECTION_DEADLINE,
        &format!("node {new} to list the killed node {old} as reachable:false"),
        || {
            let v = c.view(new)?;
            match v.reachable(old) {
                Some(false) => Ok(()),
                other => Err(format!("reachable = {other:?}: {}", v.raw)),
            }
        },
    );
}

#[test]
fn promote_moves_leadership() {
    let c = Cluster::start(3);
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);
    let followers = c.others(&[leader]);
    let (a, b) = (followers[0], followers[1]);

    // 1. Promote follower `a`, asked through the other follower `b`.
    let out = c.promote(b, a);
    assert!(out.success(), "promote {a} via node {b}: {out}");
    c.wait_for_leader_is(&all, a);
    c.wait_barrier(b);

    // 2. Promote `b` (a follower again), asked through its own socket.
    let out = c.promote(b, b);
    assert!(out.success(), "promote {b} via its own socket: {out}");
    c.wait_for_leader_is(&all, b);
    c.wait_barrier(a);

    // 3. Promoting the current leader is a no-op that succeeds.
    let out = c.promote(leader, b);
    assert!(
        out.success(),
        "promote of the current leader {b} via node {leader}: {out}"
    );
    c.wait_for_leader_is(&all, b);

    // 4. An unknown node id is refused, with a reason.
    let out = c.promote_with_timeout(a, 9, 3000);
    assert!(!out.timed_out, "promote 9 must not hang: {out}");
    assert!(
        out.code.is_some_and(|code| code != 0),
        "promote of unknown node 9 must exit non-zero: {out}"
    );
    assert!(
        !out.stderr.trim().is_empty(),
        "promote of unknown node 9 must say why on stderr: {out}"
    );
    // Nothing moved.
    c.wait_for_leader_is(&all, b);
}

#[test]
fn restarted_node_keeps_term_and_vote() {
    let c = Cluster::start(3);
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);

    // A follower that voted for the current leader in the current term: the
    // leader got at least one such vote, so one exists.
    let (f, term, vote) = wait_until(
        ELECTION_DEADLINE,
        &format!("a follower that voted for leader {leader} in its term"),
        || {
            let lv = c.view(leader)?;
            let mut seen = Vec::new();
            for f in c.others(&[leader]) {
                let v = c.view(f)?;
                if v.role == "follower" && v.term == lv.term && v.vote == leader {
                    return Ok((f, v.term, v.vote));
                }
                seen.push(v.to_string());
            }
            Err(format!("leader: {lv}; followers: {}", seen.join(" | ")))
        },
    );

    c.kill(f);
    c.start_node(f);

    let first = wait_until(
        ELECTION_DEADLINE,
        &format!("restarted node {f} to answer status"),
        || {
            c.assert_alive(f);
            c.view(f)
        },
    );
    assert!(
        first.term >= term,
        "node {f} restarted with term {} < {term} recorded before the kill: {first}",
        first.term
    );
    if first.term == term {
        assert_eq!(
            first.vote, vote,
            "node {f} restarted in the same term {term} but with vote {} instead of {vote}",
            first.vote
        );
    }

    let now = c.wait_for_leader(&all);
    wait_until(
        ELECTION_DEADLINE,
        &format!("restarted node {f} to follow leader {now}"),
        || {
            let v = c.view(f)?;
            if v.role == "follower" && v.leader == Some(now) {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    );
    c.wait_barrier(f);
}

#[test]
fn isolated_node_cannot_lead_and_isolated_leader_steps_down() {
    let c = Cluster::start(3);
    let all = c.ids();

    // --- Part 1: an isolated leader steps down; the majority goes on. -------
    let old = c.wait_for_leader(&all);
    c.wait_barrier(old);
    c.isolate(old);

    // A proposal through the isolated leader can never commit.
    let out = c.barrier_with_timeout(old, 2000);
    assert!(
        !out.success(),
        "a barrier through the isolated leader {old} must fail: {out}"
    );

    wait_until(
        ELECTION_DEADLINE,
        &format!("isolated leader {old} to step down (check_quorum)"),
        || {
            let v = c.view(old)?;
            if v.is_leader() {
                Err(v.to_string())
            } else {
                Ok(())
            }
        },
    );
    let majority = c.others(&[old]);
    let new = c.wait_for_leader(&majority);
    assert_ne!(new, old);
    for &i in &majority {
        c.wait_barrier(i);
    }

    // Heal: the old leader comes back as a follower of the new one.
    c.heal_all();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(old);

    // --- Part 2: an isolated follower never leads and, thanks to pre_vote,
    // never raises its term. ----------------------------------------------
    let f = c.others(&[leader])[0];
    c.isolate(f);
    let term0 = wait_until(
        ELECTION_DEADLINE,
        &format!("isolated follower {f} to answer status"),
        || c.view(f),
    )
    .term;
    let samples = observe_window(&c, f, THREE_ELECTIONS, 5, |v| {
        assert!(
            !v.is_leader(),
            "isolated follower {f} must never report itself leader: {v}"
        );
        assert_eq!(
            v.term, term0,
            "isolated follower {f} raised its term (pre_vote must prevent it): {v}"
        );
    });
    assert!(samples >= 5);

    // Meanwhile the other two keep a leader and accept proposals.
    let rest = c.others(&[f]);
    c.wait_for_leader(&rest);
    for &i in &rest {
        c.wait_barrier(i);
    }

    // Heal: everyone converges on one leader.
    c.heal_all();
    c.wait_for_leader(&all);
    c.wait_barrier(f);
    c.wait_for_leader(&all);
}

#[test]
fn sigterm_of_leader_hands_leadership_over_before_exiting() {
    let c = Cluster::start(3);
    let all = c.ids();
    let old = c.wait_for_leader(&all);
    c.wait_barrier(old);

    let status = c
        .terminate(old, Duration::from_secs(15))
        .expect("the leader was running");
    assert!(
        status.success(),
        "SIGTERM must end the node cleanly, got {status:?}"
    );
    let log = c.log(old);
    let successor: u64 = log
        .lines()
        .find_map(|l| l.split("handing leadership to node ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("node {old} did not start a handover on SIGTERM:\n{log}"));
    assert!(
        log.contains("handed leadership over; exiting"),
        "node {old} exited before its successor took over:\n{log}"
    );
    let survivors = c.others(&[old]);
    assert_eq!(c.wait_for_leader(&survivors), successor);
    c.wait_barrier(successor);
}

#[test]
fn promote_of_an_unreachable_node_fails_with_the_reason() {
    let c = Cluster::start(3);
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);
    let victim = c.others(&[leader])[0];
    c.kill(victim);
    let out = c.promote_with_timeout(leader, victim, 3_000);
    assert!(!out.success(), "promoting a dead node must fail: {out}");
    assert!(
        out.stderr
            .contains(&format!("node {victim} is unreachable")),
        "the reason must name the unreachable node: {out}"
    );
    // The failed transfer left the cluster led and committing.
    let survivors = c.others(&[victim]);
    assert_eq!(c.wait_for_leader(&survivors), leader);
    c.wait_barrier(leader);
}
