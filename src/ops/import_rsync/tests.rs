//! Tests of the translation on the seed scripts and hand-made lines.

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

use PathKind::{Accounts as Acc, Directory as D, File as F};
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

/// The eight file names the seeds copy whole, in their order.
const ACCOUNT_FILES: [&str; 8] = [
    "shadow", "shadow-", "passwd", "passwd-", "group", "group-", "gshadow", "gshadow-",
];

/// The accounts set of `dir` (no mode, exclude or skip_while of its own).
fn accounts(dir: &str) -> Row {
    row(dir, Acc, M, &[], &[])
}

/// Checks the accounts set `name` of `dir`: its comments, the note about it, that no
/// set is left for any of the eight account file names in `dir`, and how it prints.
fn check_accounts<'a>(t: &'a Translation, dir: &str, name: &str) -> &'a SyncSetDraft {
    let a = set(t, dir);
    assert_eq!(a.kind, Acc);
    assert_eq!(a.name, name);
    assert!(a.exclude.is_empty() && a.skip_while.is_empty() && !a.hard_links && !a.xattrs);
    for f in ACCOUNT_FILES {
        let path = format!("{dir}/{f}");
        assert!(
            t.sets.iter().all(|s| s.path != path),
            "a set remains for {path}"
        );
    }
    let has = |needle: &str| a.comments.iter().any(|c| c.contains(needle));
    assert!(
        has("clusterd replicates accounts as records")
            && has("uid_range or gid_range")
            && has("named in include"),
        "{:#?}",
        a.comments
    );
    assert!(
        has("each node keeps its own system accounts") && has("ids differ from host to host"),
        "{:#?}",
        a.comments
    );
    assert!(
        has("copying the files whole, as the old script did, replaced the other nodes' system accounts"),
        "{:#?}",
        a.comments
    );
    let notes = notes_with(
        t,
        &format!("became one accounts set {name:?} with path = \"{dir}\""),
    );
    assert_eq!(notes.len(), 1, "{:#?}", t.notes);
    assert!(
        notes[0].starts_with("the whole-file copies of "),
        "{}",
        notes[0]
    );
    assert!(
        notes[0].contains("replicates accounts as records")
            && notes[0].contains("keeps its own system accounts")
            && notes[0].contains("overwrote those on the other nodes"),
        "{}",
        notes[0]
    );

    let text = t.to_toml();
    let block = format!("[[sync]]\nname = \"{name}\"\nkind = \"accounts\"\npath = \"{dir}\"\n# uid_range = \"1000-59999\"");
    assert!(text.contains(&block), "{text}");
    for key in [
        "# gid_range = \"1000-59999\"",
        "# include = []",
        "# max_removed = 20",
    ] {
        assert!(text.contains(key), "{text}");
    }
    a
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
                    "kind",
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
        if d.kind == Acc {
            // An accounts set: kind, name and path only; the rest stays at its defaults.
            assert_eq!(s["kind"].as_str(), Some("accounts"));
            assert_eq!(s.len(), 3, "{s:?}");
            continue;
        }
        assert!(s.get("kind").is_none(), "{s:?}");
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
    let want = vec![
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
        accounts("/etc"),
    ];
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
    assert_eq!(set(&t, "/etc/logrotate.d").name, "etc-logrotate.d");

    // The 16 lines copying the account files whole (8 files, pulled and pushed) are one accounts set.
    let acc = check_accounts(&t, "/etc", "accounts");
    assert_eq!(
        acc.comments[0],
        "/etc: the account databases, from lines 40, 41, 42, 43, 44, 45, 46, 47 (pull from root@$Sensai), lines 73, 74, 75, 76, 77, 78, 79, 80 (push to root@$Sensai); one set, clusterd picks the direction from the leader"
    );
    assert!(acc.comments.iter().any(|c| c.contains(
        "the \"-\" backups /etc/shadow-, /etc/passwd-, /etc/group-, /etc/gshadow- are not replicated"
    )), "{:#?}", acc.comments);
    assert!(
        !acc.comments.iter().any(|c| c.contains("did not copy")),
        "{:#?}",
        acc.comments
    );

    assert!(set(&t, "/etc/tacacs+")
        .comments
        .iter()
        .any(|c| c.starts_with("no line passed --delete")));
    assert!(!set(&t, "/etc")
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
    let want = vec![
        row("/etc/tacacs+", D, M, &[], &[]),
        row("/var/log", D, A, &[], &[]),
        row("/etc/logrotate.d", D, M, &[], &[]),
        row("/root", D, M, &["**/.ssh/known_hosts"], &[]),
        row("/home", D, M, &[], &[]),
        accounts("/etc"),
    ];
    assert_eq!(rows(&t), want);
    assert_eq!(t.sets.len(), 6);
    assert_eq!(set(&t, "/etc/tacacs+").name, "etc-tacacs+");
    let acc = check_accounts(&t, "/etc", "accounts");
    // Pulls only: no "picks the direction" on a one-way script.
    assert!(
        !acc.comments[0].contains("picks the direction"),
        "{:?}",
        acc.comments
    );
    assert!(acc
        .comments
        .iter()
        .any(|c| c.contains("backups") && c.contains("/etc/gshadow-")));
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
    let t =
        translate("rsync -a 'root@h:/srv/we\"ird\\\\dir/' /x/ --exclude='a\"b'\nfoo\tbar\u{1}\n");
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

#[test]
fn passwd_and_group_only_are_one_accounts_set() {
    let t = translate(
        "rsync -a root@h:/etc/nginx/ /etc/nginx/\nrsync -a root@h:/etc/passwd /etc/passwd\nrsync -a /etc/group root@h:/etc/\n",
    );
    assert_eq!(
        rows(&t),
        vec![row("/etc/nginx", D, M, &[], &[]), accounts("/etc")]
    );
    let acc = check_accounts(&t, "/etc", "accounts");
    assert_eq!(
        acc.comments[0],
        "/etc: the account databases, from line 2 (pull from root@h), line 3 (push to root@h); one set, clusterd picks the direction from the leader"
    );
    assert!(acc
        .comments
        .iter()
        .any(|c| c
            .ends_with("one accounts set of /etc takes the place of a single-file set per file")));
    assert!(acc
        .comments
        .iter()
        .any(|c| c.contains("copied /etc/passwd, /etc/group whole")));
    assert!(
        acc.comments.iter().any(|c| c.starts_with(
            "the script did not copy /etc/shadow, /etc/gshadow; an accounts set covers all four files"
        )),
        "{:#?}",
        acc.comments
    );
    // No backups were copied, so nothing is said about them.
    assert!(!acc.comments.iter().any(|c| c.contains("backups")));
    assert!(notes_with(&t, "backups").is_empty(), "{:#?}", t.notes);
    // Where rsync put the pushed file is about copying files: not on an accounts set.
    assert!(!acc
        .comments
        .iter()
        .any(|c| c.contains("rsync put it inside")));
    check_toml(&t);
}

#[test]
fn account_files_in_two_directories_are_two_accounts_sets() {
    let script = "\
rsync -a root@h:/etc/passwd /etc/passwd
rsync -a root@h:/srv/jail/etc/passwd /srv/jail/etc/passwd
rsync -a root@h:/etc/shadow /etc/shadow
rsync -a root@h:/srv/jail/etc/group /srv/jail/etc/group
rsync -a root@h:/srv/jail/etc/group- /srv/jail/etc/group-
rsync -a root@h:/var/www/ /var/www/
";
    let t = translate(script);
    assert_eq!(
        rows(&t),
        vec![
            accounts("/etc"),
            accounts("/srv/jail/etc"),
            row("/var/www", D, M, &[], &[]),
        ]
    );
    check_accounts(&t, "/etc", "accounts");
    let jail = check_accounts(&t, "/srv/jail/etc", "accounts-srv-jail-etc");
    assert!(jail
        .comments
        .iter()
        .any(|c| c.contains("the \"-\" backups /srv/jail/etc/group- are not replicated")));
    assert_eq!(notes_with(&t, "became one accounts set").len(), 2);
    check_toml(&t);
}

#[test]
fn accounts_set_drops_file_copy_options_and_lock_checks() {
    let script = "\
rsync -a root@h:/accounts/ /accounts/
if [ -f /etc/*.lock ]; then echo busy; else
  rsync -aHX --delete --exclude=foo --bwlimit=10 root@h:/etc/shadow /staging/shadow
  rsync -a root@h:/etc/gshadow /etc/gshadow
fi
rsync -a root@h:/etc/exim4/passwd /etc/exim4/passwd
rsync -a root@h:/opt/x/passwd- /opt/x/passwd-
rsync -a root@h:/opt/x/shadow- /opt/x/shadow-
";
    let t = translate(script);
    assert_eq!(
        rows(&t),
        vec![
            row("/accounts", D, M, &[], &[]),
            accounts("/etc"),
            row("/etc/exim4/passwd", F, M, &[], &[]),
        ]
    );
    // "accounts" is taken by the /accounts directory: the usual suffix.
    let acc = check_accounts(&t, "/etc", "accounts-2");
    let has = |needle: &str| acc.comments.iter().any(|c| c.contains(needle));
    assert!(has("\"accounts\" was already taken"), "{:#?}", acc.comments);
    assert!(
        has("exclude \"foo\" (line 3) dropped"),
        "{:#?}",
        acc.comments
    );
    assert!(has("--delete (line 3) dropped"), "{:#?}", acc.comments);
    assert!(
        has("clusterctl sync accounts-2 --confirm"),
        "{:#?}",
        acc.comments
    );
    assert!(has("-H, -A and -X (line 3) dropped"), "{:#?}", acc.comments);
    assert!(
        has("skipped the copy while /etc/*.lock existed (lock check on line 2): dropped, clusterd reads the account files only while no shadow-utils lock is held"),
        "{:#?}",
        acc.comments
    );
    assert!(has("staged them in /staging/shadow"), "{:#?}", acc.comments);
    assert!(
        has("not translated, review by hand: --bwlimit=10"),
        "{:#?}",
        acc.comments
    );
    assert!(!has("mirror mode deletes anyway"), "{:#?}", acc.comments);
    assert!(
        t.to_toml().contains("clusterctl sync accounts-2 --confirm"),
        "{}",
        t.to_toml()
    );

    // A lone passwd outside an etc directory is an application's file.
    let exim = set(&t, "/etc/exim4/passwd");
    assert_eq!(exim.name, "etc-exim4-passwd");
    assert!(exim
        .comments
        .iter()
        .any(|c| c.starts_with("named like an account database file (passwd)")));
    // Backups only: no set, a note.
    assert!(t.sets.iter().all(|s| !s.path.starts_with("/opt/x")));
    let backups = notes_with(&t, "/opt/x/passwd-, /opt/x/shadow-");
    assert_eq!(backups.len(), 1, "{:#?}", t.notes);
    assert!(backups[0].starts_with("not translated: the copies of"));
    assert!(backups[0].contains("path = \"/opt/x\""));
    check_toml(&t);
}
