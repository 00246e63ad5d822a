//! Reload without restart, as users run it: SIGHUP adds and removes an
//! account and leaves the old configuration serving when the new one is
//! broken; a Kubernetes-style `..data` swap of a mounted secret, and a
//! rewritten client key file, are picked up without a signal.

mod common;

use std::path::Path;

use common::process::{run_command, Running};
use common::{client, metric_at, wait_for};
use goto_auth_proxy::standin::{StandIn, StandInOptions, CLIENT_ID, CLIENT_SECRET};

/// The `[accounts.eu]` table for `standin`, its secrets in `dir`.
fn eu_table(standin: &StandIn, dir: &Path, client_secret_file: &Path) -> String {
    let refresh = dir.join("eu-refresh-token");
    std::fs::write(&refresh, standin.refresh_token()).unwrap();
    format!(
        "[accounts.eu]\nclient_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{}\"\n\
         refresh_token_file = \"{}\"\nupstream = \"{}\"\ntoken_url = \"{}\"\n",
        client_secret_file.display(),
        refresh.display(),
        standin.api_url(),
        standin.token_url()
    )
}

async fn reloads(admin: &str, result: &str) -> f64 {
    metric_at(
        admin,
        &format!("goto_proxy_config_reloads_total{{result=\"{result}\"}}"),
    )
    .await
    .unwrap_or(0.0)
}

async fn status(listen: &str, path: &str) -> u16 {
    client()
        .get(format!("http://{listen}{path}"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn sighup_adds_and_removes_accounts_and_a_broken_file_changes_nothing() {
    let first = StandIn::start(StandInOptions::default()).await.unwrap();
    let second = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "# accounts come later\n").unwrap();
    let secret = dir.path().join("eu-client-secret");
    std::fs::write(&secret, CLIENT_SECRET).unwrap();
    let mut command = run_command(&first, dir.path(), &first.refresh_token());
    command.arg("--config").arg(&config);
    let running = Running::spawn(command);
    let listen = running.logged_value("listen").await;
    let admin = running.logged_value("admin").await;
    wait_for("the default account", || async {
        status(&listen, "/G2M/rest/meetings").await == 200
    })
    .await;
    assert_eq!(status(&listen, "/acct/eu/G2M/rest/meetings").await, 404);

    std::fs::write(&config, eu_table(&second, dir.path(), &secret)).unwrap();
    running.signal("HUP");
    wait_for("the reload", || async {
        reloads(&admin, "ok").await >= 1.0
    })
    .await;
    wait_for("the eu account to serve", || async {
        status(&listen, "/acct/eu/G2M/rest/meetings").await == 200
    })
    .await;
    assert!(!second.recorded_requests().is_empty());

    std::fs::write(&config, "rate_limit = \"many\"\n").unwrap();
    running.signal("HUP");
    wait_for("the refused reload", || async {
        reloads(&admin, "error").await >= 1.0
    })
    .await;
    // The count can be read before the line that names the setting reaches the log.
    wait_for("the log to name the setting", || async {
        running.log_text().contains("--rate-limit")
    })
    .await;
    assert_eq!(status(&listen, "/acct/eu/G2M/rest/meetings").await, 200);
    assert_eq!(status(&listen, "/G2M/rest/meetings").await, 200);

    std::fs::write(&config, "# eu is gone\n").unwrap();
    running.signal("HUP");
    wait_for("the eu account to be gone", || async {
        status(&listen, "/acct/eu/G2M/rest/meetings").await == 404
    })
    .await;
    assert_eq!(status(&listen, "/G2M/rest/meetings").await, 200);
    let healthz = client()
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        healthz.status(),
        200,
        "a removed account's refresher is no failure"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_swapped_secret_mount_and_a_new_client_key_are_taken_without_a_signal() {
    let first = StandIn::start(StandInOptions::default()).await.unwrap();
    let second = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A mounted Secret as Kubernetes lays it out.
    let mount = dir.path().join("mount");
    let version_one = mount.join("..2026_12_01_00_00_00.000000001");
    std::fs::create_dir_all(&version_one).unwrap();
    std::fs::write(version_one.join("client-secret"), CLIENT_SECRET).unwrap();
    std::os::unix::fs::symlink(&version_one, mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/client-secret", mount.join("client-secret")).unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        eu_table(&second, dir.path(), &mount.join("client-secret")),
    )
    .unwrap();
    let key_file = dir.path().join("client-key");
    std::fs::write(&key_file, "first-key").unwrap();
    let mut command = run_command(&first, dir.path(), &first.refresh_token());
    command
        .arg("--config")
        .arg(&config)
        .env("GOTO_PROXY_CLIENT_KEY_FILE", &key_file);
    let running = Running::spawn(command);
    let listen = running.logged_value("listen").await;
    let admin = running.logged_value("admin").await;
    let get = |key: &'static str| {
        let url = format!("http://{listen}/acct/eu/G2M/rest/meetings");
        async move {
            client()
                .get(url)
                .header("proxy-authorization", format!("Bearer {key}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    wait_for("the eu account", || async { get("first-key").await == 200 }).await;

    // The client secret is rotated: in GoTo, then in the Secret.
    second.set_client_secret("rotated-client-secret");
    let version_two = mount.join("..2026_12_01_01_00_00.000000002");
    std::fs::create_dir_all(&version_two).unwrap();
    std::fs::write(version_two.join("client-secret"), "rotated-client-secret").unwrap();
    std::os::unix::fs::symlink(&version_two, mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    wait_for("the reload the swap causes", || async {
        reloads(&admin, "ok").await >= 1.0
    })
    .await;
    // The next refresh authenticates with the new secret.
    second.revoke_access_tokens();
    assert_eq!(get("first-key").await, 200);

    std::fs::write(&key_file, "the-second-key").unwrap();
    wait_for("the new client key", || async {
        get("the-second-key").await == 200
    })
    .await;
    assert_eq!(get("first-key").await, 407);
    let log = running.stop().await;
    for secret in [
        "rotated-client-secret",
        "the-second-key",
        "first-key",
        CLIENT_SECRET,
    ] {
        assert!(!log.contains(secret), "{secret} reached the log");
    }
}
