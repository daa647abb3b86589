//! Writing committed entries into a sync tree: files (from the log, a
//! staged upload or a link), directories, symlinks, metadata, removals and
//! renames, each checked against the local entry first.

use super::*;

impl Applier {
    /// Writes the files of one batch, [`WRITERS`] at a time, and makes
    /// them durable. A batch of at least [`GROUP_DURABLE_FILES`] files is
    /// written in phases: every new version is written and verified under
    /// its temporary name, one `syncfs` makes them all durable, then they
    /// are renamed in and their directories synced once (invariant 2, at a
    /// journal commit per batch rather than per file: a 300,000-file first
    /// sync spent half its time in fsyncs). Smaller batches (an edit) fsync
    /// each file, which costs less than flushing the whole filesystem.
    /// Returns whether a `syncfs` made everything the batch did so far
    /// durable.
    pub(super) fn write_files(
        &self,
        set: &SetRuntime,
        root: &Root,
        index: u64,
        term: u64,
        puts: &[&CheckedOp],
        store: &mut StoreBatch,
    ) -> bool {
        if puts.is_empty() {
            return false;
        }
        let started = Instant::now();
        let grouped = puts.len() >= GROUP_DURABLE_FILES;
        let prepared: std::sync::Mutex<Vec<PreparedPut>> = Default::default();
        let defer = grouped.then_some(&prepared);
        self.in_parallel(set, puts, store, |op, local, errors| {
            let CheckedOp::Put {
                path,
                entry,
                content,
                previous,
            } = op
            else {
                return;
            };
            let outcome = self.put_file(
                set,
                root,
                path,
                entry,
                content,
                previous.as_ref(),
                index,
                term,
                defer,
                local,
            );
            if let Err(e) = self.settle_put(set, path, entry, index, outcome, local) {
                errors.push(format!("entry {index}: {e}"));
            }
        });
        let prepared = prepared.into_inner().unwrap();
        let wrote = started.elapsed();
        let mut synced = false;
        if !prepared.is_empty() {
            let durable = root.sync_filesystem();
            synced = durable.is_ok();
            let prepared: Vec<&PreparedPut> = prepared.iter().collect();
            self.in_parallel(set, &prepared, store, |p, local, errors| {
                let result = match &durable {
                    Ok(()) => self.swap_prepared(set, root, p, index, term, local),
                    Err(e) => {
                        root.discard_prepared(&p.prepared);
                        Err(FsError::Io {
                            root: root.path().display().to_string(),
                            op: "make the batch durable before renaming",
                            path: p.path.to_string(),
                            error: std::io::Error::other(e.to_string()),
                        })
                    }
                };
                match result {
                    Ok(()) => self.clear_missing(&set.name, &p.path, local),
                    Err(e) => {
                        self.mark_missing(&set.name, &p.path, p.entry, local);
                        errors.push(format!("entry {index}: {e}"));
                    }
                }
            });
        }
        let parents: BTreeSet<Option<SetPath>> = puts
            .iter()
            .filter_map(|op| match op {
                CheckedOp::Put { path, .. } => Some(path.parent()),
                _ => None,
            })
            .collect();
        // One journal commit covers the renames of many directories.
        if grouped && parents.len() > DIR_FSYNCS_PER_BATCH {
            match root.sync_filesystem() {
                Ok(()) => synced = true,
                Err(e) => self
                    .shared
                    .note_error(&set.name, format!("entry {index}: {e}")),
            }
        } else {
            for parent in parents {
                let c: Vec<&[u8]> = parent
                    .as_ref()
                    .map(|p| p.components().collect())
                    .unwrap_or_default();
                if let Err(e) = root.sync_dir(&c) {
                    self.shared
                        .note_error(&set.name, format!("entry {index}: {e}"));
                }
            }
        }
        debug!(set = %set.name, index, files = puts.len(), took = ?started.elapsed(), wrote = ?wrote, "wrote a batch's files");
        synced
    }

    /// Runs `work` on every item, [`WRITERS`] threads at a time, each with
    /// its own store batch and error list, merged into `store` and the
    /// set's errors afterwards.
    fn in_parallel<T: Sync>(
        &self,
        set: &SetRuntime,
        items: &[T],
        store: &mut StoreBatch,
        work: impl Fn(&T, &mut StoreBatch, &mut Vec<String>) + Sync,
    ) {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let workers = WRITERS.min(items.len());
        let results: Vec<(StoreBatch, Vec<String>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut local = StoreBatch::default();
                        let mut errors = Vec::new();
                        while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
                            work(item, &mut local, &mut errors);
                        }
                        (local, errors)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a file writer panicked"))
                .collect()
        });
        for (local, errors) in results {
            store.extend(local);
            for e in errors {
                self.shared.note_error(&set.name, e);
            }
        }
    }

    /// Renames a prepared version in (see [`Root::swap_prepared`]) once the
    /// batch is durable, and records it as [`Applier::put_file`] would have.
    fn swap_prepared(
        &self,
        set: &SetRuntime,
        root: &Root,
        p: &PreparedPut,
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<(), FsError> {
        let replaced = root.swap_prepared(&p.prepared, p.expect)?;
        self.set_aside_edited_during_write(&set.name, root, &replaced, &p.path, index, term)?;
        self.xattrs_notice(set, root);
        if let Some(sig) = &p.signature {
            store.put_signature(&set.name, &p.path, sig);
        }
        self.put_record(
            &set.name,
            &p.path,
            record_of(&replaced.meta, &p.target),
            store,
        );
        Ok(())
    }

    /// Removes what stands at `path` when the cluster knows it (`known`: it
    /// is what this node last wrote or the committed version), else moves it
    /// to quarantine with `why`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn clear_way(
        &self,
        known: bool,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        index: u64,
        term: u64,
        why: &str,
    ) -> Result<(), FsError> {
        if known {
            root.remove(&comps(path))?;
            Ok(())
        } else {
            self.quarantine(&set.name, root, path, index, term, why)
        }
    }

    /// What stands at `path` before a new version (`what`) goes in there: a
    /// regular file is returned for the caller to look at; an entry of
    /// another kind is cleared out of the way (removed when the cluster knows
    /// it, else quarantined).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn local_file(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        previous: Option<&Entry>,
        index: u64,
        term: u64,
        what: &str,
    ) -> Result<Option<FileMeta>, FsError> {
        match root.stat(&comps(path))? {
            Some(m) if m.kind == Kind::File => Ok(Some(m)),
            Some(m) => {
                let known = previous.is_some_and(|p| p.meta.kind == entry_kind(m.kind));
                let why = format!("a different kind of entry stood where the cluster put {what}");
                self.clear_way(known, set, root, path, index, term, &why)?;
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// What the local file `m` at `path` holds: by this node's record while
    /// lstat says the file is untouched since, else hashed (the hasher is
    /// returned too, for a delta's base).
    pub(super) fn local_digest(
        &self,
        set: &str,
        root: &Root,
        path: &SetPath,
        m: &FileMeta,
    ) -> Result<(Option<FileDigest>, Option<FileHasher>), FsError> {
        if let Some(r) = self
            .shared
            .record(set, path)
            .filter(|r| unchanged_since(r, m))
        {
            return Ok((Some(r.digest.get()), None));
        }
        Ok(match hash_local(root, &comps(path))? {
            Some((h, _)) => (Some(h.digest()), Some(h)),
            None => (None, None),
        })
    }

    /// What the swap of a new version may displace at `path`: the local file
    /// `m` when the cluster knows it (`known`), else nothing, once `m` was
    /// moved to quarantine (invariant 4).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn keep_or_quarantine(
        &self,
        set: &str,
        root: &Root,
        path: &SetPath,
        m: &FileMeta,
        known: bool,
        index: u64,
        term: u64,
    ) -> Result<Expect, FsError> {
        if known {
            return Ok(Expect::file(m));
        }
        let why = "it differed from what the cluster last committed";
        self.quarantine(set, root, path, index, term, why)?;
        Ok(Expect::Absent)
    }

    /// Whether the local file at `path` is one the cluster knows: what this
    /// node last wrote or read there, or the committed `previous` version.
    pub(super) fn local_is_known(
        &self,
        set: &str,
        path: &SetPath,
        local: &FileDigest,
        previous: Option<&Entry>,
    ) -> bool {
        self.shared
            .record(set, path)
            .is_some_and(|r| r.digest.get() == *local)
            || previous
                .and_then(|p| p.digest)
                .is_some_and(|d| d.get() == *local)
    }

    /// The `len` bytes at `offset` of staged upload `upload` (removed
    /// afterwards when `remove`), or why the put cannot use them.
    pub(super) fn read_staged(
        &self,
        upload: u64,
        offset: u64,
        len: u64,
        remove: bool,
    ) -> Result<Vec<u8>, PutOutcome> {
        if len > self.shared.staging_limit()
            || offset.saturating_add(len) > self.shared.upload_limit()
        {
            return Err(PutOutcome::Refused(format!(
                "its staged patch claims {len} bytes at {offset}, more than any sync set's max_file_size allows"
            )));
        }
        let staged = self.shared.staged_path(upload);
        // Read exactly `len` bytes, never what a sparse file claims.
        let read = std::fs::File::open(&staged).and_then(|f| {
            let mut b = vec![0u8; len as usize];
            f.read_exact_at(&mut b, offset)?;
            Ok(b)
        });
        match read {
            Ok(b) => {
                if remove {
                    let _ = std::fs::remove_file(&staged);
                }
                Ok(b)
            }
            Err(_) => Err(PutOutcome::Missing(
                "its staged content is not here (this node was not reachable when the leader staged it)".into(),
            )),
        }
    }

    /// Where the committed content of a put comes from: its patch (inline,
    /// or read from its staged upload; a `Staged` upload is removed once
    /// read when `consume`), or the finished file made of it when it was
    /// staged.
    pub(super) fn committed_source<'c>(
        &self,
        content: &'c Content,
        target: &FileDigest,
        consume: bool,
    ) -> Result<CommittedSource<'c>, PutOutcome> {
        Ok(match content {
            Content::Unchanged => CommittedSource::Unchanged,
            Content::Inline(b) => CommittedSource::Patch(std::borrow::Cow::Borrowed(&b[..])),
            // A `Staged` upload holds this one patch and goes with it; a
            // `Blob`'s is the batch's, removed once the batch applied.
            Content::Staged { upload, len } => {
                CommittedSource::Patch(self.read_staged(*upload, 0, *len, consume)?.into())
            }
            Content::Blob {
                upload,
                offset,
                len,
            } => {
                let file = self
                    .shared
                    .finished_dir(*upload)
                    .join(Shared::finished_name(*offset, target));
                if file.symlink_metadata().is_ok() {
                    CommittedSource::Finished {
                        file,
                        upload: *upload,
                        offset: *offset,
                    }
                } else {
                    CommittedSource::Patch(self.read_staged(*upload, *offset, *len, false)?.into())
                }
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn put_file<'e>(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &'e SetPath,
        entry: &'e Entry,
        content: &Content,
        previous: Option<&Entry>,
        index: u64,
        term: u64,
        defer: Option<&std::sync::Mutex<Vec<PreparedPut<'e>>>>,
        store: &mut StoreBatch,
    ) -> Result<PutOutcome, FsError> {
        let target = entry.digest.expect("a put carries a digest").get();
        let c = comps(path);
        let meta = fs_meta(&entry.meta);
        let local = self.local_file(set, root, path, previous, index, term, "a file")?;
        // What the final rename may displace without a second look: the
        // file checked here, or nothing once it was moved aside.
        let mut expect = local.as_ref().map_or(Expect::Absent, Expect::file);
        let (mut local_digest, mut local_hasher) = match &local {
            Some(m) => self.local_digest(&set.name, root, path, m)?,
            None => (None, None),
        };
        if let (Some(m), true) = (local, local_digest == Some(target)) {
            if set.hard_links && m.nlink > 1 {
                // Other names share this inode here, but the committed
                // version is this name's own (a `Put` ends its links, see
                // `FileOp::Link`): give it an inode of its own first, so
                // the others keep their metadata.
                return self.own_inode(set, root, path, entry, expect, index, term, store);
            }
            // Replayed, or the same bytes: only metadata may differ.
            let now = self.settle_meta(root, &c, &m, &entry.meta)?;
            self.settle_xattrs(set, root, path, entry)?;
            self.put_record(&set.name, path, record_of(&now, &target), store);
            return Ok(PutOutcome::Done);
        }
        if let (Some(d), Some(m)) = (local_digest, &local) {
            let known = self.local_is_known(&set.name, path, &d, previous);
            expect = self.keep_or_quarantine(&set.name, root, path, m, known, index, term)?;
            if !known {
                local_digest = None;
                local_hasher = None;
            }
        }
        let patch_bytes = match self.committed_source(content, &target, true) {
            Ok(CommittedSource::Unchanged) => {
                return Ok(PutOutcome::Missing(
                    "metadata-only change, but the local content is not the committed one".into(),
                ))
            }
            Ok(CommittedSource::Patch(b)) => b,
            // Made into a finished file when it was staged: linked in.
            Ok(CommittedSource::Finished { upload, offset, .. }) => {
                if previous.is_none() && history_links(set) {
                    // A first version is kept in the history as this very
                    // inode: linked here, by the writer threads, rather
                    // than one by one after the batch.
                    let finished = self
                        .shared
                        .finished_dir(upload)
                        .join(Shared::finished_name(offset, &target));
                    crate::replication::history::link_first_version(
                        &self.shared,
                        &finished,
                        &target,
                    );
                }
                return self.put_finished(
                    set, root, path, entry, upload, offset, expect, index, term, store,
                );
            }
            Err(outcome) => return Ok(outcome),
        };
        let patch = match Patch::decode(&patch_bytes) {
            Ok(p) => p,
            Err(e) => return Ok(PutOutcome::Refused(format!("its patch is unusable: {e}"))),
        };
        if let Some(base) = patch.base() {
            if local_digest != Some(*base) {
                return Ok(PutOutcome::Missing(format!(
                    "the patch is against {base}, which this node does not hold"
                )));
            }
        }
        self.ensure_parents_with(set, root, path, index, term, defer.is_none())?;
        let written: FileMeta;
        if let Patch::Append { base, .. } = &patch {
            let key = (set.name.clone(), path.clone());
            let hasher = match local_hasher.or_else(|| {
                self.shared
                    .append_hashers
                    .lock()
                    .unwrap()
                    .get(&key)
                    .filter(|(h, _)| h.digest() == *base)
                    .map(|(h, _)| h.clone())
            }) {
                Some(h) => h,
                None => match hash_local(root, &c)? {
                    Some((h, _)) => h,
                    None => return Ok(PutOutcome::Missing("the file to append to is gone".into())),
                },
            };
            let tail = match delta::apply_tail(&hasher, &patch, &target, set.max_file_size) {
                Ok(t) => t,
                Err(e) => {
                    return Ok(PutOutcome::Refused(format!(
                        "the appended bytes do not verify: {e}"
                    )))
                }
            };
            written = root.append_file(&c, base.len, &tail, &meta)?;
            // Extended in place, so the attributes are too.
            self.settle_xattrs(set, root, path, entry)?;
            let mut h = hasher;
            h.update(&tail);
            if let Ok(Some((file, _))) = root.open_file(&c) {
                if let Ok(fp) = fingerprint(&file, h.len()) {
                    self.shared
                        .append_hashers
                        .lock()
                        .unwrap()
                        .insert(key, (h, fp));
                }
            }
        } else {
            let base_bytes = match patch.base() {
                Some(_) => match root.read_file(&c, set.max_file_size)? {
                    Some((b, _)) => Some(b),
                    None => return Ok(PutOutcome::Missing("the base file vanished".into())),
                },
                None => None,
            };
            let new = match delta::apply(base_bytes.as_deref(), &patch, &target, set.max_file_size)
            {
                Ok(n) => n,
                Err(e) => {
                    return Ok(PutOutcome::Refused(format!(
                        "the patch does not rebuild the committed version: {e}"
                    )))
                }
            };
            // The caller fsyncs the directory once for the whole batch.
            let xattrs = set.xattrs.then_some(&entry.xattrs[..]);
            let signature = set
                .keeps_signature(new.len() as u64)
                .then(|| delta::BlockSignature::compute_hashed(&new, target).to_bytes());
            if let Some(prepared) = defer {
                // A first version is kept in the history as this very inode.
                let first = previous.is_none() && history_links(set);
                let p = root.prepare_file(&c, &new, &meta, &target.hash, xattrs, |file| {
                    if first {
                        crate::replication::history::link_written(&self.shared, file, &target);
                    }
                })?;
                prepared.lock().unwrap().push(PreparedPut {
                    prepared: p,
                    path,
                    entry,
                    expect,
                    target,
                    signature,
                });
                return Ok(PutOutcome::Prepared);
            }
            let replaced =
                root.replace_file_guarded(&c, &new, &meta, &target.hash, false, xattrs, expect)?;
            self.set_aside_edited_during_write(&set.name, root, &replaced, path, index, term)?;
            written = replaced.meta;
            self.xattrs_notice(set, root);
            if let Some(sig) = signature {
                store.put_signature(&set.name, path, &sig);
            }
        }
        // Recorded from the descriptor we wrote through, never by name: an
        // edit made a moment later must still look like an edit.
        self.put_record(&set.name, path, record_of(&written, &target), store);
        Ok(PutOutcome::Done)
    }

    /// Puts the committed version of `entry` at `path` from the finished
    /// file made from the patch at `offset` of `upload` (see
    /// [`Shared::finish_upload`]): linked in when
    /// the set is on the same filesystem as `data_dir`, else copied. Its
    /// content was checked against the digest before it got that name.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn put_finished(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        entry: &Entry,
        upload: u64,
        offset: u64,
        expect: Expect,
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<PutOutcome, FsError> {
        let target = entry.digest.expect("a put carries a digest").get();
        let c = comps(path);
        let meta = fs_meta(&entry.meta);
        let xattrs = set.xattrs.then_some(&entry.xattrs[..]);
        let dir = self.shared.finished_dir(upload);
        let name = Shared::finished_name(offset, &target);
        let finished = dir.join(&name);
        let unreadable = |e: std::io::Error| {
            PutOutcome::Missing(format!("its finished file cannot be read: {e}"))
        };
        if target.len > set.max_file_size {
            return Ok(PutOutcome::Refused(format!(
                "it is {} bytes, more than the set's max_file_size ({})",
                target.len, set.max_file_size
            )));
        }
        self.ensure_parents(set, root, path, index, term)?;
        let adopted =
            root.adopt_file_guarded(&c, &dir, &name, &meta, target.len, xattrs, expect)?;
        // With the content, when it passed through memory.
        let (replaced, content) = match adopted {
            Some(r) => {
                self.shared
                    .counters
                    .files_linked
                    .fetch_add(1, Ordering::Relaxed);
                (r, None)
            }
            None => {
                // Another filesystem, or a labelling directory: copied, as
                // any other version.
                let data = match std::fs::read(&finished) {
                    Ok(b) => b,
                    Err(e) => return Ok(unreadable(e)),
                };
                let r = root.replace_file_guarded(
                    &c,
                    &data,
                    &meta,
                    &target.hash,
                    false,
                    xattrs,
                    expect,
                )?;
                (r, Some(data))
            }
        };
        self.set_aside_edited_during_write(&set.name, root, &replaced, path, index, term)?;
        self.xattrs_notice(set, root);
        // The signature is kept for when this node leads.
        if set.keeps_signature(target.len) {
            match content {
                Some(data) => {
                    let sig = delta::BlockSignature::compute_hashed(&data, target).to_bytes();
                    store.put_signature(&set.name, path, &sig);
                }
                // Linked in without passing through memory: signed once this
                // node is idle (see `sign_linked`).
                None => self.shared.defer_signature(&set.name, path, target),
            }
        }
        self.put_record(&set.name, path, record_of(&replaced.meta, &target), store);
        Ok(PutOutcome::Done)
    }

    /// Replaces the file at `path`, which holds the committed content of
    /// `entry` but shares its inode with other names here, by a copy of its
    /// own (atomically, verified, with the committed metadata), leaving the
    /// other names on the old inode.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn own_inode(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        entry: &Entry,
        expect: Expect,
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<PutOutcome, FsError> {
        let target = entry.digest.expect("a file has a digest").get();
        let c = comps(path);
        let Some((data, _)) = root.read_file(&c, set.max_file_size)? else {
            return Ok(PutOutcome::Missing("the file vanished".into()));
        };
        if delta::digest(&data) != target {
            return Ok(PutOutcome::Missing(
                "the file changed while it was copied".into(),
            ));
        }
        let xattrs = set.xattrs.then_some(&entry.xattrs[..]);
        let replaced = root.replace_file_guarded(
            &c,
            &data,
            &fs_meta(&entry.meta),
            &target.hash,
            true,
            xattrs,
            expect,
        )?;
        self.set_aside_edited_during_write(&set.name, root, &replaced, path, index, term)?;
        self.put_record(&set.name, path, record_of(&replaced.meta, &target), store);
        Ok(PutOutcome::Done)
    }

    /// The metadata of `target` when it holds `want` here (by its record
    /// when `lstat` says it is untouched, else by hashing it): the file a
    /// hard link to it may share.
    pub(super) fn holds_committed(
        &self,
        set: &SetRuntime,
        root: &Root,
        target: &SetPath,
        want: &FileDigest,
    ) -> Result<Option<FileMeta>, FsError> {
        let tc = comps(target);
        let Some(m) = root.stat(&tc)?.filter(|m| m.kind == Kind::File) else {
            return Ok(None);
        };
        if let Some(r) = self
            .shared
            .record(&set.name, target)
            .filter(|r| unchanged_since(r, &m))
        {
            return Ok((r.digest.get() == *want).then_some(m));
        }
        Ok(match hash_local(root, &tc)? {
            Some((h, now)) if h.digest() == *want && now == m => Some(m),
            _ => None,
        })
    }

    /// Makes `path` a hard link of its committed primary (`entry.link`),
    /// atomically: a local file that differs from what the cluster last
    /// committed is quarantined first, as before any replace. When the
    /// primary does not hold the committed content here, the path is
    /// marked missing; the fetcher brings the primary's content and the
    /// link is made then.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn link_file(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        entry: &Entry,
        previous: Option<&Entry>,
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<(), FsError> {
        let target = entry.link.as_ref().expect("a link entry names its primary");
        let want = entry.digest.expect("a link is a file").get();
        let Some(tm) = self.holds_committed(set, root, target, &want)? else {
            debug!(set = %set.name, path = %path, "the primary {target} of hard link {path} lacks its committed content here; fetching it first");
            self.mark_missing(&set.name, path, entry, store);
            return Ok(());
        };
        let c = comps(path);
        self.ensure_parents(set, root, path, index, term)?;
        let mut expect = Expect::Absent;
        let local = self.local_file(set, root, path, previous, index, term, "a hard link")?;
        if let Some(m) = local.filter(|m| m.ino != tm.ino || m.dev != tm.dev) {
            let (local, _) = self.local_digest(&set.name, root, path, &m)?;
            let known = local
                .is_some_and(|d| d == want || self.local_is_known(&set.name, path, &d, previous));
            expect = self.keep_or_quarantine(&set.name, root, path, &m, known, index, term)?;
        }
        let replaced = root.link_file_guarded(&c, &comps(target), &tm, expect)?;
        self.quarantine_displaced(
            &set.name,
            root,
            &replaced.displaced,
            path,
            index,
            term,
            "it was edited while the hard link was being made",
        )?;
        self.put_record(&set.name, path, record_of(&replaced.meta, &want), store);
        self.clear_missing(&set.name, path, store);
        Ok(())
    }

    /// Gives an existing file the committed metadata and returns what its
    /// record must say: the `lstat` taken before, with the fields we set, so
    /// an edit racing with us still differs from the record.
    pub(super) fn settle_meta(
        &self,
        root: &Root,
        c: &[&[u8]],
        before: &FileMeta,
        want: &Meta,
    ) -> Result<FileMeta, FsError> {
        let set = fs_meta(want);
        if meta_matches(&set, before) {
            return Ok(*before);
        }
        root.set_meta(c, &set)?;
        Ok(FileMeta {
            mode: set.mode,
            uid: set.uid,
            gid: set.gid,
            mtime_ns: set.mtime_ns,
            ..*before
        })
    }

    /// Gives an existing file or directory the committed extended
    /// attributes, in sets with `xattrs = true` (others' are never touched).
    /// Like mode or owner, a local difference is fixed, not quarantined.
    pub(super) fn settle_xattrs(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        entry: &Entry,
    ) -> Result<(), FsError> {
        if !set.xattrs || entry.meta.kind == EntryKind::Symlink {
            return Ok(());
        }
        root.set_xattrs(&comps(path), &fs_meta(&entry.meta), &entry.xattrs)?;
        self.xattrs_notice(set, root);
        Ok(())
    }

    /// Says once per set (and process) that its filesystem here keeps no
    /// extended attributes; applying goes on without them.
    pub(super) fn xattrs_notice(&self, set: &SetRuntime, root: &Root) {
        if set.xattrs && root.xattrs_unsupported_notice() {
            let msg = format!("sync set {:?} has xattrs = true, but the filesystem of {} on this node does not support extended attributes (ENOTSUP); files are replicated without them here. Put the set on a filesystem with xattr and ACL support (ext4, xfs, btrfs) or set xattrs = false on every node", set.name, set.path.display());
            self.shared.note_error(&set.name, msg);
        }
    }

    /// Creates missing parent directories (their metadata comes with their
    /// own Dir ops; until then they are 0755).
    pub(super) fn ensure_parents(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        index: u64,
        term: u64,
    ) -> Result<(), FsError> {
        self.ensure_parents_with(set, root, path, index, term, true)
    }

    /// [`Applier::ensure_parents`]; with `sync` false the directories it
    /// makes are left for the batch's `syncfs` to make durable.
    pub(super) fn ensure_parents_with(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        index: u64,
        term: u64,
        sync: bool,
    ) -> Result<(), FsError> {
        let all = comps(path);
        // Reaching the parent opens every directory above it without
        // following a symlink: one look tells they all are directories.
        if all.len() > 1
            && root
                .stat(&all[..all.len() - 1])?
                .is_some_and(|m| m.kind == Kind::Dir)
        {
            return Ok(());
        }
        for depth in 1..all.len() {
            let prefix = &all[..depth];
            match root.stat(prefix)? {
                Some(m) if m.kind == Kind::Dir => {}
                Some(_) => {
                    let p =
                        SetPath::from_network(&prefix.join(&b'/')).expect("prefix of a valid path");
                    self.quarantine(
                        &set.name,
                        root,
                        &p,
                        index,
                        term,
                        "a non-directory stood where the cluster has a directory",
                    )?;
                    root.make_dir_with(prefix, &default_dir_meta(), sync)?;
                }
                None => root.make_dir_with(prefix, &default_dir_meta(), sync)?,
            }
        }
        Ok(())
    }

    /// Makes the committed directory `path`; with `sync` false its fsyncs
    /// (and those of parents it makes) are left to the batch's `syncfs`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn make_dir(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        meta: &Meta,
        index: u64,
        term: u64,
        sync: bool,
    ) -> Result<(), FsError> {
        let c = comps(path);
        self.ensure_parents_with(set, root, path, index, term, sync)?;
        if let Some(m) = root.stat(&c)? {
            if m.kind != Kind::Dir {
                self.quarantine(
                    &set.name,
                    root,
                    path,
                    index,
                    term,
                    "a non-directory stood where the cluster has a directory",
                )?;
            }
        }
        root.make_dir_with(&c, &fs_meta(meta), sync)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn make_symlink(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        entry: &Entry,
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<(), FsError> {
        let c = comps(path);
        let target = entry.target.clone().unwrap_or_default();
        self.ensure_parents(set, root, path, index, term)?;
        match root.stat(&c)? {
            Some(m) if m.kind == Kind::Symlink => {
                if root.read_link(&c)?.as_deref() == Some(&target[..]) {
                    return Ok(());
                }
            }
            Some(m) if m.kind == Kind::File => {
                let known = match hash_local(root, &c)? {
                    Some((h, _)) => self.local_is_known(&set.name, path, &h.digest(), None),
                    None => true,
                };
                self.clear_way(
                    known,
                    set,
                    root,
                    path,
                    index,
                    term,
                    "it differed from what the cluster last committed",
                )?;
            }
            Some(_) => self.quarantine(
                &set.name,
                root,
                path,
                index,
                term,
                "a directory stood where the cluster has a symlink",
            )?,
            None => {}
        }
        self.forget_records(&set.name, path, store);
        root.make_symlink(&c, &target)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn remove(
        &self,
        set: &SetRuntime,
        root: &Root,
        path: &SetPath,
        removed: &[(SetPath, Entry)],
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<(), FsError> {
        // Files under the path that someone changed here go to quarantine first.
        for (p, e) in removed {
            if e.meta.kind != EntryKind::File {
                continue;
            }
            let c = comps(p);
            if let Some(m) = root.stat(&c)? {
                if m.kind != Kind::File {
                    continue;
                }
                let rec = self.shared.record(&set.name, p);
                if rec.is_some_and(|r| unchanged_since(&r, &m)) {
                    continue;
                }
                if let Some((h, _)) = hash_local(root, &c)? {
                    if !self.local_is_known(&set.name, p, &h.digest(), Some(e)) {
                        self.quarantine(
                            &set.name,
                            root,
                            p,
                            index,
                            term,
                            "it was changed here, and the cluster deleted it",
                        )?;
                    }
                }
            }
        }
        // Files under the path that the cluster never had (made here) go to
        // quarantine too, rather than out with the directory.
        let known: HashSet<&SetPath> = removed.iter().map(|(p, _)| p).collect();
        let mut local = BTreeSet::new();
        local_subtree(set, root, path, &mut local);
        for p in local {
            if known.contains(&p) {
                continue;
            }
            if let Some(m) = root.stat(&comps(&p))? {
                if m.kind != Kind::Dir {
                    self.quarantine(
                        &set.name,
                        root,
                        &p,
                        index,
                        term,
                        "the cluster deleted the directory holding it",
                    )?;
                }
            }
        }
        // Excluded entries under a removed directory are this node's own:
        // keep the directory if any remain.
        if set.filter.is_excluded(path, true) {
            return Ok(());
        }
        let is_dir = root
            .stat(&comps(path))?
            .is_some_and(|m| m.kind == Kind::Dir);
        if is_dir && self.has_excluded_inside(set, root, path)? {
            for (p, _) in removed.iter().rev() {
                let c = comps(p);
                match root.stat(&c)? {
                    Some(m) if m.kind == Kind::Dir => {
                        let empty = root.list_dir(&c)?.is_none_or(|l| l.is_empty());
                        if empty {
                            root.remove(&c)?;
                        }
                    }
                    Some(_) => {
                        root.remove(&c)?;
                    }
                    None => {}
                }
            }
        } else {
            root.remove(&comps(path))?;
        }
        self.forget_records(&set.name, path, store);
        Ok(())
    }

    pub(super) fn has_excluded_inside(
        &self,
        set: &SetRuntime,
        root: &Root,
        dir: &SetPath,
    ) -> Result<bool, FsError> {
        let c = comps(dir);
        let Some(listing) = root.list_dir(&c)? else {
            return Ok(false);
        };
        for (name, kind) in listing {
            let Ok(p) = dir.join(&name) else { continue };
            if set.filter.is_excluded(&p, kind == Kind::Dir) {
                return Ok(true);
            }
            if kind == Kind::Dir && self.has_excluded_inside(set, root, &p)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rename(
        &self,
        set: &SetRuntime,
        root: &Root,
        from: &SetPath,
        to: &SetPath,
        index: u64,
        term: u64,
        store: &mut StoreBatch,
    ) -> Result<(), FsError> {
        let from_here = root.stat(&comps(from))?.is_some();
        let to_here = root.stat(&comps(to))?.is_some();
        if !from_here && to_here {
            // Replayed after a crash that came after the rename: done already.
            return Ok(());
        }
        if to_here {
            self.quarantine(
                &set.name,
                root,
                to,
                index,
                term,
                "something stood where the cluster moved another path",
            )?;
        }
        self.ensure_parents(set, root, to, index, term)?;
        // A rename within one root: move_aside onto the same root renames.
        let moved = root.move_aside(&comps(from), root, &comps(to))?;
        for (k, r) in self.shared.store.records_under(&set.name, from) {
            self.shared.store.delete_record(store, &set.name, &k);
            let mut b = to.as_bytes().to_vec();
            b.extend_from_slice(&k.as_bytes()[from.as_bytes().len()..]);
            if let (true, Ok(nk)) = (moved, SetPath::from_network(&b)) {
                self.shared.store.put_record(store, &set.name, &nk, &r);
            }
        }
        if !moved {
            // Nothing to move here: the content under `to` is fetched.
            let m = self.shared.manifest.read().unwrap();
            let entries: Vec<(SetPath, Entry)> = m
                .set(&set.name)
                .map(|s| s.subtree(to).map(|(k, e)| (k.clone(), e.clone())).collect())
                .unwrap_or_default();
            drop(m);
            for (k, e) in entries {
                self.mark_missing(&set.name, &k, &e, store);
            }
        }
        Ok(())
    }
}

/// A new version written and verified under its temporary name, waiting
/// for its batch to be durable before it is renamed in.
pub(super) struct PreparedPut<'e> {
    prepared: crate::fs::root::Prepared,
    path: &'e SetPath,
    entry: &'e Entry,
    /// What the rename may displace (see [`Applier::put_file`]).
    expect: crate::fs::root::Expect,
    target: FileDigest,
    /// The block signature to store once it is in.
    signature: Option<Vec<u8>>,
}

/// Whether this node's history keeps a set's first versions as the inodes
/// the applier writes (a hard link each).
fn history_links(set: &SetRuntime) -> bool {
    set.history && set.mode == SyncMode::Mirror && !set.hard_links
}
