//! Accounts sets (`kind = "accounts"`): the bridge between a node's account
//! databases (`/etc/passwd`, `shadow`, `group`, `gshadow`) and the set's
//! committed *view* under `data_dir/accounts/<set>`, which the ordinary
//! file replication carries (so history, `diff` and `rollback` work on
//! records as on any file).
//!
//! - On the leader, the databases are the source: read while no
//!   shadow-utils lock is held, turned into records (refused whole, with
//!   file, line and reason, if any line is malformed or a user lacks its
//!   shadow entry), and written into the view, which the source proposes.
//!   A change removing more than `max_removed` users is held until
//!   `clusterctl sync SET --confirm`.
//! - On a follower, the committed view is merged into its own databases
//!   under `lckpwdf()` and the `<file>.lock` files, in the order that never
//!   shows a user without its shadow entry; records colliding with its own
//!   entries are refused and reported. Governed entries it has that the
//!   cluster never committed (an edit made by hand, a deposed leader's last
//!   `useradd`) are copied to quarantine before the merge replaces them.
//!
//! Invariant owned here: a follower's databases change only to take in a
//! committed view whose every file matches the committed manifest, and the
//! leader's view changes only from databases read whole between locks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::core::accounts::merge::{self, MergePlan};
use crate::core::accounts::records::{RecordKind, Records, VIEW_FILES};
use crate::core::accounts::{DbFile, Files, Table};
use crate::core::delta;
use crate::core::paths::SetPath;
use crate::core::status::{AccountsView, RefusedRecord};
use crate::fs::accounts::AccountsDir;
use crate::fs::root::{FileMeta, Kind, Root};
use crate::replication::shared::{SetRuntime, Shared};

/// How often the databases and the view are looked at (a few `stat`s) when
/// nothing woke the task sooner.
const POLL: Duration = Duration::from_millis(200);
/// How long a follower waits for a shadow-utils writer to finish.
const LOCK_WAIT: Duration = Duration::from_secs(15);
/// How long a lock may keep the leader from reading before it is reported.
const STUCK_LOCK: Duration = Duration::from_secs(60);
/// How long an accounts set's `on_change` may run (as for other sets).
const ON_CHANGE_LIMIT: Duration = Duration::from_secs(60);
/// How long a pass that failed waits before it is tried again unprompted.
const RETRY: Duration = Duration::from_secs(10);

/// One accounts set on this node, as status shows it.
#[derive(Debug, Clone, Default)]
pub struct AccountsState {
    /// Why the leader does not propose the databases' current state.
    pub hold: Option<String>,
    pub view: AccountsView,
    /// `clusterctl sync` asks for a pass now (numbered), the last one the
    /// task answered, and its answer.
    asks: u64,
    answered: u64,
    confirm: bool,
    answer: Option<Result<(), String>>,
}

/// Runs the accounts sets of this node until `stop`.
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let sets: Vec<SetRuntime> = shared
        .sets
        .iter()
        .filter(|s| s.accounts.is_some())
        .cloned()
        .collect();
    if sets.is_empty() {
        return;
    }
    for s in &sets {
        // The view holds password hashes: root's alone, also on followers
        // (whose applier would create the directory with default modes).
        let _ = std::fs::create_dir_all(&s.root_dir);
        if let Err(e) = std::fs::set_permissions(
            &s.root_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        ) {
            warn!(set = %s.name, "cannot make {} private (mode 0700): {e}", s.root_dir.display());
        }
    }
    let mut bridges: Vec<Bridge> = sets.into_iter().map(Bridge::new).collect();
    loop {
        for b in &mut bridges {
            let shared = shared.clone();
            // Small files and short locks; off the runtime's threads anyway.
            let mut moved = std::mem::replace(b, Bridge::new(b.set.clone()));
            *b = tokio::task::spawn_blocking(move || {
                moved.step(&shared);
                moved
            })
            .await
            .expect("the accounts step does not panic");
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shared.accounts_wakeup.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// What one accounts set last did here.
struct Bridge {
    set: SetRuntime,
    /// Stamps of the databases and the view at the last successful pass:
    /// nothing to do while they are unchanged.
    seen: Option<(bool, Vec<Stamp>)>,
    /// The last committed records this node merged or saw committed: a
    /// governed entry that differs from them and from the new records was
    /// never committed.
    last: Option<Records>,
    /// As leader: the records this bridge recently put in the view, newest
    /// last (a committed view among them is this leader's own change).
    written: std::collections::VecDeque<Records>,
    /// As leader: the view files' stamps as this bridge last left them; a
    /// view changed since by someone else (the applier carrying out a
    /// rollback or a restore) is a committed change to take in.
    my_view: Option<Vec<Stamp>>,
    /// As leader: the records its own entries kept off its files at the
    /// last pass.
    refused_before: BTreeSet<(RecordKind, String)>,
    /// After a failed pass, not before then (a merge that cannot succeed
    /// is not retried five times a second).
    retry_at: Option<std::time::Instant>,
    /// As leader: since when a shadow-utils lock kept it from reading.
    busy_since: Option<std::time::Instant>,
}

type Stamp = Option<(u64, u64, i64, u64)>;

fn stamp(p: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).ok().map(|m| {
        (
            m.ino(),
            m.dev(),
            m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            m.len(),
        )
    })
}

impl Bridge {
    fn new(set: SetRuntime) -> Bridge {
        Bridge {
            set,
            seen: None,
            last: None,
            written: Default::default(),
            retry_at: None,
            my_view: None,
            refused_before: BTreeSet::new(),
            busy_since: None,
        }
    }

    fn dir(&self) -> &Path {
        &self.set.accounts.as_ref().expect("an accounts set").dir
    }

    fn view_stamps(&self) -> Vec<Stamp> {
        VIEW_FILES
            .iter()
            .map(|f| stamp(&self.set.root_dir.join(f)))
            .collect()
    }

    fn stamps(&self) -> Vec<Stamp> {
        DbFile::ALL
            .iter()
            .map(|f| stamp(&self.dir().join(f.name())))
            .chain(VIEW_FILES.iter().map(|f| stamp(&self.set.root_dir.join(f))))
            .collect()
    }

    /// The index of the set's last batch applied here.
    fn applied_index(&self, shared: &Shared) -> u64 {
        shared
            .manifest
            .read()
            .unwrap()
            .set(&self.set.name)
            .map_or(0, |m| m.progress.index)
    }

    fn step(&mut self, shared: &Shared) {
        let leading = shared.leading.load(Ordering::Relaxed);
        let name = self.set.name.clone();
        if let Some((ticket, confirm)) = state(shared, &name, |s| {
            (s.asks > s.answered).then_some((s.asks, s.confirm))
        }) {
            let answer = if !leading {
                Some(Err("this node no longer leads".to_string()))
            } else {
                match self.lead(shared, confirm) {
                    Ok(true) => Some(match state(shared, &name, |s| s.hold.clone()) {
                        Some(why) => Err(format!("accounts set {name:?} is held: {why}")),
                        None => Ok(()),
                    }),
                    Ok(false) => None,
                    Err(e) => Some(Err(e)),
                }
            };
            if let Some(answer) = answer {
                with_state(shared, &name, |s| {
                    s.answered = ticket;
                    s.confirm = false;
                    s.answer = Some(answer);
                });
            }
            return;
        }
        let now = (leading, self.stamps());
        let index = self.applied_index(shared);
        // A batch of the set applied since the last pass: a follower merges
        // it, a leader checks whether it was its own.
        let behind = state(shared, &name, |s| s.view.merged_index < index);
        if self.seen.as_ref() == Some(&now) && !behind {
            return;
        }
        if self.retry_at.is_some_and(|t| std::time::Instant::now() < t)
            && self.seen.as_ref() == Some(&now)
        {
            return;
        }
        let done = if leading {
            self.lead(shared, false)
        } else {
            self.follow(shared)
        };
        match done {
            // The stamps from before the pass: a change made during it is
            // looked at again (what the pass itself wrote, once more, to no
            // effect).
            Ok(true) => {
                self.seen = Some(now);
                self.retry_at = None;
                shared.health_of(&self.set.name, |h| h.last_error = None);
            }
            Ok(false) => {}
            Err(e) => {
                shared.note_error(&self.set.name, e);
                // Again when something changes, or in a while.
                self.seen = Some(now);
                self.retry_at = Some(std::time::Instant::now() + RETRY);
            }
        }
    }

    /// The committed records, if the view on disk is exactly what the
    /// manifest committed (`None`: nothing committed yet, or the applier
    /// is between two of its files).
    fn committed(&self, shared: &Shared) -> Result<Option<Records>, String> {
        let mut files = BTreeMap::new();
        for name in VIEW_FILES {
            let path = SetPath::from_network(name.as_bytes()).expect("a plain name");
            let entry = shared.committed_entry(&self.set.name, &path);
            let on_disk = std::fs::read(self.set.root_dir.join(name)).ok();
            match (entry.and_then(|e| e.digest), on_disk) {
                (None, None) => {}
                (Some(d), Some(bytes)) if d.get() == delta::digest(&bytes) => {
                    files.insert(name, bytes);
                }
                _ => return Ok(None),
            }
        }
        if !files.contains_key("passwd") {
            return Ok(None);
        }
        Records::from_view(|n| files.get(n).cloned())
            .map(Some)
            .map_err(|e| format!("accounts set {:?}: {e}", self.set.name))
    }

    /// As leader: the databases, read between locks, into the view.
    /// `Ok(false)`: a writer is at work, try again.
    fn lead(&mut self, shared: &Shared, confirmed: bool) -> Result<bool, String> {
        let name = self.set.name.clone();
        let acc = self.set.accounts.clone().expect("an accounts set");
        let index = self.applied_index(shared);
        let committed = self.committed(shared)?;
        let on_disk = Records::from_view(|n| std::fs::read(self.set.root_dir.join(n)).ok()).ok();
        let ours = on_disk.as_ref().is_some_and(|d| self.written.contains(d));
        if committed.is_none() && !ours && self.committed_anything(shared) {
            // The view on disk is neither what the manifest committed nor
            // this leader's own proposal: the applier is between the
            // renames of a batch, or a file is still being fetched.
            // Writing the view now would overwrite what it applies.
            return Ok(false);
        }
        // Every committed view this leader did not write itself (the
        // previous leader's last change, a rollback) goes into its own
        // files first: reading them as they are would propose it away.
        if let Some(c) = &committed {
            let rewritten = self
                .my_view
                .as_ref()
                .is_some_and(|v| *v != self.view_stamps());
            if rewritten {
                // Not this leader's own write: a rollback or a restore.
                self.written.clear();
            }
            if rewritten || index > state(shared, &name, |s| s.view.merged_index) {
                match self.written.iter().position(|w| w == c) {
                    // Its own proposal (and any before it) committed.
                    Some(i) => drop(self.written.drain(..=i)),
                    // Already in its files: what it merged as a follower
                    // (a batch that changed no record, a reconcile, moved
                    // the index). Merging again would undo a useradd made
                    // right after it took over.
                    None if !rewritten && self.last.as_ref() == Some(c) => {}
                    None => {
                        info!(set = %name, "accounts set {name:?}: the committed accounts (not this leader's own change) go into {} first", acc.dir.display());
                        if !self.merge_into_own(shared, c)? {
                            return Ok(false);
                        }
                    }
                }
                with_state(shared, &name, |s| s.view.merged_index = index);
            }
            self.last = Some(c.clone());
        }
        let dir = AccountsDir::open(&acc.dir).map_err(|e| format!("accounts set {name:?}: {e}"))?;
        let Some(files) = dir
            .read_quiet()
            .map_err(|e| format!("accounts set {name:?}: {e}"))?
        else {
            // A writer at work; one that never finishes (a lock left by a
            // killed tool whose pid now belongs to another process) is
            // said, not waited on silently.
            let since = *self.busy_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= STUCK_LOCK {
                if let Ok(Some(holder)) = dir.busy() {
                    shared.note_error(&name, format!("accounts set {name:?}: {} in {} has been held for {} s, so the leader cannot read the databases; if no useradd/passwd/vipw is running, remove that lock file", holder, acc.dir.display(), since.elapsed().as_secs()));
                }
            }
            return Ok(false);
        };
        self.busy_since = None;
        let hold = |why: String| {
            if state(shared, &name, |s| s.hold.as_ref() != Some(&why)) {
                warn!(set = %name, "accounts set {name:?} held: {why}");
            }
            with_state(shared, &name, |s| s.hold = Some(why));
            Ok(true)
        };
        let mut records = match Records::extract(&files, &acc.policy) {
            Ok(r) => r,
            Err(e) => {
                return hold(format!(
                    "{}: {e}; nothing of this change is replicated until it is fixed",
                    acc.dir.display()
                ))
            }
        };
        // What the change is measured against: this leader's last proposal,
        // else what was committed (nothing, for a set's first change).
        let proposed = if ours { on_disk } else { committed }.unwrap_or_default();
        // Records a collision kept off this node's own files are not
        // removed from the cluster because this node now leads.
        let refused = merge::plan(&files, &proposed, &acc.policy)
            .map(|p| p.refused)
            .unwrap_or_default();
        let names: BTreeSet<(RecordKind, String)> =
            refused.iter().map(|r| (r.kind, r.name.clone())).collect();
        // A collision resolved here (its own entry of that name or id
        // removed) lets the record into this node's files: never out of
        // the cluster because it was missing from them.
        let resolved: BTreeSet<_> = self.refused_before.difference(&names).cloned().collect();
        if !resolved.is_empty() {
            let mut target = records.clone();
            target.keep_refused(&proposed, &resolved);
            if target != records {
                info!(set = %name, "accounts set {name:?}: records this node refused no longer collide; they go into {}", acc.dir.display());
                if !self.merge_into_own(shared, &target)? {
                    return Ok(false);
                }
                records = target;
            }
        }
        self.refused_before = names.clone();
        records.keep_refused(&proposed, &names);
        let removed = records.removed_users(&proposed);
        if removed.len() > acc.policy.max_removed as usize && !confirmed {
            let shown: Vec<&str> = removed.iter().take(5).copied().collect();
            return hold(format!(
                "this change removes {} users at once ({}{}), more than max_removed = {}; if that is meant, run `clusterctl sync {name} --confirm`",
                removed.len(),
                shown.join(", "),
                if removed.len() > shown.len() { ", ..." } else { "" },
                acc.policy.max_removed
            ));
        }
        self.write_view(&records)
            .map_err(|e| format!("accounts set {name:?}: cannot write its view: {e}"))?;
        self.my_view = Some(self.view_stamps());
        if confirmed && !removed.is_empty() {
            info!(set = %name, "accounts set {name:?}: removal of {} users confirmed", removed.len());
        }
        with_state(shared, &name, |s| {
            if s.hold.take().is_some() {
                info!(set = %name, "accounts set {name:?} is no longer held");
            }
            s.view.users = records.users.len() as u64;
            s.view.groups = records.groups.len() as u64;
            s.view.refused = refused.iter().map(refused_record).collect();
            s.view.local_malformed.clear();
        });
        if self.written.back() != Some(&records) {
            self.written.push_back(records);
            if self.written.len() > 16 {
                self.written.pop_front();
            }
        }
        Ok(true)
    }

    /// Whether the manifest holds a committed view of this set at all.
    fn committed_anything(&self, shared: &Shared) -> bool {
        let passwd = SetPath::from_network(b"passwd").expect("a plain name");
        shared.committed_entry(&self.set.name, &passwd).is_some()
    }

    /// Writes the view's files that differ: all prepared and made durable
    /// first, then renamed in one after the other, so the source (which
    /// reads after a quiet moment) and the validator see the five files of
    /// one state, not a user without its shadow line.
    fn write_view(&self, records: &Records) -> Result<(), crate::fs::root::FsError> {
        // `run` made the directory (mode 0700) before the first pass.
        let view = &self.set.root_dir;
        let root = Root::open(view)?;
        // SAFETY: geteuid/getegid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        // The view holds password hashes: readable by root alone.
        let meta = FileMeta::new(Kind::File, 0o600, uid, gid, now);
        let mut prepared = Vec::new();
        for (name, bytes) in records.render() {
            if std::fs::read(view.join(name)).ok().as_deref() == Some(bytes.as_slice()) {
                continue;
            }
            match root.prepare_file(
                &[name],
                &bytes,
                &meta,
                &delta::digest(&bytes).hash,
                None,
                |_| {},
            ) {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    prepared.iter().for_each(|p| root.discard_prepared(p));
                    return Err(e);
                }
            }
        }
        if prepared.is_empty() {
            return Ok(());
        }
        if let Err(e) = root.sync_filesystem() {
            prepared.iter().for_each(|p| root.discard_prepared(p));
            return Err(e);
        }
        let mut result = Ok(());
        for p in &prepared {
            if result.is_ok() {
                result = root
                    .swap_prepared(p, crate::fs::root::Expect::Anything)
                    .map(drop);
            } else {
                root.discard_prepared(p);
            }
        }
        result?;
        root.sync_dir::<&str>(&[])
    }

    /// As follower: the committed view into this node's databases.
    fn follow(&mut self, shared: &Shared) -> Result<bool, String> {
        self.written.clear();
        self.my_view = None;
        self.refused_before.clear();
        // Read before the view: a batch applied meanwhile shows as pending
        // until the next pass merges it.
        let index = self.applied_index(shared);
        let Some(records) = self.committed(shared)? else {
            // Nothing committed yet, or the applier is mid-batch.
            return Ok(!self.committed_anything(shared));
        };
        let merged = self.merge_into_own(shared, &records)?;
        if merged {
            with_state(shared, &self.set.name, |s| s.view.merged_index = index);
        }
        Ok(merged)
    }

    /// Merges `records` into this node's databases under their locks.
    /// `Ok(false)`: a shadow-utils writer held them too long; try again.
    fn merge_into_own(&mut self, shared: &Shared, records: &Records) -> Result<bool, String> {
        let name = self.set.name.clone();
        let acc = self.set.accounts.clone().expect("an accounts set");
        let dir = AccountsDir::open(&acc.dir).map_err(|e| format!("accounts set {name:?}: {e}"))?;
        let mut locked = match dir.lock(LOCK_WAIT) {
            Ok(l) => l,
            Err(e) => {
                warn!(set = %name, "accounts set {name:?}: {e}");
                return Ok(false);
            }
        };
        let files = dir
            .read()
            .map_err(|e| format!("accounts set {name:?}: {e}"))?;
        let plan = merge::plan(&files, records, &acc.policy)
            .map_err(|e| format!("accounts set {name:?}: {} : {e}", acc.dir.display()))?;
        let drift = self.never_committed(&files, &plan);
        if !drift.is_empty() && !plan.steps.is_empty() {
            // Invariant 4: no copy, no merge.
            quarantine_copies(shared, &name, &files, &drift)
                .map_err(|e| format!("accounts set {name:?}: the merge would replace entries nobody committed ({}), and they could not be copied to quarantine ({e}); nothing was written", drift.join(", ")))?;
        }
        for (f, bytes) in &plan.steps {
            locked
                .write(*f, bytes)
                .map_err(|e| format!("accounts set {name:?}: writing {}: {e}; the databases are as the last complete step left them", acc.dir.join(f.name()).display()))?;
        }
        drop(locked);
        if !plan.steps.is_empty() {
            if let Some(cmd) = &self.set.on_change {
                // After the databases changed, so a cache flush (nscd -i)
                // caches the new entries, never the old ones.
                let root = acc.dir.display().to_string();
                let env = [
                    ("CLUSTERD_SET", name.as_str()),
                    ("CLUSTERD_ROOT", root.as_str()),
                ];
                let what = format!("on_change of sync set {name:?}");
                let ran = tokio::runtime::Handle::current().block_on(crate::fs::exec::run_command(
                    cmd,
                    &env,
                    ON_CHANGE_LIMIT,
                    &what,
                ));
                if ran.is_err() {
                    shared
                        .counters
                        .on_change_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            info!(
                set = %name,
                "accounts merged into {}: {} added, {} removed, {} changed{}",
                acc.dir.display(),
                plan.added.len(),
                plan.removed.len(),
                plan.changed.len(),
                summary(&plan)
            );
        }
        self.report(shared, records, &plan);
        self.last = Some(records.clone());
        Ok(true)
    }

    /// Governed users this merge removes or changes whose lines here are
    /// neither the new records' nor those this node last merged: edits
    /// the cluster never committed.
    fn never_committed(&self, files: &Files, plan: &MergePlan) -> Vec<String> {
        let lines = |f: DbFile| -> BTreeMap<String, String> {
            files
                .get(f)
                .map(|b| Table::parse(f, b))
                .map(|t| {
                    t.entries()
                        .map(|(_, e)| (e[0].clone(), e.join(":")))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (pw, sh) = (lines(DbFile::Passwd), lines(DbFile::Shadow));
        plan.removed
            .iter()
            .chain(&plan.changed)
            .filter(|n| {
                let known = self.last.as_ref().and_then(|l| l.user(n));
                known.is_none_or(|u| pw.get(*n) != Some(&u.passwd) || sh.get(*n) != Some(&u.shadow))
            })
            .cloned()
            .collect()
    }

    fn report(&self, shared: &Shared, records: &Records, plan: &MergePlan) {
        let name = &self.set.name;
        let refused: Vec<RefusedRecord> = plan.refused.iter().map(refused_record).collect();
        let malformed: Vec<String> = plan
            .local_malformed
            .iter()
            .map(ToString::to_string)
            .collect();
        with_state(shared, name, |s| {
            for r in &plan.refused {
                if !s
                    .view
                    .refused
                    .iter()
                    .any(|x| x.name == r.name && x.kind == r.kind.as_str())
                {
                    warn!(set = %name, "accounts set {name:?}: not applied on this node: replicated {r}");
                }
            }
            for m in &malformed {
                if !s.view.local_malformed.contains(m) {
                    warn!(set = %name, "accounts set {name:?}: this node's own {m}; kept as it is");
                }
            }
            s.hold = None;
            s.view.users = records.users.len() as u64;
            s.view.groups = records.groups.len() as u64;
            s.view.refused = refused;
            s.view.local_malformed = malformed;
        });
    }
}

fn refused_record(r: &merge::Refusal) -> RefusedRecord {
    RefusedRecord {
        kind: r.kind.as_str().to_string(),
        name: r.name.clone(),
        id: r.id,
        reason: r.reason.clone(),
    }
}

fn summary(plan: &MergePlan) -> String {
    let list = |sign: &str, v: &[String]| -> String {
        v.iter().take(10).map(|n| format!(" {sign}{n}")).collect()
    };
    format!(
        ":{}{}{}",
        list("+", &plan.added),
        list("-", &plan.removed),
        list("~", &plan.changed)
    )
}

fn state<T>(shared: &Shared, set: &str, f: impl FnOnce(&AccountsState) -> T) -> T {
    with_state(shared, set, |s| f(s))
}

fn with_state<T>(shared: &Shared, set: &str, f: impl FnOnce(&mut AccountsState) -> T) -> T {
    f(shared
        .accounts
        .lock()
        .unwrap()
        .entry(set.to_string())
        .or_default())
}

/// Copies this node's four databases into `data_dir/quarantine` with a
/// record each: the merge is about to replace entries of `users` nobody
/// committed. The files stay in use, so they are copied, not moved.
fn quarantine_copies(
    shared: &Shared,
    set: &str,
    files: &Files,
    users: &[String],
) -> std::io::Result<()> {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let leaf = crate::replication::shared::accounts_view_dir(Path::new(""), set);
    let leaf = leaf
        .file_name()
        .expect("a view directory has a name")
        .to_string_lossy()
        .into_owned();
    let mut stamp = format!("{ms}-accounts");
    let mut dir = shared.data_dir.join("quarantine").join(&leaf).join(&stamp);
    for n in 1.. {
        if !dir.exists() {
            break;
        }
        stamp = format!("{ms}-accounts-{n}");
        dir = shared.data_dir.join("quarantine").join(&leaf).join(&stamp);
    }
    let why = format!(
        "the merge of the committed accounts replaces entries of {} that this node has but the cluster never committed",
        users.join(", ")
    );
    std::fs::create_dir_all(&dir)?;
    let mut records = String::new();
    for f in DbFile::ALL {
        let Some(bytes) = files.get(f) else { continue };
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.join(f.name()))?;
            out.write_all(bytes)?;
            out.sync_all()?;
        }
        let record = serde_json::json!({
            "set": set, "path": f.name(), "node": shared.node_id,
            "term": shared.term.load(Ordering::Relaxed), "index": shared.applied.load(Ordering::Relaxed),
            "reason": why, "time_unix_ms": ms, "accounts": true,
            "stored_at": format!("{leaf}/{stamp}/{}", f.name()),
        });
        records.push_str(&format!("{record}\n"));
    }
    let file = shared.data_dir.join("quarantine").join("records.jsonl");
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)?;
    std::io::Write::write_all(&mut out, records.as_bytes())?;
    out.sync_all()?;
    shared
        .counters
        .quarantined
        .fetch_add(records.lines().count() as u64, Ordering::Relaxed);
    warn!(set, "copied this node's account databases to {} before the merge: {why}; `clusterctl conflicts` lists them", dir.display());
    Ok(())
}

/// `clusterctl sync SET [--confirm]` on the leader, before its pass: asks
/// the accounts task to read the databases now (with `confirm`, letting a
/// removal larger than `max_removed` go) and waits for its answer, so the
/// pass that follows proposes what it wrote. Blocking.
pub fn refresh(shared: &Shared, set: &str, confirm: bool) -> Result<(), String> {
    if shared.set(set).is_none_or(|s| s.accounts.is_none()) {
        if confirm {
            return Err(format!(
                "--confirm applies to accounts sets only; {set:?} is not one"
            ));
        }
        return Ok(());
    }
    let ticket = {
        let mut all = shared.accounts.lock().unwrap();
        let s = all.entry(set.to_string()).or_default();
        s.asks += 1;
        s.confirm |= confirm;
        s.asks
    };
    shared.accounts_wakeup.notify_one();
    let deadline = std::time::Instant::now() + LOCK_WAIT + Duration::from_secs(5);
    loop {
        if let Some(answer) = state(shared, set, |s| {
            (s.answered >= ticket).then(|| s.answer.clone())
        }) {
            return answer.unwrap_or(Ok(()));
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!("the account databases of set {set:?} could not be read within {} s (a shadow-utils writer holds them, or the view is still being applied); try again", (LOCK_WAIT + Duration::from_secs(5)).as_secs()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
