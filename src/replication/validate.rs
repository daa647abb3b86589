//! Validation of a set's change before it leaves the leader (`[[sync]]
//! validate`): the set as it would be after the change is staged under
//! `data_dir/validate/` (a tree laid out like the root), the validator runs
//! on that copy, and its verdict decides whether the change is proposed or
//! held.
//!
//! Invariants owned here:
//! * The validator never changes the live tree or `data_dir`: where mount
//!   namespaces work, both are read-only in the namespace validators run in
//!   (the node's [`Sandbox`], made once). On the leader it sees the live
//!   root through a read-only mount there; otherwise it gets a staged copy
//!   whose files are hard links only where that namespace keeps it from
//!   writing through them, and copies elsewhere.
//! * A staged copy never outlives its check (removed when the check ends,
//!   and what a crash left is removed at the next start), except a
//!   follower's copy of a held set and its recent copy (`apply::check`).
//! * What was validated is what is proposed: the check runs before the
//!   pass plans anything, and the pass proposes a file only if it still is
//!   the file that was staged (same inode, size and mtime); one that
//!   changed since waits for the next check.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};

use crate::core::paths::SetPath;
use crate::fs::exec::{read_only_mounts_work, run_check, CheckOutcome, ReadOnlyView};
use crate::fs::root::{FileMeta, Kind, Root};
use crate::replication::scan::walk_keeping;
use crate::replication::shared::{SetRuntime, Shared};

/// Where staged copies live, under `data_dir`.
const VALIDATE_DIR: &str = "validate";
/// Where a follower keeps the copy of a set it holds, under `data_dir`:
/// the set as committed, which later changes are laid over; kept across
/// restarts like the hold itself.
const HELD_DIR: &str = "held";

/// Where the leader's validators see each set's live root, under
/// `VALIDATE_DIR` (mounted there only inside the [`Sandbox`]).
const VIEW_DIR: &str = "view";

/// The mount namespace this node's validators run in: `data_dir` and the
/// root of every validated set read-only, and each such root shown again,
/// read-only, at its view directory. Made at the first check and again
/// when a root was replaced or appeared; `None` where mount namespaces are
/// not available (validators then get copies).
#[derive(Default)]
pub struct Sandbox {
    made: Mutex<Option<MadeSandbox>>,
}

struct MadeSandbox {
    view: Arc<ReadOnlyView>,
    /// Roots that did not exist when it was made (not mounted).
    missing: Vec<PathBuf>,
}

impl Sandbox {
    /// The namespace for `data_dir` and `sets`, made now if needed.
    pub fn view(&self, data_dir: &Path, sets: &[SetRuntime]) -> Option<Arc<ReadOnlyView>> {
        let mut made = self.made.lock().unwrap();
        if let Some(m) = made.as_ref() {
            if m.view.is_current() && m.missing.iter().all(|p| !p.exists()) {
                return Some(m.view.clone());
            }
        }
        *made = None;
        let validate = data_dir.join(VALIDATE_DIR);
        if !read_only_mounts_work(data_dir) {
            return None;
        }
        let validated: Vec<(usize, &SetRuntime)> = sets
            .iter()
            .enumerate()
            .filter(|(_, s)| s.validate.is_some())
            .collect();
        let mut mounts: Vec<(PathBuf, PathBuf)> =
            vec![(data_dir.to_path_buf(), data_dir.to_path_buf())];
        let mut views = Vec::new();
        let mut missing = Vec::new();
        for &(i, set) in &validated {
            if !set.root_dir.is_dir() {
                missing.push(set.root_dir.clone());
                continue;
            }
            let at = view_dir(data_dir, i, set);
            if let Err(e) = fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&at)
            {
                warn!(set = %set.name, "cannot make {}: {e}; validators get copies", at.display());
                return None;
            }
            mounts.push((set.root_dir.clone(), set.root_dir.clone()));
            views.push((set.root_dir.clone(), at));
        }
        // The views lie in data_dir: mounted after it.
        mounts.extend(views);
        let pairs: Vec<(&Path, &Path)> = mounts
            .iter()
            .map(|(s, t)| (s.as_path(), t.as_path()))
            .collect();
        match ReadOnlyView::new(&pairs) {
            Ok(view) => {
                let view = Arc::new(view);
                *made = Some(MadeSandbox {
                    view: view.clone(),
                    missing,
                });
                Some(view)
            }
            Err(e) => {
                warn!("cannot make the read-only mount namespace validators run in (under {}): {e}; they get copies", validate.display());
                None
            }
        }
    }
}

/// Where the sandbox shows the live root of `set`, the `index`th set.
fn view_dir(data_dir: &Path, index: usize, set: &SetRuntime) -> PathBuf {
    data_dir
        .join(VALIDATE_DIR)
        .join(VIEW_DIR)
        .join(format!("{index}-{}", sanitized(&set.name)))
}

/// Removes staged copies a crash left behind. Called once at start,
/// before anything validates.
pub fn remove_leftovers(data_dir: &Path) {
    let dir = data_dir.join(VALIDATE_DIR);
    if dir.exists() {
        if let Err(e) = fs::remove_dir_all(&dir) {
            warn!("cannot remove staged copies left in {}: {e}", dir.display());
        }
    }
}

/// How a staged copy holds the unchanged files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageMode {
    /// No copy at all: the live root itself, mounted read-only in the
    /// validator's own mount namespace. On the leader, whose tree is the
    /// set after the change, checking costs nothing per file.
    View,
    /// Hard links, protected by a read-only mount in the validator's own
    /// mount namespace: a 10,000-file set stages in milliseconds.
    Link,
    /// Copies (content, mode, owner, mtime), where mount namespaces are not
    /// available (a hardened systemd unit without CAP_SYS_ADMIN).
    Copy,
}

/// The files a passed check saw: (inode, size, mtime) by path. A file the
/// pass is about to propose must still match, or it waits for the next
/// check.
#[derive(Debug, Default)]
pub struct Checked {
    files: std::collections::HashMap<SetPath, (u64, u64, i128)>,
}

impl Checked {
    /// Whether `meta` is the version of `path` the validator saw.
    pub fn saw(&self, path: &SetPath, meta: &FileMeta) -> bool {
        self.files.get(path) == Some(&(meta.ino, meta.len, meta.mtime_ns))
    }
}

/// A staged copy of one set, removed when dropped.
pub struct Staged {
    dir: PathBuf,
    /// What `{}` stands for: `dir`, or the file in it for a single-file set.
    target: PathBuf,
    pub mode: StageMode,
    pub files: usize,
    /// What each staged file was when it was staged.
    checked: Checked,
    /// The node's `data_dir`, where held copies are kept.
    data_dir: PathBuf,
    /// A held copy stays on disk when dropped (see [`Staged::keep_as_held`]).
    keep: bool,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            warn!("cannot remove the staged copy {}: {e}", self.dir.display());
        }
    }
}

/// A new, empty, private directory for one staged copy of `set`.
/// What `{}` stands for in a copy at `dir`: `dir`, or the file in it for
/// a single-file set.
fn target_in(set: &SetRuntime, dir: &Path) -> PathBuf {
    match &set.single_file {
        Some(name) => name.to_local(dir),
        None => dir.to_path_buf(),
    }
}

/// Hard links where the sandbox keeps the validator from writing through
/// them, copies elsewhere.
fn link_mode(shared: &Shared) -> StageMode {
    if shared
        .sandbox
        .view(&shared.data_dir, &shared.sets)
        .is_some()
    {
        StageMode::Link
    } else {
        StageMode::Copy
    }
}

fn fresh_dir(data_dir: &Path, set: &SetRuntime) -> io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let parent = data_dir.join(VALIDATE_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)?;
    let dir = parent.join(format!(
        "{}.{}.{}",
        sanitized(&set.name),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

impl Staged {
    /// The live root of `set` as the validator's read-only view, where
    /// mount namespaces work (else `None`: stage a copy instead). Nothing
    /// is staged: the view directory exists for as long as the node runs.
    pub fn view_of_live(shared: &Shared, set: &SetRuntime) -> Option<Staged> {
        shared.sandbox.view(&shared.data_dir, &shared.sets)?;
        let index = shared.sets.iter().position(|s| s.name == set.name)?;
        let dir = view_dir(&shared.data_dir, index, set);
        Some(Staged {
            target: target_in(set, &dir),
            dir,
            mode: StageMode::View,
            files: 0,
            checked: Checked::default(),
            data_dir: shared.data_dir.clone(),
            keep: true,
        })
    }

    /// Stages `set` as its root holds it now, without excluded or
    /// temporary files: hard links where the sandbox keeps the validator
    /// from writing through them, copies elsewhere.
    pub fn of_tree(shared: &Shared, set: &SetRuntime, root: &Root) -> io::Result<Staged> {
        let dir = fresh_dir(&shared.data_dir, set)?;
        let mode = link_mode(shared);
        let target = target_in(set, &dir);
        let mut staged = Staged {
            dir,
            target,
            mode,
            files: 0,
            checked: Checked::default(),
            data_dir: shared.data_dir.clone(),
            keep: false,
        };
        let (found, _) = walk_keeping(set, root, |_| true).map_err(io::Error::other)?;
        let mut dirs = Vec::new();
        for f in &found {
            let at = f.path.to_local(&staged.dir);
            let comps: Vec<&[u8]> = f.path.components().collect();
            match f.meta.kind {
                Kind::Dir => {
                    fs::DirBuilder::new().mode(0o700).create(&at)?;
                    dirs.push((at, f.meta));
                }
                Kind::File => {
                    let Some((file, meta)) = root.open_file(&comps).map_err(io::Error::other)?
                    else {
                        continue; // gone since the walk
                    };
                    staged.put_file(&file, &meta, &at)?;
                    staged.files += 1;
                    staged
                        .checked
                        .files
                        .insert(f.path.clone(), (meta.ino, meta.len, meta.mtime_ns));
                }
                Kind::Symlink => {
                    if let Some(target) = root.read_link(&comps).map_err(io::Error::other)? {
                        use std::os::unix::ffi::OsStrExt;
                        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &at)?;
                    }
                }
                _ => {}
            }
        }
        // Directories get their own mode and owner last, once filled
        // (a 0555 directory could not have been filled).
        for (at, meta) in dirs.iter().rev() {
            give_meta(at, meta)?;
        }
        Ok(staged)
    }

    fn put_file(&self, file: &fs::File, meta: &FileMeta, at: &Path) -> io::Result<()> {
        if self.mode == StageMode::Link
            && rustix::fs::linkat(
                file,
                "",
                rustix::fs::CWD,
                at,
                rustix::fs::AtFlags::EMPTY_PATH,
            )
            .is_ok()
        {
            return Ok(());
        }
        // Another filesystem than data_dir's, or no CAP_DAC_READ_SEARCH:
        // a copy of its own.
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(at)?;
        let mut input = file;
        io::copy(&mut input, &mut out)?;
        drop(out);
        give_meta(at, meta)
    }

    /// Moves this copy to where a held set's copy lives and keeps it there
    /// (also when dropped, and across restarts) until [`Staged::release`].
    pub fn keep_as_held(&mut self, set: &SetRuntime) -> io::Result<()> {
        let parent = self.data_dir.join(HELD_DIR);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)?;
        let dir = parent.join(sanitized(&set.name));
        if dir != self.dir {
            if dir.exists() {
                fs::remove_dir_all(&dir)?;
            }
            fs::rename(&self.dir, &dir)?;
            self.target = target_in(set, &dir);
            self.dir = dir;
        }
        self.keep = true;
        Ok(())
    }

    /// The held copy of `set` a previous run kept, if there is one.
    pub fn adopt_held(shared: &Shared, set: &SetRuntime) -> Option<Staged> {
        let dir = shared.data_dir.join(HELD_DIR).join(sanitized(&set.name));
        if !dir.is_dir() {
            return None;
        }
        let mode = link_mode(shared);
        Some(Staged {
            target: target_in(set, &dir),
            dir,
            mode,
            files: 0,
            checked: Checked::default(),
            data_dir: shared.data_dir.clone(),
            keep: true,
        })
    }

    /// Removes a held copy for good (when its hold ends).
    pub fn release(mut self) {
        self.keep = false;
    }

    /// The path the validator is given for `{}`.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The staged copy's root: `path.to_local(dir)` is where a path of the
    /// set is in it (a single-file set's file too).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `set`'s validator on this copy: `Ok` or the one line status
    /// shows. `what` names the change in the log.
    pub fn run(&self, shared: &Shared, set: &SetRuntime, what: &str) -> Result<(), String> {
        let Some(command) = &set.validate else {
            return Ok(());
        };
        let target = self.target.display().to_string();
        let root_path = set.path.display().to_string();
        let line = command.replace("{}", &shell_words::quote(&target));
        let env = [
            ("CLUSTERD_SET", set.name.as_str()),
            ("CLUSTERD_ROOT", root_path.as_str()),
            ("CLUSTERD_STAGED", target.as_str()),
        ];
        // A view or hard links only where the validator can write neither
        // the live root nor data_dir (Raft log, quarantine), nor the copy.
        let view = match self.mode {
            StageMode::Copy => None,
            StageMode::View | StageMode::Link => {
                match shared.sandbox.view(&shared.data_dir, &shared.sets) {
                    Some(view) => Some(view),
                    None => {
                        return Err(
                            "cannot start the validator: its read-only mount namespace could not be made (see the log)".to_string(),
                        )
                    }
                }
            }
        };
        let outcome: CheckOutcome = run_check(&line, &env, set.validate_timeout, view.as_deref());
        if !outcome.passed {
            warn!(
                set = %set.name,
                took_ms = outcome.took.as_millis() as u64,
                "the change of sync set {:?} ({what}) is held: `{line}` refused it: {}{}",
                set.name,
                outcome.summary,
                if outcome.output.is_empty() { String::new() } else { format!("; its output: {}", outcome.output) }
            );
            return Err(outcome.summary);
        }
        info!(
            set = %set.name,
            took_ms = outcome.took.as_millis() as u64,
            files = self.files,
            mode = ?self.mode,
            "validated the change of sync set {:?} ({what})",
            set.name
        );
        Ok(())
    }
}

/// Mode, owner and mtime of a staged entry, as the live one has them
/// (validators such as `postfix check` look at owners and modes).
fn give_meta(at: &Path, meta: &FileMeta) -> io::Result<()> {
    fs::set_permissions(at, fs::Permissions::from_mode(meta.mode & 0o7777))?;
    // Unprivileged tests cannot chown; the staged copy is then owned by us.
    let _ = std::os::unix::fs::chown(at, Some(meta.uid), Some(meta.gid));
    let mtime = std::time::UNIX_EPOCH
        + Duration::from_nanos(meta.mtime_ns.clamp(0, u64::MAX as i128) as u64);
    fs::File::options()
        .read(true)
        .open(at)
        .and_then(|f| f.set_modified(mtime))
        .or_else(|e| {
            if meta.kind == Kind::Dir {
                Ok(())
            } else {
                Err(e)
            }
        })
}

/// A set name made safe as one path component.
pub fn sanitized(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Checks `set` as `root` holds it now (on the leader, the set as the
/// pass about to run would leave it): stages it, runs the set's validator
/// on the copy, and returns what it saw, or the one line status shows.
pub fn check_tree(
    shared: &Shared,
    set: &SetRuntime,
    root: &Root,
    changed: &[SetPath],
) -> Result<Checked, String> {
    if set.validate.is_none() {
        return Ok(Checked::default());
    }
    let cannot = |e: io::Error| {
        format!(
            "cannot stage a copy of the set for its validator under {}: {e}",
            shared.data_dir.join(VALIDATE_DIR).display()
        )
    };
    let mut staged = match Staged::view_of_live(shared, set) {
        Some(mut view) => {
            // What the validator sees of the changed files, to hold the
            // pass to: taken before it runs.
            for path in changed {
                let comps: Vec<&[u8]> = path.components().collect();
                if let Ok(Some(m)) = root.stat(&comps) {
                    if m.kind == Kind::File {
                        view.checked
                            .files
                            .insert(path.clone(), (m.ino, m.len, m.mtime_ns));
                    }
                }
            }
            view
        }
        None => Staged::of_tree(shared, set, root).map_err(cannot)?,
    };
    staged.run(shared, set, &describe(changed))?;
    Ok(std::mem::take(&mut staged.checked))
}

/// Up to five paths of a change, for the log.
pub fn describe(changed: &[SetPath]) -> String {
    let paths: Vec<String> = changed.iter().take(5).map(|p| p.to_string()).collect();
    let more = changed.len().saturating_sub(paths.len());
    if more > 0 {
        format!("{} and {more} more", paths.join(", "))
    } else {
        paths.join(", ")
    }
}

/// Removes whatever is at `p` in the copy (a staged hard link only loses
/// its name there); nothing there is fine.
pub fn remove_any(p: &Path) -> Result<(), String> {
    let result = match p.symlink_metadata() {
        Err(_) => return Ok(()),
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
    };
    result.map_err(|e| format!("{}: {e}", p.display()))
}

pub fn make_parent(p: &Path) -> Result<(), String> {
    match p.parent() {
        Some(d) => fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_names_are_one_safe_component() {
        assert_eq!(sanitized("tacacs"), "tacacs");
        assert_eq!(sanitized("../etc/x y"), "___etc_x_y");
    }
}
