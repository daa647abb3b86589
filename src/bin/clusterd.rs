//! `clusterd`: runs one node in the foreground (systemd starts it so).

use std::process::ExitCode;

use clap::Parser;
use clusterd::core::config::Config;
use clusterd::ops::cli::ClusterdArgs as Args;

/// One malloc arena instead of glibc's default of eight per core. After a
/// burst (a node that just replicated 100,000 files) each arena keeps its
/// own fragmented free memory, which `malloc_trim` cannot give back while
/// live data is spread over all of them: on the idle benchmark (100,000
/// files) a node stayed at 73 to 90 MiB resident with the default and sits
/// at 52 MiB with one arena, and the 1 GiB first full sync was not slower
/// (27 to 29 s either way, where jemalloc took 31 to 37 s). clusterd has few
/// busy threads and glibc's per-thread caches serve their small
/// allocations, so the one arena's lock is seldom contended. Setting
/// `MALLOC_ARENA_MAX` or `GLIBC_TUNABLES` in the environment keeps glibc's
/// own choice instead. Measured in ARCHITECTURE.md ("Idle memory").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var_os("GLIBC_TUNABLES").is_some()
    {
        return;
    }
    // SAFETY: mallopt only sets a malloc parameter; it runs before any
    // thread of ours exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

/// Lifts the soft limit on open files to the hard one (at most 65,536): a
/// follower finishing eight staged batches at once holds up to 128 files of
/// each open until they are fsynced together, beside RocksDB's, which the
/// usual soft limit of 1,024 does not leave room for (a batch that cannot
/// be finished goes through the Raft log instead, slower).
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            let wanted = limit.rlim_max.min(65_536);
            if limit.rlim_cur < wanted {
                limit.rlim_cur = wanted;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    raise_open_files_limit();
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
    if let Err(e) = clusterd::net::tls::PeerTls::load(&config.tls, config.node.id) {
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
    clusterd::ops::logging::init(&config.log_level);
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
    let result = runtime.block_on(clusterd::run(config, shutdown_signal()));
    // `run` returns once the node has stopped and its storage is closed;
    // what may still run are blocking tasks such as a DNS lookup of a peer
    // that just went away, which can take seconds on a host without a
    // working resolver. Waiting for them would only delay the exit (a
    // container's `docker stop`, systemd's stop job).
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", clusterd::core::error_text::error_chain(&e));
            eprintln!("clusterd: {}", clusterd::core::error_text::error_chain(&e));
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
