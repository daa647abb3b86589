//! Tests of the delta engine: patches verified, hostile input refused, figures beside rsync.

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
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut rng, &label)));
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
