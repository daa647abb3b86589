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
mod tests {
    use super::*;
    use rand::distr::uniform::SampleRange;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const MAX: u64 = 1 << 30;

    /// Deterministic pseudo-random bytes (blake3's XOF), so figures repeat.
    fn noise(seed: &str, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new()
            .update(seed.as_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    /// Log-like text: compressible, with lines that repeat across versions.
    fn log_lines(from: usize, count: usize) -> Vec<u8> {
        (from..from + count)
            .map(|i| {
                format!(
                    "2024-05-01T12:{:02}:{:02} tac_plus[{}]: login ok user{}\n",
                    i / 60 % 60,
                    i % 60,
                    1000 + i % 7,
                    i % 13
                )
            })
            .collect::<String>()
            .into_bytes()
    }

    fn roundtrip(base: Option<&[u8]>, new: &[u8]) -> Patch {
        let sig = base.map(BlockSignature::compute);
        let (patch, d) = plan(base.zip(sig.as_ref()), new);
        assert_eq!(d, digest(new));
        let decoded = Patch::decode(&patch.encode()).expect("own encoding decodes");
        assert_eq!(decoded, patch);
        assert_eq!(patch.encoded_len(), patch.encode().len());
        let got = apply(base, &decoded, &d, MAX).expect("own patch applies");
        assert!(got == new, "rebuilt content differs");
        patch
    }

    #[test]
    fn whole_without_base() {
        let new = noise("w", 100_000);
        assert_eq!(roundtrip(None, &new).kind(), "whole");
    }

    #[test]
    fn a_whole_patch_body_is_borrowed_and_applied_as_apply_does() {
        let new = noise("b", 100_000);
        let (whole, digest) = plan(None, &new);
        let encoded = whole.encode();
        let body = whole_body(&encoded).unwrap().expect("a whole patch");
        assert_eq!(body, whole.body());
        assert_eq!(apply_whole(body, &digest, 1 << 20).unwrap(), new);
        assert!(matches!(
            apply_whole(body, &digest, 1000),
            Err(DeltaError::TooLarge { .. })
        ));
        let mut other = new.clone();
        other[7] ^= 1;
        assert!(matches!(
            apply_whole(body, &super::digest(&other), 1 << 20),
            Err(DeltaError::Verify { .. }) | Err(DeltaError::Decompress(_))
        ));
        // A delta needs its base: not a whole body.
        let mut edited = new.clone();
        edited[50_000] ^= 1;
        let (delta, _) = plan(Some((&new, &BlockSignature::compute(&new))), &edited);
        assert!(delta.base().is_some());
        assert_eq!(whole_body(&delta.encode()).unwrap(), None);
        // Refused as decode refuses it.
        let mut bad = encoded.clone();
        bad[2] ^= 0xff;
        assert!(whole_body(&bad).is_err());
        assert!(whole_body(&encoded[..1]).is_err());
    }

    #[test]
    fn small_files_travel_whole() {
        let base = log_lines(0, 40);
        let mut new = base.clone();
        new[10] ^= 1;
        assert!(new.len() < SMALL_FILE_LEN);
        assert_eq!(roundtrip(Some(&base), &new).kind(), "whole");
        // Even a pure append of a small file.
        let mut grown = base.clone();
        grown.extend_from_slice(b"one more line\n");
        assert_eq!(roundtrip(Some(&base), &grown).kind(), "whole");
    }

    #[test]
    fn edit_in_the_middle_is_a_delta() {
        let base = noise("d", 200_000);
        let mut new = base.clone();
        new.splice(
            100_000..100_010,
            b"inserted text, longer than the cut".iter().copied(),
        );
        let patch = roundtrip(Some(&base), &new);
        assert_eq!(patch.kind(), "delta");
        assert_eq!(patch.base(), Some(&digest(&base)));
        assert!(patch.encoded_len() < 2_000, "{patch:?}");
    }

    #[test]
    fn growth_is_an_append_of_only_the_new_bytes() {
        let base = log_lines(0, 2_000);
        let mut new = base.clone();
        let tail = log_lines(2_000, 50);
        new.extend_from_slice(&tail);
        let patch = roundtrip(Some(&base), &new);
        assert_eq!(patch.kind(), "append");
        assert_eq!(patch.base(), Some(&digest(&base)));
        assert!(patch.encoded_len() < 2 + 40 + tail.len(), "{patch:?}");
    }

    #[test]
    fn rotation_falls_back_to_delta_or_whole() {
        let base = log_lines(0, 3_000);
        // Truncated and started over: shorter, unrelated prefix.
        let rotated = log_lines(50_000, 200);
        let kind = roundtrip(Some(&base), &rotated).kind();
        assert!(kind == "delta" || kind == "whole", "{kind}");
        // Replaced by a longer file that does not start with the base.
        let mut replaced = log_lines(70_000, 4_000);
        replaced.truncate(base.len() + 10_000);
        let kind = roundtrip(Some(&base), &replaced).kind();
        assert!(kind == "delta" || kind == "whole", "{kind}");
        // Truncated to a prefix of the base: a delta of pure copies.
        let cut = &base[..base.len() / 2];
        assert_eq!(roundtrip(Some(&base), cut).kind(), "delta");
    }

    #[test]
    fn empty_files() {
        assert_eq!(roundtrip(None, b"").kind(), "whole");
        assert_eq!(roundtrip(Some(b""), b"").kind(), "whole");
        let big = noise("e", 10_000);
        assert_eq!(roundtrip(Some(&big), b"").kind(), "whole");
        assert_eq!(roundtrip(Some(b""), &big).kind(), "whole");
        let sig = BlockSignature::compute(b"");
        assert_eq!(BlockSignature::from_bytes(&sig.to_bytes()), Ok(sig.clone()));
        let (patch, d) = plan_with_signature(&sig, &big);
        assert_eq!(apply(None, &patch, &d, MAX).as_deref(), Ok(&big[..]));
    }

    #[test]
    fn stale_signature_is_recomputed_not_trusted() {
        let base = noise("s1", 50_000);
        let other = BlockSignature::compute(&noise("s2", 50_000));
        let mut new = base.clone();
        new[25_000] ^= 0xff;
        let (patch, d) = plan(Some((&base, &other)), &new);
        assert_eq!(patch.kind(), "delta");
        assert_eq!(apply(Some(&base), &patch, &d, MAX).as_deref(), Ok(&new[..]));
    }

    #[test]
    fn planning_from_a_known_digest_matches_planning_from_scratch() {
        let base = noise("known-base", 300_000);
        let mut new = base.clone();
        new[150_000] ^= 0xff;
        let sig = BlockSignature::compute(&base);
        assert_eq!(BlockSignature::compute_hashed(&base, digest(&base)), sig);
        let (patch, new_digest) = plan_with_signature(&sig, &new);
        assert_eq!(plan_from(Some(&sig), &new), patch);
        assert!(matches!(patch, Patch::Delta { .. }));
        assert_eq!(
            apply(Some(&base), &patch, &new_digest, u64::MAX).unwrap(),
            new
        );
        let whole = plan_from(None, &new);
        assert!(matches!(whole, Patch::Whole { .. }));
        assert_eq!(apply(None, &whole, &new_digest, u64::MAX).unwrap(), new);
    }

    #[test]
    fn plan_with_signature_only() {
        let base = noise("p", 300_000);
        let sig = BlockSignature::from_bytes(&BlockSignature::compute(&base).to_bytes()).unwrap();
        let mut new = base.clone();
        new[150_000] = new[150_000].wrapping_add(1);
        let (patch, d) = plan_with_signature(&sig, &new);
        assert_eq!(patch.kind(), "delta");
        assert_eq!(patch.base(), Some(&digest(&base)));
        assert_eq!(apply(Some(&base), &patch, &d, MAX).as_deref(), Ok(&new[..]));
    }

    #[test]
    fn append_with_streamed_base() {
        let base = log_lines(0, 5_000);
        let tail = log_lines(5_000, 100);
        let mut hasher = FileHasher::new();
        for chunk in base.chunks(4096) {
            hasher.update(chunk);
        }
        assert_eq!(hasher.digest(), digest(&base));
        let patch = plan_append(&hasher.digest(), &tail);
        let mut full = hasher.clone();
        full.update(&tail);
        let expected = full.digest();
        assert_eq!(
            apply_tail(&hasher, &patch, &expected, MAX).as_deref(),
            Ok(&tail[..])
        );
        // The in-memory path agrees.
        let mut new = base.clone();
        new.extend_from_slice(&tail);
        assert_eq!(apply(Some(&base), &patch, &expected, MAX), Ok(new));
        // A base that moved on is refused, as is a non-append patch.
        let mut moved = hasher.clone();
        moved.update(b"x");
        assert!(matches!(
            apply_tail(&moved, &patch, &expected, MAX),
            Err(DeltaError::WrongBase { .. })
        ));
        let (whole, d) = plan(None, &tail);
        assert_eq!(
            apply_tail(&hasher, &whole, &d, MAX),
            Err(DeltaError::NotAppend { kind: "whole" })
        );
        // The wrong tail for `expected` is refused by the hash.
        let liar = plan_append(&hasher.digest(), &log_lines(9_000, 100));
        assert!(matches!(
            apply_tail(&hasher, &liar, &expected, MAX),
            Err(DeltaError::Verify { .. })
        ));
    }

    #[test]
    fn wrong_or_missing_base_is_refused() {
        let base = noise("b", 100_000);
        let mut new = base.clone();
        new[5] ^= 1;
        let sig = BlockSignature::compute(&base);
        let (patch, d) = plan(Some((&base, &sig)), &new);
        assert_eq!(patch.kind(), "delta");
        let other = noise("other", 100_000);
        let err = apply(Some(&other), &patch, &d, MAX).unwrap_err();
        assert_eq!(
            err,
            DeltaError::WrongBase {
                expected: digest(&base),
                actual: digest(&other)
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&digest(&base).hex()) && msg.contains(&digest(&other).hex()),
            "{msg}"
        );
        assert_eq!(
            apply(None, &patch, &d, MAX),
            Err(DeltaError::MissingBase {
                expected: digest(&base)
            })
        );
    }

    #[test]
    fn corrupted_patch_is_refused() {
        let base = noise("c", 100_000);
        let mut new = base.clone();
        new.extend_from_slice(&noise("c2", 3000));
        new[1000] ^= 1;
        let sig = BlockSignature::compute(&base);
        let (patch, d) = plan(Some((&base, &sig)), &new);
        let enc = patch.encode();
        // Truncation anywhere, and a flipped bit anywhere, never yields data.
        for cut in 0..enc.len() {
            if let Ok(p) = Patch::decode(&enc[..cut]) {
                assert!(apply(Some(&base), &p, &d, MAX).is_err(), "cut {cut}");
            }
        }
        for i in (0..enc.len()).step_by(7) {
            let mut bad = enc.clone();
            bad[i] ^= 0x10;
            if let Ok(p) = Patch::decode(&bad) {
                assert!(apply(Some(&base), &p, &d, MAX).is_err(), "flip at {i}");
            }
        }
        assert_eq!(
            Patch::decode(&[9, 0, 0x28, 0xb5, 0x2f, 0xfd]),
            Err(DeltaError::UnsupportedVersion {
                what: "patch",
                version: 9
            })
        );
        assert!(matches!(
            Patch::decode(&[1, 7]),
            Err(DeltaError::MalformedPatch(_))
        ));
        assert!(matches!(
            Patch::decode(&[1, 0, 1, 2, 3, 4]),
            Err(DeltaError::MalformedPatch(_))
        ));
        assert!(matches!(
            Patch::decode(&[]),
            Err(DeltaError::MalformedPatch(_))
        ));
    }

    #[test]
    fn delta_instructions_that_do_not_fit_the_base_are_refused() {
        let base = noise("i", 10_000);
        // A copy past the end of the base, in librsync's format.
        // COPY with 2-byte offset 0x3000 and 2-byte length 0x1000, then END.
        let raw = [0x72, 0x73, 0x02, 0x36, 0x4a, 0x30, 0x00, 0x10, 0x00, 0x00];
        let patch = Patch::Delta {
            base: digest(&base),
            delta_zstd: compress(&raw),
        };
        let want = digest(&noise("i2", 4096));
        assert!(matches!(
            apply(Some(&base), &patch, &want, MAX),
            Err(DeltaError::BadDelta(_))
        ));
    }

    #[test]
    fn a_frame_refused_midway_leaves_this_threads_kept_decoder_usable() {
        let data = noise("fits", 1 << 20);
        let frame = compress(&data);
        let cut = &frame[..frame.len() / 2];
        let mut out = b"kept".to_vec();
        assert!(decompress_into(cut, MAX, &mut out).is_err());
        assert_eq!(out, b"kept");
        decompress_into(&frame, MAX, &mut out).unwrap();
        assert_eq!(&out[4..], &data[..]);
        assert!(decompress_into(cut, MAX, &mut out).is_err());
        // The kept compressor gives the same bytes each time.
        assert_eq!(compress(&data), frame);
    }

    #[test]
    fn zstd_bomb_is_refused() {
        let bomb = compress(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 8 << 10, "{}", bomb.len());
        let claims_small = digest(&[0u8; 1000]);
        let patch = Patch::Whole {
            data_zstd: bomb.clone(),
        };
        assert_eq!(
            apply(None, &patch, &claims_small, MAX),
            Err(DeltaError::TooLarge { limit: 1000 })
        );
        // Claiming the true size does not get past `max_len` either.
        let honest = FileDigest {
            len: 64 << 20,
            hash: [0; 32],
        };
        assert_eq!(
            apply(None, &patch, &honest, 1 << 20),
            Err(DeltaError::TooLarge { limit: 1 << 20 })
        );
        let base = noise("z", 5000);
        let delta_bomb = Patch::Delta {
            base: digest(&base),
            delta_zstd: bomb.clone(),
        };
        assert!(matches!(
            apply(Some(&base), &delta_bomb, &claims_small, MAX),
            Err(DeltaError::TooLarge { .. })
        ));
        let append_bomb = Patch::Append {
            base: digest(&base),
            tail_zstd: bomb,
        };
        assert!(matches!(
            apply(Some(&base), &append_bomb, &claims_small, MAX),
            Err(DeltaError::TooLarge { .. })
        ));
    }

    #[test]
    fn huge_claimed_lengths_reserve_nothing_up_front() {
        let base = noise("h", 5000);
        let patches = [
            plan(None, b"x").0,
            Patch::Delta {
                base: digest(&base),
                delta_zstd: compress(&[0x72, 0x73, 0x02, 0x36, 0]),
            },
            plan_append(&digest(&base), b"x"),
        ];
        for len in [1 << 50, u64::MAX] {
            let huge = FileDigest { len, hash: [7; 32] };
            for patch in &patches {
                let err = apply(Some(&base), patch, &huge, u64::MAX).unwrap_err();
                assert!(matches!(err, DeltaError::Verify { .. }), "{err}");
            }
        }
    }

    #[test]
    fn verify_failure_returns_nothing() {
        let new = noise("v", 10_000);
        let (patch, d) = plan(None, &new);
        let mut wrong_hash = d;
        wrong_hash.hash[0] ^= 1;
        let err = apply(None, &patch, &wrong_hash, MAX).unwrap_err();
        assert_eq!(
            err,
            DeltaError::Verify {
                expected: wrong_hash,
                actual: d
            }
        );
        // Shorter than claimed is a verify failure too, not a truncated file.
        let longer = FileDigest {
            len: d.len + 1,
            hash: d.hash,
        };
        assert!(matches!(
            apply(None, &patch, &longer, MAX),
            Err(DeltaError::Verify { .. })
        ));
    }

    #[test]
    fn signature_bytes_are_checked() {
        let sig = BlockSignature::compute(&noise("sig", 20_000));
        let bytes = sig.to_bytes();
        assert_eq!(BlockSignature::from_bytes(&bytes), Ok(sig));
        for cut in 0..bytes.len() {
            assert!(
                BlockSignature::from_bytes(&bytes[..cut]).is_err(),
                "cut {cut}"
            );
        }
        let mut zero_block = bytes.clone();
        zero_block[41 + 4..41 + 8].copy_from_slice(&0u32.to_be_bytes());
        assert!(BlockSignature::from_bytes(&zero_block).is_err());
        let mut blake2 = bytes.clone();
        blake2[41 + 3] = 0x37;
        assert!(BlockSignature::from_bytes(&blake2).is_err());
        let mut version = bytes;
        version[0] = 2;
        assert_eq!(
            BlockSignature::from_bytes(&version),
            Err(DeltaError::UnsupportedVersion {
                what: "block signature",
                version: 2
            })
        );
    }

    #[test]
    fn block_len_choice() {
        assert_eq!(block_len_for(0), MIN_BLOCK_LEN);
        assert_eq!(block_len_for(1 << 20), MIN_BLOCK_LEN);
        assert_eq!(block_len_for(64 << 20), 2048);
        assert_eq!(block_len_for(1 << 30), 8192);
        assert_eq!(block_len_for(MAX_FILE_LEN), MAX_BLOCK_LEN);
    }

    /// `zstd -19` of "hello\n" as one frame; zstd's frame format is frozen,
    /// so this decodes the same with any later libzstd.
    const HELLO_FRAME: [u8; 15] = [
        0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x06, 0x31, 0x00, 0x00, 0x68, 0x65, 0x6c, 0x6c, 0x6f, 0x0a,
    ];

    #[test]
    fn golden_patch_encoding() {
        let base = FileDigest {
            len: 0x0102,
            hash: [0xab; 32],
        };
        let whole = Patch::Whole {
            data_zstd: HELLO_FRAME.to_vec(),
        };
        let mut want = vec![1, 0];
        want.extend_from_slice(&HELLO_FRAME);
        assert_eq!(whole.encode(), want);

        let delta = Patch::Delta {
            base,
            delta_zstd: HELLO_FRAME.to_vec(),
        };
        let mut want = vec![1, 1, 0x02, 0x01, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(&[0xab; 32]);
        want.extend_from_slice(&HELLO_FRAME);
        assert_eq!(delta.encode(), want);

        let append = Patch::Append {
            base,
            tail_zstd: HELLO_FRAME.to_vec(),
        };
        want[1] = 2;
        assert_eq!(append.encode(), want);

        for p in [whole, delta, append] {
            assert_eq!(Patch::decode(&p.encode()), Ok(p));
        }
        let decoded = Patch::decode(&[&[1u8, 0][..], &HELLO_FRAME].concat()).unwrap();
        assert_eq!(
            apply(None, &decoded, &digest(b"hello\n"), 100).as_deref(),
            Ok(&b"hello\n"[..])
        );
    }

    #[test]
    fn golden_signature_encoding() {
        let content: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let bytes = BlockSignature::compute(&content).to_bytes();
        let mut want = vec![1];
        want.extend_from_slice(&digest(&content).to_bytes());
        // librsync MD4 magic, block length 512, strong length 8.
        want.extend_from_slice(&[0x72, 0x73, 0x01, 0x36, 0, 0, 2, 0, 0, 0, 0, 8]);
        want.extend_from_slice(&GOLDEN_SIG_BLOCKS);
        assert_eq!(bytes, want);
        assert_eq!(
            digest(&content).hex(),
            "b43670a52d1af24abdac5d2c3ed19ff4e62b60a618e823ad555888b1b0b91cff"
        );
    }

    /// Per block (two: 512 + 488 bytes) the rolling CRC then 8 bytes of MD4.
    const GOLDEN_SIG_BLOCKS: [u8; 24] = [
        0x4a, 0xde, 0x33, 0x4b, 0x65, 0xed, 0xc6, 0xcc, 0x2a, 0x8c, 0x73, 0xed, //
        0xe3, 0x6c, 0x2c, 0x27, 0xd7, 0xa7, 0xe2, 0x59, 0x3a, 0xf9, 0x5b, 0x66,
    ];

    #[derive(Debug, Clone)]
    enum Edit {
        Insert(usize, Vec<u8>),
        Delete(usize, usize),
        Overwrite(usize, Vec<u8>),
        Append(Vec<u8>),
        Truncate(usize),
    }

    fn apply_edit(buf: &mut Vec<u8>, edit: &Edit) {
        let at = |p: usize, len: usize| if len == 0 { 0 } else { p % (len + 1) };
        match edit {
            Edit::Insert(p, bytes) => {
                let i = at(*p, buf.len());
                buf.splice(i..i, bytes.iter().copied());
            }
            Edit::Delete(p, n) => {
                let i = at(*p, buf.len());
                let end = (i + n).min(buf.len());
                buf.drain(i..end);
            }
            Edit::Overwrite(p, bytes) => {
                let i = at(*p, buf.len());
                for (k, b) in bytes.iter().enumerate() {
                    match buf.get_mut(i + k) {
                        Some(slot) => *slot = *b,
                        None => buf.push(*b),
                    }
                }
            }
            Edit::Append(bytes) => buf.extend_from_slice(bytes),
            Edit::Truncate(n) => {
                let keep = at(*n, buf.len());
                buf.truncate(keep);
            }
        }
    }

    /// Runs `f` for `n` seeded, deterministic cases of the property `name`.
    /// Case `k` draws from `StdRng::seed_from_u64(fnv1a(name) ^ k)`, so a
    /// failure names its case and seed and replays exactly. `f` gets the rng
    /// and a label to put in its assertion messages; a panic anywhere in the
    /// case (an `unwrap`, or the code under test) is reported with the label.
    fn for_cases(n: u64, name: &str, mut f: impl FnMut(&mut StdRng, &str)) {
        // FNV-1a: stable across Rust releases, unlike `DefaultHasher`.
        let base = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        for case in 0..n {
            let seed = base ^ case;
            let label = format!("{name}: case {case} of {n}, seed {seed:#018x}");
            let mut rng = StdRng::seed_from_u64(seed);
            let run =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut rng, &label)));
            if let Err(payload) = run {
                let msg = payload
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| payload.downcast_ref::<&str>().copied())
                    .unwrap_or("non-string panic payload");
                if msg.contains(&label) {
                    // An assertion that already names its case.
                    std::panic::resume_unwind(payload);
                }
                panic!("{label} failed: {msg}");
            }
        }
    }

    /// Uniform bytes, the length uniform in `len`.
    fn random_bytes(rng: &mut StdRng, len: impl SampleRange<usize>) -> Vec<u8> {
        let mut out = vec![0u8; rng.random_range(len)];
        rng.fill(&mut out[..]);
        out
    }

    /// Any `usize` (uniform over the full range on 64-bit targets).
    fn any_usize(rng: &mut StdRng) -> usize {
        rng.random::<u64>() as usize
    }

    /// Equally likely: random bytes, or log lines.
    fn content(rng: &mut StdRng) -> Vec<u8> {
        match rng.random_range(0..2) {
            0 => random_bytes(rng, 0..60_000),
            _ => {
                let from = rng.random_range(0usize..3_000);
                let n = rng.random_range(0usize..1_500);
                log_lines(from, n)
            }
        }
    }

    /// Each kind of edit equally likely.
    fn edit(rng: &mut StdRng) -> Edit {
        match rng.random_range(0..5) {
            0 => Edit::Insert(any_usize(rng), random_bytes(rng, 0..3_000)),
            1 => Edit::Delete(any_usize(rng), rng.random_range(0usize..5_000)),
            2 => Edit::Overwrite(any_usize(rng), random_bytes(rng, 0..3_000)),
            3 => Edit::Append(random_bytes(rng, 0..3_000)),
            _ => Edit::Truncate(any_usize(rng)),
        }
    }

    /// One librsync instruction or stray byte, each kind equally likely:
    /// a literal of 1..=64 bytes, a copy mostly in and around a 3,000-byte
    /// base, a copy with arbitrary 64-bit offset and length, or any byte.
    fn hostile_op(rng: &mut StdRng) -> Vec<u8> {
        match rng.random_range(0..4) {
            0 => {
                let lit = random_bytes(rng, 1..=64);
                [&[lit.len() as u8][..], &lit].concat()
            }
            1 => {
                let off = rng.random_range(0u16..3_100);
                let len = rng.random_range(0u16..600);
                [&[0x4a][..], &off.to_be_bytes(), &len.to_be_bytes()].concat()
            }
            2 => {
                let off = rng.random::<u64>();
                let len = rng.random::<u64>();
                [&[0x54][..], &off.to_be_bytes(), &len.to_be_bytes()].concat()
            }
            _ => vec![rng.random::<u8>()],
        }
    }

    #[test]
    fn random_edits_reproduce_the_exact_bytes() {
        for_cases(
            300,
            "random_edits_reproduce_the_exact_bytes",
            |rng, case| {
                let base = content(rng);
                let edits: Vec<Edit> = (0..rng.random_range(0..6)).map(|_| edit(rng)).collect();
                let mut new = base.clone();
                for e in &edits {
                    apply_edit(&mut new, e);
                }
                let sig = BlockSignature::compute(&base);
                let (patch, d) = plan(Some((&base, &sig)), &new);
                assert_eq!(d, digest(&new), "{case}");
                let decoded = Patch::decode(&patch.encode()).unwrap();
                let got = apply(Some(&base), &decoded, &d, MAX).unwrap();
                assert!(got == new, "{case}: rebuilt content differs");
                if new.len() >= SMALL_FILE_LEN
                    && !base.is_empty()
                    && new.len() > base.len()
                    && new.starts_with(&base)
                {
                    assert_eq!(patch.kind(), "append", "{case}");
                }

                // The signature-only planner, via the stored form of the signature.
                let stored = BlockSignature::from_bytes(&sig.to_bytes()).unwrap();
                let (patch, d2) = plan_with_signature(&stored, &new);
                assert_eq!(d2, d, "{case}");
                let got = apply(Some(&base), &patch, &d, MAX).unwrap();
                assert!(
                    got == new,
                    "{case}: rebuilt content differs (signature-only plan)"
                );
            },
        );
    }

    #[test]
    fn decode_of_arbitrary_bytes_never_panics() {
        for_cases(
            300,
            "decode_of_arbitrary_bytes_never_panics",
            |rng, case| {
                let bytes = random_bytes(rng, 0..600);
                let base = random_bytes(rng, 0..2_000);
                let len = rng.random_range(0u64..5_000);
                let hash = rng.random::<[u8; 32]>();
                let expected = FileDigest { len, hash };
                if let Ok(p) = Patch::decode(&bytes) {
                    assert_eq!(p.encode(), bytes, "{case}");
                    // Anything that applies was verified, so it must be `expected`.
                    if let Ok(out) = apply(Some(&base), &p, &expected, 1 << 20) {
                        assert_eq!(digest(&out), expected, "{case}");
                    }
                }
                // The same bytes behind a valid header reach the zstd and rsync decoders.
                for kind in [KIND_WHOLE, KIND_DELTA, KIND_APPEND] {
                    let mut framed = vec![PATCH_FORMAT_VERSION, kind];
                    if kind != KIND_WHOLE {
                        framed.extend_from_slice(&digest(&base).to_bytes());
                    }
                    framed.extend_from_slice(&ZSTD_MAGIC);
                    framed.extend_from_slice(&bytes);
                    if let Ok(p) = Patch::decode(&framed) {
                        if let Ok(out) = apply(Some(&base), &p, &expected, 1 << 20) {
                            assert_eq!(digest(&out), expected, "{case}: kind {kind}");
                        }
                    }
                }
                let _ = BlockSignature::from_bytes(&bytes);
            },
        );
    }

    /// Well-formed frames around hostile librsync instructions: literals,
    /// copies in and out of the base, and stray bytes, in any order.
    #[test]
    fn hostile_delta_instructions_never_panic() {
        for_cases(
            300,
            "hostile_delta_instructions_never_panic",
            |rng, case| {
                let ops: Vec<Vec<u8>> = (0..rng.random_range(0..40))
                    .map(|_| hostile_op(rng))
                    .collect();
                let end = rng.random::<bool>();
                let base = random_bytes(rng, 0..3_000);
                let len = rng.random_range(0u64..5_000);
                let hash = rng.random::<[u8; 32]>();
                let mut raw = vec![0x72, 0x73, 0x02, 0x36];
                raw.extend(ops.concat());
                if end {
                    raw.push(0);
                }
                let patch = Patch::Delta {
                    base: digest(&base),
                    delta_zstd: compress(&raw),
                };
                let expected = FileDigest { len, hash };
                if let Ok(out) = apply(Some(&base), &patch, &expected, 1 << 20) {
                    assert_eq!(digest(&out), expected, "{case}");
                }
            },
        );
    }

    #[test]
    fn mutated_signatures_never_panic_or_hang() {
        let base = noise("mut", 6_000);
        let sig_bytes = BlockSignature::compute(&base).to_bytes();
        for_cases(
            300,
            "mutated_signatures_never_panic_or_hang",
            |rng, case| {
                let flips: Vec<(usize, u8)> = (0..rng.random_range(1..4))
                    .map(|_| (any_usize(rng), rng.random::<u8>()))
                    .collect();
                let mut bytes = sig_bytes.clone();
                for (i, x) in flips {
                    let n = bytes.len();
                    bytes[i % n] ^= x;
                }
                if let Ok(sig) = BlockSignature::from_bytes(&bytes) {
                    let mut new = base.clone();
                    new[100] ^= 1;
                    let (patch, d) = plan_with_signature(&sig, &new);
                    if let Ok(out) = apply(Some(&base), &patch, &d, MAX) {
                        assert!(out == new, "{case}: rebuilt content differs");
                    }
                }
            },
        );
    }

    /// The reason this module exists: a one-byte change in a 1 MiB file
    /// costs a small fraction of the file on the wire.
    #[test]
    fn one_byte_change_in_1mib_is_under_2_percent() {
        for_cases(
            12,
            "one_byte_change_in_1mib_is_under_2_percent",
            |rng, case| {
                let seed = rng.random::<u64>();
                let pos = rng.random_range(0usize..(1 << 20));
                let xor = rng.random_range(1u8..=255);
                let base = noise(&seed.to_string(), 1 << 20);
                let mut new = base.clone();
                new[pos] ^= xor;
                let sig = BlockSignature::compute(&base);
                let (patch, d) = plan(Some((&base, &sig)), &new);
                assert_eq!(patch.kind(), "delta", "{case}");
                assert!(
                    patch.encoded_len() * 50 < new.len(),
                    "{case}: {} bytes",
                    patch.encoded_len()
                );
                let (patch2, _) = plan_with_signature(&sig, &new);
                assert!(
                    patch2.encoded_len() * 50 < new.len(),
                    "{case}: {} bytes (signature-only plan)",
                    patch2.encoded_len()
                );
                assert!(
                    apply(Some(&base), &patch, &d, MAX).unwrap() == new,
                    "{case}: rebuilt content differs"
                );
            },
        );
    }

    /// Prints the wire size of a one-byte change in a 64 MiB pseudo-random
    /// file, the product's benchmark case. `rsync --no-whole-file --stats` put
    /// 98,434 bytes on the wire for the same change (rsync 3.2, this machine);
    /// the product bar is a tenth of that.
    #[test]
    fn report_64mib_one_byte_change() {
        let len = 64 << 20;
        let base = noise("64mib", len);
        let mut new = base.clone();
        new[len / 2 + 1] ^= 0x5a;

        let t = std::time::Instant::now();
        let sig = BlockSignature::compute(&base);
        let t_sig = t.elapsed();
        let t = std::time::Instant::now();
        let (patch, d) = plan_with_signature(&sig, &new);
        let t_plan = t.elapsed();
        let t = std::time::Instant::now();
        let got = apply(Some(&base), &patch, &d, MAX).expect("applies");
        let t_apply = t.elapsed();
        assert!(got == new);
        assert_eq!(patch.kind(), "delta");
        assert!(
            patch.encoded_len() <= 98_434 / 10,
            "{}",
            patch.encoded_len()
        );

        let (whole, _) = plan(None, &new);
        let tail = noise("tail", 10 << 20);
        let append = plan_append(&d, &tail);
        println!(
            "64 MiB file, 1-byte change: patch {} bytes ({}), whole {} bytes; \
             stored signature {} bytes, block {} bytes; \
             signature {:?}, plan {:?}, apply {:?}",
            patch.encoded_len(),
            patch.kind(),
            whole.encoded_len(),
            sig.to_bytes().len(),
            sig.block_len(),
            t_sig,
            t_plan,
            t_apply,
        );
        let small = noise("1mib", 1 << 20);
        let mut small_new = small.clone();
        small_new[(1 << 19) + 1] ^= 0x5a;
        let (small_patch, _) = plan(Some((&small, &BlockSignature::compute(&small))), &small_new);
        println!(
            "1 MiB file, 1-byte change: patch {} bytes ({:.3} % of the file)",
            small_patch.encoded_len(),
            small_patch.encoded_len() as f64 * 100.0 / small_new.len() as f64,
        );
        println!(
            "10 MiB of pseudo-random bytes appended: patch {} bytes ({:.4} x the tail)",
            append.encoded_len(),
            append.encoded_len() as f64 / tail.len() as f64,
        );
    }
}
