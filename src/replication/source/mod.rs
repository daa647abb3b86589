//! The leader half of replication: while this node leads, it watches every
//! sync set (inotify through the notify crate, debounced, plus a periodic
//! full rescan), turns what changed into file batches planned against the
//! committed manifest, and proposes them through Raft.
//!
//! Invariants owned here:
//! * Only the leader proposes, and only in the term it was elected in: every
//!   proposal carries that term and the node task refuses it once the term
//!   moved on (a deposed leader stops proposing at once).
//! * One batch at a time: the next batch is planned only after the previous
//!   one applied here, so every delta is against the committed version that
//!   followers hold when they apply it.
//! * A file that changes while it is read is read again (`Root::read_file`),
//!   so no torn version is ever proposed; a set with a `skip_while` marker
//!   present is not read at all.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::core::config::{ReplicationConfig, SyncMode};
use crate::core::delta::{self, FileDigest, FileHasher};
use crate::core::manifest::StagedVersion;
use crate::core::manifest::{
    check_xattrs, Chunk, Content, Entry, EntryKind, FileBatch, FileOp, WireDigest, Xattrs,
    CHUNK_LEN,
};
use crate::core::paths::SetPath;
use crate::fs::owners::OwnerNames;
use crate::fs::root::{FileMeta, Kind, Root};
use crate::net::transport::Transport;
use crate::raft::core::{Command, Role};
use crate::raft::handle::{NodeHandle, RequestError};
use crate::replication::scan::{
    meta_from_local, record_of_read, unchanged_since, unix_ms, walk_keeping, Found, SeenPaths,
};
use crate::replication::shared::{SetRuntime, Shared};

/// Patches of at least this size travel beside the log (staged on the
/// followers before the batch that references them is proposed); smaller
/// ones inside the batch's entry, where an edit costs no extra round trip.
const BLOB_MIN: usize = 32 * 1024;
/// The largest piece of staged content in one `Stage` call.
const STAGE_PIECE: usize = 4 << 20;
/// Pieces of one upload on their way to one follower at once: with one, a
/// link 50 ms long idled a round trip after each piece (71 % of one TCP
/// stream's rate, measured in the `wan` benchmark).
const STAGE_PIECES_IN_FLIGHT: usize = 3;
/// After a batch not every active follower staged, content goes through
/// the log this long before staging is tried again.
const STAGING_PAUSE: Duration = Duration::from_secs(60);
/// Patches carried inside a batch's entry when its content goes through
/// the log; larger ones as chunks first.
const INLINE_LIMIT: usize = 256 * 1024;
/// How long one `Stage` call may take before that follower counts as not
/// holding the content.
const STAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// A batch is proposed once its patches reach this size.
const BATCH_BYTES: usize = 4 << 20;
/// Or once it holds this many ops.
const BATCH_OPS: usize = 2000;
/// Most batches whose content is staged at once: each follower finishes
/// (writes and fsyncs) several uploads side by side, which keeps its disk
/// busy where one at a time left the source waiting most of a first sync
/// (9.3 s of 12.5 s, measured in the 1 GiB benchmark).
const STAGING_DEPTH: usize = 8;
/// Unless their content passes this (a batch holding one huge file).
const STAGING_BYTES: usize = 64 << 20;
/// Chunk entries per proposal.
pub(crate) const CHUNK_WINDOW: usize = 4;
/// Proposals of one pass in flight at once (each at most ~4 MiB): the
/// pipeline that keeps disks and links busy during a first full sync.
const MAX_IN_FLIGHT: usize = 3;
/// Entries a follower's applier may be behind this leader's before the
/// source waits for it (see [`wait_for_followers`]): with proposals of at
/// most 4 MiB, about 12 MiB of content. While content went through the
/// log this kept it in the followers' 64 MiB log memtable until applied
/// (measured in a 1 GiB first sync: 0.5 GB flushed to blob files per
/// follower with 3, 0.9 GB with 8, 1.2 GB without the wait).
const FOLLOWER_APPLY_WINDOW: u64 = 3;
/// A follower further behind than this is catching up (it was down, or
/// restored a snapshot): it is not waited for, so its catch-up never delays
/// new changes.
const FOLLOWER_CATCHING_UP: u64 = 64;
/// A follower whose applied index did not move for this long is not
/// waited for.
const FOLLOWER_STALL: Duration = Duration::from_secs(2);
/// A follower whose last reply is older than this is not active: not
/// staged on, not waited for. (raft-rs's `recent_active` is reset every
/// election timeout under check_quorum, and would drop live followers now
/// and then.)
const ANSWERED_WITHIN: Duration = Duration::from_secs(1);
// Idle heartbeats go unacked for up to this long (plus a heartbeat).
const _: () = assert!(
    crate::net::transport::ACK_AT_LEAST_EVERY.as_millis() * 2 <= ANSWERED_WITHIN.as_millis()
);
/// How long a new leader waits for missing content to be fetched before it
/// takes its own tree as the truth for those paths.
const MISSING_GRACE: Duration = Duration::from_secs(5);

/// The applied index `peer` last reported on its link, and how long ago.
fn peer_applied(transport: &Transport, peer: u64) -> Option<(u64, Duration)> {
    let (index, at) = transport.peer_applied(peer)?;
    Some((index, at.elapsed()))
}

mod pipeline;
pub(crate) use pipeline::through_the_log;
mod plan;
#[cfg(test)]
mod tests;
mod watch;

use pipeline::*;
use plan::*;
use watch::*;
pub use watch::{inotify_watch_limit, warn_watch_budget, Source};
