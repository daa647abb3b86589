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

/// Sets whose inotify watches hit the kernel's limit are rescanned whole
/// at least this far apart...
const UNWATCHED_RESCAN_MIN: Duration = Duration::from_secs(10);
/// ...and at most 1/20 of the time: a set of a million files whose walk
/// takes 2 s is rescanned every 40 s, about 5 % of a core.
const UNWATCHED_RESCAN_SHARE: u32 = 20;

/// Quiet time after an event that leaves its file whole (a writer's close,
/// a rename, a removal, a chmod) when no file is still open for writing:
/// waiting the whole `debounce_ms` then would only add to every edit's
/// latency, while this still gathers a burst (`cp -r`, `tar x`, an editor's
/// save) into one batch.
pub(super) const SETTLED_QUIET: Duration = Duration::from_millis(2);

/// One inotify report, as the watcher's thread hands it to the leader.
#[derive(Debug)]
pub(super) struct FileEvent {
    /// Index of the sync set in [`Shared::sets`].
    set: usize,
    /// The local path; empty when the whole set must be rescanned.
    path: PathBuf,
    /// Whether the event leaves the file whole: nothing more is expected
    /// from the writer (see [`SETTLED_QUIET`]).
    settled: bool,
}

impl FileEvent {
    pub(super) fn of(set: usize, path: PathBuf, kind: &notify::EventKind) -> FileEvent {
        FileEvent {
            set,
            path,
            settled: leaves_file_whole(kind),
        }
    }

    /// The whole set must be walked (the event queue overflowed, or a
    /// watch failed): nothing is known of files still being written, so
    /// the full debounce applies.
    fn rescan(set: usize) -> FileEvent {
        FileEvent {
            set,
            path: PathBuf::new(),
            settled: false,
        }
    }
}

/// Whether a notify event leaves its file(s) whole. A write without its
/// close, or a file just created (its content follows), is not.
fn leaves_file_whole(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Create(CreateKind::File) | EventKind::Create(CreateKind::Any) => false,
        EventKind::Create(_) => true,
        EventKind::Modify(ModifyKind::Name(_)) | EventKind::Modify(ModifyKind::Metadata(_)) => true,
        EventKind::Modify(_) => false,
        EventKind::Remove(_) => true,
        _ => false,
    }
}

/// Files written to since their last settling event: while any is, the
/// leader waits the full debounce for quiet. By local path: a file in two
/// sets' trees is closed once.
#[derive(Debug, Default)]
pub(super) struct Unsettled(HashSet<PathBuf>);

impl Unsettled {
    pub(super) fn note(&mut self, ev: &FileEvent) {
        if ev.settled {
            self.0.remove(&ev.path);
        } else if !self.0.contains(&ev.path) {
            self.0.insert(ev.path.clone());
        }
    }

    /// How long to wait for the next event before taking the batch.
    pub(super) fn quiet(&self, debounce: Duration) -> Duration {
        if self.0.is_empty() {
            SETTLED_QUIET.min(debounce)
        } else {
            debounce
        }
    }
}

/// The most inotify watches this user may hold: the lower of
/// `fs.inotify.max_user_watches` and the user namespace's
/// `user.max_inotify_watches` (a container's own limit). `None` when
/// neither can be read.
pub fn inotify_watch_limit() -> Option<u64> {
    [
        "/proc/sys/fs/inotify/max_user_watches",
        "/proc/sys/user/max_inotify_watches",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok())
    .min()
}

/// The sysctl line that lets `needed` watches in, with room to grow.
fn raise_hint(needed: u64) -> String {
    let target = (needed * 2).max(65_536).next_power_of_two();
    format!("`sysctl -w fs.inotify.max_user_watches={target}` (and the same line in /etc/sysctl.d/ to keep it)")
}

/// Directories at and under `dir`, not following symlinks (one watch each).
fn count_dirs(dir: &std::path::Path) -> u64 {
    let mut stack = vec![dir.to_path_buf()];
    let mut n = 0;
    while let Some(d) = stack.pop() {
        n += 1;
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    n
}

/// At start on every data node: warns when the directories of the sets
/// as committed need more inotify watches than the kernel allows this
/// user, naming the sysctl to raise. Such a node still leads (the sets it
/// cannot watch whole are rescanned), but later than inotify would see it.
pub fn warn_watch_budget(shared: &Shared) {
    let Some(limit) = inotify_watch_limit() else {
        return;
    };
    let manifest = shared.manifest.read().unwrap();
    let per_set: Vec<(String, u64)> = shared
        .sets
        .iter()
        .filter(|s| s.single_file.is_none())
        .map(|s| {
            let dirs = manifest.set(&s.name).map_or(0, |m| {
                m.entries
                    .values()
                    .filter(|e| e.meta.kind == EntryKind::Dir)
                    .count() as u64
            });
            (s.name.clone(), dirs + 1)
        })
        .collect();
    let needed: u64 = per_set.iter().map(|(_, n)| n).sum();
    if needed > limit {
        let list: Vec<String> = per_set.iter().map(|(s, n)| format!("{s:?} {n}")).collect();
        warn!(
            needed,
            limit,
            "the sync sets hold {needed} directories ({}), one inotify watch each, but this user may hold {limit} (fs.inotify.max_user_watches): raise it with {}; until then, while this node leads, changes under the directories it cannot watch are found only by rescans",
            list.join(", "),
            raise_hint(needed)
        );
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
        let (tx, mut rx) = mpsc::unbounded_channel::<FileEvent>();
        let mut watches = Watches::new(self.shared.clone());
        // notify walks a set's tree to add its watches, and we wait for it.
        tokio::task::block_in_place(|| {
            for i in 0..self.shared.sets.len() {
                watches.start(i, &tx);
            }
        });
        let mut dirty = Dirty::default();
        for set in &self.shared.sets {
            dirty.full.insert(set.name.clone());
        }
        let mut rescan = tokio::time::interval(self.config.rescan);
        rescan.tick().await;
        let mut retry = tokio::time::interval(Duration::from_millis(500));
        let mut pauses = tokio::time::interval(Duration::from_millis(500));
        let mut unwatched_tick = tokio::time::interval(UNWATCHED_RESCAN_MIN / 2);
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
            if watches.any_unreported() {
                // Counts the sets' directories on disk.
                tokio::task::block_in_place(|| watches.report_limits());
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
                    // Debounce: take everything that arrives while it stays
                    // quiet, the full debounce while a file is half written.
                    let Some(ev) = ev else { return };
                    let mut next = Some(ev);
                    let mut unsettled = Unsettled::default();
                    let until = Instant::now() + self.config.debounce * 10;
                    while let Some(ev) = next.take() {
                        unsettled.note(&ev);
                        self.note(&mut dirty, ev.set, ev.path);
                        if Instant::now() >= until {
                            break;
                        }
                        match tokio::time::timeout(unsettled.quiet(self.config.debounce), rx.recv()).await {
                            Ok(Some(ev)) => next = Some(ev),
                            Ok(None) => return,
                            Err(_) => break,
                        }
                    }
                }
                _ = rescan.tick() => {
                    for (i, set) in self.shared.sets.iter().enumerate() {
                        dirty.full.insert(set.name.clone());
                        // The limit may have been raised: try to watch it whole again.
                        if watches.limited(i) {
                            tokio::task::block_in_place(|| watches.start(i, &tx));
                        }
                    }
                }
                _ = unwatched_tick.tick(), if watches.any_limited() => {
                    for (i, set) in self.shared.sets.iter().enumerate() {
                        if watches.rescan_due(i) {
                            dirty.full.insert(set.name.clone());
                        }
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
            dirty.full.insert(rt.name.clone());
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
}

/// The leader's inotify watches, one watcher per set, and which sets hit
/// the kernel's watch limit (those are rescanned whole instead, see
/// [`Watches::rescan_due`]).
pub(super) struct Watches {
    shared: Arc<Shared>,
    watchers: Vec<Option<notify::RecommendedWatcher>>,
    /// Set by a watcher (its own thread) when adding a watch failed for the
    /// limit: at the start, or for a directory made later.
    hit_limit: Vec<Arc<std::sync::atomic::AtomicBool>>,
    /// Sets whose limit was reported, with when their last rescan for it was due.
    limited: Vec<Option<Instant>>,
}

impl Watches {
    pub(super) fn new(shared: Arc<Shared>) -> Watches {
        let sets = shared.sets.len();
        Watches {
            shared,
            watchers: (0..sets).map(|_| None).collect(),
            hit_limit: (0..sets).map(|_| Default::default()).collect(),
            limited: vec![None; sets],
        }
    }

    /// Watches set `i` (again, replacing its watcher): recursively, or its
    /// one file's directory for a single-file set.
    pub(super) fn start(&mut self, i: usize, tx: &mpsc::UnboundedSender<FileEvent>) {
        let set = &self.shared.sets[i];
        self.watchers[i] = None;
        let hit = self.hit_limit[i].clone();
        hit.store(false, Ordering::SeqCst);
        let tx = tx.clone();
        let handler = {
            let hit = hit.clone();
            move |res: notify::Result<notify::Event>| match res {
                Ok(ev) => {
                    // Opens and read-only closes change nothing, and our own
                    // reads cause them: following them would rescan forever.
                    use notify::event::{AccessKind, AccessMode, EventKind};
                    if matches!(ev.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write))
                    {
                        return;
                    }
                    if ev.need_rescan() {
                        let _ = tx.send(FileEvent::rescan(i));
                    }
                    for path in ev.paths {
                        let _ = tx.send(FileEvent::of(i, path, &ev.kind));
                    }
                }
                Err(e) => {
                    // A directory made since could not be watched: what
                    // happens in it is seen only by rescans from now on.
                    if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
                        hit.store(true, Ordering::SeqCst);
                    }
                    let _ = tx.send(FileEvent::rescan(i));
                }
            }
        };
        let mut w = match notify::recommended_watcher(handler) {
            Ok(w) => w,
            Err(e) => {
                if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
                    hit.store(true, Ordering::SeqCst);
                } else {
                    warn!(set = %set.name, "cannot watch sync set {:?}: {e}; relying on the periodic rescan", set.name);
                }
                return;
            }
        };
        let mode = match set.single_file {
            Some(_) => RecursiveMode::NonRecursive,
            None => RecursiveMode::Recursive,
        };
        if let Err(e) = w.watch(&set.root_dir, mode) {
            if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
                // notify stops at the first directory it cannot watch; those
                // watched so far still report.
                hit.store(true, Ordering::SeqCst);
            } else {
                warn!(set = %set.name, "cannot watch {}: {e}; relying on the periodic rescan", set.root_dir.display());
            }
        }
        self.watchers[i] = Some(w);
    }

    /// Whether set `i` is not watched whole for the limit.
    pub(super) fn limited(&self, i: usize) -> bool {
        self.limited[i].is_some() || self.hit_limit[i].load(Ordering::SeqCst)
    }

    /// Whether a set hit the limit, or got whole again, since last reported.
    pub(super) fn any_unreported(&self) -> bool {
        (0..self.limited.len())
            .any(|i| self.hit_limit[i].load(Ordering::SeqCst) != self.limited[i].is_some())
    }

    pub(super) fn any_limited(&self) -> bool {
        (0..self.limited.len()).any(|i| self.limited(i))
    }

    /// Says once per set, in the log and in its status, that it hit the
    /// limit (what is needed, the sysctl to raise, the rescan period), and
    /// that it is watched whole again once a new watcher got through.
    pub(super) fn report_limits(&mut self) {
        let shared = &self.shared;
        for i in 0..self.limited.len() {
            let set = &shared.sets[i];
            let hit = self.hit_limit[i].load(Ordering::SeqCst);
            match (hit, self.limited[i].is_some()) {
                (true, false) => {
                    let needed: u64 = shared
                        .sets
                        .iter()
                        .filter(|s| s.single_file.is_none())
                        .map(|s| count_dirs(&s.root_dir))
                        .sum();
                    let limit = inotify_watch_limit().unwrap_or(0);
                    let period = rescan_period(shared, &set.name);
                    let why = format!(
                        "inotify reached its limit of {limit} watches (fs.inotify.max_user_watches) while the sync sets hold {needed} directories; raise it with {}; until then set {:?} is rescanned every {}s",
                        raise_hint(needed),
                        set.name,
                        period.as_secs()
                    );
                    warn!(set = %set.name, needed, limit, "{why}");
                    shared.set_unwatched(&set.name, Some(why));
                    self.limited[i] = Some(Instant::now());
                }
                (false, true) => {
                    info!(set = %set.name, "sync set {:?} is watched whole by inotify again", set.name);
                    shared.set_unwatched(&set.name, None);
                    self.limited[i] = None;
                }
                _ => {}
            }
        }
    }

    /// Whether the limited set `i` is due for a rescan (noting it as done).
    pub(super) fn rescan_due(&mut self, i: usize) -> bool {
        let Some(last) = self.limited[i] else {
            return false;
        };
        if last.elapsed() < rescan_period(&self.shared, &self.shared.sets[i].name) {
            return false;
        }
        self.limited[i] = Some(Instant::now());
        true
    }
}

impl Drop for Watches {
    /// Only the leader watches: a node that stops leading has no limited set.
    fn drop(&mut self) {
        for (i, limited) in self.limited.iter().enumerate() {
            if limited.is_some() {
                self.shared.set_unwatched(&self.shared.sets[i].name, None);
            }
        }
    }
}

/// How often a set inotify cannot watch whole is rescanned:
/// [`UNWATCHED_RESCAN_SHARE`] times its last walk, at least
/// [`UNWATCHED_RESCAN_MIN`].
fn rescan_period(shared: &Shared, set: &str) -> Duration {
    let walk = shared.last_walk(set).unwrap_or_default();
    (walk * UNWATCHED_RESCAN_SHARE).max(UNWATCHED_RESCAN_MIN)
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
            let started = Instant::now();
            match walk_keeping(&set, &root, keep) {
                Ok(w) => {
                    if full {
                        shared.note_walk(&name, started.elapsed());
                    }
                    w
                }
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
