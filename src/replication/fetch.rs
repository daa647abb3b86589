//! Catch-up outside the log: a node whose tree lacks the committed version
//! of a file (after a snapshot, a skipped set, a delta whose base it did
//! not have, a failed write) asks a peer for exactly that version, as a
//! patch against what it holds. Both halves live here: the server side
//! (answering `Fetch`) and the fetcher task.
//!
//! Invariant owned here: a peer serves a version only if its own file is
//! byte-for-byte the requested committed digest, and the fetching node hands
//! the patch to the applier, which verifies it again and applies it only if
//! that digest is still what the manifest wants (invariant 1).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use tokio::sync::mpsc;
use tonic::Status;
use tracing::{debug, warn};

use crate::core::config::NodeId;
use crate::core::delta::{self, BlockSignature, FileDigest};
use crate::core::manifest::CHUNK_LEN;
use crate::core::paths::SetPath;
use crate::net::proto::peer::{FetchChunk, FetchRequest};
use crate::net::transport::Transport;
use crate::replication::apply::{ApplyMsg, Fetched};
use crate::replication::shared::Shared;

/// Missing paths asked for per round.
const FETCH_BATCH: usize = 256;
/// Fetches in flight at once: enough to keep a peer's disk and the link
/// busy while one answer is on its way (a file per round trip otherwise).
const FETCHES_IN_FLIGHT: usize = 8;
/// A path asked for is not asked for again before this, unless the
/// applier wrote it (and it is no longer missing) or it failed.
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(5);
/// Fetched bytes the applier may have queued before fetches wait.
const FETCHED_QUEUED_MAX: u64 = 64 << 20;
/// Deadline of one fetch call.
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// The server half: the committed version of a file as patch pieces.
pub fn serve(shared: &Shared, req: &FetchRequest) -> Result<Vec<FetchChunk>, Status> {
    let set = shared.set(&req.set).ok_or_else(|| {
        Status::not_found(format!(
            "this node does not replicate sync set {:?}",
            req.set
        ))
    })?;
    let path =
        SetPath::from_network(&req.path).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if !set.holds(&path, false) {
        return Err(Status::invalid_argument(format!(
            "{path} is not part of sync set {:?}",
            req.set
        )));
    }
    let want: [u8; FileDigest::ENCODED_LEN] = req
        .digest
        .as_slice()
        .try_into()
        .map_err(|_| Status::invalid_argument("digest must be 40 bytes"))?;
    let want = FileDigest::from_bytes(&want);
    if want.len > set.max_file_size {
        return Err(Status::invalid_argument(
            "larger than the set's max_file_size",
        ));
    }
    // "Not held" (FailedPrecondition) is a promise the asker counts on: only
    // a node that has applied this version and still lacks it may say so. A
    // node that has not applied it yet may still rebuild it from the log.
    let committed_here = shared
        .manifest
        .read()
        .unwrap()
        .get(&req.set, &path)
        .and_then(|e| e.digest)
        .is_some_and(|d| d.get() == want);
    if !committed_here {
        return Err(Status::unavailable(format!(
            "this node has not applied that version of {path}"
        )));
    }
    let root = set
        .open_root()
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let comps: Vec<&[u8]> = path.components().collect();
    let (data, _) = root
        .read_file(&comps, set.max_file_size)
        .map_err(|e| Status::unavailable(e.to_string()))?
        .ok_or_else(|| Status::failed_precondition(format!("this node has no {path}")))?;
    if delta::digest(&data) != want {
        return Err(Status::failed_precondition(format!(
            "this node's {path} is not the requested version"
        )));
    }
    let patch = match BlockSignature::from_bytes(&req.signature) {
        Ok(sig) if !req.signature.is_empty() => delta::plan_with_signature(&sig, &data).0,
        _ => delta::plan(None, &data).0,
    };
    let encoded = patch.encode();
    shared
        .counters
        .wire_bytes_sent
        .fetch_add(encoded.len() as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(encoded
        .chunks(CHUNK_LEN)
        .map(|c| FetchChunk { data: c.to_vec() })
        .collect())
}

/// The fetcher task: brings missing paths from peers, leader first,
/// several at a time, handing each to the applier (which writes them in
/// groups); it runs round after round while paths are missing and rests
/// only when it is done or everything left was asked for just now.
pub async fn run_fetcher(
    shared: Arc<Shared>,
    node: crate::raft::handle::NodeHandle,
    transport: Transport,
    applier: mpsc::UnboundedSender<ApplyMsg>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // Paths asked for recently: the applier may not have written them yet,
    // so they are not asked for again until `ASK_AGAIN_AFTER`.
    let mut asked: HashMap<(String, SetPath), Instant> = HashMap::new();
    let mut busy = false;
    loop {
        if !busy {
            tokio::select! {
                _ = shared.fetch_wakeup.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        } else if *stop.borrow() {
            return;
        }
        asked.retain(|_, at| at.elapsed() < ASK_AGAIN_AFTER);
        // Hard links (in sets that keep them here) whose primary is missing
        // too wait for it, and take no place in the round.
        let wanted: Vec<((String, SetPath), FileDigest, Option<SetPath>)> = {
            let manifest = shared.manifest.read().unwrap();
            let missing = shared.missing.lock().unwrap();
            missing
                .iter()
                .filter(|(key, _)| !asked.contains_key(*key))
                .map(|((set, path), d)| {
                    let primary = shared
                        .set(set)
                        .filter(|s| s.hard_links)
                        .and_then(|_| manifest.get(set, path)?.link.clone());
                    ((set.clone(), path.clone()), d.get(), primary)
                })
                .filter(|((set, _), _, primary)| {
                    primary
                        .as_ref()
                        .is_none_or(|p| !missing.contains_key(&(set.clone(), p.clone())))
                })
                .take(FETCH_BATCH)
                .collect()
        };
        if wanted.is_empty() {
            busy = false;
            continue;
        }
        let view = node.view();
        let mut order: Vec<NodeId> = transport.peers();
        order.sort_by_key(|p| (Some(*p) != view.leader, *p));
        let order = &order;
        let (shared_ref, transport_ref, applier_ref) = (&shared, &transport, &applier);
        let outcomes: Vec<((String, SetPath), bool)> = futures::stream::iter(wanted)
            .map(|(key, want, primary)| async move {
                let (set, path) = key.clone();
                let handed = fetch_path(
                    shared_ref,
                    transport_ref,
                    applier_ref,
                    order,
                    set,
                    path,
                    want,
                    primary,
                )
                .await;
                (key, handed)
            })
            .buffer_unordered(FETCHES_IN_FLIGHT)
            .collect()
            .await;
        // From the end of the round: what was handed over may wait a while
        // in the applier's queue before it is no longer missing.
        let now = Instant::now();
        // Rest between rounds unless something arrived: peers that refuse
        // at once must not turn this into a loop reading local files.
        busy = outcomes.iter().any(|(_, handed)| *handed);
        for (key, _) in outcomes {
            asked.insert(key, now);
        }
    }
}

/// Brings one missing path: from the first peer in `order` that holds its
/// committed version, as a patch against what this node has. True when it
/// was handed to the applier.
#[allow(clippy::too_many_arguments)]
async fn fetch_path(
    shared: &Arc<Shared>,
    transport: &Transport,
    applier: &mpsc::UnboundedSender<ApplyMsg>,
    order: &[NodeId],
    set: String,
    path: SetPath,
    want: FileDigest,
    primary: Option<SetPath>,
) -> bool {
    // A hard link is made from its primary, never fetched: the applier
    // links it (or asks for the primary).
    if primary.is_some() {
        let _ = applier.send(ApplyMsg::Fetched(Fetched {
            set,
            path,
            want,
            patch: Vec::new(),
        }));
        return true;
    }
    // Bounded memory: wait while the applier has much fetched content to write.
    while shared.fetched_queued.load(Ordering::Relaxed) > FETCHED_QUEUED_MAX {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sig = {
        let s = shared.clone();
        let (set, path) = (set.clone(), path.clone());
        tokio::task::spawn_blocking(move || local_signature(&s, &set, &path))
            .await
            .unwrap_or_default()
    };
    // Data nodes that answered they do not hold this version.
    let mut lacking: BTreeSet<NodeId> = BTreeSet::new();
    for &peer in order {
        match fetch_one(transport, peer, &set, &path, &want, &sig).await {
            Ok(patch) => {
                shared
                    .fetched_queued
                    .fetch_add(patch.len() as u64, Ordering::Relaxed);
                let _ = applier.send(ApplyMsg::Fetched(Fetched {
                    set,
                    path,
                    want,
                    patch,
                }));
                return true;
            }
            Err(FetchError::NotHeld(e)) => {
                lacking.insert(peer);
                debug!(peer, set = %set, path = %path, "fetch from node {peer} failed: {e}")
            }
            Err(FetchError::Other(e)) => {
                debug!(peer, set = %set, path = %path, "fetch from node {peer} failed: {e}")
            }
        }
    }
    let data_peers = shared.data_peers.read().unwrap().clone();
    if !data_peers.is_empty() && data_peers.is_subset(&lacking) {
        let mut gone = shared.unobtainable.lock().unwrap();
        if gone.insert((set.clone(), path.clone()), want) != Some(want) {
            warn!(set = %set, path = %path, "no node holds the committed version {want} of {path} in sync set {set:?} any more (every copy was edited before it arrived); a leader will propose its own copy, and the other copies go to quarantine");
        }
    }
    false
}

fn local_signature(shared: &Shared, set: &str, path: &SetPath) -> Vec<u8> {
    let Some(rt) = shared.set(set) else {
        return Vec::new();
    };
    let Ok(root) = rt.open_root() else {
        return Vec::new();
    };
    let comps: Vec<&[u8]> = path.components().collect();
    match root.read_file(&comps, rt.max_file_size) {
        Ok(Some((data, _))) if data.len() >= delta::SMALL_FILE_LEN => {
            BlockSignature::compute(&data).to_bytes()
        }
        _ => Vec::new(),
    }
}

/// Why a fetch failed: the peer definitely does not hold the version, or
/// anything else (unreachable, timed out, refused for another reason).
enum FetchError {
    NotHeld(String),
    Other(String),
}

async fn fetch_one(
    transport: &Transport,
    peer: NodeId,
    set: &str,
    path: &SetPath,
    want: &FileDigest,
    signature: &[u8],
) -> Result<Vec<u8>, FetchError> {
    let other = |m: &str| FetchError::Other(m.to_string());
    let mut client = transport
        .bulk_client(peer)
        .ok_or_else(|| other("no link"))?;
    let mut req = tonic::Request::new(FetchRequest {
        set: set.to_string(),
        path: path.as_bytes().to_vec(),
        digest: want.to_bytes().to_vec(),
        signature: signature.to_vec(),
    });
    req.set_timeout(FETCH_TIMEOUT);
    let call = async {
        let status = |s: tonic::Status| match s.code() {
            tonic::Code::FailedPrecondition => FetchError::NotHeld(s.message().to_string()),
            _ => FetchError::Other(s.message().to_string()),
        };
        let mut stream = client.fetch(req).await.map_err(status)?.into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(status)? {
            out.extend_from_slice(&chunk.data);
            // Bound what a peer can make us hold: a patch is never much larger
            // than the file (zstd of incompressible data adds a little).
            if out.len() as u64 > want.len + want.len / 8 + (1 << 20) {
                return Err(other("the patch is larger than the file could need"));
            }
        }
        Ok(out)
    };
    tokio::time::timeout(FETCH_TIMEOUT, call)
        .await
        .map_err(|_| other("timed out"))?
}
