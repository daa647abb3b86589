//! The manual pages and shell completions, generated from the clap
//! definitions in [`super::cli`] and the configuration reference in
//! [`crate::core::config_reference`]: clusterd(8), clusterctl(8) with one
//! clusterctl-<subcommand>(8) page per subcommand, and clusterd.toml(5).
//!
//! Invariant owned here: nothing in a page is written by hand that the
//! binaries or the parser also define, so a new flag, subcommand or key
//! reaches the pages with the next build.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_mangen::Man;
use roff::{bold, roman, Inline, Roff};

use super::cli::{ClusterctlArgs, ClusterdArgs};
use crate::core::config_reference::{section_of, KEYS, SECTIONS};

/// The manual all pages belong to (the centre of the page footer).
const MANUAL: &str = "clusterd Manual";

/// The annotated example config shipped in the package, shown in
/// clusterd.toml(5) so the page's example is the one users copy.
const EXAMPLE_CONFIG: &str = include_str!("../../packaging/clusterd.toml.example");

/// `clusterctl`'s command with every subcommand built (display names such
/// as `clusterctl-certs-init` are set by the build).
pub fn clusterctl_command() -> clap::Command {
    let mut cmd = ClusterctlArgs::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// Writes a completion script for `clusterctl` in `shell`'s language.
pub fn write_completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    let mut cmd = ClusterctlArgs::command();
    clap_complete::generate(shell, &mut cmd, "clusterctl", out);
}

/// Writes every page into `dir` (created if missing) and returns their
/// paths. Each page is written to a temporary name and renamed, so a page
/// that exists is whole.
pub fn write_man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let mut put = |name: String, body: Vec<u8>| -> io::Result<()> {
        let path = dir.join(&name);
        let temp = dir.join(format!(".{name}.tmp"));
        fs::write(&temp, body)?;
        fs::rename(&temp, &path)?;
        written.push(path);
        Ok(())
    };
    put("clusterd.8".into(), clusterd_page()?)?;
    let clusterctl = clusterctl_command();
    put("clusterctl.8".into(), command_page(&clusterctl, true)?)?;
    for sub in subcommands(&clusterctl) {
        let name = sub.get_display_name().unwrap_or(sub.get_name()).to_owned();
        put(format!("{name}.8"), command_page(&sub, false)?)?;
    }
    put("clusterd.toml.5".into(), config_page().into_bytes())?;
    Ok(written)
}

/// Every visible subcommand at any depth (`certs` and `certs init` both).
pub fn subcommands(cmd: &clap::Command) -> Vec<clap::Command> {
    let mut all = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        all.push(sub.clone());
        all.extend(subcommands(sub));
    }
    all
}

fn clusterd_page() -> io::Result<Vec<u8>> {
    let man = Man::new(ClusterdArgs::command())
        .section("8")
        .manual(MANUAL);
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    let mut text = Roff::new();
    paragraph(
        &mut text,
        "`clusterd` runs one node of a cluster in the foreground (systemd starts it so). \
         The nodes elect a leader with Raft; the leader replicates the configured sync sets \
         to the followers as delta streams, and when it dies another node takes over and \
         the direction reverses. A fresh cluster forms once a majority of the listed nodes \
         is up; a restarted node rejoins with its term and vote and catches up.",
    );
    out.extend(text.render().into_bytes());
    man.render_options_section(&mut out)?;
    let mut text = Roff::new();
    heading(&mut text, "ENVIRONMENT");
    tagged(
        &mut text,
        "CLUSTERD_<SECTION>__<KEY>",
        "overrides a key of the configuration file, e.g. `CLUSTERD_NODE__ID=2`; see clusterd.toml(5).",
    );
    tagged(
        &mut text,
        "RUST_LOG",
        "a log filter that takes precedence over `log.level`, e.g. `info,clusterd=debug`.",
    );
    heading(&mut text, "SIGNALS");
    tagged(
        &mut text,
        "SIGTERM, SIGINT",
        "stop gracefully: a leader hands leadership to a caught-up follower first, then the node closes its links and its storage.",
    );
    heading(&mut text, "FILES");
    tagged(
        &mut text,
        "/etc/clusterd/clusterd.toml",
        "the configuration (clusterd.toml(5)).",
    );
    tagged(
        &mut text,
        "/var/lib/clusterd",
        "the default `node.data_dir`: the Raft log, node state, staging and quarantine.",
    );
    tagged(
        &mut text,
        "/run/clusterd/admin.sock",
        "the default admin socket used by clusterctl(8).",
    );
    heading(&mut text, "SEE ALSO");
    paragraph(&mut text, "clusterctl(8), clusterd.toml(5)");
    out.extend(text.render().into_bytes());
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// A page of `clusterctl` (`top`) or of one of its subcommands.
fn command_page(cmd: &clap::Command, top: bool) -> io::Result<Vec<u8>> {
    let man = Man::new(cmd.clone()).section("8").manual(MANUAL);
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(&mut out)?;
    }
    let mut text = Roff::new();
    if top {
        heading(&mut text, "EXIT STATUS");
        paragraph(
            &mut text,
            "0 on success, 1 on failure, with the reason on standard error. \
             `clusterctl check` exits 0 OK, 1 WARNING, 2 CRITICAL or 3 UNKNOWN, as a Nagios plugin.",
        );
    }
    heading(&mut text, "SEE ALSO");
    let mut see_also = vec!["clusterd(8)".to_owned(), "clusterd.toml(5)".to_owned()];
    if top {
        see_also.extend(
            subcommands(cmd)
                .iter()
                .map(|s| format!("{}(8)", s.get_display_name().unwrap_or(s.get_name()))),
        );
    } else {
        see_also.insert(0, "clusterctl(8)".to_owned());
    }
    paragraph(&mut text, &see_also.join(", "));
    out.extend(text.render().into_bytes());
    if cmd.get_version().is_some() {
        man.render_version_section(&mut out)?;
    }
    Ok(out)
}

/// clusterd.toml(5): every key of [`KEYS`], grouped under its section.
pub fn config_page() -> String {
    let mut page = Roff::new();
    page.control(
        "TH",
        [
            "CLUSTERD.TOML",
            "5",
            "",
            &format!("clusterd {}", env!("CARGO_PKG_VERSION")),
            MANUAL,
        ],
    );
    heading(&mut page, "NAME");
    page.text([roman("clusterd.toml - configuration of a clusterd node")]);
    heading(&mut page, "SYNOPSIS");
    page.text([bold("/etc/clusterd/clusterd.toml")]);
    heading(&mut page, "DESCRIPTION");
    paragraph(
        &mut page,
        "The configuration of one clusterd(8) node, in TOML. Only `[node]` and `[tls]` \
         differ between the nodes of a cluster. Every key can be overridden from the \
         environment as `CLUSTERD_<SECTION>__<KEY>`, e.g. `CLUSTERD_NODE__ID=2`. Unknown keys \
         are errors (a typo never silently does nothing), and `clusterd --check` prints \
         every problem at once, one line each, naming the file and the key.",
    );
    for (section, about) in SECTIONS {
        let header = if matches!(*section, "peer" | "sync") {
            format!("[[{section}]]")
        } else {
            format!("[{section}]")
        };
        heading(&mut page, &header);
        paragraph(&mut page, about);
        for doc in KEYS.iter().filter(|d| section_of(d.keys[0]) == *section) {
            page.control("TP", []);
            let mut tag = Vec::new();
            for (i, key) in doc.keys.iter().enumerate() {
                if i > 0 {
                    tag.push(roman(", "));
                }
                tag.push(bold(*key));
            }
            tag.push(roman(" (default: "));
            tag.extend(markdown_inlines(doc.default));
            tag.push(roman(")"));
            page.text(tag);
            page.text(markdown_inlines(doc.meaning));
        }
    }
    heading(&mut page, "EXAMPLE");
    page.control("nf", []);
    for line in EXAMPLE_CONFIG.lines() {
        page.text([roman(line)]);
    }
    page.control("fi", []);
    heading(&mut page, "SEE ALSO");
    paragraph(&mut page, "clusterd(8), clusterctl(8)");
    page.render()
}

fn heading(page: &mut Roff, title: &str) {
    page.control("SH", [title]);
}

fn paragraph(page: &mut Roff, markdown: &str) {
    page.control("PP", []);
    page.text(markdown_inlines(markdown));
}

fn tagged(page: &mut Roff, tag: &str, markdown: &str) {
    page.control("TP", []);
    page.text([bold(tag)]);
    page.text(markdown_inlines(markdown));
}

/// The reference's Markdown (only `code` spans) as roff: code in bold.
fn markdown_inlines(markdown: &str) -> Vec<Inline> {
    markdown
        .split('`')
        .enumerate()
        .filter(|(_, part)| !part.is_empty())
        .map(|(i, part)| if i % 2 == 1 { bold(part) } else { roman(part) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_has_a_page_that_names_it_and_its_options() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_man_pages(dir.path()).unwrap();
        let cmd = clusterctl_command();
        let subs = subcommands(&cmd);
        assert!(
            subs.len() >= 12,
            "too few subcommands found: {}",
            subs.len()
        );
        assert_eq!(written.len(), subs.len() + 3);
        for sub in &subs {
            let name = sub.get_display_name().unwrap();
            let page = fs::read_to_string(dir.path().join(format!("{name}.8")))
                .unwrap_or_else(|e| panic!("no page for {name}: {e}"));
            assert!(page.contains(".TH"), "{name}.8 has no title");
            assert!(
                page.contains(&name.replace('-', "\\-")),
                "{name}.8 does not name itself"
            );
            for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                if let Some(long) = arg.get_long() {
                    assert!(
                        page.contains(&long.replace('-', "\\-")),
                        "{name}.8 lacks --{long}"
                    );
                }
            }
        }
        let top = fs::read_to_string(dir.path().join("clusterctl.8")).unwrap();
        for sub in cmd.get_subcommands() {
            let name = sub.get_name().replace('-', "\\-");
            assert!(top.contains(&name), "clusterctl.8 does not list {name}");
        }
        let daemon = fs::read_to_string(dir.path().join("clusterd.8")).unwrap();
        assert!(daemon.contains("\\-\\-config") && daemon.contains("SIGTERM"));
        assert!(!dir.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
    }

    #[test]
    fn the_config_page_documents_every_key() {
        let page = config_page();
        for doc in KEYS {
            for key in doc.keys {
                assert!(
                    page.contains(&format!("\\fB{key}\\fR")),
                    "clusterd.toml.5 lacks {key}"
                );
            }
        }
        for (section, _) in SECTIONS {
            assert!(
                page.contains(&format!("[{section}]")),
                "no heading for [{section}]"
            );
        }
        assert!(page.contains("[[sync]]") && page.contains(".nf"));
    }

    #[test]
    fn completions_name_every_subcommand_in_each_shell() {
        let cmd = clusterctl_command();
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            write_completions(shell, &mut out);
            let script = String::from_utf8(out).unwrap();
            assert!(script.len() > 1_000, "{shell} completion is nearly empty");
            for sub in cmd.get_subcommands() {
                assert!(
                    script.contains(sub.get_name()),
                    "{shell} completion lacks {}",
                    sub.get_name()
                );
            }
            assert!(
                script.contains("peer-timeout-ms"),
                "{shell} completion lacks options"
            );
        }
    }
}
