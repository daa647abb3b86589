//! The records an accounts set replicates, read from the leader's files
//! ([`Records::extract`]), and the committed *view* they travel as: five
//! small text files (`passwd`, `shadow`, `group`, `gshadow`, `memberships`)
//! holding only the governed entries, in a canonical order, so the usual
//! file replication, history, `diff` and `rollback` work on them unchanged.

use std::collections::{BTreeMap, BTreeSet};

use super::{split_list, valid_name, DbFile, Files, LineProblem, Policy, Table};

/// A governed user: its `passwd` and `shadow` lines as the leader has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub passwd: String,
    pub shadow: String,
}

/// A governed group: its `group` line and its `gshadow` line (`None` when
/// the leader keeps no `gshadow`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
    pub group: String,
    pub gshadow: Option<String>,
}

impl Group {
    /// The group's members (fourth field of its `group` line).
    pub fn members(&self) -> impl Iterator<Item = &str> {
        split_list(self.group.rsplit(':').next().unwrap_or(""))
    }
}

/// Which governed users belong to a group the leader does not govern
/// (`sudo`, `tacacs`): on every node that has a group of that name, the
/// governed users among its members follow these lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub group: String,
    /// From the group's `group` line.
    pub members: Vec<String>,
    /// From its `gshadow` line.
    pub admins: Vec<String>,
    pub gmembers: Vec<String>,
}

/// The replicated state of an accounts set. Users are ordered by (uid,
/// name), groups by (gid, name), memberships by group name, so the same
/// accounts give the same bytes on any node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records {
    pub users: Vec<User>,
    pub groups: Vec<Group>,
    pub memberships: Vec<Membership>,
}

/// The view's file of memberships (the other four are named as the
/// databases).
pub const MEMBERSHIPS: &str = "memberships";

/// The files of the view, in the order they are listed.
pub const VIEW_FILES: [&str; 5] = ["passwd", "shadow", "group", "gshadow", MEMBERSHIPS];

/// Why the leader's files cannot be read as records: every problem found,
/// each one sentence naming file and line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", summary(.0))]
pub struct ExtractError(pub Vec<String>);

fn summary(problems: &[String]) -> String {
    match problems {
        [] => "no problem".into(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first} (and {} more)", rest.len()),
    }
}

/// Whose record: a user or a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKind {
    User,
    Group,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::User => "user",
            RecordKind::Group => "group",
        }
    }
}

impl Records {
    /// Reads the records out of a leader's own files. Refuses, naming file,
    /// line and reason, any malformed line anywhere (nothing of a damaged
    /// database travels), a governed user without a `shadow` entry or group
    /// without a `gshadow` entry (a `useradd` caught half-way), and two
    /// governed entries sharing a name or an id.
    pub fn extract(files: &Files, policy: &Policy) -> Result<Records, ExtractError> {
        let mut problems = Vec::new();
        let mut table = |f: DbFile, required: bool| match files.get(f) {
            Some(bytes) => {
                let t = Table::parse(f, bytes);
                problems.extend(t.problems().iter().map(LineProblem::to_string));
                Some(t)
            }
            None => {
                if required {
                    problems.push(format!("{f} does not exist"));
                }
                None
            }
        };
        let passwd = table(DbFile::Passwd, true);
        let shadow = table(DbFile::Shadow, true);
        let group = table(DbFile::Group, true);
        let gshadow = table(DbFile::Gshadow, false);
        let (Some(passwd), Some(shadow), Some(group)) = (passwd, shadow, group) else {
            return Err(ExtractError(problems));
        };
        if !problems.is_empty() {
            return Err(ExtractError(problems));
        }
        let shadow_of = first_lines(&shadow);
        let gshadow_of = gshadow.as_ref().map(first_lines);

        let mut users = Vec::new();
        let mut names = BTreeMap::new();
        let mut ids = BTreeMap::new();
        for (n, f) in passwd.entries() {
            let (uid, gid) = (id(&f[2]), id(&f[3]));
            if !policy.governs_user(&f[0], uid) {
                continue;
            }
            unique(
                &mut names,
                &mut ids,
                ("passwd", "user"),
                &f[0],
                uid,
                n,
                &mut problems,
            );
            let Some(sh) = shadow_of.get(f[0].as_str()) else {
                problems.push(format!("passwd line {n}: user {:?} has no entry in shadow (a useradd not finished, or shadow damaged); add one with pwconv or finish the change", f[0]));
                continue;
            };
            users.push(User {
                name: f[0].clone(),
                uid,
                gid,
                passwd: f.join(":"),
                shadow: sh.clone(),
            });
        }
        let mut groups = Vec::new();
        let mut names = BTreeMap::new();
        let mut ids = BTreeMap::new();
        let mut memberships = Vec::new();
        let governed_users: BTreeSet<&str> = users.iter().map(|u| u.name.as_str()).collect();
        let only_governed = |list: &str| -> Vec<String> {
            split_list(list)
                .filter(|m| governed_users.contains(m))
                .map(str::to_string)
                .collect()
        };
        for (n, f) in group.entries() {
            let gid = id(&f[2]);
            let gsh = gshadow_of.as_ref().map(|g| g.get(f[0].as_str()));
            if !policy.governs_group(&f[0], gid) {
                let (admins, gmembers) = match gsh {
                    Some(Some(line)) => {
                        let g: Vec<&str> = line.split(':').collect();
                        (only_governed(g[2]), only_governed(g[3]))
                    }
                    // No gshadow line: shadow-utils would keep the group's
                    // members there too.
                    _ => (Vec::new(), only_governed(&f[3])),
                };
                memberships.push(Membership {
                    group: f[0].clone(),
                    members: only_governed(&f[3]),
                    admins,
                    gmembers,
                });
                continue;
            }
            unique(
                &mut names,
                &mut ids,
                ("group", "group"),
                &f[0],
                gid,
                n,
                &mut problems,
            );
            let gshadow = match gsh {
                None => None,
                Some(Some(line)) => Some(line.clone()),
                Some(None) => {
                    problems.push(format!("group line {n}: group {:?} has no entry in gshadow (a groupadd not finished, or gshadow damaged); add one with grpconv or finish the change", f[0]));
                    continue;
                }
            };
            groups.push(Group {
                name: f[0].clone(),
                gid,
                group: f.join(":"),
                gshadow,
            });
        }
        Records::sorted(users, groups, memberships, problems)
    }

    /// The records in their canonical order, or every problem found.
    fn sorted(
        users: Vec<User>,
        groups: Vec<Group>,
        memberships: Vec<Membership>,
        problems: Vec<String>,
    ) -> Result<Records, ExtractError> {
        if !problems.is_empty() {
            return Err(ExtractError(problems));
        }
        let mut r = Records {
            users,
            groups,
            memberships,
        };
        r.sort();
        Ok(r)
    }

    fn sort(&mut self) {
        self.users
            .sort_by(|a, b| (a.uid, &a.name).cmp(&(b.uid, &b.name)));
        self.groups
            .sort_by(|a, b| (a.gid, &a.name).cmp(&(b.gid, &b.name)));
        self.memberships.sort_by(|a, b| a.group.cmp(&b.group));
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// Users of `committed` that these records no longer have: what a
    /// change from `committed` to `self` removes.
    pub fn removed_users<'a>(&self, committed: &'a Records) -> Vec<&'a str> {
        committed
            .users
            .iter()
            .filter(|u| self.user(&u.name).is_none())
            .map(|u| u.name.as_str())
            .collect()
    }

    /// Adds back the records of `committed` that this node refused as a
    /// follower (`refused`) and so does not have: a node that became leader
    /// does not remove accounts from the cluster because a collision kept
    /// them off its own files.
    pub fn keep_refused(&mut self, committed: &Records, refused: &BTreeSet<(RecordKind, String)>) {
        let mut changed = false;
        for u in &committed.users {
            if refused.contains(&(RecordKind::User, u.name.clone()))
                && self.user(&u.name).is_none()
                && !self.users.iter().any(|x| x.uid == u.uid)
            {
                self.users.push(u.clone());
                changed = true;
            }
        }
        for g in &committed.groups {
            if refused.contains(&(RecordKind::Group, g.name.clone()))
                && self.group(&g.name).is_none()
                && !self.groups.iter().any(|x| x.gid == g.gid)
            {
                self.groups.push(g.clone());
                changed = true;
            }
        }
        if changed {
            self.sort();
        }
    }

    /// The view's files: `(name, bytes)` for each of [`VIEW_FILES`].
    pub fn render(&self) -> Vec<(&'static str, Vec<u8>)> {
        let lines = |it: &mut dyn Iterator<Item = &str>| {
            let mut out = Vec::new();
            for l in it {
                out.extend_from_slice(l.as_bytes());
                out.push(b'\n');
            }
            out
        };
        let memberships: Vec<String> = self
            .memberships
            .iter()
            .map(|m| {
                format!(
                    "{}:{}:{}:{}",
                    m.group,
                    m.members.join(","),
                    m.admins.join(","),
                    m.gmembers.join(",")
                )
            })
            .collect();
        vec![
            (
                "passwd",
                lines(&mut self.users.iter().map(|u| u.passwd.as_str())),
            ),
            (
                "shadow",
                lines(&mut self.users.iter().map(|u| u.shadow.as_str())),
            ),
            (
                "group",
                lines(&mut self.groups.iter().map(|g| g.group.as_str())),
            ),
            (
                "gshadow",
                lines(&mut self.groups.iter().filter_map(|g| g.gshadow.as_deref())),
            ),
            (
                MEMBERSHIPS,
                lines(&mut memberships.iter().map(String::as_str)),
            ),
        ]
    }

    /// Reads the committed view back (`file` returns a view file's bytes,
    /// `None` if it is not there). Refuses anything [`Records::render`]
    /// would not have written: the view came from the network.
    pub fn from_view(file: impl Fn(&str) -> Option<Vec<u8>>) -> Result<Records, ExtractError> {
        let mut problems = Vec::new();
        let mut table = |f: DbFile| {
            let t = Table::parse(f, &file(f.name()).unwrap_or_default());
            problems.extend(t.problems().iter().map(|p| format!("committed view: {p}")));
            if t.lines.iter().any(|l| l.entry().is_none()) {
                problems.push(format!(
                    "committed view: {f} has a line that is not an entry"
                ));
            }
            t
        };
        let passwd = table(DbFile::Passwd);
        let shadow = table(DbFile::Shadow);
        let group = table(DbFile::Group);
        let gshadow = table(DbFile::Gshadow);
        let shadow_of = first_lines(&shadow);
        let gshadow_of = first_lines(&gshadow);
        let users = passwd
            .entries()
            .filter_map(|(n, f)| {
                let Some(sh) = shadow_of.get(f[0].as_str()) else {
                    problems.push(format!(
                        "committed view: passwd line {n}: user {:?} has no shadow entry",
                        f[0]
                    ));
                    return None;
                };
                Some(User {
                    name: f[0].clone(),
                    uid: id(&f[2]),
                    gid: id(&f[3]),
                    passwd: f.join(":"),
                    shadow: sh.clone(),
                })
            })
            .collect();
        let groups = group
            .entries()
            .map(|(_, f)| Group {
                name: f[0].clone(),
                gid: id(&f[2]),
                group: f.join(":"),
                gshadow: gshadow_of.get(f[0].as_str()).cloned(),
            })
            .collect();
        let mut memberships = Vec::new();
        let text = file(MEMBERSHIPS).unwrap_or_default();
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let parsed = std::str::from_utf8(line).ok().and_then(|l| {
                let f: Vec<&str> = l.split(':').collect();
                let list = |s: &str| -> Option<Vec<String>> {
                    split_list(s)
                        .map(|m| valid_name(m).then(|| m.to_string()))
                        .collect()
                };
                if f.len() != 4 || !valid_name(f[0]) {
                    return None;
                }
                Some(Membership {
                    group: f[0].to_string(),
                    members: list(f[1])?,
                    admins: list(f[2])?,
                    gmembers: list(f[3])?,
                })
            });
            match parsed {
                Some(m) => memberships.push(m),
                None => problems.push(format!(
                    "committed view: memberships line {} is not \"group:members:admins:members\"",
                    i + 1
                )),
            }
        }
        Records::sorted(users, groups, memberships, problems)
    }
}

/// Notes the governed entry `name` (`id`) on line `n` of `file`, and a
/// problem if an earlier one has its name or its id.
fn unique(
    names: &mut BTreeMap<String, usize>,
    ids: &mut BTreeMap<u32, usize>,
    (file, what): (&str, &str),
    name: &str,
    id: u32,
    n: usize,
    problems: &mut Vec<String>,
) {
    if let Some(was) = names.insert(name.to_string(), n) {
        problems.push(format!(
            "{file} line {n}: {what} {name:?} is also on line {was}"
        ));
    }
    if let Some(was) = ids.insert(id, n) {
        problems.push(format!(
            "{file} line {n}: {what} id {id} of {name:?} is also used on line {was}"
        ));
    }
}

/// The first well-formed line of each name in `t`.
fn first_lines(t: &Table) -> BTreeMap<&str, String> {
    let mut m = BTreeMap::new();
    for (_, f) in t.entries() {
        m.entry(f[0].as_str()).or_insert_with(|| f.join(":"));
    }
    m
}

/// A field the parser already checked is numeric.
fn id(s: &str) -> u32 {
    s.parse().expect("checked by the line parser")
}
