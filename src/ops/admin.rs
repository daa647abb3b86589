//! The local admin service on the node's unix socket, and the client side
//! `clusterctl` uses to reach it.
//!
//! Invariant owned here: an admin call never hangs on a dead peer. Status asks
//! every peer with a short deadline and lists the silent ones as unreachable;
//! promote and barrier are bounded by the caller's timeout and fail with a
//! sentence saying what stood in the way.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::core::config::NodeId;
use crate::core::status::{promote_plan, ClusterStatus, NodeEntry, PlanError, PromotePlan};
use crate::net::peer::request_status;
use crate::net::proto::admin::admin_client::AdminClient;
use crate::net::proto::admin::admin_server::{Admin, AdminServer};
use crate::net::proto::admin::{
    ClusterStatus as PbClusterStatus, ConflictActionRequest, HistoryReply, HistoryRequest,
    MemberReply, PromoteReply, PromoteRequest, StatusRequest, VersionReply, VersionRequest,
};
use crate::net::proto::peer::{
    BarrierReply, BarrierRequest, MemberChangeRequest, NodeStatusRequest, PauseChange,
    PauseChangeReply, QuarantinedRequest, RollbackReply, RollbackRequest, SyncReply, SyncRequest,
    TransferRequest,
};
use crate::net::tls::AdminCaller;
use crate::net::transport::Transport;
use crate::raft::handle::{NodeHandle, RequestError};
use crate::replication::shared::Shared;

/// Default deadline for asking one peer for its status.
pub const DEFAULT_PEER_STATUS_TIMEOUT: Duration = Duration::from_millis(800);

/// Why the admin socket could not be served: the path and one sentence.
#[derive(Debug, thiserror::Error)]
#[error("admin socket {path} (key `node.admin_socket`): {reason}")]
pub struct SocketError {
    pub path: String,
    pub reason: String,
}

/// Binds the admin socket with mode 0600, replacing a stale socket file left
/// by a crash but never any other kind of file.
pub fn bind_socket(path: &Path) -> Result<UnixListener, SocketError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |reason: String| SocketError {
        path: path.display().to_string(),
        reason,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| err(format!("cannot create its directory: {e}")))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err(
                    "another clusterd is already serving it; stop that one or choose another path"
                        .into(),
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
        }
        Ok(_) => {
            return Err(err(
                "exists and is not a socket; remove it or choose another path".into(),
            ))
        }
        Err(_) => {}
    }
    // Bind under a restrictive umask so the socket is never briefly world-accessible.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| err(format!("cannot bind: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(format!("cannot set mode 0600: {e}")))?;
    Ok(listener)
}

/// Who called over the remote admin port, and from where.
#[derive(Debug, Clone)]
pub struct RemoteCaller {
    pub caller: AdminCaller,
    pub remote: std::net::SocketAddr,
}

/// Refuses a change (promote, barrier) to callers that are not
/// administrators. The local socket (root only, mode 0600) carries no
/// caller: it is always allowed.
fn require_admin<T>(req: &Request<T>, what: &str) -> Result<(), Status> {
    match req.extensions().get::<RemoteCaller>() {
        None => Ok(()),
        Some(RemoteCaller {
            caller: AdminCaller::Admin(name),
            remote,
        }) => {
            info!(admin = %name, %remote, "{what} by admin {name} from {remote}");
            Ok(())
        }
        Some(RemoteCaller { caller, remote }) => {
            warn!(%remote, "refused {what} from {caller} at {remote}: not an admin certificate");
            Err(Status::permission_denied(format!(
                "{what} needs an admin certificate; the certificate of {caller} may only read status and conflicts (make one with `clusterctl certs admin --out DIR --name NAME`)"
            )))
        }
    }
}

/// The remote admin port: mutual TLS against the cluster CA; callers with
/// an admin certificate may do everything the local socket allows, callers
/// with a node certificate only read.
pub fn remote_incoming(
    listener: tokio::net::TcpListener,
    tls: crate::net::tls::LiveTls,
) -> tokio_stream::wrappers::ReceiverStream<
    std::io::Result<crate::net::accept::AuthedConn<RemoteCaller>>,
> {
    crate::net::accept::accept_authenticated(
        listener,
        tls,
        "admin client",
        crate::net::tls::PeerTls::admin_acceptor,
        |stream, remote| {
            let leaf = crate::net::tls::peer_leaf(stream.get_ref().1)
                .ok_or("it presented no certificate")?;
            let caller =
                crate::net::tls::admin_caller_from_cert(leaf).map_err(|e| e.to_string())?;
            Ok(RemoteCaller { caller, remote })
        },
    )
}

#[derive(Clone)]
pub struct AdminService {
    node: NodeHandle,
    /// Status asks every peer for its view over these links.
    transport: Transport,
    /// This node's sets, for status and the quarantine records.
    files: Arc<Shared>,
}

impl AdminService {
    pub fn new(node: NodeHandle, transport: Transport, files: Arc<Shared>) -> Self {
        AdminService {
            node,
            transport,
            files,
        }
    }

    /// Serves the remote admin port on authenticated connections.
    pub async fn serve_remote(
        self,
        incoming: tokio_stream::wrappers::ReceiverStream<
            std::io::Result<crate::net::accept::AuthedConn<RemoteCaller>>,
        >,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .timeout(Duration::from_secs(620))
            .add_service(AdminServer::new(self))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }

    pub async fn serve(
        self,
        listener: UnixListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .add_service(AdminServer::new(self))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
            .await
    }

    /// Every node's view: our own from memory, the peers' over the network.
    pub async fn gather(&self, peer_timeout: Duration) -> ClusterStatus {
        let me = self.node.id();
        let local = NodeEntry {
            id: me,
            addr: self
                .transport
                .member(me)
                .map(|m| m.addr)
                .unwrap_or_default(),
            reachable: true,
            view: Some(self.node.view()),
            error: None,
            rtt_us: None,
            cert_not_after_unix: Some(crate::core::status::unix_seconds(
                self.node.cert_not_after(),
            )),
            files: Some(self.files.files_view()),
        };
        // The members this node applied (removed ones are dropped, added
        // ones listed).
        let view = self.node.view();
        let mut peers: Vec<NodeId> = view.members.all();
        peers.retain(|p| *p != me);
        if view.members.member == crate::core::members::Membership::Joining {
            // The members refuse a node they have not added: asking them
            // would only list them as unreachable.
            peers.clear();
        }
        let asks = peers.into_iter().map(|peer| {
            let transport = self.transport.clone();
            async move {
                let addr = transport.addr(peer).unwrap_or_default();
                let started = Instant::now();
                let result = match transport.client(peer) {
                    Some(mut client) => {
                        let mut req = Request::new(NodeStatusRequest::default());
                        req.set_timeout(peer_timeout);
                        tokio::time::timeout(peer_timeout, client.node_status(req))
                            .await
                            .map_err(|_| {
                                format!("no answer within {} ms", peer_timeout.as_millis())
                            })
                            .and_then(|r| r.map_err(|s| s.message().to_string()))
                    }
                    None => Err("no link".to_string()),
                };
                match result {
                    Ok(view) => NodeEntry {
                        id: peer,
                        addr,
                        reachable: true,
                        view: Some(view.get_ref().into()),
                        error: None,
                        rtt_us: Some(started.elapsed().as_micros() as u64),
                        cert_not_after_unix: (view.get_ref().cert_not_after_unix != 0)
                            .then_some(view.get_ref().cert_not_after_unix),
                        files: view.get_ref().files.as_ref().map(Into::into),
                    },
                    Err(error) => NodeEntry {
                        id: peer,
                        addr,
                        reachable: false,
                        view: None,
                        error: Some(error),
                        rtt_us: None,
                        cert_not_after_unix: None,
                        files: None,
                    },
                }
            }
        });
        let mut nodes = vec![local];
        nodes.extend(join_all(asks).await);
        nodes.sort_by_key(|n| n.id);
        ClusterStatus { node_id: me, nodes }
    }

    /// Waits (up to `deadline`) for some leader to be known.
    async fn known_leader(&self, deadline: Instant) -> Result<NodeId, RequestError> {
        let wait = deadline.saturating_duration_since(Instant::now());
        self.node
            .wait_view(wait, |v| v.leader.is_some())
            .await
            .and_then(|v| v.leader)
            .ok_or(RequestError::NotLeader { leader: None })
    }

    /// Plans a switchover to `target` from a fresh status, pinning
    /// `must_apply` to the leader's commit index on the first look.
    async fn plan(
        &self,
        target: NodeId,
        must_apply: Option<u64>,
        deadline: Instant,
    ) -> Result<PromotePlan, PlanError> {
        let peer_timeout = DEFAULT_PEER_STATUS_TIMEOUT
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(50));
        let status = self.gather(peer_timeout).await;
        promote_plan(&status, target, must_apply)
    }

    /// `clusterctl promote --dry-run`: what a promote would do now.
    async fn promote_dry_run(
        &self,
        target: NodeId,
        wait: Duration,
    ) -> Result<String, RequestError> {
        let deadline = Instant::now() + wait;
        // A leader may be a moment away (an election in progress): wait for one.
        let _ = self.known_leader(deadline).await;
        self.plan(target, None, deadline)
            .await
            .map(|p| p.describe())
            .map_err(|e| match e {
                PlanError::Invalid(why) => RequestError::Invalid(why),
                PlanError::NotNow(why) => RequestError::Unreachable(why),
            })
    }

    /// A planned switchover: waits until `target` has applied everything
    /// committed when it was asked for (and fetched every committed file),
    /// so the switchover loses and quarantines nothing, then has the leader
    /// transfer leadership. Returns the term in which `target` leads.
    async fn promote(&self, target: NodeId, wait: Duration) -> Result<u64, RequestError> {
        let deadline = Instant::now() + wait;
        let mut must_apply = None;
        let mut last_error = None;
        while Instant::now() < deadline {
            let leader = match self.known_leader(deadline).await {
                Ok(l) => l,
                Err(e) => {
                    last_error = Some(e);
                    break;
                }
            };
            if leader == target {
                return Ok(self.node.view().term);
            }
            match self.plan(target, must_apply, deadline).await {
                Err(PlanError::Invalid(why)) => return Err(RequestError::Invalid(why)),
                Err(PlanError::NotNow(why)) => {
                    last_error = Some(RequestError::Unreachable(why));
                    self.pause(deadline).await;
                    continue;
                }
                Ok(plan) if plan.already_leads() => {
                    // Our own view has not caught up with the handover yet.
                    self.pause(deadline).await;
                    continue;
                }
                Ok(plan) => {
                    must_apply = Some(plan.must_apply);
                    if !plan.caught_up() {
                        last_error = Some(RequestError::TimedOut(format!(
                            "node {target} had not caught up within {} ms: {}",
                            wait.as_millis(),
                            plan.waiting_for()
                        )));
                        self.pause(deadline).await;
                        continue;
                    }
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let result = if leader == self.node.id() {
                self.node.transfer_leadership(target, remaining).await
            } else {
                self.forward_transfer(leader, target, remaining).await
            };
            match result {
                Ok(()) => {
                    // The leader saw the target take over; wait until this node agrees.
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    if let Some(v) = self
                        .node
                        .wait_view(remaining, |v| v.leader == Some(target))
                        .await
                    {
                        return Ok(v.term);
                    }
                }
                // Leadership moved while we asked, or a transfer was under way: look again.
                Err(RequestError::NotLeader { .. }) | Err(RequestError::Retry(_)) => {
                    self.pause(deadline).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            RequestError::TimedOut(format!(
                "node {target} did not become leader within {} ms",
                wait.as_millis()
            ))
        }))
    }

    /// A short pause between looks, never past the deadline.
    async fn pause(&self, deadline: Instant) {
        let pause =
            Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now()));
        tokio::time::sleep(pause).await;
    }

    async fn forward_transfer(
        &self,
        leader: NodeId,
        target: NodeId,
        wait: Duration,
    ) -> Result<(), RequestError> {
        let mut client = self.transport.client(leader).ok_or_else(|| {
            RequestError::Unreachable(format!("no link to the leader, node {leader}"))
        })?;
        let mut req = Request::new(TransferRequest {
            target,
            timeout_ms: wait.as_millis() as u64,
        });
        req.set_timeout(wait + Duration::from_millis(500));
        client
            .transfer_leadership(req)
            .await
            .map(|_| ())
            .map_err(|s| status_error(leader, s))
    }

    /// Commits a no-op through the leader; returns its index once it is
    /// applied here too.
    async fn barrier(&self, wait: Duration) -> Result<u64, RequestError> {
        let deadline = Instant::now() + wait;
        let (index, _) = self.through_leader(LeaderCall::Barrier, deadline).await?;
        self.applied_here(index, deadline).await
    }

    /// Pauses or resumes a set through the leader, from any node; returns
    /// the entry's index once it is applied here too.
    async fn pause_change(&self, c: PauseChange, wait: Duration) -> Result<u64, RequestError> {
        let deadline = Instant::now() + wait;
        let (index, _) = self.through_leader(LeaderCall::Pause(c), deadline).await?;
        self.applied_here(index, deadline).await
    }

    /// `clusterctl sync`: a full pass on the leader and a committed
    /// reconcile, then waits until every reachable data node applied it,
    /// holds every committed file of the set(s) and holds none back; the
    /// report names what did not get there.
    async fn sync(
        &self,
        set: String,
        confirm: bool,
        wait: Duration,
    ) -> Result<(u64, String, SyncEnd), RequestError> {
        let deadline = Instant::now() + wait;
        let call = LeaderCall::Sync(SyncRequest {
            set: set.clone(),
            timeout_ms: 0,
            confirm,
        });
        let (index, _) = self.through_leader(call, deadline).await?;
        let (report, end) = self.wait_everywhere(&set, index, deadline).await;
        Ok((index, report, end))
    }

    /// Waits until every reachable data node applied entry `index` and
    /// holds set `set` (every set when empty) whole, or until waiting
    /// cannot help or `deadline` passed; with the report of each node.
    async fn wait_everywhere(&self, set: &str, index: u64, deadline: Instant) -> (String, SyncEnd) {
        loop {
            let status = self.gather(DEFAULT_PEER_STATUS_TIMEOUT).await;
            let (done, report, stuck) = sync_report(&status, set, index);
            if done {
                return (report, SyncEnd::Done);
            }
            if stuck {
                return (report, SyncEnd::Stuck);
            }
            if Instant::now() >= deadline {
                return (report, SyncEnd::TimedOut);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `clusterctl rollback`: planned, checked and proposed by the leader;
    /// then waits as `sync` does. Returns the new revision (0 when nothing
    /// was proposed), the plan, and how the wait ended.
    async fn rollback(
        &self,
        r: RollbackRequest,
        wait: Duration,
    ) -> Result<(u64, String, String, SyncEnd), RequestError> {
        let deadline = Instant::now() + wait;
        let set = r.set.clone();
        let (index, plan) = self
            .through_leader(LeaderCall::Rollback(r), deadline)
            .await?;
        if index == 0 {
            return Ok((0, plan, String::new(), SyncEnd::Done));
        }
        let (report, end) = self.wait_everywhere(&set, index, deadline).await;
        Ok((index, plan, report, end))
    }

    /// Carries out `call` on the leader: here when this node leads, else
    /// over the leader's peer link; while there is no leader or it moved,
    /// asks again until `deadline`. Returns the entry's index and the
    /// leader's text (a rollback's plan).
    async fn through_leader(
        &self,
        call: LeaderCall,
        deadline: Instant,
    ) -> Result<(u64, String), RequestError> {
        loop {
            let leader = self.known_leader(deadline).await?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let timeout_ms = remaining.as_millis() as u64;
            let result = if leader == self.node.id() {
                match &call {
                    LeaderCall::Barrier => self.node.local_barrier(remaining).await.map(untold),
                    LeaderCall::Pause(c) => {
                        let c = PauseChange {
                            timeout_ms,
                            ..c.clone()
                        };
                        crate::net::peer::lead_pause_change(&self.node, self.files.as_ref(), &c)
                            .await
                            .map(untold)
                    }
                    LeaderCall::Sync(r) => {
                        let r = SyncRequest {
                            timeout_ms,
                            ..r.clone()
                        };
                        crate::net::peer::lead_sync(&self.node, self.files.as_ref(), &r)
                            .await
                            .map(untold)
                    }
                    LeaderCall::Rollback(r) => {
                        let r = RollbackRequest {
                            timeout_ms,
                            ..r.clone()
                        };
                        let files: Arc<dyn crate::net::peer::FileService> = self.files.clone();
                        crate::net::peer::lead_rollback(&self.node, files, r).await
                    }
                    LeaderCall::Member(r) => {
                        let r = MemberChangeRequest {
                            timeout_ms,
                            ..r.clone()
                        };
                        crate::net::peer::lead_member_change(&self.node, &self.transport, &r)
                            .await
                            .map(untold)
                    }
                }
            } else {
                self.ask_leader(leader, &call, remaining).await
            };
            match result {
                Ok(done) => return Ok(done),
                Err(RequestError::NotLeader { .. }) | Err(RequestError::Retry(_))
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `call` over the peer link to `leader`, waiting at most `wait`.
    async fn ask_leader(
        &self,
        leader: NodeId,
        call: &LeaderCall,
        wait: Duration,
    ) -> Result<(u64, String), RequestError> {
        let mut client = self.transport.client(leader).ok_or_else(|| {
            RequestError::Unreachable(format!("no link to the leader, node {leader}"))
        })?;
        let timeout_ms = wait.as_millis() as u64;
        let limit = wait + Duration::from_millis(200);
        let reply = match call {
            LeaderCall::Barrier => {
                let mut req = Request::new(BarrierRequest { timeout_ms });
                req.set_timeout(limit);
                client.barrier(req).await.map(|r| untold(r.get_ref().index))
            }
            LeaderCall::Pause(c) => {
                let mut req = Request::new(PauseChange {
                    timeout_ms,
                    ..c.clone()
                });
                req.set_timeout(limit);
                client
                    .set_pause(req)
                    .await
                    .map(|r| untold(r.get_ref().index))
            }
            LeaderCall::Sync(r) => {
                let mut req = Request::new(SyncRequest {
                    timeout_ms,
                    ..r.clone()
                });
                req.set_timeout(limit);
                client.sync(req).await.map(|r| untold(r.get_ref().index))
            }
            LeaderCall::Rollback(r) => {
                let mut req = Request::new(RollbackRequest {
                    timeout_ms,
                    ..r.clone()
                });
                req.set_timeout(limit);
                client.rollback(req).await.map(|r| {
                    let r = r.into_inner();
                    (r.index, r.plan)
                })
            }
            LeaderCall::Member(r) => {
                let mut req = Request::new(MemberChangeRequest {
                    timeout_ms,
                    ..r.clone()
                });
                req.set_timeout(limit);
                client
                    .change_membership(req)
                    .await
                    .map(|r| untold(r.get_ref().index))
            }
        };
        reply.map_err(|s| status_error(leader, s))
    }

    /// `clusterctl member add/remove/replace`: the change through the
    /// leader, then its end result as this node applies it (an added node
    /// promoted unless it stays a learner, a replaced or removed one gone);
    /// at the deadline, what is still missing.
    async fn member(
        &self,
        req: MemberChangeRequest,
        wait: Duration,
    ) -> Result<(u64, String), RequestError> {
        let deadline = Instant::now() + wait;
        let id = req.id;
        let (index, _) = self
            .through_leader(LeaderCall::Member(req.clone()), deadline)
            .await?;
        if req.kind == "remove" && id == self.node.id() {
            // This node may never hear that its removal committed (the
            // leader stops sending to it): the leader's word is enough.
            return Ok((index, format!("node {id} (this node) was removed at entry {index}: it no longer replicates or campaigns, and its files stay on its disk")));
        }
        self.applied_here(index, deadline).await?;
        if req.kind == "remove" {
            return Ok((index, format!("node {id} was removed at entry {index}: it no longer replicates or campaigns, and its files stay on its disk")));
        }
        if req.keep_learner {
            return Ok((index, format!("node {id} joined as a learner at entry {index}: a replica that neither votes nor leads; it catches up by itself (`clusterctl member list` shows how far)")));
        }
        let replaces = (req.replaces != 0).then_some(req.replaces);
        let done = |v: &crate::raft::core::NodeView| {
            v.members.voters.contains(&id)
                && replaces.is_none_or(|old| !v.members.voters.contains(&old))
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Some(v) = self.node.wait_view(remaining, done).await {
            let what = match replaces {
                Some(old) => format!("node {id} replaced node {old}"),
                None => format!("node {id} joined"),
            };
            return Ok((
                index,
                format!(
                    "{what}: it caught up (holding every committed file) and is a voter; voters now {}",
                    v.members
                        .voters
                        .iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        Err(RequestError::TimedOut(format!(
            "node {id} joined as a learner at entry {index} but is not a voter yet: {}; the leader promotes it by itself once it has caught up",
            self.learner_waiting_for(id, index).await
        )))
    }

    /// What a learner still lacks before its promotion, from its status.
    async fn learner_waiting_for(&self, id: NodeId, added_at: u64) -> String {
        let status = self.gather(DEFAULT_PEER_STATUS_TIMEOUT).await;
        let Some(entry) = status.nodes.iter().find(|n| n.id == id) else {
            return format!("node {id} is not listed by node {}", status.node_id);
        };
        let Some(view) = entry.view.as_ref() else {
            return format!(
                "it is unreachable from node {}: {}",
                status.node_id,
                entry.error.as_deref().unwrap_or("no answer")
            );
        };
        let sets = entry.files.as_ref().map_or(&[][..], |f| &f.sets[..]);
        let plan = PromotePlan {
            leader: status.leader().unwrap_or(0),
            term: view.term,
            target: id,
            must_apply: added_at,
            target_applied: view.applied_index,
            missing: sets
                .iter()
                .filter(|s| s.missing > 0)
                .map(|s| (s.name.clone(), s.missing))
                .collect(),
            skipping: sets
                .iter()
                .filter(|s| s.skipping)
                .map(|s| s.name.clone())
                .collect(),
        };
        if plan.caught_up() {
            "it has caught up; its promotion is under way".to_string()
        } else {
            plan.waiting_for()
        }
    }

    /// Waits until entry `index` is applied on this node.
    async fn applied_here(&self, index: u64, deadline: Instant) -> Result<u64, RequestError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.node
            .wait_view(remaining, |v| v.applied_index >= index)
            .await
            .map(|_| index)
            .ok_or_else(|| {
                RequestError::TimedOut(format!(
                    "entry {index} committed but not applied on this node in time"
                ))
            })
    }
}

/// How a `clusterctl sync` ended.
enum SyncEnd {
    Done,
    /// A node that applied the reconcile holds, pauses or skips the set.
    Stuck,
    TimedOut,
}

/// What a node asks the leader to do for an administrator.
enum LeaderCall {
    Barrier,
    Pause(PauseChange),
    Sync(SyncRequest),
    Rollback(RollbackRequest),
    Member(MemberChangeRequest),
}

/// A rollback's plan followed by the report of each node, if any.
fn with_report(plan: String, report: &str) -> String {
    if report.is_empty() {
        plan
    } else {
        format!("{plan}{report}\n")
    }
}

/// An index the leader answered without text.
fn untold(index: u64) -> (u64, String) {
    (index, String::new())
}

/// Whether every reachable data node has applied entry `index` and holds
/// set `set` (every set when empty) whole, and one line per node saying so
/// or naming what is missing. Unreachable nodes are named, not waited for.
/// The third value is whether waiting cannot help: a node that has
/// applied the reconcile holds, pauses or skips the set.
fn sync_report(status: &ClusterStatus, set: &str, index: u64) -> (bool, String, bool) {
    let mut done = true;
    let mut stuck = false;
    let mut lines = Vec::new();
    for n in &status.nodes {
        let Some(view) = &n.view else {
            lines.push(format!(
                "node {}: unreachable ({}); it catches up when it is back",
                n.id,
                n.error.as_deref().unwrap_or("no answer")
            ));
            continue;
        };
        let Some(files) = &n.files else {
            continue; // a witness holds no sets
        };
        let mut problems = Vec::new();
        let caught_up = view.applied_index >= index;
        if !caught_up {
            problems.push(format!("applied {} of {index}", view.applied_index));
        }
        for s in files
            .sets
            .iter()
            .filter(|s| set.is_empty() || s.name == set)
        {
            if s.missing > 0 {
                problems.push(format!(
                    "set {:?} still fetches {} file(s)",
                    s.name, s.missing
                ));
            }
            if s.accounts.as_ref().is_some_and(|a| a.pending) {
                problems.push(format!(
                    "set {:?}: the committed accounts are not merged into this node's files yet",
                    s.name
                ));
            }
            if let Some(why) = &s.held {
                problems.push(format!("set {:?} is held: {why}", s.name));
                stuck |= caught_up;
            }
            if s.paused.is_some() {
                problems.push(format!(
                    "set {:?} is paused (clusterctl resume {} to let it go on)",
                    s.name, s.name
                ));
                stuck |= caught_up;
            }
            if s.skipping {
                problems.push(format!("set {:?} waits for a skip_while marker", s.name));
                stuck |= caught_up;
            }
        }
        if problems.is_empty() {
            lines.push(format!("node {}: in sync at index {index}", n.id));
        } else {
            done = false;
            lines.push(format!("node {}: {}", n.id, problems.join("; ")));
        }
    }
    (done, lines.join("\n"), stuck)
}

/// Reads a peer's gRPC status back into a request error.
fn status_error(peer: NodeId, s: Status) -> RequestError {
    match s.code() {
        tonic::Code::FailedPrecondition => RequestError::NotLeader { leader: None },
        tonic::Code::Aborted => RequestError::Retry(s.message().to_string()),
        tonic::Code::DeadlineExceeded => {
            RequestError::TimedOut(format!("node {peer}: {}", s.message()))
        }
        tonic::Code::InvalidArgument => RequestError::Invalid(s.message().to_string()),
        _ => RequestError::Unreachable(format!("node {peer}: {}", s.message())),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<PbClusterStatus>, Status> {
        let ms = req.get_ref().peer_timeout_ms;
        let timeout = if ms == 0 {
            DEFAULT_PEER_STATUS_TIMEOUT
        } else {
            Duration::from_millis(ms.min(10_000))
        };
        let status = self.gather(timeout).await;
        Ok(Response::new((&status).into()))
    }

    async fn promote(
        &self,
        req: Request<PromoteRequest>,
    ) -> Result<Response<PromoteReply>, Status> {
        if !req.get_ref().dry_run {
            require_admin(&req, "promote")?;
        }
        let r = req.into_inner();
        let wait = Duration::from_millis(if r.timeout_ms == 0 {
            10_000
        } else {
            r.timeout_ms.min(600_000)
        });
        if r.dry_run {
            let plan = self
                .promote_dry_run(r.target, wait)
                .await
                .map_err(request_status)?;
            return Ok(Response::new(PromoteReply { term: 0, plan }));
        }
        info!(target = r.target, "promote requested by an administrator");
        let term = AdminService::promote(self, r.target, wait)
            .await
            .map_err(request_status)?;
        Ok(Response::new(PromoteReply {
            term,
            plan: String::new(),
        }))
    }

    async fn member(
        &self,
        req: Request<MemberChangeRequest>,
    ) -> Result<Response<MemberReply>, Status> {
        require_admin(&req, "member")?;
        let r = req.into_inner();
        let wait = Duration::from_millis(if r.timeout_ms == 0 {
            60_000
        } else {
            r.timeout_ms.min(3_600_000)
        });
        info!(
            kind = %r.kind,
            node = r.id,
            "membership change requested by an administrator: {} node {}",
            r.kind,
            r.id
        );
        let (index, report) = AdminService::member(self, r, wait)
            .await
            .map_err(request_status)?;
        Ok(Response::new(MemberReply { index, report }))
    }

    async fn conflicts(
        &self,
        _req: Request<crate::net::proto::admin::ConflictsRequest>,
    ) -> Result<Response<crate::net::proto::admin::ConflictsReply>, Status> {
        let files = self.files.clone();
        let records = tokio::task::spawn_blocking(move || files.conflicts(10_000))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(format!("cannot read the quarantine records: {e}")))?;
        Ok(Response::new(crate::net::proto::admin::ConflictsReply {
            records,
        }))
    }

    async fn set_pause(
        &self,
        req: Request<PauseChange>,
    ) -> Result<Response<PauseChangeReply>, Status> {
        let what = if req.get_ref().resume {
            "resume"
        } else {
            "pause"
        };
        require_admin(&req, what)?;
        let by = match req.extensions().get::<RemoteCaller>() {
            Some(RemoteCaller { caller, .. }) => caller.to_string(),
            None => format!("node {} (admin socket)", self.node.id()),
        };
        let mut c = req.into_inner();
        c.by = by;
        let wait = Duration::from_millis(match c.timeout_ms {
            0 => 10_000,
            ms => ms.min(600_000),
        });
        let index = self.pause_change(c, wait).await.map_err(request_status)?;
        Ok(Response::new(PauseChangeReply { index }))
    }

    async fn rollback(
        &self,
        req: Request<RollbackRequest>,
    ) -> Result<Response<RollbackReply>, Status> {
        if !req.get_ref().dry_run {
            require_admin(&req, "rollback")?;
        }
        let r = req.into_inner();
        let wait = Duration::from_millis(match r.timeout_ms {
            0 => 60_000,
            ms => ms.min(600_000),
        });
        let (set, to) = (r.set.clone(), r.to);
        let (index, plan, report, end) = AdminService::rollback(self, r, wait)
            .await
            .map_err(request_status)?;
        if index != 0 {
            info!(set = %set, to, index, "sync set {set:?} rolled back to revision {to} as revision {index}");
        }
        match end {
            SyncEnd::Done => Ok(Response::new(RollbackReply {
                index,
                plan: with_report(plan, &report),
            })),
            SyncEnd::Stuck => Err(Status::failed_precondition(format!(
                "{plan}committed as revision {index}, but not every node can apply it until a set is released:\n{report}"
            ))),
            SyncEnd::TimedOut => Err(Status::deadline_exceeded(format!(
                "{plan}committed as revision {index}, but not every node applied it within {} ms:\n{report}",
                wait.as_millis()
            ))),
        }
    }

    async fn conflict_action(
        &self,
        req: Request<ConflictActionRequest>,
    ) -> Result<Response<RollbackReply>, Status> {
        let what = if req.get_ref().drop {
            "conflicts drop"
        } else {
            "conflicts restore"
        };
        require_admin(&req, what)?;
        let r = req.into_inner();
        let holder = crate::core::status::conflict_node(&r.id).ok_or_else(|| {
            Status::invalid_argument(format!(
                "{:?} is not a conflict id (they look like 2-3fa9c01b: the node that holds the copy, then 8 hex digits); `clusterctl conflicts` lists them",
                r.id
            ))
        })?;
        let wait = Duration::from_millis(match r.timeout_ms {
            0 => 60_000,
            ms => ms.min(600_000),
        });
        // The copy, from the node that holds it.
        let copy = if holder == self.node.id() {
            let files = self.files.clone();
            let (id, drop) = (r.id.clone(), r.drop);
            tokio::task::spawn_blocking(move || {
                crate::net::peer::FileService::quarantined(files.as_ref(), &id, drop)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::failed_precondition)?
        } else {
            let mut client = self.transport.client(holder).ok_or_else(|| {
                Status::unavailable(format!(
                    "conflict {} is held by node {holder}, which this node has no link to",
                    r.id
                ))
            })?;
            let mut req = Request::new(QuarantinedRequest {
                id: r.id.clone(),
                drop: r.drop,
            });
            req.set_timeout(wait);
            client
                .quarantined(req)
                .await
                .map_err(|s| Status::new(s.code(), format!("node {holder}: {}", s.message())))?
                .into_inner()
        };
        if r.drop {
            info!(id = %r.id, "{}", copy.dropped);
            return Ok(Response::new(RollbackReply {
                index: 0,
                plan: format!("{}\n", copy.dropped),
            }));
        }
        let set = copy.set.clone();
        let restore = RollbackRequest {
            set: copy.set,
            paths: vec![copy.path],
            to: 0,
            dry_run: false,
            timeout_ms: 0,
            restore_id: r.id.clone(),
            restore_content: copy.content,
            restore_mode: copy.mode,
            restore_uid: copy.uid,
            restore_gid: copy.gid,
            restore_mtime_ns: copy.mtime_ns,
        };
        let (index, plan, report, end) = AdminService::rollback(self, restore, wait)
            .await
            .map_err(request_status)?;
        if index != 0 {
            info!(id = %r.id, set = %set, index, "quarantined copy {} restored as revision {index}", r.id);
        }
        match end {
            SyncEnd::Done => Ok(Response::new(RollbackReply {
                index,
                plan: with_report(plan, &report),
            })),
            SyncEnd::Stuck | SyncEnd::TimedOut => Err(Status::deadline_exceeded(format!(
                "{plan}committed as revision {index}, but not every node applied it:\n{report}"
            ))),
        }
    }

    async fn history(
        &self,
        req: Request<HistoryRequest>,
    ) -> Result<Response<HistoryReply>, Status> {
        let r = req.into_inner();
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || {
            use crate::replication::history;
            let path = match r.path.as_str() {
                "" => None,
                p => {
                    let set = files
                        .set(&r.set)
                        .ok_or_else(|| history::HistoryError::UnknownSet(r.set.clone()))?;
                    Some(history::resolve_path(set, p)?)
                }
            };
            let limit = if r.limit == 0 {
                usize::MAX
            } else {
                r.limit as usize
            };
            let nonzero = |v: u64| (v != 0).then_some(v);
            let (revisions, oldest) = history::list(
                &files,
                &r.set,
                path.as_ref(),
                limit,
                nonzero(r.after),
                nonzero(r.up_to),
            )?;
            Ok(HistoryReply {
                revisions_json: crate::core::history::revisions_json(&revisions).to_string(),
                oldest: oldest.unwrap_or(0),
                applied: files.applied.load(std::sync::atomic::Ordering::SeqCst),
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map(Response::new)
        .map_err(history_status)
    }

    async fn version(
        &self,
        req: Request<VersionRequest>,
    ) -> Result<Response<VersionReply>, Status> {
        if req.get_ref().with_content {
            // Content may be /etc/shadow: not for a witness's certificate.
            require_admin(&req, "reading a file's content from the history")?;
        }
        let r = req.into_inner();
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || {
            use crate::replication::history;
            let set = files
                .set(&r.set)
                .ok_or_else(|| history::HistoryError::UnknownSet(r.set.clone()))?;
            let path = history::resolve_path(set, &r.path)?;
            let revision = match r.revision {
                0 => files.applied.load(std::sync::atomic::Ordering::SeqCst),
                rev => rev,
            };
            let at = history::version(&files, &r.set, &path, revision, r.with_content)?;
            Ok(crate::net::proto::version_reply(revision, at))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map(Response::new)
        .map_err(history_status)
    }

    async fn sync(&self, req: Request<SyncRequest>) -> Result<Response<SyncReply>, Status> {
        require_admin(&req, "sync")?;
        let r = req.into_inner();
        let wait = Duration::from_millis(match r.timeout_ms {
            0 => 60_000,
            ms => ms.min(600_000),
        });
        let (index, report, done) = AdminService::sync(self, r.set, r.confirm, wait)
            .await
            .map_err(request_status)?;
        match done {
            SyncEnd::Done => Ok(Response::new(SyncReply { index, report })),
            SyncEnd::Stuck => Err(Status::failed_precondition(format!(
                "not every node can get there until a set is released:\n{report}"
            ))),
            SyncEnd::TimedOut => Err(Status::deadline_exceeded(format!(
                "not every node got there within {} ms:\n{report}",
                wait.as_millis()
            ))),
        }
    }

    async fn barrier(
        &self,
        req: Request<BarrierRequest>,
    ) -> Result<Response<BarrierReply>, Status> {
        require_admin(&req, "barrier")?;
        let ms = req.get_ref().timeout_ms;
        let wait = Duration::from_millis(if ms == 0 { 5_000 } else { ms.min(600_000) });
        let index = AdminService::barrier(self, wait)
            .await
            .map_err(request_status)?;
        Ok(Response::new(BarrierReply { index }))
    }
}

/// Connects `clusterctl` to a node's admin socket.
pub async fn connect(socket: &Path) -> Result<AdminClient<Channel>, ClientError> {
    let path: PathBuf = socket.to_path_buf();
    let display = path.display().to_string();
    // The URI is a placeholder: the connector always dials the socket.
    let channel = Endpoint::from_static("http://clusterd.admin")
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| ClientError::Connect {
            socket: display,
            reason: crate::core::error_text::error_chain(&e),
        })?;
    Ok(AdminClient::new(channel))
}

/// Connects `clusterctl --remote` to node `node_id`'s remote admin port at
/// `addr` over mutual TLS; the server must prove it is that node.
pub async fn connect_remote(
    addr: &str,
    node_id: NodeId,
    tls: &crate::core::config::TlsPaths,
) -> Result<AdminClient<Channel>, ClientError> {
    let config = crate::net::tls::admin_client_config(tls).map_err(|e| ClientError::Tls {
        reason: e.to_string(),
    })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let target = addr.to_string();
    let channel = Endpoint::from_static("http://clusterd.admin")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (target, connector) = (target.clone(), connector.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&target).await?;
                let tls = connector
                    .connect(crate::net::tls::PeerTls::server_name(node_id), tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| ClientError::Remote {
            addr: addr.to_string(),
            node_id,
            reason: crate::core::error_text::error_chain(&e),
        })?;
    Ok(AdminClient::new(channel))
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach clusterd at {socket}: {reason}; is clusterd running, and is this the right socket (--socket, or node.admin_socket in --config)?")]
    Connect { socket: String, reason: String },
    #[error("cannot reach node {node_id}'s remote admin port at {addr}: {reason}; check [admin] listen on that node, --node-id, and that --tls-cert is an admin certificate of this cluster's CA")]
    Remote {
        addr: String,
        node_id: NodeId,
        reason: String,
    },
    #[error("cannot load the TLS files for --remote: {reason}")]
    Tls { reason: String },
}

/// How a history error reaches `clusterctl`.
fn history_status(e: crate::replication::history::HistoryError) -> tonic::Status {
    use crate::replication::history::HistoryError as E;
    let text = e.to_string();
    match e {
        E::UnknownSet(_) | E::BadPath { .. } => tonic::Status::invalid_argument(text),
        E::Off(_)
        | E::Empty(_)
        | E::TooOld { .. }
        | E::Predates { .. }
        | E::NotCommitted { .. } => tonic::Status::failed_precondition(text),
        E::NotKept { .. } => tonic::Status::not_found(text),
        E::Damaged { .. } => tonic::Status::data_loss(text),
        E::Store(_) => tonic::Status::unavailable(text),
    }
}
