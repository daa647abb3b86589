//! The membership task: on the leader, promotes each learner to voter once
//! it has applied everything committed when it was added and holds every
//! committed file; on a member that hears from no leader, finds out whether
//! it was removed while cut off.
//!
//! Invariant owned here: a learner is promoted only on its own word
//! (its status, asked over its authenticated link), never on the leader's
//! guess, so a new voter can lead at once without losing a committed file;
//! and a node concludes it was removed only from a member that applied
//! past everything this node holds and does not list it.

use std::collections::BTreeMap;

use tracing::debug;

use super::*;
use crate::core::status::FilesView;
use crate::net::proto::peer::NodeStatusRequest;

/// How often the task looks.
const ROUND: Duration = Duration::from_millis(500);
/// How long a peer's status may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a promotion may take to commit.
const PROMOTE_WAIT: Duration = Duration::from_secs(10);
/// A learner that cannot be promoted (the check refuses it) is reported
/// this often, not every round.
const REPORT_EVERY: Duration = Duration::from_secs(30);
/// Election timeouts without a leader before a member asks whether it was removed.
const LEADERLESS_TIMEOUTS: u32 = 3;

pub(super) async fn run(
    node: NodeHandle,
    transport: Transport,
    election_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut round = tokio::time::interval(ROUND);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported: BTreeMap<NodeId, Instant> = BTreeMap::new();
    let mut leader_seen = Instant::now();
    loop {
        tokio::select! {
            _ = round.tick() => {}
            _ = stop.changed() => return,
        }
        let view = node.view();
        if view.leader.is_some() {
            leader_seen = Instant::now();
        }
        if view.role == Role::Leader {
            promote_ready_learners(&node, &transport, &view, &mut reported).await;
        } else if view.members.member.belongs()
            && leader_seen.elapsed() > election_timeout * LEADERLESS_TIMEOUTS
        {
            if let Some(why) = removed_while_away(&transport, &view).await {
                node.report_removed(why).await;
            }
            leader_seen = Instant::now();
        }
    }
}

/// Asks each learner that is to become a voter for its status and promotes
/// those that caught up.
async fn promote_ready_learners(
    node: &NodeHandle,
    transport: &Transport,
    view: &NodeView,
    reported: &mut BTreeMap<NodeId, Instant>,
) {
    for &id in &view.members.learners {
        let Some(info) = transport.member(id) else {
            continue;
        };
        if info.keep_learner {
            continue;
        }
        // Until it holds the members, a joining learner knows only its
        // `[[peer]]` list: tell it every address, this leader's included.
        let introduce = if learner_is_empty(transport, id) {
            transport.book()
        } else {
            Vec::new()
        };
        let Some(status) = ask_status(transport, id, &introduce).await else {
            continue;
        };
        let learner: NodeView = (&status).into();
        let files = status.files.as_ref().map(FilesView::from);
        if !learner_caught_up(&learner, files.as_ref(), info.added_at) {
            continue;
        }
        let change = MemberChange::Promote {
            id,
            replaces: info.replaces,
        };
        match node.change_membership(change, PROMOTE_WAIT).await {
            Ok(index) => {
                info!(
                    index,
                    "node {id} has applied entry {} (it was added at {}) and holds every committed file: it is a voter now{}",
                    learner.applied_index,
                    info.added_at,
                    info.replaces
                        .map(|old| format!(", in place of node {old}"))
                        .unwrap_or_default()
                );
                reported.remove(&id);
            }
            Err(RequestError::Invalid(why)) => {
                let due = reported
                    .get(&id)
                    .is_none_or(|at| at.elapsed() >= REPORT_EVERY);
                if due {
                    warn!("learner node {id} has caught up but cannot be promoted yet: {why}");
                    reported.insert(id, Instant::now());
                }
            }
            Err(e) => debug!("promoting node {id} must wait: {e}"),
        }
    }
}

/// Whether a learner may become a voter: it applied the change that added
/// it (and so everything committed before it) and lacks no committed file.
pub fn learner_caught_up(learner: &NodeView, files: Option<&FilesView>, added_at: u64) -> bool {
    let sets = files.map_or(&[][..], |f| &f.sets[..]);
    learner.applied_index >= added_at.max(1) && sets.iter().all(|s| s.missing == 0 && !s.skipping)
}

/// Whether `id` has reported no applied entry to this node yet.
fn learner_is_empty(transport: &Transport, id: NodeId) -> bool {
    transport
        .peer_applied(id)
        .is_none_or(|(applied, _)| applied == 0)
}

/// `id`'s status; `introduce` (members and addresses) goes with the
/// question, for a node that is joining.
async fn ask_status(
    transport: &Transport,
    id: NodeId,
    introduce: &[crate::core::members::MemberInfo],
) -> Option<crate::net::proto::peer::NodeView> {
    let mut client = transport.client(id)?;
    let mut req = tonic::Request::new(NodeStatusRequest {
        members: crate::net::proto::introductions(introduce),
    });
    req.set_timeout(ASK_TIMEOUT);
    match tokio::time::timeout(ASK_TIMEOUT, client.node_status(req)).await {
        Ok(Ok(reply)) => Some(reply.into_inner()),
        _ => None,
    }
}

/// Looks around when no leader is heard: learns the members added while
/// this node was away (their connections are refused until it knows
/// them), and whether some member that applied past everything this node
/// holds no longer lists it (it was removed while it could not hear of
/// it): the reason, if so.
async fn removed_while_away(transport: &Transport, view: &NodeView) -> Option<String> {
    for peer in transport.peers() {
        let Some(status) = ask_status(transport, peer, &[]).await else {
            continue;
        };
        let theirs: NodeView = (&status).into();
        // A member added while this node was away (perhaps the leader now)
        // is refused until this node knows it: take its address from any
        // node that applied its addition, even one removed since (it may
        // be the only one this node can reach). Only the address is taken:
        // whether it may connect is this node's own log's to say
        // (`Transport::admits`).
        let unknown: Vec<_> = crate::net::proto::member_addresses(&status.addresses)
            .into_iter()
            .filter(|m| !transport.knows(m.id) && theirs.members.lists(m.id))
            .collect();
        if !unknown.is_empty() {
            info!(
                peer,
                "learned from node {peer} of members added while this node was away: {}",
                unknown
                    .iter()
                    .map(|m| format!("{} at {}", m.id, m.addr))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            transport.learn(&unknown);
        }
        if removed_by(&theirs, view) {
            return Some(format!(
                "node {peer}, which applied entry {} (past this node's last entry {}), no longer lists it among the members",
                theirs.applied_index, view.last_index
            ));
        }
    }
    None
}

/// Whether `theirs` (a member's view) proves that the node of `mine` was
/// removed: `theirs` is a member with a leader, applied past the last
/// entry `mine` holds (so past the change that added it), and lists it
/// neither as voter nor as learner.
pub fn removed_by(theirs: &NodeView, mine: &NodeView) -> bool {
    theirs.members.member.belongs()
        && theirs.leader.is_some()
        && !theirs.members.voters.is_empty()
        && theirs.applied_index >= mine.last_index
        && !theirs.members.voters.contains(&mine.id)
        && !theirs.members.learners.contains(&mine.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::members::Membership;
    use crate::core::status::{MemberView, SetView};

    fn view(id: NodeId, applied: u64, voters: &[NodeId], learners: &[NodeId]) -> NodeView {
        NodeView {
            id,
            role: Role::Follower,
            term: 3,
            vote: 0,
            leader: Some(1),
            commit_index: applied,
            applied_index: applied,
            first_index: 1,
            last_index: applied,
            progress: Vec::new(),
            stale_term_messages: 0,
            members: MemberView {
                voters: voters.to_vec(),
                learners: learners.to_vec(),
                witnesses: Vec::new(),
                config_differs: None,
                member: Membership::Voter,
            },
        }
    }

    #[test]
    fn a_learner_is_ready_once_it_applied_its_addition_and_lacks_no_file() {
        let learner = view(4, 20, &[1, 2, 3], &[4]);
        assert!(learner_caught_up(&learner, None, 20));
        assert!(!learner_caught_up(&learner, None, 21));
        let missing = FilesView {
            sets: vec![SetView {
                name: "etc".into(),
                missing: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(!learner_caught_up(&learner, Some(&missing), 20));
        let skipping = FilesView {
            sets: vec![SetView {
                name: "etc".into(),
                skipping: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(!learner_caught_up(&learner, Some(&skipping), 20));
        // A learner that applied nothing is never ready, whatever it was added at.
        assert!(!learner_caught_up(&view(4, 0, &[], &[]), None, 0));
    }

    #[test]
    fn only_a_member_that_applied_past_this_node_and_lacks_it_proves_a_removal() {
        let mine = view(3, 40, &[1, 2, 3], &[]);
        assert!(removed_by(&view(1, 45, &[1, 2], &[]), &mine));
        // Not yet past this node's last entry: the change may still be coming.
        assert!(!removed_by(&view(1, 39, &[1, 2], &[]), &mine));
        // Still lists it, as voter or learner.
        assert!(!removed_by(&view(1, 45, &[1, 2, 3], &[]), &mine));
        assert!(!removed_by(&view(1, 45, &[1, 2], &[3]), &mine));
        // A peer that knows no leader, or is not a member itself, proves nothing.
        let mut leaderless = view(1, 45, &[1, 2], &[]);
        leaderless.leader = None;
        assert!(!removed_by(&leaderless, &mine));
        let mut joining = view(5, 45, &[1, 2], &[]);
        joining.members.member = Membership::Joining;
        assert!(!removed_by(&joining, &mine));
    }
}
