//! `clusterctl conflicts restore` and `drop` on the node that holds a
//! quarantined copy: finding it by its id (`core::status::conflict_id`),
//! reading it for a restore (which the leader then carries out as a
//! rollback of that one path), and deleting it with its record.
//!
//! Invariant owned here: `records.jsonl` is only ever replaced whole and
//! atomically, so a crash leaves the old or the new list, never a torn one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde_json::Value;

use crate::core::status::conflict_id;
use crate::replication::shared::Shared;

/// A quarantined file, read for a restore.
#[derive(Debug)]
pub struct QuarantinedFile {
    pub set: String,
    pub path: String,
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i128,
}

impl Shared {
    fn quarantine_dir(&self) -> PathBuf {
        self.data_dir.join("quarantine")
    }

    /// The record of `id` on this node, and the other lines.
    fn find_conflict(&self, id: &str) -> Result<(Value, Vec<String>), String> {
        let file = self.quarantine_dir().join("records.jsonl");
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        };
        let mut found = None;
        let mut rest = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Value>(line) {
                Ok(r) if found.is_none() && conflict_id(&r).as_deref() == Some(id) => {
                    found = Some(r)
                }
                _ => rest.push(line.to_string()),
            }
        }
        let found = found.ok_or_else(|| {
            format!("node {} holds no quarantined copy with id {id:?}; `clusterctl conflicts` lists the ids", self.node_id)
        })?;
        Ok((found, rest))
    }

    /// The quarantined file `id` names, for a restore.
    pub fn quarantined(&self, id: &str) -> Result<QuarantinedFile, String> {
        let (record, _) = self.find_conflict(id)?;
        let text = |k: &str| record[k].as_str().unwrap_or_default().to_string();
        let stored = self.stored_copy(&record)?;
        if record["accounts"].as_bool() == Some(true) {
            // A whole database of one node: restoring it as the set's
            // records would replicate its system accounts.
            return Err(format!(
                "the quarantined copy {id} is node {}'s whole {} of accounts set {:?}, not a record; take what you need from {} and recreate it with useradd/usermod on the leader",
                self.node_id,
                text("path"),
                text("set"),
                stored.display()
            ));
        }
        let meta = fs::symlink_metadata(&stored).map_err(|e| {
            format!(
                "the quarantined copy {id} ({}) cannot be read: {e}",
                stored.display()
            )
        })?;
        if !meta.is_file() {
            return Err(format!(
                "the quarantined copy {id} ({}) is not a file; only a file can be restored (copy it back by hand)",
                stored.display()
            ));
        }
        let content = fs::read(&stored).map_err(|e| {
            format!(
                "the quarantined copy {id} ({}) cannot be read: {e}",
                stored.display()
            )
        })?;
        Ok(QuarantinedFile {
            set: text("set"),
            path: text("path"),
            content,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }

    /// Deletes the quarantined copy `id` names and its record.
    pub fn drop_quarantined(&self, id: &str) -> Result<String, String> {
        let (record, rest) = self.find_conflict(id)?;
        let stored = self.stored_copy(&record)?;
        let file = self.quarantine_dir().join("records.jsonl");
        let tmp = file.with_extension("jsonl.tmp");
        let written = fs::File::create(&tmp).and_then(|mut f| {
            for line in &rest {
                writeln!(f, "{line}")?;
            }
            f.sync_all()
        });
        written
            .and_then(|()| fs::rename(&tmp, &file))
            .and_then(|()| fs::File::open(self.quarantine_dir())?.sync_all())
            .map_err(|e| format!("cannot rewrite {}: {e}", file.display()))?;
        let removed = match fs::symlink_metadata(&stored) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&stored),
            Ok(_) => fs::remove_file(&stored),
            Err(_) => Ok(()),
        };
        if let Err(e) = removed {
            return Err(format!(
                "dropped the record of {id}, but cannot remove {}: {e}",
                stored.display()
            ));
        }
        // The stamp directory it was in, once empty.
        if let Some(stamp) = stored.parent() {
            let _ = fs::remove_dir(stamp);
        }
        self.counters
            .quarantined
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| Some(n.saturating_sub(1)),
            )
            .ok();
        Ok(format!(
            "dropped quarantined copy {id} ({} of sync set {}) on node {}",
            record["path"].as_str().unwrap_or("?"),
            record["set"].as_str().unwrap_or("?"),
            self.node_id
        ))
    }

    /// Where a record's copy is, refused if it would lie outside the
    /// quarantine directory (a record edited by hand).
    fn stored_copy(&self, record: &Value) -> Result<PathBuf, String> {
        let stored = record["stored_at"].as_str().unwrap_or_default();
        let rel = std::path::Path::new(stored);
        if stored.is_empty()
            || rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!("the quarantine record's stored_at {stored:?} is not a path under data_dir/quarantine"));
        }
        Ok(self.quarantine_dir().join(rel))
    }
}
