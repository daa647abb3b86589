//! Planning: each dirty path examined against the committed manifest and
//! turned into the cheapest op (delta, append, whole, rename, link,
//! metadata-only).

use super::*;
/// A batch being built.
pub(super) struct Builder {
    pub(super) ops: Vec<FileOp>,
    /// The patches of the batch's [`Content::Blob`]s, one after another,
    /// staged on the followers before the batch is proposed.
    pub(super) blob: Vec<u8>,
    /// The staged upload `blob` becomes.
    pub(super) blob_upload: u64,
    /// Batches whose content is being staged, oldest first, each proposed
    /// once its content is staged and every batch before it was proposed.
    pub(super) staged: std::collections::VecDeque<ReadyBatch>,
    pub(super) bytes: usize,
    pub(super) pending: Vec<(SetPath, crate::replication::files_store::LocalRecord)>,
    /// Paths gone from the tree, by the inode they had, for rename detection.
    pub(super) gone: Vec<(SetPath, crate::replication::files_store::LocalRecord)>,
    /// Block signatures of the versions being proposed (a cache keyed by
    /// digest, so written without waiting for an fsync).
    pub(super) signatures: crate::replication::files_store::StoreBatch,
    /// Proposals of this pass not yet applied here. Every path appears once
    /// per pass, so they may be in flight together; the next pass starts only
    /// once all applied, keeping every delta against the committed version.
    pub(super) in_flight:
        std::collections::VecDeque<tokio::sync::oneshot::Receiver<Result<u64, RequestError>>>,
    /// Where this pass's time went, for the debug log of each proposal.
    pub(super) waited: Waited,
}

/// Time a pass spent waiting rather than reading and planning.
#[derive(Debug, Default)]
pub(super) struct Waited {
    /// For followers to hold a batch's staged content.
    pub(super) staging: Duration,
    /// For this node to apply earlier proposals ([`MAX_IN_FLIGHT`]).
    pub(super) own_apply: Duration,
    /// For followers to apply ([`wait_for_followers`]).
    pub(super) followers: Duration,
}

pub(super) fn plan_and_propose(
    shared: &Arc<Shared>,
    node: &NodeHandle,
    transport: &Transport,
    rt: &tokio::runtime::Handle,
    term: u64,
    set: &SetRuntime,
    root: &Root,
    paths: Vec<SetPath>,
    walked: &[Found],
    left: &mut Dirty,
) -> Result<(), RequestError> {
    // A validated set is checked whole, as this pass would leave it, before
    // anything of it is planned; a refused change holds the set.
    let checked = match &set.validate {
        Some(_) if !paths.is_empty() => {
            match crate::replication::validate::check_tree(shared, set, root, &paths) {
                Ok(checked) => {
                    shared.set_held(&set.name, None);
                    Some(checked)
                }
                Err(reason) => {
                    shared.set_held(&set.name, Some(reason));
                    return Ok(());
                }
            }
        }
        _ => None,
    };
    let mut names = OwnerNames::default();
    let mut b = Builder {
        ops: Vec::new(),
        blob: Vec::new(),
        blob_upload: 0,
        staged: Default::default(),
        bytes: 0,
        waited: Waited::default(),
        pending: Vec::new(),
        gone: Vec::new(),
        signatures: Default::default(),
        in_flight: Default::default(),
    };
    // Deletions first (so a rename can find its source), then the rest in order.
    let mut present = Vec::new();
    let mut removed_roots: Vec<SetPath> = Vec::new();
    // Paths this node lacks the committed content of, except those no node
    // holds any more: those this tree proposes again (see `unobtainable`).
    let gone = shared.unobtainable.lock().unwrap().clone();
    let missing: BTreeSet<SetPath> = shared
        .missing
        .lock()
        .unwrap()
        .iter()
        .filter(|((s, p), d)| *s == set.name && gone.get(&(s.clone(), p.clone())) != Some(&d.get()))
        .map(|((_, p), _)| p.clone())
        .collect();
    for path in paths {
        if removed_roots.iter().any(|r| r.is_ancestor_of(&path)) {
            continue;
        }
        if missing.contains(&path) || missing.iter().any(|m| path.is_ancestor_of(m)) {
            // This node lacks the committed content: its tree is not the truth here.
            left.paths
                .entry(set.name.clone())
                .or_default()
                .insert(path.clone());
            continue;
        }
        // A walk just before this pass stat'ed what it found: stat again
        // only what it did not (deletions, paths from events).
        let stat = match walked.binary_search_by(|f| f.path.cmp(&path)) {
            Ok(i) => Some(walked[i].meta),
            Err(_) => match root.stat(&path.components().collect::<Vec<_>>()) {
                Ok(s) => s,
                Err(e) => {
                    shared.note_error(&set.name, format!("{path}: {e}"));
                    continue;
                }
            },
        };
        match stat {
            None => {
                let known = shared
                    .manifest
                    .read()
                    .unwrap()
                    .set(&set.name)
                    .is_some_and(|m| m.entries.contains_key(&path));
                if known {
                    if let Some(r) = shared.record(&set.name, &path) {
                        b.gone.push((path.clone(), r));
                    }
                    removed_roots.push(path);
                }
            }
            Some(meta) if settled(shared, set, &path, &meta, &mut names) => {}
            Some(meta) => present.push((path, meta)),
        }
    }
    // New names of files that just left another name: renames (`mv`, a
    // rotated log), found by the inode the old name had.
    let mut renames: BTreeMap<SetPath, SetPath> = BTreeMap::new();
    for (path, meta) in &present {
        if meta.kind != Kind::File || !set.holds(path, false) {
            continue;
        }
        if shared
            .manifest
            .read()
            .unwrap()
            .get(&set.name, path)
            .is_some()
        {
            continue;
        }
        if let Some(i) = b.gone.iter().position(|(_, r)| {
            r.ino == meta.ino && r.len == meta.len && r.mtime_ns == meta.mtime_ns
        }) {
            let (from, _) = b.gone.remove(i);
            renames.insert(path.clone(), from);
        }
    }
    let renamed: BTreeSet<SetPath> = renames.values().cloned().collect();
    let mut links = if set.hard_links {
        LinkPlan::new(shared, set, &present, &renames, &removed_roots)
    } else {
        LinkPlan::default()
    };
    for (path, meta) in present {
        if !set.holds(&path, meta.kind == Kind::Dir) {
            continue;
        }
        if meta.kind == Kind::File && checked.as_ref().is_some_and(|c| !c.saw(&path, &meta)) {
            // Changed since the validator saw it: checked again next pass.
            left.full.insert(set.name.clone());
            continue;
        }
        if let Some(from) = renames.get(&path) {
            b.ops.push(FileOp::Rename {
                from: from.as_bytes().to_vec(),
                to: path.as_bytes().to_vec(),
            });
            continue;
        }
        if links.primary_of.contains_key(&path) {
            // Another name of a file whose primary name is examined: it
            // becomes a link of that name below.
            continue;
        }
        let committed = links.effective(shared, set, &path);
        let ops_before = b.ops.len();
        let done = examine(
            shared, set, root, &path, &meta, committed, &mut names, &mut b,
        );
        if !done {
            left.paths
                .entry(set.name.clone())
                .or_default()
                .insert(path.clone());
        }
        if links.primaries.contains(&path) {
            let planned = b.ops[ops_before..].iter().find_map(|op| match op {
                FileOp::Put {
                    path: p, digest, ..
                } if p == path.as_bytes() => Some(*digest),
                _ => None,
            });
            links.note_examined(shared, set, &path, done, planned);
        }
        if b.bytes >= BATCH_BYTES || b.ops.len() >= BATCH_OPS {
            flush(shared, node, transport, rt, term, set, &mut b, false)?;
        }
    }
    links.propose(shared, set, &mut b, left);
    for r in removed_roots {
        if renamed.contains(&r) {
            continue;
        }
        b.ops.push(match set.mode {
            SyncMode::Mirror => FileOp::Remove {
                path: r.as_bytes().to_vec(),
            },
            SyncMode::Append => FileOp::Forget {
                path: r.as_bytes().to_vec(),
            },
        });
    }
    // Renames and removals must precede puts that reuse their names, and
    // links follow the new versions of their primaries.
    b.ops.sort_by_key(|op| match op {
        FileOp::Rename { .. } => 0,
        FileOp::Remove { .. } | FileOp::Forget { .. } => 1,
        FileOp::Link { .. } => 3,
        _ => 2,
    });
    flush(shared, node, transport, rt, term, set, &mut b, true)
}

/// Whether `path`, found locally as `meta`, is exactly what the cluster
/// committed and this node last recorded, so that [`examine`] would
/// propose nothing for it: left out of a pass before anything more is
/// kept of it, which is what keeps a rescan of a large, unchanged set
/// small. Sets that replicate extended attributes or hard links are always
/// examined (neither shows in `lstat`).
pub(super) fn settled(
    shared: &Shared,
    set: &SetRuntime,
    path: &SetPath,
    meta: &FileMeta,
    names: &mut OwnerNames,
) -> bool {
    if set.xattrs || set.hard_links || !set.holds(path, meta.kind == Kind::Dir) {
        return false;
    }
    match meta.kind {
        Kind::File => {
            let committed = {
                let m = shared.manifest.read().unwrap();
                match m.get(&set.name, path) {
                    Some(e) if e.meta.kind == EntryKind::File && e.link.is_none() => e.digest,
                    _ => None,
                }
            };
            committed.is_some_and(|d| {
                shared
                    .record(&set.name, path)
                    .is_some_and(|r| unchanged_since(&r, meta) && r.digest.get() == d.get())
            })
        }
        Kind::Dir => {
            let local = meta_from_local(meta, EntryKind::Dir, names);
            shared
                .manifest
                .read()
                .unwrap()
                .get(&set.name, path)
                .is_some_and(|e| e.meta == local)
        }
        _ => false,
    }
}

/// Sets with `hard_links = true`: `paths` with the other names of the
/// files among them, which must be examined together (inotify reports a
/// change only under the name it was made through): the names the cluster
/// has for the same file (its primary and links), and the names this node
/// last saw on the same inode (by the node-local records: the old name of
/// a new link, or the names left holding an inode whose other name was
/// replaced). Taken to a fixed point, in path order.
pub(super) fn with_other_names(
    shared: &Shared,
    set: &SetRuntime,
    root: &Root,
    paths: Vec<SetPath>,
) -> Vec<SetPath> {
    let mut all: BTreeSet<SetPath> = paths.into_iter().collect();
    let mut fresh: Vec<SetPath> = all.iter().cloned().collect();
    // A few rounds reach every name of every group in practice; the next
    // change or rescan picks up anything further.
    for _ in 0..3 {
        if fresh.is_empty() {
            break;
        }
        let mut inodes: HashSet<u64> = HashSet::new();
        for p in &fresh {
            if let Some(r) = shared.record(&set.name, p) {
                inodes.insert(r.ino);
            }
            if let Ok(Some(m)) = root.stat(&p.components().collect::<Vec<_>>()) {
                if m.kind == Kind::File && m.nlink > 1 {
                    inodes.insert(m.ino);
                }
            }
        }
        let mut found = BTreeSet::new();
        {
            let m = shared.manifest.read().unwrap();
            if let Some(sm) = m.set(&set.name) {
                let primaries: HashSet<SetPath> = fresh
                    .iter()
                    .filter_map(|p| {
                        sm.entries
                            .get(p)
                            .map(|e| e.link.clone().unwrap_or_else(|| p.clone()))
                    })
                    .collect();
                for (p, e) in &sm.entries {
                    if let Some(t) = e.link.as_ref().filter(|t| primaries.contains(*t)) {
                        found.insert(p.clone());
                        found.insert(t.clone());
                    }
                }
            }
        }
        if !inodes.is_empty() {
            found.extend(
                shared
                    .store
                    .records_of_set(&set.name)
                    .into_iter()
                    .filter(|(_, r)| inodes.contains(&r.ino))
                    .map(|(p, _)| p),
            );
        }
        fresh = found
            .into_iter()
            .filter(|p| all.insert(p.clone()))
            .collect();
    }
    all.into_iter().collect()
}

/// The hard links one pass of a set with `hard_links = true` proposes.
/// Names of one inode found in the pass form a group; one of them is the
/// primary, examined like any file (a new version of it travels as usual),
/// and every other name becomes a [`FileOp::Link`] of it unless the cluster
/// already has it so. The primary is the name the cluster already has as
/// the file (so nothing needs proposing), else a name moved from it, else
/// the first other name (proposed as a file of its own first).
#[derive(Default)]
pub(super) struct LinkPlan {
    /// New name → old name, for the renames of this pass.
    pub(super) renames: BTreeMap<SetPath, SetPath>,
    /// Old name → new name.
    pub(super) moved: BTreeMap<SetPath, SetPath>,
    /// Paths this pass removes.
    pub(super) removed: Vec<SetPath>,
    /// Every other name of a group → its primary.
    pub(super) primary_of: BTreeMap<SetPath, SetPath>,
    /// Primaries examined in this pass.
    pub(super) primaries: BTreeSet<SetPath>,
    /// Primaries usable as a link target once this pass applied, with the
    /// digest they will have.
    pub(super) ok: BTreeMap<SetPath, WireDigest>,
    /// Primaries that get a new version (a `Put`) in this pass: a `Put`
    /// ends the links of a name, so they are proposed again.
    pub(super) rewritten: BTreeSet<SetPath>,
    /// Primaries that could not be read this time: retried with their names.
    pub(super) retry: BTreeSet<SetPath>,
    /// `lstat` of every grouped name.
    pub(super) metas: BTreeMap<SetPath, FileMeta>,
}

impl LinkPlan {
    pub(super) fn new(
        shared: &Shared,
        set: &SetRuntime,
        present: &[(SetPath, FileMeta)],
        renames: &BTreeMap<SetPath, SetPath>,
        removed: &[SetPath],
    ) -> LinkPlan {
        let mut plan = LinkPlan {
            renames: renames.clone(),
            moved: renames
                .iter()
                .map(|(t, f)| (f.clone(), t.clone()))
                .collect(),
            removed: removed.to_vec(),
            ..LinkPlan::default()
        };
        let mut by_inode: BTreeMap<(u64, u64), Vec<SetPath>> = BTreeMap::new();
        for (p, m) in present {
            if m.kind == Kind::File && m.nlink > 1 && set.holds(p, false) {
                by_inode.entry((m.dev, m.ino)).or_default().push(p.clone());
                plan.metas.insert(p.clone(), *m);
            }
        }
        for members in by_inode.into_values().filter(|v| v.len() > 1) {
            let is_file = |p: &SetPath| {
                plan.effective(shared, set, p)
                    .is_some_and(|e| e.meta.kind == EntryKind::File && e.link.is_none())
            };
            let moved_here = |p: &SetPath| plan.renames.contains_key(p);
            let Some(primary) = members
                .iter()
                .find(|p| !moved_here(p) && is_file(p))
                .or_else(|| members.iter().find(|p| moved_here(p) && is_file(p)))
                .or_else(|| members.iter().find(|p| !moved_here(p)))
                .cloned()
            else {
                continue;
            };
            if moved_here(&primary) {
                // Moved from the committed primary: it stays the file.
                if let Some(d) = plan.effective(shared, set, &primary).and_then(|e| e.digest) {
                    plan.ok.insert(primary.clone(), d);
                }
            } else {
                plan.primaries.insert(primary.clone());
            }
            for m in members.into_iter().filter(|m| *m != primary) {
                plan.primary_of.insert(m, primary.clone());
            }
        }
        plan
    }

    /// The committed entry of `path` as it will be once this pass's renames
    /// and removals applied: a moved name has its source's entry, and a
    /// link whose primary is removed is a file of its own.
    pub(super) fn effective(
        &self,
        shared: &Shared,
        set: &SetRuntime,
        path: &SetPath,
    ) -> Option<Entry> {
        let m = shared.manifest.read().unwrap();
        let src = self.renames.get(path).unwrap_or(path);
        let mut e = m.get(&set.name, src)?.clone();
        if let Some(t) = e.link.take() {
            let t = self.moved.get(&t).cloned().unwrap_or(t);
            if !self.removed.iter().any(|r| *r == t || r.is_ancestor_of(&t)) {
                e.link = Some(t);
            }
        }
        Some(e)
    }

    /// The primary `path` was examined (`done`: not to be retried), and
    /// `planned` is the digest of the new version proposed for it, if any.
    pub(super) fn note_examined(
        &mut self,
        shared: &Shared,
        set: &SetRuntime,
        path: &SetPath,
        done: bool,
        planned: Option<WireDigest>,
    ) {
        if !done {
            self.retry.insert(path.clone());
        } else if let Some(d) = planned {
            self.ok.insert(path.clone(), d);
            self.rewritten.insert(path.clone());
        } else if let Some(e) = self
            .effective(shared, set, path)
            .filter(|e| e.meta.kind == EntryKind::File && e.link.is_none())
        {
            if let Some(d) = e.digest {
                self.ok.insert(path.clone(), d);
            }
        }
    }

    /// Adds the links of this pass to `b` (after every other op of the
    /// pass); the names of primaries to retry go to `left` with them.
    pub(super) fn propose(
        &self,
        shared: &Shared,
        set: &SetRuntime,
        b: &mut Builder,
        left: &mut Dirty,
    ) {
        for (name, primary) in &self.primary_of {
            let Some(digest) = self.ok.get(primary) else {
                if self.retry.contains(primary) {
                    left.paths
                        .entry(set.name.clone())
                        .or_default()
                        .insert(name.clone());
                }
                continue;
            };
            let linked = !self.rewritten.contains(primary)
                && self
                    .effective(shared, set, name)
                    .is_some_and(|e| e.link.as_ref() == Some(primary));
            if linked {
                continue;
            }
            b.ops.push(FileOp::Link {
                path: name.as_bytes().to_vec(),
                target: primary.as_bytes().to_vec(),
            });
            if let Some(m) = self.metas.get(name) {
                b.pending
                    .push((name.clone(), record_of_read(m, &digest.get())));
            }
            // A link puts none of the file's bytes on the wire.
            shared
                .counters
                .bytes_saved
                .fetch_add(digest.get().len, Ordering::Relaxed);
        }
    }
}

/// Examines one present path against its `committed` entry (as it will be
/// once this pass's renames and removals applied); returns false when it
/// must be tried again later (it was changing while read, or could not be
/// read this time).
#[allow(clippy::too_many_arguments)]
pub(super) fn examine(
    shared: &Shared,
    set: &SetRuntime,
    root: &Root,
    path: &SetPath,
    meta: &FileMeta,
    mut committed: Option<Entry>,
    names: &mut OwnerNames,
    b: &mut Builder,
) -> bool {
    let comps: Vec<&[u8]> = path.components().collect();
    let local_kind = match meta.kind {
        Kind::Dir => Some(EntryKind::Dir),
        Kind::Symlink => Some(EntryKind::Symlink),
        Kind::File => Some(EntryKind::File),
        _ => None,
    };
    if let (Some(c), Some(k)) = (&committed, local_kind) {
        if c.meta.kind != k {
            // The path changed kind: followers drop the old entry (and what
            // was under it) first, as the committed thing it is.
            b.ops.push(FileOp::Remove {
                path: path.as_bytes().to_vec(),
            });
            committed = None;
        }
    }
    let result: Result<(), Problem> = (|| {
        // Sets with `xattrs = true`: a file's or directory's replicated
        // extended attributes, read first so that a list too large to
        // replicate refuses the whole path rather than half of it.
        let local_xattrs = match meta.kind {
            Kind::File | Kind::Dir if set.xattrs => match root.read_xattrs(&comps)? {
                Some(x) => Some(x),
                None => return Ok(()), // gone meanwhile: its deletion event follows
            },
            _ => None,
        };
        if let Some(Err(why)) = local_xattrs.as_deref().map(check_xattrs) {
            return Err(Problem::Permanent(format!(
                "its extended attributes cannot be replicated: {why}; the path is not replicated until they are reduced"
            )));
        }
        let ops_before = b.ops.len();
        match meta.kind {
            Kind::Dir => {
                let m = meta_from_local(meta, EntryKind::Dir, names);
                if committed.as_ref().map(|e| &e.meta) != Some(&m) {
                    b.ops.push(FileOp::Dir {
                        path: path.as_bytes().to_vec(),
                        meta: m,
                    });
                }
            }
            Kind::Symlink => {
                let target = root.read_link(&comps)?.unwrap_or_default();
                let mut m = meta_from_local(meta, EntryKind::Symlink, names);
                m.mode = 0o777;
                let same = committed.as_ref().is_some_and(|e| {
                    e.target.as_deref() == Some(&target[..])
                        && e.meta.uid == m.uid
                        && e.meta.gid == m.gid
                });
                if !same {
                    b.ops.push(FileOp::Symlink {
                        path: path.as_bytes().to_vec(),
                        target,
                        meta: m,
                    });
                }
            }
            Kind::File => {
                examine_file(shared, set, root, path, meta, committed.as_ref(), names, b)?
            }
            _ => {
                debug!(set = %set.name, path = %path, "not replicated: {} (only files, directories and symlinks are)", meta.kind.describe())
            }
        }
        if let Some(xattrs) = local_xattrs {
            let op = xattrs_op(path, xattrs, &b.ops[ops_before..], committed.as_ref());
            b.ops.extend(op);
        }
        Ok(())
    })();
    match result {
        Ok(()) => true,
        Err(Problem::Permanent(e)) => {
            shared.note_error(&set.name, format!("{path}: {e}"));
            true
        }
        Err(Problem::Retry(e)) => {
            debug!(set = %set.name, path = %path, "{e}; trying again shortly");
            false
        }
    }
}

/// The [`FileOp::Xattrs`] to propose for `path`, whose local replicated
/// extended attributes are `local`, after `planned` (the ops just planned
/// for it) against its `committed` entry. A new version (`Put`, `Dir`)
/// commits a path without attributes, so it is followed by its attributes
/// unless it has none; otherwise they are proposed alone when they differ
/// from the committed ones (an `IN_ATTRIB` event: `setfattr`, `setfacl`).
pub(super) fn xattrs_op(
    path: &SetPath,
    local: Xattrs,
    planned: &[FileOp],
    committed: Option<&Entry>,
) -> Option<FileOp> {
    let rewritten = planned.iter().any(|op| {
        matches!(op, FileOp::Put { path: p, .. } | FileOp::Dir { path: p, .. } if p == path.as_bytes())
    });
    let needed = if rewritten {
        !local.is_empty()
    } else {
        // Nothing committed (the path could not be read this time): nothing
        // to attach attributes to yet.
        committed.is_some_and(|e| e.xattrs != local)
    };
    needed.then(|| FileOp::Xattrs {
        path: path.as_bytes().to_vec(),
        xattrs: local,
    })
}

/// Why a path was not proposed.
pub(super) enum Problem {
    /// It will not change by itself (too large, unreadable by policy).
    Permanent(String),
    /// It was changing or briefly unreadable: retried from the dirty list.
    Retry(String),
}

impl From<String> for Problem {
    fn from(s: String) -> Self {
        Problem::Retry(s)
    }
}

impl From<crate::fs::root::FsError> for Problem {
    fn from(e: crate::fs::root::FsError) -> Self {
        Problem::Retry(e.to_string())
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn examine_file(
    shared: &Shared,
    set: &SetRuntime,
    root: &Root,
    path: &SetPath,
    meta: &FileMeta,
    committed: Option<&Entry>,
    names: &mut OwnerNames,
    b: &mut Builder,
) -> Result<(), Problem> {
    let comps: Vec<&[u8]> = path.components().collect();
    let committed_digest = committed.and_then(|e| e.digest).map(|d| d.get());
    let record = shared.record(&set.name, path);
    // Committed as a hard link of another name, but examined as a file of
    // its own (its links are gone, or it is the primary now): a `Put` makes
    // it one, even with the same content and metadata.
    let own = committed.is_some_and(|e| e.link.is_some());
    if let (Some(r), Some(c)) = (record, committed_digest) {
        if unchanged_since(&r, meta)
            && r.digest.get() == c
            && committed.is_some_and(|e| e.meta.kind == EntryKind::File)
            && !own
        {
            return Ok(());
        }
    }
    if meta.len > set.max_file_size {
        return Err(Problem::Permanent(format!(
            "{} bytes is more than the set's max_file_size ({}); not replicated",
            meta.len, set.max_file_size
        )));
    }
    // An append set's file that only grew: read and send the new bytes only.
    if set.mode == SyncMode::Append {
        if let (Some(r), Some(c)) = (record, committed_digest) {
            if r.digest.get() == c && r.ino == meta.ino && meta.len > r.len {
                return append_tail(shared, set, root, path, &comps, c, r.len, names, b)
                    .map_err(Problem::Retry);
            }
        }
    }
    let Some(p) = prepare_file(shared, set, root, path, committed_digest)? else {
        return Ok(()); // gone meanwhile: its deletion event follows
    };
    let m = meta_from_local(&p.now, EntryKind::File, names);
    let Some(patch) = p.patch else {
        // The committed content.
        if committed.map(|e| &e.meta) != Some(&m) || own {
            b.pending
                .push((path.clone(), record_of_read(&p.now, &p.digest)));
            b.ops.push(FileOp::Put {
                path: path.as_bytes().to_vec(),
                meta: m,
                digest: WireDigest::new(&p.digest),
                content: Content::Unchanged,
            });
        } else {
            // Same bytes, same metadata (say, a touch undone): just remember it.
            shared.remember_record(&set.name, path, &record_of_read(&p.now, &p.digest));
        }
        return Ok(());
    };
    if let Some(sig) = p.signature {
        b.signatures.put_signature(&set.name, path, &sig);
    }
    add_put(shared, path, m, p.digest, &patch, p.len, b);
    b.pending
        .push((path.clone(), record_of_read(&p.now, &p.digest)));
    Ok(())
}

/// A file read and planned: everything of [`examine_file`] that costs a
/// pass over the content, with the content hashed once.
pub(super) struct Prepared {
    /// Metadata of the very bytes read.
    pub(super) now: FileMeta,
    pub(super) digest: FileDigest,
    pub(super) len: usize,
    /// The patch against the committed version; `None` when the content is
    /// the committed one. Encoded only where it goes (see [`add_put`]).
    pub(super) patch: Option<delta::Patch>,
    /// The block signature of the new version (mirror sets, files of
    /// [`delta::SMALL_FILE_LEN`] and more), stored once proposed.
    pub(super) signature: Option<Vec<u8>>,
}

/// Reads `path` (again if it changes meanwhile), hashes it once and plans
/// its patch against `committed`. `None`: the file is gone.
pub(super) fn prepare_file(
    shared: &Shared,
    set: &SetRuntime,
    root: &Root,
    path: &SetPath,
    committed: Option<FileDigest>,
) -> Result<Option<Prepared>, crate::fs::root::FsError> {
    let comps: Vec<&[u8]> = path.components().collect();
    let Some((data, now)) = root.read_file(&comps, set.max_file_size)? else {
        return Ok(None);
    };
    let digest = delta::digest(&data);
    if committed == Some(digest) {
        return Ok(Some(Prepared {
            now,
            digest,
            len: data.len(),
            patch: None,
            signature: None,
        }));
    }
    let sig = committed.and_then(|c| shared.signature(&set.name, path, &c));
    let patch = delta::plan_from(sig.as_ref(), &data);
    let signature = set
        .keeps_signature(data.len() as u64)
        .then(|| delta::BlockSignature::compute_hashed(&data, digest).to_bytes());
    Ok(Some(Prepared {
        now,
        digest,
        len: data.len(),
        patch: Some(patch),
        signature,
    }))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn append_tail(
    shared: &Shared,
    set: &SetRuntime,
    root: &Root,
    path: &SetPath,
    comps: &[&[u8]],
    base: FileDigest,
    base_len: u64,
    names: &mut OwnerNames,
    b: &mut Builder,
) -> Result<(), String> {
    let key = (set.name.clone(), path.clone());
    let Some((file, _)) = root.open_file(comps).map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let mut hasher = match shared
        .append_hashers
        .lock()
        .unwrap()
        .get(&key)
        .filter(|(h, _)| h.digest() == base)
        .cloned()
        .filter(|(_, fp)| {
            crate::replication::scan::fingerprint(&file, base_len).is_ok_and(|now| now == *fp)
        }) {
        Some((h, _)) => h,
        None => {
            // Once per file and leadership: hash the committed prefix.
            let mut h = FileHasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            while off < base_len {
                let want = ((base_len - off) as usize).min(buf.len());
                let n = file
                    .read_at(&mut buf[..want], off)
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                off += n as u64;
            }
            if h.digest() != base {
                // Not an append after all (rewritten in place): send it as a new version.
                drop(file);
                let mut record = shared
                    .record(&set.name, path)
                    .expect("append needs a record");
                record.ino = u64::MAX;
                shared.remember_record(&set.name, path, &record);
                let meta = root.stat(comps).map_err(|e| e.to_string())?.ok_or("gone")?;
                let committed = shared
                    .manifest
                    .read()
                    .unwrap()
                    .get(&set.name, path)
                    .cloned();
                let mut mirror = set.clone();
                mirror.mode = SyncMode::Mirror;
                return examine_file(
                    shared,
                    &mirror,
                    root,
                    path,
                    &meta,
                    committed.as_ref(),
                    names,
                    b,
                )
                .map_err(|e| match e {
                    Problem::Permanent(s) | Problem::Retry(s) => s,
                });
            }
            h
        }
    };
    // Read the tail until the size holds still, so a writer mid-line is not torn.
    let mut attempts = 0;
    let (tail, meta) = loop {
        let before = rustix::fs::fstat(&file).map_err(|e| e.to_string())?;
        let len = (before.st_size as u64).max(base_len);
        let mut tail = vec![0u8; (len - base_len) as usize];
        file.read_exact_at(&mut tail, base_len)
            .map_err(|e| e.to_string())?;
        let after = rustix::fs::fstat(&file).map_err(|e| e.to_string())?;
        // The record must describe exactly the bytes read: its length is
        // where the next tail starts.
        if after.st_size == before.st_size
            && after.st_mtime == before.st_mtime
            && after.st_mtime_nsec == before.st_mtime_nsec
        {
            break (tail, FileMeta::from_stat(&after));
        }
        attempts += 1;
        if attempts >= 5 {
            return Err(format!(
                "{path} kept growing during each of 5 reads; trying again at the next change"
            ));
        }
    };
    hasher.update(&tail);
    let new_digest = hasher.digest();
    let patch = delta::plan_append(&base, &tail);
    if let Ok(fp) = crate::replication::scan::fingerprint(&file, base_len + tail.len() as u64) {
        shared
            .append_hashers
            .lock()
            .unwrap()
            .insert(key, (hasher, fp));
    }
    let m = meta_from_local(&meta, EntryKind::File, names);
    add_put(shared, path, m, new_digest, &patch, tail.len(), b);
    b.pending
        .push((path.clone(), record_of_read(&meta, &new_digest)));
    Ok(())
}

pub(super) fn add_put(
    shared: &Shared,
    path: &SetPath,
    meta: crate::core::manifest::Meta,
    digest: FileDigest,
    patch: &delta::Patch,
    raw_len: usize,
    b: &mut Builder,
) {
    let len = patch.encoded_len();
    shared.counters.bytes_saved.fetch_add(
        (raw_len as u64).saturating_sub(len as u64),
        Ordering::Relaxed,
    );
    let content = if len >= BLOB_MIN {
        if b.blob.is_empty() {
            b.blob_upload = rand::random();
            shared.own_uploads.lock().unwrap().insert(b.blob_upload);
            // All of the batch at once (it is proposed past BATCH_BYTES):
            // growing it copied every byte of a full sync again.
            b.blob.reserve(BATCH_BYTES + len);
        }
        let offset = b.blob.len() as u64;
        patch.encode_into(&mut b.blob);
        Content::Blob {
            upload: b.blob_upload,
            offset,
            len: len as u64,
        }
    } else {
        Content::Inline(patch.encode())
    };
    b.bytes += match &content {
        Content::Inline(p) => p.len(),
        Content::Staged { len, .. } | Content::Blob { len, .. } => *len as usize,
        Content::Unchanged => 0,
    };
    b.ops.push(FileOp::Put {
        path: path.as_bytes().to_vec(),
        meta,
        digest: WireDigest::new(&digest),
        content,
    });
}
