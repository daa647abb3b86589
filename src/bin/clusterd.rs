//! `clusterd`: runs one node in the foreground (systemd starts it so).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use clusterd::config::Config;

/// Raft-led replication of config, account and log files across an HA cluster.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The node's configuration file (TOML); CLUSTERD_<SECTION>__<KEY> variables override it.
    #[arg(long, default_value = "/etc/clusterd/clusterd.toml")]
    config: PathBuf,
    /// Validate the configuration and certificates, then exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("clusterd: {line}");
            }
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = clusterd::tls::PeerTls::load(&config.tls, config.node.id) {
        eprintln!("clusterd: {}: {e}", config.source.display());
        return ExitCode::FAILURE;
    }
    if args.check {
        println!(
            "{}: configuration is valid (node {}, {} peers, {} sync sets)",
            args.config.display(),
            config.node.id,
            config.peers.len(),
            config.sync.len()
        );
        return ExitCode::SUCCESS;
    }
    clusterd::logging::init(&config.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clusterd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(clusterd::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", clusterd::logging::error_chain(&e));
            eprintln!("clusterd: {}", clusterd::logging::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
