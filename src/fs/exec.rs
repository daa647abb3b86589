//! Running the user's commands (`on_change`, the role hooks, validators):
//! through `sh -c`, with extra environment, a time limit after which the
//! whole process group is killed, and the exit status and output logged.
//!
//! Invariant owned here: a command can never stall or crash the node (it
//! runs in its own process group, is killed at its limit, and its output is
//! capped in the log).

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// Output kept in the log per stream.
const OUTPUT_LOG_LIMIT: usize = 2048;

/// Runs `command`: `Ok` if it exited 0 within `limit`, else one line
/// saying why (its exit status, or the time limit, with the first line of
/// its output).
pub async fn run_command(
    command: &str,
    env: &[(&str, &str)],
    limit: Duration,
    what: &str,
) -> Result<(), String> {
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
            return Err(format!("cannot start it: {e}"));
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
                Ok(())
            } else {
                warn!(
                    ms,
                    "{what}: `{command}` failed ({}){}{}",
                    out.status,
                    show("stdout", &stdout),
                    show("stderr", &stderr)
                );
                let first = stderr.lines().chain(stdout.lines()).next().unwrap_or("");
                let status = match out.status.code() {
                    Some(code) => format!("exit {code}"),
                    None => out.status.to_string(),
                };
                Err(if first.is_empty() {
                    status
                } else {
                    format!("{status}: {first}")
                })
            }
        }
        Ok(Err(e)) => {
            warn!("{what}: waiting for `{command}` failed: {e}");
            Err(format!("waiting for it failed: {e}"))
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
            Err(format!("killed after {} s", limit.as_secs()))
        }
    }
}

/// Output of a check kept for the log and status; the rest is read and
/// dropped, so a chatty validator never blocks on a full pipe.
const CHECK_OUTPUT_LIMIT: usize = 4096;

/// What a checking command (a `validate` command) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    /// It exited 0 within its time limit.
    pub passed: bool,
    /// One line for status: why it failed, with the first line of its
    /// output (empty when it passed).
    pub summary: String,
    /// Its standard output and error together, clipped.
    pub output: String,
    pub took: Duration,
}

/// Runs `command` with `sh -c` in a process group of its own, stdout and
/// stderr captured together, and waits at most `limit` (then kills the
/// group: a hanging validator counts as a failure). With `read_only` pairs
/// `(source, target)`, the command runs in a private mount namespace in
/// which each `source` is mounted read-only at its `target` (the same
/// directory, or another), in order, so nothing it does can write through
/// a `target` (see [`read_only_mounts_work`]); its start fails if that
/// cannot be set up.
/// Blocking: called from the planner's and the applier's threads.
pub fn run_check(
    command: &str,
    env: &[(&str, &str)],
    limit: Duration,
    read_only: &[(&Path, &Path)],
) -> CheckOutcome {
    let started = Instant::now();
    let failed = |summary: String| CheckOutcome {
        passed: false,
        summary,
        output: String::new(),
        took: started.elapsed(),
    };
    let (mut reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return failed(format!("cannot make a pipe for the validator: {e}")),
    };
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .process_group(0);
    match writer.try_clone() {
        Ok(w) => {
            cmd.stdout(w).stderr(writer);
        }
        Err(e) => return failed(format!("cannot make a pipe for the validator: {e}")),
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    if !read_only.is_empty() {
        let mut mounts = Vec::new();
        for (source, target) in read_only {
            let (Ok(source), Ok(target)) = (
                CString::new(source.as_os_str().as_bytes()),
                CString::new(target.as_os_str().as_bytes()),
            ) else {
                return failed("a path to mount for the validator holds a NUL byte".to_string());
            };
            mounts.push((source, target));
        }
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(move || private_read_only(&mounts));
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return failed(format!("cannot start the validator: {e}")),
    };
    // Our copies of the pipe's write end go with `cmd`: the reader sees
    // the end of the output once the command's group has closed it.
    drop(cmd);
    let pid = child.id() as i32;
    let output = std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = CHECK_OUTPUT_LIMIT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
        kept
    });
    let (done_tx, done_rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = done_tx.send(());
        status
    });
    let timed_out = done_rx.recv_timeout(limit).is_err();
    // The whole group, also after a normal exit: nothing a validator
    // started may outlive it (or hold the output pipe open).
    // SAFETY: a plain kill(2) of the group we created.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let status = waiter.join().ok().and_then(|s| s.ok());
    let output = output.join().unwrap_or_default();
    let output = clip(&output);
    let first_line = output.lines().next().unwrap_or("").trim();
    let first_line = first_line.chars().take(200).collect::<String>();
    let with_output = |why: String| {
        if first_line.is_empty() {
            why
        } else {
            format!("{why}: {first_line}")
        }
    };
    let (passed, summary) = match status {
        _ if timed_out => (
            false,
            with_output(format!(
                "validator timed out after {} ms",
                limit.as_millis()
            )),
        ),
        Some(s) if s.success() => (true, String::new()),
        Some(s) => match s.code() {
            Some(code) => (false, with_output(format!("validator exited {code}"))),
            None => (false, with_output(format!("validator was killed ({s})"))),
        },
        None => (false, "the validator's exit status was lost".to_string()),
    };
    CheckOutcome {
        passed,
        summary,
        output,
        took: started.elapsed(),
    }
}

/// In the child, before exec: a private mount namespace in which each
/// `target` is a read-only bind mount of its `source`.
fn private_read_only(mounts: &[(CString, CString)]) -> std::io::Result<()> {
    let check = |r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain syscalls with valid NUL-terminated strings.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        for (source, target) in mounts {
            check(libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
                std::ptr::null(),
            ))?;
        }
        Ok(())
    }
}

/// Whether commands can be run with a read-only view of a directory
/// ([`run_check`]'s `read_only`): needs CAP_SYS_ADMIN and mount
/// namespaces (root outside a hardened unit; not under systemd with
/// `RestrictNamespaces` or without CAP_SYS_ADMIN). Tried once, on `probe_dir`.
pub fn read_only_mounts_work(probe_dir: &Path) -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        run_check(
            "true",
            &[],
            Duration::from_secs(10),
            &[(probe_dir, probe_dir)],
        )
        .passed
    })
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

    #[test]
    fn a_check_reports_status_output_and_time_limit() {
        let ok = run_check(
            "test \"$X\" = 1",
            &[("X", "1")],
            Duration::from_secs(5),
            &[],
        );
        assert!(ok.passed && ok.summary.is_empty(), "{ok:?}");
        let bad = run_check(
            "echo 'line 3: syntax error' >&2; echo more; exit 3",
            &[],
            Duration::from_secs(5),
            &[],
        );
        assert!(!bad.passed);
        assert_eq!(bad.summary, "validator exited 3: line 3: syntax error");
        assert!(bad.output.contains("more"));
        let t = Instant::now();
        // A child that keeps the pipe open must not keep us waiting either.
        let hung = run_check("sleep 30 & sleep 30", &[], Duration::from_millis(200), &[]);
        assert!(!hung.passed);
        assert!(
            hung.summary.starts_with("validator timed out after 200 ms"),
            "{hung:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        let chatty = run_check(
            "yes | head -c 1000000; exit 1",
            &[],
            Duration::from_secs(5),
            &[],
        );
        assert!(!chatty.passed && chatty.output.len() < 5000);
    }

    #[test]
    fn a_read_only_view_refuses_writes_where_mounts_work() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "x").unwrap();
        if !read_only_mounts_work(dir.path()) {
            eprintln!("mount namespaces are not available here; the copy fallback is used instead");
            return;
        }
        let path = dir.path().display().to_string();
        let out = run_check(
            &format!("echo y > {path}/f"),
            &[],
            Duration::from_secs(5),
            &[(dir.path(), dir.path())],
        );
        assert!(!out.passed, "{out:?}");
        assert_eq!(std::fs::read_to_string(dir.path().join("f")).unwrap(), "x");
        let read = run_check(
            &format!("grep -q x {path}/f"),
            &[],
            Duration::from_secs(5),
            &[(dir.path(), dir.path())],
        );
        assert!(read.passed, "{read:?}");
        // Another directory's view: the live one stays writable outside.
        let view = tempfile::tempdir().unwrap();
        let shown = view.path().display().to_string();
        let out = run_check(
            &format!("grep -q x {shown}/f && ! touch {shown}/g"),
            &[],
            Duration::from_secs(5),
            &[(dir.path(), view.path())],
        );
        assert!(out.passed, "{out:?}");
        assert!(!dir.path().join("g").exists());
    }

    #[tokio::test]
    async fn exit_status_env_and_time_limit() {
        assert!(run_command(
            "test \"$X\" = 1",
            &[("X", "1")],
            Duration::from_secs(5),
            "t"
        )
        .await
        .is_ok());
        assert_eq!(
            run_command(
                "echo reload failed >&2; exit 3",
                &[],
                Duration::from_secs(5),
                "t"
            )
            .await,
            Err("exit 3: reload failed".to_string())
        );
        let t = std::time::Instant::now();
        assert!(
            run_command("sleep 30", &[], Duration::from_millis(200), "t")
                .await
                .is_err()
        );
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
