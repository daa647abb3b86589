//! File replication: the state the applier, source and fetcher share, the
//! leader's source (watch, plan, propose), the applier every node runs, and
//! fetching what a node cannot rebuild from the log.
//!
//! Invariant owned here: a node changes a sync tree only to apply a committed
//! entry, in log order, and before it overwrites or deletes a local version
//! that differs from what the cluster committed, it quarantines that version
//! (invariant 4).

pub mod accounts;
pub mod apply;
pub mod conflicts;
pub mod fetch;
pub mod files_store;
pub mod history;
pub mod peer_files;
pub mod rollback;
pub mod scan;
pub mod shared;
pub mod source;
pub mod staging;
pub mod validate;
