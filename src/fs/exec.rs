//! Running the user's commands (`on_change`, the role hooks, validators):
//! through `sh -c`, with extra environment, a time limit after which the
//! whole process group is killed, and the exit status and output logged.
//!
//! Invariant owned here: a command can never stall or crash the node (it
//! runs in its own process group, is killed at its limit, and its output is
//! capped in the log).

use std::ffi::CString;
use std::io::Read;
use std::os::fd::AsRawFd;
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
/// group: a hanging validator counts as a failure). With `view`, the
/// command runs in that mount namespace, where what it protects is
/// read-only (see [`ReadOnlyView`]).
/// Blocking: called from the planner's and the applier's threads.
pub fn run_check(
    command: &str,
    env: &[(&str, &str)],
    limit: Duration,
    view: Option<&ReadOnlyView>,
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
    let (pid, wait): (
        i32,
        Box<dyn FnOnce() -> Option<std::process::ExitStatus> + Send>,
    ) = match view {
        None => {
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
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => return failed(format!("cannot start the validator: {e}")),
            };
            // Our copies of the pipe's write end go with `cmd`: the reader
            // sees the end of the output once the command's group closed it.
            drop(cmd);
            (child.id() as i32, Box::new(move || child.wait().ok()))
        }
        Some(view) => {
            let enter = namespaced::Setup::Enter(view.namespace.as_raw_fd());
            let pid = match namespaced::spawn(command, env, enter, None, writer) {
                Ok(pid) => pid,
                Err(e) => return failed(format!("cannot start the validator: {e}")),
            };
            (pid, Box::new(move || namespaced::wait(pid)))
        }
    };
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
        let status = wait();
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
    let status = waiter.join().ok().flatten();
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

/// Starting a command in a private mount namespace without copying the
/// node: `clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn` does, where a
/// fork (what `Command::pre_exec` needs) copies the page tables of a
/// process of tens of MiB and then pays a page fault for every page either
/// side writes until the exec. Measured in a node: a validator run took
/// about 3 ms with the fork and the mounts.
mod namespaced {
    use std::ffi::CString;
    use std::io;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::ExitStatusExt;

    /// What the child reads; everything allocated before the clone, since
    /// the child runs on the parent's memory and must not allocate.
    struct ChildArgs {
        argv: Vec<*const libc::c_char>,
        envp: Vec<*const libc::c_char>,
        /// A namespace to enter, or -1 to make one with `mounts`.
        enter: libc::c_int,
        mounts: Vec<(*const libc::c_char, *const libc::c_char)>,
        out: libc::c_int,
        stdin: libc::c_int,
        report: libc::c_int,
        mask: libc::sigset_t,
    }

    /// The mount namespace a command runs in.
    pub(super) enum Setup<'a> {
        /// An existing one (a [`super::ReadOnlyView`]'s): one `setns`.
        Enter(libc::c_int),
        /// A new one, a slave of ours, in which each source is mounted
        /// read-only at its target, in order.
        Make(&'a [(CString, CString)]),
    }

    /// Starts `/bin/sh -c command` with `env` added to this process's
    /// environment, in a new process group and the mount namespace `setup`
    /// says, its stdout and stderr on `out` and stdin on `stdin` (or
    /// /dev/null). Returns its pid once it has exec'd, or why it could not.
    pub(super) fn spawn(
        command: &str,
        env: &[(&str, &str)],
        setup: Setup<'_>,
        stdin: Option<OwnedFd>,
        out: std::io::PipeWriter,
    ) -> io::Result<i32> {
        let nul = |_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a NUL byte in the command or its environment",
            )
        };
        let sh = CString::new("/bin/sh").map_err(nul)?;
        let dash_c = CString::new("-c").map_err(nul)?;
        let cmd = CString::new(command).map_err(nul)?;
        let mut vars: Vec<CString> = Vec::new();
        for (k, v) in std::env::vars_os() {
            if env.iter().any(|(ek, _)| k.as_bytes() == ek.as_bytes()) {
                continue;
            }
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            if let Ok(c) = CString::new(kv) {
                vars.push(c);
            }
        }
        for (k, v) in env {
            vars.push(CString::new(format!("{k}={v}")).map_err(nul)?);
        }
        let stdin: OwnedFd = match stdin {
            Some(fd) => fd,
            None => std::fs::File::open("/dev/null")?.into(),
        };
        let (enter, mounts) = match setup {
            Setup::Enter(fd) => (fd, &[][..]),
            Setup::Make(mounts) => (-1, mounts),
        };
        let (report_r, report_w) = std::io::pipe()?;
        let out: OwnedFd = out.into();
        let report_w: OwnedFd = report_w.into();
        let mut argv: Vec<*const libc::c_char> = vec![sh.as_ptr(), dash_c.as_ptr(), cmd.as_ptr()];
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = vars.iter().map(|v| v.as_ptr()).collect();
        envp.push(std::ptr::null());
        // SAFETY: sigset_t is plain data; filled by the calls below.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        let mut args = ChildArgs {
            argv,
            envp,
            mounts: mounts
                .iter()
                .map(|(s, t)| (s.as_ptr(), t.as_ptr()))
                .collect(),
            enter,
            out: out.as_raw_fd(),
            stdin: stdin.as_raw_fd(),
            report: report_w.as_raw_fd(),
            // SAFETY: as above.
            mask: unsafe { std::mem::zeroed() },
        };
        let mut stack = vec![0u8; 256 * 1024];
        // SAFETY: the stack is ours and outlives the child's use of it
        // (CLONE_VFORK suspends us until the child exec's or exits); the
        // child only makes system calls on memory prepared above; signals
        // are blocked around the clone so no handler runs on the child's
        // borrowed memory, and the child resets them before unblocking.
        let pid = unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut args.mask);
            let top = stack.as_mut_ptr().add(stack.len()) as usize & !15;
            let pid = libc::clone(
                child,
                top as *mut libc::c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                &mut args as *mut ChildArgs as *mut libc::c_void,
            );
            libc::pthread_sigmask(libc::SIG_SETMASK, &args.mask, std::ptr::null_mut());
            pid
        };
        drop(stack);
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        drop(report_w);
        drop(out);
        // The child wrote an errno and a step here if it failed before exec.
        let mut report = [0u8; 5];
        let mut r = report_r;
        let n = std::io::Read::read(&mut r, &mut report).unwrap_or(0);
        if n == 5 {
            let _ = wait(pid);
            let errno = i32::from_ne_bytes(report[..4].try_into().expect("4 bytes"));
            let step = match report[4] {
                1 => "making a private mount namespace",
                4 => "entering the validators' mount namespace",
                2 => "mounting a read-only view",
                _ => "starting /bin/sh",
            };
            return Err(io::Error::other(format!(
                "{step}: {}",
                io::Error::from_raw_os_error(errno)
            )));
        }
        Ok(pid)
    }

    /// Waits for `pid` and returns how it ended.
    pub(super) fn wait(pid: i32) -> Option<std::process::ExitStatus> {
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            if r == pid {
                return Some(std::process::ExitStatus::from_raw(status));
            }
            if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return None;
            }
        }
    }

    /// The child: system calls only, on memory the parent prepared.
    extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the parent's ChildArgs, alive and not touched by
        // the parent until we exec or exit (CLONE_VFORK).
        unsafe {
            let a = &*(arg as *const ChildArgs);
            let fail = |step: u8| -> ! {
                let errno = *libc::__errno_location();
                let mut buf = [0u8; 5];
                buf[..4].copy_from_slice(&errno.to_ne_bytes());
                buf[4] = step;
                libc::write(a.report, buf.as_ptr() as *const libc::c_void, 5);
                libc::_exit(127)
            };
            // Handlers of the node must not run here: back to defaults,
            // then the mask the parent had.
            for sig in 1..libc::SIGRTMAX() {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            libc::setpgid(0, 0);
            if a.enter >= 0 {
                if libc::setns(a.enter, libc::CLONE_NEWNS) != 0 {
                    fail(4);
                }
            } else if libc::unshare(libc::CLONE_NEWNS) != 0
                // A slave: mounts made on the host later show here too,
                // ours never leave.
                || libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                ) != 0
            {
                fail(1);
            }
            for &(source, target) in &a.mounts {
                if libc::mount(
                    source,
                    target,
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) != 0
                    || libc::mount(
                        std::ptr::null(),
                        target,
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
                        std::ptr::null(),
                    ) != 0
                {
                    fail(2);
                }
            }
            if libc::dup2(a.stdin, 0) < 0 || libc::dup2(a.out, 1) < 0 || libc::dup2(a.out, 2) < 0 {
                fail(3);
            }
            libc::sigprocmask(libc::SIG_SETMASK, &a.mask, std::ptr::null_mut());
            libc::execve(a.argv[0], a.argv.as_ptr(), a.envp.as_ptr());
            fail(3)
        }
    }
}

/// A private mount namespace, made once, in which some directories are
/// mounted read-only (each source at its target); commands run with it
/// enter it with one `setns`. Making a namespace and its mounts for every
/// run cost a validator run about 0.8 ms more than entering one (and its
/// teardown at the command's exit), twice per edit of a validated set.
/// The namespace is a slave of the node's: mounts made on the host later
/// show in it; its own never leave it. It lives as long as this value.
pub struct ReadOnlyView {
    namespace: std::os::fd::OwnedFd,
    /// Each source and the directory it was when mounted (device, inode).
    sources: Vec<(std::path::PathBuf, (u64, u64))>,
}

impl ReadOnlyView {
    /// Makes the namespace: each `(source, target)` mounted read-only at
    /// `target`, in order (a later target may lie inside an earlier one).
    /// Needs CAP_SYS_ADMIN and mount namespaces; fails, saying which step,
    /// where they are missing or a source is.
    pub fn new(read_only: &[(&Path, &Path)]) -> std::io::Result<ReadOnlyView> {
        let mut mounts = Vec::new();
        let mut sources = Vec::new();
        for (source, target) in read_only {
            let nul = |_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a path to mount for the validator holds a NUL byte",
                )
            };
            mounts.push((
                CString::new(source.as_os_str().as_bytes()).map_err(nul)?,
                CString::new(target.as_os_str().as_bytes()).map_err(nul)?,
            ));
            sources.push((source.to_path_buf(), identity(source).unwrap_or((0, 0))));
        }
        // A shell that waits on its stdin holds the namespace until we have
        // a handle of our own on it.
        let (hold_r, hold_w) = std::io::pipe()?;
        let (_, out) = std::io::pipe()?;
        let pid = namespaced::spawn(
            "read _",
            &[],
            namespaced::Setup::Make(&mounts),
            Some(hold_r.into()),
            out,
        )?;
        let namespace = std::fs::File::open(format!("/proc/{pid}/ns/mnt"));
        drop(hold_w);
        namespaced::wait(pid);
        Ok(ReadOnlyView {
            namespace: namespace?.into(),
            sources,
        })
    }

    /// Whether every source is still the directory that was mounted (a
    /// root removed and made again needs a new view).
    pub fn is_current(&self) -> bool {
        self.sources
            .iter()
            .all(|(path, was)| identity(path).ok() == Some(*was))
    }
}

fn identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| (m.dev(), m.ino()))
}

/// Whether commands can be run with a read-only view of a directory
/// ([`ReadOnlyView`]): needs CAP_SYS_ADMIN and mount namespaces (root
/// outside a hardened unit; not under systemd with `RestrictNamespaces` or
/// without CAP_SYS_ADMIN). Tried once, on `probe_dir`.
pub fn read_only_mounts_work(probe_dir: &Path) -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        ReadOnlyView::new(&[(probe_dir, probe_dir)])
            .is_ok_and(|view| run_check("true", &[], Duration::from_secs(10), Some(&view)).passed)
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
            None,
        );
        assert!(ok.passed && ok.summary.is_empty(), "{ok:?}");
        let bad = run_check(
            "echo 'line 3: syntax error' >&2; echo more; exit 3",
            &[],
            Duration::from_secs(5),
            None,
        );
        assert!(!bad.passed);
        assert_eq!(bad.summary, "validator exited 3: line 3: syntax error");
        assert!(bad.output.contains("more"));
        let t = Instant::now();
        // A child that keeps the pipe open must not keep us waiting either.
        let hung = run_check("sleep 30 & sleep 30", &[], Duration::from_millis(200), None);
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
            None,
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
        let own = ReadOnlyView::new(&[(dir.path(), dir.path())]).unwrap();
        let out = run_check(
            &format!("echo y > {path}/f"),
            &[],
            Duration::from_secs(5),
            Some(&own),
        );
        assert!(!out.passed, "{out:?}");
        assert_eq!(std::fs::read_to_string(dir.path().join("f")).unwrap(), "x");
        // Files made after the view was: seen, and read-only too.
        std::fs::write(dir.path().join("later"), "x").unwrap();
        let read = run_check(
            &format!("grep -q x {path}/f && grep -q x {path}/later && ! touch {path}/later"),
            &[],
            Duration::from_secs(5),
            Some(&own),
        );
        assert!(read.passed, "{read:?}");
        assert!(own.is_current());
        // Another directory's view: the live one stays writable outside.
        let view = tempfile::tempdir().unwrap();
        let shown = view.path().display().to_string();
        let other = ReadOnlyView::new(&[(dir.path(), view.path())]).unwrap();
        let out = run_check(
            &format!("grep -q x {shown}/f && ! touch {shown}/g"),
            &[],
            Duration::from_secs(5),
            Some(&other),
        );
        assert!(out.passed, "{out:?}");
        assert!(!dir.path().join("g").exists());
        // A source made again is not what the view shows any more.
        let moved = tempfile::tempdir().unwrap();
        let sub = moved.path().join("root");
        std::fs::create_dir(&sub).unwrap();
        let of_sub = ReadOnlyView::new(&[(sub.as_path(), view.path())]).unwrap();
        std::fs::remove_dir(&sub).unwrap();
        std::fs::create_dir(&sub).unwrap();
        assert!(!of_sub.is_current());
        // A view that cannot be set up is an error that says why.
        let gone = dir.path().join("gone");
        let err = ReadOnlyView::new(&[(&gone, view.path())]).err().unwrap();
        assert!(
            err.to_string().contains("mounting a read-only view")
                && err.to_string().contains("No such file"),
            "{err}"
        );
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
