//! clusterd: Raft-led replication of configuration, account and log files
//! across the nodes of a small high-availability cluster.
//!
//! The binaries (`clusterd`, `clusterctl`) are thin shells over this library:
//! they parse arguments, set up logging and call into the modules below.
//! Each top-level module is one layer; a module imports only the layers below
//! it (ARCHITECTURE.md, "Layers"), and `layering.rs` checks that in CI:
//!
//! ```text
//! node                         the running process: node task, wiring, systemd
//! ops                          admin socket, status, metrics, hooks, logging, import-rsync
//! replication                  shared file state, the leader's source, the applier, fetch
//! net                          peer links: transport, peer service, proto, TLS, certificates
//! raft                         the sans-IO Raft core, its log store, the node handle
//! fs                           every write under a sync root; owner names; user commands
//! core                         pure formats and policies: config, manifest, deltas, paths, status
//! ```

pub mod core;
pub mod fs;
pub mod net;
#[cfg(feature = "node")]
pub mod node;
pub mod ops;
pub mod raft;
#[cfg(feature = "node")]
pub mod replication;

#[cfg(test)]
mod fuzz_seeds;
#[cfg(test)]
mod layering;

pub use crate::core::config::Config;
#[cfg(feature = "node")]
pub use crate::node::run;
