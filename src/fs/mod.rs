//! The host's filesystem as the replication sees it: one capability root per
//! sync set, through which every write under a root goes.
//!
//! Invariants 2 and 3 are owned here: a file is replaced by a temporary file
//! in the same directory, fsync'd, verified against its strong hash, renamed
//! and the directory fsync'd; no path component is resolved through a
//! symlink, so nothing outside the root is ever written.

pub mod accounts;
pub mod exec;
pub mod owners;
pub mod root;
