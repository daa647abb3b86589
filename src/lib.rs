//! clusterd: Raft-led replication of configuration, account and log files
//! across the nodes of a small high-availability cluster.
//!
//! The binaries (`clusterd`, `clusterctl`) are thin shells over this library:
//! they parse arguments, set up logging and call into the modules below.
//! ARCHITECTURE.md has the code map and the invariant each module owns.

// The pure cores and the wire/config formats: built with and without the
// `node` feature (fuzz/ builds them alone).
pub mod certs;
pub mod config;
pub mod delta;
pub mod fsroot;
pub mod hooks;
pub mod import_rsync;
pub mod logging;
pub mod manifest;
pub mod paths;
pub mod proto;
pub mod raft_core;
pub mod status;
pub mod tls;

// The running node (feature `node`, on by default).
#[cfg(feature = "node")]
pub mod admin;
#[cfg(feature = "node")]
pub mod fetch;
#[cfg(feature = "node")]
pub mod files_store;
#[cfg(feature = "node")]
pub mod metrics;
#[cfg(feature = "node")]
pub mod node;
#[cfg(feature = "node")]
pub mod peer;
#[cfg(feature = "node")]
pub mod replica;
#[cfg(feature = "node")]
pub mod source;
#[cfg(feature = "node")]
pub mod storage;
#[cfg(feature = "node")]
pub mod systemd;
#[cfg(feature = "node")]
pub mod transport;

#[cfg(test)]
mod fuzz_seeds;
#[cfg(test)]
mod layering;

pub use config::Config;
#[cfg(feature = "node")]
pub use node::run;
