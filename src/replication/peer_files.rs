//! What the peer service asks of this node's files: `Fetch` of a committed
//! version, `Stage` of a leader's upload, and the per-set view for status.
//! The network layer defines the questions ([`FileService`]); this is where
//! the replication state answers them.

use tonic::Status;

use crate::core::config::NodeId;
use crate::core::manifest::StagedVersion;
use crate::core::status::FilesView;
use crate::net::peer::{FileService, StageRefused};
use crate::net::proto::peer::{
    FetchChunk, FetchRequest, QuarantinedReply, RollbackRequest, StageRequest,
};
use crate::raft::core::Command;
use crate::raft::handle::RequestError;
use crate::replication::shared::Shared;
use crate::replication::staging::{StageFlush, StagingError};

impl FileService for Shared {
    fn is_witness(&self, peer: NodeId) -> bool {
        self.witness_peers.read().unwrap().contains(&peer)
    }

    fn holds_sets(&self) -> bool {
        !self.sets.is_empty()
    }

    fn fetch(&self, req: &FetchRequest) -> Result<Vec<FetchChunk>, Status> {
        crate::replication::fetch::serve(self, req)
    }

    fn stage(&self, r: StageRequest) -> Result<(), StageRefused> {
        stage(self, r).map_err(|e| StageRefused(Box::new(e)))
    }

    fn files_view(&self) -> FilesView {
        Shared::files_view(self)
    }

    fn set_names(&self) -> Vec<String> {
        self.sets.iter().map(|s| s.name.clone()).collect()
    }

    fn pause_of(&self, set: &str) -> Option<crate::core::manifest::Pause> {
        self.manifest.read().unwrap().paused.get(set).cloned()
    }

    fn plan_rollback(
        &self,
        req: &RollbackRequest,
        proposer: NodeId,
    ) -> Result<(String, Vec<Command>), RequestError> {
        use crate::replication::rollback;
        let plan = if req.restore_id.is_empty() {
            rollback::plan(self, &req.set, &req.paths, req.to)
        } else {
            let path = req.paths.first().ok_or_else(|| {
                RequestError::Invalid("a restore names the path it restores".to_string())
            })?;
            rollback::restore_plan(
                self,
                &req.set,
                path,
                &req.restore_id,
                req.restore_content.clone(),
                req.restore_mode,
                req.restore_uid,
                req.restore_gid,
                i128::from(req.restore_mtime_ns),
            )
        }
        .map_err(|e| RequestError::Invalid(e.to_string()))?;
        let text = plan.describe();
        if req.dry_run || plan.steps.is_empty() {
            return Ok((text, Vec::new()));
        }
        if let Err(why) = plan.check(self) {
            return Err(RequestError::Invalid(format!(
                "held: the validator of sync set {:?} refused the set as {} would leave it ({why}); nothing was changed",
                req.set, plan.heading
            )));
        }
        let commands = plan.commands(proposer).map_err(RequestError::Invalid)?;
        Ok((text, commands))
    }

    fn quarantined(&self, id: &str, drop: bool) -> Result<QuarantinedReply, String> {
        if drop {
            return self.drop_quarantined(id).map(|dropped| QuarantinedReply {
                dropped,
                ..Default::default()
            });
        }
        let q = self.quarantined(id)?;
        Ok(QuarantinedReply {
            set: q.set,
            path: q.path,
            content: q.content,
            mode: q.mode,
            uid: q.uid,
            gid: q.gid,
            mtime_ns: q.mtime_ns.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
            dropped: String::new(),
        })
    }

    fn refresh_accounts(&self, set: Option<&str>, confirm: bool) -> Result<(), String> {
        match set {
            Some(set) => crate::replication::accounts::refresh(self, set, confirm),
            None => self
                .sets
                .iter()
                .filter(|s| s.accounts.is_some())
                .try_for_each(|s| crate::replication::accounts::refresh(self, &s.name, false)),
        }
    }

    fn request_sync(
        &self,
        set: Option<String>,
    ) -> tokio::sync::oneshot::Receiver<Result<u64, String>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.sync_requests
            .lock()
            .unwrap()
            .push(crate::replication::shared::SyncAsk { set, reply });
        self.sync_wakeup.notify_one();
        rx
    }
}

/// Takes one `Stage` piece: held or written as the upload's kind asks, and
/// with the last piece of an upload whose versions follow, its finished files.
fn stage(shared: &Shared, r: StageRequest) -> Result<(), StagingError> {
    if r.versions_follow {
        shared.stage_before_finish(r.upload, r.offset, r.data)?;
        if !r.durable {
            return Ok(());
        }
        let versions = r
            .versions
            .iter()
            .map(StagedVersion::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(StagingError::BadVersion)?;
        return shared.finish_upload(r.upload, &versions);
    }
    let flush = match r.durable {
        true => StageFlush::Upload,
        false => StageFlush::Piece,
    };
    shared.stage_piece(r.upload, r.offset, &r.data, flush)
}
