//! The configuration reference: every key of `clusterd.toml`, its default and
//! what it is for, in one table. README's "Configuration reference" and the
//! clusterd.toml(5) man page are rendered from it, and tests hold it equal to
//! the keys the parser accepts ([`super::config::RawConfig`]), so the three
//! can never disagree.

/// One row of the reference: keys documented together (`tls.ca`,
/// `tls.cert`, `tls.key`), their default and their meaning. `default` and
/// `meaning` are Markdown: `code` in backticks, nothing else.
pub struct KeyDoc {
    /// Dotted keys; `peer[]` and `sync[]` are arrays of tables (`[[peer]]`).
    pub keys: &'static [&'static str],
    pub default: &'static str,
    pub meaning: &'static str,
}

/// The sections of the file in the order the reference lists them, with
/// what each is for (the man page's section headings).
pub const SECTIONS: &[(&str, &str)] = &[
    (
        "node",
        "This node: its identity, addresses and where it keeps its state.",
    ),
    (
        "peer",
        "Every member of the cluster, one `[[peer]]` table each.",
    ),
    (
        "tls",
        "The mutual TLS of every peer link and of the remote admin port.",
    ),
    ("raft", "Raft timers and log compaction."),
    ("log", "What the node logs."),
    ("metrics", "The Prometheus endpoint."),
    ("admin", "The remote admin service (`clusterctl --remote`)."),
    (
        "replication",
        "How the leader watches and rescans the sync sets.",
    ),
    (
        "history",
        "How long each data node keeps the committed versions of its sets.",
    ),
    (
        "sync",
        "The sync sets, one `[[sync]]` table each: what is replicated, and how.",
    ),
    ("hooks", "Commands run when this node's role changes."),
];

/// Every key, grouped by section in the order of [`SECTIONS`].
pub const KEYS: &[KeyDoc] = &[
    KeyDoc {
        keys: &["node.id"],
        default: "required",
        meaning: "unique, stable id > 0",
    },
    KeyDoc {
        keys: &["node.listen"],
        default: "`0.0.0.0:7700`",
        meaning: "peer gRPC address (mutual TLS)",
    },
    KeyDoc {
        keys: &["node.data_dir"],
        default: "`/var/lib/clusterd`",
        meaning: "Raft log (RocksDB under `raft/`), node state, content staged for batches not yet applied (`staging/`, same size as what is in flight; uploads no batch used are removed after an hour). On the same filesystem as the sync sets, a new file's content is written once on a follower (staged, then linked into place); elsewhere it is written twice",
    },
    KeyDoc {
        keys: &["node.admin_socket"],
        default: "`/run/clusterd/admin.sock`",
        meaning: "unix socket for `clusterctl`, mode 0600",
    },
    KeyDoc {
        keys: &["node.witness"],
        default: "`false`",
        meaning: "a voter that holds no sync sets and never leads: it never campaigns and refuses leadership transfers",
    },
    KeyDoc {
        keys: &["node.allow_two_node"],
        default: "`false`",
        meaning: "accept a two-voter cluster, which cannot fail over",
    },
    KeyDoc {
        keys: &["node.join"],
        default: "`false`",
        meaning: "a new node with an empty `data_dir` waits to be added with `clusterctl member add` and never forms a cluster of its own; its `[[peer]]` list only says whom to expect",
    },
    KeyDoc {
        keys: &["peer[].id", "peer[].addr"],
        default: "required",
        meaning: "the members a new cluster starts with, and the `host:port` to reach each; afterwards the committed membership rules, and members added at runtime need no entry",
    },
    KeyDoc {
        keys: &["peer[].witness"],
        default: "`false`",
        meaning: "that peer is a witness: `promote` refuses it and a stopping leader never hands over to it",
    },
    KeyDoc {
        keys: &["tls.ca", "tls.cert", "tls.key"],
        default: "required",
        meaning: "cluster CA, this node's certificate and key",
    },
    KeyDoc {
        keys: &["tls.revoked_serials"],
        default: "`[]`",
        meaning: "serials of certificates to refuse on every peer link (stolen or replaced ones); `clusterctl certs show FILE` prints a certificate's serial",
    },
    KeyDoc {
        keys: &["raft.heartbeat_ms"],
        default: "`200`",
        meaning: "heartbeat interval; the Raft clock ticks twice per interval",
    },
    KeyDoc {
        keys: &["raft.election_timeout_ms"],
        default: "`1000`",
        meaning: "minimum election timeout (randomized up to 1.5×); at least 3 heartbeats",
    },
    KeyDoc {
        keys: &["raft.compact_after"],
        default: "`20000`",
        meaning: "applied entries kept in the Raft log before it is compacted; a node further behind catches up by snapshot",
    },
    KeyDoc {
        keys: &["log.level"],
        default: "`info`",
        meaning: "log filter when `RUST_LOG` is unset, e.g. `info,clusterd=debug`",
    },
    KeyDoc {
        keys: &["metrics.listen"],
        default: "off",
        meaning: "`IP:port` of a Prometheus endpoint (`GET /metrics`), e.g. `127.0.0.1:9770`",
    },
    KeyDoc {
        keys: &["admin.listen"],
        default: "off",
        meaning: "`IP:port` of the remote admin service (mutual TLS; admin certificates from `clusterctl certs admin` may change things, node certificates only read), e.g. `0.0.0.0:7701`",
    },
    KeyDoc {
        keys: &["replication.debounce_ms"],
        default: "`20`",
        meaning: "quiet time after a file event before the leader reads the change, while a file is still open for writing (once every file written to was closed or renamed, 2 ms)",
    },
    KeyDoc {
        keys: &["replication.rescan_secs"],
        default: "`300`",
        meaning: "full rescan of every set, catching anything the watcher missed",
    },
    KeyDoc {
        keys: &["history.keep_days"],
        default: "`30`",
        meaning: "days committed versions are kept under `data_dir/history` (see \"Going back\"); older revisions are dropped, the version each path had then stays",
    },
    KeyDoc {
        keys: &["history.keep_bytes"],
        default: "`\"1GiB\"`",
        meaning: "the most the kept versions may take on disk (e.g. `\"500MB\"`, or bytes); the oldest revisions are dropped first",
    },
    KeyDoc {
        keys: &["sync[].name"],
        default: "required",
        meaning: "the set's identity across the cluster",
    },
    KeyDoc {
        keys: &["sync[].path"],
        default: "required",
        meaning: "node-local absolute path: a directory, or one file (`/etc/aliases`)",
    },
    KeyDoc {
        keys: &["sync[].kind"],
        default: "by what `path` is",
        meaning: "`\"dir\"`, `\"file\"` or `\"accounts\"`; set `\"file\"` for a single-file set whose file may be absent on some node (an absent path is otherwise a directory, created); `\"accounts\"`: `path` is the directory of `passwd`, `shadow`, `group` and `gshadow` (normally `/etc`), replicated as records merged into each node's own files (see \"Accounts\")",
    },
    KeyDoc {
        keys: &["sync[].uid_range", "sync[].gid_range"],
        default: "`\"1000-59999\"`",
        meaning: "accounts sets: the user and group ids replicated (`\"FIRST-LAST\"`, inclusive); entries outside them are each node's own and never touched",
    },
    KeyDoc {
        keys: &["sync[].include"],
        default: "`[]`",
        meaning: "accounts sets: user and group names replicated whatever their id (`[\"tac-plus\"]`)",
    },
    KeyDoc {
        keys: &["sync[].max_removed"],
        default: "`20`",
        meaning: "accounts sets: a change that would remove more users at once is held on the leader (status `held`) until `clusterctl sync SET --confirm`",
    },
    KeyDoc {
        keys: &["sync[].mode"],
        default: "`\"mirror\"`",
        meaning: "`\"mirror\"`: exact copy, deletions included; `\"append\"`: log files, only appended bytes travel, deletions are not propagated",
    },
    KeyDoc {
        keys: &["sync[].exclude"],
        default: "`[]`",
        meaning: "gitignore-style globs relative to `path` (`\"*.lock\"`, `\".ssh/\"`, `\"connection.cfg\"`): never sent, never deleted on followers",
    },
    KeyDoc {
        keys: &["sync[].skip_while"],
        default: "`[]`",
        meaning: "globs; while a matching entry exists in the set, the set is neither read (leader) nor written (followers); retried once it is gone",
    },
    KeyDoc {
        keys: &["sync[].on_change"],
        default: "none",
        meaning: "shell command run on each follower after it applied a batch of the set (debounced 200 ms, 60 s limit, exit status and output logged, `CLUSTERD_SET` in its environment)",
    },
    KeyDoc {
        keys: &["sync[].on_change_failure"],
        default: "`\"report\"`",
        meaning: "what a follower does when `on_change` exits non-zero after applying a change of the set: `\"report\"` logs and counts it (`on_change_failures`); `\"revert\"` puts back the files that change touched (content and metadata, atomically), runs `on_change` again and holds the set (status `held`) until its next committed change. Needs `on_change`; not with `mode = \"append\"`",
    },
    KeyDoc {
        keys: &["sync[].history"],
        default: "`true` (`false` for append sets)",
        meaning: "keep every committed version of the set's files (content, mode, owner, mtime) for `clusterctl history`, `show`, `diff` and `rollback`",
    },
    KeyDoc {
        keys: &["sync[].xattrs"],
        default: "`false`",
        meaning: "`true` keeps `user.*` extended attributes and POSIX ACLs of files and directories (see \"What is kept\"); never `security.*` or `trusted.*`",
    },
    KeyDoc {
        keys: &["sync[].hard_links"],
        default: "`false`",
        meaning: "`true` keeps hard links: names of the set that share an inode on the leader share one on every follower (see \"What is kept\"); not with `mode = \"append\"`",
    },
    KeyDoc {
        keys: &["sync[].validate"],
        default: "none",
        meaning: "shell command that checks the set as it would be after a change, before anything of it is proposed: `{}` is replaced by the path of a staged copy of the set (a directory laid out like the root, or the single file); `CLUSTERD_SET`, `CLUSTERD_ROOT` and `CLUSTERD_STAGED` are in its environment. Exit 0 proposes the change; anything else (or the timeout) holds it: nothing of the set is proposed, followers keep the last committed state, status shows `held` with the first line of its output. The next change of the set retries. Its program must exist at `--check`; not with `mode = \"append\"`",
    },
    KeyDoc {
        keys: &["sync[].validate_timeout_ms"],
        default: "`10000`",
        meaning: "how long `validate` may run before its process group is killed and the change counts as invalid (at most 600000)",
    },
    KeyDoc {
        keys: &["sync[].max_file_size"],
        default: "4 GiB",
        meaning: "larger files are not replicated (logged, shown as the set's last error); each version is held in memory while planned and applied",
    },
    KeyDoc {
        keys: &["hooks.on_promote"],
        default: "none",
        meaning: "shell command run when this node becomes leader, with `CLUSTERD_ROLE`, `CLUSTERD_TERM`, `CLUSTERD_LEADER_ID`, `CLUSTERD_NODE_ID` set; 60 s limit, output logged; role hooks run one at a time in the order the changes happened",
    },
    KeyDoc {
        keys: &["hooks.on_demote"],
        default: "none",
        meaning: "the same when it stops being leader",
    },
    KeyDoc {
        keys: &["hooks.role_file"],
        default: "none",
        meaning: "file rewritten atomically with `1` on the leader and `0` elsewhere (written `0` at start): a drop-in for scripts that read a `PROMOTE` file",
    },
];

/// The section a key belongs to: `node` of `node.id`, `sync` of `sync[].name`.
pub fn section_of(key: &str) -> &str {
    key.split(['.', '[']).next().unwrap_or(key)
}

/// The README's table: one row per [`KeyDoc`].
pub fn markdown_table() -> String {
    let mut out = String::from("| key | default | meaning |\n| --- | --- | --- |\n");
    for doc in KEYS {
        let keys: Vec<String> = doc.keys.iter().map(|k| format!("`{k}`")).collect();
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            keys.join(", "),
            doc.default,
            doc.meaning
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_reflection::{ContainerFormat, Format, Registry, Tracer, TracerConfig};

    use super::*;
    use crate::core::config::RawConfig;

    /// Every key the parser accepts, read off the `Raw*` types themselves,
    /// so a field added there without a row here fails the test below.
    fn accepted_keys() -> BTreeSet<String> {
        let mut tracer = Tracer::new(TracerConfig::default());
        tracer
            .trace_simple_type::<RawConfig>()
            .expect("tracing the config types");
        let registry = tracer.registry().expect("a complete registry");
        let mut keys = BTreeSet::new();
        collect(&registry, "RawConfig", "", &mut keys);
        keys
    }

    fn collect(registry: &Registry, type_name: &str, prefix: &str, keys: &mut BTreeSet<String>) {
        let Some(ContainerFormat::Struct(fields)) = registry.get(type_name) else {
            panic!("{type_name} is not a struct of named fields");
        };
        for field in fields {
            let mut format = &field.value;
            if let Format::Option(inner) = format {
                format = inner;
            }
            match format {
                Format::TypeName(table) => {
                    collect(registry, table, &format!("{prefix}{}.", field.name), keys)
                }
                Format::Seq(inner) if matches!(**inner, Format::TypeName(_)) => {
                    let Format::TypeName(table) = &**inner else {
                        unreachable!()
                    };
                    collect(registry, table, &format!("{prefix}{}[].", field.name), keys)
                }
                _ => {
                    keys.insert(format!("{prefix}{}", field.name));
                }
            }
        }
    }

    #[test]
    fn the_reference_documents_exactly_the_keys_the_parser_accepts() {
        let documented: BTreeSet<String> = KEYS
            .iter()
            .flat_map(|doc| doc.keys.iter().map(|k| k.to_string()))
            .collect();
        let accepted = accepted_keys();
        assert!(
            accepted.len() > 25,
            "tracing found too few keys: {accepted:?}"
        );
        let undocumented: Vec<_> = accepted.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&accepted).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "add a KeyDoc for {undocumented:?}; remove or rename the KeyDoc of {unknown:?}"
        );
    }

    #[test]
    fn keys_are_grouped_by_section_in_the_order_of_sections() {
        let order: BTreeMap<&str, usize> = SECTIONS
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (*name, i))
            .collect();
        let mut last = 0;
        for doc in KEYS {
            for key in doc.keys {
                let section = section_of(key);
                let Some(&at) = order.get(section) else {
                    panic!("{key}: its section {section} is not in SECTIONS");
                };
                assert!(at >= last, "{key} is listed after a later section's keys");
                last = at;
            }
        }
    }

    #[test]
    fn the_readme_holds_the_rendered_reference() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("| key | default | meaning |")
            .expect("README has the configuration reference table");
        let table: String = readme[start..]
            .lines()
            .take_while(|l| l.starts_with('|'))
            .map(|l| format!("{l}\n"))
            .collect();
        let expected = markdown_table();
        assert!(
            table == expected,
            "README's configuration reference differs from core::config_reference::KEYS; \
             replace the table with:\n{expected}"
        );
    }
}
