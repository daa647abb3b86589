//! The account databases of one directory (`/etc`) on disk, handled the way
//! shadow-utils handles them: `lckpwdf()`'s lock (an fcntl lock on
//! `.pwd.lock`) and the per-file `<file>.lock` links holding the locker's
//! pid; a `<file>-` backup of the version replaced; each file replaced
//! atomically (through [`Root`]: temporary file, fsync, verified, renamed,
//! directory fsynced) with its own mode and owner.
//!
//! Invariant owned here: the files are read for replication only while no
//! shadow-utils writer holds a lock and none changed during the read, and
//! written only under both kinds of lock, so a half-done `useradd` is never
//! read and a running one never sees a half-merged database.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::core::accounts::{DbFile, Files};
use crate::core::delta;
use crate::fs::root::{FileMeta, FsError, Kind, Root};

/// The largest database file read: far beyond any real one.
const MAX_FILE: u64 = 64 << 20;

/// Why the accounts directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum AccountsIoError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: {error}")]
    Io { path: String, error: io::Error },
    #[error("{what} in {dir} is held by {holder}; waited {waited_ms} ms (shadow-utils or an admin is changing accounts; it is tried again)")]
    Locked {
        what: String,
        dir: String,
        holder: String,
        waited_ms: u128,
    },
}

/// One accounts directory.
pub struct AccountsDir {
    root: Root,
    path: PathBuf,
}

/// Identity of a file's version: a rename or an edit changes it.
type Stamp = Option<(u64, u64, i64, i64, u64)>;

fn stamp(path: &Path) -> Stamp {
    std::fs::symlink_metadata(path).ok().map(|m| {
        (
            m.dev(),
            m.ino(),
            m.mtime_nsec() + m.mtime() * 1_000_000_000,
            m.ctime_nsec() + m.ctime() * 1_000_000_000,
            m.len(),
        )
    })
}

impl AccountsDir {
    pub fn open(path: &Path) -> Result<AccountsDir, FsError> {
        Ok(AccountsDir {
            root: Root::open(path)?,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, name: &str, error: io::Error) -> AccountsIoError {
        AccountsIoError::Io {
            path: self.path.join(name).display().to_string(),
            error,
        }
    }

    /// What identifies the current versions of the four files (to notice a
    /// change without reading them).
    pub fn stamps(&self) -> Vec<Stamp> {
        DbFile::ALL
            .iter()
            .map(|f| stamp(&self.path.join(f.name())))
            .collect()
    }

    /// The four files, read while no shadow-utils lock is held and unchanged
    /// from the first read to the last; `Ok(None)` when a writer is at work
    /// (try again shortly). For the leader, whose files are the source.
    pub fn read_quiet(&self) -> Result<Option<Files>, AccountsIoError> {
        if self.busy()?.is_some() {
            return Ok(None);
        }
        let before = self.stamps();
        let files = self.read()?;
        if self.busy()?.is_some() || self.stamps() != before {
            return Ok(None);
        }
        Ok(Some(files))
    }

    /// The four files as they are (`None` for a missing one).
    pub fn read(&self) -> Result<Files, AccountsIoError> {
        let mut files = Files::default();
        for f in DbFile::ALL {
            *files.slot(f) = self.root.read_file(&[f.name()], MAX_FILE)?.map(|(b, _)| b);
        }
        Ok(files)
    }

    /// Who holds a lock on the databases now, if anyone: a live
    /// `<file>.lock`, or `lckpwdf()`'s lock.
    pub fn busy(&self) -> Result<Option<String>, AccountsIoError> {
        for f in DbFile::ALL {
            let name = format!("{}.lock", f.name());
            if let Some(pid) = self.lock_holder(&name)? {
                return Ok(Some(format!("{name} (pid {pid})")));
            }
        }
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.path.join(PWD_LOCK))
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(PWD_LOCK, e)),
        };
        let mut fl = flock(libc::F_WRLCK as libc::c_short);
        // SAFETY: a valid descriptor and a valid `flock` for F_OFD_GETLK.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        if rc < 0 {
            return Err(self.io(PWD_LOCK, io::Error::last_os_error()));
        }
        Ok((fl.l_type != libc::F_UNLCK as libc::c_short).then(|| format!("{PWD_LOCK} (lckpwdf)")))
    }

    /// The pid in the lock file `name` if that process is alive (0: no
    /// readable pid, held all the same); a stale lock (its process gone, or
    /// our own pid left by an earlier run) is `None`.
    fn lock_holder(&self, name: &str) -> Result<Option<i32>, AccountsIoError> {
        let mut text = String::new();
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(self.path.join(name))
        {
            Ok(f) => {
                let _ = f.take(64).read_to_string(&mut text);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(name, e)),
        }
        // shadow-utils writes the pid and a NUL. A lock without a readable
        // pid is held (pid 0), as shadow-utils treats it: never removed.
        let Ok(pid) = text
            .trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .parse::<i32>()
        else {
            return Ok(Some(0));
        };
        if pid <= 0 || pid == std::process::id() as i32 {
            return Ok(None);
        }
        // SAFETY: signal 0 only checks that the process exists.
        let rc = unsafe { libc::kill(pid, 0) };
        let alive = rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        Ok(alive.then_some(pid))
    }

    /// Takes `lckpwdf()`'s lock and the four `<file>.lock` files as
    /// shadow-utils does, waiting up to `wait` for a writer to finish.
    pub fn lock(&self, wait: Duration) -> Result<Locked<'_>, AccountsIoError> {
        let start = Instant::now();
        let pwd = OpenOptions::new()
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.path.join(PWD_LOCK))
            .map_err(|e| self.io(PWD_LOCK, e))?;
        loop {
            let fl = flock(libc::F_WRLCK as libc::c_short);
            // SAFETY: a valid descriptor and a valid `flock` for F_OFD_SETLK.
            let rc = unsafe { libc::fcntl(pwd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
            if rc == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
                return Err(self.io(PWD_LOCK, e));
            }
            self.wait_or_fail(start, wait, PWD_LOCK, "lckpwdf()".into())?;
        }
        let mut locked = Locked {
            dir: self,
            _pwd: pwd,
            links: Vec::new(),
            backed_up: Vec::new(),
        };
        for f in DbFile::ALL {
            if !self.path.join(f.name()).exists() {
                continue;
            }
            locked.link_lock(f, start, wait)?;
        }
        Ok(locked)
    }

    fn wait_or_fail(
        &self,
        start: Instant,
        wait: Duration,
        what: &str,
        holder: String,
    ) -> Result<(), AccountsIoError> {
        if start.elapsed() >= wait {
            return Err(AccountsIoError::Locked {
                what: what.to_string(),
                dir: self.path.display().to_string(),
                holder,
                waited_ms: start.elapsed().as_millis(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
        Ok(())
    }
}

/// The file `lckpwdf()` locks (glibc: `/etc/.pwd.lock`).
const PWD_LOCK: &str = ".pwd.lock";

fn flock(l_type: libc::c_short) -> libc::flock {
    // SAFETY: all-zero is a valid `flock` (whole file from offset 0, pid 0
    // as OFD locks require).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl
}

/// The databases locked as shadow-utils locks them; unlocked on drop.
pub struct Locked<'a> {
    dir: &'a AccountsDir,
    /// Holds the fcntl lock of `.pwd.lock` while open.
    _pwd: File,
    /// The `<file>.lock` links this node made.
    links: Vec<String>,
    /// Files whose `-` backup this lock already wrote.
    backed_up: Vec<DbFile>,
}

impl Locked<'_> {
    /// shadow-utils' lock: a file holding our pid, hard-linked to
    /// `<file>.lock` (the link fails if another holds it); a lock whose
    /// process is gone is removed.
    fn link_lock(
        &mut self,
        f: DbFile,
        start: Instant,
        wait: Duration,
    ) -> Result<(), AccountsIoError> {
        let dir = self.dir;
        let pid = std::process::id();
        let tmp = format!("{}.{pid}", f.name());
        let lock = format!("{}.lock", f.name());
        let tmp_path = dir.path.join(&tmp);
        let mut t = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp_path)
            .map_err(|e| dir.io(&tmp, e))?;
        let written = write!(t, "{pid}").and_then(|_| t.sync_all());
        drop(t);
        let result = (|| loop {
            written
                .as_ref()
                .map_err(|e| dir.io(&tmp, io::Error::new(e.kind(), e.to_string())))?;
            match std::fs::hard_link(&tmp_path, dir.path.join(&lock)) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    match dir.lock_holder(&lock)? {
                        None => {
                            if let Err(e) = std::fs::remove_file(dir.path.join(&lock)) {
                                let why = format!("a stale lock that cannot be removed ({e})");
                                dir.wait_or_fail(start, wait, &lock, why)?;
                            }
                        }
                        Some(0) => {
                            let why = "a lock file without a pid".to_string();
                            dir.wait_or_fail(start, wait, &lock, why)?
                        }
                        Some(holder) => {
                            dir.wait_or_fail(start, wait, &lock, format!("pid {holder}"))?
                        }
                    }
                }
                Err(e) => return Err(dir.io(&lock, e)),
            }
        })();
        let _ = std::fs::remove_file(&tmp_path);
        result?;
        self.links.push(lock);
        Ok(())
    }

    /// Replaces database `f` with `bytes`, atomically, with the mode and
    /// owner the file has; the version it replaces becomes `<file>-` (once
    /// per lock: the backup is the state before this merge).
    pub fn write(&mut self, f: DbFile, bytes: &[u8]) -> Result<(), AccountsIoError> {
        let root = &self.dir.root;
        let Some((old, meta)) = root.read_file(&[f.name()], MAX_FILE)? else {
            return Err(self
                .dir
                .io(f.name(), io::Error::from(io::ErrorKind::NotFound)));
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let keep = FileMeta::new(Kind::File, meta.mode, meta.uid, meta.gid, now);
        if !self.backed_up.contains(&f) {
            let backup = format!("{}-", f.name());
            root.replace_file(&[backup.as_str()], &old, &keep, &delta::digest(&old).hash)?;
            self.backed_up.push(f);
        }
        root.replace_file(&[f.name()], bytes, &keep, &delta::digest(bytes).hash)?;
        Ok(())
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        for l in self.links.drain(..).rev() {
            let _ = std::fs::remove_file(self.dir.path.join(l));
        }
    }
}
