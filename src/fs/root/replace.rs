//! Replacing and adopting a file atomically (invariant 2): write or link a
//! verified version next to the leaf, swap it in, fsync the directory; the
//! guarded forms displace only the entry the caller checked.

use super::*;

impl Root {
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
        let ours = self.write_verified(&mut file, &path, data, meta, expected, xattrs, true)?;
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

    /// Writes `data` to the new temporary `file` for `path` with `meta` (and
    /// exactly `xattrs`), fsyncs it when `fsync`, and verifies by reading it
    /// back that its blake3 hash is `expected`. Returns its stat, which the
    /// rename checks the temporary name against (the rename is by name).
    #[allow(clippy::too_many_arguments)]
    fn write_verified(
        &self,
        file: &mut File,
        path: &str,
        data: &[u8],
        meta: &FileMeta,
        expected: &[u8; 32],
        xattrs: Option<&[(Vec<u8>, Vec<u8>)]>,
        fsync: bool,
    ) -> Result<Stat, FsError> {
        file.write_all(data)
            .map_err(|e| self.io_err("write temporary file for", path.to_string(), e))?;
        self.apply_meta(file.as_fd(), meta, path)?;
        if let Some(want) = xattrs {
            // The new file may have inherited an ACL from its directory's
            // default ACL: that is replaced (or removed) here too.
            self.sync_xattrs(file.as_fd(), meta, want, path)?;
        }
        if fsync {
            file.sync_all()
                .map_err(|e| self.io_err("fsync temporary file for", path.to_string(), e))?;
        }
        // Read back what the filesystem holds, not what we meant to write.
        let (actual, _) = hash_file(&*file)
            .map_err(|e| self.io_err("read back temporary file for", path.to_string(), e))?;
        if actual.as_bytes() != expected {
            return Err(FsError::HashMismatch {
                root: self.root_str(),
                path: path.to_string(),
                expected: blake3::Hash::from_bytes(*expected).to_hex().to_string(),
                actual: actual.to_hex().to_string(),
            });
        }
        rfs::fstat(&*file).map_err(|e| self.io_err("stat temporary file for", path.to_string(), e))
    }

    /// The first half of [`Root::replace_file_guarded`], for a batch of many
    /// files: writes `data` to a temporary file next to the leaf with `meta`
    /// (and exactly `xattrs`), verifies it by reading it back, hands it to
    /// `keep` (the history links a first version as this very inode), and
    /// leaves it under its temporary name, closed and **not yet durable**.
    /// The caller makes every prepared file of the batch durable at once
    /// with [`Root::sync_filesystem`] (one journal commit, where an fsync
    /// per file paid one each), and only then renames each in with
    /// [`Root::swap_prepared`]: so invariant 2 holds, the content is on
    /// disk before the name points at it. One that is not swapped in must
    /// be given to [`Root::discard_prepared`]; one a crash leaves behind is
    /// a stale temporary name ([`is_stale_temp_name`]).
    pub fn prepare_file<C: AsComponent>(
        &self,
        comps: &[C],
        data: &[u8],
        meta: &FileMeta,
        expected: &[u8; 32],
        xattrs: Option<&[(Vec<u8>, Vec<u8>)]>,
        keep: impl FnOnce(&File),
    ) -> Result<Prepared, FsError> {
        let (comps, path, dir, _) = self.file_target(comps, meta)?;
        let (mut file, tmp) = self.create_temp(&dir, &path)?;
        let mut guard = TempGuard {
            dir: dir.as_fd(),
            name: tmp,
            armed: true,
        };
        let ours = self.write_verified(&mut file, &path, data, meta, expected, xattrs, false)?;
        keep(&file);
        guard.disarm();
        Ok(Prepared {
            comps: comps.iter().map(|c| c.to_vec()).collect(),
            path,
            tmp: guard.name.clone(),
            ours,
        })
    }

    /// The second half of [`Root::prepare_file`], once the caller made the
    /// prepared file durable: swaps it in as [`Root::replace_file_guarded`]
    /// does (displacing only what `expect` says; the directory fsync is
    /// left to the caller). On an error the temporary file is removed.
    pub fn swap_prepared(&self, p: &Prepared, expect: Expect) -> Result<Replaced, FsError> {
        let comps: Vec<&[u8]> = p.comps.iter().map(Vec::as_slice).collect();
        let (dir, leaf) = self.require_parent(&comps)?;
        let mut guard = TempGuard {
            dir: dir.as_fd(),
            name: p.tmp.clone(),
            armed: true,
        };
        let displaced = self.swap_in_ours(&dir, &mut guard, &p.ours, leaf, expect, &p.path)?;
        Ok(Replaced {
            meta: FileMeta::from_stat(&p.ours),
            displaced: displaced.map(|name| sibling(&comps, name.into_bytes())),
        })
    }

    /// Removes a prepared file that will not be swapped in (if its
    /// temporary name is still ours).
    pub fn discard_prepared(&self, p: &Prepared) {
        let comps: Vec<&[u8]> = p.comps.iter().map(Vec::as_slice).collect();
        if let Ok((dir, _)) = self.require_parent(&comps) {
            if let Ok(st) = rfs::statat(&dir, p.tmp.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                if st.st_ino == p.ours.st_ino && st.st_dev == p.ours.st_dev {
                    let _ = rfs::unlinkat(&dir, p.tmp.as_str(), AtFlags::empty());
                }
            }
        }
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
        let tmp = match link_as_temp(&from_dir, name.as_bytes(), &dir) {
            Ok(tmp) => tmp,
            Err(Errno::XDEV) => return Ok(None),
            Err(e) => return Err(self.io_err("link the staged version next to", path, e)),
        };
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
        let name = link_as_temp(&tdir, tleaf, &dir).map_err(|e| {
            self.io_err(
                "make a temporary hard link for",
                format!("{path} (a link of {})", show(&target)),
                e,
            )
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
    pub(super) fn file_target<'c, C: AsComponent>(
        &self,
        comps: &'c [C],
        meta: &FileMeta,
    ) -> Result<(Vec<&'c [u8]>, String, Arc<OwnedFd>, &'c [u8]), FsError> {
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
    pub(super) fn swap_in_ours(
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

    /// What stood at a leaf (perhaps a directory a batch kept open) now
    /// has the temporary name `tmp`.
    fn displaced(&self, tmp: &str) -> String {
        self.held.forget_all();
        tmp.to_string()
    }

    /// Renames `tmp` to `leaf` in `dir`; see [`Root::replace_file_guarded`].
    /// Returns the temporary name of an unexpected displaced entry.
    pub(super) fn swap_in(
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
                        return Ok(Some(self.displaced(tmp)));
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
                    return Ok(Some(self.displaced(tmp)));
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

    /// Appends `tail` to an existing regular file at `offset` (its committed
    /// length: anything beyond it, such as a torn earlier append, is cut
    /// first), sets mode/owner/mtime from `meta` and fsyncs. This is the
    /// `append` sets' trade: the file is extended in place, so a reader may
    /// see a partial tail while it is written, but a 1 GiB log never has to
    /// be rewritten for 10 MiB of news. The caller has verified the result's
    /// hash ([`crate::core::delta::apply_tail`]) before calling.
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
}

/// Links `name` in `from_dir` under a new temporary name in `dir`, and
/// returns that name; `EEXIST` once eight random names were all taken.
fn link_as_temp(from_dir: impl AsFd, name: &[u8], dir: impl AsFd) -> Result<String, Errno> {
    for _ in 0..8 {
        let tmp = temp_name();
        match rfs::linkat(&from_dir, name, &dir, tmp.as_str(), AtFlags::empty()) {
            Ok(()) => return Ok(tmp),
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::EXIST)
}
