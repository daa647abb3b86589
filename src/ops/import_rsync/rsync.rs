//! Recognising what a command does (rsync, ssh, a reload, ...) and reading
//! rsync's options, operands and excludes.

use super::*;
/// What a (local or remote) command does, as far as the translation cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// echo, sleep, true, ...: dropped.
    Silent,
    Reboot,
    /// Reloads or restarts a service: a candidate for on_change.
    Reload,
    Lockfile,
    Ownership,
    Ping,
    Cd,
    Rsync,
    Ssh,
    Other,
}

pub(super) fn classify(words: &[String]) -> Action {
    let words = strip_prefixes(words);
    let Some(first) = words.first() else {
        return Action::Silent;
    };
    let cmd = basename(first);
    let arg = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    let is_reload = |w: &str| {
        matches!(
            w,
            "reload"
                | "restart"
                | "force-reload"
                | "try-restart"
                | "reload-or-restart"
                | "try-reload-or-restart"
        )
    };
    match cmd {
        "echo" | "printf" | "sleep" | "true" | ":" | "exit" | "return" | "clear" | "tee"
        | "logger" | "wait" => Action::Silent,
        "rsync" => Action::Rsync,
        "ssh" => Action::Ssh,
        "reboot" => Action::Reboot,
        "shutdown" if words.iter().any(|w| w == "-r" || w == "--reboot") => Action::Reboot,
        "init" if arg(1) == "6" => Action::Reboot,
        "systemctl" if arg(1) == "reboot" => Action::Reboot,
        "systemctl" if is_reload(arg(1)) => Action::Reload,
        "service" | "invoke-rc.d" if is_reload(arg(2)) => Action::Reload,
        "postfix" | "apachectl" | "apache2ctl"
            if matches!(arg(1), "reload" | "restart" | "graceful") =>
        {
            Action::Reload
        }
        "nginx" if arg(1) == "-s" && arg(2) == "reload" => Action::Reload,
        _ if first.starts_with("/etc/init.d/") && is_reload(arg(1)) => Action::Reload,
        "lockfile-create" | "lockfile-remove" | "lockfile-touch" | "lockfile-check"
        | "dotlockfile" | "flock" | "lockfile" => Action::Lockfile,
        "chown" | "chmod" | "chgrp" | "setfacl" => Action::Ownership,
        "ping" | "ping6" | "fping" => Action::Ping,
        "cd" | "pushd" | "popd" => Action::Cd,
        _ => Action::Other,
    }
}

/// Splits `ssh [options] host [command...]` into the host and the remote command's words.
pub(super) fn ssh_parts(words: &[String]) -> Option<(String, Vec<String>)> {
    const WITH_ARG: &str = "BbcDEeFIiJLlmOoPpQRSWw";
    let mut i = 1;
    while i < words.len() {
        let w = &words[i];
        if w == "--" {
            i += 1;
            break;
        }
        let Some(flags) = w.strip_prefix('-').filter(|f| !f.is_empty()) else {
            break;
        };
        i += 1;
        if let Some(pos) = flags.find(|c| WITH_ARG.contains(c)) {
            if pos + 1 == flags.len() {
                i += 1;
            }
        }
    }
    let host = words.get(i)?.clone();
    Some((host, words.get(i + 1..).unwrap_or_default().to_vec()))
}

// ---------------------------------------------------------------------------
// rsync lines

/// Long rsync options that take a value (as `--opt=V` or `--opt V`).
#[rustfmt::skip]
pub(super) const RSYNC_LONG_WITH_ARG: &[&str] = &[
    "exclude", "include", "exclude-from", "include-from", "files-from", "filter", "rsh", "rsync-path",
    "backup-dir", "suffix", "chmod", "block-size", "max-delete", "max-size", "min-size", "max-alloc",
    "partial-dir", "usermap", "groupmap", "chown", "timeout", "contimeout", "remote-option", "modify-window",
    "temp-dir", "compare-dest", "copy-dest", "link-dest", "compress-level", "compress-choice", "zc",
    "checksum-choice", "cc", "skip-compress", "address", "port", "sockopts", "out-format", "log-file",
    "log-file-format", "password-file", "bwlimit", "outbuf", "write-batch", "only-write-batch", "read-batch",
    "protocol", "iconv", "checksum-seed", "info", "debug", "stop-after", "stop-at", "copy-as", "early-input",
];

/// Long options that describe what clusterd does anyway, or only how rsync talks or reports: no note.
#[rustfmt::skip]
pub(super) const RSYNC_LONG_IMPLIED: &[&str] = &[
    "archive", "recursive", "links", "perms", "times", "group", "owner", "devices", "specials", "verbose",
    "quiet", "compress", "compress-level", "compress-choice", "zc", "skip-compress", "partial", "partial-dir",
    "progress", "human-readable", "itemize-changes", "hard-links", "acls", "xattrs", "sparse", "checksum",
    "checksum-choice", "cc", "checksum-seed", "stats", "numeric-ids", "no-motd", "info", "debug",
    "msgs2stderr", "out-format", "log-file", "log-file-format", "timeout", "contimeout", "ipv4", "ipv6",
    "blocking-io", "protect-args", "secluded-args", "8-bit-output", "executability", "omit-dir-times",
    "omit-link-times", "whole-file", "no-whole-file", "inplace", "delay-updates", "ignore-times", "fuzzy",
    "force", "rsh", "rsync-path", "port", "password-file", "address", "sockopts", "temp-dir", "block-size",
    "modify-window", "preallocate", "outbuf", "protocol", "super", "fake-super", "mkpath", "size-only",
];

/// Short options that are implied (see [`RSYNC_LONG_IMPLIED`]).
pub(super) const RSYNC_SHORT_IMPLIED: &str = "arlptgoDvqzPhiScEWOJ846sIy";

#[derive(Debug, Default)]
pub(super) struct RsyncArgs {
    pub(super) operands: Vec<String>,
    pub(super) excludes: Vec<String>,
    pub(super) deletes: Vec<String>,
    pub(super) unknown: Vec<String>,
    /// `-H` / `--hard-links`.
    pub(super) hard_links: bool,
    /// `-A` / `-X` / `--acls` / `--xattrs`.
    pub(super) xattrs: bool,
}

pub(super) fn parse_rsync_args(words: &[String]) -> RsyncArgs {
    let mut a = RsyncArgs::default();
    let mut i = 1;
    let mut only_operands = false;
    while i < words.len() {
        let w = &words[i];
        i += 1;
        if only_operands || !w.starts_with('-') || w == "-" {
            a.operands.push(w.clone());
            continue;
        }
        if w == "--" {
            only_operands = true;
            continue;
        }
        if let Some(long) = w.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let value = if RSYNC_LONG_WITH_ARG.contains(&name) && inline.is_none() {
                let v = words.get(i).cloned();
                i += usize::from(v.is_some());
                v
            } else {
                inline
            };
            let shown = match &value {
                Some(v) => format!("--{name}={v}"),
                None => format!("--{name}"),
            };
            match name {
                "exclude" => match value.filter(|v| !v.is_empty()) {
                    Some(v) => a.excludes.push(v),
                    None => a.unknown.push(shown),
                },
                n if n == "del" || n.starts_with("delete") => a.deletes.push(shown),
                "hard-links" => a.hard_links = true,
                "acls" | "xattrs" => a.xattrs = true,
                n if RSYNC_LONG_IMPLIED.contains(&n) => {}
                _ => a.unknown.push(shown),
            }
            continue;
        }
        let flags: Vec<char> = w[1..].chars().collect();
        let mut j = 0;
        while j < flags.len() {
            let c = flags[j];
            j += 1;
            if "eBTfM".contains(c) {
                let rest: String = flags[j..].iter().collect();
                j = flags.len();
                let value = if rest.is_empty() {
                    let v = words.get(i).cloned().unwrap_or_default();
                    i += usize::from(i < words.len());
                    v
                } else {
                    rest
                };
                if matches!(c, 'f' | 'M') {
                    a.unknown.push(format!("-{c} {value}"));
                }
            } else if c == 'H' {
                a.hard_links = true;
            } else if matches!(c, 'A' | 'X') {
                a.xattrs = true;
            } else if !RSYNC_SHORT_IMPLIED.contains(c) {
                a.unknown.push(format!("-{c}"));
            }
        }
    }
    a
}

/// One rsync operand.
#[derive(Debug, Clone)]
pub(super) struct Operand {
    /// `user@host` as written, for a remote operand.
    pub(super) peer: Option<String>,
    pub(super) user: Option<String>,
    pub(super) host: String,
    /// The path as written (remote part after the `:`).
    pub(super) path: String,
    pub(super) daemon: bool,
}

pub(super) fn parse_operand(raw: &str) -> Operand {
    let local = |daemon: bool| Operand {
        peer: None,
        user: None,
        host: String::new(),
        path: raw.to_string(),
        daemon,
    };
    if raw.starts_with("rsync://") {
        return local(true);
    }
    let Some((head, path)) = raw.split_once(':') else {
        return local(false);
    };
    if head.is_empty() || head.contains('/') {
        return local(false);
    }
    if path.starts_with(':') {
        return local(true);
    }
    let (user, host) = match head.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h.to_string()),
        None => (None, head.to_string()),
    };
    Operand {
        peer: Some(head.to_string()),
        user,
        host,
        path: path.to_string(),
        daemon: false,
    }
}

/// Collapses `//` and `/./` and drops trailing slashes; `/` stays `/`.
pub(super) fn clean_path(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if p.starts_with('/') {
        format!("/{}", parts.join("/"))
    } else {
        parts.join("/")
    }
}

/// Directories that are named without a trailing slash often enough to not be taken for files.
#[rustfmt::skip]
pub(super) const KNOWN_DIRS: &[&str] = &[
    "/", "/etc", "/home", "/root", "/var", "/var/www", "/var/log", "/var/lib", "/var/spool", "/var/mail",
    "/var/backups", "/var/cache", "/var/opt", "/usr", "/usr/lib", "/usr/local", "/usr/share", "/opt", "/srv",
    "/tmp", "/boot", "/mnt", "/media",
];

pub(super) fn looks_like_dir(path: &str) -> bool {
    KNOWN_DIRS.contains(&path)
        || basename(path).ends_with(".d")
        || (path.starts_with("/home/") && path.matches('/').count() == 2)
}

/// `dir` relative to `root` ("" when equal), if it lies inside it.
pub(super) fn relative_under(dir: &str, root: &str) -> Option<String> {
    if dir == root {
        return Some(String::new());
    }
    let prefix = if root == "/" {
        String::from("/")
    } else {
        format!("{root}/")
    };
    dir.strip_prefix(&prefix).map(str::to_string)
}

/// rsync's exclude semantics in gitignore terms. `parent_of` is the set's basename when the
/// transfer root is the set's parent (the source had no trailing slash).
pub(super) fn translate_exclude(pat: &str, parent_of: Option<&str>) -> (String, Option<String>) {
    if let Some(rest) = pat.strip_prefix('/') {
        if let Some(base) = parent_of {
            if let Some(inner) = rest
                .strip_prefix(base)
                .and_then(|r| r.strip_prefix('/'))
                .filter(|r| !r.is_empty())
            {
                let new = format!("/{inner}");
                let why = format!(
                    "exclude {pat:?} became {new:?}: rsync anchored it at the parent directory, clusterd anchors it at the set"
                );
                return (new, Some(why));
            }
            let why = format!(
                "exclude {pat:?} is anchored at the parent directory of this set in rsync; kept as is, review it"
            );
            return (pat.to_string(), Some(why));
        }
        return (pat.to_string(), None);
    }
    if pat.trim_end_matches('/').contains('/') && !pat.starts_with("**/") {
        let new = format!("**/{pat}");
        let why = format!("exclude {pat:?} became {new:?}: rsync matches a pattern with an inner slash at any depth");
        return (new, Some(why));
    }
    (pat.to_string(), None)
}

// ---------------------------------------------------------------------------
// The translator
