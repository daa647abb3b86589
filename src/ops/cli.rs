//! The command lines of both binaries, as clap definitions. They live in the
//! library, not in the binaries, so that the man pages and shell completions
//! (`ops::manual`) are generated from the very definitions the binaries parse
//! and cannot drift from them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// A duration as `clusterctl pause --for` takes it: `90s`, `30m`, `2h`, `1d`,
/// or combinations such as `1h30m`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration ({e}); write e.g. 90s, 30m, 2h"))
}

/// Raft-led replication of config, account and log files across an HA cluster.
#[derive(Parser)]
#[command(name = "clusterd", version, about)]
pub struct ClusterdArgs {
    /// The node's configuration file (TOML); CLUSTERD_<SECTION>__<KEY> variables override it.
    #[arg(long, default_value = "/etc/clusterd/clusterd.toml")]
    pub config: PathBuf,
    /// Validate the configuration and certificates, then exit.
    #[arg(long)]
    pub check: bool,
}

#[derive(Parser)]
#[command(
    name = "clusterctl",
    version,
    about = "Administer a clusterd cluster through the local node"
)]
pub struct ClusterctlArgs {
    /// Read `node.admin_socket` from this clusterd config file.
    #[arg(long, global = true, conflicts_with = "socket")]
    pub config: Option<PathBuf>,
    /// The node's admin socket (default /run/clusterd/admin.sock).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Talk to a node's remote admin port (`[admin] listen`) instead of the
    /// local socket, over mutual TLS: HOST:PORT.
    #[arg(long, global = true, requires_all = ["node_id", "tls_ca", "tls_cert", "tls_key"], conflicts_with_all = ["socket", "config"])]
    pub remote: Option<String>,
    /// The id of the node at --remote (its certificate must name it).
    #[arg(long, global = true)]
    pub node_id: Option<u64>,
    /// The cluster CA certificate, for --remote.
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,
    /// An admin certificate (`clusterctl certs admin`), or a node
    /// certificate for read-only calls, for --remote.
    #[arg(long, global = true)]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert.
    #[arg(long, global = true)]
    pub tls_key: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Every node's role, term, commit and applied index, reachability and lag.
    Status {
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// How long to wait for each peer's answer.
        #[arg(long, default_value_t = 800)]
        peer_timeout_ms: u64,
        /// Redraw every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Hand leadership to NODE once it has applied everything committed and
    /// holds every committed file (a planned switchover loses and
    /// quarantines nothing); exits 0 when it leads.
    Promote {
        node: u64,
        #[arg(long, default_value_t = 15_000)]
        timeout_ms: u64,
        /// Only say what would happen (who leads, what NODE still lacks).
        #[arg(long)]
        dry_run: bool,
    },
    /// The cluster's members, and changes to them while it runs (add a
    /// node, retire one, replace one with a new id).
    Member {
        #[command(subcommand)]
        command: MemberCommand,
    },
    /// Commit a no-op through the leader and wait until it is applied here:
    /// proves the cluster accepts changes.
    Barrier {
        #[arg(long, default_value_t = 5_000)]
        timeout_ms: u64,
    },
    /// Pause replication of SET cluster-wide (committed through Raft, so it
    /// survives a failover): the leader proposes nothing of it and edits
    /// accumulate on its disk until `resume`, which validates and proposes
    /// them as one change. For multi-file edits.
    Pause {
        set: String,
        /// Why, shown in status (e.g. "moving to the new TACACS+ keys").
        #[arg(long, default_value = "")]
        reason: String,
        /// Resume by itself after this long, e.g. 30m, 2h, 90s.
        #[arg(long = "for", value_parser = parse_duration)]
        for_: Option<std::time::Duration>,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Resume a paused SET: what accumulated on the leader is validated and
    /// proposed as one change.
    Resume {
        set: String,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Rescan SET (every set without one) on the leader now and square every
    /// follower's copy with the result; returns once every reachable node
    /// holds it, or names the nodes and sets that did not get there.
    Sync {
        set: Option<String>,
        /// Accounts sets: let a change that removes more than `max_removed`
        /// users at once go (it is held on the leader until confirmed).
        #[arg(long, requires = "set")]
        confirm: bool,
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
    },
    /// The committed revisions of SET, newest first, from this node's
    /// history: revision (the Raft index), time, term, leader, and what
    /// changed (+ added, ~ content, m metadata, - deleted) with sizes. With
    /// PATH (relative to the set's path, or absolute), only the revisions
    /// that changed it or something below it.
    History {
        set: String,
        path: Option<String>,
        /// At most this many revisions (0: all).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// One JSON array, newest first: [{"revision", "time", "term",
        /// "leader", "changes": [{"path", "op", "size"}]}].
        #[arg(long)]
        json: bool,
    },
    /// Write the content PATH of SET had at revision REV to stdout.
    Show {
        set: String,
        path: String,
        /// The revision (see `clusterctl history`).
        #[arg(long)]
        at: u64,
    },
    /// What changed in SET (or under PATH) from revision FROM to TO: a
    /// unified diff of each text file, one line per binary, metadata,
    /// directory or symlink change.
    Diff {
        set: String,
        path: Option<String>,
        #[arg(long)]
        from: u64,
        /// Default: the newest revision this node applied.
        #[arg(long)]
        to: Option<u64>,
    },
    /// Make SET (or the PATHs of it, and what lies below them) what it was
    /// at revision REV, as a new revision proposed by the leader and
    /// checked by the set's validator like any change: content and metadata
    /// back, files created since removed, files deleted since brought back.
    /// Prints what it changes, then waits until every reachable node
    /// applied it. Works from any node.
    Rollback {
        set: String,
        paths: Vec<String>,
        /// The revision to go back to (see `clusterctl history`).
        #[arg(long)]
        to: u64,
        /// Only print what it would change.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
    },
    /// What this node set aside in quarantine (local versions it replaced or
    /// deleted because they differed from what the cluster committed).
    Conflicts {
        /// A JSON array of the records instead of the table (each with
        /// `id`, `set`, `path`, ...).
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<ConflictsCommand>,
    },
    /// Nagios/Icinga plugin: one line with performance data; exit 0 OK,
    /// 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    Check {
        /// WARNING when a node is this many committed entries behind.
        #[arg(long, default_value_t = 100)]
        lag_warn: u64,
        /// CRITICAL when a node is this many committed entries behind.
        #[arg(long, default_value_t = 1000)]
        lag_crit: u64,
        /// WARNING when a node's certificate expires within this many days.
        #[arg(long, default_value_t = 30)]
        cert_warn_days: i64,
        /// CRITICAL when a node's certificate expires within this many days.
        #[arg(long, default_value_t = 7)]
        cert_crit_days: i64,
        /// WARNING when a node's copy of a set is this many seconds behind the leader's.
        #[arg(long, default_value_t = 60.0)]
        lag_warn_secs: f64,
        /// CRITICAL when a node's copy of a set is this many seconds behind.
        #[arg(long, default_value_t = 300.0)]
        lag_crit_secs: f64,
        /// WARNING when a node holds this many quarantined versions (0: never).
        #[arg(long, default_value_t = 1)]
        quarantine_warn: u64,
        /// CRITICAL when a node holds this many quarantined versions (0: never).
        #[arg(long, default_value_t = 0)]
        quarantine_crit: u64,
        #[arg(long, default_value_t = 800)]
        peer_timeout_ms: u64,
    },
    /// Translate a legacy rsync/cron sync script into [[sync]] sets (printed
    /// as TOML, with a comment for everything it cannot translate).
    ImportRsync {
        /// The script, e.g. /root/CLUSTER-SYNC/cluster-config-sync.sh.
        file: PathBuf,
    },
    /// Print a completion script for SHELL to stdout, e.g.
    /// `clusterctl completions bash > /etc/bash_completion.d/clusterctl`
    /// (the Debian package installs them for bash, zsh and fish).
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages into DIR: clusterd(8), clusterctl(8), one
    /// clusterctl-<subcommand>(8) per subcommand and clusterd.toml(5),
    /// generated from these very definitions (the Debian package installs
    /// them).
    Man {
        #[arg(long)]
        out: PathBuf,
    },
    /// Certificates for the cluster's mutual TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
pub enum MemberCommand {
    /// Every member: id, address, voter/learner/witness, reachable, and how
    /// far it holds the leader's log.
    List {
        /// One JSON array of {"id", "addr", "role", "reachable", "match_index"}.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 800)]
        peer_timeout_ms: u64,
    },
    /// Add node ID, already started at ADDR with an empty data_dir and
    /// `[node] join = true`: it joins as a learner, catches up (a snapshot,
    /// then every committed file) and is promoted to voter by the leader;
    /// exits 0 once it votes.
    Add {
        id: u64,
        /// Its peer address as every node will dial it, HOST:PORT.
        #[arg(long)]
        addr: String,
        /// Keep it a learner: a replica that never votes or leads (a DR copy).
        #[arg(long, conflicts_with = "witness")]
        learner: bool,
        /// It is a witness (its config says `witness = true`): votes, holds no files.
        #[arg(long)]
        witness: bool,
        /// How long to wait for it to catch up and be promoted.
        #[arg(long, default_value_t = 600_000)]
        timeout_ms: u64,
    },
    /// Remove node ID from the cluster (a leader hands over first); refused
    /// when the remaining voters could not commit. Its files stay on its disk.
    Remove {
        id: u64,
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// Replace voter OLD with NEW (started at ADDR with `[node] join =
    /// true`): NEW joins as a learner and catches up, then one joint change
    /// makes it a voter and removes OLD.
    Replace {
        old: u64,
        new: u64,
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 600_000)]
        timeout_ms: u64,
    },
}

#[derive(Subcommand)]
pub enum ConflictsCommand {
    /// Put quarantined copy ID (from whichever node holds it) back into its
    /// set at its path, with its content and mode, as a new revision the
    /// leader proposes (checked by the set's validator like any change).
    Restore {
        id: String,
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
    },
    /// Delete quarantined copy ID and its record, on the node that holds it.
    Drop { id: String },
}

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Write DIR/ca.crt, ca.key and node-<id>.crt/.key for each id (an existing CA in DIR is reused).
    Init {
        #[arg(long)]
        out: PathBuf,
        /// Comma-separated node ids, e.g. 1,2,3.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u64>,
        /// Validity of node certificates, in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// Write DIR/admin-<name>.crt/.key under the CA in DIR: an administrator's
    /// certificate for `clusterctl --remote` (promote, barrier, status).
    Admin {
        #[arg(long)]
        out: PathBuf,
        /// Who holds it (1 to 32 lowercase letters, digits and '-').
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Print a certificate's node id, serial (for `tls.revoked_serials`) and expiry.
    Show { file: PathBuf },
}
