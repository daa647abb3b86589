//! The snapshot form of the [`Manifest`]: what a Raft snapshot carries. A
//! format byte, then postcard, then zstd, written and read as streams so a
//! million-entry manifest is never held uncompressed. Four formats, each
//! written only when the manifest needs it, so a cluster that uses no newer
//! feature writes exactly what an older release writes.

use super::*;

/// Snapshot format 1: postcard of the manifest without xattrs or links.
pub(super) const SNAPSHOT_FORMAT_V1: u8 = 1;
/// Snapshot format 2: as format 1, each entry followed by its xattrs.
pub(super) const SNAPSHOT_FORMAT_V2: u8 = 2;
/// Snapshot format 3: as format 2, each entry followed by its link.
pub(super) const SNAPSHOT_FORMAT_V3: u8 = 3;
/// Snapshot format 4: format 3's manifest followed by the paused sets.
pub(super) const SNAPSHOT_FORMAT_V4: u8 = 4;
/// The longest single field a snapshot may hold (see [`Manifest::decode`]):
/// above any path, owner name or extended attribute value Linux allows.
const SNAPSHOT_FIELD_MAX: usize = 1 << 20;

/// The manifest in an older snapshot format (entries of type `E`), to read.
#[derive(Deserialize)]
struct ManifestAs<E> {
    sets: BTreeMap<String, SetManifestAs<E>>,
}

#[derive(Deserialize)]
struct SetManifestAs<E> {
    entries: BTreeMap<SetPath, E>,
    progress: SetProgress,
}

/// The manifest in an older snapshot format, borrowed, to write: each
/// entry is converted as it is written (a copy of a million entries in the
/// older form would cost tens of MiB).
#[derive(Serialize)]
struct ManifestRefAs<'a, Entries> {
    sets: BTreeMap<&'a String, SetManifestRefAs<'a, Entries>>,
}

#[derive(Serialize)]
struct SetManifestRefAs<'a, Entries> {
    entries: Entries,
    progress: &'a SetProgress,
}

/// A set's entries written as `E` (the same bytes as a map of `E`).
struct EntriesAs<'a, E>(&'a BTreeMap<SetPath, Entry>, std::marker::PhantomData<E>);

impl<'a, E: Serialize + From<&'a Entry>> Serialize for EntriesAs<'a, E> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(p, e)| (p, E::from(e))))
    }
}

/// Postcard output compressed as it is produced, so a snapshot is never
/// held uncompressed in memory (a million entries are about 150 MiB of
/// postcard, 10 to 20 times their zstd).
struct ZstdFlavor {
    /// Serialized bytes not yet handed to the compressor: postcard pushes
    /// a byte or a field at a time.
    pending: Vec<u8>,
    encoder: zstd::stream::Encoder<'static, Vec<u8>>,
}

impl ZstdFlavor {
    const FLUSH_AT: usize = 64 << 10;

    /// Output starting with `prefix`, then one zstd frame.
    fn new(prefix: Vec<u8>) -> ZstdFlavor {
        ZstdFlavor {
            pending: Vec::with_capacity(Self::FLUSH_AT),
            encoder: zstd::stream::Encoder::new(prefix, 3).expect("zstd compresses in memory"),
        }
    }

    fn flush(&mut self) {
        use std::io::Write;
        self.encoder
            .write_all(&self.pending)
            .expect("zstd compresses in memory");
        self.pending.clear();
    }
}

impl postcard::ser_flavors::Flavor for ZstdFlavor {
    type Output = Vec<u8>;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.pending.extend_from_slice(data);
        if self.pending.len() >= Self::FLUSH_AT {
            self.flush();
        }
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.try_extend(&[data])
    }

    fn finalize(mut self) -> postcard::Result<Vec<u8>> {
        self.flush();
        Ok(self.encoder.finish().expect("zstd compresses in memory"))
    }
}

/// `value` as postcard, zstd-compressed, after a `format` byte.
fn compressed_postcard<T: Serialize + ?Sized>(format: u8, value: &T) -> Vec<u8> {
    postcard::serialize_with_flavor(value, ZstdFlavor::new(vec![format]))
        .expect("a manifest always serializes")
}

impl<E: Into<Entry>> From<ManifestAs<E>> for Manifest {
    fn from(m: ManifestAs<E>) -> Manifest {
        Manifest {
            paused: BTreeMap::new(),
            sets: m
                .sets
                .into_iter()
                .map(|(name, s)| {
                    let entries = s.entries.into_iter().map(|(p, e)| (p, e.into())).collect();
                    (
                        name,
                        SetManifest {
                            entries,
                            progress: s.progress,
                            link_index: LinkIndex::default(),
                            totals: TotalsCache::default(),
                        },
                    )
                })
                .collect(),
        }
    }
}

impl Manifest {
    /// The snapshot form: a format byte, then postcard, then zstd. Format 1
    /// (readable by releases without xattrs) while no entry has xattrs or
    /// is a link, format 2 once one has xattrs, format 3 once one is a link.
    pub fn encode(&self) -> Vec<u8> {
        let entries = || self.sets.values().flat_map(|s| s.entries.values());
        let with_links = entries().any(|e| e.link.is_some());
        let with_xattrs = entries().any(|e| !e.xattrs.is_empty());
        fn older<'a, E: Serialize + From<&'a Entry>>(m: &'a Manifest, format: u8) -> Vec<u8> {
            let old = ManifestRefAs {
                sets: m
                    .sets
                    .iter()
                    .map(|(name, s)| {
                        (
                            name,
                            SetManifestRefAs {
                                entries: EntriesAs::<E>(&s.entries, std::marker::PhantomData),
                                progress: &s.progress,
                            },
                        )
                    })
                    .collect(),
            };
            compressed_postcard(format, &old)
        }
        if !self.paused.is_empty() {
            compressed_postcard(SNAPSHOT_FORMAT_V4, &(self, &self.paused))
        } else if with_links {
            compressed_postcard(SNAPSHOT_FORMAT_V3, self)
        } else if with_xattrs {
            older::<EntryV2Ref>(self, SNAPSHOT_FORMAT_V2)
        } else {
            older::<EntryV1Ref>(self, SNAPSHOT_FORMAT_V1)
        }
    }

    /// Decodes a snapshot, refusing any path that is not canonical.
    pub fn decode(bytes: &[u8], max_len: usize) -> Result<Manifest, ManifestError> {
        let (&version, body) = bytes.split_first().ok_or_else(|| ManifestError::Decode {
            what: "manifest snapshot",
            source: postcard::Error::DeserializeUnexpectedEnd,
        })?;
        if !(SNAPSHOT_FORMAT_V1..=SNAPSHOT_FORMAT_V4).contains(&version) {
            return Err(ManifestError::Decode {
                what: "manifest snapshot (unknown format; is a newer clusterd leading?)",
                source: postcard::Error::DeserializeBadEncoding,
            });
        }
        // Decompressed as it is decoded: the uncompressed form (about
        // 150 MiB at a million entries) is never held whole. Past `max_len`
        // the stream ends, and decoding fails.
        let stream = zstd::stream::read::Decoder::with_buffer(body)
            .map_err(|_| ManifestError::Decode {
                what: "manifest snapshot (bad zstd frame)",
                source: postcard::Error::DeserializeBadEncoding,
            })?
            .single_frame();
        let bad = |source| ManifestError::Decode {
            what: "manifest snapshot (bad, truncated or oversized)",
            source,
        };
        fn read<T: serde::de::DeserializeOwned>(
            stream: impl std::io::Read,
            max_len: usize,
        ) -> Result<T, postcard::Error> {
            // Room for the longest single field (a path, an owner name, an
            // extended attribute's value), which postcard reads whole.
            let mut field = vec![0u8; SNAPSHOT_FIELD_MAX];
            // postcard reads a byte or a field at a time.
            let reader = std::io::BufReader::with_capacity(64 << 10, stream.take(max_len as u64));
            let (value, _) = postcard::from_io((reader, &mut field[..]))?;
            Ok(value)
        }
        let manifest: Manifest = match version {
            SNAPSHOT_FORMAT_V1 => read::<ManifestAs<EntryV1>>(stream, max_len)
                .map_err(bad)?
                .into(),
            SNAPSHOT_FORMAT_V2 => read::<ManifestAs<EntryV2>>(stream, max_len)
                .map_err(bad)?
                .into(),
            SNAPSHOT_FORMAT_V3 => read(stream, max_len).map_err(bad)?,
            _ => {
                let (mut m, paused): (Manifest, BTreeMap<String, Pause>) =
                    read(stream, max_len).map_err(bad)?;
                for (set, pause) in &paused {
                    Pause::check(set, pause).map_err(|_| ManifestError::Decode {
                        what: "manifest snapshot (a pause is malformed)",
                        source: postcard::Error::DeserializeBadEncoding,
                    })?;
                }
                m.paused = paused;
                m
            }
        };
        // What a batch could not commit, a snapshot cannot bring either.
        for (name, set) in &manifest.sets {
            for (path, entry) in &set.entries {
                if let Err(why) = check_xattrs(&entry.xattrs) {
                    return Err(ManifestError::Xattrs {
                        set: name.clone(),
                        path: path.clone(),
                        why,
                    });
                }
                if let Some(target) = &entry.link {
                    let primary = set.entries.get(target);
                    let why = if entry.meta.kind != EntryKind::File || entry.digest.is_none() {
                        Some("only a regular file can be a link")
                    } else if !primary.is_some_and(|t| {
                        t.meta.kind == EntryKind::File
                            && t.link.is_none()
                            && t.digest == entry.digest
                    }) {
                        Some("the snapshot has no regular file with that content there that is not a link itself")
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        return Err(ManifestError::Link {
                            set: name.clone(),
                            path: path.clone(),
                            target: target.clone(),
                            why,
                        });
                    }
                }
            }
        }
        let mut manifest = manifest;
        manifest.repack();
        Ok(manifest)
    }
}
