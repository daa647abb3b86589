//! Content staged on followers ahead of the entry that commits it: the
//! `Stage` RPC's uploads (held in memory or spilled to `data_dir/staging`)
//! and the finished files made of them, linked into place at apply.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::debug;

use crate::core::delta::{self, FileDigest};
use crate::core::manifest::EntryKind;
use crate::core::manifest::StagedVersion;
use crate::core::paths::SetPath;
use crate::replication::scan::fs_meta;
use crate::replication::shared::*;
/// How [`Shared::stage_piece`] flushes what it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageFlush {
    /// Not at all: a `Chunk` from the log, which is itself the durable copy.
    None,
    /// This piece (the `Stage` RPC): one fsync of a whole 1 GiB upload at
    /// the end held this node's Raft log writes (and with them its
    /// heartbeat answers) behind it for seconds, long enough for an
    /// election.
    Piece,
    /// The whole upload and the staging directory: the last piece, after
    /// which the caller may report the upload held.
    Upload,
}

/// Versions waiting for [`Applier::sign_linked`](crate::replication::apply::Applier) at most: past it (a
/// sync of millions of files) the rest go unsigned, and their next change
/// travels whole should this node lead.
pub(super) const UNSIGNED_MAX: usize = 1 << 17;
/// Uploads larger than this (a batch holding one large file) are flushed
/// piece by piece as they arrive and not made into finished files: left
/// unflushed, a 1 GiB upload's write-back held the shared disk long enough
/// for the leader to miss its heartbeats (measured: an election in the
/// append benchmark), and rebuilding it would hold all of it in memory at
/// once. Its content is written twice on the follower, as before.
pub(super) const FINISH_UPLOAD_MAX: u64 = 64 << 20;
/// Threads fsyncing one upload's finished files.
pub(super) const FSYNC_THREADS: usize = 4;
/// Finished files larger than this are flushed every [`FINISH_FLUSH_STEP`]
/// bytes as they are written, for the reason [`StageFlush::Piece`] gives.
pub(super) const FINISH_FLUSH_STEP: usize = 4 << 20;

/// Most bytes of pieces held in memory at once, over all uploads (see
/// [`Shared::stage_before_finish`]): twice what a leader stages at once
/// (`replication::source::STAGING_BYTES`), so a slow upload does not push the next ones
/// out to disk.
pub(super) const HELD_BYTES_MAX: usize = 128 << 20;
/// A held upload that got no piece for this long was abandoned (its leader
/// died or gave up on it, `replication::source::STAGE_TIMEOUT` per piece): its memory is
/// freed; a last piece arriving after that finds it incomplete.
pub(super) const HELD_MAX_IDLE: Duration = Duration::from_secs(60);

/// The pieces of uploads held in memory until their last piece.
#[derive(Default)]
pub(super) struct HeldUploads {
    pub(super) uploads: HashMap<u64, HeldUpload>,
    /// Bytes of every piece held.
    pub(super) bytes: usize,
}

/// One upload's pieces, by offset.
pub(super) struct HeldUpload {
    pub(super) pieces: BTreeMap<u64, prost::bytes::Bytes>,
    pub(super) last_piece: Instant,
}

impl HeldUploads {
    /// Takes upload `upload`'s pieces out.
    pub(super) fn take(&mut self, upload: u64) -> Option<HeldUpload> {
        let held = self.uploads.remove(&upload)?;
        self.bytes -= held.len_held();
        Some(held)
    }
}

impl HeldUpload {
    pub(super) fn len_held(&self) -> usize {
        self.pieces.values().map(|p| p.len()).sum()
    }
}

/// Why a staged upload or piece was not taken (the leader then sends the
/// batch through the log instead), as one sentence for its log.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// Reading, writing or flushing the upload failed.
    #[error("cannot {what} staged upload {upload:016x} in {}: {source}", path.display())]
    Io {
        what: &'static str,
        upload: u64,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bytes of the upload are missing: its pieces overlapped or arrived out
    /// of order, or this node restarted or dropped it while it arrived.
    #[error("staged upload {upload:016x} lacks bytes {from}..{to} ({why}); the leader sends the batch through the log instead")]
    Gap {
        upload: u64,
        from: u64,
        to: u64,
        why: &'static str,
    },
    /// A piece or a listed version lies past what any sync set here allows.
    #[error("{0}")]
    TooLarge(String),
    /// A patch in the upload is unusable or does not make the version the
    /// leader listed.
    #[error("{0}")]
    BadPatch(String),
    /// The version list of the upload's last piece does not decode.
    #[error("{0}")]
    BadVersion(String),
}

/// A staged upload's bytes as [`Shared::finish_upload`] reads them: its
/// pieces held in memory, or its file.
pub(super) enum UploadBytes {
    Held(BTreeMap<u64, prost::bytes::Bytes>),
    File(std::fs::File),
}

impl UploadBytes {
    /// The upload's length; for held pieces, refuses a gap (this node
    /// restarted, or dropped the upload as abandoned, while it arrived).
    pub(super) fn len(&self, upload: u64, path: &Path) -> Result<u64, StagingError> {
        match self {
            UploadBytes::File(f) => {
                f.metadata()
                    .map(|m| m.len())
                    .map_err(|source| StagingError::Io {
                        what: "read the length of",
                        upload,
                        path: path.to_path_buf(),
                        source,
                    })
            }
            UploadBytes::Held(pieces) => {
                let mut end = 0u64;
                for (&offset, piece) in pieces {
                    if offset != end {
                        return Err(StagingError::Gap {
                            upload,
                            from: end,
                            to: offset,
                            why: "its pieces overlap or arrived out of order",
                        });
                    }
                    end += piece.len() as u64;
                }
                Ok(end)
            }
        }
    }

    /// Bytes `offset..offset + len`, which the caller checked lie inside
    /// [`len`](Self::len): borrowed when one held piece has them all.
    pub(super) fn read(
        &self,
        offset: u64,
        len: u64,
    ) -> std::io::Result<std::borrow::Cow<'_, [u8]>> {
        let end = offset + len;
        match self {
            UploadBytes::File(f) => {
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, offset)?;
                Ok(buf.into())
            }
            UploadBytes::Held(pieces) => {
                let first = pieces.range(..=offset).next_back().map_or(0, |(&at, _)| at);
                let mut out = Vec::new();
                for (&at, piece) in pieces.range(first..end) {
                    let piece_end = at + piece.len() as u64;
                    let from = offset.saturating_sub(at) as usize;
                    let to = (end.min(piece_end) - at) as usize;
                    if at <= offset && piece_end >= end {
                        return Ok(piece[from..to].into());
                    }
                    out.extend_from_slice(&piece[from..to]);
                }
                if out.len() as u64 != len {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                Ok(out.into())
            }
        }
    }
}

/// Staged uploads no applied batch consumed (the leader that staged them
/// died before proposing, the batch was never committed) are removed after
/// this.
pub(super) const STAGING_MAX_AGE: Duration = Duration::from_secs(3600);

impl Shared {
    pub(super) fn staging_dir(&self) -> PathBuf {
        self.data_dir.join("staging")
    }

    pub(super) fn staged_path(&self, upload: u64) -> PathBuf {
        self.staging_dir().join(format!("{upload:016x}"))
    }

    /// The directory of the finished files made from upload `upload`.
    pub(super) fn finished_dir(&self, upload: u64) -> PathBuf {
        self.staging_dir().join(format!("{upload:016x}.d"))
    }

    /// The name, in [`finished_dir`](Self::finished_dir), of the finished
    /// file holding `digest`'s content made from the patch at `offset`. The
    /// name carries the digest because a file gets it only once its content
    /// was checked against that digest, written and fsynced.
    pub(super) fn finished_name(offset: u64, digest: &FileDigest) -> String {
        format!(
            "{offset:016x}-{}",
            blake3::Hash::from_bytes(digest.hash).to_hex()
        )
    }

    /// Removes staged upload `upload` and what was made from it.
    pub(super) fn remove_upload(&self, upload: u64) {
        let _ = std::fs::remove_file(self.staged_path(upload));
        let _ = std::fs::remove_dir_all(self.finished_dir(upload));
    }

    /// Notes that `set`'s `path` now holds `digest`, linked in from staging
    /// without being read, and lacks the block signature this node keeps
    /// for when it leads. Making it there took a tenth of a follower's CPU
    /// in a first full sync; [`Applier::sign_linked`] makes it once
    /// nothing is applied (seconds later), from the file. Until then (or
    /// after a restart, as the list is not kept) that version's next change
    /// travels whole should this node lead meanwhile.
    pub(super) fn defer_signature(&self, set: &str, path: &SetPath, digest: FileDigest) {
        let mut unsigned = self.unsigned.lock().unwrap();
        if unsigned.len() < UNSIGNED_MAX {
            unsigned.push_back((set.to_string(), path.clone(), digest));
        }
    }

    /// Makes staged upload `upload` durable after its last piece, whose
    /// pieces were written without a flush of their own. Each version in
    /// `versions` whose patch is whole content (a new file, the first full
    /// sync) is rebuilt, checked against its digest and written as a
    /// finished file of its own in the upload's [`finished_dir`]
    /// (Self::finished_dir) (written under a part name, fsynced, then
    /// renamed): applying it is then a link into the set, so this node
    /// writes its content once, not once here and again when applied. Only
    /// where some set shares `data_dir`'s filesystem ([`Shared::finish_files`]).
    /// The rest of the upload (patches against a base) is fsynced; an
    /// upload the finished files cover entirely is removed unflushed, so
    /// its pieces mostly never reach the disk.
    pub fn finish_upload(
        &self,
        upload: u64,
        versions: &[StagedVersion],
    ) -> Result<(), StagingError> {
        let path = self.staged_path(upload);
        let dir = self.finished_dir(upload);
        let fail = |what: &'static str, source: std::io::Error| StagingError::Io {
            what,
            upload,
            path: path.clone(),
            source,
        };
        let started = Instant::now();
        let limit = self.staging_limit();
        let held = self.held.lock().unwrap().take(upload);
        let upload_bytes = match held {
            Some(h) => UploadBytes::Held(h.pieces),
            None => UploadBytes::File(std::fs::File::open(&path).map_err(|e| fail("open", e))?),
        };
        let upload_len = upload_bytes.len(upload, &path)?;
        // The byte ranges of the upload made into finished files.
        let mut finished_ranges = BTreeMap::new();
        let mut written = Vec::new();
        let finish = self.finish_files && upload_len <= FINISH_UPLOAD_MAX;
        for v in versions.iter().filter(|_| finish) {
            if finished_ranges.contains_key(&v.offset) {
                continue;
            }
            if v.len > limit || v.digest.len > limit || v.offset.saturating_add(v.len) > upload_len
            {
                return Err(StagingError::TooLarge(format!(
                    "staged upload {upload:016x} lists a version of {} bytes from a {}-byte patch at {}, outside the upload or larger than any sync set's max_file_size allows",
                    v.digest.len, v.len, v.offset
                )));
            }
            let patch = upload_bytes
                .read(v.offset, v.len)
                .map_err(|e| fail("read", e))?;
            let body = delta::whole_body(&patch).map_err(|e| {
                StagingError::BadPatch(format!(
                    "staged upload {upload:016x} holds an unusable patch at {}: {e}",
                    v.offset
                ))
            })?;
            // A delta or an append: applied from the upload, against its base.
            let Some(body) = body else {
                continue;
            };
            let content = delta::apply_whole(body, &v.digest, limit).map_err(|e| {
                StagingError::BadPatch(format!(
                    "the patch at {} of staged upload {upload:016x} does not make the version the leader listed: {e}",
                    v.offset
                ))
            })?;
            if written.is_empty() {
                std::fs::create_dir_all(&dir).map_err(|e| fail("make the directory for", e))?;
            }
            // Its own name only once complete and fsynced (below): a crash
            // before leaves a part file no batch ever uses.
            let name = dir.join(Self::finished_name(v.offset, &v.digest));
            let part = name.with_extension("part");
            let staged_meta = (v.meta.as_ref())
                .filter(|m| m.kind == EntryKind::File)
                .map(fs_meta);
            let write = || -> std::io::Result<std::fs::File> {
                let mut f = std::fs::File::create(&part)?;
                for step in content.chunks(FINISH_FLUSH_STEP) {
                    std::io::Write::write_all(&mut f, step)?;
                    if content.len() > FINISH_FLUSH_STEP {
                        f.sync_data()?;
                    }
                }
                // Best effort (an owner this node cannot give, say): what is
                // not set here is set, and fsynced, when it is applied.
                if let Some(meta) = &staged_meta {
                    let _ = crate::fs::root::set_staged_meta(&f, meta);
                }
                // Start the write-back now; the fsync below then mostly
                // waits for what is already on its way.
                // SAFETY: a plain syscall on a descriptor we own.
                let _ = unsafe {
                    libc::sync_file_range(
                        std::os::fd::AsRawFd::as_raw_fd(&f),
                        0,
                        0,
                        libc::SYNC_FILE_RANGE_WRITE,
                    )
                };
                Ok(f)
            };
            written.push((
                write().map_err(|e| fail("write a finished file of", e))?,
                part,
                name,
            ));
            finished_ranges.insert(v.offset, v.len);
        }
        let wrote = started.elapsed();
        // Side by side: the disk then merges their cache flushes, where one
        // after the other each waited for a flush of its own.
        let fsync_and_name = |files: &[(std::fs::File, PathBuf, PathBuf)]| {
            files.iter().try_for_each(|(f, part, name)| {
                f.sync_all().and_then(|()| std::fs::rename(part, name))
            })
        };
        let per_thread = written.len().div_ceil(FSYNC_THREADS).max(1);
        std::thread::scope(|s| {
            let threads: Vec<_> = written
                .chunks(per_thread)
                .map(|files| s.spawn(move || fsync_and_name(files)))
                .collect();
            threads
                .into_iter()
                .try_for_each(|t| t.join().expect("an fsync thread panicked"))
        })
        .map_err(|e| fail("fsync a finished file of", e))?;
        if !written.is_empty() {
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| fail("fsync the finished files' directory of", e))?;
        }
        // Whatever the finished files do not cover (deltas, appends) is
        // still needed from the upload.
        let mut covered = 0u64;
        for (&offset, &len) in &finished_ranges {
            if offset == covered {
                covered += len;
            }
        }
        match upload_bytes {
            // A file left by an earlier attempt at the same upload.
            UploadBytes::Held(_) if covered == upload_len => {
                let _ = std::fs::remove_file(&path);
            }
            UploadBytes::File(f) if covered == upload_len => {
                drop(f);
                let _ = std::fs::remove_file(&path);
            }
            UploadBytes::File(f) => f.sync_all().map_err(|e| fail("fsync", e))?,
            UploadBytes::Held(pieces) => {
                let write = || -> std::io::Result<()> {
                    let f = std::fs::File::create(&path)?;
                    for (&offset, piece) in &pieces {
                        f.write_all_at(piece, offset)?;
                    }
                    f.sync_all()
                };
                write().map_err(|e| fail("write", e))?;
            }
        }
        std::fs::File::open(self.staging_dir())
            .and_then(|d| d.sync_all())
            .map_err(|e| fail("fsync the staging directory for", e))?;
        debug!(upload, finished = written.len(), bytes = upload_len, ?wrote, took = ?started.elapsed(), "finished a staged upload");
        Ok(())
    }

    /// Takes a piece of upload `upload` whose last piece will list its
    /// versions, so [`finish_upload`](Self::finish_upload) makes it all
    /// durable then. Up to [`FINISH_UPLOAD_MAX`], the pieces are held in
    /// memory (at most [`HELD_BYTES_MAX`] over all uploads): most of an
    /// upload becomes finished files, and writing it to the staged file
    /// first, to read it back and delete it, cost a follower a fifth of its
    /// CPU in a full sync. What does not fit goes to the file, unflushed;
    /// past [`FINISH_UPLOAD_MAX`] each piece is flushed (see
    /// [`StageFlush::Piece`]).
    pub fn stage_before_finish(
        &self,
        upload: u64,
        offset: u64,
        data: prost::bytes::Bytes,
    ) -> Result<(), StagingError> {
        let end = offset.saturating_add(data.len() as u64);
        self.check_piece_end(upload, end)?;
        if end > FINISH_UPLOAD_MAX {
            // Too large to finish: what was held of it goes to its file too.
            let spilled = self.held.lock().unwrap().take(upload);
            return self.spill_and_stage(spilled, upload, offset, &data, StageFlush::Piece);
        }
        let mut held = self.held.lock().unwrap();
        let room = held.bytes + data.len() <= HELD_BYTES_MAX;
        let HeldUploads { uploads, bytes } = &mut *held;
        match uploads.get_mut(&upload) {
            Some(h) if room => {
                *bytes -= h.pieces.get(&offset).map_or(0, |p| p.len());
                *bytes += data.len();
                h.pieces.insert(offset, data);
                h.last_piece = Instant::now();
                Ok(())
            }
            // Its first piece, unless it is already on file (this node
            // took earlier pieces there).
            None if room && self.finish_files && offset == 0 => {
                *bytes += data.len();
                let pieces = BTreeMap::from([(offset, data)]);
                let last_piece = Instant::now();
                uploads.insert(upload, HeldUpload { pieces, last_piece });
                Ok(())
            }
            _ => {
                // No room: what is held of it goes to the file too.
                let spilled = held.take(upload);
                drop(held);
                self.spill_and_stage(spilled, upload, offset, &data, StageFlush::None)
            }
        }
    }

    /// Writes what was held of upload `upload`, then `data` at `offset`, to
    /// its file. Refuses a piece past the start of an upload of which
    /// nothing is held or on file: its first pieces are gone (this node
    /// restarted, or dropped the upload as abandoned), and a file starting
    /// with zeros must never be reported as holding the upload.
    pub(super) fn spill_and_stage(
        &self,
        held: Option<HeldUpload>,
        upload: u64,
        offset: u64,
        data: &[u8],
        flush: StageFlush,
    ) -> Result<(), StagingError> {
        if held.is_none() && offset != 0 && !self.staged_path(upload).exists() {
            return Err(StagingError::Gap {
                upload,
                from: 0,
                to: offset,
                why: "this node restarted or dropped it while it arrived",
            });
        }
        for (at, piece) in held.iter().flat_map(|h| &h.pieces) {
            self.stage_piece(upload, *at, piece, flush)?;
        }
        self.stage_piece(upload, offset, data, flush)
    }

    /// Refuses a piece ending past [`upload_limit`](Self::upload_limit): a
    /// hostile offset cannot make a huge sparse file, nor a held upload,
    /// that is later read into memory.
    pub(super) fn check_piece_end(&self, upload: u64, end: u64) -> Result<(), StagingError> {
        match end > self.upload_limit() {
            true => Err(StagingError::TooLarge(format!(
                "a staged piece ending at byte {end} of upload {upload:016x} is larger than any sync set here allows (max_file_size)"
            ))),
            false => Ok(()),
        }
    }

    /// Frees held uploads that got no piece for [`HELD_MAX_IDLE`].
    pub(super) fn drop_abandoned_uploads(&self) {
        let mut held = self.held.lock().unwrap();
        let abandoned: Vec<u64> = (held.uploads.iter())
            .filter(|(_, h)| h.last_piece.elapsed() >= HELD_MAX_IDLE)
            .map(|(&upload, _)| upload)
            .collect();
        for upload in abandoned {
            held.take(upload);
        }
    }

    /// Writes `data` at `offset` of the staged upload `upload` (created if
    /// new), flushed as `flush` says. Refuses anything ending past
    /// [`upload_limit`](Self::upload_limit): a hostile offset cannot make a
    /// huge sparse file that is later read into memory.
    pub fn stage_piece(
        &self,
        upload: u64,
        offset: u64,
        data: &[u8],
        flush: StageFlush,
    ) -> Result<(), StagingError> {
        self.check_piece_end(upload, offset.saturating_add(data.len() as u64))?;
        let path = self.staged_path(upload);
        let write = || -> std::io::Result<()> {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&path)?;
            f.write_all_at(data, offset)?;
            match flush {
                StageFlush::None => {}
                StageFlush::Piece => f.sync_data()?,
                StageFlush::Upload => {
                    f.sync_all()?;
                    std::fs::File::open(self.staging_dir())?.sync_all()?;
                }
            }
            Ok(())
        };
        write().map_err(|source| StagingError::Io {
            what: "write",
            upload,
            path: path.clone(),
            source,
        })
    }
}

pub(super) fn clean_staging(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STAGING_MAX_AGE);
        if old {
            let _ = match e.file_type().is_ok_and(|t| t.is_dir()) {
                true => std::fs::remove_dir_all(e.path()),
                false => std::fs::remove_file(e.path()),
            };
        }
    }
}
