//! The seed corpora of the fuzz targets in `fuzz/`, made from the real
//! encoders so they stay valid as formats evolve: this test fails when a
//! committed seed no longer matches what the encoders produce, and
//! `CLUSTERD_WRITE_FUZZ_SEEDS=1 cargo test --lib fuzz_seeds` rewrites them.

use std::path::{Path, PathBuf};

use crate::core::delta::{digest, plan, BlockSignature};
use crate::core::manifest::{
    Chunk, Content, EntryKind, FileBatch, FileOp, Manifest, Meta, WireDigest,
};
use crate::raft::core::Command;

fn meta(kind: EntryKind, mode: u32) -> Meta {
    Meta {
        kind,
        mode,
        uid: 0,
        gid: 42,
        user: Some("root".into()),
        group: Some("shadow".into()),
        mtime_ns: 1_763_000_000_123_456_789,
    }
}

/// A batch with every kind of op, as a leader proposes for /etc/tacacs+.
fn batch() -> FileBatch {
    let content = b"key = \"secret\"\nuser = alice { member = admins }\n";
    let (patch, d) = plan(None, content);
    FileBatch {
        set: "tacacs".into(),
        origin: 1,
        proposed_at_ms: 1_763_000_000_000,
        ops: vec![
            FileOp::Dir {
                path: b"conf.d".to_vec(),
                meta: meta(EntryKind::Dir, 0o750),
            },
            FileOp::Put {
                path: b"conf.d/tac_plus.conf".to_vec(),
                meta: meta(EntryKind::File, 0o640),
                digest: WireDigest::new(&d),
                content: Content::Inline(patch.encode()),
            },
            FileOp::Put {
                path: b"big.db".to_vec(),
                meta: meta(EntryKind::File, 0o600),
                digest: WireDigest::new(&d),
                content: Content::Staged {
                    upload: 7,
                    len: 3 << 20,
                },
            },
            FileOp::Symlink {
                path: b"current".to_vec(),
                target: b"conf.d/tac_plus.conf".to_vec(),
                meta: meta(EntryKind::Symlink, 0o777),
            },
            FileOp::Rename {
                from: b"old.conf".to_vec(),
                to: b"conf.d/old.conf".to_vec(),
            },
            FileOp::Remove {
                path: b"stale".to_vec(),
            },
            FileOp::Forget {
                path: b"rotated.1".to_vec(),
            },
        ],
    }
}

/// A new file and two more names of it, as a leader proposes them for a
/// set with `hard_links = true`.
fn links_batch() -> FileBatch {
    let content = b"root:x:0:0::/root:/bin/sh\n";
    let (patch, d) = plan(None, content);
    FileBatch {
        set: "accounts".into(),
        origin: 1,
        proposed_at_ms: 1_763_000_000_000,
        ops: vec![
            FileOp::Dir {
                path: b"backup".to_vec(),
                meta: meta(EntryKind::Dir, 0o700),
            },
            FileOp::Put {
                path: b"backup/passwd".to_vec(),
                meta: meta(EntryKind::File, 0o644),
                digest: WireDigest::new(&d),
                content: Content::Inline(patch.encode()),
            },
            FileOp::Link {
                path: b"passwd".to_vec(),
                target: b"backup/passwd".to_vec(),
            },
            FileOp::Link {
                path: b"passwd-".to_vec(),
                target: b"backup/passwd".to_vec(),
            },
        ],
    }
}

fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    out.push((
        "entry_decode",
        "barrier",
        Command::Barrier {
            origin: 2,
            token: 99,
        }
        .encode(),
    ));
    out.push(("entry_decode", "files", Command::Files(batch()).encode()));
    out.push((
        "entry_decode",
        "chunk",
        Command::Chunk(Chunk {
            upload: 7,
            offset: 1 << 20,
            data: vec![0xab; 64],
        })
        .encode(),
    ));
    let mut manifest = Manifest::default();
    let mut b = batch();
    // Staged content needs its chunks; the snapshot seed keeps what applies alone.
    b.ops.retain(|op| {
        !matches!(
            op,
            FileOp::Put {
                content: Content::Staged { .. },
                ..
            }
        )
    });
    manifest.apply(5, &b).expect("the seed batch applies");
    out.push(("snapshot_decode", "tacacs", manifest.encode()));
    // Hard links (sets with `hard_links = true`): a batch that gives a file
    // two more names, and the snapshot format (3) that carries them.
    let mut linked = Manifest::default();
    linked
        .apply(5, &links_batch())
        .expect("the links batch applies");
    out.push((
        "entry_decode",
        "links",
        Command::Files(links_batch()).encode(),
    ));
    out.push(("snapshot_decode", "links", linked.encode()));
    for (name, path) in [
        ("plain", &b"\x00conf.d/tac_plus.conf"[..]),
        ("dir", b"\x01home/alice"),
        ("dotdot", b"\x00../etc/shadow"),
        ("absolute", b"\x00/etc/shadow"),
        ("nul", b"\x00a\x00b"),
        ("excluded", b"\x01home/alice/.ssh"),
    ] {
        out.push(("path_policy", name, path.to_vec()));
    }
    let base: Vec<u8> = (0..4096u32)
        .flat_map(|i| (i * 7919).to_le_bytes())
        .collect();
    let mut new = base.clone();
    new[5000] ^= 1;
    for (name, new) in [("delta", new), ("append", [&base[..], b"tail"].concat())] {
        let sig = BlockSignature::compute(&base);
        let (patch, d) = plan(Some((&base, &sig)), &new);
        let mut seed = (base.len() as u16).to_le_bytes().to_vec();
        seed.extend_from_slice(&base);
        seed.extend_from_slice(&d.to_bytes());
        seed.extend_from_slice(&patch.encode());
        out.push(("delta_apply", name, seed));
    }
    let (patch, d) = plan(None, b"whole file");
    let mut seed = 0u16.to_le_bytes().to_vec();
    seed.extend_from_slice(&d.to_bytes());
    seed.extend_from_slice(&patch.encode());
    out.push(("delta_apply", "whole", seed));
    assert_eq!(digest(b"whole file"), d);
    let example =
        std::fs::read(repo().join("packaging/clusterd.toml.example")).expect("the example config");
    out.push(("config_parse", "example", example));
    out
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn fuzz_seeds_match_the_encoders() {
    let write = std::env::var_os("CLUSTERD_WRITE_FUZZ_SEEDS").is_some();
    let mut stale = Vec::new();
    for (target, name, bytes) in seeds() {
        let file: PathBuf = repo().join("fuzz/corpus").join(target).join(name);
        if write {
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, &bytes).unwrap();
        } else if std::fs::read(&file).ok().as_deref() != Some(&bytes[..]) {
            stale.push(display(&file));
        }
    }
    assert!(
        stale.is_empty(),
        "fuzz seeds differ from what the encoders produce now: {}; regenerate them with `CLUSTERD_WRITE_FUZZ_SEEDS=1 cargo test --lib fuzz_seeds`",
        stale.join(", ")
    );
}

fn display(p: &Path) -> String {
    p.strip_prefix(repo()).unwrap_or(p).display().to_string()
}

/// Regression (fuzz finding, `entry_decode`): an `Xattrs` op right after a
/// `Dir` or `Put` of the same path is folded into it, so a batch may apply
/// as fewer checked ops than it has; the target used to assert equality.
/// The input is kept in `fuzz/corpus/entry_decode/regression-folded-xattrs`.
#[test]
fn fuzz_finding_folded_xattrs_apply_as_fewer_ops() {
    let data = std::fs::read(repo().join("fuzz/corpus/entry_decode/regression-folded-xattrs"))
        .expect("the regression input");
    let Command::Files(batch) = Command::decode(&data).expect("it decodes") else {
        panic!("a files batch")
    };
    assert_eq!(
        Command::decode(&Command::Files(batch.clone()).encode()).unwrap(),
        Command::Files(batch.clone())
    );
    let ops = Manifest::default().apply(1, &batch).expect("it applies");
    assert_eq!(
        (batch.ops.len(), ops.len()),
        (5, 4),
        "the Xattrs op is folded into the Dir before it"
    );
}
