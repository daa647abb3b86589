//! A Raft entry's payload, as a peer or a restarted node's log hands it to
//! the state machine: decoding must refuse or succeed, never panic, and a
//! decoded file batch must pass the manifest's path gate or be refused whole.
#![no_main]

use clusterd::core::manifest::Manifest;
use clusterd::raft::core::Command;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(command) = Command::decode(data) else {
        return;
    };
    // What decodes re-encodes to something that decodes to the same command.
    let again = Command::decode(&command.encode()).expect("re-encoded command decodes");
    assert_eq!(again, command);
    if let Command::Files(batch) = command {
        let mut manifest = Manifest::default();
        if let Ok(ops) = manifest.apply(1, &batch) {
            // An `Xattrs` op right after a `Put`/`Dir` of its path is folded
            // into it, so there may be fewer checked ops, never more.
            assert!(ops.len() <= batch.ops.len());
        }
    }
});
