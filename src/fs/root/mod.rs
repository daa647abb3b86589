//! Every write clusterd makes to a sync set, and to `data_dir/quarantine`,
//! goes through this module: a [`Root`] is an open directory handle of one
//! root, and every operation walks from that handle (or, within a batch,
//! from a directory handle the batch already walked to), one component at a
//! time, with `openat(O_DIRECTORY | O_NOFOLLOW)`, then acts on the last
//! component with an `*at` call that never follows it either.
//!
//! # Invariants
//!
//! * **Inside the root** (PRODUCT.md invariant 3). No write, rename, mkdir,
//!   chmod, chown or delete made through a [`Root`] ever lands outside the
//!   directory it was opened on. A symlink planted anywhere inside the root
//!   (`/etc/tacacs+/evil -> /etc`) is never followed: as a parent component
//!   it is an error, as the last component it is the object acted on (it is
//!   replaced, removed or moved itself, never its target). Components are
//!   checked again here (no empty, `.`, `..`, `/` or NUL) even though the
//!   path policy module has already checked them: this is the last line.
//! * **Atomic files** (invariant 2). [`Root::replace_file`] writes a
//!   temporary file in the same directory (created `O_EXCL | O_NOFOLLOW`,
//!   mode 0600 while it holds data but not yet its final owner), sets owner,
//!   mode and mtime, fsyncs it, re-reads it and checks its blake3 hash against
//!   the committed one, renames it over the old name and fsyncs the directory.
//!   A crash at any instant leaves the old version or the new one; on any
//!   error the temporary file is removed and the old version is untouched.
//! * **No silent loss** (invariant 4) is decided by the caller; this module
//!   supplies [`Root::move_aside`], which moves the local version into the
//!   quarantine root keeping content, mode, owner and mtime.
//!
//! # What a caller must know
//!
//! * A single-file set (`path = "/etc/aliases"`) is handled by opening the
//!   [`Root`] on the file's parent directory and always passing the one
//!   component naming the file; the caller must never pass another name.
//! * Temporary names start with [`TEMP_PREFIX`]; a crash can leave one
//!   behind. Scanners skip them ([`is_temp_name`]) and may [`Root::remove`]
//!   them.
//! * Owners: as root any owner and group are set. As any other user `fchown`
//!   is only called when the owner differs from the wanted one; a new file is
//!   already owned by the caller, so a [`FileMeta`] naming the current user
//!   needs no privilege, and any other owner is an error (`EPERM`), never
//!   silently dropped.
//! * A directory's mtime changes whenever an entry is added or removed in it,
//!   so [`Root::make_dir`] / [`Root::set_meta`] of a directory belongs after
//!   its children in a batch.
//! * Recursion ([`Root::remove`] of a tree, cross-filesystem
//!   [`Root::move_aside`] of a tree) stops with an error past [`MAX_DEPTH`]
//!   levels; it holds one descriptor per level.
//! * Extended attributes ([`Root::read_xattrs`], [`Root::set_xattrs`],
//!   [`Root::replace_file_guarded`]) are read and written through the
//!   entry's own descriptor (`flistxattr`/`fgetxattr`/`fsetxattr`), never by
//!   path, so a symlink is never followed; symlinks themselves have none
//!   (Linux refuses `user.*` on them). Only the names
//!   [`crate::core::manifest::is_replicated_xattr`] accepts are read, set or
//!   removed; every other attribute (SELinux labels included) is left as it
//!   is. A filesystem without xattr support (`ENOTSUP`) is not an error:
//!   the attributes are skipped and [`Root::xattrs_unsupported_notice`]
//!   tells the caller once.
//! * Limit of the guarantee: the walk holds a descriptor for each directory
//!   it passes, so a directory renamed away mid-walk by someone with write
//!   access to the set is acted on where it now is. That needs a local user
//!   who can already write the set's files; nothing that arrives from the
//!   network can cause it. While a batch holds directories
//!   ([`Root::hold_dirs`], see `held.rs`) the same is true for as long as
//!   the batch takes: its walks start from the directories it already
//!   opened.

use std::ffi::{CStr, OsStr, OsString};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use rustix::fs::{
    self as rfs, AtFlags, Dir, FileType, Gid, Mode, OFlags, RenameFlags, Stat, Timespec,
    Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;
use thiserror::Error;

/// Prefix of every temporary name this module creates, followed by 16 random
/// hex digits. Hidden (leading dot) so editors and globs mostly ignore it.
pub const TEMP_PREFIX: &str = ".clusterd-tmp-";

/// Deepest directory nesting that recursive operations descend into.
pub const MAX_DEPTH: usize = 1024;

/// How often [`Root::read_file`] re-reads a file that changed while it was
/// being read before giving up: a torn version must never be returned.
const READ_ATTEMPTS: usize = 5;

/// Chunk size for reading back and copying file content.
const CHUNK: usize = 64 * 1024;

/// Permission bits kept from [`FileMeta::mode`]: rwx for all three classes
/// plus setuid, setgid and sticky.
const PERM_MASK: u32 = 0o7777;

/// Buffer for one xattr name list or value: Linux's `XATTR_LIST_MAX` and
/// `XATTR_SIZE_MAX`, so a read never fails for lack of room.
const XATTR_BUF: usize = 64 * 1024;

/// Extended attributes as read and set here: `(name, value)`, sorted by name.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// [`Root::xattr_notice`] states: nothing seen, `ENOTSUP` seen, reported.
const XATTR_OK: u8 = 0;
const XATTR_UNSUPPORTED: u8 = 1;
const XATTR_REPORTED: u8 = 2;

/// Mode of directories this module creates on its own (missing parents in
/// the quarantine root, directories being filled by a cross-filesystem move):
/// private until their real mode is set.
const PRIVATE_DIR_MODE: u32 = 0o700;

/// Whether `name` is one of this module's temporary names.
pub fn is_temp_name(name: &[u8]) -> bool {
    name.starts_with(TEMP_PREFIX.as_bytes())
}

/// One component of a relative path. Implemented for the usual byte and
/// string types so callers pass `&[&[u8]]`, `&[&OsStr]`, `&[&str]`,
/// `&[Vec<u8>]` or `&[OsString]` alike.
pub trait AsComponent {
    /// The component's raw bytes.
    fn component_bytes(&self) -> &[u8];
}

impl AsComponent for [u8] {
    fn component_bytes(&self) -> &[u8] {
        self
    }
}
impl AsComponent for Vec<u8> {
    fn component_bytes(&self) -> &[u8] {
        self
    }
}
impl AsComponent for str {
    fn component_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}
impl AsComponent for String {
    fn component_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}
impl AsComponent for OsStr {
    fn component_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}
impl AsComponent for OsString {
    fn component_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}
impl<T: AsComponent + ?Sized> AsComponent for &T {
    fn component_bytes(&self) -> &[u8] {
        (**self).component_bytes()
    }
}

/// Entries of a directory as [`Root::list_dir`] returns them: raw names and
/// kinds, sorted by name.
pub type DirListing = Vec<(Vec<u8>, Kind)>;

/// What a directory entry is. Special files (FIFOs, sockets, devices) are
/// [`Kind::Other`]: they can be stat'ed, listed and removed, never created,
/// read or copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (never followed).
    Symlink,
    /// A FIFO, socket or device node.
    Other,
}

impl Kind {
    fn from_file_type(t: FileType) -> Kind {
        match t {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        }
    }

    /// "a regular file", "a directory", ... for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::File => "a regular file",
            Kind::Dir => "a directory",
            Kind::Symlink => "a symlink",
            Kind::Other => "a special file",
        }
    }
}

/// Metadata of one entry, as `lstat` reports it, and as the setters take it.
///
/// Setters use `kind`, `mode`, `uid`, `gid` and `mtime_ns`; `len`, `ino`,
/// `dev` and `nlink` are only reported (they let a caller notice a rotated
/// log, a move across filesystems or a hard-linked file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileMeta {
    /// What the entry is.
    pub kind: Kind,
    /// Permission bits including setuid (04000), setgid (02000) and sticky
    /// (01000). File-type bits are accepted and ignored by setters.
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Modification time in nanoseconds since the Unix epoch (may be
    /// negative).
    pub mtime_ns: i128,
    /// Size in bytes (a symlink's is the length of its target).
    pub len: u64,
    /// Inode number.
    pub ino: u64,
    /// Device of the filesystem holding it.
    pub dev: u64,
    /// Number of hard links (names) of the inode.
    pub nlink: u64,
}

impl FileMeta {
    /// Metadata to apply: `len`, `ino`, `dev` and `nlink` are zero (setters
    /// ignore them).
    pub fn new(kind: Kind, mode: u32, uid: u32, gid: u32, mtime_ns: i128) -> FileMeta {
        FileMeta {
            kind,
            mode,
            uid,
            gid,
            mtime_ns,
            len: 0,
            ino: 0,
            dev: 0,
            nlink: 0,
        }
    }

    pub(crate) fn from_stat(st: &Stat) -> FileMeta {
        FileMeta {
            kind: Kind::from_file_type(FileType::from_raw_mode(st.st_mode)),
            mode: st.st_mode & PERM_MASK,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime_ns: stat_mtime_ns(st),
            len: u64::try_from(st.st_size).unwrap_or(0),
            ino: st.st_ino,
            dev: st.st_dev,
            nlink: u64::from(st.st_nlink),
        }
    }
}

/// A directory of a [`Root`], resolved once: its entries are listed and
/// stat'ed relative to it, so a walk of a tree costs one `fstatat` per
/// entry where [`Root::stat`] would resolve every parent again for each.
#[derive(Debug)]
pub struct OpenDir<'r> {
    root: &'r Root,
    fd: Arc<OwnedFd>,
    /// Its path relative to the root, for messages.
    path: String,
}

impl OpenDir<'_> {
    /// Names and kinds, sorted by name, temporary names included.
    pub fn list(&self) -> Result<DirListing, FsError> {
        let err = |e: Errno| self.root.io_err("list directory", self.path.clone(), e);
        // A fresh open file description: `fd` may be the root handle or one
        // a batch keeps, shared with other callers, and reading through it
        // would move the directory offset under every later listing.
        let mut dir = Dir::read_from(&self.fd).map_err(err)?;
        let mut out = Vec::new();
        while let Some(ent) = dir.read() {
            let ent = ent.map_err(err)?;
            if is_dot(ent.file_name()) {
                continue;
            }
            let name = ent.file_name().to_bytes().to_vec();
            let kind = match ent.file_type() {
                FileType::Unknown => match self.stat(&name)? {
                    Some(meta) => meta.kind,
                    None => continue,
                },
                t => Kind::from_file_type(t),
            };
            out.push((name, kind));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// `lstat` of the entry `name` (a symlink is described, not followed);
    /// `None` when it does not exist.
    pub fn stat(&self, name: &[u8]) -> Result<Option<FileMeta>, FsError> {
        self.root.check(&[name], false)?;
        match rfs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileMeta::from_stat(&st))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(self.root.io_err("stat", join_shown(&self.path, name), e)),
        }
    }
}

fn stat_mtime_ns(st: &Stat) -> i128 {
    i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec)
}

fn stat_kind(st: &Stat) -> Kind {
    Kind::from_file_type(FileType::from_raw_mode(st.st_mode))
}

/// Everything that can go wrong; each displays as one sentence naming the
/// root, the path relative to it and, for system call failures, the errno
/// text.
#[derive(Debug, Error)]
pub enum FsError {
    /// A path component was refused before any system call was made.
    #[error("sync root {root}: refused path \"{path}\": {reason}")]
    BadPath {
        /// The root's path.
        root: String,
        /// The relative path, components joined by '/'.
        path: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A system call failed.
    #[error("sync root {root}: cannot {op} {path}: {error}")]
    Io {
        /// The root's path.
        root: String,
        /// The relative path (for a move, "source -> destination").
        path: String,
        /// What was being done.
        op: &'static str,
        /// The OS error (its text carries the errno).
        error: io::Error,
    },
    /// An entry is not of the kind the operation needs (typically a symlink
    /// where a directory or regular file is needed); it was left alone.
    #[error("sync root {root}: {path} is {found} where {expected} is needed; it was neither followed nor changed")]
    WrongKind {
        /// The root's path.
        root: String,
        /// The relative path of the offending entry.
        path: String,
        /// What it is.
        found: &'static str,
        /// What was needed.
        expected: &'static str,
    },
    /// The written temporary file did not hash to the committed hash.
    #[error("sync root {root}: {path} was not replaced: the written temporary file has blake3 {actual}, expected {expected}; the old version is untouched")]
    HashMismatch {
        /// The root's path.
        root: String,
        /// The relative path.
        path: String,
        /// Hex of the expected hash.
        expected: String,
        /// Hex of the hash read back.
        actual: String,
    },
    /// A file is larger than the caller's limit.
    #[error("sync root {root}: {path} is larger than the limit of {max} bytes")]
    TooLarge {
        /// The root's path.
        root: String,
        /// The relative path.
        path: String,
        /// The limit.
        max: u64,
    },
    /// A file kept changing while it was being read.
    #[error("sync root {root}: {path} changed during each of {attempts} reads; try again later")]
    Unstable {
        /// The root's path.
        root: String,
        /// The relative path.
        path: String,
        /// How many reads were tried.
        attempts: usize,
    },
    /// The metadata or symlink target passed in cannot be applied.
    #[error("sync root {root}: cannot apply to {path}: {reason}")]
    BadMeta {
        /// The root's path.
        root: String,
        /// The relative path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A recursive operation went deeper than [`MAX_DEPTH`].
    #[error("sync root {root}: {path} is nested deeper than {max} directories")]
    TooDeep {
        /// The root's path.
        root: String,
        /// The relative path where it stopped.
        path: String,
        /// [`MAX_DEPTH`].
        max: usize,
    },
}

impl FsError {
    /// The errno of a failed system call, if that is what this is.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            FsError::Io { error, .. } => error.raw_os_error(),
            _ => None,
        }
    }
}

/// Renders components for messages: lossy UTF-8, control characters escaped
/// so a hostile name cannot forge log lines.
fn show(comps: &[&[u8]]) -> String {
    let mut out = String::new();
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        push_shown(&mut out, c);
    }
    out
}

fn push_shown(out: &mut String, bytes: &[u8]) {
    for ch in String::from_utf8_lossy(bytes).chars() {
        if ch.is_control() || ch == '"' || ch == '\\' {
            let _ = write!(out, "{}", ch.escape_default());
        } else {
            out.push(ch);
        }
    }
}

fn join_shown(parent: &str, name: &[u8]) -> String {
    let mut out = String::with_capacity(parent.len() + name.len() + 1);
    out.push_str(parent);
    if !parent.is_empty() {
        out.push('/');
    }
    push_shown(&mut out, name);
    out
}

/// Removes a temporary entry on drop unless disarmed, so every early return
/// (`?`) on the way to the rename leaves no temporary file behind.
/// What a guarded replace may displace without asking the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Whatever is there (a plain rename).
    Anything,
    /// Nothing: the caller saw no entry (or moved it away).
    Absent,
    /// The regular file the caller checked, by identity and size/mtime.
    File {
        ino: u64,
        dev: u64,
        len: u64,
        mtime_ns: i128,
    },
}

impl Expect {
    /// The very regular file `m` describes.
    pub fn file(m: &FileMeta) -> Expect {
        Expect::File {
            ino: m.ino,
            dev: m.dev,
            len: m.len,
            mtime_ns: m.mtime_ns,
        }
    }
}

/// The outcome of [`Root::replace_file_guarded`].
/// A verified new version under its temporary name, not yet durable nor
/// swapped in: see [`Root::prepare_file`].
#[derive(Debug)]
pub struct Prepared {
    comps: Vec<Vec<u8>>,
    path: String,
    tmp: String,
    /// The temporary file's stat when it was verified.
    ours: Stat,
}

impl Prepared {
    /// The version's metadata, from its own descriptor.
    pub fn meta(&self) -> FileMeta {
        FileMeta::from_stat(&self.ours)
    }
}

#[derive(Debug)]
pub struct Replaced {
    /// The new version's metadata, from its own descriptor.
    pub meta: FileMeta,
    /// An entry the rename displaced that was not the one expected, left at
    /// these components (a temporary name in the same directory).
    pub displaced: Option<Vec<Vec<u8>>>,
}

struct TempGuard<'a> {
    dir: BorrowedFd<'a>,
    name: String,
    armed: bool,
}

impl TempGuard<'_> {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: the error that got us here is the one to report.
            let _ = rfs::unlinkat(self.dir, self.name.as_str(), AtFlags::empty());
        }
    }
}

/// `meta`'s mtime as the kernel takes it, or why `meta` cannot be set
/// (an owner of -1 would mean "leave unchanged" to `fchown`).
fn settable_mtime(meta: &FileMeta) -> Result<Timespec, String> {
    if meta.uid == u32::MAX || meta.gid == u32::MAX {
        return Err("uid or gid 4294967295 (-1) is not an owner".to_string());
    }
    to_timespec(meta.mtime_ns).ok_or_else(|| format!("mtime {} ns is out of range", meta.mtime_ns))
}

/// Sets owner, then mode (chown clears setuid/setgid, so the mode must
/// come after it), then mtime (last, since nothing after it may touch the
/// inode's content). Skips what already matches; returns whether anything
/// changed, or what failed.
fn set_meta(
    fd: BorrowedFd<'_>,
    meta: &FileMeta,
    mtime: Timespec,
) -> Result<bool, (&'static str, Errno)> {
    let st = rfs::fstat(fd).map_err(|e| ("stat", e))?;
    let mut changed = false;
    if st.st_uid != meta.uid || st.st_gid != meta.gid {
        rfs::fchown(
            fd,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(|e| ("set owner and group of", e))?;
        changed = true;
    }
    let want_mode = meta.mode & PERM_MASK;
    if changed || st.st_mode & PERM_MASK != want_mode {
        rfs::fchmod(fd, Mode::from_raw_mode(want_mode)).map_err(|e| ("set mode of", e))?;
        changed = true;
    }
    if stat_mtime_ns(&st) != meta.mtime_ns {
        let times = Timestamps {
            last_access: omit_atime(),
            last_modification: mtime,
        };
        rfs::futimens(fd, &times).map_err(|e| ("set mtime of", e))?;
        changed = true;
    }
    Ok(changed)
}

/// Gives `file`, a new version staged outside any root (in `data_dir`), the
/// owner, mode and mtime of `meta` ahead of its fsync, so that applying it
/// later changes nothing but its name (see [`Root::adopt_file_guarded`]).
pub fn set_staged_meta(file: &File, meta: &FileMeta) -> io::Result<()> {
    let mtime = settable_mtime(meta).map_err(io::Error::other)?;
    set_meta(file.as_fd(), meta, mtime)
        .map(|_| ())
        .map_err(|(op, e)| io::Error::other(format!("cannot {op} the staged file: {e}")))
}

/// Whether new files in `dir` get something from it that a file made
/// elsewhere and linked in would lack: a security label (SELinux, Smack:
/// set by policy when a file is created) or a default ACL.
fn labels_new_files(dir: &OwnedFd) -> bool {
    [
        "security.selinux",
        "security.SMACK64",
        "system.posix_acl_default",
    ]
    .iter()
    .any(|attr| rfs::fgetxattr(dir, *attr, &mut [0u8; 0][..]).is_ok())
}

/// This process's mark in its temporary names: a name with another mark
/// (or none) was left by an earlier run, by a crash, and nothing will ever
/// rename it in.
fn run_mark() -> u32 {
    static MARK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MARK.get_or_init(rand::random::<u32>)
}

fn temp_name() -> String {
    format!(
        "{TEMP_PREFIX}{:08x}-{:016x}",
        run_mark(),
        rand::random::<u64>()
    )
}

/// Whether `name` is a temporary name an earlier run of this program left
/// behind (a crash between writing and renaming): safe to remove.
pub fn is_stale_temp_name(name: &[u8]) -> bool {
    let Some(rest) = name.strip_prefix(TEMP_PREFIX.as_bytes()) else {
        return false;
    };
    rest.get(..9) != Some(format!("{:08x}-", run_mark()).as_bytes())
}

/// Flags for stepping into a directory: never through a symlink.
fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Flags for opening an existing entry to read or to change its metadata:
/// never through a symlink, and non-blocking so a FIFO planted in the set
/// cannot hang the node (its kind is checked right after).
fn read_flags() -> OFlags {
    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY
}

fn to_timespec(mtime_ns: i128) -> Option<Timespec> {
    let secs = i64::try_from(mtime_ns.div_euclid(1_000_000_000)).ok()?;
    let nsecs = i64::try_from(mtime_ns.rem_euclid(1_000_000_000)).ok()?;
    Some(Timespec {
        tv_sec: secs,
        // `Nsecs` is `i64` here but `c_long` on some targets.
        #[allow(clippy::useless_conversion)]
        tv_nsec: nsecs.try_into().ok()?,
    })
}

fn omit_atime() -> Timespec {
    Timespec {
        tv_sec: 0,
        tv_nsec: rfs::UTIME_OMIT,
    }
}

/// An open sync root (or quarantine root). All paths are relative to it.
#[derive(Debug)]
pub struct Root {
    /// Shared with [`Root::walk`]'s callers: a walk of no component returns
    /// the root itself without duplicating it.
    fd: Arc<OwnedFd>,
    path: PathBuf,
    /// Directory handles kept for a batch ([`Root::hold_dirs`]).
    held: held::DirCache,
    /// Whether the filesystem refused extended attributes (`ENOTSUP`), and
    /// whether the caller was told.
    xattr_notice: AtomicU8,
}

impl Root {
    /// Opens `path`, which must be a directory (a symlink as the last
    /// component is refused: the configured path is the root itself, not
    /// whatever it may be pointed elsewhere later).
    pub fn open(path: &Path) -> Result<Root, FsError> {
        let flags = dir_flags();
        match rfs::open(path, flags, Mode::empty()) {
            Ok(fd) => Ok(Root {
                fd: Arc::new(fd),
                path: path.to_path_buf(),
                held: Default::default(),
                xattr_notice: AtomicU8::new(XATTR_OK),
            }),
            Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
                let found = match rfs::lstat(path) {
                    Ok(st) => stat_kind(&st).describe(),
                    Err(_) => "not a directory",
                };
                if found == Kind::Dir.describe() {
                    // A parent of the path is the problem; report the errno.
                    return Err(FsError::Io {
                        root: path.display().to_string(),
                        path: ".".into(),
                        op: "open root directory",
                        error: e.into(),
                    });
                }
                Err(FsError::WrongKind {
                    root: path.display().to_string(),
                    path: ".".into(),
                    found,
                    expected: "a directory",
                })
            }
            Err(e) => Err(FsError::Io {
                root: path.display().to_string(),
                path: ".".into(),
                op: "open root directory",
                error: e.into(),
            }),
        }
    }

    /// The path the root was opened at (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn root_str(&self) -> String {
        self.path.display().to_string()
    }

    fn io_err(&self, op: &'static str, path: String, e: impl Into<io::Error>) -> FsError {
        FsError::Io {
            root: self.root_str(),
            path,
            op,
            error: e.into(),
        }
    }

    fn kind_err(&self, path: String, found: Kind, expected: &'static str) -> FsError {
        FsError::WrongKind {
            root: self.root_str(),
            path,
            found: found.describe(),
            expected,
        }
    }

    fn meta_err(&self, path: String, reason: impl Into<String>) -> FsError {
        FsError::BadMeta {
            root: self.root_str(),
            path,
            reason: reason.into(),
        }
    }

    /// Defense in depth: the path policy module has checked these already,
    /// but nothing reaches a system call from here without this check.
    fn check<'c, C: AsComponent>(
        &self,
        comps: &'c [C],
        allow_empty: bool,
    ) -> Result<Vec<&'c [u8]>, FsError> {
        let parts: Vec<&[u8]> = comps.iter().map(|c| c.component_bytes()).collect();
        let bad = |reason| FsError::BadPath {
            root: self.root_str(),
            path: show(&parts),
            reason,
        };
        if parts.is_empty() && !allow_empty {
            return Err(bad("the path is empty"));
        }
        for p in &parts {
            if p.is_empty() {
                return Err(bad("a component is empty"));
            }
            if *p == b"." || *p == b".." {
                return Err(bad("a component is \".\" or \"..\""));
            }
            if p.contains(&b'/') {
                return Err(bad("a component contains '/'"));
            }
            if p.contains(&0) {
                return Err(bad("a component contains a NUL byte"));
            }
        }
        Ok(parts)
    }

    /// Opens the directory reached by `dirs` from the root, one component
    /// at a time with `O_DIRECTORY | O_NOFOLLOW`: a symlink or a
    /// non-directory on the way is an error, never followed. Returns `None`
    /// when a component does not exist, unless `create` gives a mode to
    /// create missing directories with. While a batch holds directories
    /// ([`Root::hold_dirs`]) the walk starts from the nearest one it kept.
    fn walk(&self, dirs: &[&[u8]], create: Option<u32>) -> Result<Option<Arc<OwnedFd>>, FsError> {
        let (nearest, generation) = self.held.nearest(dirs);
        let (start, mut cur) = nearest.unwrap_or_else(|| (0, self.fd.clone()));
        if start == dirs.len() {
            return Ok(Some(cur));
        }
        for (i, name) in dirs.iter().enumerate().skip(start) {
            let here = || show(&dirs[..=i]);
            let opened = match rfs::openat(&*cur, *name, dir_flags(), Mode::empty()) {
                Err(Errno::NOENT) => match create {
                    None => return Ok(None),
                    Some(mode) => {
                        match rfs::mkdirat(&*cur, *name, Mode::from_raw_mode(mode)) {
                            // EEXIST: someone else created it meanwhile; the
                            // open below still refuses anything but a real
                            // directory.
                            Ok(()) | Err(Errno::EXIST) => {}
                            Err(e) => return Err(self.io_err("create directory", here(), e)),
                        }
                        // The new entry must survive a crash before anything
                        // is moved into it.
                        rfs::fsync(&*cur)
                            .map_err(|e| self.io_err("fsync directory of", here(), e))?;
                        rfs::openat(&*cur, *name, dir_flags(), Mode::empty())
                    }
                },
                other => other,
            };
            cur = match opened {
                Ok(fd) => Arc::new(fd),
                Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
                    return Err(self.not_a_dir(&cur, name, here(), e));
                }
                Err(e) => return Err(self.io_err("open directory", here(), e)),
            };
        }
        self.held.keep(dirs, &cur, generation);
        Ok(Some(cur))
    }

    /// Names what sits where a directory was needed (lstat, never followed).
    fn not_a_dir(&self, dir: &OwnedFd, name: &[u8], path: String, e: Errno) -> FsError {
        match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if stat_kind(&st) != Kind::Dir => {
                self.kind_err(path, stat_kind(&st), "a directory")
            }
            _ => self.io_err("open directory", path, e),
        }
    }

    /// Walks the parent components of `comps`; returns the parent's handle
    /// and the leaf, or `None` when a parent does not exist.
    fn open_parent<'c>(
        &self,
        comps: &[&'c [u8]],
        create: Option<u32>,
    ) -> Result<Option<(Arc<OwnedFd>, &'c [u8])>, FsError> {
        let (leaf, dirs) = comps
            .split_last()
            .expect("check() refuses empty paths for leaf operations");
        Ok(self.walk(dirs, create)?.map(|fd| (fd, *leaf)))
    }

    /// Like [`Root::open_parent`], but a missing parent is an error.
    fn require_parent<'c>(&self, comps: &[&'c [u8]]) -> Result<(Arc<OwnedFd>, &'c [u8]), FsError> {
        self.open_parent(comps, None)?
            .ok_or_else(|| self.io_err("open the parent directory of", show(comps), Errno::NOENT))
    }

    fn lstat_at(&self, dir: impl AsFd, leaf: &[u8], path: &str) -> Result<Option<Stat>, FsError> {
        match rfs::statat(dir, leaf, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(self.io_err("stat", path.to_string(), e)),
        }
    }

    fn check_meta(&self, meta: &FileMeta, path: &str) -> Result<Timespec, FsError> {
        settable_mtime(meta).map_err(|why| self.meta_err(path.to_string(), why))
    }

    /// [`set_meta`] with this root's checks and errors.
    fn apply_meta(&self, fd: BorrowedFd<'_>, meta: &FileMeta, path: &str) -> Result<bool, FsError> {
        let mtime = self.check_meta(meta, path)?;
        set_meta(fd, meta, mtime).map_err(|(op, e)| self.io_err(op, path.to_string(), e))
    }

    /// Creates a new temporary regular file in `dir`, mode 0600, `O_EXCL`
    /// so an existing entry (a planted symlink included) is never opened.
    fn create_temp(&self, dir: &OwnedFd, path: &str) -> Result<(File, String), FsError> {
        let flags =
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut last = Errno::EXIST;
        for _ in 0..8 {
            let name = temp_name();
            match rfs::openat(dir, name.as_str(), flags, Mode::from_raw_mode(0o600)) {
                Ok(fd) => return Ok((File::from(fd), name)),
                Err(Errno::EXIST) => last = Errno::EXIST,
                Err(e) => {
                    return Err(self.io_err("create a temporary file for", path.to_string(), e))
                }
            }
        }
        Err(self.io_err("create a temporary file for", path.to_string(), last))
    }

    /// Reads a regular file of at most `max_len` bytes with its metadata.
    /// `None` when it (or a parent) does not exist; an error when it is a
    /// symlink, a directory or a special file. A file that changes while it
    /// is read is read again, so the content returned is one version of it.
    pub fn read_file<C: AsComponent>(
        &self,
        comps: &[C],
        max_len: u64,
    ) -> Result<Option<(Vec<u8>, FileMeta)>, FsError> {
        let comps = self.check(comps, false)?;
        let path = show(&comps);
        let Some((dir, leaf)) = self.open_parent(&comps, None)? else {
            return Ok(None);
        };
        let file = match self.open_existing(&dir, leaf, &path, Kind::File)? {
            Some(f) => File::from(f),
            None => return Ok(None),
        };
        let too_large = || FsError::TooLarge {
            root: self.root_str(),
            path: path.clone(),
            max: max_len,
        };
        let fstat = |f: &File| rfs::fstat(f).map_err(|e| self.io_err("stat", path.clone(), e));
        for _ in 0..READ_ATTEMPTS {
            let before = fstat(&file)?;
            let size = u64::try_from(before.st_size).unwrap_or(0);
            if size > max_len {
                return Err(too_large());
            }
            let data = read_capped(&file, max_len.saturating_add(1), size)
                .map_err(|e| self.io_err("read", path.clone(), e))?;
            if data.len() as u64 > max_len {
                return Err(too_large());
            }
            let after = fstat(&file)?;
            let unchanged = stat_mtime_ns(&before) == stat_mtime_ns(&after)
                && before.st_ctime == after.st_ctime
                && before.st_ctime_nsec == after.st_ctime_nsec
                && before.st_size == after.st_size
                && data.len() as u64 == u64::try_from(after.st_size).unwrap_or(0);
            if unchanged {
                return Ok(Some((data, FileMeta::from_stat(&after))));
            }
        }
        Err(FsError::Unstable {
            root: self.root_str(),
            path,
            attempts: READ_ATTEMPTS,
        })
    }

    /// Fsyncs the directory at `comps` (the root itself when empty), so the
    /// renames made in it are durable. Absent: nothing to do.
    /// Makes everything written to this root's filesystem so far durable
    /// (`syncfs`): one journal commit for a whole batch of prepared files
    /// ([`Root::prepare_file`]), or for the directory entries of many
    /// directories.
    pub fn sync_filesystem(&self) -> Result<(), FsError> {
        rfs::syncfs(&self.fd).map_err(|e| self.io_err("syncfs the filesystem of", ".".into(), e))
    }

    pub fn sync_dir<C: AsComponent>(&self, comps: &[C]) -> Result<(), FsError> {
        if comps.is_empty() {
            return rfs::fsync(&self.fd).map_err(|e| self.io_err("fsync", ".".into(), e));
        }
        let comps = self.check(comps, false)?;
        let path = show(&comps);
        let Some((dir, leaf)) = self.open_parent(&comps, None)? else {
            return Ok(());
        };
        let Some(fd) = self.open_existing(&dir, leaf, &path, Kind::Dir)? else {
            return Ok(());
        };
        rfs::fsync(&fd).map_err(|e| self.io_err("fsync", path, e))
    }

    /// Opens an existing regular file for reading, never through a symlink,
    /// with its metadata; `None` if it (or a parent) does not exist. For
    /// callers that read part of a file (the new tail of a log).
    pub fn open_file<C: AsComponent>(
        &self,
        comps: &[C],
    ) -> Result<Option<(File, FileMeta)>, FsError> {
        let comps = self.check(comps, false)?;
        let path = show(&comps);
        let Some((dir, leaf)) = self.open_parent(&comps, None)? else {
            return Ok(None);
        };
        let Some(fd) = self.open_existing(&dir, leaf, &path, Kind::File)? else {
            return Ok(None);
        };
        let st = rfs::fstat(&fd).map_err(|e| self.io_err("stat", path.clone(), e))?;
        Ok(Some((File::from(fd), FileMeta::from_stat(&st))))
    }

    /// Opens an existing regular file or directory without following a
    /// symlink and checks that it is `want`; `None` if absent.
    fn open_existing(
        &self,
        dir: &OwnedFd,
        leaf: &[u8],
        path: &str,
        want: Kind,
    ) -> Result<Option<OwnedFd>, FsError> {
        let flags = match want {
            Kind::Dir => dir_flags(),
            _ => read_flags(),
        };
        let fd = match rfs::openat(dir, leaf, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
                return Err(match self.lstat_at(dir, leaf, path)? {
                    Some(st) if stat_kind(&st) != want => {
                        self.kind_err(path.to_string(), stat_kind(&st), want.describe())
                    }
                    _ => self.io_err("open", path.to_string(), e),
                });
            }
            Err(e) => return Err(self.io_err("open", path.to_string(), e)),
        };
        let st = rfs::fstat(&fd).map_err(|e| self.io_err("stat", path.to_string(), e))?;
        if stat_kind(&st) != want {
            return Err(self.kind_err(path.to_string(), stat_kind(&st), want.describe()));
        }
        Ok(Some(fd))
    }

    /// The target of a symlink, verbatim; `None` when absent; an error when
    /// the entry is not a symlink.
    pub fn read_link<C: AsComponent>(&self, comps: &[C]) -> Result<Option<Vec<u8>>, FsError> {
        let comps = self.check(comps, false)?;
        let path = show(&comps);
        let Some((dir, leaf)) = self.open_parent(&comps, None)? else {
            return Ok(None);
        };
        match rfs::readlinkat(&dir, leaf, Vec::new()) {
            Ok(t) => Ok(Some(t.into_bytes())),
            Err(Errno::NOENT) => Ok(None),
            Err(Errno::INVAL) => match self.lstat_at(&dir, leaf, &path)? {
                Some(st) => Err(self.kind_err(path, stat_kind(&st), "a symlink")),
                None => Ok(None),
            },
            Err(e) => Err(self.io_err("read symlink", path, e)),
        }
    }

    /// Lists a directory (the root itself for an empty path): names and
    /// kinds, sorted by name, temporary names included. `None` when absent;
    /// an error when it is a symlink or not a directory.
    pub fn list_dir<C: AsComponent>(&self, comps: &[C]) -> Result<Option<DirListing>, FsError> {
        match self.open_dir(comps)? {
            Some(dir) => dir.list().map(Some),
            None => Ok(None),
        }
    }

    /// Opens a directory (the root itself for an empty path) for listing
    /// and stat'ing its entries. `None` when absent; an error when it is a
    /// symlink or not a directory.
    pub fn open_dir<C: AsComponent>(&self, comps: &[C]) -> Result<Option<OpenDir<'_>>, FsError> {
        let comps = self.check(comps, true)?;
        let Some(fd) = self.walk(&comps, None)? else {
            return Ok(None);
        };
        Ok(Some(OpenDir {
            root: self,
            fd,
            path: show(&comps),
        }))
    }

    /// `lstat` of an entry: a symlink is described, not followed. `None`
    /// when it (or a parent) does not exist.
    pub fn stat<C: AsComponent>(&self, comps: &[C]) -> Result<Option<FileMeta>, FsError> {
        let comps = self.check(comps, false)?;
        let path = show(&comps);
        let Some((dir, leaf)) = self.open_parent(&comps, None)? else {
            return Ok(None);
        };
        Ok(self
            .lstat_at(&dir, leaf, &path)?
            .as_ref()
            .map(FileMeta::from_stat))
    }
}

fn is_dot(name: &CStr) -> bool {
    matches!(name.to_bytes(), b"." | b"..")
}

/// `renameat2(RENAME_NOREPLACE)`, falling back to check-then-rename on
/// filesystems that do not support the flag (EINVAL). Used only towards the
/// quarantine, where a name is unique per conflict and never contended.
fn rename_noreplace(
    sdir: &OwnedFd,
    sleaf: &[u8],
    ddir: &OwnedFd,
    dleaf: &[u8],
) -> Result<(), Errno> {
    match rfs::renameat_with(sdir, sleaf, ddir, dleaf, RenameFlags::NOREPLACE) {
        Err(Errno::INVAL) => match rfs::statat(ddir, dleaf, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Err(Errno::EXIST),
            Err(Errno::NOENT) => rfs::renameat(sdir, sleaf, ddir, dleaf),
            Err(e) => Err(e),
        },
        other => other,
    }
}

/// blake3 and length of a file's whole content, read with `pread` from
/// offset 0 (the file position is irrelevant).
fn hash_file(f: &File) -> io::Result<(blake3::Hash, u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    loop {
        let n = match f.read_at(&mut buf, off) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        off += n as u64;
    }
    Ok((hasher.finalize(), off))
}

/// Reads at most `cap` bytes from offset 0; `hint` (the size fstat gave)
/// sizes the first allocation, never beyond `cap`.
fn read_capped(f: &File, cap: u64, hint: u64) -> io::Result<Vec<u8>> {
    let first = usize::try_from(hint.saturating_add(1).min(cap)).unwrap_or(CHUNK);
    let mut out = Vec::with_capacity(first);
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < cap {
        let want = usize::try_from((cap - off).min(CHUNK as u64)).unwrap_or(CHUNK);
        let n = match f.read_at(&mut buf[..want], off) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.extend_from_slice(&buf[..n]);
        off += n as u64;
    }
    Ok(out)
}

/// The components of `name` in the directory of the entry at `comps`.
fn sibling<C: AsComponent>(comps: &[C], name: Vec<u8>) -> Vec<Vec<u8>> {
    let mut c: Vec<Vec<u8>> = comps[..comps.len() - 1]
        .iter()
        .map(|c| c.component_bytes().to_vec())
        .collect();
    c.push(name);
    c
}

mod held;
pub use held::HeldDirs;
mod replace;
mod tree;
mod xattrs;

#[cfg(test)]
mod tests;
