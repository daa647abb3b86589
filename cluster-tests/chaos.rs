//! The chaos test of issue 4: a writer keeps editing files on whichever node
//! leads while the harness SIGKILLs the leader or a follower, isolates nodes
//! and cuts links (both ways or one way) through its proxies. Once it is
//! over and healed, it checks:
//!
//! 1. **One leader per term**, from every node's log ("became leader at
//!    term", "role or leader changed ... role=leader") and from the status
//!    samples taken all along; and every committed file batch was proposed
//!    by the leader of the term it carries.
//! 2. **The Raft logs agree**: every two nodes hold the same entries up to
//!    the smaller of their two commit indexes.
//! 3. **Identical trees** on every node.
//! 4. **Every committed change is present**: each file's final content is
//!    the last version the committed log holds for it, and no file went
//!    back to an older committed version (no rollback), was deleted or
//!    renamed (the writer never does either).
//! 5. **Nothing committed came from nowhere**: every committed new content
//!    was written by the writer on the very node that proposed it.
//! 6. **Nothing vanished without a record**: every write is committed (its
//!    content is in the committed log), or lies in the quarantine of the
//!    node it was written on (a file there with that content, or a record
//!    with that `local_hash`), or was overwritten by the writer itself.
//!
//! The committed history is read from the nodes' Raft logs (RocksDB, once
//! the nodes are stopped); compaction is pushed out of reach so the whole
//! log is there. "Overwritten by the writer itself" is decided soundly: before
//! each write the writer reads the file on the node it is about to write; if
//! it still holds the writer's own previous write there, nothing of clusterd
//! touched it in between, so the previous write was superseded by the user,
//! like any edit saved twice, and is not clusterd's to keep. Otherwise (the
//! file was replaced, removed, or it is the last write on that node) the write
//! must be accounted for as above. A write lands on the node the harness last
//! saw leading, so writes also hit deposed leaders, isolated nodes, followers
//! and nodes that were just killed: all of it must end committed or in
//! quarantine.
//!
//! Bounded: at most one node is down or cut off at any time, so a majority
//! is always there, and every wait has a deadline. Seeded: `CHAOS_SEED`
//! drives the fault schedule, the pauses and the writer's choices (which
//! file, how long); timing on a real machine still varies between runs, so a
//! failure replays its schedule, not its exact interleaving.
//!
//! - CI (default): `cargo test --test cluster chaos -- --nocapture`
//!   (`CHAOS_STEPS` defaults to 25 steps: about 55 s alone on 2 cores, 45 s
//!   with `CHAOS_MEMBERSHIP=0`).
//! - Long run: `CHAOS_STEPS=500 CHAOS_SEED=7 cargo test --test cluster chaos -- --nocapture`
//!   (about 1.5 s a step, so some 12 minutes; any seed).
//! - `CHAOS_FOLLOWER_EDITS=N` makes N % of the writes by hand on a node the
//!   harness does not believe leads (a follower, mostly), racing the
//!   follower's own applies; default 10 (0 turns it off). It found the two
//!   bugs fixed since: an edit saved between an apply's check and its rename
//!   overwritten without a record, and a path frozen once no node held its
//!   committed version.
//! - `CHAOS_MEMBERSHIP=0` leaves membership changes out (three nodes, as
//!   before they were in the repertoire); default 1, see below.
//! - Replay a failure: the seed and step count are printed at the start and
//!   again after a failure; add `CLUSTER_TESTS_KEEP=1` to keep the nodes'
//!   directories (logs, data, quarantine) for a look. The report gives each
//!   write's and step's UTC time of day, as the nodes' logs print it.
//!
//! **A membership change interrupted.** A spare node 4 (`join = true`) waits
//! from the start. At one seeded step (between a fifth and three fifths of
//! the run), instead of a fault, `clusterctl member replace F 4` runs in the
//! background through the other follower, and the leader is SIGKILLed as
//! soon as that follower lists node 4 (a learner, mostly); once the others
//! elect a leader, it is restarted. Before the run goes on, the cluster must
//! settle by itself: three voters and no learner (not joint, nothing left half done)
//! listed alike by every running member, and the node left out (F, or node 4
//! if the change was undone) reporting itself removed. Later steps draw
//! their faults among the members then; the harness's proxies sit only on
//! the links the founders' configs name, so the links *to* node 4 (dialled
//! at its own address, as every member dials a member's address) are never
//! cut: a cut of them does nothing, and isolating node 4 only mutes it. At
//! the end the checks above apply to the final members; besides:
//!
//! - every final member lists the same three voters and no learner, and its
//!   Raft store holds that configuration, not a joint one;
//! - the removed node's committed log agrees with the others as far as it
//!   goes (its log is a prefix; node 4's starts at the snapshot it joined
//!   from); its tree is not compared (it stops receiving entries), but holds
//!   nothing that was neither committed nor written on it;
//! - a write on the removed node may end in its own tree: its files stay on
//!   its disk, no longer clusterd's to keep.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use clusterd::core::manifest::FileOp;
use clusterd::raft::core::Command;
use clusterd::raft::storage::RaftStore;
use raft::prelude::{ConfState, EntryType};
use raft::Storage;
use serde_json::Value;

use crate::harness::tree::*;
use crate::harness::*;
use crate::membership::member_list;

/// The one sync set, a mirror set.
const SET: &str = "chaos";
/// Files the writer edits (all at the set's top level).
const FILES: u64 = 8;
/// Small watcher debounce; a short rescan, so followers reconcile stray
/// edits (writes that hit a node after it stopped leading) within the run.
const REPLICATION: &str = "[replication]\ndebounce_ms = 20\nrescan_secs = 2";
const DEFAULT_SEED: u64 = 20_240_604;
const DEFAULT_STEPS: u64 = 25;
/// Deadline for the healed cluster to converge after the last fault.
const CONVERGE: Duration = Duration::from_secs(120);
/// How often the status of every node is sampled while the writer runs.
const SAMPLE_EVERY: Duration = Duration::from_millis(300);
/// The founding members.
const FOUNDERS: [u64; 3] = [1, 2, 3];
/// The spare node that a `member replace` brings in (`CHAOS_MEMBERSHIP`).
const SPARE: u64 = 4;
/// Deadline for an interrupted membership change to settle by itself (the
/// spare catches up while the writer goes on, an election, the promotion).
const SETTLE: Duration = Duration::from_secs(90);
/// How long the writer goes on while the change settles; then it rests until
/// it has. A learner is promoted only once it misses no committed file, and
/// it cannot get a file rewritten faster than it fetches it (each new version
/// comes as a patch against the one it lacks, each fetch asks for a version
/// the others have left): under the writer it may stay a learner for good.
const WRITER_RESTS_AFTER: Duration = Duration::from_secs(20);

#[test]
fn chaos_writes_faults_and_no_silent_loss() {
    let seed = env_u64("CHAOS_SEED", DEFAULT_SEED);
    let steps = env_u64("CHAOS_STEPS", DEFAULT_STEPS);
    let follower_edits = env_u64("CHAOS_FOLLOWER_EDITS", 10);
    let membership = env_u64("CHAOS_MEMBERSHIP", 1) != 0;
    let replace_at = (membership && steps > 0).then(|| replace_step(seed, steps));
    let replay = replay_command(seed, steps, follower_edits, membership);
    let change = match replace_at {
        Some(s) => format!("member replace at step {s}"),
        None => "no membership change".to_string(),
    };
    eprintln!("chaos: seed {seed}, {steps} steps, {change}; {replay}");
    // Declared before the cluster, so it drops after it: the hint follows
    // the cluster logs.
    let _replay = Replay(replay);

    let n = if membership { SPARE } else { 3 };
    let mut b = Cluster::builder(n)
        .sync_set(SET, "mirror", "")
        // The checks read the whole committed history back from the logs.
        .env("CLUSTERD_RAFT__COMPACT_AFTER", "1000000000");
    for id in 1..=n {
        b = b.extra_toml(id, REPLICATION);
    }
    if membership {
        b = b.joiner(SPARE);
    }
    let c = b.start();
    let all = c.ids();
    let first = c.wait_for_leader(&FOUNDERS);
    c.wait_barrier(first);
    wait_sets_ready(&c, &FOUNDERS, &[SET]);
    if membership {
        // From now on it waits to be added.
        c.start_node(SPARE);
    }
    // The voters, as last seen settled; the nodes a change left out; the
    // nodes that hold a Raft log.
    let mut members: Vec<u64> = FOUNDERS.to_vec();
    let mut removed: Vec<u64> = Vec::new();
    let mut joined: Vec<u64> = FOUNDERS.to_vec();
    // Where the writer's follower edits may land: members that stay.
    let writable = Arc::new(Mutex::new(members.clone()));
    // Set while the writer must rest (`WRITER_RESTS_AFTER`).
    let rest = Arc::new(AtomicBool::new(false));

    let mut leaders = Leaders::default();
    for id in FOUNDERS {
        leaders.note(&c.view_now(id));
    }
    let belief = Arc::new(AtomicU64::new(first));
    let started = Instant::now();
    let (stop, stop_rx) = mpsc::channel::<()>();
    let writer = {
        let cfg = WriterConfig {
            roots: all.iter().map(|&i| (i, c.set_path(i, SET))).collect(),
            scratch: all
                .iter()
                .map(|&i| {
                    // Outside the set: the writer's temporary files are never
                    // seen by the watcher, only the finished rename.
                    let d = c.node(i).dir.join("chaos-scratch");
                    fs::create_dir_all(&d).unwrap();
                    (i, d)
                })
                .collect(),
            writable: writable.clone(),
            rest: rest.clone(),
            seed: seed ^ 0x5752_4954_4552, // the writer's own stream
            started,
            follower_edits,
        };
        let belief = belief.clone();
        thread::spawn(move || writer_loop(cfg, belief, stop_rx))
    };

    // ---- the faults ---------------------------------------------------------
    let mut rng = Rng::new(seed);
    let mut fault = Fault::None;
    let mut belief_term = 0u64;
    let mut log = String::new();
    let mut replace: Option<ReplaceCmd> = None;
    for step in 1..=steps {
        repair(&c, &fault);
        let (leader, term) = wait_majority_leader(&c, &mut leaders, &members, None);
        set_belief(&belief, &mut belief_term, leader, term);
        let followers: Vec<u64> = members.iter().copied().filter(|&i| i != leader).collect();
        let f = followers[rng.below(followers.len() as u64) as usize];
        fault = match rng.below(100) {
            0..=24 => Fault::Down(leader),
            25..=39 => Fault::Down(f),
            40..=54 => Fault::Isolated(leader),
            55..=64 => Fault::Isolated(f),
            65..=74 => Fault::CutBoth(leader, f),
            75..=79 => Fault::CutOne(leader, f),
            80..=84 => Fault::CutOne(f, leader),
            _ => Fault::None,
        };
        if replace_at == Some(step) {
            // Instead of the fault drawn: replace follower `f` by the spare,
            // through the other follower, and SIGKILL the leader mid-change.
            // First every member (one just restarted too) follows one leader
            // and the other follower gets a barrier through: it can carry
            // the command to the leader.
            let now = c.wait_for_leader(&members);
            let (leader, f) = match now {
                l if l == leader => (leader, f),
                l if l == f => (l, leader),
                l => (l, f),
            };
            let via = c.others(&[leader, f, SPARE])[0];
            c.wait_barrier(via);
            eprintln!(
                "chaos: step {step}/{steps}: leader {leader} (term {term}); member replace {f} {SPARE}"
            );
            writable.lock().unwrap().retain(|&i| i != f);
            let (cmd, role) = ReplaceCmd::start(&c, f, via);
            c.kill(leader);
            // The others elect a leader without it; then it is restarted, as
            // the repair does (the committed versions it alone holds may be
            // what the spare lacks to be promoted).
            let (next, next_term) = wait_majority_leader(&c, &mut leaders, &members, Some(leader));
            set_belief(&belief, &mut belief_term, next, next_term);
            c.start_node(leader);
            fault = Fault::None;
            let _ = writeln!(
                log,
                "step {step} at {:.1?} ({}): leader {leader} (term {term}); member replace {f} {SPARE} through node {via}; leader {leader} SIGKILLed once node {SPARE} was listed as {role}, restarted once node {next} led (term {next_term})",
                started.elapsed(),
                utc_clock()
            );
            eprintln!(
                "chaos: at {:.1?}: leader {leader} SIGKILLed once node {SPARE} was listed as {role}",
                started.elapsed()
            );
            replace = Some(cmd);
            let (settled, out) = wait_settled(
                &c,
                &mut leaders,
                (&belief, &mut belief_term, &rest),
                (leader, via, f),
            );
            if rest.swap(false, Ordering::SeqCst) {
                let _ = writeln!(
                    log,
                    "  the writer rested from {WRITER_RESTS_AFTER:?} into the wait until it settled"
                );
            }
            members = settled;
            removed.push(out);
            joined.push(SPARE);
            *writable.lock().unwrap() = members.clone();
            let _ = writeln!(
                log,
                "  settled at {:.1?} ({}): voters {members:?}, node {out} removed",
                started.elapsed(),
                utc_clock()
            );
            eprintln!(
                "chaos: settled at {:.1?}: voters {members:?}, node {out} removed",
                started.elapsed()
            );
        } else {
            let _ = writeln!(
                log,
                "step {step} at {:.1?} ({}): leader {leader} (term {term}); {fault:?}",
                started.elapsed(),
                utc_clock()
            );
            eprintln!("chaos: step {step}/{steps}: leader {leader} (term {term}); {fault:?}");
            apply(&c, &fault);
        }
        // A node that is gone or cut off from everyone cannot be the leader
        // the writer goes on with: wait for the majority's.
        let gone = match fault {
            Fault::Down(x) | Fault::Isolated(x) => Some(x),
            _ => None,
        };
        let (leader, term) = wait_majority_leader(&c, &mut leaders, &members, gone);
        set_belief(&belief, &mut belief_term, leader, term);

        // Let the writer work on the new leader, sampling every node's status.
        let dwell = Duration::from_millis(rng.range(400, 1600));
        let mut last_sample = Instant::now();
        hold_for(dwell, "one leader per term in the status samples", || {
            if last_sample.elapsed() >= SAMPLE_EVERY {
                last_sample = Instant::now();
                if let Some((l, t)) = sample(&c, &mut leaders)? {
                    set_belief(&belief, &mut belief_term, l, t);
                }
            }
            Ok(())
        });
    }
    drop(stop);
    let writes = match writer.join() {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => panic!("the writer failed: {e}"),
        Err(_) => panic!("the writer thread panicked"),
    };
    eprintln!(
        "chaos: {} writes in {:.1?}; healing",
        writes.len(),
        started.elapsed()
    );

    // ---- heal and converge --------------------------------------------------
    repair(&c, &fault);
    c.heal_all();
    for &id in &all {
        if !c.is_running(id) {
            c.start_node(id);
        }
    }
    let leader = c.wait_for_leader(&members);
    c.wait_barrier(leader);
    let order = leader_first(leader, &members);
    // Not converging is a finding like the others, and the committed history
    // read below is what explains it: catch the timeout, report it with them.
    let converged = std::panic::catch_unwind(AssertUnwindSafe(|| {
        wait_trees_equal(&c, SET, &order, CONVERGE);
        // A barrier after convergence: anything a reconcile proposed
        // meanwhile is committed and applied before the final look.
        c.wait_barrier(leader);
        wait_trees_equal(&c, SET, &order, CONVERGE)
    }));
    let trees: BTreeMap<u64, Tree> = all
        .iter()
        .map(|&id| (id, snapshot(&c.set_path(id, SET))))
        .collect();
    let mut problems = Vec::new();
    let mut suspects = BTreeSet::new();
    let final_tree = match converged {
        Ok(tree) => tree,
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            problems.push(format!(
                "the healed cluster did not converge (leader {leader}): {why}"
            ));
            for id in &members {
                suspects.extend(diff_paths(&trees[&leader], &trees[id]));
            }
            trees[&leader].clone()
        }
    };
    check_members_listed(&c, &members, &removed, &mut problems);
    let replace_out = replace.as_mut().map(ReplaceCmd::outcome);
    if let Some(out) = &replace_out {
        let _ = writeln!(log, "member replace printed: {out}");
    }
    for &id in &all {
        if let Ok(v) = c.view(id) {
            leaders.note(&v);
        }
    }
    let records: BTreeMap<u64, Vec<Value>> =
        all.iter().map(|&id| (id, conflicts(&c, id))).collect();
    let quarantined: BTreeMap<u64, Tree> = all
        .iter()
        .map(|&id| (id, snapshot(&c.node(id).data_dir.join("quarantine"))))
        .collect();
    for &id in &all {
        for t in leader_terms_in_log(&c.log(id)) {
            leaders.insert(t, id);
        }
    }
    // The Raft logs are read from RocksDB, which only one process may open.
    for &id in &all {
        c.kill(id);
    }
    let logs: BTreeMap<u64, RaftLog> = joined
        .iter()
        .map(|&id| (id, read_raft_log(&c.node(id).data_dir.join("raft"), id)))
        .collect();

    // ---- the checks ---------------------------------------------------------
    let (committed, changes) = committed_history(&logs);
    if !changes.is_empty() {
        let _ = writeln!(log, "committed membership changes:");
        for ch in &changes {
            let _ = writeln!(log, "  {ch}");
        }
    }
    let ctx = Checks {
        writes: &writes,
        by_hash: writes
            .iter()
            .enumerate()
            .map(|(i, w)| (w.hash.clone(), i))
            .collect(),
        committed,
        leaders: &leaders,
        quarantined: &quarantined,
        records: &records,
        final_tree: &final_tree,
        trees: &trees,
        removed: &removed,
    };
    ctx.one_leader_per_term(&mut problems);
    check_logs_agree(&logs, &mut problems);
    check_stored_members(&logs, &members, &mut problems);
    ctx.committed_present(&mut problems, &mut suspects);
    ctx.committed_provenance(&mut problems, &mut suspects);
    ctx.nothing_vanished(&mut problems, &mut suspects);
    ctx.removed_hold_nothing_uncommitted(&mut problems, &mut suspects);

    let accounted = ctx.summary();
    for w in writes.iter().filter(|w| {
        ctx.left_on_removed(w)
            && !(w.overwritten_by_writer || ctx.is_committed(w) || ctx.in_quarantine(w).is_some())
    }) {
        eprintln!(
            "chaos: write #{} of {} at {:.3?} ({}) left on removed node {}",
            w.seq, w.file, w.at, w.clock, w.node
        );
    }
    eprintln!(
        "chaos: {} writes: {accounted}; {} committed file versions; {} leader terms; {} membership entries; voters {members:?}; {:.1?} in all",
        writes.len(),
        ctx.committed.len(),
        leaders.by_term.len(),
        changes.len(),
        started.elapsed()
    );
    if let Some(out) = &replace_out {
        eprintln!("chaos: member replace printed: {out}");
    }
    if !problems.is_empty() {
        let mut report = String::new();
        let _ = writeln!(
            report,
            "chaos (seed {seed}, {steps} steps, {follower_edits} % follower edits, {change}) found {} problem(s):",
            problems.len()
        );
        for p in &problems {
            let _ = writeln!(report, "  - {p}");
        }
        let _ = writeln!(report, "\nfault schedule:\n{log}");
        for file in &suspects {
            let _ = writeln!(report, "{}", ctx.history(file));
        }
        panic!("{report}");
    }
}

// ---------------------------------------------------------------------------
// Seeds and steps
// ---------------------------------------------------------------------------

fn env_u64(key: &str, default: u64) -> u64 {
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn replay_command(seed: u64, steps: u64, follower_edits: u64, membership: bool) -> String {
    let edits = format!(" CHAOS_FOLLOWER_EDITS={follower_edits}");
    let membership = u8::from(membership);
    format!(
        "replay with: CHAOS_SEED={seed} CHAOS_STEPS={steps}{edits} CHAOS_MEMBERSHIP={membership} cargo test --test cluster chaos -- --nocapture"
    )
}

/// The step of the membership change, from a fifth to three fifths of the
/// run: drawn from a stream of its own, so the faults' stream is the same
/// with it or without it.
fn replace_step(seed: u64, steps: u64) -> u64 {
    let lo = (steps / 5).max(1);
    let hi = (steps * 3 / 5).max(lo);
    Rng::new(seed ^ 0x4d45_4d42_4552_5321).range(lo, hi + 1)
}

/// Prints how to replay the run (the command it holds) if the test fails.
struct Replay(String);

impl Drop for Replay {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("chaos failed; {}", self.0);
        }
    }
}

/// splitmix64: small, seedable, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }
}

// ---------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------

/// The one fault in force (at most one node down or cut off at a time).
#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    /// SIGKILLed, restarted at the next step.
    Down(u64),
    /// Every link to and from it cut.
    Isolated(u64),
    /// Both directions between two nodes cut.
    CutBoth(u64, u64),
    /// Only the connections the first opens to the second.
    CutOne(u64, u64),
}

fn apply(c: &Cluster, fault: &Fault) {
    match *fault {
        Fault::None => {}
        Fault::Down(x) => {
            c.kill(x);
        }
        Fault::Isolated(x) => c.isolate(x),
        Fault::CutBoth(a, b) => c.cut_both(a, b),
        Fault::CutOne(a, b) => c.cut(a, b),
    }
}

fn repair(c: &Cluster, fault: &Fault) {
    match *fault {
        Fault::None => {}
        Fault::Down(x) => {
            if !c.is_running(x) {
                c.start_node(x);
            }
        }
        Fault::Isolated(_) | Fault::CutBoth(..) | Fault::CutOne(..) => c.heal_all(),
    }
}

fn set_belief(belief: &AtomicU64, belief_term: &mut u64, leader: u64, term: u64) {
    if term >= *belief_term {
        *belief_term = term;
        belief.store(leader, Ordering::SeqCst);
    }
}

fn leader_first(leader: u64, ids: &[u64]) -> Vec<u64> {
    let mut out = vec![leader];
    out.extend(ids.iter().copied().filter(|&i| i != leader));
    out
}

// ---------------------------------------------------------------------------
// Leaders
// ---------------------------------------------------------------------------

/// Every (term, node) seen leading, from status samples and node logs.
#[derive(Default)]
struct Leaders {
    by_term: BTreeMap<u64, BTreeSet<u64>>,
}

impl Leaders {
    fn insert(&mut self, term: u64, node: u64) {
        self.by_term.entry(term).or_default().insert(node);
    }

    fn note(&mut self, v: &View) {
        if v.is_leader() {
            self.insert(v.term, v.id);
        }
    }

    fn check(&self) -> Result<(), String> {
        match self.by_term.iter().find(|(_, nodes)| nodes.len() > 1) {
            Some((term, nodes)) => Err(format!("nodes {nodes:?} all led in term {term}")),
            None => Ok(()),
        }
    }
}

/// One status sample of every running node; the leader of the highest term
/// any node reports itself leader in. Fails at once on two leaders in a term.
fn sample(c: &Cluster, leaders: &mut Leaders) -> Result<Option<(u64, u64)>, String> {
    let mut best: Option<(u64, u64)> = None;
    for id in c.ids() {
        if let Ok(v) = c.view(id) {
            leaders.note(&v);
            if v.is_leader() && best.is_none_or(|(_, t)| v.term > t) {
                best = Some((v.id, v.term));
            }
        }
    }
    leaders.check()?;
    Ok(best)
}

/// Waits until a majority of the voters `members` agree that one node (not
/// `not`) leads in their common term, and returns it with that term.
/// Nodes that are down or do not answer just do not count; the views of
/// every node (members or not) are noted as samples.
#[track_caller]
fn wait_majority_leader(
    c: &Cluster,
    leaders: &mut Leaders,
    members: &[u64],
    not: Option<u64>,
) -> (u64, u64) {
    let majority = members.len() / 2 + 1;
    wait_until(
        ELECTION_DEADLINE,
        &format!("a majority of {members:?} to agree on a leader (other than {not:?})"),
        || {
            let mut views = Vec::new();
            for id in c.ids() {
                if let Ok(v) = c.view(id) {
                    leaders.note(&v);
                    views.push(v);
                }
            }
            if let Err(e) = leaders.check() {
                panic!("two leaders in one term: {e}");
            }
            // The leader may be the spare in the middle of a change (a voter
            // of the joint configuration); only the members' word counts.
            for lv in views.iter().filter(|v| v.is_leader() && Some(v.id) != not) {
                let agree = views
                    .iter()
                    .filter(|v| members.contains(&v.id))
                    .filter(|v| v.term == lv.term && v.leader == Some(lv.id))
                    .count();
                if agree >= majority {
                    return Ok((lv.id, lv.term));
                }
            }
            Err(views
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(" | "))
        },
    )
}

/// Terms node's log says it became leader in: raft-rs's "became leader at
/// term N" and clusterd's "role or leader changed" with `role=leader`.
fn leader_terms_in_log(text: &str) -> BTreeSet<u64> {
    let mut terms = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.split("became leader at term ").nth(1) {
            if let Some(t) = leading_number(rest) {
                terms.insert(t);
            }
        }
        if line.contains("role or leader changed")
            && (line.contains("role=\"leader\"") || line.contains("role=leader"))
        {
            if let Some(t) = line.split(" term=").nth(1).and_then(leading_number) {
                terms.insert(t);
            }
        }
    }
    terms
}

fn leading_number(s: &str) -> Option<u64> {
    let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

// ---------------------------------------------------------------------------
// The membership change
// ---------------------------------------------------------------------------

/// `clusterctl member replace OLD SPARE` running in the background.
struct ReplaceCmd {
    done: mpsc::Receiver<CmdOutput>,
    out: Option<CmdOutput>,
}

impl ReplaceCmd {
    /// Starts `member replace old SPARE` through node `via` once the spare
    /// waits to be added, and returns as soon as `via` lists the spare, with
    /// the role it lists it as. Fails at once if the command fails first.
    #[track_caller]
    fn start(c: &Cluster, old: u64, via: u64) -> (ReplaceCmd, String) {
        wait_until(
            Duration::from_secs(30),
            &format!("node {SPARE} to wait to be added"),
            || {
                c.assert_alive(SPARE);
                let v = c.view(SPARE)?;
                if v.member.as_deref() != Some("joining") {
                    return Err(v.to_string());
                }
                TcpStream::connect(c.listen_addr(SPARE)).map_err(|e| e.to_string())
            },
        );
        let timeout = scaled(Duration::from_secs(60));
        let mut cmd = Process::new(CLUSTERCTL);
        scrub_env(&mut cmd);
        cmd.arg("--socket")
            .arg(&c.node(via).admin_socket)
            .args(["member", "replace", &old.to_string(), &SPARE.to_string()])
            .args(["--addr", &c.listen_addr(SPARE)])
            .args(["--timeout-ms", &timeout.as_millis().to_string()]);
        let (tx, done) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(run_cmd(cmd, timeout + scaled(Duration::from_secs(15))));
        });
        let mut this = ReplaceCmd { done, out: None };
        let role = wait_until(
            Duration::from_secs(30),
            &format!("node {via} to list node {SPARE}"),
            || {
                if let Some(out) = this.poll() {
                    if !out.success() {
                        panic!("member replace {old} {SPARE} failed before node {via} listed node {SPARE}: {out}");
                    }
                }
                let list = member_list(c, via)?;
                match list.get(&SPARE) {
                    Some((role, _)) => Ok(role.clone()),
                    None => Err(format!("listed {list:?}")),
                }
            },
        );
        (this, role)
    }

    /// What the command printed, if it ended.
    fn poll(&mut self) -> Option<&CmdOutput> {
        if self.out.is_none() {
            self.out = self.done.try_recv().ok();
        }
        self.out.as_ref()
    }

    /// What it printed, or that it still runs (whatever it printed, the
    /// cluster must settle by itself).
    fn outcome(&mut self) -> String {
        match self.poll() {
            Some(out) => out.to_string(),
            None => "nothing yet (still running)".to_string(),
        }
    }
}

/// Waits until the replace of `old` that was interrupted by SIGKILLing
/// (and restarting) `killed` settles by itself: `via`, a voter in both
/// configurations, lists three voters and no learner, `killed` and itself
/// among them (not the joint configuration, which lists `old` and the spare
/// both, nor a learner left behind); every other voter lists the same; and
/// the one of `old` and the spare left out reports itself removed. Samples every node's status meanwhile (for the one-leader
/// check, and to move the writer to the leader). Returns the voters and the
/// node left out.
#[track_caller]
fn wait_settled(
    c: &Cluster,
    leaders: &mut Leaders,
    (belief, belief_term, rest): (&AtomicU64, &mut u64, &AtomicBool),
    (killed, via, old): (u64, u64, u64),
) -> (Vec<u64>, u64) {
    let mut last_sample: Option<Instant> = None;
    let begun = Instant::now();
    wait_until_every(
        Duration::from_millis(200),
        SETTLE,
        &format!(
            "the replace of node {old} by node {SPARE} to settle by itself (leader {killed} was SIGKILLed)"
        ),
        || {
            if last_sample.is_none_or(|t| t.elapsed() >= SAMPLE_EVERY) {
                last_sample = Some(Instant::now());
                match sample(c, leaders) {
                    Ok(Some((l, t))) => set_belief(belief, belief_term, l, t),
                    Ok(None) => {}
                    Err(e) => panic!("two leaders in one term: {e}"),
                }
            }
            if begun.elapsed() >= scaled(WRITER_RESTS_AFTER) && !rest.swap(true, Ordering::SeqCst) {
                eprintln!(
                    "chaos: not settled after {WRITER_RESTS_AFTER:?} (node {SPARE} a learner still?): the writer rests until it is"
                );
            }
            for id in [killed, via, old, SPARE] {
                c.assert_alive(id);
            }
            let roles = |id| -> Result<BTreeMap<u64, String>, String> {
                Ok(member_list(c, id)?
                    .into_iter()
                    .map(|(i, (r, _))| (i, r))
                    .collect())
            };
            let list = roles(via)?;
            if list.len() != 3
                || list.values().any(|r| r != "voter")
                || !list.contains_key(&killed)
                || !list.contains_key(&via)
            {
                return Err(format!("node {via} lists {list:?}"));
            }
            let out = match (list.contains_key(&old), list.contains_key(&SPARE)) {
                (false, true) => old,
                (true, false) => SPARE,
                _ => return Err(format!("node {via} lists {list:?}")),
            };
            for &id in list.keys().filter(|&&i| i != via) {
                let other = roles(id)?;
                if other != list {
                    return Err(format!("node {via} lists {list:?}, node {id} {other:?}"));
                }
            }
            let v = c.view(out)?;
            if v.member.as_deref() != Some("removed") {
                return Err(format!("node {out} does not report itself removed: {v}"));
            }
            Ok((list.into_keys().collect(), out))
        },
    )
}

/// At the end: every final voter lists `members` as the voters and no other
/// member (no joint configuration, no learner left behind), and each node a
/// change left out reports itself removed.
fn check_members_listed(c: &Cluster, members: &[u64], removed: &[u64], problems: &mut Vec<String>) {
    let want: BTreeMap<u64, String> = members.iter().map(|&i| (i, "voter".to_string())).collect();
    for &id in members {
        let list = wait_until(
            Duration::from_secs(20),
            &format!("node {id}'s member list --json"),
            || member_list(c, id),
        );
        let roles: BTreeMap<u64, String> = list.into_iter().map(|(i, (r, _))| (i, r)).collect();
        if roles != want {
            problems.push(format!(
                "node {id} lists the members {roles:?} at the end, not the voters {members:?}"
            ));
        }
    }
    for &id in removed {
        let v = c.view_now(id);
        if v.member.as_deref() != Some("removed") {
            problems.push(format!(
                "node {id}, left out by the membership change, does not report itself removed: {v}"
            ));
        }
    }
}

// ---------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------

struct WriterConfig {
    /// Each node's root of the set.
    roots: BTreeMap<u64, PathBuf>,
    /// Each node's directory for temporary files (same file system, outside the set).
    scratch: BTreeMap<u64, PathBuf>,
    /// The nodes follower edits may land on: the members, less one on its
    /// way out (the harness updates it).
    writable: Arc<Mutex<Vec<u64>>>,
    /// While set, no write (`WRITER_RESTS_AFTER`).
    rest: Arc<AtomicBool>,
    seed: u64,
    started: Instant,
    /// Percent of writes made by hand on a node the harness does not
    /// believe leads.
    follower_edits: u64,
}

/// One write of one version of a file on one node.
#[derive(Clone, Debug)]
struct Write {
    /// Globally unique and increasing; part of the content.
    seq: u64,
    node: u64,
    file: String,
    /// blake3 hex of the content.
    hash: String,
    at: Duration,
    /// UTC time of day, as the nodes' logs print it.
    clock: String,
    /// The next write of the same file on the same node found this version
    /// still there: the writer itself replaced it (see the module doc).
    overwritten_by_writer: bool,
}

fn file_name(i: u64) -> String {
    format!("file-{i}.conf")
}

/// A version of a file: a header naming it, then a body of varying length
/// that is mostly the same between versions (so deltas have work to do).
fn content(file: &str, seq: u64, node: u64, lines: u64) -> Vec<u8> {
    let mut s = format!("# {file} version {seq}, written on node {node}\n");
    for l in 0..lines {
        let _ = writeln!(s, "key{l} = value {l} of {file}");
    }
    s.into_bytes()
}

/// The UTC time of day now, `HH:MM:SS.mmmZ`: the form the nodes' logs use,
/// so a report can be matched against them.
fn utc_clock() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

fn hash_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Writes a new version of a random file every few milliseconds on the node
/// `belief` names, until `stop` fires or is dropped; returns every write.
fn writer_loop(
    cfg: WriterConfig,
    belief: Arc<AtomicU64>,
    stop: mpsc::Receiver<()>,
) -> Result<Vec<Write>, String> {
    let mut rng = Rng::new(cfg.seed);
    let mut writes: Vec<Write> = Vec::new();
    let mut last: HashMap<(u64, String), usize> = HashMap::new();
    let mut seq = 0u64;
    loop {
        // The pause between writes doubles as the wait for the stop signal.
        match stop.recv_timeout(Duration::from_millis(rng.range(5, 60))) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return Ok(writes),
        }
        if cfg.rest.load(Ordering::SeqCst) {
            continue;
        }
        let mut node = belief.load(Ordering::SeqCst);
        if rng.below(100) < cfg.follower_edits {
            let others: Vec<u64> = (cfg.writable.lock().unwrap().iter())
                .copied()
                .filter(|&i| i != node)
                .collect();
            if !others.is_empty() {
                node = others[rng.below(others.len() as u64) as usize];
            }
        }
        let file = file_name(rng.below(FILES));
        let lines = rng.range(1, 80);
        seq += 1;
        let path = cfg.roots[&node].join(&file);
        if let Some(&i) = last.get(&(node, file.clone())) {
            let now = fs::read(&path).ok().map(|b| hash_hex(&b));
            if now.as_deref() == Some(writes[i].hash.as_str()) {
                writes[i].overwritten_by_writer = true;
            }
        }
        let bytes = content(&file, seq, node, lines);
        let tmp = cfg.scratch[&node].join(format!("{file}.{seq}"));
        fs::write(&tmp, &bytes).map_err(|e| format!("write {}: {e}", tmp.display()))?;
        fs::rename(&tmp, &path)
            .map_err(|e| format!("rename {} to {}: {e}", tmp.display(), path.display()))?;
        last.insert((node, file.clone()), writes.len());
        writes.push(Write {
            seq,
            node,
            file,
            hash: hash_hex(&bytes),
            at: cfg.started.elapsed(),
            clock: utc_clock(),
            overwritten_by_writer: false,
        });
    }
}

// ---------------------------------------------------------------------------
// Quarantine and the Raft logs
// ---------------------------------------------------------------------------

/// Node `id`'s `clusterctl conflicts --json`.
#[track_caller]
fn conflicts(c: &Cluster, id: u64) -> Vec<Value> {
    wait_until(
        Duration::from_secs(10),
        &format!("node {id}'s clusterctl conflicts --json"),
        || {
            let out = c.ctl(id, &["conflicts", "--json"], STATUS_TIMEOUT);
            if !out.success() {
                return Err(out.to_string());
            }
            match serde_json::from_str::<Value>(out.stdout.trim()) {
                Ok(Value::Array(v)) => Ok(v),
                other => Err(format!("not a JSON array: {other:?}")),
            }
        },
    )
}

/// One node's Raft log up to its durable commit index.
struct RaftLog {
    /// The first index it holds: 1, or past the snapshot it was sent (the
    /// spare joins from one).
    first: u64,
    commit: u64,
    /// From `first` to `commit`.
    entries: Vec<LogEntry>,
    /// The configuration it applied last.
    conf: ConfState,
}

#[derive(PartialEq)]
struct LogEntry {
    index: u64,
    term: u64,
    kind: EntryType,
    data: Vec<u8>,
}

#[track_caller]
fn read_raft_log(dir: &Path, id: u64) -> RaftLog {
    let store = RaftStore::open(dir)
        .unwrap_or_else(|e| panic!("open node {id}'s Raft log {}: {e}", dir.display()));
    let commit = store.hard_state().commit;
    let first = store.first_index().unwrap();
    let mut entries: Vec<LogEntry> = Vec::new();
    let mut low = first;
    while low <= commit {
        let page = store
            .entries(
                low,
                commit + 1,
                Some(16 << 20),
                clusterd::raft::storage::with_data(),
            )
            .unwrap_or_else(|e| panic!("read node {id}'s log from {low}: {e}"));
        assert!(
            !page.is_empty(),
            "node {id}'s log returned nothing at {low}"
        );
        for e in page {
            assert_eq!(
                e.index,
                first + entries.len() as u64,
                "node {id}'s log skips an index"
            );
            entries.push(LogEntry {
                index: e.index,
                term: e.term,
                kind: e.get_entry_type(),
                data: e.data.to_vec(),
            });
        }
        low = entries.last().map(|e| e.index + 1).unwrap();
    }
    RaftLog {
        first,
        commit,
        entries,
        conf: store.conf_state(),
    }
}

/// Entry `k` of `log` (`first <= k <= commit`).
fn entry_at(log: &RaftLog, k: u64) -> &LogEntry {
    &log.entries[(k - log.first) as usize]
}

/// Every two nodes hold the same entries up to the smaller commit index,
/// from the larger first index (a removed node's log is a prefix of the
/// others'; the spare's starts past the snapshot it joined from).
fn check_logs_agree(logs: &BTreeMap<u64, RaftLog>, problems: &mut Vec<String>) {
    let ids: Vec<u64> = logs.keys().copied().collect();
    for (i, &a) in ids.iter().enumerate() {
        for &b in &ids[i + 1..] {
            let (la, lb) = (&logs[&a], &logs[&b]);
            let from = la.first.max(lb.first);
            let upto = la.commit.min(lb.commit);
            if let Some(k) = (from..=upto).find(|&k| entry_at(la, k) != entry_at(lb, k)) {
                problems.push(format!(
                    "the committed logs of nodes {a} and {b} differ at index {k} (terms {} and {})",
                    entry_at(la, k).term,
                    entry_at(lb, k).term
                ));
            }
        }
    }
}

/// Every final voter's store holds the configuration `members`, all voters:
/// not joint, no learner.
fn check_stored_members(
    logs: &BTreeMap<u64, RaftLog>,
    members: &[u64],
    problems: &mut Vec<String>,
) {
    for &id in members {
        let conf = &logs[&id].conf;
        let mut voters = conf.voters.clone();
        voters.sort_unstable();
        if voters != members
            || !conf.voters_outgoing.is_empty()
            || !conf.learners.is_empty()
            || !conf.learners_next.is_empty()
        {
            problems.push(format!(
                "node {id}'s Raft store holds the configuration {conf:?}, not the voters {members:?} alone"
            ));
        }
    }
}

/// A membership entry, for the report.
fn describe_membership(e: &LogEntry) -> String {
    let mut entry = raft::prelude::Entry::default();
    entry.set_entry_type(e.kind);
    entry.index = e.index;
    entry.data = e.data.clone().into();
    match clusterd::raft::core::decode_membership(&entry) {
        Ok(cc) if cc.get_changes().is_empty() => {
            format!(
                "entry {} (term {}): leave the joint configuration",
                e.index, e.term
            )
        }
        Ok(cc) => {
            let changes: Vec<String> = cc
                .get_changes()
                .iter()
                .map(|c| format!("{:?} {}", c.get_change_type(), c.node_id))
                .collect();
            format!(
                "entry {} (term {}): {} ({:?})",
                e.index,
                e.term,
                changes.join(", "),
                cc.get_transition()
            )
        }
        Err(err) => format!("entry {} (term {}): {err}", e.index, e.term),
    }
}

/// One committed change to a file.
#[derive(Clone, Debug)]
struct Committed {
    index: u64,
    term: u64,
    origin: u64,
    file: String,
    /// `Some(blake3 hex)` for a new version; `None` for an op the writer
    /// never causes (remove, rename, ...), described in `other`.
    hash: Option<String>,
    other: String,
}

/// The committed changes of the set, in log order, from every committed
/// log (they agree where they overlap, `check_logs_agree`), and the
/// committed membership changes.
fn committed_history(logs: &BTreeMap<u64, RaftLog>) -> (Vec<Committed>, Vec<String>) {
    let mut merged: BTreeMap<u64, &LogEntry> = BTreeMap::new();
    for log in logs.values() {
        for e in &log.entries {
            merged.entry(e.index).or_insert(e);
        }
    }
    let last = merged.keys().next_back().copied().unwrap_or(0);
    if let Some(gap) = (1..=last).find(|k| !merged.contains_key(k)) {
        panic!(
            "no node's log holds committed entry {gap} (compacted?): the checks need all of them"
        );
    }
    let mut out = Vec::new();
    let mut changes = Vec::new();
    for e in merged.values() {
        let (index, term, data) = (&e.index, &e.term, &e.data);
        if e.kind != EntryType::EntryNormal {
            changes.push(describe_membership(e));
            continue;
        }
        if data.is_empty() {
            continue; // a new leader's empty entry
        }
        let batch = match Command::decode(data) {
            Ok(Command::Files(b)) => b,
            Ok(_) => continue,
            Err(e) => panic!("committed entry {index} does not decode: {e}"),
        };
        for op in &batch.ops {
            let file = String::from_utf8_lossy(op.path()).into_owned();
            let (hash, other) = match op {
                FileOp::Put { digest, .. } => (Some(digest.get().hex()), String::new()),
                other => (None, format!("{other:?}")),
            };
            out.push(Committed {
                index: *index,
                term: *term,
                origin: batch.origin,
                file,
                hash,
                other,
            });
        }
    }
    (out, changes)
}

// ---------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------

/// The paths whose entries differ between two trees.
fn diff_paths(a: &Tree, b: &Tree) -> BTreeSet<String> {
    a.keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

struct Checks<'a> {
    writes: &'a [Write],
    /// Content hash to the write that made it (contents are unique: each
    /// carries its sequence number).
    by_hash: HashMap<String, usize>,
    committed: Vec<Committed>,
    leaders: &'a Leaders,
    quarantined: &'a BTreeMap<u64, Tree>,
    records: &'a BTreeMap<u64, Vec<Value>>,
    /// The leader's tree, identical on every node if the cluster converged.
    final_tree: &'a Tree,
    /// Each node's tree at the end.
    trees: &'a BTreeMap<u64, Tree>,
    /// The nodes a membership change left out.
    removed: &'a [u64],
}

impl Checks<'_> {
    fn seq_of(&self, hash: &str) -> String {
        match self.by_hash.get(hash) {
            Some(&i) => format!(
                "#{} (written on node {})",
                self.writes[i].seq, self.writes[i].node
            ),
            None => format!("unknown content {}..", &hash[..12.min(hash.len())]),
        }
    }

    fn one_leader_per_term(&self, problems: &mut Vec<String>) {
        for (term, nodes) in &self.leaders.by_term {
            if nodes.len() > 1 {
                problems.push(format!("nodes {nodes:?} all led in term {term}"));
            }
        }
        // Only the leader of a term proposes in it.
        for c in &self.committed {
            match self.leaders.by_term.get(&c.term) {
                Some(nodes) if nodes.contains(&c.origin) => {}
                Some(nodes) => problems.push(format!(
                    "entry {} of term {} was proposed by node {}, but node(s) {nodes:?} led that term",
                    c.index, c.term, c.origin
                )),
                None => problems.push(format!(
                    "entry {} of term {} was committed, but no node's log or status shows a leader of that term",
                    c.index, c.term
                )),
            }
        }
    }

    /// Check 4: the final tree is the last committed version of every file,
    /// nothing was removed or renamed, and no file went back to a version it
    /// had already left.
    fn committed_present(&self, problems: &mut Vec<String>, suspects: &mut BTreeSet<String>) {
        let mut last: BTreeMap<&str, &str> = BTreeMap::new();
        let mut seen: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for c in &self.committed {
            let Some(h) = c.hash.as_deref() else {
                problems.push(format!(
                    "entry {} (term {}, node {}) commits an operation the writer never made: {}",
                    c.index, c.term, c.origin, c.other
                ));
                suspects.insert(c.file.clone());
                continue;
            };
            let prev = last.insert(&c.file, h);
            if prev != Some(h) && !seen.entry(&c.file).or_default().insert(h) {
                problems.push(format!(
                    "{}: entry {} (term {}, node {}) brings back {}, a version it had already left (rollback)",
                    c.file, c.index, c.term, c.origin, self.seq_of(h)
                ));
                suspects.insert(c.file.clone());
            }
        }
        for (file, item) in self.final_tree {
            let Some(h) = item.content.as_deref() else {
                problems.push(format!("{file} in the final tree is not a file: {item}"));
                continue;
            };
            match last.get(file.as_str()) {
                Some(&want) if want == h => {}
                Some(&want) => {
                    problems.push(format!(
                        "{file}: every node holds {}, but the last committed version is {}",
                        self.seq_of(h),
                        self.seq_of(want)
                    ));
                    suspects.insert(file.clone());
                }
                None => {
                    problems.push(format!(
                        "{file}: every node holds {}, which was never committed",
                        self.seq_of(h)
                    ));
                    suspects.insert(file.clone());
                }
            }
        }
        for file in last.keys() {
            if !self.final_tree.contains_key(*file) {
                problems.push(format!("{file} was committed but is on no node"));
                suspects.insert(file.to_string());
            }
        }
    }

    /// Check 5: each committed new version was written on its proposer.
    fn committed_provenance(&self, problems: &mut Vec<String>, suspects: &mut BTreeSet<String>) {
        let mut last: BTreeMap<&str, &str> = BTreeMap::new();
        for c in &self.committed {
            let Some(h) = c.hash.as_deref() else { continue };
            if last.insert(&c.file, h) == Some(h) {
                continue; // the same content again (metadata only)
            }
            match self.by_hash.get(h).map(|&i| &self.writes[i]) {
                Some(w) if w.file == c.file && w.node == c.origin => {}
                Some(w) => {
                    problems.push(format!(
                        "entry {} (term {}) commits #{} of {} as proposed by node {}, but it was written on node {} as {}",
                        c.index, c.term, w.seq, c.file, c.origin, w.node, w.file
                    ));
                    suspects.insert(c.file.clone());
                }
                None => {
                    problems.push(format!(
                        "entry {} (term {}, node {}) commits content of {} that was never written",
                        c.index, c.term, c.origin, c.file
                    ));
                    suspects.insert(c.file.clone());
                }
            }
        }
    }

    fn is_committed(&self, w: &Write) -> bool {
        self.committed
            .iter()
            .any(|c| c.file == w.file && c.hash.as_deref() == Some(w.hash.as_str()))
    }

    /// Where in node `w.node`'s quarantine `w` lies, if it does: a file of
    /// that name and content, or a record with that path and local hash.
    fn in_quarantine(&self, w: &Write) -> Option<String> {
        let tree = &self.quarantined[&w.node];
        if let Some((k, _)) = tree.iter().find(|(k, item)| {
            item.kind == Kind::File
                && item.content.as_deref() == Some(w.hash.as_str())
                && k.rsplit('/').next() == Some(w.file.as_str())
        }) {
            return Some(k.clone());
        }
        self.records[&w.node]
            .iter()
            .find(|r| {
                r["set"].as_str() == Some(SET)
                    && r["path"].as_str() == Some(w.file.as_str())
                    && r["local_hash"].as_str() == Some(w.hash.as_str())
            })
            .map(|r| format!("record {r}"))
    }

    /// A write on a node the membership change left out, still in that
    /// node's tree: its files stay on its disk.
    fn left_on_removed(&self, w: &Write) -> bool {
        self.removed.contains(&w.node)
            && self.trees[&w.node]
                .get(&w.file)
                .and_then(|i| i.content.as_deref())
                == Some(w.hash.as_str())
    }

    /// Check 6: every write committed, in its node's quarantine, or
    /// overwritten by the writer itself (or left in a removed node's tree).
    fn nothing_vanished(&self, problems: &mut Vec<String>, suspects: &mut BTreeSet<String>) {
        for w in self.writes {
            if w.overwritten_by_writer
                || self.is_committed(w)
                || self.in_quarantine(w).is_some()
                || self.left_on_removed(w)
            {
                continue;
            }
            problems.push(format!(
                "write #{} of {} on node {} at {:.3?} ({}) vanished: never committed, not in node {}'s quarantine, and not overwritten by the writer",
                w.seq, w.file, w.node, w.at, w.clock, w.node
            ));
            suspects.insert(w.file.clone());
        }
    }

    /// A removed node's tree (not compared: it stops receiving entries)
    /// holds only committed versions and writes made on it.
    fn removed_hold_nothing_uncommitted(
        &self,
        problems: &mut Vec<String>,
        suspects: &mut BTreeSet<String>,
    ) {
        for &id in self.removed {
            for (file, item) in &self.trees[&id] {
                let Some(h) = item.content.as_deref() else {
                    problems.push(format!("{file} on removed node {id} is not a file: {item}"));
                    continue;
                };
                let committed = self
                    .committed
                    .iter()
                    .any(|c| &c.file == file && c.hash.as_deref() == Some(h));
                let own = self
                    .by_hash
                    .get(h)
                    .is_some_and(|&i| self.writes[i].node == id && &self.writes[i].file == file);
                if !committed && !own {
                    problems.push(format!(
                        "{file}: removed node {id} holds {}, neither committed nor written on it",
                        self.seq_of(h)
                    ));
                    suspects.insert(file.clone());
                }
            }
        }
    }

    fn summary(&self) -> String {
        let (mut committed, mut quarantined, mut overwritten, mut left, mut lost) = (0, 0, 0, 0, 0);
        for w in self.writes {
            if self.is_committed(w) {
                committed += 1;
            } else if self.in_quarantine(w).is_some() {
                quarantined += 1;
            } else if w.overwritten_by_writer {
                overwritten += 1;
            } else if self.left_on_removed(w) {
                left += 1;
            } else {
                lost += 1;
            }
        }
        format!(
            "{committed} committed, {quarantined} quarantined, {overwritten} overwritten by the writer, {left} left on a removed node, {lost} unaccounted"
        )
    }

    /// Everything known about one file, in time order, for a failure report.
    fn history(&self, file: &str) -> String {
        let mut s = format!("history of {file}:\n  writes:\n");
        for w in self.writes.iter().filter(|w| w.file == file) {
            let fate = if self.is_committed(w) {
                "committed".to_string()
            } else if let Some(q) = self.in_quarantine(w) {
                format!("quarantined as {q}")
            } else if w.overwritten_by_writer {
                "overwritten by the writer".to_string()
            } else if self.left_on_removed(w) {
                format!("left on removed node {}", w.node)
            } else {
                "VANISHED".to_string()
            };
            let _ = writeln!(
                s,
                "    #{} on node {} at {:.3?} ({}): {fate}",
                w.seq, w.node, w.at, w.clock
            );
        }
        let _ = writeln!(s, "  committed:");
        for c in self.committed.iter().filter(|c| c.file == file) {
            let what = match &c.hash {
                Some(h) => self.seq_of(h),
                None => c.other.clone(),
            };
            let _ = writeln!(
                s,
                "    index {} term {} proposed by node {}: {what}",
                c.index, c.term, c.origin
            );
        }
        for (node, tree) in self.trees {
            let what = match tree.get(file).and_then(|i| i.content.as_deref()) {
                Some(h) => self.seq_of(h),
                None => "absent".to_string(),
            };
            let _ = writeln!(s, "  at the end on node {node}: {what}");
        }
        for (node, tree) in self.quarantined {
            for (k, item) in tree
                .iter()
                .filter(|(k, _)| k.rsplit('/').next() == Some(file))
            {
                let what = match (item.kind, item.content.as_deref()) {
                    (Kind::File, Some(h)) => self.seq_of(h),
                    _ => item.to_string(),
                };
                let _ = writeln!(s, "  in node {node}'s quarantine: {k}: {what}");
            }
        }
        for (node, records) in self.records {
            for r in records.iter().filter(|r| r["path"].as_str() == Some(file)) {
                let what = r["local_hash"]
                    .as_str()
                    .map(|h| self.seq_of(h))
                    .unwrap_or_else(|| "no hash".to_string());
                let _ = writeln!(s, "  quarantine record on node {node}: {what}: {r}");
            }
        }
        s
    }
}
