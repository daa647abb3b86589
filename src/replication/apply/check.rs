//! Validation on a follower (`[[sync]] validate`): before a committed
//! change of a validated set is swapped in, the follower stages its own
//! copy of the set with the change laid over it and runs the same
//! validator (its own binaries and includes may differ from the
//! leader's). A refused change is held: the tree stays at its last applied
//! state, the manifest goes on (a held set is lag, never a gap), and each
//! later committed change of the set is laid over the held copy and checked
//! again; once one passes, the set is brought up to the committed state.
//!
//! Invariant owned here: the live tree is never written while a change is
//! checked; the copy is written only through names of its own (a staged
//! hard link is replaced by a new file, never written through).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::*;
use crate::replication::validate::{describe, make_parent, remove_any, Staged};

/// How long a follower reuses its copy of a validated set (the committed
/// state after the last change it checked) before staging it afresh: a
/// copy costs a walk and a link per file, too much for every edit of a
/// large set; afresh now and then, files this node keeps outside what is
/// replicated (excluded ones) are seen as they are now.
const SHADOW_FRESH: Duration = Duration::from_secs(60);

impl Applier {
    /// Whether the committed change `checked` of `set` may be carried out
    /// here now. False when it is held (or when a hold just ended, whose
    /// catching up the reconcile of the deferred set does).
    pub(super) fn follower_check(
        &mut self,
        set: &SetRuntime,
        root: &Root,
        checked: &[CheckedOp],
    ) -> bool {
        if set.validate.is_none() {
            return true;
        }
        let held = self.held_copies.remove(&set.name);
        // A hold from before a restart whose copy is gone counts too.
        let was_held = held.is_some()
            || (self.held_here.contains(&set.name) && !self.reverted.contains(&set.name));
        let shadow = self
            .shadows
            .remove(&set.name)
            .filter(|(_, made)| made.elapsed() < SHADOW_FRESH);
        let (staged, made) = match (held, shadow) {
            (Some(s), _) => (s, Instant::now()),
            (None, Some(shadow)) => shadow,
            (None, None) => match Staged::of_tree(&self.shared, set, root) {
                Ok(s) => (s, Instant::now()),
                Err(e) => {
                    warn!(set = %set.name, "cannot stage a copy of sync set {:?} to check a committed change: {e}; applying it as the leader checked it", set.name);
                    return true;
                }
            },
        };
        let changed: Vec<SetPath> = checked.iter().map(|op| op.paths().0.clone()).collect();
        if let Err(why) = self.lay_over(set, &staged, checked) {
            info!(set = %set.name, "cannot lay the committed change of sync set {:?} over a copy here ({why}); applying it as the leader checked it", set.name);
            staged.release();
            return self.end_hold(&set.name, was_held);
        }
        match staged.run(&self.shared, set, &describe(&changed)) {
            Ok(()) => {
                let go = self.end_hold(&set.name, was_held);
                if go {
                    // The copy is now the committed state this change leaves.
                    self.shadows.insert(set.name.clone(), (staged, made));
                } else {
                    staged.release();
                }
                go
            }
            Err(reason) => {
                let why = format!("{reason} (checked here)");
                let mut staged = staged;
                if let Err(e) = staged.keep_as_held(set) {
                    warn!(set = %set.name, "cannot keep the held copy of sync set {:?}: {e}; a restart will need the next change to be fetched whole", set.name);
                }
                self.record_hold(&set.name, Some((false, &why)));
                self.shared.set_held(&set.name, Some(why));
                self.held_here.insert(set.name.clone());
                self.deferred.insert(set.name.clone());
                self.held_copies.insert(set.name.clone(), staged);
                false
            }
        }
    }

    /// Ends a validation hold of `set` if it had one: the reconcile of the
    /// deferred set brings its tree up to the committed state. Returns
    /// whether the change at hand is to be carried out as usual.
    fn end_hold(&mut self, set: &str, was_held: bool) -> bool {
        if !was_held {
            self.shared.set_held(set, None);
            return true;
        }
        info!(set = %set, "the committed state of sync set {set:?} passes its validator here; bringing the set up to it");
        self.record_hold(set, None);
        self.shared.set_held(set, None);
        self.held_here.remove(set);
        self.deferred.insert(set.to_string());
        false
    }

    /// Records a hold of `set` durably (`Some((reverted, why))`) or its end.
    pub(super) fn record_hold(&self, set: &str, held: Option<(bool, &str)>) {
        let mut batch = StoreBatch::default();
        batch.put_held(set, held);
        if let Err(e) = self.shared.store.write(batch) {
            warn!(set = %set, "cannot record the hold of sync set {set:?}: {e}; a restart would forget it");
        }
    }

    /// Takes up the holds a previous run recorded: the sets stay as they
    /// are until their next committed change, checked against the held
    /// copy kept on disk.
    pub(super) fn restore_holds(&mut self) {
        let held = match self.shared.store.load_held() {
            Ok(h) => h,
            Err(e) => {
                warn!("cannot read the sets held before this start: {e}");
                return;
            }
        };
        for (name, reverted, why) in held {
            let Some(set) = self.shared.set(&name).cloned() else {
                self.record_hold(&name, None);
                continue;
            };
            info!(set = %name, "sync set {name:?} is still held here, as before this start: {why}");
            if reverted {
                self.reverted.insert(name.clone());
            } else if let Some(copy) = Staged::adopt_held(&self.shared, &set) {
                self.held_copies.insert(name.clone(), copy);
            }
            self.held_here.insert(name.clone());
            self.deferred.insert(name.clone());
            self.shared.set_held(&name, Some(why));
        }
    }

    /// Lays the committed ops over the staged copy, as carrying them out on
    /// the tree would leave it.
    fn lay_over(
        &self,
        set: &SetRuntime,
        staged: &Staged,
        checked: &[CheckedOp],
    ) -> Result<(), String> {
        let at = |p: &SetPath| p.to_local(staged.dir());
        for op in checked {
            match op {
                CheckedOp::Put {
                    path,
                    entry,
                    content,
                    ..
                } => {
                    let to = at(path);
                    let data = self
                        .committed_content(set, entry, content, &to)
                        .ok_or_else(|| format!("the content of {path} is not here yet"))?;
                    remove_any(&to)?;
                    make_parent(&to)?;
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(entry.meta.mode & 0o7777)
                        .open(&to)
                        .map_err(|e| format!("{path}: {e}"))?;
                    f.write_all(&data).map_err(|e| format!("{path}: {e}"))?;
                }
                CheckedOp::Dir { path, .. } => {
                    let to = at(path);
                    if to.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
                        remove_any(&to)?;
                    }
                    fs::create_dir_all(&to).map_err(|e| format!("{path}: {e}"))?;
                }
                CheckedOp::Symlink { path, entry } => {
                    let to = at(path);
                    remove_any(&to)?;
                    make_parent(&to)?;
                    let target = entry.target.clone().unwrap_or_default();
                    std::os::unix::fs::symlink(
                        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&target),
                        &to,
                    )
                    .map_err(|e| format!("{path}: {e}"))?;
                }
                CheckedOp::Remove { path, .. } => remove_any(&at(path))?,
                CheckedOp::Rename { from, to, .. } => {
                    let (from_p, to_p) = (at(from), at(to));
                    remove_any(&to_p)?;
                    make_parent(&to_p)?;
                    fs::rename(&from_p, &to_p).map_err(|e| format!("{from} -> {to}: {e}"))?;
                }
                CheckedOp::Link { path, target, .. } => {
                    let to = at(path);
                    remove_any(&to)?;
                    make_parent(&to)?;
                    fs::hard_link(at(target), &to).map_err(|e| format!("{path}: {e}"))?;
                }
                CheckedOp::Xattrs { .. } | CheckedOp::Forget { .. } => {}
            }
        }
        Ok(())
    }

    /// The committed content of a put, rebuilt from its patch against
    /// `base` (the version the copy holds), or `None` when this node
    /// cannot rebuild it (it will be fetched when applied).
    fn committed_content(
        &self,
        set: &SetRuntime,
        entry: &Entry,
        content: &Content,
        base: &Path,
    ) -> Option<Vec<u8>> {
        let target = entry.digest?.get();
        let patch_bytes = match self.committed_source(content, &target, false).ok()? {
            CommittedSource::Unchanged => {
                return fs::read(base).ok().filter(|b| delta::digest(b) == target)
            }
            CommittedSource::Finished { file, .. } => {
                return fs::read(file).ok().filter(|b| delta::digest(b) == target)
            }
            CommittedSource::Patch(b) => b,
        };
        let patch = Patch::decode(&patch_bytes).ok()?;
        let base = match patch.base() {
            Some(_) => Some(fs::read(base).ok()?),
            None => None,
        };
        delta::apply(base.as_deref(), &patch, &target, set.max_file_size).ok()
    }
}
