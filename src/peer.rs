//! The peer side of the network: the TLS accept loop that binds every
//! incoming connection to the node id in its certificate, and the `Peer`
//! gRPC service that serves Raft messages, status, leadership transfers and
//! barriers to the other nodes.
//!
//! Invariant owned here (invariant 5): no byte from a peer reaches the node
//! unless the peer completed mutual TLS against the cluster CA, its certificate
//! names a configured member, and every Raft message it sends claims to come
//! from that same member.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn, Instrument};

use crate::config::NodeId;
use crate::node::{NodeHandle, RequestError};
use crate::proto::decode_raft_message;
use crate::proto::peer::peer_server::{Peer, PeerServer};
use crate::proto::peer::{
    BarrierReply, BarrierRequest, NodeStatusRequest, NodeView, RaftAck, RaftBatch, TransferReply,
    TransferRequest,
};
use crate::tls::{peer_node_id, LiveTls, PeerTls};

/// Largest gRPC message accepted from a peer.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// A peer that does not finish the TLS handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a peer may ask us to wait in a transfer or barrier.
const MAX_REQUEST_WAIT: Duration = Duration::from_secs(600);

/// Who is on the other end of an accepted connection, as proven by its certificate.
#[derive(Debug, Clone, Copy)]
pub struct PeerIdentity {
    pub node_id: NodeId,
    pub remote: SocketAddr,
}

/// An accepted, authenticated connection, carrying who it is (`I`, proven by
/// its certificate) into tonic's request extensions.
pub struct AuthedConn<I> {
    stream: crate::tls::RevocableStream<TlsStream<TcpStream>>,
    identity: I,
}

/// A peer node's connection to the peer service.
pub type PeerConn = AuthedConn<PeerIdentity>;

impl<I> AuthedConn<I> {
    pub fn new(stream: crate::tls::RevocableStream<TlsStream<TcpStream>>, identity: I) -> Self {
        AuthedConn { stream, identity }
    }
}

impl<I: Clone + Send + Sync + 'static> Connected for AuthedConn<I> {
    type ConnectInfo = I;
    fn connect_info(&self) -> I {
        self.identity.clone()
    }
}

impl<I: Unpin> AsyncRead for AuthedConn<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<I: Unpin> AsyncWrite for AuthedConn<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections on the peer port, completes mutual TLS and
/// admits only members.
pub fn accept_loop(
    listener: TcpListener,
    tls: LiveTls,
    members: Arc<BTreeSet<NodeId>>,
) -> ReceiverStream<io::Result<PeerConn>> {
    accept_authenticated(
        listener,
        tls,
        "peer",
        PeerTls::acceptor,
        move |stream, remote| {
            let node_id = peer_node_id(stream).map_err(|e| e.to_string())?;
            if !members.contains(&node_id) {
                return Err(format!(
                "its certificate is for node {node_id}, which is not a member of this cluster; add it to [[peer]] on every node or revoke it"
            ));
            }
            Ok(PeerIdentity { node_id, remote })
        },
    )
}

/// Accepts TCP connections, completes mutual TLS with the acceptor
/// `acceptor_of` picks from the current TLS material (re-read per
/// connection, so a SIGHUP reload applies to the next one), refuses revoked
/// certificates, and admits what `identify` accepts. Refusals are logged
/// with the remote address and the reason: at warning level the first time
/// per address and reason each minute (a misconfigured client retries every
/// few hundred milliseconds), at debug level otherwise.
pub fn accept_authenticated<I: Send + 'static>(
    listener: TcpListener,
    tls: LiveTls,
    what: &'static str,
    acceptor_of: fn(&PeerTls) -> tokio_rustls::TlsAcceptor,
    identify: impl Fn(&TlsStream<TcpStream>, SocketAddr) -> Result<I, String> + Send + Sync + 'static,
) -> ReceiverStream<io::Result<AuthedConn<I>>> {
    let (tx, rx) = mpsc::channel(64);
    let refusals = Arc::new(RefusalLog::default());
    let identify = Arc::new(identify);
    tokio::spawn(
        async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    // The server stopped taking connections: release the port.
                    _ = tx.closed() => break,
                };
                let (tcp, remote) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off rather than spin.
                        warn!(error = %e, "accepting a {what} connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (current, revoked) = tls.get();
                let acceptor = acceptor_of(&current);
                let tx = tx.clone();
                let refusals = refusals.clone();
                let identify = identify.clone();
                let live = tls.clone();
                tokio::spawn(
                    async move {
                        let admitted = handshake(acceptor, tcp).await.and_then(|stream| {
                            crate::tls::refuse_revoked(stream.get_ref().1, &revoked)?;
                            let identity = identify(&stream, remote)?;
                            let serial = crate::tls::peer_leaf(stream.get_ref().1)
                                .map(crate::tls::cert_serial_hex)
                                .transpose()
                                .map_err(|e| e.to_string())?
                                .unwrap_or_default();
                            let stream = crate::tls::RevocableStream::new(
                                stream,
                                live,
                                serial,
                                format!("{what} {remote}"),
                            );
                            Ok(AuthedConn::new(stream, identity))
                        });
                        match admitted {
                            Ok(conn) => {
                                debug!(%remote, "{what} connection authenticated");
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Err(reason) => refusals.log(what, remote, &reason),
                        }
                    }
                    .in_current_span(),
                );
            }
        }
        .in_current_span(),
    );
    ReceiverStream::new(rx)
}

/// The server side of mutual TLS, bounded by [`HANDSHAKE_TIMEOUT`].
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>, String> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(handshake_reason(&e)),
        Err(_) => Err(format!(
            "TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}"
        )),
    }
}

/// Says what a failed handshake most likely means, for the operator.
fn handshake_reason(e: &io::Error) -> String {
    // Our own identity checks (no node name, several) carry their sentence.
    if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        if let Some(ours) = other.0.downcast_ref::<crate::tls::TlsError>() {
            return format!("TLS handshake failed: its {ours}");
        }
    }
    let text = e.to_string();
    if text.contains("received fatal alert") {
        format!("TLS handshake failed: the peer rejected our certificate ({text}); it probably trusts another cluster CA")
    } else if text.contains("invalid peer certificate") {
        format!("TLS handshake failed: {text}; its certificate is not signed by this cluster's CA, or has expired")
    } else if text.contains("peer sent no certificates") {
        format!("TLS handshake failed: {text}; every peer must present a node certificate")
    } else {
        format!("TLS handshake failed: {text} (is it speaking plaintext or another protocol?)")
    }
}

/// Rate limit for refusal warnings, per remote IP and reason.
#[derive(Default)]
struct RefusalLog {
    last:
        std::sync::Mutex<std::collections::HashMap<(std::net::IpAddr, String), std::time::Instant>>,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(60);

    fn log(&self, what: &str, remote: SocketAddr, reason: &str) {
        let now = std::time::Instant::now();
        let loud = match self.last.lock() {
            Ok(mut last) => {
                // Bounded: forget old entries rather than grow with every scanner.
                if last.len() > 1024 {
                    last.retain(|_, t| now.duration_since(*t) < Self::EVERY);
                }
                let key = (remote.ip(), reason.to_string());
                match last.get(&key) {
                    Some(t) if now.duration_since(*t) < Self::EVERY => false,
                    _ => {
                        last.insert(key, now);
                        true
                    }
                }
            }
            Err(_) => true,
        };
        if loud {
            warn!(%remote, "refused {what} {remote}: {reason}");
        } else {
            debug!(%remote, "refused {what} {remote}: {reason}");
        }
    }
}

pub struct PeerService {
    node: NodeHandle,
}

impl PeerService {
    pub fn server(node: NodeHandle) -> PeerServer<PeerService> {
        PeerServer::new(PeerService { node })
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
        node.note_peer_applied(who.node_id, batch.sender_applied);
    }
    Ok(RaftAck {
        applied: node.applied_index(),
        acks_on_request: false,
    })
}

#[tonic::async_trait]
impl Peer for PeerService {
    type FetchStream =
        futures::stream::Iter<std::vec::IntoIter<Result<crate::proto::peer::FetchChunk, Status>>>;

    async fn fetch(
        &self,
        req: Request<crate::proto::peer::FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let who = identity(&req)?;
        let Some(files) = self.node.files() else {
            return Err(Status::not_found("this node holds no sync sets"));
        };
        if files.witness_peers.contains(&who.node_id) {
            warn!(peer = who.node_id, remote = %who.remote, "refused a file fetch from peer {}: it is a witness, which holds no files", who.node_id);
            return Err(Status::permission_denied(
                "witnesses hold no files and are served none",
            ));
        }
        let r = req.into_inner();
        let chunks = tokio::task::spawn_blocking(move || crate::fetch::serve(&files, &r))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .inspect_err(|e| {
                tracing::debug!(peer = who.node_id, "fetch refused: {}", e.message())
            })?;
        Ok(Response::new(futures::stream::iter(
            chunks.into_iter().map(Ok).collect::<Vec<_>>(),
        )))
    }

    async fn stage(
        &self,
        req: Request<crate::proto::peer::StageRequest>,
    ) -> Result<Response<crate::proto::peer::StageReply>, Status> {
        let who = identity(&req)?;
        let Some(files) = self.node.files() else {
            return Err(Status::not_found("this node holds no sync sets"));
        };
        if files.sets.is_empty() {
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
        tokio::task::spawn_blocking(move || {
            use crate::replica::StageFlush;
            if r.versions_follow {
                files.stage_before_finish(r.upload, r.offset, r.data)?;
                if !r.durable {
                    return Ok(());
                }
                let versions = r
                    .versions
                    .iter()
                    .map(crate::replica::StagedVersion::try_from)
                    .collect::<Result<Vec<_>, _>>()?;
                return files.finish_upload(r.upload, &versions);
            }
            let flush = match r.durable {
                true => StageFlush::Upload,
                false => StageFlush::Piece,
            };
            files.stage_piece(r.upload, r.offset, &r.data, flush)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| {
            warn!(peer = who.node_id, remote = %who.remote, "did not stage content from peer {}: {e}", who.node_id);
            Status::unavailable(e)
        })?;
        Ok(Response::new(crate::proto::peer::StageReply {}))
    }

    async fn raft(&self, req: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let who = identity(&req)?;
        deliver_batch(&self.node, who, req.into_inner()).map(Response::new)
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
        // A refused batch ends the call with its status, as `raft` would
        // answer it; the caller opens a new one. A batch marked `no_ack`
        // that was delivered gets no answer (the caller does not wait).
        let acks = req.into_inner().filter_map(move |batch| {
            let answer = match batch {
                Ok(b) if b.no_ack => deliver_batch(&node, who, b).err().map(Err),
                Ok(b) => Some(deliver_batch(&node, who, b).map(|ack| RaftAck {
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
        _req: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeView>, Status> {
        let mut view: NodeView = (&self.node.view()).into();
        view.uptime_ms = self.node.uptime().as_millis() as u64;
        view.cert_not_after_unix = crate::status::unix_seconds(self.node.cert_not_after());
        view.files = self.node.files().map(|f| (&f.files_view()).into());
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
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(2)))
        .http2_keepalive_timeout(Some(Duration::from_secs(3)))
        .tcp_nodelay(true)
        .layer(tower::layer::layer_fn(|inner| LogRefused { inner }))
        .add_service(PeerService::server(node))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
