//! Directories, symlinks, metadata, removal and moving aside (to the
//! quarantine): the tree operations besides file content.

use super::*;

impl Root {
    /// Creates a directory (mode 0700 until its metadata is set) or keeps
    /// the existing one, then sets mode/owner/mtime from `meta`. Idempotent.
    /// An existing non-directory (a symlink included) is an error: the
    /// caller decides whether it goes to quarantine first.
    pub fn make_dir<C: AsComponent>(&self, comps: &[C], meta: &FileMeta) -> Result<(), FsError> {
        self.make_dir_with(comps, meta, true)
    }

    /// [`Root::make_dir`], leaving its fsyncs (of the new directory and of
    /// its parent) to the caller when `sync` is false: a batch that makes
    /// its files durable with [`Root::sync_filesystem`] before renaming
    /// them in makes the directories they go into durable with them.
    pub fn make_dir_with<C: AsComponent>(
        &self,
        comps: &[C],
        meta: &FileMeta,
        sync: bool,
    ) -> Result<(), FsError> {
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
        if self.apply_meta(fd.as_fd(), meta, &path)? && sync {
            rfs::fsync(&fd).map_err(|e| self.io_err("fsync directory", path.clone(), e))?;
        }
        if created && sync {
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
        let removed = self.remove_entry(dir.as_fd(), leaf, stat_kind(&st), &path, 0);
        if stat_kind(&st) == Kind::Dir {
            self.held.forget_all();
        }
        removed?;
        rfs::fsync(&dir).map_err(|e| self.io_err("fsync the directory of", path, e))?;
        Ok(true)
    }

    pub(super) fn remove_entry(
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
    pub(super) fn empty_dir(&self, fd: OwnedFd, path: &str, depth: usize) -> Result<(), FsError> {
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
        let Some((sdir, sleaf)) = self.open_parent(&comps, None)? else {
            return Ok(false);
        };
        let Some(st) = self.lstat_at(&sdir, sleaf, &path)? else {
            return Ok(false);
        };
        let moved = self.move_entry(&sdir, sleaf, &st, dest, &dcomps, &path);
        if stat_kind(&st) == Kind::Dir {
            // A batch may have kept it, or something under it, open.
            self.held.forget_all();
            dest.held.forget_all();
        }
        moved.map(|()| true)
    }

    /// Moves the entry `st` found at `sdir/sleaf` (`path`) to `dcomps` in
    /// `dest`: see [`Root::move_aside`].
    fn move_entry(
        &self,
        sdir: &OwnedFd,
        sleaf: &[u8],
        st: &Stat,
        dest: &Root,
        dcomps: &[&[u8]],
        path: &str,
    ) -> Result<(), FsError> {
        let dpath = show(dcomps);
        let both = format!("{path} -> {}/{dpath}", dest.path.display());
        let (ddir, dleaf) = dest
            .open_parent(dcomps, Some(PRIVATE_DIR_MODE))?
            .expect("open_parent with create returns a directory");

        match rename_noreplace(sdir, sleaf, &ddir, dleaf) {
            Ok(()) => {
                rfs::fsync(&ddir).map_err(|e| dest.io_err("fsync the directory of", dpath, e))?;
                rfs::fsync(sdir).map_err(|e| self.io_err("fsync the directory of", path.into(), e))
            }
            Err(Errno::XDEV) => {
                self.copy_entry(sdir, sleaf, st, dest, &ddir, dleaf, path, &dpath, 0)?;
                rfs::fsync(&ddir).map_err(|e| dest.io_err("fsync the directory of", dpath, e))?;
                // Only now that the copy is durable does the original go.
                self.remove_entry(sdir.as_fd(), sleaf, stat_kind(st), path, 0)?;
                rfs::fsync(sdir).map_err(|e| self.io_err("fsync the directory of", path.into(), e))
            }
            Err(e) => Err(self.io_err("move aside", both, e)),
        }
    }

    /// Copies one entry from `sdir/sleaf` (this root) to `ddir/dleaf` (in
    /// `dest`), keeping content, mode, owner and mtime; directories
    /// recursively. The destination name must not exist.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn copy_entry(
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
