//! The remote admin port (issue 5): `[admin] listen` serves the admin
//! service over mutual TLS; an admin certificate (`clusterctl certs admin`)
//! may promote, a node's certificate may only read, and a certificate of
//! another CA does not get through the handshake.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

const TIMEOUT: Duration = Duration::from_secs(30);

/// `clusterctl --remote ADDR --node-id 1 --tls-* <args>` with `cert`/`key`.
fn remote(addr: &str, ca: &Path, cert: &Path, key: &Path, args: &[&str]) -> CmdOutput {
    let mut cmd = Command::new(CLUSTERCTL);
    scrub_env(&mut cmd);
    cmd.args(["--remote", addr, "--node-id", "1", "--tls-ca"])
        .arg(ca)
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .args(args);
    run_cmd(cmd, TIMEOUT)
}

#[test]
fn remote_admin_needs_an_admin_certificate_to_promote() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let c = Cluster::builder(3)
        .extra_toml(1, &format!("[admin]\nlisten = \"{addr}\""))
        .start();
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);
    let certs = c.dir().join("certs");
    let ca = certs.join("ca.crt");

    let mut cmd = Command::new(CLUSTERCTL);
    scrub_env(&mut cmd);
    cmd.args(["certs", "admin", "--out"])
        .arg(&certs)
        .args(["--name", "alice"]);
    let made = run_cmd(cmd, TIMEOUT);
    assert!(
        made.success() && made.stdout.contains("admin-alice.crt"),
        "{made}"
    );
    let (admin_crt, admin_key) = (certs.join("admin-alice.crt"), certs.join("admin-alice.key"));

    // An administrator reads status and moves leadership, from afar.
    let status = remote(&addr, &ca, &admin_crt, &admin_key, &["status", "--json"]);
    assert!(status.success(), "{status}");
    let v: serde_json::Value = serde_json::from_str(status.stdout.trim()).unwrap();
    assert_eq!(v["leader"].as_u64(), Some(leader), "{v}");
    let target = c.others(&[leader])[0];
    let promoted = remote(
        &addr,
        &ca,
        &admin_crt,
        &admin_key,
        &["promote", &target.to_string()],
    );
    assert!(
        promoted.success()
            && promoted
                .stdout
                .contains(&format!("node {target} is the leader")),
        "{promoted}"
    );
    c.wait_for_leader_is(&all, target);
    assert!(
        c.log(1).contains("promote by admin alice from 127.0.0.1"),
        "node 1 logs who promoted"
    );

    // A node's certificate (a monitoring host reusing one) may read, never change.
    let (n2_crt, n2_key) = (certs.join("node-2.crt"), certs.join("node-2.key"));
    let read = remote(&addr, &ca, &n2_crt, &n2_key, &["status", "--json"]);
    assert!(read.success(), "{read}");
    let other = c.others(&[target])[0];
    let refused = remote(
        &addr,
        &ca,
        &n2_crt,
        &n2_key,
        &["promote", &other.to_string()],
    );
    assert!(
        !refused.success()
            && refused
                .stderr
                .contains("promote needs an admin certificate"),
        "{refused}"
    );
    let barrier = remote(&addr, &ca, &n2_crt, &n2_key, &["barrier"]);
    assert!(
        !barrier.success()
            && barrier
                .stderr
                .contains("barrier needs an admin certificate"),
        "{barrier}"
    );
    assert!(
        c.log(1)
            .contains("refused promote from node 2 at 127.0.0.1"),
        "node 1 logs the refusal"
    );
    assert_eq!(
        c.wait_for_leader(&all),
        target,
        "the refused promote changed nothing"
    );

    // A certificate from another CA does not get through the handshake.
    let foreign = short_tempdir("clusterd-foreign-");
    certs_init(foreign.path(), &[1]);
    let mut cmd = Command::new(CLUSTERCTL);
    scrub_env(&mut cmd);
    cmd.args(["certs", "admin", "--out"])
        .arg(foreign.path())
        .args(["--name", "mallory"]);
    assert!(run_cmd(cmd, TIMEOUT).success());
    let stranger = remote(
        &addr,
        &ca,
        &foreign.path().join("admin-mallory.crt"),
        &foreign.path().join("admin-mallory.key"),
        &["status"],
    );
    assert!(!stranger.success(), "{stranger}");
    wait_until(
        Duration::from_secs(10),
        "node 1 to log the refused admin client",
        || {
            if c.log(1).contains("refused admin client 127.0.0.1") {
                Ok(())
            } else {
                Err(c.log_tail(1, 5))
            }
        },
    );
}
