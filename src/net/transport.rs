//! Outgoing peer links: one lazily connected, mutually authenticated gRPC
//! channel per peer, and one sender task per peer that ships Raft messages in
//! batches from a bounded queue.
//!
//! Invariant owned here: the node task never waits on the network. Sending is
//! a non-blocking enqueue; a full queue or a dead peer drops messages (Raft
//! retransmits) and reports the peer unreachable, so one dead or slow peer
//! never stalls the others or the node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use raft::prelude::{Message, MessageType};
use raft::SnapshotStatus;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{debug, warn, Instrument};

use crate::core::config::{NodeId, PeerConfig};
use crate::core::members::MemberInfo;
use crate::net::proto::encode_raft_message;
use crate::net::proto::peer::peer_client::PeerClient;
use crate::net::proto::peer::RaftBatch;
use crate::net::tls::{LiveTls, PeerTls};
use crate::raft::core::NodeView;
use crate::raft::handle::LinkEvent;

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Raft messages sent in one RPC at most.
const MAX_BATCH: usize = 256;
/// Encoded bytes per RPC beyond which a batch is closed, well under the
/// receiver's limit ([`crate::net::proto::MAX_MESSAGE_BYTES`]). A single larger
/// message still goes alone.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Deadline of one Raft RPC; a peer slower than this is treated as unreachable.
const RAFT_RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Batches up to this size (votes, heartbeats, small appends) are sent
/// again once on a new stream when a reused one turns out dead.
const RETRY_BYTES: usize = 64 * 1024;
/// Heartbeats and their answers go unacked on a stream whose receiver
/// allows it, but one batch at least this often asks for an ack: acks carry
/// the peer's applied index and show that the stream still delivers. With a
/// heartbeat interval on top, a report stays younger than the second after
/// which the leader no longer counts on the peer for staging
/// (`replication::source::ANSWERED_WITHIN`).
pub(crate) const ACK_AT_LEAST_EVERY: Duration = Duration::from_millis(500);
/// TCP connect plus TLS handshake deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Backoff after a failed send, doubling up to the maximum. Kept short so a
/// restarted peer is reached again within a few heartbeats.
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// The "bytes on the wire" counter of status and metrics, shared by
/// whoever sends: the sender tasks count the Raft message bytes they
/// delivered (protobuf payload, before gRPC framing and TLS); staging and
/// fetch count their content beside them (`Counters::wire_bytes_sent`).
pub type WireBytes = Arc<std::sync::atomic::AtomicU64>;

#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

/// The links and what adding one at runtime needs.
struct Inner {
    /// One link per known member but this node: the founders from
    /// `[[peer]]`, and members added at runtime (the membership directory).
    links: std::sync::RwLock<BTreeMap<NodeId, Link>>,
    /// Every known member's address and kind, this node excepted.
    book: std::sync::RwLock<BTreeMap<NodeId, MemberInfo>>,
    /// Ids whose address this node's own `[[peer]]` list gives: a snapshot
    /// or an introduction never replaces it (other nodes may reach the
    /// same node by another name).
    pinned: std::sync::RwLock<std::collections::BTreeSet<NodeId>>,
    tls: LiveTls,
    events: mpsc::Sender<LinkEvent>,
    view: watch::Receiver<NodeView>,
    wire_bytes: WireBytes,
}

/// What each peer last reported as its applied index, and when it last
/// answered this node (see [`AppliedSlot`]).
type PeerApplied = Arc<AppliedSlot>;

/// One peer's applied index as this node knows it, and when the peer last
/// acked a batch of this node's. An ack sets both: it is the peer's own
/// word, and its time is what says the peer still answers this node
/// (staging targets only such peers). The index a batch from the peer
/// carries (each batch, and a follower's report the moment its applier
/// moves) only raises the index: it arrives on the peer's connection,
/// which proves nothing about this node's, and an ack written before the
/// report it overtook must not lower it for long.
#[derive(Default)]
struct AppliedSlot(std::sync::Mutex<Option<(u64, std::time::Instant)>>);

impl AppliedSlot {
    fn acked(&self, index: u64) {
        *self.0.lock().unwrap() = Some((index, std::time::Instant::now()));
    }

    fn reported(&self, index: u64) {
        if let Some((known, _)) = self.0.lock().unwrap().as_mut() {
            *known = (*known).max(index);
        }
    }

    fn get(&self) -> Option<(u64, std::time::Instant)> {
        *self.0.lock().unwrap()
    }
}

#[derive(Clone)]
struct Link {
    addr: String,
    channel: Channel,
    /// A second connection for bulk content (`Stage`, `Fetch`): megabytes
    /// queued on the Raft connection would delay heartbeats behind them
    /// past the election timeout (seen: a leader deposed while staging a
    /// 1 GiB file).
    bulk: Channel,
    queue: mpsc::Sender<Message>,
    applied: PeerApplied,
}

impl Transport {
    /// Creates a channel and a sender task per peer. Must be called inside a tokio runtime.
    /// `view` is this node's own: each batch carries its applied index, and
    /// a follower reports it to its leader as soon as it moves.
    pub fn start(
        peers: &[MemberInfo],
        tls: &LiveTls,
        events: mpsc::Sender<LinkEvent>,
        view: watch::Receiver<NodeView>,
        wire_bytes: WireBytes,
    ) -> Transport {
        let transport = Transport {
            inner: Arc::new(Inner {
                links: Default::default(),
                book: Default::default(),
                pinned: Default::default(),
                tls: tls.clone(),
                events,
                view,
                wire_bytes,
            }),
        };
        transport.learn(peers);
        transport
    }

    /// Adds members (or new addresses of known ones): a link to each, and
    /// its entry in the address book (this node's own entry goes only to
    /// the book).
    /// Must be called inside a tokio runtime.
    pub fn learn(&self, members: &[MemberInfo]) {
        let me = self.inner.view.borrow().id;
        for member in members {
            let pinned_addr = self
                .inner
                .pinned
                .read()
                .unwrap()
                .contains(&member.id)
                .then(|| self.member(member.id).map(|m| m.addr))
                .flatten();
            if let Some(addr) = pinned_addr {
                // Its kind and how it joined are the cluster's; its address
                // is this node's own config's.
                self.inner.book.write().unwrap().insert(
                    member.id,
                    MemberInfo {
                        addr,
                        ..member.clone()
                    },
                );
                continue;
            }
            if member.id == me {
                // Known, so it can be introduced to joining nodes; no link.
                self.inner.book.write().unwrap().insert(me, member.clone());
                continue;
            }
            let same_addr = self
                .inner
                .links
                .read()
                .unwrap()
                .get(&member.id)
                .is_some_and(|l| l.addr == member.addr);
            self.inner
                .book
                .write()
                .unwrap()
                .insert(member.id, member.clone());
            if same_addr {
                continue;
            }
            let peer = PeerConfig {
                id: member.id,
                addr: member.addr.clone(),
                witness: member.witness,
            };
            let channel = peer_channel(&peer, self.inner.tls.clone());
            let (queue, rx) = mpsc::channel(PEER_QUEUE);
            let applied = PeerApplied::default();
            tokio::spawn(
                sender_task(
                    peer.id,
                    channel.clone(),
                    rx,
                    self.inner.events.clone(),
                    applied.clone(),
                    AppliedReports::new(peer.id, self.inner.view.clone()),
                    self.inner.wire_bytes.clone(),
                )
                .in_current_span(),
            );
            // A replaced link's queue sender drops here, which ends its sender task.
            self.inner.links.write().unwrap().insert(
                peer.id,
                Link {
                    addr: peer.addr.clone(),
                    channel,
                    bulk: peer_channel(&peer, self.inner.tls.clone()),
                    queue,
                    applied,
                },
            );
        }
    }

    /// Keeps the addresses `ids` have now (from this node's `[[peer]]`
    /// list): later [`Transport::learn`]s only add what is not known.
    pub fn pin(&self, ids: impl IntoIterator<Item = NodeId>) {
        self.inner.pinned.write().unwrap().extend(ids);
    }

    /// Whether `peer` is a member this node knows (may connect to it).
    pub fn knows(&self, peer: NodeId) -> bool {
        self.inner.book.read().unwrap().contains_key(&peer)
    }

    /// Whether `peer` may connect and be served, given this node's `view`:
    /// a member of the configuration it applied, one whose addition it
    /// holds but has not applied yet, or anyone of the cluster CA while
    /// this node waits to join (the leader that adds it may have joined
    /// after its config was written). A removed member is refused.
    pub fn admits(&self, peer: NodeId, view: &NodeView) -> bool {
        let m = &view.members;
        if m.member == crate::core::members::Membership::Joining {
            return true;
        }
        if m.lists(peer) {
            return true;
        }
        // Before its first configuration is published (at start).
        if m.voters.is_empty() {
            return self.knows(peer);
        }
        self.inner
            .book
            .read()
            .unwrap()
            .get(&peer)
            .is_some_and(|info| info.added_at > view.applied_index)
    }

    /// What this node knows of `peer`: address, kind, how it joined.
    pub fn member(&self, peer: NodeId) -> Option<MemberInfo> {
        self.inner.book.read().unwrap().get(&peer).cloned()
    }

    /// Every member in the address book, this node's own entry included
    /// when its address is known.
    pub fn book(&self) -> Vec<MemberInfo> {
        self.inner.book.read().unwrap().values().cloned().collect()
    }

    /// Counts bytes sent to a peer outside the Raft stream (staged content).
    pub fn count_sent(&self, bytes: u64) {
        self.inner
            .wire_bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The applied index `peer` last reported, and when (see [`PeerApplied`]).
    pub fn peer_applied(&self, peer: NodeId) -> Option<(u64, std::time::Instant)> {
        self.inner.links.read().unwrap().get(&peer)?.applied.get()
    }

    /// Records the applied index `peer` reported in a batch it sent (see
    /// [`AppliedSlot`]).
    pub fn note_applied(&self, peer: NodeId, index: u64) {
        if let Some(link) = self.inner.links.read().unwrap().get(&peer) {
            link.applied.reported(index);
        }
    }

    /// Enqueues messages for their peers without waiting. Returns the peers
    /// whose snapshot message was dropped: Raft must be told, or it waits forever.
    pub fn send(&self, messages: Vec<Message>) -> Vec<NodeId> {
        let mut dropped_snapshots = Vec::new();
        let links = self.inner.links.read().unwrap();
        for m in messages {
            let to = m.to;
            let is_snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            let queued = match links.get(&to) {
                Some(link) => link.queue.try_send(m).is_ok(),
                None => false,
            };
            if !queued {
                debug!(
                    peer = to,
                    "peer queue full or no link; dropping a raft message (raft retransmits)"
                );
                if is_snapshot {
                    dropped_snapshots.push(to);
                }
            }
        }
        dropped_snapshots
    }

    /// A client for request/response calls to `peer` (status, transfer, barrier).
    pub fn client(&self, peer: NodeId) -> Option<PeerClient<Channel>> {
        self.inner.links.read().unwrap().get(&peer).map(|l| {
            PeerClient::new(l.channel.clone())
                .max_decoding_message_size(crate::net::proto::MAX_MESSAGE_BYTES)
        })
    }

    /// A client for bulk transfers to `peer` (`Stage`, `Fetch`), on a
    /// connection of their own so they never delay Raft messages.
    pub fn bulk_client(&self, peer: NodeId) -> Option<PeerClient<Channel>> {
        self.inner.links.read().unwrap().get(&peer).map(|l| {
            PeerClient::new(l.bulk.clone())
                .max_decoding_message_size(crate::net::proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(crate::net::proto::MAX_MESSAGE_BYTES)
        })
    }

    pub fn addr(&self, peer: NodeId) -> Option<String> {
        self.inner
            .links
            .read()
            .unwrap()
            .get(&peer)
            .map(|l| l.addr.clone())
    }

    /// Every peer this node has a link to (current members, and removed
    /// ones it still knows).
    pub fn peers(&self) -> Vec<NodeId> {
        self.inner.links.read().unwrap().keys().copied().collect()
    }

    /// A one-off client for a node that is not a member yet, at `addr`: the
    /// TLS handshake must prove it is node `id`, as for every peer link.
    pub fn probe_client(&self, id: NodeId, addr: &str) -> PeerClient<Channel> {
        let peer = PeerConfig {
            id,
            addr: addr.to_string(),
            witness: false,
        };
        PeerClient::new(peer_channel(&peer, self.inner.tls.clone()))
            .max_decoding_message_size(crate::net::proto::MAX_MESSAGE_BYTES)
    }
}

/// A lazily connected channel to `peer`: TCP to its configured address (which
/// may be a NAT or proxy), then TLS that must present `node-<id>` signed by our CA.
/// The TLS material is read at each (re)connect, so a SIGHUP reload applies
/// to the next connection.
pub fn peer_channel(peer: &PeerConfig, tls: LiveTls) -> Channel {
    let addr = peer.addr.clone();
    let id = peer.id;
    // The URI only names the HTTP/2 authority; the connector decides where to dial.
    let endpoint = Endpoint::from_shared(format!("http://node-{id}"))
        .expect("a node-<id> URI is always valid")
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true)
        // HTTP/2 flow-control windows follow the measured bandwidth-delay
        // product (h2's BDP estimate) rather than staying at their start
        // size: between two sites 50 ms apart a fixed 2 MiB window would
        // hold a stream to 40 MB/s whatever the link.
        .http2_adaptive_window(true);
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let (current, revoked) = tls.get();
        let connector = current.connector();
        let addr = addr.clone();
        let live = tls.clone();
        async move {
            let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connecting to {addr} timed out"),
                    )
                })??;
            tcp.set_nodelay(true)?;
            let tls = tokio::time::timeout(
                CONNECT_TIMEOUT,
                connector.connect(PeerTls::server_name(id), tcp),
            )
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("TLS handshake with {addr} timed out"),
                )
            })??;
            let refused = |why: String| {
                std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("node {id} at {addr}: {why}"),
                )
            };
            crate::net::tls::refuse_revoked(tls.get_ref().1, &revoked).map_err(refused)?;
            let serial = crate::net::tls::peer_leaf(tls.get_ref().1)
                .map(crate::net::tls::cert_serial_hex)
                .transpose()
                .map_err(|e| refused(e.to_string()))?
                .unwrap_or_default();
            let who = format!("node {id} at {addr}");
            Ok::<_, std::io::Error>(TokioIo::new(crate::net::tls::RevocableStream::new(
                tls, live, serial, who,
            )))
        }
    }))
}

async fn sender_task(
    peer: NodeId,
    channel: Channel,
    mut queue: mpsc::Receiver<Message>,
    events: mpsc::Sender<LinkEvent>,
    applied: PeerApplied,
    mut reports: AppliedReports,
    wire_bytes: WireBytes,
) {
    let mut link = RaftLink {
        client: PeerClient::new(channel)
            .max_encoding_message_size(crate::net::proto::MAX_MESSAGE_BYTES)
            .max_decoding_message_size(crate::net::proto::MAX_MESSAGE_BYTES),
        stream: None,
        unary_only: false,
    };
    let mut backoff = BACKOFF_START;
    let mut failing = false;
    // A message taken from the queue that did not fit the previous batch.
    let mut carried: Option<Message> = None;
    loop {
        // No message, when this node owes its leader a report only.
        let first = match carried.take() {
            Some(m) => Some(m),
            None => tokio::select! {
                m = queue.recv() => match m {
                    Some(m) => Some(m),
                    None => break,
                },
                () = reports.due() => None,
            },
        };
        let mut batch: Vec<Message> = first.into_iter().collect();
        let mut encoded: Vec<Vec<u8>> = batch.iter().map(encode_raft_message).collect();
        let mut bytes: usize = encoded.iter().map(Vec::len).sum();
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(m) => {
                    let e = encode_raft_message(&m);
                    if bytes + e.len() > MAX_BATCH_BYTES {
                        carried = Some(m);
                        break;
                    }
                    bytes += e.len();
                    batch.push(m);
                    encoded.push(e);
                }
                Err(_) => break,
            }
        }
        let snapshot_sent = batch
            .iter()
            .any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        let payload: usize = encoded.iter().map(Vec::len).sum();
        let may_skip_ack = batch.iter().all(may_go_unacked);
        let reported = reports.current();
        let request = RaftBatch {
            term: batch.iter().map(|m| m.term).max().unwrap_or(0),
            messages: encoded,
            no_ack: false,
            sender_applied: reported,
        };
        match link.send(request, may_skip_ack).await {
            Ok(ack) => {
                if let Some(ack) = ack {
                    applied.acked(ack.applied);
                }
                reports.delivered(reported);
                wire_bytes.fetch_add(payload as u64, std::sync::atomic::Ordering::Relaxed);
                if failing {
                    tracing::info!(peer, "peer reachable again");
                }
                failing = false;
                backoff = BACKOFF_START;
                if snapshot_sent {
                    let _ = events.try_send(LinkEvent::Snapshot(peer, SnapshotStatus::Finish));
                }
            }
            Err(status) => {
                if !failing {
                    warn!(
                        peer,
                        "cannot reach peer {peer}: {}; will retry",
                        status_chain(&status)
                    );
                }
                failing = true;
                let _ = events.try_send(LinkEvent::Unreachable(peer));
                if snapshot_sent {
                    let _ = events.try_send(LinkEvent::Snapshot(peer, SnapshotStatus::Failure));
                }
                // Whatever queued up meanwhile is stale; Raft will resend what matters.
                tokio::time::sleep(backoff).await;
                while let Ok(stale) = queue.try_recv() {
                    if stale.get_msg_type() == MessageType::MsgSnapshot {
                        let _ = events.try_send(LinkEvent::Snapshot(peer, SnapshotStatus::Failure));
                    }
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Whether a batch of such messages (only) may skip its ack, which holds
/// the link for a round trip. Heartbeats are what an idle cluster sends all
/// the time; losing one costs nothing but the wait for the next (a fifth of
/// the default election timeout). A follower's answers to appends, and
/// appends without entries (the leader's new commit index, or its answer
/// to a heartbeat's answer that showed the follower one entry short while
/// that entry was on its way), are as cheap to lose: the next heartbeat
/// carries the commit index, and its answer makes the leader send again
/// what is missing. Acked, such an empty append held the link while the
/// commit index that followed it waited: at a 50 ms RTT an edit 50 ms after
/// the last took 2.8 round trips to reach followers instead of 1.8. A
/// report alone (no message) is as cheap to lose.
fn may_go_unacked(m: &Message) -> bool {
    match m.get_msg_type() {
        MessageType::MsgHeartbeat
        | MessageType::MsgHeartbeatResponse
        | MessageType::MsgAppendResponse => true,
        MessageType::MsgAppend => m.entries.is_empty(),
        _ => false,
    }
}

/// When this node tells one peer its applied index unasked: a follower
/// tells its leader as soon as its applier moves. The leader keeps bulk
/// proposals within a few entries of what followers applied
/// (`replication::source::wait_for_followers`); learnt only from the ack of its next
/// batch, which while it waits is the next heartbeat, the report came up
/// to a heartbeat interval late for every batch, and the source waited
/// 12.5 s of a 20 s first sync of 1 GiB.
struct AppliedReports {
    peer: NodeId,
    view: watch::Receiver<NodeView>,
    /// The applied index the last batch delivered to this peer carried.
    sent: u64,
}

impl AppliedReports {
    fn new(peer: NodeId, view: watch::Receiver<NodeView>) -> AppliedReports {
        AppliedReports {
            peer,
            view,
            sent: 0,
        }
    }

    /// Resolves once a report is due (never, once the node has stopped).
    /// Cancel-safe: it waits only in `changed`.
    async fn due(&mut self) {
        loop {
            if self.view.changed().await.is_err() {
                return std::future::pending().await;
            }
            if report_due(&self.view.borrow_and_update(), self.peer, self.sent) {
                return;
            }
        }
    }

    /// This node's applied index, for the batch about to go to the peer.
    fn current(&self) -> u64 {
        self.view.borrow().applied_index
    }

    /// A batch carrying `index` reached the peer (a failed one is reported
    /// again at the applier's next move, or carried by the next batch).
    fn delivered(&mut self, index: u64) {
        self.sent = self.sent.max(index);
    }
}

/// Whether a node with `view` owes `peer` a report of its applied index,
/// having last told it `sent`.
fn report_due(view: &NodeView, peer: NodeId, sent: u64) -> bool {
    view.leader == Some(peer) && view.id != peer && view.applied_index > sent
}

/// The sending half of one peer's Raft link. Batches travel on one
/// long-lived `RaftStream` call, one ack each, one batch in flight: idle,
/// a node's traffic is its heartbeats and their answers, and a message on
/// an open stream costs a fraction of a call of its own (no headers, no new
/// HTTP/2 stream, no task per call on the receiver). Heartbeat batches skip
/// their ack where the receiver allows it (for at most
/// [`ACK_AT_LEAST_EVERY`]); as no ack is ever outstanding when a batch goes
/// out unacked, each ack read still answers the batch just sent. A peer
/// that does not know `RaftStream` (an older version, mid-upgrade) gets a
/// `Raft` call per batch until it fails, when streaming is tried again.
struct RaftLink {
    client: PeerClient<Channel>,
    /// The open call, if any; dropped on any error or timeout, so the next
    /// batch opens a new one (on a new connection if the old one died).
    stream: Option<RaftStream>,
    unary_only: bool,
}

struct RaftStream {
    batches: mpsc::Sender<RaftBatch>,
    acks: tonic::Streaming<crate::net::proto::peer::RaftAck>,
    /// The receiver said it honours `no_ack` (learnt from its first ack).
    acks_on_request: bool,
    last_ack: tokio::time::Instant,
}

impl RaftLink {
    /// Delivers one batch and returns the peer's ack, or `None` when the
    /// batch went unacked (`may_skip_ack`, see [`RaftLink`]). Opening a
    /// stream and the exchange on it each get [`RAFT_RPC_TIMEOUT`].
    async fn send(
        &mut self,
        mut batch: RaftBatch,
        may_skip_ack: bool,
    ) -> Result<Option<crate::net::proto::peer::RaftAck>, tonic::Status> {
        let late =
            || tonic::Status::deadline_exceeded(format!("no answer within {RAFT_RPC_TIMEOUT:?}"));
        // A stream whose connection died (the peer restarted since this
        // node last sent to it, say) is only found out by using it.
        if self.stream.as_ref().is_some_and(|s| s.batches.is_closed()) {
            self.stream = None;
        }
        let reused = self.stream.is_some();
        if !self.unary_only && self.stream.is_none() {
            let (batches, rx) = mpsc::channel(1);
            let call = self
                .client
                .raft_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
            match tokio::time::timeout(RAFT_RPC_TIMEOUT, call).await {
                Ok(Ok(call)) => {
                    self.stream = Some(RaftStream {
                        batches,
                        acks: call.into_inner(),
                        acks_on_request: false,
                        last_ack: tokio::time::Instant::now(),
                    })
                }
                Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                    debug!("the peer has no Raft stream; sending a call per batch");
                    self.unary_only = true;
                }
                Ok(Err(status)) => return Err(status),
                Err(_) => return Err(late()),
            }
        }
        let Some(stream) = self.stream.as_mut() else {
            let mut request = tonic::Request::new(batch);
            request.set_timeout(RAFT_RPC_TIMEOUT);
            let reply = self.client.raft(request).await;
            // Failing: the peer may be restarting, perhaps upgraded.
            self.unary_only = reply.is_ok();
            return reply.map(|r| Some(r.into_inner()));
        };
        batch.no_ack = may_skip_ack
            && stream.acks_on_request
            && stream.last_ack.elapsed() < ACK_AT_LEAST_EVERY;
        // Votes and heartbeats lost to a dead stream would cost an election
        // timeout: a small batch on a reused stream is kept for one retry on
        // a new one. Large batches are not copied; Raft resends them.
        let retry = (reused && batch.messages.iter().map(Vec::len).sum::<usize>() <= RETRY_BYTES)
            .then(|| batch.clone());
        let exchange = async {
            let closed = || tonic::Status::unavailable("the peer closed the Raft stream");
            let no_ack = batch.no_ack;
            stream.batches.send(batch).await.map_err(|_| closed())?;
            if no_ack {
                return Ok::<_, tonic::Status>(None);
            }
            let ack = stream.acks.message().await?.ok_or_else(closed)?;
            stream.acks_on_request = ack.acks_on_request;
            stream.last_ack = tokio::time::Instant::now();
            Ok(Some(ack))
        };
        let result = match tokio::time::timeout(RAFT_RPC_TIMEOUT, exchange).await {
            Ok(Err(status)) if retry.is_some() => {
                debug!(
                    "the Raft stream failed ({}); sending again on a new one",
                    status.message()
                );
                self.stream = None;
                return Box::pin(self.send(retry.expect("checked"), may_skip_ack)).await;
            }
            Ok(r) => r,
            Err(_) => Err(late()),
        };
        if result.is_err() {
            self.stream = None;
        }
        result
    }
}

/// A gRPC status with the chain of errors behind it (connect, TLS, ...),
/// since the status message alone often says only "transport error".
pub fn status_chain(status: &tonic::Status) -> String {
    crate::core::error_text::with_causes(
        status.message().to_string(),
        std::error::Error::source(status),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::StreamExt;
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::net::proto::peer::peer_server::{Peer, PeerServer};
    use crate::net::proto::peer::*;

    /// A peer that answers each batch with its term as the applied index.
    #[derive(Clone, Default)]
    struct FakePeer {
        /// Whether it knows `RaftStream` (an older version does not).
        streams: bool,
        /// Acks after which it ends each stream.
        end_after: Option<usize>,
        /// Whether it skips the ack of batches marked `no_ack` (an older
        /// version acks every batch).
        honours_no_ack: bool,
        opened: Arc<AtomicUsize>,
        calls: Arc<AtomicUsize>,
        /// Batches taken from streams.
        streamed: Arc<AtomicUsize>,
        /// (messages, sender_applied) of each batch taken from streams.
        seen: Arc<std::sync::Mutex<Vec<(usize, u64)>>>,
    }

    fn nope<T>() -> Result<T, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    #[tonic::async_trait]
    impl Peer for FakePeer {
        type FetchStream = futures::stream::Empty<Result<FetchChunk, Status>>;
        type RaftStreamStream =
            std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftAck, Status>> + Send>>;

        async fn raft(&self, req: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(RaftAck {
                applied: req.into_inner().term,
                acks_on_request: false,
            }))
        }

        async fn raft_stream(
            &self,
            req: Request<tonic::Streaming<RaftBatch>>,
        ) -> Result<Response<Self::RaftStreamStream>, Status> {
            if !self.streams {
                return Err(Status::unimplemented("unknown method RaftStream"));
            }
            self.opened.fetch_add(1, Ordering::SeqCst);
            let (honours, streamed) = (self.honours_no_ack, self.streamed.clone());
            let seen = self.seen.clone();
            let acks = req.into_inner().filter_map(move |b| {
                streamed.fetch_add(1, Ordering::SeqCst);
                if let Ok(b) = &b {
                    let batch = (b.messages.len(), b.sender_applied);
                    seen.lock().unwrap().push(batch);
                }
                std::future::ready(match b {
                    Ok(b) if honours && b.no_ack => None,
                    Ok(b) => Some(Ok(RaftAck {
                        applied: b.term,
                        acks_on_request: honours,
                    })),
                    Err(e) => Some(Err(e)),
                })
            });
            Ok(Response::new(match self.end_after {
                Some(n) => Box::pin(acks.take(n)),
                None => Box::pin(acks),
            }))
        }

        async fn fetch(
            &self,
            _: Request<FetchRequest>,
        ) -> Result<Response<Self::FetchStream>, Status> {
            nope()
        }
        async fn stage(&self, _: Request<StageRequest>) -> Result<Response<StageReply>, Status> {
            nope()
        }
        async fn node_status(
            &self,
            _: Request<NodeStatusRequest>,
        ) -> Result<Response<crate::net::proto::peer::NodeView>, Status> {
            nope()
        }
        async fn transfer_leadership(
            &self,
            _: Request<TransferRequest>,
        ) -> Result<Response<TransferReply>, Status> {
            nope()
        }
        async fn barrier(
            &self,
            _: Request<BarrierRequest>,
        ) -> Result<Response<BarrierReply>, Status> {
            nope()
        }
        async fn set_pause(
            &self,
            _: Request<PauseChange>,
        ) -> Result<Response<PauseChangeReply>, Status> {
            nope()
        }
        async fn sync(&self, _: Request<SyncRequest>) -> Result<Response<SyncReply>, Status> {
            nope()
        }
        async fn rollback(
            &self,
            _: Request<RollbackRequest>,
        ) -> Result<Response<RollbackReply>, Status> {
            nope()
        }
        async fn quarantined(
            &self,
            _: Request<QuarantinedRequest>,
        ) -> Result<Response<QuarantinedReply>, Status> {
            nope()
        }
        async fn change_membership(
            &self,
            _: Request<MemberChangeRequest>,
        ) -> Result<Response<MemberChangeReply>, Status> {
            nope()
        }
    }

    /// Serves `peer` on loopback (plain HTTP/2: the link logic is under
    /// test, not TLS) and returns a channel to it.
    async fn serve(peer: FakePeer) -> Channel {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PeerServer::new(peer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy()
    }

    async fn link_to(peer: FakePeer) -> RaftLink {
        RaftLink {
            client: PeerClient::new(serve(peer).await),
            stream: None,
            unary_only: false,
        }
    }

    fn batch(term: u64) -> RaftBatch {
        RaftBatch {
            term,
            messages: vec![vec![1, 2, 3]],
            no_ack: false,
            sender_applied: 0,
        }
    }

    /// Node `id`'s view: following `leader`, `applied` entries applied.
    fn view(id: NodeId, leader: Option<NodeId>, applied: u64) -> crate::raft::core::NodeView {
        crate::raft::core::NodeView {
            id,
            role: crate::raft::core::Role::Follower,
            term: 1,
            vote: 0,
            leader,
            commit_index: applied,
            applied_index: applied,
            first_index: 1,
            last_index: applied,
            progress: Vec::new(),
            stale_term_messages: 0,
            members: Default::default(),
        }
    }

    /// Polls `cond` until it holds, failing the test after 10 s.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Sends `batch(term)` and returns the applied index its ack reports,
    /// or None when the batch went unacked.
    async fn acked(link: &mut RaftLink, term: u64, may_skip_ack: bool) -> Option<u64> {
        link.send(batch(term), may_skip_ack)
            .await
            .unwrap()
            .map(|ack| ack.applied)
    }

    #[tokio::test]
    async fn batches_travel_on_one_stream_with_an_ack_each() {
        let peer = FakePeer {
            streams: true,
            ..Default::default()
        };
        let mut link = link_to(peer.clone()).await;
        for term in 1..=3 {
            assert_eq!(acked(&mut link, term, false).await, Some(term));
        }
        assert_eq!(peer.opened.load(Ordering::SeqCst), 1);
        assert_eq!(peer.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_a_call_per_batch() {
        let peer = FakePeer::default();
        let mut link = link_to(peer.clone()).await;
        for term in 1..=2 {
            assert_eq!(acked(&mut link, term, false).await, Some(term));
        }
        assert_eq!(peer.calls.load(Ordering::SeqCst), 2);
        assert!(link.unary_only);
    }

    #[tokio::test]
    async fn a_small_batch_on_a_stream_the_peer_ended_goes_again_on_a_new_one() {
        let peer = FakePeer {
            streams: true,
            end_after: Some(1),
            ..Default::default()
        };
        let mut link = link_to(peer.clone()).await;
        for term in 1..=3 {
            assert_eq!(acked(&mut link, term, false).await, Some(term));
        }
        assert_eq!(peer.opened.load(Ordering::SeqCst), 3);
        assert_eq!(peer.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn heartbeats_skip_their_ack_where_the_peer_allows_it_but_ask_for_one_now_and_then() {
        let peer = FakePeer {
            streams: true,
            honours_no_ack: true,
            ..Default::default()
        };
        let mut link = link_to(peer.clone()).await;
        // The first ack of a stream tells whether the peer honours no_ack.
        assert_eq!(acked(&mut link, 1, true).await, Some(1));
        assert_eq!(acked(&mut link, 2, true).await, None);
        assert_eq!(acked(&mut link, 3, true).await, None);
        // Other batches are always acked, and the ack answers them.
        assert_eq!(acked(&mut link, 4, false).await, Some(4));
        link.stream.as_mut().unwrap().last_ack -= ACK_AT_LEAST_EVERY;
        assert_eq!(acked(&mut link, 5, true).await, Some(5));
        assert_eq!(acked(&mut link, 6, true).await, None);
        assert_eq!(acked(&mut link, 7, false).await, Some(7));
        assert_eq!(peer.streamed.load(Ordering::SeqCst), 7);
        assert_eq!(peer.opened.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_peer_that_acks_every_batch_gets_every_batch_acked() {
        let peer = FakePeer {
            streams: true,
            ..Default::default()
        };
        let mut link = link_to(peer.clone()).await;
        for term in 1..=3 {
            assert_eq!(acked(&mut link, term, true).await, Some(term));
        }
    }

    #[test]
    fn only_answers_and_heartbeats_may_go_unacked() {
        let of = |t: MessageType| {
            let mut m = Message::default();
            m.set_msg_type(t);
            may_go_unacked(&m)
        };
        assert!(of(MessageType::MsgHeartbeat));
        assert!(of(MessageType::MsgHeartbeatResponse));
        assert!(of(MessageType::MsgAppendResponse));
        // A new commit index only.
        assert!(of(MessageType::MsgAppend));
        // Losing these would cost a resend timeout or an election.
        let mut with_entry = Message::default();
        with_entry.set_msg_type(MessageType::MsgAppend);
        with_entry.mut_entries().push(Default::default());
        assert!(!may_go_unacked(&with_entry));
        assert!(!of(MessageType::MsgSnapshot));
        assert!(!of(MessageType::MsgRequestVote));
        assert!(!of(MessageType::MsgRequestVoteResponse));
        assert!(!of(MessageType::MsgRequestPreVote));
        assert!(!of(MessageType::MsgTimeoutNow));
    }

    #[test]
    fn only_a_follower_owes_a_report_and_only_to_its_leader_when_its_index_moved() {
        assert!(report_due(&view(1, Some(2), 7), 2, 6));
        assert!(!report_due(&view(1, Some(2), 7), 2, 7));
        assert!(!report_due(&view(1, Some(3), 7), 2, 0));
        assert!(!report_due(&view(1, None, 7), 2, 0));
        assert!(!report_due(&view(2, Some(2), 7), 2, 0));
    }

    #[tokio::test]
    async fn a_follower_tells_its_leader_its_applied_index_as_soon_as_it_moves() {
        let peer = FakePeer {
            streams: true,
            honours_no_ack: true,
            ..Default::default()
        };
        let channel = serve(peer.clone()).await;
        let (view_tx, view_rx) = watch::channel(view(1, Some(2), 0));
        let (queue, queued) = mpsc::channel(16);
        let (events, _events) = mpsc::channel(16);
        let applied = PeerApplied::default();
        tokio::spawn(sender_task(
            2,
            channel,
            queued,
            events,
            applied,
            AppliedReports::new(2, view_rx),
            WireBytes::default(),
        ));
        let seen = |batch| peer.seen.lock().unwrap().contains(&batch);
        view_tx.send(view(1, Some(2), 7)).unwrap();
        until("a report of index 7 without messages", || seen((0, 7))).await;
        view_tx.send(view(1, Some(2), 8)).unwrap();
        until("a report of index 8", || seen((0, 8))).await;
        // Any batch carries the index (whom a report goes to is
        // `report_due`'s, tested above).
        view_tx.send(view(1, Some(3), 9)).unwrap();
        let mut heartbeat = Message::default();
        heartbeat.to = 2;
        heartbeat.set_msg_type(MessageType::MsgHeartbeatResponse);
        queue.send(heartbeat).await.unwrap();
        until("the heartbeat answer, carrying index 9", || seen((1, 9))).await;
    }

    #[test]
    fn a_reported_index_only_raises_what_acks_said_and_never_counts_as_an_answer() {
        let slot = AppliedSlot::default();
        slot.reported(5);
        assert_eq!(slot.get(), None, "a report is no answer to this node");
        slot.acked(5);
        let (_, answered) = slot.get().unwrap();
        slot.reported(9);
        assert_eq!(slot.get(), Some((9, answered)));
        slot.reported(7);
        assert_eq!(slot.get(), Some((9, answered)), "an older report overtaken");
        // An ack is the peer's own word, lower after a restart say.
        slot.acked(3);
        assert_eq!(slot.get().unwrap().0, 3);
    }
}
