//! What administrators and their tools see and run: the admin socket and
//! remote admin port, metrics, role hooks, logging, and the translation of
//! legacy rsync scripts.
//!
//! Invariant owned here: nothing an administrator or a scraper asks can stall
//! the node: every call has a deadline and reads published views, never the
//! node task's state directly.

#[cfg(feature = "node")]
pub mod admin;
pub mod cli;
pub mod history_view;
pub mod hooks;
pub mod import_rsync;
pub mod logging;
pub mod manual;
#[cfg(feature = "node")]
pub mod metrics;
