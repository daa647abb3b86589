//! A small TCP proxy per directed link, so tests can cut, heal and delay the
//! traffic between two nodes without touching the kernel's firewall.
//!
//! Link `i -> j` is the proxy that node `i`'s `[[peer]] id = j` address points
//! at; it forwards every connection to node `j`'s real `listen` address. So a
//! link carries the connections that node `i` opens towards node `j` (both
//! byte directions of those connections: `i`'s requests and `j`'s replies).
//!
//! - `cut(i, j)` closes the live connections of the link at once and closes
//!   every new one right after accepting it, until `heal(i, j)`. Bytes that
//!   are still queued inside the proxy when the cut happens are dropped.
//! - `delay(i, j, ms)` delays every chunk forwarded through the link (in both
//!   directions of its connections) by `ms`; the round trip grows by `2 * ms`.
//! - `limit(i, j, bytes_per_sec)` caps each direction of the link (all its
//!   connections together) at that rate: a chunk leaves once the ones read
//!   before it had their time on the wire, then waits out the delay, as on
//!   a WAN link of that bandwidth and latency.
//!
//! All of it runs on one small tokio runtime owned by [`Proxies`]; dropping
//! `Proxies` stops the runtime, which closes every listener and connection.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What a link currently does. `epoch` grows on every cut, so a connection
/// accepted before a cut never survives it, even if the link was healed again
/// before the connection's task noticed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkState {
    pub cut: bool,
    pub delay_ms: u64,
    /// Bytes per second in each direction; 0: unlimited.
    pub rate: u64,
    pub epoch: u64,
}

/// Counters of one link, for diagnostics.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Connections accepted and forwarded.
    pub accepted: AtomicU64,
    /// Connections accepted and closed at once because the link was cut.
    pub refused: AtomicU64,
    /// Connections whose target (the node) could not be reached.
    pub target_failed: AtomicU64,
    /// Connections currently open.
    pub live: AtomicU64,
    /// Bytes forwarded from the connecting node to the target node.
    pub bytes_up: AtomicU64,
    /// Bytes forwarded from the target node back to the connecting node.
    pub bytes_down: AtomicU64,
}

struct Link {
    listen: SocketAddr,
    target: SocketAddr,
    state: watch::Sender<LinkState>,
    stats: Arc<LinkStats>,
}

/// When each direction of a link (up, down) is next free to send, for
/// [`LinkState::rate`]: shared by the link's connections.
type Pacer = Arc<[std::sync::Mutex<Instant>; 2]>;

/// Every proxy of a cluster, keyed by the directed link `(from, to)`.
pub struct Proxies {
    rt: Option<Runtime>,
    links: BTreeMap<(u64, u64), Link>,
}

impl Default for Proxies {
    fn default() -> Self {
        Self::new()
    }
}

impl Proxies {
    pub fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cluster-proxy")
            .enable_all()
            .build()
            .expect("build the proxy runtime");
        Proxies {
            rt: Some(rt),
            links: BTreeMap::new(),
        }
    }

    fn rt(&self) -> &Runtime {
        self.rt.as_ref().expect("proxy runtime is running")
    }

    /// Starts the proxy for link `from -> to`, forwarding to `target`, and
    /// returns the loopback address node `from` must use for peer `to`.
    pub fn add_link(&mut self, from: u64, to: u64, target: SocketAddr) -> SocketAddr {
        assert!(
            !self.links.contains_key(&(from, to)),
            "link {from}->{to} already exists"
        );
        let listener = self
            .rt()
            .block_on(TcpListener::bind(("127.0.0.1", 0)))
            .expect("bind a proxy listener on 127.0.0.1");
        let listen = listener.local_addr().expect("proxy listener address");
        let (tx, rx) = watch::channel(LinkState::default());
        let stats = Arc::new(LinkStats::default());
        let now = self.rt().block_on(async { Instant::now() });
        let pacer: Pacer = Arc::new([std::sync::Mutex::new(now), std::sync::Mutex::new(now)]);
        self.rt()
            .spawn(accept_loop(listener, target, rx, stats.clone(), pacer));
        self.links.insert(
            (from, to),
            Link {
                listen,
                target,
                state: tx,
                stats,
            },
        );
        listen
    }

    fn link(&self, from: u64, to: u64) -> &Link {
        self.links
            .get(&(from, to))
            .unwrap_or_else(|| panic!("no proxy for link {from}->{to}"))
    }

    /// Address of the proxy of link `from -> to`.
    pub fn addr(&self, from: u64, to: u64) -> SocketAddr {
        self.link(from, to).listen
    }

    /// Target (node `to`'s listen address) of link `from -> to`.
    pub fn target(&self, from: u64, to: u64) -> SocketAddr {
        self.link(from, to).target
    }

    pub fn state(&self, from: u64, to: u64) -> LinkState {
        *self.link(from, to).state.borrow()
    }

    pub fn stats(&self, from: u64, to: u64) -> &LinkStats {
        &self.link(from, to).stats
    }

    /// Every directed link, sorted.
    pub fn links(&self) -> Vec<(u64, u64)> {
        self.links.keys().copied().collect()
    }

    /// Closes the live connections of `from -> to` and refuses new ones.
    pub fn cut(&self, from: u64, to: u64) {
        self.link(from, to).state.send_modify(|s| {
            s.cut = true;
            s.epoch += 1;
        });
    }

    /// Lets new connections of `from -> to` through again.
    pub fn heal(&self, from: u64, to: u64) {
        self.link(from, to).state.send_modify(|s| s.cut = false);
    }

    /// Delays every chunk forwarded through `from -> to` by `ms` (0 = none).
    pub fn delay(&self, from: u64, to: u64, ms: u64) {
        self.link(from, to).state.send_modify(|s| s.delay_ms = ms);
    }

    /// Caps each direction of `from -> to` at `bytes_per_sec` (0 = none).
    pub fn limit(&self, from: u64, to: u64, bytes_per_sec: u64) {
        self.link(from, to)
            .state
            .send_modify(|s| s.rate = bytes_per_sec);
    }

    /// Cuts every link to and from `node`.
    pub fn isolate(&self, node: u64) {
        for &(from, to) in self.links.keys() {
            if from == node || to == node {
                self.cut(from, to);
            }
        }
    }

    /// Heals every link to and from `node` (delays are kept).
    pub fn rejoin(&self, node: u64) {
        for &(from, to) in self.links.keys() {
            if from == node || to == node {
                self.heal(from, to);
            }
        }
    }

    /// Cuts every link between nodes of different groups; links inside a
    /// group are healed. Nodes not named in any group are isolated.
    pub fn partition(&self, groups: &[&[u64]]) {
        let group_of = |n: u64| groups.iter().position(|g| g.contains(&n));
        for &(from, to) in self.links.keys() {
            match (group_of(from), group_of(to)) {
                (Some(a), Some(b)) if a == b => self.heal(from, to),
                _ => self.cut(from, to),
            }
        }
    }

    /// Heals every link and removes every delay.
    pub fn heal_all(&self) {
        for link in self.links.values() {
            link.state.send_modify(|s| {
                s.cut = false;
                s.delay_ms = 0;
                s.rate = 0;
            });
        }
    }

    /// One line per link: state and counters.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (&(from, to), link) in &self.links {
            let s = *link.state.borrow();
            let st = &link.stats;
            let _ = writeln!(
                out,
                "link {from}->{to} ({} -> {}): {}{} accepted={} refused={} target_failed={} live={} up={}B down={}B",
                link.listen,
                link.target,
                if s.cut { "CUT" } else { "open" },
                if s.delay_ms > 0 {
                    format!(" delay={}ms", s.delay_ms)
                } else {
                    String::new()
                } + &if s.rate > 0 {
                    format!(" rate={}B/s", s.rate)
                } else {
                    String::new()
                },
                st.accepted.load(Ordering::Relaxed),
                st.refused.load(Ordering::Relaxed),
                st.target_failed.load(Ordering::Relaxed),
                st.live.load(Ordering::Relaxed),
                st.bytes_up.load(Ordering::Relaxed),
                st.bytes_down.load(Ordering::Relaxed),
            );
        }
        out
    }
}

impl Drop for Proxies {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Drops every task: listeners and connections close with them.
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    rx: watch::Receiver<LinkState>,
    stats: Arc<LinkStats>,
    pacer: Pacer,
) {
    loop {
        let inbound = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(_) => {
                // EMFILE and friends: back off a little, never spin.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let st = *rx.borrow();
        if st.cut {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            drop(inbound);
            continue;
        }
        let _ = inbound.set_nodelay(true);
        tokio::spawn(handle_conn(
            inbound,
            target,
            rx.clone(),
            st.epoch,
            stats.clone(),
            pacer.clone(),
        ));
    }
}

/// Resolves once the link is cut (or was cut since `epoch`).
async fn wait_cut(mut rx: watch::Receiver<LinkState>, epoch: u64) {
    loop {
        {
            let s = *rx.borrow_and_update();
            if s.cut || s.epoch != epoch {
                return;
            }
        }
        if rx.changed().await.is_err() {
            // The sender is gone: the proxies are shutting down with the runtime.
            std::future::pending::<()>().await;
        }
    }
}

struct LiveGuard(Arc<LinkStats>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle_conn(
    inbound: TcpStream,
    target: SocketAddr,
    rx: watch::Receiver<LinkState>,
    epoch: u64,
    stats: Arc<LinkStats>,
    pacer: Pacer,
) {
    stats.live.fetch_add(1, Ordering::Relaxed);
    let _live = LiveGuard(stats.clone());
    let cut = wait_cut(rx.clone(), epoch);
    tokio::pin!(cut);

    let outbound = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)) => match r {
            Ok(Ok(s)) => s,
            _ => {
                // The node behind the link is down: close the inbound side too.
                stats.target_failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        },
        _ = &mut cut => return,
    };
    let _ = outbound.set_nodelay(true);
    stats.accepted.fetch_add(1, Ordering::Relaxed);

    let (in_r, in_w) = inbound.into_split();
    let (out_r, out_w) = outbound.into_split();
    let up = pump(
        in_r,
        out_w,
        rx.clone(),
        epoch,
        stats.clone(),
        true,
        pacer.clone(),
    );
    let down = pump(out_r, in_w, rx.clone(), epoch, stats.clone(), false, pacer);
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = &mut cut => {}
    }
    // Both halves of both sockets drop here: the connection is closed.
}

/// Copies one direction of a connection, through a delay line. A chunk read
/// at time t is written at t + delay (the delay in force when it was read),
/// in order. EOF is forwarded as a write shutdown once the queue is drained.
async fn pump(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    rx: watch::Receiver<LinkState>,
    epoch: u64,
    stats: Arc<LinkStats>,
    up: bool,
    pacer: Pacer,
) {
    let (tx, mut queue) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let reader_rx = rx.clone();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let LinkState { delay_ms, rate, .. } = *reader_rx.borrow();
                    let mut sent = Instant::now();
                    if rate > 0 {
                        // On the wire after what was read before it.
                        let mut free = pacer[usize::from(!up)].lock().unwrap();
                        *free = (*free).max(sent) + Duration::from_secs_f64(n as f64 / rate as f64);
                        sent = *free;
                    }
                    let due = sent + Duration::from_millis(delay_ms);
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Dropping `tx` tells the writer that this direction reached EOF.
    };
    let writer = async move {
        while let Some((due, chunk)) = queue.recv().await {
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            {
                // Never forward a byte after a cut, even if this task has not
                // been told yet.
                let s = *rx.borrow();
                if s.cut || s.epoch != epoch {
                    return;
                }
            }
            if w.write_all(&chunk).await.is_err() {
                return;
            }
            let counter = if up {
                &stats.bytes_up
            } else {
                &stats.bytes_down
            };
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}
