//! clusterd: Raft-led replication of configuration, account and log files
//! across the nodes of a small high-availability cluster.
//!
//! The binaries (`clusterd`, `clusterctl`) are thin shells over this library:
//! they parse arguments, set up logging and call into the modules below.
//! ARCHITECTURE.md has the code map and the invariant each module owns.

pub mod admin;
pub mod certs;
pub mod config;
pub mod delta;
pub mod fetch;
pub mod files_store;
pub mod fsroot;
pub mod hooks;
pub mod import_rsync;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod node;
pub mod paths;
pub mod peer;
pub mod proto;
pub mod raft_core;
pub mod replica;
pub mod source;
pub mod status;
pub mod storage;
pub mod systemd;
pub mod tls;
pub mod transport;

pub use config::Config;
pub use node::run;
