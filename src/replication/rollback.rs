//! `clusterctl rollback` on the leader: the plan that makes a set (or some
//! of its paths) what it was at an earlier revision, from the leader's
//! history; its check by the set's validator on a staged copy of the set
//! as the rollback would leave it; and the commands that carry it out as
//! one new revision ([`Command::Rollback`]: every node, the leader
//! included, writes it through its apply path, so an uncommitted local
//! version is quarantined as for any committed change).
//!
//! Invariant owned here: a rollback changes exactly the paths whose
//! committed state differs from their state at the revision, nothing is
//! proposed that the validator refused, and a refused or impossible
//! rollback changes nothing.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use crate::core::delta;
use crate::core::history::{classify, ChangeOp};
use crate::core::manifest::{Content, Entry, EntryKind, FileBatch, FileOp, WireDigest};
use crate::core::paths::SetPath;
use crate::raft::core::{Command, NO_ORIGIN};
use crate::replication::history::{self, HistoryError};
use crate::replication::scan::unix_ms;
use crate::replication::shared::Shared;
use crate::replication::validate::{make_parent, remove_any, Staged};

/// The most content one rollback carries through the Raft log.
pub const ROLLBACK_CONTENT_MAX: usize = 64 << 20;

/// One path's way back.
#[derive(Debug)]
pub struct Step {
    pub path: SetPath,
    /// The committed entry now.
    pub now: Option<Entry>,
    /// The entry at the revision (`None`: it did not exist).
    pub then: Option<Entry>,
    /// A file's content then, when it differs from now's.
    pub content: Option<Vec<u8>>,
}

/// What a rollback changes, in path order.
#[derive(Debug)]
pub struct Plan {
    pub set: String,
    /// What it does, for the first line and the log ("rolling ... back to
    /// revision 41").
    pub heading: String,
    /// Where a file's content comes from ("as at revision 41").
    pub source: String,
    pub steps: Vec<Step>,
}

/// Plans the rollback of `set` (or of `paths` and what lies below them)
/// to revision `to`, from this node's history and manifest.
pub fn plan(shared: &Shared, set: &str, paths: &[String], to: u64) -> Result<Plan, HistoryError> {
    let runtime = history::kept_set(shared, set)?;
    history::check_revision(shared, set, to)?;
    let targets = paths
        .iter()
        .map(|p| history::resolve_path(runtime, p))
        .collect::<Result<Vec<_>, _>>()?;
    let (since, _) = history::list(shared, set, None, usize::MAX, Some(to), None)?;
    let changed: BTreeSet<SetPath> = since
        .into_iter()
        .flat_map(|(_, r)| r.changes.into_iter().map(|c| c.path))
        .filter(|p| targets.is_empty() || targets.iter().any(|t| t == p || t.is_ancestor_of(p)))
        .collect();
    let mut steps = Vec::new();
    for path in changed {
        let at = history::version(shared, set, &path, to, false)?;
        let now = shared.committed_entry(set, &path);
        if classify(now.as_ref(), at.entry.as_ref()).is_none() {
            continue;
        }
        let content = match &at.entry {
            Some(then) if then.meta.kind == EntryKind::File => {
                let digest = then.digest.expect("a file entry has a digest");
                let same = now.as_ref().and_then(|n| n.digest) == Some(digest)
                    && now.as_ref().is_some_and(|n| n.meta.kind == EntryKind::File);
                if same {
                    None
                } else {
                    let rev = at.changed_at.unwrap_or(to);
                    Some(history::content_or_live(
                        shared, runtime, &path, rev, &digest,
                    )?)
                }
            }
            _ => None,
        };
        steps.push(Step {
            path,
            now,
            then: at.entry,
            content,
        });
    }
    Ok(Plan {
        set: set.to_string(),
        heading: format!("rolling sync set {set:?} back to revision {to}"),
        source: format!("as at revision {to}"),
        steps,
    })
}

/// Plans putting a quarantined file (`id`) back at `path` of `set`, with
/// its content and metadata, as a new revision.
#[allow(clippy::too_many_arguments)]
pub fn restore_plan(
    shared: &Shared,
    set: &str,
    path: &str,
    id: &str,
    content: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i128,
) -> Result<Plan, HistoryError> {
    let runtime = shared
        .set(set)
        .ok_or_else(|| HistoryError::UnknownSet(set.to_string()))?;
    let path = history::resolve_path(runtime, path)?;
    if content.len() as u64 > runtime.max_file_size {
        return Err(HistoryError::BadPath {
            set: set.to_string(),
            path: path.to_string(),
            why: format!(
                "the quarantined copy is larger than the set's max_file_size ({} bytes)",
                runtime.max_file_size
            ),
        });
    }
    let now = shared.committed_entry(set, &path);
    let then = Entry {
        meta: crate::core::manifest::Meta {
            kind: EntryKind::File,
            mode,
            uid,
            gid,
            user: None,
            group: None,
            mtime_ns,
        },
        digest: Some(WireDigest::new(&delta::digest(&content))),
        target: None,
        xattrs: Default::default(),
        link: None,
    };
    let changes = classify(now.as_ref(), Some(&then)).is_some();
    let same_content = now.as_ref().and_then(|n| n.digest) == then.digest;
    Ok(Plan {
        set: set.to_string(),
        heading: format!("restoring quarantined copy {id} to {path} of sync set {set:?}"),
        source: format!("from quarantined copy {id}"),
        steps: if changes {
            vec![Step {
                path,
                now,
                then: Some(then),
                content: (!same_content).then_some(content),
            }]
        } else {
            Vec::new()
        },
    })
}

impl Step {
    fn op(&self) -> ChangeOp {
        classify(self.now.as_ref(), self.then.as_ref()).expect("a step changes its path")
    }
}

impl Plan {
    /// One line per path, as `clusterctl rollback` prints it first.
    pub fn describe(&self) -> String {
        if self.steps.is_empty() {
            return format!(
                "nothing to roll back: sync set {:?} already holds what {} would bring back ({})\n",
                self.set, self.heading, self.source
            );
        }
        let mut out = format!("{}:\n", self.heading);
        for s in &self.steps {
            let line = match (s.op(), &s.then) {
                (ChangeOp::Added, _) => format!("+ {} (deleted since: brought back)", s.path),
                (ChangeOp::Deleted, _) => format!("- {} (created since: removed)", s.path),
                (ChangeOp::Meta, _) => format!("m {} (mode, owner or mtime)", s.path),
                (ChangeOp::Content, Some(e)) if e.meta.kind == EntryKind::File => format!(
                    "~ {} ({} bytes {})",
                    s.path,
                    s.content.as_ref().map_or(0, Vec::len),
                    self.source
                ),
                (ChangeOp::Content, _) => format!("~ {}", s.path),
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// Runs the set's validator (if it has one) on a staged copy of the
    /// set as the rollback would leave it: `Err` with the line status
    /// shows when it refuses.
    pub fn check(&self, shared: &Shared) -> Result<(), String> {
        let set = shared
            .set(&self.set)
            .ok_or_else(|| format!("sync set {:?} is not replicated here", self.set))?;
        if set.validate.is_none() || self.steps.is_empty() {
            return Ok(());
        }
        let root = set
            .open_root()
            .map_err(|e| format!("cannot open {}: {e}", set.path.display()))?;
        let staged = Staged::of_tree(shared, set, &root).map_err(|e| {
            format!(
                "cannot stage a copy of sync set {:?} to check the rollback: {e}",
                self.set
            )
        })?;
        for s in self.ordered() {
            let at = s.path.to_local(staged.dir());
            let dir_stays = s
                .then
                .as_ref()
                .is_some_and(|t| t.meta.kind == EntryKind::Dir)
                && at.symlink_metadata().is_ok_and(|m| m.is_dir());
            if !dir_stays {
                // Never written through: a staged file may be a hard link.
                remove_any(&at)?;
            }
            let Some(then) = &s.then else { continue };
            make_parent(&at)?;
            match then.meta.kind {
                EntryKind::Dir => {
                    fs::create_dir_all(&at).map_err(|e| format!("{}: {e}", s.path))?;
                    let _ = fs::set_permissions(
                        &at,
                        fs::Permissions::from_mode(then.meta.mode & 0o7777),
                    );
                }
                EntryKind::Symlink => std::os::unix::fs::symlink(
                    <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(
                        then.target.as_deref().unwrap_or_default(),
                    ),
                    &at,
                )
                .map_err(|e| format!("{}: {e}", s.path))?,
                EntryKind::File => {
                    let content = match &s.content {
                        Some(c) => c.clone(),
                        None => fs::read(s.path.to_local(&set.root_dir))
                            .map_err(|e| format!("{}: {e}", s.path))?,
                    };
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&at)
                        .map_err(|e| format!("{}: {e}", s.path))?;
                    f.write_all(&content)
                        .map_err(|e| format!("{}: {e}", s.path))?;
                    let _ = fs::set_permissions(
                        &at,
                        fs::Permissions::from_mode(then.meta.mode & 0o7777),
                    );
                    let _ = std::os::unix::fs::chown(&at, Some(then.meta.uid), Some(then.meta.gid));
                }
            }
        }
        staged.run(shared, set, &self.heading)
    }

    /// The steps in the order they are carried out: removals (of what did
    /// not exist then, or was of another kind) first, then directories
    /// from the top, then everything else.
    fn ordered(&self) -> Vec<&Step> {
        let mut out: Vec<&Step> = self.steps.iter().filter(|s| s.then.is_none()).collect();
        out.extend(self.steps.iter().filter(|s| {
            s.then
                .as_ref()
                .is_some_and(|t| t.meta.kind == EntryKind::Dir)
        }));
        out.extend(self.steps.iter().filter(|s| {
            s.then
                .as_ref()
                .is_some_and(|t| t.meta.kind != EntryKind::Dir)
        }));
        out
    }

    /// The commands that carry the rollback out, proposed by `proposer`:
    /// the chunks of large content, then the batch. Refused when the
    /// content is more than [`ROLLBACK_CONTENT_MAX`].
    pub fn commands(&self, proposer: u64) -> Result<Vec<Command>, String> {
        let mut ops = Vec::new();
        let mut blob = Vec::new();
        let mut removed: Vec<&SetPath> = Vec::new();
        for s in self.ordered() {
            let path = s.path.as_bytes().to_vec();
            let kind_changes = match (&s.now, &s.then) {
                (Some(n), Some(t)) => n.meta.kind != t.meta.kind,
                _ => false,
            };
            if s.then.is_none() || kind_changes {
                // Below a removed directory: gone with it.
                if !removed.iter().any(|r| r.is_ancestor_of(&s.path)) {
                    ops.push(FileOp::Remove { path: path.clone() });
                    removed.push(&s.path);
                }
            }
            let Some(then) = &s.then else { continue };
            match then.meta.kind {
                EntryKind::Dir => ops.push(FileOp::Dir {
                    path: path.clone(),
                    meta: then.meta.clone(),
                }),
                EntryKind::Symlink => ops.push(FileOp::Symlink {
                    path: path.clone(),
                    target: then.target.clone().unwrap_or_default(),
                    meta: then.meta.clone(),
                }),
                EntryKind::File => {
                    let digest: WireDigest = then.digest.expect("a file entry has a digest");
                    let content = match &s.content {
                        None => Content::Unchanged,
                        Some(c) => {
                            let (patch, d) = delta::plan(None, c);
                            debug_assert_eq!(d, digest.get());
                            let encoded = patch.encode();
                            let offset = blob.len() as u64;
                            blob.extend_from_slice(&encoded);
                            Content::Blob {
                                upload: 0,
                                offset,
                                len: encoded.len() as u64,
                            }
                        }
                    };
                    ops.push(FileOp::Put {
                        path: path.clone(),
                        meta: then.meta.clone(),
                        digest,
                        content,
                    });
                }
            }
            if !then.xattrs.is_empty() {
                ops.push(FileOp::Xattrs {
                    path,
                    xattrs: then.xattrs.clone(),
                });
            }
        }
        if blob.len() > ROLLBACK_CONTENT_MAX {
            return Err(format!(
                "{} would carry {} MiB of content through the Raft log, more than the {} MiB one rollback may; roll back fewer paths at a time",
                self.heading,
                blob.len() >> 20,
                ROLLBACK_CONTENT_MAX >> 20
            ));
        }
        let chunks = crate::replication::source::through_the_log(&mut ops, &blob);
        let mut commands: Vec<Command> = chunks.into_iter().map(Command::Chunk).collect();
        commands.push(Command::Rollback {
            proposer,
            batch: FileBatch {
                set: self.set.clone(),
                origin: NO_ORIGIN,
                proposed_at_ms: unix_ms(),
                ops,
            },
        });
        Ok(commands)
    }
}
