//! The pure delta engine behind replication: it turns a new version of a file
//! into the cheapest [`Patch`] against the last committed version, and turns a
//! patch back into exactly that new version on a follower.
//!
//! It owns three things and nothing else: whole-file digests ([`FileDigest`],
//! blake3), block signatures of committed versions ([`BlockSignature`], the
//! rsync rolling checksum plus a strong block hash, via `fast_rsync`), and the
//! patch format ([`Patch`], with its pinned binary encoding). It does no I/O,
//! spawns nothing and holds no state: reading files, chunking patches into
//! Raft entries and replacing files atomically happen in the callers.
//!
//! # Invariant
//!
//! Nothing is returned by [`apply`] or [`apply_tail`] that was not verified
//! against its strong hash: the rebuilt bytes (or, for [`apply_tail`], the
//! base followed by the returned tail) have exactly the length and blake3 hash
//! of the `expected` digest, or the call returns an error. Every input,
//! encoded or decoded, hostile or merely stale, yields an error rather than a
//! panic, and no input makes it allocate more than the caller's `max_len`
//! (plus a bounded slack for delta instructions) or the size of its own input.
//!
//! # Why the rolling checksum is not trusted alone
//!
//! `fast_rsync` matches blocks by a CRC and a truncated MD4, which is neither
//! collision-resistant nor meant to be. A false block match can only make a
//! delta rebuild the wrong bytes; [`plan`] catches that on the leader when it
//! still has the base (and falls back to sending the file whole), and
//! [`apply`] catches it everywhere through the blake3 check.

use std::borrow::Cow;
use std::fmt;
use std::io::{self, Read, Write};

use thiserror::Error;

/// Version byte leading every encoded [`Patch`]. Bump it (and keep decoding
/// the old one) for any change to the layout pinned by `golden_patch_encoding`.
pub const PATCH_FORMAT_VERSION: u8 = 1;

/// Version byte leading every encoded [`BlockSignature`]; signatures are kept
/// in the leader's state, so old ones must stay readable across upgrades.
pub const SIGNATURE_FORMAT_VERSION: u8 = 1;

/// Below this many bytes a new version always travels whole: a delta could
/// save at most a few KiB, while a whole file needs no base on the
/// follower, so it can never be refused as `WrongBase` and re-requested.
pub const SMALL_FILE_LEN: usize = 4096;

/// Smallest block a signature uses. Smaller blocks would make the stored
/// signature (12 bytes per block) a sizeable fraction of the file itself.
pub const MIN_BLOCK_LEN: u32 = 512;

/// Largest block a signature uses: it bounds the literal a one-byte change
/// costs in a huge file (reached only by files of 64 GiB and more).
pub const MAX_BLOCK_LEN: u32 = 64 * 1024;

/// The largest file (and base) this engine describes. It only exists so that
/// a hostile length field is refused before it is used in any arithmetic.
pub const MAX_FILE_LEN: u64 = 1 << 40;

/// Bytes of each block's MD4 kept in a signature. A block matches only when
/// the 32-bit rolling CRC *and* these 64 bits agree, so a false match on
/// honest data is about 2^-96 per byte position; 16 bytes would not add real
/// safety (MD4 is forgeable anyway, blake3 is the real guard) but would make
/// every stored signature two thirds larger.
const STRONG_LEN: u32 = 8;

/// Weakest strong-hash length a decoded signature may declare, so a corrupt
/// or foreign signature cannot quietly make false block matches likelier.
const MIN_STRONG_LEN: u32 = 8;

/// zstd's fastest standard level. Config files and logs still shrink several
/// times over; higher levels compress them a little better but cost CPU that a
/// first full sync of a large tree needs to keep pace with rsync.
const ZSTD_LEVEL: i32 = 1;

/// Window (2^22 = 4 MiB) used when compressing and the most a decoder accepts.
/// Pinning both sides caps what a hostile frame can make the decoder allocate.
const ZSTD_WINDOW_LOG: u32 = 22;

/// Every body of an encoded patch is one zstd frame, which starts so.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// `fast_rsync`'s (librsync's) magic for MD4 signatures, the only kind its
/// `diff` accepts.
const RS_MD4_SIG_MAGIC: [u8; 4] = [0x72, 0x73, 0x01, 0x36];

/// Length of `fast_rsync`'s signature header: magic, block length, strong length.
const RS_SIG_HEADER_LEN: usize = 12;

/// Bytes of `fast_rsync`'s rolling CRC per block.
const RS_CRC_LEN: usize = 4;

/// Most reserved up front for an output. Sizes in frames and digests are only
/// claims until the bytes are actually produced; past this, buffers grow with
/// what really arrives, so a lying claim costs nothing.
const RESERVE_LIMIT: u64 = 64 << 20;

const KIND_WHOLE: u8 = 0;
const KIND_DELTA: u8 = 1;
const KIND_APPEND: u8 = 2;

/// Why a signature, patch or rebuilt file was refused. Each message is one
/// sentence that names what was wrong.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DeltaError {
    #[error("the encoded patch is malformed: {0}")]
    MalformedPatch(&'static str),
    #[error("the encoded block signature is malformed: {0}")]
    MalformedSignature(&'static str),
    #[error("the {what} uses format version {version}, which this build does not understand")]
    UnsupportedVersion { what: &'static str, version: u8 },
    #[error("the patch was made against base {expected}, but no base content was given")]
    MissingBase { expected: FileDigest },
    #[error("the patch was made against base {expected}, but the local base is {actual}")]
    WrongBase {
        expected: FileDigest,
        actual: FileDigest,
    },
    #[error("the patch would produce more than {limit} bytes, the most it may produce here")]
    TooLarge { limit: u64 },
    #[error("the patch's compressed body cannot be decompressed: {0}")]
    Decompress(String),
    #[error("the patch's delta instructions do not apply to the base: {0}")]
    BadDelta(String),
    #[error("the rebuilt file is {actual}, not the expected {expected}, so it was discarded")]
    Verify {
        expected: FileDigest,
        actual: FileDigest,
    },
    #[error("a {kind} patch needs the base content; only append patches apply to a streamed base")]
    NotAppend { kind: &'static str },
}

/// Length and blake3 hash of one version of a file: its identity everywhere
/// in replication (what a patch is relative to, what a result must be).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileDigest {
    pub len: u64,
    pub hash: [u8; 32],
}

impl FileDigest {
    /// Size of [`FileDigest::to_bytes`]: the length (u64, little-endian) then
    /// the 32 hash bytes.
    pub const ENCODED_LEN: usize = 40;

    pub fn to_bytes(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.len.to_le_bytes());
        out[8..].copy_from_slice(&self.hash);
        out
    }

    pub fn from_bytes(bytes: &[u8; Self::ENCODED_LEN]) -> FileDigest {
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[..8]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[8..]);
        FileDigest {
            len: u64::from_le_bytes(len),
            hash,
        }
    }

    /// The hash as 64 lowercase hex digits.
    pub fn hex(&self) -> String {
        blake3::Hash::from(self.hash).to_hex().to_string()
    }
}

/// `<hex hash> (<len> bytes)`, the form every error message uses.
impl fmt::Display for FileDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} bytes)", self.hex(), self.len)
    }
}

impl fmt::Debug for FileDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileDigest({self})")
    }
}

/// The digest of `bytes`.
pub fn digest(bytes: &[u8]) -> FileDigest {
    FileDigest {
        len: bytes.len() as u64,
        hash: *blake3::hash(bytes).as_bytes(),
    }
}

/// Builds a [`FileDigest`] from pieces, so a caller can hash a file as it
/// streams it from disk instead of holding it in memory (a 1 GiB log before
/// an append, for instance). Cloning it forks the hash state: feed a base,
/// clone, feed a tail, and both digests are available.
#[derive(Clone, Debug, Default)]
pub struct FileHasher {
    hasher: blake3::Hasher,
}

impl FileHasher {
    pub fn new() -> FileHasher {
        FileHasher::default()
    }

    pub fn update(&mut self, bytes: &[u8]) -> &mut FileHasher {
        self.hasher.update(bytes);
        self
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.hasher.count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The digest of everything fed so far; feeding may continue afterwards.
    pub fn digest(&self) -> FileDigest {
        FileDigest {
            len: self.len(),
            hash: *self.hasher.finalize().as_bytes(),
        }
    }
}

/// The block length used for a base of `len` bytes: a quarter of the square
/// root, clamped to [`MIN_BLOCK_LEN`, `MAX_BLOCK_LEN`].
///
/// rsync uses about sqrt(len) because its receiver sends the signature on
/// every transfer, and sqrt balances signature bytes against the literal
/// block a change costs. Here the leader keeps the signature of the committed
/// version in its own state, so in the steady state only the literal travels:
/// a quarter of rsync's block length costs four times the (stored, not sent)
/// signature and cuts the bytes of every localized change by four. For a
/// 64 MiB file that is 2 KiB blocks and a 384 KiB stored signature (0.6 %),
/// versus rsync's 8 KiB literal for a one-byte change.
pub fn block_len_for(len: u64) -> u32 {
    let quarter_root = len.isqrt() / 4;
    // The clamp keeps the value far below u32::MAX, so the cast is exact.
    quarter_root.clamp(u64::from(MIN_BLOCK_LEN), u64::from(MAX_BLOCK_LEN)) as u32
}

/// The rsync block signature of one version of a file, together with that
/// version's digest, so a delta can never be labelled with the wrong base.
///
/// The leader stores one per committed file (see [`to_bytes`](Self::to_bytes))
/// and computes deltas from it alone with [`plan_with_signature`].
#[derive(Clone, PartialEq, Eq)]
pub struct BlockSignature {
    base: FileDigest,
    // Always an MD4 signature whose block length, strong length and block
    // count were checked against `base.len`: fast_rsync's diff loops forever
    // on a zero block length, so nothing unchecked may reach it.
    sig: fast_rsync::Signature,
    block_len: u32,
}

impl BlockSignature {
    /// The signature of `content`, with a block length from [`block_len_for`].
    pub fn compute(content: &[u8]) -> BlockSignature {
        Self::compute_hashed(content, digest(content))
    }

    /// The signature of `content` whose digest the caller already computed
    /// (the source hashed what it read, the applier verified what it
    /// wrote): saves a second blake3 pass over every file. A wrong
    /// `content_digest` is caught where the signature is used: a delta
    /// planned from it is checked against the base it names.
    pub fn compute_hashed(content: &[u8], content_digest: FileDigest) -> BlockSignature {
        debug_assert_eq!(content_digest.len, content.len() as u64);
        let block_len = block_len_for(content.len() as u64);
        BlockSignature {
            base: content_digest,
            sig: fast_rsync::Signature::calculate(
                content,
                fast_rsync::SignatureOptions {
                    block_size: block_len,
                    crypto_hash_size: STRONG_LEN,
                },
            ),
            block_len,
        }
    }

    /// Digest of the content this signature describes.
    pub fn base_digest(&self) -> FileDigest {
        self.base
    }

    /// Block length of this signature.
    pub fn block_len(&self) -> u32 {
        self.block_len
    }

    /// Layout (pinned by `golden_signature_encoding`): the version byte, the
    /// base digest ([`FileDigest::to_bytes`]), then fast_rsync's serialized
    /// signature, which is librsync's: magic `72 73 01 36`, block length and
    /// strong length (u32 big-endian), then per block a 4-byte CRC and the
    /// truncated MD4.
    pub fn to_bytes(&self) -> Vec<u8> {
        let sig = self.sig.serialized();
        let mut out = Vec::with_capacity(1 + FileDigest::ENCODED_LEN + sig.len());
        out.push(SIGNATURE_FORMAT_VERSION);
        out.extend_from_slice(&self.base.to_bytes());
        out.extend_from_slice(sig);
        out
    }

    /// Parses [`to_bytes`](Self::to_bytes) output. Anything else is refused
    /// with an error: a wrong version, a foreign signature kind, a block or
    /// strong length out of range, or a block count that does not match the
    /// base length. Allocates at most `bytes.len()`.
    pub fn from_bytes(bytes: &[u8]) -> Result<BlockSignature, DeltaError> {
        let (&version, rest) = bytes
            .split_first()
            .ok_or(DeltaError::MalformedSignature("it is empty"))?;
        if version != SIGNATURE_FORMAT_VERSION {
            return Err(DeltaError::UnsupportedVersion {
                what: "block signature",
                version,
            });
        }
        let (base, sig) = split_digest(rest).ok_or(DeltaError::MalformedSignature(
            "it ends inside the base digest",
        ))?;
        if base.len > MAX_FILE_LEN {
            return Err(DeltaError::MalformedSignature(
                "its base length exceeds the largest supported file",
            ));
        }
        if sig.len() < RS_SIG_HEADER_LEN {
            return Err(DeltaError::MalformedSignature(
                "it ends inside the rsync signature header",
            ));
        }
        if sig[..4] != RS_MD4_SIG_MAGIC {
            return Err(DeltaError::MalformedSignature(
                "it is not an MD4 rsync signature",
            ));
        }
        let block_len = u32::from_be_bytes([sig[4], sig[5], sig[6], sig[7]]);
        let strong_len = u32::from_be_bytes([sig[8], sig[9], sig[10], sig[11]]);
        if !(MIN_BLOCK_LEN..=MAX_BLOCK_LEN).contains(&block_len) {
            return Err(DeltaError::MalformedSignature(
                "its block length is out of range",
            ));
        }
        if !(MIN_STRONG_LEN..=16).contains(&strong_len) {
            return Err(DeltaError::MalformedSignature(
                "its strong hash length is out of range",
            ));
        }
        // Both factors are small after the checks above: blocks <= 2^31,
        // per-block bytes <= 20, so the product fits u64 without overflow.
        let blocks = base.len.div_ceil(u64::from(block_len));
        let want = blocks * (RS_CRC_LEN as u64 + u64::from(strong_len));
        if (sig.len() - RS_SIG_HEADER_LEN) as u64 != want {
            return Err(DeltaError::MalformedSignature(
                "its block count does not match its base length",
            ));
        }
        let sig = fast_rsync::Signature::deserialize(sig.to_vec())
            .map_err(|_| DeltaError::MalformedSignature("fast_rsync refused it"))?;
        Ok(BlockSignature {
            base,
            sig,
            block_len,
        })
    }
}

impl fmt::Debug for BlockSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockSignature")
            .field("base", &self.base)
            .field("block_len", &self.block_len())
            .field("bytes", &self.sig.serialized().len())
            .finish()
    }
}

/// One version of a file, expressed as cheaply as [`plan`] could find.
///
/// Bodies are single zstd frames. Build patches with [`plan`],
/// [`plan_with_signature`] or [`plan_append`]; a hand-built or decoded patch
/// is safe too, since [`apply`] trusts nothing in it.
#[derive(Clone, PartialEq, Eq)]
pub enum Patch {
    /// The whole content: for small files, a missing base, or when a delta
    /// would not be smaller.
    Whole { data_zstd: Vec<u8> },
    /// An rsync delta (librsync format, as written by `fast_rsync::diff`)
    /// against the version `base`.
    Delta {
        base: FileDigest,
        delta_zstd: Vec<u8>,
    },
    /// The bytes to add after the version `base`, which is the new content's
    /// prefix: a file that only grew, such as a log.
    Append {
        base: FileDigest,
        tail_zstd: Vec<u8>,
    },
}

impl Patch {
    /// `"whole"`, `"delta"` or `"append"`, for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Patch::Whole { .. } => "whole",
            Patch::Delta { .. } => "delta",
            Patch::Append { .. } => "append",
        }
    }

    /// The version this patch must be applied to, if it needs one.
    pub fn base(&self) -> Option<&FileDigest> {
        match self {
            Patch::Whole { .. } => None,
            Patch::Delta { base, .. } | Patch::Append { base, .. } => Some(base),
        }
    }

    fn body(&self) -> &[u8] {
        match self {
            Patch::Whole { data_zstd } => data_zstd,
            Patch::Delta { delta_zstd, .. } => delta_zstd,
            Patch::Append { tail_zstd, .. } => tail_zstd,
        }
    }

    /// Length of [`encode`](Self::encode)'s output without building it: the
    /// bytes this patch puts on the wire.
    pub fn encoded_len(&self) -> usize {
        let header = if self.base().is_some() {
            2 + FileDigest::ENCODED_LEN
        } else {
            2
        };
        header + self.body().len()
    }

    /// Layout (version 1, pinned by `golden_patch_encoding`):
    ///
    /// | bytes | content |
    /// |---|---|
    /// | 1 | [`PATCH_FORMAT_VERSION`] |
    /// | 1 | kind: 0 whole, 1 delta, 2 append |
    /// | 40 | delta and append only: base [`FileDigest::to_bytes`] |
    /// | rest | the zstd frame |
    ///
    /// The body has no length field: the caller's framing (a Raft entry, or
    /// the chunks of one) already delimits the whole patch.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Appends [`encode`](Self::encode)'s output to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.push(PATCH_FORMAT_VERSION);
        match self {
            Patch::Whole { .. } => out.push(KIND_WHOLE),
            Patch::Delta { base, .. } => {
                out.push(KIND_DELTA);
                out.extend_from_slice(&base.to_bytes());
            }
            Patch::Append { base, .. } => {
                out.push(KIND_APPEND);
                out.extend_from_slice(&base.to_bytes());
            }
        }
        out.extend_from_slice(self.body());
    }

    /// Parses [`encode`](Self::encode) output; anything else is an error,
    /// never a panic. It only copies the body, so it allocates less than
    /// `bytes.len()`; what the body expands to is bounded later, by [`apply`].
    pub fn decode(bytes: &[u8]) -> Result<Patch, DeltaError> {
        let [version, kind, rest @ ..] = bytes else {
            return Err(DeltaError::MalformedPatch("it is shorter than its header"));
        };
        if *version != PATCH_FORMAT_VERSION {
            return Err(DeltaError::UnsupportedVersion {
                what: "patch",
                version: *version,
            });
        }
        let with_base = |rest: &[u8]| -> Result<(FileDigest, Vec<u8>), DeltaError> {
            let (base, body) = split_digest(rest)
                .ok_or(DeltaError::MalformedPatch("it ends inside the base digest"))?;
            if base.len > MAX_FILE_LEN {
                return Err(DeltaError::MalformedPatch(
                    "its base length exceeds the largest supported file",
                ));
            }
            Ok((base, checked_body(body)?))
        };
        match *kind {
            KIND_WHOLE => Ok(Patch::Whole {
                data_zstd: checked_body(rest)?,
            }),
            KIND_DELTA => {
                let (base, delta_zstd) = with_base(rest)?;
                Ok(Patch::Delta { base, delta_zstd })
            }
            KIND_APPEND => {
                let (base, tail_zstd) = with_base(rest)?;
                Ok(Patch::Append { base, tail_zstd })
            }
            _ => Err(DeltaError::MalformedPatch("its kind byte is unknown")),
        }
    }
}

/// Bodies are shown by length: a derived `Debug` would dump megabytes into a log.
impl fmt::Debug for Patch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Patch");
        s.field("kind", &self.kind());
        if let Some(base) = self.base() {
            s.field("base", base);
        }
        s.field("body_len", &self.body().len()).finish()
    }
}

fn split_digest(bytes: &[u8]) -> Option<(FileDigest, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<{ FileDigest::ENCODED_LEN }>()?;
    Some((FileDigest::from_bytes(head), rest))
}

/// Refuses a body that cannot be a zstd frame before anything is copied.
fn checked_body(body: &[u8]) -> Result<Vec<u8>, DeltaError> {
    if !body.starts_with(&ZSTD_MAGIC) {
        return Err(DeltaError::MalformedPatch("its body is not a zstd frame"));
    }
    Ok(body.to_vec())
}

/// Chooses the cheapest correct patch from the base version (its content and
/// its signature) to `new`, and returns it with the digest of `new`.
///
/// * No base, or `new` under [`SMALL_FILE_LEN`]: [`Patch::Whole`].
/// * `new` is a non-empty base followed by more bytes: [`Patch::Append`].
///   That check is a prefix comparison, far cheaper than a delta scan, so it
///   is made for every file, not only `mode = "append"` sets; a delta is not
///   also tried, as scanning a whole log to save on one append is a bad trade.
/// * Otherwise (edits, rotations, truncations) a delta, checked on the spot
///   by rebuilding `new` from it, and sent as [`Patch::Delta`] when its
///   encoding is smaller than [`Patch::Whole`]'s.
///
/// `sig` should be `BlockSignature::compute(base)`; a stale one (whose digest
/// is not the base's) is recomputed rather than trusted.
pub fn plan(base: Option<(&[u8], &BlockSignature)>, new: &[u8]) -> (Patch, FileDigest) {
    let new_digest = digest(new);
    let patch = match base {
        Some((base, sig)) if new.len() >= SMALL_FILE_LEN => plan_against(base, sig, new),
        _ => whole(new),
    };
    (patch, new_digest)
}

fn plan_against(base: &[u8], sig: &BlockSignature, new: &[u8]) -> Patch {
    let base_digest = digest(base);
    if !base.is_empty() && new.len() > base.len() && new.starts_with(base) {
        return plan_append(&base_digest, &new[base.len()..]);
    }
    let sig = if sig.base == base_digest {
        Cow::Borrowed(sig)
    } else {
        Cow::Owned(BlockSignature::compute(base))
    };
    let Some(delta) = raw_delta(&sig, new) else {
        return whole(new);
    };
    // A false block match (see the module doc) would only surface on the
    // followers as a `Verify` error and a re-request; with the base at hand
    // it is cheaper to catch it here, without buffering the rebuilt file.
    let mut check = MatchWriter::new(new);
    let rebuilt = fast_rsync::apply_limited(base, &delta, &mut check, new.len());
    if rebuilt.is_err() || !check.matched_all() {
        return whole(new);
    }
    choose(base_digest, &delta, new)
}

/// Like [`plan`], for a leader that kept only the signature of the committed
/// version, not its content. Appends cannot be detected without the base;
/// use [`plan_append`] when the caller knows the base is a prefix of the new
/// content. A false block match cannot be caught here either; followers
/// refuse it with `Verify`, and the caller then sends the file whole.
pub fn plan_with_signature(base_sig: &BlockSignature, new: &[u8]) -> (Patch, FileDigest) {
    (plan_from(Some(base_sig), new), digest(new))
}

/// The patch from the version `base_sig` describes (a whole file without
/// one) to `new`, for a caller that hashes `new` itself: the leader's
/// source hashes each file once and uses that digest everywhere.
pub fn plan_from(base_sig: Option<&BlockSignature>, new: &[u8]) -> Patch {
    match base_sig {
        Some(sig) if new.len() >= SMALL_FILE_LEN => match raw_delta(sig, new) {
            Some(delta) => choose(sig.base, &delta, new),
            None => whole(new),
        },
        _ => whole(new),
    }
}

/// The patch that adds `new_tail` after the version `base_digest`.
///
/// The caller states that the file still starts with exactly that version
/// (for instance by hashing its first `base_digest.len` bytes with a
/// [`FileHasher`]); the followers check it anyway. The digest of the new
/// content, which [`apply`] needs as `expected`, is the caller's to compute,
/// e.g. by cloning that hasher and feeding it `new_tail`.
pub fn plan_append(base_digest: &FileDigest, new_tail: &[u8]) -> Patch {
    Patch::Append {
        base: *base_digest,
        tail_zstd: compress(new_tail),
    }
}

fn whole(new: &[u8]) -> Patch {
    Patch::Whole {
        data_zstd: compress(new),
    }
}

/// `None` only if fast_rsync refuses the signature, which `BlockSignature`'s
/// checks rule out; falling back to a whole file is still better than a panic.
fn raw_delta(sig: &BlockSignature, new: &[u8]) -> Option<Vec<u8>> {
    let mut delta = Vec::new();
    fast_rsync::diff(&sig.sig.index(), new, &mut delta).ok()?;
    Some(delta)
}

/// The smaller of the delta and the whole file, once both are compressed.
fn choose(base: FileDigest, delta: &[u8], new: &[u8]) -> Patch {
    let delta_zstd = compress(delta);
    // Compressing the whole file can cost more than the diff itself. When the
    // delta is under 1/32 of the raw file, the whole file could only win by
    // compressing more than 32x, and would then save under 1/32 of the file.
    let clear_win = delta_zstd.len().saturating_mul(32) <= new.len();
    let delta = Patch::Delta { base, delta_zstd };
    if clear_win {
        return delta;
    }
    let whole = whole(new);
    // Ties go to the whole file: it needs no base on the follower.
    if delta.encoded_len() < whole.encoded_len() {
        delta
    } else {
        whole
    }
}

// One zstd context of each kind per thread, kept for its next call: made
// afresh for each patch, setting up a context took about 2 % of the
// leader's CPU and 3 % of a follower's in the 1 GiB first sync (`perf`).
// Parameters stay set across calls (libzstd's sticky parameters), and each
// call starts a new frame, so nothing of one call reaches the next.
thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::zstd_safe::DCtx<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `work` with this thread's kept context in `slot`, made by `make`
/// on the thread's first call.
fn with_kept<T, R, E>(
    slot: &'static std::thread::LocalKey<std::cell::RefCell<Option<T>>>,
    make: impl FnOnce() -> Result<T, E>,
    work: impl FnOnce(&mut T) -> Result<R, E>,
) -> Result<R, E> {
    slot.with_borrow_mut(|kept| {
        let context = match kept {
            Some(context) => context,
            None => kept.insert(make()?),
        };
        work(context)
    })
}

fn compress(data: &[u8]) -> Vec<u8> {
    let run = || -> io::Result<Vec<u8>> {
        let make = || -> io::Result<_> {
            let mut c = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
            c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(ZSTD_WINDOW_LOG))?;
            Ok(c)
        };
        with_kept(&COMPRESSOR, make, |c| c.compress(data))
    };
    // With constant, valid parameters and an output buffer of zstd's own
    // worst-case bound, libzstd fails only if it cannot allocate, which
    // Rust treats as fatal everywhere else too.
    run().expect("zstd compression of an in-memory buffer with constant parameters cannot fail")
}

/// Decompresses one body, appending to `out`, refusing to produce more than
/// `cap` bytes (a zstd bomb stops at `cap + 1`). Decoded in a stream, a
/// frame whose window exceeds ours is refused; decoded in one call, its
/// output is reserved up front from its declared size, bounded by `cap`.
fn decompress_into(body: &[u8], cap: u64, out: &mut Vec<u8>) -> Result<(), DeltaError> {
    let corrupt = |e: io::Error| DeltaError::Decompress(e.to_string());
    // Our frames declare their size: one call then decodes straight into
    // `out`, where the stream below zeroes the room first and copies through
    // its own buffers (a twentieth of a follower's CPU in a full sync).
    // libzstd checks the declaration against what it decodes, so a frame
    // cannot make more than `cap` here either.
    let declared = zstd::zstd_safe::get_frame_content_size(body).ok().flatten();
    if let Some(len) = declared.filter(|&len| len <= cap && len <= RESERVE_LIMIT) {
        let failed =
            |code| DeltaError::Decompress(zstd::zstd_safe::get_error_name(code).to_string());
        let start = out.len();
        out.reserve_exact(len as usize);
        let mut at = io::Cursor::new(&mut *out);
        at.set_position(start as u64);
        let make = || {
            let mut dctx = zstd::zstd_safe::DCtx::create();
            dctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(ZSTD_WINDOW_LOG))
                .map_err(failed)?;
            Ok(dctx)
        };
        let produced = with_kept(&DECOMPRESSOR, make, |dctx| {
            dctx.decompress(&mut at, body).map_err(failed)
        })
        .inspect_err(|_| out.truncate(start))?;
        if produced as u64 != len {
            out.truncate(start);
            return Err(DeltaError::Decompress(format!(
                "the frame declares {len} bytes but holds {produced}"
            )));
        }
        return Ok(());
    }
    let mut decoder = zstd::stream::read::Decoder::with_buffer(body).map_err(corrupt)?;
    decoder.window_log_max(ZSTD_WINDOW_LOG).map_err(corrupt)?;
    // Reserving a declared size spares large files most reallocations, and
    // a false declaration is bounded like any claim.
    out.reserve(reservation(declared.unwrap_or(0).min(cap)));
    let start = out.len();
    let produced = decoder
        .take(cap.saturating_add(1))
        .read_to_end(out)
        .map_err(corrupt)?;
    if produced as u64 > cap {
        out.truncate(start);
        return Err(DeltaError::TooLarge { limit: cap });
    }
    Ok(())
}

fn to_usize(len: u64) -> Result<usize, DeltaError> {
    usize::try_from(len).map_err(|_| DeltaError::TooLarge {
        limit: usize::MAX as u64,
    })
}

fn reservation(claimed: u64) -> usize {
    usize::try_from(claimed.min(RESERVE_LIMIT)).unwrap_or(0)
}

fn check_base(expected: &FileDigest, actual: FileDigest) -> Result<(), DeltaError> {
    if *expected == actual {
        Ok(())
    } else {
        Err(DeltaError::WrongBase {
            expected: *expected,
            actual,
        })
    }
}

fn verified(out: Vec<u8>, expected: &FileDigest) -> Result<Vec<u8>, DeltaError> {
    let actual = digest(&out);
    if actual == *expected {
        Ok(out)
    } else {
        Err(DeltaError::Verify {
            expected: *expected,
            actual,
        })
    }
}

/// Rebuilds the version `expected` from `patch` and, for deltas and appends,
/// the base content it was made against.
///
/// Refuses, without panicking on any input: a patch whose base is not `base`
/// (`MissingBase`, `WrongBase`), an `expected` longer than `max_len` or a body
/// that expands beyond `expected.len` (`TooLarge`), a corrupt body
/// (`Decompress`, `BadDelta`), and any result that is not exactly `expected`
/// (`Verify`). `max_len` bounds every allocation: the result and, for
/// deltas, instructions of at most `max_len + max_len / 8 + 64` bytes; and
/// no more than 64 MiB is reserved on the strength of a claimed length.
pub fn apply(
    base: Option<&[u8]>,
    patch: &Patch,
    expected: &FileDigest,
    max_len: u64,
) -> Result<Vec<u8>, DeltaError> {
    if expected.len > max_len {
        return Err(DeltaError::TooLarge { limit: max_len });
    }
    let out_len = to_usize(expected.len)?;
    let needs_base = |want: &FileDigest| -> Result<&[u8], DeltaError> {
        let base = base.ok_or(DeltaError::MissingBase { expected: *want })?;
        check_base(want, digest(base))?;
        Ok(base)
    };
    match patch {
        Patch::Whole { data_zstd } => apply_whole(data_zstd, expected, max_len),
        Patch::Append {
            base: want,
            tail_zstd,
        } => {
            let base = needs_base(want)?;
            let mut out = Vec::with_capacity(base.len());
            out.extend_from_slice(base);
            decompress_into(tail_zstd, expected.len.saturating_sub(want.len), &mut out)?;
            verified(out, expected)
        }
        Patch::Delta {
            base: want,
            delta_zstd,
        } => {
            let base = needs_base(want)?;
            // Honest instructions are the literals (at most the output) plus
            // at most ~20 bytes of commands per >= 512-byte block (~4 %),
            // so 1/8 of slack never refuses a real delta.
            let instr_cap = expected
                .len
                .saturating_add(expected.len / 8)
                .saturating_add(64);
            let mut delta = Vec::new();
            decompress_into(delta_zstd, instr_cap, &mut delta)?;
            let mut out = Vec::with_capacity(reservation(expected.len));
            fast_rsync::apply_limited(base, &delta, &mut out, out_len).map_err(|e| match e {
                fast_rsync::ApplyError::OutputLimit { .. } => DeltaError::TooLarge {
                    limit: expected.len,
                },
                other => DeltaError::BadDelta(other.to_string()),
            })?;
            verified(out, expected)
        }
    }
}

/// The zstd body of an encoded [`Patch::Whole`], borrowed from `encoded`
/// rather than copied out as [`Patch::decode`] does; `None` for a patch
/// that needs a base. Refuses what `decode` refuses of a whole patch.
pub fn whole_body(encoded: &[u8]) -> Result<Option<&[u8]>, DeltaError> {
    match encoded {
        [PATCH_FORMAT_VERSION, KIND_WHOLE, body @ ..] => match body.starts_with(&ZSTD_MAGIC) {
            true => Ok(Some(body)),
            false => Err(DeltaError::MalformedPatch("its body is not a zstd frame")),
        },
        _ => Patch::decode(encoded).map(|_| None),
    }
}

/// [`apply`] for a whole patch's body (see [`whole_body`]).
pub fn apply_whole(
    body: &[u8],
    expected: &FileDigest,
    max_len: u64,
) -> Result<Vec<u8>, DeltaError> {
    if expected.len > max_len {
        return Err(DeltaError::TooLarge { limit: max_len });
    }
    let mut out = Vec::new();
    decompress_into(body, expected.len, &mut out)?;
    verified(out, expected)
}

/// Applies an [`Patch::Append`] to a base that is not in memory: `base` has
/// been fed exactly the local file's current content (streamed from disk),
/// and the verified tail to write after it is returned.
///
/// The same checks as [`apply`] hold, against the whole result: `base`'s
/// digest must be the patch's base, and `base` followed by the returned tail
/// has exactly the digest `expected`, or nothing is returned.
pub fn apply_tail(
    base: &FileHasher,
    patch: &Patch,
    expected: &FileDigest,
    max_len: u64,
) -> Result<Vec<u8>, DeltaError> {
    let Patch::Append {
        base: want,
        tail_zstd,
    } = patch
    else {
        return Err(DeltaError::NotAppend { kind: patch.kind() });
    };
    if expected.len > max_len {
        return Err(DeltaError::TooLarge { limit: max_len });
    }
    check_base(want, base.digest())?;
    let mut tail = Vec::new();
    decompress_into(tail_zstd, expected.len.saturating_sub(want.len), &mut tail)?;
    let mut whole = base.clone();
    whole.update(&tail);
    let actual = whole.digest();
    if actual == *expected {
        Ok(tail)
    } else {
        Err(DeltaError::Verify {
            expected: *expected,
            actual,
        })
    }
}

/// A sink that only records whether what is written is exactly `expected`.
struct MatchWriter<'a> {
    expected: &'a [u8],
    pos: usize,
    diverged: bool,
}

impl<'a> MatchWriter<'a> {
    fn new(expected: &'a [u8]) -> Self {
        MatchWriter {
            expected,
            pos: 0,
            diverged: false,
        }
    }

    fn matched_all(&self) -> bool {
        !self.diverged && self.pos == self.expected.len()
    }
}

impl Write for MatchWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let end = self.pos.saturating_add(buf.len());
        if self.expected.get(self.pos..end) != Some(buf) {
            self.diverged = true;
        }
        self.pos = end;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
