//! The running node: `run(config, shutdown)` wires storage, TLS, transport,
//! the peer and admin servers around one node task, and the node task itself.
//!
//! The node task is the only owner of the [`RaftCore`]. Everything else talks
//! to it through [`NodeHandle`], which sends it a closed [`NodeMsg`] enum and
//! reads its published [`NodeView`]. Invariant owned here: the task never
//! blocks on I/O other than its own fsyncs, and on shutdown a leader hands
//! leadership to a caught-up follower before it exits.

mod membership;
mod run;
pub mod systemd;
mod task;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn, Instrument};

use crate::core::config::{Config, NodeId};
use crate::core::members::{Directory, MemberInfo, MembershipState};
use crate::net::tls::PeerTls;
use crate::net::transport::Transport;
use crate::raft::core::{
    Command, CommittedEntry, CoreError, CoreOptions, MemberChange, NodeView, RaftCore, Role,
    StateMachine,
};
use crate::raft::handle::{LinkEvent, NodeHandle, NodeMsg, RequestError};
use crate::raft::storage::RaftStore;
use crate::replication::apply::{Applied, Applier, ApplyMsg};
use crate::replication::shared::Shared;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot create {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Storage(#[from] crate::raft::storage::StorageError),
    #[error(transparent)]
    Tls(#[from] crate::net::tls::TlsError),
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("cannot listen for peers on {addr} (key `node.listen`): {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    AdminSocket(#[from] crate::ops::admin::SocketError),
    #[error("cannot serve the remote admin port on {addr} (key `admin.listen`): {source}")]
    AdminListen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr} (key `metrics.listen`): {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error("the node task failed: {0}; exiting so the service manager restarts the node from its durable state")]
    Panicked(String),
    #[error("peer server failed: {0}")]
    PeerServer(tonic::transport::Error),
    #[error(transparent)]
    Files(#[from] crate::replication::files_store::FilesStoreError),
    #[error("the leader's snapshot at index {index} is unusable ({why}); exiting so the service manager restarts the node, which asks for it again")]
    BadSnapshot { index: u64, why: String },
    #[error("applying committed file changes failed: {0}; exiting so the service manager restarts the node from its durable state")]
    Apply(#[source] crate::replication::apply::ApplyError),
}

pub use run::{join_ids, open_storage, run};
