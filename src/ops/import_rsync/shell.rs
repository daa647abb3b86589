//! Shell lines as the scripts write them: continuation lines joined,
//! commands split at `;`, `&&`, `||` and pipes, words unquoted, redirections
//! and prefixes (`sudo`, `nice`, ...) dropped.

use super::*;
/// Joins `\`-continued lines; yields (first line number, text).
pub(super) fn logical_lines(script: &str) -> Vec<(usize, String)> {
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
pub(super) enum Sep {
    End,
    Semi,
    And,
    Or,
    Pipe,
    Background,
}

impl Sep {
    pub(super) fn as_str(self) -> &'static str {
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
pub(super) struct Segment {
    pub(super) text: String,
    pub(super) sep: Sep,
}

/// Splits a line into commands at unquoted `;`, `&&`, `||`, `|` and `&`, and drops
/// a trailing comment (a `#` starting a word outside quotes). Quotes, `\` escapes,
/// `$( )` and backticks are respected; redirections such as `2>&1` stay in the command.
pub(super) fn split_commands(line: &str) -> Vec<Segment> {
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

pub(super) fn words_of(text: &str) -> Result<Vec<String>, LineError> {
    Ok(shell_words::split(text)?)
}

/// Removes redirections (`> /dev/null`, `2>&1`, `>>log`) from the words; returns the
/// remaining words and the files written or read.
pub(super) fn strip_redirections(words: Vec<String>) -> (Vec<String>, Vec<String>) {
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
pub(super) fn command_words(text: &str) -> Vec<Vec<String>> {
    split_commands(text)
        .iter()
        .filter_map(|s| words_of(&s.text).ok())
        .map(|w| strip_redirections(w).0)
        .filter(|w| !w.is_empty())
        .collect()
}

pub(super) fn basename(s: &str) -> &str {
    let t = s.trim_end_matches('/');
    t.rsplit('/').next().unwrap_or(t)
}

pub(super) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `NAME=value` → (NAME, value).
pub(super) fn assignment(word: &str) -> Option<(&str, &str)> {
    let (name, value) = word.split_once('=')?;
    is_identifier(name).then_some((name, value))
}

/// Drops `sudo`, `nice -n 5`, `nohup`, ... in front of a command.
pub(super) fn strip_prefixes(words: &[String]) -> &[String] {
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
