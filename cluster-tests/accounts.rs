//! Account databases (PRODUCT.md "Account databases") on real processes: a
//! `kind = "accounts"` set over a copy of this machine's `/etc/passwd`,
//! `shadow`, `group` and `gshadow` on every node, changed on the leader with
//! the real shadow-utils (`useradd -P <node dir>/sys ...`). Followers show
//! the leader's users and groups in range line for line (password hashes
//! included) and the leader's memberships of them in their own groups, keep
//! their own system accounts byte for byte, refuse (and report) a record
//! that collides with one of them, and never show a user without its shadow
//! entry; a mass removal and a malformed line on the leader hold the set.
//! A user made by hand on a follower is replaced by its next merge, its
//! files copied to quarantine first (and not restorable as files); a
//! rollback of the set brings removed users back on every node, the
//! leader's own files included; a follower SIGKILLed while the leader
//! changes accounts catches up, and `clusterctl sync` returns only once it
//! has; `--check` refuses bad accounts keys one sentence each; a `validate`
//! running `pwck` holds a change pwck refuses.
//!
//! Each node's `<node dir>/sys/etc` is prepared before the node starts: the
//! machine's four files (modes and owners kept), a `sudo` group if the
//! machine has none, and a system user of the node's own, `localsvc<id>`
//! (a free id below 1000, different on each node), so the nodes' files
//! differ as real hosts' do. The `-` backups the preparation leaves are
//! removed, so a backup on a follower is one clusterd made.
//!
//! The tests need the shadow-utils (Debian/Ubuntu package `passwd`) and
//! root (files owned by group `shadow`, `pwck -R`); without them they fail
//! saying so. `pwck`/`grpck` run chrooted into a node's prefix (`-R`): given
//! only file names, `grpck` looks members up in this machine's own
//! databases and would blame every replicated user.
//!
//! As elsewhere: the harness's fast Raft timers, a 20 ms watcher debounce
//! and a 300 s rescan; every wait is `wait_until` with a deadline, every
//! "nothing happens" is `hold_for`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use serde_json::Value;

use crate::harness::tree::*;
use crate::harness::*;

/// The set's name on every node.
const SET: &str = "accounts";
/// `[replication]` of every node in these tests.
const REPLICATION: &str = "[replication]\ndebounce_ms = 20\nrescan_secs = 300";
/// Deadline for a change of the leader's accounts to reach every follower.
const CONVERGE: Duration = Duration::from_secs(30);
/// `uid_range` and `gid_range` of the set (the defaults, written out).
const FIRST_ID: u32 = 1000;
const LAST_ID: u32 = 59999;
/// `include` of the set: replicated whatever their ids.
const INCLUDE: [&str; 1] = ["tac-plus"];
/// The four databases, in the order the tests list them.
const DBS: [&str; 4] = ["passwd", "shadow", "group", "gshadow"];
/// Password hashes set on the leader (`usermod -p`): SHA-512 crypt strings.
const HASH_ALICE: &str = "$6$clusterdAlice$Qm0e8sUPlyXq2yJ1aVtNw9l3Yl1s5tBq0Gm8zUeV7bH4cXkR2dW6fJ9pL0nS3oT5rA7iE1uY8gK2hM4jN6vC.";
const HASH_CAROL: &str = "$6$clusterdCarol$Zx7c6VbN5mL4kJ3hG2fD1sA0pO9iU8yT7rE6wQ5zX4cV3bN2mL1kJ0hG9fD8sA7pO6iU5yT4rE3wQ2zX1cV0b";
/// Programs of the shadow-utils the tests run.
const TOOLS: [&str; 7] = [
    "useradd", "usermod", "userdel", "groupadd", "groupdel", "pwck", "grpck",
];
/// Names and ids the tests give accounts: the machine's databases (copied
/// to every node) must not have them already. Names `cc<n>`, `fo<n>`,
/// `nl<n>` and `mr<n>` too.
const NAMES: [&str; 11] = [
    "alice", "carol", "bob", "dave", "devs", "tac-plus", "legacy2", "mallory", "badline",
    "handmade", LONG_NAME,
];
const NAME_PREFIXES: [&str; 6] = ["cc", "fo", "nl", "mr", "r", "kr"];
const IDS: [(u32, u32); 5] = [
    (1500, 1799),
    (2000, 2199),
    (3000, 3199),
    (4000, 4099),
    (4100, 4199),
];
/// A user name clusterd's parser takes (no blank, colon or comma) but
/// `pwck -r` refuses (longer than 32 characters: "invalid user name", exit
/// 2), so only a validator running `pwck` can stop it. `useradd` refuses it
/// too: the test writes its lines by hand.
const LONG_NAME: &str = "pwckrefusesthisnamebecauseitislongerthan32";

// ---------------------------------------------------------------------------
// The databases as text
// ---------------------------------------------------------------------------

/// One node's four databases, each read once.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Etc {
    passwd: String,
    shadow: String,
    group: String,
    gshadow: String,
}

impl Etc {
    fn read(dir: &Path) -> Result<Etc, String> {
        let read = |f: &str| {
            let p = dir.join(f);
            fs::read_to_string(&p).map_err(|e| format!("read {}: {e}", p.display()))
        };
        Ok(Etc {
            passwd: read("passwd")?,
            shadow: read("shadow")?,
            group: read("group")?,
            gshadow: read("gshadow")?,
        })
    }

    fn file(&self, f: &str) -> &str {
        match f {
            "passwd" => &self.passwd,
            "shadow" => &self.shadow,
            "group" => &self.group,
            "gshadow" => &self.gshadow,
            _ => panic!("no database {f:?}"),
        }
    }

    /// The (first) line of `name` in database `f`.
    fn line(&self, f: &str, name: &str) -> Option<&str> {
        entry_lines(self.file(f)).find(|l| name_of(l) == name)
    }

    fn has_user(&self, name: &str) -> bool {
        self.line("passwd", name).is_some()
    }

    /// The names in field `i` (a comma-separated list) of `name`'s line in `f`.
    fn list(&self, f: &str, name: &str, i: usize) -> BTreeSet<String> {
        self.line(f, name)
            .and_then(|l| field(l, i))
            .unwrap_or("")
            .split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// The lines of a database that are entries: not blank, not comments.
fn entry_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
}

fn field(line: &str, i: usize) -> Option<&str> {
    line.split(':').nth(i)
}

fn name_of(line: &str) -> &str {
    line.split(':').next().unwrap_or("")
}

/// (name, numeric id if it is one, line) of every entry of `passwd` or `group`.
fn with_ids(text: &str) -> impl Iterator<Item = (&str, Option<u32>, &str)> {
    entry_lines(text).map(|l| (name_of(l), field(l, 2).and_then(|s| s.parse().ok()), l))
}

/// Whether the set replicates a user or group: id in range or name included.
fn governed(name: &str, id: Option<u32>) -> bool {
    id.is_some_and(|i| (FIRST_ID..=LAST_ID).contains(&i)) || INCLUDE.contains(&name)
}

/// What the leader governs on a node: its users and groups in range or
/// included, each with its `passwd`/`group` line and its `shadow`/`gshadow` line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Shared {
    users: BTreeMap<String, (String, Option<String>)>,
    groups: BTreeMap<String, (String, Option<String>)>,
}

impl Shared {
    fn of(etc: &Etc) -> Shared {
        let mut s = Shared::default();
        for (name, id, line) in with_ids(&etc.passwd) {
            if governed(name, id) {
                let shadow = etc.line("shadow", name).map(str::to_string);
                s.users.insert(name.to_string(), (line.to_string(), shadow));
            }
        }
        for (name, id, line) in with_ids(&etc.group) {
            if governed(name, id) {
                let gshadow = etc.line("gshadow", name).map(str::to_string);
                s.groups
                    .insert(name.to_string(), (line.to_string(), gshadow));
            }
        }
        s
    }

    /// How this differs from `want` (the leader's), one item per record.
    fn differences(&self, want: &Shared) -> Vec<String> {
        let mut out = Vec::new();
        for (kind, got, want) in [
            ("user", &self.users, &want.users),
            ("group", &self.groups, &want.groups),
        ] {
            for (name, w) in want {
                match got.get(name) {
                    None => out.push(format!("{kind} {name} missing")),
                    Some(g) if g != w => {
                        out.push(format!("{kind} {name} is {g:?}, the leader's {w:?}"))
                    }
                    Some(_) => {}
                }
            }
            for name in got.keys().filter(|n| !want.contains_key(*n)) {
                out.push(format!("{kind} {name} is not the leader's"));
            }
        }
        out
    }
}

/// The memberships of `users` in the node's own groups (those the set does
/// not govern): group -> its `group` members, its `gshadow` administrators
/// and members, each narrowed to `users`.
fn memberships(etc: &Etc, users: &BTreeSet<String>) -> BTreeMap<String, [BTreeSet<String>; 3]> {
    let narrow = |list: BTreeSet<String>| -> BTreeSet<String> {
        list.into_iter().filter(|m| users.contains(m)).collect()
    };
    with_ids(&etc.group)
        .filter(|(name, id, _)| !governed(name, *id))
        .map(|(name, _, _)| {
            (
                name.to_string(),
                [
                    narrow(etc.list("group", name, 3)),
                    narrow(etc.list("gshadow", name, 2)),
                    narrow(etc.list("gshadow", name, 3)),
                ],
            )
        })
        .collect()
}

/// A node's own entries, in file order (one list per database): its users'
/// and groups' lines the set does not govern, with the names in `shared`
/// (replicated users, whose memberships follow the leader's) taken out of
/// the member lists of its groups.
fn own_lines(etc: &Etc, shared: &BTreeSet<String>) -> [Vec<String>; 4] {
    let governed_names = |text: &str| -> BTreeSet<String> {
        with_ids(text)
            .filter(|(n, id, _)| governed(n, *id))
            .map(|(n, _, _)| n.to_string())
            .collect()
    };
    let (users, groups) = (governed_names(&etc.passwd), governed_names(&etc.group));
    let strip = |line: &str, lists: &[usize]| -> String {
        let mut f: Vec<String> = line.split(':').map(str::to_string).collect();
        for &i in lists {
            if let Some(v) = f.get_mut(i) {
                *v = v
                    .split(',')
                    .filter(|m| !m.is_empty() && !shared.contains(*m))
                    .collect::<Vec<_>>()
                    .join(",");
            }
        }
        f.join(":")
    };
    [
        with_ids(&etc.passwd)
            .filter(|(n, id, _)| !governed(n, *id))
            .map(|(_, _, l)| l.to_string())
            .collect(),
        entry_lines(&etc.shadow)
            .filter(|l| !users.contains(name_of(l)))
            .map(str::to_string)
            .collect(),
        with_ids(&etc.group)
            .filter(|(n, id, _)| !governed(n, *id))
            .map(|(_, _, l)| strip(l, &[3]))
            .collect(),
        entry_lines(&etc.gshadow)
            .filter(|l| !groups.contains(name_of(l)))
            .map(|l| strip(l, &[2, 3]))
            .collect(),
    ]
}

/// What breaks the rules every instant of a node's databases must keep:
/// well-formed lines, no name twice in a file, no id twice, and (where the
/// caller read the pair so that it can tell) every `passwd` user in `shadow`
/// and every `group` in `gshadow`. A set of descriptions, so that what a
/// machine's own files already break can be told apart from new breakage.
fn consistency_problems(etc: &Etc, users_paired: bool, groups_paired: bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut names: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (f, fields, id_field) in [
        ("passwd", 7, Some(2)),
        ("shadow", 9, None),
        ("group", 4, Some(2)),
        ("gshadow", 4, None),
    ] {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        let mut ids: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
        for line in entry_lines(etc.file(f)) {
            let parts: Vec<&str> = line.split(':').collect();
            if parts.len() != fields {
                out.insert(format!("{f}: malformed line {line:?}"));
                continue;
            }
            *seen.entry(parts[0]).or_default() += 1;
            if let Some(i) = id_field {
                match parts[i].parse::<u32>() {
                    Ok(id) => ids.entry(id).or_default().push(parts[0]),
                    Err(_) => {
                        out.insert(format!("{f}: malformed id in {line:?}"));
                    }
                }
            }
        }
        for (name, n) in &seen {
            if *n > 1 {
                out.insert(format!("{f}: {name} appears {n} times"));
            }
        }
        for (id, who) in &ids {
            if who.len() > 1 {
                out.insert(format!("{f}: id {id} is used by {}", who.join(", ")));
            }
        }
        names.insert(f, seen.into_keys().collect());
    }
    if users_paired {
        for u in names["passwd"].difference(&names["shadow"]) {
            out.insert(format!("user {u} is in passwd but not in shadow"));
        }
    }
    if groups_paired {
        for g in names["group"].difference(&names["gshadow"]) {
            out.insert(format!("group {g} is in group but not in gshadow"));
        }
    }
    out
}

/// A file's content and what tells its versions apart (inode, size, mtime),
/// read through one open file.
fn read_version(path: &Path) -> Result<((u64, u64, i64, i64), String), String> {
    let mut f = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let m = f
        .metadata()
        .map_err(|e| format!("stat {}: {e}", path.display()))?;
    let mut text = String::new();
    f.read_to_string(&mut text)
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    Ok(((m.ino(), m.size(), m.mtime(), m.mtime_nsec()), text))
}

/// One sample of a node's databases: `passwd` read before and after
/// `shadow` (and `group` around `gshadow`). When both reads of `passwd` are
/// the same version, each of its users was in it the whole time `shadow`
/// was read, so `shadow` must have had it: the returned flags say which
/// pairs were read so (a pair read across a change proves nothing).
fn sample(dir: &Path) -> Result<(Etc, bool, bool), String> {
    let p1 = read_version(&dir.join("passwd"))?;
    let (_, shadow) = read_version(&dir.join("shadow"))?;
    let p2 = read_version(&dir.join("passwd"))?;
    let g1 = read_version(&dir.join("group"))?;
    let (_, gshadow) = read_version(&dir.join("gshadow"))?;
    let g2 = read_version(&dir.join("group"))?;
    let (users_paired, groups_paired) = (p1 == p2, g1 == g2);
    Ok((
        Etc {
            passwd: p2.1,
            shadow,
            group: g2.1,
            gshadow,
        },
        users_paired,
        groups_paired,
    ))
}

/// `text` without the entries named in `names`.
fn without(text: &str, names: &BTreeSet<String>) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if !names.contains(name_of(line)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Files and programs
// ---------------------------------------------------------------------------

/// A set's directory on node `id`: `<node dir>/sys/etc`.
fn etc(c: &Cluster, id: u64) -> PathBuf {
    c.set_path(id, SET)
}

/// The shadow-utils' `--prefix` of node `id`: `<node dir>/sys`.
fn prefix(c: &Cluster, id: u64) -> PathBuf {
    etc(c, id)
        .parent()
        .expect("the set's directory has a parent")
        .to_path_buf()
}

/// (permission bits, owner, group) of `path`.
#[track_caller]
fn owner_mode(path: &Path) -> (u32, u32, u32) {
    let m = fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

/// Where program `prog` of the shadow-utils is; fails the test naming the
/// package otherwise (the tests are not skipped).
#[track_caller]
fn tool(prog: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{prog}` is not installed: the accounts tests change accounts with the real \
                 shadow-utils (Debian/Ubuntu package `passwd`: apt-get install passwd)"
            )
        })
}

/// `prog -P <prefix> args...` (shadow-utils' `--prefix`: the databases in
/// `<prefix>/etc`), retried while something else holds their locks; panics
/// if it fails otherwise.
#[track_caller]
fn shadow_utils(prefix: &Path, prog: &str, args: &[&str]) {
    let exe = tool(prog);
    let what = format!("{prog} -P {} {}", prefix.display(), args.join(" "));
    wait_until(Duration::from_secs(30), &what, || {
        let mut cmd = Command::new(&exe);
        cmd.arg("-P").arg(prefix).args(args).env("LC_ALL", "C");
        let out = run_cmd(cmd, scaled(Duration::from_secs(20)));
        if out.success() {
            return Ok(());
        }
        if out.stderr.contains("lock") || out.stderr.contains("try again") {
            return Err(format!("{what}: {out}"));
        }
        panic!("{what} failed: {out}");
    })
}

/// `pwck -r -q -R <prefix>` and `grpck -r -R <prefix>`: the databases of a
/// node checked read-only, chrooted into its prefix so that members and
/// primary groups are looked up in those files.
fn db_checks(prefix: &Path) -> (CmdOutput, CmdOutput) {
    let run = |prog: &str, args: &[&str]| {
        let mut cmd = Command::new(tool(prog));
        cmd.args(args).arg("-R").arg(prefix).env("LC_ALL", "C");
        run_cmd(cmd, scaled(Duration::from_secs(30)))
    };
    (run("pwck", &["-r", "-q"]), run("grpck", &["-r"]))
}

/// Copies this machine's four databases into `etc`, keeping their modes
/// and owners (shadow is `root:shadow 0640` on Debian).
#[track_caller]
fn copy_system_databases(etc: &Path) {
    fs::create_dir_all(etc).unwrap_or_else(|e| panic!("create {}: {e}", etc.display()));
    for f in DBS {
        let src = Path::new("/etc").join(f);
        let dst = etc.join(f);
        fs::copy(&src, &dst)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
        let (mode, uid, gid) = owner_mode(&src);
        fs::set_permissions(&dst, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dst.display()));
        std::os::unix::fs::chown(&dst, Some(uid), Some(gid)).unwrap_or_else(|e| {
            panic!(
                "chown {} to {uid}:{gid}: {e} (the accounts tests run as root)",
                dst.display()
            )
        });
    }
}

/// A system user of a node's own (`name`, user and group id `id`), added
/// with the shadow-utils before the node starts.
#[track_caller]
fn add_local_user(prefix: &Path, name: &str, id: u32) {
    let id = id.to_string();
    shadow_utils(prefix, "groupadd", &["-r", "-g", &id, name]);
    shadow_utils(
        prefix,
        "useradd",
        &[
            "-r",
            "-M",
            "-u",
            &id,
            "-g",
            &id,
            "-s",
            "/usr/sbin/nologin",
            name,
        ],
    );
}

/// `useradd -M -u <id> -U <name>` on the databases under `prefix`.
#[track_caller]
fn add_user(prefix: &Path, name: &str, id: u32) {
    shadow_utils(
        prefix,
        "useradd",
        &["-M", "-u", &id.to_string(), "-U", name],
    );
}

/// The `<file>.lock` files of the four databases, taken as shadow-utils
/// takes them (created exclusively, holding the taker's pid). While they
/// exist the leader reads nothing, so whatever is written under them
/// reaches it as one change. Removed on drop.
struct DbLocks(Vec<PathBuf>);

impl DbLocks {
    #[track_caller]
    fn take(etc: &Path) -> DbLocks {
        let mut held = DbLocks(Vec::new());
        for f in DBS {
            let lock = etc.join(format!("{f}.lock"));
            wait_until(
                Duration::from_secs(30),
                &format!("to create {}", lock.display()),
                || {
                    let mut file = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&lock)
                        .map_err(|e| format!("{}: {e}", lock.display()))?;
                    file.write_all(std::process::id().to_string().as_bytes())
                        .and_then(|_| file.sync_all())
                        .map_err(|e| format!("write {}: {e}", lock.display()))
                },
            );
            held.0.push(lock);
        }
        held
    }
}

impl Drop for DbLocks {
    fn drop(&mut self) {
        for lock in self.0.iter().rev() {
            let _ = fs::remove_file(lock);
        }
    }
}

/// Replaces `path` as shadow-utils does: `<file>+` written whole with the
/// file's mode and owner, synced, renamed over it.
#[track_caller]
fn replace_file(path: &Path, text: &str) {
    let (mode, uid, gid) = owner_mode(path);
    let name = path.file_name().expect("a file name").to_string_lossy();
    let tmp = path.with_file_name(format!("{name}+"));
    {
        let mut f = File::create(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
        f.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        f.set_permissions(fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", tmp.display()));
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", tmp.display()));
        f.sync_all()
            .unwrap_or_else(|e| panic!("fsync {}: {e}", tmp.display()));
    }
    fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), path.display()));
}

/// Removes the users `names` and their groups of the same names from the
/// databases in `etc` in one go, under the locks: `passwd` and `group`
/// first, then `shadow` and `gshadow` (a removed user leaves `passwd`
/// first), each file replaced whole.
#[track_caller]
fn remove_at_once(etc: &Path, names: &BTreeSet<String>) {
    let _locks = DbLocks::take(etc);
    let now = Etc::read(etc).unwrap_or_else(|e| panic!("{e}"));
    for f in ["passwd", "group", "shadow", "gshadow"] {
        replace_file(&etc.join(f), &without(now.file(f), names));
    }
}

// ---------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------

/// Node `id`'s own entry for set `accounts` in its status.
fn accounts_status(c: &Cluster, id: u64) -> Result<Value, String> {
    set_status(c, id, id, SET)
}

/// `held` of set `accounts` on node `id`: the reason, or `None`.
fn held(c: &Cluster, id: u64) -> Result<Option<String>, String> {
    let s = accounts_status(c, id)?;
    match s.get("held") {
        Some(Value::Null) => Ok(None),
        Some(Value::String(why)) => Ok(Some(why.clone())),
        other => Err(format!(
            "`held` of set {SET} on node {id} is {other:?}: {s}"
        )),
    }
}

/// The record of `kind` ("user"/"group") `name` that node `id` reports it
/// refused: its set shows `refused` > 0 and lists the record in
/// `accounts.refused`.
fn refused(c: &Cluster, id: u64, kind: &str, name: &str) -> Result<Value, String> {
    let s = accounts_status(c, id)?;
    let n = s
        .get("refused")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("node {id}: set {SET} has no numeric `refused`: {s}"))?;
    if n == 0 {
        return Err(format!("node {id} refuses nothing (yet): {s}"));
    }
    let list = s
        .get("accounts")
        .and_then(|a| a.get("refused"))
        .and_then(Value::as_array)
        .ok_or_else(|| format!("node {id}: set {SET} has no `accounts.refused` list: {s}"))?;
    list.iter()
        .find(|r| {
            r.get("kind").and_then(Value::as_str) == Some(kind)
                && r.get("name").and_then(Value::as_str) == Some(name)
        })
        .cloned()
        .ok_or_else(|| format!("node {id} does not list {kind} {name} as refused: {s}"))
}

/// Makes node `want` the leader (handing leadership over from `current`
/// if need be); returns it once every node agrees and a barrier went
/// through it.
#[track_caller]
fn lead(c: &Cluster, current: u64, want: u64) -> u64 {
    if current != want {
        let out = c.promote(current, want);
        assert!(out.success(), "promote {want}: {out}");
    }
    c.wait_for_leader_is(&c.ids(), want);
    c.wait_barrier(want);
    want
}

// ---------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------

/// Ids of the nodes' own system accounts, free in this machine's databases.
struct Locals {
    /// `localsvc<id>` of each node.
    svc: BTreeMap<u64, u32>,
    /// A system user `bob` (collision test, node 3).
    bob: u32,
    /// A system user `legacy2` (collision test, node 2), whose id the
    /// leader's `tac-plus` takes.
    legacy: u32,
}

impl Locals {
    fn pick(system: &Etc) -> Locals {
        let used: BTreeSet<u32> = with_ids(&system.passwd)
            .chain(with_ids(&system.group))
            .filter_map(|(_, id, _)| id)
            .collect();
        let mut free = (150..1000).filter(|i| !used.contains(i));
        let mut next = || {
            free.next()
                .expect("no free system id in 150..999 in this machine's passwd and group")
        };
        let svc = (1..=3).map(|id| (id, next())).collect();
        let bob = next();
        let legacy = next();
        Locals { svc, bob, legacy }
    }
}

#[track_caller]
fn assert_names_free(system: &Etc) {
    for (f, text) in [("passwd", &system.passwd), ("group", &system.group)] {
        for (name, id, line) in with_ids(text) {
            let ours = NAMES.contains(&name)
                || name.starts_with("localsvc")
                || NAME_PREFIXES.iter().any(|p| {
                    name.strip_prefix(p)
                        .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
                });
            let our_id = id.is_some_and(|i| IDS.iter().any(|&(a, b)| (a..=b).contains(&i)));
            assert!(
                !ours && !our_id,
                "this machine's /etc/{f} has {line:?}: the accounts tests create that name or id \
                 on copies of it; run them on a machine without it"
            );
        }
    }
}

/// A three-node cluster with set `accounts` and what each node's databases
/// were when it started.
struct Accounts {
    c: Cluster,
    /// Each node's databases as prepared.
    before: BTreeMap<u64, Etc>,
    /// (mode, owner, group) of each node's databases as prepared, in `DBS` order.
    modes: BTreeMap<u64, [(u32, u32, u32); 4]>,
    /// Exit codes of `pwck` and `grpck` on each node's prepared databases.
    checks: BTreeMap<u64, (Option<i32>, Option<i32>)>,
    locals: Locals,
}

/// The `[[sync]]` table of the set; `{node_dir}` is each node's directory.
/// `max_removed`: `None` leaves the default (20). `extra`: raw lines added
/// to the table (e.g. a `validate` command).
fn set_toml(max_removed: Option<u32>, extra: &str) -> String {
    let mut s = format!(
        "[[sync]]\nname = \"{SET}\"\nkind = \"accounts\"\npath = \"{{node_dir}}/sys/etc\"\n\
         uid_range = \"{FIRST_ID}-{LAST_ID}\"\ngid_range = \"{FIRST_ID}-{LAST_ID}\"\n\
         include = [\"tac-plus\"]\n"
    );
    if let Some(n) = max_removed {
        s.push_str(&format!("max_removed = {n}\n"));
    }
    if !extra.is_empty() {
        s.push_str(extra.trim_end());
        s.push('\n');
    }
    s
}

impl Accounts {
    /// Prepares every node's databases (`local` adds a node's own accounts
    /// with the shadow-utils, given its prefix), then starts the nodes;
    /// returns once they agree on a leader, a barrier went through it and
    /// every node reports the set.
    fn start(max_removed: Option<u32>, local: impl Fn(u64, &Path, &Locals)) -> (Accounts, u64) {
        Accounts::start_with(max_removed, "", |b| b, local)
    }

    /// As `start`, with `set_extra` added to the set's `[[sync]]` table and
    /// `builder` given the cluster's builder before it starts (more sets).
    fn start_with(
        max_removed: Option<u32>,
        set_extra: &str,
        builder: impl FnOnce(ClusterBuilder) -> ClusterBuilder,
        local: impl Fn(u64, &Path, &Locals),
    ) -> (Accounts, u64) {
        assert!(
            is_root(),
            "the accounts tests run as root: they copy /etc/shadow with its owner and run the shadow-utils"
        );
        for t in TOOLS {
            tool(t);
        }
        let system = Etc::read(Path::new("/etc"))
            .unwrap_or_else(|e| panic!("the accounts tests copy this machine's databases: {e}"));
        assert_names_free(&system);
        let locals = Locals::pick(&system);

        let mut b = Cluster::builder(3);
        for id in 1..=3 {
            b = b
                .extra_toml(id, REPLICATION)
                .extra_toml(id, &set_toml(max_removed, set_extra))
                .dont_start(id);
        }
        let c = builder(b).start();
        let (mut before, mut modes, mut checks) =
            (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        for id in c.ids() {
            let (dir, p) = (etc(&c, id), prefix(&c, id));
            copy_system_databases(&dir);
            if system.line("group", "sudo").is_none() {
                shadow_utils(&p, "groupadd", &["-r", "sudo"]);
            }
            add_local_user(&p, &format!("localsvc{id}"), locals.svc[&id]);
            local(id, &p, &locals);
            for f in DBS {
                let _ = fs::remove_file(dir.join(format!("{f}-")));
                assert!(
                    !dir.join(format!("{f}.lock")).exists(),
                    "the preparation left {f}.lock in {}",
                    dir.display()
                );
            }
            before.insert(id, Etc::read(&dir).unwrap());
            modes.insert(id, DBS.map(|f| owner_mode(&dir.join(f))));
            let (pw, gr) = db_checks(&p);
            checks.insert(id, (pw.code, gr.code));
        }
        for id in c.ids() {
            c.start_node(id);
        }
        let all = c.ids();
        let leader = c.wait_for_leader(&all);
        c.wait_barrier(leader);
        wait_sets_ready(&c, &all, &[SET]);
        (
            Accounts {
                c,
                before,
                modes,
                checks,
                locals,
            },
            leader,
        )
    }

    /// Panics unless node `id`'s own entries are as prepared (same lines,
    /// same order; only replicated users' memberships in its groups may have
    /// changed), and none of `leader`'s own entries reached it.
    #[track_caller]
    fn assert_own_entries_kept(&self, leader: u64, id: u64) {
        let c = &self.c;
        let now = Etc::read(&etc(c, id)).unwrap();
        let lead = Etc::read(&etc(c, leader)).unwrap();
        let before = &self.before[&id];
        let mut shared = BTreeSet::new();
        for e in [&lead, before, &now] {
            shared.extend(Shared::of(e).users.into_keys());
        }
        let (want, got) = (own_lines(before, &shared), own_lines(&now, &shared));
        for (i, f) in DBS.iter().enumerate() {
            assert_eq!(
                got[i],
                want[i],
                "node {id}'s own {f} entries changed (as prepared, in order); its {f} is now:\n{}",
                now.file(f)
            );
        }
        let lead_before = &self.before[&leader];
        for (name, gid) in with_ids(&lead_before.passwd)
            .chain(with_ids(&lead_before.group))
            .map(|(n, i, _)| (n, i))
        {
            let theirs_only = !governed(name, gid)
                && before.line("passwd", name).is_none()
                && before.line("group", name).is_none();
            if theirs_only {
                for f in DBS {
                    assert!(
                        now.line(f, name).is_none(),
                        "node {id} got leader {leader}'s own {f} entry {:?}",
                        now.line(f, name)
                    );
                }
            }
        }
    }

    /// Panics unless node `id` wrote its databases as shadow-utils does:
    /// each keeps its mode and owner, has a `-` backup no more readable than
    /// itself, and no lock is left behind.
    #[track_caller]
    fn assert_written_like_shadow_utils(&self, id: u64) {
        let dir = etc(&self.c, id);
        for (i, f) in DBS.iter().enumerate() {
            let now = owner_mode(&dir.join(f));
            assert_eq!(
                now, self.modes[&id][i],
                "node {id}'s {f} keeps its (mode, owner, group)"
            );
            let backup = dir.join(format!("{f}-"));
            assert!(
                backup.is_file(),
                "node {id} keeps a backup {} of {f}",
                backup.display()
            );
            let (bmode, _, bgid) = owner_mode(&backup);
            assert!(
                bmode & !now.0 & 0o777 == 0 && (bmode & 0o070 == 0 || bgid == now.2),
                "node {id}'s {f}- (mode {bmode:04o}, group {bgid}) is more readable than {f} \
                 (mode {:04o}, group {})",
                now.0,
                now.2
            );
            // A merge of a later revision may hold it for a moment: left
            // behind is a lock still there well after that.
            let lock = dir.join(format!("{f}.lock"));
            wait_until(
                Duration::from_secs(20),
                &format!("node {id} to release {f}.lock (not leave it behind)"),
                || match lock.exists() {
                    true => Err(format!("{} exists", lock.display())),
                    false => Ok(()),
                },
            );
        }
    }

    /// Panics unless `pwck` and `grpck` exit on node `id`'s databases as
    /// they did on the prepared ones (0 on a sane machine).
    #[track_caller]
    fn assert_db_checks(&self, id: u64) {
        let (pw, gr) = db_checks(&prefix(&self.c, id));
        let (pw0, gr0) = self.checks[&id];
        assert_eq!(
            pw.code, pw0,
            "pwck -r -q on node {id} exits as on its prepared databases: {pw}"
        );
        assert_eq!(
            gr.code, gr0,
            "grpck -r on node {id} exits as on its prepared databases: {gr}"
        );
    }
}

/// Ok once node `id` shows the users and groups the leader's files govern,
/// line for line, and the leader's memberships of those users in the groups
/// both have of their own.
fn follows(c: &Cluster, leader: u64, id: u64) -> Result<(), String> {
    let l = Etc::read(&etc(c, leader))?;
    let f = Etc::read(&etc(c, id))?;
    let (sl, sf) = (Shared::of(&l), Shared::of(&f));
    let d = sf.differences(&sl);
    if !d.is_empty() {
        let shown: Vec<&String> = d.iter().take(8).collect();
        return Err(format!(
            "node {id} differs from leader {leader} in {} records: {shown:?}",
            d.len()
        ));
    }
    let users: BTreeSet<String> = sl.users.keys().cloned().collect();
    let (ml, mf) = (memberships(&l, &users), memberships(&f, &users));
    for (g, want) in &ml {
        if let Some(got) = mf.get(g) {
            if got != want {
                return Err(format!(
                    "node {id}: replicated members of its group {g} are {got:?} \
                     (group members, gshadow admins, gshadow members), the leader's {want:?}"
                ));
            }
        }
    }
    Ok(())
}

/// Waits until every node of `ids` follows `leader` (see `follows`).
#[track_caller]
fn wait_follow(c: &Cluster, leader: u64, ids: &[u64]) {
    wait_until(
        CONVERGE,
        &format!("nodes {ids:?} to show leader {leader}'s accounts"),
        || {
            for &id in ids {
                c.assert_alive(id);
                follows(c, leader, id)?;
            }
            Ok::<(), String>(())
        },
    )
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn accounts_replicate_users_hashes_and_memberships() {
    let (s, leader) = Accounts::start(None, |_, _, _| {});
    let c = &s.c;
    let followers = c.others(&[leader]);
    let p = prefix(c, leader);
    add_user(&p, "alice", 1500);
    add_user(&p, "carol", 1501);
    shadow_utils(&p, "groupadd", &["-g", "1600", "devs"]);
    shadow_utils(&p, "usermod", &["-a", "-G", "sudo,devs", "alice"]);
    shadow_utils(&p, "usermod", &["-p", HASH_ALICE, "alice"]);
    shadow_utils(&p, "usermod", &["-p", HASH_CAROL, "carol"]);
    // The shadow-utils did what the test means on the leader.
    let l = Etc::read(&etc(c, leader)).unwrap();
    assert_eq!(
        l.line("shadow", "alice").and_then(|x| field(x, 1)),
        Some(HASH_ALICE),
        "{}",
        l.shadow
    );
    for g in ["sudo", "devs"] {
        assert!(l.list("group", g, 3).contains("alice"), "{}", l.group);
    }

    wait_follow(c, leader, &followers);
    for &id in &followers {
        let now = Etc::read(&etc(c, id)).unwrap();
        for (user, hash) in [("alice", HASH_ALICE), ("carol", HASH_CAROL)] {
            assert_eq!(
                now.line("shadow", user).and_then(|x| field(x, 1)),
                Some(hash),
                "node {id}'s shadow:\n{}",
                now.shadow
            );
        }
        assert_eq!(
            now.line("group", "devs").and_then(|x| field(x, 2)),
            Some("1600")
        );
        for g in ["sudo", "devs"] {
            assert!(
                now.list("group", g, 3).contains("alice"),
                "node {id}: alice in group {g}:\n{}",
                now.group
            );
            assert!(
                now.list("gshadow", g, 3).contains("alice"),
                "node {id}: alice in gshadow {g}:\n{}",
                now.gshadow
            );
        }
        s.assert_own_entries_kept(leader, id);
        s.assert_written_like_shadow_utils(id);
        s.assert_db_checks(id);
    }

    // Leaving a group and removing a user follow too.
    shadow_utils(&p, "usermod", &["-G", "devs", "alice"]);
    shadow_utils(&p, "userdel", &["carol"]);
    shadow_utils(&p, "groupdel", &["carol"]);
    wait_follow(c, leader, &followers);
    for &id in &followers {
        let now = Etc::read(&etc(c, id)).unwrap();
        assert!(
            !now.list("group", "sudo", 3).contains("alice")
                && !now.list("gshadow", "sudo", 3).contains("alice"),
            "node {id}: alice left sudo on the leader:\n{}\n{}",
            now.group,
            now.gshadow
        );
        assert!(now.list("group", "devs", 3).contains("alice"));
        for f in DBS {
            assert_eq!(
                now.line(f, "carol"),
                None,
                "node {id}'s {f} still has carol"
            );
        }
        s.assert_own_entries_kept(leader, id);
        s.assert_db_checks(id);
    }
}

#[test]
fn accounts_collision_is_refused_and_reported() {
    let (s, first) = Accounts::start(None, |id, p, locals| match id {
        2 => add_local_user(p, "legacy2", locals.legacy),
        3 => add_local_user(p, "bob", locals.bob),
        _ => {}
    });
    let c = &s.c;
    // Node 1 leads: the entries that collide are nodes 2's and 3's own.
    let leader = lead(c, first, 1);
    let p = prefix(c, leader);
    let t = s.locals.legacy;
    // bob: node 3 has a system user bob with another id. tac-plus (included
    // by name, out of range): node 2's legacy2 has its id.
    add_user(&p, "bob", 1502);
    shadow_utils(&p, "groupadd", &["-g", &t.to_string(), "tac-plus"]);
    shadow_utils(
        &p,
        "useradd",
        &[
            "-M",
            "-u",
            &t.to_string(),
            "-g",
            &t.to_string(),
            "-s",
            "/usr/sbin/nologin",
            "tac-plus",
        ],
    );
    add_user(&p, "dave", 1503);
    let lead_etc = Etc::read(&etc(c, leader)).unwrap();

    // What collides nowhere arrives everywhere, as the leader has it.
    for (id, name) in [(2, "dave"), (3, "dave"), (2, "bob"), (3, "tac-plus")] {
        wait_until(
            CONVERGE,
            &format!("node {id} to get {name} as the leader has it"),
            || {
                let here = Etc::read(&etc(c, id))?;
                for f in DBS {
                    if here.line(f, name) != lead_etc.line(f, name) {
                        return Err(format!(
                            "node {id}'s {f} has {:?}, the leader's {:?}",
                            here.line(f, name),
                            lead_etc.line(f, name)
                        ));
                    }
                }
                Ok(())
            },
        );
    }

    // Node 3 refuses the leader's bob, node 2 the leader's tac-plus.
    for (id, name, rid) in [(3, "bob", 1502), (2, "tac-plus", t)] {
        let rec = wait_until(
            CONVERGE,
            &format!("node {id} to report user {name} refused"),
            || refused(c, id, "user", name),
        );
        assert_eq!(
            rec.get("id").and_then(Value::as_u64),
            Some(u64::from(rid)),
            "node {id}: {rec}"
        );
        assert!(
            rec.get("reason")
                .and_then(Value::as_str)
                .is_some_and(|r| !r.trim().is_empty()),
            "node {id} says why: {rec}"
        );
        let st = accounts_status(c, id).unwrap();
        let acc = &st["accounts"];
        assert!(
            acc.get("users").and_then(Value::as_u64).is_some()
                && acc.get("groups").and_then(Value::as_u64).is_some()
                && acc
                    .get("local_malformed")
                    .and_then(Value::as_array)
                    .is_some(),
            "node {id}'s `accounts` has users, groups and local_malformed: {st}"
        );
        let check = c.ctl(id, &["check"], scaled(Duration::from_secs(10)));
        assert_eq!(check.code, Some(1), "check on node {id} warns: {check}");
        assert!(
            check
                .stdout
                .lines()
                .any(|l| l.contains("WARNING") && l.contains(name)),
            "check on node {id} names {name} in a WARNING line: {check}"
        );
    }

    // The local entries stay byte for byte, and the refused record is
    // nowhere in that node's files.
    let now3 = Etc::read(&etc(c, 3)).unwrap();
    let now2 = Etc::read(&etc(c, 2)).unwrap();
    for f in DBS {
        assert_eq!(
            now3.line(f, "bob"),
            s.before[&3].line(f, "bob"),
            "node 3's own bob in {f}"
        );
        assert_eq!(
            now2.line(f, "legacy2"),
            s.before[&2].line(f, "legacy2"),
            "node 2's own legacy2 in {f}"
        );
        assert_eq!(now2.line(f, "tac-plus"), None, "node 2's {f}");
    }
    assert!(
        with_ids(&now3.passwd).all(|(_, id, _)| id != Some(1502)),
        "node 3 has uid 1502:\n{}",
        now3.passwd
    );
    let users_with_t: Vec<&str> = with_ids(&now2.passwd)
        .filter(|(_, id, _)| *id == Some(t))
        .map(|(n, _, _)| n)
        .collect();
    assert_eq!(users_with_t, ["legacy2"], "node 2's uid {t}");
    for id in [2, 3] {
        s.assert_own_entries_kept(leader, id);
        s.assert_db_checks(id);
    }
    // The leader refuses nothing.
    let st = accounts_status(c, leader).unwrap();
    assert_eq!(
        st.get("refused").and_then(Value::as_u64).unwrap_or(0),
        0,
        "{st}"
    );

    // Node 3 leads: the bob it refused is not removed from the cluster
    // because its own files lack it. Then its own bob is removed there (the
    // collision resolved on the leader): the replicated bob comes into its
    // files, and stays everywhere.
    let leader = lead(c, leader, 3);
    let p3 = prefix(c, 3);
    add_user(&p3, "erin", 1504);
    let bob_1502 = lead_etc.line("passwd", "bob").unwrap().to_string();
    for id in [1, 2] {
        wait_until(
            CONVERGE,
            &format!("node {id} to get erin from node 3"),
            || {
                let here = Etc::read(&etc(c, id))?;
                if !here.has_user("erin") {
                    return Err(format!("node {id} has no erin yet"));
                }
                Ok(())
            },
        );
        let here = Etc::read(&etc(c, id)).unwrap();
        assert_eq!(
            here.line("passwd", "bob"),
            Some(bob_1502.as_str()),
            "node {id} keeps the bob node 3 refused while node 3 leads"
        );
    }
    // (With --prefix, userdel leaves the user's group behind; it would
    // still collide with the replicated group bob.)
    shadow_utils(&p3, "userdel", &["bob"]);
    shadow_utils(&p3, "groupdel", &["bob"]);
    wait_until(
        CONVERGE,
        "node 3, leading, to take in the bob it no longer collides with",
        || {
            let here = Etc::read(&etc(c, 3))?;
            match here.line("passwd", "bob") {
                Some(l) if l == bob_1502 => Ok(()),
                other => Err(format!("node 3's bob is {other:?}")),
            }
        },
    );
    add_user(&p3, "frank", 1505);
    wait_until(CONVERGE, "frank on nodes 1 and 2, bob 1502 kept", || {
        for id in [1, 2] {
            let here = Etc::read(&etc(c, id))?;
            if !here.has_user("frank") {
                return Err(format!("node {id} has no frank yet"));
            }
            if here.line("passwd", "bob") != Some(bob_1502.as_str()) {
                return Err(format!(
                    "node {id}'s bob is {:?}",
                    here.line("passwd", "bob")
                ));
            }
        }
        Ok(())
    });
    let _ = leader;
}

/// What the sampler saw of one follower.
#[derive(Debug, Default)]
struct Sampled {
    samples: usize,
    /// Samples whose `passwd`/`shadow` and `group`/`gshadow` pairs were
    /// both read around an unchanged first file.
    paired: usize,
    /// Distinct numbers of the test's users seen.
    counts: BTreeSet<usize>,
}

/// Sets the flag when dropped (also when the test panics), so that the
/// sampler thread ends and the scope can join it.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Samples every follower's databases about every 20 ms until `stop`,
/// checking each sample against `consistency_problems` (less what the
/// node's prepared files already broke). The first violation is put in
/// `violation` and ends the sampling.
fn sample_followers(
    targets: &[(u64, PathBuf, BTreeSet<String>)],
    stop: &AtomicBool,
    violation: &Mutex<Option<String>>,
) -> BTreeMap<u64, Sampled> {
    let mut seen: BTreeMap<u64, Sampled> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        for (id, dir, known) in targets {
            let st = seen.entry(*id).or_default();
            let problem = match sample(dir) {
                Ok((etc, users_paired, groups_paired)) => {
                    let new: Vec<String> = consistency_problems(&etc, users_paired, groups_paired)
                        .difference(known)
                        .cloned()
                        .collect();
                    st.samples += 1;
                    if users_paired && groups_paired {
                        st.paired += 1;
                    }
                    st.counts.insert(
                        with_ids(&etc.passwd)
                            .filter(|(n, _, _)| n.starts_with("cc"))
                            .count(),
                    );
                    (!new.is_empty()).then(|| new.join("; "))
                }
                Err(e) => Some(e),
            };
            if let Some(p) = problem {
                *violation.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("node {id}, sample {}: {p}", st.samples));
                stop.store(true, Ordering::SeqCst);
                return seen;
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    seen
}

#[test]
fn accounts_consistent_at_every_sample_while_200_users_come_and_go() {
    // Removals may reach the leader batched by its debounce: this test is
    // about consistency, not the max_removed hold.
    let (s, leader) = Accounts::start(Some(1000), |_, _, _| {});
    let c = &s.c;
    let followers = c.others(&[leader]);
    let p = prefix(c, leader);
    let name = |i: u32| format!("cc{i:03}");
    let targets: Vec<(u64, PathBuf, BTreeSet<String>)> = followers
        .iter()
        .map(|&id| {
            (
                id,
                etc(c, id),
                consistency_problems(&s.before[&id], true, true),
            )
        })
        .collect();
    let stop = AtomicBool::new(false);
    let violation: Mutex<Option<String>> = Mutex::new(None);
    let fail_fast = || {
        let v = violation.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(v) = v {
            panic!("a follower showed an inconsistent instant: {v}");
        }
    };
    let seen = thread::scope(|scope| {
        let sampler = scope.spawn(|| sample_followers(&targets, &stop, &violation));
        let guard = StopOnDrop(&stop);
        for i in 0..200 {
            add_user(&p, &name(i), 2000 + i);
            fail_fast();
        }
        for i in (0..200).step_by(2) {
            shadow_utils(&p, "userdel", &[&name(i)]);
            shadow_utils(&p, "groupdel", &[&name(i)]);
            fail_fast();
        }
        wait_until(
            CONVERGE,
            &format!("followers {followers:?} to show the leader's accounts"),
            || {
                fail_fast();
                for &id in &followers {
                    follows(c, leader, id)?;
                }
                Ok::<(), String>(())
            },
        );
        drop(guard);
        sampler.join().expect("the sampler thread")
    });
    fail_fast();
    for (id, st) in &seen {
        eprintln!(
            "node {id}: {} samples, {} with both pairs read around an unchanged file, \
             {} distinct numbers of test users seen",
            st.samples,
            st.paired,
            st.counts.len()
        );
    }
    for &id in &followers {
        let st = &seen[&id];
        assert!(
            st.paired >= 20,
            "node {id}: only {} of {} samples read each pair around an unchanged file",
            st.paired,
            st.samples
        );
        let now = Etc::read(&etc(c, id)).unwrap();
        for i in 0..200 {
            assert_eq!(
                now.has_user(&name(i)),
                i % 2 == 1,
                "node {id} and user {}",
                name(i)
            );
        }
        s.assert_own_entries_kept(leader, id);
        s.assert_db_checks(id);
    }
}

#[test]
fn accounts_failover_in_the_middle_converges() {
    let (s, old) = Accounts::start(None, |_, _, _| {});
    let c = &s.c;
    let p_old = prefix(c, old);
    for i in 0..50 {
        if i == 25 {
            c.kill(old);
        }
        // After the kill: edits on a dead leader's disk, never proposed.
        add_user(&p_old, &format!("fo{i:02}"), 3000 + i);
    }
    let rest = c.others(&[old]);
    let new = c.wait_for_leader(&rest);
    c.wait_barrier(new);
    // What the new leader holds of the old leader's users was committed.
    let at_new = Etc::read(&etc(c, new)).unwrap();
    let kept: Vec<String> = (0..50)
        .map(|i| format!("fo{i:02}"))
        .filter(|n| at_new.has_user(n))
        .collect();
    eprintln!(
        "node {new} leads after node {old} died, with {} of its 50 users",
        kept.len()
    );
    let p_new = prefix(c, new);
    for i in 0..10 {
        add_user(&p_new, &format!("nl{i}"), 3100 + i);
    }
    c.start_node(old);
    let all = c.ids();
    let leader = wait_until(
        CONVERGE * 2,
        "every node to show the same accounts as the leader, the 10 new users included",
        || {
            let l = c.leader_agreement(&all)?;
            let le = Etc::read(&etc(c, l))?;
            if let Some(i) = (0..10).find(|i| !le.has_user(&format!("nl{i}"))) {
                return Err(format!("leader {l} has no nl{i}"));
            }
            for id in c.others(&[l]) {
                follows(c, l, id)?;
            }
            Ok::<u64, String>(l)
        },
    );
    for id in all {
        let now = Etc::read(&etc(c, id)).unwrap();
        for n in &kept {
            assert!(
                now.has_user(n),
                "node {id} lost {n}, committed before the failover"
            );
        }
        s.assert_own_entries_kept(leader, id);
        s.assert_db_checks(id);
    }
}

#[test]
fn accounts_mass_removal_is_held_until_confirmed() {
    let (s, leader) = Accounts::start(None, |_, _, _| {});
    let c = &s.c;
    let followers = c.others(&[leader]);
    let dir = etc(c, leader);
    let p = prefix(c, leader);
    let name = |i: u32| format!("mr{i:02}");
    for i in 0..30 {
        add_user(&p, &name(i), 4000 + i);
    }
    wait_follow(c, leader, &followers);
    // A few removals travel as usual.
    for i in 0..3 {
        shadow_utils(&p, "userdel", &[&name(i)]);
    }
    wait_follow(c, leader, &followers);
    assert_eq!(held(c, leader).unwrap(), None);

    // 25 users (and their groups) at once: more than max_removed (20).
    let gone: BTreeSet<String> = (3..28).map(name).collect();
    remove_at_once(&dir, &gone);
    let why = wait_until(CONVERGE, "the leader to hold set accounts", || {
        held(c, leader)?.ok_or_else(|| "not held yet".to_string())
    });
    assert!(
        why.contains("max_removed"),
        "held names max_removed: {why:?}"
    );
    c.wait_barrier(leader);
    hold_for(
        Duration::from_millis(1500),
        "followers keep the 25 users",
        || {
            for &id in &followers {
                let now = Etc::read(&etc(c, id))?;
                for n in &gone {
                    if !now.has_user(n) || now.line("shadow", n).is_none() {
                        return Err(format!("node {id} lost {n}"));
                    }
                }
            }
            Ok(())
        },
    );
    let check = c.ctl(leader, &["check"], scaled(Duration::from_secs(10)));
    assert_eq!(check.code, Some(1), "check warns of the held set: {check}");

    // Confirmed, the removal travels; sync returns once it is applied.
    let out = c.ctl(leader, &["sync", SET, "--confirm"], Duration::from_secs(70));
    assert!(out.success(), "sync {SET} --confirm: {out}");
    for &id in &followers {
        let now = Etc::read(&etc(c, id)).unwrap();
        for n in &gone {
            for f in DBS {
                assert_eq!(
                    now.line(f, n),
                    None,
                    "node {id}'s {f} still has {n} once sync --confirm returned"
                );
            }
        }
    }
    wait_follow(c, leader, &followers);
    for &id in &followers {
        let now = Etc::read(&etc(c, id)).unwrap();
        assert!(now.has_user(&name(28)) && now.has_user(&name(29)));
        s.assert_own_entries_kept(leader, id);
        s.assert_db_checks(id);
    }
    wait_until(CONVERGE, "the hold to end", || match held(c, leader)? {
        None => Ok(()),
        Some(why) => Err(format!("still held: {why}")),
    });
}

#[test]
fn accounts_malformed_leader_line_holds_the_set() {
    let (s, leader) = Accounts::start(None, |_, _, _| {});
    let c = &s.c;
    let followers = c.others(&[leader]);
    let dir = etc(c, leader);
    let p = prefix(c, leader);
    let passwd = dir.join("passwd");
    let line_no = fs::read_to_string(&passwd).unwrap().lines().count() + 1;
    // The bad line first, then a user: nothing of either may travel.
    let mut f = OpenOptions::new().append(true).open(&passwd).unwrap();
    f.write_all(b"badline:x:notanumber:1000::/:/bin/sh\n")
        .unwrap();
    drop(f);
    add_user(&p, "mallory", 1510);
    let why = wait_until(CONVERGE, "the leader to hold set accounts", || {
        held(c, leader)?.ok_or_else(|| "not held yet".to_string())
    });
    let names_line = why
        .split(|ch: char| !ch.is_ascii_digit())
        .any(|n| n == line_no.to_string());
    assert!(
        why.contains("passwd") && names_line && why.contains("notanumber"),
        "held names passwd, line {line_no} and what is wrong there: {why:?}"
    );
    c.wait_barrier(leader);
    hold_for(
        Duration::from_millis(1500),
        "nothing of the held change reaches a follower",
        || {
            for &id in &followers {
                let now = Etc::read(&etc(c, id))?;
                for f in DBS {
                    for n in ["mallory", "badline"] {
                        if now.line(f, n).is_some() {
                            return Err(format!("node {id}'s {f} has {n}"));
                        }
                    }
                }
            }
            Ok(())
        },
    );

    // Fixing the line lets the change travel.
    {
        let _locks = DbLocks::take(&dir);
        let text = fs::read_to_string(&passwd).unwrap();
        replace_file(
            &passwd,
            &without(&text, &BTreeSet::from(["badline".to_string()])),
        );
    }
    wait_follow(c, leader, &followers);
    for &id in &followers {
        let now = Etc::read(&etc(c, id)).unwrap();
        let lead_etc = Etc::read(&dir).unwrap();
        for f in DBS {
            assert_eq!(
                now.line(f, "mallory"),
                lead_etc.line(f, "mallory"),
                "node {id}'s {f}"
            );
            assert_eq!(now.line(f, "badline"), None, "node {id}'s {f}");
        }
        s.assert_own_entries_kept(leader, id);
        s.assert_db_checks(id);
    }
    wait_until(CONVERGE, "the hold to end", || match held(c, leader)? {
        None => Ok(()),
        Some(why) => Err(format!("still held: {why}")),
    });
}

// ---------------------------------------------------------------------------
// Edits on a follower, going back, restarts, configuration, validation
// ---------------------------------------------------------------------------

/// Timeout of a `clusterctl` call that answers at once.
const CTL: Duration = Duration::from_secs(10);
/// Timeout of a `clusterctl` call that waits for every node (`sync`,
/// `rollback`): above their own 60 s default, so they answer first.
const CTL_WAIT: Duration = Duration::from_secs(70);

/// Node `id`'s history of the set, newest first.
fn accounts_history(c: &Cluster, id: u64) -> Result<Vec<Value>, String> {
    let out = c.ctl(id, &["history", SET, "--limit", "0", "--json"], CTL);
    if !out.success() {
        return Err(format!("history on node {id}: {out}"));
    }
    serde_json::from_str::<Value>(&out.stdout)
        .map_err(|e| format!("history on node {id} is not JSON ({e}): {out}"))?
        .as_array()
        .cloned()
        .ok_or_else(|| format!("history on node {id} is not an array: {out}"))
}

/// Whether any of the four databases of `etc` has an entry named `name`.
fn anywhere(etc: &Etc, name: &str) -> Option<&'static str> {
    DBS.into_iter().find(|f| etc.line(f, name).is_some())
}

/// Appends `line` to the database `f` in `etc` as shadow-utils would
/// (the file replaced whole, mode and owner kept); the caller holds the
/// locks.
#[track_caller]
fn append_line(etc: &Path, f: &str, line: &str) {
    let path = etc.join(f);
    let mut text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(line);
    text.push('\n');
    replace_file(&path, &text);
}

#[test]
fn accounts_follower_hand_edit_is_replaced_and_kept_in_quarantine() {
    let (s, leader) = Accounts::start(None, |_, _, _| {});
    let c = &s.c;
    let followers = c.others(&[leader]);
    let f = followers[0];
    // A committed user, merged everywhere: the follower has merged once.
    add_user(&prefix(c, leader), "alice", 1500);
    wait_follow(c, leader, &followers);
    let before = conflict_records(c, f).unwrap();
    assert!(
        before.iter().all(|r| r["set"] != SET),
        "node {f} quarantined accounts before the hand edit: {before:?}"
    );

    // A user in range added by hand on the follower.
    shadow_utils(&prefix(c, f), "useradd", &["-M", "-u", "1700", "handmade"]);
    let merged = wait_until(
        CONVERGE,
        &format!("node {f}'s next merge to remove handmade"),
        || {
            let now = Etc::read(&etc(c, f))?;
            if let Some(db) = anywhere(&now, "handmade") {
                return Err(format!("node {f}'s {db} still has handmade"));
            }
            Ok::<Etc, String>(now)
        },
    );
    // The copies were taken before the merge replaced the entries: by now
    // they are listed.
    let records: Vec<Value> = conflict_records(c, f)
        .unwrap()
        .into_iter()
        .filter(|r| r["set"] == SET)
        .collect();
    let passwd: Vec<&Value> = records.iter().filter(|r| r["path"] == "passwd").collect();
    assert_eq!(
        passwd.len(),
        1,
        "node {f} lists one quarantined passwd of set {SET}: {records:?}"
    );
    let rec = passwd[0];
    assert!(
        rec["reason"]
            .as_str()
            .is_some_and(|why| why.contains("handmade")),
        "the record says whose entries were never committed: {rec}"
    );
    // The four files of that merge, copied whole into one directory.
    let copy_dir = |r: &Value| -> Option<PathBuf> {
        Some(Path::new(r["stored_at"].as_str()?).parent()?.to_path_buf())
    };
    let q = c.node(f).data_dir.join("quarantine");
    for db in DBS {
        let record = records
            .iter()
            .find(|r| r["path"] == db && copy_dir(r) == copy_dir(rec))
            .unwrap_or_else(|| panic!("node {f} quarantined no {db} with its passwd: {records:?}"));
        let stored = q.join(record["stored_at"].as_str().unwrap());
        let text = fs::read_to_string(&stored)
            .unwrap_or_else(|e| panic!("read {}: {e}", stored.display()));
        if ["passwd", "shadow"].contains(&db) {
            assert!(
                entry_lines(&text).any(|l| name_of(l) == "handmade"),
                "node {f}'s quarantined {db} ({}) holds handmade:\n{text}",
                stored.display()
            );
        }
        assert!(
            entry_lines(&text).any(|l| name_of(l) == "root"),
            "node {f}'s quarantined {db} ({}) is the whole file:\n{text}",
            stored.display()
        );
    }

    // Restoring the copy is refused: the account is to be made on the leader.
    let id = rec["id"].as_str().expect("records have an id");
    let restore = c.ctl(f, &["conflicts", "restore", id], CTL_WAIT);
    assert!(!restore.success(), "restore of {id}: {restore}");
    assert!(
        restore.stderr.contains("recreate") && restore.stderr.contains("leader"),
        "restore of {id} says to recreate the account on the leader: {restore}"
    );
    c.wait_barrier(leader);
    for id in c.ids() {
        let now = Etc::read(&etc(c, id)).unwrap();
        assert_eq!(anywhere(&now, "handmade"), None, "node {id} has handmade");
    }
    assert!(
        conflict_records(c, f)
            .unwrap()
            .iter()
            .any(|r| r["id"] == rec["id"]),
        "the refused restore keeps the copy listed on node {f}"
    );

    // The follower shows the leader's accounts and keeps its own.
    assert_eq!(
        Etc::read(&etc(c, f)).unwrap().passwd,
        merged.passwd,
        "node {f}'s passwd changed after the merge"
    );
    wait_follow(c, leader, &followers);
    for &id in &followers {
        s.assert_own_entries_kept(leader, id);
        s.assert_db_checks(id);
    }
}

#[test]
fn accounts_rollback_restores_removed_users_on_every_node_including_the_leader() {
    let (s, leader) = Accounts::start(None, |_, _, _| {});
    let c = &s.c;
    let all = c.ids();
    let followers = c.others(&[leader]);
    let p = prefix(c, leader);
    for (i, n) in ["r1", "r2", "r3"].into_iter().enumerate() {
        add_user(&p, n, 1710 + i as u32);
    }
    wait_follow(c, leader, &followers);
    let at_leader = Etc::read(&etc(c, leader)).unwrap();
    let r2_passwd = at_leader.line("passwd", "r2").unwrap().to_string();
    let r2_shadow = at_leader.line("shadow", "r2").unwrap().to_string();
    // The newest revision holds the three users (the followers merged it).
    let rev = accounts_history(c, leader).unwrap()[0]["revision"]
        .as_u64()
        .expect("revisions are numbers");
    let rev_s = rev.to_string();
    let shown = c.ctl(leader, &["show", SET, "passwd", "--at", &rev_s], CTL);
    assert!(
        shown.success() && shown.stdout.lines().any(|l| l == r2_passwd),
        "revision {rev}'s passwd holds r2: {shown}"
    );

    shadow_utils(&p, "userdel", &["r2"]);
    wait_follow(c, leader, &followers);
    // A follower's merge takes a removed user out of passwd first, then
    // out of shadow.
    wait_until(CONVERGE, "r2 gone from every node", || {
        for &id in &all {
            let now = Etc::read(&etc(c, id))?;
            for db in ["passwd", "shadow"] {
                if now.line(db, "r2").is_some() {
                    return Err(format!("node {id}'s {db} still has r2"));
                }
            }
        }
        Ok(())
    });

    // The diff since that revision shows r2's line taken out.
    let diff = c.ctl(
        followers[0],
        &["diff", SET, "passwd", "--from", &rev_s],
        CTL,
    );
    assert!(diff.success(), "{diff}");
    assert!(
        diff.stdout.lines().any(|l| l == format!("-{r2_passwd}")),
        "the diff from revision {rev} shows r2 removed: {diff}"
    );

    // Rolled back from a follower: r2 is back everywhere, in the leader's
    // own files too, with its shadow line as it was.
    let out = c.ctl(followers[1], &["rollback", SET, "--to", &rev_s], CTL_WAIT);
    assert!(out.success(), "rollback {SET} --to {rev}: {out}");
    let r2_everywhere = |what: &str| {
        wait_until(CONVERGE, &format!("r2 back on every node {what}"), || {
            for &id in &all {
                let now = Etc::read(&etc(c, id))?;
                for (db, want) in [("passwd", &r2_passwd), ("shadow", &r2_shadow)] {
                    if now.line(db, "r2") != Some(want.as_str()) {
                        return Err(format!(
                            "node {id}'s {db} has {:?} for r2, not {want:?}",
                            now.line(db, "r2")
                        ));
                    }
                }
            }
            Ok(())
        })
    };
    r2_everywhere("after the rollback");

    // A later useradd on the leader starts from it: r2 stays.
    add_user(&p, "r4", 1713);
    wait_until(CONVERGE, "r4 on every node", || {
        for &id in &all {
            if !Etc::read(&etc(c, id))?.has_user("r4") {
                return Err(format!("node {id} has no r4"));
            }
        }
        Ok(())
    });
    wait_follow(c, leader, &followers);
    r2_everywhere("after a later useradd on the leader");
    let newest = accounts_history(c, leader).unwrap()[0]["revision"]
        .as_u64()
        .unwrap();
    let shown = c.ctl(
        followers[0],
        &["show", SET, "passwd", "--at", &newest.to_string()],
        CTL,
    );
    assert!(
        shown.success() && shown.stdout.lines().any(|l| l == r2_passwd),
        "the newest revision {newest} holds r2: {shown}"
    );
    for &id in &followers {
        s.assert_own_entries_kept(leader, id);
        s.assert_db_checks(id);
    }
}

#[test]
fn accounts_follower_killed_and_restarted_catches_up() {
    let (s, first) = Accounts::start(None, |_, _, _| {});
    let c = &s.c;
    let f = c.others(&[first])[1];
    let p = prefix(c, first);
    let name = |i: u32| format!("kr{i:02}");
    for i in 0..2 {
        add_user(&p, &name(i), 4100 + i);
    }
    wait_follow(c, first, &c.others(&[first]));

    c.kill(f);
    for i in 2..22 {
        add_user(&p, &name(i), 4100 + i);
    }
    for i in 0..2 {
        shadow_utils(&p, "userdel", &[&name(i)]);
    }
    c.start_node(f);
    let all = c.ids();
    let leader = c.wait_for_leader(&all);
    wait_until(
        CONVERGE,
        &format!("leader {leader} to reach node {f} again"),
        || match c.view(leader)?.reachable(f) {
            Some(true) => Ok(()),
            other => Err(format!("node {f} reachable from {leader}: {other:?}")),
        },
    );

    // sync returns once every node merged: the follower already holds
    // the leader's accounts when it does.
    let out = c.ctl(leader, &["sync", SET], CTL_WAIT);
    assert!(out.success(), "sync {SET}: {out}");
    let now = Etc::read(&etc(c, f)).unwrap();
    for i in 0..22 {
        assert_eq!(
            now.has_user(&name(i)) && now.line("shadow", &name(i)).is_some(),
            i >= 2,
            "node {f} and user {} once sync returned ({out})",
            name(i)
        );
    }
    if let Err(e) = follows(c, leader, f) {
        panic!("once sync returned ({out}): {e}");
    }
    // What it removed was committed before it stopped: nothing was
    // quarantined.
    let copies: Vec<Value> = conflict_records(c, f)
        .unwrap()
        .into_iter()
        .filter(|r| r["set"] == SET)
        .collect();
    assert!(
        copies.is_empty(),
        "node {f} quarantined committed accounts on catching up: {copies:?}"
    );
    for id in c.others(&[leader]) {
        s.assert_own_entries_kept(leader, id);
        s.assert_written_like_shadow_utils(id);
        s.assert_db_checks(id);
    }
}

#[test]
fn accounts_config_refusals() {
    assert!(is_root(), "the accounts tests run as root");
    let dir = short_tempdir("clusterd-accounts-check-");
    let root = dir.path();
    let certs = root.join("certs");
    certs_init(&certs, &[1, 2, 3]);
    let data_dir = root.join("data");
    let dbs = root.join("etc");
    copy_system_databases(&dbs);
    let empty = root.join("empty");
    let plain = root.join("plain");
    for d in [&data_dir, &empty, &plain] {
        fs::create_dir_all(d).unwrap();
    }
    let base = NodeConfig {
        id: 1,
        listen: format!("127.0.0.1:{}", free_port()),
        data_dir,
        admin_socket: root.join("admin.sock"),
        timers: Some((HEARTBEAT_MS, ELECTION_TIMEOUT_MS)),
        tls: TlsFiles::in_dir(&certs, 1),
        peers: vec![
            (2, format!("127.0.0.1:{}", free_port())),
            (3, format!("127.0.0.1:{}", free_port())),
        ],
        witness_peers: vec![],
        node_extra: vec![],
        tls_extra: vec![],
        extra: String::new(),
    };
    let accounts_set = |path: &Path, lines: &str| {
        format!(
            "[[sync]]\nname = \"{SET}\"\nkind = \"accounts\"\npath = {}\n{lines}\n",
            toml_str(path.to_str().unwrap())
        )
    };
    let check = |name: &str, extra: String| -> (PathBuf, CmdOutput) {
        let cfg = NodeConfig {
            extra,
            ..base.clone()
        };
        let path = root.join(format!("{name}.toml"));
        cfg.write(&path);
        let out = check_config(&path);
        assert!(!out.timed_out, "--check of {name} exits at once: {out}");
        (path, out)
    };

    let good = accounts_set(
        &dbs,
        "uid_range = \"1000-59999\"\ngid_range = \"1000-59999\"\ninclude = [\"tac-plus\"]\nmax_removed = 20",
    );
    let (_, out) = check("good", good);
    assert!(out.success(), "a valid accounts set passes --check: {out}");

    let bad: [(&str, String, &str); 5] = [
        (
            "exclude",
            accounts_set(&dbs, "exclude = [\"*.bak\"]"),
            "exclude",
        ),
        (
            "reversed-range",
            accounts_set(&dbs, "uid_range = \"59999-1000\""),
            "uid_range",
        ),
        (
            "range-on-plain-set",
            format!(
                "[[sync]]\nname = \"plain\"\npath = {}\nuid_range = \"1000-59999\"\n",
                toml_str(plain.to_str().unwrap())
            ),
            "uid_range",
        ),
        ("no-passwd", accounts_set(&empty, ""), "path"),
        (
            "bad-include",
            accounts_set(&dbs, "include = [\"bad name\"]"),
            "include",
        ),
    ];
    for (name, extra, key) in bad {
        let (path, out) = check(name, extra);
        assert!(!out.success(), "--check refuses {name}: {out}");
        let problems: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.contains(path.to_str().unwrap()))
            .collect();
        assert_eq!(
            problems.len(),
            1,
            "--check of {name} gives one problem: {out}"
        );
        assert!(
            problems[0].contains(&format!(".{key}`")),
            "--check of {name} names key {key}: {out}"
        );
        eprintln!("{name}: {}", problems[0]);
        if name == "no-passwd" {
            assert!(problems[0].contains("passwd"), "{out}");
        }
    }

    // `sync --confirm` wants an accounts set.
    let (s, leader) = Accounts::start_with(
        None,
        "",
        |b| b.sync_set("plain", "mirror", ""),
        |_, _, _| {},
    );
    let c = &s.c;
    wait_sets_ready(c, &c.ids(), &["plain"]);
    let follower = c.others(&[leader])[0];
    let no_set = c.ctl(leader, &["sync", "--confirm"], CTL);
    assert!(
        !no_set.success() && no_set.stderr.contains("<SET>"),
        "sync --confirm without a set names what is missing: {no_set}"
    );
    for id in [leader, follower] {
        let out = c.ctl(id, &["sync", "plain", "--confirm"], CTL_WAIT);
        assert!(
            !out.success()
                && out.stderr.contains("accounts sets only")
                && out.stderr.contains("plain"),
            "sync plain --confirm via node {id} says --confirm is for accounts sets: {out}"
        );
    }
}

#[test]
fn accounts_validate_with_pwck_holds_a_bad_change() {
    let (s, leader) = Accounts::start_with(
        None,
        "validate = \"pwck -r -q {}/passwd {}/shadow\"",
        |b| b,
        |_, _, _| {},
    );
    let c = &s.c;
    let followers = c.others(&[leader]);
    let dir = etc(c, leader);
    let p = prefix(c, leader);
    add_user(&p, "alice", 1500);
    wait_follow(c, leader, &followers);
    wait_until(
        CONVERGE,
        "the set not held after a normal add",
        || match held(c, leader)? {
            None => Ok(()),
            Some(why) => Err(format!("held: {why}")),
        },
    );

    // A user pwck refuses (its name is too long) that clusterd's own
    // parser takes: written by hand under the locks, shadow first.
    let bad_passwd = format!("{LONG_NAME}:x:1530:1500::/nonexistent:/usr/sbin/nologin");
    let bad_shadow = format!("{LONG_NAME}:!:20000:0:99999:7:::");
    {
        let _locks = DbLocks::take(&dir);
        append_line(&dir, "shadow", &bad_shadow);
        append_line(&dir, "passwd", &bad_passwd);
    }
    // Held by the validator, saying what pwck said of the user.
    wait_until(
        CONVERGE,
        "the leader to hold set accounts, naming the user pwck refuses",
        || match held(c, leader)? {
            Some(why) if why.contains("validator") && why.contains(LONG_NAME) => Ok(()),
            other => Err(format!("held: {other:?}")),
        },
    );
    c.wait_barrier(leader);
    hold_for(
        Duration::from_millis(1500),
        "the held user reaches no follower and the set stays held",
        || {
            for &id in &followers {
                let now = Etc::read(&etc(c, id))?;
                if let Some(db) = anywhere(&now, LONG_NAME) {
                    return Err(format!("node {id}'s {db} has {LONG_NAME}"));
                }
            }
            match held(c, leader)? {
                Some(_) => Ok(()),
                None => Err("the hold ended".to_string()),
            }
        },
    );

    // Taking the user out again lets the next change go.
    remove_at_once(&dir, &BTreeSet::from([LONG_NAME.to_string()]));
    add_user(&p, "carol", 1501);
    wait_follow(c, leader, &followers);
    wait_until(CONVERGE, "the hold to end", || match held(c, leader)? {
        None => Ok(()),
        Some(why) => Err(format!("still held: {why}")),
    });
    for &id in &followers {
        let now = Etc::read(&etc(c, id)).unwrap();
        assert!(now.has_user("carol") && now.has_user("alice"), "node {id}");
        assert_eq!(anywhere(&now, LONG_NAME), None, "node {id}");
        s.assert_own_entries_kept(leader, id);
        s.assert_db_checks(id);
    }
}
