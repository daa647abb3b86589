//! `clusterctl import-rsync`: the sync sets it drafts from the seed rsync
//! scripts pass `clusterd --check` as they are.

use std::time::Duration;

use crate::harness::*;

/// `clusterctl import-rsync` on each seed script drafts sets that
/// `clusterd --check` accepts as they are.
#[test]
fn import_rsync_drafts_sets_that_clusterd_accepts() {
    let root = repo_root();
    let dir = short_tempdir("clusterd-import-");
    let certs = dir.path().join("certs");
    certs_init(&certs, &[1, 2, 3]);
    let base = format!(
        "[node]\nid = 1\nlisten = \"127.0.0.1:7700\"\ndata_dir = \"/var/lib/clusterd\"\n\n[tls]\nca = \"{0}/ca.crt\"\ncert = \"{0}/node-1.crt\"\nkey = \"{0}/node-1.key\"\n\n[[peer]]\nid = 2\naddr = \"10.0.0.2:7700\"\n[[peer]]\nid = 3\naddr = \"10.0.0.3:7700\"\n\n",
        certs.display()
    );
    // The kerberos and tacacs seeds copy /etc/passwd, shadow, group, gshadow and
    // their `-` backups whole: one kind = "accounts" set of /etc each.
    for (script, sets) in [
        ("kerberos-active-sync.sh", 15),
        ("smtp-filter-sync.sh", 4),
        ("tacacs-active-sync.sh", 6),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_clusterctl"));
        cmd.arg("import-rsync")
            .arg(format!("{root}/cluster-tests/fixtures/seeds/{script}"));
        let out = run_cmd(cmd, Duration::from_secs(10));
        assert!(out.success(), "{script}: {out}");
        assert_eq!(
            out.stdout.lines().filter(|l| *l == "[[sync]]").count(),
            sets,
            "{script}:\n{}",
            out.stdout
        );
        let accounts = usize::from(script != "smtp-filter-sync.sh");
        assert_eq!(
            out.stdout
                .matches("\nkind = \"accounts\"\npath = \"/etc\"\n")
                .count(),
            accounts,
            "{script}:\n{}",
            out.stdout
        );
        for file in ["passwd", "shadow", "group", "gshadow"] {
            for f in [file.to_string(), format!("{file}-")] {
                assert!(
                    !out.stdout.contains(&format!("path = \"/etc/{f}\"")),
                    "{script}: no set for /etc/{f}:\n{}",
                    out.stdout
                );
            }
        }
        let path = dir.path().join(format!("{script}.toml"));
        std::fs::write(&path, format!("{base}{}", out.stdout)).unwrap();
        let check = check_config(&path);
        assert!(
            check.success(),
            "{script}: the drafted sets must pass --check: {check}\n{}",
            out.stdout
        );
        assert!(
            check.stdout.contains(&format!("{sets} sync sets")),
            "{check}"
        );
    }
}
