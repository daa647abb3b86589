//! Undoing a change whose `on_change` failed (`on_change_failure =
//! "revert"`): before a follower writes a change of such a set it keeps
//! what each touched path held (under `data_dir/revert/`); when the set's
//! `on_change` succeeds those copies are dropped, when it fails they are
//! put back, `on_change` runs again and the set is held until its next
//! committed change.
//!
//! Invariants owned here:
//! * A path is kept once per unconfirmed stretch: what it held before the
//!   first change since `on_change` last succeeded, which is the version
//!   the service last ran with.
//! * Putting back writes through [`Root`] like any apply (atomic, verified)
//!   and records what it wrote, so the next committed change replaces the
//!   restored files without mistaking them for local edits.

use std::fs;
use std::io::Write;

use super::*;
use crate::core::config::OnChangeFailure;

/// What a path held before a change, to put back.
#[derive(Debug)]
pub(super) enum Kept {
    /// Nothing was there: putting back removes what the change made.
    Absent,
    /// A file: its content (in `copy`, under `data_dir/revert`) and metadata.
    File {
        copy: PathBuf,
        meta: FileMeta,
    },
    Symlink {
        target: Vec<u8>,
    },
    Dir {
        meta: FileMeta,
    },
}

/// The kept versions of one set, with when each was taken.
#[derive(Debug, Default)]
pub(super) struct KeptVersions {
    pub(super) paths: BTreeMap<SetPath, (Instant, Kept)>,
}

use std::path::{Path, PathBuf};

/// Where kept versions live, under `data_dir`; emptied at every start
/// (kept versions are only good while this process knows what they are).
pub(super) const REVERT_DIR: &str = "revert";

impl Applier {
    /// Keeps what every path `checked` touches holds now, for a set that
    /// reverts (nothing for other sets, or paths already kept).
    pub(super) fn keep_before_change(
        &mut self,
        set: &SetRuntime,
        root: &Root,
        checked: &[CheckedOp],
    ) {
        if set.on_change_failure != OnChangeFailure::Revert {
            return;
        }
        let mut paths: BTreeSet<SetPath> = BTreeSet::new();
        for op in checked {
            let (path, renamed_to) = op.paths();
            for p in std::iter::once(path).chain(renamed_to) {
                paths.insert(p.clone());
                // A removal or a rename takes a whole subtree with it.
                local_subtree(set, root, p, &mut paths);
            }
        }
        let dir = self
            .shared
            .data_dir
            .join(REVERT_DIR)
            .join(crate::replication::validate::sanitized(&set.name));
        let kept = self.kept.entry(set.name.clone()).or_default();
        for path in paths {
            if kept.paths.contains_key(&path) {
                continue;
            }
            let c = comps(&path);
            let what = match root.stat(&c) {
                Ok(None) => Kept::Absent,
                Ok(Some(m)) if m.kind == Kind::Dir => Kept::Dir { meta: m },
                Ok(Some(m)) if m.kind == Kind::Symlink => match root.read_link(&c) {
                    Ok(Some(target)) => Kept::Symlink { target },
                    _ => continue,
                },
                Ok(Some(_)) => match root.read_file(&c, set.max_file_size) {
                    Ok(Some((data, meta))) => {
                        let copy = dir.join(format!("{}", self.kept_seq));
                        self.kept_seq += 1;
                        if let Err(e) = write_private(&copy, &data) {
                            warn!(set = %set.name, %path, "cannot keep the current version of {path} for on_change_failure = \"revert\" in {}: {e}; it cannot be put back", copy.display());
                            continue;
                        }
                        Kept::File { copy, meta }
                    }
                    _ => continue,
                },
                Err(e) => {
                    warn!(set = %set.name, %path, "cannot look at {path} before a change: {e}; it cannot be put back");
                    continue;
                }
            };
            kept.paths.insert(path, (Instant::now(), what));
        }
    }

    /// What the set's `on_change`, started at `started`, came to: success
    /// confirms the versions kept before it started; failure puts them
    /// back, holds the set and runs `on_change` again.
    pub(super) fn on_change_done(&mut self, set_name: &str, ok: bool, started: Instant, why: &str) {
        let Some(kept) = self.kept.get_mut(set_name) else {
            return;
        };
        let due: Vec<SetPath> = kept
            .paths
            .iter()
            .filter(|(_, (taken, _))| *taken <= started)
            .map(|(p, _)| p.clone())
            .collect();
        let mut versions: Vec<(SetPath, Kept)> = due
            .into_iter()
            .filter_map(|p| kept.paths.remove(&p).map(|(_, k)| (p, k)))
            .collect();
        if ok || versions.is_empty() {
            for (_, k) in versions {
                if let Kept::File { copy, .. } = k {
                    let _ = fs::remove_file(copy);
                }
            }
            return;
        }
        let Some(root) = self.roots.remove(set_name) else {
            return;
        };
        // Deepest first to take away what the change made, shallowest
        // first to bring back directories before what they hold.
        versions.sort_by(|a, b| a.0.cmp(&b.0));
        let mut store = StoreBatch::default();
        let mut restored = 0usize;
        let mut failed = Vec::new();
        for (path, k) in versions.iter().rev() {
            if matches!(k, Kept::Absent) {
                match root.remove(&comps(path)) {
                    Ok(_) => {
                        self.forget_records(set_name, path, &mut store);
                        restored += 1;
                    }
                    Err(e) => failed.push(format!("{path}: {e}")),
                }
            }
        }
        for (path, k) in &versions {
            let c = comps(path);
            let result = match k {
                Kept::Absent => continue,
                Kept::Dir { meta } => root.make_dir(&c, meta),
                Kept::Symlink { target } => {
                    let _ = root.remove(&c);
                    root.make_symlink(&c, target)
                }
                Kept::File { copy, meta } => match fs::read(copy) {
                    Ok(data) => {
                        let digest = delta::digest(&data);
                        let clear = match root.stat(&c) {
                            Ok(Some(m)) if m.kind == Kind::Dir => root.remove(&c).map(|_| ()),
                            _ => Ok(()),
                        };
                        clear
                            .and_then(|()| root.replace_file(&c, &data, meta, &digest.hash))
                            .map(|written| {
                                self.put_record(
                                    set_name,
                                    path,
                                    record_of(&written, &digest),
                                    &mut store,
                                );
                            })
                    }
                    Err(e) => {
                        failed.push(format!("{path}: its kept copy is unreadable: {e}"));
                        continue;
                    }
                },
            };
            match result {
                Ok(()) => restored += 1,
                Err(e) => failed.push(format!("{path}: {e}")),
            }
        }
        for (_, k) in versions {
            if let Kept::File { copy, .. } = k {
                let _ = fs::remove_file(copy);
            }
        }
        if let Err(e) = self.shared.store.write(store) {
            warn!(set = %set_name, "cannot record the versions put back: {e}");
        }
        self.roots.insert(set_name.to_string(), root);
        let reason = format!(
            "on_change failed ({why}); {restored} path(s) put back to the version it last ran with"
        );
        if failed.is_empty() {
            warn!(set = %set_name, "on_change of sync set {set_name:?} failed ({why}): put back {restored} path(s) the change touched, running on_change again; the set is held until its next committed change");
        } else {
            warn!(set = %set_name, "on_change of sync set {set_name:?} failed ({why}): put back {restored} path(s), but not {}; running on_change again; the set is held until its next committed change", failed.join("; "));
        }
        self.record_hold(set_name, Some((true, &reason)));
        self.shared.set_held(set_name, Some(reason));
        self.held_here.insert(set_name.to_string());
        self.reverted.insert(set_name.to_string());
        self.deferred.insert(set_name.to_string());
        let _ = self.out.send(Applied::SetChanged(set_name.to_string()));
    }

    /// A committed change of a set held after a failed `on_change`: the
    /// hold ends, and the set is squared with the manifest (the reconcile
    /// fetches what the reverted files lack).
    pub(super) fn release_hold(&mut self, set: &str) {
        if self.reverted.remove(set) {
            self.held_here.remove(set);
            self.record_hold(set, None);
            info!(set = %set, "a new committed change of sync set {set:?} ends its hold; bringing it up to the committed state");
            self.shared.set_held(set, None);
            self.deferred.insert(set.to_string());
        }
    }
}

/// Writes `data` to a new file only root can read.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    Ok(())
}
