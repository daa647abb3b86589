//! Merging the committed records into one node's own files: which records
//! collide with this node's own entries (refused, never applied over them),
//! the files as they will be, the checks they must pass, and the order they
//! are written in so that no instant shows a user without its shadow entry
//! or a removed user still in `passwd` without one.

use std::collections::{BTreeMap, BTreeSet};

use super::records::{Group, Membership, RecordKind, Records, User};
use super::{split_list, DbFile, Files, Line, LineKind, LineProblem, Policy, Table};

/// A replicated record this node does not apply, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RecordKind,
    pub name: String,
    pub id: u32,
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?} ({}id {}): {}",
            self.kind.as_str(),
            self.name,
            if self.kind == RecordKind::User {
                "u"
            } else {
                "g"
            },
            self.id,
            self.reason
        )
    }
}

/// What merging the records into this node's files takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergePlan {
    /// Whole new contents, in the order they must be written; empty when
    /// the files already hold the records.
    pub steps: Vec<(DbFile, Vec<u8>)>,
    pub refused: Vec<Refusal>,
    /// This node's own malformed lines: kept as they are, reported.
    pub local_malformed: Vec<LineProblem>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Governed users whose lines change.
    pub changed: Vec<String>,
}

/// Why this node's files cannot take the records; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("{0} does not exist on this node; clusterd merges accounts into existing databases and never creates them")]
    Missing(DbFile),
    #[error("the merged {0} would fail its check: {1}; nothing was written")]
    Check(DbFile, String),
}

/// This node's own entries, which the records must not collide with.
struct Own {
    /// name → id of entries outside the policy (and names of malformed
    /// lines, id unknown).
    names: BTreeMap<String, Option<u32>>,
    /// id → name of entries outside the policy.
    ids: BTreeMap<u32, String>,
    /// Names of this node's entries inside the policy.
    governed: BTreeSet<String>,
}

impl Own {
    fn of(t: &Table, governs: impl Fn(&str, u32) -> bool) -> Own {
        let mut own = Own {
            names: BTreeMap::new(),
            ids: BTreeMap::new(),
            governed: BTreeSet::new(),
        };
        for l in &t.lines {
            match (&l.kind, l.id()) {
                (LineKind::Entry(f), Some(id)) if governs(&f[0], id) => {
                    own.governed.insert(f[0].clone());
                }
                (LineKind::Entry(f), Some(id)) => {
                    own.names.entry(f[0].clone()).or_insert(Some(id));
                    own.ids.entry(id).or_insert_with(|| f[0].clone());
                }
                (LineKind::Malformed { name: Some(n), .. }, _) => {
                    own.names.entry(n.clone()).or_insert(None);
                }
                _ => {}
            }
        }
        own
    }

    /// Why a record named `name` with `id` cannot be applied here, if so.
    fn collision(&self, what: &str, name: &str, id: u32) -> Option<String> {
        if let Some(other) = self.names.get(name) {
            return Some(match other {
                Some(other) => format!("this node has its own {what} {name:?} with id {other}, outside the replicated range; it is left as it is"),
                None => format!("this node's own {what} {name:?} is on a malformed line; fix the line"),
            });
        }
        self.ids.get(&id).map(|other| {
            format!("id {id} is this node's own {what} {other:?}, outside the replicated range; it is left as it is")
        })
    }
}

/// Plans the merge of `records` into this node's `local` files.
pub fn plan(local: &Files, records: &Records, policy: &Policy) -> Result<MergePlan, MergeError> {
    let table = |f: DbFile| -> Result<Table, MergeError> {
        local
            .get(f)
            .map(|b| Table::parse(f, b))
            .ok_or(MergeError::Missing(f))
    };
    let pw = table(DbFile::Passwd)?;
    let sh = table(DbFile::Shadow)?;
    let gr = table(DbFile::Group)?;
    let gs = local
        .gshadow
        .as_ref()
        .map(|b| Table::parse(DbFile::Gshadow, b));

    let mut plan = MergePlan::default();
    for t in [Some(&pw), Some(&sh), Some(&gr), gs.as_ref()]
        .into_iter()
        .flatten()
    {
        plan.local_malformed.extend(t.problems());
    }
    let own_users = Own::of(&pw, |n, id| policy.governs_user(n, id));
    let own_groups = Own::of(&gr, |n, id| policy.governs_group(n, id));

    let mut groups: BTreeMap<&str, &Group> = BTreeMap::new();
    let mut refused_gids = BTreeMap::new();
    let differs = "it is outside this node's uid_range/gid_range and include: make the accounts settings the same on every node";
    for g in &records.groups {
        let outside = (!policy.governs_group(&g.name, g.gid)).then(|| differs.to_string());
        match outside.or_else(|| own_groups.collision("group", &g.name, g.gid)) {
            Some(reason) => {
                refused_gids.insert(g.gid, g.name.clone());
                plan.refused.push(Refusal {
                    kind: RecordKind::Group,
                    name: g.name.clone(),
                    id: g.gid,
                    reason,
                });
            }
            None => {
                groups.insert(&g.name, g);
            }
        }
    }
    let mut users: BTreeMap<&str, &User> = BTreeMap::new();
    for u in &records.users {
        let outside = (!policy.governs_user(&u.name, u.uid)).then(|| differs.to_string());
        let reason = outside
            .or_else(|| own_users.collision("user", &u.name, u.uid))
            .or_else(|| {
                refused_gids.get(&u.gid).map(|g| {
                    format!(
                        "its primary group {g:?} (gid {}) was refused on this node",
                        u.gid
                    )
                })
            });
        match reason {
            Some(reason) => plan.refused.push(Refusal {
                kind: RecordKind::User,
                name: u.name.clone(),
                id: u.uid,
                reason,
            }),
            None => {
                users.insert(&u.name, u);
            }
        }
    }
    let refused: BTreeSet<(RecordKind, &str)> = plan
        .refused
        .iter()
        .map(|r| (r.kind, r.name.as_str()))
        .collect();
    // The names whose lines the records decide: this node's governed
    // entries and the accepted records, less what was refused (a refused
    // record leaves this node's entry of that name as it is).
    let governed_users: BTreeSet<&str> = own_users
        .governed
        .iter()
        .map(String::as_str)
        .chain(users.keys().copied())
        .filter(|n| !refused.contains(&(RecordKind::User, n)))
        .collect();
    let governed_groups: BTreeSet<&str> = own_groups
        .governed
        .iter()
        .map(String::as_str)
        .chain(groups.keys().copied())
        .filter(|n| !refused.contains(&(RecordKind::Group, n)))
        .collect();
    let memberships: BTreeMap<&str, &Membership> = records
        .memberships
        .iter()
        .map(|m| (m.group.as_str(), m))
        .collect();

    let ctx = Ctx {
        users: &users,
        groups: &groups,
        governed_users: &governed_users,
        governed_groups: &governed_groups,
        memberships: &memberships,
    };
    let build = |keep_removed: bool| Built {
        passwd: ctx.entries(&pw, &governed_users, keep_removed, |n| {
            users.get(n).map(|u| u.passwd.clone())
        }),
        shadow: ctx.entries(&sh, &governed_users, keep_removed, |n| {
            users.get(n).map(|u| u.shadow.clone())
        }),
        group: ctx.groups(&gr, keep_removed),
        gshadow: gs.as_ref().map(|t| ctx.gshadows(t, keep_removed)),
    };
    let stage = build(true);
    let done = build(false);
    done.check(&ctx)?;

    plan.added = users
        .keys()
        .filter(|n| !own_users.governed.contains(**n))
        .map(|n| n.to_string())
        .collect();
    plan.removed = own_users
        .governed
        .iter()
        .filter(|n| governed_users.contains(n.as_str()) && !users.contains_key(n.as_str()))
        .cloned()
        .collect();
    let old_lines: BTreeMap<&str, &Line> = pw
        .lines
        .iter()
        .filter_map(|l| l.entry().map(|f| (f[0].as_str(), l)))
        .collect();
    let old_shadow: BTreeMap<&str, &Line> = sh
        .lines
        .iter()
        .filter_map(|l| l.entry().map(|f| (f[0].as_str(), l)))
        .collect();
    plan.changed = users
        .values()
        .filter(|u| {
            own_users.governed.contains(&u.name)
                && (old_lines.get(u.name.as_str()).map(|l| l.raw.as_slice())
                    != Some(u.passwd.as_bytes())
                    || old_shadow.get(u.name.as_str()).map(|l| l.raw.as_slice())
                        != Some(u.shadow.as_bytes()))
        })
        .map(|u| u.name.clone())
        .collect();

    // New entries reach shadow and gshadow first, and groups before the
    // users that may name them; removed ones leave passwd, then group,
    // then the shadow files.
    let mut now = local.clone();
    let mut step = |f: DbFile, bytes: &Option<Vec<u8>>| {
        if let Some(b) = bytes {
            if now.get(f) != Some(b) {
                plan.steps.push((f, b.clone()));
                *now.slot(f) = Some(b.clone());
            }
        }
    };
    step(DbFile::Shadow, &Some(stage.shadow));
    step(DbFile::Gshadow, &stage.gshadow);
    step(DbFile::Group, &Some(stage.group));
    step(DbFile::Passwd, &Some(done.passwd));
    step(DbFile::Group, &Some(done.group));
    step(DbFile::Shadow, &Some(done.shadow));
    step(DbFile::Gshadow, &done.gshadow);
    Ok(plan)
}

struct Built {
    passwd: Vec<u8>,
    shadow: Vec<u8>,
    group: Vec<u8>,
    gshadow: Option<Vec<u8>>,
}

impl Built {
    /// Every accepted record once, with its shadow entry; no name or id of
    /// an accepted record used twice.
    fn check(&self, ctx: &Ctx) -> Result<(), MergeError> {
        let once =
            |f: DbFile, bytes: &[u8], names: &mut dyn Iterator<Item = (&str, Option<u32>)>| {
                let t = Table::parse(f, bytes);
                let mut by_name: BTreeMap<&str, usize> = BTreeMap::new();
                let mut by_id: BTreeMap<u32, usize> = BTreeMap::new();
                for (_, e) in t.entries() {
                    *by_name.entry(e[0].as_str()).or_default() += 1;
                    if f.has_id() {
                        *by_id.entry(e[2].parse().unwrap_or(u32::MAX)).or_default() += 1;
                    }
                }
                for (name, id) in names {
                    match by_name.get(name) {
                        Some(1) => {}
                        Some(_) => {
                            return Err(MergeError::Check(
                                f,
                                format!("{name:?} would be on two lines"),
                            ))
                        }
                        None => {
                            return Err(MergeError::Check(
                                f,
                                format!("{name:?} would have no entry"),
                            ))
                        }
                    }
                    if let Some(id) = id {
                        if by_id.get(&id).copied().unwrap_or(0) != 1 {
                            return Err(MergeError::Check(
                                f,
                                format!("id {id} of {name:?} would be used twice"),
                            ));
                        }
                    }
                }
                Ok(())
            };
        once(
            DbFile::Passwd,
            &self.passwd,
            &mut ctx.users.values().map(|u| (u.name.as_str(), Some(u.uid))),
        )?;
        once(
            DbFile::Shadow,
            &self.shadow,
            &mut ctx.users.keys().map(|n| (*n, None)),
        )?;
        once(
            DbFile::Group,
            &self.group,
            &mut ctx.groups.values().map(|g| (g.name.as_str(), Some(g.gid))),
        )?;
        if let Some(gs) = &self.gshadow {
            once(
                DbFile::Gshadow,
                gs,
                &mut ctx.groups.keys().map(|n| (*n, None)),
            )?;
        }
        Ok(())
    }
}

struct Ctx<'a> {
    users: &'a BTreeMap<&'a str, &'a User>,
    groups: &'a BTreeMap<&'a str, &'a Group>,
    governed_users: &'a BTreeSet<&'a str>,
    governed_groups: &'a BTreeSet<&'a str>,
    memberships: &'a BTreeMap<&'a str, &'a Membership>,
}

impl Ctx<'_> {
    /// `t`'s lines with every governed name's line replaced by `record(name)`
    /// in place (dropped when there is none, unless `keep_removed`), and the
    /// records this node did not have appended, in the records' order.
    fn entries(
        &self,
        t: &Table,
        governed: &BTreeSet<&str>,
        keep_removed: bool,
        record: impl Fn(&str) -> Option<String>,
    ) -> Vec<u8> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut placed = BTreeSet::new();
        for l in &t.lines {
            let name = match &l.kind {
                LineKind::Entry(f) if governed.contains(f[0].as_str()) => f[0].as_str(),
                _ => {
                    out.push(l.raw.clone());
                    continue;
                }
            };
            match record(name) {
                Some(line) if placed.insert(name.to_string()) => out.push(line.into_bytes()),
                Some(_) => {}
                None if keep_removed => out.push(l.raw.clone()),
                None => {}
            }
        }
        let new: Vec<&str> = match t.file {
            DbFile::Passwd | DbFile::Shadow => {
                self.users.values().map(|u| u.name.as_str()).collect()
            }
            DbFile::Group | DbFile::Gshadow => {
                self.groups.values().map(|g| g.name.as_str()).collect()
            }
        };
        // In the records' order (by id), not by name.
        let order = |n: &&str| match t.file {
            DbFile::Passwd | DbFile::Shadow => self.users.get(n).map(|u| (u.uid, n.to_string())),
            _ => self.groups.get(n).map(|g| (g.gid, n.to_string())),
        };
        let mut new: Vec<&str> = new.into_iter().filter(|n| !placed.contains(*n)).collect();
        new.sort_by_key(order);
        for n in new {
            if let Some(line) = record(n) {
                out.push(line.into_bytes());
            }
        }
        super::render_lines(out.iter().map(Vec::as_slice))
    }

    /// The merged `group`: governed groups as [`Ctx::entries`]; in this
    /// node's other groups, the governed users among the members follow the
    /// leader's group of the same name (and stay as they are where the
    /// leader has none).
    fn groups(&self, t: &Table, keep_removed: bool) -> Vec<u8> {
        let merged = self.with_memberships(t, false);
        self.entries(&merged, self.governed_groups, keep_removed, |n| {
            self.groups.get(n).map(|g| g.group.clone())
        })
    }

    fn gshadows(&self, t: &Table, keep_removed: bool) -> Vec<u8> {
        let merged = self.with_memberships(t, true);
        self.entries(&merged, self.governed_groups, keep_removed, |n| {
            self.groups.get(n).map(|g| match &g.gshadow {
                Some(line) => line.clone(),
                // The leader keeps no gshadow; this node does.
                None => format!(
                    "{}:!::{}",
                    g.name,
                    g.members().collect::<Vec<_>>().join(",")
                ),
            })
        })
    }

    /// `t` (`group`, or `gshadow` when `gshadow`) with the member lists of
    /// this node's own groups updated.
    fn with_memberships(&self, t: &Table, gshadow: bool) -> Table {
        let mut t = t.clone();
        for l in &mut t.lines {
            let LineKind::Entry(f) = &mut l.kind else {
                continue;
            };
            if self.governed_groups.contains(f[0].as_str()) {
                continue;
            }
            let Some(m) = self.memberships.get(f[0].as_str()) else {
                // A group the leader does not have: its members stay, but a
                // removed user leaves it (as userdel would), or a new user
                // of that name would inherit the membership.
                let mut changed = false;
                for i in if gshadow { vec![2, 3] } else { vec![3] } {
                    let kept: Vec<&str> = split_list(&f[i])
                        .filter(|x| !self.governed_users.contains(x) || self.users.contains_key(x))
                        .collect();
                    let joined = kept.join(",");
                    if joined != f[i] {
                        f[i] = joined;
                        changed = true;
                    }
                }
                if changed {
                    l.raw = f.join(":").into_bytes();
                }
                continue;
            };
            let mut changed = false;
            let lists = if gshadow {
                vec![(2, &m.admins), (3, &m.gmembers)]
            } else {
                vec![(3, &m.members)]
            };
            for (i, leaders) in lists {
                // Members keep their places: a governed one stays if the
                // leader has it too, new ones go at the end.
                let mut list: Vec<String> = split_list(&f[i])
                    .filter(|x| {
                        !self.governed_users.contains(x)
                            || (self.users.contains_key(x) && leaders.iter().any(|l| l == x))
                    })
                    .map(str::to_string)
                    .collect();
                for x in leaders {
                    if self.users.contains_key(x.as_str()) && !list.contains(x) {
                        list.push(x.clone());
                    }
                }
                let joined = list.join(",");
                if joined != f[i] {
                    f[i] = joined;
                    changed = true;
                }
            }
            if changed {
                l.raw = f.join(":").into_bytes();
            }
        }
        t
    }
}
