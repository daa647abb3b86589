//! `clusterctl`: the administrator's command line. It talks to the local node
//! over its admin socket, and makes the cluster's certificates.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use clusterd::core::config::{Config, DEFAULT_ADMIN_SOCKET};
use clusterd::core::status::{check, CheckCode, CheckThresholds, ClusterStatus};
use clusterd::net::proto::admin::{ConflictActionRequest, PromoteRequest, StatusRequest};
use clusterd::net::proto::peer::{BarrierRequest, PauseChange, RollbackRequest, SyncRequest};
use clusterd::ops::cli::{
    CertsCommand, ClusterctlArgs as Args, Command, ConflictsCommand, MemberCommand,
};
use clusterd::ops::{admin, history_view};

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clusterctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clusterctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The admin service: a node's remote admin port over mutual TLS with
/// --remote, else the local socket.
async fn admin_client(
    args: &Args,
) -> Result<clusterd::net::proto::admin::admin_client::AdminClient<tonic::transport::Channel>> {
    if let (Some(addr), Some(id), Some(ca), Some(cert), Some(key)) = (
        &args.remote,
        args.node_id,
        &args.tls_ca,
        &args.tls_cert,
        &args.tls_key,
    ) {
        let paths = clusterd::core::config::TlsPaths {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        };
        return Ok(admin::connect_remote(addr, id, &paths).await?);
    }
    Ok(admin::connect(&socket_path(args)?).await?)
}

/// Every node's view, as the node behind `client` gathers it (each peer
/// bounded by `peer_timeout_ms`; the call itself too, for a wedged node).
async fn ask_status(
    client: &mut clusterd::net::proto::admin::admin_client::AdminClient<tonic::transport::Channel>,
    peer_timeout_ms: u64,
) -> Result<ClusterStatus> {
    let mut req = tonic::Request::new(StatusRequest { peer_timeout_ms });
    req.set_timeout(Duration::from_millis(peer_timeout_ms + 2_000));
    let reply = client
        .status(req)
        .await
        .context("the node did not answer the status request")?;
    Ok(reply.get_ref().into())
}

/// Pauses (or resumes) `set` through the node's admin service.
async fn set_pause(
    args: &Args,
    set: &str,
    resume: bool,
    reason: &str,
    for_: Option<Duration>,
    timeout_ms: u64,
) -> Result<u64> {
    let mut client = admin_client(args).await?;
    let mut req = tonic::Request::new(PauseChange {
        set: set.to_string(),
        resume,
        reason: reason.to_string(),
        for_ms: for_.map_or(0, |d| d.as_millis().max(1) as u64),
        by: String::new(),
        timeout_ms,
    });
    req.set_timeout(Duration::from_millis(timeout_ms + 2_000));
    let what = if resume { "resume" } else { "pause" };
    client
        .set_pause(req)
        .await
        .map(|r| r.get_ref().index)
        .map_err(|s| anyhow::anyhow!("{what} of sync set {set:?} failed: {}", s.message()))
}

fn socket_path(args: &Args) -> Result<PathBuf> {
    if let Some(s) = &args.socket {
        return Ok(s.clone());
    }
    if let Some(c) = &args.config {
        return Config::admin_socket_of(c).map_err(Into::into);
    }
    Ok(PathBuf::from(DEFAULT_ADMIN_SOCKET))
}

async fn run(args: Args) -> Result<ExitCode> {
    match &args.command {
        Command::Certs {
            command: CertsCommand::Init { out, nodes, days },
        } => {
            let report = clusterd::net::certs::init_certs(out, nodes, *days)?;
            for p in &report.written {
                println!("wrote {}", p.display());
            }
            for p in &report.kept {
                println!("kept  {} (already there)", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs {
            command: CertsCommand::Admin { out, name, days },
        } => {
            let report = clusterd::net::certs::issue_admin(out, name, *days)?;
            for p in &report.written {
                println!("wrote {}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs {
            command: CertsCommand::Show { file },
        } => {
            use rustls::pki_types::pem::PemObject;
            let der =
                rustls::pki_types::CertificateDer::from_pem_file(file).with_context(|| {
                    format!("cannot read a PEM certificate from {}", file.display())
                })?;
            let node = clusterd::net::tls::node_id_from_cert(&der)
                .map_or_else(|e| format!("none ({e})"), |id| id.to_string());
            let serial = clusterd::net::tls::cert_serial_hex(&der)?;
            let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
                anyhow::anyhow!("{}: not an X.509 certificate: {e}", file.display())
            })?;
            println!("file:      {}", file.display());
            println!("node:      {node}");
            println!("serial:    {serial}");
            println!("not after: {}", parsed.validity().not_after);
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause {
            set,
            reason,
            for_,
            timeout_ms,
        } => {
            let index = set_pause(&args, set, false, reason, *for_, *timeout_ms).await?;
            let until = for_.map_or(String::new(), |d| {
                format!(" for {}", humantime::format_duration(d))
            });
            println!("sync set {set:?} is paused{until} (entry {index}); `clusterctl resume {set}` lets its changes go on");
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume { set, timeout_ms } => {
            let index = set_pause(&args, set, true, "", None, *timeout_ms).await?;
            println!("sync set {set:?} is resumed (entry {index}); what accumulated on the leader is proposed now");
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync {
            set,
            confirm,
            timeout_ms,
        } => {
            let mut client = admin_client(&args).await?;
            let mut req = tonic::Request::new(SyncRequest {
                set: set.clone().unwrap_or_default(),
                timeout_ms: *timeout_ms,
                confirm: *confirm,
            });
            req.set_timeout(Duration::from_millis(*timeout_ms + 5_000));
            let what = set
                .as_ref()
                .map_or("every set".to_string(), |s| format!("set {s:?}"));
            match client.sync(req).await {
                Ok(r) => {
                    println!("{}", r.get_ref().report);
                    println!("{what} is in sync on every reachable node");
                    Ok(ExitCode::SUCCESS)
                }
                Err(s) => bail!("sync of {what} failed: {}", s.message()),
            }
        }
        Command::Completions { shell } => {
            clusterd::ops::manual::write_completions(*shell, &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out } => {
            let pages = clusterd::ops::manual::write_man_pages(out)
                .with_context(|| format!("cannot write the man pages into {}", out.display()))?;
            println!("wrote {} man pages into {}", pages.len(), out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::ImportRsync { file } => {
            print!(
                "{}",
                clusterd::ops::import_rsync::translate_file(file)?.to_toml()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            json,
            peer_timeout_ms,
            watch,
        } => {
            let mut client = admin_client(&args).await?;
            loop {
                let status = ask_status(&mut client, *peer_timeout_ms).await?;
                let text = if *json {
                    format!("{}\n", status.to_json())
                } else {
                    status.to_table()
                };
                if *watch && std::io::stdout().is_terminal() {
                    // Clear the screen and home the cursor, then redraw.
                    print!("\x1b[2J\x1b[H{text}");
                } else {
                    print!("{text}");
                }
                if !*watch {
                    return Ok(ExitCode::SUCCESS);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Command::Check {
            lag_warn,
            lag_crit,
            cert_warn_days,
            cert_crit_days,
            lag_warn_secs,
            lag_crit_secs,
            quarantine_warn,
            quarantine_crit,
            peer_timeout_ms,
        } => {
            let thresholds = CheckThresholds {
                lag_warn: *lag_warn,
                lag_crit: *lag_crit,
                cert_warn_days: *cert_warn_days,
                cert_crit_days: *cert_crit_days,
                lag_warn_secs: *lag_warn_secs,
                lag_crit_secs: *lag_crit_secs,
                quarantine_warn: *quarantine_warn,
                quarantine_crit: *quarantine_crit,
            };
            // A plugin must answer with a code in every case: failures to ask are UNKNOWN.
            let status = async {
                let mut client = admin_client(&args).await?;
                ask_status(&mut client, *peer_timeout_ms).await
            }
            .await;
            let (code, line) = match status {
                Ok(s) => check(
                    &s,
                    &thresholds,
                    clusterd::core::status::unix_seconds(std::time::SystemTime::now()),
                ),
                Err(e) => (CheckCode::Unknown, format!("CLUSTERD UNKNOWN - {e:#}")),
            };
            println!("{line}");
            Ok(ExitCode::from(code as u8))
        }
        Command::Promote {
            node,
            timeout_ms,
            dry_run,
        } => {
            let mut client = admin_client(&args).await?;
            let mut req = tonic::Request::new(PromoteRequest {
                target: *node,
                timeout_ms: *timeout_ms,
                dry_run: *dry_run,
            });
            req.set_timeout(Duration::from_millis(*timeout_ms + 2_000));
            match client.promote(req).await {
                Ok(r) if *dry_run => {
                    println!("{}", r.get_ref().plan);
                    Ok(ExitCode::SUCCESS)
                }
                Ok(r) => {
                    println!("node {node} is the leader (term {})", r.get_ref().term);
                    Ok(ExitCode::SUCCESS)
                }
                Err(s) => bail!("promote node {node} failed: {}", s.message()),
            }
        }
        Command::History {
            set,
            path,
            limit,
            json,
        } => {
            let mut client = admin_client(&args).await?;
            let text = history_view::list(&mut client, set, path.as_deref(), *limit, *json)
                .await
                .with_context(|| format!("history of sync set {set:?}"))?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { set, path, at } => {
            let mut client = admin_client(&args).await?;
            let content = history_view::show(&mut client, set, path, *at)
                .await
                .with_context(|| format!("show {path} of sync set {set:?} at revision {at}"))?;
            use std::io::Write;
            std::io::stdout().write_all(&content)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff {
            set,
            path,
            from,
            to,
        } => {
            let mut client = admin_client(&args).await?;
            let (text, complete) =
                history_view::diff(&mut client, set, path.as_deref(), *from, *to)
                    .await
                    .with_context(|| format!("diff of sync set {set:?}"))?;
            print!("{text}");
            Ok(if complete {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Rollback {
            set,
            paths,
            to,
            dry_run,
            timeout_ms,
        } => {
            let mut client = admin_client(&args).await?;
            let mut req = tonic::Request::new(RollbackRequest {
                set: set.clone(),
                paths: paths.clone(),
                to: *to,
                dry_run: *dry_run,
                timeout_ms: *timeout_ms,
                ..Default::default()
            });
            req.set_timeout(Duration::from_millis(timeout_ms + 2_000));
            let reply = client
                .rollback(req)
                .await
                .map_err(|s| {
                    anyhow::anyhow!("rollback of sync set {set:?} failed: {}", s.message())
                })?
                .into_inner();
            print!("{}", reply.plan);
            if reply.index != 0 {
                println!("rolled back to revision {to} as revision {}", reply.index);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Conflicts {
            action: Some(action),
            ..
        } => {
            let (id, drop, timeout_ms) = match action {
                ConflictsCommand::Restore { id, timeout_ms } => (id, false, *timeout_ms),
                ConflictsCommand::Drop { id } => (id, true, 10_000),
            };
            let mut client = admin_client(&args).await?;
            let mut req = tonic::Request::new(ConflictActionRequest {
                id: id.clone(),
                drop,
                timeout_ms,
            });
            req.set_timeout(Duration::from_millis(timeout_ms + 2_000));
            let what = if drop { "drop" } else { "restore" };
            let reply = client
                .conflict_action(req)
                .await
                .map_err(|s| anyhow::anyhow!("conflicts {what} {id} failed: {}", s.message()))?
                .into_inner();
            print!("{}", reply.plan);
            if reply.index != 0 {
                println!("restored as revision {} (the quarantined copy stays until `clusterctl conflicts drop {id}`)", reply.index);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Conflicts { json, action: None } => {
            let mut client = admin_client(&args).await?;
            let mut req = tonic::Request::new(clusterd::net::proto::admin::ConflictsRequest {});
            req.set_timeout(Duration::from_secs(10));
            let reply = client
                .conflicts(req)
                .await
                .map_err(|s| anyhow::anyhow!("conflicts failed: {}", s.message()))?;
            let records: Vec<serde_json::Value> = reply
                .get_ref()
                .records
                .iter()
                .map(|l| {
                    serde_json::from_str(l).unwrap_or_else(|_| serde_json::Value::String(l.clone()))
                })
                .collect();
            if *json {
                println!("{}", serde_json::Value::Array(records));
            } else {
                print!("{}", clusterd::core::status::conflicts_table(&records));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Member {
            command:
                MemberCommand::List {
                    json,
                    peer_timeout_ms,
                },
        } => {
            let mut client = admin_client(&args).await?;
            let status = ask_status(&mut client, *peer_timeout_ms).await?;
            if *json {
                println!("{}", status.members_json());
            } else {
                print!("{}", status.members_table());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Member { command } => {
            let (req, what) = match command {
                MemberCommand::Add {
                    id,
                    addr,
                    learner,
                    witness,
                    timeout_ms,
                } => (
                    clusterd::net::proto::peer::MemberChangeRequest {
                        kind: "add".into(),
                        id: *id,
                        addr: addr.clone(),
                        keep_learner: *learner,
                        witness: *witness,
                        replaces: 0,
                        timeout_ms: *timeout_ms,
                    },
                    format!("member add {id}"),
                ),
                MemberCommand::Remove { id, timeout_ms } => (
                    clusterd::net::proto::peer::MemberChangeRequest {
                        kind: "remove".into(),
                        id: *id,
                        timeout_ms: *timeout_ms,
                        ..Default::default()
                    },
                    format!("member remove {id}"),
                ),
                MemberCommand::Replace {
                    old,
                    new,
                    addr,
                    timeout_ms,
                } => (
                    clusterd::net::proto::peer::MemberChangeRequest {
                        kind: "add".into(),
                        id: *new,
                        addr: addr.clone(),
                        replaces: *old,
                        timeout_ms: *timeout_ms,
                        ..Default::default()
                    },
                    format!("member replace {old} {new}"),
                ),
                MemberCommand::List { .. } => unreachable!("matched above"),
            };
            let mut client = admin_client(&args).await?;
            let timeout_ms = req.timeout_ms;
            let mut req = tonic::Request::new(req);
            req.set_timeout(Duration::from_millis(timeout_ms + 5_000));
            let reply = client
                .member(req)
                .await
                .map_err(|s| anyhow::anyhow!("{what} failed: {}", s.message()))?;
            println!("{}", reply.get_ref().report);
            Ok(ExitCode::SUCCESS)
        }
        Command::Barrier { timeout_ms } => {
            let mut client = admin_client(&args).await?;
            let started = std::time::Instant::now();
            let mut req = tonic::Request::new(BarrierRequest {
                timeout_ms: *timeout_ms,
            });
            req.set_timeout(Duration::from_millis(*timeout_ms + 2_000));
            match client.barrier(req).await {
                Ok(r) => {
                    println!(
                        "committed and applied at index {} in {} ms",
                        r.get_ref().index,
                        started.elapsed().as_millis()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(s) => bail!("barrier failed: {}", s.message()),
            }
        }
    }
}
