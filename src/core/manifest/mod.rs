//! The replicated file state: for every sync set, what the cluster committed
//! for every path (kind, metadata, content digest or link target), and the
//! commands that change it ([`FileBatch`], [`Chunk`]).
//!
//! Pure: no I/O, no clock. Every node applies the same committed batches in
//! the same order and so holds the same [`Manifest`] at the same index; that
//! is what a Raft snapshot carries ([`Manifest::encode`]) and what the
//! leader plans its deltas against.
//!
//! Invariant owned here: a path enters the manifest only through
//! [`SetPath::from_network`], so nothing in it can name a place outside its
//! set's root, and a batch that holds one bad path changes nothing at all.
//!
//! Encoding: postcard of the structs below, behind the command header that
//! [`crate::raft::core::Command`] writes. The bytes are pinned by tests: they
//! live in every node's durable log and in snapshots.
//!
//! Extended attributes (sets with `xattrs = true`) were added without
//! changing any existing encoding: they travel as [`FileOp::Xattrs`], a
//! variant appended after the others (so every batch an older release wrote
//! decodes as before, and a batch of a set without the option is
//! byte-identical to an older release's), and [`Entry::xattrs`] is written
//! only where it is needed: snapshot format 2 (format 1 is still read, and
//! still written while no entry has xattrs) and [`Entry::encode_stored`].
//!
//! Hard links (sets with `hard_links = true`) were added the same way:
//! [`FileOp::Link`] is appended after [`FileOp::Xattrs`], and
//! [`Entry::link`] is written only where it is needed: snapshot format 3
//! (written only while some entry is a link) and the stored form of link
//! entries. A cluster that uses neither option writes exactly the bytes an
//! older release writes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::core::config::NodeId;
use crate::core::delta::FileDigest;
use crate::core::paths::{PathError, SetPath};

mod snapshot;

/// The largest piece of a patch carried in one Raft entry. Bigger patches
/// travel as [`Chunk`]s first, then a [`Content::Staged`] reference.
pub const CHUNK_LEN: usize = 1024 * 1024;

/// How many recent batches per set keep their commit time, for
/// `lag_seconds` of a node that is behind.
const RECENT_BATCHES: usize = 64;

/// Most bytes of extended attributes (names plus values) replicated for one
/// path: Linux's limit for a single value (`XATTR_SIZE_MAX`) and for a
/// file's whole name list. Anything larger is refused, never cut.
pub const XATTR_MAX_BYTES: usize = 64 * 1024;

/// Extended attributes of one path as the cluster replicates them:
/// `(name, value)` pairs, sorted by name, names unique, only the names
/// [`is_replicated_xattr`] accepts.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// The extended attributes a set with `xattrs = true` replicates: every
/// `user.*` name and the two POSIX ACLs (`system.posix_acl_access`,
/// `system.posix_acl_default`).
///
/// Left alone on every node, never read nor written: `security.*` (SELinux,
/// SMACK and AppArmor labels belong to each host's policy, IMA/EVM data is
/// signed with each host's keys, and file capabilities grant privilege; a
/// label copied from another host is at best refused by the LSM and at
/// worst wrong), `trusted.*` (filesystem and overlay internals, readable by
/// root only) and any other `system.*` name (NFSv4 ACLs and the like, whose
/// meaning depends on the filesystem).
pub fn is_replicated_xattr(name: &[u8]) -> bool {
    (name.len() > b"user.".len() && name.starts_with(b"user."))
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

/// Bytes counted against [`XATTR_MAX_BYTES`]: names plus values.
pub fn xattrs_size(xattrs: &[(Vec<u8>, Vec<u8>)]) -> usize {
    xattrs.iter().map(|(n, v)| n.len() + v.len()).sum()
}

/// Why a list of extended attributes cannot be committed, if it cannot.
pub fn check_xattrs(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<(), String> {
    for (i, (name, _)) in xattrs.iter().enumerate() {
        if name.contains(&0) || !is_replicated_xattr(name) {
            return Err(format!(
                "{:?} is not a replicated attribute (only user.* and the POSIX ACLs are)",
                String::from_utf8_lossy(name)
            ));
        }
        if i > 0 && xattrs[i - 1].0 >= *name {
            return Err("the names are not sorted and unique".into());
        }
    }
    let size = xattrs_size(xattrs);
    if size > XATTR_MAX_BYTES {
        return Err(format!(
            "they take {size} bytes, more than the {XATTR_MAX_BYTES} bytes replicated per path"
        ));
    }
    Ok(())
}

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// A user or group name in a [`Meta`]. Interned: a tree of 100,000 files
/// has a handful of owners, and two strings per file were a tenth of an
/// idle node's heap. Encoded as a plain string, exactly as before.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerName(std::sync::Arc<str>);

/// Names interned so far. Bounded: past [`MAX_INTERNED_NAMES`] (far more
/// than any user database holds) names are simply allocated, so a stream
/// of made-up names cannot grow this table without end.
static OWNER_NAMES: std::sync::Mutex<BTreeSet<std::sync::Arc<str>>> =
    std::sync::Mutex::new(BTreeSet::new());
const MAX_INTERNED_NAMES: usize = 1 << 16;

impl OwnerName {
    pub fn new(name: &str) -> OwnerName {
        let mut names = OWNER_NAMES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = names.get(name) {
            return OwnerName(known.clone());
        }
        let name: std::sync::Arc<str> = name.into();
        if names.len() < MAX_INTERNED_NAMES {
            names.insert(name.clone());
        }
        OwnerName(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for OwnerName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for OwnerName {
    fn from(name: &str) -> OwnerName {
        OwnerName::new(name)
    }
}

impl std::fmt::Debug for OwnerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for OwnerName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for OwnerName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<OwnerName, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(OwnerName::new(&name))
    }
}

/// Metadata as the cluster replicates it. Owners travel by name and number:
/// a follower uses the name when it knows it, the number otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub kind: EntryKind,
    /// Permission bits with setuid, setgid and sticky (0o7777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub user: Option<OwnerName>,
    pub group: Option<OwnerName>,
    /// Nanoseconds since the epoch.
    pub mtime_ns: i128,
}

/// The committed state of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub meta: Meta,
    /// Files: the committed content's length and blake3 hash.
    pub digest: Option<WireDigest>,
    /// Symlinks: the target, as bytes, never resolved.
    pub target: Option<Vec<u8>>,
    /// Files and directories of sets with `xattrs = true`: their replicated
    /// extended attributes (empty otherwise, and for symlinks).
    pub xattrs: Xattrs,
    /// Files of sets with `hard_links = true`: `Some(primary)` when this
    /// name is another hard link of the committed file `primary` (a file of
    /// the same set that is not a link itself). `meta`, `digest` and
    /// `xattrs` are then the primary's (one inode has one of each), so
    /// status, fetch and comparisons read a link like any file.
    pub link: Option<SetPath>,
}

/// [`Entry`] as format 1 wrote it (no xattrs): what snapshots of format 1
/// and stored entries of older releases hold.
#[derive(Deserialize)]
struct EntryV1 {
    meta: Meta,
    digest: Option<WireDigest>,
    target: Option<Vec<u8>>,
}

/// Borrowed [`EntryV1`], to write format 1 without copying.
#[derive(Serialize)]
struct EntryV1Ref<'a> {
    meta: &'a Meta,
    digest: &'a Option<WireDigest>,
    target: &'a Option<Vec<u8>>,
}

/// [`Entry`] as format 2 wrote it (xattrs, no links).
#[derive(Deserialize)]
struct EntryV2 {
    meta: Meta,
    digest: Option<WireDigest>,
    target: Option<Vec<u8>>,
    xattrs: Xattrs,
}

/// Borrowed [`EntryV2`], to write format 2 without copying.
#[derive(Serialize)]
struct EntryV2Ref<'a> {
    meta: &'a Meta,
    digest: &'a Option<WireDigest>,
    target: &'a Option<Vec<u8>>,
    xattrs: &'a Xattrs,
}

impl From<EntryV1> for Entry {
    fn from(e: EntryV1) -> Entry {
        Entry {
            meta: e.meta,
            digest: e.digest,
            target: e.target,
            xattrs: Vec::new(),
            link: None,
        }
    }
}

impl From<EntryV2> for Entry {
    fn from(e: EntryV2) -> Entry {
        Entry {
            meta: e.meta,
            digest: e.digest,
            target: e.target,
            xattrs: e.xattrs,
            link: None,
        }
    }
}

impl<'a> From<&'a Entry> for EntryV1Ref<'a> {
    fn from(e: &'a Entry) -> EntryV1Ref<'a> {
        EntryV1Ref {
            meta: &e.meta,
            digest: &e.digest,
            target: &e.target,
        }
    }
}

impl<'a> From<&'a Entry> for EntryV2Ref<'a> {
    fn from(e: &'a Entry) -> EntryV2Ref<'a> {
        EntryV2Ref {
            meta: &e.meta,
            digest: &e.digest,
            target: &e.target,
            xattrs: &e.xattrs,
        }
    }
}

impl Entry {
    /// The form `data_dir/files` keeps: format 1 (as older releases wrote
    /// it) when the entry has no xattrs and is no link, format 2 when it has
    /// xattrs, else the full form. An older release can still read every
    /// entry of a set without `xattrs = true` or `hard_links = true`.
    pub fn encode_stored(&self) -> Vec<u8> {
        if self.link.is_some() {
            postcard::to_allocvec(self)
        } else if self.xattrs.is_empty() {
            postcard::to_allocvec(&EntryV1Ref::from(self))
        } else {
            postcard::to_allocvec(&EntryV2Ref::from(self))
        }
        .expect("an entry always serializes")
    }

    /// Reads any form [`Entry::encode_stored`] writes, and only those.
    /// Unambiguous: each form is the one before it followed by more fields
    /// (format 1, then the xattrs, then the link), so a shorter form ends
    /// exactly where a longer decoder still wants bytes, each decoder must
    /// consume the whole value, and the full form must hold a link.
    pub fn decode_stored(bytes: &[u8]) -> Result<Entry, postcard::Error> {
        match postcard::take_from_bytes::<Entry>(bytes) {
            Ok((e, [])) if e.link.is_some() => Ok(e),
            // The full form is written only for links: anything else in
            // it (a format-2 value with a stray byte) is not ours.
            Ok(_) => Err(postcard::Error::DeserializeBadEncoding),
            Err(full) => match postcard::take_from_bytes::<EntryV2>(bytes) {
                Ok((e, [])) => Ok(e.into()),
                Ok(_) => Err(full),
                Err(_) => match postcard::take_from_bytes::<EntryV1>(bytes) {
                    Ok((e, [])) => Ok(e.into()),
                    _ => Err(full),
                },
            },
        }
    }
}

/// [`FileDigest`] in its fixed 40-byte form.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDigest(#[serde(with = "digest_bytes")] pub [u8; FileDigest::ENCODED_LEN]);

impl WireDigest {
    pub fn new(d: &FileDigest) -> WireDigest {
        WireDigest(d.to_bytes())
    }
    pub fn get(&self) -> FileDigest {
        FileDigest::from_bytes(&self.0)
    }
}

impl std::fmt::Debug for WireDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.get())
    }
}

mod digest_bytes {
    use serde::{Deserializer, Serializer};
    pub fn serialize<S: Serializer>(b: &[u8; 40], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 40], D::Error> {
        super::with_bytes(d, "40 bytes", |v| {
            v.try_into()
                .map_err(|_| format!("invalid length {}, expected 40 bytes", v.len()))
        })
    }
}

/// Where a new file version's patch is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// Only the metadata changed; the content is the committed one.
    Unchanged,
    /// An encoded [`crate::core::delta::Patch`], in this entry.
    Inline(#[serde(with = "serde_bytes_vec")] Vec<u8>),
    /// An encoded patch of `len` bytes sent before as [`Chunk`]s of `upload`.
    Staged { upload: u64, len: u64 },
    /// An encoded patch of `len` bytes at `offset` of the staged upload
    /// `upload`, which holds the patches of one batch one after another.
    /// The leader sends it to followers outside the log (the `Stage` RPC)
    /// and proposes the batch only once enough of them hold it durably (see
    /// ARCHITECTURE.md, "Small changes travel inside Raft entries; bulk
    /// content beside them"); where that is not possible the batch is
    /// rewritten to [`Content::Inline`] and [`Content::Staged`] instead.
    /// Appended last, so every other variant keeps its tag.
    Blob { upload: u64, offset: u64, len: u64 },
}

/// One change to one path. Paths are raw bytes here and become [`SetPath`]s
/// (or a refusal) in [`Manifest::apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileOp {
    /// A regular file's new version (content and/or metadata).
    Put {
        path: Vec<u8>,
        meta: Meta,
        digest: WireDigest,
        content: Content,
    },
    /// A directory, created if missing, with this metadata.
    Dir { path: Vec<u8>, meta: Meta },
    /// A symlink with this target (its own mode is not kept: Linux ignores it).
    Symlink {
        path: Vec<u8>,
        target: Vec<u8>,
        meta: Meta,
    },
    /// The path and everything under it is gone (mirror sets).
    Remove { path: Vec<u8> },
    /// The path left the leader but followers keep their copy (append sets:
    /// logs the leader rotated away are not deleted, as rsync without
    /// `--delete` does).
    Forget { path: Vec<u8> },
    /// The path moved (a rotated log, a renamed directory): followers rename
    /// their copy instead of receiving the content again.
    Rename { from: Vec<u8>, to: Vec<u8> },
    /// The replicated extended attributes of a committed file or directory
    /// are now exactly `xattrs` (sets with `xattrs = true` only). A `Put` or
    /// `Dir` commits a path with none; when this op follows it for the same
    /// path in the same batch it is folded into that op, so the follower
    /// sets them on the temporary file before the rename (invariant 2). Alone
    /// it is a metadata-only change. Appended last: older variants keep
    /// their tags, so the pinned encoding of every other op is unchanged.
    Xattrs { path: Vec<u8>, xattrs: Xattrs },
    /// `path` is now another hard link of `target`, a committed regular
    /// file of the set that is not a link itself (sets with
    /// `hard_links = true` only): followers link the name to the inode that
    /// holds `target`, and no content travels. Whatever stood at `path`
    /// goes, as for a [`FileOp::Symlink`]. A link lasts until the next op
    /// that names either side: a new version of `target` (a `Put`, whose
    /// rename gives it a new inode on followers), its removal or its
    /// replacement leaves each link a file of its own with the content and
    /// metadata it had, as on a follower's disk; a leader whose names are
    /// still linked then proposes the links again. Appended after `Xattrs`
    /// for the same reason as it.
    Link { path: Vec<u8>, target: Vec<u8> },
}

impl FileOp {
    pub fn path(&self) -> &[u8] {
        match self {
            FileOp::Put { path, .. }
            | FileOp::Dir { path, .. }
            | FileOp::Symlink { path, .. }
            | FileOp::Remove { path }
            | FileOp::Forget { path }
            | FileOp::Xattrs { path, .. }
            | FileOp::Link { path, .. } => path,
            FileOp::Rename { to, .. } => to,
        }
    }
}

/// Changes to one set that become visible together, in this order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileBatch {
    pub set: String,
    /// The node that read these changes from its tree (the leader then):
    /// its own tree already holds them, so it does not write them back.
    pub origin: NodeId,
    /// The proposer's wall clock, for lag in seconds.
    pub proposed_at_ms: u64,
    pub ops: Vec<FileOp>,
}

/// A piece of a large patch, staged by followers until the batch that
/// references its `upload` commits.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub upload: u64,
    pub offset: u64,
    #[serde(with = "serde_bytes_vec")]
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Chunk(upload {:016x} @ {} + {} bytes)",
            self.upload,
            self.offset,
            self.data.len()
        )
    }
}

mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let v: &[u8] = Deserialize::deserialize(d)?;
        Ok(v.to_vec())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("sync set {set:?}: {source}")]
    Path { set: String, source: PathError },
    #[error("sync set {set:?}: cannot rename {from} to {to}: {why}")]
    Rename {
        set: String,
        from: SetPath,
        to: SetPath,
        why: &'static str,
    },
    #[error("sync set {set:?}: {path} lies under {ancestor}, which the cluster has as a {kind}, not a directory; nothing can be written through it")]
    UnderNonDir {
        set: String,
        path: SetPath,
        ancestor: SetPath,
        kind: &'static str,
    },
    #[error("sync set {set:?}: refused the extended attributes of {path}: {why}")]
    Xattrs {
        set: String,
        path: SetPath,
        why: String,
    },
    #[error("sync set {set:?}: refused to make {path} a hard link of {target}: {why}")]
    Link {
        set: String,
        path: SetPath,
        target: SetPath,
        why: &'static str,
    },
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: &'static str,
        source: postcard::Error,
    },
}

/// Counters that every node derives identically from the batches it applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetProgress {
    /// Batches applied to this set.
    pub seq: u64,
    /// Raft index of the last batch applied to this set.
    pub index: u64,
    /// Patch bytes of every batch applied so far (for lag in bytes).
    pub bytes: u64,
    /// `(seq, proposed_at_ms)` of the last few batches (for lag in seconds).
    pub recent: VecDeque<(u64, u64)>,
}

impl SetProgress {
    /// When the batch after `seq` was proposed: how long a node at `seq` has
    /// been behind. `None` when nothing is newer.
    pub fn behind_since_ms(&self, seq: u64) -> Option<u64> {
        if seq >= self.seq {
            return None;
        }
        self.recent
            .iter()
            .find(|(s, _)| *s > seq)
            .or(self.recent.front())
            .map(|(_, at)| *at)
    }
}

/// One set's committed tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetManifest {
    /// Changed only by [`Manifest::apply`] once the set is in use (loading
    /// fills a new one): the link index below follows its changes.
    pub entries: BTreeMap<SetPath, Entry>,
    pub progress: SetProgress,
    /// Primary → its hard links, kept between batches: building it from
    /// `entries` for every batch cost a pass over the whole set per batch
    /// (a million-file first sync: 500 batches of a million entries).
    /// Built at the first batch applied; dropped when a batch is undone.
    #[serde(skip)]
    link_index: LinkIndex,
    /// [`SetManifest::totals`] since the last change: status and metrics
    /// ask often, and counting a million entries takes tens of ms.
    #[serde(skip)]
    totals: TotalsCache,
}

/// [`SetManifest::totals`], computed at most once per change.
#[derive(Debug, Clone, Default)]
struct TotalsCache(std::sync::OnceLock<(u64, u64)>);

impl PartialEq for TotalsCache {
    fn eq(&self, _: &TotalsCache) -> bool {
        true
    }
}

impl Eq for TotalsCache {}

/// [`SetManifest::link_index`]: derived from the entries, so it takes no
/// part in comparisons.
#[derive(Debug, Clone, Default)]
struct LinkIndex(Option<BTreeMap<SetPath, BTreeSet<SetPath>>>);

impl PartialEq for LinkIndex {
    fn eq(&self, _: &LinkIndex) -> bool {
        true
    }
}

impl Eq for LinkIndex {}

impl SetManifest {
    /// Rebuilds the tree with full nodes. Entries inserted one at a time in
    /// path order (a first sync, a load from disk, a decoded snapshot) leave
    /// B-tree nodes little more than half full: 412 bytes per entry against
    /// 236 packed, measured with 100,000 paths. Packing after such a burst
    /// is most of what keeps an idle node with 100,000 files small.
    pub fn repack(&mut self) {
        // `append` into a non-empty map bulk-builds full nodes from the two
        // sorted iterators, freeing the old nodes as it goes; `collect`
        // would first copy every entry into one large vector.
        let Some((path, entry)) = self.entries.pop_first() else {
            return;
        };
        let mut packed = BTreeMap::new();
        packed.insert(path, entry);
        packed.append(&mut self.entries);
        self.entries = packed;
    }

    /// Files (every name, hard links included) and their total bytes (a
    /// hard-linked file's bytes counted once: its links hold no more).
    pub fn totals(&self) -> (u64, u64) {
        *self.totals.0.get_or_init(|| {
            self.entries
                .values()
                .filter_map(|e| {
                    e.digest
                        .map(|d| if e.link.is_some() { 0 } else { d.get().len })
                })
                .fold((0, 0), |(n, b), len| (n + 1, b + len))
        })
    }

    /// The other names of the hard-linked file `path` belongs to (the
    /// primary and its links, `path` left out); empty when it is no link
    /// and has none. One pass over the set.
    pub fn link_group(&self, path: &SetPath) -> Vec<SetPath> {
        let Some(e) = self.entries.get(path) else {
            return Vec::new();
        };
        let primary = e.link.clone().unwrap_or_else(|| path.clone());
        let mut out: Vec<SetPath> = self
            .entries
            .iter()
            .filter(|(p, e)| e.link.as_ref() == Some(&primary) && *p != path)
            .map(|(p, _)| p.clone())
            .collect();
        if e.link.is_some() {
            out.push(primary);
            out.sort();
        }
        out
    }

    /// `path` and everything under it, in order.
    pub fn subtree<'a>(
        &'a self,
        path: &'a SetPath,
    ) -> impl Iterator<Item = (&'a SetPath, &'a Entry)> + 'a {
        self.entries
            .range(path.clone()..)
            .take_while(move |(p, _)| *p == path || path.is_ancestor_of(p))
    }
}

/// A set's tree while a batch is applied, with the hard links indexed by
/// their primary and kept consistent: a primary that is replaced or removed
/// leaves its links files of their own (a follower's rename or unlink of the
/// primary leaves them holding the old inode), a moved primary takes its
/// links' reference along (a rename keeps the inode).
///
/// The set is changed in place, and every touched path's value from before
/// is remembered so a refused batch is undone: cloning the set for every
/// batch made a sync of N files cost O(N²).
struct Scratch<'a> {
    entries: &'a mut BTreeMap<SetPath, Entry>,
    /// Each touched path's entry before the batch (`None`: absent).
    before: BTreeMap<SetPath, Option<Entry>>,
    /// Primary → its links.
    links: BTreeMap<SetPath, BTreeSet<SetPath>>,
    /// Entries changed on the side (a link detached or retargeted, shared
    /// attributes), which no op of the batch names.
    touched: BTreeSet<SetPath>,
}

impl<'a> Scratch<'a> {
    /// Over `entries`, whose links `index` holds (built here if `None`).
    fn new(
        entries: &'a mut BTreeMap<SetPath, Entry>,
        index: Option<BTreeMap<SetPath, BTreeSet<SetPath>>>,
    ) -> Scratch<'a> {
        let links = index.unwrap_or_else(|| {
            let mut links: BTreeMap<SetPath, BTreeSet<SetPath>> = BTreeMap::new();
            for (p, e) in entries.iter() {
                if let Some(t) = &e.link {
                    links.entry(t.clone()).or_default().insert(p.clone());
                }
            }
            links
        });
        Scratch {
            entries,
            before: BTreeMap::new(),
            links,
            touched: BTreeSet::new(),
        }
    }

    fn remember(&mut self, path: &SetPath) {
        if !self.before.contains_key(path) {
            self.before
                .insert(path.clone(), self.entries.get(path).cloned());
        }
    }

    fn get(&self, path: &SetPath) -> Option<&Entry> {
        self.entries.get(path)
    }

    fn get_mut(&mut self, path: &SetPath) -> Option<&mut Entry> {
        self.remember(path);
        self.entries.get_mut(path)
    }

    fn raw_remove(&mut self, path: &SetPath) -> Option<Entry> {
        self.remember(path);
        self.entries.remove(path)
    }

    fn raw_insert(&mut self, path: SetPath, entry: Entry) {
        self.remember(&path);
        self.entries.insert(path, entry);
    }

    fn subtree_names(&self, path: &SetPath) -> Vec<SetPath> {
        self.entries
            .range(path.clone()..)
            .take_while(|(p, _)| *p == path || path.is_ancestor_of(p))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Puts every touched path back as it was.
    fn undo(self) {
        for (path, was) in self.before {
            match was {
                Some(e) => self.entries.insert(path, e),
                None => self.entries.remove(&path),
            };
        }
    }

    fn unindex(&mut self, primary: &SetPath, link: &SetPath) {
        if let Some(names) = self.links.get_mut(primary) {
            names.remove(link);
            if names.is_empty() {
                self.links.remove(primary);
            }
        }
    }

    /// Takes `path`'s entry out; its links, if it had any, become files of
    /// their own.
    fn remove(&mut self, path: &SetPath) -> Option<Entry> {
        let e = self.raw_remove(path)?;
        if let Some(t) = &e.link {
            self.unindex(t, path);
        }
        for name in self.links.remove(path).unwrap_or_default() {
            if let Some(l) = self.get_mut(&name) {
                l.link = None;
                self.touched.insert(name);
            }
        }
        Some(e)
    }

    /// Puts `entry` at `path` (what stood there is removed as above).
    fn insert(&mut self, path: SetPath, entry: Entry) -> Option<Entry> {
        let previous = self.remove(&path);
        if let Some(t) = &entry.link {
            self.links
                .entry(t.clone())
                .or_default()
                .insert(path.clone());
        }
        self.raw_insert(path, entry);
        previous
    }

    fn remove_subtree(&mut self, path: &SetPath) -> Vec<(SetPath, Entry)> {
        let doomed = self.subtree_names(path);
        doomed
            .into_iter()
            .filter_map(|p| self.remove(&p).map(|e| (p, e)))
            .collect()
    }

    /// Moves `from` and its subtree to `to`. Links keep pointing at the
    /// same file under its new name, wherever they are.
    fn rename(&mut self, from: &SetPath, to: &SetPath) -> Result<Vec<(SetPath, Entry)>, PathError> {
        let moved_to = |p: &SetPath| -> Result<SetPath, PathError> {
            let rest = &p.as_bytes()[from.as_bytes().len()..];
            let mut bytes = to.as_bytes().to_vec();
            bytes.extend_from_slice(rest);
            SetPath::from_network(&bytes)
        };
        let inside = |p: &SetPath| p == from || from.is_ancestor_of(p);
        let names = self.subtree_names(from);
        let mut renamed = Vec::with_capacity(names.len());
        for p in &names {
            renamed.push(moved_to(p)?);
        }
        let mut moved = Vec::with_capacity(names.len());
        let mut groups = Vec::new();
        for p in names {
            let e = self.raw_remove(&p).expect("listed just now");
            if let Some(t) = &e.link {
                self.unindex(t, &p);
            }
            if let Some(g) = self.links.remove(&p) {
                groups.push((p.clone(), g));
            }
            moved.push((p, e));
        }
        for ((_, e), new) in moved.iter().zip(renamed) {
            let mut e = e.clone();
            if let Some(t) = e.link.take() {
                let t = if inside(&t) { moved_to(&t)? } else { t };
                self.links.entry(t.clone()).or_default().insert(new.clone());
                e.link = Some(t);
            }
            self.raw_insert(new, e);
        }
        for (primary, names) in groups {
            let primary = moved_to(&primary)?;
            for name in names.into_iter().filter(|n| !inside(n)) {
                if let Some(l) = self.get_mut(&name) {
                    l.link = Some(primary.clone());
                    self.links
                        .entry(primary.clone())
                        .or_default()
                        .insert(name.clone());
                    self.touched.insert(name);
                }
            }
        }
        Ok(moved)
    }

    /// The names of the file `path` (itself, its primary, their links).
    fn names_of(&self, path: &SetPath) -> Vec<SetPath> {
        let primary = match self.get(path).and_then(|e| e.link.clone()) {
            Some(t) => t,
            None => path.clone(),
        };
        let mut out = vec![primary.clone()];
        out.extend(self.links.get(&primary).into_iter().flatten().cloned());
        out
    }
}

/// One op of a batch with its path checked: what the applier acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckedOp {
    Put {
        path: SetPath,
        entry: Entry,
        content: Content,
        /// The version this one replaces, if any.
        previous: Option<Entry>,
    },
    Dir {
        path: SetPath,
        entry: Entry,
    },
    Symlink {
        path: SetPath,
        entry: Entry,
    },
    Remove {
        path: SetPath,
        removed: Vec<(SetPath, Entry)>,
    },
    Forget {
        path: SetPath,
    },
    Rename {
        from: SetPath,
        to: SetPath,
        moved: Vec<(SetPath, Entry)>,
    },
    /// Only the extended attributes of a file or directory changed; `entry`
    /// is its whole committed entry now.
    Xattrs {
        path: SetPath,
        entry: Entry,
    },
    /// `path` is now a hard link of `target`; `entry` is its committed
    /// entry (the target's, with [`Entry::link`] set).
    Link {
        path: SetPath,
        target: SetPath,
        entry: Entry,
        /// What the cluster had at `path` before, if anything.
        previous: Option<Entry>,
    },
}

impl CheckedOp {
    /// The path the op acts on (a rename's source) and, for a rename, the
    /// path it moves to.
    pub fn paths(&self) -> (&SetPath, Option<&SetPath>) {
        match self {
            CheckedOp::Rename { from, to, .. } => (from, Some(to)),
            CheckedOp::Put { path, .. }
            | CheckedOp::Dir { path, .. }
            | CheckedOp::Symlink { path, .. }
            | CheckedOp::Remove { path, .. }
            | CheckedOp::Forget { path }
            | CheckedOp::Xattrs { path, .. }
            | CheckedOp::Link { path, .. } => (path, None),
        }
    }
}

/// Every set's committed tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub sets: BTreeMap<String, SetManifest>,
    /// Sets paused by `clusterctl pause`, committed like any change so a
    /// pause outlives a failover. Not in the derived form: snapshots carry
    /// it in format 4 only, so a manifest without pauses stays readable by
    /// older releases.
    #[serde(skip)]
    pub paused: BTreeMap<String, Pause>,
}

/// A paused set: the leader proposes nothing of it until it is resumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// What the administrator said (`--reason`); may be empty.
    pub reason: String,
    /// When the pause was proposed (Unix milliseconds, the leader's clock).
    pub since_ms: u64,
    /// When the leader resumes it by itself (`--for`), if ever.
    pub until_ms: Option<u64>,
    /// Who paused it: `node N` (its admin socket) or `admin NAME` (an
    /// admin certificate on the remote admin port).
    pub by: String,
}

/// Longest `Pause::reason` and `Pause::by` a committed pause may carry.
pub const PAUSE_TEXT_MAX: usize = 1024;
/// Longest set name a pause or resume may name.
pub const SET_NAME_MAX: usize = 255;

impl Pause {
    /// Why a pause of `set` cannot be committed, if it cannot.
    pub fn check(set: &str, pause: &Pause) -> Result<(), String> {
        if set.is_empty() || set.len() > SET_NAME_MAX {
            return Err(format!("a pause names a set of {} bytes", set.len()));
        }
        if pause.reason.len() > PAUSE_TEXT_MAX || pause.by.len() > PAUSE_TEXT_MAX {
            return Err(format!(
                "the pause of set {set:?} carries a reason or author over {PAUSE_TEXT_MAX} bytes"
            ));
        }
        Ok(())
    }
}

impl Manifest {
    /// Packs every set's tree ([`SetManifest::repack`]).
    pub fn repack(&mut self) {
        for set in self.sets.values_mut() {
            set.repack();
        }
    }

    /// How many paths the manifest holds, over all sets.
    pub fn path_count(&self) -> usize {
        self.sets.values().map(|s| s.entries.len()).sum()
    }

    pub fn set(&self, name: &str) -> Option<&SetManifest> {
        self.sets.get(name)
    }

    pub fn get(&self, set: &str, path: &SetPath) -> Option<&Entry> {
        self.sets.get(set)?.entries.get(path)
    }

    /// Checks every path of `batch` first (one bad path refuses the whole
    /// batch and changes nothing), then applies it at Raft `index`. Returns
    /// the checked ops for the caller to carry out on disk.
    pub fn apply(
        &mut self,
        index: u64,
        batch: &FileBatch,
    ) -> Result<Vec<CheckedOp>, ManifestError> {
        self.apply_tracked(index, batch).map(|(ops, _)| ops)
    }

    /// [`Manifest::apply`], also returning the paths whose entries changed
    /// though no op names them (hard links left as files of their own, or
    /// following their primary's move or attributes): a caller that stores
    /// entries per path stores those too.
    pub fn apply_tracked(
        &mut self,
        index: u64,
        batch: &FileBatch,
    ) -> Result<(Vec<CheckedOp>, BTreeSet<SetPath>), ManifestError> {
        let bad = |source| ManifestError::Path {
            set: batch.set.clone(),
            source,
        };
        let mut paths = Vec::with_capacity(batch.ops.len());
        for op in &batch.ops {
            let other = match op {
                FileOp::Rename { from, .. } => Some(SetPath::from_network(from).map_err(bad)?),
                FileOp::Link { target, .. } => Some(SetPath::from_network(target).map_err(bad)?),
                _ => None,
            };
            paths.push((SetPath::from_network(op.path()).map_err(bad)?, other));
        }
        let set = self.sets.entry(batch.set.clone()).or_default();
        set.totals = TotalsCache::default();
        let links = set.link_index.0.take();
        let mut scratch = Scratch::new(&mut set.entries, links);
        let checked = Self::check_ops(batch, paths, &mut scratch);
        let out = match checked {
            Ok(out) => out,
            Err(e) => {
                // The index followed the undone ops: built again next time.
                scratch.undo();
                return Err(e);
            }
        };
        let touched = std::mem::take(&mut scratch.touched);
        set.link_index.0 = Some(std::mem::take(&mut scratch.links));
        drop(scratch);
        let patch_bytes: u64 = batch
            .ops
            .iter()
            .map(|op| match op {
                FileOp::Put {
                    content: Content::Inline(p),
                    ..
                } => p.len() as u64,
                FileOp::Put {
                    content: Content::Staged { len, .. } | Content::Blob { len, .. },
                    ..
                } => *len,
                _ => 0,
            })
            .sum();
        let progress = &mut set.progress;
        progress.seq += 1;
        progress.index = index;
        progress.bytes += patch_bytes;
        progress
            .recent
            .push_back((progress.seq, batch.proposed_at_ms));
        while progress.recent.len() > RECENT_BATCHES {
            progress.recent.pop_front();
        }
        Ok((out, touched))
    }

    /// The ops of `batch` carried out on `scratch` in order, each checked;
    /// the first refusal ends it (the caller undoes what went before).
    fn check_ops(
        batch: &FileBatch,
        paths: Vec<(SetPath, Option<SetPath>)>,
        scratch: &mut Scratch<'_>,
    ) -> Result<Vec<CheckedOp>, ManifestError> {
        let bad = |source| ManifestError::Path {
            set: batch.set.clone(),
            source,
        };
        let mut out = Vec::with_capacity(batch.ops.len());
        for (op, (path, other)) in batch.ops.iter().zip(paths) {
            // Nothing may live below a committed symlink or file: followers
            // would have to write through it (which `fs::root` refuses, leaving
            // the set unable to converge), so the batch is refused whole.
            for p in std::iter::once(&path).chain(other.as_ref()) {
                let mut up = p.parent();
                while let Some(ancestor) = up {
                    if let Some(e) = scratch.get(&ancestor) {
                        let kind = match e.meta.kind {
                            EntryKind::Dir => None,
                            EntryKind::File => Some("file"),
                            EntryKind::Symlink => Some("symlink"),
                        };
                        if let Some(kind) = kind {
                            return Err(ManifestError::UnderNonDir {
                                set: batch.set.clone(),
                                path: p.clone(),
                                ancestor,
                                kind,
                            });
                        }
                    }
                    up = ancestor.parent();
                }
            }
            let checked = match op {
                FileOp::Put {
                    meta,
                    digest,
                    content,
                    ..
                } => {
                    let entry = Entry {
                        meta: meta.clone(),
                        digest: Some(*digest),
                        target: None,
                        xattrs: Vec::new(),
                        link: None,
                    };
                    let previous = scratch.insert(path.clone(), entry.clone());
                    CheckedOp::Put {
                        path,
                        entry,
                        content: content.clone(),
                        previous,
                    }
                }
                FileOp::Dir { meta, .. } => {
                    let entry = Entry {
                        meta: meta.clone(),
                        digest: None,
                        target: None,
                        xattrs: Vec::new(),
                        link: None,
                    };
                    scratch.insert(path.clone(), entry.clone());
                    CheckedOp::Dir { path, entry }
                }
                FileOp::Symlink { target, meta, .. } => {
                    // A symlink replaces whatever was there, subtree included.
                    scratch.remove_subtree(&path);
                    let entry = Entry {
                        meta: meta.clone(),
                        digest: None,
                        target: Some(target.clone()),
                        xattrs: Vec::new(),
                        link: None,
                    };
                    scratch.insert(path.clone(), entry.clone());
                    CheckedOp::Symlink { path, entry }
                }
                FileOp::Remove { .. } => {
                    let removed = scratch.remove_subtree(&path);
                    CheckedOp::Remove { path, removed }
                }
                FileOp::Forget { .. } => {
                    scratch.remove_subtree(&path);
                    CheckedOp::Forget { path }
                }
                FileOp::Rename { .. } => {
                    let from = other.expect("rename carries a source");
                    if from == path || from.is_ancestor_of(&path) {
                        return Err(ManifestError::Rename {
                            set: batch.set.clone(),
                            from,
                            to: path,
                            why: "the destination lies inside the source",
                        });
                    }
                    scratch.remove_subtree(&path);
                    let moved = scratch.rename(&from, &path).map_err(bad)?;
                    CheckedOp::Rename {
                        from,
                        to: path,
                        moved,
                    }
                }
                FileOp::Xattrs { xattrs, .. } => {
                    let refuse = |why: String| ManifestError::Xattrs {
                        set: batch.set.clone(),
                        path: path.clone(),
                        why,
                    };
                    check_xattrs(xattrs).map_err(refuse)?;
                    let Some(entry) = scratch
                        .get_mut(&path)
                        .filter(|e| e.meta.kind != EntryKind::Symlink)
                    else {
                        return Err(refuse("the cluster has no file or directory there".into()));
                    };
                    entry.xattrs = xattrs.clone();
                    let entry = entry.clone();
                    // The names of a hard-linked file share one inode, so
                    // one set of attributes.
                    if entry.meta.kind == EntryKind::File {
                        for name in scratch.names_of(&path) {
                            if name != path {
                                if let Some(e) = scratch.get_mut(&name) {
                                    e.xattrs = xattrs.clone();
                                    scratch.touched.insert(name);
                                }
                            }
                        }
                    }
                    // Right after the op that wrote the path: part of it, so
                    // the follower writes content and xattrs as one version.
                    if let Some(
                        CheckedOp::Put { path: p, entry, .. } | CheckedOp::Dir { path: p, entry },
                    ) = out.last_mut()
                    {
                        if *p == path {
                            entry.xattrs = xattrs.clone();
                            continue;
                        }
                    }
                    CheckedOp::Xattrs { path, entry }
                }
                FileOp::Link { .. } => {
                    let target = other.expect("a link carries a target");
                    let refuse = |why: &'static str| ManifestError::Link {
                        set: batch.set.clone(),
                        path: path.clone(),
                        target: target.clone(),
                        why,
                    };
                    if target == path {
                        return Err(refuse("a name cannot be a link of itself"));
                    }
                    if path.is_ancestor_of(&target) {
                        return Err(refuse("the target lies under the link's name"));
                    }
                    let Some(t) = scratch
                        .get(&target)
                        .filter(|e| e.meta.kind == EntryKind::File && e.link.is_none())
                    else {
                        return Err(refuse(
                            "the cluster has no regular file there that is not a link itself",
                        ));
                    };
                    let entry = Entry {
                        link: Some(target.clone()),
                        ..t.clone()
                    };
                    // The link replaces whatever was there, subtree included.
                    let previous = scratch
                        .remove_subtree(&path)
                        .into_iter()
                        .find(|(p, _)| *p == path)
                        .map(|(_, e)| e);
                    scratch.insert(path.clone(), entry.clone());
                    CheckedOp::Link {
                        path,
                        target,
                        entry,
                        previous,
                    }
                }
            };
            out.push(checked);
        }
        Ok(out)
    }
}

impl Serialize for SetPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.as_bytes())
    }
}

impl<'de> Deserialize<'de> for SetPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SetPath, D::Error> {
        with_bytes(d, "a path", |v| {
            SetPath::from_network(v).map_err(|e| e.to_string())
        })
    }
}

/// Reads a byte string and hands it to `take`, borrowed from the input or
/// through the deserializer's scratch buffer: a snapshot decoded from a
/// stream has no input to borrow from (`deserialize_byte_buf`, which
/// postcard writes exactly as `deserialize_bytes`).
fn with_bytes<'de, D: serde::Deserializer<'de>, T>(
    d: D,
    what: &'static str,
    take: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<T, D::Error> {
    struct Bytes<F>(&'static str, F);
    impl<'de, T, F: FnOnce(&[u8]) -> Result<T, String>> serde::de::Visitor<'de> for Bytes<F> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(self.0)
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<T, E> {
            (self.1)(v).map_err(E::custom)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            self.visit_bytes(v.as_bytes())
        }
    }
    d.deserialize_byte_buf(Bytes(what, take))
}

pub fn encode_batch(batch: &FileBatch) -> Vec<u8> {
    postcard::to_allocvec(batch).expect("a batch always serializes")
}

pub fn decode_batch(bytes: &[u8]) -> Result<FileBatch, ManifestError> {
    postcard::from_bytes(bytes).map_err(|source| ManifestError::Decode {
        what: "file batch",
        source,
    })
}

pub fn encode_chunk(chunk: &Chunk) -> Vec<u8> {
    postcard::to_allocvec(chunk).expect("a chunk always serializes")
}

pub fn decode_chunk(bytes: &[u8]) -> Result<Chunk, ManifestError> {
    postcard::from_bytes(bytes).map_err(|source| ManifestError::Decode {
        what: "chunk",
        source,
    })
}

/// A file version whose patch a staged upload holds, as the leader lists it
/// in the upload's last piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedVersion {
    /// Where its patch starts in the upload.
    pub offset: u64,
    /// The patch's length.
    pub len: u64,
    /// The content the patch makes.
    pub digest: FileDigest,
    /// The version's metadata, given to the finished file ahead of its
    /// fsync when this node can set it.
    pub meta: Option<Meta>,
}

#[cfg(test)]
mod tests;
