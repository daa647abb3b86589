//! The `Peer` gRPC service: Raft messages, status, leadership transfers and
//! barriers for the other nodes, and (through [`FileService`], which the
//! replication layer provides) the `Fetch` and `Stage` calls of file
//! replication.
//!
//! Invariant owned here (invariant 5): every Raft message a peer sends must
//! claim to come from the member its certificate names, and be addressed to
//! this node; anything else is refused and logged.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::core::config::NodeId;
use crate::core::manifest::{Pause, PAUSE_TEXT_MAX};
use crate::core::status::FilesView;
use crate::net::accept::{PeerConn, PeerIdentity};
use crate::net::proto::peer::peer_server::{Peer, PeerServer};
use crate::net::proto::peer::{
    BarrierReply, BarrierRequest, FetchChunk, FetchRequest, MemberChangeReply, MemberChangeRequest,
    NodeStatusRequest, NodeView, PauseChange, PauseChangeReply, QuarantinedReply,
    QuarantinedRequest, RaftAck, RaftBatch, RollbackReply, RollbackRequest, StageReply,
    StageRequest, SyncReply, SyncRequest, TransferReply, TransferRequest,
};
use crate::net::proto::{decode_raft_message, MAX_MESSAGE_BYTES};
use crate::net::transport::Transport;
use crate::raft::core::{Command, MemberChange, Role};
use crate::raft::handle::{NodeHandle, RequestError};

/// Longest a peer may ask us to wait in a transfer or barrier.
const MAX_REQUEST_WAIT: Duration = Duration::from_secs(600);

/// The file side of the peer service: what a data node's replication state
/// answers to `Fetch`, `Stage` and status. The replication layer implements
/// it and `run` hands it over, so this layer never depends on replication.
/// Every method may block on disk; the service calls it off the runtime.
pub trait FileService: Send + Sync + 'static {
    /// Whether `peer` is a witness (which holds no files and is served none).
    fn is_witness(&self, peer: NodeId) -> bool;
    /// Whether this node holds any sync set (a witness holds none).
    fn holds_sets(&self) -> bool;
    /// The chunks of a committed version, as a patch against the caller's
    /// signature; refused unless this node holds exactly that version.
    fn fetch(&self, req: &FetchRequest) -> Result<Vec<FetchChunk>, Status>;
    /// Stores one piece of a staged upload (and, with the last piece of an
    /// upload whose versions follow, the finished files made of it).
    fn stage(&self, req: StageRequest) -> Result<(), StageRefused>;
    /// This node's sync sets as status reports them.
    fn files_view(&self) -> FilesView;
    /// The names of this node's sync sets.
    fn set_names(&self) -> Vec<String>;
    /// The committed pause of `set`, if it is paused.
    fn pause_of(&self, set: &str) -> Option<Pause>;
    /// Asks this node's source (it leads) for a full pass of `set` (every
    /// set when `None`) and a committed reconcile; the receiver gets the
    /// reconcile's index once it is applied here.
    fn request_sync(
        &self,
        set: Option<String>,
    ) -> tokio::sync::oneshot::Receiver<Result<u64, String>>;

    /// Before a `clusterctl sync` pass on the leader: reads the account
    /// databases of `set`'s accounts sets (every one when `None`) into
    /// their views now; with `confirm`, lets a removal larger than
    /// `max_removed` go. Blocking (a shadow-utils lock is waited for).
    fn refresh_accounts(&self, set: Option<&str>, confirm: bool) -> Result<(), String>;
    /// Plans `clusterctl rollback` on the leader from its history: what it
    /// changes (one line per path) and, unless `dry_run` or nothing
    /// changes, the commands to propose as `proposer`, once the set's
    /// validator passed the result. Refusals are one sentence.
    fn plan_rollback(
        &self,
        req: &RollbackRequest,
        proposer: NodeId,
    ) -> Result<(String, Vec<Command>), RequestError>;
    /// The quarantined copy `id` this node holds: read for a restore, or
    /// (with `drop`) deleted with its record. Refusals are one sentence.
    fn quarantined(&self, id: &str, drop: bool) -> Result<QuarantinedReply, String>;
}

/// A rollback as the leader: plans it (off the runtime), then commits it.
/// Returns the new revision (0 when nothing was proposed) and the plan.
pub async fn lead_rollback(
    node: &NodeHandle,
    files: Arc<dyn FileService>,
    req: RollbackRequest,
) -> Result<(u64, String), RequestError> {
    let view = node.view();
    if view.role != Role::Leader {
        return Err(RequestError::NotLeader {
            leader: view.leader,
        });
    }
    known_set(node, files.as_ref(), &req.set)?;
    let wait = wait_of(req.timeout_ms);
    let proposer = node.id();
    let (plan, commands) = {
        let req = req.clone();
        tokio::task::spawn_blocking(move || files.plan_rollback(&req, proposer))
            .await
            .map_err(|e| RequestError::Invalid(format!("the rollback's planning failed: {e}")))??
    };
    if commands.is_empty() {
        return Ok((0, plan));
    }
    let index = node.propose(view.term, commands, wait).await?;
    Ok((index, plan))
}

/// How long the leader waits for a joining node's status before it refuses
/// to add it.
const JOIN_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// A membership change as the leader: an added node must answer at its
/// address with its own certificate and an empty log (a node of another
/// cluster, or one removed earlier, is refused), then the node task checks
/// the change against the committed configuration and commits it. Called
/// for `clusterctl member` on the leader and for other nodes' forwards.
pub async fn lead_member_change(
    node: &NodeHandle,
    transport: &Transport,
    req: &MemberChangeRequest,
) -> Result<u64, RequestError> {
    let view = node.view();
    if view.role != Role::Leader {
        return Err(RequestError::NotLeader {
            leader: view.leader,
        });
    }
    let change = crate::net::proto::member_change(req).map_err(RequestError::Invalid)?;
    if let MemberChange::Add(info) = &change {
        if !view.members.lists(info.id) {
            probe_joining_node(transport, info, req.witness).await?;
        }
    }
    node.change_membership(change, wait_of(req.timeout_ms))
        .await
}

/// Asks node `id` at `addr` for its status over a new, authenticated link:
/// it must prove it is node `id` and hold no Raft log yet.
async fn probe_joining_node(
    transport: &Transport,
    info: &crate::core::members::MemberInfo,
    witness: bool,
) -> Result<(), RequestError> {
    let (id, addr) = (info.id, info.addr.as_str());
    let mut client = transport.probe_client(id, addr);
    let mut req = Request::new(NodeStatusRequest::default());
    req.set_timeout(JOIN_PROBE_TIMEOUT);
    let answer = tokio::time::timeout(JOIN_PROBE_TIMEOUT, client.node_status(req)).await;
    let view = match answer {
        Ok(Ok(v)) => v.into_inner(),
        Ok(Err(status)) => {
            return Err(RequestError::Invalid(format!(
                "node {id} at {addr} did not answer as node {id} ({}); start it there with an empty data_dir and `[node] join = true`, and check the address and its certificate",
                crate::net::transport::status_chain(&status)
            )))
        }
        Err(_) => {
            return Err(RequestError::Invalid(format!(
                "node {id} at {addr} did not answer within {} s; start it there with an empty data_dir and `[node] join = true`, and check the address",
                JOIN_PROBE_TIMEOUT.as_secs()
            )))
        }
    };
    if (view.role == "witness") != witness {
        return Err(RequestError::Invalid(if witness {
            format!("node {id} at {addr} is not a witness (its config lacks `witness = true`); add it without --witness, or make it a witness first")
        } else {
            format!("node {id} at {addr} is a witness (its config says `witness = true`); add it with --witness")
        }));
    }
    if view.last_index > 0 || (view.member != "joining" && !view.member.is_empty()) {
        return Err(RequestError::Invalid(format!(
            "node {id} at {addr} already holds a Raft log (it is a {}, at entry {}); a joining node must start with an empty data_dir and `[node] join = true`",
            if view.member.is_empty() { "member" } else { view.member.as_str() },
            view.last_index
        )));
    }
    Ok(())
}

/// Pauses or resumes a set as the leader: checks the request against this
/// node's sets and the committed pause, then commits it. Called for
/// `clusterctl pause`/`resume` on the leader and for other nodes' forwards.
pub async fn lead_pause_change(
    node: &NodeHandle,
    files: &dyn FileService,
    c: &PauseChange,
) -> Result<u64, RequestError> {
    let view = node.view();
    if view.role != Role::Leader {
        return Err(RequestError::NotLeader {
            leader: view.leader,
        });
    }
    known_set(node, files, &c.set)?;
    if c.reason.len() > PAUSE_TEXT_MAX || c.by.len() > PAUSE_TEXT_MAX {
        return Err(RequestError::Invalid(format!(
            "the reason of a pause may be at most {PAUSE_TEXT_MAX} bytes"
        )));
    }
    let command = if c.resume {
        if files.pause_of(&c.set).is_none() {
            return Err(RequestError::Invalid(format!(
                "sync set {:?} is not paused",
                c.set
            )));
        }
        Command::Resume {
            set: c.set.clone(),
            by: c.by.clone(),
        }
    } else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Command::Pause {
            set: c.set.clone(),
            pause: Pause {
                reason: c.reason.clone(),
                since_ms: now,
                until_ms: (c.for_ms > 0).then(|| now.saturating_add(c.for_ms)),
                by: c.by.clone(),
            },
        }
    };
    node.propose(view.term, vec![command], wait_of(c.timeout_ms))
        .await
}

/// A full pass and a committed reconcile of `set` (every set when empty)
/// as the leader; returns the reconcile's index.
pub async fn lead_sync(
    node: &NodeHandle,
    files: &dyn FileService,
    r: &SyncRequest,
) -> Result<u64, RequestError> {
    let view = node.view();
    if view.role != Role::Leader {
        return Err(RequestError::NotLeader {
            leader: view.leader,
        });
    }
    let set = (!r.set.is_empty()).then(|| r.set.clone());
    if files.set_names().is_empty() {
        return Err(RequestError::Invalid(
            "the leader holds no sync sets: there is nothing to sync".to_string(),
        ));
    }
    if let Some(s) = &set {
        known_set(node, files, s)?;
    }
    if r.confirm && set.is_none() {
        return Err(RequestError::Invalid(
            "--confirm needs the name of the accounts set whose held change it lets go".to_string(),
        ));
    }
    tokio::task::block_in_place(|| files.refresh_accounts(set.as_deref(), r.confirm))
        .map_err(RequestError::Invalid)?;
    let wait = wait_of(r.timeout_ms);
    match tokio::time::timeout(wait, files.request_sync(set)).await {
        Ok(Ok(Ok(index))) => Ok(index),
        Ok(Ok(Err(why))) => Err(RequestError::Retry(why)),
        Ok(Err(_)) => Err(RequestError::NotLeader { leader: None }),
        Err(_) => Err(RequestError::TimedOut(format!(
            "the leader's pass over the set did not finish within {} ms",
            wait.as_millis()
        ))),
    }
}

fn known_set(node: &NodeHandle, files: &dyn FileService, set: &str) -> Result<(), RequestError> {
    let names = files.set_names();
    if names.iter().any(|n| n == set) {
        return Ok(());
    }
    Err(RequestError::Invalid(format!(
        "no sync set is named {set:?} on the leader, node {} (its sets: {})",
        node.id(),
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    )))
}

/// Why a `Stage` piece was not stored: the file side's own error, logged
/// here and sent to the leader as one sentence.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StageRefused(pub Box<dyn std::error::Error + Send + Sync>);

pub struct PeerService {
    node: NodeHandle,
    /// The peers' reported applied indexes are recorded here.
    transport: Transport,
    files: Arc<dyn FileService>,
}

impl PeerService {
    /// The caller's identity, if it is still a member (a removed node keeps
    /// its certificate, and may keep a connection opened before).
    fn member_identity<T>(&self, req: &Request<T>) -> Result<PeerIdentity, Status> {
        let who = identity(req)?;
        if !self.transport.admits(who.node_id, &self.node.view()) {
            warn!(
                peer = who.node_id,
                "refused a request of node {}: it is not a member of this cluster (any more)",
                who.node_id
            );
            return Err(Status::permission_denied(format!(
                "node {} is not a member of this cluster",
                who.node_id
            )));
        }
        Ok(who)
    }

    pub fn server(
        node: NodeHandle,
        transport: Transport,
        files: Arc<dyn FileService>,
    ) -> PeerServer<PeerService> {
        PeerServer::new(PeerService {
            node,
            transport,
            files,
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn identity<T>(req: &Request<T>) -> Result<PeerIdentity, Status> {
    req.extensions()
        .get::<PeerIdentity>()
        .copied()
        .ok_or_else(|| Status::unauthenticated("no authenticated peer identity on this connection"))
}

fn wait_of(ms: u64) -> Duration {
    Duration::from_millis(ms).min(MAX_REQUEST_WAIT)
}

/// Checks a batch of Raft messages from `who` (each must decode, come from
/// the node its certificate names and be addressed to this node) and hands
/// them to the node task; notes the applied index the batch reports (a
/// batch without messages may carry only that); the ack carries this
/// node's applied index.
fn deliver_batch(
    node: &NodeHandle,
    transport: &Transport,
    who: PeerIdentity,
    batch: RaftBatch,
) -> Result<RaftAck, Status> {
    let mut messages = Vec::with_capacity(batch.messages.len());
    for bytes in &batch.messages {
        let m = decode_raft_message(bytes).map_err(|e| {
                warn!(peer = who.node_id, remote = %who.remote, "refused a raft message from peer {}: it does not decode: {e}", who.node_id);
                Status::invalid_argument(format!("undecodable raft message: {e}"))
            })?;
        if m.from != who.node_id {
            warn!(peer = who.node_id, remote = %who.remote, claimed = m.from,
                    "refused a raft message from peer {}: it claims to come from node {}", who.node_id, m.from);
            return Err(Status::permission_denied(format!(
                "your certificate is for node {}, but the message claims node {}",
                who.node_id, m.from
            )));
        }
        if m.to != node.id() {
            return Err(Status::invalid_argument(format!(
                "message addressed to node {}, but this is node {}",
                m.to,
                node.id()
            )));
        }
        messages.push(m);
    }
    if !messages.is_empty() {
        node.deliver(messages);
    }
    if batch.sender_applied > 0 {
        transport.note_applied(who.node_id, batch.sender_applied);
    }
    Ok(RaftAck {
        applied: node.applied_index(),
        acks_on_request: false,
    })
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn set_pause(
        &self,
        req: Request<PauseChange>,
    ) -> Result<Response<PauseChangeReply>, Status> {
        let who = identity(&req)?;
        let mut c = req.into_inner();
        if c.by.is_empty() {
            c.by = format!("node {}", who.node_id);
        }
        let index = lead_pause_change(&self.node, self.files.as_ref(), &c)
            .await
            .map_err(request_status)?;
        Ok(Response::new(PauseChangeReply { index }))
    }

    async fn change_membership(
        &self,
        req: Request<MemberChangeRequest>,
    ) -> Result<Response<MemberChangeReply>, Status> {
        let who = self.member_identity(&req)?;
        info!(
            peer = who.node_id,
            "membership change forwarded by node {}: {:?}",
            who.node_id,
            req.get_ref()
        );
        let index = lead_member_change(&self.node, &self.transport, req.get_ref())
            .await
            .map_err(request_status)?;
        Ok(Response::new(MemberChangeReply { index }))
    }

    async fn sync(&self, req: Request<SyncRequest>) -> Result<Response<SyncReply>, Status> {
        let index = lead_sync(&self.node, self.files.as_ref(), req.get_ref())
            .await
            .map_err(request_status)?;
        Ok(Response::new(SyncReply {
            index,
            report: String::new(),
        }))
    }

    async fn rollback(
        &self,
        req: Request<RollbackRequest>,
    ) -> Result<Response<RollbackReply>, Status> {
        let who = identity(&req)?;
        let r = req.into_inner();
        info!(peer = who.node_id, set = %r.set, to = r.to, "rollback of sync set {:?} to revision {} forwarded by node {}", r.set, r.to, who.node_id);
        let (index, plan) = lead_rollback(&self.node, self.files.clone(), r)
            .await
            .map_err(request_status)?;
        Ok(Response::new(RollbackReply { index, plan }))
    }

    async fn quarantined(
        &self,
        req: Request<QuarantinedRequest>,
    ) -> Result<Response<QuarantinedReply>, Status> {
        let who = self.member_identity(&req)?;
        if self.files.is_witness(who.node_id) {
            warn!(
                peer = who.node_id,
                "refused a quarantined copy to peer {}: it is a witness, which holds no files",
                who.node_id
            );
            return Err(Status::permission_denied(
                "witnesses hold no files and are served none",
            ));
        }
        let r = req.into_inner();
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || files.quarantined(&r.id, r.drop))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map(Response::new)
            .map_err(Status::failed_precondition)
    }

    type FetchStream = futures::stream::Iter<std::vec::IntoIter<Result<FetchChunk, Status>>>;

    async fn fetch(
        &self,
        req: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let who = self.member_identity(&req)?;
        if self.files.is_witness(who.node_id) {
            warn!(peer = who.node_id, remote = %who.remote, "refused a file fetch from peer {}: it is a witness, which holds no files", who.node_id);
            return Err(Status::permission_denied(
                "witnesses hold no files and are served none",
            ));
        }
        let r = req.into_inner();
        let files = self.files.clone();
        let chunks = tokio::task::spawn_blocking(move || files.fetch(&r))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .inspect_err(|e| {
                tracing::debug!(peer = who.node_id, "fetch refused: {}", e.message())
            })?;
        Ok(Response::new(futures::stream::iter(
            chunks.into_iter().map(Ok).collect::<Vec<_>>(),
        )))
    }

    async fn stage(&self, req: Request<StageRequest>) -> Result<Response<StageReply>, Status> {
        let who = identity(&req)?;
        if !self.files.holds_sets() {
            return Err(Status::failed_precondition(
                "this node holds no sync sets: nothing to stage",
            ));
        }
        // Only the leader this node follows may fill its staging directory.
        let leader = self.node.view().leader;
        if leader != Some(who.node_id) {
            return Err(Status::failed_precondition(format!(
                "node {} is not the leader this node follows ({leader:?}); send the content through the log",
                who.node_id
            )));
        }
        let r = req.into_inner();
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || files.stage(r))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| {
                warn!(peer = who.node_id, remote = %who.remote, "did not stage content from peer {}: {e}", who.node_id);
                Status::unavailable(e.to_string())
            })?;
        Ok(Response::new(StageReply {}))
    }

    async fn raft(&self, req: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let who = identity(&req)?;
        deliver_batch(&self.node, &self.transport, who, req.into_inner()).map(Response::new)
    }

    type RaftStreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftAck, Status>> + Send>>;

    async fn raft_stream(
        &self,
        req: Request<tonic::Streaming<RaftBatch>>,
    ) -> Result<Response<Self::RaftStreamStream>, Status> {
        use futures::StreamExt;
        let who = identity(&req)?;
        let node = self.node.clone();
        let transport = self.transport.clone();
        // A refused batch ends the call with its status, as `raft` would
        // answer it; the caller opens a new one. A batch marked `no_ack`
        // that was delivered gets no answer (the caller does not wait).
        let acks = req.into_inner().filter_map(move |batch| {
            let answer = match batch {
                Ok(b) if b.no_ack => deliver_batch(&node, &transport, who, b).err().map(Err),
                Ok(b) => Some(deliver_batch(&node, &transport, who, b).map(|ack| RaftAck {
                    acks_on_request: true,
                    ..ack
                })),
                Err(status) => Some(Err(status)),
            };
            std::future::ready(answer)
        });
        Ok(Response::new(Box::pin(acks)))
    }

    async fn node_status(
        &self,
        req: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeView>, Status> {
        let current = self.node.view();
        if !req.get_ref().members.is_empty()
            && current.members.member == crate::raft::core::Membership::Joining
        {
            // Only a node that knows no members yet takes addresses this way;
            // the snapshot it starts from brings the stored directory.
            let who = identity(&req)?;
            let members = crate::net::proto::member_addresses(&req.get_ref().members);
            info!(
                peer = who.node_id,
                "joining: node {} introduced the members {}",
                who.node_id,
                members
                    .iter()
                    .map(|m| format!("{} at {}", m.id, m.addr))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            self.transport.learn(&members);
        }
        let mut view: NodeView = (&current).into();
        // A member that lags, or that a new member's connections reach
        // before it applied that member's addition, learns addresses here.
        view.addresses = crate::net::proto::introductions(&self.transport.book());
        view.uptime_ms = self.node.uptime().as_millis() as u64;
        view.cert_not_after_unix = crate::core::status::unix_seconds(self.node.cert_not_after());
        view.files = Some((&self.files.files_view()).into());
        Ok(Response::new(view))
    }

    async fn transfer_leadership(
        &self,
        req: Request<TransferRequest>,
    ) -> Result<Response<TransferReply>, Status> {
        let who = identity(&req)?;
        let r = req.into_inner();
        info!(
            peer = who.node_id,
            target = r.target,
            "leadership transfer requested by peer"
        );
        self.node
            .transfer_leadership(r.target, wait_of(r.timeout_ms))
            .await
            .map_err(request_status)?;
        Ok(Response::new(TransferReply {}))
    }

    async fn barrier(
        &self,
        req: Request<BarrierRequest>,
    ) -> Result<Response<BarrierReply>, Status> {
        let r = req.into_inner();
        let index = self
            .node
            .local_barrier(wait_of(r.timeout_ms))
            .await
            .map_err(request_status)?;
        Ok(Response::new(BarrierReply { index }))
    }
}

/// Maps a node request error to a gRPC status, keeping its sentence.
pub fn request_status(e: RequestError) -> Status {
    match &e {
        RequestError::NotLeader { .. } => Status::failed_precondition(e.to_string()),
        RequestError::TimedOut(_) => Status::deadline_exceeded(e.to_string()),
        RequestError::Invalid(_) => Status::invalid_argument(e.to_string()),
        RequestError::Unreachable(_) => Status::unavailable(e.to_string()),
        RequestError::ShuttingDown => Status::unavailable(e.to_string()),
        RequestError::Retry(_) => Status::aborted(e.to_string()),
    }
}

/// Logs requests a peer made that the gRPC layer refused before our handlers
/// ran (a message over [`MAX_MESSAGE_BYTES`], a body cut short), with the
/// peer's certificate identity: those never reach a handler that could.
#[derive(Clone)]
struct LogRefused<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for LogRefused<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let who = req.extensions().get::<PeerIdentity>().copied();
        // A refcounted clone: this runs for every Raft RPC.
        let uri = req.uri().clone();
        let call = self.inner.call(req);
        Box::pin(async move {
            let response = call.await?;
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok());
            // Trailers-only responses: the request was refused before or
            // without a handler. Our handlers log their own refusals, with
            // codes other than these.
            if let (Some(who), Some(code)) = (who, code) {
                let code = tonic::Code::from_i32(code);
                if matches!(
                    code,
                    tonic::Code::OutOfRange | tonic::Code::Internal | tonic::Code::Unknown
                ) {
                    let message = response
                        .headers()
                        .get("grpc-message")
                        .and_then(|v| v.to_str().ok())
                        .map(|m| {
                            percent_encoding::percent_decode_str(m)
                                .decode_utf8_lossy()
                                .into_owned()
                        })
                        .unwrap_or_default();
                    warn!(peer = who.node_id, remote = %who.remote, "refused a {} request from peer {} ({}): {code:?}: {message}", uri.path(), who.node_id, who.remote);
                }
            }
            Ok(response)
        })
    }
}

/// Serves the peer service on already-authenticated connections until `shutdown` resolves.
pub async fn serve(
    incoming: ReceiverStream<io::Result<PeerConn>>,
    node: NodeHandle,
    transport: Transport,
    files: Arc<dyn FileService>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(2)))
        .http2_keepalive_timeout(Some(Duration::from_secs(3)))
        // Windows sized to the bandwidth-delay product (see `peer_channel`).
        .http2_adaptive_window(Some(true))
        .tcp_nodelay(true)
        .layer(tower::layer::layer_fn(|inner| LogRefused { inner }))
        .add_service(PeerService::server(node, transport, files))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
