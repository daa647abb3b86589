//! Account databases as records: the lines of `passwd`, `shadow`, `group`
//! and `gshadow` (this module), the records an accounts set replicates and
//! the committed view they travel as (`records.rs`), and merging them into a
//! node's own files in an order that never shows a user without its shadow
//! entry (`merge.rs`). Pure: the files are handed in as bytes, the results
//! handed back as bytes.
//!
//! Invariant owned here: a line is either parsed whole (exact field count,
//! numeric ids, no NUL, not overlong) or kept byte for byte as it was; a
//! node's own entries outside the ranges are never rewritten, and a
//! replicated record that collides with one of them is refused, never
//! applied over it.

pub mod merge;
pub mod records;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fmt;

/// One of the four databases shadow-utils maintains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DbFile {
    Passwd,
    Shadow,
    Group,
    Gshadow,
}

impl DbFile {
    pub const ALL: [DbFile; 4] = [
        DbFile::Passwd,
        DbFile::Shadow,
        DbFile::Group,
        DbFile::Gshadow,
    ];

    /// The file's name in the accounts directory.
    pub fn name(self) -> &'static str {
        match self {
            DbFile::Passwd => "passwd",
            DbFile::Shadow => "shadow",
            DbFile::Group => "group",
            DbFile::Gshadow => "gshadow",
        }
    }

    /// Colon-separated fields of one entry (passwd(5), shadow(5), group(5),
    /// gshadow(5)).
    fn fields(self) -> usize {
        match self {
            DbFile::Passwd => 7,
            DbFile::Shadow => 9,
            DbFile::Group | DbFile::Gshadow => 4,
        }
    }

    /// Whether the third field is the entry's numeric id.
    fn has_id(self) -> bool {
        matches!(self, DbFile::Passwd | DbFile::Group)
    }
}

impl fmt::Display for DbFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The longest line accepted. glibc has no limit, but a group of a few
/// thousand members fits many times over; anything longer is damage.
pub const MAX_LINE: usize = 64 * 1024;

/// An inclusive range of user or group ids (`uid_range = "1000-59999"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub first: u32,
    pub last: u32,
}

/// Default `uid_range` and `gid_range`: Debian's and Fedora's range for
/// ordinary users (`UID_MIN`/`UID_MAX` of login.defs).
pub const DEFAULT_RANGE: IdRange = IdRange {
    first: 1000,
    last: 59999,
};

/// Default `max_removed`.
pub const DEFAULT_MAX_REMOVED: u32 = 20;

impl IdRange {
    /// Parses `"FIRST-LAST"` (inclusive, FIRST <= LAST), or why not.
    pub fn parse(s: &str) -> Result<IdRange, String> {
        let (a, b) = s.split_once('-').ok_or_else(|| {
            format!("{s:?} is not of the form \"FIRST-LAST\" (e.g. \"1000-59999\")")
        })?;
        let num = |t: &str| {
            let t = t.trim();
            if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
                return Err(format!("{t:?} in {s:?} is not a number"));
            }
            t.parse::<u32>()
                .map_err(|_| format!("{t:?} in {s:?} is too large for an id"))
        };
        let (first, last) = (num(a)?, num(b)?);
        if first > last {
            return Err(format!("{s:?} starts after it ends"));
        }
        Ok(IdRange { first, last })
    }

    pub fn contains(&self, id: u32) -> bool {
        (self.first..=self.last).contains(&id)
    }
}

impl fmt::Display for IdRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Which entries an accounts set replicates: users and groups whose id is
/// in range or whose name is included. Those are the entries the leader
/// governs on every node; everything else is each node's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub uid_range: IdRange,
    pub gid_range: IdRange,
    /// Names of users and groups replicated whatever their id (e.g.
    /// Debian's `tac-plus`, UID 64005).
    pub include: BTreeSet<String>,
    /// A change removing more users than this is held until confirmed.
    pub max_removed: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            uid_range: DEFAULT_RANGE,
            gid_range: DEFAULT_RANGE,
            include: BTreeSet::new(),
            max_removed: DEFAULT_MAX_REMOVED,
        }
    }
}

impl Policy {
    pub fn governs_user(&self, name: &str, uid: u32) -> bool {
        self.uid_range.contains(uid) || self.include.contains(name)
    }

    pub fn governs_group(&self, name: &str, gid: u32) -> bool {
        self.gid_range.contains(gid) || self.include.contains(name)
    }
}

/// A line of a database, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The line's bytes without its newline: what is written back for a
    /// line this node keeps.
    pub raw: Vec<u8>,
    pub kind: LineKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineKind {
    /// A well-formed entry: its fields, split at `:`.
    Entry(Vec<String>),
    /// A comment, a blank line or a NIS compat line (`+`, `-`): nobody's
    /// entry, kept where it is.
    Other,
    /// Not an entry of this file: why. The first field, if it reads as a
    /// name, so a malformed local line still blocks its name.
    Malformed { why: String, name: Option<String> },
}

impl Line {
    pub fn entry(&self) -> Option<&[String]> {
        match &self.kind {
            LineKind::Entry(f) => Some(f),
            _ => None,
        }
    }

    /// The entry's name, also for a malformed line whose first field
    /// looks like one.
    pub fn name(&self) -> Option<&str> {
        match &self.kind {
            LineKind::Entry(f) => Some(&f[0]),
            LineKind::Malformed { name, .. } => name.as_deref(),
            LineKind::Other => None,
        }
    }

    /// The numeric id of a passwd or group entry.
    pub fn id(&self) -> Option<u32> {
        self.entry().and_then(|f| f[2].parse().ok())
    }
}

/// One database file, line by line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub file: DbFile,
    pub lines: Vec<Line>,
}

/// A malformed line, named for the log and for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineProblem {
    pub file: DbFile,
    /// 1-based.
    pub line: usize,
    pub why: String,
}

impl fmt::Display for LineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} line {}: {}", self.file, self.line, self.why)
    }
}

impl Table {
    /// Splits `bytes` into lines and parses each; never fails (a bad line is
    /// [`LineKind::Malformed`]).
    pub fn parse(file: DbFile, bytes: &[u8]) -> Table {
        let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let lines = if bytes.is_empty() {
            Vec::new()
        } else {
            body.split(|&b| b == b'\n')
                .map(|raw| Line {
                    raw: raw.to_vec(),
                    kind: parse_line(file, raw),
                })
                .collect()
        };
        Table { file, lines }
    }

    /// Every malformed line, in order.
    pub fn problems(&self) -> Vec<LineProblem> {
        self.lines
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.kind {
                LineKind::Malformed { why, .. } => Some(LineProblem {
                    file: self.file,
                    line: i + 1,
                    why: why.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Every well-formed entry with its 1-based line number.
    pub fn entries(&self) -> impl Iterator<Item = (usize, &[String])> {
        self.lines
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.entry().map(|f| (i + 1, f)))
    }

    /// The file's bytes: every line and its newline.
    pub fn render(&self) -> Vec<u8> {
        render_lines(self.lines.iter().map(|l| l.raw.as_slice()))
    }
}

/// Lines joined, each ended by a newline.
pub fn render_lines<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    out
}

/// Whether `name` can be a user or group name in these files: what would
/// break the format (`:`, `,`, whitespace, control characters) or mean NIS
/// compat (a leading `+` or `-`) is not.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(['+', '-'])
        && name
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != ':' && c != ',')
}

fn parse_line(file: DbFile, raw: &[u8]) -> LineKind {
    let malformed = |why: String, name: Option<String>| LineKind::Malformed { why, name };
    if raw.len() > MAX_LINE {
        return malformed(format!("longer than {MAX_LINE} bytes"), None);
    }
    if raw.contains(&0) {
        return malformed("contains a NUL byte".into(), None);
    }
    let Ok(text) = std::str::from_utf8(raw) else {
        return malformed("is not valid UTF-8".into(), None);
    };
    if text.trim().is_empty() || text.starts_with('#') || text.starts_with(['+', '-']) {
        return LineKind::Other;
    }
    let fields: Vec<String> = text.split(':').map(str::to_string).collect();
    let first = Some(fields[0].clone()).filter(|n| valid_name(n));
    if fields.len() != file.fields() {
        return malformed(
            format!(
                "has {} fields where {} has {}",
                fields.len(),
                file,
                file.fields()
            ),
            first,
        );
    }
    if !valid_name(&fields[0]) {
        return malformed(format!("{:?} is not a valid name", fields[0]), None);
    }
    if file.has_id() {
        let ids: &[(usize, &str)] = match file {
            DbFile::Passwd => &[(2, "user id"), (3, "group id")],
            _ => &[(2, "group id")],
        };
        for &(i, what) in ids {
            if !is_id(&fields[i]) {
                return malformed(format!("{what} {:?} is not a number", fields[i]), first);
            }
        }
    }
    let lists: &[usize] = match file {
        DbFile::Group => &[3],
        DbFile::Gshadow => &[2, 3],
        _ => &[],
    };
    for &i in lists {
        if let Some(bad) = split_list(&fields[i]).find(|m| !valid_name(m)) {
            return malformed(format!("member {bad:?} is not a valid name"), first);
        }
    }
    LineKind::Entry(fields)
}

fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 10
        && s.bytes().all(|c| c.is_ascii_digit())
        && s.parse::<u32>().is_ok()
}

/// The names of a comma-separated member list (empty for an empty field).
pub fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').filter(|m| !m.is_empty())
}

/// The four files of one accounts directory as read (`None`: the file does
/// not exist; only `gshadow` may be missing on a working system).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Files {
    pub passwd: Option<Vec<u8>>,
    pub shadow: Option<Vec<u8>>,
    pub group: Option<Vec<u8>>,
    pub gshadow: Option<Vec<u8>>,
}

impl Files {
    pub fn get(&self, f: DbFile) -> Option<&Vec<u8>> {
        match f {
            DbFile::Passwd => self.passwd.as_ref(),
            DbFile::Shadow => self.shadow.as_ref(),
            DbFile::Group => self.group.as_ref(),
            DbFile::Gshadow => self.gshadow.as_ref(),
        }
    }

    pub fn slot(&mut self, f: DbFile) -> &mut Option<Vec<u8>> {
        match f {
            DbFile::Passwd => &mut self.passwd,
            DbFile::Shadow => &mut self.shadow,
            DbFile::Group => &mut self.group,
            DbFile::Gshadow => &mut self.gshadow,
        }
    }
}
