//! `scale`: a mail spool of `--scale-files` small files (1,000,000 with
//! `--bench`), the set the seeds' mail servers sync under `/home`: 1,000
//! users, each a Maildir (`cur`, `new`, `tmp`), files of 0.5 to 4 KiB with
//! Maildir names. One 3-node cluster at default timers, peers dialling each
//! other directly (the proxies would take CPU rsync never pays), measuring:
//!
//! - the first sync: the spool built in a staging directory, written back,
//!   moved into the leader's set with one rename, timed until both
//!   followers report it applied and then hold every path with its size,
//!   mode and mtime (content compared afterwards, not timed); against
//!   local `rsync -a` to two copies (the bar) and `rsync -az` over ssh, in
//!   the same run;
//! - the peak RSS of every node during that sync, and its CPU and peak RSS
//!   over `--scale-idle-secs` of idle afterwards;
//! - `clusterctl status` on the leader (median of 5);
//! - a follower's restart to serving: SIGTERM, start, until its own status
//!   answers and the leader's shows it applied, with nothing missing;
//! - catch-up: that follower stopped (SIGKILL) while 1 % of the files are
//!   rewritten with new content of their size, then started; the payload
//!   every node sends (`wire_bytes_sent`, Raft and fetch) from its start
//!   until it holds the change, against the bytes changed.

use super::*;

/// Users (Maildir folders) of the spool.
const USERS: usize = 1000;

/// The spool: `files` files over [`USERS`] Maildirs, 0.5 to 4 KiB each,
/// two thirds in `cur`, the rest in `new`. Returns the files made (relative
/// paths) and their total size.
fn build_spool(dir: &Path, files: usize, seed: u64) -> (Vec<PathBuf>, u64) {
    let mut rng = PseudoRandom::new(seed);
    let mut made = Vec::with_capacity(files);
    let mut total = 0;
    for u in 0..USERS {
        for sub in ["cur", "new", "tmp"] {
            let d = dir.join(format!("user{u:04}/Maildir/{sub}"));
            fs::create_dir_all(&d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
        }
    }
    for i in 0..files {
        let mut r = [0u8; 8];
        rng.fill(&mut r);
        let x = u64::from_le_bytes(r);
        let size = 512 + x % (3584 + 1);
        let user = i % USERS;
        let sub = if i % 3 == 2 { "new" } else { "cur" };
        let rel = PathBuf::from(format!(
            "user{user:04}/Maildir/{sub}/{}.M{}P{}.mx1,S={size}:2,S",
            1_733_500_000 + i as u64,
            x % 1_000_000,
            1000 + i % 30_000
        ));
        append_pseudo_random(&dir.join(&rel), seed ^ i as u64, size);
        made.push(rel);
        total += size;
    }
    (made, total)
}

/// Peak VmRSS per node, sampled by [`Peaks::sample`].
struct Peaks(Vec<(u64, u64)>);

impl Peaks {
    fn new(ids: &[u64]) -> Peaks {
        Peaks(ids.iter().map(|&id| (id, 0)).collect())
    }

    fn sample(&mut self, c: &Cluster) {
        for (id, peak) in &mut self.0 {
            if let Some(pid) = c.pid(*id) {
                // A node may exit between pid() and the read.
                if let Some(rss) = try_rss_bytes(pid) {
                    *peak = (*peak).max(rss);
                }
            }
        }
    }

    fn max(&self) -> u64 {
        self.0.iter().map(|&(_, p)| p).max().unwrap_or(0)
    }

    fn show(&self, leader: u64) -> String {
        self.0
            .iter()
            .map(|&(id, p)| {
                let role = if id == leader { "leader" } else { "follower" };
                format!("node {id} ({role}) {}", human(p))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Total `wire_bytes_sent` of every node in the leader's status.
fn wire_sent(c: &Cluster, via: u64) -> u64 {
    let v = c
        .status_result(via, STATUS_TIMEOUT)
        .unwrap_or_else(|e| panic!("status of node {via}: {e}"));
    v["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| n["wire_bytes_sent"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

/// Waits until `id` answers its own status as a follower and the leader's
/// status shows its `set` with at least `files` files, none missing, no lag.
fn wait_serving(o: &Opts, c: &Cluster, leader: u64, id: u64, set: &str, files: usize) {
    wait_until_every(
        Duration::from_millis(100),
        o.deadline,
        &format!("node {id} to serve again"),
        || {
            let own = c.view_with_timeout(id, STATUS_TIMEOUT)?;
            if own.leader != Some(leader) {
                return Err(format!("node {id} sees leader {:?}", own.leader));
            }
            let status = c.status_result(leader, STATUS_TIMEOUT)?;
            let s = set_status_in(&status, leader, id, set)?;
            let have = s["files"].as_u64().unwrap_or(0) as usize;
            if have >= files && s["missing"] == 0 && s["lag_batches"] == 0 {
                Ok(())
            } else {
                Err(format!("node {id}: {s}"))
            }
        },
    );
}

pub(super) fn scale(o: &Opts, have_rsync: bool) -> Vec<Row> {
    let set = "spool";
    let (c, leader, followers) = bench_cluster(set, "mirror", true);
    let ids = [leader, followers[0], followers[1]];
    let staging = c.node(leader).dir.join("staging");
    let t = Instant::now();
    let (files, bytes) = build_spool(&staging, o.scale_files, 30);
    println!(
        "spool: {} files, {} in {USERS} Maildirs, built in {:.1?}",
        files.len(),
        human(bytes),
        t.elapsed()
    );
    settle_disk();
    let tree = c.set_path(leader, set).join("home");
    let mut peaks = Peaks::new(&ids);
    let t0 = Instant::now();
    fs::rename(&staging, &tree).unwrap();
    // Paths, not only files: the directories count in the status too.
    let entries = files.len();
    wait_until_every(
        Duration::from_millis(200),
        o.deadline,
        "both followers to report the spool applied",
        || {
            peaks.sample(&c);
            let status = c.status_result(leader, STATUS_TIMEOUT)?;
            let mut behind = Vec::new();
            for &f in &followers {
                let s = set_status_in(&status, leader, f, set)?;
                let have = s["files"].as_u64().unwrap_or(0) as usize;
                if have < entries || s["missing"] != 0 || s["lag_batches"] != 0 {
                    behind.push(format!("node {f}: {s}"));
                }
            }
            if behind.is_empty() {
                Ok(())
            } else {
                Err(behind.join("; "))
            }
        },
    );
    let applied = t0.elapsed();
    wait_metadata_equal(&c, set, &ids, o.deadline);
    let took = t0.elapsed();
    peaks.sample(&c);
    println!("clusterd: status showed both followers done at {applied:.2?}, trees compared at {took:.2?}");
    println!("peak RSS during the first sync: {}", peaks.show(leader));
    let t = wait_trees_equal(&c, set, &ids, o.deadline);
    let held = t.values().filter(|i| i.kind == Kind::File).count();
    assert_eq!(held, files.len(), "files on every node");
    drop(t);

    let (rsync_cell, met, bar) = if have_rsync {
        let over_ssh = Sshd::start(&c.dir().join("sshd")).map(|sshd| {
            settle_disk();
            let a = sshd
                .rsync(&["-az"], &tree, &scratch(&c, "scale-ssh-1"))
                .took;
            let b = sshd
                .rsync(&["-az"], &tree, &scratch(&c, "scale-ssh-2"))
                .took;
            println!("rsync -az over ssh: a copy per follower {:.2?}", a + b);
            a + b
        });
        settle_disk();
        let one = rsync(&["-a"], &tree, &scratch(&c, "scale-dst-1")).took;
        let two = one + rsync(&["-a"], &tree, &scratch(&c, "scale-dst-2")).took;
        println!("rsync -a: one copy {one:.2?}, a copy per follower {two:.2?}");
        let ssh_cell = match &over_ssh {
            Ok(t) => format!("; -az over ssh {:.2} s", t.as_secs_f64()),
            Err(e) => format!("; over ssh not measured: {e}"),
        };
        (
            format!("local -a {:.2} s for 2 copies{ssh_cell}", two.as_secs_f64()),
            Some(took <= two),
            "not slower than local rsync -a (2 copies)",
        )
    } else {
        ("-".to_string(), None, "not slower than local rsync -a")
    };
    let mut rows = vec![
        Row {
            what: format!(
                "first sync, {} files / {} (spool), 2 followers",
                files.len(),
                human(bytes)
            ),
            clusterd: format!("{:.2} s", took.as_secs_f64()),
            rsync: rsync_cell,
            bar: bar.to_string(),
            met,
        },
        Row {
            what: format!("peak RSS during the first sync, {} files", files.len()),
            clusterd: peaks.show(leader),
            rsync: "-".to_string(),
            bar: "< 256 MiB per node".to_string(),
            met: Some(peaks.max() < 256 * MIB),
        },
    ];

    // Idle.
    c.wait_barrier(leader);
    thread::sleep(SETTLE);
    let window = Duration::from_secs(o.scale_idle_secs);
    let pids: Vec<u32> = ids
        .iter()
        .map(|&id| c.pid(id).expect("node runs"))
        .collect();
    let cpu0: Vec<f64> = pids.iter().map(|&p| cpu_secs(p)).collect();
    let mut idle_peaks = Peaks::new(&ids);
    let t1 = Instant::now();
    while t1.elapsed() < window {
        idle_peaks.sample(&c);
        thread::sleep(Duration::from_secs(1).min(window.saturating_sub(t1.elapsed())));
    }
    idle_peaks.sample(&c);
    let secs = t1.elapsed().as_secs_f64();
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu0)
        .map(|(&p, c0)| (cpu_secs(p) - c0) / secs * 100.0)
        .collect();
    let cpu_cell = ids
        .iter()
        .zip(&cpu)
        .map(|(id, c)| format!("node {id} {c:.2} %"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "idle over {window:?}: {cpu_cell}; peak RSS {}",
        idle_peaks.show(leader)
    );
    rows.push(Row {
        what: format!(
            "idle over {} s, {} files: CPU; peak RSS",
            o.scale_idle_secs,
            files.len()
        ),
        clusterd: format!("{cpu_cell}; {}", idle_peaks.show(leader)),
        rsync: "-".to_string(),
        bar: "< 1 % of a core, < 256 MiB".to_string(),
        met: Some(cpu.iter().all(|&c| c < 1.0) && idle_peaks.max() < 256 * MIB),
    });

    // `clusterctl status`, as an admin runs it.
    let mut took_status: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            c.status_result(leader, STATUS_TIMEOUT)
                .unwrap_or_else(|e| panic!("status: {e}"));
            t.elapsed()
        })
        .collect();
    took_status.sort();
    println!("clusterctl status: {took_status:?}");
    rows.push(Row {
        what: format!("clusterctl status, {} files (median of 5)", files.len()),
        clusterd: ms(took_status[2]),
        rsync: "-".to_string(),
        bar: "-".to_string(),
        met: None,
    });

    // Restart to serving.
    let f = followers[0];
    c.terminate(f, Duration::from_secs(60));
    let t2 = Instant::now();
    c.start_node(f);
    wait_serving(o, &c, leader, f, set, entries);
    let restart = t2.elapsed();
    println!("node {f} restarted to serving in {restart:.2?}");
    rows.push(Row {
        what: format!("restart of a follower to serving, {} files", files.len()),
        clusterd: format!("{:.2} s", restart.as_secs_f64()),
        rsync: "-".to_string(),
        bar: "<= 10 s".to_string(),
        met: Some(restart <= Duration::from_secs(10)),
    });

    // Catch-up after 1 % changed while a follower was down.
    c.kill(f);
    let changed: Vec<&PathBuf> = files.iter().step_by(100).collect();
    let mut changed_bytes = 0;
    let live = [leader, followers[1]];
    for (n, rel) in changed.iter().enumerate() {
        let p = tree.join(rel);
        let len = fs::metadata(&p).unwrap().len();
        // Rewritten in place with new content of the same size, as a mail
        // client rewriting a message's flags would not: the worst case.
        fs::write(&p, PseudoRandom::bytes(0xC0FFEE ^ n as u64, len as usize)).unwrap();
        changed_bytes += len;
    }
    wait_metadata_equal(&c, set, &live, o.deadline);
    wait_trees_equal(&c, set, &live, o.deadline);
    c.wait_barrier(leader);
    let w0 = wire_sent(&c, leader);
    let t3 = Instant::now();
    c.start_node(f);
    wait_serving(o, &c, leader, f, set, entries);
    wait_metadata_equal(&c, set, &ids, o.deadline);
    let caught_up = t3.elapsed();
    let moved = wire_sent(&c, leader).saturating_sub(w0);
    // Idle traffic (heartbeats) over the same duration, not counted.
    let i0 = wire_sent(&c, leader);
    thread::sleep(caught_up.min(Duration::from_secs(30)));
    let idle_bytes = (wire_sent(&c, leader).saturating_sub(i0) as f64 * caught_up.as_secs_f64()
        / caught_up
            .min(Duration::from_secs(30))
            .as_secs_f64()
            .max(0.001)) as u64;
    let net = moved.saturating_sub(idle_bytes);
    wait_trees_equal(&c, set, &ids, o.deadline);
    let ratio = net as f64 / changed_bytes.max(1) as f64;
    println!(
        "catch-up of {} changed files ({}): {} sent ({} gross, {} idle) in {caught_up:.2?}, {ratio:.2} x",
        changed.len(),
        human(changed_bytes),
        human(net),
        human(moved),
        human(idle_bytes)
    );
    rows.push(Row {
        what: format!(
            "catch-up after 1 % changed ({} files, {}), bytes sent",
            changed.len(),
            human(changed_bytes)
        ),
        clusterd: format!(
            "{} ({ratio:.2} x) in {:.2} s",
            human(net),
            caught_up.as_secs_f64()
        ),
        rsync: "-".to_string(),
        bar: "<= 1.2 x the changed bytes".to_string(),
        met: Some(ratio <= 1.2),
    });
    rows
}

/// `wan`: two sites `--rtt-ms` apart (50 unless given) on links of
/// `--link-mbit` each way (every peer link shaped by the harness's
/// proxies): a `--wan-mib` file (256 MiB with `--bench`) written on the
/// leader, timed until both followers hold it; against one TCP stream of
/// the same bytes through a proxy shaped the same, in the same run. Bar:
/// at least 80 % of that stream's rate.
pub(super) fn wan(o: &Opts) -> Vec<Row> {
    let rtt_ms = if o.rtt_ms > 0 { o.rtt_ms } else { 50 };
    let rate = o.link_mbit * 125_000;
    let bytes = o.wan_mib * MIB;
    let single = single_stream(rtt_ms, rate, bytes);
    println!(
        "one TCP stream through a link of {rtt_ms} ms RTT, {} Mbit/s: {} in {single:.2?} ({:.1} MB/s)",
        o.link_mbit,
        human(bytes),
        bytes as f64 / single.as_secs_f64() / 1e6
    );

    let (c, leader, followers) = bench_cluster_of(3, "wan", "mirror", false, None);
    c.wan(rtt_ms, rate);
    let staging = c.node(leader).dir.join("staging-wan");
    fs::create_dir_all(&staging).unwrap();
    append_pseudo_random(&staging.join("backup.tar"), 40, bytes);
    settle_disk();
    let ids = [leader, followers[0], followers[1]];
    let t0 = Instant::now();
    fs::rename(
        staging.join("backup.tar"),
        c.set_path(leader, "wan").join("backup.tar"),
    )
    .unwrap();
    wait_metadata_equal(&c, "wan", &ids, o.deadline);
    let took = t0.elapsed();
    wait_trees_equal(&c, "wan", &ids, o.deadline);
    let share = single.as_secs_f64() / took.as_secs_f64();
    println!(
        "clusterd: {} to both followers in {took:.2?} ({:.1} MB/s each), {:.0} % of one stream",
        human(bytes),
        bytes as f64 / took.as_secs_f64() / 1e6,
        share * 100.0
    );
    vec![Row {
        what: format!(
            "{} file, {rtt_ms} ms RTT, {} Mbit/s links",
            human(bytes),
            o.link_mbit
        ),
        clusterd: format!(
            "{:.2} s to both followers ({:.0} % of one stream)",
            took.as_secs_f64(),
            share * 100.0
        ),
        rsync: format!(
            "one TCP stream through the same shaping: {:.2} s",
            single.as_secs_f64()
        ),
        bar: ">= 80 % of one TCP stream".to_string(),
        met: Some(share >= 0.8),
    }]
}

/// Time to push `bytes` through one TCP connection over a proxy link of
/// `rtt_ms` and `rate` bytes/s, until the receiver has read them all.
fn single_stream(rtt_ms: u64, rate: u64, bytes: u64) -> Duration {
    use std::io::{Read, Write};
    let sink = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = sink.local_addr().unwrap();
    let reader = thread::spawn(move || {
        let (mut conn, _) = sink.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < bytes {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
        }
        (got, Instant::now())
    });
    let mut proxies = harness::proxy::Proxies::new();
    let via = proxies.add_link(1, 2, target);
    proxies.delay(1, 2, rtt_ms / 2);
    proxies.limit(1, 2, rate);
    let mut conn = std::net::TcpStream::connect(via).unwrap();
    let chunk = PseudoRandom::bytes(41, 1 << 20);
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len() as u64) as usize;
        conn.write_all(&chunk[..n]).unwrap();
        sent += n as u64;
    }
    let (got, done) = reader.join().unwrap();
    assert_eq!(got, bytes, "the sink received every byte");
    done - t0
}
