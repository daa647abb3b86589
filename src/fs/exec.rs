//! Running the user's commands (`on_change`, the role hooks): through
//! `sh -c`, with extra environment, a time limit after which the whole
//! process group is killed, and the exit status and output logged.
//!
//! Invariant owned here: a command can never stall or crash the node (it
//! runs in its own process group, is killed at its limit, and its output is
//! capped in the log).

use std::process::Stdio;
use std::time::Duration;

use tracing::{info, warn};

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
