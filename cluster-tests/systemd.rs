//! systemd integration: `Type=notify` notifications (READY, STATUS,
//! WATCHDOG) from running nodes, and the shipped unit file.

use std::time::Duration;

use crate::harness::*;

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
