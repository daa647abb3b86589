//! Membership beyond the ids Raft knows: each member's address and kind
//! (the directory), how a membership change carries it (the conf change's
//! context) and how a snapshot carries it, and the checks a change must
//! pass before a leader proposes it.
//!
//! Invariant owned here: a change that would leave the cluster unable to
//! commit (no voters, fewer reachable voters than a majority, two voters
//! without a witness unless allowed) is refused before it is proposed, with
//! one sentence saying why; and every member ever added is in the directory
//! of every node that holds its entry or a snapshot after it, so any node
//! that leads can reach it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::core::config::NodeId;

/// What the cluster knows about one member beyond its Raft id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: NodeId,
    /// `host:port` of its peer port, as every node dials it.
    pub addr: String,
    /// Votes but holds no files and never leads.
    #[serde(default)]
    pub witness: bool,
    /// Stays a learner: a non-voting replica that never leads (a DR copy).
    #[serde(default)]
    pub keep_learner: bool,
    /// Joins to take this voter's place: its promotion removes that node in
    /// the same (joint) change.
    #[serde(default)]
    pub replaces: Option<NodeId>,
    /// The log index of the change that added it (0: a founding member or
    /// unknown). Set by each node from the committed entry, not carried in
    /// the context: its promotion waits until it applied this far.
    #[serde(default)]
    pub added_at: u64,
}

/// A malformed context or directory: a peer on another version, or damage.
#[derive(Debug, thiserror::Error)]
#[error("unreadable membership data ({what}): {source}")]
pub struct MembersError {
    what: &'static str,
    source: serde_json::Error,
}

/// The members added at runtime, by id. Entries are only ever added or
/// replaced (never dropped on removal), so a directory taken later than the
/// configuration it goes with is still right for every member of that
/// configuration: an extra entry names a node that is not a member there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    pub members: BTreeMap<NodeId, MemberInfo>,
}

impl Directory {
    /// Takes `infos` in; returns those that were new or changed.
    pub fn merge(&mut self, infos: &[MemberInfo]) -> Vec<MemberInfo> {
        let mut changed = Vec::new();
        for info in infos {
            if self.members.get(&info.id) != Some(info) {
                self.members.insert(info.id, info.clone());
                changed.push(info.clone());
            }
        }
        changed
    }

    pub fn get(&self, id: NodeId) -> Option<&MemberInfo> {
        self.members.get(&id)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a directory always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Directory, MembersError> {
        serde_json::from_slice(bytes).map_err(|source| MembersError {
            what: "directory",
            source,
        })
    }
}

/// The context of a membership change: the members it adds.
pub fn encode_context(added: &[MemberInfo]) -> Vec<u8> {
    if added.is_empty() {
        return Vec::new();
    }
    serde_json::to_vec(added).expect("member infos always serialize")
}

/// Reads a change's context; an empty one (a promotion, a removal, leaving
/// a joint configuration) adds nobody.
pub fn decode_context(bytes: &[u8]) -> Result<Vec<MemberInfo>, MembersError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(bytes).map_err(|source| MembersError {
        what: "membership change context",
        source,
    })
}

/// Marks a snapshot that carries the directory ahead of the state
/// machine's bytes. Snapshots of earlier versions lack it and are read
/// whole as the state machine's.
const ENVELOPE_MAGIC: &[u8] = b"clusterd-members-v1\n";

/// A compaction snapshot: the directory, then the state machine's bytes. A
/// node that installs it (one that joins, or one that fell behind the
/// change that added a member) learns every member's address from it.
pub fn wrap_snapshot(directory: &Directory, data: &[u8]) -> Vec<u8> {
    let dir = directory.encode();
    let mut out = Vec::with_capacity(ENVELOPE_MAGIC.len() + 4 + dir.len() + data.len());
    out.extend_from_slice(ENVELOPE_MAGIC);
    out.extend_from_slice(&(dir.len() as u32).to_be_bytes());
    out.extend_from_slice(&dir);
    out.extend_from_slice(data);
    out
}

/// Splits a snapshot into its directory (if it carries one) and the state
/// machine's bytes.
pub fn unwrap_snapshot(data: &[u8]) -> Result<(Option<Directory>, &[u8]), MembersError> {
    let Some(rest) = data.strip_prefix(ENVELOPE_MAGIC) else {
        return Ok((None, data));
    };
    let bad = |why: &str| MembersError {
        what: "snapshot envelope",
        source: serde::de::Error::custom(why),
    };
    if rest.len() < 4 {
        return Err(bad("truncated length"));
    }
    let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    let rest = &rest[4..];
    if rest.len() < len {
        return Err(bad("truncated directory"));
    }
    let directory = Directory::decode(&rest[..len])?;
    Ok((Some(directory), &rest[len..]))
}

/// A membership change an administrator asks for (or the leader makes by
/// itself, for a promotion), before it becomes a Raft conf change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    /// A new member joins as a learner; the leader promotes it once it has
    /// caught up, unless `keep_learner`.
    Add(MemberInfo),
    /// A learner becomes a voter; with `replaces`, that voter leaves in the
    /// same (joint) change.
    Promote {
        id: NodeId,
        replaces: Option<NodeId>,
    },
    Remove(NodeId),
}

impl MemberChange {
    /// The voter this change takes out, if any: a leader must hand over
    /// before proposing a change that removes itself.
    pub fn removes_voter(&self) -> Option<NodeId> {
        match self {
            MemberChange::Remove(id) => Some(*id),
            MemberChange::Promote { replaces, .. } => *replaces,
            MemberChange::Add(_) => None,
        }
    }

    /// Checks the change against the committed configuration.
    pub fn check(&self, state: &MembershipState) -> Result<(), String> {
        match self {
            MemberChange::Add(info) => {
                state.check_add(info.id)?;
                match info.replaces {
                    Some(old) if old == info.id => Err(format!(
                        "node {old} cannot replace itself; give the new node another id"
                    )),
                    Some(old) if !state.voters.contains(&old) => Err(format!(
                        "node {old} is not a voter of this cluster (voters: {}), so there is nothing to replace",
                        list(&state.voters)
                    )),
                    _ => Ok(()),
                }
            }
            MemberChange::Promote { id, replaces } => state.check_promote(*id, *replaces),
            MemberChange::Remove(id) => state.check_remove(*id),
        }
    }
}

/// What a node is to the cluster, as it sees itself (`member` in status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Membership {
    #[default]
    Voter,
    Learner,
    Witness,
    /// `[node] join = true` and not added yet: waits, never campaigns.
    Joining,
    /// Removed from the cluster: replicates nothing, never campaigns.
    Removed,
}

impl Membership {
    pub fn as_str(self) -> &'static str {
        match self {
            Membership::Voter => "voter",
            Membership::Learner => "learner",
            Membership::Witness => "witness",
            Membership::Joining => "joining",
            Membership::Removed => "removed",
        }
    }

    /// Whether it is part of the configuration (not waiting, not removed).
    pub fn belongs(self) -> bool {
        matches!(
            self,
            Membership::Voter | Membership::Learner | Membership::Witness
        )
    }

    pub fn parse(s: &str) -> Option<Membership> {
        Some(match s {
            "voter" => Membership::Voter,
            "learner" => Membership::Learner,
            "witness" => Membership::Witness,
            "joining" => Membership::Joining,
            "removed" => Membership::Removed,
            _ => return None,
        })
    }
}

/// The committed configuration as a leader sees it when checking a change.
#[derive(Debug, Clone, Default)]
pub struct MembershipState {
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    pub witnesses: BTreeSet<NodeId>,
    /// Voters the leader heard from within an election timeout (itself included).
    pub reachable: BTreeSet<NodeId>,
    /// `node.allow_two_node` on the leader.
    pub allow_two_node: bool,
}

fn list(ids: &BTreeSet<NodeId>) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl MembershipState {
    fn is_member(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    fn kind_of(&self, id: NodeId) -> &'static str {
        if self.learners.contains(&id) {
            "a learner"
        } else if self.witnesses.contains(&id) {
            "a witness"
        } else {
            "a voter"
        }
    }

    /// A new member `id` may join as a learner.
    pub fn check_add(&self, id: NodeId) -> Result<(), String> {
        if id == 0 {
            return Err("node id 0 is reserved; pick an id from 1 up".to_string());
        }
        if self.is_member(id) {
            return Err(format!(
                "node {id} is already a member of this cluster ({}); pick another id, or remove it first with `clusterctl member remove {id}`",
                self.kind_of(id)
            ));
        }
        Ok(())
    }

    /// `voters` after the change may commit: not empty, not two without a
    /// witness (unless allowed), and a majority of them reachable now.
    fn check_voters_after(&self, after: &BTreeSet<NodeId>, what: &str) -> Result<(), String> {
        if after.is_empty() {
            return Err(format!("{what} would leave no voters"));
        }
        // Growing from one voter passes through two: refuse two only when
        // a change shrinks the voters to them.
        if after.len() == 2
            && after.len() < self.voters.len()
            && !after.iter().any(|v| self.witnesses.contains(v))
            && !self.allow_two_node
        {
            return Err(format!(
                "{what} would leave two voters (nodes {}) and no witness, which cannot fail over; add a node or a witness first, or set `node.allow_two_node` = true to accept that",
                list(after)
            ));
        }
        if after.iter().all(|v| self.witnesses.contains(v)) {
            return Err(format!(
                "{what} would leave only witnesses as voters; at least one must hold the data"
            ));
        }
        let reachable: BTreeSet<NodeId> = after.intersection(&self.reachable).copied().collect();
        let majority = after.len() / 2 + 1;
        if reachable.len() < majority {
            return Err(format!(
                "{what} would leave voters {} of which only {} reachable ({}); a majority ({majority}) must be, or the cluster stops committing",
                list(after),
                if reachable.len() == 1 { "1 is" } else { "these are" },
                if reachable.is_empty() { "none".to_string() } else { list(&reachable) },
            ));
        }
        Ok(())
    }

    /// Member `id` may be removed.
    pub fn check_remove(&self, id: NodeId) -> Result<(), String> {
        if !self.is_member(id) {
            let mut all = self.voters.clone();
            all.extend(&self.learners);
            return Err(format!(
                "node {id} is not a member of this cluster (members: {})",
                list(&all)
            ));
        }
        if self.learners.contains(&id) {
            return Ok(());
        }
        let mut after = self.voters.clone();
        after.remove(&id);
        self.check_voters_after(&after, &format!("removing node {id}"))
    }

    /// Learner `new` may become a voter (taking `replaces`' place if set).
    pub fn check_promote(&self, new: NodeId, replaces: Option<NodeId>) -> Result<(), String> {
        if !self.learners.contains(&new) {
            return Err(format!("node {new} is not a learner of this cluster"));
        }
        let mut after = self.voters.clone();
        after.insert(new);
        let what = match replaces {
            Some(old) if self.voters.contains(&old) => {
                after.remove(&old);
                format!("replacing node {old} with node {new}")
            }
            _ => format!("promoting node {new}"),
        };
        // The learner answers the leader (it is caught up), so it counts as reachable.
        let mut with_new = self.clone();
        with_new.reachable.insert(new);
        with_new.check_voters_after(&after, &what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: NodeId) -> MemberInfo {
        MemberInfo {
            id,
            addr: format!("10.0.0.{id}:7000"),
            witness: false,
            keep_learner: false,
            replaces: None,
            added_at: 0,
        }
    }

    fn state(voters: &[NodeId], learners: &[NodeId], reachable: &[NodeId]) -> MembershipState {
        MembershipState {
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            witnesses: BTreeSet::new(),
            reachable: reachable.iter().copied().collect(),
            allow_two_node: false,
        }
    }

    #[test]
    fn a_context_round_trips_and_an_empty_one_adds_nobody() {
        let added = vec![MemberInfo {
            keep_learner: true,
            replaces: Some(3),
            ..info(4)
        }];
        assert_eq!(decode_context(&encode_context(&added)).unwrap(), added);
        assert!(encode_context(&[]).is_empty());
        assert!(decode_context(b"").unwrap().is_empty());
        assert!(decode_context(b"{not json").is_err());
    }

    #[test]
    fn a_snapshot_carries_the_directory_and_an_old_one_is_read_whole() {
        let mut dir = Directory::default();
        assert_eq!(dir.merge(&[info(4), info(5)]).len(), 2);
        assert!(dir.merge(&[info(4)]).is_empty(), "nothing new");
        let wrapped = wrap_snapshot(&dir, b"manifest bytes");
        let (got, data) = unwrap_snapshot(&wrapped).unwrap();
        assert_eq!(got, Some(dir));
        assert_eq!(data, b"manifest bytes");
        let (got, data) = unwrap_snapshot(b"old manifest").unwrap();
        assert_eq!((got, data), (None, &b"old manifest"[..]));
        let truncated = &wrapped[..ENVELOPE_MAGIC.len() + 6];
        assert!(unwrap_snapshot(truncated).is_err());
    }

    #[test]
    fn adding_an_existing_member_is_refused() {
        let s = state(&[1, 2, 3], &[4], &[1, 2, 3]);
        assert!(s.check_add(5).is_ok());
        assert!(s.check_add(2).unwrap_err().contains("already a member"));
        assert!(s.check_add(4).unwrap_err().contains("a learner"));
        assert!(s.check_add(0).is_err());
    }

    #[test]
    fn removal_keeps_a_reachable_majority_and_never_two_voters_without_a_witness() {
        let s = state(&[1, 2, 3, 4], &[], &[1, 2, 3, 4]);
        assert!(s.check_remove(4).is_ok());
        assert!(s.check_remove(9).unwrap_err().contains("not a member"));
        // Three left, but only one of them answers.
        let s = state(&[1, 2, 3, 4], &[], &[1, 4]);
        let why = s.check_remove(4).unwrap_err();
        assert!(why.contains("a majority (2)"), "{why}");
        // Two left without a witness.
        let s = state(&[1, 2, 3], &[], &[1, 2, 3]);
        assert!(s.check_remove(3).unwrap_err().contains("no witness"));
        let mut allowed = s.clone();
        allowed.allow_two_node = true;
        assert!(allowed.check_remove(3).is_ok());
        let mut with_witness = s.clone();
        with_witness.witnesses.insert(2);
        assert!(with_witness.check_remove(3).is_ok());
        // The last voter, and a learner (always).
        let s = state(&[1], &[2], &[1]);
        assert!(s.check_remove(1).unwrap_err().contains("no voters"));
        assert!(s.check_remove(2).is_ok());
        // Only witnesses left.
        let mut s = state(&[1, 2, 3], &[], &[1, 2, 3]);
        s.witnesses.extend([2, 3]);
        assert!(s.check_remove(1).unwrap_err().contains("only witnesses"));
    }

    #[test]
    fn a_replacement_must_name_another_current_voter() {
        let s = state(&[1, 2, 3], &[], &[1, 2, 3]);
        let add = |replaces| {
            MemberChange::Add(MemberInfo {
                replaces: Some(replaces),
                ..info(4)
            })
        };
        assert!(add(3).check(&s).is_ok());
        assert!(add(9).check(&s).unwrap_err().contains("not a voter"));
        assert!(add(4)
            .check(&s)
            .unwrap_err()
            .contains("cannot replace itself"));
    }

    #[test]
    fn a_single_voter_grows_through_two() {
        let s = state(&[1], &[2], &[1]);
        assert!(s.check_promote(2, None).is_ok());
    }

    #[test]
    fn a_promotion_counts_the_caught_up_learner_and_a_replacement_drops_the_old_voter() {
        let s = state(&[1, 2, 3], &[4], &[1, 2]);
        assert!(s.check_promote(4, None).is_ok());
        assert!(s
            .check_promote(5, None)
            .unwrap_err()
            .contains("not a learner"));
        // 1, 2, 4 remain and all answer.
        assert!(s.check_promote(4, Some(3)).is_ok());
        // 2, 3, 4 remain but only 4 answers.
        let s = state(&[1, 2, 3], &[4], &[1]);
        let why = s.check_promote(4, Some(1)).unwrap_err();
        assert!(why.contains("replacing node 1 with node 4"), "{why}");
    }
}
