//! Owner names: uid/gid to user/group names and back, cached until
//! `/etc/passwd` or `/etc/group` changes (or a second passes), shared by every
//! apply path.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::core::manifest::{Meta, OwnerName};
/// uid/gid ↔ name lookups, cached for one pass (user databases change when
/// /etc/passwd itself is replicated, so nothing is cached for longer).
#[derive(Default)]
pub struct OwnerNames {
    users: HashMap<u32, Option<OwnerName>>,
    groups: HashMap<u32, Option<OwnerName>>,
}

impl OwnerNames {
    pub fn user(&mut self, uid: u32) -> Option<OwnerName> {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                uzers::get_user_by_uid(uid).map(|u| OwnerName::new(&u.name().to_string_lossy()))
            })
            .clone()
    }
    pub fn group(&mut self, gid: u32) -> Option<OwnerName> {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                uzers::get_group_by_gid(gid).map(|g| OwnerName::new(&g.name().to_string_lossy()))
            })
            .clone()
    }
}

/// name → uid/gid lookups, cached across batches and threads. Each
/// lookup through NSS opens and reads the whole user or group database: a
/// tenth of finishing a staged upload's files went to it, and 2 to 3 % of
/// the nodes' CPU in a first full sync when each applied file did two.
///
/// The cache is dropped whenever `/etc/passwd` or `/etc/group` changes
/// (inode, size, mtime or ctime), so a user this node just got (say a
/// replicated `useradd`, applied one batch before the files it owns) is
/// found at once; and at the latest after [`OWNER_IDS_MAX_AGE`], for
/// databases that are not those files (LDAP, sssd). The files are stat'ed
/// at most every [`OWNER_STAMPS_RECHECK`]: two `stat`s per lookup were a
/// twentieth of a reconcile pass over 100,000 files. A file applied in that
/// window, right after a replicated `useradd`, gets the leader's number for
/// a new name, which is the right one exactly when the databases are
/// replicated, the one case where they change under the applier.
#[derive(Default)]
struct LocalIds {
    users: HashMap<OwnerName, Option<u32>>,
    groups: HashMap<OwnerName, Option<u32>>,
    /// The databases' stamps when the maps were started.
    stamps: [Option<FileStamp>; 2],
    /// When the maps were started (`None`: never).
    started: Option<Instant>,
    /// When `stamps` were last compared with the files.
    checked: Option<Instant>,
}

/// How long a cached owner lookup stands when the user and group files do
/// not change (see [`LocalIds`]).
const OWNER_IDS_MAX_AGE: Duration = Duration::from_secs(1);

/// How long the user and group files' stamps are taken as unchanged
/// without a `stat` (see [`LocalIds`]).
const OWNER_STAMPS_RECHECK: Duration = Duration::from_millis(100);

/// The files NSS's `files` source reads; a change to either drops the cache.
const OWNER_DATABASES: [&str; 2] = ["/etc/passwd", "/etc/group"];

/// What tells one version of a file from the next without reading it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(path: &str) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(FileStamp {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

static LOCAL_IDS: Mutex<Option<LocalIds>> = Mutex::new(None);

impl LocalIds {
    /// The numeric owner to give `meta` here, from `users` and `groups`
    /// (name → number) unless cached since the databases were last seen as
    /// `stamps` at `now`.
    fn of_with(
        &mut self,
        meta: &Meta,
        stamps: [Option<FileStamp>; 2],
        now: Instant,
        users: impl FnOnce(&str) -> Option<u32>,
        groups: impl FnOnce(&str) -> Option<u32>,
    ) -> (u32, u32) {
        let fresh = self.stamps == stamps
            && self
                .started
                .is_some_and(|t| now.saturating_duration_since(t) < OWNER_IDS_MAX_AGE);
        if !fresh {
            self.users.clear();
            self.groups.clear();
            self.stamps = stamps;
            self.started = Some(now);
        }
        let uid = meta.user.as_ref().and_then(|name| {
            *self
                .users
                .entry(name.clone())
                .or_insert_with(|| users(&**name))
        });
        let gid = meta.group.as_ref().and_then(|name| {
            *self
                .groups
                .entry(name.clone())
                .or_insert_with(|| groups(&**name))
        });
        (uid.unwrap_or(meta.uid), gid.unwrap_or(meta.gid))
    }
}

/// The numeric owner to give `meta` here: by name when this node knows the
/// name, else the leader's number (see [`LocalIds`]).
pub fn local_ids(meta: &Meta) -> (u32, u32) {
    if meta.user.is_none() && meta.group.is_none() {
        return (meta.uid, meta.gid);
    }
    let now = Instant::now();
    let mut ids = LOCAL_IDS.lock().unwrap_or_else(|e| e.into_inner());
    let ids = ids.get_or_insert_with(LocalIds::default);
    let recent = ids
        .checked
        .is_some_and(|t| now.saturating_duration_since(t) < OWNER_STAMPS_RECHECK);
    let stamps = if recent {
        ids.stamps
    } else {
        ids.checked = Some(now);
        OWNER_DATABASES.map(FileStamp::of)
    };
    ids.of_with(
        meta,
        stamps,
        now,
        |name| uzers::get_user_by_name(name).map(|u| u.uid()),
        |name| uzers::get_group_by_name(name).map(|g| g.gid()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::EntryKind;
    #[test]
    fn owner_lookups_are_cached_until_the_user_database_changes_or_a_second_passes() {
        let meta = Meta {
            kind: EntryKind::File,
            mode: 0o640,
            uid: 1000,
            gid: 1000,
            user: Some(OwnerName::new("postfix")),
            group: Some(OwnerName::new("postdrop")),
            mtime_ns: 0,
        };
        let stamp = |ino| {
            Some(FileStamp {
                ino,
                len: 1,
                mtime_ns: 2,
                ctime_ns: 3,
            })
        };
        let lookups = std::cell::Cell::new(0);
        let mut ids = LocalIds::default();
        let t0 = Instant::now();
        let mut of = |stamps, now, uid: Option<u32>| {
            ids.of_with(
                &meta,
                stamps,
                now,
                |name| {
                    assert_eq!(name, "postfix");
                    lookups.set(lookups.get() + 1);
                    uid
                },
                |name| {
                    assert_eq!(name, "postdrop");
                    Some(90)
                },
            )
        };
        // Unknown here: the leader's numbers, and the answer is cached.
        assert_eq!(of([stamp(1), stamp(2)], t0, None), (1000, 90));
        assert_eq!(of([stamp(1), stamp(2)], t0, Some(7)), (1000, 90));
        assert_eq!(lookups.get(), 1);
        // /etc/passwd replaced (a replicated useradd): looked up again.
        assert_eq!(of([stamp(3), stamp(2)], t0, Some(7)), (7, 90));
        assert_eq!(lookups.get(), 2);
        assert_eq!(of([stamp(3), stamp(2)], t0, Some(8)), (7, 90));
        // Databases that are not those files: at the latest a second on.
        let later = t0 + OWNER_IDS_MAX_AGE;
        assert_eq!(of([stamp(3), stamp(2)], later, Some(8)), (8, 90));
        assert_eq!(lookups.get(), 3);
        // A database that vanished counts as a change too.
        assert_eq!(of([None, stamp(2)], later, Some(9)), (9, 90));
    }

    #[test]
    fn a_file_stamp_tells_a_rewritten_file_from_the_same_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let p = path.to_str().unwrap();
        std::fs::write(&path, "root:x:0:0::/root:/bin/sh\n").unwrap();
        let a = FileStamp::of(p);
        assert!(a.is_some());
        assert_eq!(FileStamp::of(p), a);
        std::fs::write(&path, "root:x:0:0::/root:/bin/bash\n").unwrap();
        assert_ne!(FileStamp::of(p), a, "a longer rewrite");
        assert_eq!(
            FileStamp::of(dir.path().join("gone").to_str().unwrap()),
            None
        );
    }
}
