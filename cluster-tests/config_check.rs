//! `clusterd --check`: a bad config is rejected with an error naming the
//! bad key (and refused at start without `--check` too), and the shipped
//! example config passes.

use std::time::Duration;

use crate::harness::*;

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
