//! Bringing a tree back to the manifest outside the log's order: deferred
//! sets retried, a follower's periodic walk, and versions fetched from a
//! peer.

use super::*;

impl Applier {
    pub(super) fn retry_deferred(&mut self) {
        if self.shared.leading.load(Ordering::SeqCst) {
            // The leader's trees are the source: nothing to square them with.
            for name in std::mem::take(&mut self.deferred) {
                self.shared.set_skipping(&name, false);
            }
            return;
        }
        for name in std::mem::take(&mut self.deferred) {
            if self.held_here.contains(&name) {
                // Reverted after a failed on_change: left as it is until
                // the set's next committed change.
                self.deferred.insert(name);
                continue;
            }
            let Some(set) = self.shared.set(&name).cloned() else {
                continue;
            };
            let Some(root) = self.roots.remove(&name) else {
                continue;
            };
            match has_marker(&set, &root) {
                Ok(true) => {
                    self.deferred.insert(name.clone());
                }
                Ok(false) => {
                    self.shared.set_skipping(&name, false);
                    let mut store = StoreBatch::default();
                    let touched = match self.reconcile_local(&set, &root, &mut store) {
                        Ok(touched) => touched,
                        Err(e) => {
                            self.shared
                                .note_error(&name, format!("reconciling with the manifest: {e}"));
                            self.deferred.insert(name.clone());
                            true
                        }
                    };
                    if let Err(e) = self.shared.store.write(store) {
                        let _ = self.out.send(Applied::Failed(ApplyError::Store(e)));
                    }
                    // A periodic pass that found everything in place must
                    // not reload the service (`on_change`) every period.
                    if touched {
                        let _ = self.out.send(Applied::SetChanged(name.clone()));
                    }
                }
                Err(e) => {
                    self.shared
                        .note_error(&name, format!("cannot look for skip_while markers: {e}"));
                    self.deferred.insert(name.clone());
                }
            }
            self.roots.insert(name, root);
        }
    }

    /// Makes the local tree match the manifest where it can without content
    /// (directories, links, metadata, deletions) and marks the files whose
    /// content must be fetched. Returns whether it found anything not in
    /// place (and so may have changed the tree).
    pub(super) fn reconcile_local(
        &mut self,
        set: &SetRuntime,
        root: &Root,
        store: &mut StoreBatch,
    ) -> Result<bool, FsError> {
        let index = self.shared.applied.load(Ordering::SeqCst);
        let term = self.shared.term.load(Ordering::SeqCst);
        // The walk keeps only what needs attention: paths the manifest does
        // not have, and committed paths not settled here (see
        // `Applier::settled`); the rest are only marked as seen.
        let mut walked = SeenPaths::default();
        let missing_here: HashSet<SetPath> = self
            .shared
            .missing
            .lock()
            .unwrap()
            .keys()
            .filter(|(s, _)| *s == set.name)
            .map(|(_, p)| p.clone())
            .collect();
        let (found, _) = {
            let m = self.shared.manifest.read().unwrap();
            let committed = m.set(&set.name);
            walk_keeping(set, root, |f| {
                walked.insert(&f.path);
                match committed.and_then(|sm| sm.entries.get(&f.path)) {
                    None => true,
                    Some(e) => missing_here.contains(&f.path) || !self.settled(set, e, f),
                }
            })?
        };
        // Directories whose entries this pass changed, to be given their
        // committed metadata (an mtime) again at the end.
        let mut parents: BTreeSet<SetPath> = BTreeSet::new();
        // A set the cluster has never committed anything for is one the
        // leader has not published yet (a fresh cluster whose nodes already
        // hold the files): nothing here is stray until it has.
        let strays: Vec<&Found> = {
            let m = self.shared.manifest.read().unwrap();
            match m.set(&set.name) {
                Some(sm) if set.mode == SyncMode::Mirror && sm.progress.seq > 0 => found
                    .iter()
                    .filter(|f| {
                        !sm.entries.contains_key(&f.path)
                            && set.holds(&f.path, f.meta.kind == Kind::Dir)
                    })
                    .collect(),
                _ => Vec::new(),
            }
        };
        let mut touched = !strays.is_empty();
        // Deepest first, so a directory's contents go before it.
        for f in strays.iter().rev() {
            let ours = f.meta.kind == Kind::File
                && self
                    .shared
                    .record(&set.name, &f.path)
                    .is_some_and(|r| unchanged_since(&r, &f.meta));
            let c = comps(&f.path);
            parents.extend(f.path.parent());
            // A symlink carries no record of who made it: set it aside
            // like any local edit rather than let it vanish unrecorded.
            if ours {
                root.remove(&c)?;
            } else if f.meta.kind == Kind::Dir {
                if root.list_dir(&c)?.is_none_or(|l| l.is_empty()) {
                    root.remove(&c)?;
                }
            } else {
                self.quarantine(
                    &set.name,
                    root,
                    &f.path,
                    index,
                    term,
                    "the cluster does not have it",
                )?;
            }
        }
        drop(strays);
        // Missing paths the manifest no longer has (deleted or renamed since)
        // have nothing left to fetch.
        {
            let m = self.shared.manifest.read().unwrap();
            let mut missing = self.shared.missing.lock().unwrap();
            let gone: Vec<(String, SetPath)> = missing
                .keys()
                .filter(|(s, p)| *s == set.name && m.get(s, p).is_none())
                .cloned()
                .collect();
            for k in gone {
                store.delete_missing(&k.0, &k.1);
                missing.remove(&k);
            }
        }
        let mut dirs = Vec::new();
        // Sets with `hard_links`: links are made once every file is
        // settled, and an inode here may be the file of one committed name
        // only (with its links): any other name on it gets its own.
        let mut links = Vec::new();
        let mut claimed: HashMap<(u64, u64), SetPath> = HashMap::new();
        // The manifest is read a slice at a time, so a pass over a large set
        // never holds a copy of it, nor its lock while files are written.
        let mut after: Option<SetPath> = None;
        loop {
            let slice: Vec<(SetPath, Entry)> = {
                let m = self.shared.manifest.read().unwrap();
                let Some(sm) = m.set(&set.name) else { break };
                let from = match &after {
                    Some(a) => std::ops::Bound::Excluded(a),
                    None => std::ops::Bound::Unbounded,
                };
                sm.entries
                    .range::<SetPath, _>((from, std::ops::Bound::Unbounded))
                    .take(RECONCILE_SLICE)
                    .map(|(k, e)| (k.clone(), e.clone()))
                    .collect()
            };
            let Some((last, _)) = slice.last() else { break };
            after = Some(last.clone());
            for (path, entry) in slice {
                if !set.holds(&path, entry.meta.kind == EntryKind::Dir) {
                    continue;
                }
                if set.hard_links && entry.link.is_some() {
                    links.push((path, entry));
                    continue;
                }
                let local = match found.binary_search_by(|f| f.path.cmp(&path)) {
                    Ok(i) => Some(found[i].meta),
                    Err(_) if walked.contains(&path) => continue, // settled
                    Err(_) => None,
                };
                touched = true;
                if entry.meta.kind != EntryKind::Dir {
                    parents.extend(path.parent());
                }
                let result = self.reconcile_entry(
                    set,
                    root,
                    &path,
                    &entry,
                    local,
                    &mut claimed,
                    &mut dirs,
                    index,
                    term,
                    store,
                );
                if let Err(e) = result {
                    self.shared.note_error(&set.name, format!("{path}: {e}"));
                }
            }
        }
        touched |= !links.is_empty();
        for (path, entry) in &links {
            parents.extend(path.parent());
            if let Err(e) = self.link_file(set, root, path, entry, None, index, term, store) {
                self.mark_missing(&set.name, path, entry, store);
                self.shared.note_error(&set.name, format!("{path}: {e}"));
            }
        }
        for (path, meta) in dirs.iter().rev() {
            parents.remove(path);
            let _ = root.set_meta(&comps(path), &fs_meta(meta));
        }
        for path in parents.iter().rev() {
            self.settle_dir_meta(&set.name, root, path);
        }
        Ok(touched)
    }

    /// Whether the committed `entry` is exactly what the walk `found` at
    /// its path, as far as a reconcile pass would check it, so the pass
    /// need not look at it again. Sets that keep extended attributes or
    /// hard links are always checked in full (neither shows in `lstat`).
    pub(super) fn settled(&self, set: &SetRuntime, entry: &Entry, found: &Found) -> bool {
        if set.xattrs || set.hard_links {
            return false;
        }
        let same_meta = || meta_matches(&fs_meta(&entry.meta), &found.meta);
        match (entry.meta.kind, found.meta.kind) {
            (EntryKind::Dir, Kind::Dir) => same_meta(),
            (EntryKind::File, Kind::File) => {
                entry.link.is_none()
                    && entry.digest.is_some_and(|d| {
                        self.shared
                            .record(&set.name, &found.path)
                            .is_some_and(|r| unchanged_since(&r, &found.meta) && r.digest == d)
                    })
                    && same_meta()
            }
            _ => false,
        }
    }

    /// [`Applier::reconcile_local`] for one committed entry that is not a
    /// hard link: makes the tree hold it, or marks it missing. `walked` is
    /// what the pass's walk found at `path` (`None`: stat it now).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn reconcile_entry(
        &mut self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        entry: &Entry,
        walked: Option<FileMeta>,
        claimed: &mut HashMap<(u64, u64), SetPath>,
        dirs: &mut Vec<(SetPath, Meta)>,
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<(), FsError> {
        let c = comps(path);
        match entry.meta.kind {
            EntryKind::Dir => {
                dirs.push((path.clone(), entry.meta.clone()));
                self.make_dir(set, root, path, &entry.meta, index, term, true)?;
                self.settle_xattrs(set, root, path, entry)
            }
            EntryKind::Symlink => self.make_symlink(set, root, path, entry, index, term, store),
            // Per path: one path that cannot be checked (a symlink
            // planted where a directory should be, say) must not keep
            // the rest of the set from converging.
            EntryKind::File => {
                let want = entry.digest.expect("files have digests").get();
                let local = match walked {
                    Some(m) => Some(m),
                    None => root.stat(&c)?,
                };
                let mut recorded = None;
                let have = match local {
                    Some(m) if m.kind == Kind::File => {
                        recorded = self
                            .shared
                            .record(&set.name, path)
                            .filter(|r| unchanged_since(r, &m));
                        match recorded {
                            Some(r) => Some(r.digest.get()),
                            None => hash_local(root, &c)?.map(|(h, _)| h.digest()),
                        }
                    }
                    _ => None,
                };
                let Some(m) = local.filter(|_| have == Some(want)) else {
                    self.mark_missing(&set.name, path, entry, store);
                    return Ok(());
                };
                if set.hard_links && m.nlink > 1 {
                    if let Some(other) = claimed.get(&(m.dev, m.ino)) {
                        debug!(set = %set.name, path = %path, "{path} shares its inode with {other} here, but the cluster has them as separate files");
                        let expect = Expect::file(&m);
                        match self.own_inode(set, root, path, entry, expect, index, term, store)? {
                            PutOutcome::Done => self.clear_missing(&set.name, path, store),
                            _ => self.mark_missing(&set.name, path, entry, store),
                        }
                        return Ok(());
                    }
                    claimed.insert((m.dev, m.ino), path.clone());
                }
                let now = self.settle_meta(root, &c, &m, &entry.meta)?;
                self.settle_xattrs(set, root, path, entry)?;
                // An unchanged file keeps its record: rewriting every record
                // of a large set on every pass is most of what a pass wrote.
                let record = record_of(&now, &want);
                if recorded != Some(record) {
                    self.put_record(&set.name, path, record, store);
                }
                self.clear_missing(&set.name, path, store);
                Ok(())
            }
        }
    }

    /// Gives the directory holding `path` its committed metadata again
    /// (writing an entry in it changed its mtime).
    pub(super) fn settle_parent_meta(&self, set: &str, root: &Root, path: &SetPath) {
        if let Some(parent) = path.parent() {
            self.settle_dir_meta(set, root, &parent);
        }
    }

    /// Gives the directory `dir` its committed metadata, if the manifest
    /// has it as a directory.
    pub(super) fn settle_dir_meta(&self, set: &str, root: &Root, dir: &SetPath) {
        let meta = self
            .shared
            .manifest
            .read()
            .unwrap()
            .get(set, dir)
            .map(|e| e.meta.clone());
        if let Some(meta) = meta.filter(|m| m.kind == EntryKind::Dir) {
            let _ = root.set_meta(&comps(dir), &fs_meta(&meta));
        }
    }

    /// Writes fetched committed versions, each still wanted (and checked
    /// against its digest on the way in), as a log batch's files are
    /// written: in parallel, and a group of many made durable by one
    /// `syncfs` before they are renamed in, each directory synced once and
    /// the store written once. A node that joins, or was down, fetches
    /// thousands of files: one by one, each with its fsyncs and store
    /// write, 10,000 files took 198 s instead of 10.
    pub(super) fn apply_fetched(&mut self, group: Vec<Fetched>) {
        let mut store = StoreBatch::default();
        let mut changed: BTreeSet<String> = BTreeSet::new();
        let mut written = 0usize;
        let mut puts: BTreeMap<String, Vec<CheckedOp>> = BTreeMap::new();
        let index = self.shared.applied.load(Ordering::SeqCst);
        // A path fetched twice (asked again while its first answer waited
        // in the queue) is written once, from its last answer: two writes
        // of one path in one group would race each other.
        let mut latest: BTreeMap<(String, SetPath), Fetched> = BTreeMap::new();
        for f in group {
            self.shared
                .fetched_queued
                .fetch_sub(f.patch.len() as u64, Ordering::Relaxed);
            latest.insert((f.set.clone(), f.path.clone()), f);
        }
        for f in latest.into_values() {
            let Some((set, entry)) = self.fetched_still_wanted(&f) else {
                continue;
            };
            if let Some(primary) = entry.link.clone().filter(|_| set.hard_links) {
                if self.link_fetched(&set, &f, &entry, &primary, index, &mut store) {
                    changed.insert(f.set.clone());
                    written += 1;
                }
                continue;
            }
            self.shared
                .counters
                .bytes_fetched
                .fetch_add(f.patch.len() as u64, Ordering::Relaxed);
            puts.entry(f.set).or_default().push(CheckedOp::Put {
                path: f.path,
                // The committed version itself: the local file is judged
                // against it, and nothing new enters the history here.
                previous: Some(entry.clone()),
                entry,
                content: Content::Inline(f.patch),
            });
        }
        for (name, ops) in puts {
            let Some(set) = self.shared.set(&name).cloned() else {
                continue;
            };
            let Some(root) = self.roots.remove(&name) else {
                continue;
            };
            let refs: Vec<&CheckedOp> = ops.iter().collect();
            self.write_files(&set, &root, index, 0, &refs, &mut store);
            let done: Vec<&SetPath> = {
                let missing = self.shared.missing.lock().unwrap();
                ops.iter()
                    .filter_map(|op| match op {
                        CheckedOp::Put { path, .. }
                            if !missing.contains_key(&(name.clone(), path.clone())) =>
                        {
                            Some(path)
                        }
                        _ => None,
                    })
                    .collect()
            };
            for path in &done {
                self.settle_parent_meta(&name, &root, path);
                debug!(set = %name, path = %path, "fetched the committed version of {path}");
            }
            if !done.is_empty() {
                written += done.len();
                changed.insert(name.clone());
            }
            self.roots.insert(name, root);
        }
        if let Err(e) = self.shared.store.write(store) {
            let _ = self.out.send(Applied::Failed(ApplyError::Store(e)));
            return;
        }
        if written > 0 {
            info!(
                files = written,
                "fetched the committed version of {written} file(s) of {}",
                changed
                    .iter()
                    .map(|s| format!("sync set {s:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for set in changed {
            let _ = self.out.send(Applied::SetChanged(set));
        }
    }

    /// The set and committed entry of a fetched version, if it is still
    /// what the manifest wants and its set is not waiting for anything.
    fn fetched_still_wanted(&self, f: &Fetched) -> Option<(SetRuntime, Entry)> {
        let key = (f.set.clone(), f.path.clone());
        let still_wanted = self
            .shared
            .missing
            .lock()
            .unwrap()
            .get(&key)
            .map(|d| d.get())
            == Some(f.want);
        if !still_wanted || self.deferred.contains(&f.set) {
            return None;
        }
        let entry = self
            .shared
            .manifest
            .read()
            .unwrap()
            .get(&f.set, &f.path)
            .cloned()?;
        if entry.digest.map(|d| d.get()) != Some(f.want) {
            return None;
        }
        let set = self.shared.set(&f.set).cloned()?;
        Some((set, entry))
    }

    /// A hard link travels as none of its bytes: made from its primary
    /// once that is the committed version here (else the primary is
    /// fetched first). True when linked.
    fn link_fetched(
        &mut self,
        set: &SetRuntime,
        f: &Fetched,
        entry: &Entry,
        primary: &SetPath,
        index: u64,
        store: &mut StoreBatch,
    ) -> bool {
        let Some(root) = self.roots.remove(&f.set) else {
            return false;
        };
        let mut linked = false;
        match self.holds_committed(set, &root, primary, &f.want) {
            Ok(Some(_)) => {
                let term = self.shared.term.load(Ordering::SeqCst);
                match self.link_file(set, &root, &f.path, entry, None, index, term, store) {
                    Err(e) => self.shared.note_error(&f.set, format!("{}: {e}", f.path)),
                    Ok(_) => {
                        // Linking changed the directory's mtime.
                        self.settle_parent_meta(&f.set, &root, &f.path);
                        debug!(set = %f.set, path = %f.path, "linked {} to {primary}", f.path);
                        linked = true;
                    }
                }
            }
            Ok(None) => {
                // The primary here is not the committed version (edited
                // by hand, say): it is fetched first.
                let pentry = self
                    .shared
                    .manifest
                    .read()
                    .unwrap()
                    .get(&f.set, primary)
                    .cloned();
                if let Some(pentry) = pentry {
                    self.mark_missing(&f.set, primary, &pentry, store);
                }
            }
            Err(e) => self.shared.note_error(&f.set, format!("{}: {e}", f.path)),
        }
        self.roots.insert(f.set.clone(), root);
        linked
    }
}
