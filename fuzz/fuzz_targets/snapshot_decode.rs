//! A Raft snapshot's payload (the committed manifest), as a follower
//! receives it from a leader: bounded decoding, never a panic, and what
//! decodes survives a round trip.
#![no_main]

use clusterd::core::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 16 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = Manifest::decode(data, LIMIT) else {
        return;
    };
    let again = Manifest::decode(&manifest.encode(), LIMIT).expect("re-encoded manifest decodes");
    assert_eq!(again, manifest);
});
