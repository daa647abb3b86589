//! Monitoring: `clusterctl check` as a Nagios/Icinga plugin (each exit
//! code) and the Prometheus metrics endpoint.

use std::time::Duration;

use crate::harness::*;

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
