//! Large sets and larger clusters, scaled down to check behaviour, not
//! time (the `scale` benchmark measures): inotify's watch limit.

use std::fs;
use std::time::Duration;

use crate::harness::tree::*;
use crate::harness::*;

/// The inotify watch limit every node of [`a_set_past_the_inotify_limit_is_rescanned`]
/// runs under: its own user namespace's `user.max_inotify_watches`, so the
/// machine's limit is left alone.
const WATCH_LIMIT: u64 = 24;

/// A leader whose set has more directories than inotify may watch says so
/// (log and status: the limit, the directories, the sysctl to raise), and
/// still finds a change made where no watch is, by rescan; a node starting
/// with such a set committed warns at once.
#[test]
fn a_set_past_the_inotify_limit_is_rescanned() {
    let script = format!("echo {WATCH_LIMIT} > /proc/sys/user/max_inotify_watches && exec \"$@\"");
    let c = Cluster::builder(3)
        .wrap(&[
            "unshare",
            "--user",
            "--map-root-user",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .sync_set("spool", "mirror", "")
        .start();
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    c.wait_barrier(leader);
    let root = c.set_path(leader, "spool");
    // More directories than watches, moved in at once (as a restored
    // backup): inotify's walk of the new tree stops at the limit.
    let users = 2 * WATCH_LIMIT as usize;
    let staging = c.node(leader).dir.join("staging");
    for d in 0..users {
        let dir = staging.join(format!("user{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        write_file(&dir.join("inbox"), &format!("mail {d}\n"));
    }
    fs::rename(&staging, root.join("home")).unwrap();
    // The root, home and the users'.
    let dirs = users + 2;
    wait_trees_equal(&c, "spool", &all, scaled(Duration::from_secs(60)));
    let reason = wait_until(
        scaled(Duration::from_secs(30)),
        "the leader to report the set as not watched whole",
        || {
            let s = set_status(&c, leader, leader, "spool")?;
            match s["unwatched"].as_str() {
                Some(why) => Ok(why.to_string()),
                None => Err(format!("status: {s}")),
            }
        },
    );
    for needle in [
        &format!("limit of {WATCH_LIMIT} watches"),
        "fs.inotify.max_user_watches",
        &format!("hold {dirs} directories"),
        "sysctl -w fs.inotify.max_user_watches=65536",
        "rescanned every 10s",
    ] {
        assert!(reason.contains(needle), "{needle:?} missing from: {reason}");
    }
    assert!(c.log(leader).contains(&reason), "the log names it too");
    let check = c.ctl(leader, &["check"], STATUS_TIMEOUT);
    assert!(
        check.stdout.contains("not watched whole by inotify"),
        "check warns: {check}"
    );

    // Every inbox changes: most of them where no watch is, which only a
    // rescan can find.
    for d in 0..users {
        let inbox = root.join(format!("home/user{d:03}/inbox"));
        write_file(&inbox, &format!("mail {d}\na new message\n"));
    }
    let started = std::time::Instant::now();
    wait_trees_equal(&c, "spool", &all, scaled(Duration::from_secs(60)));
    println!("found by rescan after {:.1?}", started.elapsed());

    // A follower restarting with the set committed warns at start.
    let f = c.others(&[leader])[0];
    c.restart(f);
    wait_until(
        scaled(Duration::from_secs(20)),
        "the restarted follower to warn about the watch limit",
        || {
            let log = c.log(f);
            let start = log.rfind("=== harness: start #2").unwrap_or(0);
            let warned = log[start..].contains(&format!("the sync sets hold {dirs} directories"))
                && log[start..].contains(&format!("but this user may hold {WATCH_LIMIT}"));
            if warned {
                Ok(())
            } else {
                Err(c.log_tail(f, 20))
            }
        },
    );
}
