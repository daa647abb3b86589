//! Running the user's commands: `on_change` per sync set, and the role hooks
//! (`on_promote`, `on_demote`, `role_file`). Commands run through `sh -c`,
//! with extra environment, a time limit after which the whole process group
//! is killed, and the exit status and output logged.
//!
//! Invariants owned here: a hook can never stall or crash the node (it runs
//! in its own process group, is killed at its limit, and its output is
//! capped in the log); role hooks run one at a time in the order the role
//! changes happened, even when roles flap; the role file always holds the
//! last role, replaced atomically.

use std::process::Stdio;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{HooksConfig, NodeId};
use crate::raft_core::Role;

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
        .await;
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

/// Output kept in the log per stream.
const OUTPUT_LOG_LIMIT: usize = 2048;

/// Runs `command` and returns whether it exited 0 within `limit`.
pub async fn run_command(command: &str, env: &[(&str, &str)], limit: Duration, what: &str) -> bool {
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = std::time::Instant::now();
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            warn!("{what}: cannot start `{command}`: {e}");
            return false;
        }
    };
    let pid = child.id();
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => {
            let stdout = clip(&out.stdout);
            let stderr = clip(&out.stderr);
            let ms = started.elapsed().as_millis();
            if out.status.success() {
                info!(
                    ms,
                    "{what}: `{command}` succeeded{}{}",
                    show("stdout", &stdout),
                    show("stderr", &stderr)
                );
                true
            } else {
                warn!(
                    ms,
                    "{what}: `{command}` failed ({}){}{}",
                    out.status,
                    show("stdout", &stdout),
                    show("stderr", &stderr)
                );
                false
            }
        }
        Ok(Err(e)) => {
            warn!("{what}: waiting for `{command}` failed: {e}");
            false
        }
        Err(_) => {
            if let Some(pid) = pid {
                // The whole group: a hook's children must not outlive it.
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                }
            }
            warn!(
                "{what}: `{command}` did not finish within {} s and was killed",
                limit.as_secs()
            );
            false
        }
    }
}

fn clip(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.len() > OUTPUT_LOG_LIMIT {
        let mut end = OUTPUT_LOG_LIMIT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes in all)", &text[..end], text.len())
    } else {
        text.to_string()
    }
}

fn show(name: &str, text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!("; {name}: {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exit_status_env_and_time_limit() {
        assert!(
            run_command(
                "test \"$X\" = 1",
                &[("X", "1")],
                Duration::from_secs(5),
                "t"
            )
            .await
        );
        assert!(!run_command("exit 3", &[], Duration::from_secs(5), "t").await);
        let t = std::time::Instant::now();
        assert!(!run_command("sleep 30", &[], Duration::from_millis(200), "t").await);
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
