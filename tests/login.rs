//! `login` end to end against the stand-in, the test playing the browser.

mod common;

use common::process::{proxy_command, Running};
use common::{client, options_for, settings, start_proxy, status_of, wait_for};
use goto_auth_proxy::standin::{StandIn, StandInOptions, CLIENT_ID, CLIENT_SECRET, PRINCIPAL};
use goto_auth_proxy::store::FileStore;
use secrecy::ExposeSecret;

/// `login` against `standin`, redirect on a free loopback port unless `redirect` says otherwise.
fn login_command(
    standin: &StandIn,
    state_file: &std::path::Path,
    redirect: &str,
    extra: &[&str],
) -> Running {
    let mut command = proxy_command();
    command
        .args(["login", "--no-browser", "--redirect-uri", redirect])
        .args(["--authorize-url", &standin.authorize_url()])
        .args(["--token-url", &standin.token_url()])
        .args(["--client-id", CLIENT_ID])
        .arg("--state-file")
        .arg(state_file)
        .args(extra)
        .env("GOTO_CLIENT_SECRET", CLIENT_SECRET);
    Running::spawn(command)
}

/// The authorize URL `login` printed.
async fn printed_authorize_url(running: &Running) -> reqwest::Url {
    let mut url = None;
    wait_for("the authorize URL", || {
        url = running.log.lock().unwrap().iter().find_map(|line| {
            line.trim()
                .starts_with("http")
                .then(|| line.trim().to_owned())
        });
        std::future::ready(url.is_some())
    })
    .await;
    reqwest::Url::parse(&url.unwrap()).unwrap()
}

/// The value of `name` in `url`'s query.
fn query_param(url: &reqwest::Url, name: &str) -> String {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .unwrap()
        .1
        .into_owned()
}

/// `url` with its query replaced by `pairs`.
fn with_query(mut url: reqwest::Url, pairs: &[(&str, &str)]) -> reqwest::Url {
    url.query_pairs_mut().clear().extend_pairs(pairs);
    url
}

/// Plays the browser: opens the consent page and follows its redirect back.
async fn consent(
    authorize: reqwest::Url,
    tamper: impl FnOnce(reqwest::Url) -> reqwest::Url,
) -> reqwest::Response {
    let consent = client().get(authorize).send().await.unwrap();
    assert_eq!(consent.status(), 302);
    let location = consent.headers()["location"].to_str().unwrap();
    client()
        .get(tamper(reqwest::Url::parse(location).unwrap()))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn login_writes_the_state_file_and_run_starts_from_it() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    let mut running = login_command(&standin, &state_file, "http://127.0.0.1:0/callback", &[]);
    let authorize = printed_authorize_url(&running).await;
    assert_eq!(query_param(&authorize, "code_challenge_method"), "S256");
    assert_eq!(
        query_param(&authorize, "code_challenge").len(),
        43,
        "base64url of a SHA-256 digest"
    );
    assert!(query_param(&authorize, "state").len() >= 16);

    let page = consent(authorize, |url| url).await;
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Signed in"));
    let status = running.wait_exit().await;
    assert!(status.success(), "{}", running.log_text());
    assert!(running.log_text().contains(PRINCIPAL));

    let stored = FileStore::new(&state_file)
        .load_blocking()
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.refresh_token.unwrap().expose_secret(),
        standin.refresh_token()
    );
    assert_eq!(stored.principal.as_deref(), Some(PRINCIPAL));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&state_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        !running.log_text().contains(&standin.refresh_token()),
        "login printed the refresh token"
    );

    // `run` with no bootstrap token at all starts from what login wrote.
    let proxy = start_proxy(settings(options_for(&standin, dir.path()), None)).await;
    proxy.wait_ready().await;
    assert_eq!(status_of(proxy.url("/x")).await, 200);
}

#[tokio::test]
async fn a_denied_consent_is_a_clear_failure() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    let mut running = login_command(&standin, &state_file, "http://127.0.0.1:0/callback", &[]);
    let authorize = printed_authorize_url(&running).await;
    let page = consent(authorize, |url| {
        let state = query_param(&url, "state");
        with_query(url, &[("error", "access_denied"), ("state", &state)])
    })
    .await;
    assert_eq!(page.status(), 200);
    assert!(!running.wait_exit().await.success());
    assert!(
        running
            .log_text()
            .contains("consent was not given (access_denied"),
        "{}",
        running.log_text()
    );
    assert!(!state_file.exists());
}

#[tokio::test]
async fn a_redirect_with_a_wrong_state_is_refused() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    let mut running = login_command(&standin, &state_file, "http://127.0.0.1:0/callback", &[]);
    let authorize = printed_authorize_url(&running).await;
    let page = consent(authorize, |url| {
        let code = query_param(&url, "code");
        with_query(url, &[("code", &code), ("state", "forged")])
    })
    .await;
    assert_eq!(page.status(), 400);
    assert!(!running.wait_exit().await.success());
    assert!(
        running.log_text().contains("state"),
        "{}",
        running.log_text()
    );
    assert!(
        !state_file.exists(),
        "a forged redirect must not produce a state file"
    );
}

#[tokio::test]
async fn a_redirect_port_in_use_and_a_timeout_say_what_to_do() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let redirect = format!(
        "http://127.0.0.1:{}/callback",
        taken.local_addr().unwrap().port()
    );
    let mut running = login_command(&standin, &dir.path().join("s.json"), &redirect, &[]);
    assert!(!running.wait_exit().await.success());
    assert!(
        running.log_text().contains("--redirect-uri"),
        "{}",
        running.log_text()
    );

    let mut running = login_command(
        &standin,
        &dir.path().join("s.json"),
        "http://127.0.0.1:0/callback",
        &["--timeout", "1s"],
    );
    assert!(!running.wait_exit().await.success());
    assert!(
        running.log_text().contains("no redirect arrived within 1s"),
        "{}",
        running.log_text()
    );

    let mut running = login_command(
        &standin,
        &dir.path().join("s.json"),
        "http://example.com/callback",
        &[],
    );
    assert!(!running.wait_exit().await.success());
    assert!(
        running.log_text().contains("loopback"),
        "{}",
        running.log_text()
    );
}

#[tokio::test]
async fn login_with_a_redis_store_reaches_the_running_replicas() {
    let Some(redis) = common::redis::RedisProcess::start().await else {
        return;
    };
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let replica_dir = tempfile::tempdir().unwrap();
    let mut options = options_for(&standin, replica_dir.path());
    options.store = Some(goto_auth_proxy::config::StoreUrl(redis.url()));
    let proxy = start_proxy(settings(options, Some(standin.refresh_token()))).await;
    proxy.wait_ready().await;
    // Signed in on another machine, through the same store.
    let login_dir = tempfile::tempdir().unwrap();
    let mut running = login_command(
        &standin,
        &login_dir.path().join("state.json"),
        "http://127.0.0.1:0/callback",
        &["--store", &redis.url()],
    );
    let page = consent(printed_authorize_url(&running).await, |url| url).await;
    assert_eq!(page.status(), 200);
    assert!(
        running.wait_exit().await.success(),
        "{}",
        running.log_text()
    );
    // The consent started a new refresh-token chain; the replica holds it
    // (its state file is its copy of Redis's state) and refreshes with it.
    let replica_copy = FileStore::new(replica_dir.path().join("state.json"));
    wait_for("the replica to hear of the new refresh token", || {
        let stored = replica_copy.load_blocking().ok().flatten();
        std::future::ready(
            stored
                .and_then(|s| s.refresh_token)
                .is_some_and(|t| t.expose_secret() == standin.refresh_token()),
        )
    })
    .await;
    standin.revoke_access_tokens();
    let before = standin.token_requests();
    assert_eq!(status_of(proxy.url("/x")).await, 200);
    assert_eq!(standin.token_requests(), before + 1);
}
