//! Extended attributes, read and set through the entry's own descriptor,
//! and only the names the manifest replicates.

use super::*;

impl Root {
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

    pub(super) fn note_xattrs_unsupported(&self) {
        let _ = self.xattr_notice.compare_exchange(
            XATTR_OK,
            XATTR_UNSUPPORTED,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The replicated extended attributes of an open file or directory.
    pub(super) fn xattrs_of(&self, fd: BorrowedFd<'_>, path: &str) -> Result<Xattrs, FsError> {
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
            if !crate::core::manifest::is_replicated_xattr(name) {
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
    pub(super) fn sync_xattrs(
        &self,
        fd: BorrowedFd<'_>,
        meta: &FileMeta,
        want: &[(Vec<u8>, Vec<u8>)],
        path: &str,
    ) -> Result<bool, FsError> {
        let shown = |name: &[u8]| format!("{path} ({})", String::from_utf8_lossy(name));
        if let Some((name, _)) = want
            .iter()
            .find(|(n, _)| n.contains(&0) || !crate::core::manifest::is_replicated_xattr(n))
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
}
