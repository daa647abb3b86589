//! The optional Prometheus endpoint (`[metrics] listen`): a plain-HTTP
//! `GET /metrics` that renders the node's current view in the text format.
//!
//! Metrics are computed at scrape time from the view the node task publishes,
//! so a scrape never talks to the node task and can never slow it down. It
//! exposes only counters and states, never file contents or key material.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::SystemTime;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::core::status::{ClusterStatus, FilesView};
use crate::raft::core::{NodeView, Role};

type Labels = Vec<(String, String)>;

/// Renders one scrape: the node's view and its certificate's expiry.
pub fn render(
    view: &NodeView,
    files: Option<&FilesView>,
    cluster: Option<&ClusterStatus>,
    cert_not_after: SystemTime,
    now: SystemTime,
) -> String {
    let mut registry = Registry::with_prefix("clusterd");
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: i64| {
        let g: Gauge = Gauge::default();
        g.set(value);
        registry.register(name, help, g);
    };
    let role: Family<Labels, Gauge> = Family::default();
    for r in [Role::Leader, Role::Follower, Role::Candidate, Role::Witness] {
        role.get_or_create(&vec![("role".to_string(), r.as_str().to_string())])
            .set(i64::from(view.role == r));
    }
    registry.register(
        "role",
        "1 for the role this node has now, 0 for the others",
        role,
    );
    gauge(&mut registry, "node_id", "This node's id", view.id as i64);
    gauge(&mut registry, "term", "Current Raft term", view.term as i64);
    gauge(
        &mut registry,
        "leader_id",
        "Leader this node follows (0: none known)",
        view.leader.unwrap_or(0) as i64,
    );
    gauge(
        &mut registry,
        "commit_index",
        "Highest log index known committed",
        view.commit_index as i64,
    );
    gauge(
        &mut registry,
        "applied_index",
        "Highest log index applied here",
        view.applied_index as i64,
    );
    gauge(
        &mut registry,
        "last_index",
        "Last index in the local Raft log",
        view.last_index as i64,
    );
    gauge(
        &mut registry,
        "first_index",
        "First index in the local Raft log (after compaction)",
        view.first_index as i64,
    );
    let stale: prometheus_client::metrics::counter::Counter = Default::default();
    stale.inc_by(view.stale_term_messages);
    registry.register(
        "stale_term_messages",
        "Messages from an older term rejected since start (a deposed or cut-off node)",
        stale,
    );
    let expiry = cert_not_after
        .duration_since(now)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_else(|e| -(e.duration().as_secs() as i64));
    gauge(
        &mut registry,
        "certificate_expiry_seconds",
        "Seconds until this node's certificate expires (negative: expired)",
        expiry,
    );
    if !view.progress.is_empty() {
        let matched: Family<Labels, Gauge> = Family::default();
        let lag: Family<Labels, Gauge> = Family::default();
        for p in &view.progress {
            let labels = vec![("peer".to_string(), p.id.to_string())];
            matched.get_or_create(&labels).set(p.match_index as i64);
            lag.get_or_create(&labels)
                .set(view.last_index.saturating_sub(p.match_index) as i64);
        }
        registry.register(
            "peer_match_index",
            "Leader only: highest index known replicated on each node",
            matched,
        );
        registry.register(
            "peer_lag_entries",
            "Leader only: entries each node is behind the leader's log",
            lag,
        );
    }
    if let Some(f) = files {
        use prometheus_client::metrics::counter::Counter;
        let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
            let c: Counter = Counter::default();
            c.inc_by(value);
            registry.register(name, help, c);
        };
        counter(
            &mut registry,
            "bytes_proposed",
            "Bytes of file changes this node proposed as leader",
            f.bytes_proposed,
        );
        counter(
            &mut registry,
            "bytes_saved",
            "File bytes that deltas and appends kept off the wire",
            f.bytes_saved,
        );
        counter(
            &mut registry,
            "bytes_fetched",
            "Patch bytes this node fetched from peers to catch up",
            f.bytes_fetched,
        );
        counter(
            &mut registry,
            "wire_bytes_sent",
            "Raft and fetch payload bytes this node sent to its peers",
            f.wire_bytes_sent,
        );
        counter(
            &mut registry,
            "on_change_failures",
            "on_change commands that failed or timed out",
            f.on_change_failures,
        );
        counter(
            &mut registry,
            "role_hook_failures",
            "on_promote/on_demote commands that failed or timed out",
            f.role_hook_failures,
        );
        counter(
            &mut registry,
            "files_linked",
            "New file versions linked into place from staging, written once",
            f.files_linked,
        );
        gauge(
            &mut registry,
            "quarantined_files",
            "Local versions set aside in data_dir/quarantine (never deleted automatically)",
            f.quarantined as i64,
        );
        let families: [(&str, &str, fn(&crate::core::status::SetView) -> i64); 8] = [
            ("set_files", "Files in the sync set as committed", |s| {
                s.files as i64
            }),
            ("set_bytes", "Bytes in the sync set as committed", |s| {
                s.bytes as i64
            }),
            (
                "set_applied_index",
                "Raft index of the set's last batch applied here",
                |s| s.applied_index as i64,
            ),
            ("set_batches", "Batches of the set applied here", |s| {
                s.seq as i64
            }),
            (
                "set_committed_bytes",
                "Patch bytes of the set's batches applied here",
                |s| s.committed_bytes as i64,
            ),
            (
                "set_missing_files",
                "Files whose committed content this node still fetches",
                |s| s.missing as i64,
            ),
            (
                "set_held",
                "1 while the set's last change is held by its validator on this node",
                |s| i64::from(s.held.is_some()),
            ),
            (
                "set_paused",
                "1 while the set is paused by clusterctl pause (the same on every node)",
                |s| i64::from(s.paused.is_some()),
            ),
        ];
        for (name, help, value) in families {
            let fam: Family<Labels, Gauge> = Family::default();
            for s in &f.sets {
                fam.get_or_create(&vec![("set".to_string(), s.name.clone())])
                    .set(value(s));
            }
            registry.register(name, help, fam);
        }
    }
    if let Some(cluster) = cluster {
        render_cluster(&mut registry, cluster, now);
    }
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

/// The leader's view of every node: reachability and lag per node and per
/// set, gathered from the peers at scrape time (followers do not export
/// these, so one scrape of the leader shows the whole cluster).
fn render_cluster(registry: &mut Registry, cluster: &ClusterStatus, now: SystemTime) {
    let now_ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let reachable: Family<Labels, Gauge> = Family::default();
    let entries: Family<Labels, Gauge> = Family::default();
    let batches: Family<Labels, Gauge> = Family::default();
    let bytes: Family<Labels, Gauge> = Family::default();
    let seconds: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
    for n in cluster.cluster_lag(now_ms) {
        let node = vec![("node".to_string(), n.id.to_string())];
        reachable.get_or_create(&node).set(i64::from(n.reachable));
        if let Some(e) = n.lag_entries {
            entries.get_or_create(&node).set(e as i64);
        }
        for (set, lag) in n.sets {
            let labels = vec![
                ("node".to_string(), n.id.to_string()),
                ("set".to_string(), set),
            ];
            batches.get_or_create(&labels).set(lag.batches as i64);
            bytes.get_or_create(&labels).set(lag.bytes as i64);
            seconds.get_or_create(&labels).set(lag.seconds);
        }
    }
    registry.register(
        "cluster_node_reachable",
        "Leader only: 1 if the node answered the leader's status request",
        reachable,
    );
    registry.register(
        "cluster_node_lag_entries",
        "Leader only: committed entries the node has not applied",
        entries,
    );
    registry.register(
        "cluster_set_lag_batches",
        "Leader only: batches of the set the node has not applied",
        batches,
    );
    registry.register(
        "cluster_set_lag_bytes",
        "Leader only: patch bytes of the set the node has not applied",
        bytes,
    );
    registry.register(
        "cluster_set_lag_seconds",
        "Leader only: seconds since the leader committed the oldest batch of the set the node has not applied",
        seconds,
    );
}

/// How long the leader waits for each peer's status while being scraped.
const CLUSTER_SCRAPE_PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(800);

/// Serves `/metrics` on `addr` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    node: crate::raft::handle::NodeHandle,
    files: std::sync::Arc<crate::replication::shared::Shared>,
    admin: crate::ops::admin::AdminService,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote): (_, SocketAddr) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accepting a metrics connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let node = node.clone();
        let files = files.clone();
        let admin = admin.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let node = node.clone();
            let files = files.clone();
            let admin = admin.clone();
            async move {
                let response = if req.uri().path() == "/metrics" {
                    let files = Some(files.files_view());
                    let view = node.view();
                    let cluster = if view.role == Role::Leader {
                        Some(admin.gather(CLUSTER_SCRAPE_PEER_TIMEOUT).await)
                    } else {
                        None
                    };
                    let body = render(
                        &view,
                        files.as_ref(),
                        cluster.as_ref(),
                        node.cert_not_after(),
                        SystemTime::now(),
                    );
                    Response::builder()
                        .header(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(Full::new(Bytes::from(body)))
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(
                            b"clusterd serves only /metrics\n",
                        )))
                };
                Ok::<_, Infallible>(response.expect("static response parts are valid"))
            }
        });
        tokio::spawn(async move {
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await
            {
                debug!(%remote, error = %e, "metrics connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::core::PeerProgress;
    use std::time::Duration;

    #[test]
    fn a_leader_scrape_has_every_family_with_its_values() {
        let view = NodeView {
            id: 1,
            role: Role::Leader,
            term: 7,
            vote: 1,
            leader: Some(1),
            commit_index: 120,
            applied_index: 119,
            first_index: 1,
            last_index: 121,
            stale_term_messages: 3,
            members: Default::default(),
            progress: vec![
                PeerProgress {
                    id: 1,
                    match_index: 121,
                    recent_active: true,
                },
                PeerProgress {
                    id: 2,
                    match_index: 100,
                    recent_active: true,
                },
            ],
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let text = render(&view, None, None, now + Duration::from_secs(86_400), now);
        for line in [
            "clusterd_role{role=\"leader\"} 1",
            "clusterd_role{role=\"follower\"} 0",
            "clusterd_term 7",
            "clusterd_leader_id 1",
            "clusterd_commit_index 120",
            "clusterd_applied_index 119",
            "clusterd_certificate_expiry_seconds 86400",
            "clusterd_peer_match_index{peer=\"2\"} 100",
            "clusterd_peer_lag_entries{peer=\"2\"} 21",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn file_replication_families_are_labelled_by_set() {
        let view = NodeView {
            id: 2,
            role: Role::Follower,
            term: 3,
            vote: 1,
            leader: Some(1),
            commit_index: 9,
            applied_index: 9,
            first_index: 1,
            last_index: 9,
            progress: vec![],
            stale_term_messages: 0,
            members: Default::default(),
        };
        let files = FilesView {
            sets: vec![crate::core::status::SetView {
                name: "tacacs".into(),
                files: 4,
                bytes: 1000,
                applied_index: 8,
                seq: 2,
                committed_bytes: 700,
                missing: 1,
                held: Some("validator exited 1: syntax error".into()),
                ..Default::default()
            }],
            bytes_proposed: 700,
            bytes_saved: 300,
            wire_bytes_sent: 900,
            quarantined: 2,
            ..Default::default()
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let text = render(&view, Some(&files), None, now, now);
        for line in [
            "clusterd_set_files{set=\"tacacs\"} 4",
            "clusterd_set_missing_files{set=\"tacacs\"} 1",
            "clusterd_set_held{set=\"tacacs\"} 1",
            "clusterd_set_paused{set=\"tacacs\"} 0",
            "clusterd_bytes_proposed_total 700",
            "clusterd_bytes_saved_total 300",
            "clusterd_wire_bytes_sent_total 900",
            "clusterd_quarantined_files 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn the_leader_exports_every_nodes_lag_per_set() {
        use crate::core::status::{ClusterStatus, NodeEntry, SetView};
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let now_ms = 1_000_000_000u64;
        let view = |id: u64, applied: u64| NodeView {
            id,
            role: if id == 1 {
                Role::Leader
            } else {
                Role::Follower
            },
            term: 3,
            vote: 1,
            leader: Some(1),
            commit_index: 50,
            applied_index: applied,
            first_index: 1,
            last_index: 50,
            stale_term_messages: 0,
            members: Default::default(),
            progress: vec![],
        };
        let files = |seq: u64, bytes: u64| FilesView {
            sets: vec![SetView {
                name: "mail".into(),
                seq,
                committed_bytes: bytes,
                recent: vec![(9, now_ms - 4_000), (10, now_ms - 2_500)],
                ..Default::default()
            }],
            ..Default::default()
        };
        let entry = |id: u64, applied: u64, seq: u64, bytes: u64| NodeEntry {
            id,
            addr: String::new(),
            reachable: true,
            view: Some(view(id, applied)),
            error: None,
            rtt_us: None,
            cert_not_after_unix: None,
            files: Some(files(seq, bytes)),
        };
        let cluster = ClusterStatus {
            node_id: 1,
            nodes: vec![
                entry(1, 50, 10, 1000),
                entry(2, 45, 9, 700),
                NodeEntry {
                    reachable: false,
                    view: None,
                    files: None,
                    error: Some("no answer".into()),
                    ..entry(3, 0, 0, 0)
                },
            ],
        };
        let text = render(&view(1, 50), None, Some(&cluster), now, now);
        for line in [
            "clusterd_cluster_node_reachable{node=\"2\"} 1",
            "clusterd_cluster_node_reachable{node=\"3\"} 0",
            "clusterd_cluster_node_lag_entries{node=\"2\"} 5",
            "clusterd_cluster_set_lag_batches{node=\"2\",set=\"mail\"} 1",
            "clusterd_cluster_set_lag_bytes{node=\"2\",set=\"mail\"} 300",
            "clusterd_cluster_set_lag_seconds{node=\"2\",set=\"mail\"} 2.5",
            "clusterd_cluster_set_lag_batches{node=\"1\",set=\"mail\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn a_follower_has_no_peer_families_and_an_expired_cert_is_negative() {
        let view = NodeView {
            id: 2,
            role: Role::Follower,
            term: 7,
            vote: 1,
            leader: None,
            commit_index: 5,
            applied_index: 5,
            first_index: 1,
            last_index: 5,
            progress: vec![],
            stale_term_messages: 0,
            members: Default::default(),
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let text = render(&view, None, None, now - Duration::from_secs(60), now);
        assert!(text.contains("clusterd_leader_id 0"), "{text}");
        assert!(
            text.contains("clusterd_certificate_expiry_seconds -60"),
            "{text}"
        );
        assert!(!text.contains("peer_lag_entries"), "{text}");
    }
}
