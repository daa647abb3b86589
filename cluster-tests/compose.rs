//! The docker/ compose files, cross-checked without a Docker engine: the
//! services agree with each other and the entrypoint writes configs that
//! `clusterd --check` accepts. scripts/compose-test.sh runs them for real
//! where a Docker engine can be reached or started.

use std::time::Duration;

use crate::harness::*;

/// The files of docker/, checked without a Docker engine: the Dockerfile
/// takes the base images and prebuilt binaries as build arguments and compose
/// passes them; the compose services agree with each other (ids, hostnames,
/// ports, the shared certs volume, an init as PID 1), and the entrypoint, run
/// for each service with that service's environment, writes a config
/// `clusterd --check` accepts (also with the witness overlay), with the demo
/// sync set on every data node and none on the witness.
#[test]
fn docker_compose_files_cross_check() {
    use serde_yaml::Value;
    let root = repo_root();
    let load = |name: &str| -> Value {
        let text = std::fs::read_to_string(format!("{root}/docker/{name}")).unwrap();
        let mut v: Value =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("docker/{name}: {e}"));
        v.apply_merge().unwrap();
        v
    };
    let dockerfile = std::fs::read_to_string(format!("{root}/docker/Dockerfile")).unwrap();
    for arg in [
        "ARG BUILD_IMAGE=rust:1-bookworm",
        "ARG RUN_IMAGE=debian:bookworm-slim",
        "ARG CLUSTERD_PREBUILT=",
    ] {
        assert!(
            dockerfile.lines().any(|l| l.trim() == arg),
            "docker/Dockerfile lacks `{arg}`"
        );
    }
    let base = load("compose.yaml");
    let overlay = load("compose.witness.yaml");
    let services = base["services"].as_mapping().expect("services");
    let env_of = |svc: &Value, with_overlay: Option<&Value>| -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = svc["environment"]
            .as_mapping()
            .expect("environment")
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().unwrap().to_string(),
                    v.as_str().unwrap().to_string(),
                )
            })
            .collect();
        if let Some(extra) = with_overlay.and_then(|o| o["environment"].as_mapping()) {
            for (k, v) in extra {
                env.push((
                    k.as_str().unwrap().to_string(),
                    v.as_str().unwrap().to_string(),
                ));
            }
        }
        env
    };
    let get = |env: &[(String, String)], key: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };

    // Cross-check: ids unique, PEERS the same everywhere and naming every service.
    let mut ids = std::collections::BTreeMap::new();
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        let env = env_of(svc, None);
        let id: u64 = get(&env, "NODE_ID").expect("NODE_ID").parse().unwrap();
        assert_eq!(
            svc["hostname"].as_str(),
            Some(name),
            "service {name}: hostname"
        );
        assert!(
            svc["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|v| v.as_str() == Some("certs:/certs")),
            "service {name} lacks the certs volume"
        );
        assert_eq!(
            svc["init"].as_bool(),
            Some(true),
            "service {name}: `init: true` (SIGTERM must stop it at once)"
        );
        for arg in ["BUILD_IMAGE", "RUN_IMAGE", "CLUSTERD_PREBUILT"] {
            assert!(
                svc["build"]["args"][arg].is_string(),
                "service {name}: build arg {arg} not passed"
            );
        }
        assert!(
            get(&env, "SYNC_SETS").is_some_and(|s| !s.is_empty()),
            "service {name}: no demo SYNC_SETS"
        );
        assert!(
            ids.insert(id, name.to_string()).is_none(),
            "NODE_ID {id} used twice"
        );
    }
    for (_, svc) in services {
        let peers = get(&env_of(svc, None), "PEERS").unwrap();
        let listed: std::collections::BTreeMap<u64, String> = peers
            .split(',')
            .map(|p| {
                let (id, addr) = p.split_once('=').unwrap();
                (id.parse().unwrap(), addr.to_string())
            })
            .collect();
        let expected: std::collections::BTreeMap<u64, String> = ids
            .iter()
            .map(|(id, host)| (*id, format!("{host}:7700")))
            .collect();
        assert_eq!(
            listed, expected,
            "PEERS must name every service at port 7700"
        );
    }

    // Run the entrypoint for each service, with and without the witness overlay.
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_clusterd"))
        .parent()
        .unwrap()
        .to_path_buf();
    for witness in [false, true] {
        let dir = short_tempdir("clusterd-compose-");
        let mut witnesses = 0;
        for (name, svc) in services {
            let name = name.as_str().unwrap();
            let env = env_of(svc, witness.then(|| &overlay["services"][name]));
            let conf = dir.path().join(format!("{name}.toml"));
            let mut cmd = std::process::Command::new("sh");
            cmd.arg(format!("{root}/docker/entrypoint.sh"))
                .arg("--check");
            scrub_env(&mut cmd);
            for (k, v) in &env {
                cmd.env(k, v);
            }
            cmd.env(
                "PATH",
                format!(
                    "{}:{}",
                    bin_dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("CERTS_DIR", dir.path().join("certs"))
            .env("CONFIG_FILE", &conf)
            .env("DATA_DIR", dir.path().join(name))
            .env("ADMIN_SOCKET", dir.path().join(format!("{name}.sock")));
            let out = run_cmd(cmd, Duration::from_secs(20));
            assert!(
                out.success(),
                "entrypoint of {name} (witness overlay: {witness}): {out}"
            );
            let written = std::fs::read_to_string(&conf).unwrap();
            assert_eq!(
                written.contains("witness = true"),
                witness,
                "{name}:\n{written}"
            );
            // Every data node gets the demo set; a witness holds none.
            let is_witness = get(&env, "WITNESSES").is_some_and(|w| {
                w.split(',')
                    .any(|id| Some(id) == get(&env, "NODE_ID").as_deref())
            });
            let node_section = written.split("[tls]").next().unwrap();
            assert_eq!(
                node_section.contains("witness = true"),
                is_witness,
                "{name} (witness overlay: {witness}):\n{written}"
            );
            assert_eq!(
                written.contains("[[sync]]"),
                !is_witness,
                "{name} (witness overlay: {witness}):\n{written}"
            );
            witnesses += usize::from(is_witness);
        }
        assert_eq!(
            witnesses,
            usize::from(witness),
            "witness overlay: {witness}: witnesses"
        );
    }
}
