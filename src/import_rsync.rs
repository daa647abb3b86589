//! `clusterctl import-rsync FILE`: turn a legacy cron sync script into `[[sync]]` sets.
//!
//! The scripts clusterd replaces (see the seeds) `ping` a master, keep the sync
//! direction in a `PROMOTE` flag file and run `rsync` over root ssh, one line
//! per directory or file, often once per direction. [`translate`] reads such a
//! script and drafts the equivalent `[[sync]]` sets; [`Translation::to_toml`]
//! prints them as TOML, with a `#` comment for everything that was not
//! translated. Nothing here runs a command or touches a file except
//! [`translate_file`], which reads the script.
//!
//! # Translation rules
//!
//! * **Finding rsync lines.** Every `rsync` invocation is translated, wherever
//!   it stands: inside `if`/`else` blocks and loops, as an `if` condition,
//!   indented, after `then`, joined with `;`/`&&`, continued with a trailing
//!   `\`. A trailing `# comment` outside quotes is stripped, then each command
//!   is split into words with `shell-words`. A command that does not split
//!   (an unclosed quote) becomes a note; nothing here panics on input.
//! * **Options.** `--exclude=PAT` and `--exclude PAT` become `exclude`.
//!   `--delete` and its variants are noted on the set (mirror mode deletes
//!   anyway). `-H`/`--hard-links` becomes `hard_links = true` and
//!   `-A`/`-X`/`--acls`/`--xattrs` become `xattrs = true` (not on append
//!   sets, which keep no links: noted instead). The archive and transfer
//!   options (`-a -r -l -p -t -g -o -D -z -P -v -q -h -i -S -c`,
//!   `--progress`, `--partial`, `-e`/`--rsh`, ...) describe what clusterd
//!   always does, or only how rsync talks, and are dropped without a note. Every other option (`--include`, `--filter`, `-u`,
//!   `-n`, `--bwlimit`, ...) is named in a comment on the set.
//! * **Operands.** The last operand is the destination, the others sources; a
//!   remote operand is `[user@]host:path`. The set's `path` is the **remote
//!   side's path**: it names the real system path on the peer, while the local
//!   side may be a staging directory (`/root/CLUSTER-CONFIGURATION/etc-postfix/`)
//!   which is then mentioned in a comment. Shell variables assigned earlier in
//!   the script (`Sensai=10.9.9.222`) are expanded in paths; a relative remote
//!   path is taken relative to the login's home (`/root` for root). A line with
//!   no remote side, a daemon transfer (`host::module`, `rsync://`) or two
//!   remote sides is a note. A line with an extra operand after the remote
//!   destination (`rsync -azP /home/ root@$Sensai:/home/ /home/`) is read as a
//!   push, and its comment says that rsync itself rejects the line
//!   ("Unexpected remote arg").
//! * **Directories and files.** `dir/` means the directory's contents: the set
//!   is the directory, `path` without the trailing slash. A path without a
//!   trailing slash is a single-file set unless it is a well-known directory
//!   (`/var/www`, `/home`, `/var/log`, ...) or ends in `.d`. When a push copies
//!   `SRC` (no slash) into `host:DIR/`, the set is `DIR/basename(SRC)`, as
//!   rsync would place it.
//! * **Direction.** A pull (remote to local) and a push (local to remote) of
//!   the same path are one set: clusterd picks the direction from the leader,
//!   so the two branches of a `PROMOTE` check collapse into one set per path.
//!   Sets appear in the order of their first rsync line.
//! * **Excludes.** The excludes of all lines for one path are unioned (in order
//!   of first appearance), so that nothing an old line excluded starts syncing;
//!   a comment says so when the lines disagreed. rsync matches a pattern with a
//!   slash inside it (`.ssh/known_hosts`) at any depth, gitignore only at the
//!   root, so such a pattern becomes `**/.ssh/known_hosts`. Patterns without an
//!   inner slash (`*.lock`, `.ssh/`, `connection.cfg`) and anchored ones
//!   (`/tmp`) mean the same in both and are kept.
//! * **Names.** The path, lowercased, `/` turned into `-`, leading `-`
//!   trimmed, every character outside `[a-z0-9._+-]` turned into `-`
//!   (`/etc/tacacs+` is `etc-tacacs+`, `/var/lib/amavis/.spamassassin` is
//!   `var-lib-amavis-.spamassassin`); a name already taken gets `-2`, `-3`, ...
//! * **Mode.** `append` for `/var/log` and everything under it (logs only
//!   grow), `mirror` for everything else; a comment on each set says why.
//! * **skip_while.** An rsync line in the "no lock" branch of a lock check,
//!   `if [ -f DIR/*.lock ]; then <skip>; else <rsync>; fi` (also run over ssh,
//!   with `test`, or negated with `!`), gets `skip_while = ["*.lock"]` when
//!   `DIR` is the set's root (or a `sub/*.lock` pattern when it lies inside
//!   it), matched against the remote path or the line's local path.
//! * **on_change.** A command that reloads or restarts a service
//!   (`systemctl reload|restart X`, `service X reload|restart`, `postfix
//!   reload`, `/etc/init.d/X reload|restart`, ...), locally or over ssh, is
//!   listed as a suggested `on_change`; which set it belongs to is left to the
//!   reader. `reboot` is noted: clusterd never reboots nodes; use on_change.
//! * **Not translated**, each as `not translated: <command> (<why>)`: ssh
//!   commands (`chown`, `lockfile-*`, anything else), the `ping` and `PROMOTE`
//!   flag-file logic (clusterd elects the leader; `role_file` in `[hooks]`
//!   keeps a PROMOTE file for old scripts), the script's own
//!   `lockfile-create`/`lockfile-remove` (clusterd runs continuously), `cd`,
//!   shell variables, and any other command or condition. `echo`, `printf`,
//!   `sleep` and loop headers are dropped silently (an `echo` into a file is
//!   not).
//!
//! The draft never contains `on_change`; it only suggests it in comments.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The rules above, in the short form printed at the top of [`Translation::to_toml`].
const RULES: &[&str] = &[
    "each rsync line gives the set of its remote side's path (the real path on the peer, not a local staging copy)",
    "a pull and a push of the same path are one set: clusterd picks the direction from the leader",
    "\"dir/\" is the directory; a path without a trailing slash is a single file unless it is a well-known directory",
    "the excludes of every line of a path are kept; \"a/b\" becomes \"**/a/b\" because rsync matches it at any depth",
    "-a -r -z -P -v and the like are what clusterd does anyway; --delete is noted (mirror mode deletes anyway)",
    "-H gives hard_links = true, -A and -X give xattrs = true",
    "mode is \"append\" under /var/log (logs only grow), \"mirror\" elsewhere",
    "an rsync line in the no-lock branch of `if [ -f DIR/*.lock ]` gets skip_while = [\"*.lock\"]",
    "service reloads and restarts are suggested as on_change; ssh commands, ping/PROMOTE logic and lock files are not translated; echo and sleep are dropped",
];

/// How the directory-or-file question was answered for a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// A directory tree (the script named it with a trailing slash, or it is a well-known directory).
    Directory,
    /// A single file (named without a trailing slash).
    File,
}

/// The `mode` key of a `[[sync]]` set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetMode {
    /// `"mirror"`: an exact copy, deletions included.
    Mirror,
    /// `"append"`: log files, only appended bytes travel.
    Append,
}

impl SetMode {
    /// The TOML value of `mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            SetMode::Mirror => "mirror",
            SetMode::Append => "append",
        }
    }
}

/// One drafted `[[sync]]` set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSetDraft {
    /// `name`, derived from the path and unique within the translation.
    pub name: String,
    /// `path`, the remote side's path without a trailing slash.
    pub path: String,
    /// Directory or single file (only shapes the comments).
    pub kind: PathKind,
    /// `mode`.
    pub mode: SetMode,
    /// `exclude`, gitignore-style, relative to `path`.
    pub exclude: Vec<String>,
    /// `skip_while`, from a lock check around the rsync line.
    pub skip_while: Vec<String>,
    /// `hard_links`: a line passed `-H` (not on append sets).
    pub hard_links: bool,
    /// `xattrs`: a line passed `-A` or `-X`.
    pub xattrs: bool,
    /// Printed as `#` lines above the set: where it came from and what to review.
    pub comments: Vec<String>,
}

/// The result of [`translate`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Translation {
    /// The drafted sets, in the order of their first rsync line.
    pub sets: Vec<SyncSetDraft>,
    /// Everything outside the sets, in script order: `not translated: <command> (<why>)`,
    /// suggested `on_change` commands, then suggestions for `[hooks]` and `[[peer]]`.
    pub notes: Vec<String>,
}

/// Reading the script failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read the sync script {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A command that could not be taken apart.
#[derive(Debug, thiserror::Error)]
enum LineError {
    #[error("cannot split it into words: {0}")]
    Tokenise(#[from] shell_words::ParseError),
}

/// Reads `path` (bytes that are not UTF-8 are replaced) and translates it.
pub fn translate_file(path: &Path) -> Result<Translation, ImportError> {
    let bytes = std::fs::read(path).map_err(|source| ImportError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(translate(&String::from_utf8_lossy(&bytes)))
}

/// Translates a legacy sync script; see the module documentation for the rules.
pub fn translate(script: &str) -> Translation {
    let mut t = Translator::default();
    for (no, text) in logical_lines(script) {
        t.line(no, &text);
    }
    t.finish()
}

impl Translation {
    /// The sets as TOML `[[sync]]` tables, preceded by the rules and the notes as `#` comments.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        comment(
            &mut out,
            "[[sync]] sets drafted by `clusterctl import-rsync` from a legacy rsync script.",
        );
        comment(
            &mut out,
            "Review every set, then add them to the config of every node (e.g. /etc/clusterd/clusterd.toml).",
        );
        comment(&mut out, "Translation rules:");
        for rule in RULES {
            comment(&mut out, &format!("  - {rule}"));
        }
        if !self.notes.is_empty() {
            comment(&mut out, "");
            for note in &self.notes {
                comment(&mut out, note);
            }
        }
        for set in &self.sets {
            out.push('\n');
            for c in &set.comments {
                comment(&mut out, c);
            }
            out.push_str("[[sync]]\n");
            let _ = writeln!(out, "name = {}", toml_string(&set.name));
            let _ = writeln!(out, "path = {}", toml_string(&set.path));
            let _ = writeln!(out, "mode = {}", toml_string(set.mode.as_str()));
            if !set.exclude.is_empty() {
                let _ = writeln!(out, "exclude = {}", toml_array(&set.exclude));
            }
            if !set.skip_while.is_empty() {
                let _ = writeln!(out, "skip_while = {}", toml_array(&set.skip_while));
            }
            if set.hard_links {
                out.push_str("hard_links = true\n");
            }
            if set.xattrs {
                out.push_str("xattrs = true\n");
            }
        }
        out
    }
}

/// Appends `text` as `#` lines (one per line of `text`), with characters TOML forbids in comments replaced.
fn comment(out: &mut String, text: &str) {
    for line in text.split('\n') {
        if line.is_empty() {
            out.push_str("#\n");
            continue;
        }
        out.push_str("# ");
        out.extend(
            line.chars()
                .map(|c| if c != '\t' && c.is_control() { '?' } else { c }),
        );
        out.push('\n');
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            '\u{8}' => o.push_str("\\b"),
            '\u{c}' => o.push_str("\\f"),
            c if c.is_control() => {
                let _ = write!(o, "\\u{:04X}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn toml_array(items: &[String]) -> String {
    let parts: Vec<String> = items.iter().map(|s| toml_string(s)).collect();
    format!("[{}]", parts.join(", "))
}

// ---------------------------------------------------------------------------
// Lines and commands

/// Joins `\`-continued lines; yields (first line number, text).
fn logical_lines(script: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in script.lines().enumerate() {
        let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
        let continues = !raw.trim_start().starts_with('#')
            && raw.chars().rev().take_while(|&c| c == '\\').count() % 2 == 1;
        if continues {
            acc.push_str(&raw[..raw.len() - 1]);
            pending = Some((start, acc));
        } else {
            acc.push_str(raw);
            out.push((start, acc));
        }
    }
    out.extend(pending);
    out
}

/// What follows a command on its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sep {
    End,
    Semi,
    And,
    Or,
    Pipe,
    Background,
}

impl Sep {
    fn as_str(self) -> &'static str {
        match self {
            Sep::End => "",
            Sep::Semi => ";",
            Sep::And => "&&",
            Sep::Or => "||",
            Sep::Pipe => "|",
            Sep::Background => "&",
        }
    }
}

#[derive(Debug, Clone)]
struct Segment {
    text: String,
    sep: Sep,
}

/// Splits a line into commands at unquoted `;`, `&&`, `||`, `|` and `&`, and drops
/// a trailing comment (a `#` starting a word outside quotes). Quotes, `\` escapes,
/// `$( )` and backticks are respected; redirections such as `2>&1` stay in the command.
fn split_commands(line: &str) -> Vec<Segment> {
    let chars: Vec<char> = line.chars().collect();
    let mut segs = Vec::new();
    let mut cur = String::new();
    let (mut single, mut double, mut backtick, mut escaped) = (false, false, false, false);
    let mut depth = 0usize;
    let mut word_start = true;
    fn flush(cur: &mut String, sep: Sep, segs: &mut Vec<Segment>) {
        let text = cur.trim().to_string();
        cur.clear();
        if !text.is_empty() {
            segs.push(Segment { text, sep });
        }
    }
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        i += 1;
        if escaped {
            cur.push(c);
            escaped = false;
            word_start = false;
            continue;
        }
        if single {
            cur.push(c);
            single = c != '\'';
            continue;
        }
        if double {
            cur.push(c);
            match c {
                '\\' => escaped = true,
                '"' => double = false,
                _ => {}
            }
            continue;
        }
        match c {
            '\\' => {
                cur.push(c);
                escaped = true;
            }
            '\'' => {
                cur.push(c);
                single = true;
            }
            '"' => {
                cur.push(c);
                double = true;
            }
            '`' => {
                cur.push(c);
                backtick = !backtick;
            }
            '#' if word_start && depth == 0 && !backtick => break,
            '(' => {
                if depth > 0 || cur.ends_with('$') {
                    depth += 1;
                }
                cur.push(c);
            }
            ')' if depth > 0 => {
                depth -= 1;
                cur.push(c);
            }
            _ if depth > 0 || backtick => cur.push(c),
            ';' => flush(&mut cur, Sep::Semi, &mut segs),
            '&' if next == Some('&') => {
                i += 1;
                flush(&mut cur, Sep::And, &mut segs);
            }
            '&' if cur.ends_with(['>', '<']) || next == Some('>') => cur.push(c),
            '&' => flush(&mut cur, Sep::Background, &mut segs),
            '|' if next == Some('|') => {
                i += 1;
                flush(&mut cur, Sep::Or, &mut segs);
            }
            '|' if cur.ends_with('>') => cur.push(c),
            '|' => flush(&mut cur, Sep::Pipe, &mut segs),
            _ => cur.push(c),
        }
        word_start = c.is_whitespace() || matches!(c, ';' | '&' | '|' | '(');
    }
    flush(&mut cur, Sep::End, &mut segs);
    segs
}

fn words_of(text: &str) -> Result<Vec<String>, LineError> {
    Ok(shell_words::split(text)?)
}

/// Removes redirections (`> /dev/null`, `2>&1`, `>>log`) from the words; returns the
/// remaining words and the files written or read.
fn strip_redirections(words: Vec<String>) -> (Vec<String>, Vec<String>) {
    let mut kept = Vec::new();
    let mut targets = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let s = w.trim_start_matches(|c: char| c.is_ascii_digit());
        let s = s
            .strip_prefix('&')
            .filter(|r| r.starts_with('>'))
            .unwrap_or(s);
        if !(s.starts_with('>') || s.starts_with('<')) {
            kept.push(w);
            continue;
        }
        let rest = s.trim_start_matches(['>', '<', '|']);
        if rest.is_empty() {
            targets.extend(it.next());
        } else if !rest.starts_with('&') {
            targets.push(rest.to_string());
        }
    }
    (kept, targets)
}

/// The commands in `text` (a remote command string, a condition), split and tokenised; parts that fail are skipped.
fn command_words(text: &str) -> Vec<Vec<String>> {
    split_commands(text)
        .iter()
        .filter_map(|s| words_of(&s.text).ok())
        .map(|w| strip_redirections(w).0)
        .filter(|w| !w.is_empty())
        .collect()
}

fn basename(s: &str) -> &str {
    let t = s.trim_end_matches('/');
    t.rsplit('/').next().unwrap_or(t)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `NAME=value` → (NAME, value).
fn assignment(word: &str) -> Option<(&str, &str)> {
    let (name, value) = word.split_once('=')?;
    is_identifier(name).then_some((name, value))
}

/// Drops `sudo`, `nice -n 5`, `nohup`, ... in front of a command.
fn strip_prefixes(words: &[String]) -> &[String] {
    const PREFIXES: &[&str] = &["sudo", "nice", "ionice", "nohup", "time", "command", "exec"];
    let mut i = 0;
    while i < words.len() && PREFIXES.contains(&words[i].as_str()) {
        i += 1;
        while i < words.len()
            && (words[i].starts_with('-') || words[i].chars().all(|c| c.is_ascii_digit()))
        {
            i += 1;
        }
    }
    &words[i..]
}

/// What a (local or remote) command does, as far as the translation cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
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

fn classify(words: &[String]) -> Action {
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
fn ssh_parts(words: &[String]) -> Option<(String, Vec<String>)> {
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
const RSYNC_LONG_WITH_ARG: &[&str] = &[
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
const RSYNC_LONG_IMPLIED: &[&str] = &[
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
const RSYNC_SHORT_IMPLIED: &str = "arlptgoDvqzPhiScEWOJ846sIy";

#[derive(Debug, Default)]
struct RsyncArgs {
    operands: Vec<String>,
    excludes: Vec<String>,
    deletes: Vec<String>,
    unknown: Vec<String>,
    /// `-H` / `--hard-links`.
    hard_links: bool,
    /// `-A` / `-X` / `--acls` / `--xattrs`.
    xattrs: bool,
}

fn parse_rsync_args(words: &[String]) -> RsyncArgs {
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
struct Operand {
    /// `user@host` as written, for a remote operand.
    peer: Option<String>,
    user: Option<String>,
    host: String,
    /// The path as written (remote part after the `:`).
    path: String,
    daemon: bool,
}

fn parse_operand(raw: &str) -> Operand {
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
fn clean_path(p: &str) -> String {
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
const KNOWN_DIRS: &[&str] = &[
    "/", "/etc", "/home", "/root", "/var", "/var/www", "/var/log", "/var/lib", "/var/spool", "/var/mail",
    "/var/backups", "/var/cache", "/var/opt", "/usr", "/usr/lib", "/usr/local", "/usr/share", "/opt", "/srv",
    "/tmp", "/boot", "/mnt", "/media",
];

fn looks_like_dir(path: &str) -> bool {
    KNOWN_DIRS.contains(&path)
        || basename(path).ends_with(".d")
        || (path.starts_with("/home/") && path.matches('/').count() == 2)
}

/// `dir` relative to `root` ("" when equal), if it lies inside it.
fn relative_under(dir: &str, root: &str) -> Option<String> {
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
fn translate_exclude(pat: &str, parent_of: Option<&str>) -> (String, Option<String>) {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Pull,
    Push,
}

#[derive(Debug, Clone)]
struct LockGuard {
    /// Directory the lock test looks in.
    dir: String,
    /// The lock file name or glob (`*.lock`).
    pattern: String,
    /// `!` in front: the then-branch is the "no lock" branch.
    negated: bool,
    line: usize,
}

#[derive(Debug)]
enum Frame {
    If {
        lock: Option<LockGuard>,
        text: String,
        in_else: bool,
        used: bool,
    },
    Loop,
}

/// One rsync line's contribution to a set.
#[derive(Debug)]
struct Use {
    line: usize,
    direction: Direction,
    peer: String,
    local: String,
    directory: bool,
    excludes: Vec<String>,
    /// The line passed --delete or a variant.
    delete: bool,
    /// The line passed -H.
    hard_links: bool,
    /// The line passed -A or -X.
    xattrs: bool,
}

#[derive(Debug)]
struct SetAcc {
    path: String,
    uses: Vec<Use>,
    /// (pattern, lock location as tested, line)
    guards: Vec<(String, String, usize)>,
    comments: Vec<String>,
}

/// A note whose wording depends on what the rest of the script shows.
#[derive(Debug)]
enum Pending {
    Done(String),
    /// ping / PROMOTE logic; the reason names the role_file found anywhere in the script.
    Leader(String),
    /// `NAME=value`; the reason depends on where NAME was used.
    Assignment {
        text: String,
        name: String,
    },
}

#[derive(Debug, Default)]
struct Translator {
    stack: Vec<Frame>,
    vars: HashMap<String, String>,
    promote_vars: HashSet<String>,
    vars_as_host: HashSet<String>,
    vars_in_path: HashSet<String>,
    cwd: Option<String>,
    last_was_ping: bool,
    promote_file: Option<String>,
    peers: Vec<String>,
    rsync_lines: usize,
    notes: Vec<Pending>,
    sets: Vec<SetAcc>,
}

impl Translator {
    fn note(&mut self, text: &str, why: &str) {
        self.notes
            .push(Pending::Done(format!("not translated: {text} ({why})")));
    }

    fn line(&mut self, no: usize, text: &str) {
        let segs = split_commands(text);
        let mut i = 0;
        while i < segs.len() {
            let seg = &segs[i];
            i += 1;
            let words = match words_of(&seg.text) {
                Ok(w) => w,
                Err(e) => {
                    self.note(&seg.text, &e.to_string());
                    continue;
                }
            };
            let Some(first) = words.first().map(String::as_str) else {
                continue;
            };
            if matches!(first, "if" | "elif" | "while" | "until") {
                // The condition runs up to the next `;` or end of line.
                let mut text = seg.text.clone();
                let mut conds = vec![strip_redirections(words[1..].to_vec()).0];
                let mut sep = seg.sep;
                while matches!(sep, Sep::And | Sep::Or | Sep::Pipe) && i < segs.len() {
                    let _ = write!(text, " {} {}", sep.as_str(), segs[i].text);
                    conds.extend(command_words(&segs[i].text));
                    sep = segs[i].sep;
                    i += 1;
                }
                self.condition(no, first, &text, &conds);
                continue;
            }
            self.command(no, &seg.text, words);
        }
    }

    /// `if`/`elif`/`while`/`until` with its condition commands.
    fn condition(&mut self, no: usize, keyword: &str, text: &str, conds: &[Vec<String>]) {
        let lock = if matches!(keyword, "if" | "elif") {
            self.lock_check(no, conds)
        } else {
            None
        };
        // `if ! rsync ...; then`: the rsync line is translated like any other.
        let mut others = Vec::new();
        for cond in conds {
            let bang = cond.iter().take_while(|w| *w == "!").count();
            let cmd = strip_prefixes(&cond[bang..]);
            if classify(cmd) == Action::Rsync {
                self.rsync(no, &shell_words::join(cmd), cmd);
            } else {
                others.push(cond.clone());
            }
        }
        if lock.is_none() && !others.is_empty() {
            self.condition_note(text, &others);
        }
        match keyword {
            "elif" => {
                if let Some(Frame::If { .. }) = self.stack.last() {
                    self.close_if();
                }
                self.stack.push(Frame::If {
                    lock,
                    text: text.to_string(),
                    in_else: false,
                    used: false,
                });
            }
            "if" => self.stack.push(Frame::If {
                lock,
                text: text.to_string(),
                in_else: false,
                used: false,
            }),
            _ => self.stack.push(Frame::Loop),
        }
    }

    fn condition_note(&mut self, text: &str, conds: &[Vec<String>]) {
        let mentions_var = |name: &str| {
            text.contains(&format!("${name}")) || text.contains(&format!("${{{name}}}"))
        };
        let leader = (text.contains("$?") && self.last_was_ping)
            || text.contains("PROMOTE")
            || self.promote_vars.iter().any(|v| mentions_var(v))
            || conds.iter().any(|c| classify(c) == Action::Ping);
        if leader {
            self.notes.push(Pending::Leader(text.to_string()));
        } else {
            self.note(text, "condition dropped: the rsync lines under it were translated as if every branch ran");
        }
    }

    /// Recognises `[ -f DIR/*.lock ]`, `test -e ...`, `ls DIR/*.lock`, also run over ssh and with `!`.
    fn lock_check(&self, no: usize, conds: &[Vec<String>]) -> Option<LockGuard> {
        for cond in conds {
            let mut words: Vec<String> = cond.clone();
            let mut negated = false;
            while words.first().is_some_and(|w| w == "!") {
                negated = !negated;
                words.remove(0);
            }
            if words.first().is_some_and(|w| basename(w) == "ssh") {
                let (_, remote) = ssh_parts(&words)?;
                words = command_words(&remote.join(" ")).into_iter().next()?;
                while words.first().is_some_and(|w| w == "!") {
                    negated = !negated;
                    words.remove(0);
                }
            }
            let operand = match words.first().map(String::as_str) {
                Some("[" | "[[" | "test") => {
                    let mut operand = None;
                    let mut k = 1;
                    while k < words.len() {
                        match words[k].as_str() {
                            "!" => negated = !negated,
                            "-f" | "-e" | "-s" | "-L" | "-h" => {
                                operand = words.get(k + 1).cloned();
                                break;
                            }
                            _ => {}
                        }
                        k += 1;
                    }
                    operand
                }
                Some("ls") => words.iter().skip(1).find(|w| !w.starts_with('-')).cloned(),
                _ => None,
            };
            let Some(operand) = operand else { continue };
            let (dir, pattern) = match operand.rsplit_once('/') {
                Some((d, p)) => (
                    if d.is_empty() {
                        "/".to_string()
                    } else {
                        d.to_string()
                    },
                    p.to_string(),
                ),
                None => (self.cwd.clone()?, operand.clone()),
            };
            if pattern.to_ascii_lowercase().contains("lock") && dir.starts_with('/') {
                let (dir, _) = self.expand(&dir);
                return Some(LockGuard {
                    dir: clean_path(&dir),
                    pattern,
                    negated,
                    line: no,
                });
            }
        }
        None
    }

    /// Pops the innermost `if`, noting a lock check that guarded no rsync line.
    fn close_if(&mut self) {
        if let Some(Frame::If {
            lock: Some(_),
            text,
            used: false,
            ..
        }) = self.stack.pop()
        {
            self.note(&text, "lock check that guards no rsync line");
        }
    }

    fn command(&mut self, no: usize, text: &str, words: Vec<String>) {
        let (words, redirects) = strip_redirections(words);
        let Some(first) = words.first().map(String::as_str) else {
            return;
        };
        match first {
            "then" | "else" | "do" => {
                if first == "else" {
                    if let Some(Frame::If { in_else, .. }) = self.stack.last_mut() {
                        *in_else = true;
                    }
                }
                let rest = match text.trim_start().strip_prefix(first) {
                    Some(rest) => rest.trim().to_string(),
                    None => shell_words::join(&words[1..]),
                };
                if !rest.is_empty() {
                    self.line(no, &rest);
                }
                return;
            }
            "fi" => {
                if let Some(Frame::If { .. }) = self.stack.last() {
                    self.close_if();
                }
                return;
            }
            "done" => {
                if let Some(Frame::Loop) = self.stack.last() {
                    self.stack.pop();
                }
                return;
            }
            "for" | "select" => {
                self.stack.push(Frame::Loop);
                return;
            }
            "{" | "}" | "esac" => return,
            _ => {}
        }

        // Assignments, alone or in front of a command.
        if let Some((name, value)) = assignment(first) {
            let whole = text.split_once('=').map(|(_, v)| v).unwrap_or(value);
            if value.starts_with("$(") || value.starts_with('`') || whole.contains("PROMOTE") {
                self.last_was_ping = false;
                if whole.contains("PROMOTE") {
                    self.promote_vars.insert(name.to_string());
                    self.see_promote(text);
                    self.notes.push(Pending::Leader(text.to_string()));
                } else {
                    self.note(text, "shell variable set from a command");
                }
                return;
            }
            if words.len() == 1 {
                self.vars.insert(name.to_string(), value.to_string());
                self.notes.push(Pending::Assignment {
                    text: text.to_string(),
                    name: name.to_string(),
                });
                return;
            }
        }
        let start = words.iter().take_while(|w| assignment(w).is_some()).count();
        let words = &words[start..];
        let action = classify(words);
        self.last_was_ping = action == Action::Ping;

        if action != Action::Rsync && action != Action::Ssh && text.contains("PROMOTE") {
            self.see_promote(text);
            self.notes.push(Pending::Leader(text.to_string()));
            return;
        }
        match action {
            Action::Rsync => self.rsync(no, text, strip_prefixes(words)),
            Action::Ssh => self.ssh(text, strip_prefixes(words)),
            Action::Silent => {
                if let Some(t) = redirects.iter().find(|t| !t.starts_with("/dev/")) {
                    self.note(text, &format!("writes {t}; not translated"));
                }
            }
            Action::Reboot => self.note(text, "clusterd never reboots nodes; use on_change"),
            Action::Reload => self.suggest_on_change(text, strip_prefixes(words)),
            Action::Lockfile => self.note(text, "lock against overlapping runs of the old script; clusterd runs continuously"),
            Action::Ownership => self.note(
                text,
                "clusterd replicates owner, group and mode with every file; a fix-up that must still run after a sync belongs in on_change",
            ),
            Action::Ping => self.notes.push(Pending::Leader(text.to_string())),
            Action::Cd => {
                if let Some(dir) = words.get(1).filter(|d| d.starts_with('/')) {
                    self.cwd = Some(clean_path(&self.expand(dir).0));
                }
                self.note(text, "working directory of the old script; clusterd needs none");
            }
            Action::Other => self.note(text, "unrecognised command; review it by hand"),
        }
    }

    fn suggest_on_change(&mut self, text: &str, cmd: &[String]) {
        let cmd = shell_words::join(cmd);
        self.notes.push(Pending::Done(format!(
            "suggested on_change = {} (from: {text}; put it on the set whose files that service reads)",
            toml_string(&cmd)
        )));
    }

    fn ssh(&mut self, text: &str, words: &[String]) {
        let Some((_, remote)) = ssh_parts(words).filter(|(_, r)| !r.is_empty()) else {
            self.note(text, "ssh without a command");
            return;
        };
        let cmds = command_words(&remote.join(" "));
        let actions: Vec<Action> = cmds.iter().map(|c| classify(c)).collect();
        let mut handled = false;
        for (cmd, action) in cmds.iter().zip(&actions) {
            if *action == Action::Reload {
                self.suggest_on_change(text, strip_prefixes(cmd));
                handled = true;
            }
        }
        if actions.contains(&Action::Reboot) {
            self.note(text, "clusterd never reboots nodes; use on_change");
        } else if text.contains("PROMOTE") {
            self.see_promote(text);
            self.notes.push(Pending::Leader(text.to_string()));
        } else if !handled {
            let why = match actions.iter().find(|a| **a != Action::Silent) {
                Some(Action::Lockfile) => "ssh command: a lock on the peer around the copy; clusterd replaces each file atomically, and skip_while leaves a set alone while the application's own lock files exist",
                Some(Action::Ownership) => "ssh command: clusterd replicates owner, group and mode with every file; a fix-up that must still run after a sync belongs in on_change",
                _ => "ssh command: clusterd runs no commands on other nodes; on_change runs one on each follower after it applied a batch",
            };
            self.note(text, why);
        }
    }

    /// Remembers where the PROMOTE file lives (resolved against the last `cd`).
    fn see_promote(&mut self, text: &str) {
        if self.promote_file.is_some() {
            return;
        }
        let piece = text
            .split(|c: char| c.is_whitespace() || "()$;'\"<>=`|&".contains(c))
            .find(|p| p.contains("PROMOTE"));
        if let Some(p) = piece {
            let p = self.expand(p).0;
            self.promote_file = Some(if p.starts_with('/') {
                clean_path(&p)
            } else if let Some(cwd) = &self.cwd {
                clean_path(&format!("{cwd}/{p}"))
            } else {
                p
            });
        }
    }

    /// Expands `$NAME` and `${NAME}` with the script's plain assignments; returns the names used.
    fn expand(&self, s: &str) -> (String, Vec<String>) {
        let mut out = String::new();
        let mut used = Vec::new();
        let mut rest = s;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            let (name, len) = if let Some(inner) = after.strip_prefix('{') {
                match inner.find('}') {
                    Some(end) => (&inner[..end], end + 2),
                    None => ("", 0),
                }
            } else {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            };
            match self.vars.get(name).filter(|_| is_identifier(name)) {
                Some(v) => {
                    out.push_str(v);
                    used.push(name.to_string());
                }
                None => out.push_str(&rest[pos..pos + 1 + len]),
            }
            rest = &after[len..];
        }
        out.push_str(rest);
        (out, used)
    }

    fn rsync(&mut self, no: usize, text: &str, words: &[String]) {
        self.rsync_lines += 1;
        let args = parse_rsync_args(words);
        if args.operands.len() < 2 {
            self.note(text, "an rsync line needs a source and a destination");
            return;
        }
        let ops: Vec<Operand> = args.operands.iter().map(|o| parse_operand(o)).collect();
        if ops.iter().any(|o| o.daemon) {
            self.note(text, "rsync daemon transfers (host::module, rsync://) are not translated; make a set of the module's real path");
            return;
        }
        let last = ops.len() - 1;
        let remotes: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].peer.is_some()).collect();
        let mut odd = None;
        let (direction, pairs): (Direction, Vec<(usize, usize)>) = match remotes.as_slice() {
            [] => {
                self.note(
                    text,
                    "neither side is remote: a local copy, not a sync between nodes",
                );
                return;
            }
            [r] if *r == last => (Direction::Push, (0..last).map(|s| (last, s)).collect()),
            [0] => {
                if last > 1 {
                    let extra = shell_words::join(&args.operands[1..last]);
                    odd = Some(format!(
                        "line {no} has extra operand(s) {extra} between the remote source and the destination; rsync rejects such a line (\"Unexpected local arg\"); they were ignored"
                    ));
                }
                (Direction::Pull, vec![(0, last)])
            }
            [r] => {
                let extra = shell_words::join(&args.operands[r + 1..]);
                odd = Some(format!(
                    "line {no} has extra operand(s) {extra} after the remote destination; rsync rejects such a line (\"Unexpected remote arg\"), so the old script never ran this copy; read as a push to {}, the extra operand(s) ignored",
                    args.operands[*r]
                ));
                (Direction::Push, (0..*r).map(|s| (*r, s)).collect())
            }
            rs if rs.len() == last => (Direction::Pull, rs.iter().map(|&r| (r, last)).collect()),
            _ => {
                self.note(text, "more than one remote side (remote to remote, or remote and local sources mixed)");
                return;
            }
        };

        let mut line_comments = Vec::new();
        line_comments.extend(odd);
        if !args.unknown.is_empty() {
            line_comments.push(format!(
                "line {no}: rsync option(s) not translated, review by hand: {}",
                args.unknown.join(", ")
            ));
        }

        let guards: Vec<LockGuard> = self
            .stack
            .iter_mut()
            .filter_map(|f| match f {
                Frame::If {
                    lock: Some(l),
                    in_else,
                    used,
                    ..
                } if *in_else != l.negated => {
                    *used = true;
                    Some(l.clone())
                }
                _ => None,
            })
            .collect();

        for (ri, li) in pairs {
            let remote = &ops[ri];
            let local = &ops[li];
            let mut comments = line_comments.clone();
            let (rpath, rused) = self.expand(&remote.path);
            let (host, hused) = self.expand(&remote.host);
            self.vars_in_path.extend(rused);
            self.vars_as_host.extend(hused.iter().cloned());
            let peer = remote.peer.clone().unwrap_or_default();
            let shown_peer = if hused.is_empty() {
                peer.clone()
            } else {
                format!("{peer} ({host})")
            };
            if !self.peers.contains(&shown_peer) {
                self.peers.push(shown_peer);
            }
            let mut rpath_abs = rpath.clone();
            if !rpath.starts_with('/') {
                let home = match remote.user.as_deref() {
                    None | Some("root") => "/root".to_string(),
                    Some(u) => format!("/home/{u}"),
                };
                let rel = rpath
                    .strip_prefix('~')
                    .map(|r| r.trim_start_matches('/'))
                    .unwrap_or(&rpath);
                rpath_abs = format!("{home}/{rel}");
                comments.push(format!(
                    "line {no}: remote path {:?} is relative to the login's home directory, taken to be {home}",
                    remote.path
                ));
            }
            let r_slash =
                remote.path.is_empty() || remote.path.ends_with('/') || remote.path.ends_with("/.");
            let (lpath, _) = self.expand(&local.path);
            let mut lpath = clean_path(&lpath);
            if !lpath.starts_with('/') {
                if let Some(cwd) = &self.cwd {
                    lpath = clean_path(&format!("{cwd}/{lpath}"));
                }
            }
            let l_slash = local.path.ends_with('/');
            let mut path = clean_path(&rpath_abs);
            // The side that is read decides whether the directory itself or its contents travel.
            let (directory, source_has_slash) = match direction {
                Direction::Pull => {
                    if l_slash && !r_slash && basename(&path) != basename(&lpath) {
                        lpath = clean_path(&format!("{lpath}/{}", basename(&path)));
                    }
                    (r_slash, r_slash)
                }
                Direction::Push => {
                    if r_slash && !l_slash && !basename(&lpath).is_empty() {
                        let b = basename(&lpath).to_string();
                        path = clean_path(&format!("{path}/{b}"));
                        comments.push(format!(
                            "line {no}: {} has no trailing slash, so rsync put it inside {}: the set is {path}",
                            local.path, remote.path
                        ));
                    }
                    (l_slash, l_slash)
                }
            };
            let parent_of = (!source_has_slash).then(|| basename(&path).to_string());
            let mut excludes = Vec::new();
            for pat in &args.excludes {
                let (new, why) = translate_exclude(pat, parent_of.as_deref());
                comments.extend(why);
                excludes.push(new);
            }
            let mode = mode_of(&path);
            for d in &args.deletes {
                comments.push(match mode {
                    SetMode::Mirror => format!("{d}: mirror mode deletes anyway"),
                    SetMode::Append => format!("{d}: dropped; append mode only adds to log files"),
                });
            }
            let mut set_guards = Vec::new();
            for g in &guards {
                let tested = format!("{}/{}", g.dir.trim_end_matches('/'), g.pattern);
                let rel = relative_under(&g.dir, &path).or_else(|| relative_under(&g.dir, &lpath));
                match rel {
                    Some(rel) => {
                        let pat = if rel.is_empty() { g.pattern.clone() } else { format!("{rel}/{}", g.pattern) };
                        set_guards.push((pat, tested, g.line));
                    }
                    None => comments.push(format!(
                        "the lock check on line {} tests {tested}, which is outside this set: not translated",
                        g.line
                    )),
                }
            }
            let set = match self.sets.iter_mut().position(|s| s.path == path) {
                Some(i) => &mut self.sets[i],
                None => {
                    self.sets.push(SetAcc {
                        path: path.clone(),
                        uses: Vec::new(),
                        guards: Vec::new(),
                        comments: Vec::new(),
                    });
                    self.sets.last_mut().expect("just pushed")
                }
            };
            set.uses.push(Use {
                line: no,
                direction,
                peer,
                local: lpath,
                directory,
                excludes,
                delete: !args.deletes.is_empty(),
                hard_links: args.hard_links,
                xattrs: args.xattrs,
            });
            set.guards.extend(set_guards);
            set.comments.extend(comments);
        }
    }

    fn finish(mut self) -> Translation {
        while let Some(frame) = self.stack.last() {
            match frame {
                Frame::If { .. } => self.close_if(),
                Frame::Loop => {
                    self.stack.pop();
                }
            }
        }
        let role_file = self.promote_file.clone();
        let mut notes: Vec<String> = Vec::new();
        if self.rsync_lines == 0 {
            notes.push("no rsync invocation found: there is no [[sync]] set to draft".to_string());
        } else if self.sets.is_empty() {
            notes.push(
                "no rsync line could be translated into a [[sync]] set (see below)".to_string(),
            );
        }
        for n in std::mem::take(&mut self.notes) {
            notes.push(match n {
                Pending::Done(s) => s,
                Pending::Leader(text) => match &role_file {
                    Some(f) => format!(
                        "not translated: {text} (clusterd elects the leader; role_file = {} in [hooks] keeps a PROMOTE file for old scripts)",
                        toml_string(f)
                    ),
                    None => format!(
                        "not translated: {text} (clusterd elects the leader; on_promote/on_demote in [hooks] run a command when the role changes)"
                    ),
                },
                Pending::Assignment { text, name } => {
                    let why = if self.vars_as_host.contains(&name) {
                        "shell variable naming the peer: list every node as a [[peer]] with its addr instead"
                    } else if self.vars_in_path.contains(&name) {
                        "shell variable; expanded in the paths of the sets"
                    } else {
                        "shell variable"
                    };
                    format!("not translated: {text} ({why})")
                }
            });
        }
        if let Some(f) = &role_file {
            notes.push(format!(
                "suggested [hooks] role_file = {} (clusterd writes \"1\" there on the leader and \"0\" elsewhere, for scripts that still read it)",
                toml_string(f)
            ));
        }
        if !self.peers.is_empty() {
            notes.push(format!(
                "peers: the script synced with {}; list every node as a [[peer]] (clusterd talks mutual TLS between nodes, no root ssh)",
                self.peers.join(", ")
            ));
        }

        let mut taken = HashSet::new();
        let sets = self
            .sets
            .into_iter()
            .map(|acc| draft(acc, &mut taken))
            .collect();
        Translation { sets, notes }
    }
}

fn mode_of(path: &str) -> SetMode {
    if relative_under(path, "/var/log").is_some() {
        SetMode::Append
    } else {
        SetMode::Mirror
    }
}

/// `/etc/tacacs+` → `etc-tacacs+`; see the module documentation.
fn set_name(path: &str) -> String {
    let s: String = path
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || "._+-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_start_matches('-');
    if s.is_empty() {
        "fs-root".to_string()
    } else {
        s.to_string()
    }
}

fn unique_name(base: String, taken: &mut HashSet<String>) -> String {
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    taken.insert(name.clone());
    name
}

fn draft(acc: SetAcc, taken: &mut HashSet<String>) -> SyncSetDraft {
    let path = acc.path;
    let base = set_name(&path);
    let name = unique_name(base.clone(), taken);
    let kind = if acc.uses.iter().any(|u| u.directory) || looks_like_dir(&path) {
        PathKind::Directory
    } else {
        PathKind::File
    };
    let mode = mode_of(&path);
    let mut comments = Vec::new();

    let origin: Vec<String> = acc
        .uses
        .iter()
        .map(|u| match u.direction {
            Direction::Pull => format!("line {} (pull from {})", u.line, u.peer),
            Direction::Push => format!("line {} (push to {})", u.line, u.peer),
        })
        .collect();
    let both = acc.uses.iter().any(|u| u.direction == Direction::Pull)
        && acc.uses.iter().any(|u| u.direction == Direction::Push);
    comments.push(format!(
        "{path}: from {}{}",
        origin.join(", "),
        if both {
            "; one set, clusterd picks the direction from the leader"
        } else {
            ""
        }
    ));
    if name != base {
        comments.push(format!(
            "name {name:?}: {base:?} was already taken by another set"
        ));
    }
    comments.push(match mode {
        SetMode::Append => {
            "mode append: a log directory (under /var/log); logs only grow, so only appended bytes travel".to_string()
        }
        SetMode::Mirror => {
            "mode mirror: followers keep an exact copy of the leader's files, deletions included".to_string()
        }
    });
    match kind {
        PathKind::File => comments.push("a single file: the script names it without a trailing slash".to_string()),
        PathKind::Directory if !acc.uses.iter().any(|u| u.directory) => comments.push(
            "a directory: the script names it without a trailing slash, but it is a well-known directory".to_string(),
        ),
        PathKind::Directory => {}
    }
    let mut staged: Vec<&str> = Vec::new();
    for u in &acc.uses {
        if u.local != path && !staged.contains(&u.local.as_str()) {
            staged.push(&u.local);
        }
    }
    if !staged.is_empty() {
        comments.push(format!(
            "the script staged it in {} on the machine running it; clusterd syncs {path} itself on every node",
            staged.join(", ")
        ));
    }

    let mut exclude: Vec<String> = Vec::new();
    for u in &acc.uses {
        for e in &u.excludes {
            if !exclude.contains(e) {
                exclude.push(e.clone());
            }
        }
    }
    let variants: BTreeSet<BTreeSet<&String>> = acc
        .uses
        .iter()
        .map(|u| u.excludes.iter().collect())
        .collect();
    if variants.len() > 1 {
        // (exclude list in the line's own order, lines), grouped by the set of patterns
        let mut groups: Vec<(&Vec<String>, Vec<String>)> = Vec::new();
        for (u, o) in acc.uses.iter().zip(&origin) {
            let key: BTreeSet<&String> = u.excludes.iter().collect();
            match groups
                .iter_mut()
                .find(|(k, _)| k.iter().collect::<BTreeSet<_>>() == key)
            {
                Some((_, lines)) => lines.push(o.clone()),
                None => groups.push((&u.excludes, vec![o.clone()])),
            }
        }
        let described: Vec<String> = groups
            .iter()
            .map(|(k, lines)| {
                let what = if k.is_empty() {
                    "nothing".to_string()
                } else {
                    k.iter()
                        .map(|e| format!("{e:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                format!("{} excluded {what}", lines.join(", "))
            })
            .collect();
        comments.push(format!(
            "the lines disagreed on excludes: {}; all of them are kept so that nothing an old line excluded starts syncing",
            described.join("; ")
        ));
    }
    if kind == PathKind::Directory && mode == SetMode::Mirror && !acc.uses.iter().any(|u| u.delete)
    {
        comments.push(
            "no line passed --delete, so files deleted at the source stayed on the other nodes; in mirror mode they are deleted there too".to_string(),
        );
    }
    if kind == PathKind::File && !exclude.is_empty() {
        comments.push("exclude has no effect on a single file".to_string());
    }

    let mut skip_while: Vec<String> = Vec::new();
    let mut guard_desc: Vec<(String, String, Vec<usize>)> = Vec::new();
    for (pat, tested, line) in acc.guards {
        if !skip_while.contains(&pat) {
            skip_while.push(pat.clone());
        }
        match guard_desc
            .iter_mut()
            .find(|(p, t, _)| *p == pat && *t == tested)
        {
            Some((_, _, lines)) => {
                if !lines.contains(&line) {
                    lines.push(line);
                }
            }
            None => guard_desc.push((pat, tested, vec![line])),
        }
    }
    for (pat, tested, lines) in guard_desc {
        let lines: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        comments.push(format!(
            "skip_while {pat:?}: the script skipped this set while {tested} existed (lock check on {} {})",
            if lines.len() == 1 { "line" } else { "lines" },
            lines.join(", ")
        ));
    }
    let lines_with = |f: fn(&Use) -> bool| -> Vec<String> {
        acc.uses
            .iter()
            .filter(|u| f(u))
            .map(|u| u.line.to_string())
            .collect()
    };
    let linked = lines_with(|u| u.hard_links);
    let hard_links = !linked.is_empty() && mode == SetMode::Mirror;
    if !linked.is_empty() && !hard_links {
        comments.push(format!(
            "-H on line {}: not kept, an append set cannot keep hard links",
            linked.join(", ")
        ));
    }
    let xattrs = !lines_with(|u| u.xattrs).is_empty();
    for c in acc.comments {
        if !comments.contains(&c) {
            comments.push(c);
        }
    }
    SyncSetDraft {
        name,
        path,
        kind,
        mode,
        exclude,
        skip_while,
        hard_links,
        xattrs,
        comments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMTP: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/cluster-tests/fixtures/seeds/smtp-filter-sync.sh"
    ));
    const KERBEROS: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/cluster-tests/fixtures/seeds/kerberos-active-sync.sh"
    ));
    const TACACS: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/cluster-tests/fixtures/seeds/tacacs-active-sync.sh"
    ));

    use PathKind::{Directory as D, File as F};
    use SetMode::{Append as A, Mirror as M};

    type Row = (String, PathKind, SetMode, Vec<String>, Vec<String>);

    fn rows(t: &Translation) -> Vec<Row> {
        t.sets
            .iter()
            .map(|s| {
                (
                    s.path.clone(),
                    s.kind,
                    s.mode,
                    s.exclude.clone(),
                    s.skip_while.clone(),
                )
            })
            .collect()
    }

    fn row(path: &str, kind: PathKind, mode: SetMode, exclude: &[&str], skip: &[&str]) -> Row {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        (path.to_string(), kind, mode, v(exclude), v(skip))
    }

    fn accounts() -> Vec<Row> {
        [
            "shadow", "shadow-", "passwd", "passwd-", "group", "group-", "gshadow", "gshadow-",
        ]
        .iter()
        .map(|f| row(&format!("/etc/{f}"), F, M, &[], &[]))
        .collect()
    }

    fn set<'a>(t: &'a Translation, path: &str) -> &'a SyncSetDraft {
        t.sets
            .iter()
            .find(|s| s.path == path)
            .unwrap_or_else(|| panic!("no set for {path}"))
    }

    fn notes_with<'a>(t: &'a Translation, needle: &str) -> Vec<&'a String> {
        t.notes.iter().filter(|n| n.contains(needle)).collect()
    }

    /// Parses the TOML and checks it holds exactly the drafted sets, with keys clusterd's config accepts.
    fn check_toml(t: &Translation) -> toml::Table {
        let text = t.to_toml();
        let table: toml::Table = text
            .parse()
            .unwrap_or_else(|e| panic!("invalid TOML: {e}\n{text}"));
        let empty = Vec::new();
        let syncs = match table.get("sync") {
            Some(toml::Value::Array(a)) => a,
            None => &empty,
            Some(other) => panic!("sync is not an array of tables: {other:?}"),
        };
        assert_eq!(syncs.len(), t.sets.len());
        let strings = |v: Option<&toml::Value>| -> Vec<String> {
            v.map(|v| {
                v.as_array()
                    .expect("array")
                    .iter()
                    .map(|s| s.as_str().expect("string").to_string())
                    .collect()
            })
            .unwrap_or_default()
        };
        for (s, d) in syncs.iter().zip(&t.sets) {
            let s = s.as_table().expect("table");
            for key in s.keys() {
                assert!(
                    [
                        "name",
                        "path",
                        "mode",
                        "exclude",
                        "skip_while",
                        "hard_links",
                        "xattrs"
                    ]
                    .contains(&key.as_str()),
                    "unexpected key {key}"
                );
            }
            assert_eq!(s["name"].as_str(), Some(d.name.as_str()));
            assert_eq!(s["path"].as_str(), Some(d.path.as_str()));
            assert_eq!(s["mode"].as_str(), Some(d.mode.as_str()));
            assert_eq!(strings(s.get("exclude")), d.exclude);
            assert_eq!(strings(s.get("skip_while")), d.skip_while);
            let flag = |k: &str| s.get(k).map(|v| v.as_bool().expect("a boolean"));
            assert_eq!(flag("hard_links").unwrap_or(false), d.hard_links);
            assert_eq!(flag("xattrs").unwrap_or(false), d.xattrs);
        }
        assert!(
            table.keys().all(|k| k == "sync"),
            "only [[sync]] tables expected"
        );
        table
    }

    #[test]
    fn kerberos_seed() {
        let t = translate(KERBEROS);
        let mut want = vec![
            row("/etc/tacacs+", D, M, &[], &[]),
            row("/var/lib/rancid", D, M, &[], &[]),
            row("/usr/lib/rancid", D, M, &[], &[]),
            row("/etc/rancid", D, M, &[], &[]),
            row("/etc/cvsweb", D, M, &[], &[]),
            row("/var/www", D, M, &[], &[]),
            row("/etc/postfix", D, M, &[], &[]),
            row("/etc/aliases", F, M, &[], &[]),
            row("/var/log", D, A, &[], &[]),
            row("/etc/logrotate.d", D, M, &[], &[]),
            row("/etc/crontab", F, M, &[], &[]),
            row("/etc/bash.bashrc", F, M, &[], &[]),
            row(
                "/root",
                D,
                M,
                &[".ssh/", "master-sync/", "**/.ssh/known_hosts"],
                &[],
            ),
            row("/home", D, M, &[".ssh/", "master-sync/"], &[]),
        ];
        want.extend(accounts());
        assert_eq!(rows(&t), want);

        // Every set came from a pull and a push: one set per path.
        for s in &t.sets {
            assert!(
                s.comments[0].contains("pull from root@$Sensai"),
                "{:?}",
                s.comments
            );
            assert!(
                s.comments[0].contains("push to root@$Sensai"),
                "{:?}",
                s.comments
            );
            assert!(
                s.comments[0].contains("clusterd picks the direction"),
                "{:?}",
                s.comments
            );
        }
        let names: Vec<&str> = t.sets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            &names[..3],
            ["etc-tacacs+", "var-lib-rancid", "usr-lib-rancid"]
        );
        assert_eq!(set(&t, "/etc/shadow-").name, "etc-shadow-");
        assert_eq!(set(&t, "/etc/logrotate.d").name, "etc-logrotate.d");

        assert!(set(&t, "/etc/tacacs+")
            .comments
            .iter()
            .any(|c| c.starts_with("no line passed --delete")));
        assert!(!set(&t, "/etc/shadow")
            .comments
            .iter()
            .any(|c| c.starts_with("no line passed --delete")));
        assert!(!set(&t, "/var/log")
            .comments
            .iter()
            .any(|c| c.starts_with("no line passed --delete")));
        let root = set(&t, "/root");
        assert!(root
            .comments
            .iter()
            .any(|c| c.contains("disagreed on excludes")
                && c.contains(".ssh/")
                && c.contains("**/.ssh/known_hosts")));
        assert!(root
            .comments
            .iter()
            .any(|c| c.contains("became \"**/.ssh/known_hosts\"")));
        let home = set(&t, "/home");
        assert!(home
            .comments
            .iter()
            .any(|c| c.contains("extra operand(s) /home/") && c.contains("Unexpected remote arg")));
        assert!(set(&t, "/var/log")
            .comments
            .iter()
            .any(|c| c.contains("mode append")));

        assert!(!notes_with(&t, "ping -c 1 -w 3 $Sensai").is_empty());
        assert!(
            !notes_with(&t, "if [ \"$?\" = 0 ]").is_empty(),
            "{:#?}",
            t.notes
        );
        assert!(!notes_with(&t, "rank=$(cat PROMOTE)").is_empty());
        assert!(!notes_with(&t, "if [ \"$rank\" = 0 ]").is_empty());
        assert_eq!(notes_with(&t, "> PROMOTE").len(), 2);
        for n in notes_with(&t, "clusterd elects the leader") {
            assert!(n.starts_with("not translated: "), "{n}");
            assert!(
                n.contains("role_file = \"/root/master-sync/PROMOTE\" in [hooks]"),
                "{n}"
            );
        }
        assert_eq!(
            notes_with(&t, "clusterd elects the leader").len(),
            6,
            "{:#?}",
            t.notes
        );
        assert!(!notes_with(&t, "not translated: cd /root/master-sync").is_empty());
        assert!(!notes_with(
            &t,
            "not translated: Sensai=10.9.9.222 (shell variable naming the peer"
        )
        .is_empty());
        assert!(!notes_with(&t, "root@$Sensai (10.9.9.222)").is_empty());
        // Nothing but the listed notes: every command of the script is accounted for.
        assert!(notes_with(&t, "unrecognised").is_empty(), "{:#?}", t.notes);
        check_toml(&t);
    }

    #[test]
    fn smtp_seed() {
        let t = translate(SMTP);
        assert_eq!(
            rows(&t),
            vec![
                row("/var/www", D, M, &["connection.cfg", "SYN-LINK"], &[]),
                row("/etc/postfix", D, M, &[], &[]),
                row("/etc/spamassassin", D, M, &[], &[]),
                row(
                    "/var/lib/amavis/.spamassassin",
                    D,
                    M,
                    &["*.lock"],
                    &["*.lock"]
                ),
            ]
        );
        let db = set(&t, "/var/lib/amavis/.spamassassin");
        assert_eq!(db.name, "var-lib-amavis-.spamassassin");
        assert!(db
            .comments
            .iter()
            .any(|c| c.contains("skip_while \"*.lock\"")
                && c.contains("/var/lib/amavis/.spamassassin/*.lock")));
        assert!(db.comments[0].contains("pull from root@node1"));
        assert!(db.comments[0].contains("push to root@node3"));
        let www = set(&t, "/var/www");
        assert!(www
            .comments
            .iter()
            .any(|c| c.contains("staged it in /root/CLUSTER-CONFIGURATION/var-www")));
        assert!(www.comments.iter().any(|c| c.contains(
            "line 23 (pull from root@node1) excluded \"connection.cfg\", \"SYN-LINK\"; line 59 (push to root@node2), line 87 (push to root@node3) excluded nothing"
        )), "{:?}", www.comments);

        assert_eq!(
            notes_with(&t, "ssh root@node")
                .iter()
                .filter(|n| n.contains("lockfile-create"))
                .count(),
            6
        );
        assert_eq!(notes_with(&t, "'lockfile-remove").len(), 6);
        assert_eq!(notes_with(&t, "chown amavis:amavis").len(), 3);
        for n in notes_with(&t, "ssh root@node") {
            assert!(n.starts_with("not translated: ssh root@node"), "{n}");
        }
        let reboots = notes_with(&t, "reboot");
        assert_eq!(reboots.len(), 2);
        assert!(reboots
            .iter()
            .all(|n| n.contains("clusterd never reboots nodes; use on_change")));
        let own = notes_with(
            &t,
            "lockfile-create /root/CLUSTER-SYNC/cluster-config-sync.sh",
        );
        assert!(own[0].contains("clusterd runs continuously"), "{own:?}");
        assert!(notes_with(&t, "clusterd runs continuously").len() == 2);
        assert!(notes_with(&t, "unrecognised").is_empty(), "{:#?}", t.notes);
        assert!(notes_with(&t, "echo").is_empty() && notes_with(&t, "sleep").is_empty());
        assert!(!notes_with(&t, "root@node1, root@node2, root@node3").is_empty());
        check_toml(&t);
    }

    #[test]
    fn tacacs_seed() {
        let t = translate(TACACS);
        let mut want = vec![
            row("/etc/tacacs+", D, M, &[], &[]),
            row("/var/log", D, A, &[], &[]),
            row("/etc/logrotate.d", D, M, &[], &[]),
            row("/root", D, M, &["**/.ssh/known_hosts"], &[]),
            row("/home", D, M, &[], &[]),
        ];
        want.extend(accounts());
        assert_eq!(rows(&t), want);
        assert_eq!(t.sets.len(), 13);
        assert_eq!(set(&t, "/etc/tacacs+").name, "etc-tacacs+");
        assert!(!notes_with(&t, "Sensai=172.17.13.37").is_empty());
        assert!(notes_with(&t, "PROMOTE").is_empty());
        check_toml(&t);
    }

    #[test]
    fn quoted_arguments_and_exclude_forms() {
        let script = r##"
rsync -a --exclude 'My Docs/' --exclude="#tmp#" "root@h:/srv/my files/" /srv/x/   # copy "them"
rsync -a --exclude=cache/tmp/ -e 'ssh -p 2222' /srv/b/ backup@h:/srv/b/ # comment with 'quote
"##;
        let t = translate(script);
        assert_eq!(
            rows(&t),
            vec![
                row("/srv/my files", D, M, &["My Docs/", "#tmp#"], &[]),
                row("/srv/b", D, M, &["**/cache/tmp/"], &[]),
            ]
        );
        assert_eq!(t.sets[0].name, "srv-my-files");
        assert!(
            t.notes.iter().all(|n| !n.starts_with("not translated")),
            "{:#?}",
            t.notes
        );
        check_toml(&t);
    }

    #[test]
    fn untokenisable_line_is_a_note() {
        let t = translate("rsync -a 'root@h:/etc/x/ /etc/x/\nrsync -a root@h:/etc/y/ /etc/y/\n");
        assert_eq!(rows(&t), vec![row("/etc/y", D, M, &[], &[])]);
        assert_eq!(
            t.notes[0],
            "not translated: rsync -a 'root@h:/etc/x/ /etc/x/ (cannot split it into words: missing closing quote)"
        );
        check_toml(&t);
    }

    #[test]
    fn no_rsync_at_all() {
        let t = translate("#!/bin/sh\necho hello\nsleep 3\n");
        assert!(t.sets.is_empty());
        assert_eq!(
            t.notes,
            vec!["no rsync invocation found: there is no [[sync]] set to draft".to_string()]
        );
        let table = check_toml(&t);
        assert!(table.is_empty());
        assert!(translate("").notes[0].starts_with("no rsync invocation found"));
    }

    #[test]
    fn name_collisions_get_a_suffix() {
        let t = translate("rsync -a root@h:/etc/Foo/ /etc/Foo/\nrsync -a root@h:/etc/foo/ /etc/foo/\nrsync -a root@h:/etc/f\\ oo/ /x/\nrsync -a root@h:/ /backup/\n");
        let names: Vec<&str> = t.sets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["etc-foo", "etc-foo-2", "etc-f-oo", "fs-root"]);
        assert!(t.sets[1]
            .comments
            .iter()
            .any(|c| c.contains("already taken")));
        check_toml(&t);
    }

    #[test]
    fn options_directions_and_odd_lines() {
        let script = "\
rsync -avz --delete --bwlimit 100 -u root@h:/etc/nginx/ /etc/nginx/
rsync -a /etc/aliases root@h:/etc/
rsync -a /srv/a/ /srv/b/
rsync -a root@h:/a/ root@g:/b/
rsync -a h::module/ /x/
cd /opt; rsync -a data/ root@h:conf/
";
        let t = translate(&format!(
            "{script}if ! rsync -a root@h:/etc/z/ /etc/z/; then echo failed; fi\n"
        ));
        assert_eq!(
            rows(&t),
            vec![
                row("/etc/nginx", D, M, &[], &[]),
                row("/etc/aliases", F, M, &[], &[]),
                row("/root/conf", D, M, &[], &[]),
                row("/etc/z", D, M, &[], &[]),
            ]
        );
        let nginx = &t.sets[0].comments;
        assert!(
            nginx.contains(&"--delete: mirror mode deletes anyway".to_string()),
            "{nginx:?}"
        );
        assert!(
            !nginx
                .iter()
                .any(|c| c.starts_with("no line passed --delete")),
            "{nginx:?}"
        );
        assert!(
            nginx
                .iter()
                .any(|c| c.contains("not translated, review by hand: --bwlimit=100, -u")),
            "{nginx:?}"
        );
        assert!(t.sets[1]
            .comments
            .iter()
            .any(|c| c.contains("rsync put it inside /etc/")));
        assert!(t.sets[2]
            .comments
            .iter()
            .any(|c| c.contains("relative to the login's home")));
        assert!(t.sets[2]
            .comments
            .iter()
            .any(|c| c.contains("staged it in /opt/data")));
        assert_eq!(notes_with(&t, "neither side is remote").len(), 1);
        assert_eq!(notes_with(&t, "more than one remote side").len(), 1);
        assert_eq!(notes_with(&t, "daemon").len(), 1);
        assert!(notes_with(&t, "if ! rsync").is_empty(), "{:#?}", t.notes);
        check_toml(&t);
    }

    #[test]
    fn local_lock_check_continuation_and_on_change() {
        let script = "\
if [ -f /var/lib/app/db/*.lock ]; then echo locked; else
  rsync -a \\
     root@h:/var/lib/app/ /var/lib/app/
fi
if ! test -e /srv/q/queue.lock; then rsync -a /srv/q/ root@h:/srv/q/; fi
ssh root@h 'postfix reload && systemctl restart amavis' > /dev/null 2>&1
service tac_plus restart
ssh -p 22 root@h \"touch /x\"
if [ -f /elsewhere/x.lock ]; then :; else rsync -a /y/ root@h:/y/; fi
";
        let t = translate(script);
        assert_eq!(
            rows(&t),
            vec![
                row("/var/lib/app", D, M, &[], &["db/*.lock"]),
                row("/srv/q", D, M, &[], &["queue.lock"]),
                row("/y", D, M, &[], &[]),
            ]
        );
        assert!(t.sets[2]
            .comments
            .iter()
            .any(|c| c.contains("outside this set")));
        assert_eq!(
            notes_with(&t, "suggested on_change").len(),
            3,
            "{:#?}",
            t.notes
        );
        assert!(!notes_with(&t, "suggested on_change = \"postfix reload\"").is_empty());
        assert!(!notes_with(&t, "suggested on_change = \"systemctl restart amavis\"").is_empty());
        assert!(!notes_with(&t, "suggested on_change = \"service tac_plus restart\"").is_empty());
        assert!(!notes_with(
            &t,
            "not translated: ssh -p 22 root@h \"touch /x\" (ssh command"
        )
        .is_empty());
        check_toml(&t);
    }

    #[test]
    fn toml_escaping() {
        let t = translate(
            "rsync -a 'root@h:/srv/we\"ird\\\\dir/' /x/ --exclude='a\"b'\nfoo\tbar\u{1}\n",
        );
        assert_eq!(t.sets[0].path, "/srv/we\"ird\\\\dir");
        let table = check_toml(&t);
        assert_eq!(
            table["sync"][0]["path"].as_str(),
            Some("/srv/we\"ird\\\\dir")
        );
        assert_eq!(table["sync"][0]["exclude"][0].as_str(), Some("a\"b"));
    }

    #[test]
    fn crlf_scripts() {
        let t = translate(
            "rsync -a root@h:/etc/x/ /etc/x/ --exclude=a\r\nrsync -a root@h:/etc/y /etc/y\r\n",
        );
        assert_eq!(
            rows(&t),
            vec![
                row("/etc/x", D, M, &["a"], &[]),
                row("/etc/y", F, M, &[], &[])
            ]
        );
    }

    #[test]
    fn split_commands_respects_quotes_and_comments() {
        let segs = split_commands(r#"a 'b # c' "d;e" $(f | g) x#y # z"#);
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0].text, r#"a 'b # c' "d;e" $(f | g) x#y"#);
        let segs = split_commands("if [ x ] && y 2>&1; then z &>/dev/null | w");
        let texts: Vec<&str> = segs.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(texts, ["if [ x ]", "y 2>&1", "then z &>/dev/null", "w"]);
    }
}
