//! Witness nodes: a witness votes but never leads, and is refused file
//! contents (it holds no files).

use std::time::Duration;

use crate::harness::{self, *};

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
            .fetch(clusterd::net::proto::peer::FetchRequest {
                set: "secrets".into(),
                path: b"shadow".to_vec(),
                digest: clusterd::core::delta::digest(b"root:$6$secret\n")
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
