//! `run(config, shutdown)`: opens the storage and TLS material, starts the
//! transport, the applier thread, the node task and every service around
//! it, hands each service the state it needs, and shuts down in order.

use super::task::NodeTask;
use super::*;
/// Messages waiting for the node task before peers' messages are dropped.
const INBOX: usize = 8192;
/// On SIGHUP, reloads the certificate, key, CA and `tls.revoked_serials`
/// from the config file. Bad new material is refused with its reason and the
/// old stays in force; other config changes need a restart.
async fn reload_tls_on_sighup(
    source: std::path::PathBuf,
    id: NodeId,
    live: crate::net::tls::LiveTls,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot listen for SIGHUP; certificate reloads need a restart");
        return;
    };
    while hup.recv().await.is_some() {
        let loaded = Config::load(&source)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                PeerTls::load(&c.tls, id)
                    .map(|t| (t, c.revoked_serials))
                    .map_err(|e| e.to_string())
            });
        match loaded {
            Ok((tls, revoked)) => {
                info!(revoked = revoked.len(), "SIGHUP: reloaded certificates and the revocation list from {}; new connections use them", source.display());
                live.replace(tls, revoked);
            }
            Err(e) => {
                warn!("SIGHUP: kept the certificates in force, the new ones are unusable: {e}")
            }
        }
    }
}

pub fn join_ids(ids: &[NodeId]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Opens (or bootstraps) the Raft storage in `data_dir/raft`. A fresh node
/// whose config lists the same members as its peers forms the cluster with
/// them, unless it is to `join` one: then it waits, with no members, until a
/// leader adds it. A node with existing state never re-bootstraps, and
/// follows the committed membership whatever its `[[peer]]` list says.
pub fn open_storage(
    data_dir: &Path,
    voters: &[NodeId],
    join: bool,
) -> Result<RaftStore, NodeError> {
    create_private_dir(data_dir)?;
    create_private_dir(&data_dir.join("quarantine"))?;
    let raft_dir = data_dir.join("raft");
    let store = RaftStore::open(&raft_dir)?;
    if !store.is_initialized() {
        if join {
            info!("new node with `join = true`: waiting to be added to the cluster (`clusterctl member add` on a member); it forms no cluster of its own");
        } else {
            info!(members = %join_ids(voters), "new node: creating the Raft log with the configured members");
            store.bootstrap(voters)?;
        }
    } else {
        let cs = store.conf_state();
        let mut stored: Vec<NodeId> = cs.voters.iter().chain(&cs.learners).copied().collect();
        stored.sort_unstable();
        if stored != voters {
            warn!(
                "the committed members are [{}] but the config lists [{}]; following the committed membership ([[peer]] lists only seed a new cluster and give addresses)",
                join_ids(&stored),
                join_ids(voters)
            );
        }
    }
    Ok(store)
}

/// What this node's config says of a member: its `[[peer]]` entries, and
/// itself when `node.listen` names a host others can dial.
fn configured_member(id: NodeId, addr: String, witness: bool) -> MemberInfo {
    MemberInfo {
        id,
        addr,
        witness,
        keep_learner: false,
        replaces: None,
        added_at: 0,
    }
}

/// The membership directory, and the members to link to at start: every
/// member added at runtime (from the stored directory and the stored
/// snapshot, which a crash may have left ahead of it) and every
/// `[[peer]]`, whose address wins, so an administrator can correct one in
/// the config. The founders enter the stored directory too, so every
/// snapshot carries their addresses: a node that joins later may lack some
/// of them in its own `[[peer]]` list.
fn known_members(
    config: &Config,
    store: &RaftStore,
) -> Result<(Directory, Vec<MemberInfo>), NodeError> {
    let mut configured: Vec<MemberInfo> = config
        .peers
        .iter()
        .map(|p| configured_member(p.id, p.addr.clone(), p.witness))
        .collect();
    if !config.node.listen.ip().is_unspecified() {
        configured.push(configured_member(
            config.node.id,
            config.node.listen.to_string(),
            config.node.witness,
        ));
    }
    let mut directory = store.directory()?;
    let unknown: Vec<MemberInfo> = configured
        .iter()
        .filter(|m| !directory.members.contains_key(&m.id))
        .cloned()
        .collect();
    if !unknown.is_empty() && store.is_initialized() {
        directory.merge(&unknown);
        store.set_directory(&directory)?;
    }
    if let Ok(snapshot) = raft::Storage::snapshot(store, 0, 0) {
        if let Ok((Some(carried), _)) = crate::core::members::unwrap_snapshot(&snapshot.data) {
            for info in carried.members.into_values() {
                directory.members.entry(info.id).or_insert(info);
            }
        }
    }
    let mut links = directory.clone();
    for info in unknown {
        links.members.entry(info.id).or_insert(info);
    }
    let links = links
        .members
        .into_values()
        .map(|mut m| {
            if let Some(p) = config.peers.iter().find(|p| p.id == m.id) {
                m.addr = p.addr.clone();
                m.witness |= p.witness;
            }
            m
        })
        .collect();
    Ok((directory, links))
}

/// Creates `dir` with mode 0700, or tightens an existing one to 0700: the
/// Raft log and quarantine hold file contents such as /etc/shadow's.
fn create_private_dir(dir: &Path) -> Result<(), NodeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |source| NodeError::DataDir {
        path: dir.display().to_string(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    let mode = std::fs::metadata(dir).map_err(err)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        warn!(
            "tightened {} from mode {mode:o} to 700: it holds the Raft log, and on a data node the contents of the sync sets",
            dir.display()
        );
    }
    Ok(())
}

/// Runs a node until `shutdown` resolves, then shuts down gracefully.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    let id = config.node.id;
    let span = tracing::info_span!("node", id);
    run_inner(config, shutdown).instrument(span).await
}

async fn run_inner(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    let id = config.node.id;
    let mut voters: Vec<NodeId> = config.peers.iter().map(|p| p.id).chain([id]).collect();
    voters.sort_unstable();
    let store = open_storage(&config.node.data_dir, &voters, config.node.join)?;
    let (directory, peers) = known_members(&config, &store)?;
    let removed = store.removed()?;
    if let Some(why) = &removed {
        warn!("this node was removed from the cluster ({why}): it neither replicates nor campaigns; to bring it back, empty its data_dir, set `[node] join = true` and run `clusterctl member add`");
    }
    let tls = PeerTls::load(&config.tls, id)?;

    let options = CoreOptions {
        witness: config.node.witness,
        compact_after: config.compact_after,
        ..CoreOptions::default()
    };
    let logger = crate::ops::logging::raft_logger(id);
    let shared = crate::replication::shared::open_shared(&config)?;
    crate::replication::validate::remove_leftovers(&config.node.data_dir);
    crate::replication::source::warn_watch_budget(&shared);
    let (applied_tx, applied_rx) = mpsc::unbounded_channel();
    let mut applier = Applier::new(shared.clone(), store.clone(), applied_tx);
    let store_for_task = store.clone();
    let core = RaftCore::new(id, &config.raft, store, options, &logger, &mut applier)?;
    let initial = core.view();
    info!(
        term = initial.term,
        vote = initial.vote,
        commit = initial.commit_index,
        applied = initial.applied_index,
        "starting node {id} ({}) of cluster [{}]",
        initial.members.member.as_str(),
        join_ids(&initial.members.voters)
    );
    if initial.members.voters.len() == 2 {
        // Only reachable with `node.allow_two_node = true` (the config check refuses it otherwise).
        warn!(
            "this cluster has only two voters (nodes {}): it cannot fail over, since losing either node stops all changes; add a third node or a witness to fix that",
            join_ids(&voters)
        );
    }

    let listener = TcpListener::bind(config.node.listen)
        .await
        .map_err(|source| NodeError::Listen {
            addr: config.node.listen.to_string(),
            source,
        })?;
    let admin_listener = crate::ops::admin::bind_socket(&config.node.admin_socket)?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Metrics {
                    addr: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let remote_admin_listener = match config.admin_listen {
        Some(addr) => {
            Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| NodeError::AdminListen {
                        addr: addr.to_string(),
                        source,
                    })?,
            )
        }
        None => None,
    };
    let cert_not_after = tls.own_cert_not_after();

    let (link_tx, link_rx) = mpsc::channel(1024);
    let live_tls = crate::net::tls::LiveTls::new(tls, config.revoked_serials.clone());
    let (view_tx, view_rx) = watch::channel(initial);
    let transport = Transport::start(
        &peers,
        &live_tls,
        link_tx,
        view_rx.clone(),
        shared.counters.wire_bytes_sent.clone(),
    );
    transport.pin(config.peers.iter().map(|p| p.id).chain([id]));
    let (inbox_tx, inbox_rx) = mpsc::channel(INBOX);
    let handle = NodeHandle::new(id, inbox_tx, view_rx, cert_not_after);
    let (apply_tx, apply_rx) = mpsc::unbounded_channel();
    let applier_thread = std::thread::Builder::new()
        .name("clusterd-apply".into())
        .spawn({
            let span = tracing::Span::current();
            move || span.in_scope(|| applier.run(apply_rx))
        })
        .expect("spawn the applier thread");
    let (role_tx, role_rx) = mpsc::unbounded_channel();
    let counted = shared.clone();
    let on_failure = move || {
        counted
            .counters
            .role_hook_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    tokio::spawn(
        crate::ops::hooks::run_role_hooks(config.hooks.clone(), id, on_failure, role_rx)
            .in_current_span(),
    );
    let (changed_tx, changed_rx) = mpsc::unbounded_channel();
    tokio::spawn(
        crate::replication::apply::run_on_change(shared.clone(), changed_rx, apply_tx.downgrade())
            .in_current_span(),
    );

    let task = NodeTask {
        core,
        inbox: inbox_rx,
        links: link_rx,
        transport: transport.clone(),
        view: view_tx,
        waiters: std::collections::BTreeMap::new(),
        next_token: rand::random::<u64>() >> 16,
        applier: apply_tx.clone(),
        applied_rx,
        changed_sets: changed_tx,
        snapshot_rx: None,
        held_compaction: None,
        // Once caught up after a start, a follower squares its trees with
        // the manifest: stray files from before it joined, edits made while
        // it was stopped.
        reconcile_pending: !config.node.witness,
        role_events: role_tx,
        files: Some(shared.clone()),
        was_leader: false,
        transfers: Vec::new(),
        witnesses: peers
            .iter()
            .filter(|p| p.witness)
            .map(|p| p.id)
            .chain(config.node.witness.then_some(id))
            .collect(),
        store: store_for_task,
        directory,
        // Differs from any real configuration: the first `ready` takes the
        // committed one in (peers of replication, the config comparison).
        members: Default::default(),
        removed,
        allow_two_node: config.node.allow_two_node,
        configured: voters.clone(),
        config_differs: None,
        tick: config.raft.tick(),
        election_timeout: config.raft.election_timeout,
        rescan: config.replication.rescan,
        last_reconcile: Instant::now(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut node_task = tokio::spawn(task.run(stop_rx).in_current_span());

    let (servers_stop_tx, servers_stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (known, node) = (transport.clone(), handle.clone());
    let incoming = crate::net::accept::accept_loop(listener, live_tls.clone(), move |peer| {
        known.admits(peer, &node.view())
    });
    tokio::spawn(
        crate::node::membership::run(
            handle.clone(),
            transport.clone(),
            config.raft.election_timeout,
            servers_stop_rx.clone(),
        )
        .in_current_span(),
    );
    tokio::spawn(
        reload_tls_on_sighup(config.source.clone(), id, live_tls.clone()).in_current_span(),
    );
    let mut peer_server = tokio::spawn(
        crate::net::peer::serve(
            incoming,
            handle.clone(),
            transport.clone(),
            shared.clone(),
            stopped(servers_stop_rx.clone()),
        )
        .in_current_span(),
    );
    tokio::spawn(
        crate::replication::source::Source::new(
            shared.clone(),
            handle.clone(),
            transport.clone(),
            config.replication,
        )
        .run(servers_stop_rx.clone())
        .in_current_span(),
    );
    tokio::spawn(
        crate::replication::accounts::run(shared.clone(), servers_stop_rx.clone())
            .in_current_span(),
    );
    tokio::spawn(
        crate::replication::fetch::run_fetcher(
            shared.clone(),
            handle.clone(),
            transport.clone(),
            apply_tx.clone(),
            servers_stop_rx.clone(),
        )
        .in_current_span(),
    );
    drop(apply_tx);
    let admin = crate::ops::admin::AdminService::new(handle.clone(), transport, shared.clone());
    let admin_for_metrics = admin.clone();
    if let Some(listener) = remote_admin_listener {
        let incoming = crate::ops::admin::remote_incoming(listener, live_tls.clone());
        tokio::spawn(
            admin
                .clone()
                .serve_remote(incoming, stopped(servers_stop_rx.clone()))
                .in_current_span(),
        );
    }
    let admin_server = tokio::spawn(
        admin
            .serve(admin_listener, stopped(servers_stop_rx.clone()))
            .in_current_span(),
    );
    let systemd = tokio::spawn(
        crate::node::systemd::supervise(handle.clone(), shared.clone(), servers_stop_rx.clone())
            .in_current_span(),
    );
    if let Some(listener) = metrics_listener {
        tokio::spawn(
            crate::ops::metrics::serve(
                listener,
                handle.clone(),
                shared.clone(),
                admin_for_metrics,
                stopped(servers_stop_rx),
            )
            .in_current_span(),
        );
    }
    info!(listen = %config.node.listen, admin_socket = %config.node.admin_socket.display(), "node {id} is up");

    tokio::pin!(shutdown);
    let result = tokio::select! {
        _ = &mut shutdown => {
            info!("shutdown requested");
            crate::node::systemd::stopping();
            let _ = stop_tx.send(true);
            match node_task.await {
                Ok(r) => r,
                Err(e) => Err(NodeError::Panicked(e.to_string())),
            }
        }
        r = &mut node_task => match r {
            Ok(r) => r,
            Err(e) => Err(NodeError::Panicked(e.to_string())),
        },
        r = &mut peer_server => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(NodeError::PeerServer(e)),
            Err(e) => { error!(error = %e, "peer server panicked"); Ok(()) }
        },
    };
    let _ = servers_stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), admin_server).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), systemd).await;
    let _ = std::fs::remove_file(&config.node.admin_socket);
    // The node task held the last sender: the applier finishes its current
    // page and stops.
    let _ = tokio::task::spawn_blocking(move || applier_thread.join()).await;
    result
}
