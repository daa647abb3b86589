//! Owns the layering rule of the source tree: a top-level module (a file or
//! folder directly under src/) imports only top-level modules of a lower layer,
//! and no import circle runs among them. `cargo test` fails on a breach.
//!
//! The check reads the sources as text (std only, so it needs no parser): it
//! blanks out comments and literals, then collects every `crate::x` path and
//! every `super::` chain that climbs out of the file's top-level module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, lowest first. A top-level module may import only top-level
/// modules of a strictly lower rank; imports inside one top-level module are
/// free. This table and the layer rule in ARCHITECTURE.md ("Layers") say the
/// same thing: change them together. `fuzz_seeds` is test-only and may use
/// anything.
const RANKS: &[(&str, u32)] = &[
    ("core", 0),
    ("fs", 1),
    ("raft", 2),
    ("net", 3),
    ("replication", 4),
    ("ops", 5),
    ("node", 6),
    ("fuzz_seeds", 7),
];

/// For each importing top-level module, each module it imports and where the
/// first such import is ("src/x/y.rs:12").
type Edges = BTreeMap<String, BTreeMap<String, String>>;

#[test]
fn the_source_tree_obeys_the_layering_rule() {
    let src = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
    let mut files = Vec::new();
    collect_sources(src, "src", &mut files);
    files.sort();
    let problems = layering_problems(&files, RANKS);
    assert!(
        problems.is_empty(),
        "the source tree breaks the layering rule (ARCHITECTURE.md, \"Layers\"):\n{}\n",
        problems.join("\n")
    );
}

/// Every `.rs` file under `dir` as (path like "src/net/peer.rs", source).
/// lib.rs (the root, which names every module), bin/ (outside the library)
/// and this checker (std only) have no layer, so they are left out.
fn collect_sources(dir: &Path, shown: &str, files: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {shown}: {e}")) {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let shown = format!("{shown}/{name}");
        if matches!(shown.as_str(), "src/lib.rs" | "src/layering.rs" | "src/bin") {
            continue;
        }
        if path.is_dir() {
            collect_sources(&path, &shown, files);
        } else if name.ends_with(".rs") {
            let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{shown}: {e}"));
            files.push((shown, source));
        }
    }
}

/// Every breach of the layering rule by `files` ((path like "src/a/b.rs",
/// source); the first import of an edge in this order is the one reported),
/// one readable message each; empty when they obey `ranks`.
fn layering_problems(files: &[(String, String)], ranks: &[(&str, u32)]) -> Vec<String> {
    let rank: BTreeMap<&str, u32> = ranks.iter().copied().collect();
    let mut modules: BTreeMap<String, &str> = BTreeMap::new(); // top module → its first file
    let mut edges = Edges::new();
    for (path, source) in files {
        let (top, depth) = module_of(path);
        modules.entry(top.clone()).or_insert(path);
        for (line, target) in references(&strip_comments_and_literals(source), depth) {
            if target != top {
                let imports = edges.entry(top.clone()).or_default();
                imports.entry(target).or_insert(format!("{path}:{line}"));
            }
        }
    }
    let mut problems = Vec::new();
    for (module, file) in &modules {
        if !rank.contains_key(module.as_str()) {
            problems.push(format!(
                "top-level module `{module}` ({file}) has no layer: add it to RANKS in \
                 src/layering.rs and to the layer rule in ARCHITECTURE.md (\"Layers\")"
            ));
        }
    }
    for (from, targets) in &edges {
        for (to, site) in targets {
            if !modules.contains_key(to) {
                // Most likely a re-export in lib.rs: through it an import of
                // any layer would go unseen, so ask for the module's own path.
                problems.push(format!(
                    "{site} refers to crate::{to}, which is not a top-level module: \
                     name the module it lives in, so the layering check can see the import"
                ));
                continue;
            }
            let (Some(&from_rank), Some(&to_rank)) =
                (rank.get(from.as_str()), rank.get(to.as_str()))
            else {
                continue; // already reported as having no layer
            };
            if to_rank >= from_rank {
                let mut lower: Vec<_> = ranks.iter().filter(|r| r.1 < from_rank).collect();
                lower.sort_by_key(|r| r.1);
                let lower: Vec<&str> = lower.iter().map(|r| r.0).collect();
                let allowed = match lower.is_empty() {
                    true => "may import no other top-level module".to_string(),
                    false => format!("may only import {}", lower.join(", ")),
                };
                problems.push(format!(
                    "{site} imports crate::{to}, but {from} (rank {from_rank}) {allowed}"
                ));
            }
        }
    }
    // Checked apart from the ranks: a wrongly edited table must not let a
    // circle through.
    if let Some(cycle) = find_cycle(&edges) {
        let mut message = format!(
            "import circle among top-level modules: {}",
            cycle.join(" → ")
        );
        for pair in cycle.windows(2) {
            let site = &edges[&pair[0]][&pair[1]];
            message.push_str(&format!("\n    {} → {}: {site}", pair[0], pair[1]));
        }
        problems.push(message);
    }
    problems
}

/// The top-level module of a file and how deep its own module sits:
/// src/a.rs and src/a/mod.rs are `a` at depth 1, src/a/b.rs is in `a` at 2.
fn module_of(path: &str) -> (String, usize) {
    let inner = path.strip_prefix("src/").unwrap_or(path);
    let mut segments: Vec<&str> = inner.trim_end_matches(".rs").split('/').collect();
    if segments.len() > 1 && segments.last() == Some(&"mod") {
        segments.pop();
    }
    (segments[0].to_string(), segments.len())
}

/// `src` with comments and string, byte-string, raw-string and char literals
/// replaced by spaces (newlines kept, so line numbers stay right): a path
/// written in a comment or a message is no import.
fn strip_comments_and_literals(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < c.len() {
        // Whole words are copied at once, so an `r` is taken for a raw
        // string's prefix (`r"…"`, `br#"…"#`) only where it starts a word.
        let word = c[i..].iter().take_while(|&&ch| is_word(ch)).count();
        let raw_prefix = matches!(c[i..i + word], ['r'] | ['b' | 'c', 'r']);
        let skip_to = match (c[i], c.get(i + 1)) {
            _ if raw_prefix => raw_string_end(&c, i + word),
            // Line, doc and inner doc comments alike run to the end of the line.
            ('/', Some('/')) => Some((i..c.len()).find(|&j| c[j] == '\n').unwrap_or(c.len())),
            ('/', Some('*')) => Some(block_comment_end(&c, i)),
            ('"', _) => Some(quoted_end(&c, i)),
            ('\'', _) => char_literal_end(&c, i),
            _ => None,
        };
        let end = skip_to.unwrap_or(i + word.max(1));
        for &ch in &c[i..end] {
            let keep = skip_to.is_none() || ch == '\n';
            out.push(if keep { ch } else { ' ' });
        }
        i = end;
    }
    out
}

/// Just past the `*/` closing the block comment opened at `i`; they nest.
fn block_comment_end(c: &[char], i: usize) -> usize {
    let (mut depth, mut j) = (0, i);
    while j < c.len() {
        match (c[j], c.get(j + 1)) {
            ('/', Some('*')) => (depth, j) = (depth + 1, j + 2),
            ('*', Some('/')) if depth == 1 => return j + 2,
            ('*', Some('/')) => (depth, j) = (depth - 1, j + 2),
            _ => j += 1,
        }
    }
    c.len()
}

/// Just past the `"` closing the string opened at `i` (escapes skipped).
fn quoted_end(c: &[char], i: usize) -> usize {
    let mut j = i + 1;
    while j < c.len() && c[j] != '"' {
        j += if c[j] == '\\' { 2 } else { 1 };
    }
    (j + 1).min(c.len())
}

/// Just past the char literal opened by the `'` at `i`, or None when that `'`
/// starts a lifetime or a label (`'a`, `'static`, `'outer:`).
fn char_literal_end(c: &[char], i: usize) -> Option<usize> {
    if c.get(i + 1) == Some(&'\\') {
        // '\n', '\'', '\u{1F600}': past the escaped character to the next quote.
        let close = c.get(i + 3..)?.iter().position(|&ch| ch == '\'')?;
        return Some(i + 3 + close + 1);
    }
    (c.get(i + 2) == Some(&'\'')).then_some(i + 3)
}

/// Just past the raw string whose `#`s or `"` start at `i` (after its `r`),
/// or None when none starts there (`r#type` is a raw identifier).
fn raw_string_end(c: &[char], i: usize) -> Option<usize> {
    let hashes = c[i..].iter().take_while(|&&ch| ch == '#').count();
    if c.get(i + hashes) != Some(&'"') {
        return None;
    }
    let closes = |k: usize| c[k] == '"' && (1..=hashes).all(|h| c.get(k + h) == Some(&'#'));
    let close = (i + hashes + 1..c.len()).find(|&k| closes(k));
    Some(close.map_or(c.len(), |k| k + 1 + hashes))
}

fn is_word(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// Stripped source as tokens (text, line): words, `::`, single punctuation.
fn tokens(code: &str) -> Vec<(&str, usize)> {
    let mut toks = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let mut rest = line.trim_start();
        while let Some(ch) = rest.chars().next() {
            let len = match ch {
                _ if is_word(ch) => rest.find(|c| !is_word(c)).unwrap_or(rest.len()),
                ':' if rest.starts_with("::") => 2,
                _ => ch.len_utf8(),
            };
            toks.push((&rest[..len], n + 1));
            rest = rest[len..].trim_start();
        }
    }
    toks
}

/// The top-level modules stripped `code` names, as (line, module): the first
/// segment after every `crate::` (each one in a `crate::{…}` group), and after
/// every `super::` chain that climbs to the crate root. `depth` is how deep
/// the file's own module sits (see `module_of`); an inline `mod x { … }`
/// (a test module) is one deeper while open.
fn references(code: &str, depth: usize) -> Vec<(usize, String)> {
    let t = tokens(code);
    let is = |k: usize, s: &str| t.get(k).is_some_and(|tok| tok.0 == s);
    let mut refs = Vec::new();
    let mut braces = 0usize;
    let mut open_mods: Vec<usize> = Vec::new(); // the brace level each inline mod opened at
    for k in 0..t.len() {
        match t[k].0 {
            "{" => {
                braces += 1;
                if k >= 2 && is(k - 2, "mod") {
                    open_mods.push(braces);
                }
            }
            "}" => {
                if open_mods.last() == Some(&braces) {
                    open_mods.pop();
                }
                braces = braces.saturating_sub(1);
            }
            "crate" if is(k + 1, "::") => root_segments(&t, k + 2, &mut refs),
            "super" if is(k + 1, "::") && !(k > 0 && is(k - 1, "::")) => {
                let (mut climbs, mut j) = (0, k);
                while is(j, "super") && is(j + 1, "::") {
                    climbs += 1;
                    j += 2;
                }
                // Fewer climbs stay inside the top-level module; more would
                // not compile.
                if climbs == depth + open_mods.len() {
                    root_segments(&t, j, &mut refs);
                }
            }
            _ => {}
        }
    }
    refs
}

/// The top-level module names a path continues with at token `j`, just after
/// its `crate::` (or a `super::` chain reaching the root): one word, or the
/// first segment of each item of a `{…}` group.
fn root_segments(t: &[(&str, usize)], j: usize, refs: &mut Vec<(usize, String)>) {
    let is_name = |w: &str| {
        w.starts_with(|ch: char| !ch.is_numeric() && is_word(ch))
            && !matches!(w, "self" | "super" | "crate")
    };
    match t.get(j) {
        Some(&(word, line)) if is_name(word) => refs.push((line, word.to_string())),
        Some(&("{", _)) => {
            let mut level = 0;
            for k in j..t.len() {
                match t[k].0 {
                    "{" => level += 1,
                    "}" if level == 1 => return,
                    "}" => level -= 1,
                    word if level == 1 && matches!(t[k - 1].0, "{" | ",") && is_name(word) => {
                        refs.push((t[k].1, word.to_string()))
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// Some import circle in `edges`, as the modules walked with the first one
/// repeated at the end (a, b, a); None when there is none. A depth-first
/// search: meeting a module that is still on the walk closes a circle.
fn find_cycle(edges: &Edges) -> Option<Vec<String>> {
    fn visit<'a>(
        module: &'a str,
        edges: &'a Edges,
        walk: &mut Vec<&'a str>,
        seen: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = walk.iter().position(|&m| m == module) {
            let mut cycle: Vec<String> = walk[at..].iter().map(|m| m.to_string()).collect();
            cycle.push(module.to_string());
            return Some(cycle);
        }
        if !seen.insert(module) {
            return None; // fully explored before, off the walk: no circle through it
        }
        walk.push(module);
        for next in edges.get(module).into_iter().flat_map(BTreeMap::keys) {
            if let Some(cycle) = visit(next, edges, walk, seen) {
                return Some(cycle);
            }
        }
        walk.pop();
        None
    }
    let mut seen = BTreeSet::new();
    edges
        .keys()
        .find_map(|start| visit(start, edges, &mut Vec::new(), &mut seen))
}

// The checker on synthetic trees.

const TEST_RANKS: &[(&str, u32)] = &[("low", 0), ("mid", 1), ("high", 2)];

fn problems(files: &[(&str, &str)]) -> Vec<String> {
    let files: Vec<_> = files.iter().map(|&(p, s)| (p.into(), s.into())).collect();
    layering_problems(&files, TEST_RANKS)
}

fn refs(code: &str, depth: usize) -> Vec<(usize, String)> {
    references(&strip_comments_and_literals(code), depth)
}

fn named(refs: &[(usize, &str)]) -> Vec<(usize, String)> {
    refs.iter().map(|&(line, m)| (line, m.into())).collect()
}

#[test]
fn a_cycle_is_found_and_printed_with_each_import() {
    let found = problems(&[
        ("src/high.rs", "\nuse crate::low::Y;"),
        ("src/low.rs", "use crate::high::X;"),
    ]);
    let circle = "import circle among top-level modules: high → low → high\n    \
                  high → low: src/high.rs:2\n    low → high: src/low.rs:1";
    assert!(found.iter().any(|p| p == circle), "{found:#?}");

    let graph = |pairs: &[(&str, &str)]| {
        let mut edges = Edges::new();
        for &(from, to) in pairs {
            let targets = edges.entry(from.into()).or_default();
            targets.insert(to.into(), String::new());
        }
        edges
    };
    let three = graph(&[("a", "d"), ("a", "b"), ("b", "c"), ("c", "a")]);
    assert_eq!(find_cycle(&three).unwrap(), ["a", "b", "c", "a"]);
    // A diamond joins twice but is no circle.
    let diamond = graph(&[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]);
    assert_eq!(find_cycle(&diamond), None);
}

#[test]
fn a_rank_violation_is_reported_with_its_file_and_line() {
    let found = problems(&[
        ("src/high.rs", ""),
        ("src/low.rs", "fn f() { crate::high::g() }"),
        ("src/mid/x.rs", "use crate::low::A;\n\nuse crate::high::T;"),
    ]);
    assert_eq!(
        found,
        [
            "src/low.rs:1 imports crate::high, but low (rank 0) may import no other top-level module",
            "src/mid/x.rs:3 imports crate::high, but mid (rank 1) may only import low",
        ]
    );
}

#[test]
fn references_in_comments_and_string_literals_are_ignored() {
    let code = r####"//! crate::high in an inner doc comment
/// crate::high in a doc comment
// crate::high
/* crate::high /* nested crate::high */ crate::high */
const A: &str = "crate::high \" crate::high";
const B: &str = r##"crate::high "# crate::high"##;
const C: &[u8] = br#"crate::high"#; const D: &[u8] = b"crate::high";
const E: [char; 3] = ['"', '\'', '{']; const F: &str = "crate::high";
impl<'a> crate::mid::T<'a> { fn f(&'a self) { 'outer: loop { break 'outer } } }
let r#type = crate::low::g();"####;
    assert_eq!(refs(code, 1), named(&[(9, "mid"), (10, "low")]));
}

#[test]
fn grouped_imports_and_super_chains_are_counted() {
    // In src/x/y/z.rs (depth 3) three `super::` reach the crate root.
    let deep = "use crate::{low::X, mid::{Y, Z}, self};\n\
                use super::super::super::high::W;\n\
                use super::super::sibling::V;\n\
                fn f() { super::super::super::{a::A, b}; }";
    assert_eq!(
        refs(deep, 3),
        named(&[(1, "low"), (1, "mid"), (2, "high"), (4, "a"), (4, "b")])
    );
    // In src/x.rs or src/x/mod.rs one does; an inline test module is a level deeper.
    let flat = "use super::low::X;\nmod tests {\n use super::*;\n \
                fn t() { super::super::mid::f() }\n}\nuse super::high;";
    assert_eq!(refs(flat, 1), named(&[(1, "low"), (4, "mid"), (6, "high")]));
    assert_eq!(module_of("src/x/mod.rs"), ("x".to_string(), 1));
    assert_eq!(module_of("src/x.rs"), ("x".to_string(), 1));
    assert_eq!(module_of("src/x/y/z.rs"), ("x".to_string(), 3));
}

#[test]
fn a_clean_synthetic_tree_passes() {
    let found = problems(&[
        ("src/high/mod.rs", "mod part; use crate::{mid::M, low};"),
        ("src/high/part.rs", "use crate::high::X; use super::M;"),
        ("src/low.rs", "/* crate::high */ \"crate::mid\";"),
        ("src/mid.rs", "use crate::low::L; mod t { use super::*; }"),
    ]);
    assert_eq!(found, Vec::<String>::new());
}

#[test]
fn a_module_without_a_layer_and_a_root_item_are_named() {
    let found = problems(&[("src/low.rs", ""), ("src/stray/a.rs", "use crate::Config;")]);
    assert_eq!(
        found,
        [
            "top-level module `stray` (src/stray/a.rs) has no layer: add it to RANKS in \
             src/layering.rs and to the layer rule in ARCHITECTURE.md (\"Layers\")",
            "src/stray/a.rs:1 refers to crate::Config, which is not a top-level module: \
             name the module it lives in, so the layering check can see the import",
        ]
    );
}
