//! Setting local versions aside before they are replaced or deleted
//! (invariant 4): into `data_dir/quarantine`, with a record of where from.

use super::*;

impl Applier {
    /// Moves whatever is at `path` into quarantine, with a record line.
    pub(super) fn quarantine(
        &self,
        set: &str,
        root: &Root,
        path: &SetPath,
        index: u64,
        term: u64,
        why: &str,
    ) -> Result<(), FsError> {
        self.quarantine_at(set, root, &comps(path), path, index, term, why)
    }

    /// Quarantines what a guarded swap displaced (an edit that landed
    /// between the check and the rename), if anything.
    #[allow(clippy::too_many_arguments)]
    /// Sets aside what a replacement displaced unexpectedly: an edit saved
    /// while the committed version was being written.
    pub(super) fn set_aside_edited_during_write(
        &self,
        set: &str,
        root: &Root,
        replaced: &crate::fs::root::Replaced,
        path: &SetPath,
        index: u64,
        term: u64,
    ) -> Result<(), FsError> {
        self.quarantine_displaced(
            set,
            root,
            &replaced.displaced,
            path,
            index,
            term,
            "it was edited while the committed version was being written",
        )
    }

    pub(super) fn quarantine_displaced(
        &self,
        set: &str,
        root: &Root,
        displaced: &Option<Vec<Vec<u8>>>,
        path: &SetPath,
        index: u64,
        term: u64,
        why: &str,
    ) -> Result<(), FsError> {
        let Some(at) = displaced else {
            return Ok(());
        };
        let at: Vec<&[u8]> = at.iter().map(|c| c.as_slice()).collect();
        self.quarantine_at(set, root, &at, path, index, term, why)
    }

    /// [`Applier::quarantine`] of an entry that stands at `at` (a temporary
    /// name a guarded replace left it under) but belongs to `path`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn quarantine_at(
        &self,
        set: &str,
        root: &Root,
        at: &[&[u8]],
        path: &SetPath,
        index: u64,
        term: u64,
        why: &str,
    ) -> Result<(), FsError> {
        let Some(q) = &self.quarantine else {
            return Err(FsError::Io {
                root: self
                    .shared
                    .data_dir
                    .join("quarantine")
                    .display()
                    .to_string(),
                path: ".".into(),
                op: "open quarantine",
                error: std::io::Error::other(
                    "the quarantine directory is unusable; refusing to overwrite a local change",
                ),
            });
        };
        let stamp = format!("{}-{index}", unix_ms());
        let mut dest: Vec<Vec<u8>> = vec![set.as_bytes().to_vec(), stamp.clone().into_bytes()];
        dest.extend(path.components().map(|c| c.to_vec()));
        let local = root.stat(at)?;
        let local_hash = match local {
            Some(m) if m.kind == Kind::File => hash_local(root, at)?.map(|(h, _)| h.digest().hex()),
            _ => None,
        };
        if !root.move_aside(at, q, &dest)? {
            return Ok(());
        }
        self.shared
            .counters
            .quarantined
            .fetch_add(1, Ordering::Relaxed);
        let record = serde_json::json!({
            "set": set, "path": path.to_string(), "node": self.shared.node_id, "term": term, "index": index,
            "local_hash": local_hash, "reason": why, "time_unix_ms": unix_ms(),
            "stored_at": format!("{set}/{stamp}/{path}"),
        });
        let line = format!("{record}\n");
        let file = self
            .shared
            .data_dir
            .join("quarantine")
            .join("records.jsonl");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, line.as_bytes())?;
                f.sync_all()
            });
        if let Err(e) = written {
            warn!("cannot append to {}: {e}", file.display());
        }
        warn!(set, path = %path, index, term, "moved the local version of {path} in sync set {set:?} to quarantine ({why}); `clusterctl conflicts` lists it");
        Ok(())
    }
}
