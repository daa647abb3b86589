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
//! * **Account databases.** Whole-file copies of `passwd`, `shadow`, `group`,
//!   `gshadow` and their `-` backups in one directory become one `kind =
//!   "accounts"` set whose `path` is that directory (named `accounts` for
//!   `/etc`, `accounts-<directory's name>` elsewhere), at the place of the first
//!   of them; its comments and a note say why: clusterd replicates accounts as
//!   records (the users and groups in `uid_range`/`gid_range` or named in
//!   `include`, keys printed commented out with their defaults) and each node
//!   keeps its own system accounts, whose ids differ between hosts, which
//!   copying the files whole overwrote. The `-` backups are not replicated
//!   (each node keeps its own): a directory with nothing but backups copied
//!   gives a note and no set. The set has no `mode`, `exclude`, `skip_while`,
//!   `hard_links` or `xattrs`: the lines' excludes, `--delete`, `-H`/`-A`/`-X`
//!   and lock checks are dropped with a comment (clusterd reads the files only
//!   while no shadow-utils lock is held). A directory is folded only when it is
//!   an `etc` directory or the script copies two or more of the four databases
//!   there; a lone `passwd` elsewhere (`/etc/exim4/passwd`) stays a single file,
//!   with a comment.
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
    "passwd, shadow, group and gshadow (and their - backups, which are not replicated) in one directory become one kind = \"accounts\" set of that directory: accounts travel as records, each node keeps its own system accounts",
    "service reloads and restarts are suggested as on_change; ssh commands, ping/PROMOTE logic and lock files are not translated; echo and sleep are dropped",
];

/// What a set is: how the directory-or-file question was answered, or an accounts set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// A directory tree (the script named it with a trailing slash, or it is a well-known directory).
    Directory,
    /// A single file (named without a trailing slash).
    File,
    /// `kind = "accounts"`: the account databases (`passwd`, `shadow`, `group`,
    /// `gshadow`) of the directory `path`, replicated as records.
    Accounts,
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
    /// Directory or single file (only shapes the comments), or an accounts set
    /// (printed as `kind = "accounts"`).
    pub kind: PathKind,
    /// `mode`; not printed for an accounts set, which keeps the default.
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
    /// suggested `on_change` commands, then suggestions for `[hooks]` and `[[peer]]`,
    /// then one note per directory whose account databases became an accounts set.
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
            if set.kind == PathKind::Accounts {
                out.push_str("kind = \"accounts\"\n");
                let _ = writeln!(out, "path = {}", toml_string(&set.path));
                accounts_keys(&mut out, &set.name);
                continue;
            }
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

/// The keys of an accounts set, commented out with their defaults.
fn accounts_keys(out: &mut String, name: &str) {
    let keys = [
        ("uid_range = \"1000-59999\"", "the default: users whose uid lies in it are replicated".to_string()),
        ("gid_range = \"1000-59999\"", "the default: groups whose gid lies in it are replicated".to_string()),
        ("include = []", "names of users and groups outside the ranges to replicate too, e.g. [\"tac-plus\"]".to_string()),
        ("max_removed = 20", format!("the default: a change removing more accounts at once waits for `clusterctl sync {name} --confirm`")),
    ];
    for (key, why) in keys {
        comment(out, &format!("{key:<26} # {why}"));
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

mod rsync;
mod shell;
#[cfg(test)]
mod tests;
mod translator;

use rsync::*;
use shell::*;
use translator::*;
