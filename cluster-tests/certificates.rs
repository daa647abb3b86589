//! Certificates and TLS on the peer port: a node of another CA never joins,
//! impostors (a non-member, a forged sender, plaintext) are refused and
//! logged, a revoked certificate is refused, and SIGHUP reloads the
//! revocation list, cutting the revoked certificate's live connections.

use std::time::Duration;

use crate::harness::*;

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

/// Speaks to node 1 directly (bypassing the proxies) as an impostor would.
#[test]
fn impostor_peers_are_refused_and_logged() {
    use clusterd::net::proto::peer::{NodeStatusRequest, RaftBatch};

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
        let r = outsider.node_status(NodeStatusRequest::default()).await;
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
                messages: vec![clusterd::net::proto::encode_raft_message(&forged)],
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
            let r = clusterd::net::proto::peer::peer_client::PeerClient::new(channel)
                .node_status(NodeStatusRequest::default())
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
    let serial = clusterd::net::tls::cert_serial_hex(
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

/// One NodeStatus call straight to node 1 at `addr` with `tls`.
fn direct_status(addr: &str, tls: &clusterd::net::tls::PeerTls) -> Result<(), tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        direct_client(addr, tls.clone())
            .node_status(clusterd::net::proto::peer::NodeStatusRequest::default())
            .await
            .map(|_| ())
    })
}
