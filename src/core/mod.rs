//! The pure cores: the formats and policies every other layer builds on.
//! Nothing here does I/O beyond reading a file it is handed, and everything
//! builds without the `node` feature (fuzz/ builds this layer alone).
//!
//! Invariant owned here: every input from the network or a config file is
//! checked by these types before any other layer sees it (a `Config` exists
//! only if every key is valid, a `SetPath` only if it is canonical and
//! relative, a patch applies only if its result has the expected hash), and
//! every byte format (commands, snapshots, status JSON) is pinned by tests.

pub mod accounts;
pub mod config;
pub mod config_reference;
pub mod delta;
pub mod error_text;
pub mod history;
pub mod manifest;
pub mod members;
pub mod names;
pub mod paths;
pub mod status;
