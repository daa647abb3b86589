//! Generated gRPC types and the one place where they convert to and from the
//! core's types, so protobuf never leaks past the service edges.

use crate::core::members::{MemberChange, MemberInfo};
use crate::core::status::{ClusterStatus, FilesView, NodeEntry, SetView};
use crate::raft::core::{NodeView, PeerProgress, Role};

/// Generated code, nested as the protobuf packages are, since the admin
/// package refers to the peer package by its relative path.
#[allow(clippy::all, missing_docs)]
mod generated {
    pub mod clusterd {
        pub mod peer {
            pub mod v1 {
                tonic::include_proto!("clusterd.peer.v1");
            }
        }
        pub mod admin {
            pub mod v1 {
                tonic::include_proto!("clusterd.admin.v1");
            }
        }
    }
}

pub use generated::clusterd::admin::v1 as admin;
pub use generated::clusterd::peer::v1 as peer;

/// Largest gRPC message accepted from a peer.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The gRPC codec of both services (build.rs names it): tonic-prost's, but
/// the encoder first reserves the message's whole size. Without that a
/// `StageRequest` outgrew its buffer on the field after its 4 MiB `data`
/// and was copied once more for each follower (a twentieth of a leader's
/// CPU in a full sync).
pub struct Codec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ReservingEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ReservingEncoder(tonic_prost::ProstEncoder::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// tonic-prost's encoder, after reserving the message's size (see [`Codec`]).
pub struct ReservingEncoder<T>(tonic_prost::ProstEncoder<T>);

impl<T: prost::Message> tonic::codec::Encoder for ReservingEncoder<T> {
    type Item = T;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: T,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        buf.reserve(item.encoded_len());
        self.0.encode(item, buf)
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}

pub fn role_from_str(s: &str) -> Role {
    match s {
        "leader" => Role::Leader,
        "follower" => Role::Follower,
        "candidate" => Role::Candidate,
        "witness" => Role::Witness,
        "learner" => Role::Learner,
        // An unknown word from a newer peer is shown as the closest safe reading.
        _ => Role::Candidate,
    }
}

impl From<&NodeView> for peer::NodeView {
    fn from(v: &NodeView) -> Self {
        peer::NodeView {
            id: v.id,
            role: v.role.as_str().to_string(),
            term: v.term,
            vote: v.vote,
            leader: v.leader.unwrap_or(0),
            commit_index: v.commit_index,
            applied_index: v.applied_index,
            last_index: v.last_index,
            first_index: v.first_index,
            progress: v
                .progress
                .iter()
                .map(|p| peer::Progress {
                    id: p.id,
                    match_index: p.match_index,
                    recent_active: p.recent_active,
                })
                .collect(),
            stale_term_messages: v.stale_term_messages,
            voters: v.members.voters.clone(),
            learners: v.members.learners.clone(),
            witnesses: v.members.witnesses.clone(),
            config_differs: v.members.config_differs.clone().unwrap_or_default(),
            addresses: Vec::new(),
            member: v.members.member.as_str().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: 0,
            cert_not_after_unix: 0,
            files: None,
        }
    }
}

impl From<&peer::NodeView> for NodeView {
    fn from(v: &peer::NodeView) -> Self {
        NodeView {
            id: v.id,
            role: role_from_str(&v.role),
            term: v.term,
            vote: v.vote,
            leader: (v.leader != 0).then_some(v.leader),
            commit_index: v.commit_index,
            applied_index: v.applied_index,
            first_index: v.first_index,
            last_index: v.last_index,
            progress: v
                .progress
                .iter()
                .map(|p| PeerProgress {
                    id: p.id,
                    match_index: p.match_index,
                    recent_active: p.recent_active,
                })
                .collect(),
            stale_term_messages: v.stale_term_messages,
            members: crate::core::status::MemberView {
                voters: v.voters.clone(),
                learners: v.learners.clone(),
                witnesses: v.witnesses.clone(),
                config_differs: (!v.config_differs.is_empty()).then(|| v.config_differs.clone()),
                // A peer of an earlier version says nothing: it is a voter.
                member: crate::core::members::Membership::parse(&v.member).unwrap_or_default(),
            },
        }
    }
}

impl From<&ClusterStatus> for admin::ClusterStatus {
    fn from(s: &ClusterStatus) -> Self {
        admin::ClusterStatus {
            node_id: s.node_id,
            nodes: s
                .nodes
                .iter()
                .map(|n| admin::NodeEntry {
                    id: n.id,
                    reachable: n.reachable,
                    addr: n.addr.clone(),
                    view: n.view.as_ref().map(|v| {
                        let mut pv: peer::NodeView = v.into();
                        pv.files = n.files.as_ref().map(Into::into);
                        pv
                    }),
                    error: n.error.clone().unwrap_or_default(),
                    rtt_us: n.rtt_us.unwrap_or(0),
                    cert_not_after_unix: n.cert_not_after_unix.unwrap_or(0),
                })
                .collect(),
        }
    }
}

impl From<&admin::ClusterStatus> for ClusterStatus {
    fn from(s: &admin::ClusterStatus) -> Self {
        ClusterStatus {
            node_id: s.node_id,
            nodes: s
                .nodes
                .iter()
                .map(|n| NodeEntry {
                    id: n.id,
                    reachable: n.reachable,
                    addr: n.addr.clone(),
                    view: n.view.as_ref().map(Into::into),
                    error: (!n.error.is_empty()).then(|| n.error.clone()),
                    rtt_us: (n.rtt_us != 0).then_some(n.rtt_us),
                    cert_not_after_unix: (n.cert_not_after_unix != 0)
                        .then_some(n.cert_not_after_unix),
                    files: n
                        .view
                        .as_ref()
                        .and_then(|v| v.files.as_ref())
                        .map(Into::into),
                })
                .collect(),
        }
    }
}

/// Encodes raft-rs messages (rust-protobuf) for the `bytes` fields of our prost messages.
pub fn encode_raft_message(m: &raft::prelude::Message) -> Vec<u8> {
    use protobuf::Message as _;
    m.write_to_bytes()
        .expect("encoding an in-memory raft message cannot fail")
}

pub fn decode_raft_message(
    bytes: &[u8],
) -> Result<raft::prelude::Message, protobuf::ProtobufError> {
    use protobuf::Message as _;
    raft::prelude::Message::parse_from_bytes(bytes)
}

impl From<&FilesView> for peer::FilesStatus {
    fn from(f: &FilesView) -> Self {
        peer::FilesStatus {
            sets: f
                .sets
                .iter()
                .map(|s| peer::SetStatus {
                    name: s.name.clone(),
                    files: s.files,
                    bytes: s.bytes,
                    applied_index: s.applied_index,
                    seq: s.seq,
                    committed_bytes: s.committed_bytes,
                    missing: s.missing,
                    last_error: s.last_error.clone().unwrap_or_default(),
                    refused: s.refused,
                    skipping: s.skipping,
                    held: s.held.clone().unwrap_or_default(),
                    unwatched: s.unwatched.clone().unwrap_or_default(),
                    paused: s.paused.is_some(),
                    paused_reason: s
                        .paused
                        .as_ref()
                        .map(|p| p.reason.clone())
                        .unwrap_or_default(),
                    paused_since_ms: s.paused.as_ref().map_or(0, |p| p.since_ms),
                    paused_until_ms: s.paused.as_ref().and_then(|p| p.until_ms).unwrap_or(0),
                    paused_by: s.paused.as_ref().map(|p| p.by.clone()).unwrap_or_default(),
                    recent_seq: s.recent.iter().map(|r| r.0).collect(),
                    recent_at_ms: s.recent.iter().map(|r| r.1).collect(),
                    accounts: s.accounts.as_ref().map(|a| peer::AccountsStatus {
                        users: a.users,
                        groups: a.groups,
                        refused: a
                            .refused
                            .iter()
                            .map(|r| peer::RefusedRecord {
                                kind: r.kind.clone(),
                                name: r.name.clone(),
                                id: r.id,
                                reason: r.reason.clone(),
                            })
                            .collect(),
                        local_malformed: a.local_malformed.clone(),
                        pending: a.pending,
                        merged_index: a.merged_index,
                    }),
                })
                .collect(),
            bytes_proposed: f.bytes_proposed,
            bytes_saved: f.bytes_saved,
            bytes_fetched: f.bytes_fetched,
            wire_bytes_sent: f.wire_bytes_sent,
            quarantined: f.quarantined,
            on_change_failures: f.on_change_failures,
            role_hook_failures: f.role_hook_failures,
            files_linked: f.files_linked,
        }
    }
}

impl From<&peer::FilesStatus> for FilesView {
    fn from(f: &peer::FilesStatus) -> Self {
        FilesView {
            sets: f
                .sets
                .iter()
                .map(|s| SetView {
                    name: s.name.clone(),
                    files: s.files,
                    bytes: s.bytes,
                    applied_index: s.applied_index,
                    seq: s.seq,
                    committed_bytes: s.committed_bytes,
                    missing: s.missing,
                    last_error: (!s.last_error.is_empty()).then(|| s.last_error.clone()),
                    refused: s.refused,
                    skipping: s.skipping,
                    held: (!s.held.is_empty()).then(|| s.held.clone()),
                    unwatched: (!s.unwatched.is_empty()).then(|| s.unwatched.clone()),
                    paused: s.paused.then(|| crate::core::manifest::Pause {
                        reason: s.paused_reason.clone(),
                        since_ms: s.paused_since_ms,
                        until_ms: (s.paused_until_ms > 0).then_some(s.paused_until_ms),
                        by: s.paused_by.clone(),
                    }),
                    recent: s
                        .recent_seq
                        .iter()
                        .copied()
                        .zip(s.recent_at_ms.iter().copied())
                        .collect(),
                    accounts: s
                        .accounts
                        .as_ref()
                        .map(|a| crate::core::status::AccountsView {
                            users: a.users,
                            groups: a.groups,
                            refused: a
                                .refused
                                .iter()
                                .map(|r| crate::core::status::RefusedRecord {
                                    kind: r.kind.clone(),
                                    name: r.name.clone(),
                                    id: r.id,
                                    reason: r.reason.clone(),
                                })
                                .collect(),
                            local_malformed: a.local_malformed.clone(),
                            pending: a.pending,
                            merged_index: a.merged_index,
                        }),
                })
                .collect(),
            bytes_proposed: f.bytes_proposed,
            bytes_saved: f.bytes_saved,
            bytes_fetched: f.bytes_fetched,
            wire_bytes_sent: f.wire_bytes_sent,
            quarantined: f.quarantined,
            on_change_failures: f.on_change_failures,
            role_hook_failures: f.role_hook_failures,
            files_linked: f.files_linked,
        }
    }
}

#[cfg(feature = "node")]
impl From<&crate::core::manifest::StagedVersion> for peer::StagedVersion {
    fn from(v: &crate::core::manifest::StagedVersion) -> Self {
        peer::StagedVersion {
            offset: v.offset,
            len: v.len,
            digest: v.digest.to_bytes().to_vec(),
            meta: v
                .meta
                .as_ref()
                .and_then(|m| postcard::to_allocvec(m).ok())
                .unwrap_or_default(),
        }
    }
}

#[cfg(feature = "node")]
impl TryFrom<&peer::StagedVersion> for crate::core::manifest::StagedVersion {
    type Error = String;
    fn try_from(v: &peer::StagedVersion) -> Result<Self, String> {
        let digest: &[u8; crate::core::delta::FileDigest::ENCODED_LEN] =
            v.digest.as_slice().try_into().map_err(|_| {
                format!(
                    "a staged version's digest must be {} bytes, not {}",
                    crate::core::delta::FileDigest::ENCODED_LEN,
                    v.digest.len()
                )
            })?;
        Ok(crate::core::manifest::StagedVersion {
            offset: v.offset,
            len: v.len,
            digest: crate::core::delta::FileDigest::from_bytes(digest),
            // Only an optimisation: unreadable metadata is set when applied.
            meta: postcard::from_bytes(&v.meta).ok(),
        })
    }
}

/// A path's state at a revision ([`crate::core::history::At`]) as
/// the admin service answers it.
pub fn version_reply(revision: u64, at: crate::core::history::At) -> admin::VersionReply {
    use crate::core::manifest::EntryKind;
    let Some(entry) = at.entry else {
        return admin::VersionReply {
            exists: false,
            changed_at: at.changed_at.unwrap_or(0),
            revision,
            ..Default::default()
        };
    };
    admin::VersionReply {
        exists: true,
        changed_at: at.changed_at.unwrap_or(0),
        kind: match entry.meta.kind {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
        }
        .to_string(),
        mode: entry.meta.mode,
        uid: entry.meta.uid,
        gid: entry.meta.gid,
        mtime_unix_ns: entry
            .meta
            .mtime_ns
            .clamp(i64::MIN as i128, i64::MAX as i128) as i64,
        content: at.content.unwrap_or_default(),
        symlink_target: entry.target.unwrap_or_default(),
        revision,
    }
}

/// A `clusterctl member` request as the core's change: the one place the
/// wire form becomes a [`MemberChange`]. Refusals are one sentence.
pub fn member_change(req: &peer::MemberChangeRequest) -> Result<MemberChange, String> {
    if req.id == 0 {
        return Err("node id 0 is reserved; pick an id from 1 up".to_string());
    }
    match req.kind.as_str() {
        "add" => {
            let addr = req.addr.trim();
            if addr.is_empty() || !addr.contains(':') {
                return Err(format!(
                    "--addr {addr:?} is not HOST:PORT; give the new node's peer address (its `node.listen`, or how the others reach it)"
                ));
            }
            if req.keep_learner && req.witness {
                return Err("a witness votes, so it cannot also stay a learner: use --witness or --learner, not both".to_string());
            }
            Ok(MemberChange::Add(MemberInfo {
                id: req.id,
                addr: addr.to_string(),
                witness: req.witness,
                keep_learner: req.keep_learner,
                replaces: (req.replaces != 0).then_some(req.replaces),
                added_at: 0,
            }))
        }
        "remove" => Ok(MemberChange::Remove(req.id)),
        other => Err(format!(
            "unknown membership change {other:?} (a newer clusterctl?); use add or remove"
        )),
    }
}

/// The members a leader introduces to a joining node (see
/// `NodeStatusRequest::members`), as the transport takes them.
pub fn member_addresses(members: &[peer::MemberAddress]) -> Vec<MemberInfo> {
    members
        .iter()
        .filter(|m| m.id != 0 && !m.addr.is_empty())
        .map(|m| MemberInfo {
            id: m.id,
            addr: m.addr.clone(),
            witness: m.witness,
            keep_learner: false,
            replaces: None,
            added_at: m.added_at,
        })
        .collect()
}

/// What a leader tells a joining node of the members it knows.
pub fn introductions(members: &[MemberInfo]) -> Vec<peer::MemberAddress> {
    members
        .iter()
        .map(|m| peer::MemberAddress {
            id: m.id,
            addr: m.addr.clone(),
            witness: m.witness,
            added_at: m.added_at,
        })
        .collect()
}
