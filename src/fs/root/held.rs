//! The directory handles a batch keeps: while a caller holds
//! [`Root::hold_dirs`], a walk to a directory it already opened starts from
//! that handle instead of from the root.
//!
//! A follower writing a 1,800-file batch of Maildir messages walked from the
//! root four times per file (look, write, rename, history): 16 `openat`,
//! 20 `close` and 4 `fcntl` of 55 system calls per file. Keeping the last
//! few directories open for the batch removes most of them, as rsync does by
//! working inside one directory at a time.
//!
//! # Invariants
//!
//! * Handles are kept only while at least one [`HeldDirs`] guard lives; the
//!   last guard's drop closes them all, so nothing is trusted beyond the
//!   batch that opened it.
//! * A kept handle is used only while its directory still has a link
//!   (`fstat`: a directory removed meanwhile is walked to again, and so
//!   created again where the walk creates).
//! * Every operation of [`Root`] that removes, moves or displaces a
//!   directory forgets every kept handle, so no handle outlives a change of
//!   the tree made through this root. A walk that began before such a change
//!   never keeps what it opened (a generation count), so a writer thread
//!   cannot put back a handle of a directory another one just moved to
//!   quarantine. What a local user renames meanwhile is the limit the
//!   module documents for a walk, stretched to a batch.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use rustix::fs as rfs;

use super::Root;

/// How many directories a batch keeps open: a Maildir batch touches a
/// user's `cur`, `new` and `tmp` and moves on.
const HELD: usize = 16;

/// The kept handles of one [`Root`], keyed by their path from the root.
#[derive(Debug, Default)]
pub(super) struct DirCache {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Live [`HeldDirs`] guards; handles are kept only while this is not 0.
    holders: usize,
    /// Bumped by every [`DirCache::forget_all`]: a walk keeps what it opened
    /// only if none happened since it started.
    generation: u64,
    /// Most recently used last.
    entries: Vec<(Vec<Vec<u8>>, Arc<OwnedFd>)>,
}

/// Keeps [`Root::walk`]'s directory handles until dropped.
#[must_use = "directories are kept only while the guard lives"]
#[derive(Debug)]
pub struct HeldDirs<'r> {
    cache: &'r DirCache,
}

impl Drop for HeldDirs<'_> {
    fn drop(&mut self) {
        let mut state = self.cache.state.lock().unwrap();
        state.holders -= 1;
        if state.holders == 0 {
            state.entries.clear();
        }
    }
}

impl DirCache {
    /// Where a walk to `dirs` starts: the kept handle of the longest prefix
    /// of `dirs` whose directory still has a link, with the prefix's length
    /// (`None`: from the root), and the generation to pass to
    /// [`DirCache::keep`].
    pub(super) fn nearest(&self, dirs: &[&[u8]]) -> (Option<(usize, Arc<OwnedFd>)>, u64) {
        let (candidate, generation) = {
            let mut state = self.state.lock().unwrap();
            let generation = state.generation;
            if state.holders == 0 {
                return (None, generation);
            }
            let found = state
                .entries
                .iter()
                .enumerate()
                .filter(|(_, (key, _))| leads_to(key, dirs))
                .max_by_key(|(_, (key, _))| key.len())
                .map(|(at, _)| at);
            let candidate = found.map(|at| {
                let entry = state.entries.remove(at);
                let candidate = (entry.0.len(), entry.1.clone());
                state.entries.push(entry);
                candidate
            });
            (candidate, generation)
        };
        let Some(candidate) = candidate else {
            return (None, generation);
        };
        match rfs::fstat(&*candidate.1) {
            Ok(st) if st.st_nlink > 0 => (Some(candidate), generation),
            _ => {
                self.forget(&dirs[..candidate.0]);
                (None, generation)
            }
        }
    }

    /// Keeps `fd` as the handle of `dirs` if a guard is held and nothing was
    /// forgotten since the walk began at `generation`.
    pub(super) fn keep(&self, dirs: &[&[u8]], fd: &Arc<OwnedFd>, generation: u64) {
        let mut state = self.state.lock().unwrap();
        if state.holders == 0 || dirs.is_empty() || state.generation != generation {
            return;
        }
        state.entries.retain(|(key, _)| !same(key, dirs));
        if state.entries.len() >= HELD {
            state.entries.remove(0);
        }
        state
            .entries
            .push((dirs.iter().map(|d| d.to_vec()).collect(), fd.clone()));
    }

    fn forget(&self, dirs: &[&[u8]]) {
        self.state
            .lock()
            .unwrap()
            .entries
            .retain(|(key, _)| !same(key, dirs));
    }

    /// Drops every kept handle (the tree changed shape).
    pub(super) fn forget_all(&self) {
        let mut state = self.state.lock().unwrap();
        state.generation += 1;
        state.entries.clear();
    }
}

/// Whether the kept path `key` is `dirs` or one of its ancestors.
fn leads_to(key: &[Vec<u8>], dirs: &[&[u8]]) -> bool {
    key.len() <= dirs.len() && key.iter().zip(dirs).all(|(k, d)| k == d)
}

fn same(key: &[Vec<u8>], dirs: &[&[u8]]) -> bool {
    key.len() == dirs.len() && leads_to(key, dirs)
}

impl Root {
    /// Keeps the directories walked to until the guard is dropped (one batch
    /// of writes): see `fs/root/held.rs` for what that trusts.
    pub fn hold_dirs(&self) -> HeldDirs<'_> {
        self.held.state.lock().unwrap().holders += 1;
        HeldDirs { cache: &self.held }
    }
}
