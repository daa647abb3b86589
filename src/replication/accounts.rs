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

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::core::accounts::merge::{self, MergePlan};
use crate::core::accounts::records::{Records, VIEW_FILES};
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

/// One accounts set on this node, as status shows it.
#[derive(Debug, Clone, Default)]
pub struct AccountsState {
    /// Why the leader does not propose the databases' current state.
    pub hold: Option<String>,
    pub view: AccountsView,
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
    /// As leader: the records this bridge last put in the view.
    written: Option<Records>,
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
            written: None,
            busy_since: None,
        }
    }

    fn dir(&self) -> &Path {
        &self.set.accounts.as_ref().expect("an accounts set").dir
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
        let now = (leading, self.stamps());
        let index = self.applied_index(shared);
        let behind = !leading && state(shared, &self.set.name, |s| s.view.merged_index < index);
        if self.seen.as_ref() == Some(&now) && !behind {
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
                shared.health_of(&self.set.name, |h| h.last_error = None);
            }
            Ok(false) => {}
            Err(e) => {
                shared.note_error(&self.set.name, e);
                // Not again until something changes.
                self.seen = Some(now);
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
        // A committed change this leader did not write (a rollback, a
        // restore) goes into its own files first, or the next read of them
        // would propose it away again.
        let committed = self.committed(shared)?;
        if let (Some(c), Some(w)) = (&committed, &self.written) {
            if c != w && self.last.as_ref() != Some(c) {
                info!(set = %name, "accounts set {name:?}: a committed change this leader did not make (a rollback?) goes into {}", acc.dir.display());
                if !self.merge_into_own(shared, c)? {
                    return Ok(false);
                }
            }
        }
        if committed.is_some() {
            self.last = committed;
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
        // What this node last proposed (as follower: what it applied).
        let proposed = Records::from_view(|n| std::fs::read(self.set.root_dir.join(n)).ok())
            .unwrap_or_default();
        // Records a collision kept off this node's own files are not
        // removed from the cluster because this node now leads.
        let refused = merge::plan(&files, &proposed, &acc.policy)
            .map(|p| p.refused)
            .unwrap_or_default();
        let names = refused.iter().map(|r| (r.kind, r.name.clone())).collect();
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
        self.written = Some(records);
        Ok(true)
    }

    /// Writes the view's files that differ, shadow files before the
    /// others, so the source never reads a user without its shadow line.
    fn write_view(&self, records: &Records) -> Result<(), crate::fs::root::FsError> {
        let view = &self.set.root_dir;
        if !view.exists() {
            let _ = std::fs::create_dir_all(view);
            let _ =
                std::fs::set_permissions(view, std::os::unix::fs::PermissionsExt::from_mode(0o700));
        }
        let root = Root::open(view)?;
        let mut files = records.render();
        let rank = |n: &str| match n {
            "shadow" | "gshadow" => 0,
            "group" => 1,
            _ => 2,
        };
        files.sort_by_key(|(n, _)| rank(n));
        // SAFETY: geteuid/getegid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        for (name, bytes) in files {
            if std::fs::read(view.join(name)).ok().as_deref() == Some(bytes.as_slice()) {
                continue;
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i128);
            // The view holds password hashes: readable by root alone.
            let meta = FileMeta::new(Kind::File, 0o600, uid, gid, now);
            root.replace_file(&[name], &bytes, &meta, &delta::digest(&bytes).hash)?;
        }
        Ok(())
    }

    /// As follower: the committed view into this node's databases.
    fn follow(&mut self, shared: &Shared) -> Result<bool, String> {
        self.written = None;
        // Read before the view: a batch applied meanwhile shows as pending
        // until the next pass merges it.
        let index = self.applied_index(shared);
        let Some(records) = self.committed(shared)? else {
            // Nothing committed yet, or the applier is mid-batch.
            let passwd = SetPath::from_network(b"passwd").expect("a plain name");
            return Ok(shared.committed_entry(&self.set.name, &passwd).is_none());
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
            quarantine_copies(shared, &name, &files, &drift);
        }
        for (f, bytes) in &plan.steps {
            locked
                .write(*f, bytes)
                .map_err(|e| format!("accounts set {name:?}: writing {}: {e}; the databases are as the last complete step left them", acc.dir.join(f.name()).display()))?;
        }
        drop(locked);
        if !plan.steps.is_empty() {
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
                    warn!(set = %name, "accounts set {name:?}: replicated {r} is not applied on this node");
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
    f(shared
        .accounts
        .lock()
        .unwrap()
        .entry(set.to_string())
        .or_default())
}

fn with_state(shared: &Shared, set: &str, f: impl FnOnce(&mut AccountsState)) {
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
fn quarantine_copies(shared: &Shared, set: &str, files: &Files, users: &[String]) {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let stamp = format!("{ms}-accounts");
    let dir = shared.data_dir.join("quarantine").join(set).join(&stamp);
    let why = format!(
        "the merge of the committed accounts replaces entries of {} that this node has but the cluster never committed",
        users.join(", ")
    );
    let mut records = String::new();
    for f in DbFile::ALL {
        let Some(bytes) = files.get(f) else { continue };
        let written = std::fs::create_dir_all(&dir).and_then(|_| {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.join(f.name()))?;
            out.write_all(bytes)?;
            out.sync_all()
        });
        if let Err(e) = written {
            warn!(set, "cannot copy {} into quarantine: {e}", f.name());
            continue;
        }
        shared.counters.quarantined.fetch_add(1, Ordering::Relaxed);
        let record = serde_json::json!({
            "set": set, "path": f.name(), "node": shared.node_id,
            "term": shared.term.load(Ordering::Relaxed), "index": shared.applied.load(Ordering::Relaxed),
            "reason": why, "time_unix_ms": ms, "accounts": true,
            "stored_at": format!("{set}/{stamp}/{}", f.name()),
        });
        records.push_str(&format!("{record}\n"));
    }
    let file = shared.data_dir.join("quarantine").join("records.jsonl");
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, records.as_bytes())?;
            f.sync_all()
        });
    if let Err(e) = appended {
        warn!("cannot append to {}: {e}", file.display());
    }
    warn!(set, "copied this node's account databases to {} before the merge: {why}; `clusterctl conflicts` lists them", dir.display());
}

/// `clusterctl sync SET [--confirm]` on the leader, before its pass: reads
/// the databases now, and with `confirm` lets a removal larger than
/// `max_removed` go. Returns once the view holds the databases' state (or
/// says why not).
pub fn refresh(shared: &Shared, set: &str, confirm: bool) -> Result<(), String> {
    let Some(rt) = shared.set(set).filter(|s| s.accounts.is_some()).cloned() else {
        if confirm {
            return Err(format!(
                "--confirm applies to accounts sets only; {set:?} is not one"
            ));
        }
        return Ok(());
    };
    let mut b = Bridge::new(rt);
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        if b.lead(shared, confirm)? {
            break;
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!("the account databases of set {set:?} stayed locked by a shadow-utils writer for {} s; try again", LOCK_WAIT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match state(shared, set, |s| s.hold.clone()) {
        Some(why) => Err(format!("accounts set {set:?} is held: {why}")),
        None => {
            shared.accounts_wakeup.notify_one();
            Ok(())
        }
    }
}
