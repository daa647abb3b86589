//! The role hooks (`on_promote`, `on_demote`, `role_file`), run through
//! [`crate::fs::exec::run_command`] as the role changes.
//!
//! Invariants owned here: role hooks run one at a time in the order the role
//! changes happened, even when roles flap; the role file always holds the
//! last role, replaced atomically.

use std::time::Duration;

use tokio::sync::mpsc;
use tracing::warn;

use crate::core::config::{HooksConfig, NodeId};
use crate::core::status::Role;
use crate::fs::exec::run_command;

/// Time limit of `on_promote` and `on_demote`.
const ROLE_HOOK_LIMIT: Duration = Duration::from_secs(60);

/// A change of this node's role, as the hooks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleEvent {
    pub role: Role,
    pub term: u64,
    pub leader: Option<NodeId>,
}

/// Runs the role hooks for each event, in order, until the sender is gone.
pub async fn run_role_hooks(
    hooks: HooksConfig,
    node_id: NodeId,
    on_failure: impl Fn() + Send + 'static,
    mut events: mpsc::UnboundedReceiver<RoleEvent>,
) {
    let mut leading = false;
    if let Some(file) = &hooks.role_file {
        write_role_file(file, false).await;
    }
    while let Some(ev) = events.recv().await {
        let now_leading = ev.role == Role::Leader;
        if now_leading == leading {
            continue;
        }
        leading = now_leading;
        if let Some(file) = &hooks.role_file {
            write_role_file(file, leading).await;
        }
        let (command, what) = if leading {
            (&hooks.on_promote, "on_promote")
        } else {
            (&hooks.on_demote, "on_demote")
        };
        let Some(command) = command else { continue };
        let term = ev.term.to_string();
        let leader = ev.leader.map(|l| l.to_string()).unwrap_or_default();
        let me = node_id.to_string();
        let env = [
            ("CLUSTERD_ROLE", ev.role.as_str()),
            ("CLUSTERD_TERM", term.as_str()),
            ("CLUSTERD_LEADER_ID", leader.as_str()),
            ("CLUSTERD_NODE_ID", me.as_str()),
        ];
        let ok = run_command(
            command,
            &env,
            ROLE_HOOK_LIMIT,
            &format!("{what} (term {term})"),
        )
        .await
        .is_ok();
        if !ok {
            on_failure();
        }
    }
}

/// Writes "1" (leader) or "0" to the role file: temporary file in the same
/// directory, fsync, rename, directory fsync, like every file clusterd writes.
async fn write_role_file(path: &std::path::Path, leading: bool) {
    let path = path.to_path_buf();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let dir = path.parent().unwrap_or(std::path::Path::new("/"));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.clusterd-tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(if leading { b"1\n" } else { b"0\n" })?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("cannot write the role file (key `hooks.role_file`): {e}"),
        Err(e) => warn!("cannot write the role file (key `hooks.role_file`): {e}"),
    }
}
