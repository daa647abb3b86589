//! Multi-process test harness: starts real `clusterd` processes on loopback,
//! each behind our own TCP proxies, and drives them through `clusterctl`.
//!
//! Shared by the integration tests (`cluster-tests/main.rs`) and the failover
//! benchmark (`cluster-tests/bench_failover.rs`).
//!
//! Layout of one cluster's temporary directory:
//! ```text
//! <tmp>/clusterd-test-XXXX/
//!   certs/                 ca.crt ca.key node-<id>.crt node-<id>.key
//!   foreign-ca/            (only with ClusterBuilder::foreign_ca)
//!   n<id>/config.toml
//!   n<id>/data/            node.data_dir
//!   n<id>/admin.sock       node.admin_socket
//!   n<id>/node.log         stdout + stderr of every run of the node
//!   n<id>/sets/<name>/     root of sync set <name> (ClusterBuilder::sync_set)
//!   n<id>/files/<file>     single-file sync sets (ClusterBuilder::sync_file)
//! ```
//!
//! Environment knobs (all optional):
//! - `CLUSTER_TESTS_TIME_SCALE=2` multiplies every `wait_until` deadline.
//! - `CLUSTER_TESTS_KEEP=1` keeps the temporary directory (its path is printed).
//! - `CLUSTER_TESTS_LOG_LINES=200` lines of each node's log printed on failure.
//! - `CLUSTER_TESTS_RUST_LOG=...` overrides the nodes' `RUST_LOG`
//!   (default `info,clusterd=debug`).
//! - `CLUSTER_TESTS_WRAP="heaptrack -o /tmp/ht"` starts every node under a
//!   profiler (its pid is then the profiler's). A profiler that runs the node
//!   as its child can leave it running when the harness kills the profiler:
//!   `pkill -f clusterd-test-` afterwards, or later benchmarks share the CPU.
//!
//! Processes: every node is started from the thread that calls
//! `start`/`restart` (normally the test thread), with `PR_SET_PDEATHSIG =
//! SIGKILL` so a node never outlives that thread, and is SIGKILLed when the
//! `Cluster` drops. On a panic the `Cluster`'s `Drop` prints the proxies'
//! state and the tail of every node's log.

#![allow(dead_code)]

pub mod proxy;
pub mod tree;

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use proxy::Proxies;

/// The daemon under test.
pub const CLUSTERD: &str = env!("CARGO_BIN_EXE_clusterd");
/// The admin CLI.
pub const CLUSTERCTL: &str = env!("CARGO_BIN_EXE_clusterctl");

/// Timers the harness writes into `[raft]` unless told otherwise.
pub const HEARTBEAT_MS: u64 = 100;
pub const ELECTION_TIMEOUT_MS: u64 = 1000;

/// Deadline for an election (or a re-election) to settle. Generous: several
/// 3-node clusters may run at once on 2 cores.
pub const ELECTION_DEADLINE: Duration = Duration::from_secs(15);
/// Deadline for a barrier to succeed (retried within it).
pub const BARRIER_DEADLINE: Duration = Duration::from_secs(20);
/// How long one `clusterctl status --json` may take before it counts as no answer.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// `--timeout-ms` given to one `clusterctl barrier` by default.
pub const BARRIER_TIMEOUT_MS: u64 = 5000;
/// `--timeout-ms` given to one `clusterctl promote` by default.
pub const PROMOTE_TIMEOUT_MS: u64 = 10_000;
/// Poll interval of `wait_until`.
pub const POLL: Duration = Duration::from_millis(50);
/// A window of several election timeouts, to show that something does *not*
/// happen. Not scaled: it is about the nodes' timers, not the machine's speed.
pub const THREE_ELECTIONS: Duration = Duration::from_millis(3 * ELECTION_TIMEOUT_MS + 500);

// ---------------------------------------------------------------------------
// Time and waiting
// ---------------------------------------------------------------------------

/// `CLUSTER_TESTS_TIME_SCALE`, default 1.
pub fn time_scale() -> f64 {
    static SCALE: OnceLock<f64> = OnceLock::new();
    *SCALE.get_or_init(|| {
        std::env::var("CLUSTER_TESTS_TIME_SCALE")
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| s.max(0.1))
            .unwrap_or(1.0)
    })
}

/// A deadline stretched by `CLUSTER_TESTS_TIME_SCALE`.
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(time_scale())
}

/// What a polled closure may return to `wait_until`: `Some(v)`/`Ok(v)` ends
/// the wait with `v`; `None`/`Err(observation)` keeps polling, and the last
/// observation is printed if the deadline passes.
pub trait Attempt<T> {
    fn into_attempt(self) -> Result<T, String>;
}

impl<T> Attempt<T> for Option<T> {
    fn into_attempt(self) -> Result<T, String> {
        self.ok_or_else(|| "condition not met (None)".to_string())
    }
}

impl<T, E: std::fmt::Display> Attempt<T> for Result<T, E> {
    fn into_attempt(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Polls `f` every ~50 ms until it yields a value, for at most `deadline`
/// (scaled by `CLUSTER_TESTS_TIME_SCALE`); panics naming `what` and the last
/// observation on timeout. `f` may itself panic to fail fast.
#[track_caller]
pub fn wait_until<T, R: Attempt<T>>(deadline: Duration, what: &str, f: impl FnMut() -> R) -> T {
    wait_until_every(POLL, deadline, what, f)
}

/// [`wait_until`] polling every `period`: benchmarks poll less often, so
/// that the harness's own work (a `clusterctl` per poll) takes little CPU
/// from the nodes it measures.
#[track_caller]
pub fn wait_until_every<T, R: Attempt<T>>(
    period: Duration,
    deadline: Duration,
    what: &str,
    mut f: impl FnMut() -> R,
) -> T {
    let deadline = scaled(deadline);
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        let last = match f().into_attempt() {
            Ok(v) => return v,
            Err(obs) => obs,
        };
        polls += 1;
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            panic!(
                "timed out after {:.1?} ({polls} polls) waiting for: {what}\n  last observation: {last}",
                elapsed
            );
        }
        thread::sleep(period.min(deadline - elapsed));
    }
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

/// Outcome of one command run with a timeout.
#[derive(Clone, Debug)]
pub struct CmdOutput {
    /// Exit code; `None` if killed by a signal (including our timeout).
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        !self.timed_out && self.code == Some(0)
    }
}

impl std::fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.timed_out {
            write!(f, "timed out after {:.1?}", self.elapsed)?;
        } else if let Some(c) = self.code {
            write!(f, "exit {c} after {:.1?}", self.elapsed)?;
        } else {
            write!(f, "signal {:?} after {:.1?}", self.signal, self.elapsed)?;
        }
        write!(
            f,
            "; stdout: {:?}; stderr: {:?}",
            clip(self.stdout.trim(), 2000),
            clip(self.stderr.trim(), 2000)
        )
    }
}

fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Removes every inherited `CLUSTERD_*` variable: the daemon reads its config
/// overrides from them, and the developer's shell must not leak into tests.
pub fn scrub_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CLUSTERD_") {
            cmd.env_remove(k);
        }
    }
}

/// Runs `cmd` (stdin closed, stdout/stderr captured), killing it with
/// SIGKILL if it runs longer than `timeout`.
pub fn run_cmd(mut cmd: Command, timeout: Duration) -> CmdOutput {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let t_err = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let st = child.wait();
        let _ = tx.send(st);
    });
    let mut timed_out = false;
    let status = match rx.recv_timeout(timeout) {
        Ok(st) => st,
        Err(_) => {
            timed_out = true;
            // Not reaped yet (the waiter has not returned), so `pid` is still ours.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            rx.recv().expect("waiter thread reports")
        }
    };
    let _ = waiter.join();
    let elapsed = start.elapsed();
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    let status = status.unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}"));
    CmdOutput {
        code: status.code(),
        signal: status.signal(),
        stdout,
        stderr,
        timed_out,
        elapsed,
    }
}

/// `clusterctl certs init --out DIR --nodes <ids>`; panics unless every
/// expected file exists afterwards.
#[track_caller]
pub fn certs_init(out: &Path, ids: &[u64]) {
    let nodes = ids
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new(CLUSTERCTL);
    scrub_env(&mut cmd);
    cmd.arg("certs")
        .arg("init")
        .arg("--out")
        .arg(out)
        .arg("--nodes")
        .arg(&nodes);
    let res = run_cmd(cmd, scaled(Duration::from_secs(60)));
    assert!(
        res.success(),
        "clusterctl certs init --out {} --nodes {nodes} failed: {res}",
        out.display()
    );
    let mut expected = vec!["ca.crt".to_string(), "ca.key".to_string()];
    for id in ids {
        expected.push(format!("node-{id}.crt"));
        expected.push(format!("node-{id}.key"));
    }
    for f in expected {
        assert!(
            out.join(&f).is_file(),
            "clusterctl certs init did not write {}",
            out.join(&f).display()
        );
    }
}

/// Last `n` lines of a file (lossy UTF-8); empty if unreadable.
pub fn tail_file(path: &Path, n: usize) -> String {
    let Ok(bytes) = fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    lines[from..].join("\n")
}

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// The kernel's ephemeral port range (outgoing connections and `:0` binds).
fn ephemeral_range() -> (u16, u16) {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// A free loopback port for a node's `listen`, chosen *outside* the kernel's
/// ephemeral range: the node must be able to bind the same port again after
/// a restart, and an ephemeral port might meanwhile be the local end of some
/// outgoing connection. Never hands out the same port twice per process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let (lo, hi) = ephemeral_range();
    let mut ranges: Vec<(u16, u16)> = Vec::new();
    if lo > 11000 {
        ranges.push((10000, lo - 1));
    }
    if hi < 64000 {
        ranges.push((hi + 1, 65000));
    }
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..500 {
        let port = if ranges.is_empty() {
            // No room outside the ephemeral range: let the kernel choose.
            let l = TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1:0");
            l.local_addr().expect("local addr").port()
        } else {
            let r = random_u64();
            let (a, b) = ranges[(r % ranges.len() as u64) as usize];
            a + ((r >> 16) % (b as u64 - a as u64 + 1)) as u16
        };
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port found");
}

// ---------------------------------------------------------------------------
// Config files
// ---------------------------------------------------------------------------

/// A TOML basic string literal.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn path_str(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 path {}", p.display()))
}

/// `[tls]` files of one node.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `clusterctl certs init --out dir` wrote for node `id`.
    pub fn in_dir(dir: &Path, id: u64) -> Self {
        TlsFiles {
            ca: dir.join("ca.crt"),
            cert: dir.join(format!("node-{id}.crt")),
            key: dir.join(format!("node-{id}.key")),
        }
    }
}

/// Everything the harness writes into one node's config file.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: u64,
    pub listen: String,
    pub data_dir: PathBuf,
    pub admin_socket: PathBuf,
    /// `Some((heartbeat_ms, election_timeout_ms))` writes a `[raft]` section;
    /// `None` leaves it out (the daemon's defaults).
    pub timers: Option<(u64, u64)>,
    pub tls: TlsFiles,
    /// `[[peer]]` entries: (id, addr).
    pub peers: Vec<(u64, String)>,
    /// Peers written with `witness = true` in their `[[peer]]` table.
    pub witness_peers: Vec<u64>,
    /// Extra raw lines for the `[node]` section, e.g. `witness = true`.
    pub node_extra: Vec<String>,
    /// Extra `key = value` lines under `[tls]`.
    pub tls_extra: Vec<String>,
    /// Raw TOML appended at the end (whole sections, e.g. `[[sync]]`).
    pub extra: String,
}

impl NodeConfig {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "[node]");
        let _ = writeln!(s, "id = {}", self.id);
        let _ = writeln!(s, "listen = {}", toml_str(&self.listen));
        let _ = writeln!(s, "data_dir = {}", toml_str(path_str(&self.data_dir)));
        let _ = writeln!(
            s,
            "admin_socket = {}",
            toml_str(path_str(&self.admin_socket))
        );
        for line in &self.node_extra {
            let _ = writeln!(s, "{line}");
        }
        if let Some((hb, el)) = self.timers {
            let _ = writeln!(s, "\n[raft]");
            let _ = writeln!(s, "heartbeat_ms = {hb}");
            let _ = writeln!(s, "election_timeout_ms = {el}");
        }
        let _ = writeln!(s, "\n[tls]");
        let _ = writeln!(s, "ca = {}", toml_str(path_str(&self.tls.ca)));
        let _ = writeln!(s, "cert = {}", toml_str(path_str(&self.tls.cert)));
        let _ = writeln!(s, "key = {}", toml_str(path_str(&self.tls.key)));
        for line in &self.tls_extra {
            let _ = writeln!(s, "{line}");
        }
        for (id, addr) in &self.peers {
            let _ = writeln!(s, "\n[[peer]]");
            let _ = writeln!(s, "id = {id}");
            let _ = writeln!(s, "addr = {}", toml_str(addr));
            if self.witness_peers.contains(id) {
                let _ = writeln!(s, "witness = true");
            }
        }
        if !self.extra.is_empty() {
            let _ = writeln!(s, "\n{}", self.extra);
        }
        s
    }

    pub fn write(&self, path: &Path) {
        fs::write(path, self.render()).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// Runs `clusterd --config FILE --check`.
pub fn check_config(path: &Path) -> CmdOutput {
    let mut cmd = Command::new(CLUSTERD);
    scrub_env(&mut cmd);
    cmd.arg("--config").arg(path).arg("--check");
    run_cmd(cmd, scaled(Duration::from_secs(20)))
}

/// A short temporary directory: the admin socket path must stay well under
/// the 108-byte limit of `sockaddr_un`.
pub fn short_tempdir(prefix: &str) -> tempfile::TempDir {
    let base = std::env::temp_dir();
    let base = if base.as_os_str().len() > 40 {
        PathBuf::from("/tmp")
    } else {
        base
    };
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .unwrap_or_else(|e| panic!("create a temp dir in {}: {e}", base.display()))
}

// ---------------------------------------------------------------------------
// Status views
// ---------------------------------------------------------------------------

/// One node's own view, parsed from its `clusterctl status --json`.
#[derive(Clone, Debug)]
pub struct View {
    /// The node that answered.
    pub id: u64,
    /// Its view of the leader.
    pub leader: Option<u64>,
    /// Its current term (top-level `term`).
    pub term: u64,
    /// Its own role, from its own entry in `nodes`.
    pub role: String,
    /// Its own vote in the current term (0 when none / null / absent).
    pub vote: u64,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// Its own idea of its membership (`voter`, `learner`, `witness`,
    /// `joining`, `removed`), from its own entry; `None` where the status
    /// has no `member` field, so tests of older builds still parse.
    pub member: Option<String>,
    pub raw: Value,
}

impl View {
    /// Parses the status JSON node `id` printed; checks the contract's shape.
    pub fn parse(id: u64, v: &Value) -> Result<View, String> {
        let obj = v
            .as_object()
            .ok_or_else(|| format!("status of node {id} is not a JSON object: {v}"))?;
        if let Some(n) = obj.get("node_id") {
            if n.as_u64() != Some(id) {
                return Err(format!("node {id} answered with node_id {n}: {v}"));
            }
        }
        let leader = match obj.get("leader") {
            Some(Value::Null) => None,
            Some(l) => Some(
                l.as_u64()
                    .ok_or_else(|| format!("node {id}: `leader` is not an id or null: {v}"))?,
            ),
            None => return Err(format!("node {id}: status has no `leader`: {v}")),
        };
        let term = obj
            .get("term")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("node {id}: status has no numeric `term`: {v}"))?;
        let me = entry(v, id)
            .ok_or_else(|| format!("node {id}: no entry for itself in `nodes`: {v}"))?;
        let role = me
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("node {id}: own entry has no `role`: {v}"))?
            .to_string();
        let vote = me.get("vote").and_then(Value::as_u64).unwrap_or(0);
        Ok(View {
            id,
            leader,
            term,
            role,
            vote,
            commit_index: me.get("commit_index").and_then(Value::as_u64),
            applied_index: me.get("applied_index").and_then(Value::as_u64),
            member: me.get("member").and_then(Value::as_str).map(str::to_string),
            raw: v.clone(),
        })
    }

    pub fn is_leader(&self) -> bool {
        self.role == "leader"
    }

    /// `reachable` of node `other` in this view.
    pub fn reachable(&self, other: u64) -> Option<bool> {
        entry(&self.raw, other)?.get("reachable")?.as_bool()
    }

    /// `role` of node `other` in this view.
    pub fn role_of(&self, other: u64) -> Option<String> {
        Some(entry(&self.raw, other)?.get("role")?.as_str()?.to_string())
    }
}

impl std::fmt::Display for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n{}: role={} leader={} term={} vote={} commit={:?} applied={:?}",
            self.id,
            self.role,
            self.leader.map_or("null".to_string(), |l| l.to_string()),
            self.term,
            self.vote,
            self.commit_index,
            self.applied_index
        )?;
        if let Some(m) = &self.member {
            write!(f, " member={m}")?;
        }
        Ok(())
    }
}

/// The entry of node `id` in a status JSON's `nodes` array.
pub fn entry(status: &Value, id: u64) -> Option<&Value> {
    status
        .get("nodes")?
        .as_array()?
        .iter()
        .find(|n| n.get("id").and_then(Value::as_u64) == Some(id))
}

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// One node of a cluster: paths and the running process.
pub struct Node {
    pub id: u64,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub log_path: PathBuf,
    pub listen: SocketAddr,
    config: Mutex<NodeConfig>,
    child: Mutex<Option<Child>>,
    starts: Mutex<u32>,
}

impl Node {
    pub fn config(&self) -> NodeConfig {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Options for a cluster; `Cluster::start(n)` is `ClusterBuilder::new(n).start()`.
pub struct ClusterBuilder {
    n: u64,
    timers: Option<(u64, u64)>,
    tls_override: BTreeMap<u64, TlsFiles>,
    foreign_ca: Vec<u64>,
    node_extra: BTreeMap<u64, Vec<String>>,
    tls_extra: BTreeMap<u64, Vec<String>>,
    extra: BTreeMap<u64, String>,
    not_started: HashSet<u64>,
    /// `ClusterBuilder::joiner`: in no other node's `[[peer]]` list.
    joiners: HashSet<u64>,
    env: Vec<(String, String)>,
    sync_sets: Vec<SyncSpec>,
    witnesses: Vec<u64>,
    /// Peers dial each other directly instead of through the proxies.
    direct: bool,
    wrap: Vec<String>,
}

/// A `[[sync]]` set the builder gives every node, each at its own path
/// under its node directory (the node directories only exist in `start`).
struct SyncSpec {
    name: String,
    /// `None`: a directory set at `<node dir>/sets/<name>`; `Some(f)`: a
    /// single-file set at `<node dir>/files/<f>`.
    file: Option<String>,
    mode: String,
    extra_lines: String,
}

impl SyncSpec {
    /// Creates the set's root (or a single-file set's parent directory) under
    /// `node_dir` and returns the `[[sync]]` section for that node.
    fn render(&self, node_dir: &Path) -> String {
        let (path, dir) = match &self.file {
            None => {
                let p = node_dir.join("sets").join(&self.name);
                (p.clone(), p)
            }
            Some(f) => (node_dir.join("files").join(f), node_dir.join("files")),
        };
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut s = String::new();
        let _ = writeln!(s, "[[sync]]");
        let _ = writeln!(s, "name = {}", toml_str(&self.name));
        let _ = writeln!(s, "path = {}", toml_str(path_str(&path)));
        let _ = writeln!(s, "mode = {}", toml_str(&self.mode));
        if self.file.is_some() {
            // The file need not exist yet on every node.
            let _ = writeln!(s, "kind = \"file\"");
        }
        let extra = self.extra_lines.replace("{node_dir}", path_str(node_dir));
        if !extra.trim().is_empty() {
            let _ = writeln!(s, "{}", extra.trim_end());
        }
        s
    }
}

impl ClusterBuilder {
    pub fn new(n: u64) -> Self {
        assert!(n >= 1, "a cluster needs at least one node");
        ClusterBuilder {
            n,
            timers: Some((HEARTBEAT_MS, ELECTION_TIMEOUT_MS)),
            tls_override: BTreeMap::new(),
            foreign_ca: Vec::new(),
            node_extra: BTreeMap::new(),
            tls_extra: BTreeMap::new(),
            extra: BTreeMap::new(),
            not_started: HashSet::new(),
            joiners: HashSet::new(),
            env: Vec::new(),
            sync_sets: Vec::new(),
            witnesses: Vec::new(),
            direct: false,
            wrap: Vec::new(),
        }
    }

    /// Every node runs as `argv... clusterd --config ...` (e.g. `unshare`
    /// with a shell that sets a namespace's limit, then `exec "$@"`).
    pub fn wrap(mut self, argv: &[&str]) -> Self {
        self.wrap = argv.iter().map(|a| a.to_string()).collect();
        self
    }

    /// `[raft] heartbeat_ms / election_timeout_ms` for every node.
    pub fn timers(mut self, heartbeat_ms: u64, election_timeout_ms: u64) -> Self {
        self.timers = Some((heartbeat_ms, election_timeout_ms));
        self
    }

    /// Leaves `[raft]` out: the daemon's default timers.
    pub fn default_timers(mut self) -> Self {
        self.timers = None;
        self
    }

    /// Peers connect to each other directly: no link can be cut or counted,
    /// and no proxy takes CPU from the nodes (for timing benchmarks, which
    /// compare against rsync running without one).
    pub fn direct_links(mut self) -> Self {
        self.direct = true;
        self
    }

    /// Node `id` uses these TLS files instead of the cluster's own.
    pub fn tls_override(mut self, id: u64, tls: TlsFiles) -> Self {
        self.tls_override.insert(id, tls);
        self
    }

    /// Nodes `ids` get certificates from a second, unrelated CA (made with
    /// `certs init` in `<tmp>/foreign-ca`).
    pub fn foreign_ca(mut self, ids: &[u64]) -> Self {
        self.foreign_ca.extend_from_slice(ids);
        self
    }

    /// An extra raw line in node `id`'s `[node]` section.
    /// A raw `key = value` line under node `id`'s `[tls]` section.
    pub fn tls_option(mut self, id: u64, line: &str) -> Self {
        self.tls_extra.entry(id).or_default().push(line.to_string());
        self
    }

    /// Makes node `id` a witness, in its own config and in its peers'.
    pub fn witness(mut self, id: u64) -> Self {
        self.witnesses.push(id);
        self.node_option(id, "witness = true")
    }

    pub fn node_option(mut self, id: u64, line: &str) -> Self {
        self.node_extra
            .entry(id)
            .or_default()
            .push(line.to_string());
        self
    }

    /// Raw TOML appended to node `id`'s config.
    pub fn extra_toml(mut self, id: u64, toml: &str) -> Self {
        let e = self.extra.entry(id).or_default();
        e.push_str(toml);
        e.push('\n');
        self
    }

    /// Writes node `id`'s config but does not start it.
    pub fn dont_start(mut self, id: u64) -> Self {
        self.not_started.insert(id);
        self
    }

    /// Node `id` is a new machine to be added with `clusterctl member add`:
    /// it gets certificates, a port, a directory and the sync sets like every
    /// node, but no other node lists it as a `[[peer]]` (it is not a founding
    /// member), `start` leaves it stopped (a test starts it with
    /// `Cluster::start_node`), and its own config says `join = true` and lists
    /// every other node, so it waits to be added instead of forming a cluster.
    pub fn joiner(mut self, id: u64) -> Self {
        self.joiners.insert(id);
        self.not_started.insert(id);
        self.node_option(id, "join = true")
    }

    /// An environment variable for every node process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// A directory sync set `name` on every node, rooted at
    /// `<node dir>/sets/<name>` (created empty), with `mode` (`mirror` or
    /// `append`). `extra_lines` are raw `key = value` lines added to the set's
    /// `[[sync]]` table (e.g. `exclude = ["*.lock"]`); `{node_dir}` in them
    /// becomes that node's directory, for per-node paths such as an
    /// `on_change` output file. `Cluster::set_path` finds the root again.
    pub fn sync_set(mut self, name: &str, mode: &str, extra_lines: &str) -> Self {
        self.sync_sets.push(SyncSpec {
            name: name.to_string(),
            file: None,
            mode: mode.to_string(),
            extra_lines: extra_lines.to_string(),
        });
        self
    }

    /// A single-file sync set `name` (like `/etc/aliases`) on every node, at
    /// `<node dir>/files/<file_name>`; the parent directory is created, the
    /// file is not. Otherwise as `sync_set`.
    pub fn sync_file(mut self, name: &str, file_name: &str, mode: &str, extra_lines: &str) -> Self {
        self.sync_sets.push(SyncSpec {
            name: name.to_string(),
            file: Some(file_name.to_string()),
            mode: mode.to_string(),
            extra_lines: extra_lines.to_string(),
        });
        self
    }

    pub fn start(self) -> Cluster {
        let dir = short_tempdir("clusterd-test-");
        let root = dir.path().to_path_buf();
        let ids: Vec<u64> = (1..=self.n).collect();

        let certs = root.join("certs");
        certs_init(&certs, &ids);
        let mut tls: BTreeMap<u64, TlsFiles> = ids
            .iter()
            .map(|&i| (i, TlsFiles::in_dir(&certs, i)))
            .collect();
        if !self.foreign_ca.is_empty() {
            let foreign = root.join("foreign-ca");
            certs_init(&foreign, &self.foreign_ca);
            for &i in &self.foreign_ca {
                tls.insert(i, TlsFiles::in_dir(&foreign, i));
            }
        }
        for (i, t) in self.tls_override {
            tls.insert(i, t);
        }

        let listen: BTreeMap<u64, SocketAddr> = ids
            .iter()
            .map(|&i| (i, SocketAddr::from(([127, 0, 0, 1], free_port()))))
            .collect();
        let mut proxies = Proxies::new();
        let mut peer_addr: BTreeMap<(u64, u64), SocketAddr> = BTreeMap::new();
        for &i in &ids {
            for &j in &ids {
                if i != j {
                    let addr = if self.direct {
                        listen[&j]
                    } else {
                        proxies.add_link(i, j, listen[&j])
                    };
                    peer_addr.insert((i, j), addr);
                }
            }
        }

        let mut nodes = Vec::new();
        for &i in &ids {
            let ndir = root.join(format!("n{i}"));
            let data_dir = ndir.join("data");
            fs::create_dir_all(&data_dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", data_dir.display()));
            let cfg = NodeConfig {
                id: i,
                listen: listen[&i].to_string(),
                data_dir: data_dir.clone(),
                admin_socket: ndir.join("admin.sock"),
                timers: self.timers,
                tls: tls[&i].clone(),
                peers: ids
                    .iter()
                    .filter(|&&j| {
                        j != i && (self.joiners.contains(&i) || !self.joiners.contains(&j))
                    })
                    .map(|&j| (j, peer_addr[&(i, j)].to_string()))
                    .collect(),
                witness_peers: self.witnesses.clone(),
                node_extra: self.node_extra.get(&i).cloned().unwrap_or_default(),
                tls_extra: self.tls_extra.get(&i).cloned().unwrap_or_default(),
                extra: {
                    // `{node_dir}` lets one snippet name each node's own files.
                    let mut extra = self
                        .extra
                        .get(&i)
                        .cloned()
                        .unwrap_or_default()
                        .replace("{node_dir}", path_str(&ndir));
                    for set in &self.sync_sets {
                        extra.push_str(&set.render(&ndir));
                    }
                    extra
                },
            };
            let config_path = ndir.join("config.toml");
            cfg.write(&config_path);
            nodes.push(Node {
                id: i,
                dir: ndir.clone(),
                config_path,
                data_dir,
                admin_socket: cfg.admin_socket.clone(),
                log_path: ndir.join("node.log"),
                listen: listen[&i],
                config: Mutex::new(cfg),
                child: Mutex::new(None),
                starts: Mutex::new(0),
            });
        }

        let cluster = Cluster {
            nodes,
            proxies,
            env: self.env,
            wrap: self.wrap,
            dir: Some(dir),
        };
        for &i in &ids {
            if !self.not_started.contains(&i) {
                cluster.start_node(i);
            }
        }
        cluster
    }
}

/// A cluster of `clusterd` processes on loopback, every peer link behind a
/// proxy of ours. Node ids are `1..=n`. Everything is torn down on drop.
pub struct Cluster {
    nodes: Vec<Node>,
    proxies: Proxies,
    env: Vec<(String, String)>,
    /// `ClusterBuilder::wrap`.
    wrap: Vec<String>,
    // Last: removed after the processes are dead.
    dir: Option<tempfile::TempDir>,
}

impl Cluster {
    /// `n` nodes with `[raft] heartbeat_ms = 100, election_timeout_ms = 1000`.
    pub fn start(n: u64) -> Cluster {
        ClusterBuilder::new(n).start()
    }

    pub fn builder(n: u64) -> ClusterBuilder {
        ClusterBuilder::new(n)
    }

    /// The cluster's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("temp dir").path()
    }

    /// Every node id, `1..=n`.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Every id but `except`.
    pub fn others(&self, except: &[u64]) -> Vec<u64> {
        self.ids()
            .into_iter()
            .filter(|i| !except.contains(i))
            .collect()
    }

    #[track_caller]
    pub fn node(&self, id: u64) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id} in this cluster"))
    }

    pub fn proxies(&self) -> &Proxies {
        &self.proxies
    }

    // -- processes ----------------------------------------------------------

    /// Starts node `id` (same config and data dir as before). Panics if it
    /// is already running.
    #[track_caller]
    pub fn start_node(&self, id: u64) {
        let node = self.node(id);
        let mut child = node.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = child.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                panic!("node {id} is already running");
            }
        }
        let mut starts = node.starts.lock().unwrap_or_else(|e| e.into_inner());
        *starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", node.log_path.display()));
        let _ = writeln!(
            log,
            "=== harness: start #{} of node {id} (listen {}) ===",
            *starts, node.listen
        );
        let log_err = log.try_clone().expect("clone log file handle");

        // A profiler in front of the node (CLUSTER_TESTS_WRAP="heaptrack -o
        // /tmp/ht"): the figures of a benchmark then include its overhead.
        let wrap = match self.wrap.is_empty() {
            true => std::env::var("CLUSTER_TESTS_WRAP").unwrap_or_default(),
            false => String::new(),
        };
        let mut wrap = self
            .wrap
            .iter()
            .map(String::as_str)
            .chain(wrap.split_whitespace());
        let mut cmd = match wrap.next() {
            Some(profiler) => {
                let mut c = Command::new(profiler);
                c.args(wrap).arg(CLUSTERD);
                c
            }
            None => Command::new(CLUSTERD),
        };
        scrub_env(&mut cmd);
        let rust_log = std::env::var("CLUSTER_TESTS_RUST_LOG")
            .unwrap_or_else(|_| "info,clusterd=debug".to_string());
        cmd.arg("--config")
            .arg(&node.config_path)
            .current_dir(&node.dir)
            .env("RUST_LOG", rust_log)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                Ok(())
            });
        }
        let c = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CLUSTERD} for node {id}: {e}"));
        *child = Some(c);
    }

    /// Node `id`'s own listen address (never a proxy's): what a test passes
    /// to `clusterctl member add --addr`, which every member then dials alike
    /// (so membership tests use `ClusterBuilder::direct_links`).
    pub fn listen_addr(&self, id: u64) -> String {
        self.node(id).listen.to_string()
    }

    /// The process id of node `id` while it runs (for /proc measurements).
    pub fn pid(&self, id: u64) -> Option<u32> {
        let mut child = self
            .node(id)
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let c = child.as_mut()?;
        matches!(c.try_wait(), Ok(None)).then(|| c.id())
    }

    /// The root of sync set `name` on node `id`, as its config file says
    /// (sets from `ClusterBuilder::sync_set`/`sync_file` or raw `extra_toml`).
    #[track_caller]
    pub fn set_path(&self, id: u64, name: &str) -> PathBuf {
        let text = self.node(id).config().render();
        let cfg: toml::Table = toml::from_str(&text)
            .unwrap_or_else(|e| panic!("node {id}'s config is not TOML ({e}):\n{text}"));
        cfg.get("sync")
            .and_then(|s| s.as_array())
            .and_then(|sets| {
                sets.iter()
                    .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(name))
            })
            .and_then(|s| s.get("path")?.as_str())
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("node {id} has no [[sync]] set named {name:?}:\n{text}"))
    }

    /// SIGKILLs node `id` and reaps it. Returns its exit status, or `None`
    /// if it was not started.
    pub fn kill(&self, id: u64) -> Option<ExitStatus> {
        let node = self.node(id);
        let mut child = node.child.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = child.take()?;
        if matches!(c.try_wait(), Ok(None)) {
            // Not reaped yet, so the pid is still this child's.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGKILL);
            }
        }
        let st = c.wait().ok();
        drop(child);
        if let Ok(mut log) = OpenOptions::new().append(true).open(&node.log_path) {
            let _ = writeln!(log, "=== harness: node {id} killed ({st:?}) ===");
        }
        st
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to node `id` if it is running.
    pub fn signal(&self, id: u64, signal: libc::c_int) {
        let node = self.node(id);
        let child = node.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = child.as_ref() {
            unsafe {
                libc::kill(c.id() as libc::pid_t, signal);
            }
        }
    }

    /// SIGTERMs node `id` and waits up to `timeout` for it to exit (then
    /// SIGKILLs it). Returns the exit status.
    pub fn terminate(&self, id: u64, timeout: Duration) -> Option<ExitStatus> {
        let node = self.node(id);
        let mut child = node.child.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = child.take()?;
        if matches!(c.try_wait(), Ok(None)) {
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let start = Instant::now();
            while matches!(c.try_wait(), Ok(None)) && start.elapsed() < timeout {
                thread::sleep(Duration::from_millis(10));
            }
            if matches!(c.try_wait(), Ok(None)) {
                unsafe {
                    libc::kill(c.id() as libc::pid_t, libc::SIGKILL);
                }
            }
        }
        c.wait().ok()
    }

    /// SIGKILL then start again, same config and data dir.
    #[track_caller]
    pub fn restart(&self, id: u64) {
        self.kill(id);
        self.start_node(id);
    }

    /// True if node `id` was started by us and has not exited.
    pub fn is_running(&self, id: u64) -> bool {
        let mut child = self
            .node(id)
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `Some(status)` if node `id` was started and has exited on its own.
    pub fn exited(&self, id: u64) -> Option<ExitStatus> {
        let mut child = self
            .node(id)
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Panics (with its log tail) if node `id` was started and died on its own.
    #[track_caller]
    pub fn assert_alive(&self, id: u64) {
        if let Some(st) = self.exited(id) {
            panic!(
                "node {id} exited unexpectedly ({st:?}); its log ends with:\n{}",
                self.log_tail(id, 60)
            );
        }
    }

    /// Rewrites node `id`'s config file (takes effect at its next start).
    pub fn rewrite_config(&self, id: u64, f: impl FnOnce(&mut NodeConfig)) {
        let node = self.node(id);
        let mut cfg = node.config.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut cfg);
        cfg.write(&node.config_path);
    }

    /// Everything node `id` has logged so far (all of its runs).
    pub fn log(&self, id: u64) -> String {
        fs::read(&self.node(id).log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        tail_file(&self.node(id).log_path, lines)
    }

    // -- network ------------------------------------------------------------

    /// Cuts link `from -> to` (the connections `from` opens to `to`).
    pub fn cut(&self, from: u64, to: u64) {
        self.proxies.cut(from, to);
    }

    /// Cuts both directions between `a` and `b`.
    pub fn cut_both(&self, a: u64, b: u64) {
        self.proxies.cut(a, b);
        self.proxies.cut(b, a);
    }

    pub fn heal(&self, from: u64, to: u64) {
        self.proxies.heal(from, to);
    }

    /// Cuts every link to and from `id`.
    pub fn isolate(&self, id: u64) {
        self.proxies.isolate(id);
    }

    /// Heals every link and removes every delay.
    pub fn heal_all(&self) {
        self.proxies.heal_all();
    }

    pub fn partition(&self, groups: &[&[u64]]) {
        self.proxies.partition(groups);
    }

    /// Delays every chunk on link `from -> to` by `ms`, both byte directions.
    pub fn delay(&self, from: u64, to: u64, ms: u64) {
        self.proxies.delay(from, to, ms);
    }

    /// Every peer link as a WAN link: `rtt_ms` round trip (half of it each
    /// way) and, unless 0, `bytes_per_sec` each way.
    pub fn wan(&self, rtt_ms: u64, bytes_per_sec: u64) {
        for (from, to) in self.proxies.links() {
            self.proxies.delay(from, to, rtt_ms / 2);
            self.proxies.limit(from, to, bytes_per_sec);
        }
    }

    // -- clusterctl -----------------------------------------------------------

    /// `clusterctl --socket <node id's admin socket> <args...>`.
    pub fn ctl(&self, id: u64, args: &[&str], timeout: Duration) -> CmdOutput {
        let mut cmd = Command::new(CLUSTERCTL);
        scrub_env(&mut cmd);
        cmd.arg("--socket")
            .arg(&self.node(id).admin_socket)
            .args(args);
        run_cmd(cmd, timeout)
    }

    /// Node `id`'s `status --json`, or why there is none.
    pub fn status_result(&self, id: u64, timeout: Duration) -> Result<Value, String> {
        if !self.is_running(id) {
            return Err(format!("node {id} is not running"));
        }
        let out = self.ctl(id, &["status", "--json"], timeout);
        if !out.success() {
            return Err(format!("node {id}: clusterctl status --json: {out}"));
        }
        serde_json::from_str(out.stdout.trim())
            .map_err(|e| format!("node {id}: status --json is not one JSON object ({e}): {out}"))
    }

    /// Node `id`'s `status --json` (None if not running / no answer in time).
    pub fn status(&self, id: u64) -> Option<Value> {
        self.status_result(id, STATUS_TIMEOUT).ok()
    }

    /// Node `id`'s own view, or why there is none.
    pub fn view(&self, id: u64) -> Result<View, String> {
        self.view_with_timeout(id, STATUS_TIMEOUT)
    }

    /// Node `id`'s view, retried for a few seconds (a loaded machine may
    /// miss one status deadline); panics if it never answers.
    #[track_caller]
    pub fn view_now(&self, id: u64) -> View {
        wait_until(
            Duration::from_secs(10),
            &format!("node {id} to answer status"),
            || {
                self.assert_alive(id);
                self.view(id)
            },
        )
    }

    pub fn view_with_timeout(&self, id: u64, timeout: Duration) -> Result<View, String> {
        let v = self.status_result(id, timeout)?;
        View::parse(id, &v)
    }

    /// `clusterctl promote <target>` through node `via`'s socket.
    pub fn promote(&self, via: u64, target: u64) -> CmdOutput {
        self.promote_with_timeout(via, target, PROMOTE_TIMEOUT_MS)
    }

    pub fn promote_with_timeout(&self, via: u64, target: u64, timeout_ms: u64) -> CmdOutput {
        let t = target.to_string();
        let ms = timeout_ms.to_string();
        self.ctl(
            via,
            &["promote", &t, "--timeout-ms", &ms],
            Duration::from_millis(timeout_ms) + scaled(Duration::from_secs(10)),
        )
    }

    /// `clusterctl barrier` through node `id`'s socket (one attempt).
    pub fn barrier(&self, id: u64) -> CmdOutput {
        self.barrier_with_timeout(id, BARRIER_TIMEOUT_MS)
    }

    pub fn barrier_with_timeout(&self, id: u64, timeout_ms: u64) -> CmdOutput {
        let ms = timeout_ms.to_string();
        self.ctl(
            id,
            &["barrier", "--timeout-ms", &ms],
            Duration::from_millis(timeout_ms) + scaled(Duration::from_secs(5)),
        )
    }

    /// Retries `barrier` through node `id` until one succeeds.
    #[track_caller]
    pub fn wait_barrier(&self, id: u64) {
        wait_until(
            BARRIER_DEADLINE,
            &format!("a barrier through node {id} to succeed"),
            || {
                self.assert_alive(id);
                let out = self.barrier(id);
                if out.success() {
                    Ok(())
                } else {
                    Err(format!("barrier via node {id}: {out}"))
                }
            },
        )
    }

    // -- agreement ------------------------------------------------------------

    /// One observation of the nodes in `among`: Ok(leader) if every one of
    /// them answers, all report the same leader L in `among` and the same
    /// term, L reports itself `leader`, and no other reports itself `leader`.
    pub fn leader_agreement(&self, among: &[u64]) -> Result<u64, String> {
        self.leader_agreement_views(among).map(|(l, _)| l)
    }

    /// `leader_agreement`, also returning the views it was decided on
    /// (in the order of `among`).
    pub fn leader_agreement_views(&self, among: &[u64]) -> Result<(u64, Vec<View>), String> {
        assert!(!among.is_empty(), "leader_agreement of no nodes");
        let mut views = Vec::new();
        for &i in among {
            self.assert_alive(i);
            views.push(self.view(i)?);
        }
        let summary = || {
            views
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(" | ")
        };
        let Some(l) = views[0].leader else {
            return Err(format!("no leader yet: {}", summary()));
        };
        if views.iter().any(|v| v.leader != Some(l)) {
            return Err(format!("views differ: {}", summary()));
        }
        if !among.contains(&l) {
            return Err(format!("leader {l} is not among {among:?}: {}", summary()));
        }
        let lv = views.iter().find(|v| v.id == l).expect("leader is among");
        if !lv.is_leader() {
            return Err(format!(
                "node {l} does not report itself leader: {}",
                summary()
            ));
        }
        if views.iter().any(|v| v.id != l && v.is_leader()) {
            return Err(format!(
                "more than one node reports itself leader: {}",
                summary()
            ));
        }
        if views.iter().any(|v| v.term != lv.term) {
            return Err(format!("terms differ: {}", summary()));
        }
        Ok((l, views))
    }

    /// Waits until the nodes in `among` agree on a leader among them (see
    /// `leader_agreement`) and returns it.
    #[track_caller]
    pub fn wait_for_leader(&self, among: &[u64]) -> u64 {
        wait_until(
            ELECTION_DEADLINE,
            &format!("nodes {among:?} to agree on a leader among them"),
            || self.leader_agreement(among),
        )
    }

    /// Waits until the nodes in `among` agree that `leader` leads.
    #[track_caller]
    pub fn wait_for_leader_is(&self, among: &[u64], leader: u64) {
        wait_until(
            ELECTION_DEADLINE,
            &format!("nodes {among:?} to agree that node {leader} leads"),
            || match self.leader_agreement(among) {
                Ok(l) if l == leader => Ok(()),
                Ok(l) => Err(format!("they agree on node {l}")),
                Err(e) => Err(e),
            },
        )
    }

    /// The views of every running node, for diagnostics.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let line = if self.is_running(n.id) {
                match self.view_with_timeout(n.id, Duration::from_secs(1)) {
                    Ok(v) => v.to_string(),
                    Err(e) => e,
                }
            } else {
                format!("n{}: not running", n.id)
            };
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut statuses = Vec::new();
        for n in &self.nodes {
            // Reap even nodes that died on their own.
            let mut child = n.child.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(mut c) = child.take() {
                let exited = c.try_wait().ok().flatten();
                if exited.is_none() {
                    unsafe {
                        libc::kill(c.id() as libc::pid_t, libc::SIGKILL);
                    }
                }
                let _ = c.wait();
                statuses.push((n.id, exited));
            }
        }
        let keep = std::env::var("CLUSTER_TESTS_KEEP").is_ok_and(|v| !v.is_empty() && v != "0");
        if thread::panicking() {
            let lines = std::env::var("CLUSTER_TESTS_LOG_LINES")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(80usize);
            let mut out = String::new();
            let _ = writeln!(
                out,
                "\n======== cluster in {} failed{} ========",
                self.dir().display(),
                if keep {
                    " (kept)"
                } else {
                    " (set CLUSTER_TESTS_KEEP=1 to keep it)"
                }
            );
            for (id, exited) in &statuses {
                if let Some(st) = exited {
                    let _ = writeln!(out, "node {id} had exited on its own: {st:?}");
                }
            }
            let _ = write!(out, "{}", self.proxies.describe());
            for n in &self.nodes {
                let _ = writeln!(
                    out,
                    "-------- node {} log ({}), last {lines} lines --------",
                    n.id,
                    n.log_path.display()
                );
                let _ = writeln!(out, "{}", tail_file(&n.log_path, lines));
            }
            let _ = writeln!(out, "======== end of cluster logs ========");
            eprint!("{out}");
        }
        if keep {
            if let Some(d) = self.dir.take() {
                let p = d.keep();
                eprintln!("cluster directory kept: {}", p.display());
            }
        }
        // Then the proxies (their runtime) and the temp dir drop.
    }
}

/// A throwaway helper for tests that need files without a cluster.
pub fn write_file(path: &Path, contents: &str) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------
// Helpers shared by several test files
// ---------------------------------------------------------------------------

/// Samples node `id`'s view until `window` has passed and at least
/// `min_samples` views were seen, calling `check` on each one (which panics
/// on a violation). Returns the number of views seen.
#[track_caller]
pub fn observe_window(
    c: &Cluster,
    id: u64,
    window: Duration,
    min_samples: usize,
    mut check: impl FnMut(&View),
) -> usize {
    let started = Instant::now();
    let mut seen = 0usize;
    let mut last = String::from("(no answer yet)");
    wait_until(
        window + Duration::from_secs(30),
        &format!("{min_samples} status samples of node {id} over {window:?}"),
        || {
            c.assert_alive(id);
            match c.view(id) {
                Ok(v) => {
                    check(&v);
                    last = v.to_string();
                    seen += 1;
                }
                Err(e) => last = e,
            }
            if started.elapsed() >= window && seen >= min_samples {
                Ok(seen)
            } else {
                Err(format!("{seen} samples so far; last: {last}"))
            }
        },
    )
}

/// This checkout's root, read at run time: a test binary reused from another
/// clone of the repository (a shared target dir) must read this checkout's files.
pub fn repo_root() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}

/// TLS material loaded straight from certificate files, as an impostor holding them would.
pub fn tls_from(files: &TlsFiles, id: u64) -> clusterd::net::tls::PeerTls {
    let paths = clusterd::core::config::TlsPaths {
        ca: files.ca.clone(),
        cert: files.cert.clone(),
        key: files.key.clone(),
    };
    clusterd::net::tls::PeerTls::load(&paths, id).unwrap()
}

/// A peer client that dials `addr` (a node's own listen address, bypassing the
/// proxies) as node 1 is dialled by its peers. Call it inside a tokio runtime.
pub fn direct_client(
    addr: &str,
    tls: clusterd::net::tls::PeerTls,
) -> clusterd::net::proto::peer::peer_client::PeerClient<tonic::transport::Channel> {
    let target = clusterd::core::config::PeerConfig {
        id: 1,
        addr: addr.to_string(),
        witness: false,
    };
    let live = clusterd::net::tls::LiveTls::new(tls, Default::default());
    clusterd::net::proto::peer::peer_client::PeerClient::new(
        clusterd::net::transport::peer_channel(&target, live),
    )
}
