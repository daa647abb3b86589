//! Applying a patch from the network to a local base: never a panic, never
//! an allocation beyond the limit, and any result is exactly the expected
//! content (its blake3 digest and length), whatever the patch claims.
#![no_main]

use clusterd::core::delta::{apply, digest, FileDigest, Patch};
use libfuzzer_sys::fuzz_target;

const LIMIT: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    // [base_len: u16][base][expected digest: 40 bytes][patch]
    if data.len() < 2 {
        return;
    }
    let base_len = u16::from_le_bytes([data[0], data[1]]) as usize;
    let rest = &data[2..];
    if rest.len() < base_len + FileDigest::ENCODED_LEN {
        return;
    }
    let (base, rest) = rest.split_at(base_len);
    let (want, patch) = rest.split_at(FileDigest::ENCODED_LEN);
    let expected = FileDigest::from_bytes(want.try_into().unwrap());
    let Ok(patch) = Patch::decode(patch) else {
        return;
    };
    for b in [None, Some(base)] {
        if let Ok(out) = apply(b, &patch, &expected, LIMIT) {
            assert_eq!(digest(&out), expected);
        }
    }
});
