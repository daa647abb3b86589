//! The proposal pipeline: batches flushed, their large content staged on
//! the followers (`Stage` RPC) while earlier batches commit, proposals paced
//! by what followers have applied.

use super::*;
/// Proposes what `b` holds (chunks first, in windows, then the batch), in
/// order, keeping at most [`MAX_IN_FLIGHT`] proposals unapplied; with
/// `wait_all`, returns once everything proposed in this pass applied here.
pub(super) fn flush(
    shared: &Shared,
    node: &NodeHandle,
    transport: &Transport,
    rt: &tokio::runtime::Handle,
    term: u64,
    set: &SetRuntime,
    b: &mut Builder,
    wait_all: bool,
) -> Result<(), RequestError> {
    if !b.signatures.is_empty() {
        let _ = shared
            .store
            .write_relaxed(std::mem::take(&mut b.signatures));
    }
    if !b.ops.is_empty() {
        // Stage this batch's content in the background while the next ones
        // are read; the batch itself is proposed at a later flush, when
        // [`STAGING_DEPTH`] batches (or [`STAGING_BYTES`]) are staging, after
        // those before it.
        while b.staged.len() >= STAGING_DEPTH
            || (!b.staged.is_empty() && staging_bytes(&b.staged) + b.blob.len() > STAGING_BYTES)
        {
            let oldest = b.staged.pop_front().expect("non-empty");
            propose_batch(shared, node, transport, rt, term, set, oldest, b)?;
        }
        let blob = std::mem::take(&mut b.blob);
        let staging = (!blob.is_empty()).then(|| {
            // Shared by every follower's pieces without a copy.
            let blob = prost::bytes::Bytes::from(blob);
            let paused = shared
                .staging_paused_until
                .lock()
                .unwrap()
                .is_some_and(|until| Instant::now() < until);
            let versions = Arc::new(staged_versions(&b.ops));
            let task = (!paused).then(|| {
                start_staging(
                    shared,
                    node,
                    transport,
                    rt,
                    b.blob_upload,
                    blob.clone(),
                    versions,
                )
            });
            (b.blob_upload, blob, task)
        });
        let batch = ReadyBatch {
            ops: std::mem::take(&mut b.ops),
            pending: std::mem::take(&mut b.pending),
            staging,
        };
        b.bytes = 0;
        b.staged.push_back(batch);
    }
    if wait_all {
        while let Some(oldest) = b.staged.pop_front() {
            propose_batch(shared, node, transport, rt, term, set, oldest, b)?;
        }
        while let Some(rx) = b.in_flight.pop_front() {
            await_applied(rt, rx)?;
        }
    }
    Ok(())
}

/// Bytes of the staged content `staged` holds.
pub(super) fn staging_bytes(staged: &std::collections::VecDeque<ReadyBatch>) -> usize {
    staged
        .iter()
        .filter_map(|r| r.staging.as_ref())
        .map(|(_, blob, _)| blob.len())
        .sum()
}

/// A batch whose content is being staged, proposed once that is done.
pub(super) struct ReadyBatch {
    pub(super) ops: Vec<FileOp>,
    /// What the source read of each path (see `Shared::pending_local`).
    pub(super) pending: Vec<(SetPath, crate::replication::files_store::LocalRecord)>,
    /// The upload its `Content::Blob`s point into, its bytes and the task
    /// staging them (true: enough followers hold them; none: staging is
    /// paused, the content goes through the log).
    pub(super) staging: Option<(
        u64,
        prost::bytes::Bytes,
        Option<tokio::task::JoinHandle<bool>>,
    )>,
}

/// Proposes `batch` once its staging finished: its content through the log
/// first (as chunks) if too few followers hold it.
pub(super) fn propose_batch(
    shared: &Shared,
    node: &NodeHandle,
    transport: &Transport,
    rt: &tokio::runtime::Handle,
    term: u64,
    set: &SetRuntime,
    batch: ReadyBatch,
    b: &mut Builder,
) -> Result<(), RequestError> {
    let mut ops = batch.ops;
    if let Some((upload, blob, task)) = batch.staging {
        let started = Instant::now();
        let staged = match task {
            Some(task) => rt.block_on(task).unwrap_or(false),
            None => false,
        };
        b.waited.staging += started.elapsed();
        if staged {
            // Proposed beside the log: counted here, as the node task counts
            // what it proposes in entries.
            shared
                .counters
                .bytes_proposed
                .fetch_add(blob.len() as u64, Ordering::Relaxed);
        } else {
            let mut paused = shared.staging_paused_until.lock().unwrap();
            if paused.is_none_or(|until| Instant::now() >= until) {
                info!(set = %set.name, upload, bytes = blob.len(), "not every active follower could stage a batch's content (see their logs); sending it, and content for the next {}s, through the log", STAGING_PAUSE.as_secs());
                *paused = Some(Instant::now() + STAGING_PAUSE);
            }
            drop(paused);
            let chunks = through_the_log(&mut ops, &blob);
            let mut own = shared.own_uploads.lock().unwrap();
            own.extend(chunks.iter().map(|c| c.upload));
            drop(own);
            let mut chunks = chunks.into_iter().peekable();
            while chunks.peek().is_some() {
                let commands: Vec<Command> = chunks
                    .by_ref()
                    .take(CHUNK_WINDOW)
                    .map(Command::Chunk)
                    .collect();
                submit(
                    shared,
                    node,
                    transport,
                    rt,
                    term,
                    commands,
                    Duration::from_secs(120),
                    b,
                )?;
            }
        }
    }
    {
        let mut pending = shared.pending_local.lock().unwrap();
        for (p, r) in batch.pending {
            pending.insert((set.name.clone(), p), r);
        }
    }
    debug!(set = %set.name, ops = ops.len(), waited = ?b.waited, "proposing a batch");
    let command = Command::Files(FileBatch {
        set: set.name.clone(),
        origin: shared.node_id,
        proposed_at_ms: unix_ms(),
        ops,
    });
    submit(
        shared,
        node,
        transport,
        rt,
        term,
        vec![command],
        Duration::from_secs(120),
        b,
    )
}

/// Rewrites the [`Content::Blob`]s of `ops` (pointing into `blob`) to
/// carry their patches through the log, exactly as releases before staged
/// content did: inline up to [`INLINE_LIMIT`], else as [`Chunk`]s of an
/// upload of their own (returned, to be proposed before the batch) and a
/// [`Content::Staged`] reference. So a batch that could not be staged on
/// every active follower is also one that any older release applies.
pub(crate) fn through_the_log(ops: &mut [FileOp], blob: &[u8]) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    for op in ops {
        let FileOp::Put { content, .. } = op else {
            continue;
        };
        let Content::Blob { offset, len, .. } = *content else {
            continue;
        };
        let patch = &blob[offset as usize..(offset + len) as usize];
        *content = if patch.len() <= INLINE_LIMIT {
            Content::Inline(patch.to_vec())
        } else {
            let upload: u64 = rand::random();
            for (i, piece) in patch.chunks(CHUNK_LEN).enumerate() {
                chunks.push(Chunk {
                    upload,
                    offset: (i * CHUNK_LEN) as u64,
                    data: piece.to_vec(),
                });
            }
            Content::Staged { upload, len }
        };
    }
    chunks
}

/// The file versions whose patches `ops`' [`Content::Blob`]s point to, as
/// followers need them to write whole new content as finished files when
/// they stage it (see [`Shared::finish_upload`](crate::replication::shared::Shared::finish_upload)).
pub(super) fn staged_versions(ops: &[FileOp]) -> Vec<StagedVersion> {
    ops.iter()
        .filter_map(|op| match op {
            FileOp::Put {
                digest,
                content: Content::Blob { offset, len, .. },
                meta,
                ..
            } => Some(StagedVersion {
                offset: *offset,
                len: *len,
                digest: digest.get(),
                meta: Some(meta.clone()),
            }),
            _ => None,
        })
        .collect()
}

/// Sends the content of a batch about to be proposed (`blob`, the patches
/// its [`Content::Blob`]s point into) to every data follower Raft sees as
/// active, in pieces, the last one durable (`Stage` RPC), in a task. The
/// task is true when every one of them holds it, and they are enough that
/// any majority of the cluster without this leader includes one (at least
/// as many as the cluster tolerates failures, and at least one). Only then
/// may the batch reference it, so a committed change survives this leader
/// dying right after the commit; a follower that was down meanwhile
/// fetches the file from one that holds it. False: the caller sends it
/// through the log instead ([`through_the_log`]), as older releases did,
/// which also keeps a follower that refused it (an older release has no
/// `Stage`, a full disk) applying every batch.
pub(super) fn start_staging(
    shared: &Shared,
    node: &NodeHandle,
    transport: &Transport,
    rt: &tokio::runtime::Handle,
    upload: u64,
    blob: prost::bytes::Bytes,
    versions: Arc<Vec<StagedVersion>>,
) -> tokio::task::JoinHandle<bool> {
    let view = node.view();
    // Learners receive staged content too but are no part of the quorum.
    let voters = view.members.voters.len().max(1);
    let needed = voters.saturating_sub(voters / 2 + 1).max(1);
    let witnesses = shared.witness_peers.read().unwrap().clone();
    let data_peers: Vec<u64> = view
        .progress
        .iter()
        .filter(|p| p.id != view.id && !witnesses.contains(&p.id))
        .map(|p| p.id)
        .collect();
    let targets: Vec<u64> = data_peers
        .iter()
        .copied()
        .filter(|&p| peer_applied(transport, p).is_some_and(|(_, age)| age <= ANSWERED_WITHIN))
        .collect();
    // A follower that was down meanwhile applies the batch from the log
    // later: only a data peer known to stage (so running a release that
    // knows `Content::Blob`) may miss it.
    let all_capable = {
        let capable = shared.stage_capable.lock().unwrap();
        data_peers
            .iter()
            .all(|p| targets.contains(p) || capable.contains(p))
    };
    let transport = transport.clone();
    let capable = shared.stage_capable.clone();
    rt.spawn(async move {
        if targets.len() < needed {
            return false;
        }
        let sends = targets
            .iter()
            .map(|&peer| stage_on(&transport, peer, upload, &blob, &versions));
        let held = futures::future::join_all(sends).await;
        {
            let mut capable = capable.lock().unwrap();
            for (&peer, &ok) in targets.iter().zip(&held) {
                if ok {
                    capable.insert(peer);
                }
            }
        }
        all_capable && held.iter().all(|&ok| ok)
    })
}

/// Sends `blob` to `peer` as staged upload `upload`, listing `versions` in
/// the last piece; true once it holds it durably.
pub(super) async fn stage_on(
    transport: &Transport,
    peer: u64,
    upload: u64,
    blob: &prost::bytes::Bytes,
    versions: &[StagedVersion],
) -> bool {
    let Some(client) = transport.bulk_client(peer) else {
        return false;
    };
    let pieces = blob.len().div_ceil(STAGE_PIECE);
    // The first piece alone (a follower refuses a later piece of an upload
    // it holds nothing of), then the middle ones STAGE_PIECES_IN_FLIGHT at
    // a time, so a link with a long round trip never idles between two
    // pieces, then the last, which makes the whole upload durable.
    let send = |i: usize| {
        stage_piece(
            transport,
            client.clone(),
            peer,
            upload,
            blob,
            versions,
            i,
            pieces,
        )
    };
    if !send(0).await {
        return false;
    }
    use futures::StreamExt;
    let middle = futures::stream::iter(1..pieces.saturating_sub(1))
        .map(send)
        .buffer_unordered(STAGE_PIECES_IN_FLIGHT)
        .all(|ok| async move { ok })
        .await;
    middle && (pieces < 2 || send(pieces - 1).await)
}

/// Sends piece `i` of the `pieces` of `blob` to `peer` (see [`stage_on`]).
#[allow(clippy::too_many_arguments)]
async fn stage_piece(
    transport: &Transport,
    mut client: crate::net::proto::peer::peer_client::PeerClient<tonic::transport::Channel>,
    peer: u64,
    upload: u64,
    blob: &prost::bytes::Bytes,
    versions: &[StagedVersion],
    i: usize,
    pieces: usize,
) -> bool {
    {
        let last = i + 1 == pieces;
        let piece = blob.slice(i * STAGE_PIECE..blob.len().min((i + 1) * STAGE_PIECE));
        let mut req = tonic::Request::new(crate::net::proto::peer::StageRequest {
            upload,
            offset: (i * STAGE_PIECE) as u64,
            data: piece.clone(),
            durable: last,
            versions_follow: true,
            versions: match last {
                true => versions.iter().map(Into::into).collect(),
                false => Vec::new(),
            },
        });
        // The last call writes back and fsyncs the whole upload (and the
        // files made of it), beside up to STAGING_DEPTH others.
        req.set_timeout(match last {
            true => STAGE_TIMEOUT + Duration::from_secs(blob.len() as u64 / (5 << 20)),
            false => STAGE_TIMEOUT,
        });
        if let Err(e) = client.stage(req).await {
            debug!(
                peer,
                upload,
                "staging content on node {peer} failed: {}",
                e.message()
            );
            return false;
        }
        transport.count_sent(piece.len() as u64);
    }
    true
}

/// Hands `commands` to the node task (in order) and tracks the reply.
pub(super) fn submit(
    shared: &Shared,
    node: &NodeHandle,
    transport: &Transport,
    rt: &tokio::runtime::Handle,
    term: u64,
    commands: Vec<Command>,
    wait: Duration,
    b: &mut Builder,
) -> Result<(), RequestError> {
    let started = Instant::now();
    while b.in_flight.len() >= MAX_IN_FLIGHT {
        let rx = b.in_flight.pop_front().expect("non-empty");
        await_applied(rt, rx)?;
    }
    let applied = Instant::now();
    b.waited.own_apply += applied - started;
    wait_for_followers(shared, node, transport);
    b.waited.followers += applied.elapsed();
    let rx = rt.block_on(node.propose_start(term, commands, wait))?;
    b.in_flight.push_back(rx);
    Ok(())
}

/// Waits while a follower that is answering and keeping up falls more than
/// [`FOLLOWER_APPLY_WINDOW`] entries behind what this leader applied.
///
/// Without it a bulk transfer commits as fast as followers can append to
/// their logs, and their appliers (which write and fsync every file) fall
/// hundreds of MiB behind: what `promote` waits for and a failover to them
/// has to catch up (and, for content in the log, entries that outlive the
/// log's memtable and are written twice). A follower that stopped
/// answering (no report for a second), that is catching up (more than
/// [`FOLLOWER_CATCHING_UP`] behind) or whose applier stopped advancing (for
/// [`FOLLOWER_STALL`]) holds nobody back.
pub(super) fn wait_for_followers(shared: &Shared, node: &NodeHandle, transport: &Transport) {
    loop {
        let view = node.view();
        if view.role != Role::Leader {
            return;
        }
        let ours = view.applied_index;
        let mut waiting = false;
        for p in view
            .progress
            .iter()
            .filter(|p| p.id != view.id && p.recent_active)
        {
            let Some((applied, age)) = peer_applied(transport, p.id) else {
                continue;
            };
            // When each follower's applied index last moved, across calls:
            // a stalled one must not cost every proposal FOLLOWER_STALL.
            let unmoved = {
                let mut moved = shared.follower_applied_moved.lock().unwrap();
                let (last, since) = moved.entry(p.id).or_insert((applied, Instant::now()));
                if applied != *last {
                    (*last, *since) = (applied, Instant::now());
                }
                since.elapsed()
            };
            waiting |= holds_back(ours.saturating_sub(applied), age, unmoved);
        }
        if !waiting {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a follower `behind` entries behind, whose last report is
/// `report_age` old and whose applied index has not moved for `unmoved`,
/// makes the source wait (see [`wait_for_followers`]).
pub(super) fn holds_back(behind: u64, report_age: Duration, unmoved: Duration) -> bool {
    report_age <= ANSWERED_WITHIN
        && behind > FOLLOWER_APPLY_WINDOW
        && behind <= FOLLOWER_CATCHING_UP
        && unmoved < FOLLOWER_STALL
}

pub(super) fn await_applied(
    rt: &tokio::runtime::Handle,
    rx: tokio::sync::oneshot::Receiver<Result<u64, RequestError>>,
) -> Result<(), RequestError> {
    rt.block_on(rx).map_err(|_| RequestError::ShuttingDown)??;
    Ok(())
}
