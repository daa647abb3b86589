//! Every write clusterd makes to a sync set, and to `data_dir/quarantine`,
//! goes through this module: a [`Root`] is an open directory handle of one
//! root, and every operation walks from that handle, one component at a time,
//! with `openat(O_DIRECTORY | O_NOFOLLOW)`, then acts on the last component
//! with an `*at` call that never follows it either.
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
//!   [`crate::manifest::is_replicated_xattr`] accepts are read, set or
//!   removed; every other attribute (SELinux labels included) is left as it
//!   is. A filesystem without xattr support (`ENOTSUP`) is not an error:
//!   the attributes are skipped and [`Root::xattrs_unsupported_notice`]
//!   tells the caller once.
//! * Limit of the guarantee: the walk holds a descriptor for each directory
//!   it passes, so a directory renamed away mid-walk by someone with write
//!   access to the set is acted on where it now is. That needs a local user
//!   who can already write the set's files; nothing that arrives from the
//!   network can cause it.

use std::ffi::{CStr, OsStr, OsString};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

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
    fd: OwnedFd,
    /// Its path relative to the root, for messages.
    path: String,
}

impl OpenDir<'_> {
    /// Names and kinds, sorted by name, temporary names included.
    pub fn list(&self) -> Result<DirListing, FsError> {
        let err = |e: Errno| self.root.io_err("list directory", self.path.clone(), e);
        // A fresh open file description: `fd` may be a duplicate of the
        // root handle, and duplicates share the directory offset, so reading
        // through one would leave every later listing of the root empty.
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

/// The outcome of [`Root::replace_file_guarded`].
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

fn temp_name() -> String {
    format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>())
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
    fd: OwnedFd,
    path: PathBuf,
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
                fd,
                path: path.to_path_buf(),
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
    /// create missing directories with.
    fn walk(&self, dirs: &[&[u8]], create: Option<u32>) -> Result<Option<OwnedFd>, FsError> {
        let mut cur = self
            .fd
            .try_clone()
            .map_err(|e| self.io_err("duplicate root handle for", ".".into(), e))?;
        for (i, name) in dirs.iter().enumerate() {
            let here = || show(&dirs[..=i]);
            let opened = match rfs::openat(&cur, *name, dir_flags(), Mode::empty()) {
                Err(Errno::NOENT) => match create {
                    None => return Ok(None),
                    Some(mode) => {
                        match rfs::mkdirat(&cur, *name, Mode::from_raw_mode(mode)) {
                            // EEXIST: someone else created it meanwhile; the
                            // open below still refuses anything but a real
                            // directory.
                            Ok(()) | Err(Errno::EXIST) => {}
                            Err(e) => return Err(self.io_err("create directory", here(), e)),
                        }
                        // The new entry must survive a crash before anything
                        // is moved into it.
                        rfs::fsync(&cur)
                            .map_err(|e| self.io_err("fsync directory of", here(), e))?;
                        rfs::openat(&cur, *name, dir_flags(), Mode::empty())
                    }
                },
                other => other,
            };
            cur = match opened {
                Ok(fd) => fd,
                Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
                    return Err(self.not_a_dir(&cur, name, here(), e));
                }
                Err(e) => return Err(self.io_err("open directory", here(), e)),
            };
        }
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
    ) -> Result<Option<(OwnedFd, &'c [u8])>, FsError> {
        let (leaf, dirs) = comps
            .split_last()
            .expect("check() refuses empty paths for leaf operations");
        Ok(self.walk(dirs, create)?.map(|fd| (fd, *leaf)))
    }

    /// Like [`Root::open_parent`], but a missing parent is an error.
    fn require_parent<'c>(&self, comps: &[&'c [u8]]) -> Result<(OwnedFd, &'c [u8]), FsError> {
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

    /// Invariant 2: writes `data` to a temporary file next to the leaf, sets
    /// mode/owner/mtime from `meta`, fsyncs it, verifies by re-reading that
    /// its blake3 hash is `expected`, renames it over the leaf and fsyncs the
    /// directory, and returns the new file's metadata (from its descriptor).
    /// A symlink at the leaf is replaced, not written through.
    /// On any error before the rename the temporary file is removed and the
    /// old version is untouched. The parent directory must exist. If only
    /// the final directory fsync fails, the new version is already in place
    /// but may not survive a crash; that is still reported as an error.
    pub fn replace_file<C: AsComponent>(
        &self,
        comps: &[C],
        data: &[u8],
        meta: &FileMeta,
        expected: &[u8; 32],
    ) -> Result<FileMeta, FsError> {
        self.replace_file_with(comps, data, meta, expected, true)
    }

    /// [`Root::replace_file`] with the directory fsync left to the caller
    /// (`sync_dir = false`), who must call [`Root::sync_dir`] on the parent
    /// before it treats the replacement as durable: a batch of many files in
    /// one directory then pays for one directory fsync, not one per file.
    /// A crash before that fsync leaves the old version or the new one.
    pub fn replace_file_with<C: AsComponent>(
        &self,
        comps: &[C],
        data: &[u8],
        meta: &FileMeta,
        expected: &[u8; 32],
        sync_dir: bool,
    ) -> Result<FileMeta, FsError> {
        self.replace_file_guarded(
            comps,
            data,
            meta,
            expected,
            sync_dir,
            None,
            Expect::Anything,
        )
        .map(|r| r.meta)
    }

    /// [`Root::replace_file_with`] that, with `xattrs`, also makes the
    /// replicated extended attributes of the new version exactly those (see
    /// [`Root::set_xattrs`]), on the temporary file before the rename, so
    /// content, metadata and attributes become visible together; and that
    /// replaces only what the caller checked (`expect`, [`Expect::Anything`]
    /// for a plain rename): the new version is swapped in with
    /// `renameat2(RENAME_EXCHANGE)` (or `RENAME_NOREPLACE` where nothing
    /// was), and whatever it displaced is compared with `expect`. What
    /// matches is removed; anything else (an edit saved between the
    /// caller's check and the rename) is left under a temporary name in the
    /// same directory and returned in [`Replaced::displaced`], for the
    /// caller to set aside: never deleted unseen. Filesystems without
    /// `RENAME_EXCHANGE` fall back to a plain rename.
    #[allow(clippy::too_many_arguments)]
    pub fn replace_file_guarded<C: AsComponent>(
        &self,
        comps: &[C],
        data: &[u8],
        meta: &FileMeta,
        expected: &[u8; 32],
        sync_dir: bool,
        xattrs: Option<&[(Vec<u8>, Vec<u8>)]>,
        expect: Expect,
    ) -> Result<Replaced, FsError> {
        let (comps, path, dir, leaf) = self.file_target(comps, meta)?;
        let (mut file, tmp) = self.create_temp(&dir, &path)?;
        let mut guard = TempGuard {
            dir: dir.as_fd(),
            name: tmp,
            armed: true,
        };

        file.write_all(data)
            .map_err(|e| self.io_err("write temporary file for", path.clone(), e))?;
        self.apply_meta(file.as_fd(), meta, &path)?;
        if let Some(want) = xattrs {
            // The new file may have inherited an ACL from its directory's
            // default ACL: that is replaced (or removed) here too.
            self.sync_xattrs(file.as_fd(), meta, want, &path)?;
        }
        file.sync_all()
            .map_err(|e| self.io_err("fsync temporary file for", path.clone(), e))?;

        // Read back what the filesystem holds, not what we meant to write.
        let (actual, _) = hash_file(&file)
            .map_err(|e| self.io_err("read back temporary file for", path.clone(), e))?;
        if actual.as_bytes() != expected {
            return Err(FsError::HashMismatch {
                root: self.root_str(),
                path,
                expected: blake3::Hash::from_bytes(*expected).to_hex().to_string(),
                actual: actual.to_hex().to_string(),
            });
        }

        // The rename is by name: make sure the name still is our inode.
        let ours = rfs::fstat(&file)
            .map_err(|e| self.io_err("stat temporary file for", path.clone(), e))?;
        let displaced = self.swap_in_ours(&dir, &mut guard, &ours, leaf, expect, &path)?;
        if sync_dir {
            rfs::fsync(&dir).map_err(|e| self.io_err("fsync the directory of", path, e))?;
        }
        // The metadata of what we wrote, taken from our own descriptor: a
        // stat by name now could already see someone else's edit.
        Ok(Replaced {
            meta: FileMeta::from_stat(&ours),
            displaced: displaced.map(|name| sibling(&comps, name.into_bytes())),
        })
    }

    /// [`Root::replace_file_guarded`] for a new version that is already a
    /// finished file outside the root: `name` in the directory `from`
    /// (`data_dir`'s staging area), whose content this node checked against
    /// the version's digest, wrote and fsynced before it was committed. The
    /// file must be a regular file of `len` bytes; it gets `meta` (and, with
    /// `xattrs`, exactly those attributes; an fsync if that changed
    /// anything), is hard-linked to a temporary name next to the leaf (so,
    /// as in invariant 2, a temporary file in the same directory), checked
    /// to be the same inode there, and swapped in as
    /// [`Root::replace_file_guarded`] does. The staged name stays: it is
    /// the copy a replay after a crash uses until the caller removes it.
    /// `Ok(None)`: nothing in the root was changed, and the caller copies
    /// the content instead, because `from` is on another filesystem, or the
    /// leaf's directory gives new files a security label (SELinux, Smack)
    /// or a default ACL, which a file made elsewhere would not get. The
    /// directory fsync is left to the caller, as with `sync_dir = false`.
    #[allow(clippy::too_many_arguments)]
    pub fn adopt_file_guarded<C: AsComponent>(
        &self,
        comps: &[C],
        from: &Path,
        name: &str,
        meta: &FileMeta,
        len: u64,
        xattrs: Option<&[(Vec<u8>, Vec<u8>)]>,
        expect: Expect,
    ) -> Result<Option<Replaced>, FsError> {
        let (comps, path, dir, leaf) = self.file_target(comps, meta)?;
        let staged = from.join(name);
        let from_dir = rfs::open(from, dir_flags(), Mode::empty())
            .map_err(|e| self.io_err("open the staging directory for", path.clone(), e))?;
        // Read-only is enough to set metadata, and works for a non-root
        // daemon on a version whose mode is read-only.
        let file = rfs::openat(&from_dir, name, read_flags(), Mode::empty())
            .map_err(|e| self.io_err("open the staged version of", path.clone(), e))?;
        let st = rfs::fstat(&file)
            .map_err(|e| self.io_err("stat the staged version of", path.clone(), e))?;
        if stat_kind(&st) != Kind::File || st.st_size as u64 != len {
            return Err(self.io_err(
                "use the staged version of",
                path,
                io::Error::other(format!(
                    "{} is not a regular file of {len} bytes",
                    staged.display()
                )),
            ));
        }
        let dir_st =
            rfs::fstat(&dir).map_err(|e| self.io_err("stat the directory of", path.clone(), e))?;
        if dir_st.st_dev != st.st_dev || labels_new_files(&dir) {
            return Ok(None);
        }
        let changed = self.apply_meta(file.as_fd(), meta, &path)?;
        if let Some(want) = xattrs {
            self.sync_xattrs(file.as_fd(), meta, want, &path)?;
        }
        // Staged with this metadata already (and fsynced then), it needs no
        // second fsync; anything set here does.
        if changed || xattrs.is_some() {
            rfs::fsync(&file)
                .map_err(|e| self.io_err("fsync the staged version of", path.clone(), e))?;
        }
        let ours = rfs::fstat(&file)
            .map_err(|e| self.io_err("stat the staged version of", path.clone(), e))?;
        let mut moved = None;
        for _ in 0..8 {
            let tmp = temp_name();
            match rfs::linkat(&from_dir, name, &dir, tmp.as_str(), AtFlags::empty()) {
                Ok(()) => {
                    moved = Some(tmp);
                    break;
                }
                Err(Errno::EXIST) => continue,
                Err(Errno::XDEV) => return Ok(None),
                Err(e) => return Err(self.io_err("link the staged version next to", path, e)),
            }
        }
        let tmp = moved.ok_or_else(|| {
            self.io_err(
                "link the staged version next to",
                path.clone(),
                Errno::EXIST,
            )
        })?;
        let mut guard = TempGuard {
            dir: dir.as_fd(),
            name: tmp,
            armed: true,
        };
        let displaced = self.swap_in_ours(&dir, &mut guard, &ours, leaf, expect, &path)?;
        Ok(Some(Replaced {
            meta: FileMeta::from_stat(&ours),
            displaced: displaced.map(|name| sibling(&comps, name.into_bytes())),
        }))
    }

    /// Makes `comps` another hard link of the regular file at `target`,
    /// atomically: `linkat` (relative to the parents' handles, no symlink
    /// followed in either path, and never `AT_SYMLINK_FOLLOW`, so a symlink
    /// at `target` would be linked itself, and is refused) makes a temporary
    /// name in `comps`' directory; that name is checked to be the very file
    /// `checked` describes (inode, device, size, mtime: the file whose
    /// content the caller verified), swapped in over `comps` as in
    /// [`Root::replace_file_guarded`] (`expect` says what may be displaced
    /// unseen; anything else is returned in [`Replaced::displaced`]), and
    /// the directory is fsynced. A name that already is that inode is left
    /// as it is. Both parent directories must exist; both names must be on
    /// one filesystem (a mount point inside the set gives `EXDEV`).
    pub fn link_file_guarded<C: AsComponent, D: AsComponent>(
        &self,
        comps: &[C],
        target: &[D],
        checked: &FileMeta,
        expect: Expect,
    ) -> Result<Replaced, FsError> {
        let comps = self.check(comps, false)?;
        let target = self.check(target, false)?;
        let path = show(&comps);
        let (dir, leaf) = self.require_parent(&comps)?;
        let (tdir, tleaf) = self.require_parent(&target)?;
        let same = |st: &Stat| {
            stat_kind(st) == Kind::File && st.st_ino == checked.ino && st.st_dev == checked.dev
        };
        if let Some(st) = self.lstat_at(&dir, leaf, &path)? {
            if same(&st) {
                rfs::fsync(&dir).map_err(|e| self.io_err("fsync the directory of", path, e))?;
                return Ok(Replaced {
                    meta: FileMeta::from_stat(&st),
                    displaced: None,
                });
            }
        }
        let mut made = None;
        for _ in 0..8 {
            let name = temp_name();
            match rfs::linkat(&tdir, tleaf, &dir, name.as_str(), AtFlags::empty()) {
                Ok(()) => {
                    made = Some(name);
                    break;
                }
                Err(Errno::EXIST) => continue,
                Err(e) => {
                    return Err(self.io_err(
                        "make a temporary hard link for",
                        format!("{path} (a link of {})", show(&target)),
                        e,
                    ))
                }
            }
        }
        let name = made.ok_or_else(|| {
            self.io_err("make a temporary hard link for", path.clone(), Errno::EXIST)
        })?;
        let mut guard = TempGuard {
            dir: dir.as_fd(),
            name,
            armed: true,
        };
        let st = rfs::statat(&dir, guard.name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io_err("stat the temporary hard link for", path.clone(), e))?;
        let seen = FileMeta::from_stat(&st);
        if !same(&st) || seen.len != checked.len || seen.mtime_ns != checked.mtime_ns {
            return Err(self.io_err(
                "make a hard link for",
                path,
                io::Error::other(format!(
                    "{} is not the file that was checked any more (it was replaced or changed meanwhile)",
                    show(&target)
                )),
            ));
        }
        let displaced = self.swap_in(&dir, &guard.name, leaf, expect, &path)?;
        guard.disarm();
        rfs::fsync(&dir).map_err(|e| self.io_err("fsync the directory of", path, e))?;
        Ok(Replaced {
            meta: seen,
            displaced: displaced.map(|name| sibling(&comps, name.into_bytes())),
        })
    }

    /// For a regular file about to be replaced with `meta`: the checked
    /// components, their display form, the parent's handle and the leaf.
    #[allow(clippy::type_complexity)]
    fn file_target<'c, C: AsComponent>(
        &self,
        comps: &'c [C],
        meta: &FileMeta,
    ) -> Result<(Vec<&'c [u8]>, String, OwnedFd, &'c [u8]), FsError> {
        let comps = self.check(comps, false)?;
        let path = show(&comps);
        if meta.kind != Kind::File {
            return Err(self.meta_err(
                path,
                format!(
                    "metadata is for {}, not a regular file",
                    meta.kind.describe()
                ),
            ));
        }
        self.check_meta(meta, &path)?;
        let (dir, leaf) = self.require_parent(&comps)?;
        Ok((comps, path, dir, leaf))
    }

    /// [`Root::swap_in`] of `guard`'s temporary name, once it is checked to
    /// still be `ours` (the rename is by name); one taken over by another
    /// file meanwhile is left alone and refused.
    fn swap_in_ours(
        &self,
        dir: &OwnedFd,
        guard: &mut TempGuard<'_>,
        ours: &Stat,
        leaf: &[u8],
        expect: Expect,
        path: &str,
    ) -> Result<Option<String>, FsError> {
        match rfs::statat(dir, guard.name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_ino == ours.st_ino && st.st_dev == ours.st_dev => {}
            Ok(_) => {
                guard.disarm();
                return Err(self.io_err(
                    "rename temporary file over",
                    path.to_string(),
                    io::Error::other("its temporary name was taken over by another file meanwhile"),
                ));
            }
            Err(e) => return Err(self.io_err("stat temporary file for", path.to_string(), e)),
        }
        let displaced = self.swap_in(dir, &guard.name, leaf, expect, path)?;
        guard.disarm();
        Ok(displaced)
    }

    /// Renames `tmp` to `leaf` in `dir`; see [`Root::replace_file_guarded`].
    /// Returns the temporary name of an unexpected displaced entry.
    fn swap_in(
        &self,
        dir: &OwnedFd,
        tmp: &str,
        leaf: &[u8],
        expect: Expect,
        path: &str,
    ) -> Result<Option<String>, FsError> {
        let rename_err = |e| self.io_err("rename temporary file over", path.to_string(), e);
        if expect == Expect::Anything {
            rfs::renameat(dir, tmp, dir, leaf).map_err(rename_err)?;
            return Ok(None);
        }
        for _ in 0..2 {
            match rfs::renameat_with(dir, tmp, dir, leaf, RenameFlags::EXCHANGE) {
                Ok(()) => {
                    // `tmp` now names what stood at `leaf`.
                    // If it cannot even be looked at, keep it for the caller.
                    let Ok(st) = rfs::statat(dir, tmp, AtFlags::SYMLINK_NOFOLLOW) else {
                        return Ok(Some(tmp.to_string()));
                    };
                    let seen = FileMeta::from_stat(&st);
                    let as_checked = matches!(expect, Expect::File { ino, dev, len, mtime_ns }
                        if seen.kind == Kind::File && seen.ino == ino && seen.dev == dev
                            && seen.len == len && seen.mtime_ns == mtime_ns);
                    if as_checked {
                        rfs::unlinkat(dir, tmp, AtFlags::empty()).map_err(|e| {
                            self.io_err("remove the replaced version of", path.to_string(), e)
                        })?;
                        return Ok(None);
                    }
                    return Ok(Some(tmp.to_string()));
                }
                Err(Errno::NOENT) => {
                    match rfs::renameat_with(dir, tmp, dir, leaf, RenameFlags::NOREPLACE) {
                        Ok(()) => return Ok(None),
                        // Created meanwhile: swap again and look at it.
                        Err(Errno::EXIST) => continue,
                        Err(Errno::INVAL) | Err(Errno::NOSYS) | Err(Errno::OPNOTSUPP) => break,
                        Err(e) => return Err(rename_err(e)),
                    }
                }
                Err(Errno::INVAL) | Err(Errno::NOSYS) | Err(Errno::OPNOTSUPP) => break,
                Err(e) => return Err(rename_err(e)),
            }
        }
        rfs::renameat(dir, tmp, dir, leaf).map_err(rename_err)?;
        Ok(None)
    }

    /// The replicated extended attributes of a regular file or directory
    /// (read through its descriptor, never through a symlink), sorted by
    /// name. A symlink or special file has none here; `None` when absent.
    /// A filesystem without xattr support gives an empty list.
    pub fn read_xattrs<C: AsComponent>(&self, comps: &[C]) -> Result<Option<Xattrs>, FsError> {
        let comps = self.check(comps, false)?;
        let path = show(&comps);
        let Some((dir, leaf)) = self.open_parent(&comps, None)? else {
            return Ok(None);
        };
        let Some(st) = self.lstat_at(&dir, leaf, &path)? else {
            return Ok(None);
        };
        let kind = stat_kind(&st);
        if !matches!(kind, Kind::File | Kind::Dir) {
            return Ok(Some(Vec::new()));
        }
        match self.open_existing(&dir, leaf, &path, kind) {
            Ok(Some(fd)) => self.xattrs_of(fd.as_fd(), &path).map(Some),
            Ok(None) => Ok(None),
            // Replaced by another kind between lstat and open: the event
            // that replaced it brings the path back.
            Err(FsError::WrongKind { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes the replicated extended attributes of the existing regular
    /// file or directory at `comps` (of `meta.kind`) exactly `want`:
    /// missing ones are set, changed ones rewritten, extra ones removed;
    /// names outside the replicated ones are never touched. A POSIX ACL
    /// also sets the group bits of the mode, so the mode of `meta` is set
    /// again afterwards when they differ. Symlinks are left alone (`false`);
    /// so is an absent entry. Returns whether anything changed.
    pub fn set_xattrs<C: AsComponent>(
        &self,
        comps: &[C],
        meta: &FileMeta,
        want: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<bool, FsError> {
        let comps = self.check(comps, false)?;
        let path = show(&comps);
        if !matches!(meta.kind, Kind::File | Kind::Dir) {
            return Ok(false);
        }
        let Some((dir, leaf)) = self.open_parent(&comps, None)? else {
            return Ok(false);
        };
        let Some(fd) = self.open_existing(&dir, leaf, &path, meta.kind)? else {
            return Ok(false);
        };
        let changed = self.sync_xattrs(fd.as_fd(), meta, want, &path)?;
        if changed {
            rfs::fsync(&fd).map_err(|e| self.io_err("fsync", path, e))?;
        }
        Ok(changed)
    }

    /// Returns `true` once, the first time after an operation of this root
    /// met a filesystem without extended attribute support, so the caller
    /// can say so once instead of at every file.
    pub fn xattrs_unsupported_notice(&self) -> bool {
        self.xattr_notice
            .compare_exchange(
                XATTR_UNSUPPORTED,
                XATTR_REPORTED,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    fn note_xattrs_unsupported(&self) {
        let _ = self.xattr_notice.compare_exchange(
            XATTR_OK,
            XATTR_UNSUPPORTED,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The replicated extended attributes of an open file or directory.
    fn xattrs_of(&self, fd: BorrowedFd<'_>, path: &str) -> Result<Xattrs, FsError> {
        let mut list = vec![0u8; XATTR_BUF];
        let n = match rfs::flistxattr(fd, &mut list[..]) {
            Ok(n) => n,
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => {
                return Err(self.io_err("list the extended attributes of", path.to_string(), e))
            }
        };
        let mut value = vec![0u8; XATTR_BUF];
        let mut out = Vec::new();
        for name in list[..n].split(|&b| b == 0) {
            if !crate::manifest::is_replicated_xattr(name) {
                continue;
            }
            match rfs::fgetxattr(fd, name, &mut value[..]) {
                Ok(len) => out.push((name.to_vec(), value[..len].to_vec())),
                // Removed since the list was taken.
                Err(Errno::NODATA) => {}
                Err(e) => {
                    return Err(self.io_err(
                        "read an extended attribute of",
                        format!("{path} ({})", String::from_utf8_lossy(name)),
                        e,
                    ))
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// [`Root::set_xattrs`] on an open file or directory, without fsync.
    fn sync_xattrs(
        &self,
        fd: BorrowedFd<'_>,
        meta: &FileMeta,
        want: &[(Vec<u8>, Vec<u8>)],
        path: &str,
    ) -> Result<bool, FsError> {
        let shown = |name: &[u8]| format!("{path} ({})", String::from_utf8_lossy(name));
        if let Some((name, _)) = want
            .iter()
            .find(|(n, _)| n.contains(&0) || !crate::manifest::is_replicated_xattr(n))
        {
            // The manifest refuses these already; this is the last line.
            return Err(self.meta_err(
                shown(name),
                "only user.* attributes and POSIX ACLs are ever written",
            ));
        }
        let have = self.xattrs_of(fd, path)?;
        let mut changed = false;
        for (name, _) in &have {
            if want.iter().any(|(n, _)| n == name) {
                continue;
            }
            match rfs::fremovexattr(fd, name.as_slice()) {
                Ok(()) => changed = true,
                Err(Errno::NODATA) => {}
                Err(Errno::NOTSUP) => self.note_xattrs_unsupported(),
                Err(e) => return Err(self.io_err("remove the extended attribute", shown(name), e)),
            }
        }
        for (name, value) in want {
            if have.iter().any(|(n, v)| n == name && v == value) {
                continue;
            }
            match rfs::fsetxattr(fd, name.as_slice(), value, XattrFlags::empty()) {
                Ok(()) => changed = true,
                Err(Errno::NOTSUP) => self.note_xattrs_unsupported(),
                Err(e) => return Err(self.io_err("set the extended attribute", shown(name), e)),
            }
        }
        if changed {
            // Setting or removing an access ACL rewrites the mode's group
            // bits (they are its mask): put the committed mode back.
            let st = rfs::fstat(fd).map_err(|e| self.io_err("stat", path.to_string(), e))?;
            let want_mode = meta.mode & PERM_MASK;
            if st.st_mode & PERM_MASK != want_mode {
                rfs::fchmod(fd, Mode::from_raw_mode(want_mode))
                    .map_err(|e| self.io_err("set mode of", path.to_string(), e))?;
            }
        }
        Ok(changed)
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

    /// Appends `tail` to an existing regular file at `offset` (its committed
    /// length: anything beyond it, such as a torn earlier append, is cut
    /// first), sets mode/owner/mtime from `meta` and fsyncs. This is the
    /// `append` sets' trade: the file is extended in place, so a reader may
    /// see a partial tail while it is written, but a 1 GiB log never has to
    /// be rewritten for 10 MiB of news. The caller has verified the result's
    /// hash ([`crate::delta::apply_tail`]) before calling.
    pub fn append_file<C: AsComponent>(
        &self,
        comps: &[C],
        offset: u64,
        tail: &[u8],
        meta: &FileMeta,
    ) -> Result<FileMeta, FsError> {
        let comps = self.check(comps, false)?;
        let path = show(&comps);
        self.check_meta(meta, &path)?;
        let (dir, leaf) = self.require_parent(&comps)?;
        let fd = match rfs::openat(
            &dir,
            leaf,
            OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) => return Err(self.io_err("open for append", path, e)),
        };
        let st = rfs::fstat(&fd).map_err(|e| self.io_err("stat", path.clone(), e))?;
        if stat_kind(&st) != Kind::File {
            return Err(self.kind_err(path, stat_kind(&st), Kind::File.describe()));
        }
        let file = File::from(fd);
        file.set_len(offset)
            .map_err(|e| self.io_err("truncate to the committed length", path.clone(), e))?;
        file.write_all_at(tail, offset)
            .map_err(|e| self.io_err("append to", path.clone(), e))?;
        self.apply_meta(file.as_fd(), meta, &path)?;
        file.sync_all()
            .map_err(|e| self.io_err("fsync", path.clone(), e))?;
        let st = rfs::fstat(&file).map_err(|e| self.io_err("stat", path, e))?;
        Ok(FileMeta::from_stat(&st))
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

    /// Creates a directory (mode 0700 until its metadata is set) or keeps
    /// the existing one, then sets mode/owner/mtime from `meta`. Idempotent.
    /// An existing non-directory (a symlink included) is an error: the
    /// caller decides whether it goes to quarantine first.
    pub fn make_dir<C: AsComponent>(&self, comps: &[C], meta: &FileMeta) -> Result<(), FsError> {
        let comps = self.check(comps, false)?;
        let path = show(&comps);
        if meta.kind != Kind::Dir {
            return Err(self.meta_err(
                path,
                format!("metadata is for {}, not a directory", meta.kind.describe()),
            ));
        }
        self.check_meta(meta, &path)?;
        let (dir, leaf) = self.require_parent(&comps)?;
        let created = match rfs::mkdirat(&dir, leaf, Mode::from_raw_mode(PRIVATE_DIR_MODE)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => return Err(self.io_err("create directory", path, e)),
        };
        let fd = self
            .open_existing(&dir, leaf, &path, Kind::Dir)?
            .ok_or_else(|| self.io_err("open directory", path.clone(), Errno::NOENT))?;
        if self.apply_meta(fd.as_fd(), meta, &path)? {
            rfs::fsync(&fd).map_err(|e| self.io_err("fsync directory", path.clone(), e))?;
        }
        if created {
            rfs::fsync(&dir).map_err(|e| self.io_err("fsync the directory of", path, e))?;
        }
        Ok(())
    }

    /// Sets mode/owner/mtime of an existing file or directory (owner and
    /// mtime of a symlink; symlinks have no mode of their own) without
    /// rewriting it. The entry must be of `meta.kind`. Returns whether
    /// anything changed; `false` as well when it does not exist.
    pub fn set_meta<C: AsComponent>(&self, comps: &[C], meta: &FileMeta) -> Result<bool, FsError> {
        let comps = self.check(comps, false)?;
        let path = show(&comps);
        let mtime = self.check_meta(meta, &path)?;
        let Some((dir, leaf)) = self.open_parent(&comps, None)? else {
            return Ok(false);
        };
        match meta.kind {
            Kind::File | Kind::Dir => {
                let Some(fd) = self.open_existing(&dir, leaf, &path, meta.kind)? else {
                    return Ok(false);
                };
                let changed = self.apply_meta(fd.as_fd(), meta, &path)?;
                if changed {
                    rfs::fsync(&fd).map_err(|e| self.io_err("fsync", path, e))?;
                }
                Ok(changed)
            }
            Kind::Symlink => {
                let Some(st) = self.lstat_at(&dir, leaf, &path)? else {
                    return Ok(false);
                };
                if stat_kind(&st) != Kind::Symlink {
                    return Err(self.kind_err(path, stat_kind(&st), "a symlink"));
                }
                let mut changed = false;
                if st.st_uid != meta.uid || st.st_gid != meta.gid {
                    rfs::chownat(
                        &dir,
                        leaf,
                        Some(Uid::from_raw(meta.uid)),
                        Some(Gid::from_raw(meta.gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| self.io_err("set owner and group of", path.clone(), e))?;
                    changed = true;
                }
                if stat_mtime_ns(&st) != meta.mtime_ns {
                    let times = Timestamps {
                        last_access: omit_atime(),
                        last_modification: mtime,
                    };
                    rfs::utimensat(&dir, leaf, &times, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| self.io_err("set mtime of", path.clone(), e))?;
                    changed = true;
                }
                if changed {
                    rfs::fsync(&dir).map_err(|e| self.io_err("fsync the directory of", path, e))?;
                }
                Ok(changed)
            }
            Kind::Other => Err(self.meta_err(path, "special files are never changed")),
        }
    }

    /// Creates or atomically replaces a symlink whose target is `target`,
    /// stored verbatim: it is data, never resolved or followed here. A
    /// directory at the leaf is an error. The parent directory must exist.
    pub fn make_symlink<C: AsComponent>(&self, comps: &[C], target: &[u8]) -> Result<(), FsError> {
        let comps = self.check(comps, false)?;
        let path = show(&comps);
        if target.is_empty() || target.contains(&0) {
            return Err(self.meta_err(
                path,
                "a symlink target must be non-empty and contain no NUL byte",
            ));
        }
        let (dir, leaf) = self.require_parent(&comps)?;
        // Already right: leave it (and the directory's mtime) alone.
        if let Ok(old) = rfs::readlinkat(&dir, leaf, Vec::new()) {
            if old.as_bytes() == target {
                return Ok(());
            }
        }
        let mut guard = None;
        for _ in 0..8 {
            let name = temp_name();
            match rfs::symlinkat(target, &dir, name.as_str()) {
                Ok(()) => {
                    guard = Some(TempGuard {
                        dir: dir.as_fd(),
                        name,
                        armed: true,
                    });
                    break;
                }
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(self.io_err("create a temporary symlink for", path, e)),
            }
        }
        let mut guard = guard.ok_or_else(|| {
            self.io_err("create a temporary symlink for", path.clone(), Errno::EXIST)
        })?;
        rfs::renameat(&dir, guard.name.as_str(), &dir, leaf)
            .map_err(|e| self.io_err("rename temporary symlink over", path.clone(), e))?;
        guard.disarm();
        rfs::fsync(&dir).map_err(|e| self.io_err("fsync the directory of", path, e))
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

    /// Removes a file, symlink or special file, or a directory with all it
    /// contains. A symlink is removed itself, never its target, and the
    /// recursion steps into directories only through `O_NOFOLLOW` handles.
    /// Returns whether anything was there.
    pub fn remove<C: AsComponent>(&self, comps: &[C]) -> Result<bool, FsError> {
        let comps = self.check(comps, false)?;
        let path = show(&comps);
        let Some((dir, leaf)) = self.open_parent(&comps, None)? else {
            return Ok(false);
        };
        let Some(st) = self.lstat_at(&dir, leaf, &path)? else {
            return Ok(false);
        };
        self.remove_entry(dir.as_fd(), leaf, stat_kind(&st), &path, 0)?;
        rfs::fsync(&dir).map_err(|e| self.io_err("fsync the directory of", path, e))?;
        Ok(true)
    }

    fn remove_entry(
        &self,
        dir: BorrowedFd<'_>,
        leaf: &[u8],
        kind: Kind,
        path: &str,
        depth: usize,
    ) -> Result<(), FsError> {
        if kind == Kind::Dir {
            if depth >= MAX_DEPTH {
                return Err(FsError::TooDeep {
                    root: self.root_str(),
                    path: path.to_string(),
                    max: MAX_DEPTH,
                });
            }
            let sub = match rfs::openat(dir, leaf, dir_flags(), Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => return Ok(()),
                Err(e) => return Err(self.io_err("open directory", path.to_string(), e)),
            };
            self.empty_dir(sub, path, depth)?;
            match rfs::unlinkat(dir, leaf, AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(self.io_err("remove directory", path.to_string(), e)),
            }
        } else {
            match rfs::unlinkat(dir, leaf, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(self.io_err("remove", path.to_string(), e)),
            }
        }
    }

    /// Removes everything inside the directory `fd`, without following
    /// symlinks. Passes repeat until one finds nothing, since entries
    /// created during a pass may be missed by `readdir`.
    fn empty_dir(&self, fd: OwnedFd, path: &str, depth: usize) -> Result<(), FsError> {
        // Fresh offset, as in `list_dir`.
        let mut dir =
            Dir::read_from(&fd).map_err(|e| self.io_err("list directory", path.to_string(), e))?;
        // Bounded: a writer that keeps adding entries makes the final
        // `unlinkat(AT_REMOVEDIR)` fail with ENOTEMPTY instead of spinning.
        for _ in 0..4 {
            let mut found = false;
            while let Some(ent) = dir.read() {
                let ent = ent.map_err(|e| self.io_err("list directory", path.to_string(), e))?;
                let name = ent.file_name();
                if is_dot(name) {
                    continue;
                }
                found = true;
                let name = name.to_bytes();
                let child = join_shown(path, name);
                let dfd = dir
                    .fd()
                    .map_err(|e| self.io_err("list directory", path.to_string(), e))?;
                let kind = match ent.file_type() {
                    FileType::Unknown => match self.lstat_at(dfd, name, &child)? {
                        Some(st) => stat_kind(&st),
                        None => continue,
                    },
                    t => Kind::from_file_type(t),
                };
                self.remove_entry(dfd, name, kind, &child, depth + 1)?;
            }
            if !found {
                return Ok(());
            }
            dir.rewind();
        }
        Ok(())
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

    /// Moves the local version of an entry (file, symlink or directory
    /// tree) aside into `dest` under `dest_comps`, for quarantine
    /// (invariant 4). Missing parents under `dest` are created mode 0700.
    /// Content, mode, owner and mtime are kept: by `renameat` on the same
    /// filesystem, otherwise by copying (temporary name, fsync, rename) and
    /// then removing the original. An existing destination is never
    /// overwritten (an error). Returns whether there was anything to move.
    ///
    /// A cross-filesystem move that fails half-way leaves the original in
    /// place and may leave a partial copy under `dest`: nothing is lost.
    pub fn move_aside<C: AsComponent, D: AsComponent>(
        &self,
        comps: &[C],
        dest: &Root,
        dest_comps: &[D],
    ) -> Result<bool, FsError> {
        let comps = self.check(comps, false)?;
        let dcomps = dest.check(dest_comps, false)?;
        let path = show(&comps);
        let dpath = show(&dcomps);
        let both = format!("{path} -> {}/{dpath}", dest.path.display());
        let Some((sdir, sleaf)) = self.open_parent(&comps, None)? else {
            return Ok(false);
        };
        let Some(st) = self.lstat_at(&sdir, sleaf, &path)? else {
            return Ok(false);
        };
        let (ddir, dleaf) = dest
            .open_parent(&dcomps, Some(PRIVATE_DIR_MODE))?
            .expect("open_parent with create returns a directory");

        match rename_noreplace(&sdir, sleaf, &ddir, dleaf) {
            Ok(()) => {
                rfs::fsync(&ddir).map_err(|e| dest.io_err("fsync the directory of", dpath, e))?;
                rfs::fsync(&sdir).map_err(|e| self.io_err("fsync the directory of", path, e))?;
                Ok(true)
            }
            Err(Errno::XDEV) => {
                self.copy_entry(&sdir, sleaf, &st, dest, &ddir, dleaf, &path, &dpath, 0)?;
                rfs::fsync(&ddir).map_err(|e| dest.io_err("fsync the directory of", dpath, e))?;
                // Only now that the copy is durable does the original go.
                self.remove_entry(sdir.as_fd(), sleaf, stat_kind(&st), &path, 0)?;
                rfs::fsync(&sdir).map_err(|e| self.io_err("fsync the directory of", path, e))?;
                Ok(true)
            }
            Err(e) => Err(self.io_err("move aside", both, e)),
        }
    }

    /// Copies one entry from `sdir/sleaf` (this root) to `ddir/dleaf` (in
    /// `dest`), keeping content, mode, owner and mtime; directories
    /// recursively. The destination name must not exist.
    #[allow(clippy::too_many_arguments)]
    fn copy_entry(
        &self,
        sdir: &OwnedFd,
        sleaf: &[u8],
        st: &Stat,
        dest: &Root,
        ddir: &OwnedFd,
        dleaf: &[u8],
        path: &str,
        dpath: &str,
        depth: usize,
    ) -> Result<(), FsError> {
        let meta = FileMeta::from_stat(st);
        match meta.kind {
            Kind::File => {
                let src = self
                    .open_existing(sdir, sleaf, path, Kind::File)?
                    .ok_or_else(|| self.io_err("open", path.to_string(), Errno::NOENT))?;
                let mut src = File::from(src);
                let (mut tmp, name) = dest.create_temp(ddir, dpath)?;
                let mut guard = TempGuard {
                    dir: ddir.as_fd(),
                    name,
                    armed: true,
                };
                io::copy(&mut src, &mut tmp)
                    .map_err(|e| dest.io_err("copy into", dpath.to_string(), e))?;
                dest.apply_meta(tmp.as_fd(), &meta, dpath)?;
                tmp.sync_all()
                    .map_err(|e| dest.io_err("fsync", dpath.to_string(), e))?;
                rename_noreplace(ddir, guard.name.as_bytes(), ddir, dleaf)
                    .map_err(|e| dest.io_err("rename temporary file to", dpath.to_string(), e))?;
                guard.disarm();
                Ok(())
            }
            Kind::Symlink => {
                let target = rfs::readlinkat(sdir, sleaf, Vec::new())
                    .map_err(|e| self.io_err("read symlink", path.to_string(), e))?;
                let name = temp_name();
                rfs::symlinkat(target.as_c_str(), ddir, name.as_str())
                    .map_err(|e| dest.io_err("create symlink", dpath.to_string(), e))?;
                let mut guard = TempGuard {
                    dir: ddir.as_fd(),
                    name,
                    armed: true,
                };
                rfs::chownat(
                    ddir,
                    guard.name.as_str(),
                    Some(Uid::from_raw(meta.uid)),
                    Some(Gid::from_raw(meta.gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| dest.io_err("set owner and group of", dpath.to_string(), e))?;
                if let Some(mtime) = to_timespec(meta.mtime_ns) {
                    let times = Timestamps {
                        last_access: omit_atime(),
                        last_modification: mtime,
                    };
                    rfs::utimensat(ddir, guard.name.as_str(), &times, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| dest.io_err("set mtime of", dpath.to_string(), e))?;
                }
                rename_noreplace(ddir, guard.name.as_bytes(), ddir, dleaf)
                    .map_err(|e| dest.io_err("rename temporary symlink to", dpath.to_string(), e))?;
                guard.disarm();
                Ok(())
            }
            Kind::Dir => {
                if depth >= MAX_DEPTH {
                    return Err(FsError::TooDeep {
                        root: self.root_str(),
                        path: path.to_string(),
                        max: MAX_DEPTH,
                    });
                }
                let sfd = self
                    .open_existing(sdir, sleaf, path, Kind::Dir)?
                    .ok_or_else(|| self.io_err("open directory", path.to_string(), Errno::NOENT))?;
                rfs::mkdirat(ddir, dleaf, Mode::from_raw_mode(PRIVATE_DIR_MODE))
                    .map_err(|e| dest.io_err("create directory", dpath.to_string(), e))?;
                let dfd = dest
                    .open_existing(ddir, dleaf, dpath, Kind::Dir)?
                    .ok_or_else(|| dest.io_err("open directory", dpath.to_string(), Errno::NOENT))?;
                let mut list = Dir::read_from(&sfd)
                    .map_err(|e| self.io_err("list directory", path.to_string(), e))?;
                while let Some(ent) = list.read() {
                    let ent = ent.map_err(|e| self.io_err("list directory", path.to_string(), e))?;
                    if is_dot(ent.file_name()) {
                        continue;
                    }
                    let name = ent.file_name().to_bytes();
                    let child = join_shown(path, name);
                    let Some(cst) = self.lstat_at(&sfd, name, &child)? else {
                        continue;
                    };
                    let dchild = join_shown(dpath, name);
                    self.copy_entry(&sfd, name, &cst, dest, &dfd, name, &child, &dchild, depth + 1)?;
                }
                // After the children, which change the directory's mtime.
                dest.apply_meta(dfd.as_fd(), &meta, dpath)?;
                rfs::fsync(&dfd).map_err(|e| dest.io_err("fsync directory", dpath.to_string(), e))?;
                Ok(())
            }
            Kind::Other => Err(self.kind_err(
                path.to_string(),
                Kind::Other,
                "a regular file, symlink or directory (special files cannot be copied to another filesystem)",
            )),
        }
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
#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::ffi::CString;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    fn hash(data: &[u8]) -> [u8; 32] {
        *blake3::hash(data).as_bytes()
    }

    fn file_meta(mode: u32) -> FileMeta {
        let (uid, gid) = me();
        FileMeta::new(Kind::File, mode, uid, gid, 1_600_000_000_123_456_789)
    }

    /// The test process's owner, read from a file it creates.
    fn me() -> (u32, u32) {
        let f = tempfile::tempfile().unwrap();
        let m = f.metadata().unwrap();
        (m.uid(), m.gid())
    }

    fn is_root() -> bool {
        me().0 == 0
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        base: PathBuf,
        root: Root,
        root_path: PathBuf,
        outside: PathBuf,
    }

    /// base/root is the sync root; base/outside a sentinel tree with a file,
    /// a subdirectory and content, that no operation may change.
    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().to_path_buf();
        let root_path = base.join("root");
        let outside = base.join("outside");
        std::fs::create_dir(&root_path).unwrap();
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::fs::write(outside.join("shadow"), b"root:secret:1:0\n").unwrap();
        std::fs::write(outside.join("x"), b"outside x").unwrap();
        std::fs::write(outside.join("sub/keep"), b"keep me").unwrap();
        let root = Root::open(&root_path).unwrap();
        Fixture {
            _tmp: tmp,
            base,
            root,
            root_path,
            outside,
        }
    }

    /// A staged version is linked in with its metadata, displacing what
    /// was expected, and keeps its staged name (the copy a replay uses);
    /// one that is not what the caller claims (another size) is refused;
    /// one on another filesystem is left alone for the caller to copy.
    #[test]
    fn adopting_a_staged_file_links_it_in_or_refuses_it() {
        let f = fixture();
        let staging = f.base.join("staging");
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("v1"), b"new content").unwrap();
        std::fs::set_permissions(staging.join("v1"), std::fs::Permissions::from_mode(0o400))
            .unwrap();
        std::fs::write(f.root_path.join("aliases"), b"old").unwrap();
        let ino = std::fs::metadata(staging.join("v1")).unwrap().ino();
        let before = snapshot(&f.outside);

        let meta = file_meta(0o640);
        let wrong_len = f.root.adopt_file_guarded(
            &["aliases"],
            &staging,
            "v1",
            &meta,
            3,
            None,
            Expect::Anything,
        );
        assert!(wrong_len.is_err());
        assert_eq!(std::fs::read(f.root_path.join("aliases")).unwrap(), b"old");

        let r = f
            .root
            .adopt_file_guarded(
                &["aliases"],
                &staging,
                "v1",
                &meta,
                11,
                None,
                Expect::Anything,
            )
            .unwrap()
            .expect("one filesystem, no labels");
        assert!(r.displaced.is_none());
        let m = std::fs::metadata(f.root_path.join("aliases")).unwrap();
        assert_eq!(
            std::fs::read(f.root_path.join("aliases")).unwrap(),
            b"new content"
        );
        assert_eq!((m.ino(), m.mode() & 0o7777), (ino, 0o640));
        assert_eq!(r.meta.ino, ino);
        assert!(staging.join("v1").exists(), "the staged name stays");
        let names: Vec<_> = std::fs::read_dir(&f.root_path).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary name left: {names:?}");
        assert_eq!(snapshot(&f.outside), before);

        // /dev/shm is a tmpfs where there is one: another filesystem.
        if let Ok(other) = tempfile::tempdir_in("/dev/shm") {
            let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
            if dev(other.path()) != dev(&f.root_path) {
                std::fs::write(other.path().join("v2"), b"elsewhere").unwrap();
                let r = f.root.adopt_file_guarded(
                    &["aliases"],
                    other.path(),
                    "v2",
                    &meta,
                    9,
                    None,
                    Expect::Anything,
                );
                assert!(matches!(r, Ok(None)), "{r:?}");
                assert!(other.path().join("v2").exists());
                assert_eq!(
                    std::fs::read(f.root_path.join("aliases")).unwrap(),
                    b"new content"
                );
            }
        }
    }

    /// Content and metadata of every entry under `dir`, symlinks not followed.
    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
            let m = std::fs::symlink_metadata(dir).unwrap();
            let rel = dir.strip_prefix(base).unwrap().to_path_buf();
            let mut desc = format!(
                "mode={:o} uid={} gid={} mtime={}.{} ino={}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec(),
                m.ino()
            );
            if m.file_type().is_symlink() {
                desc += &format!(" link={:?}", std::fs::read_link(dir).unwrap());
            } else if m.is_file() {
                desc += &format!(" data={:?}", std::fs::read(dir).unwrap());
            } else if m.is_dir() {
                for e in std::fs::read_dir(dir).unwrap() {
                    walk(base, &e.unwrap().path(), out);
                }
            }
            out.insert(rel, desc);
        }
        walk(dir, dir, &mut out);
        out
    }

    fn temp_leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| is_temp_name(n.as_bytes()))
            .collect()
    }

    #[test]
    fn replace_creates_then_replaces() {
        let fx = fixture();
        let m = file_meta(0o640);
        fx.root
            .replace_file(&["a"], b"one", &m, &hash(b"one"))
            .unwrap();
        assert_eq!(std::fs::read(fx.root_path.join("a")).unwrap(), b"one");
        let ino1 = std::fs::metadata(fx.root_path.join("a")).unwrap().ino();
        fx.root
            .replace_file(&["a"], b"two!", &m, &hash(b"two!"))
            .unwrap();
        let md = std::fs::metadata(fx.root_path.join("a")).unwrap();
        assert_eq!(std::fs::read(fx.root_path.join("a")).unwrap(), b"two!");
        assert_ne!(md.ino(), ino1, "replaced by rename, not rewritten in place");
        assert_eq!(md.mode() & 0o7777, 0o640);
        assert_eq!(md.mtime(), 1_600_000_000);
        assert_eq!(md.mtime_nsec(), 123_456_789);
        assert!(temp_leftovers(&fx.root_path).is_empty());

        let (data, meta) = fx.root.read_file(&["a"], 1024).unwrap().unwrap();
        assert_eq!(data, b"two!");
        assert_eq!(meta.kind, Kind::File);
        assert_eq!(meta.len, 4);
        assert_eq!(meta.mtime_ns, m.mtime_ns);
        assert_eq!(fx.root.stat(&["a"]).unwrap().unwrap(), meta);
    }

    #[test]
    fn link_file_guarded_links_atomically_only_the_checked_file() {
        let fx = fixture();
        let m = file_meta(0o640);
        std::fs::create_dir(fx.root_path.join("d")).unwrap();
        fx.root
            .replace_file(&["a"], b"one", &m, &hash(b"one"))
            .unwrap();
        let checked = fx.root.stat(&["a"]).unwrap().unwrap();
        assert_eq!(checked.nlink, 1);
        // A new name, in another directory.
        let r = fx
            .root
            .link_file_guarded(&["d", "b"], &["a"], &checked, Expect::Absent)
            .unwrap();
        assert!(r.displaced.is_none());
        let b = std::fs::metadata(fx.root_path.join("d/b")).unwrap();
        assert_eq!((b.ino(), b.nlink()), (checked.ino, 2));
        assert_eq!(fx.root.stat(&["a"]).unwrap().unwrap().nlink, 2);
        // Again: nothing changes.
        fx.root
            .link_file_guarded(&["d", "b"], &["a"], &checked, Expect::Absent)
            .unwrap();
        assert_eq!(
            std::fs::metadata(fx.root_path.join("a")).unwrap().nlink(),
            2
        );
        // Over an existing file that was checked: it goes.
        std::fs::write(fx.root_path.join("c"), b"old c").unwrap();
        let c = fx.root.stat(&["c"]).unwrap().unwrap();
        let expect = Expect::File {
            ino: c.ino,
            dev: c.dev,
            len: c.len,
            mtime_ns: c.mtime_ns,
        };
        let r = fx
            .root
            .link_file_guarded(&["c"], &["a"], &checked, expect)
            .unwrap();
        assert!(r.displaced.is_none());
        assert_eq!(std::fs::read(fx.root_path.join("c")).unwrap(), b"one");
        assert_eq!(
            std::fs::metadata(fx.root_path.join("a")).unwrap().nlink(),
            3
        );
        // Over a file that is not the one checked: set aside, not deleted.
        std::fs::write(fx.root_path.join("e"), b"edited by hand").unwrap();
        let r = fx
            .root
            .link_file_guarded(&["e"], &["a"], &checked, Expect::Absent)
            .unwrap();
        let aside = r.displaced.expect("the unexpected file is kept");
        let aside = fx.root_path.join(std::str::from_utf8(&aside[0]).unwrap());
        assert_eq!(std::fs::read(&aside).unwrap(), b"edited by hand");
        std::fs::remove_file(&aside).unwrap();
        // A target that changed since it was checked is not linked.
        fx.root
            .replace_file(&["a"], b"two", &m, &hash(b"two"))
            .unwrap();
        let err = fx
            .root
            .link_file_guarded(&["f"], &["a"], &checked, Expect::Absent)
            .unwrap_err();
        assert!(
            err.to_string().contains("not the file that was checked"),
            "{err}"
        );
        assert!(!fx.root_path.join("f").exists());
        // Never through or to a symlink.
        symlink(&fx.outside, fx.root_path.join("evil")).unwrap();
        let x = std::fs::metadata(fx.outside.join("x")).unwrap();
        let mut outside = checked;
        outside.ino = x.ino();
        outside.dev = x.dev();
        assert!(fx
            .root
            .link_file_guarded(&["g"], &["evil", "x"], &outside, Expect::Absent)
            .is_err());
        assert!(fx
            .root
            .link_file_guarded(&["evil", "g"], &["a"], &checked, Expect::Absent)
            .is_err());
        symlink("a", fx.root_path.join("sl")).unwrap();
        assert!(fx
            .root
            .link_file_guarded(&["h"], &["sl"], &checked, Expect::Absent)
            .is_err());
        assert!(!fx.root_path.join("h").exists() && !fx.root_path.join("g").exists());
        assert_eq!(std::fs::metadata(fx.outside.join("x")).unwrap().nlink(), 1);
        assert!(temp_leftovers(&fx.root_path).is_empty());
        assert!(temp_leftovers(&fx.root_path.join("d")).is_empty());
    }

    #[test]
    fn wrong_hash_leaves_old_file_and_no_temp() {
        let fx = fixture();
        let m = file_meta(0o600);
        fx.root
            .replace_file(&["f"], b"old", &m, &hash(b"old"))
            .unwrap();
        // The directory's own mtime moves (a temporary entry came and went);
        // every entry in it must be exactly as it was.
        let entries = |p: &Path| {
            let mut s = snapshot(p);
            s.remove(Path::new(""));
            s
        };
        let before = entries(&fx.root_path);
        let err = fx
            .root
            .replace_file(&["f"], b"new", &m, &hash(b"something else"))
            .unwrap_err();
        assert!(matches!(err, FsError::HashMismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(fx.root_path.to_str().unwrap()) && msg.contains(" f "),
            "{msg}"
        );
        assert_eq!(entries(&fx.root_path), before);
        assert!(temp_leftovers(&fx.root_path).is_empty());
    }

    #[test]
    fn missing_parent_is_an_error_and_leaves_nothing() {
        let fx = fixture();
        let m = file_meta(0o600);
        let err = fx
            .root
            .replace_file(&["nodir", "f"], b"x", &m, &hash(b"x"))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(2), "{err}");
        assert!(std::fs::read_dir(&fx.root_path).unwrap().next().is_none());
    }

    #[test]
    fn setuid_and_sticky_modes_kept() {
        let fx = fixture();
        fx.root
            .replace_file(
                &["su"],
                b"#!/bin/sh\n",
                &file_meta(0o4755),
                &hash(b"#!/bin/sh\n"),
            )
            .unwrap();
        assert_eq!(fx.root.stat(&["su"]).unwrap().unwrap().mode, 0o4755);
        fx.root
            .replace_file(&["sg"], b"", &file_meta(0o2750), &hash(b""))
            .unwrap();
        assert_eq!(fx.root.stat(&["sg"]).unwrap().unwrap().mode, 0o2750);

        let (uid, gid) = me();
        let dm = FileMeta::new(Kind::Dir, 0o1777, uid, gid, 1_500_000_000_000_000_000);
        fx.root.make_dir(&["tmp"], &dm).unwrap();
        fx.root.make_dir(&["tmp"], &dm).unwrap(); // idempotent
        let st = fx.root.stat(&["tmp"]).unwrap().unwrap();
        assert_eq!(
            (st.kind, st.mode, st.mtime_ns),
            (Kind::Dir, 0o1777, dm.mtime_ns)
        );
        let dm2 = FileMeta { mode: 0o2755, ..dm };
        fx.root.make_dir(&["tmp"], &dm2).unwrap();
        assert_eq!(fx.root.stat(&["tmp"]).unwrap().unwrap().mode, 0o2755);
    }

    #[test]
    fn owner_set_and_setuid_survives_chown() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let fx = fixture();
        let m = FileMeta::new(Kind::File, 0o4750, 65534, 65534, 0);
        fx.root
            .replace_file(&["owned"], b"data", &m, &hash(b"data"))
            .unwrap();
        let md = std::fs::symlink_metadata(fx.root_path.join("owned")).unwrap();
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (65534, 65534, 0o4750)
        );
        assert_eq!(md.mtime(), 0);

        let dm = FileMeta::new(Kind::Dir, 0o750, 65534, 65534, 0);
        fx.root.make_dir(&["d"], &dm).unwrap();
        let md = std::fs::symlink_metadata(fx.root_path.join("d")).unwrap();
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (65534, 65534, 0o750)
        );

        // set_meta back to root without rewriting the content.
        let ino = fx.root.stat(&["owned"]).unwrap().unwrap().ino;
        let back = FileMeta::new(Kind::File, 0o640, 0, 0, 5_000_000_000);
        assert!(fx.root.set_meta(&["owned"], &back).unwrap());
        assert!(!fx.root.set_meta(&["owned"], &back).unwrap());
        let st = fx.root.stat(&["owned"]).unwrap().unwrap();
        assert_eq!(
            (st.uid, st.gid, st.mode, st.mtime_ns, st.ino),
            (0, 0, 0o640, 5_000_000_000, ino)
        );
    }

    /// Run as another user (e.g. `setpriv --reuid=65534 <test binary>`):
    /// an owner it cannot set is an error, never silently dropped, and the
    /// old version stays.
    #[test]
    fn foreign_owner_without_privilege_is_an_error() {
        if is_root() {
            eprintln!("skipped: meaningful only when not root");
            return;
        }
        let fx = fixture();
        fx.root
            .replace_file(&["f"], b"old", &file_meta(0o600), &hash(b"old"))
            .unwrap();
        let m = FileMeta::new(Kind::File, 0o600, 0, 0, 0);
        let err = fx
            .root
            .replace_file(&["f"], b"new", &m, &hash(b"new"))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(1), "{err}");
        assert_eq!(std::fs::read(fx.root_path.join("f")).unwrap(), b"old");
        assert!(temp_leftovers(&fx.root_path).is_empty());
    }

    #[test]
    fn symlink_parent_never_followed() {
        let fx = fixture();
        symlink(&fx.outside, fx.root_path.join("evil")).unwrap();
        symlink("../outside", fx.root_path.join("rel")).unwrap();
        let before = snapshot(&fx.outside);
        let m = file_meta(0o644);
        let (uid, gid) = me();
        let dm = FileMeta::new(Kind::Dir, 0o755, uid, gid, 0);

        for link in ["evil", "rel"] {
            let err = fx
                .root
                .replace_file(&[link, "x"], b"pwned", &m, &hash(b"pwned"))
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    FsError::WrongKind {
                        found: "a symlink",
                        ..
                    }
                ),
                "{err}"
            );
            let err = fx
                .root
                .replace_file(&[link, "new"], b"pwned", &m, &hash(b"pwned"))
                .unwrap_err();
            assert!(matches!(err, FsError::WrongKind { .. }), "{err}");
            assert!(fx.root.make_dir(&[link, "newdir"], &dm).is_err());
            assert!(fx.root.make_symlink(&[link, "l"], b"/etc").is_err());
            assert!(fx.root.remove(&[link, "x"]).is_err());
            assert!(fx.root.remove(&[link, "sub"]).is_err());
            assert!(fx.root.set_meta(&[link, "x"], &m).is_err());
            assert!(fx.root.read_file(&[link, "shadow"], 1024).is_err());
            assert!(fx.root.stat(&[link, "shadow"]).is_err());
            assert!(fx.root.list_dir(&[link]).is_err());
            let q = tempfile::tempdir().unwrap();
            let qroot = Root::open(q.path()).unwrap();
            assert!(fx.root.move_aside(&[link, "x"], &qroot, &["q"]).is_err());
            assert!(qroot.replace_file(&["a"], b"a", &m, &hash(b"a")).is_ok());
            assert!(fx.root.move_aside(&["nothing"], &qroot, &["q"]).is_ok());
        }
        assert_eq!(
            snapshot(&fx.outside),
            before,
            "nothing outside the root changed"
        );
        let err = fx
            .root
            .read_file(&["evil", "x"], 10)
            .unwrap_err()
            .to_string();
        assert!(err.contains("evil is a symlink"), "{err}");
    }

    #[test]
    fn symlink_leaf_is_replaced_or_removed_not_followed() {
        let fx = fixture();
        symlink(fx.outside.join("shadow"), fx.root_path.join("shadow")).unwrap();
        symlink(&fx.outside, fx.root_path.join("evil")).unwrap();
        let before = snapshot(&fx.outside);

        let err = fx.root.read_file(&["shadow"], 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                FsError::WrongKind {
                    found: "a symlink",
                    ..
                }
            ),
            "{err}"
        );
        let err = fx.root.read_file(&["evil"], 1 << 20).unwrap_err();
        assert!(matches!(err, FsError::WrongKind { .. }), "{err}");
        let (uid, gid) = me();
        let err = fx
            .root
            .make_dir(&["evil"], &FileMeta::new(Kind::Dir, 0o700, uid, gid, 0))
            .unwrap_err();
        assert!(
            matches!(
                err,
                FsError::WrongKind {
                    found: "a symlink",
                    ..
                }
            ),
            "{err}"
        );
        let err = fx
            .root
            .set_meta(&["shadow"], &file_meta(0o777))
            .unwrap_err();
        assert!(matches!(err, FsError::WrongKind { .. }), "{err}");

        // Replacing the link's name replaces the link, never its target.
        fx.root
            .replace_file(&["shadow"], b"mine", &file_meta(0o600), &hash(b"mine"))
            .unwrap();
        assert_eq!(fx.root.stat(&["shadow"]).unwrap().unwrap().kind, Kind::File);
        // Removing the link removes the link only.
        assert!(fx.root.remove(&["evil"]).unwrap());
        assert!(!fx.root.remove(&["evil"]).unwrap());
        assert!(fx.root.stat(&["evil"]).unwrap().is_none());
        assert_eq!(snapshot(&fx.outside), before);
    }

    #[test]
    fn parent_that_is_a_file_is_an_error() {
        let fx = fixture();
        let m = file_meta(0o600);
        fx.root.replace_file(&["f"], b"x", &m, &hash(b"x")).unwrap();
        let err = fx
            .root
            .replace_file(&["f", "y"], b"y", &m, &hash(b"y"))
            .unwrap_err();
        assert!(
            matches!(
                err,
                FsError::WrongKind {
                    found: "a regular file",
                    ..
                }
            ),
            "{err}"
        );
        assert!(fx.root.stat(&["f", "y"]).is_err());
        assert!(fx.root.remove(&["f", "y"]).is_err());
        let err = fx.root.read_file(&[] as &[&str], 1).unwrap_err();
        assert!(matches!(err, FsError::BadPath { .. }), "{err}");
    }

    #[test]
    fn remove_tree_with_symlink_out_deletes_only_the_link() {
        let fx = fixture();
        let base = fx.root_path.join("tree");
        std::fs::create_dir_all(base.join("a/b/c")).unwrap();
        std::fs::write(base.join("a/f"), b"1").unwrap();
        std::fs::write(base.join("a/b/c/g"), b"2").unwrap();
        symlink(&fx.outside, base.join("a/b/out")).unwrap();
        symlink(fx.outside.join("shadow"), base.join("a/b/c/shadowlink")).unwrap();
        if is_root() {
            // Root removes even from a read-only directory, as `rm -rf` does.
            std::fs::set_permissions(base.join("a/b"), std::fs::Permissions::from_mode(0o500))
                .unwrap();
        }
        let before = snapshot(&fx.outside);
        assert!(fx.root.remove(&["tree"]).unwrap());
        assert!(!fx.root_path.join("tree").exists());
        assert_eq!(snapshot(&fx.outside), before);
        assert!(fx
            .root
            .list_dir(&[] as &[&str])
            .unwrap()
            .unwrap()
            .is_empty());
    }

    #[test]
    fn make_symlink_stores_target_verbatim() {
        let fx = fixture();
        for target in [
            &b"../../etc/shadow"[..],
            b"/etc",
            b"no such \xff target",
            b"a//b/./c",
        ] {
            fx.root.make_symlink(&["l"], target).unwrap();
            let got = std::fs::read_link(fx.root_path.join("l")).unwrap();
            assert_eq!(got.as_os_str().as_bytes(), target);
            assert_eq!(fx.root.read_link(&["l"]).unwrap().unwrap(), target);
        }
        assert_eq!(fx.root.stat(&["l"]).unwrap().unwrap().kind, Kind::Symlink);
        // Replaces a regular file atomically too.
        fx.root
            .replace_file(&["f"], b"x", &file_meta(0o600), &hash(b"x"))
            .unwrap();
        fx.root.make_symlink(&["f"], b"target").unwrap();
        assert_eq!(fx.root.read_link(&["f"]).unwrap().unwrap(), b"target");
        assert!(fx.root.make_symlink(&["e"], b"").is_err());
        assert!(fx.root.read_link(&["nothing"]).unwrap().is_none());
        let (uid, gid) = me();
        fx.root
            .make_dir(&["d"], &FileMeta::new(Kind::Dir, 0o755, uid, gid, 0))
            .unwrap();
        assert!(fx.root.make_symlink(&["d"], b"x").is_err());
        assert!(matches!(
            fx.root.read_link(&["d"]).unwrap_err(),
            FsError::WrongKind { .. }
        ));
        assert!(temp_leftovers(&fx.root_path).is_empty());
    }

    #[test]
    fn bad_components_refused() {
        let fx = fixture();
        let m = file_meta(0o600);
        let bad: [&[&str]; 6] = [&[".."], &[""], &["a/b"], &["."], &["ok", ".."], &["a\0b"]];
        for comps in bad {
            let err = fx
                .root
                .replace_file(comps, b"x", &m, &hash(b"x"))
                .unwrap_err();
            assert!(matches!(err, FsError::BadPath { .. }), "{comps:?}: {err}");
            assert!(matches!(
                fx.root.remove(comps).unwrap_err(),
                FsError::BadPath { .. }
            ));
            assert!(matches!(
                fx.root.stat(comps).unwrap_err(),
                FsError::BadPath { .. }
            ));
            assert!(matches!(
                fx.root.read_file(comps, 9).unwrap_err(),
                FsError::BadPath { .. }
            ));
            assert!(matches!(
                fx.root.make_symlink(comps, b"x").unwrap_err(),
                FsError::BadPath { .. }
            ));
        }
        let os: [&OsStr; 2] = [OsStr::new("ok"), OsStr::from_bytes(b"..")];
        assert!(matches!(
            fx.root.stat(&os).unwrap_err(),
            FsError::BadPath { .. }
        ));
        let raw: [&[u8]; 1] = [b"fine"];
        assert!(fx.root.stat(&raw).unwrap().is_none());
        assert!(fx.root.stat(&["a\nforged log line"]).unwrap().is_none());
        let msg = fx
            .root
            .replace_file(&["x\ny", ".."], b"", &m, &hash(b""))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("x\\ny/..") && !msg.contains('\n'), "{msg}");
    }

    #[test]
    fn read_file_limits_and_kinds() {
        let fx = fixture();
        fx.root
            .replace_file(&["big"], &[7u8; 100], &file_meta(0o600), &hash(&[7u8; 100]))
            .unwrap();
        assert!(matches!(
            fx.root.read_file(&["big"], 99).unwrap_err(),
            FsError::TooLarge { .. }
        ));
        assert_eq!(
            fx.root.read_file(&["big"], 100).unwrap().unwrap().0.len(),
            100
        );
        assert!(fx.root.read_file(&["none"], 100).unwrap().is_none());
        assert!(fx
            .root
            .read_file(&["nodir", "none"], 100)
            .unwrap()
            .is_none());
        std::fs::create_dir(fx.root_path.join("d")).unwrap();
        let err = fx.root.read_file(&["d"], 100).unwrap_err();
        assert!(
            matches!(
                err,
                FsError::WrongKind {
                    found: "a directory",
                    ..
                }
            ),
            "{err}"
        );
        // A FIFO must not hang the reader.
        let fifo = fx.root_path.join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        rfs::mknodat(
            rfs::CWD,
            c.as_c_str(),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let err = fx.root.read_file(&["fifo"], 100).unwrap_err();
        assert!(
            matches!(
                err,
                FsError::WrongKind {
                    found: "a special file",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(fx.root.stat(&["fifo"]).unwrap().unwrap().kind, Kind::Other);
        assert!(fx.root.remove(&["fifo"]).unwrap());
    }

    #[test]
    fn root_must_be_a_real_directory() {
        let fx = fixture();
        symlink(&fx.outside, fx.base.join("link")).unwrap();
        assert!(matches!(
            Root::open(&fx.base.join("link")).unwrap_err(),
            FsError::WrongKind { .. }
        ));
        assert!(matches!(
            Root::open(&fx.outside.join("x")).unwrap_err(),
            FsError::WrongKind { .. }
        ));
        assert_eq!(
            Root::open(&fx.base.join("none"))
                .unwrap_err()
                .raw_os_error(),
            Some(2)
        );
    }

    #[test]
    fn move_aside_same_filesystem() {
        let fx = fixture();
        let qpath = fx.base.join("quarantine");
        std::fs::create_dir(&qpath).unwrap();
        let q = Root::open(&qpath).unwrap();
        fx.root
            .replace_file(
                &["shadow"],
                b"hand edit",
                &file_meta(0o640),
                &hash(b"hand edit"),
            )
            .unwrap();
        let orig = fx.root.stat(&["shadow"]).unwrap().unwrap();
        assert!(fx
            .root
            .move_aside(&["shadow"], &q, &["tacacs", "1-7", "shadow"])
            .unwrap());
        assert!(fx.root.stat(&["shadow"]).unwrap().is_none());
        let (data, moved) = q
            .read_file(&["tacacs", "1-7", "shadow"], 100)
            .unwrap()
            .unwrap();
        assert_eq!(data, b"hand edit");
        assert_eq!(moved, orig, "same inode, mode, owner and mtime");
        let parent = q.stat(&["tacacs", "1-7"]).unwrap().unwrap();
        assert_eq!(parent.mode, 0o700);
        // Never overwrites an earlier quarantined version.
        fx.root
            .replace_file(&["shadow"], b"again", &file_meta(0o640), &hash(b"again"))
            .unwrap();
        let err = fx
            .root
            .move_aside(&["shadow"], &q, &["tacacs", "1-7", "shadow"])
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(17), "{err}");
        assert_eq!(
            q.read_file(&["tacacs", "1-7", "shadow"], 100)
                .unwrap()
                .unwrap()
                .0,
            b"hand edit"
        );
        assert!(!fx.root.move_aside(&["absent"], &q, &["x"]).unwrap());
    }

    /// The copy path used across filesystems, exercised directly, and for
    /// real when /dev/shm is another filesystem.
    #[test]
    fn move_aside_by_copy_keeps_content_mode_owner() {
        let fx = fixture();
        let (uid, gid) = me();
        let (fuid, fgid) = if is_root() {
            (65534, 65534)
        } else {
            (uid, gid)
        };
        let dm = FileMeta::new(Kind::Dir, 0o2750, fuid, fgid, 3_000_000_000);
        fx.root
            .make_dir(&["d"], &FileMeta::new(Kind::Dir, 0o755, uid, gid, 0))
            .unwrap();
        fx.root
            .make_dir(&["d", "sub"], &FileMeta::new(Kind::Dir, 0o755, uid, gid, 0))
            .unwrap();
        let fm = FileMeta::new(Kind::File, 0o4710, fuid, fgid, 1_234_567_890_000_000_001);
        fx.root
            .replace_file(&["d", "sub", "f"], b"content", &fm, &hash(b"content"))
            .unwrap();
        fx.root
            .make_symlink(&["d", "link"], b"/etc/passwd")
            .unwrap();
        fx.root.set_meta(&["d"], &dm).unwrap();
        let before = snapshot(&fx.root_path.join("d"));
        let outside_before = snapshot(&fx.outside);

        let qpath = fx.base.join("q");
        std::fs::create_dir(&qpath).unwrap();
        let q = Root::open(&qpath).unwrap();
        {
            let comps = fx.root.check(&["d"], false).unwrap();
            let (sdir, sleaf) = fx.root.open_parent(&comps, None).unwrap().unwrap();
            let st = fx.root.lstat_at(&sdir, sleaf, "d").unwrap().unwrap();
            let (ddir, _) = q.open_parent(&[b"d".as_slice()], None).unwrap().unwrap();
            fx.root
                .copy_entry(&sdir, sleaf, &st, &q, &ddir, b"copy", "d", "copy", 0)
                .unwrap();
        }
        let after = snapshot(&qpath.join("copy"));
        // Inode numbers differ on a copy; everything else must match.
        let strip = |m: BTreeMap<PathBuf, String>| -> BTreeMap<PathBuf, String> {
            m.into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        v.split(' ')
                            .filter(|w| !w.starts_with("ino="))
                            .collect::<Vec<_>>()
                            .join(" "),
                    )
                })
                .collect()
        };
        assert_eq!(strip(after), strip(before.clone()));
        assert!(temp_leftovers(&qpath).is_empty());
        assert_eq!(snapshot(&fx.outside), outside_before);

        // Across a real filesystem boundary if this machine has one.
        let shm = Path::new("/dev/shm");
        let other_fs = std::fs::metadata(shm)
            .map(|m| m.dev() != std::fs::metadata(&fx.base).unwrap().dev())
            .unwrap_or(false);
        if other_fs {
            let qd = tempfile::tempdir_in(shm).unwrap();
            let q2 = Root::open(qd.path()).unwrap();
            assert!(fx.root.move_aside(&["d"], &q2, &["set", "d"]).unwrap());
            assert!(fx.root.stat(&["d"]).unwrap().is_none());
            assert_eq!(strip(snapshot(&qd.path().join("set/d"))), strip(before));
        } else {
            eprintln!("no second filesystem: real cross-device move not exercised");
        }
    }

    #[test]
    fn list_dir_reports_kinds() {
        let fx = fixture();
        fx.root
            .replace_file(&["f"], b"", &file_meta(0o600), &hash(b""))
            .unwrap();
        fx.root.make_symlink(&["l"], b"f").unwrap();
        let (uid, gid) = me();
        fx.root
            .make_dir(&["d"], &FileMeta::new(Kind::Dir, 0o700, uid, gid, 0))
            .unwrap();
        let got = fx.root.list_dir(&[] as &[&str]).unwrap().unwrap();
        assert_eq!(
            got,
            vec![
                (b"d".to_vec(), Kind::Dir),
                (b"f".to_vec(), Kind::File),
                (b"l".to_vec(), Kind::Symlink)
            ]
        );
        assert!(fx.root.list_dir(&["none"]).unwrap().is_none());
        assert!(matches!(
            fx.root.list_dir(&["l"]).unwrap_err(),
            FsError::WrongKind { .. }
        ));
    }

    #[test]
    fn bad_meta_refused() {
        let fx = fixture();
        let bad = [
            FileMeta {
                kind: Kind::Dir,
                ..file_meta(0o600)
            },
            FileMeta {
                uid: u32::MAX,
                ..file_meta(0o600)
            },
            FileMeta {
                mtime_ns: i128::MAX,
                ..file_meta(0o600)
            },
        ];
        for m in &bad {
            let err = fx
                .root
                .replace_file(&["f"], b"", m, &hash(b""))
                .unwrap_err();
            assert!(matches!(err, FsError::BadMeta { .. }), "{m:?}: {err}");
        }
        assert!(fx.root.stat(&["f"]).unwrap().is_none());
        let m = FileMeta {
            mtime_ns: -1_500_000_000,
            ..file_meta(0o600)
        };
        fx.root.replace_file(&["f"], b"", &m, &hash(b"")).unwrap();
        assert_eq!(
            fx.root.stat(&["f"]).unwrap().unwrap().mtime_ns,
            -1_500_000_000
        );
    }
    /// A POSIX access ACL as the kernel stores it: user rw, user 1234 r,
    /// group r, mask `mask`, other none.
    fn acl(mask: u16) -> Vec<u8> {
        let mut out = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (0x01u16, 6u16, u32::MAX),
            (0x02, 4, 1234),
            (0x04, 4, u32::MAX),
            (0x10, mask, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            out.extend(tag.to_le_bytes());
            out.extend(perm.to_le_bytes());
            out.extend(id.to_le_bytes());
        }
        out
    }

    fn xa(pairs: &[(&str, &[u8])]) -> Xattrs {
        pairs
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.to_vec()))
            .collect()
    }

    /// Whether the test filesystem keeps user xattrs (tmpfs before 6.6
    /// does not); the xattr tests say so and pass otherwise.
    fn user_xattrs_work(dir: &Path) -> bool {
        let probe = dir.join("probe");
        std::fs::write(&probe, b"").unwrap();
        let ok = rfs::setxattr(&probe, "user.probe", b"1", XattrFlags::empty()).is_ok();
        std::fs::remove_file(&probe).unwrap();
        if !ok {
            eprintln!("skipped: {} keeps no user xattrs", dir.display());
        }
        ok
    }

    #[test]
    fn xattrs_are_set_on_the_temporary_file_and_only_replicated_names_touched() {
        let fx = fixture();
        if !user_xattrs_work(&fx.root_path) {
            return;
        }
        let root = &fx.root;
        let want = xa(&[
            ("system.posix_acl_access", &acl(6)),
            ("user.a", b"1"),
            ("user.empty", b""),
        ]);
        let meta = file_meta(0o660);
        root.replace_file_guarded(
            &["f"],
            b"data",
            &meta,
            &hash(b"data"),
            true,
            Some(&want),
            Expect::Anything,
        )
        .unwrap();
        assert_eq!(root.read_xattrs(&["f"]).unwrap().unwrap(), want);
        let on_disk = std::fs::metadata(fx.root_path.join("f")).unwrap();
        assert_eq!(on_disk.mode() & 0o7777, 0o660);

        // Another namespace (an LSM label, say) is never read nor removed.
        let foreign = is_root()
            && rfs::setxattr(
                fx.root_path.join("f"),
                "trusted.keep",
                b"x",
                XattrFlags::empty(),
            )
            .is_ok();
        // Change one value, drop the ACL and one name.
        let want2 = xa(&[("user.a", b"2")]);
        assert!(root.set_xattrs(&["f"], &meta, &want2).unwrap());
        assert_eq!(root.read_xattrs(&["f"]).unwrap().unwrap(), want2);
        assert!(
            !root.set_xattrs(&["f"], &meta, &want2).unwrap(),
            "idempotent"
        );
        // Removing the ACL left the mode as committed.
        let on_disk = std::fs::metadata(fx.root_path.join("f")).unwrap();
        assert_eq!(on_disk.mode() & 0o7777, 0o660);
        if foreign {
            let mut buf = [0u8; 8];
            let n = rfs::getxattr(fx.root_path.join("f"), "trusted.keep", &mut buf[..]).unwrap();
            assert_eq!(&buf[..n], b"x");
        }
        // A name outside the replicated ones is refused before any change.
        let err = root
            .set_xattrs(&["f"], &meta, &xa(&[("security.selinux", b"x")]))
            .unwrap_err();
        assert!(err.to_string().contains("security.selinux"), "{err}");
        assert_eq!(root.read_xattrs(&["f"]).unwrap().unwrap(), want2);
        assert!(!root.xattrs_unsupported_notice());
    }

    #[test]
    fn xattrs_of_directories_are_kept_and_symlinks_never_followed() {
        let fx = fixture();
        if !user_xattrs_work(&fx.root_path) {
            return;
        }
        let root = &fx.root;
        let (uid, gid) = me();
        let dmeta = FileMeta::new(Kind::Dir, 0o750, uid, gid, 1_600_000_000_000_000_000);
        root.make_dir(&["d"], &dmeta).unwrap();
        let want = xa(&[("system.posix_acl_default", &acl(4)), ("user.d", b"x")]);
        assert!(root.set_xattrs(&["d"], &dmeta, &want).unwrap());
        assert_eq!(root.read_xattrs(&["d"]).unwrap().unwrap(), want);

        // A link to a file outside: read as none, never written through.
        symlink(fx.outside.join("shadow"), fx.root_path.join("l")).unwrap();
        assert_eq!(root.read_xattrs(&["l"]).unwrap().unwrap(), Xattrs::new());
        let lmeta = FileMeta::new(Kind::Symlink, 0o777, uid, gid, 0);
        assert!(!root.set_xattrs(&["l"], &lmeta, &want).unwrap());
        let err = root
            .set_xattrs(&["l"], &file_meta(0o644), &want)
            .unwrap_err();
        assert!(matches!(err, FsError::WrongKind { .. }), "{err}");
        let mut buf = [0u8; 256];
        let n = rfs::listxattr(fx.outside.join("shadow"), &mut buf[..]).unwrap();
        assert!(!buf[..n].starts_with(b"user."), "written through the link");
        assert_eq!(root.read_xattrs(&["absent"]).unwrap(), None);
    }
}

#[cfg(test)]
mod listing_tests {
    use super::*;

    /// The root handle is duplicated for every call, and duplicates share
    /// the directory offset: a second listing must still see everything.
    #[test]
    fn the_root_lists_the_same_every_time() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "x").unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let root = Root::open(dir.path()).unwrap();
        let none: [&[u8]; 0] = [];
        let first = root.list_dir(&none).unwrap().unwrap();
        assert_eq!(first.len(), 2);
        for _ in 0..3 {
            assert_eq!(root.list_dir(&none).unwrap().unwrap(), first);
        }
    }
}

#[cfg(test)]
mod guarded_replace_tests {
    use super::*;

    fn new_meta() -> FileMeta {
        let uid = unsafe { libc::geteuid() };
        let gid = unsafe { libc::getegid() };
        FileMeta::new(Kind::File, 0o640, uid, gid, 1_700_000_000_000_000_000)
    }

    fn expect_of(m: &FileMeta) -> Expect {
        Expect::File {
            ino: m.ino,
            dev: m.dev,
            len: m.len,
            mtime_ns: m.mtime_ns,
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(TEMP_PREFIX))
            .collect()
    }

    /// An edit saved between the caller's check and the rename is handed
    /// back, never overwritten unseen; the checked version is replaced.
    #[test]
    fn an_edit_racing_the_rename_is_displaced_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        let new = b"committed version\n";
        let hash = *blake3::hash(new).as_bytes();
        let replace = |name: &str, expect: Expect| {
            root.replace_file_guarded(&[name], new, &new_meta(), &hash, true, None, expect)
                .unwrap()
        };

        std::fs::write(dir.path().join("a"), "old\n").unwrap();
        let checked = root.stat(&["a"]).unwrap().unwrap();
        let r = replace("a", expect_of(&checked));
        assert!(r.displaced.is_none());
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), new);
        assert!(
            leftovers(dir.path()).is_empty(),
            "the checked version is removed"
        );

        // Checked, then edited by hand before the rename.
        let checked = root.stat(&["a"]).unwrap().unwrap();
        std::fs::write(dir.path().join("a"), "edited by hand meanwhile\n").unwrap();
        let r = replace("a", expect_of(&checked));
        let at = r.displaced.expect("the edit is handed back");
        let at: Vec<&[u8]> = at.iter().map(|c| c.as_slice()).collect();
        let (kept, _) = root.read_file(&at, 1 << 20).unwrap().unwrap();
        assert_eq!(kept, b"edited by hand meanwhile\n");
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), new);

        // Nothing was there when checked, but a file appeared.
        std::fs::write(dir.path().join("b"), "created meanwhile\n").unwrap();
        let r = replace("b", Expect::Absent);
        assert!(r.displaced.is_some(), "a file that appeared is handed back");
        // Nothing there, nothing displaced.
        let r = replace("c", Expect::Absent);
        assert!(r.displaced.is_none());
        assert_eq!(std::fs::read(dir.path().join("c")).unwrap(), new);
    }
}
