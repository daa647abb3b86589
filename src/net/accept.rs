//! The authenticated accept loop of the peer port and the remote admin
//! port: every incoming connection completes mutual TLS against the cluster
//! CA and is bound to the identity its certificate proves before any request
//! on it is served; refusals are logged with their reason, rate-limited.
//!
//! Invariant owned here (invariant 5): no byte from a peer reaches a service
//! unless the peer completed mutual TLS against the cluster CA and its
//! certificate names a configured member (or, on the admin port, an
//! administrator).

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
use tracing::{debug, warn, Instrument};

use crate::core::config::NodeId;
use crate::net::tls::{peer_node_id, LiveTls, PeerTls};

/// A peer that does not finish the TLS handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Who is on the other end of an accepted connection, as proven by its certificate.
#[derive(Debug, Clone, Copy)]
pub struct PeerIdentity {
    pub node_id: NodeId,
    pub remote: SocketAddr,
}

/// An accepted, authenticated connection, carrying who it is (`I`, proven by
/// its certificate) into tonic's request extensions.
pub struct AuthedConn<I> {
    stream: crate::net::tls::RevocableStream<TlsStream<TcpStream>>,
    identity: I,
}

/// A peer node's connection to the peer service.
pub type PeerConn = AuthedConn<PeerIdentity>;

impl<I> AuthedConn<I> {
    pub fn new(
        stream: crate::net::tls::RevocableStream<TlsStream<TcpStream>>,
        identity: I,
    ) -> Self {
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
/// admits only members (`is_member`, asked at each accept: members change
/// at runtime).
pub fn accept_loop(
    listener: TcpListener,
    tls: LiveTls,
    is_member: impl Fn(NodeId) -> bool + Send + Sync + 'static,
) -> ReceiverStream<io::Result<PeerConn>> {
    accept_authenticated(
        listener,
        tls,
        "peer",
        PeerTls::acceptor,
        move |stream, remote| {
            let node_id = peer_node_id(stream).map_err(|e| e.to_string())?;
            if !is_member(node_id) {
                return Err(format!(
                "its certificate is for node {node_id}, which is not a member of this cluster; add it with `clusterctl member add {node_id} --addr HOST:PORT` or revoke its certificate"
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
                            crate::net::tls::refuse_revoked(stream.get_ref().1, &revoked)?;
                            let identity = identify(&stream, remote)?;
                            let serial = crate::net::tls::peer_leaf(stream.get_ref().1)
                                .map(crate::net::tls::cert_serial_hex)
                                .transpose()
                                .map_err(|e| e.to_string())?
                                .unwrap_or_default();
                            let stream = crate::net::tls::RevocableStream::new(
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
        if let Some(ours) = other.0.downcast_ref::<crate::net::tls::TlsError>() {
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
