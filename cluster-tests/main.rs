//! Multi-process tests: real `clusterd` processes on loopback, peer links
//! behind the harness's proxies, driven through `clusterctl`.
//!
//! Run: `cargo test --test cluster` (add `-- --test-threads=1` on a very
//! slow machine, or `CLUSTER_TESTS_TIME_SCALE=2` to widen every deadline).

mod chaos;
mod failover;
mod harness;
mod hooks;
mod hostile;
mod remote_admin;
mod replication;
mod secrets;
mod switchover;

use std::time::{Duration, Instant};

use harness::*;

/// A window of several election timeouts, to show that something does *not*
/// happen. Not scaled: it is about the nodes' timers, not the machine's speed.
const THREE_ELECTIONS: Duration = Duration::from_millis(3 * ELECTION_TIMEOUT_MS + 500);

/// Samples node `id`'s view until `window` has passed and at least
/// `min_samples` views were seen, calling `check` on each one (which panics
/// on a violation). Returns the number of views seen.
#[track_caller]
fn observe_window(
    c: &Cluster,
    id: u64,
    window: Duration,
    min_samples: usize,
    mut check: impl FnMut(&View),
) -> usize {
    let started = Instant::now();
    let mut seen = 0usize;
    let mut last = String::from("(no answer yet)");
    wait_until(
        window + Duration::from_secs(30),
        &format!("{min_samples} status samples of node {id} over {window:?}"),
        || {
            c.assert_alive(id);
            match c.view(id) {
                Ok(v) => {
                    check(&v);
                    last = v.to_string();
                    seen += 1;
                }
                Err(e) => last = e,
            }
            if started.elapsed() >= window && seen >= min_samples {
                Ok(seen)
            } else {
                Err(format!("{seen} samples so far; last: {last}"))
            }
        },
    )
}

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
fn peer_from_other_ca_is_refused() {
    let c = Cluster::builder(3).foreign_ca(&[3]).start();

    // The two nodes of the real CA form a quorum of the 3-node cluster.
    let leader = c.wait_for_leader(&[1, 2]);
    c.wait_barrier(leader);

    // Node 3 (other CA) never learns a leader.
    observe_window(&c, 3, THREE_ELECTIONS, 5, |v| {
        assert_eq!(
            v.leader, None,
            "node 3 has a certificate from another CA and must not see a leader: {v}"
        );
        assert!(!v.is_leader(), "node 3 must not lead: {v}");
    });

    // Nodes 1 and 2 log that they refused it.
    wait_until(
        ELECTION_DEADLINE,
        "node 1 or node 2 to log `refused peer`",
        || {
            if c.log(1).contains("refused peer") || c.log(2).contains("refused peer") {
                Ok(())
            } else {
                Err(format!(
                    "no `refused peer` yet; node 1 log tail:\n{}\nnode 2 log tail:\n{}",
                    c.log_tail(1, 10),
                    c.log_tail(2, 10)
                ))
            }
        },
    );

    // And the real members still agree.
    let again = c.wait_for_leader(&[1, 2]);
    c.wait_barrier(again);
}

#[test]
fn check_rejects_bad_config() {
    let dir = short_tempdir("clusterd-check-");
    let root = dir.path();
    let certs = root.join("certs");
    certs_init(&certs, &[1, 2, 3]);
    let data_dir = root.join("data");
    std::fs::create_dir_all(&data_dir).unwrap();

    let good = NodeConfig {
        id: 1,
        listen: format!("127.0.0.1:{}", free_port()),
        data_dir: data_dir.clone(),
        admin_socket: root.join("admin.sock"),
        timers: Some((HEARTBEAT_MS, ELECTION_TIMEOUT_MS)),
        tls: TlsFiles::in_dir(&certs, 1),
        peers: vec![
            (2, format!("127.0.0.1:{}", free_port())),
            (3, format!("127.0.0.1:{}", free_port())),
        ],
        witness_peers: vec![],
        node_extra: vec![],
        tls_extra: vec![],
        extra: String::new(),
    };

    let check = |name: &str, cfg: &NodeConfig| -> CmdOutput {
        let path = root.join(format!("{name}.toml"));
        cfg.write(&path);
        let out = check_config(&path);
        assert!(
            !out.timed_out,
            "--check of the {name} config must exit at once: {out}"
        );
        out
    };

    let out = check("good", &good);
    assert!(out.success(), "--check of a good config must exit 0: {out}");

    let mut dup = good.clone();
    dup.peers.push((2, format!("127.0.0.1:{}", free_port())));
    let out = check("duplicate-peer", &dup);
    assert!(
        !out.success(),
        "duplicate peer id 2 must be rejected: {out}"
    );
    assert!(
        out.stderr.contains("peer"),
        "the error about a duplicate peer id must name `peer`: {out}"
    );

    let mut zero = good.clone();
    zero.id = 0;
    let out = check("id-zero", &zero);
    assert!(!out.success(), "node.id = 0 must be rejected: {out}");
    assert!(
        out.stderr.contains("node.id"),
        "the error about id 0 must name `node.id`: {out}"
    );

    let mut missing = good.clone();
    missing.tls.cert = root.join("no-such-dir").join("node-1.crt");
    let out = check("missing-cert", &missing);
    assert!(
        !out.success(),
        "a missing tls.cert file must be rejected: {out}"
    );
    assert!(
        out.stderr.contains("tls.cert"),
        "the error about a missing certificate must name `tls.cert`: {out}"
    );

    // Without --check, a bad config also exits non-zero at once.
    let path = root.join("id-zero.toml");
    let mut cmd = std::process::Command::new(CLUSTERD);
    scrub_env(&mut cmd);
    cmd.arg("--config").arg(&path);
    let out = run_cmd(cmd, scaled(Duration::from_secs(20)));
    assert!(
        !out.timed_out && out.code.is_some_and(|code| code != 0),
        "clusterd with a bad config must exit non-zero at once: {out}"
    );
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

/// Speaks to node 1 directly (bypassing the proxies) as an impostor would.
#[test]
fn impostor_peers_are_refused_and_logged() {
    use clusterd::proto::peer::{NodeStatusRequest, RaftBatch};

    let c = Cluster::start(3);
    let all = c.ids();
    c.wait_for_leader(&all);
    let certs = c.dir().join("certs");
    // A certificate from the right CA, for a node that is not a member.
    certs_init(&certs, &[1, 2, 3, 4]);
    let target = c.node(1).listen.to_string();
    let tls_of = |id: u64| tls_from(&TlsFiles::in_dir(&certs, id), id);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    rt.block_on(async {
        // 1. Valid CA, but not a member.
        let mut outsider = direct_client(&target, tls_of(4));
        let r = outsider.node_status(NodeStatusRequest {}).await;
        assert!(r.is_err(), "a non-member got an answer: {r:?}");

        // 2. A member whose message claims to come from someone else.
        let mut liar = direct_client(&target, tls_of(2));
        let mut forged = raft::prelude::Message::default();
        forged.from = 3;
        forged.to = 1;
        forged.term = 1_000;
        forged.set_msg_type(raft::prelude::MessageType::MsgHeartbeat);
        let r = liar
            .raft(RaftBatch {
                messages: vec![clusterd::proto::encode_raft_message(&forged)],
                term: 1_000,
                no_ack: false,
                sender_applied: 0,
            })
            .await;
        let status = r.expect_err("a forged sender must be refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

        // 3. Plaintext gRPC.
        let plain = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2));
        if let Ok(channel) = plain.connect().await {
            let r = clusterd::proto::peer::peer_client::PeerClient::new(channel)
                .node_status(NodeStatusRequest {})
                .await;
            assert!(r.is_err(), "a plaintext client got an answer: {r:?}");
        }
    });

    wait_until(
        Duration::from_secs(10),
        "node 1 to log every refusal",
        || {
            let log = c.log(1);
            let wanted = [
                "which is not a member of this cluster",
                "claims to come from node 3",
                "TLS handshake failed",
            ];
            match wanted.iter().find(|w| !log.contains(**w)) {
                None => Ok(()),
                Some(missing) => Err(format!("no line containing {missing:?} yet")),
            }
        },
    );
    // The forged term-1000 heartbeat never reached Raft: the term is unchanged and
    // the cluster still commits.
    let v = c.view_now(1);
    assert!(v.term < 1_000, "a forged message moved the term: {}", v.raw);
    c.wait_barrier(1);
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

/// A witness holds no files, so it is served none: its (valid) certificate
/// cannot read a set's content through `Fetch` (the witness host is often the
/// monitoring server, and sets hold /etc/shadow).
#[test]
fn a_witness_is_refused_file_contents() {
    let c = Cluster::builder(3)
        .witness(3)
        .sync_set("secrets", "mirror", "")
        .start();
    let leader = c.wait_for_leader(&[1, 2]);
    c.wait_barrier(leader);
    harness::write_file(&c.set_path(1, "secrets").join("shadow"), "root:$6$secret\n");
    let witness_tls = tls_from(&TlsFiles::in_dir(&c.dir().join("certs"), 3), 3);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = rt.block_on(async {
        direct_client(&c.node(1).config().listen, witness_tls)
            .fetch(clusterd::proto::peer::FetchRequest {
                set: "secrets".into(),
                path: b"shadow".to_vec(),
                digest: clusterd::delta::digest(b"root:$6$secret\n")
                    .to_bytes()
                    .to_vec(),
                signature: Vec::new(),
            })
            .await
    });
    let status = refused.expect_err("a witness must not be served file contents");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    wait_until(
        scaled(Duration::from_secs(5)),
        "node 1 to log the refusal",
        || {
            let log = c.log(1);
            if log.contains("refused a file fetch from peer 3: it is a witness") {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    );
}

#[test]
fn a_witness_votes_but_never_leads() {
    let c = Cluster::builder(3).node_option(3, "witness = true").start();
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    assert_ne!(leader, 3, "the witness must not lead");
    assert_eq!(c.view_now(3).role, "witness");

    let out = c.promote_with_timeout(leader, 3, 3_000);
    assert!(!out.success(), "a witness must refuse leadership: {out}");

    // Losing a data node leaves one data node and the witness: a majority,
    // and the data node must be the one that leads.
    c.kill(leader);
    let other = c.others(&[leader, 3])[0];
    assert_eq!(c.wait_for_leader(&[other, 3]), other);
    c.wait_barrier(other);
    c.wait_barrier(3);
}

/// Under systemd (`Type=notify`): READY once a leader is known and the sync
/// sets are reconciled, STATUS with role and leader, watchdog pings while the
/// node task answers.
#[test]
fn systemd_notifications_report_ready_status_and_watchdog() {
    use std::os::unix::net::UnixDatagram;
    let sock_dir = short_tempdir("clusterd-notify-");
    let sock_path = sock_dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let c = Cluster::builder(3)
        .sync_set("conf", "mirror", "")
        .env("NOTIFY_SOCKET", sock_path.to_str().unwrap())
        .env("WATCHDOG_USEC", "600000")
        .start();
    let all = c.ids();
    c.wait_for_leader(&all);
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    wait_until(
        Duration::from_secs(20),
        "READY, a STATUS naming the leader, and WATCHDOG pings",
        || {
            if let Ok(n) = sock.recv(&mut buf) {
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                seen.push('\n');
            }
            let ok = seen.contains("READY=1")
                && seen
                    .lines()
                    .any(|l| l.starts_with("STATUS=follower, leader node "))
                && seen
                    .lines()
                    .any(|l| l.starts_with("STATUS=leader of term "))
                && seen.matches("WATCHDOG=1").count() >= 3;
            if ok {
                Ok(())
            } else {
                Err(format!("received so far:\n{seen}"))
            }
        },
    );
}

/// The shipped unit file passes `systemd-analyze verify` (where systemd is
/// installed; elsewhere its keys are checked by parsing), with ExecStart
/// pointing at the binary under test.
#[test]
fn the_systemd_unit_file_verifies() {
    let root = repo_root();
    let unit = std::fs::read_to_string(format!("{root}/packaging/clusterd.service")).unwrap();
    for key in [
        "Type=notify",
        "ExecStart=/usr/bin/clusterd --config",
        "Restart=on-failure",
        "WatchdogSec=",
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/clusterd",
    ] {
        assert!(
            unit.lines().any(|l| l.starts_with(key)),
            "the unit lacks {key}"
        );
    }
    let analyze = std::path::Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        eprintln!("systemd-analyze is not installed; checked the unit's keys only");
        return;
    }
    let dir = short_tempdir("clusterd-unit-");
    let copy = dir.path().join("clusterd.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/clusterd", env!("CARGO_BIN_EXE_clusterd")),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(analyze);
    cmd.arg("verify").arg(&copy);
    let out = run_cmd(cmd, Duration::from_secs(30));
    assert!(
        out.success() && out.stderr.trim().is_empty() && out.stdout.trim().is_empty(),
        "systemd-analyze verify: {out}"
    );
}

/// `clusterctl check` as a Nagios/Icinga plugin: each exit code in the
/// situation that calls for it.
#[test]
fn check_plugin_returns_each_exit_code() {
    let c = Cluster::start(3);
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);
    let check = |id: u64| c.ctl(id, &["check"], scaled(Duration::from_secs(10)));
    let code_of = |id: u64, want: i32| {
        wait_until(
            Duration::from_secs(20),
            &format!("clusterctl check on node {id} to exit {want}"),
            || {
                let out = check(id);
                if out.code == Some(want) {
                    Ok(out)
                } else {
                    Err(out.to_string())
                }
            },
        )
    };
    let ok = code_of(leader, 0);
    assert!(ok.stdout.starts_with("CLUSTERD OK - leader node"), "{ok}");
    assert!(ok.stdout.contains("| nodes_reachable=3;"), "{ok}");
    assert!(
        ok.stdout.contains(" cert_days_left=82"),
        "certificates are made for 825 days: {ok}"
    );

    let followers = c.others(&[leader]);
    c.kill(followers[0]);
    let warn = code_of(leader, 1);
    assert!(
        warn.stdout
            .contains(&format!("unreachable: {}", followers[0])),
        "{warn}"
    );

    c.kill(leader);
    let crit = code_of(followers[1], 2);
    assert!(crit.stdout.starts_with("CLUSTERD CRITICAL - "), "{crit}");

    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_clusterctl"));
    cmd.args(["--socket", "/nonexistent/clusterd.sock", "check"]);
    let unknown = run_cmd(cmd, Duration::from_secs(10));
    assert_eq!(unknown.code, Some(3), "{unknown}");
    assert!(
        unknown
            .stdout
            .starts_with("CLUSTERD UNKNOWN - cannot reach clusterd"),
        "{unknown}"
    );
}

/// The Prometheus endpoint, scraped while the cluster runs: every family
/// present with values that agree with `clusterctl status`.
#[test]
fn metrics_endpoint_serves_sane_values() {
    use std::io::{Read, Write};
    let port = free_port();
    let c = Cluster::builder(3)
        .extra_toml(1, &format!("[metrics]\nlisten = \"127.0.0.1:{port}\""))
        .start();
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(1);
    let scrape = || -> Result<String, String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut body = String::new();
        s.read_to_string(&mut body).map_err(|e| e.to_string())?;
        Ok(body)
    };
    let view = c.view_now(1);
    let text = wait_until(
        Duration::from_secs(10),
        "a scrape that names the leader",
        || {
            let body = scrape()?;
            if body.contains(&format!("clusterd_leader_id {leader}")) {
                Ok(body)
            } else {
                Err(body)
            }
        },
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let value = |name: &str| -> i64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(value("clusterd_node_id"), 1);
    assert!(value("clusterd_term") >= view.term as i64);
    assert!(value("clusterd_commit_index") >= 1);
    assert!(value("clusterd_applied_index") >= 1);
    assert!(
        value("clusterd_certificate_expiry_seconds") > 800 * 86_400,
        "certs are made for 825 days"
    );
    let role = if leader == 1 { "leader" } else { "follower" };
    assert_eq!(value(&format!("clusterd_role{{role=\"{role}\"}}")), 1);
    if leader == 1 {
        assert!(
            text.contains("clusterd_peer_lag_entries{peer=\"2\"}"),
            "{text}"
        );
        // The leader's scrape shows every node's reachability and lag.
        for id in 1..=3 {
            assert_eq!(
                value(&format!("clusterd_cluster_node_reachable{{node=\"{id}\"}}")),
                1,
                "{text}"
            );
            assert!(
                text.contains(&format!(
                    "clusterd_cluster_node_lag_entries{{node=\"{id}\"}}"
                )),
                "{text}"
            );
        }
    } else {
        assert!(!text.contains("clusterd_cluster_node_reachable"), "{text}");
    }
}

/// The shipped example configuration passes `clusterd --check` (with its
/// certificate paths pointed at generated ones).
#[test]
fn the_example_config_checks() {
    let root = repo_root();
    let example =
        std::fs::read_to_string(format!("{root}/packaging/clusterd.toml.example")).unwrap();
    let dir = short_tempdir("clusterd-example-");
    let certs = dir.path().join("certs");
    certs_init(&certs, &[1, 2, 3]);
    let text = example.replace("/etc/clusterd/", &format!("{}/", certs.display()));
    let path = dir.path().join("clusterd.toml");
    std::fs::write(&path, text).unwrap();
    let out = check_config(&path);
    assert!(out.success(), "the example config must pass --check: {out}");
    assert!(
        out.stdout.contains("node 1, 2 peers, 13 sync sets"),
        "{out}"
    );
}

/// `clusterctl import-rsync` on each seed script drafts sets that
/// `clusterd --check` accepts as they are.
#[test]
fn import_rsync_drafts_sets_that_clusterd_accepts() {
    let root = repo_root();
    let dir = short_tempdir("clusterd-import-");
    let certs = dir.path().join("certs");
    certs_init(&certs, &[1, 2, 3]);
    let base = format!(
        "[node]\nid = 1\nlisten = \"127.0.0.1:7700\"\ndata_dir = \"/var/lib/clusterd\"\n\n[tls]\nca = \"{0}/ca.crt\"\ncert = \"{0}/node-1.crt\"\nkey = \"{0}/node-1.key\"\n\n[[peer]]\nid = 2\naddr = \"10.0.0.2:7700\"\n[[peer]]\nid = 3\naddr = \"10.0.0.3:7700\"\n\n",
        certs.display()
    );
    for (script, sets) in [
        ("kerberos-active-sync.sh", 22),
        ("smtp-filter-sync.sh", 4),
        ("tacacs-active-sync.sh", 13),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_clusterctl"));
        cmd.arg("import-rsync")
            .arg(format!("{root}/cluster-tests/fixtures/seeds/{script}"));
        let out = run_cmd(cmd, Duration::from_secs(10));
        assert!(out.success(), "{script}: {out}");
        assert_eq!(
            out.stdout.lines().filter(|l| *l == "[[sync]]").count(),
            sets,
            "{script}:\n{}",
            out.stdout
        );
        let path = dir.path().join(format!("{script}.toml"));
        std::fs::write(&path, format!("{base}{}", out.stdout)).unwrap();
        let check = check_config(&path);
        assert!(
            check.success(),
            "{script}: the drafted sets must pass --check: {check}\n{}",
            out.stdout
        );
        assert!(
            check.stdout.contains(&format!("{sets} sync sets")),
            "{check}"
        );
    }
}

/// docker/ cannot run here (no Docker engine), so its files are checked
/// instead: the compose services agree with each other (ids, hostnames,
/// ports, the shared certs volume), and the entrypoint, run for each service
/// with that service's environment, writes a config `clusterd --check` accepts
/// (also with the witness overlay).
#[test]
fn docker_compose_files_cross_check() {
    use serde_yaml::Value;
    let root = repo_root();
    let load = |name: &str| -> Value {
        let text = std::fs::read_to_string(format!("{root}/docker/{name}")).unwrap();
        let mut v: Value =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("docker/{name}: {e}"));
        v.apply_merge().unwrap();
        v
    };
    let base = load("compose.yaml");
    let overlay = load("compose.witness.yaml");
    let services = base["services"].as_mapping().expect("services");
    let env_of = |svc: &Value, with_overlay: Option<&Value>| -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = svc["environment"]
            .as_mapping()
            .expect("environment")
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().unwrap().to_string(),
                    v.as_str().unwrap().to_string(),
                )
            })
            .collect();
        if let Some(extra) = with_overlay.and_then(|o| o["environment"].as_mapping()) {
            for (k, v) in extra {
                env.push((
                    k.as_str().unwrap().to_string(),
                    v.as_str().unwrap().to_string(),
                ));
            }
        }
        env
    };
    let get = |env: &[(String, String)], key: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };

    // Cross-check: ids unique, PEERS the same everywhere and naming every service.
    let mut ids = std::collections::BTreeMap::new();
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        let env = env_of(svc, None);
        let id: u64 = get(&env, "NODE_ID").expect("NODE_ID").parse().unwrap();
        assert_eq!(
            svc["hostname"].as_str(),
            Some(name),
            "service {name}: hostname"
        );
        assert!(
            svc["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|v| v.as_str() == Some("certs:/certs")),
            "service {name} lacks the certs volume"
        );
        assert!(
            ids.insert(id, name.to_string()).is_none(),
            "NODE_ID {id} used twice"
        );
    }
    for (_, svc) in services {
        let peers = get(&env_of(svc, None), "PEERS").unwrap();
        let listed: std::collections::BTreeMap<u64, String> = peers
            .split(',')
            .map(|p| {
                let (id, addr) = p.split_once('=').unwrap();
                (id.parse().unwrap(), addr.to_string())
            })
            .collect();
        let expected: std::collections::BTreeMap<u64, String> = ids
            .iter()
            .map(|(id, host)| (*id, format!("{host}:7700")))
            .collect();
        assert_eq!(
            listed, expected,
            "PEERS must name every service at port 7700"
        );
    }

    // Run the entrypoint for each service, with and without the witness overlay.
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_clusterd"))
        .parent()
        .unwrap()
        .to_path_buf();
    for witness in [false, true] {
        let dir = short_tempdir("clusterd-compose-");
        for (name, svc) in services {
            let name = name.as_str().unwrap();
            let env = env_of(svc, witness.then(|| &overlay["services"][name]));
            let conf = dir.path().join(format!("{name}.toml"));
            let mut cmd = std::process::Command::new("sh");
            cmd.arg(format!("{root}/docker/entrypoint.sh"))
                .arg("--check");
            scrub_env(&mut cmd);
            for (k, v) in &env {
                cmd.env(k, v);
            }
            cmd.env(
                "PATH",
                format!(
                    "{}:{}",
                    bin_dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("CERTS_DIR", dir.path().join("certs"))
            .env("CONFIG_FILE", &conf)
            .env("DATA_DIR", dir.path().join(name))
            .env("ADMIN_SOCKET", dir.path().join(format!("{name}.sock")));
            let out = run_cmd(cmd, Duration::from_secs(20));
            assert!(
                out.success(),
                "entrypoint of {name} (witness overlay: {witness}): {out}"
            );
            let written = std::fs::read_to_string(&conf).unwrap();
            assert_eq!(
                written.contains("witness = true"),
                witness,
                "{name}:\n{written}"
            );
        }
    }
}

/// This checkout's root, read at run time: a test binary reused from another
/// clone of the repository (a shared target dir) must read this checkout's files.
fn repo_root() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}

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

/// A stolen certificate is refused once its serial is listed in
/// `tls.revoked_serials`, while the node it belonged to, re-issued a new
/// certificate by the same CA, keeps working.
#[test]
fn a_revoked_certificate_is_refused() {
    let dir = short_tempdir("clusterd-revoke-");
    let certs = dir.path().join("certs");
    certs_init(&certs, &[1, 2, 3]);
    let stolen = dir.path().join("stolen");
    std::fs::create_dir_all(&stolen).unwrap();
    for f in ["node-2.crt", "node-2.key"] {
        std::fs::rename(certs.join(f), stolen.join(f)).unwrap();
    }
    certs_init(&certs, &[2]); // node 2's replacement certificate, same CA
    let mut show = std::process::Command::new(env!("CARGO_BIN_EXE_clusterctl"));
    show.args(["certs", "show"]).arg(stolen.join("node-2.crt"));
    let shown = run_cmd(show, Duration::from_secs(10));
    let serial = shown
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("serial:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no serial in: {shown}"));

    let mut b = Cluster::builder(3);
    for id in 1..=3 {
        b = b
            .tls_override(id, TlsFiles::in_dir(&certs, id))
            .tls_option(id, &format!("revoked_serials = [\"{serial}\"]"));
    }
    let c = b.start();
    let all = c.ids();
    c.wait_for_leader(&all);
    c.wait_barrier(2); // the re-issued node 2 is fine

    let thief = tls_from(
        &TlsFiles {
            ca: certs.join("ca.crt"),
            cert: stolen.join("node-2.crt"),
            key: stolen.join("node-2.key"),
        },
        2,
    );
    let answer = direct_status(&c.node(1).listen.to_string(), &thief);
    assert!(
        answer.is_err(),
        "a revoked certificate got an answer: {answer:?}"
    );
    wait_until(
        Duration::from_secs(10),
        "node 1 to log the revoked certificate",
        || {
            let log = c.log(1);
            if log.contains(&format!("its certificate (serial {serial}) is revoked")) {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    );
    c.wait_barrier(1);
}

/// SIGHUP reloads certificates and the revocation list without a restart:
/// a stolen certificate accepted before is refused after, and the cluster
/// keeps committing throughout.
#[test]
fn sighup_reloads_the_revocation_list() {
    let c = Cluster::start(3);
    let all = c.ids();
    c.wait_for_leader(&all);
    let certs = c.dir().join("certs");
    // A valid member certificate that "leaked": node 3's own pair.
    let thief = tls_from(&TlsFiles::in_dir(&certs, 3), 3);
    let serial = clusterd::tls::cert_serial_hex(
        &rustls::pki_types::pem::PemObject::from_pem_file(certs.join("node-3.crt")).unwrap(),
    )
    .unwrap();
    let target = c.node(1).listen.to_string();
    let ask = || direct_status(&target, &thief);
    assert!(ask().is_ok(), "before the reload the certificate is valid");

    c.rewrite_config(1, |cfg| {
        cfg.tls_extra
            .push(format!("revoked_serials = [\"{serial}\"]"))
    });
    c.signal(1, libc::SIGHUP);
    wait_until(
        Duration::from_secs(10),
        "node 1 to reload on SIGHUP",
        || {
            if c.log(1)
                .contains("SIGHUP: reloaded certificates and the revocation list")
            {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    );
    assert!(
        ask().is_err(),
        "after the reload the revoked certificate must be refused"
    );
    // Node 3 itself holds that certificate: its live connections with node 1
    // (the one node 3 opened and the one node 1 opened) are cut, not left
    // running until they happen to reconnect.
    wait_until(
        Duration::from_secs(10),
        "node 1 to close the live connections of the revoked certificate",
        || {
            let log = c.log(1);
            let closed = log.matches("closed the live connection of").count();
            if closed >= 2 && log.contains(&format!("(serial {serial}) is now revoked")) {
                Ok(())
            } else {
                Err(format!("{closed} closed so far"))
            }
        },
    );
    // Revoked on node 1 only, so nodes 1 and 3 no longer talk at all; the
    // cluster keeps committing through a majority: 1 and 2, or 2 and 3 when
    // node 3 leads (node 1 is then cut off from its leader, by design).
    let leader = wait_until(ELECTION_DEADLINE, "node 2 to know a leader", || {
        c.view(2)
            .and_then(|v| v.leader.ok_or_else(|| format!("no leader yet: {v}")))
    });
    c.wait_barrier(if leader == 3 { 2 } else { 1 });
}

/// TLS material loaded straight from certificate files, as an impostor holding them would.
fn tls_from(files: &TlsFiles, id: u64) -> clusterd::tls::PeerTls {
    let paths = clusterd::tls::TlsPaths {
        ca: files.ca.clone(),
        cert: files.cert.clone(),
        key: files.key.clone(),
    };
    clusterd::tls::PeerTls::load(&paths, id).unwrap()
}

/// A peer client that dials `addr` (a node's own listen address, bypassing the
/// proxies) as node 1 is dialled by its peers. Call it inside a tokio runtime.
fn direct_client(
    addr: &str,
    tls: clusterd::tls::PeerTls,
) -> clusterd::proto::peer::peer_client::PeerClient<tonic::transport::Channel> {
    let target = clusterd::config::PeerConfig {
        id: 1,
        addr: addr.to_string(),
        witness: false,
    };
    let live = clusterd::tls::LiveTls::new(tls, Default::default());
    clusterd::proto::peer::peer_client::PeerClient::new(clusterd::transport::peer_channel(
        &target, live,
    ))
}

/// One NodeStatus call straight to node 1 at `addr` with `tls`.
fn direct_status(addr: &str, tls: &clusterd::tls::PeerTls) -> Result<(), tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        direct_client(addr, tls.clone())
            .node_status(clusterd::proto::peer::NodeStatusRequest {})
            .await
            .map(|_| ())
    })
}
