//! The node's configuration: a TOML file plus `CLUSTERD_<SECTION>__<KEY>`
//! environment overrides, parsed into [`RawConfig`] and validated into a typed
//! [`Config`].
//!
//! Invariant owned here: a [`Config`] only exists if every key was valid, so the
//! rest of the daemon never re-checks configuration. Validation collects every
//! problem rather than stopping at the first, and each problem is one sentence
//! naming the file and the key.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where `clusterctl` finds the admin socket when it is given neither `--socket` nor `--config`.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/clusterd/admin.sock";
/// Default Raft heartbeat interval. Every heartbeat is a message to each
/// follower and an answer back, which is most of what an idle node costs:
/// 200 ms keeps that cost at half of etcd's 100 ms, while failover time is
/// set by the election timeout, which is measured in ticks of half a
/// heartbeat interval ([`RaftTimers::tick`]) and so is not coarsened.
pub const DEFAULT_HEARTBEAT_MS: u64 = 200;
/// Ticks of the Raft clock per heartbeat interval.
pub const TICKS_PER_HEARTBEAT: u32 = 2;
/// Default (minimum) election timeout; the effective one is randomized above it.
pub const DEFAULT_ELECTION_TIMEOUT_MS: u64 = 1000;

/// A node id: unique, stable and greater than zero (raft-rs reserves 0 for "none").
pub type NodeId = u64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not valid TOML / has keys of the wrong type.
    #[error("{file}: {reason}")]
    Load { file: PathBuf, reason: String },
    /// The file parsed, but some values are unusable; one sentence per problem.
    #[error("{}", Problems(.problems))]
    Invalid { problems: Vec<String> },
}

struct Problems<'a>(&'a [String]);
impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// The configuration as written by the user, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub node: Option<RawNode>,
    #[serde(default)]
    pub peer: Vec<RawPeer>,
    pub tls: Option<RawTls>,
    #[serde(default)]
    pub raft: RawRaft,
    #[serde(default)]
    pub sync: Vec<RawSync>,
    #[serde(default)]
    pub hooks: RawHooks,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub replication: RawReplication,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub history: RawHistory,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHistory {
    pub keep_days: Option<i64>,
    /// Bytes, or a size such as "1GiB" or "500MB"; read as text since
    /// either may be given.
    pub keep_bytes: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReplication {
    pub debounce_ms: Option<i64>,
    pub rescan_secs: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub id: Option<i64>,
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub admin_socket: Option<PathBuf>,
    #[serde(default)]
    pub witness: bool,
    #[serde(default)]
    pub allow_two_node: bool,
    #[serde(default)]
    pub join: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub id: Option<i64>,
    pub addr: Option<String>,
    #[serde(default)]
    pub witness: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub revoked_serials: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRaft {
    pub heartbeat_ms: Option<i64>,
    pub election_timeout_ms: Option<i64>,
    pub compact_after: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSync {
    pub name: Option<String>,
    pub path: Option<PathBuf>,
    pub mode: Option<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub skip_while: Vec<String>,
    pub on_change: Option<String>,
    /// "dir", "file" or absent (decided by what the path is).
    pub kind: Option<String>,
    pub max_file_size: Option<i64>,
    /// Replicate extended attributes and POSIX ACLs (default false). Read
    /// as text and checked here: the config crate would turn any number or
    /// word into a boolean without a word.
    pub xattrs: Option<String>,
    /// Keep hard links between names of the set (default false); read as
    /// text for the same reason as `xattrs`.
    pub hard_links: Option<String>,
    /// A command that checks the set as it would be after a change.
    pub validate: Option<String>,
    pub validate_timeout_ms: Option<i64>,
    /// "report" (default) or "revert".
    pub on_change_failure: Option<String>,
    /// Keep every committed version (default: true for mirror sets, false
    /// for append sets); read as text for the same reason as `xattrs`.
    pub history: Option<String>,
    /// `kind = "accounts"`: the user ids replicated, `"FIRST-LAST"`.
    pub uid_range: Option<String>,
    /// `kind = "accounts"`: the group ids replicated, `"FIRST-LAST"`.
    pub gid_range: Option<String>,
    /// `kind = "accounts"`: user and group names replicated whatever their id.
    pub include: Option<Vec<String>>,
    /// `kind = "accounts"`: a change removing more users is held until
    /// `clusterctl sync SET --confirm`.
    pub max_removed: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHooks {
    pub on_promote: Option<String>,
    pub on_demote: Option<String>,
    pub role_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, named in later error messages.
    pub source: PathBuf,
    pub node: NodeConfig,
    /// Every other member of the cluster (the node's own entry, if listed, is dropped).
    pub peers: Vec<PeerConfig>,
    pub raft: RaftTimers,
    /// Applied entries kept in the Raft log before it is compacted into a
    /// snapshot (followers further behind catch up by snapshot).
    pub compact_after: u64,
    pub tls: TlsPaths,
    pub sync: Vec<SyncSetConfig>,
    pub replication: ReplicationConfig,
    pub history: HistoryConfig,
    pub hooks: HooksConfig,
    /// Default log filter when RUST_LOG is not set (e.g. "info").
    pub log_level: String,
    /// Where the Prometheus endpoint listens; off when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the remote admin service listens (mutual TLS, admin
    /// certificates for changes); off when unset: the local socket only.
    pub admin_listen: Option<SocketAddr>,
    /// Certificate serials (normalized hex) refused on every peer link, for
    /// certificates that were stolen or replaced.
    pub revoked_serials: BTreeSet<String>,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Peer gRPC listen address (mutual TLS).
    pub listen: SocketAddr,
    /// Raft log, node state and quarantine live here.
    pub data_dir: PathBuf,
    /// Unix socket of the admin service, used by `clusterctl`.
    pub admin_socket: PathBuf,
    /// A witness votes and keeps the log but holds no sync sets and never leads.
    pub witness: bool,
    /// The user accepted a two-voter cluster, which cannot fail over.
    pub allow_two_node: bool,
    /// A new node waits to be added by `clusterctl member add` instead of
    /// forming a cluster with its `[[peer]]` list (which then only gives
    /// the addresses of the members to expect).
    pub join: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub id: NodeId,
    /// `host:port`, resolved at connect time; may be a NAT or proxy address,
    /// since the peer's identity comes from its certificate.
    pub addr: String,
    pub witness: bool,
}

/// Raft timers. The Raft clock ticks [`TICKS_PER_HEARTBEAT`] times per
/// heartbeat interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTimers {
    /// How often the leader tells each follower it is alive.
    pub heartbeat: Duration,
    /// How long a follower waits without a heartbeat before it stands for
    /// election (the minimum; raft-rs randomizes it upwards).
    pub election_timeout: Duration,
}

impl RaftTimers {
    /// One tick of the Raft clock: a fraction of the heartbeat interval, so
    /// the randomized election timeout keeps a fine grain however rare
    /// heartbeats are.
    pub fn tick(&self) -> Duration {
        (self.heartbeat / TICKS_PER_HEARTBEAT).max(Duration::from_millis(1))
    }

    /// Election timeout in ticks (raft-rs randomizes it upwards from here).
    pub fn election_ticks(&self) -> usize {
        (self.election_timeout.as_millis() / self.tick().as_millis().max(1)) as usize
    }
}

impl Default for RaftTimers {
    fn default() -> Self {
        RaftTimers {
            heartbeat: Duration::from_millis(DEFAULT_HEARTBEAT_MS),
            election_timeout: Duration::from_millis(DEFAULT_ELECTION_TIMEOUT_MS),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Exact copy, deletions included.
    Mirror,
    /// Log files: only appended bytes travel.
    Append,
}

#[derive(Debug, Clone)]
pub struct SyncSetConfig {
    pub name: String,
    pub path: PathBuf,
    pub mode: SyncMode,
    pub exclude: Vec<String>,
    pub skip_while: Vec<String>,
    pub on_change: Option<String>,
    /// The path is one file (e.g. /etc/aliases), not a directory.
    pub single_file: bool,
    /// Larger files are refused (with a logged reason), never half-sent:
    /// each version is held in memory while it is planned and applied.
    pub max_file_size: u64,
    /// Keep extended attributes of files and directories: every `user.*`
    /// name and the POSIX ACLs (`system.posix_acl_access`/`_default`); see
    /// [`crate::core::manifest::is_replicated_xattr`] for what is left alone.
    pub xattrs: bool,
    /// Names of the set that share an inode on the leader share one on
    /// every follower (`hard_links = true`); links across sets or to files
    /// outside the set are not kept.
    pub hard_links: bool,
    /// The shell command that checks a staged copy of the set as it would
    /// be after a change (`{}` is its path) before the change is proposed:
    /// a broken config must not reach every node at once.
    pub validate: Option<String>,
    /// How long the validator may run before its process group is killed
    /// and the change counts as invalid.
    pub validate_timeout: Duration,
    /// What a follower does when `on_change` fails after a change.
    pub on_change_failure: OnChangeFailure,
    /// Every committed version of the set's files is kept under
    /// `data_dir/history` (see [`HistoryConfig`]), so a bad change that
    /// replicated can be found, diffed and rolled back.
    pub history: bool,
    /// `kind = "accounts"`: `path` is the directory of `passwd`, `shadow`,
    /// `group` and `gshadow`, replicated as records (which ones: this
    /// policy), never as bytes; system accounts differ between hosts.
    pub accounts: Option<crate::core::accounts::Policy>,
}

/// `[history]`: how long committed versions are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Revisions older than this are dropped (the version each path had
    /// then stays, as the state the oldest kept revision starts from).
    pub keep: Duration,
    /// The most the kept versions may take on disk; the oldest revisions
    /// go first when they take more.
    pub keep_bytes: u64,
}

/// Default `history.keep_days`.
pub const DEFAULT_HISTORY_DAYS: u64 = 30;
/// Default `history.keep_bytes`: 1 GiB.
pub const DEFAULT_HISTORY_BYTES: u64 = 1 << 30;

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            keep: Duration::from_secs(DEFAULT_HISTORY_DAYS * 86_400),
            keep_bytes: DEFAULT_HISTORY_BYTES,
        }
    }
}

/// `sync[].on_change_failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnChangeFailure {
    /// Log it and count it (`on_change_failures`); the change stays.
    #[default]
    Report,
    /// Put back the files the change touched, run `on_change` again and
    /// hold the set until its next committed change.
    Revert,
}

/// Default of `sync[].validate_timeout_ms`.
pub const DEFAULT_VALIDATE_TIMEOUT_MS: u64 = 10_000;
/// The most `validate_timeout_ms` may be: a set is held while its validator
/// runs, so a validator is a check, never a job.
pub const MAX_VALIDATE_TIMEOUT_MS: u64 = 600_000;

/// How the leader notices changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Quiet time after a file event before the change is read: editors
    /// write in several steps, and one read then covers them all.
    pub debounce: Duration,
    /// Full rescan period, catching anything the watcher missed (events
    /// dropped on queue overflow, changes while no leader was watching).
    pub rescan: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            debounce: Duration::from_millis(20),
            rescan: Duration::from_secs(300),
        }
    }
}

/// Default `sync[].max_file_size`: 4 GiB.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 4 << 30;

#[derive(Debug, Clone, Default)]
pub struct HooksConfig {
    pub on_promote: Option<String>,
    pub on_demote: Option<String>,
    pub role_file: Option<PathBuf>,
}

impl Config {
    /// Reads `file` and the `CLUSTERD_*` environment, then validates.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(file, vars)
    }

    /// Only `node.admin_socket` (for `clusterctl --config`): the rest of the
    /// file need not be valid for an administrator to reach the node.
    pub fn admin_socket_of(file: &Path) -> Result<PathBuf, ConfigError> {
        let raw = Self::load_raw(file, std::env::vars())?;
        Ok(raw
            .node
            .and_then(|n| n.admin_socket)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET)))
    }

    /// As [`Config::load`], with an explicit environment (tests must not mutate the process's).
    pub fn load_with_env(
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let raw = Self::load_raw(file, env)?;
        validate(raw, file)
    }

    fn load_raw(
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Load {
            file: file.to_path_buf(),
            reason: format!("cannot read the config file: {e}; pass the right path with --config"),
        })?;
        Self::parse_raw(&text, file, env)
    }

    /// Parses and validates config text as if read from `file` (what the
    /// config fuzz target drives: any text must give a config or errors,
    /// never a panic).
    pub fn parse(
        text: &str,
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        validate(Self::parse_raw(text, file, env)?, file)
    }

    fn parse_raw(
        text: &str,
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<RawConfig, ConfigError> {
        let load_err = |reason: String| ConfigError::Load {
            file: file.to_path_buf(),
            reason,
        };
        let env_map: config::Map<String, String> = env
            .into_iter()
            // Only CLUSTERD_<SECTION>__<KEY> is configuration: other CLUSTERD_*
            // variables (a wrapper script's, say) must not become unknown keys.
            .filter(|(k, _)| {
                k.strip_prefix("CLUSTERD_")
                    .is_some_and(|rest| rest.contains("__"))
            })
            .collect();
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("CLUSTERD")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env_map)),
            )
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| {
                load_err(format!(
                    "{e}; fix that key (see the README's configuration reference)"
                ))
            })?;
        Ok(raw)
    }
}

/// Turns a raw configuration into a typed one, or every problem found.
pub fn validate(raw: RawConfig, file: &Path) -> Result<Config, ConfigError> {
    let mut v = Validator {
        file: file.display().to_string(),
        problems: Vec::new(),
    };

    let node = match raw.node {
        Some(n) => v.node(n),
        None => {
            v.problem("section [node] is missing; add it with at least id, listen, data_dir");
            None
        }
    };
    let own_id = node.as_ref().map(|n| n.id);
    let peers = v.peers(raw.peer, own_id);
    let compact_after = match raw.raft.compact_after {
        None => 20_000,
        Some(n) if n >= 10 => n as u64,
        Some(n) => {
            v.problem(format!(
                "key `raft.compact_after` = {n} must be at least 10 entries"
            ));
            20_000
        }
    };
    let raft = v.raft(raw.raft);
    let revoked_serials =
        v.revoked_serials(raw.tls.as_ref().map_or(&[][..], |t| &t.revoked_serials[..]));
    let tls = v.tls(raw.tls);
    let sync = v.sync_sets(raw.sync, node.as_ref().is_some_and(|n| n.witness));
    let hooks = v.hooks(raw.hooks);
    let replication = v.replication(raw.replication);
    let history = v.history(raw.history);
    let log_level = raw.log.level.unwrap_or_else(|| "info".to_string());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_level) {
        v.problem(format!("key `log.level` = {log_level:?} is not a valid log filter ({e}); use e.g. \"info\" or \"info,clusterd=debug\""));
    }
    if let Some(n) = &node {
        v.quorum_shape(n, &peers);
    }
    let metrics_listen = v.listen_addr("metrics.listen", raw.metrics.listen, "127.0.0.1:9770");
    let admin_listen = v.listen_addr("admin.listen", raw.admin.listen, "0.0.0.0:7701");

    match (node, tls) {
        (Some(node), Some(tls)) if v.problems.is_empty() => Ok(Config {
            source: file.to_path_buf(),
            node,
            peers,
            raft,
            compact_after,
            tls,
            sync,
            replication,
            history,
            hooks,
            log_level,
            metrics_listen,
            admin_listen,
            revoked_serials,
        }),
        _ => Err(ConfigError::Invalid {
            problems: v.problems,
        }),
    }
}

struct Validator {
    file: String,
    problems: Vec<String>,
}

impl Validator {
    fn problem(&mut self, msg: impl fmt::Display) {
        self.problems.push(format!("{}: {msg}", self.file));
    }

    fn node_id(&mut self, key: &str, id: Option<i64>) -> Option<NodeId> {
        match id {
            None => {
                self.problem(format!(
                    "key `{key}` is missing; give every node a unique id greater than 0"
                ));
                None
            }
            Some(id) if id <= 0 => {
                self.problem(format!("key `{key}` = {id} must be greater than 0"));
                None
            }
            Some(id) => Some(id as u64),
        }
    }

    fn node(&mut self, n: RawNode) -> Option<NodeConfig> {
        let id = self.node_id("node.id", n.id);
        let listen = match n.listen.as_deref() {
            None => Some(SocketAddr::from(([0, 0, 0, 0], 7700))),
            Some(s) => match s.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.problem(format!("key `node.listen` = {s:?} is not an IP:port address; use e.g. \"0.0.0.0:7700\""));
                    None
                }
            },
        };
        let data_dir = n
            .data_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/clusterd"));
        if !data_dir.is_absolute() {
            self.problem(format!(
                "key `node.data_dir` = {:?} must be an absolute path",
                data_dir.display().to_string()
            ));
        }
        let admin_socket = n
            .admin_socket
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
        if !admin_socket.is_absolute() {
            self.problem(format!(
                "key `node.admin_socket` = {:?} must be an absolute path",
                admin_socket.display().to_string()
            ));
        }
        Some(NodeConfig {
            id: id?,
            listen: listen?,
            data_dir,
            admin_socket,
            witness: n.witness,
            allow_two_node: n.allow_two_node,
            join: n.join,
        })
    }

    fn peers(&mut self, raw: Vec<RawPeer>, own_id: Option<NodeId>) -> Vec<PeerConfig> {
        let mut seen = BTreeSet::new();
        let mut peers = Vec::new();
        for (i, p) in raw.into_iter().enumerate() {
            let key = format!("peer[{i}]");
            let Some(id) = self.node_id(&format!("{key}.id"), p.id) else {
                continue;
            };
            if !seen.insert(id) {
                self.problem(format!("key `{key}.id` = {id} is listed twice in [[peer]]; each peer id must be unique"));
                continue;
            }
            let addr = match p.addr {
                Some(a) if valid_host_port(&a) => a,
                Some(a) => {
                    self.problem(format!(
                        "key `{key}.addr` = {a:?} is not host:port; use e.g. \"10.9.9.223:7700\""
                    ));
                    continue;
                }
                None => {
                    self.problem(format!(
                        "key `{key}.addr` is missing; give the address where peer {id} listens"
                    ));
                    continue;
                }
            };
            if Some(id) == own_id {
                // The node's own entry may be listed so every node can share one peer list.
                continue;
            }
            peers.push(PeerConfig {
                id,
                addr,
                witness: p.witness,
            });
        }
        peers
    }

    fn raft(&mut self, r: RawRaft) -> RaftTimers {
        let mut t = RaftTimers::default();
        if let Some(ms) = r.heartbeat_ms {
            if !(10..=10_000).contains(&ms) {
                self.problem(format!(
                    "key `raft.heartbeat_ms` = {ms} must be between 10 and 10000"
                ));
            } else {
                t.heartbeat = Duration::from_millis(ms as u64);
            }
        }
        if let Some(ms) = r.election_timeout_ms {
            if !(50..=60_000).contains(&ms) {
                self.problem(format!(
                    "key `raft.election_timeout_ms` = {ms} must be between 50 and 60000"
                ));
            } else {
                t.election_timeout = Duration::from_millis(ms as u64);
            }
        }
        if t.election_timeout < t.heartbeat * 3 {
            self.problem(format!(
                "key `raft.election_timeout_ms` = {} must be at least 3 times `raft.heartbeat_ms` = {}, or one late heartbeat starts an election",
                t.election_timeout.as_millis(),
                t.heartbeat.as_millis()
            ));
        }
        t
    }

    fn tls(&mut self, t: Option<RawTls>) -> Option<TlsPaths> {
        let Some(t) = t else {
            self.problem("section [tls] is missing; set ca, cert and key (make them with `clusterctl certs init`)");
            return None;
        };
        let ca = self.readable_file("tls.ca", t.ca);
        let cert = self.readable_file("tls.cert", t.cert);
        let key = self.readable_file("tls.key", t.key);
        Some(TlsPaths {
            ca: ca?,
            cert: cert?,
            key: key?,
        })
    }

    fn revoked_serials(&mut self, raw: &[String]) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (i, s) in raw.iter().enumerate() {
            match crate::core::names::normalize_serial(s) {
                Some(n) => {
                    out.insert(n);
                }
                None => self.problem(format!(
                    "key `tls.revoked_serials[{i}]` = {s:?} is not a hexadecimal serial; copy it from `clusterctl certs show FILE`"
                )),
            }
        }
        out
    }

    fn readable_file(&mut self, key: &str, path: Option<PathBuf>) -> Option<PathBuf> {
        let Some(path) = path else {
            self.problem(format!(
                "key `{key}` is missing; make certificates with `clusterctl certs init`"
            ));
            return None;
        };
        match std::fs::File::open(&path) {
            Ok(_) => Some(path),
            Err(e) => {
                self.problem(format!("key `{key}`: cannot read {}: {e}", path.display()));
                None
            }
        }
    }

    fn sync_sets(&mut self, raw: Vec<RawSync>, witness: bool) -> Vec<SyncSetConfig> {
        let mut names = BTreeSet::new();
        let mut sets = Vec::new();
        if witness && !raw.is_empty() {
            self.problem("this node is a witness (`node.witness` = true) but has [[sync]] sets; a witness holds no files, so remove them");
        }
        for (i, s) in raw.into_iter().enumerate() {
            let key = format!("sync[{i}]");
            let Some(name) = s.name.clone().filter(|n| !n.is_empty()) else {
                self.problem(format!("key `{key}.name` is missing; name every sync set (the name identifies it across the cluster)"));
                continue;
            };
            if !names.insert(name.clone()) {
                self.problem(format!(
                    "key `{key}.name` = {name:?} is used by two sync sets; names must be unique"
                ));
            }
            let Some(path) = s.path.clone() else {
                self.problem(format!("key `{key}.path` is missing for sync set {name:?}"));
                continue;
            };
            if !path.is_absolute() {
                self.problem(format!(
                    "key `{key}.path` = {:?} of sync set {name:?} must be an absolute path",
                    path.display().to_string()
                ));
            }
            if let Err(e) = crate::core::paths::Filter::for_set(i, &s.exclude, &s.skip_while) {
                for bad in &e.problems {
                    self.problem(bad);
                }
            }
            let mode = match s.mode.as_deref() {
                None | Some("mirror") => SyncMode::Mirror,
                Some("append") => SyncMode::Append,
                Some(other) => {
                    self.problem(format!("key `{key}.mode` = {other:?} of sync set {name:?} must be \"mirror\" or \"append\""));
                    SyncMode::Mirror
                }
            };
            let accounts = self.accounts(&key, &name, &path, &s, mode);
            let single_file = match s.kind.as_deref() {
                Some("file") => true,
                Some("dir" | "accounts") => false,
                None => path.symlink_metadata().is_ok_and(|m| !m.is_dir()),
                Some(other) => {
                    self.problem(format!("key `{key}.kind` = {other:?} of sync set {name:?} must be \"dir\", \"file\" or \"accounts\""));
                    false
                }
            };
            if single_file
                && path
                    .parent()
                    .is_none_or(|p| p.as_os_str().is_empty() || !p.is_dir())
            {
                self.problem(format!("key `{key}.path` = {:?} of sync set {name:?} is a single file, but its directory does not exist; create it", path.display().to_string()));
            }
            let max_file_size = match s.max_file_size {
                None => DEFAULT_MAX_FILE_SIZE,
                Some(n) if n > 0 => n as u64,
                Some(n) => {
                    self.problem(format!("key `{key}.max_file_size` = {n} of sync set {name:?} must be a positive number of bytes"));
                    DEFAULT_MAX_FILE_SIZE
                }
            };
            let xattrs = match s.xattrs.as_deref() {
                None | Some("false") => false,
                Some("true") => true,
                Some(other) => {
                    self.problem(format!("key `{key}.xattrs` = {other:?} of sync set {name:?} must be true or false (true keeps user.* extended attributes and POSIX ACLs)"));
                    false
                }
            };
            let hard_links = match s.hard_links.as_deref() {
                None | Some("false") => false,
                Some("true") if mode == SyncMode::Append => {
                    self.problem(format!("key `{key}.hard_links` = true of sync set {name:?} cannot be used with mode = \"append\" (followers extend appended files in place, so linked names would grow together); use mode = \"mirror\" or drop hard_links"));
                    false
                }
                Some("true") => true,
                Some(other) => {
                    self.problem(format!("key `{key}.hard_links` = {other:?} of sync set {name:?} must be true or false (true keeps hard links between names of the set)"));
                    false
                }
            };
            let validate = s.validate.filter(|v| !v.trim().is_empty());
            if let Some(cmd) = &validate {
                if mode == SyncMode::Append {
                    self.problem(format!("key `{key}.validate` of sync set {name:?} cannot be used with mode = \"append\" (appended log lines are not checked as a whole); drop validate or use mode = \"mirror\""));
                }
                if let Err(why) = validator_program(cmd) {
                    self.problem(format!(
                        "key `{key}.validate` = {cmd:?} of sync set {name:?}: {why}"
                    ));
                }
            }
            let validate_timeout = match s.validate_timeout_ms {
                None => DEFAULT_VALIDATE_TIMEOUT_MS,
                Some(n) if n > 0 && n as u64 <= MAX_VALIDATE_TIMEOUT_MS => n as u64,
                Some(n) => {
                    self.problem(format!("key `{key}.validate_timeout_ms` = {n} of sync set {name:?} must be between 1 and {MAX_VALIDATE_TIMEOUT_MS} milliseconds"));
                    DEFAULT_VALIDATE_TIMEOUT_MS
                }
            };
            let on_change_failure = match s.on_change_failure.as_deref() {
                None | Some("report") => OnChangeFailure::Report,
                Some("revert") if s.on_change.is_none() => {
                    self.problem(format!("key `{key}.on_change_failure` = \"revert\" of sync set {name:?} needs an `on_change` command to judge the change by; add one or drop on_change_failure"));
                    OnChangeFailure::Report
                }
                Some("revert") if mode == SyncMode::Append => {
                    self.problem(format!("key `{key}.on_change_failure` = \"revert\" of sync set {name:?} cannot be used with mode = \"append\"; use \"report\""));
                    OnChangeFailure::Report
                }
                Some("revert") => OnChangeFailure::Revert,
                Some(other) => {
                    self.problem(format!("key `{key}.on_change_failure` = {other:?} of sync set {name:?} must be \"report\" or \"revert\""));
                    OnChangeFailure::Report
                }
            };
            let history = match s.history.as_deref() {
                None => mode == SyncMode::Mirror,
                Some("true") => true,
                Some("false") => false,
                Some(other) => {
                    self.problem(format!("key `{key}.history` = {other:?} of sync set {name:?} must be true or false (true keeps every committed version under data_dir/history)"));
                    mode == SyncMode::Mirror
                }
            };
            sets.push(SyncSetConfig {
                name,
                path,
                mode,
                exclude: s.exclude,
                skip_while: s.skip_while,
                on_change: s.on_change,
                single_file,
                max_file_size,
                xattrs,
                hard_links,
                validate,
                validate_timeout: Duration::from_millis(validate_timeout),
                on_change_failure,
                history,
                accounts,
            });
        }
        sets
    }

    /// The record policy of a `kind = "accounts"` set, and the keys that
    /// make no sense for one (or only for one) refused.
    fn accounts(
        &mut self,
        key: &str,
        name: &str,
        path: &Path,
        s: &RawSync,
        mode: SyncMode,
    ) -> Option<crate::core::accounts::Policy> {
        use crate::core::accounts::{valid_name, IdRange, Policy};
        if s.kind.as_deref() != Some("accounts") {
            for (k, set) in [
                ("uid_range", s.uid_range.is_some()),
                ("gid_range", s.gid_range.is_some()),
                ("include", s.include.is_some()),
                ("max_removed", s.max_removed.is_some()),
            ] {
                if set {
                    self.problem(format!("key `{key}.{k}` of sync set {name:?} applies only to kind = \"accounts\"; add that or drop the key"));
                }
            }
            return None;
        }
        let mut policy = Policy::default();
        let why_files =
            "an accounts set replicates records of passwd, shadow, group and gshadow, not files";
        if mode != SyncMode::Mirror {
            self.problem(format!("key `{key}.mode` of accounts set {name:?} must be \"mirror\" (or left out): {why_files}"));
        }
        for (k, set) in [
            ("exclude", !s.exclude.is_empty()),
            ("skip_while", !s.skip_while.is_empty()),
            ("xattrs", s.xattrs.as_deref() == Some("true")),
            ("hard_links", s.hard_links.as_deref() == Some("true")),
            (
                "on_change_failure",
                s.on_change_failure.as_deref() == Some("revert"),
            ),
        ] {
            if set {
                self.problem(format!("key `{key}.{k}` does not apply to accounts set {name:?} ({why_files}); drop it"));
            }
        }
        if path.is_absolute() && !path.join("passwd").is_file() {
            self.problem(format!("key `{key}.path` = {:?} of accounts set {name:?} holds no passwd file; point it at the directory of passwd, shadow, group and gshadow (normally \"/etc\")", path.display().to_string()));
        }
        for (k, raw, slot) in [
            ("uid_range", &s.uid_range, &mut policy.uid_range),
            ("gid_range", &s.gid_range, &mut policy.gid_range),
        ] {
            if let Some(r) = raw {
                match IdRange::parse(r) {
                    Ok(r) => *slot = r,
                    Err(why) => {
                        self.problem(format!("key `{key}.{k}` of accounts set {name:?}: {why}"))
                    }
                }
            }
        }
        for n in s.include.iter().flatten() {
            if valid_name(n) {
                policy.include.insert(n.clone());
            } else {
                self.problem(format!("key `{key}.include` of accounts set {name:?}: {n:?} is not a user or group name"));
            }
        }
        match s.max_removed {
            None => {}
            Some(n) if (0..=i64::from(u32::MAX)).contains(&n) => policy.max_removed = n as u32,
            Some(n) => self.problem(format!(
                "key `{key}.max_removed` = {n} of accounts set {name:?} must be 0 or more"
            )),
        }
        Some(policy)
    }

    fn replication(&mut self, r: RawReplication) -> ReplicationConfig {
        let mut out = ReplicationConfig::default();
        match r.debounce_ms {
            None => {}
            Some(ms) if (1..=60_000).contains(&ms) => {
                out.debounce = Duration::from_millis(ms as u64)
            }
            Some(ms) => self.problem(format!(
                "key `replication.debounce_ms` = {ms} must be between 1 and 60000"
            )),
        }
        match r.rescan_secs {
            None => {}
            Some(s) if (1..=86_400).contains(&s) => out.rescan = Duration::from_secs(s as u64),
            Some(s) => self.problem(format!(
                "key `replication.rescan_secs` = {s} must be between 1 and 86400"
            )),
        }
        out
    }

    fn history(&mut self, h: RawHistory) -> HistoryConfig {
        let mut out = HistoryConfig::default();
        match h.keep_days {
            None => {}
            Some(d) if (1..=36_500).contains(&d) => {
                out.keep = Duration::from_secs(d as u64 * 86_400)
            }
            Some(d) => self.problem(format!(
                "key `history.keep_days` = {d} must be between 1 and 36500 days"
            )),
        }
        if let Some(text) = h.keep_bytes {
            match text.trim().parse::<bytesize::ByteSize>() {
                Ok(size) if size.as_u64() >= 1 << 20 => out.keep_bytes = size.as_u64(),
                _ => self.problem(format!(
                    "key `history.keep_bytes` = {text:?} must be a size of at least 1MiB, e.g. \"1GiB\", \"500MB\" or a number of bytes"
                )),
            }
        }
        out
    }

    fn hooks(&mut self, h: RawHooks) -> HooksConfig {
        if let Some(p) = &h.role_file {
            if !p.is_absolute() {
                self.problem(format!(
                    "key `hooks.role_file` = {:?} must be an absolute path",
                    p.display().to_string()
                ));
            }
        }
        HooksConfig {
            on_promote: h.on_promote,
            on_demote: h.on_demote,
            role_file: h.role_file,
        }
    }

    /// An optional `IP:port` key.
    fn listen_addr(
        &mut self,
        key: &str,
        value: Option<String>,
        example: &str,
    ) -> Option<SocketAddr> {
        let s = value?;
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(format!(
                    "key `{key}` = {s:?} is not an IP:port address; use e.g. \"{example}\""
                ));
                None
            }
        }
    }

    /// Two voters cannot survive the loss of either; refuse unless the user said they know.
    fn quorum_shape(&mut self, node: &NodeConfig, peers: &[PeerConfig]) {
        let voters = 1 + peers.len();
        let witnesses = usize::from(node.witness) + peers.iter().filter(|p| p.witness).count();
        if voters == 2 && !node.allow_two_node {
            let other = peers.first().map(|p| p.id).unwrap_or_default();
            self.problem(format!(
                "the cluster has only two voters (nodes {} and {other}), which cannot fail over: losing either stops it; add a third node or a witness ([[peer]] with witness = true, e.g. on the monitoring host) or set `node.allow_two_node` = true to accept that",
                node.id
            ));
        }
        if voters - witnesses == 0 {
            self.problem("every member is a witness; at least one node must hold the data");
        }
    }
}

/// Shell words that run without a program file.
const SHELL_BUILTINS: &[&str] = &[":", "true", "false", "test", "[", "exit", "!"];

/// The program a `validate` command runs, checked to exist and be
/// executable (found in `PATH` when it names no directory), or why not: a
/// validator that cannot run would hold every change of its set.
pub fn validator_program(command: &str) -> Result<PathBuf, String> {
    let words = shell_words::split(command)
        .map_err(|e| format!("is not a valid shell command ({e}); fix its quoting"))?;
    let Some(program) = words
        .iter()
        .find(|w| !(w.contains('=') && !w.starts_with('=') && !w.contains('/')))
    else {
        return Err("names no program to run".to_string());
    };
    if SHELL_BUILTINS.contains(&program.as_str()) {
        return Ok(PathBuf::from(program));
    }
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return if executable(&p) {
            Ok(p)
        } else {
            Err(format!("its program {program} does not exist or is not executable; install it or fix the path"))
        };
    }
    let search = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    search
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
        .ok_or_else(|| format!("its program {program:?} is not found in PATH ({search}) or is not executable; install it or give its full path"))
}

fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

/// Where the `[tls]` section points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for f in ["ca.crt", "n1.crt", "n1.key"] {
                std::fs::write(dir.path().join(f), "x").unwrap();
            }
            Fixture { dir }
        }
        fn tls(&self) -> String {
            let d = self.dir.path().display();
            format!("[tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/n1.crt\"\nkey = \"{d}/n1.key\"\n")
        }
        fn load(&self, body: &str) -> Result<Config, ConfigError> {
            self.load_env(body, vec![])
        }
        fn load_env(&self, body: &str, env: Vec<(&str, &str)>) -> Result<Config, ConfigError> {
            let path = self.dir.path().join("clusterd.toml");
            std::fs::write(&path, body).unwrap();
            Config::load_with_env(
                &path,
                env.into_iter().map(|(k, v)| (k.to_string(), v.to_string())),
            )
        }
        fn problems(&self, body: &str) -> String {
            match self.load(body) {
                Ok(_) => panic!("config was accepted:\n{body}"),
                Err(e) => e.to_string(),
            }
        }
    }

    const NODE: &str = "[node]\nid = 1\nlisten = \"127.0.0.1:7700\"\ndata_dir = \"/var/lib/clusterd\"\nadmin_socket = \"/run/clusterd/admin.sock\"\n";
    const PEERS: &str = "[[peer]]\nid = 1\naddr = \"10.0.0.1:7700\"\n[[peer]]\nid = 2\naddr = \"10.0.0.2:7700\"\n[[peer]]\nid = 3\naddr = \"nat.example:7701\"\n";

    #[test]
    fn a_full_config_is_accepted_and_own_peer_entry_dropped() {
        let f = Fixture::new();
        let body = format!(
            "{NODE}{PEERS}{}[raft]\nheartbeat_ms = 50\nelection_timeout_ms = 500\n[[sync]]\nname = \"tacacs\"\npath = \"/etc/tacacs+\"\nmode = \"mirror\"\nexclude = [\"*.lock\"]\nskip_while = [\"*.lock\"]\non_change = \"systemctl reload tac_plus\"\n[hooks]\nrole_file = \"/root/master-sync/PROMOTE\"\n",
            f.tls()
        );
        let c = f.load(&body).unwrap();
        assert_eq!(c.node.id, 1);
        assert_eq!(c.peers.iter().map(|p| p.id).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(c.raft.heartbeat, Duration::from_millis(50));
        assert_eq!(c.raft.tick(), Duration::from_millis(25));
        assert_eq!(c.raft.election_ticks(), 20);
        assert_eq!(c.sync[0].mode, SyncMode::Mirror);
        assert_eq!(
            c.sync[0].on_change.as_deref(),
            Some("systemctl reload tac_plus")
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let f = Fixture::new();
        let body = format!("{NODE}{PEERS}{}", f.tls());
        let c = f
            .load_env(
                &body,
                vec![
                    ("CLUSTERD_NODE__ID", "2"),
                    ("CLUSTERD_RAFT__HEARTBEAT_MS", "200"),
                    ("CLUSTERD_RAFT__ELECTION_TIMEOUT_MS", "2000"),
                ],
            )
            .unwrap();
        assert_eq!(c.node.id, 2);
        assert_eq!(c.raft.heartbeat, Duration::from_millis(200));
        assert_eq!(c.peers.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1, 3]);
        // Variables that are not <SECTION>__<KEY> are someone else's.
        assert!(f
            .load_env(
                &body,
                vec![("CLUSTERD_CONFIG_FILE", "/x"), ("CLUSTERD_DEMO_DIR", "/y")]
            )
            .is_ok());
    }

    #[test]
    fn every_problem_names_its_key() {
        let f = Fixture::new();
        let cases: Vec<(String, &str)> = vec![
            (format!("[node]\nid = 0\n{PEERS}{}", f.tls()), "key `node.id` = 0 must be greater than 0"),
            (format!("[node]\nlisten = \"1.2.3.4:1\"\n{PEERS}{}", f.tls()), "key `node.id` is missing"),
            (format!("[node]\nid = 1\nlisten = \"nowhere\"\n{PEERS}{}", f.tls()), "key `node.listen` = \"nowhere\" is not an IP:port address"),
            (format!("[node]\nid = 1\ndata_dir = \"rel\"\n{PEERS}{}", f.tls()), "key `node.data_dir` = \"rel\" must be an absolute path"),
            (format!("[node]\nid = 1\nadmin_socket = \"a.sock\"\n{PEERS}{}", f.tls()), "key `node.admin_socket` = \"a.sock\" must be an absolute path"),
            (format!("{NODE}{PEERS}[[peer]]\nid = 2\naddr = \"x:1\"\n{}", f.tls()), "key `peer[3].id` = 2 is listed twice"),
            (format!("{NODE}{PEERS}[[peer]]\nid = -4\naddr = \"x:1\"\n{}", f.tls()), "key `peer[3].id` = -4 must be greater than 0"),
            (format!("{NODE}{PEERS}[[peer]]\nid = 4\naddr = \"x\"\n{}", f.tls()), "key `peer[3].addr` = \"x\" is not host:port"),
            (format!("{NODE}{PEERS}[[peer]]\nid = 4\n{}", f.tls()), "key `peer[3].addr` is missing"),
            (format!("{NODE}{PEERS}"), "section [tls] is missing"),
            (format!("{NODE}{PEERS}[tls]\nca = \"/nonexistent/ca.crt\"\ncert = \"/x\"\nkey = \"/y\"\n"), "key `tls.ca`: cannot read /nonexistent/ca.crt"),
            (format!("{NODE}{PEERS}[tls]\nca = \"/nonexistent/ca.crt\"\n"), "key `tls.cert` is missing"),
            (format!("{NODE}{PEERS}{}[raft]\nheartbeat_ms = 5\n", f.tls()), "key `raft.heartbeat_ms` = 5 must be between 10 and 10000"),
            (format!("{NODE}{PEERS}{}[raft]\nelection_timeout_ms = 200\n", f.tls()), "key `raft.election_timeout_ms` = 200 must be at least 3 times"),
            (format!("{NODE}{PEERS}{}[raft]\nelection_timeout_ms = 10\n", f.tls()), "key `raft.election_timeout_ms` = 10 must be between 50 and 60000"),
            (format!("{NODE}{PEERS}{}[[sync]]\npath = \"/etc/x\"\n", f.tls()), "key `sync[0].name` is missing"),
            (format!("{NODE}{PEERS}{}[[sync]]\nname = \"a\"\n", f.tls()), "key `sync[0].path` is missing"),
            (format!("{NODE}{PEERS}{}[[sync]]\nname = \"a\"\npath = \"etc\"\n", f.tls()), "key `sync[0].path` = \"etc\" of sync set \"a\" must be an absolute path"),
            (format!("{NODE}{PEERS}{}[[sync]]\nname = \"a\"\npath = \"/etc\"\nmode = \"copy\"\n", f.tls()), "key `sync[0].mode` = \"copy\" of sync set \"a\" must be \"mirror\" or \"append\""),
            (format!("{NODE}{PEERS}{}[[sync]]\nname = \"a\"\npath = \"/a\"\n[[sync]]\nname = \"a\"\npath = \"/b\"\n", f.tls()), "key `sync[1].name` = \"a\" is used by two sync sets"),
            (format!("{NODE}{PEERS}{}[hooks]\nrole_file = \"PROMOTE\"\n", f.tls()), "key `hooks.role_file` = \"PROMOTE\" must be an absolute path"),
            (format!("{NODE}{PEERS}{}[metrics]\nlisten = \"9770\"\n", f.tls()), "key `metrics.listen` = \"9770\" is not an IP:port address"),
            (format!("{NODE}{PEERS}{}[admin]\nlisten = \"any:7701\"\n", f.tls()), "key `admin.listen` = \"any:7701\" is not an IP:port address; use e.g. \"0.0.0.0:7701\""),
            (format!("{NODE}{PEERS}{}revoked_serials = [\"0A:1B\", \"xyz\"]\n", f.tls()), "key `tls.revoked_serials[1]` = \"xyz\" is not a hexadecimal serial"),
            (format!("{NODE}{PEERS}{}[[sync]]\nname = \"a\"\npath = \"/a\"\nexclude = [\"!keep\"]\n", f.tls()), "key `sync[0].exclude` pattern \"!keep\""),
            (format!("{NODE}{PEERS}{}[log]\nlevel = \"info,,=[\"\n", f.tls()), "key `log.level`"),
            (format!("{NODE}[[peer]]\nid = 2\naddr = \"h:1\"\n{}", f.tls()), "the cluster has only two voters (nodes 1 and 2), which cannot fail over"),
            (format!("[node]\nid = 1\nwitness = true\n{PEERS}{}[[sync]]\nname = \"a\"\npath = \"/a\"\n", f.tls()), "this node is a witness"),
            (format!("{NODE}[[peer]]\nid = 2\naddr = \"h:1\"\nwitness = true\n{}", f.tls()), "the cluster has only two voters (nodes 1 and 2)"),
            (format!("{NODE}{PEERS}{}", f.tls().replace("[tls]", "[tsl]")), "unknown field `tsl`"),
            (format!("{NODE}\nbogus = 1\n{PEERS}{}", f.tls()), "unknown field `bogus`"),
            ("[node\nid=1".to_string(), "clusterd.toml"),
        ];
        for (body, expected) in cases {
            let msg = f.problems(&body);
            assert!(
                msg.contains(expected),
                "expected {expected:?} in:\n{msg}\nfor config:\n{body}"
            );
            assert!(
                msg.contains("clusterd.toml"),
                "message does not name the file: {msg}"
            );
        }
    }

    #[test]
    fn sync_xattrs_is_off_by_default_and_must_be_a_boolean() {
        let f = Fixture::new();
        let set = |extra: &str| {
            format!(
                "{NODE}{PEERS}{}[[sync]]\nname = \"a\"\npath = \"/a\"\nkind = \"dir\"\n{extra}",
                f.tls()
            )
        };
        assert!(!f.load(&set("")).unwrap().sync[0].xattrs);
        assert!(f.load(&set("xattrs = true\n")).unwrap().sync[0].xattrs);
        assert!(!f.load(&set("xattrs = false\n")).unwrap().sync[0].xattrs);
        for (bad, expected) in [
            (
                "xattrs = \"all\"\n",
                "key `sync[0].xattrs` = \"all\" of sync set \"a\" must be true or false",
            ),
            (
                "xattrs = 1\n",
                "key `sync[0].xattrs` = \"1\" of sync set \"a\" must be true or false",
            ),
            ("xattrs = \"yes\"\n", "key `sync[0].xattrs` = \"yes\""),
            ("xattrs = [\"user\"]\n", "xattrs"),
        ] {
            let msg = f.problems(&set(bad));
            assert!(
                msg.contains(expected) && msg.contains("clusterd.toml"),
                "{bad}: expected {expected:?} in {msg}"
            );
        }
    }

    #[test]
    fn a_validator_must_be_able_to_run_and_revert_needs_on_change() {
        let f = Fixture::new();
        let set = |extra: &str| {
            format!(
                "{NODE}{PEERS}{}[[sync]]\nname = \"a\"\npath = \"/a\"\nkind = \"dir\"\n{extra}",
                f.tls()
            )
        };
        let ok = f
            .load(&set(
                "validate = \"sh -c 'exit 0' {}\"\nvalidate_timeout_ms = 500\n",
            ))
            .unwrap();
        assert_eq!(ok.sync[0].validate.as_deref(), Some("sh -c 'exit 0' {}"));
        assert_eq!(ok.sync[0].validate_timeout, Duration::from_millis(500));
        assert_eq!(
            f.load(&set("")).unwrap().sync[0].validate_timeout,
            Duration::from_millis(DEFAULT_VALIDATE_TIMEOUT_MS)
        );
        assert!(
            f.load(&set("validate = \"true\"\n")).is_ok(),
            "a shell builtin runs"
        );
        assert_eq!(
            f.load(&set(
                "on_change = \"true\"\non_change_failure = \"revert\"\n"
            ))
            .unwrap()
            .sync[0]
                .on_change_failure,
            OnChangeFailure::Revert
        );
        for (bad, expected) in [
            (
                "validate = \"no-such-checker-xyz {}\"\n",
                "key `sync[0].validate` = \"no-such-checker-xyz {}\" of sync set \"a\": its program \"no-such-checker-xyz\" is not found in PATH",
            ),
            (
                "validate = \"/nonexistent/tac_plus -P -C {}/tac_plus.conf\"\n",
                "its program /nonexistent/tac_plus does not exist or is not executable",
            ),
            ("validate = \"sh -c 'unclosed\"\n", "is not a valid shell command"),
            ("validate = \"true\"\nvalidate_timeout_ms = 0\n", "`sync[0].validate_timeout_ms` = 0"),
            ("validate = \"true\"\nmode = \"append\"\n", "cannot be used with mode = \"append\""),
            ("on_change_failure = \"revert\"\n", "needs an `on_change` command"),
            ("on_change = \"true\"\non_change_failure = \"undo\"\n", "must be \"report\" or \"revert\""),
        ] {
            let msg = f.problems(&set(bad));
            assert!(
                msg.contains(expected) && msg.contains("clusterd.toml"),
                "{bad}: expected {expected:?} in {msg}"
            );
        }
    }

    #[test]
    fn sync_hard_links_is_off_by_default_boolean_and_not_for_append_sets() {
        let f = Fixture::new();
        let set = |extra: &str| {
            format!(
                "{NODE}{PEERS}{}[[sync]]\nname = \"a\"\npath = \"/a\"\nkind = \"dir\"\n{extra}",
                f.tls()
            )
        };
        assert!(!f.load(&set("")).unwrap().sync[0].hard_links);
        assert!(f.load(&set("hard_links = true\n")).unwrap().sync[0].hard_links);
        assert!(!f.load(&set("hard_links = false\n")).unwrap().sync[0].hard_links);
        // Independent of xattrs.
        let both = f.load(&set("hard_links = true\nxattrs = true\n")).unwrap();
        assert!(both.sync[0].hard_links && both.sync[0].xattrs);
        for (bad, expected) in [
            (
                "hard_links = \"yes\"\n",
                "key `sync[0].hard_links` = \"yes\" of sync set \"a\" must be true or false",
            ),
            (
                "hard_links = 1\n",
                "key `sync[0].hard_links` = \"1\" of sync set \"a\" must be true or false",
            ),
            (
                "hard_links = true\nmode = \"append\"\n",
                "key `sync[0].hard_links` = true of sync set \"a\" cannot be used with mode = \"append\"",
            ),
            ("hard_links = [true]\n", "hard_links"),
        ] {
            let msg = f.problems(&set(bad));
            assert!(
                msg.contains(expected) && msg.contains("clusterd.toml"),
                "{bad}: expected {expected:?} in {msg}"
            );
        }
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let f = Fixture::new();
        let msg = f.problems("[node]\nid = 0\nlisten = \"x\"\n[[peer]]\nid = 2\n");
        assert!(msg.contains("node.id"), "{msg}");
        assert!(msg.contains("node.listen"), "{msg}");
        assert!(msg.contains("peer[0].addr"), "{msg}");
        assert!(msg.contains("[tls]"), "{msg}");
        assert_eq!(msg.lines().count(), 4, "{msg}");
    }

    #[test]
    fn two_nodes_are_allowed_with_a_witness_or_explicit_consent() {
        let f = Fixture::new();
        let with_witness = format!("{NODE}[[peer]]\nid = 2\naddr = \"h:1\"\n[[peer]]\nid = 3\naddr = \"w:1\"\nwitness = true\n{}", f.tls());
        assert!(f.load(&with_witness).is_ok());
        let consent = format!(
            "{}allow_two_node = true\n[[peer]]\nid = 2\naddr = \"h:1\"\n{}",
            NODE,
            f.tls()
        );
        assert!(f.load(&consent).is_ok());
    }

    #[test]
    fn missing_file_is_named() {
        let err =
            Config::load_with_env(Path::new("/nonexistent/clusterd.toml"), vec![]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("/nonexistent/clusterd.toml: cannot read the config file"),
            "{msg}"
        );
    }
}
