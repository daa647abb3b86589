//! Path policy for sync sets: the one place that decides which relative paths
//! exist inside a set, how they are spelled on the wire, and which of them the
//! set's `exclude` and `skip_while` globs select.
//!
//! It owns three things and does no I/O at all (no `stat`, no `canonicalize`,
//! no symlink resolution):
//!
//! * [`SetPath`], a validated path relative to a set's root, as it travels in
//!   Raft entries, snapshots, quarantine records and on the wire;
//! * [`Filter`], the compiled `exclude` / `skip_while` globs of one set
//!   (gitignore-style, see [`Filter`] for the exact rules);
//! * [`check_incoming`], the single gate every path from outside this process
//!   passes: validate the spelling, then refuse what the set excludes.
//!
//! # Invariant
//!
//! A [`SetPath`] value exists only if its bytes are canonical: non-empty,
//! relative (no leading `/`), components separated by single `/`, no trailing
//! `/`, no empty, `.` or `..` component, no NUL byte, at most
//! [`MAX_PATH_LEN`] bytes in all and [`MAX_NAME_LEN`] bytes per component.
//! So `root.join(path)` is always lexically below `root`, and every path has
//! exactly one spelling: a hostile peer cannot name one file two ways (to
//! dodge an exclude or a quarantine record), and input that is not already
//! canonical is refused, never silently normalized.
//!
//! Lexically inside is all a pure module can promise. A symlink planted inside
//! a set (`/etc/tacacs+/evil -> /etc`) is the I/O layer's job: it opens every
//! component relative to the root's directory handle without following links.
//!
//! # The set root has no `SetPath`
//!
//! The root itself (the directory of a directory set, or the one file of a
//! single-file set such as `/etc/aliases`) is not a `SetPath`: code that can
//! address it uses `Option<SetPath>` with `None` meaning the root, which is
//! also what [`SetPath::parent`] returns for a top-level entry. Wire formats
//! must encode the root as an explicit absent field, never as an empty string,
//! so an empty path from the network is always an error and a bug that yields
//! `""` can never turn into "delete the whole set".
//!
//! Paths are bytes, not UTF-8: Linux file names are arbitrary bytes but NUL
//! and `/`, and a set must replicate the names it has. Only logs see a
//! rendering, escaped so that no name can forge or hide log text.

use std::cmp::Ordering;
use std::ffi::OsStr;
use std::fmt::{self, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use globset::{Candidate, GlobBuilder, GlobSet, GlobSetBuilder};

/// Longest path accepted, in bytes, relative to the set root (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest component accepted, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// Errors quote at most this many bytes of a path: a hostile peer can send a
/// path of a megabyte, and each refusal is logged.
const LOGGED_PATH_MAX: usize = 1024;

// ---------------------------------------------------------------------------
// SetPath
// ---------------------------------------------------------------------------

/// A canonical path relative to a sync set's root; see the module invariant.
///
/// Equality and hashing are on the bytes. Ordering is component by component
/// (`a` < `a/b` < `a-c` < `a0`), unlike a plain byte order (where `a-c` < `a/b`
/// because `-` < `/`): sorted this way a directory comes right before its
/// whole subtree, so a `BTreeMap` manifest can take or delete a subtree as one
/// range, and applying in order creates parents before children.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SetPath(Box<[u8]>);

impl SetPath {
    /// Accepts `bytes` only if they are already canonical. This is the
    /// constructor for everything that did not come from walking the local
    /// tree: peers, Raft entries, snapshots, quarantine records.
    pub fn from_network(bytes: &[u8]) -> Result<SetPath, PathError> {
        validate(bytes)?;
        Ok(SetPath(bytes.into()))
    }

    /// The path of `full` relative to `root`, for paths found by walking or
    /// watching the local tree. Both are taken as spelled (nothing is
    /// resolved), so they must be spelled alike: `/etc/tacacs+/x` is under
    /// `/etc/tacacs+` (or `/etc/tacacs+/`), but `/etc/tacacs+evil` is not.
    /// Redundant `/` and inner `.` are tolerated here, because `Path` already
    /// drops them and this input is our own; `..` is refused.
    pub fn from_local(root: &Path, full: &Path) -> Result<SetPath, PathError> {
        let not_under = || PathError::NotUnderRoot {
            path: LoggedPath::new(full.as_os_str().as_bytes()),
            root: LoggedPath::new(root.as_os_str().as_bytes()),
        };
        // `strip_prefix` compares whole components, which is what refuses
        // the prefix-but-not-child case `/etc/tacacs+evil`.
        let rest = full.strip_prefix(root).map_err(|_| not_under())?;
        let mut out = Vec::with_capacity(rest.as_os_str().len());
        for component in rest.components() {
            match component {
                Component::Normal(name) => {
                    if !out.is_empty() {
                        out.push(b'/');
                    }
                    out.extend_from_slice(name.as_bytes());
                }
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(PathError::DotDotComponent {
                        path: LoggedPath::new(full.as_os_str().as_bytes()),
                    })
                }
                Component::RootDir | Component::Prefix(_) => return Err(not_under()),
            }
        }
        if out.is_empty() {
            return Err(PathError::IsRoot {
                root: LoggedPath::new(root.as_os_str().as_bytes()),
            });
        }
        // Lengths and NUL still apply: a deep local tree can exceed them, and
        // a path we could not send must not be half-handled.
        validate(&out)?;
        Ok(SetPath(out.into()))
    }

    /// The canonical bytes, exactly as they go on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The same bytes as an `OsStr`, for relative `openat`-style calls.
    pub fn as_os_str(&self) -> &OsStr {
        OsStr::from_bytes(&self.0)
    }

    /// The components, root side first; never empty, never `.` or `..`.
    pub fn components(&self) -> impl DoubleEndedIterator<Item = &[u8]> + '_ {
        self.0.split(|&b| b == b'/')
    }

    /// The last component.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(slash) => &self.0[slash + 1..],
            None => &self.0,
        }
    }

    /// The containing directory, or `None` when that is the set root.
    pub fn parent(&self) -> Option<SetPath> {
        let slash = self.0.iter().rposition(|&b| b == b'/')?;
        // A prefix of a canonical path that ends before a `/` is canonical.
        Some(SetPath(self.0[..slash].into()))
    }

    /// `self/name`. `name` must be one valid component (no `/`), and the
    /// result must fit [`MAX_PATH_LEN`].
    pub fn join(&self, name: &[u8]) -> Result<SetPath, PathError> {
        if name.is_empty() || name.contains(&b'/') {
            return Err(PathError::NotAName {
                name: LoggedPath::new(name),
            });
        }
        let mut out = Vec::with_capacity(self.0.len() + 1 + name.len());
        out.extend_from_slice(&self.0);
        out.push(b'/');
        out.extend_from_slice(name);
        validate(&out)?;
        Ok(SetPath(out.into()))
    }

    /// True if `self` is a proper ancestor directory of `other`
    /// (`a` of `a/b`, but not of `a` nor of `ab`).
    pub fn is_ancestor_of(&self, other: &SetPath) -> bool {
        other.0.len() > self.0.len()
            && other.0.starts_with(&self.0)
            && other.0[self.0.len()] == b'/'
    }

    /// The node-local path: `root/self`. Lexically below `root` by the
    /// invariant; symlinks along the way are the caller's to refuse.
    pub fn to_local(&self, root: &Path) -> PathBuf {
        root.join(self.as_os_str())
    }

    /// Proper ancestors as byte prefixes, shallowest first (`a`, `a/b` for
    /// `a/b/c`).
    fn ancestor_prefixes(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'/')
            .map(|(i, _)| &self.0[..i])
    }
}

/// The node-local path of `path` inside `root`, `None` being the root itself
/// (see "The set root has no `SetPath`" above).
pub fn local_path(root: &Path, path: Option<&SetPath>) -> PathBuf {
    match path {
        Some(p) => p.to_local(root),
        None => root.to_path_buf(),
    }
}

impl Ord for SetPath {
    fn cmp(&self, other: &Self) -> Ordering {
        // Component-wise order equals byte order with `/` taken as the
        // smallest byte: a `/` means "this component ended", and a component
        // that ended first is a prefix of the other, hence smaller. NUL, the
        // only byte below `/`, cannot occur in a SetPath, so mapping `/` to 0
        // is exact.
        let key = |b: &u8| if *b == b'/' { 0 } else { *b };
        self.0.iter().map(key).cmp(other.0.iter().map(key))
    }
}

impl PartialOrd for SetPath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Log rendering: valid UTF-8 as is, everything that could forge or hide log
/// text escaped (`\xNN` for control and invalid bytes, `\u{..}` for Unicode
/// controls and bidi/zero-width characters, `\\` and `\"`). Unambiguous, but
/// not the bytes: use [`SetPath::as_bytes`] for anything but logs.
impl fmt::Display for SetPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, &self.0)
    }
}

impl fmt::Debug for SetPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SetPath(\"{self}\")")
    }
}

/// The canonical-form check behind every constructor.
fn validate(bytes: &[u8]) -> Result<(), PathError> {
    let path = || LoggedPath::new(bytes);
    if bytes.is_empty() {
        return Err(PathError::Empty);
    }
    // Length first: it is O(1) and bounds the work of every later check.
    if bytes.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong {
            path: path(),
            len: bytes.len(),
        });
    }
    if let Some(at) = bytes.iter().position(|&b| b == 0) {
        return Err(PathError::Nul { path: path(), at });
    }
    if bytes[0] == b'/' {
        return Err(PathError::Absolute { path: path() });
    }
    if bytes[bytes.len() - 1] == b'/' {
        return Err(PathError::TrailingSlash { path: path() });
    }
    for component in bytes.split(|&b| b == b'/') {
        match component {
            b"" => return Err(PathError::EmptyComponent { path: path() }),
            b"." => return Err(PathError::DotComponent { path: path() }),
            b".." => return Err(PathError::DotDotComponent { path: path() }),
            c if c.len() > MAX_NAME_LEN => {
                return Err(PathError::ComponentTooLong {
                    path: path(),
                    len: c.len(),
                })
            }
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Errors and log rendering
// ---------------------------------------------------------------------------

/// Why a path was refused: one sentence naming the path (quoted, escaped) and
/// the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path \"\" is empty: a path inside a sync set must name an entry below the set root")]
    Empty,
    #[error("path {path} is {len} bytes long, over the limit of {max} bytes", max = MAX_PATH_LEN)]
    TooLong { path: LoggedPath, len: usize },
    #[error("path {path} has a component of {len} bytes, over the limit of {max} bytes", max = MAX_NAME_LEN)]
    ComponentTooLong { path: LoggedPath, len: usize },
    #[error("path {path} contains a NUL byte at offset {at}; file names cannot contain NUL")]
    Nul { path: LoggedPath, at: usize },
    #[error("path {path} is absolute; a path inside a sync set must be relative to the set root")]
    Absolute { path: LoggedPath },
    #[error("path {path} ends with `/`; canonical paths have no trailing slash")]
    TrailingSlash { path: LoggedPath },
    #[error("path {path} contains an empty component (`//`); canonical paths separate components with a single `/`")]
    EmptyComponent { path: LoggedPath },
    #[error("path {path} contains a `.` component; canonical paths do not")]
    DotComponent { path: LoggedPath },
    #[error("path {path} contains a `..` component, which could climb out of the set root")]
    DotDotComponent { path: LoggedPath },
    #[error("name {name} is not a single path component (it is empty or contains `/`)")]
    NotAName { name: LoggedPath },
    #[error("local path {path} is not inside the set root {root}")]
    NotUnderRoot { path: LoggedPath, root: LoggedPath },
    #[error("local path {root} is the set root itself, which has no path inside the set")]
    IsRoot { root: LoggedPath },
    #[error("path {path} is excluded from this sync set by pattern {}", Quoted(.pattern))]
    Excluded { path: LoggedPath, pattern: String },
}

/// A path as quoted in an error: escaped like [`SetPath`]'s `Display`, in
/// double quotes, and cut after 1 KiB with its full length noted.
#[derive(Clone, PartialEq, Eq)]
pub struct LoggedPath {
    head: Box<[u8]>,
    len: usize,
}

impl LoggedPath {
    fn new(bytes: &[u8]) -> LoggedPath {
        LoggedPath {
            head: bytes[..bytes.len().min(LOGGED_PATH_MAX)].into(),
            len: bytes.len(),
        }
    }

    /// The quoted bytes (all of them unless the path was over 1 KiB).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// The length of the whole path.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for the empty path.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Display for LoggedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        write_escaped(f, &self.head)?;
        if self.len > self.head.len() {
            write!(f, "...\" ({} bytes)", self.len)
        } else {
            f.write_char('"')
        }
    }
}

impl fmt::Debug for LoggedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A config pattern in double quotes, escaped like a path.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        write_escaped(f, self.0.as_bytes())?;
        f.write_char('"')
    }
}

fn write_escaped(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                // Escaped so that the rendering inside quotes is unambiguous.
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                // A newline in a file name must not start a forged log line.
                c if c.is_ascii_control() => write!(f, "\\x{:02x}", c as u32)?,
                c if c.is_control() || is_invisible(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        for b in chunk.invalid() {
            write!(f, "\\x{b:02x}")?;
        }
    }
    Ok(())
}

/// Characters that reorder or hide the text around them (bidi controls,
/// zero-width, line separators): shown escaped so a file name cannot make a
/// log line read as something else ("Trojan Source").
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{061c}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{feff}'
    )
}

// ---------------------------------------------------------------------------
// Filter
// ---------------------------------------------------------------------------

/// The compiled `exclude` and `skip_while` globs of one sync set.
///
/// Patterns follow gitignore, relative to the set root:
/// * a pattern with no `/` but a trailing one (`*.lock`, `.ssh/`) matches a
///   name at any depth;
/// * a pattern with a `/` at its start or in its middle
///   (`/rancid/.cvsignore`, `tmp/**`, `.ssh/known_hosts`) is anchored to the
///   root; a leading `/` only anchors. Write `**/.ssh/known_hosts` for any
///   depth;
/// * a trailing `/` matches directories only, and (through ancestor
///   exclusion) everything under them;
/// * `*` and `?` do not cross `/`; `**` as a whole component does
///   (`a/**/b` matches `a/b` and `a/x/y/b`; `tmp/**` matches everything under
///   `tmp` but not `tmp` itself); `**` inside a component acts as `*`;
/// * `\` escapes the next character (`\!x` is the name `!x`).
///
/// Differences from gitignore, on purpose: `!` negation is refused (an
/// exclude list that re-includes is easy to get wrong on a set holding
/// `/etc/shadow`); `#` and trailing spaces are literal (a TOML list has its
/// own comments and quotes); `{a,b}` alternation works (globset). Matching is
/// on bytes, so `?` and `[...]` match one byte: use `*` around non-ASCII.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    exclude: PatternSet,
    skip_while: PatternSet,
}

impl Filter {
    /// Compiles both lists. Every bad pattern is reported, not just the
    /// first; errors name the key without the set index (see
    /// [`Filter::for_set`]).
    pub fn new(exclude: &[String], skip_while: &[String]) -> Result<Filter, FilterError> {
        let mut problems = Vec::new();
        let exclude = PatternSet::compile(PatternList::Exclude, exclude, &mut problems);
        let skip_while = PatternSet::compile(PatternList::SkipWhile, skip_while, &mut problems);
        if problems.is_empty() {
            Ok(Filter {
                exclude,
                skip_while,
            })
        } else {
            Err(FilterError { problems })
        }
    }

    /// [`Filter::new`] for `sync[set_index]`, so errors name the full key
    /// (`sync[2].exclude`).
    pub fn for_set(
        set_index: usize,
        exclude: &[String],
        skip_while: &[String],
    ) -> Result<Filter, FilterError> {
        Filter::new(exclude, skip_while).map_err(|e| e.for_set(set_index))
    }

    /// True if `path`, or any directory above it, matches an `exclude`
    /// pattern. `is_dir` says whether `path` itself is a directory (for
    /// patterns ending in `/`); its ancestors are directories by definition.
    pub fn is_excluded(&self, path: &SetPath, is_dir: bool) -> bool {
        self.excluded_by(path, is_dir).is_some()
    }

    /// The `exclude` pattern (as written) that excludes `path`, for logs.
    /// Ancestors are tried first, shallowest first, so the pattern reported
    /// is the one that cut off the subtree.
    pub fn excluded_by(&self, path: &SetPath, is_dir: bool) -> Option<&str> {
        if self.exclude.is_empty() {
            return None;
        }
        path.ancestor_prefixes()
            .find_map(|dir| self.exclude.first_match(dir, true))
            .or_else(|| self.exclude.first_match(path.as_bytes(), is_dir))
    }

    /// True if `path` itself matches a `skip_while` pattern: while such an
    /// entry exists in the set, the set is neither read nor applied. Only the
    /// entry itself counts, not its ancestors (the marker is whatever
    /// appears, e.g. `bayes.lock`), and it counts even if excluded: a walker
    /// that prunes excluded directories must still look for markers in them
    /// if a `skip_while` pattern can match there.
    pub fn is_skip_marker(&self, path: &SetPath, is_dir: bool) -> bool {
        self.skip_while
            .first_match(path.as_bytes(), is_dir)
            .is_some()
    }

    /// True if the set has any `skip_while` pattern (so walkers know whether
    /// to look for markers at all).
    pub fn has_skip_while(&self) -> bool {
        !self.skip_while.is_empty()
    }
}

/// One list of patterns, split by whether a pattern applies to directories
/// only, since globset itself knows nothing of file types.
#[derive(Debug, Clone, Default)]
struct PatternSet {
    any: GlobSet,
    /// Index in `patterns` of each glob in `any`.
    any_src: Vec<usize>,
    dirs_only: GlobSet,
    dirs_only_src: Vec<usize>,
    patterns: Vec<String>,
}

impl PatternSet {
    fn compile(list: PatternList, raw: &[String], problems: &mut Vec<BadPattern>) -> PatternSet {
        let mut any = GlobSetBuilder::new();
        let mut any_src = Vec::new();
        let mut dirs_only = GlobSetBuilder::new();
        let mut dirs_only_src = Vec::new();
        for (index, pattern) in raw.iter().enumerate() {
            match compile_pattern(pattern) {
                Ok((glob, true)) => {
                    dirs_only.add(glob);
                    dirs_only_src.push(index);
                }
                Ok((glob, false)) => {
                    any.add(glob);
                    any_src.push(index);
                }
                Err(problem) => problems.push(BadPattern {
                    set: None,
                    list,
                    index,
                    pattern: pattern.clone(),
                    problem,
                }),
            }
        }
        // Each glob compiled alone above, so building the sets cannot fail on
        // syntax; globset documents no other failure, but report rather than
        // panic if one ever appears.
        let build = |b: GlobSetBuilder, problems: &mut Vec<BadPattern>| {
            b.build().unwrap_or_else(|e| {
                problems.push(BadPattern {
                    set: None,
                    list,
                    index: 0,
                    pattern: raw.join(", "),
                    problem: PatternProblem::Glob(e.kind().to_string()),
                });
                GlobSet::empty()
            })
        };
        PatternSet {
            any: build(any, problems),
            any_src,
            dirs_only: build(dirs_only, problems),
            dirs_only_src,
            patterns: raw.to_vec(),
        }
    }

    fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The first pattern (in config order) matching `path`.
    fn first_match(&self, path: &[u8], is_dir: bool) -> Option<&str> {
        let candidate = Candidate::new(Path::new(OsStr::from_bytes(path)));
        let mut best: Option<usize> = None;
        let mut consider = |set: &GlobSet, src: &[usize]| {
            // `is_match` first: the common answer is "no" and needs no Vec.
            if set.is_match_candidate(&candidate) {
                for i in set.matches_candidate(&candidate) {
                    best = Some(best.map_or(src[i], |b| b.min(src[i])));
                }
            }
        };
        consider(&self.any, &self.any_src);
        if is_dir {
            consider(&self.dirs_only, &self.dirs_only_src);
        }
        best.map(|i| self.patterns[i].as_str())
    }
}

/// Turns one gitignore-style pattern into a glob matched against the whole
/// canonical path, and whether it applies to directories only.
fn compile_pattern(raw: &str) -> Result<(globset::Glob, bool), PatternProblem> {
    if raw.is_empty() {
        return Err(PatternProblem::Empty);
    }
    if raw.starts_with('!') {
        return Err(PatternProblem::Negation);
    }
    if raw.contains('\0') {
        return Err(PatternProblem::Nul);
    }
    let (body, dirs_only) = match raw.strip_suffix('/') {
        Some(body) => (body, true),
        None => (raw, false),
    };
    // gitignore: a `/` at the start or in the middle anchors the pattern.
    let anchored = body.contains('/');
    let body = body.strip_prefix('/').unwrap_or(body);
    if body.is_empty() {
        return Err(PatternProblem::NoName);
    }
    for component in body.split('/') {
        match component {
            "" => return Err(PatternProblem::EmptyComponent),
            "." | ".." => return Err(PatternProblem::DotComponent),
            _ => {}
        }
    }
    let source = if anchored {
        body.to_owned()
    } else {
        // globset's `**/x` also matches `x` at the root.
        format!("**/{body}")
    };
    let glob = GlobBuilder::new(&source)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        // The kind only: the full error would quote `source`, which is not
        // what the user wrote.
        .map_err(|e| PatternProblem::Glob(e.kind().to_string()))?;
    Ok((glob, dirs_only))
}

/// Which list of a `[[sync]]` set a pattern came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternList {
    Exclude,
    SkipWhile,
}

impl PatternList {
    /// The config key: `exclude` or `skip_while`.
    pub fn key(self) -> &'static str {
        match self {
            PatternList::Exclude => "exclude",
            PatternList::SkipWhile => "skip_while",
        }
    }
}

/// Every bad pattern of one set; `Display` gives one sentence per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", Lines(.problems))]
pub struct FilterError {
    pub problems: Vec<BadPattern>,
}

impl FilterError {
    /// Records that these patterns belong to `sync[set_index]`.
    pub fn for_set(mut self, set_index: usize) -> FilterError {
        for p in &mut self.problems {
            p.set = Some(set_index);
        }
        self
    }
}

struct Lines<'a>(&'a [BadPattern]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_char('\n')?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// One refused pattern: `key \`sync[0].exclude\` pattern "!*.lock" starts with ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key `{}` pattern {} {problem}", Key(.set, .list), Quoted(.pattern))]
pub struct BadPattern {
    /// Index of the `[[sync]]` set, when known.
    pub set: Option<usize>,
    pub list: PatternList,
    /// Position of the pattern in its list.
    pub index: usize,
    pub pattern: String,
    pub problem: PatternProblem,
}

struct Key<'a>(&'a Option<usize>, &'a PatternList);

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(i) => write!(f, "sync[{i}].{}", self.1.key()),
            None => f.write_str(self.1.key()),
        }
    }
}

/// The rule a pattern breaks (the end of a [`BadPattern`] sentence).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternProblem {
    #[error("starts with `!`, but negation is not supported: list only what to match (write `\\!` for a name that really starts with `!`)")]
    Negation,
    #[error("is empty and would match nothing")]
    Empty,
    #[error("is only `/` and names nothing")]
    NoName,
    #[error("contains a NUL byte, which no file name can contain")]
    Nul,
    #[error("contains an empty component (`//`), which no path in a set has")]
    EmptyComponent,
    #[error("contains a `.` or `..` component, which no path in a set has (patterns are relative to the set root; start one with `/` to anchor it there)")]
    DotComponent,
    #[error("is not a valid glob: {0}")]
    Glob(String),
}

// ---------------------------------------------------------------------------
// The gate
// ---------------------------------------------------------------------------

/// The single gate for every path from outside this process (peer, Raft
/// entry, snapshot, quarantine record): the bytes must be canonical, and the
/// path must not be excluded from the set (`is_dir`: what the entry says it
/// is). The caller logs the error with the peer, skips the entry and counts
/// it.
pub fn check_incoming(bytes: &[u8], filter: &Filter, is_dir: bool) -> Result<SetPath, PathError> {
    let path = SetPath::from_network(bytes)?;
    if let Some(pattern) = filter.excluded_by(&path, is_dir) {
        return Err(PathError::Excluded {
            path: LoggedPath::new(bytes),
            pattern: pattern.to_owned(),
        });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn p(s: &str) -> SetPath {
        SetPath::from_network(s.as_bytes()).unwrap_or_else(|e| panic!("{s:?} refused: {e}"))
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn excl(patterns: &[&str]) -> Filter {
        Filter::new(&strings(patterns), &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    // --- SetPath: refusals ---------------------------------------------------

    #[test]
    fn hostile_paths_are_refused_with_the_rule_they_break() {
        let long = vec![b'a'; MAX_PATH_LEN + 1];
        let long_name = [vec![b'd', b'/'], vec![b'n'; MAX_NAME_LEN + 1]].concat();
        type IsKind = fn(&PathError) -> bool;
        let cases: Vec<(&[u8], IsKind, &str)> = vec![
            (
                b"../etc/shadow",
                |e| matches!(e, PathError::DotDotComponent { .. }),
                "path \"../etc/shadow\" contains a `..` component",
            ),
            (
                b"/etc/shadow",
                |e| matches!(e, PathError::Absolute { .. }),
                "path \"/etc/shadow\" is absolute",
            ),
            (
                b"/",
                |e| matches!(e, PathError::Absolute { .. }),
                "path \"/\" is absolute",
            ),
            (
                b"a/../../b",
                |e| matches!(e, PathError::DotDotComponent { .. }),
                "path \"a/../../b\" contains a `..`",
            ),
            (
                b"a/..",
                |e| matches!(e, PathError::DotDotComponent { .. }),
                "`..`",
            ),
            (
                b"..",
                |e| matches!(e, PathError::DotDotComponent { .. }),
                "`..`",
            ),
            (
                b"a//b",
                |e| matches!(e, PathError::EmptyComponent { .. }),
                "path \"a//b\" contains an empty component",
            ),
            (
                b"a/./b",
                |e| matches!(e, PathError::DotComponent { .. }),
                "path \"a/./b\" contains a `.` component",
            ),
            (
                b".",
                |e| matches!(e, PathError::DotComponent { .. }),
                "`.` component",
            ),
            (
                b"./a",
                |e| matches!(e, PathError::DotComponent { .. }),
                "`.` component",
            ),
            (
                b"a\0b",
                |e| matches!(e, PathError::Nul { at: 1, .. }),
                "path \"a\\x00b\" contains a NUL byte at offset 1",
            ),
            (b"\0", |e| matches!(e, PathError::Nul { at: 0, .. }), "NUL"),
            (b"", |e| matches!(e, PathError::Empty), "path \"\" is empty"),
            (
                b"a/",
                |e| matches!(e, PathError::TrailingSlash { .. }),
                "path \"a/\" ends with `/`",
            ),
            (
                b"a/b/",
                |e| matches!(e, PathError::TrailingSlash { .. }),
                "ends with `/`",
            ),
            (
                &long,
                |e| matches!(e, PathError::TooLong { len: 4097, .. }),
                "is 4097 bytes long, over the limit of 4096 bytes",
            ),
            (
                &long_name,
                |e| matches!(e, PathError::ComponentTooLong { len: 256, .. }),
                "has a component of 256 bytes, over the limit of 255 bytes",
            ),
        ];
        for (input, is_kind, message) in cases {
            let err = SetPath::from_network(input).expect_err(&String::from_utf8_lossy(input));
            assert!(is_kind(&err), "{input:?}: wrong kind {err:?}");
            let text = err.to_string();
            assert!(
                text.contains(message),
                "{input:?}: {text:?} lacks {message:?}"
            );
            assert!(!text.contains('\n') && !text.contains('\0'), "{text:?}");
        }
    }

    #[test]
    fn limits_are_inclusive() {
        // 2047 times "a/" plus "ab": exactly MAX_PATH_LEN bytes, accepted.
        let mut at_max = b"a/".repeat(2047);
        at_max.extend_from_slice(b"ab");
        assert_eq!(at_max.len(), MAX_PATH_LEN);
        assert!(SetPath::from_network(&at_max).is_ok());
        at_max.push(b'c');
        assert!(matches!(
            SetPath::from_network(&at_max),
            Err(PathError::TooLong { len: 4097, .. })
        ));
        // A component of exactly MAX_NAME_LEN bytes is accepted, one more is not.
        assert!(SetPath::from_network(&[b'n'; MAX_NAME_LEN]).is_ok());
        assert!(SetPath::from_network(&[b"d/".as_slice(), &[b'n'; MAX_NAME_LEN]].concat()).is_ok());
        assert!(matches!(
            SetPath::from_network(&[b'n'; MAX_NAME_LEN + 1]),
            Err(PathError::ComponentTooLong { len: 256, .. })
        ));
        // Within the total limit but one 4096-byte component: refused for the name.
        assert!(matches!(
            SetPath::from_network(&[b'n'; MAX_PATH_LEN]),
            Err(PathError::ComponentTooLong { len: 4096, .. })
        ));
    }

    #[test]
    fn huge_hostile_paths_are_quoted_cut_short() {
        let huge = vec![b'a'; 1 << 20];
        let text = SetPath::from_network(&huge).unwrap_err().to_string();
        assert!(text.len() < 2 * LOGGED_PATH_MAX, "{} bytes", text.len());
        assert!(
            text.contains(&format!("...\" ({} bytes)", 1 << 20)),
            "{text}"
        );
    }

    // --- SetPath: accepted spellings and operations --------------------------

    #[test]
    fn canonical_paths_are_accepted_unchanged() {
        for s in [
            "a",
            "tac_plus.conf",
            "a/b/c",
            ".ssh",
            "alice/.ssh/authorized_keys",
            "..a",
            "a..",
            "...",
            "a/.b",
            "tacacs+",
            "with space",
            "caf\u{e9}",
            "#emacs#",
            "a\\b",
            "-rf",
        ] {
            assert_eq!(p(s).as_bytes(), s.as_bytes());
        }
    }

    #[test]
    fn non_utf8_bytes_are_accepted_and_shown_escaped() {
        let raw = b"caf\xe9/x\xff";
        let path = SetPath::from_network(raw).unwrap();
        assert_eq!(path.as_bytes(), raw);
        assert_eq!(path.to_string(), "caf\\xe9/x\\xff");
        assert_eq!(path.as_os_str().as_bytes(), raw);
    }

    #[test]
    fn display_escapes_what_could_forge_or_hide_log_text() {
        let path = SetPath::from_network("a\nb\"c\\d\u{202e}e\u{85}\x7f".as_bytes()).unwrap();
        assert_eq!(path.to_string(), "a\\x0ab\\\"c\\\\d\\u{202e}e\\u{85}\\x7f");
        assert_eq!(
            format!("{path:?}"),
            "SetPath(\"a\\x0ab\\\"c\\\\d\\u{202e}e\\u{85}\\x7f\")"
        );
        assert_eq!(p("caf\u{e9}/x").to_string(), "caf\u{e9}/x");
    }

    #[test]
    fn components_parent_and_file_name() {
        let path = p("alice/.ssh/authorized_keys");
        let comps: Vec<&[u8]> = path.components().collect();
        assert_eq!(comps, [&b"alice"[..], b".ssh", b"authorized_keys"]);
        assert_eq!(path.file_name(), b"authorized_keys");
        assert_eq!(path.parent(), Some(p("alice/.ssh")));
        assert_eq!(p("alice/.ssh").parent(), Some(p("alice")));
        assert_eq!(
            p("alice").parent(),
            None,
            "a top-level entry's parent is the root"
        );
        assert_eq!(p("alice").file_name(), b"alice");
        assert_eq!(p("a").components().count(), 1);
    }

    #[test]
    fn join_takes_one_valid_name() {
        assert_eq!(p("a").join(b"b").unwrap(), p("a/b"));
        assert_eq!(p("a").join(b"\xff").unwrap().as_bytes(), b"a/\xff");
        for (name, kind) in [
            (&b""[..], "NotAName"),
            (b"b/c", "NotAName"),
            (b"/b", "NotAName"),
            (b".", "DotComponent"),
            (b"..", "DotDotComponent"),
            (b"x\0", "Nul"),
        ] {
            let err = p("a").join(name).unwrap_err();
            assert!(format!("{err:?}").starts_with(kind), "{name:?}: {err:?}");
        }
        assert!(matches!(
            p("a").join(&[b'n'; 256]),
            Err(PathError::ComponentTooLong { .. })
        ));
        let deep = SetPath::from_network(&vec![vec![b'n'; 255]; 16].join(&b'/')).unwrap();
        assert!(matches!(deep.join(b"xy"), Err(PathError::TooLong { .. })));
    }

    #[test]
    fn order_is_component_wise_so_subtrees_are_contiguous() {
        let sorted: Vec<SetPath> = ["a", "a/b", "a/b/c", "a/c", "a-c", "a.b", "a0", "b"]
            .into_iter()
            .map(p)
            .collect();
        for w in sorted.windows(2) {
            assert!(w[0] < w[1], "{} < {}", w[0], w[1]);
        }
        let set: BTreeSet<SetPath> = sorted.iter().rev().cloned().collect();
        assert_eq!(set.into_iter().collect::<Vec<_>>(), sorted);
        // Byte order would have put "a-c" between "a" and "a/b".
        assert!(b"a-c".as_slice() < b"a/b".as_slice());
        assert!(p("a").is_ancestor_of(&p("a/b/c")));
        assert!(p("a/b").is_ancestor_of(&p("a/b/c")));
        assert!(!p("a").is_ancestor_of(&p("a")));
        assert!(!p("a").is_ancestor_of(&p("ab")));
        assert!(!p("a/b").is_ancestor_of(&p("a")));
    }

    // --- SetPath: local paths ------------------------------------------------

    #[test]
    fn from_local_round_trips() {
        let root = Path::new("/etc/tacacs+");
        for rel in ["tac_plus.conf", "a/b/c", ".ssh"] {
            let full = root.join(rel);
            let path = SetPath::from_local(root, &full).unwrap();
            assert_eq!(path, p(rel));
            assert_eq!(path.to_local(root), full);
        }
        let raw_full = Path::new(OsStr::from_bytes(b"/etc/tacacs+/caf\xe9/\xff"));
        let path = SetPath::from_local(root, raw_full).unwrap();
        assert_eq!(path.as_bytes(), b"caf\xe9/\xff");
        assert_eq!(path.to_local(root), raw_full);
        // Spellings `Path` itself treats as equal are ours to tolerate locally.
        assert_eq!(
            SetPath::from_local(Path::new("/etc/tacacs+/"), Path::new("/etc/tacacs+//a/./b"))
                .unwrap(),
            p("a/b")
        );
        assert_eq!(
            SetPath::from_local(Path::new("rel/root"), Path::new("rel/root/x")).unwrap(),
            p("x")
        );
        assert_eq!(local_path(root, None), root);
        assert_eq!(local_path(root, Some(&p("x"))), Path::new("/etc/tacacs+/x"));
    }

    #[test]
    fn from_local_refuses_paths_outside_the_root() {
        let root = Path::new("/etc/tacacs+");
        for full in [
            "/etc/tacacs+evil",
            "/etc/tacacs+evil/x",
            "/etc/shadow",
            "/etc",
            "/",
            "etc/tacacs+/x",
            "tacacs+/x",
        ] {
            let err = SetPath::from_local(root, Path::new(full)).unwrap_err();
            assert!(
                matches!(err, PathError::NotUnderRoot { .. }),
                "{full}: {err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!("local path \"{full}\" is not inside the set root \"/etc/tacacs+\"")
            );
        }
        let err = SetPath::from_local(root, Path::new("/etc/tacacs+/../shadow")).unwrap_err();
        assert!(matches!(err, PathError::DotDotComponent { .. }), "{err:?}");
        assert!(
            err.to_string().contains("\"/etc/tacacs+/../shadow\""),
            "{err}"
        );
        for full in ["/etc/tacacs+", "/etc/tacacs+/", "/etc/tacacs+/."] {
            let err = SetPath::from_local(root, Path::new(full)).unwrap_err();
            assert!(matches!(err, PathError::IsRoot { .. }), "{full}: {err:?}");
        }
        // A single-file set: the file is the root, so it has no SetPath.
        let aliases = Path::new("/etc/aliases");
        assert!(matches!(
            SetPath::from_local(aliases, aliases),
            Err(PathError::IsRoot { .. })
        ));
        let deep = Path::new("/r").join(vec!["n".repeat(255); 17].join("/"));
        assert!(matches!(
            SetPath::from_local(Path::new("/r"), &deep),
            Err(PathError::TooLong { .. })
        ));
        let nul = Path::new(OsStr::from_bytes(b"/r/a\0b"));
        assert!(matches!(
            SetPath::from_local(Path::new("/r"), nul),
            Err(PathError::Nul { .. })
        ));
    }

    // --- Filter --------------------------------------------------------------

    #[test]
    fn name_patterns_match_at_any_depth() {
        let f = excl(&["*.lock", "connection.cfg", "*.swp", "SYN-LINK"]);
        for (path, hit) in [
            ("bayes.lock", true),
            ("var/lib/.spamassassin/bayes.lock", true),
            ("bayes.lock.bak", false),
            ("lock", false),
            ("connection.cfg", true),
            ("site/connection.cfg", true),
            ("connection.cfg.orig", false),
            ("my-connection.cfg", false),
            ("etc/.tac_plus.conf.swp", true),
            ("SYN-LINK", true),
            ("syn-link", false),
        ] {
            assert_eq!(f.is_excluded(&p(path), false), hit, "{path}");
            assert_eq!(f.is_excluded(&p(path), true), hit, "{path} as a directory");
        }
        assert!(f.is_excluded(&SetPath::from_network(b"d/\xff.lock").unwrap(), false));
        assert_eq!(f.excluded_by(&p("a/x.lock"), false), Some("*.lock"));
    }

    #[test]
    fn star_does_not_cross_slash_but_double_star_does() {
        let f = excl(&["/conf/*.cfg", "logs/**", "a/**/b", "/x**y"]);
        assert!(f.is_excluded(&p("conf/a.cfg"), false));
        assert!(
            !f.is_excluded(&p("conf/sub/a.cfg"), false),
            "`*` must not cross `/`"
        );
        assert!(f.is_excluded(&p("logs/a"), false));
        assert!(f.is_excluded(&p("logs/a/b/c"), false));
        assert!(
            !f.is_excluded(&p("logs"), true),
            "`logs/**` matches below logs, not logs"
        );
        assert!(
            !f.is_excluded(&p("var/logs/a"), false),
            "`logs/**` is anchored"
        );
        assert!(f.is_excluded(&p("a/b"), false));
        assert!(f.is_excluded(&p("a/x/y/b"), false));
        assert!(!f.is_excluded(&p("a/x/y/bb"), false));
        assert!(
            f.is_excluded(&p("xzzy"), false),
            "`**` inside a name acts as `*`"
        );
        assert!(!f.is_excluded(&p("xz/zy"), false));
    }

    #[test]
    fn patterns_with_a_slash_are_anchored_to_the_root() {
        let f = excl(&[
            "/rancid/.cvsignore",
            ".ssh/known_hosts",
            "/top",
            "**/deep/x",
        ]);
        assert!(f.is_excluded(&p("rancid/.cvsignore"), false));
        assert!(!f.is_excluded(&p("x/rancid/.cvsignore"), false));
        assert!(!f.is_excluded(&p(".cvsignore"), false));
        assert!(f.is_excluded(&p(".ssh/known_hosts"), false));
        assert!(
            !f.is_excluded(&p("alice/.ssh/known_hosts"), false),
            "gitignore: a middle `/` anchors"
        );
        assert!(f.is_excluded(&p("top"), false));
        assert!(!f.is_excluded(&p("a/top"), false), "a leading `/` anchors");
        assert!(f.is_excluded(&p("deep/x"), false));
        assert!(f.is_excluded(&p("a/b/deep/x"), false));
    }

    #[test]
    fn trailing_slash_matches_directories_and_everything_under_them() {
        let f = excl(&[".ssh/", "master-sync/", "/tmp/"]);
        assert!(f.is_excluded(&p(".ssh"), true));
        assert!(f.is_excluded(&p("alice/.ssh"), true));
        assert!(
            !f.is_excluded(&p("alice/.ssh"), false),
            "a file named .ssh is not a directory"
        );
        assert!(
            f.is_excluded(&p("alice/.ssh/authorized_keys"), false),
            "ancestor excluded"
        );
        assert!(f.is_excluded(&p("alice/.ssh/a/b/c"), true));
        assert!(!f.is_excluded(&p("alice/.sshx/k"), false));
        assert!(!f.is_excluded(&p("alice/x.ssh/k"), false));
        assert!(f.is_excluded(&p("master-sync/PROMOTE"), false));
        assert!(f.is_excluded(&p("root/master-sync/PROMOTE"), false));
        assert!(f.is_excluded(&p("tmp/x"), false));
        assert!(!f.is_excluded(&p("a/tmp/x"), false));
        assert_eq!(f.excluded_by(&p("alice/.ssh/id_rsa"), false), Some(".ssh/"));
    }

    #[test]
    fn ancestor_exclusion_reports_the_shallowest_cut() {
        let f = excl(&["b", "a"]);
        assert_eq!(f.excluded_by(&p("a/b/c"), false), Some("a"));
        assert_eq!(f.excluded_by(&p("x/b"), false), Some("b"));
        assert_eq!(f.excluded_by(&p("x/y"), false), None);
        let both = excl(&["*.cfg", "connection.*"]);
        assert_eq!(
            both.excluded_by(&p("connection.cfg"), false),
            Some("*.cfg"),
            "config order breaks ties"
        );
        let none = Filter::default();
        assert!(!none.is_excluded(&p("anything/at/all"), true));
        assert!(!none.is_skip_marker(&p("x.lock"), false));
        assert!(!none.has_skip_while());
    }

    #[test]
    fn escapes_and_extensions() {
        let f = excl(&["\\!important", "#backup#", "*.{orig,rej}", "[0-9]*.log"]);
        assert!(f.is_excluded(&p("!important"), false));
        assert!(f.is_excluded(&p("a/#backup#"), false));
        assert!(f.is_excluded(&p("main.cf.orig"), false));
        assert!(f.is_excluded(&p("main.cf.rej"), false));
        assert!(f.is_excluded(&p("2024.log"), false));
        assert!(!f.is_excluded(&p("x2024.log"), false));
    }

    #[test]
    fn skip_while_markers() {
        let f = Filter::new(
            &strings(&["*.lock"]),
            &strings(&["*.lock", "/rsync.pause", "busy/"]),
        )
        .unwrap();
        assert!(f.has_skip_while());
        assert!(f.is_skip_marker(&p("bayes.lock"), false));
        assert!(f.is_skip_marker(&p(".spamassassin/bayes.lock"), false));
        assert!(!f.is_skip_marker(&p("bayes_toks"), false));
        assert!(f.is_skip_marker(&p("rsync.pause"), false));
        assert!(!f.is_skip_marker(&p("x/rsync.pause"), false));
        assert!(f.is_skip_marker(&p("busy"), true));
        assert!(!f.is_skip_marker(&p("busy"), false));
        assert!(
            !f.is_skip_marker(&p("busy/x"), false),
            "only the entry itself is a marker"
        );
        // Excluded and a marker at once, as in PRODUCT.md's example.
        assert!(f.is_excluded(&p("bayes.lock"), false));
    }

    #[test]
    fn bad_patterns_are_refused_with_their_key() {
        let err = Filter::for_set(2, &strings(&["ok", "!*.lock"]), &[]).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].index, 1);
        assert_eq!(err.problems[0].problem, PatternProblem::Negation);
        let text = err.to_string();
        assert!(text.starts_with("key `sync[2].exclude` pattern \"!*.lock\" starts with `!`, but negation is not supported"), "{text}");

        let err = Filter::new(&[], &strings(&["!x"])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("key `skip_while` pattern \"!x\""),
            "{err}"
        );

        let cases = [
            ("", PatternProblem::Empty),
            ("/", PatternProblem::NoName),
            ("//", PatternProblem::NoName),
            ("a//b", PatternProblem::EmptyComponent),
            ("a//", PatternProblem::EmptyComponent),
            ("../x", PatternProblem::DotComponent),
            ("./x", PatternProblem::DotComponent),
            ("a/./", PatternProblem::DotComponent),
            ("a\0b", PatternProblem::Nul),
        ];
        for (pattern, problem) in &cases {
            let err = Filter::new(&strings(&[pattern]), &[]).unwrap_err();
            assert_eq!(&err.problems[0].problem, problem, "{pattern:?}");
        }
        for pattern in ["[abc", "a\\", "{a,b"] {
            let err = Filter::new(&strings(&[pattern]), &[]).unwrap_err();
            assert!(
                matches!(err.problems[0].problem, PatternProblem::Glob(_)),
                "{pattern:?}: {err:?}"
            );
            assert!(err.to_string().contains("is not a valid glob: "), "{err}");
            assert!(
                !err.to_string().contains("**/"),
                "quotes the pattern as written: {err}"
            );
        }
        // Every problem of a set is reported, one sentence per line.
        let err = Filter::for_set(0, &strings(&["!a", "", "ok"]), &strings(&["[x"])).unwrap_err();
        let lines: Vec<String> = err.to_string().lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with("key `sync[0].exclude` pattern \"!a\""));
        assert!(lines[1].starts_with("key `sync[0].exclude` pattern \"\" is empty"));
        assert!(lines[2].starts_with("key `sync[0].skip_while` pattern \"[x\" is not a valid glob"));
        let nul = Filter::new(&strings(&["a\0b"]), &[])
            .unwrap_err()
            .to_string();
        assert!(nul.contains("\"a\\x00b\""), "{nul}");
    }

    // --- The gate ------------------------------------------------------------

    #[test]
    fn check_incoming_validates_then_filters() {
        let f = excl(&["*.lock", ".ssh/", "connection.cfg"]);
        assert_eq!(
            check_incoming(b"alice/.profile", &f, false).unwrap(),
            p("alice/.profile")
        );
        assert!(matches!(
            check_incoming(b"../etc/shadow", &f, false),
            Err(PathError::DotDotComponent { .. })
        ));
        assert!(matches!(
            check_incoming(b"/etc/shadow", &f, false),
            Err(PathError::Absolute { .. })
        ));
        assert!(matches!(
            check_incoming(b"", &f, true),
            Err(PathError::Empty)
        ));
        let err = check_incoming(b"alice/.ssh/authorized_keys", &f, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "path \"alice/.ssh/authorized_keys\" is excluded from this sync set by pattern \".ssh/\""
        );
        assert!(matches!(
            check_incoming(b"alice/.ssh", &f, true),
            Err(PathError::Excluded { .. })
        ));
        assert!(
            check_incoming(b"alice/.ssh", &f, false).is_ok(),
            "a file named .ssh is not the directory"
        );
        assert!(matches!(
            check_incoming(b"www/connection.cfg", &f, false),
            Err(PathError::Excluded { .. })
        ));
        // Two spellings of one excluded file: the non-canonical one never
        // reaches the filter.
        assert!(matches!(
            check_incoming(b"alice//.ssh/id_rsa", &f, false),
            Err(PathError::EmptyComponent { .. })
        ));
        assert!(matches!(
            check_incoming(b"./x.lock", &f, false),
            Err(PathError::DotComponent { .. })
        ));
    }

    // --- Randomized ----------------------------------------------------------

    /// xorshift64*: std-only and deterministic, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        /// Byte strings biased toward what path checks care about.
        fn path_bytes(&mut self) -> Vec<u8> {
            const ALPHABET: &[u8] = b"//..ab.\0\xff\xe9\n\\*";
            let len = match self.below(100) {
                0 => MAX_PATH_LEN - 2 + self.below(5),
                1 => self.below(600),
                _ => self.below(16),
            };
            (0..len)
                .map(|_| {
                    if self.below(4) == 0 {
                        self.next() as u8
                    } else {
                        ALPHABET[self.below(ALPHABET.len())]
                    }
                })
                .collect()
        }
    }

    /// The rules restated as plainly as possible, as an oracle.
    fn oracle_accepts(b: &[u8]) -> bool {
        !b.is_empty()
            && b.len() <= MAX_PATH_LEN
            && !b.contains(&0)
            && b.split(|&c| c == b'/')
                .all(|c| !c.is_empty() && c != b"." && c != b".." && c.len() <= MAX_NAME_LEN)
    }

    #[test]
    fn random_bytes_never_panic_and_accepted_paths_round_trip() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let root = Path::new("/etc/tacacs+");
        let filter = excl(&["*.lock", ".ssh/", "/a/**", "b?"]);
        let mut accepted = Vec::new();
        for _ in 0..100_000 {
            let bytes = rng.path_bytes();
            let result = SetPath::from_network(&bytes);
            assert_eq!(
                result.is_ok(),
                oracle_accepts(&bytes),
                "{bytes:?}: {result:?}"
            );
            match result {
                Ok(path) => {
                    assert_eq!(path.as_bytes(), &bytes[..]);
                    assert!(path
                        .components()
                        .all(|c| c != b".." && c != b"." && !c.is_empty()));
                    assert_eq!(path.components().collect::<Vec<_>>().join(&b'/'), bytes);
                    assert_eq!(SetPath::from_network(path.as_bytes()).unwrap(), path);
                    let local = path.to_local(root);
                    assert!(local.starts_with(root));
                    assert_eq!(SetPath::from_local(root, &local).unwrap(), path);
                    let mut depth = 0;
                    let mut up = path.parent();
                    while let Some(parent) = up {
                        assert!(parent.is_ancestor_of(&path));
                        depth += 1;
                        up = parent.parent();
                    }
                    assert_eq!(depth + 1, path.components().count());
                    let _ = filter.is_excluded(&path, rng.below(2) == 0);
                    let _ = check_incoming(&bytes, &filter, false);
                    let _ = path.to_string();
                    if accepted.len() < 2_000 {
                        accepted.push(path);
                    }
                }
                Err(err) => {
                    let text = err.to_string();
                    assert!(
                        !text.contains('\n') && !text.contains('\0') && !text.contains('\u{202e}')
                    );
                    assert!(check_incoming(&bytes, &filter, false).is_err());
                }
            }
        }
        assert!(
            accepted.len() > 500,
            "the generator must also produce valid paths"
        );
        // Ord agrees with component-wise comparison, and Eq with the bytes.
        for a in &accepted[..300] {
            for b in &accepted[..300] {
                assert_eq!(a.cmp(b), a.components().cmp(b.components()), "{a} vs {b}");
                assert_eq!(a == b, a.as_bytes() == b.as_bytes());
            }
        }
    }
}
