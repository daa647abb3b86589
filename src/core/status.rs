//! The cluster status as `clusterctl status` shows it: the gathered views of
//! every node, the contract JSON object, and the human table.
//!
//! Invariant owned here: the JSON keeps the names PRODUCT.md promises
//! (`leader`, `term`, `nodes[].id/role/reachable/term/commit_index/applied_index`);
//! fields are only ever added.

use serde_json::{json, Value};

use crate::core::config::NodeId;

/// The node's role as shown to users. A pre-candidate shows as a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Witness,
    /// A non-voting member: it receives everything but neither votes nor leads.
    Learner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Witness => "witness",
            Role::Learner => "learner",
        }
    }
}

/// A follower's replication progress as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerProgress {
    pub id: NodeId,
    pub match_index: u64,
    pub recent_active: bool,
}

/// One node's view of itself and, on the leader, of its followers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub id: NodeId,
    pub role: Role,
    pub term: u64,
    /// Who this node voted for in `term` (0: nobody).
    pub vote: NodeId,
    pub leader: Option<NodeId>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_index: u64,
    pub last_index: u64,
    /// Filled on the leader only.
    pub progress: Vec<PeerProgress>,
    /// Messages from an older term this node rejected since it started:
    /// traffic of a deposed leader or of a node that was cut off.
    pub stale_term_messages: u64,
    /// The committed configuration as this node applied it.
    pub members: MemberView,
}

/// The configuration a node applied, and what it is in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberView {
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// The voters this node knows to be witnesses.
    pub witnesses: Vec<NodeId>,
    /// What this node is to the cluster (a joining node waits, a removed
    /// one stays out).
    pub member: crate::core::members::Membership,
    /// How this node's `[[peer]]` list differs from the committed members
    /// (which rule), for status and check to name.
    pub config_differs: Option<String>,
}

impl MemberView {
    /// Whether `id` is a voter or a learner of this configuration.
    pub fn lists(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    /// Every voter and learner, sorted, each once.
    pub fn all(&self) -> Vec<NodeId> {
        let mut all: Vec<NodeId> = self.voters.iter().chain(&self.learners).copied().collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// Every node's view as gathered by one node.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterStatus {
    /// The node that gathered this status (the one `clusterctl` talked to).
    pub node_id: NodeId,
    pub nodes: Vec<NodeEntry>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeEntry {
    pub id: NodeId,
    /// Address the gathering node uses for it (empty for itself).
    pub addr: String,
    pub reachable: bool,
    pub view: Option<NodeView>,
    /// Why it could not be asked.
    pub error: Option<String>,
    /// Round trip of the status call, microseconds.
    pub rtt_us: Option<u64>,
    /// When the node's certificate expires (seconds since 1970).
    pub cert_not_after_unix: Option<u64>,
    /// Its file replication state (absent from nodes that did not say).
    pub files: Option<FilesView>,
}

/// One line of `clusterctl member list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub id: NodeId,
    pub addr: String,
    /// `voter`, `learner` or `witness`.
    pub role: &'static str,
    pub reachable: bool,
    /// How far it holds the leader's log (the leader's own last index for
    /// the leader); unknown when the leader is unreachable.
    pub match_index: Option<u64>,
}

/// One node's file replication state, as it reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilesView {
    pub sets: Vec<SetView>,
    pub bytes_proposed: u64,
    pub bytes_saved: u64,
    pub bytes_fetched: u64,
    /// Raft and fetch payload bytes this node sent to peers.
    pub wire_bytes_sent: u64,
    pub quarantined: u64,
    pub on_change_failures: u64,
    pub role_hook_failures: u64,
    /// New versions linked into place from staging (written once).
    pub files_linked: u64,
}

/// One sync set on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetView {
    pub name: String,
    pub files: u64,
    pub bytes: u64,
    /// Raft index of the last batch of this set applied here.
    pub applied_index: u64,
    /// Batches of this set applied here.
    pub seq: u64,
    /// Patch bytes of those batches.
    pub committed_bytes: u64,
    /// Files whose committed content this node still has to fetch.
    pub missing: u64,
    pub last_error: Option<String>,
    pub refused: u64,
    pub skipping: bool,
    /// This node's validator refused the set's last change: why. On the
    /// leader nothing of that change was proposed.
    pub held: Option<String>,
    /// Leader only: inotify does not watch the whole set (the kernel's
    /// watch limit), so its changes are found by rescans: why.
    pub unwatched: Option<String>,
    /// The set's committed pause, if it is paused.
    pub paused: Option<crate::core::manifest::Pause>,
    /// `(seq, proposed_at_ms)` of recent batches (for lag in seconds).
    pub recent: Vec<(u64, u64)>,
    /// An accounts set's records here (`None` for other sets).
    pub accounts: Option<AccountsView>,
}

/// An accounts set on one node: the records it holds, those it refused
/// and its own lines it could not read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountsView {
    /// Replicated users and groups in the committed records.
    pub users: u64,
    pub groups: u64,
    pub refused: Vec<RefusedRecord>,
    /// This node's own malformed lines, kept as they are (`passwd line 3:
    /// ...`).
    pub local_malformed: Vec<String>,
    /// A follower has not yet merged the set's last committed records into
    /// its own files (`clusterctl sync` waits for it).
    pub pending: bool,
    /// The set's applied index whose records this node last merged.
    pub merged_index: u64,
}

/// A replicated account this node did not apply (it collides with one of
/// its own), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRecord {
    /// `user` or `group`.
    pub kind: String,
    pub name: String,
    pub id: u32,
    pub reason: String,
}

/// How far one node's copy of a set is behind the leader's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SetLag {
    pub batches: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// One node's lag as the leader sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLag {
    pub id: NodeId,
    pub reachable: bool,
    pub lag_entries: Option<u64>,
    pub sets: Vec<(String, SetLag)>,
}

/// The lag of `node`'s set against the leader's, at `now_ms`.
pub fn set_lag(leader: &SetView, node: &SetView, now_ms: u64) -> SetLag {
    let batches = leader.seq.saturating_sub(node.seq);
    let seconds = if batches == 0 {
        0.0
    } else {
        let since = leader
            .recent
            .iter()
            .find(|(s, _)| *s > node.seq)
            .or(leader.recent.first())
            .map_or(now_ms, |(_, at)| *at);
        now_ms.saturating_sub(since) as f64 / 1000.0
    };
    SetLag {
        batches,
        bytes: leader.committed_bytes.saturating_sub(node.committed_bytes),
        seconds,
    }
}

/// Seconds since 1970 (0 for times before it).
pub fn unix_seconds(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Days ahead of expiry from which `clusterctl status` warns.
pub const CERT_WARN_DAYS: i64 = 30;

/// The status table's line for a certificate that expires within
/// [`CERT_WARN_DAYS`] (or has expired).
fn cert_warning(id: NodeId, not_after_unix: u64, now_unix: u64) -> Option<String> {
    let days = days_left(not_after_unix, now_unix);
    if days > CERT_WARN_DAYS {
        return None;
    }
    let when = if days < 0 {
        "has EXPIRED: its peers refuse it".to_string()
    } else {
        format!("expires in {days} days")
    };
    Some(format!(
        "node {id}: certificate {when}; issue a new one (`clusterctl certs init --out DIR --nodes {id}` after moving the old pair away), install it and run `systemctl reload clusterd`\n"
    ))
}

fn days_left(not_after_unix: u64, now_unix: u64) -> i64 {
    (not_after_unix as i64 - now_unix as i64).div_euclid(86_400)
}

impl ClusterStatus {
    fn local(&self) -> Option<&NodeView> {
        self.nodes
            .iter()
            .find(|n| n.id == self.node_id)
            .and_then(|n| n.view.as_ref())
    }

    /// The leader as the local node sees it.
    pub fn leader(&self) -> Option<NodeId> {
        self.local().and_then(|v| v.leader)
    }

    pub fn term(&self) -> u64 {
        self.local().map_or(0, |v| v.term)
    }

    fn leader_view(&self) -> Option<&NodeView> {
        let leader = self.leader()?;
        self.nodes
            .iter()
            .find(|n| n.id == leader)
            .and_then(|n| n.view.as_ref())
    }

    /// Entries committed by the leader that `node` has not applied yet.
    pub fn lag_entries(&self, node: &NodeView) -> Option<u64> {
        self.leader_view()
            .map(|l| l.commit_index.saturating_sub(node.applied_index))
    }

    fn leader_files(&self) -> Option<&FilesView> {
        let leader = self.leader()?;
        self.nodes.iter().find(|n| n.id == leader)?.files.as_ref()
    }

    /// How far each node is behind the leader, per node and per set (what
    /// the leader's metrics export).
    pub fn cluster_lag(&self, now_ms: u64) -> Vec<NodeLag> {
        let leader = self.leader_files();
        self.nodes
            .iter()
            .map(|n| NodeLag {
                id: n.id,
                reachable: n.reachable,
                lag_entries: n.view.as_ref().and_then(|v| self.lag_entries(v)),
                sets: match (leader, &n.files) {
                    (Some(l), Some(f)) => f
                        .sets
                        .iter()
                        .filter_map(|s| {
                            let ls = l.sets.iter().find(|x| x.name == s.name)?;
                            Some((s.name.clone(), set_lag(ls, s, now_ms)))
                        })
                        .collect(),
                    _ => Vec::new(),
                },
            })
            .collect()
    }

    /// Per-set JSON of one node, with lag against the leader.
    fn sets_json(&self, n: &NodeEntry, lag_entries: Option<u64>) -> Value {
        let Some(files) = &n.files else {
            return Value::Null;
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let leader = self.leader_files();
        let sets: Vec<Value> = files
            .sets
            .iter()
            .map(|s| {
                let lag = leader
                    .and_then(|l| l.sets.iter().find(|x| x.name == s.name))
                    .map(|l| set_lag(l, s, now_ms));
                json!({
                    "name": s.name,
                    "files": s.files,
                    "bytes": s.bytes,
                    "applied_index": s.applied_index,
                    "seq": s.seq,
                    "lag_entries": lag.map(|l| if l.batches == 0 { 0 } else { lag_entries.unwrap_or(l.batches) }),
                    "lag_batches": lag.map(|l| l.batches),
                    "lag_bytes": lag.map(|l| l.bytes),
                    "lag_seconds": lag.map(|l| l.seconds),
                    "missing": s.missing,
                    "refused": s.refused,
                    "skipping": s.skipping,
                    "held": s.held,
                    "unwatched": s.unwatched,
                    "paused": s.paused.as_ref().map(|p| json!({
                        "reason": p.reason,
                        "since": utc_time(p.since_ms / 1000),
                        "since_unix_ms": p.since_ms,
                        "until": p.until_ms.map(|u| utc_time(u / 1000)),
                        "by": p.by,
                    })),
                    "last_error": s.last_error,
                    "accounts": s.accounts.as_ref().map(|a| json!({
                        "users": a.users,
                        "groups": a.groups,
                        "refused": a.refused.iter().map(|r| json!({
                            "kind": r.kind, "name": r.name, "id": r.id, "reason": r.reason,
                        })).collect::<Vec<_>>(),
                        "local_malformed": a.local_malformed,
                        "pending": a.pending,
                    })),
                })
            })
            .collect();
        Value::Array(sets)
    }

    /// The leader's view of how far `id` has replicated.
    fn match_index(&self, id: NodeId) -> Option<u64> {
        self.leader_view()?
            .progress
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.match_index)
    }

    /// The contract object of `clusterctl status --json`.
    pub fn to_json(&self) -> Value {
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|n| match &n.view {
                Some(v) => json!({
                    "id": n.id,
                    "role": v.role.as_str(),
                    "reachable": n.reachable,
                    "term": v.term,
                    "vote": v.vote,
                    "leader": v.leader,
                    "commit_index": v.commit_index,
                    "applied_index": v.applied_index,
                    "first_index": v.first_index,
                    "last_index": v.last_index,
                    "match_index": self.match_index(n.id),
                    "lag_entries": self.lag_entries(v),
                    "addr": n.addr,
                    "rtt_us": n.rtt_us,
                    "cert_expires_unix": n.cert_not_after_unix,
                    "sets": self.sets_json(n, self.lag_entries(v)),
                    "bytes_proposed": n.files.as_ref().map(|f| f.bytes_proposed),
                    "bytes_saved": n.files.as_ref().map(|f| f.bytes_saved),
                    "bytes_fetched": n.files.as_ref().map(|f| f.bytes_fetched),
                    "wire_bytes_sent": n.files.as_ref().map(|f| f.wire_bytes_sent),
                    "quarantined": n.files.as_ref().map(|f| f.quarantined),
                    "on_change_failures": n.files.as_ref().map(|f| f.on_change_failures),
                    "role_hook_failures": n.files.as_ref().map(|f| f.role_hook_failures),
                    "files_linked": n.files.as_ref().map(|f| f.files_linked),
                    "stale_term_messages": v.stale_term_messages,
                    "member": v.members.member.as_str(),
                    "voters": v.members.voters,
                    "learners": v.members.learners,
                }),
                None => json!({
                    "id": n.id,
                    "role": "unknown",
                    "reachable": false,
                    "term": null,
                    "commit_index": null,
                    "applied_index": null,
                    "match_index": self.match_index(n.id),
                    "lag_entries": null,
                    "addr": n.addr,
                    "error": n.error,
                }),
            })
            .collect();
        json!({
            "node_id": self.node_id,
            "leader": self.leader(),
            "term": self.term(),
            "nodes": nodes,
        })
    }

    /// The members as the leader applied them (this node's view when the
    /// leader is unreachable): `clusterctl member list`.
    pub fn member_rows(&self) -> Vec<MemberRow> {
        let Some(reference) = self.leader_view().or_else(|| {
            self.nodes
                .iter()
                .find(|n| n.id == self.node_id)?
                .view
                .as_ref()
        }) else {
            return Vec::new();
        };
        let m = &reference.members;
        let mut ids: Vec<NodeId> = m.voters.iter().chain(&m.learners).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .map(|id| {
                let entry = self.nodes.iter().find(|n| n.id == id);
                let role = if m.learners.contains(&id) {
                    "learner"
                } else if m.witnesses.contains(&id)
                    || entry
                        .and_then(|e| e.view.as_ref())
                        .is_some_and(|v| v.role == Role::Witness)
                {
                    "witness"
                } else {
                    "voter"
                };
                let match_index = if Some(id) == self.leader() {
                    self.leader_view().map(|v| v.last_index)
                } else {
                    self.match_index(id)
                };
                MemberRow {
                    id,
                    addr: entry.map(|e| e.addr.clone()).unwrap_or_default(),
                    role,
                    reachable: entry.is_some_and(|e| e.reachable),
                    match_index,
                }
            })
            .collect()
    }

    /// `clusterctl member list --json`: one array, as PRODUCT.md fixes it.
    pub fn members_json(&self) -> Value {
        Value::Array(
            self.member_rows()
                .iter()
                .map(|r| {
                    json!({
                        "id": r.id,
                        "addr": r.addr,
                        "role": r.role,
                        "reachable": r.reachable,
                        "match_index": r.match_index,
                    })
                })
                .collect(),
        )
    }

    /// `clusterctl member list`: one line per member, the leader starred,
    /// then the nodes that are not members (joining, removed).
    pub fn members_table(&self) -> String {
        let mut rows: Vec<[String; 5]> =
            vec![["NODE", "ROLE", "REACHABLE", "MATCH", "ADDRESS"].map(str::to_string)];
        let members = self.member_rows();
        for r in &members {
            let marker = if Some(r.id) == self.leader() {
                "*"
            } else {
                " "
            };
            rows.push([
                format!("{marker}{}", r.id),
                r.role.to_string(),
                if r.reachable { "yes" } else { "no" }.to_string(),
                r.match_index.map_or("-".to_string(), |m| m.to_string()),
                r.addr.clone(),
            ]);
        }
        let mut out = aligned(&rows);
        for n in &self.nodes {
            if members.iter().any(|r| r.id == n.id) {
                continue;
            }
            if let Some(v) = &n.view {
                out.push_str(&format!(
                    "node {} is not a member: it is {}\n",
                    n.id,
                    match v.members.member {
                        crate::core::members::Membership::Joining =>
                            "waiting to be added (`clusterctl member add`)",
                        crate::core::members::Membership::Removed =>
                            "removed; it replicates nothing",
                        _ => "not in the configuration the leader applied yet",
                    }
                ));
            }
        }
        out
    }

    /// A table for people: one line per node, the leader starred.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        match self.leader() {
            Some(l) => out.push_str(&format!("leader: node {l}, term {}", self.term())),
            None => out.push_str(&format!(
                "leader: none (term {}): the cluster cannot commit changes",
                self.term()
            )),
        }
        out.push_str(&format!("  (as seen by node {})\n", self.node_id));
        let header = [
            "NODE",
            "ROLE",
            "REACHABLE",
            "TERM",
            "COMMIT",
            "APPLIED",
            "LAG",
            "ADDRESS",
        ];
        let mut rows: Vec<[String; 8]> = vec![header.map(str::to_string)];
        for n in &self.nodes {
            let marker = if Some(n.id) == self.leader() {
                "*"
            } else {
                " "
            };
            let addr = if n.id == self.node_id {
                "(this node)".to_string()
            } else {
                n.addr.clone()
            };
            let row = match &n.view {
                Some(v) => [
                    format!("{marker}{}", n.id),
                    v.role.as_str().to_string(),
                    "yes".to_string(),
                    v.term.to_string(),
                    v.commit_index.to_string(),
                    v.applied_index.to_string(),
                    self.lag_entries(v)
                        .map_or("-".to_string(), |l| l.to_string()),
                    addr,
                ],
                None => [
                    format!("{marker}{}", n.id),
                    "unknown".to_string(),
                    "no".to_string(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("{addr}: {}", n.error.as_deref().unwrap_or("unreachable")),
                ],
            };
            rows.push(row);
        }
        out.push_str(&aligned(&rows));
        for n in &self.nodes {
            let Some(v) = &n.view else { continue };
            match v.members.member {
                crate::core::members::Membership::Joining => out.push_str(&format!(
                    "node {} is waiting to be added: run `clusterctl member add {} --addr HOST:PORT` on a member\n",
                    n.id, n.id
                )),
                crate::core::members::Membership::Removed => out.push_str(&format!(
                    "node {} was removed from the cluster: it replicates nothing, and its files stay as they are\n",
                    n.id
                )),
                _ => {}
            }
            if let Some(differs) = &v.members.config_differs {
                out.push_str(&format!("node {}: {differs}\n", n.id));
            }
        }
        self.sets_table(&mut out);
        let now = unix_seconds(std::time::SystemTime::now());
        for n in &self.nodes {
            if let Some(q) = n.files.as_ref().map(|f| f.quarantined).filter(|q| *q > 0) {
                out.push_str(&format!(
                    "node {}: {q} local version(s) set aside in quarantine; `clusterctl conflicts` on node {} lists them\n",
                    n.id, n.id
                ));
            }
            if let Some(line) = n
                .cert_not_after_unix
                .and_then(|t| cert_warning(n.id, t, now))
            {
                out.push_str(&line);
            }
        }
        out
    }

    fn sets_table(&self, out: &mut String) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let leader = self.leader_files();
        let mut rows: Vec<[String; 7]> = Vec::new();
        for n in &self.nodes {
            let Some(files) = &n.files else { continue };
            for s in &files.sets {
                let lag = leader
                    .and_then(|l| l.sets.iter().find(|x| x.name == s.name))
                    .map(|l| set_lag(l, s, now_ms));
                let state = match (&s.last_error, s.skipping, s.missing) {
                    _ if s.held.is_some() => {
                        format!("held: {}", s.held.as_deref().unwrap_or_default())
                    }
                    _ if s.paused.is_some() => {
                        let p = s.paused.as_ref().expect("checked");
                        let mut text = format!(
                            "paused by {} since {} UTC",
                            p.by,
                            utc_time(p.since_ms / 1000)
                        );
                        if let Some(until) = p.until_ms {
                            text.push_str(&format!(" until {}", utc_time(until / 1000)));
                        }
                        if !p.reason.is_empty() {
                            text.push_str(&format!(": {}", p.reason));
                        }
                        text
                    }
                    (_, true, _) => "waiting for skip_while marker".to_string(),
                    (_, _, m) if m > 0 => format!("{m} file(s) to fetch"),
                    (Some(e), _, _) => e.clone(),
                    _ if s.accounts.as_ref().is_some_and(|a| !a.refused.is_empty()) => {
                        let a = s.accounts.as_ref().expect("checked");
                        let names: Vec<String> = a
                            .refused
                            .iter()
                            .map(|r| format!("{} {}", r.kind, r.name))
                            .collect();
                        format!(
                            "ok, {} account(s) refused here: {}",
                            a.refused.len(),
                            names.join(", ")
                        )
                    }
                    _ if s.unwatched.is_some() => {
                        format!(
                            "ok, by rescan: {}",
                            s.unwatched.as_deref().unwrap_or_default()
                        )
                    }
                    _ => "ok".to_string(),
                };
                rows.push([
                    n.id.to_string(),
                    s.name.clone(),
                    s.files.to_string(),
                    s.bytes.to_string(),
                    lag.map_or("-".into(), |l| l.batches.to_string()),
                    lag.map_or("-".into(), |l| format!("{:.1}s", l.seconds)),
                    state,
                ]);
            }
        }
        if rows.is_empty() {
            return;
        }
        rows.insert(
            0,
            ["NODE", "SET", "FILES", "BYTES", "BEHIND", "LAG", "STATE"].map(str::to_string),
        );
        out.push('\n');
        out.push_str(&aligned(&rows));
    }
}

/// Why `clusterctl promote` cannot go ahead (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// Never possible as asked (unknown node, a witness): fail at once.
    Invalid(String),
    /// Not possible this instant (no leader, target unreachable): retry until the deadline.
    NotNow(String),
}

/// What a planned switchover to `target` needs, judged from one gathered
/// status: it must not lose or quarantine anything, so the target must have
/// applied every entry committed when the switchover was asked for and hold
/// every committed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromotePlan {
    pub leader: NodeId,
    pub term: u64,
    pub target: NodeId,
    /// The index the target must have applied before the transfer.
    pub must_apply: u64,
    pub target_applied: u64,
    /// Sets the target still lacks committed files of: (name, files missing).
    pub missing: Vec<(String, u64)>,
    /// Sets the target has not applied because a `skip_while` marker exists there.
    pub skipping: Vec<String>,
}

impl PromotePlan {
    pub fn already_leads(&self) -> bool {
        self.leader == self.target
    }

    /// True once the transfer cannot lose or quarantine a committed change.
    pub fn caught_up(&self) -> bool {
        self.target_applied >= self.must_apply
            && self.missing.is_empty()
            && self.skipping.is_empty()
    }

    /// What still stands between the target and the transfer.
    pub fn waiting_for(&self) -> String {
        let mut parts = Vec::new();
        if self.target_applied < self.must_apply {
            parts.push(format!(
                "it has applied entry {} of {}",
                self.target_applied, self.must_apply
            ));
        }
        for (set, n) in &self.missing {
            parts.push(format!(
                "it still lacks {n} committed file(s) of set {set:?}"
            ));
        }
        for set in &self.skipping {
            parts.push(format!(
                "set {set:?} waits there for a skip_while marker to disappear"
            ));
        }
        parts.join("; ")
    }

    /// The `--dry-run` answer.
    pub fn describe(&self) -> String {
        if self.already_leads() {
            return format!(
                "node {} already leads (term {}): promote would do nothing",
                self.target, self.term
            );
        }
        let then = format!(
            "then node {} hands leadership over (proposals pause for at most an election timeout) and node {} becomes the source of every sync set",
            self.leader, self.target
        );
        if self.caught_up() {
            format!(
                "node {} leads term {}; node {} has applied every committed entry ({}) and holds every committed file, so promote would start at once; {then}. Nothing was changed.",
                self.leader, self.term, self.target, self.must_apply
            )
        } else {
            format!(
                "node {} leads term {}; promote would first wait until node {} has caught up ({}), {then}. Nothing was changed.",
                self.leader,
                self.term,
                self.target,
                self.waiting_for()
            )
        }
    }
}

/// Plans a switchover to `target`. `must_apply` pins the index to reach
/// (the leader's commit index when the promote began); `None` takes the
/// leader's commit index now.
pub fn promote_plan(
    status: &ClusterStatus,
    target: NodeId,
    must_apply: Option<u64>,
) -> Result<PromotePlan, PlanError> {
    let members: Vec<NodeId> = status.nodes.iter().map(|n| n.id).collect();
    let Some(entry) = status.nodes.iter().find(|n| n.id == target) else {
        let list: Vec<String> = members.iter().map(|m| m.to_string()).collect();
        return Err(PlanError::Invalid(format!(
            "node {target} is not a member of this cluster (members: {})",
            list.join(", ")
        )));
    };
    let Some(leader) = status.leader() else {
        return Err(PlanError::NotNow(
            "no leader is known: the cluster is electing one or lacks a majority".to_string(),
        ));
    };
    let Some(view) = entry.view.as_ref() else {
        return Err(PlanError::NotNow(format!(
            "node {target} is unreachable from node {}: {}",
            status.node_id,
            entry.error.as_deref().unwrap_or("no answer")
        )));
    };
    if view.role == Role::Witness {
        return Err(PlanError::Invalid(format!(
            "node {target} is a witness: it votes but holds no files, so it cannot lead"
        )));
    }
    let Some(leader_view) = status.leader_view() else {
        return Err(PlanError::NotNow(format!(
            "the leader, node {leader}, is unreachable from node {}",
            status.node_id
        )));
    };
    let sets = entry.files.as_ref().map_or(&[][..], |f| &f.sets[..]);
    let missing = sets
        .iter()
        .filter(|s| s.missing > 0)
        .map(|s| (s.name.clone(), s.missing))
        .collect();
    let skipping = sets
        .iter()
        .filter(|s| s.skipping)
        .map(|s| s.name.clone())
        .collect();
    Ok(PromotePlan {
        leader,
        term: leader_view.term,
        target,
        must_apply: must_apply.unwrap_or(leader_view.commit_index),
        target_applied: view.applied_index,
        missing,
        skipping,
    })
}

/// Thresholds of `clusterctl check`, the Nagios/Icinga plugin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckThresholds {
    /// WARNING when some node is this many committed entries behind.
    pub lag_warn: u64,
    /// CRITICAL when some node is this many committed entries behind.
    pub lag_crit: u64,
    /// WARNING when a node's certificate expires within this many days.
    pub cert_warn_days: i64,
    /// CRITICAL when a node's certificate expires within this many days.
    pub cert_crit_days: i64,
    /// WARNING when a node's copy of some set is this many seconds behind
    /// the leader's (since the oldest batch it has not applied was committed).
    pub lag_warn_secs: f64,
    /// CRITICAL at this many seconds behind.
    pub lag_crit_secs: f64,
    /// WARNING when some node holds at least this many quarantined versions
    /// (0: never).
    pub quarantine_warn: u64,
    /// CRITICAL at this many (0: never).
    pub quarantine_crit: u64,
}

impl Default for CheckThresholds {
    fn default() -> Self {
        CheckThresholds {
            lag_warn: 100,
            lag_crit: 1000,
            cert_warn_days: 30,
            cert_crit_days: 7,
            lag_warn_secs: 60.0,
            lag_crit_secs: 300.0,
            quarantine_warn: 1,
            quarantine_crit: 0,
        }
    }
}

/// Plugin exit codes, as Nagios and Icinga read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CheckCode {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl CheckCode {
    pub fn word(self) -> &'static str {
        match self {
            CheckCode::Ok => "OK",
            CheckCode::Warning => "WARNING",
            CheckCode::Critical => "CRITICAL",
            CheckCode::Unknown => "UNKNOWN",
        }
    }
}

/// Judges a status: the worst finding sets the code; the line names every
/// finding, then performance data after `|`.
pub fn check(status: &ClusterStatus, t: &CheckThresholds, now_unix: u64) -> (CheckCode, String) {
    let total = status.nodes.len();
    let reachable = status.nodes.iter().filter(|n| n.reachable).count();
    let majority = total / 2 + 1;
    let max_lag = status
        .nodes
        .iter()
        .filter_map(|n| n.view.as_ref())
        .filter_map(|v| status.lag_entries(v))
        .max();
    let mut code = CheckCode::Ok;
    let mut findings: Vec<String> = Vec::new();
    let mut raise = |c: CheckCode, what: String| {
        code = code.max(c);
        findings.push(what);
    };
    match status.leader() {
        Some(l) => raise(
            CheckCode::Ok,
            format!("leader node {l}, term {}", status.term()),
        ),
        None => raise(
            CheckCode::Critical,
            "no leader: the cluster cannot commit changes".to_string(),
        ),
    }
    let unreachable: Vec<String> = status
        .nodes
        .iter()
        .filter(|n| !n.reachable)
        .map(|n| n.id.to_string())
        .collect();
    if reachable < majority {
        raise(
            CheckCode::Critical,
            format!(
                "only {reachable}/{total} nodes reachable, fewer than a majority (unreachable: {})",
                unreachable.join(", ")
            ),
        );
    } else if !unreachable.is_empty() {
        raise(
            CheckCode::Warning,
            format!(
                "{reachable}/{total} nodes reachable (unreachable: {})",
                unreachable.join(", ")
            ),
        );
    } else {
        raise(
            CheckCode::Ok,
            format!("{reachable}/{total} nodes reachable"),
        );
    }
    for n in &status.nodes {
        if let Some(differs) = n
            .view
            .as_ref()
            .and_then(|v| v.members.config_differs.as_ref())
        {
            raise(CheckCode::Warning, format!("node {}: {differs}", n.id));
        }
    }
    if let Some(lag) = max_lag {
        let c = if lag >= t.lag_crit {
            CheckCode::Critical
        } else if lag >= t.lag_warn {
            CheckCode::Warning
        } else {
            CheckCode::Ok
        };
        raise(c, format!("max lag {lag} entries"));
    }
    let now_ms = now_unix.saturating_mul(1000);
    let lags = status.cluster_lag(now_ms);
    let set_lag_secs = lags
        .iter()
        .flat_map(|n| {
            n.sets
                .iter()
                .map(move |(set, lag)| (n.id, set.as_str(), lag.seconds))
        })
        .max_by(|a, b| a.2.total_cmp(&b.2));
    if let Some((id, set, secs)) = set_lag_secs.filter(|(_, _, secs)| *secs > 0.0) {
        let c = if secs >= t.lag_crit_secs {
            CheckCode::Critical
        } else if secs >= t.lag_warn_secs {
            CheckCode::Warning
        } else {
            CheckCode::Ok
        };
        raise(c, format!("node {id} is {secs:.1} s behind in set {set:?}"));
    }
    let quarantined: Vec<(NodeId, u64)> = status
        .nodes
        .iter()
        .filter_map(|n| Some((n.id, n.files.as_ref()?.quarantined)))
        .filter(|(_, q)| *q > 0)
        .collect();
    let most_quarantined = quarantined.iter().map(|(_, q)| *q).max().unwrap_or(0);
    if !quarantined.is_empty() {
        let c = if t.quarantine_crit > 0 && most_quarantined >= t.quarantine_crit {
            CheckCode::Critical
        } else if t.quarantine_warn > 0 && most_quarantined >= t.quarantine_warn {
            CheckCode::Warning
        } else {
            CheckCode::Ok
        };
        let list: Vec<String> = quarantined
            .iter()
            .map(|(id, q)| format!("node {id}: {q}"))
            .collect();
        raise(
            c,
            format!(
                "quarantine not empty ({}; `clusterctl conflicts` on each lists them)",
                list.join(", ")
            ),
        );
    }
    let held = per_set_notes(status, |s| s.held.as_ref());
    if !held.is_empty() {
        raise(
            CheckCode::Warning,
            format!("held by its validator: {}", held.join("; ")),
        );
    }
    let unwatched = per_set_notes(status, |s| s.unwatched.as_ref());
    if !unwatched.is_empty() {
        raise(
            CheckCode::Warning,
            format!("not watched whole by inotify: {}", unwatched.join("; ")),
        );
    }
    let refused: Vec<String> = status
        .nodes
        .iter()
        .filter_map(|n| Some((n.id, n.files.as_ref()?)))
        .flat_map(|(id, f)| {
            f.sets.iter().flat_map(move |s| {
                s.accounts.iter().flat_map(|a| &a.refused).map(move |r| {
                    format!(
                        "node {id}, set {:?}: {} {:?} (id {}): {}",
                        s.name, r.kind, r.name, r.id, r.reason
                    )
                })
            })
        })
        .collect();
    if !refused.is_empty() {
        raise(
            CheckCode::Warning,
            format!(
                "replicated accounts refused (they collide with a node's own): {}",
                refused.join("; ")
            ),
        );
    }
    // A pause is on purpose; one forgotten for an hour is worth a warning.
    let mut paused: Vec<(String, &crate::core::manifest::Pause)> = Vec::new();
    for n in &status.nodes {
        for s in n.files.iter().flat_map(|f| &f.sets) {
            if let Some(p) = &s.paused {
                if !paused.iter().any(|(name, _)| *name == s.name) {
                    paused.push((s.name.clone(), p));
                }
            }
        }
    }
    for (set, p) in paused {
        let hours = now_unix.saturating_sub(p.since_ms / 1000) as f64 / 3600.0;
        let c = if hours >= 1.0 {
            CheckCode::Warning
        } else {
            CheckCode::Ok
        };
        raise(
            c,
            format!("set {set:?} paused by {} for {hours:.1} h", p.by),
        );
    }
    let soonest = status
        .nodes
        .iter()
        .filter_map(|n| {
            n.cert_not_after_unix
                .map(|u| (n.id, days_left(u, now_unix)))
        })
        .min_by_key(|(_, days)| *days);
    if let Some((id, days)) = soonest {
        if days <= t.cert_crit_days {
            raise(
                CheckCode::Critical,
                format!("certificate of node {id} expires in {days} days"),
            );
        } else if days <= t.cert_warn_days {
            raise(
                CheckCode::Warning,
                format!("certificate of node {id} expires in {days} days"),
            );
        }
    }
    let mut perf = format!(
        "nodes_reachable={reachable};;{majority};0;{total} max_lag_entries={};{};{};0; term={}",
        max_lag.unwrap_or(0),
        t.lag_warn,
        t.lag_crit,
        status.term()
    );
    if let Some((_, _, secs)) = set_lag_secs {
        perf.push_str(&format!(
            " max_set_lag_seconds={secs:.1}s;{};{};0;",
            t.lag_warn_secs, t.lag_crit_secs
        ));
    }
    if status.nodes.iter().any(|n| n.files.is_some()) {
        let opt = |v: u64| if v == 0 { String::new() } else { v.to_string() };
        perf.push_str(&format!(
            " quarantined={most_quarantined};{};{};0;",
            opt(t.quarantine_warn),
            opt(t.quarantine_crit)
        ));
    }
    if let Some((_, days)) = soonest {
        perf.push_str(&format!(
            " cert_days_left={days};{};{};;",
            t.cert_warn_days, t.cert_crit_days
        ));
    }
    (
        code,
        format!(
            "CLUSTERD {} - {} | {perf}",
            code.word(),
            findings.join(", ")
        ),
    )
}

/// `set "NAME" on node ID: NOTE` for every set of every node that `note`
/// picks something of.
fn per_set_notes(
    status: &ClusterStatus,
    note: impl Fn(&SetView) -> Option<&String> + Copy,
) -> Vec<String> {
    status
        .nodes
        .iter()
        .filter_map(|n| Some((n.id, n.files.as_ref()?)))
        .flat_map(|(id, f)| {
            f.sets
                .iter()
                .filter_map(move |s| Some(format!("set {:?} on node {id}: {}", s.name, note(s)?)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::status::{PeerProgress, Role};

    fn view(id: u64, role: Role, applied: u64) -> NodeView {
        NodeView {
            id,
            role,
            term: 7,
            vote: 1,
            leader: Some(1),
            commit_index: 120,
            applied_index: applied,
            first_index: 1,
            last_index: 120,
            stale_term_messages: 0,
            members: Default::default(),
            progress: if role == Role::Leader {
                vec![
                    PeerProgress {
                        id: 1,
                        match_index: 120,
                        recent_active: true,
                    },
                    PeerProgress {
                        id: 2,
                        match_index: 110,
                        recent_active: true,
                    },
                    PeerProgress {
                        id: 3,
                        match_index: 0,
                        recent_active: false,
                    },
                ]
            } else {
                vec![]
            },
        }
    }

    const NOW: u64 = 1_800_000_000;

    fn sample() -> ClusterStatus {
        ClusterStatus {
            node_id: 2,
            nodes: vec![
                NodeEntry {
                    id: 1,
                    addr: "10.0.0.1:7700".into(),
                    reachable: true,
                    view: Some(view(1, Role::Leader, 120)),
                    error: None,
                    rtt_us: Some(300),
                    cert_not_after_unix: Some(NOW + 400 * 86_400),
                    files: None,
                },
                NodeEntry {
                    id: 2,
                    addr: String::new(),
                    reachable: true,
                    view: Some(view(2, Role::Follower, 100)),
                    error: None,
                    rtt_us: None,
                    cert_not_after_unix: Some(NOW + 300 * 86_400),
                    files: None,
                },
                NodeEntry {
                    id: 3,
                    addr: "10.0.0.3:7700".into(),
                    reachable: false,
                    view: None,
                    error: Some("connection refused".into()),
                    rtt_us: None,
                    cert_not_after_unix: None,
                    files: None,
                },
            ],
        }
    }

    #[test]
    fn promote_waits_for_the_applied_index_pinned_at_the_start_and_missing_files() {
        let mut st = sample();
        let plan = promote_plan(&st, 2, None).unwrap();
        assert_eq!(
            (plan.leader, plan.term, plan.must_apply, plan.target_applied),
            (1, 7, 120, 100)
        );
        assert!(!plan.caught_up());
        assert_eq!(plan.waiting_for(), "it has applied entry 100 of 120");
        assert!(
            plan.describe()
                .contains("would first wait until node 2 has caught up"),
            "{}",
            plan.describe()
        );
        assert!(plan.describe().ends_with("Nothing was changed."));

        // The leader committing more meanwhile does not move the goal post.
        st.nodes[0].view.as_mut().unwrap().commit_index = 500;
        st.nodes[1].view.as_mut().unwrap().applied_index = 120;
        st.nodes[1].files = Some(FilesView {
            sets: vec![SetView {
                name: "tacacs".into(),
                missing: 2,
                ..Default::default()
            }],
            ..Default::default()
        });
        let plan = promote_plan(&st, 2, Some(120)).unwrap();
        assert!(
            !plan.caught_up(),
            "committed files still missing on the target"
        );
        assert_eq!(
            plan.waiting_for(),
            "it still lacks 2 committed file(s) of set \"tacacs\""
        );

        st.nodes[1].files.as_mut().unwrap().sets[0].missing = 0;
        st.nodes[1].files.as_mut().unwrap().sets[0].skipping = true;
        let plan = promote_plan(&st, 2, Some(120)).unwrap();
        assert_eq!(
            plan.waiting_for(),
            "set \"tacacs\" waits there for a skip_while marker to disappear"
        );
        st.nodes[1].files.as_mut().unwrap().sets[0].skipping = false;
        let plan = promote_plan(&st, 2, Some(120)).unwrap();
        assert!(plan.caught_up());
        assert!(
            plan.describe().contains("promote would start at once"),
            "{}",
            plan.describe()
        );

        let plan = promote_plan(&st, 1, None).unwrap();
        assert!(plan.already_leads());
        assert!(plan.describe().contains("already leads"));
    }

    #[test]
    fn promote_refuses_strangers_and_witnesses_and_waits_out_unreachable_nodes() {
        let mut st = sample();
        match promote_plan(&st, 9, None) {
            Err(PlanError::Invalid(why)) => {
                assert_eq!(
                    why,
                    "node 9 is not a member of this cluster (members: 1, 2, 3)"
                )
            }
            other => panic!("{other:?}"),
        }
        match promote_plan(&st, 3, None) {
            Err(PlanError::NotNow(why)) => {
                assert_eq!(why, "node 3 is unreachable from node 2: connection refused")
            }
            other => panic!("{other:?}"),
        }
        st.nodes[1].view.as_mut().unwrap().role = Role::Witness;
        assert!(
            matches!(promote_plan(&st, 2, None), Err(PlanError::Invalid(w)) if w.contains("is a witness"))
        );
        for n in &mut st.nodes {
            if let Some(v) = n.view.as_mut() {
                v.leader = None;
            }
        }
        assert!(
            matches!(promote_plan(&st, 1, None), Err(PlanError::NotNow(w)) if w.starts_with("no leader is known"))
        );
    }

    #[test]
    fn json_keeps_the_contract_fields() {
        let j = sample().to_json();
        assert_eq!(j["leader"], 1);
        assert_eq!(j["term"], 7);
        let nodes = j["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 3);
        for n in nodes {
            for key in [
                "id",
                "role",
                "reachable",
                "term",
                "commit_index",
                "applied_index",
            ] {
                assert!(n.get(key).is_some(), "node lacks {key}: {n}");
            }
        }
        assert_eq!(nodes[0]["role"], "leader");
        assert_eq!(nodes[1]["lag_entries"], 20);
        assert_eq!(nodes[1]["match_index"], 110);
        assert_eq!(nodes[2]["role"], "unknown");
        assert_eq!(nodes[2]["reachable"], false);
    }

    #[test]
    fn status_warns_weeks_ahead_of_certificate_expiry() {
        assert_eq!(cert_warning(2, NOW + 60 * 86_400, NOW), None);
        let soon = cert_warning(2, NOW + 20 * 86_400, NOW).unwrap();
        assert!(
            soon.starts_with("node 2: certificate expires in 20 days;"),
            "{soon}"
        );
        let gone = cert_warning(3, NOW - 86_400, NOW).unwrap();
        assert!(gone.contains("has EXPIRED"), "{gone}");
    }

    #[test]
    fn check_judges_set_lag_in_seconds_and_a_non_empty_quarantine() {
        let t = CheckThresholds::default();
        let mut s = sample();
        s.nodes[2] = NodeEntry {
            view: Some(view(3, Role::Follower, 120)),
            reachable: true,
            error: None,
            ..s.nodes[2].clone()
        };
        s.nodes[1].view.as_mut().unwrap().applied_index = 120;
        let set = |seq: u64, recent: Vec<(u64, u64)>| SetView {
            name: "tacacs".into(),
            seq,
            recent,
            ..Default::default()
        };
        let files = |set: SetView, quarantined: u64| FilesView {
            sets: vec![set],
            quarantined,
            ..Default::default()
        };
        let now_ms = NOW * 1000;
        // The leader committed batch 5 at now - 90 s; node 2 has applied up to 4.
        s.nodes[0].files = Some(files(
            set(5, vec![(4, now_ms - 200_000), (5, now_ms - 90_000)]),
            0,
        ));
        s.nodes[1].files = Some(files(set(4, vec![]), 0));
        s.nodes[2].files = Some(files(set(5, vec![]), 0));
        let (code, line) = check(&s, &t, NOW);
        assert_eq!(code, CheckCode::Warning, "{line}");
        assert!(
            line.contains("node 2 is 90.0 s behind in set \"tacacs\""),
            "{line}"
        );
        assert!(
            line.contains(" max_set_lag_seconds=90.0s;60;300;0;"),
            "{line}"
        );

        s.nodes[1].files = Some(files(set(3, vec![]), 0));
        assert_eq!(
            check(&s, &t, NOW).0,
            CheckCode::Warning,
            "batch 4 is 200 s old"
        );
        s.nodes[0].files.as_mut().unwrap().sets[0].recent[0].1 = now_ms - 400_000;
        assert_eq!(check(&s, &t, NOW).0, CheckCode::Critical);

        // Caught up, but node 3 set something aside: WARNING by default,
        // CRITICAL from --quarantine-crit, silent with --quarantine-warn 0.
        s.nodes[1].files = Some(files(set(5, vec![]), 0));
        s.nodes[2].files = Some(files(set(5, vec![]), 2));
        let (code, line) = check(&s, &t, NOW);
        assert_eq!(code, CheckCode::Warning, "{line}");
        assert!(line.contains("quarantine not empty (node 3: 2;"), "{line}");
        assert!(line.contains(" quarantined=2;1;;0;"), "{line}");
        let strict = CheckThresholds {
            quarantine_crit: 2,
            ..t
        };
        assert_eq!(check(&s, &strict, NOW).0, CheckCode::Critical);
        let relaxed = CheckThresholds {
            quarantine_warn: 0,
            ..t
        };
        assert_eq!(check(&s, &relaxed, NOW).0, CheckCode::Ok);
    }

    #[test]
    fn check_maps_findings_to_plugin_codes() {
        let t = CheckThresholds {
            lag_warn: 10,
            lag_crit: 50,
            ..CheckThresholds::default()
        };
        let mut s = sample();
        // Node 3 unreachable, node 2 20 entries behind: both warnings.
        let (code, line) = check(&s, &t, NOW);
        assert_eq!(code, CheckCode::Warning, "{line}");
        assert!(line.starts_with("CLUSTERD WARNING - leader node 1, term 7, 2/3 nodes reachable (unreachable: 3), max lag 20 entries | "), "{line}");
        assert!(line.contains("nodes_reachable=2;;2;0;3 max_lag_entries=20;10;50;0; term=7 cert_days_left=300;30;7;;"), "{line}");

        s.nodes[2] = NodeEntry {
            view: Some(view(3, Role::Follower, 120)),
            reachable: true,
            error: None,
            ..s.nodes[2].clone()
        };
        s.nodes[1].view.as_mut().unwrap().applied_index = 118;
        assert_eq!(
            check(&s, &t, NOW).0,
            CheckCode::Ok,
            "{}",
            check(&s, &t, NOW).1
        );

        // Certificates: a month ahead warns, a week ahead is critical.
        s.nodes[1].cert_not_after_unix = Some(NOW + 20 * 86_400);
        let (code, line) = check(&s, &t, NOW);
        assert_eq!(code, CheckCode::Warning, "{line}");
        assert!(
            line.contains("certificate of node 2 expires in 20 days"),
            "{line}"
        );
        s.nodes[1].cert_not_after_unix = Some(NOW - 86_400);
        assert_eq!(check(&s, &t, NOW).0, CheckCode::Critical);
        s.nodes[1].cert_not_after_unix = Some(NOW + 300 * 86_400);

        s.nodes[1].view.as_mut().unwrap().applied_index = 60;
        assert_eq!(check(&s, &t, NOW).0, CheckCode::Critical);

        for n in &mut s.nodes {
            if let Some(v) = n.view.as_mut() {
                v.leader = None;
            }
        }
        let (code, line) = check(&s, &t, NOW);
        assert_eq!(code, CheckCode::Critical);
        assert!(line.contains("no leader"), "{line}");
    }

    #[test]
    fn check_is_critical_without_a_reachable_majority() {
        let mut s = sample();
        s.nodes[0].reachable = false;
        s.nodes[0].view = None;
        let (code, line) = check(&s, &CheckThresholds::default(), NOW);
        assert_eq!(code, CheckCode::Critical, "{line}");
        assert!(line.contains("only 1/3 nodes reachable"), "{line}");
    }

    #[test]
    fn no_leader_is_null() {
        let mut s = sample();
        for n in &mut s.nodes {
            if let Some(v) = n.view.as_mut() {
                v.leader = None;
            }
        }
        assert!(s.to_json()["leader"].is_null());
        assert!(s.to_table().contains("leader: none"));
    }

    #[test]
    fn table_marks_the_leader_and_unreachable_nodes() {
        let t = sample().to_table();
        assert!(t.starts_with("leader: node 1, term 7"), "{t}");
        assert!(
            t.lines()
                .any(|l| l.starts_with("*1") && l.contains("leader")),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.starts_with(" 3") && l.contains("connection refused")),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.starts_with(" 2") && l.contains("(this node)") && l.contains("20")),
            "{t}"
        );
    }
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS` (UTC), the one time format of
/// `clusterctl`'s tables and of the times in `status --json`.
pub fn utc_time(unix_secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_secs as i64)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| "-".to_string())
}

/// Rows as left-aligned columns two spaces apart, one line each: the one
/// table layout of every `clusterctl` table.
fn aligned<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<w$}", w = widths[c]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `clusterctl conflicts` as a table: one line per quarantined version.
/// The id `clusterctl conflicts` shows for a quarantine record: the node
/// that holds the copy, and eight hex digits of the hash of where it is
/// stored (unique on that node), e.g. `2-3fa9c01b`. Derived, so records
/// written before ids existed have one too.
pub fn conflict_id(record: &Value) -> Option<String> {
    let node = record["node"].as_u64()?;
    let stored = record["stored_at"].as_str()?;
    let hash = blake3::hash(stored.as_bytes()).to_hex();
    Some(format!("{node}-{}", &hash[..8]))
}

/// The node an id of [`conflict_id`] names.
pub fn conflict_node(id: &str) -> Option<u64> {
    let (node, hash) = id.split_once('-')?;
    (hash.len() == 8 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| node.parse().ok())
        .flatten()
}

pub fn conflicts_table(records: &[Value]) -> String {
    if records.is_empty() {
        return "no conflicts: nothing was set aside in quarantine\n".to_string();
    }
    let mut rows: Vec<[String; 7]> = vec![[
        "ID",
        "TIME (UTC)",
        "SET",
        "PATH",
        "NODE",
        "TERM",
        "STORED AT (under data_dir/quarantine)",
    ]
    .map(str::to_string)];
    for r in records {
        let time = r["time_unix_ms"]
            .as_u64()
            .map(|ms| utc_time(ms / 1000))
            .unwrap_or_else(|| "-".to_string());
        let text = |k: &str| {
            r[k].as_str()
                .map(str::to_string)
                .unwrap_or_else(|| r[k].to_string())
        };
        rows.push([
            conflict_id(r).unwrap_or_else(|| "-".to_string()),
            time,
            text("set"),
            text("path"),
            r["node"].to_string(),
            r["term"].to_string(),
            text("stored_at"),
        ]);
    }
    let mut out = aligned(&rows);
    out.push_str(&format!(
        "{} conflict(s); `clusterctl conflicts restore ID` puts one back as a new revision, `clusterctl conflicts drop ID` deletes it\n",
        records.len()
    ));
    out
}

#[cfg(test)]
mod conflicts_tests {
    use super::*;

    #[test]
    fn conflicts_table_lists_set_path_node_term_and_time() {
        assert!(conflicts_table(&[]).starts_with("no conflicts"));
        let r = json!({"set": "tacacs", "path": "tac_plus.conf", "node": 2, "term": 7, "index": 40,
            "time_unix_ms": 1_700_000_000_000u64, "stored_at": "tacacs/1700000000000-40/tac_plus.conf"});
        let t = conflicts_table(std::slice::from_ref(&r));
        let id = conflict_id(&r).unwrap();
        assert!(t.contains(&format!("{id}  2023-11-14 22:13:20  tacacs  tac_plus.conf  2     7     tacacs/1700000000000-40/tac_plus.conf")), "{t}");
        assert!(
            t.ends_with("1 conflict(s); `clusterctl conflicts restore ID` puts one back as a new revision, `clusterctl conflicts drop ID` deletes it\n"),
            "{t}"
        );
        assert!(id.starts_with("2-") && id.len() == 10, "{id}");
        assert_eq!(conflict_node(&id), Some(2));
        assert_eq!(conflict_node("2-xyz"), None);
    }
}
