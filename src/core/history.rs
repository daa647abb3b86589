//! What a set's history is made of, without storage: a revision (the Raft
//! index of a committed change of one set) and the changes it made, each
//! path's version after it, how a change is classified (`+` added, `~`
//! content, `m` metadata, `-` deleted), which revisions retention drops,
//! and how two versions are shown as a diff.
//!
//! Invariant owned here: a change is classified from the committed entries
//! before and after it alone, so every data node derives the same history
//! from the same log.

use serde::{Deserialize, Serialize};

use crate::core::manifest::{Entry, EntryKind};
use crate::core::paths::SetPath;

/// What a revision did to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeOp {
    /// The path did not exist before.
    Added,
    /// Its content (or a symlink's target, or its kind) changed.
    Content,
    /// Only its mode, owner, mtime or extended attributes changed.
    Meta,
    /// It was deleted.
    Deleted,
}

impl ChangeOp {
    /// The one-character form `clusterctl history` prints and its JSON has.
    pub fn symbol(self) -> &'static str {
        match self {
            ChangeOp::Added => "+",
            ChangeOp::Content => "~",
            ChangeOp::Meta => "m",
            ChangeOp::Deleted => "-",
        }
    }

    pub fn from_symbol(s: &str) -> Option<ChangeOp> {
        Some(match s {
            "+" => ChangeOp::Added,
            "~" => ChangeOp::Content,
            "m" => ChangeOp::Meta,
            "-" => ChangeOp::Deleted,
            _ => return None,
        })
    }
}

/// How the committed entry of a path changed, or `None` when it did not
/// (an op that rewrote the same version, or a hard link's bookkeeping).
pub fn classify(before: Option<&Entry>, after: Option<&Entry>) -> Option<ChangeOp> {
    match (before, after) {
        (None, None) => None,
        (None, Some(_)) => Some(ChangeOp::Added),
        (Some(_), None) => Some(ChangeOp::Deleted),
        (Some(b), Some(a)) => {
            if b.meta.kind != a.meta.kind || b.digest != a.digest || b.target != a.target {
                Some(ChangeOp::Content)
            } else if b.meta.mode != a.meta.mode
                || b.meta.uid != a.meta.uid
                || b.meta.gid != a.meta.gid
                || b.meta.user != a.meta.user
                || b.meta.group != a.meta.group
                || b.meta.mtime_ns != a.meta.mtime_ns
                || b.xattrs != a.xattrs
                || b.link != a.link
            {
                Some(ChangeOp::Meta)
            } else {
                None
            }
        }
    }
}

/// The size a change shows: a file's length after it (before it, for a
/// deletion); 0 for directories and symlinks.
pub fn shown_size(op: ChangeOp, before: Option<&Entry>, after: Option<&Entry>) -> u64 {
    let entry = if op == ChangeOp::Deleted {
        before
    } else {
        after
    };
    entry
        .and_then(|e| e.digest)
        .map(|d| d.get().len)
        .unwrap_or(0)
}

/// One path's change in a revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub path: SetPath,
    pub op: ChangeOp,
    pub size: u64,
}

/// A committed change of one set, as every data node records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    /// The leader's wall clock when it proposed the change, in ms.
    pub time_ms: u64,
    pub term: u64,
    /// The node that proposed it (the leader then).
    pub leader: u64,
    pub changes: Vec<Change>,
    /// Bytes of content this node stored for it (what retention weighs).
    pub stored_bytes: u64,
}

/// One path's committed state after a revision: its entry, or `None` once
/// deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub op: ChangeOp,
    pub entry: Option<Entry>,
}

/// What retention keeps of a set's history, from its revisions oldest
/// first as `(revision, time_ms, stored_bytes)`: every revision after the
/// returned one is kept, it and those before it are dropped (`None`: drop
/// nothing). A revision goes when it is older than `keep_ms` before
/// `now_ms`, or when it and the revisions after it weigh more than
/// `keep_bytes`; the newest revision always stays.
pub fn drop_through(
    revisions: &[(u64, u64, u64)],
    now_ms: u64,
    keep_ms: u64,
    keep_bytes: u64,
) -> Option<u64> {
    let (_, older) = revisions.split_last()?;
    let by_age = older
        .iter()
        .take_while(|(_, time, _)| now_ms.saturating_sub(*time) > keep_ms)
        .last()
        .map(|(rev, _, _)| *rev);
    let mut weight = revisions.last().map_or(0, |(_, _, b)| *b);
    let mut by_size = None;
    for (rev, _, bytes) in older.iter().rev() {
        weight = weight.saturating_add(*bytes);
        if weight > keep_bytes {
            by_size = Some(*rev);
            break;
        }
    }
    by_age.max(by_size)
}

/// A unified diff of two versions of a file's content (`None`: the path
/// did not exist, or is not a file, in that version), or one line when
/// either side is not text.
pub fn content_diff(
    path: &SetPath,
    (from_rev, old): (u64, Option<&[u8]>),
    (to_rev, new): (u64, Option<&[u8]>),
) -> String {
    if old == new {
        return String::new();
    }
    fn text(b: Option<&[u8]>) -> Option<&str> {
        match b {
            None => Some(""),
            Some(b) if b.contains(&0) => None,
            Some(b) => std::str::from_utf8(b).ok(),
        }
    }
    match (text(old), text(new)) {
        (Some(o), Some(n)) => similar::TextDiff::from_lines(o, n)
            .unified_diff()
            .context_radius(3)
            .header(
                &format!("{path}@{from_rev}"),
                &format!("{path}@{to_rev}"),
            )
            .to_string(),
        _ => format!(
            "Binary {path} differs between revisions {from_rev} ({} bytes) and {to_rev} ({} bytes)\n",
            old.map_or(0, <[u8]>::len),
            new.map_or(0, <[u8]>::len)
        ),
    }
}

/// Revisions as `clusterctl history --json` prints them, newest first:
/// `[{"revision", "time" (unix seconds), "term", "leader", "changes":
/// [{"path", "op", "size"}]}]`.
pub fn revisions_json(revisions: &[(u64, Revision)]) -> serde_json::Value {
    serde_json::Value::Array(
        revisions
            .iter()
            .map(|(rev, r)| {
                serde_json::json!({
                    "revision": rev,
                    "time": r.time_ms / 1000,
                    "term": r.term,
                    "leader": r.leader,
                    "changes": r.changes.iter().map(|c| serde_json::json!({
                        "path": c.path.to_string(),
                        "op": c.op.symbol(),
                        "size": c.size,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// Revisions as `clusterctl history` prints them: one line each, newest
/// first: revision, time (UTC), term, leader, and each change with its
/// size.
pub fn revisions_table(revisions: &[(u64, Revision)]) -> String {
    let mut out = String::new();
    for (rev, r) in revisions {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.time_ms);
        let changes: Vec<String> = r
            .changes
            .iter()
            .map(|c| match c.op {
                ChangeOp::Deleted => format!("-{}", c.path),
                op => format!("{}{} ({})", op.symbol(), c.path, bytesize::ByteSize(c.size)),
            })
            .collect();
        out.push_str(&format!(
            "{rev:>8}  {}  term {}  node {}  {}\n",
            humantime::format_rfc3339_seconds(time),
            r.term,
            r.leader,
            changes.join("  ")
        ));
    }
    out
}

/// A path's state at a revision (`clusterctl show`, `diff`).
#[derive(Debug)]
pub struct At {
    /// The revision that made this state (`None`: unchanged since before
    /// the oldest revision kept).
    pub changed_at: Option<u64>,
    /// Its committed entry then (`None`: it did not exist).
    pub entry: Option<Entry>,
    /// A file's content, when asked for.
    pub content: Option<Vec<u8>>,
}

/// Whether an entry is a regular file (whose content history keeps).
pub fn is_file(entry: &Entry) -> bool {
    entry.meta.kind == EntryKind::File
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::delta;
    use crate::core::manifest::{Meta, WireDigest, Xattrs};

    fn file(content: &[u8], mode: u32) -> Entry {
        Entry {
            meta: Meta {
                kind: EntryKind::File,
                mode,
                uid: 0,
                gid: 0,
                user: None,
                group: None,
                mtime_ns: 1,
            },
            digest: Some(WireDigest::new(&delta::digest(content))),
            target: None,
            xattrs: Xattrs::default(),
            link: None,
        }
    }

    #[test]
    fn changes_are_classified_from_the_entries_alone() {
        let a = file(b"a", 0o644);
        let b = file(b"b", 0o644);
        let a_600 = file(b"a", 0o600);
        assert_eq!(classify(None, Some(&a)), Some(ChangeOp::Added));
        assert_eq!(classify(Some(&a), None), Some(ChangeOp::Deleted));
        assert_eq!(classify(Some(&a), Some(&b)), Some(ChangeOp::Content));
        assert_eq!(classify(Some(&a), Some(&a_600)), Some(ChangeOp::Meta));
        assert_eq!(classify(Some(&a), Some(&a.clone())), None);
        assert_eq!(shown_size(ChangeOp::Deleted, Some(&a), None), 1);
        for op in [
            ChangeOp::Added,
            ChangeOp::Content,
            ChangeOp::Meta,
            ChangeOp::Deleted,
        ] {
            assert_eq!(ChangeOp::from_symbol(op.symbol()), Some(op));
        }
    }

    #[test]
    fn retention_drops_by_age_and_by_weight_oldest_first() {
        let day = 86_400_000;
        let revs = [
            (10, 0, 100),
            (11, day, 100),
            (12, 5 * day, 100),
            (13, 6 * day, 100),
        ];
        // Two days kept on day 6: 10 and 11 are older.
        assert_eq!(drop_through(&revs, 6 * day, 2 * day, u64::MAX), Some(11));
        assert_eq!(drop_through(&revs, 6 * day, 30 * day, u64::MAX), None);
        // 250 bytes kept: 13 and 12 fit, 11 would pass it.
        assert_eq!(drop_through(&revs, 6 * day, 30 * day, 250), Some(11));
        assert_eq!(drop_through(&revs, 6 * day, 30 * day, 1000), None);
        assert_eq!(drop_through(&[], 0, 0, 0), None);
        // The newest revision stays, however old or heavy.
        assert_eq!(drop_through(&revs, 100 * day, day, 0), Some(12));
        assert_eq!(drop_through(&revs[3..], 100 * day, day, 0), None);
    }

    #[test]
    fn diffs_are_unified_for_text_and_one_line_otherwise() {
        let p = SetPath::from_network(b"tac_plus.conf").unwrap();
        let d = content_diff(&p, (5, Some(b"a\nb\n")), (7, Some(b"a\nc\n")));
        assert!(d.contains("--- tac_plus.conf@5"), "{d}");
        assert!(d.contains("+++ tac_plus.conf@7"), "{d}");
        assert!(d.contains("-b\n") && d.contains("+c\n"), "{d}");
        let created = content_diff(&p, (5, None), (7, Some(b"new\n")));
        assert!(created.contains("+new"), "{created}");
        let bin = content_diff(&p, (5, Some(b"\0\x01")), (7, Some(b"\0\x02\x03")));
        assert_eq!(
            bin,
            "Binary tac_plus.conf differs between revisions 5 (2 bytes) and 7 (3 bytes)\n"
        );
        assert_eq!(content_diff(&p, (5, Some(b"x")), (7, Some(b"x"))), "");
    }

    #[test]
    fn revisions_print_as_the_product_contract_says() {
        let p = SetPath::from_network(b"tac_plus.conf").unwrap();
        let revs = vec![(
            42,
            Revision {
                time_ms: 1_765_000_000_123,
                term: 3,
                leader: 1,
                changes: vec![
                    Change {
                        path: p.clone(),
                        op: ChangeOp::Content,
                        size: 2048,
                    },
                    Change {
                        path: SetPath::from_network(b"old.conf").unwrap(),
                        op: ChangeOp::Deleted,
                        size: 10,
                    },
                ],
                stored_bytes: 100,
            },
        )];
        let json = revisions_json(&revs);
        assert_eq!(
            json,
            serde_json::json!([{
                "revision": 42, "time": 1_765_000_000u64, "term": 3, "leader": 1,
                "changes": [
                    {"path": "tac_plus.conf", "op": "~", "size": 2048},
                    {"path": "old.conf", "op": "-", "size": 10},
                ],
            }])
        );
        let table = revisions_table(&revs);
        assert!(table.contains("      42  2025-12-06T05:46:40Z  term 3  node 1  ~tac_plus.conf (2.0 KiB)  -old.conf"), "{table}");
    }
}
