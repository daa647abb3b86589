//! The node task's inbox and the handle everything else talks to it through:
//! a closed [`NodeMsg`] enum in, the published [`NodeView`] out.
//!
//! Invariant owned here: no caller ever touches the Raft core; every request
//! is a message the node task answers (or drops, for peers' Raft messages,
//! which Raft retransmits), and every wait on an answer has a deadline.

use std::time::{Duration, Instant};

use raft::prelude::Message;
use raft::SnapshotStatus;
use tokio::sync::{mpsc, oneshot, watch};

use crate::core::config::NodeId;
use crate::raft::core::{Command, CoreError, MemberChange, NodeView};

/// Why a request to the node failed, as one sentence for the user.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    #[error("{}", not_leader_text(*.leader))]
    NotLeader { leader: Option<NodeId> },
    #[error("timed out: {0}")]
    TimedOut(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("the node is shutting down")]
    ShuttingDown,
    /// Valid, but not possible this instant (e.g. during a leadership transfer).
    #[error("{0}")]
    Retry(String),
}

fn not_leader_text(leader: Option<NodeId>) -> String {
    match leader {
        Some(l) => format!("this node is not the leader; node {l} is"),
        None => "no leader is known right now (an election may be under way, or a majority is unreachable)".to_string(),
    }
}

impl From<CoreError> for RequestError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::NotLeader { leader } => RequestError::NotLeader { leader },
            CoreError::Busy(why) => RequestError::Retry(why),
            other => RequestError::Unreachable(other.to_string()),
        }
    }
}

/// The closed set of inputs of the node task.
#[derive(Debug)]
pub enum NodeMsg {
    /// Authenticated Raft messages from a peer.
    Raft(Vec<Message>),
    /// Propose file commands in `term` (leader only); reply with the last
    /// one's index once it is applied here.
    Propose {
        term: u64,
        commands: Vec<Command>,
        deadline: Instant,
        reply: oneshot::Sender<Result<u64, RequestError>>,
    },
    /// Commit a no-op; reply with its index once applied here (leader only).
    Barrier {
        deadline: Instant,
        reply: oneshot::Sender<Result<u64, RequestError>>,
    },
    /// Hand leadership to `target` once it has caught up (leader only).
    Transfer {
        target: NodeId,
        deadline: Instant,
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    /// A membership change (leader only): checked against the committed
    /// configuration, proposed, and answered with its entry's index once
    /// applied here. A change that removes this leader is answered with
    /// `Retry` after it starts handing leadership over.
    ChangeMembership {
        change: MemberChange,
        deadline: Instant,
        reply: oneshot::Sender<Result<u64, RequestError>>,
    },
    /// A peer that applied past this node's addition no longer lists it:
    /// it was removed while it could not hear of it.
    Removed(String),
    /// Delivery news from the transport.
    Link(LinkEvent),
    /// Liveness probe (systemd watchdog): answered as soon as it is read.
    Ping(oneshot::Sender<()>),
}

/// A cheap, cloneable way to talk to the node task: the one handle the
/// services (peer, admin, source, metrics, systemd) need for Raft. It
/// carries no service state of its own; `run` hands each service the
/// replication state and peer links it uses.
#[derive(Clone)]
pub struct NodeHandle {
    id: NodeId,
    inbox: mpsc::Sender<NodeMsg>,
    view: watch::Receiver<NodeView>,
    started: Instant,
    /// Expiry of this node's certificate, for status, checks and metrics.
    cert_not_after: std::time::SystemTime,
}

impl NodeHandle {
    /// A handle on the node task that reads `inbox` and publishes `view`;
    /// `cert_not_after` is this node's certificate expiry, which status,
    /// checks and metrics report beside the view.
    pub fn new(
        id: NodeId,
        inbox: mpsc::Sender<NodeMsg>,
        view: watch::Receiver<NodeView>,
        cert_not_after: std::time::SystemTime,
    ) -> NodeHandle {
        NodeHandle {
            id,
            inbox,
            view,
            started: Instant::now(),
            cert_not_after,
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn view(&self) -> NodeView {
        self.view.borrow().clone()
    }

    /// This node's applied index, without cloning the whole view.
    pub fn applied_index(&self) -> u64 {
        self.view.borrow().applied_index
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn cert_not_after(&self) -> std::time::SystemTime {
        self.cert_not_after
    }

    /// Proposes `commands` as the leader of `term`; resolves once the last
    /// is applied on this node, or fails if the term moved on or it did not
    /// commit in time.
    pub async fn propose(
        &self,
        term: u64,
        commands: Vec<Command>,
        wait: Duration,
    ) -> Result<u64, RequestError> {
        let rx = self.propose_start(term, commands, wait).await?;
        rx.await.map_err(|_| RequestError::ShuttingDown)?
    }

    /// As [`NodeHandle::propose`], but returns once the node task has the
    /// commands (so calls are proposed in the order they are made), with the
    /// receiver of the outcome.
    pub async fn propose_start(
        &self,
        term: u64,
        commands: Vec<Command>,
        wait: Duration,
    ) -> Result<oneshot::Receiver<Result<u64, RequestError>>, RequestError> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + wait;
        self.inbox
            .send(NodeMsg::Propose {
                term,
                commands,
                deadline,
                reply,
            })
            .await
            .map_err(|_| RequestError::ShuttingDown)?;
        Ok(rx)
    }

    /// Hands peer messages to the node without waiting; drops them if it is overloaded.
    pub fn deliver(&self, messages: Vec<Message>) {
        if self.inbox.try_send(NodeMsg::Raft(messages)).is_err() {
            tracing::debug!("node inbox full; dropping peer messages (raft retransmits)");
        }
    }

    /// Commits a no-op through this node, which must be the leader.
    pub async fn local_barrier(&self, wait: Duration) -> Result<u64, RequestError> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + wait;
        self.inbox
            .send(NodeMsg::Barrier { deadline, reply })
            .await
            .map_err(|_| RequestError::ShuttingDown)?;
        rx.await.map_err(|_| RequestError::ShuttingDown)?
    }

    /// Hands leadership from this node (the leader) to `target`.
    pub async fn transfer_leadership(
        &self,
        target: NodeId,
        wait: Duration,
    ) -> Result<(), RequestError> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + wait;
        self.inbox
            .send(NodeMsg::Transfer {
                target,
                deadline,
                reply,
            })
            .await
            .map_err(|_| RequestError::ShuttingDown)?;
        rx.await.map_err(|_| RequestError::ShuttingDown)?
    }

    /// Carries out a membership change through this node, which must be the
    /// leader; resolves with its entry's index once applied here.
    pub async fn change_membership(
        &self,
        change: MemberChange,
        wait: Duration,
    ) -> Result<u64, RequestError> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + wait;
        self.inbox
            .send(NodeMsg::ChangeMembership {
                change,
                deadline,
                reply,
            })
            .await
            .map_err(|_| RequestError::ShuttingDown)?;
        rx.await.map_err(|_| RequestError::ShuttingDown)?
    }

    /// Tells the node it was removed from the cluster (see [`NodeMsg::Removed`]).
    pub async fn report_removed(&self, why: String) {
        let _ = self.inbox.send(NodeMsg::Removed(why)).await;
    }

    /// Whether the node task answers within `wait`: it is alive and not stuck.
    pub async fn ping(&self, wait: Duration) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.inbox.try_send(NodeMsg::Ping(reply)).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(wait, rx).await, Ok(Ok(())))
    }

    /// Waits until the published view satisfies `pred`, or `wait` passes.
    pub async fn wait_view(
        &self,
        wait: Duration,
        mut pred: impl FnMut(&NodeView) -> bool,
    ) -> Option<NodeView> {
        let mut rx = self.view.clone();
        let result = tokio::time::timeout(wait, rx.wait_for(|v| pred(v))).await;
        match result {
            Ok(Ok(v)) => Some(v.clone()),
            _ => None,
        }
    }
}

/// What the sender tasks tell the node task about delivery.
#[derive(Debug)]
pub enum LinkEvent {
    Unreachable(NodeId),
    Snapshot(NodeId, SnapshotStatus),
}
