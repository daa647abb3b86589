//! Consensus: the sans-IO Raft core (raft-rs's `RawNode` behind our command
//! encoding) and, with the `node` feature, its durable log store.
//!
//! Invariant owned here: nothing reaches the state machine before a majority
//! committed it, and term, vote and log are durable before any message that
//! depends on them leaves (invariants 1 and 6).

pub mod core;
pub mod handle;
#[cfg(feature = "node")]
pub mod storage;
