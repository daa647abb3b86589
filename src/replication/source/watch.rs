//! The watcher: inotify (through notify), debounced, plus the periodic
//! rescan; what it finds becomes dirty paths for the planner.

use super::*;
/// What changed where, as the watcher reports it.
#[derive(Debug, Default)]
pub(super) struct Dirty {
    pub(super) paths: BTreeMap<String, BTreeSet<SetPath>>,
    /// Sets to rescan whole (watcher overflow, a new watch, a marker gone).
    pub(super) full: BTreeSet<String>,
}

impl Dirty {
    pub(super) fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.full.is_empty()
    }
}

pub struct Source {
    shared: Arc<Shared>,
    node: NodeHandle,
    /// Content is staged on the followers through these links, and the
    /// applied indexes the followers report on them pace the proposals.
    transport: Transport,
    config: ReplicationConfig,
}

impl Source {
    pub fn new(
        shared: Arc<Shared>,
        node: NodeHandle,
        transport: Transport,
        config: ReplicationConfig,
    ) -> Source {
        Source {
            shared,
            node,
            transport,
            config,
        }
    }

    /// Runs for the life of the node: idle while following, the source while leading.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        if self.shared.sets.is_empty() {
            return;
        }
        loop {
            let lead = self
                .node
                .wait_view(Duration::from_secs(3600), |v| v.role == Role::Leader);
            let view = tokio::select! {
                v = lead => v,
                _ = stop.changed() => return,
            };
            let Some(view) = view else { continue };
            let term = view.term;
            tokio::select! {
                _ = self.lead(term) => {}
                _ = stop.changed() => return,
            }
        }
    }

    pub(super) async fn lead(&self, term: u64) {
        // The no-op of this term applied here means the manifest is current.
        if let Err(e) = self.node.local_barrier(Duration::from_secs(10)).await {
            debug!(term, "not starting as the source yet: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        self.settle_missing(term).await;
        info!(
            term,
            sets = self.shared.sets.len(),
            "leading: watching the sync sets and reconciling them with the committed manifest"
        );
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, PathBuf)>();
        let _watchers = self.watch(tx);
        let mut dirty = Dirty::default();
        for set in &self.shared.sets {
            dirty.full.insert(set.name.clone());
        }
        let mut rescan = tokio::time::interval(self.config.rescan);
        rescan.tick().await;
        let mut retry = tokio::time::interval(Duration::from_millis(500));
        let mut pauses = tokio::time::interval(Duration::from_millis(500));
        let mut was_paused: BTreeSet<String> = self.paused_sets();
        loop {
            // A set leaves its pause with one full pass of what accumulated.
            let paused = self.paused_sets();
            for set in was_paused.difference(&paused) {
                dirty.full.insert(set.clone());
            }
            was_paused = paused;
            self.resume_expired(term).await;
            let asks = std::mem::take(&mut *self.shared.sync_requests.lock().unwrap());
            for ask in &asks {
                match &ask.set {
                    Some(set) => {
                        dirty.full.insert(set.clone());
                    }
                    None => dirty
                        .full
                        .extend(self.shared.sets.iter().map(|s| s.name.clone())),
                }
            }
            if !dirty.is_empty() {
                let work = std::mem::take(&mut dirty);
                let shared = self.shared.clone();
                let node = self.node.clone();
                let transport = self.transport.clone();
                let rt = tokio::runtime::Handle::current();
                let result = tokio::task::spawn_blocking(move || {
                    let mut left = Dirty::default();
                    let r = process(&shared, &node, &transport, &rt, term, work, &mut left);
                    (r, left)
                })
                .await;
                match result {
                    Ok((Ok(()), left)) => {
                        dirty = left;
                        self.shared
                            .start_reconciled
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok((Err(e), _)) => {
                        info!(term, "stopped proposing: {e}");
                        for ask in asks {
                            let _ = ask
                                .reply
                                .send(Err(format!("this node stopped leading: {e}")));
                        }
                        return;
                    }
                    Err(e) => {
                        warn!(term, "the change planner failed: {e}");
                        return;
                    }
                }
            }
            if !asks.is_empty() {
                self.reconcile_followers(term, asks).await;
            }
            if self.node.view().term != term || self.node.view().role != Role::Leader {
                return;
            }
            tokio::select! {
                ev = rx.recv() => {
                    let Some((set, path)) = ev else { return };
                    self.note(&mut dirty, set, path);
                    // Debounce: take everything that arrives while it stays quiet.
                    let until = Instant::now() + self.config.debounce * 10;
                    loop {
                        match tokio::time::timeout(self.config.debounce, rx.recv()).await {
                            Ok(Some((s, p))) => self.note(&mut dirty, s, p),
                            Ok(None) => return,
                            Err(_) => break,
                        }
                        if Instant::now() >= until {
                            break;
                        }
                    }
                }
                _ = rescan.tick() => {
                    for set in &self.shared.sets {
                        dirty.full.insert(set.name.clone());
                    }
                }
                _ = retry.tick(), if !dirty.is_empty() => {}
                _ = pauses.tick(), if !was_paused.is_empty() => {}
                _ = self.shared.sync_wakeup.notified() => {}
                _ = self.node.wait_view(Duration::from_secs(1), |v| v.term != term || v.role != Role::Leader) => {}
            }
        }
    }

    /// The sets paused now, as committed.
    fn paused_sets(&self) -> BTreeSet<String> {
        self.shared
            .manifest
            .read()
            .unwrap()
            .paused
            .keys()
            .cloned()
            .collect()
    }

    /// Resumes the sets whose `--for` ran out (only the leader's clock
    /// decides, so a pause ends once however often leadership moved).
    async fn resume_expired(&self, term: u64) {
        let now = unix_ms();
        let expired: Vec<String> = (self.shared.manifest.read().unwrap().paused.iter())
            .filter(|(_, p)| p.until_ms.is_some_and(|until| until <= now))
            .map(|(set, _)| set.clone())
            .collect();
        for set in expired {
            let resume = Command::Resume {
                set: set.clone(),
                by: format!("node {} (its --for ran out)", self.node.id()),
            };
            if let Err(e) = self
                .node
                .propose(term, vec![resume], Duration::from_secs(5))
                .await
            {
                debug!(term, set = %set, "could not resume the expired pause yet: {e}");
            }
        }
    }

    /// Answers `clusterctl sync` requests once their full pass is proposed:
    /// a committed `Reconcile` makes every follower square its copy with
    /// the manifest, and its index tells the caller what to wait for.
    async fn reconcile_followers(&self, term: u64, asks: Vec<crate::replication::shared::SyncAsk>) {
        // One ask for every set makes the reconcile name none (all).
        let sets: Vec<String> = match asks
            .iter()
            .map(|a| a.set.clone())
            .collect::<Option<BTreeSet<_>>>()
        {
            Some(named) => named.into_iter().collect(),
            None => Vec::new(),
        };
        let result = self
            .node
            .propose(
                term,
                vec![Command::Reconcile { sets }],
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| format!("the leader could not commit the reconcile: {e}"));
        for ask in asks {
            let _ = ask.reply.send(result.clone());
        }
    }

    /// Gives the fetcher a moment to bring missing content before this
    /// node's tree becomes the source; what no peer could supply is taken
    /// as it is here.
    pub(super) async fn settle_missing(&self, term: u64) {
        let deadline = Instant::now() + MISSING_GRACE;
        while !self.shared.missing.lock().unwrap().is_empty() && Instant::now() < deadline {
            self.shared.fetch_wakeup.notify_one();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Paths still missing are never proposed from this tree (their local
        // copy is older than what the cluster committed, or absent): they
        // stay as committed until a peer supplies them.
        for (set, path) in self.shared.missing.lock().unwrap().keys() {
            warn!(term, set = %set, path = %path, "this leader lacks the committed version of {path}; it is not proposed from here until a peer supplies it, or every data node has said it lacks that version too");
        }
    }

    pub(super) fn note(&self, dirty: &mut Dirty, set: usize, full: PathBuf) {
        let rt = &self.shared.sets[set];
        if full == rt.root_dir || full == rt.path {
            if rt.single_file.is_some() {
                dirty.full.insert(rt.name.clone());
            } else {
                dirty.full.insert(rt.name.clone());
            }
            return;
        }
        match SetPath::from_local(&rt.root_dir, &full) {
            Ok(p) => {
                if let Some(name) = &rt.single_file {
                    if &p != name {
                        return;
                    }
                }
                if crate::fs::root::is_temp_name(p.file_name()) {
                    return;
                }
                let s = dirty.paths.entry(rt.name.clone()).or_default();
                // A child's event changes its directory's mtime too.
                if let Some(parent) = p.parent() {
                    s.insert(parent);
                }
                s.insert(p);
            }
            Err(_) => {
                dirty.full.insert(rt.name.clone());
            }
        }
    }

    pub(super) fn watch(
        &self,
        tx: mpsc::UnboundedSender<(usize, PathBuf)>,
    ) -> Vec<notify::RecommendedWatcher> {
        let mut out = Vec::new();
        for (i, set) in self.shared.sets.iter().enumerate() {
            let tx = tx.clone();
            let handler = move |res: notify::Result<notify::Event>| match res {
                Ok(ev) => {
                    // Opens and read-only closes change nothing, and our own
                    // reads cause them: following them would rescan forever.
                    use notify::event::{AccessKind, AccessMode, EventKind};
                    if matches!(ev.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write))
                    {
                        return;
                    }
                    if ev.need_rescan() {
                        let _ = tx.send((i, PathBuf::new()));
                    }
                    for p in ev.paths {
                        let _ = tx.send((i, p));
                    }
                }
                Err(_) => {
                    let _ = tx.send((i, PathBuf::new()));
                }
            };
            let mut w = match notify::recommended_watcher(handler) {
                Ok(w) => w,
                Err(e) => {
                    warn!(set = %set.name, "cannot watch sync set {:?}: {e}; relying on the periodic rescan", set.name);
                    continue;
                }
            };
            let (target, mode) = match set.single_file {
                Some(_) => (&set.root_dir, RecursiveMode::NonRecursive),
                None => (&set.root_dir, RecursiveMode::Recursive),
            };
            if let Err(e) = w.watch(target, mode) {
                warn!(set = %set.name, "cannot watch {}: {e}; relying on the periodic rescan (raise fs.inotify.max_user_watches for large trees)", target.display());
            }
            out.push(w);
        }
        out
    }
}

/// Plans and proposes everything in `work`, one batch at a time.
pub(super) fn process(
    shared: &Arc<Shared>,
    node: &NodeHandle,
    transport: &Transport,
    rt: &tokio::runtime::Handle,
    term: u64,
    work: Dirty,
    left: &mut Dirty,
) -> Result<(), RequestError> {
    let mut sets: BTreeSet<String> = work.full.clone();
    sets.extend(work.paths.keys().cloned());
    for name in sets {
        let Some(set) = shared.set(&name).cloned() else {
            continue;
        };
        if shared.manifest.read().unwrap().paused.contains_key(&name) {
            // Edits accumulate on disk; the resume brings them in one pass.
            continue;
        }
        let root = match set.open_root() {
            Ok(r) => r,
            Err(e) => {
                shared.note_error(&name, format!("cannot open sync set {name:?}: {e}"));
                continue;
            }
        };
        // A held set's earlier changes are still on disk, unproposed: each
        // pass of it looks at the whole set, so they go with the next one.
        let full = work.full.contains(&name) || (set.validate.is_some() && shared.is_held(&name));
        // A full pass keeps, of what it walks, only what is not settled
        // (see `settled`); the rest are only marked as seen, to tell the
        // committed paths that are gone.
        let mut walked = SeenPaths::default();
        let mut names = OwnerNames::default();
        let (found, marker) = if full || set.filter.has_skip_while() {
            let keep = |f: &Found| {
                if !full {
                    return false; // only looking for a skip_while marker
                }
                walked.insert(&f.path);
                !settled(shared, &set, &f.path, &f.meta, &mut names)
            };
            match walk_keeping(&set, &root, keep) {
                Ok(w) => w,
                Err(e) => {
                    shared.note_error(&name, format!("cannot scan sync set {name:?}: {e}"));
                    continue;
                }
            }
        } else {
            (Vec::new(), false)
        };
        if marker {
            debug!(set = %name, "a skip_while marker exists; leaving the set alone for now");
            shared.set_skipping(&name, true);
            // Come back to it: a full pass once the marker is gone.
            left.full.insert(name.clone());
            continue;
        }
        shared.set_skipping(&name, false);
        let paths: Vec<SetPath> = if full {
            let m = shared.manifest.read().unwrap();
            let gone = m
                .set(&name)
                .map(|m| m.entries.keys())
                .into_iter()
                .flatten()
                .filter(|p| !walked.contains(p));
            merge_sorted(found.iter().map(|f| &f.path), gone)
        } else {
            let mut paths: BTreeSet<SetPath> = work.paths.get(&name).cloned().unwrap_or_default();
            // A directory new to the manifest may have been filled before its
            // watch existed (`mkdir -p a/b && echo > a/b/c`, or a tree moved
            // in whole): take its whole subtree.
            let new_dirs: Vec<SetPath> = {
                let m = shared.manifest.read().unwrap();
                paths
                    .iter()
                    .filter(|p| {
                        m.get(&name, p)
                            .is_none_or(|e| e.meta.kind != EntryKind::Dir)
                    })
                    .filter(|p| {
                        root.stat(&p.components().collect::<Vec<_>>())
                            .ok()
                            .flatten()
                            .is_some_and(|st| st.kind == Kind::Dir)
                    })
                    .cloned()
                    .collect()
            };
            for d in new_dirs {
                crate::replication::scan::local_subtree(&set, &root, &d, &mut paths);
            }
            let paths: Vec<SetPath> = paths.into_iter().collect();
            if set.hard_links {
                with_other_names(shared, &set, &root, paths)
            } else {
                paths
            }
        };
        plan_and_propose(
            shared, node, transport, rt, term, &set, &root, paths, &found, left,
        )?;
    }
    Ok(())
}

/// The union of two sorted sequences of paths, sorted, each path once.
pub(super) fn merge_sorted<'p>(
    a: impl Iterator<Item = &'p SetPath>,
    b: impl Iterator<Item = &'p SetPath>,
) -> Vec<SetPath> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    let mut out = Vec::with_capacity(a.size_hint().0.max(b.size_hint().0));
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => match x.cmp(y) {
                std::cmp::Ordering::Less => a.next(),
                std::cmp::Ordering::Greater => b.next(),
                std::cmp::Ordering::Equal => {
                    b.next();
                    a.next()
                }
            },
            (Some(_), None) => a.next(),
            (None, _) => b.next(),
        };
        match next {
            Some(p) => out.push(p.clone()),
            None => return out,
        }
    }
}
