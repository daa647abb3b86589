//! Logging: a tracing subscriber for both binaries, and the bridge that sends
//! raft-rs's slog records into tracing so every line has one format.
//!
//! Lines go to stderr (journald captures them under systemd), one per event,
//! without colours unless stderr is a terminal.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` wins over `default_filter`.
pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// A slog logger whose records become tracing events (target `raft`), tagged
/// with the node id so interleaved test logs stay readable.
pub fn raft_logger(node_id: u64) -> slog::Logger {
    slog::Logger::root(SlogToTracing, slog::o!("node" => node_id))
}

struct SlogToTracing;

impl slog::Drain for SlogToTracing {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        let mut kv = KvText(String::new());
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let _ = slog::KV::serialize(values, record, &mut kv);
        let msg = record.msg();
        let fields = kv.0;
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{msg}{fields}")
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{fields}"),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}{fields}"),
            slog::Level::Debug => tracing::debug!(target: "raft", "{msg}{fields}"),
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}{fields}"),
        }
        Ok(())
    }
}

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}
