//! Multi-process tests: real `clusterd` processes on loopback, peer links
//! behind the harness's proxies, driven through `clusterctl`.
//!
//! Run: `cargo test --test cluster` (add `-- --test-threads=1` on a very
//! slow machine, or `CLUSTER_TESTS_TIME_SCALE=2` to widen every deadline).

mod accounts;
mod certificates;
mod chaos;
mod compose;
mod config_check;
mod elections;
mod failover;
mod guarded;
mod harness;
mod history;
mod hooks;
mod hostile;
mod import_rsync;
mod membership;
mod monitoring;
mod node_replacement;
mod remote_admin;
mod replication;
mod scale;
mod secrets;
mod switchover;
mod systemd;
mod witness;
