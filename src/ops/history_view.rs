//! `clusterctl history`, `show` and `diff` on the client side: the calls
//! to a node's admin service and what is printed of their answers. The
//! node answers from its own history (`replication::history`); the diff
//! is assembled here, one path at a time, from the two states asked for.

use std::collections::BTreeSet;

use tonic::transport::Channel;

use crate::core::history::{content_diff, revisions_table};
use crate::core::paths::SetPath;
use crate::net::proto::admin::admin_client::AdminClient;
use crate::net::proto::admin::{HistoryReply, HistoryRequest, VersionReply, VersionRequest};

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("{0}")]
    Refused(String),
    #[error("the node's answer is not what this clusterctl understands: {0}")]
    Answer(String),
    #[error("{path} did not exist at revision {rev}")]
    Absent { path: String, rev: u64 },
    #[error("{path} is a directory at revision {rev}; list what changed in it with `clusterctl history SET {path}`")]
    Directory { path: String, rev: u64 },
    #[error("--from {from} must be below --to {to}")]
    Range { from: u64, to: u64 },
}

fn refused(s: tonic::Status) -> ViewError {
    ViewError::Refused(s.message().to_string())
}

async fn history(
    client: &mut AdminClient<Channel>,
    req: HistoryRequest,
) -> Result<(HistoryReply, serde_json::Value), ViewError> {
    let reply = client.history(req).await.map_err(refused)?.into_inner();
    let json: serde_json::Value = serde_json::from_str(&reply.revisions_json)
        .map_err(|e| ViewError::Answer(e.to_string()))?;
    Ok((reply, json))
}

/// `clusterctl history`: the table, or the JSON array with `json`.
pub async fn list(
    client: &mut AdminClient<Channel>,
    set: &str,
    path: Option<&str>,
    limit: u32,
    json: bool,
) -> Result<String, ViewError> {
    let (reply, value) = history(
        client,
        HistoryRequest {
            set: set.to_string(),
            path: path.unwrap_or_default().to_string(),
            limit,
            after: 0,
            up_to: 0,
        },
    )
    .await?;
    if json {
        return Ok(format!("{value}\n"));
    }
    let revisions = revisions_from_json(&value)?;
    let mut out = revisions_table(&revisions);
    if out.is_empty() {
        out = format!(
            "no revisions of sync set {set:?}{} in this node's history\n",
            path.map(|p| format!(" changed {p}")).unwrap_or_default()
        );
    }
    if reply.oldest != 0 {
        out.push_str(&format!("(oldest revision kept: {})\n", reply.oldest));
    }
    Ok(out)
}

/// The JSON array back as revisions (for the table).
fn revisions_from_json(
    value: &serde_json::Value,
) -> Result<Vec<(u64, crate::core::history::Revision)>, ViewError> {
    use crate::core::history::{Change, ChangeOp, Revision};
    let bad = || ViewError::Answer("a revision without its fields".to_string());
    let mut out = Vec::new();
    for r in value.as_array().ok_or_else(bad)? {
        let num = |k: &str| r.get(k).and_then(|v| v.as_u64()).ok_or_else(bad);
        let mut changes = Vec::new();
        for c in r
            .get("changes")
            .and_then(|c| c.as_array())
            .ok_or_else(bad)?
        {
            let path = c.get("path").and_then(|p| p.as_str()).ok_or_else(bad)?;
            changes.push(Change {
                path: SetPath::from_network(path.as_bytes())
                    .map_err(|e| ViewError::Answer(e.to_string()))?,
                op: c
                    .get("op")
                    .and_then(|o| o.as_str())
                    .and_then(ChangeOp::from_symbol)
                    .ok_or_else(bad)?,
                size: c.get("size").and_then(|s| s.as_u64()).ok_or_else(bad)?,
            });
        }
        out.push((
            num("revision")?,
            Revision {
                time_ms: num("time")? * 1000,
                term: num("term")?,
                leader: num("leader")?,
                changes,
                stored_bytes: 0,
            },
        ));
    }
    Ok(out)
}

async fn version(
    client: &mut AdminClient<Channel>,
    set: &str,
    path: &str,
    revision: u64,
) -> Result<VersionReply, ViewError> {
    Ok(client
        .version(VersionRequest {
            set: set.to_string(),
            path: path.to_string(),
            revision,
            with_content: true,
        })
        .await
        .map_err(refused)?
        .into_inner())
}

/// `clusterctl show`: the content `path` had at `rev` (a symlink's target,
/// with a newline).
pub async fn show(
    client: &mut AdminClient<Channel>,
    set: &str,
    path: &str,
    rev: u64,
) -> Result<Vec<u8>, ViewError> {
    let v = version(client, set, path, rev).await?;
    match (v.exists, v.kind.as_str()) {
        (false, _) => Err(ViewError::Absent {
            path: path.to_string(),
            rev,
        }),
        (true, "dir") => Err(ViewError::Directory {
            path: path.to_string(),
            rev,
        }),
        (true, "symlink") => {
            let mut t = v.symlink_target;
            t.push(b'\n');
            Ok(t)
        }
        _ => Ok(v.content),
    }
}

/// `clusterctl diff`: what changed in `set` (or under `path`) from `from`
/// to `to` (default: what the node applied). Returns the text and whether
/// every path could be shown.
pub async fn diff(
    client: &mut AdminClient<Channel>,
    set: &str,
    path: Option<&str>,
    from: u64,
    to: Option<u64>,
) -> Result<(String, bool), ViewError> {
    let (reply, value) = history(
        client,
        HistoryRequest {
            set: set.to_string(),
            path: path.unwrap_or_default().to_string(),
            limit: 0,
            after: from,
            up_to: to.unwrap_or(0),
        },
    )
    .await?;
    let to = to.unwrap_or(reply.applied);
    if from >= to {
        return Err(ViewError::Range { from, to });
    }
    let paths: BTreeSet<String> = revisions_from_json(&value)?
        .into_iter()
        .flat_map(|(_, r)| r.changes.into_iter().map(|c| c.path.to_string()))
        .collect();
    let mut out = String::new();
    let mut complete = true;
    for p in paths {
        let (old, new) = match (
            version(client, set, &p, from).await,
            version(client, set, &p, to).await,
        ) {
            (Ok(o), Ok(n)) => (o, n),
            (Err(e), _) | (_, Err(e)) => {
                out.push_str(&format!("{p}: cannot be shown: {e}\n"));
                complete = false;
                continue;
            }
        };
        out.push_str(&render(&p, from, &old, to, &new));
    }
    Ok((out, complete))
}

/// One path's difference between two states.
fn render(path: &str, from: u64, old: &VersionReply, to: u64, new: &VersionReply) -> String {
    let kind = |v: &VersionReply| v.exists.then(|| v.kind.clone());
    let mut out = String::new();
    match (kind(old), kind(new)) {
        (None, None) => return out,
        (Some(k), None) if k != "file" => out.push_str(&format!("{path}: {k} deleted\n")),
        (None, Some(k)) if k != "file" => out.push_str(&format!("{path}: {k} created\n")),
        (Some(a), Some(b)) if a != b => {
            out.push_str(&format!("{path}: {a} became {b}\n"));
            return out;
        }
        _ => {}
    }
    fn file(v: &VersionReply) -> Option<&[u8]> {
        (v.exists && v.kind == "file").then_some(&v.content[..])
    }
    if file(old).is_some() || file(new).is_some() {
        let p = SetPath::from_network(path.as_bytes()).ok();
        if let Some(p) = &p {
            out.push_str(&content_diff(p, (from, file(old)), (to, file(new))));
        }
    }
    if old.exists && new.exists {
        if old.mode != new.mode {
            out.push_str(&format!(
                "{path}: mode {:04o} -> {:04o}\n",
                old.mode, new.mode
            ));
        }
        if (old.uid, old.gid) != (new.uid, new.gid) {
            out.push_str(&format!(
                "{path}: owner {}:{} -> {}:{}\n",
                old.uid, old.gid, new.uid, new.gid
            ));
        }
        if old.symlink_target != new.symlink_target {
            out.push_str(&format!(
                "{path}: symlink -> {} becomes -> {}\n",
                String::from_utf8_lossy(&old.symlink_target),
                String::from_utf8_lossy(&new.symlink_target)
            ));
        }
        if old.mtime_unix_ns != new.mtime_unix_ns
            && old.content == new.content
            && old.mode == new.mode
        {
            out.push_str(&format!("{path}: mtime changed\n"));
        }
    }
    out
}
