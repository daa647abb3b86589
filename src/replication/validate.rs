//! Validation of a set's change before it leaves the leader (`[[sync]]
//! validate`): the set as it would be after the change is staged under
//! `data_dir/validate/` (a tree laid out like the root), the validator runs
//! on that copy, and its verdict decides whether the change is proposed or
//! held.
//!
//! Invariants owned here:
//! * The validator never changes the live tree or `data_dir`: where mount
//!   namespaces work, both are read-only in its own namespace. On the leader it sees the
//!   live root through a read-only mount in a private mount namespace;
//!   otherwise it gets a staged copy whose files are hard links only where
//!   such a mount keeps it from writing through them, and copies elsewhere.
//! * A staged copy never outlives its check (removed when the check ends,
//!   and what a crash left is removed at the next start).
//! * What was validated is what is proposed: the check runs before the
//!   pass plans anything, and the pass proposes a file only if it still is
//!   the file that was staged (same inode, size and mtime); one that
//!   changed since waits for the next check.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::{info, warn};

use crate::core::paths::SetPath;
use crate::fs::exec::{read_only_mounts_work, run_check, CheckOutcome};
use crate::fs::root::{FileMeta, Kind, Root};
use crate::replication::scan::walk_keeping;
use crate::replication::shared::{SetRuntime, Shared};

/// Where staged copies live, under `data_dir`.
const VALIDATE_DIR: &str = "validate";
/// Where a follower keeps the copy of a set it holds, under `data_dir`:
/// the set as committed, which later changes are laid over; kept across
/// restarts like the hold itself.
const HELD_DIR: &str = "held";

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
    /// With [`StageMode::View`]: the live directory shown at `dir`.
    view_of: Option<PathBuf>,
    /// The node's `data_dir`, read-only to the validator like the live root.
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
fn fresh_dir(data_dir: &Path, set: &SetRuntime) -> io::Result<(PathBuf, PathBuf)> {
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
    Ok((parent, dir))
}

impl Staged {
    /// The live root of `set` as the validator's read-only view, where
    /// mount namespaces work (else `None`: stage a copy instead).
    pub fn view_of_live(data_dir: &Path, set: &SetRuntime) -> io::Result<Option<Staged>> {
        let (parent, dir) = fresh_dir(data_dir, set)?;
        let target = match &set.single_file {
            Some(name) => name.to_local(&dir),
            None => dir.clone(),
        };
        let staged = Staged {
            dir,
            target,
            mode: StageMode::View,
            files: 0,
            checked: Checked::default(),
            view_of: Some(set.root_dir.clone()),
            data_dir: data_dir.to_path_buf(),
            keep: false,
        };
        Ok(read_only_mounts_work(&parent).then_some(staged))
    }

    /// Stages `set` as its root holds it now, without excluded or
    /// temporary files: hard links where mount namespaces keep the
    /// validator from writing through them, copies elsewhere.
    pub fn of_tree(data_dir: &Path, set: &SetRuntime, root: &Root) -> io::Result<Staged> {
        let (parent, dir) = fresh_dir(data_dir, set)?;
        let mode = if read_only_mounts_work(&parent) {
            StageMode::Link
        } else {
            StageMode::Copy
        };
        let target = match &set.single_file {
            Some(name) => name.to_local(&dir),
            None => dir.clone(),
        };
        let mut staged = Staged {
            dir,
            target,
            mode,
            files: 0,
            checked: Checked::default(),
            view_of: None,
            data_dir: data_dir.to_path_buf(),
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
            self.target = match &set.single_file {
                Some(name) => name.to_local(&dir),
                None => dir.clone(),
            };
            self.dir = dir;
        }
        self.keep = true;
        Ok(())
    }

    /// The held copy of `set` a previous run kept, if there is one.
    pub fn adopt_held(data_dir: &Path, set: &SetRuntime) -> Option<Staged> {
        let dir = data_dir.join(HELD_DIR).join(sanitized(&set.name));
        if !dir.is_dir() {
            return None;
        }
        let mode = if read_only_mounts_work(&data_dir.join(HELD_DIR)) {
            StageMode::Link
        } else {
            StageMode::Copy
        };
        Some(Staged {
            target: match &set.single_file {
                Some(name) => name.to_local(&dir),
                None => dir.clone(),
            },
            dir,
            mode,
            files: 0,
            checked: Checked::default(),
            view_of: None,
            data_dir: data_dir.to_path_buf(),
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
    pub fn run(&self, set: &SetRuntime, what: &str) -> Result<(), String> {
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
        // Where mount namespaces work, the validator can write neither the
        // live root nor data_dir (Raft log, quarantine), nor the copy.
        let protect = [
            (self.data_dir.as_path(), self.data_dir.as_path()),
            (set.root_dir.as_path(), set.root_dir.as_path()),
        ];
        let mut read_only: Vec<(&Path, &Path)> = Vec::new();
        match (self.mode, &self.view_of) {
            (StageMode::View, Some(live)) => {
                read_only.extend(protect);
                read_only.push((live.as_path(), self.dir.as_path()));
            }
            (StageMode::Link, _) => {
                read_only.extend(protect);
                read_only.push((self.dir.as_path(), self.dir.as_path()));
            }
            _ => {}
        }
        let outcome: CheckOutcome = run_check(&line, &env, set.validate_timeout, &read_only);
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
    let mut staged = match Staged::view_of_live(&shared.data_dir, set).map_err(cannot)? {
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
        None => Staged::of_tree(&shared.data_dir, set, root).map_err(cannot)?,
    };
    staged.run(set, &describe(changed))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_names_are_one_safe_component() {
        assert_eq!(sanitized("tacacs"), "tacacs");
        assert_eq!(sanitized("../etc/x y"), "___etc_x_y");
    }
}
