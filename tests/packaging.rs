//! The files in config/ stay true to the binary: the example TOML is
//! accepted by `run --check` and documents every setting, and every GOTO_*
//! variable the packaging sets is one the binary reads.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Args as _;
use common::process::proxy_command;
use goto_auth_proxy::config::RunOptions;

fn config_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
}

/// Every setting of `run`: (TOML key, environment variable).
fn settings() -> Vec<(String, String)> {
    RunOptions::augment_args(clap::Command::new("run"))
        .get_arguments()
        .filter_map(|arg| {
            Some((
                arg.get_id().to_string(),
                arg.get_env()?.to_string_lossy().into_owned(),
            ))
        })
        .collect()
}

#[test]
fn the_example_config_passes_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    let refresh = dir.path().join("refresh-token");
    std::fs::write(&secret, "s\n").unwrap();
    std::fs::write(&refresh, "r\n").unwrap();
    // The example's secret and state paths are for a real host; flags point them here.
    let output = proxy_command()
        .args(["run", "--check", "--config"])
        .arg(config_file("goto-auth-proxy.toml"))
        .arg("--client-secret-file")
        .arg(&secret)
        .arg("--refresh-token-file")
        .arg(&refresh)
        .arg("--state-file")
        .arg(dir.path().join("state.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("upstream = https://api.getgo.com\n"),
        "{stdout}"
    );
}

#[test]
fn the_example_config_documents_every_setting() {
    let text = std::fs::read_to_string(config_file("goto-auth-proxy.toml")).unwrap();
    let settings = settings();
    assert!(settings.len() >= 20, "{settings:?}");
    for (key, _) in settings {
        let documented = text.lines().any(|line| {
            line.trim_start_matches(['#', ' '])
                .starts_with(&format!("{key} ="))
        });
        assert!(
            documented,
            "config/goto-auth-proxy.toml does not mention {key}"
        );
    }
}

#[test]
fn packaging_sets_only_variables_the_binary_reads() {
    let mut known: BTreeSet<String> = settings().into_iter().map(|(_, env)| env).collect();
    known.extend(
        [
            "GOTO_PROXY_CONFIG",
            "GOTO_CLIENT_SECRET",
            "GOTO_REFRESH_TOKEN",
            "GOTO_PAT",
            "GOTO_PROXY_CLIENT_KEY",
        ]
        .map(String::from),
    );
    for file in [
        "Dockerfile",
        "kubernetes.yaml",
        "kubernetes-forward.yaml",
        "goto-auth-proxy.service",
    ] {
        let text = std::fs::read_to_string(config_file(file)).unwrap();
        let used: BTreeSet<String> = text
            .match_indices("GOTO_")
            .map(|(at, _)| {
                text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect()
            })
            .collect();
        assert!(!used.is_empty(), "{file} sets no GOTO_ variable");
        for name in used {
            assert!(
                known.contains(&name),
                "{file} uses {name}, which goto-auth-proxy does not read"
            );
        }
    }
}
