//! Membership changes (PRODUCT.md "Membership"): a node started with
//! `[node] join = true` waits to be added, joins as a learner, catches up (a
//! snapshot, then every committed file) and becomes a voter whose vote
//! counts; a permanent learner neither votes nor leads; `replace`, removing
//! the leader, refused changes, and a restart of every node.
//!
//! An address in a membership change is dialled by every member alike, so
//! these clusters use direct links (no proxies). Node 4 is the new machine
//! (`ClusterBuilder::joiner`): founders 1..3 never list it in their configs.

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use serde_json::Value;

use crate::harness::tree::*;
use crate::harness::*;

/// `[replication]` of every node: changes travel at once, and a rescan never
/// rescues a file the joiner failed to fetch.
const REPLICATION: &str = "[replication]\ndebounce_ms = 20\nrescan_secs = 300";
/// Deadline for small changes to reach every node.
const CONVERGE: Duration = Duration::from_secs(30);
const FOUNDERS: [u64; 3] = [1, 2, 3];
/// Written on the leader before node 4 joins: it must get them through a
/// snapshot and fetches, as nothing replays them to it.
const BEFORE: [(&str, &str); 3] = [
    ("aliases", "postmaster: root\n"),
    ("hosts", "10.0.0.1 mail\n"),
    (
        "krb5/krb5.conf",
        "[libdefaults]\n default_realm = EXAMPLE\n",
    ),
];

/// `--timeout-ms` of a change that waits for a node to catch up: generous,
/// as several clusters share 2 cores.
fn change_timeout_ms() -> u64 {
    scaled(Duration::from_secs(60)).as_millis() as u64
}

/// Founders 1..3 with set `etc` holding `BEFORE` on every one of them, and
/// node 4 configured as a joiner, not started; returns the founders' leader.
fn founders_and_joiner() -> (Cluster, u64) {
    founders(4, |_| {})
}

/// Founders 1..3 and joiners 4..=`n`, with set `etc` and `REPLICATION` on
/// every node; `configure` may rewrite the joiners' configs (they start
/// later). Once the founders elected a leader, `BEFORE` is written on it and
/// reaches every founder; returns the leader.
fn founders(n: u64, configure: impl FnOnce(&Cluster)) -> (Cluster, u64) {
    let mut b = Cluster::builder(n)
        .direct_links()
        .sync_set("etc", "mirror", "");
    for id in 1..=n {
        b = b.extra_toml(id, REPLICATION);
        if !FOUNDERS.contains(&id) {
            b = b.joiner(id);
        }
    }
    let c = b.start();
    configure(&c);
    let leader = c.wait_for_leader(&FOUNDERS);
    c.wait_barrier(leader);
    wait_sets_ready(&c, &FOUNDERS, &["etc"]);
    let root = c.set_path(leader, "etc");
    fs::create_dir_all(root.join("krb5")).unwrap();
    for (f, text) in BEFORE {
        write_file(&root.join(f), text);
    }
    wait_trees_equal(&c, "etc", &leader_then(leader, &FOUNDERS), CONVERGE);
    (c, leader)
}

/// Starts joiner `id` and waits until it waits to be added: it reports
/// `member` "joining" and its listen port accepts connections (an `add`
/// sooner is refused, rightly: the address does not answer).
#[track_caller]
fn start_joiner(c: &Cluster, id: u64) {
    c.start_node(id);
    wait_member(c, id, "joining");
    wait_until(
        Duration::from_secs(10),
        &format!("node {id}'s listen port to accept connections"),
        || TcpStream::connect(c.listen_addr(id)),
    );
}

/// `clusterctl member <args> --timeout-ms <timeout_ms>` through node `via`.
fn member(c: &Cluster, via: u64, args: &[&str], timeout_ms: u64) -> CmdOutput {
    let ms = timeout_ms.to_string();
    let mut argv = vec!["member"];
    argv.extend_from_slice(args);
    argv.extend(["--timeout-ms", &ms]);
    c.ctl(
        via,
        &argv,
        Duration::from_millis(timeout_ms) + scaled(Duration::from_secs(15)),
    )
}

/// `member add <id> --addr <its listen address> <flags>` through node 1;
/// panics unless it succeeds.
#[track_caller]
fn add(c: &Cluster, id: u64, flags: &[&str]) {
    let (ids, addr) = (id.to_string(), c.listen_addr(id));
    let mut args = vec!["add", &ids, "--addr", &addr];
    args.extend_from_slice(flags);
    let out = member(c, 1, &args, change_timeout_ms());
    assert!(out.success(), "member add {id} {flags:?} via node 1: {out}");
}

/// `member list --json` through node `via` as id -> (role, addr), once every
/// entry was checked to have the contract's fields.
pub(crate) fn member_list(
    c: &Cluster,
    via: u64,
) -> Result<BTreeMap<u64, (String, String)>, String> {
    let out = c.ctl(via, &["member", "list", "--json"], STATUS_TIMEOUT);
    if !out.success() {
        return Err(format!("member list --json via node {via}: {out}"));
    }
    let v: Value = serde_json::from_str(out.stdout.trim())
        .map_err(|e| format!("member list --json via node {via} is not JSON ({e}): {out}"))?;
    let rows = v
        .as_array()
        .ok_or_else(|| format!("member list --json via node {via} is not an array: {v}"))?;
    let mut list = BTreeMap::new();
    for e in rows {
        let id = e.get("id").and_then(Value::as_u64);
        let role = e.get("role").and_then(Value::as_str);
        let addr = e.get("addr").and_then(Value::as_str);
        let (Some(id), Some(role), Some(addr)) = (id, role, addr) else {
            return Err(format!("member list entry without id, role or addr: {e}"));
        };
        if !["voter", "learner", "witness"].contains(&role)
            || e.get("reachable").is_none()
            || e.get("match_index").is_none()
        {
            return Err(format!("member list entry off the contract: {e}"));
        }
        if list
            .insert(id, (role.to_string(), addr.to_string()))
            .is_some()
        {
            return Err(format!("node {id} listed twice: {v}"));
        }
    }
    Ok(list)
}

/// Waits until node `via` lists exactly the members `want` (id, role) and
/// returns the list.
#[track_caller]
/// `member remove ID` through `via`, which must succeed.
fn remove_member(c: &Cluster, via: u64, id: u64) {
    let out = member(c, via, &["remove", &id.to_string()], change_timeout_ms());
    assert!(out.success(), "member remove {id}: {out}");
}

fn expect_roles(c: &Cluster, via: u64, want: &[(u64, &str)]) -> BTreeMap<u64, (String, String)> {
    let want: BTreeMap<u64, String> = want.iter().map(|&(i, r)| (i, r.to_string())).collect();
    wait_until(
        Duration::from_secs(15),
        &format!("node {via} to list the members {want:?}"),
        || {
            let list = member_list(c, via)?;
            let roles: BTreeMap<u64, String> =
                list.iter().map(|(&i, (r, _))| (i, r.clone())).collect();
            if roles == want {
                Ok(list)
            } else {
                Err(format!("listed {list:?}"))
            }
        },
    )
}

/// `ids` as voters, for `expect_roles`.
fn voters(ids: &[u64]) -> Vec<(u64, &'static str)> {
    ids.iter().map(|&i| (i, "voter")).collect()
}

/// Waits until node `id` reports `member` = `want` in its own status.
#[track_caller]
fn wait_member(c: &Cluster, id: u64, want: &str) {
    wait_until(
        CONVERGE,
        &format!("node {id} to report member {want:?}"),
        || {
            c.assert_alive(id);
            let v = c.view(id)?;
            if v.member.as_deref() == Some(want) {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    )
}

/// Waits until `among` agree on a leader and every one of them has applied
/// what it had committed: a committed membership change has taken effect on
/// all of them (Raft applies a change with its entry). Returns the leader.
#[track_caller]
fn wait_applied(c: &Cluster, among: &[u64]) -> u64 {
    let leader = c.wait_for_leader(among);
    let target = c
        .view_now(leader)
        .commit_index
        .expect("leader's commit_index");
    for &id in among {
        wait_until(
            CONVERGE,
            &format!("node {id} to apply index {target}"),
            || {
                let v = c.view(id)?;
                match v.applied_index {
                    Some(a) if a >= target => Ok(()),
                    _ => Err(v.to_string()),
                }
            },
        );
    }
    leader
}

/// Node `id` holds every file of `BEFORE` with its content, now.
#[track_caller]
fn assert_before_files(c: &Cluster, id: u64, when: &str) {
    let root = c.set_path(id, "etc");
    for (f, text) in BEFORE {
        let got = fs::read_to_string(root.join(f));
        assert!(
            got.as_deref().ok() == Some(text),
            "node {id} {when}: {f} should hold {text:?}, got {got:?}"
        );
    }
}

/// Writes `name` on `leader` (once a barrier through it succeeded) and waits
/// until it reached every node of `ids`.
#[track_caller]
fn commit_file(c: &Cluster, leader: u64, ids: &[u64], name: &str) {
    c.wait_barrier(leader);
    write_file(&c.set_path(leader, "etc").join(name), &format!("{name}\n"));
    wait_trees_equal(c, "etc", &leader_then(leader, ids), CONVERGE);
}

/// A fourth node started with `join = true` forms no cluster while it waits;
/// `member add` makes it a voter holding every file committed before; and its
/// vote then counts: with one founder removed and another SIGKILLed, the last
/// founder and node 4 elect a leader and commit.
#[test]
fn a_joining_node_waits_is_added_as_a_voter_and_its_vote_counts() {
    let (c, leader) = founders_and_joiner();
    start_joiner(&c, 4);
    observe_window(&c, 4, THREE_ELECTIONS, 10, |v| {
        assert!(
            v.leader.is_none() && !v.is_leader(),
            "node 4 found a leader before it was added: {v}"
        );
        assert_eq!(v.member.as_deref(), Some("joining"), "{v}");
    });
    expect_roles(&c, 1, &voters(&FOUNDERS));

    add(&c, 4, &[]);
    let list = expect_roles(&c, 1, &voters(&[1, 2, 3, 4]));
    assert_eq!(list[&4].1, c.listen_addr(4), "node 4's address: {list:?}");
    // The new node follows the cluster's membership, not one of its own.
    expect_roles(&c, 4, &voters(&[1, 2, 3, 4]));
    // Promotion waits until it holds every committed file.
    assert_before_files(&c, 4, "once it is a voter");
    wait_member(&c, 4, "voter");

    let founders = c.others(&[leader, 4]);
    let (removed, kept) = (founders[0], founders[1]);
    remove_member(&c, leader, removed);
    expect_roles(&c, leader, &voters(&[leader, kept, 4]));
    wait_applied(&c, &[leader, kept, 4]);

    // Two of the voters {kept, 4, leader} are a majority only if 4's vote counts.
    c.kill(leader);
    let next = c.wait_for_leader(&[kept, 4]);
    commit_file(&c, next, &[kept, 4], "with-node-4s-vote");
}

/// `member add --learner`: node 4 gets every file and later change, but its
/// vote does not count and it never leads: with two of the three voters
/// SIGKILLed, no node leads over several election timeouts.
#[test]
fn a_learner_replicates_but_neither_counts_nor_leads() {
    let (c, leader) = founders_and_joiner();
    start_joiner(&c, 4);
    add(&c, 4, &["--learner"]);
    expect_roles(
        &c,
        1,
        &[(1, "voter"), (2, "voter"), (3, "voter"), (4, "learner")],
    );
    wait_member(&c, 4, "learner");
    commit_file(&c, leader, &[1, 2, 3, 4], "after-the-learner");
    assert_before_files(&c, 4, "as a learner");

    let survivor = c.others(&[leader, 4])[0];
    for id in c.others(&[survivor, 4]) {
        c.kill(id);
    }
    let mut answers = BTreeMap::from([(survivor, 0u32), (4, 0u32)]);
    hold_for(
        THREE_ELECTIONS,
        &format!("no leader among voter {survivor} and learner 4"),
        || {
            for (&id, n) in answers.iter_mut() {
                c.assert_alive(id);
                if let Ok(v) = c.view(id) {
                    *n += 1;
                    if v.is_leader() {
                        return Err(format!("node {id} leads: {v}"));
                    }
                }
            }
            Ok(())
        },
    );
    assert!(
        answers.values().all(|&n| n >= 5),
        "too few status answers to show no node led: {answers:?}"
    );
}

/// `member replace OLD 4`: node 4 catches up, then one change makes it a
/// voter and removes OLD (a founder that does not lead, so the test does
/// not depend on the election), which reports itself removed, keeps its files
/// and gets no new ones; the new voters survive losing their leader.
#[test]
fn replace_swaps_a_voter_for_a_new_node() {
    let (c, leader) = founders_and_joiner();
    let old = *c.others(&[leader, 4]).last().unwrap();
    start_joiner(&c, 4);
    let addr = c.listen_addr(4);
    let out = member(
        &c,
        leader,
        &["replace", &old.to_string(), "4", "--addr", &addr],
        change_timeout_ms(),
    );
    assert!(out.success(), "member replace {old} 4: {out}");
    let rest = c.others(&[old]);
    expect_roles(&c, leader, &voters(&rest));
    assert_before_files(&c, 4, &format!("once it replaced node {old}"));
    wait_member(&c, old, "removed");
    wait_member(&c, 4, "voter");

    let l = wait_applied(&c, &rest);
    c.kill(l);
    let survivors = c.others(&[old, l]);
    let next = c.wait_for_leader(&survivors);
    commit_file(&c, next, &survivors, "after-the-replace");
    let old_tree = snapshot(&c.set_path(old, "etc"));
    assert!(
        !old_tree.contains_key("after-the-replace"),
        "removed node {old} still replicates: {old_tree:?}"
    );
    assert_before_files(&c, old, "after its removal");
}

/// `member remove <leader>` through the leader on four founding voters: it
/// hands leadership over, is removed, and the other three keep committing.
#[test]
fn removing_the_leader_hands_leadership_over_first() {
    let mut b = Cluster::builder(4)
        .direct_links()
        .sync_set("etc", "mirror", "");
    for id in 1..=4 {
        b = b.extra_toml(id, REPLICATION);
    }
    let c = b.start();
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);
    wait_sets_ready(&c, &all, &["etc"]);

    let out = member(
        &c,
        leader,
        &["remove", &leader.to_string()],
        change_timeout_ms(),
    );
    assert!(out.success(), "member remove {leader} (the leader): {out}");
    let rest = c.others(&[leader]);
    let next = c.wait_for_leader(&rest);
    expect_roles(&c, next, &voters(&rest));
    wait_member(&c, leader, "removed");
    assert!(
        !c.view_now(leader).is_leader(),
        "removed node {leader} still leads"
    );
    commit_file(&c, next, &rest, "after-the-leader-left");
}

/// Each refused change exits non-zero with a reason and changes nothing:
/// an id that is a member, node 2's address (its certificate) for node 4, an
/// address nothing answers at, a removal leaving two voters without a
/// witness, and removing a node that is not a member.
#[test]
fn refused_changes_leave_the_membership_unchanged() {
    let c = Cluster::builder(4).joiner(4).direct_links().start();
    let leader = c.wait_for_leader(&FOUNDERS);
    c.wait_barrier(leader);
    let before = expect_roles(&c, 1, &voters(&FOUNDERS));
    let (addr2, addr4) = (c.listen_addr(2), c.listen_addr(4));
    let cases: [(&str, Vec<&str>, &str); 5] = [
        (
            "adding id 2 again",
            vec!["add", "2", "--addr", &addr2],
            "already",
        ),
        (
            "adding id 4 at node 2's address",
            vec!["add", "4", "--addr", &addr2],
            "",
        ),
        (
            "adding id 4 where nothing answers",
            vec!["add", "4", "--addr", &addr4],
            "",
        ),
        ("removing node 3 from three voters", vec!["remove", "3"], ""),
        ("removing node 7, not a member", vec!["remove", "7"], ""),
    ];
    for (what, args, needle) in cases {
        let out = member(
            &c,
            1,
            &args,
            scaled(Duration::from_secs(5)).as_millis() as u64,
        );
        assert!(
            !out.success() && !out.timed_out && !out.stderr.trim().is_empty(),
            "{what} must be refused with a reason: {out}"
        );
        assert!(
            out.stderr.contains(needle),
            "{what}: reason lacks {needle:?}: {out}"
        );
        assert_eq!(
            member_list(&c, 1),
            Ok(before.clone()),
            "{what} changed the members"
        );
    }
}

/// After node 4 was added as a voter, SIGKILLing and restarting every node
/// (node 4's config still says `join = true`, the founders' still list only
/// 1..3) keeps the committed membership: 4 is a voter and a leader is elected.
#[test]
fn a_restart_of_every_node_keeps_the_committed_membership() {
    let (c, _) = founders_and_joiner();
    start_joiner(&c, 4);
    add(&c, 4, &[]);
    let all = c.ids();
    wait_applied(&c, &all);
    for &id in &all {
        c.kill(id);
    }
    for &id in &all {
        c.start_node(id);
    }
    let leader = c.wait_for_leader(&all);
    expect_roles(&c, 1, &voters(&all));
    expect_roles(&c, 4, &voters(&all));
    wait_member(&c, 4, "voter");
    c.wait_barrier(leader);
}

/// Node 5's config lists only the founders, and node 4, added after that
/// config was written, leads when node 5 is added: the leader introduces
/// every member (itself included) to the joining node, which then gets the
/// snapshot, every file, and the membership 1..5.
#[test]
fn a_node_joins_through_a_leader_that_joined_after_its_config_was_written() {
    let (c, _) = founders(5, |c| {
        c.rewrite_config(5, |cfg| cfg.peers.retain(|(id, _)| FOUNDERS.contains(id)))
    });
    start_joiner(&c, 4);
    add(&c, 4, &[]);
    wait_member(&c, 4, "voter");
    let four = [1, 2, 3, 4];
    wait_applied(&c, &four);
    let out = c.promote(1, 4);
    assert!(out.success(), "clusterctl promote 4: {out}");
    c.wait_for_leader_is(&four, 4);

    start_joiner(&c, 5);
    add(&c, 5, &[]);
    let all = c.ids();
    expect_roles(&c, 5, &voters(&all));
    assert_before_files(&c, 5, "once it joined through leader 4");
    let leader = wait_applied(&c, &all);
    commit_file(&c, leader, &all, "after-node-5-joined");
}

/// `member replace OLD 4` whose leader is SIGKILLed (then restarted) as soon
/// as node 4 is listed: node 4's entry carries OLD, so whichever leader
/// promotes it completes the replace. What the command printed does not
/// matter; the cluster must end by itself with the voters {the two other
/// founders, 4} on every member (no joint configuration left behind, which
/// would still list OLD), OLD reporting itself removed, and commit.
#[test]
fn a_leader_killed_in_the_middle_of_a_replace_leaves_a_working_cluster() {
    let (c, leader) = founders_and_joiner();
    let founders = c.others(&[leader, 4]);
    let old = founders[0];
    start_joiner(&c, 4);
    let (olds, addr) = (old.to_string(), c.listen_addr(4));
    let rest = c.others(&[old]);
    thread::scope(|s| {
        s.spawn(|| {
            let args = ["replace", &olds, "4", "--addr", &addr];
            member(&c, founders[1], &args, change_timeout_ms())
        });
        let role = wait_until(CONVERGE, "node 4 to be listed", || {
            let list = member_list(&c, founders[1])?;
            match list.get(&4) {
                Some((role, _)) => Ok(role.clone()),
                None => Err(format!("listed {list:?}")),
            }
        });
        c.kill(leader);
        eprintln!("leader {leader} killed while node 4 was listed as {role}");
        c.start_node(leader);

        wait_until(
            CONVERGE,
            &format!("every member {rest:?} to list the voters {rest:?}"),
            || {
                for &id in &rest {
                    c.assert_alive(id);
                    let list = member_list(&c, id)?;
                    if !list
                        .iter()
                        .all(|(i, (r, _))| r == "voter" && rest.contains(i))
                        || list.len() != rest.len()
                    {
                        return Err(format!("node {id} lists {list:?}"));
                    }
                }
                Ok(())
            },
        );
        wait_member(&c, old, "removed");
        let l = wait_applied(&c, &rest);
        commit_file(&c, l, &rest, "after-the-interrupted-replace");
    });
}

/// `member add 4 --witness` (node 4 configured `witness = true`, with no
/// sync set): it becomes a voter listed as "witness" and holds no file.
/// Its vote counts: with one founder removed (two data voters and a witness
/// are allowed) and the leader SIGKILLed, the last founder and the witness
/// elect that founder and commit.
#[test]
fn a_witness_joins_and_votes_but_holds_no_files() {
    let (c, leader) = founders(4, |c| {
        c.rewrite_config(4, |cfg| {
            cfg.node_extra.push("witness = true".to_string());
            cfg.extra = REPLICATION.to_string();
        })
    });
    start_joiner(&c, 4);
    add(&c, 4, &["--witness"]);
    let mut want = voters(&FOUNDERS);
    want.push((4, "witness"));
    expect_roles(&c, 1, &want);
    expect_roles(&c, 4, &want);
    wait_member(&c, 4, "witness");
    commit_file(&c, leader, &FOUNDERS, "with-a-witness");
    assert_holds_no_file(&c, 4);

    let founders = c.others(&[leader, 4]);
    let (removed, kept) = (founders[0], founders[1]);
    remove_member(&c, leader, removed);
    expect_roles(
        &c,
        leader,
        &[(leader, "voter"), (kept, "voter"), (4, "witness")],
    );
    wait_applied(&c, &[leader, kept, 4]);

    // Two of the voters {leader, kept, 4} are a majority only if 4's vote counts.
    c.kill(leader);
    assert_eq!(
        c.wait_for_leader(&[kept, 4]),
        kept,
        "the witness must not lead"
    );
    c.wait_barrier(kept);
    write_file(
        &c.set_path(kept, "etc").join("with-the-witness-vote"),
        "x\n",
    );
    c.wait_barrier(kept);
    c.wait_barrier(4);
    assert_holds_no_file(&c, 4);
}

/// No file under node `id`'s directory (config, data, log) holds the
/// content of a file of `BEFORE`.
#[track_caller]
fn assert_holds_no_file(c: &Cluster, id: u64) {
    fn walk(dir: &std::path::Path, found: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let (path, ty) = (e.path(), e.file_type().unwrap());
            if ty.is_dir() {
                walk(&path, found);
            } else if ty.is_file() {
                let bytes = fs::read(&path).unwrap_or_default();
                for (f, text) in BEFORE {
                    if bytes.windows(text.len()).any(|w| w == text.as_bytes()) {
                        found.push(format!("{} holds {f}", path.display()));
                    }
                }
            }
        }
    }
    let mut found = Vec::new();
    walk(&c.node(id).dir, &mut found);
    assert!(found.is_empty(), "node {id} holds files: {found:?}");
}
