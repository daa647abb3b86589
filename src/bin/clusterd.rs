//! `clusterd`: runs one node in the foreground (systemd starts it so).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use clusterd::config::Config;

/// jemalloc instead of glibc's malloc, for Rust and (unprefixed) RocksDB's
/// C++ alike: a node that just replicated 100,000 files has freed most of
/// what that took, and glibc keeps such memory in fragmented per-thread
/// arenas for good, while jemalloc's background thread hands unused pages
/// back within about a second (see `MALLOC_CONF`). Measured in
/// ARCHITECTURE.md ("Idle memory").
#[cfg(all(
    target_os = "linux",
    target_env = "gnu",
    not(feature = "system-allocator")
))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's `malloc_conf` (a C `const char *`), read before `main`:
/// purge unused pages from a background thread after one second, rather
/// than on later allocations that an idle node never makes. The
/// `MALLOC_CONF` environment variable still overrides it.
#[cfg(all(
    target_os = "linux",
    target_env = "gnu",
    not(feature = "system-allocator")
))]
#[export_name = "malloc_conf"]
static MALLOC_CONF: ConfString =
    ConfString(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

#[cfg(all(
    target_os = "linux",
    target_env = "gnu",
    not(feature = "system-allocator")
))]
#[repr(transparent)]
struct ConfString(*const std::ffi::c_char);

// SAFETY: it points to a string literal, which is never written.
#[cfg(all(
    target_os = "linux",
    target_env = "gnu",
    not(feature = "system-allocator")
))]
unsafe impl Sync for ConfString {}

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
