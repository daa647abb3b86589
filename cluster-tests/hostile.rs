//! Hostile peers against real `clusterd` processes (issue 5): a member
//! holding a valid certificate that sends hand-made Raft entries, and
//! certificates that must not get a connection at all.
//!
//! Raft is not Byzantine-tolerant: whoever holds a member's certificate can
//! send `MsgAppend` with a higher term, and the receiving node takes it as the
//! new leader's, appends the entries and commits them (the commit index is in
//! the message). So the hostile entries below do get *applied*; what must
//! hold is that the applier refuses every bad one with a log line naming it,
//! that nothing outside the sync roots changes (a sentinel tree next to every
//! root is hashed before and after), and that the cluster keeps serving (it
//! elects again, commits a barrier, and replicates a normal edit).
//!
//! The clusters have three members of which node 3 is never started: its
//! certificate is the hostile peer's, and nodes 1 and 2 form a majority. The
//! hostile entries are sent straight to a node's own listen address (no
//! proxy), as a stolen certificate's holder on the network would.
//!
//! The sentinel tree (`<cluster dir>/outside/` and `<node dir>/outside/`)
//! stands for `/etc`: the absolute and `..` paths point into it rather than
//! at the real `/etc/passwd`, because these tests run as root and a
//! regression must damage only a temporary directory.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clusterd::core::delta::{self, BlockSignature};
use clusterd::core::manifest::{Content, EntryKind, FileBatch, FileOp, Meta, WireDigest};
use clusterd::net::proto::peer::peer_client::PeerClient;
use clusterd::net::proto::peer::{NodeStatusRequest, RaftBatch};
use clusterd::net::tls::PeerTls;
use clusterd::raft::core::Command;
use raft::prelude::{Entry, Message, MessageType};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

use crate::harness::tree::*;
use crate::harness::*;

/// `[replication]` of every node: as in `replication.rs`, a fast watcher and
/// no rescan within any deadline.
const REPLICATION: &str = "[replication]\ndebounce_ms = 20\nrescan_secs = 300";
/// The one sync set.
const SET: &str = "etc";
/// `max_file_size` of the set, so an oversized entry fits in one gRPC message.
const MAX_FILE: u64 = 1 << 20;
/// Deadline for a hostile entry's refusal to show in status and log.
const REFUSAL: Duration = Duration::from_secs(10);
/// Deadline for a normal edit to reach the other node after an attack.
const CONVERGE: Duration = Duration::from_secs(20);
/// The hostile member: never started, its certificate is the attacker's.
const HOSTILE: u64 = 3;

/// A cluster under attack: nodes 1 and 2 running, node 3's certificate in
/// the attacker's hands, a sentinel tree outside every root.
struct Arena {
    c: Cluster,
    rt: tokio::runtime::Runtime,
    /// Node 3's TLS material: a valid member certificate.
    hostile: PeerTls,
    /// The shared sentinel (`<cluster dir>/outside`), the `/etc` stand-in.
    outside: PathBuf,
    /// Every sentinel directory and its tree before the attacks.
    sentinels: Vec<(PathBuf, Tree)>,
    /// Normal edits made so far (names the next one).
    edits: u32,
}

/// Where the Raft log of a node stood when it was attacked.
#[derive(Clone, Copy, Debug)]
struct Target {
    id: u64,
    other: u64,
    term: u64,
    last: u64,
}

impl Arena {
    fn start() -> Arena {
        let mut b = Cluster::builder(3).dont_start(HOSTILE).sync_set(
            SET,
            "mirror",
            &format!("max_file_size = {MAX_FILE}"),
        );
        for id in 1..=3 {
            b = b.extra_toml(id, REPLICATION);
        }
        let c = b.start();
        let leader = c.wait_for_leader(&[1, 2]);
        c.wait_barrier(leader);
        wait_sets_ready(&c, &[1, 2], &[SET]);

        let outside = c.dir().join("outside");
        fs::create_dir_all(outside.join("sub")).unwrap();
        write_file(&outside.join("passwd"), "root:x:0:0:root:/root:/bin/sh\n");
        write_file(
            &outside.join("shadow"),
            "root:$6$sentinel:19000:0:99999:7:::\n",
        );
        write_file(&outside.join("sub/file"), "deep\n");
        let mut dirs = vec![outside.clone()];
        for id in c.ids() {
            let d = c.node(id).dir.join("outside");
            fs::create_dir_all(&d).unwrap();
            write_file(&d.join("keep.txt"), &format!("node {id} sentinel\n"));
            dirs.push(d);
        }
        let sentinels = dirs
            .into_iter()
            .map(|d| {
                let t = snapshot(&d);
                (d, t)
            })
            .collect();
        let certs = c.dir().join("certs");
        let hostile = tls_from(&TlsFiles::in_dir(&certs, HOSTILE), HOSTILE);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Arena {
            c,
            rt,
            hostile,
            outside,
            sentinels,
            edits: 0,
        }
    }

    fn root(&self, id: u64) -> PathBuf {
        self.c.set_path(id, SET)
    }

    /// Waits for a settled cluster (a leader among 1 and 2, a barrier of its
    /// term in both logs, everything applied) and returns the follower,
    /// which is attacked: its last entry is of the current term.
    fn settle(&self) -> Target {
        let leader = self.c.wait_for_leader(&[1, 2]);
        self.c.wait_barrier(leader);
        wait_until(
            ELECTION_DEADLINE,
            "nodes 1 and 2 to hold the same log, all of it applied",
            || {
                let (l, views) = self.c.leader_agreement_views(&[1, 2])?;
                let f = if l == 1 { 2 } else { 1 };
                let lv = &views[(l - 1) as usize];
                let fv = &views[(f - 1) as usize];
                let last = |v: &View| entry(&v.raw, v.id).and_then(|e| e["last_index"].as_u64());
                match (last(lv), last(fv)) {
                    (Some(a), Some(b))
                        if a == b && fv.commit_index == Some(b) && fv.applied_index == Some(b) =>
                    {
                        Ok(Target {
                            id: f,
                            other: l,
                            term: fv.term,
                            last: b,
                        })
                    }
                    _ => Err(format!(
                        "not yet: {lv} last {:?} | {fv} last {:?}",
                        last(lv),
                        last(fv)
                    )),
                }
            },
        )
    }

    /// Sends one Raft batch to node `to` as the hostile member.
    fn send(&self, to: u64, messages: Vec<Vec<u8>>, term: u64) -> Result<(), tonic::Status> {
        let addr = self.c.node(to).listen.to_string();
        self.rt.block_on(async {
            hostile_client(&addr, self.hostile.clone(), to)
                .raft(RaftBatch {
                    messages,
                    term,
                    no_ack: false,
                    sender_applied: 0,
                })
                .await
                .map(|_| ())
        })
    }

    /// Appends `commands` after the target's last entry, as the leader of the
    /// next term, committed at once: what a stolen member certificate allows.
    fn append_as_leader(&self, t: Target, commands: &[Command]) -> Result<(), tonic::Status> {
        let m = append_message(t.id, t.term + 1, t.last, t.term, commands);
        self.send(
            t.id,
            vec![clusterd::net::proto::encode_raft_message(&m)],
            t.term + 1,
        )
    }

    /// `append_as_leader`, then waits until the target holds the entries
    /// (its log grew in the attacker's term); returns the first one's index.
    #[track_caller]
    fn inject(&self, t: Target, commands: &[Command]) -> u64 {
        self.append_as_leader(t, commands).unwrap_or_else(|s| {
            panic!(
                "node {} refused the hostile append at the gRPC level: {s:?}",
                t.id
            )
        });
        let want = t.last + commands.len() as u64;
        wait_until(
            REFUSAL,
            &format!("node {} to append the hostile entries", t.id),
            || {
                let e = own_entry(&self.c, t.id)?;
                match e["last_index"].as_u64() {
                    Some(l) if l >= want => Ok(()),
                    _ => Err(format!("node {}: {e}", t.id)),
                }
            },
        );
        t.last + 1
    }

    /// Waits until `needle` appears in node `id`'s log.
    #[track_caller]
    fn wait_log(&self, id: u64, needle: &str) {
        wait_until(REFUSAL, &format!("node {id} to log {needle:?}"), || {
            self.c.assert_alive(id);
            if self.c.log(id).contains(needle) {
                Ok(())
            } else {
                Err(format!("not yet; log tail:\n{}", self.c.log_tail(id, 15)))
            }
        });
    }

    /// The node keeps serving: nodes 1 and 2 agree on a leader again, a
    /// barrier commits, a normal edit on the leader reaches the other node,
    /// and nothing outside the roots changed.
    #[track_caller]
    fn assert_still_serving(&mut self, case: &str) {
        self.c.assert_alive(1);
        self.c.assert_alive(2);
        let leader = self.c.wait_for_leader(&[1, 2]);
        self.c.wait_barrier(leader);
        self.edits += 1;
        let name = format!("alive-{}.conf", self.edits);
        let text = format!("after {case}\n");
        write_file(&self.root(leader).join(&name), &text);
        let other = if leader == 1 { 2 } else { 1 };
        let there = self.root(other).join(&name);
        wait_until(
            CONVERGE,
            &format!("an edit on node {leader} after {case} to reach node {other}"),
            || match fs::read_to_string(&there) {
                Ok(t) if t == text => Ok(()),
                other => Err(format!("{}: {other:?}", there.display())),
            },
        );
        self.assert_sentinels(case);
    }

    #[track_caller]
    fn assert_sentinels(&self, case: &str) {
        for (dir, before) in &self.sentinels {
            let now = snapshot(dir);
            let d = diff(before, &now);
            assert!(
                d.is_empty(),
                "{case}: {} changed outside every sync root:\n  {}",
                dir.display(),
                d.join("\n  ")
            );
        }
    }
}

/// The tree of set `SET` on node `id`.
fn snapshot_of(a: &Arena, id: u64) -> Tree {
    snapshot(&a.root(id))
}

/// Node `id`'s own entry in its `status --json`.
fn own_entry(c: &Cluster, id: u64) -> Result<Value, String> {
    let v = c.status_result(id, STATUS_TIMEOUT)?;
    entry(&v, id)
        .cloned()
        .ok_or_else(|| format!("node {id} lists no entry for itself: {v}"))
}

/// Set `SET` in node `id`'s own status.
fn own_set(c: &Cluster, id: u64) -> Result<Value, String> {
    set_status(c, id, id, SET)
}

/// A peer client that dials node `to` at `addr` directly, with `tls`.
fn hostile_client(addr: &str, tls: PeerTls, to: u64) -> PeerClient<tonic::transport::Channel> {
    let target = clusterd::core::config::PeerConfig {
        id: to,
        addr: addr.to_string(),
        witness: false,
    };
    let live = clusterd::net::tls::LiveTls::new(tls, Default::default());
    PeerClient::new(clusterd::net::transport::peer_channel(&target, live))
}

/// `MsgAppend` from the hostile member to `to`: entries after
/// (`index`, `log_term`), in `term`, committed up to the last of them.
fn append_message(to: u64, term: u64, index: u64, log_term: u64, commands: &[Command]) -> Message {
    let entries: Vec<Entry> = commands
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut e = Entry::default();
            e.term = term;
            e.index = index + 1 + i as u64;
            e.data = c.encode().into();
            e
        })
        .collect();
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppend);
    m.from = HOSTILE;
    m.to = to;
    m.term = term;
    m.index = index;
    m.log_term = log_term;
    m.commit = index + commands.len() as u64;
    m.set_entries(entries.into());
    m
}

/// Metadata of a plain file owned by whoever runs the tests.
fn file_meta() -> Meta {
    // SAFETY: geteuid/getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    Meta {
        kind: EntryKind::File,
        mode: 0o644,
        uid,
        gid,
        user: None,
        group: None,
        mtime_ns: 1_600_000_000_000_000_000,
    }
}

/// A `Put` of `content`, sent whole (a patch that verifies).
fn put(path: &[u8], content: &[u8]) -> FileOp {
    let (patch, digest) = delta::plan(None, content);
    FileOp::Put {
        path: path.to_vec(),
        meta: file_meta(),
        digest: WireDigest::new(&digest),
        content: Content::Inline(patch.encode()),
    }
}

fn files(ops: Vec<FileOp>) -> Command {
    Command::Files(FileBatch {
        set: SET.to_string(),
        origin: HOSTILE,
        proposed_at_ms: 0,
        ops,
    })
}

/// Incompressible bytes, so a patch is as large as the file.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    PseudoRandom::bytes(seed, len)
}

/// Hostile paths: climbing out with `..`, an absolute path, a NUL byte, a
/// symlink planted inside the set; each in a batch of its own, then an entry
/// of an old term. Every node that applies a batch refuses it whole (or, for
/// the symlink, refuses every op that would pass through it).
#[test]
fn hostile_paths_from_a_member_are_refused_and_the_cluster_keeps_serving() {
    let mut a = Arena::start();
    let outside_passwd = a.outside.join("passwd");
    let abs = outside_passwd.as_os_str().as_encoded_bytes().to_vec();

    // (case, ops, what the refusal says). A harmless op first: one bad path
    // must refuse the whole batch, the harmless file included.
    let cases: Vec<(&str, Vec<FileOp>, &str)> = vec![
        (
            "a `..` path",
            vec![
                put(b"harmless-1.conf", b"x\n"),
                put(b"../../outside/keep.txt", b"owned\n"),
                put(b"../../../outside/passwd", b"owned\n"),
            ],
            "contains a `..` component",
        ),
        (
            "an absolute path",
            vec![
                put(b"harmless-2.conf", b"x\n"),
                put(&abs, b"owned\n"),
                FileOp::Remove { path: abs.clone() },
            ],
            "is absolute",
        ),
        (
            "a NUL byte",
            vec![
                put(b"harmless-3.conf", b"x\n"),
                put(b"passwd\0/../../../outside/passwd", b"owned\n"),
            ],
            "contains a NUL byte",
        ),
        (
            "a rename out of the root",
            vec![
                put(b"harmless-4.conf", b"x\n"),
                FileOp::Rename {
                    from: b"../../../outside/shadow".to_vec(),
                    to: b"stolen-shadow".to_vec(),
                },
            ],
            "contains a `..` component",
        ),
    ];
    for (n, (case, ops, why)) in cases.into_iter().enumerate() {
        let t = a.settle();
        let before = own_set(&a.c, t.id).unwrap()["refused"]
            .as_u64()
            .unwrap_or(0);
        let index = a.inject(t, &[files(ops)]);
        let line = format!("refused committed entry {index} proposed by node {HOSTILE}");
        a.wait_log(t.id, &line);
        a.wait_log(t.id, why);
        wait_until(
            REFUSAL,
            &format!("node {} to count the refusal of {case}", t.id),
            || {
                let s = own_set(&a.c, t.id)?;
                let refused = s["refused"].as_u64().unwrap_or(0);
                let err = s["last_error"].as_str().unwrap_or("");
                if refused > before
                    && err.contains(&format!("entry {index} refused"))
                    && err.contains(why)
                {
                    Ok(())
                } else {
                    Err(format!("{case}: node {}'s set status {s}", t.id))
                }
            },
        );
        a.assert_still_serving(case);
        // The new leader replicated the entry to the other node, which
        // refused it just the same.
        a.wait_log(t.other, &line);
        for id in [1, 2] {
            let p = a.root(id).join(format!("harmless-{}.conf", n + 1));
            assert!(
                !p.exists(),
                "{case}: node {id} applied part of a refused batch: {} exists",
                p.display()
            );
        }
    }

    // A symlink inside the set pointing outside (planted by a local user on
    // the leader, so every node holds it as a committed link), then ops that
    // write, delete and move *through* it.
    let t = a.settle();
    let leader = t.other;
    symlink(&a.outside, a.root(leader).join("evil")).unwrap();
    let link_there = a.root(t.id).join("evil");
    wait_until(
        CONVERGE,
        "the planted symlink to reach the follower",
        || match fs::read_link(&link_there) {
            Ok(p) if p == a.outside => Ok(()),
            other => Err(format!("{}: {other:?}", link_there.display())),
        },
    );
    let t = a.settle();
    let index = a.inject(
        t,
        &[files(vec![
            put(b"evil/passwd", b"owned\n"),
            put(b"evil/sub/new", b"owned\n"),
            FileOp::Remove {
                path: b"evil/shadow".to_vec(),
            },
            FileOp::Rename {
                from: b"evil/sub/file".to_vec(),
                to: b"stolen".to_vec(),
            },
        ])],
    );
    // Refused whole by the manifest before any disk access: nothing may be
    // committed below a symlink (otherwise followers could never converge).
    a.wait_log(
        t.id,
        &format!("refused committed entry {index} proposed by node {HOSTILE}"),
    );
    a.wait_log(t.id, "lies under evil, which the cluster has as a symlink");
    a.assert_still_serving("writes through a planted symlink");
    for id in [1, 2] {
        let l = a.root(id).join("evil");
        assert_eq!(
            fs::read_link(&l).ok().as_deref(),
            Some(a.outside.as_path()),
            "node {id}: the planted link itself must stay (it is the cluster's)"
        );
        assert!(
            !a.root(id).join("stolen").exists(),
            "node {id}: a file was moved in from outside the root"
        );
    }

    // An old term: rejected by Raft before anything is appended, counted
    // and logged.
    let t = a.settle();
    assert!(t.term >= 2, "the attacks above raised the term: {t:?}");
    let stale_before = own_entry(&a.c, t.id).unwrap()["stale_term_messages"]
        .as_u64()
        .unwrap_or(0);
    let m = append_message(
        t.id,
        t.term - 1,
        t.last,
        t.term,
        &[files(vec![put(b"stale-term.conf", b"owned\n")])],
    );
    a.send(
        t.id,
        vec![clusterd::net::proto::encode_raft_message(&m)],
        t.term - 1,
    )
    .expect("the gRPC layer takes the batch; Raft rejects it");
    a.wait_log(
        t.id,
        &format!(
            "rejected MsgAppend from node {HOSTILE} of older term {}",
            t.term - 1
        ),
    );
    wait_until(REFUSAL, "the stale-term message to be counted", || {
        let e = own_entry(&a.c, t.id)?;
        match e["stale_term_messages"].as_u64() {
            Some(n) if n > stale_before => Ok(()),
            _ => Err(format!("{e}")),
        }
    });
    hold_for(
        Duration::from_secs(1),
        "the stale entry staying out",
        || {
            let e = own_entry(&a.c, t.id)?;
            if e["last_index"].as_u64() != Some(t.last) || e["term"].as_u64() != Some(t.term) {
                return Err(format!("node {} took the stale append: {e}", t.id));
            }
            if a.root(t.id).join("stale-term.conf").exists() {
                return Err("stale-term.conf was written".to_string());
            }
            Ok(())
        },
    );
    a.assert_still_serving("an old term");
}

/// Hostile contents: a delta against a base the node does not hold, a patch
/// whose result does not hash to the committed digest, a file over the set's
/// `max_file_size`, a gRPC message over the limit, a Raft message cut short
/// inside a whole gRPC frame, and a gRPC frame cut short by the connection
/// closing. None writes anything; the node keeps serving.
#[test]
fn hostile_contents_and_broken_streams_from_a_member_are_refused() {
    let mut a = Arena::start();
    let t = a.settle();
    let leader = t.other;

    // Files the attacks try to corrupt, replicated normally first.
    let base = noise(1, 16 * 1024);
    let base2 = noise(2, 16 * 1024);
    fs::write(a.root(leader).join("base.bin"), &base).unwrap();
    fs::write(a.root(leader).join("base2.bin"), &base2).unwrap();
    wait_trees_equal(&a.c, SET, &[leader, t.id], CONVERGE);
    let t = a.settle();
    let before = [snapshot_of(&a, 1), snapshot_of(&a, 2)];

    // 1. A delta against the wrong base, and one against the right base
    // whose result is not what the op's digest says.
    let mut other_base = base.clone();
    other_base[100] ^= 0xff;
    let mut wanted = other_base.clone();
    wanted[9000] ^= 0xff;
    let (wrong_base, wrong_digest) = delta::plan(
        Some((&other_base, &BlockSignature::compute(&other_base))),
        &wanted,
    );
    assert_eq!(wrong_base.kind(), "delta", "the test needs a real delta");
    let mut changed = base2.clone();
    changed[5000] ^= 0xff;
    let (good_patch, _) = delta::plan(Some((&base2, &BlockSignature::compute(&base2))), &changed);
    assert_eq!(good_patch.kind(), "delta", "the test needs a real delta");
    let mut lie = changed.clone();
    lie[6000] ^= 0xff;
    let lying_digest = delta::digest(&lie);
    let index = a.inject(
        t,
        &[files(vec![
            FileOp::Put {
                path: b"base.bin".to_vec(),
                meta: file_meta(),
                digest: WireDigest::new(&wrong_digest),
                content: Content::Inline(wrong_base.encode()),
            },
            FileOp::Put {
                path: b"base2.bin".to_vec(),
                meta: file_meta(),
                digest: WireDigest::new(&lying_digest),
                content: Content::Inline(good_patch.encode()),
            },
        ])],
    );
    a.wait_log(t.id, "which this node does not hold");
    a.wait_log(t.id, "the patch does not rebuild the committed version");
    wait_until(REFUSAL, "both files to be reported missing", || {
        let s = own_set(&a.c, t.id)?;
        match s["missing"].as_u64() {
            Some(n) if n >= 2 => Ok(()),
            _ => Err(format!("entry {index}: {s}")),
        }
    });
    a.assert_still_serving("deltas against the wrong base");
    for (id, was) in [(1, &before[0]), (2, &before[1])] {
        let now = snapshot_of(&a, id);
        for f in ["base.bin", "base2.bin"] {
            assert_eq!(
                now.get(f),
                was.get(f),
                "node {id}: {f} was replaced by an unverified patch"
            );
        }
    }

    // 2. A file over the set's max_file_size, in an entry well within the
    // gRPC limit: refused by the applier, never written.
    let t = a.settle();
    a.inject(
        t,
        &[files(vec![put(
            b"huge.bin",
            &noise(3, 2 * MAX_FILE as usize),
        )])],
    );
    a.wait_log(
        t.id,
        &format!("the patch would produce more than {MAX_FILE} bytes"),
    );
    a.assert_still_serving("a file over max_file_size");
    for id in [1, 2] {
        assert!(
            !a.root(id).join("huge.bin").exists(),
            "node {id} wrote a file over max_file_size"
        );
    }

    // 3. A Raft message cut in half inside a complete gRPC frame.
    let t = a.settle();
    let m = append_message(
        t.id,
        t.term + 1,
        t.last,
        t.term,
        &[files(vec![put(b"cut.conf", &noise(5, 2000))])],
    );
    let mut bytes = clusterd::net::proto::encode_raft_message(&m);
    bytes.truncate(bytes.len() / 2);
    let status = a
        .send(t.id, vec![bytes], t.term + 1)
        .expect_err("a truncated raft message must be refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    a.wait_log(
        t.id,
        &format!("refused a raft message from peer {HOSTILE}: it does not decode"),
    );
    a.assert_still_serving("a truncated raft message");

    // 4. A gRPC frame that announces a whole Raft batch, carries half of it,
    // and then the connection closes.
    let t = a.settle();
    let m = append_message(
        t.id,
        t.term + 1,
        t.last,
        t.term,
        &[files(vec![put(b"half.conf", &noise(6, 4000))])],
    );
    let batch = prost::Message::encode_to_vec(&RaftBatch {
        messages: vec![clusterd::net::proto::encode_raft_message(&m)],
        term: t.term + 1,
        no_ack: false,
        sender_applied: 0,
    });
    let addr = a.c.node(t.id).listen;
    a.rt.block_on(send_truncated_grpc(addr, &a.hostile, t.id, &batch))
        .expect("the hostile peer completes TLS and writes its half frame");
    // No log line is required here: a peer that dies mid-message looks like
    // any broken connection; what matters is that nothing half-read is used.
    hold_for(
        Duration::from_secs(1),
        "the half message staying out",
        || {
            let e = own_entry(&a.c, t.id)?;
            if e["last_index"].as_u64() != Some(t.last) {
                return Err(format!("node {} took a half message: {e}", t.id));
            }
            Ok(())
        },
    );
    a.assert_still_serving("a truncated gRPC stream");
    // Still answering peers directly, too.
    let answer = a.rt.block_on(async {
        hostile_client(&addr.to_string(), a.hostile.clone(), t.id)
            .node_status(NodeStatusRequest::default())
            .await
    });
    assert!(
        answer.is_ok(),
        "node {} stopped answering: {answer:?}",
        t.id
    );
    // 5. A gRPC message over the limit: refused before it is decoded, so
    // Raft never sees it.
    let t = a.settle();
    let big = append_message(
        t.id,
        t.term + 1,
        t.last,
        t.term,
        &[files(vec![put(b"over-limit.bin", &noise(4, 17 << 20))])],
    );
    let status = a
        .send(
            t.id,
            vec![clusterd::net::proto::encode_raft_message(&big)],
            t.term + 1,
        )
        .expect_err("a 17 MiB gRPC message must be refused");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    wait_until(
        REFUSAL,
        "the oversized message's refusal to be logged",
        || {
            a.c.assert_alive(t.id);
            let log = a.c.log(t.id);
            match log
                .lines()
                .find(|l| l.contains(&format!("peer {HOSTILE}")) && l.contains("too large"))
            {
                Some(_) => Ok(()),
                None => Err(format!(
                    "no line naming peer {HOSTILE} and `too large`; tail:\n{}",
                    a.c.log_tail(t.id, 10)
                )),
            }
        },
    );
    hold_for(
        Duration::from_secs(1),
        "the oversized message staying out",
        || {
            let e = own_entry(&a.c, t.id)?;
            if e["last_index"].as_u64() != Some(t.last) || e["term"].as_u64() != Some(t.term) {
                return Err(format!("node {} took the oversized append: {e}", t.id));
            }
            Ok(())
        },
    );
    a.assert_still_serving("a gRPC message over the limit");
}

/// Writes an HTTP/2 request for `Peer/Raft` whose one gRPC frame announces
/// `batch` but carries only its first half, then drops the connection
/// without ending the stream: a peer that dies mid-message.
async fn send_truncated_grpc(
    addr: std::net::SocketAddr,
    tls: &PeerTls,
    to: u64,
    batch: &[u8],
) -> std::io::Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut s = tls
        .connector()
        .connect(PeerTls::server_name(to), tcp)
        .await?;
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    // Client preface and empty SETTINGS.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    s.write_all(&frame(0x4, 0, 0, &[])).await?;
    // HEADERS (END_HEADERS), each field a literal without indexing, no Huffman.
    let authority = format!("node-{to}");
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/clusterd.peer.v1.Peer/Raft"),
        (":authority", authority.as_str()),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    s.write_all(&frame(0x1, 0x4, 1, &block)).await?;
    // DATA without END_STREAM: the gRPC length prefix of the whole batch,
    // then half of it.
    let mut grpc = vec![0u8];
    grpc.extend_from_slice(&(batch.len() as u32).to_be_bytes());
    grpc.extend_from_slice(&batch[..batch.len() / 2]);
    assert!(grpc.len() < 16 * 1024, "one DATA frame of the default size");
    s.write_all(&frame(0x0, 0, 1, &grpc)).await?;
    s.flush().await?;
    // Give the server the bytes before the connection goes away.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    Ok(())
}

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// A certificate and key signed by the CA in `ca_dir`, naming `sans`, valid
/// from `not_before` to `not_after`: what `certs init` would never make.
fn issue(
    ca_dir: &Path,
    sans: &[&str],
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> (String, String) {
    use rustls::pki_types::pem::PemObject;
    let ca_key =
        rcgen::KeyPair::from_pem(&fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let ca_der = rustls::pki_types::CertificateDer::from_pem_file(ca_dir.join("ca.crt")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der, ca_key).unwrap();
    let mut params =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A client presenting `cert_pem`/`key_pem` that trusts the cluster CA in
/// `ca_dir` (so the handshake reaches the server's check) and dials node `to` at `addr`: built by hand, since clusterd's own
/// loader refuses such certificates before they are ever used.
fn raw_client(
    ca_dir: &Path,
    cert_pem: &str,
    key_pem: &str,
    addr: &str,
    to: u64,
) -> PeerClient<tonic::transport::Channel> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca_dir.join("ca.crt")).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let addr = addr.to_string();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://node-{to}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3))
        .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            let connector = connector.clone();
            let addr = addr.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let tls = connector.connect(PeerTls::server_name(to), tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }));
    PeerClient::new(channel)
}

/// Certificates that are not a member's own: signed by another CA, expired,
/// not yet valid, naming no node or two nodes, naming a node that is not a
/// member; and a member answering at another member's address. Each is
/// refused with a log line, and the cluster keeps committing. (A valid but
/// revoked certificate: `a_revoked_certificate_is_refused` and
/// `sighup_reloads_the_revocation_list` in main.rs.)
#[test]
fn certificates_that_are_not_a_members_own_are_refused() {
    let c = Cluster::start(3);
    c.wait_for_leader(&c.ids());
    let certs = c.dir().join("certs");
    let foreign = c.dir().join("foreign-ca");
    certs_init(&foreign, &[3]);
    // Node 1 restarts dialling "node 2" at node 3's own address: a stale NAT
    // mapping, or node 3 trying to pass for node 2. It must see node-3 and
    // hang up; nodes 2 and 3 carry on as the majority.
    let n3 = c.node(3).listen.to_string();
    c.kill(1);
    c.rewrite_config(1, |cfg| {
        for (id, addr) in cfg.peers.iter_mut() {
            if *id == 2 {
                *addr = n3.clone();
            }
        }
    });
    c.start_node(1);
    // Whoever leads (node 1 with node 3, or node 2 with node 3), a barrier
    // through node 3 commits: the misdirected link costs no majority.
    c.wait_barrier(3);

    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let target = c.node(2).listen.to_string();
    // (case, certificate and key, what node 2 logs)
    let cases: Vec<(&str, (String, String), &str)> = vec![
        (
            "another CA",
            (
                fs::read_to_string(foreign.join("node-3.crt")).unwrap(),
                fs::read_to_string(foreign.join("node-3.key")).unwrap(),
            ),
            "not signed by this cluster's CA",
        ),
        (
            "an expired certificate",
            issue(&certs, &["node-3"], now - 30 * day, now - day),
            "certificate expired",
        ),
        (
            "a certificate not valid yet",
            issue(&certs, &["node-3"], now + day, now + 30 * day),
            "certificate not valid yet",
        ),
        (
            "a certificate naming no node",
            issue(&certs, &["monitoring.example"], now - day, now + 30 * day),
            "carries no node-<id> DNS name",
        ),
        (
            "a certificate naming two nodes",
            issue(&certs, &["node-3", "node-1"], now - day, now + 30 * day),
            "names several nodes",
        ),
        (
            "a certificate of a node that is not a member",
            issue(&certs, &["node-9"], now - day, now + 30 * day),
            "for node 9, which is not a member of this cluster",
        ),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Every case runs before the verdict, so one unclear log line does not
    // hide how the others fared.
    let mut unlogged = Vec::new();
    for (case, (cert, key), logged) in cases {
        // Only lines logged from now on count: the generic advice in a refusal
        // ("not signed by this cluster's CA, or has expired") must not let a
        // later case pass on an earlier case's line.
        let seen = c.log(2).len();
        let answer = rt.block_on(async {
            raw_client(&certs, &cert, &key, &target, 2)
                .node_status(NodeStatusRequest::default())
                .await
        });
        assert!(answer.is_err(), "{case}: node 2 answered: {answer:?}");
        let deadline = std::time::Instant::now() + scaled(Duration::from_secs(5));
        loop {
            c.assert_alive(2);
            let log = c.log(2);
            let new = log.get(seen..).unwrap_or("");
            let refusals: Vec<&str> = new.lines().filter(|l| l.contains("refused peer")).collect();
            if refusals.iter().any(|l| l.contains(logged)) {
                break;
            }
            if std::time::Instant::now() >= deadline {
                unlogged.push(format!(
                    "{case}: no `refused peer` line containing {logged:?}; refusals logged: {refusals:?}"
                ));
                break;
            }
            std::thread::sleep(POLL);
        }
    }
    // The one certificate that works, for contrast: node 3's own.
    let good = rt.block_on(async {
        hostile_client(&target, tls_from(&TlsFiles::in_dir(&certs, 3), 3), 2)
            .node_status(NodeStatusRequest::default())
            .await
    });
    assert!(
        good.is_ok(),
        "a member's own certificate was refused: {good:?}"
    );

    // Node 1 never takes node 3 for node 2: asked for the cluster's status,
    // it dials "node 2", meets node-3's certificate and reports node 2
    // unreachable, with the reason.
    wait_until(
        Duration::from_secs(10),
        "node 1 to report that the node at node 2's address is not node 2",
        || {
            let v = c.view(1)?;
            let e = entry(&v.raw, 2).cloned().unwrap_or_default();
            let why = e["error"].as_str().unwrap_or("");
            if v.reachable(2) == Some(false) && why.contains("not valid for name \"node-2\"") {
                Ok(())
            } else {
                Err(format!("node 1's entry for node 2: {e}"))
            }
        },
    );
    c.assert_alive(1);
    c.wait_barrier(3);
    assert!(
        unlogged.is_empty(),
        "refusals without a clear log line:\n  {}",
        unlogged.join("\n  ")
    );
}
