//! The token lifecycle end to end: proactive refresh, single-flight refresh
//! after 401s, rotation persisted across restarts, endpoint outages and
//! rejections, and the PAT grant.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{client, options_for, settings, setup, start_proxy, status_of, wait_for, PATIENCE};
use goto_auth_proxy::standin::{Fault, GrantShape, StandIn, StandInOptions};
use goto_auth_proxy::store::FileStore;
use secrecy::ExposeSecret;
use serde_json::Value;

fn short_lived(seconds: u64) -> StandInOptions {
    StandInOptions {
        shape: GrantShape {
            lifetime: Duration::from_secs(seconds),
            ..GrantShape::default()
        },
        ..StandInOptions::default()
    }
}

fn stored_refresh_token(dir: &std::path::Path) -> String {
    let state = FileStore::new(dir.join("state.json"))
        .load_blocking()
        .unwrap()
        .expect("a state file");
    state
        .refresh_token
        .expect("a refresh token")
        .expose_secret()
        .to_owned()
}

/// Requests sent from a few loops until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<u16>>>,
}

impl Traffic {
    fn start(url: String, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..workers)
            .map(|_| {
                let (url, stop) = (url.clone(), stop.clone());
                tokio::spawn(async move {
                    let client = client();
                    let mut statuses = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        statuses.push(
                            client
                                .get(&url)
                                .send()
                                .await
                                .map_or(0, |r| r.status().as_u16()),
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    statuses
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the loops and returns every status seen (0 for a transport error).
    async fn stop(self) -> Vec<u16> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap());
        }
        all
    }

    /// Runs for `duration`, then stops.
    async fn run_for(url: String, workers: usize, duration: Duration) -> Vec<u16> {
        let traffic = Self::start(url, workers);
        tokio::time::sleep(duration).await;
        traffic.stop().await
    }
}

#[tokio::test]
async fn a_four_second_token_is_refreshed_ahead_of_expiry_under_steady_traffic() {
    let s = setup(short_lived(4), |_| {}).await;
    let bootstrap = s.standin.refresh_token();
    let statuses =
        Traffic::run_for(s.proxy.url("/G2M/rest/meetings"), 4, Duration::from_secs(9)).await;
    assert!(
        statuses.len() > 40,
        "too little traffic to mean anything: {}",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|s| *s == 200),
        "clients saw errors: {statuses:?}"
    );
    assert_eq!(
        s.standin.api_refusals(),
        0,
        "an expired token reached the API"
    );
    // Refreshed about every 2 s (half the lifetime), so 9 s of traffic needs several.
    assert!(
        s.standin.token_requests() >= 4,
        "only {} token requests",
        s.standin.token_requests()
    );
    // The endpoint never sent a refresh token back: the one we had is kept.
    assert_eq!(stored_refresh_token(s.dir.path()), bootstrap);
}

#[tokio::test]
async fn without_expires_in_the_jwt_exp_claim_sets_the_schedule() {
    let mut options = short_lived(4);
    options.shape.send_expires_in = false;
    let s = setup(options, |_| {}).await;
    let statuses = Traffic::run_for(s.proxy.url("/x"), 2, Duration::from_secs(7)).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        s.standin.api_refusals(),
        0,
        "the proxy did not read exp and used an expired token"
    );
    assert!(s.standin.token_requests() >= 3);
}

#[tokio::test]
async fn fifty_concurrent_requests_on_a_revoked_token_cause_exactly_one_refresh() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    assert_eq!(status_of(s.proxy.url("/warm")).await, 200);
    let before = s.standin.token_requests();
    s.standin.revoke_access_tokens();
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let (url, barrier) = (
                s.proxy.url(&format!("/G2M/rest/meetings/{i}")),
                barrier.clone(),
            );
            tokio::spawn(async move {
                let client = client();
                barrier.wait().await;
                client.get(url).send().await.unwrap().status().as_u16()
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(
        s.standin.token_requests() - before,
        1,
        "50 refusals must share one refresh"
    );
    let retries = s
        .proxy
        .metric("goto_proxy_auth_retries_total")
        .await
        .unwrap();
    assert!((1.0..=50.0).contains(&retries), "{retries}");
}

#[tokio::test]
async fn webinar_style_403_invalid_token_is_refreshed_and_retried() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let before = s.standin.token_requests();
    s.standin.revoke_access_tokens();
    let response = client()
        .get(s.proxy.url("/G2W/rest/v2/organizers/1/webinars"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(s.standin.token_requests() - before, 1);
}

#[tokio::test]
async fn a_small_body_is_sent_again_on_retry_and_a_large_one_is_not() {
    let s = setup(StandInOptions::default(), |o| {
        o.retry_body_limit = Some("64KiB".into())
    })
    .await;
    s.standin.revoke_access_tokens();
    let small = vec![b'a'; 1000];
    let response = client()
        .post(s.proxy.url("/echo"))
        .body(small)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["body_bytes"], 1000);

    s.standin.revoke_access_tokens();
    let large = vec![b'b'; 200 * 1024];
    let response = client()
        .post(s.proxy.url("/upload"))
        .body(large.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        401,
        "a streamed body cannot be retried; the refusal goes back"
    );
    // The refusal still caused a refresh, so the next request goes through.
    wait_for("the refresh the refusal asked for", || async {
        client()
            .post(s.proxy.url("/upload"))
            .body(large.clone())
            .send()
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;
}

#[tokio::test]
async fn a_second_401_goes_back_to_the_client_after_one_refresh() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    s.standin.set_refuse_all(true);
    let before = s.standin.token_requests();
    let response = client().get(s.proxy.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"], "invalid_token",
        "the upstream's own answer is passed on"
    );
    assert_eq!(s.standin.token_requests() - before, 1);
}

#[tokio::test]
async fn a_refusal_during_the_drain_is_still_refreshed_and_retried() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let before = s.standin.token_requests();
    let in_flight = tokio::spawn(client().get(s.proxy.url("/sleep/1500")).send());
    wait_for("the request to reach the API", || async {
        !s.standin.recorded_requests().is_empty()
    })
    .await;
    // Revoked while the request is under way: its answer will be a 401.
    s.standin.revoke_access_tokens();
    let stopping = tokio::spawn(s.proxy.stop());
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(
        response.status(),
        200,
        "the retry during the drain found no token"
    );
    assert_eq!(s.standin.token_requests() - before, 1);
    stopping.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_rotated_refresh_token_is_persisted_and_a_restart_uses_it() {
    let mut options = StandInOptions::default();
    options.shape.rotate_every = 1;
    let standin = StandIn::start(options).await.unwrap();
    let bootstrap = standin.refresh_token();
    let dir = tempfile::tempdir().unwrap();

    let proxy = start_proxy(settings(
        options_for(&standin, dir.path()),
        Some(bootstrap.clone()),
    ))
    .await;
    proxy.wait_ready().await;
    assert_ne!(standin.refresh_token(), bootstrap, "the stand-in rotated");
    assert_eq!(stored_refresh_token(dir.path()), standin.refresh_token());
    let mode = std::fs::metadata(dir.path().join("state.json"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // A refusal forces a second refresh, and a second rotation.
    standin.revoke_access_tokens();
    assert_eq!(status_of(proxy.url("/x")).await, 200);
    assert_eq!(stored_refresh_token(dir.path()), standin.refresh_token());
    proxy.stop().await.unwrap();

    // Restart with the stale bootstrap token still configured: the state file wins.
    let restarted = start_proxy(settings(options_for(&standin, dir.path()), Some(bootstrap))).await;
    restarted.wait_ready().await;
    assert_eq!(status_of(restarted.url("/x")).await, 200);
    assert_eq!(stored_refresh_token(dir.path()), standin.refresh_token());
    let state = FileStore::new(dir.path().join("state.json"))
        .load_blocking()
        .unwrap()
        .unwrap();
    assert_eq!(
        state.principal.as_deref(),
        Some(goto_auth_proxy::standin::PRINCIPAL)
    );
    assert!(state.access_token_expires_at.is_some());
}

#[tokio::test]
async fn a_rejected_state_file_token_falls_back_to_the_bootstrap_token() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    FileStore::new(dir.path().join("state.json"))
        .save_blocking(&goto_auth_proxy::store::PersistedState {
            refresh_token: Some("rt-long-dead".into()),
            ..Default::default()
        })
        .unwrap();
    let proxy = start_proxy(settings(
        options_for(&standin, dir.path()),
        Some(standin.refresh_token()),
    ))
    .await;
    proxy.wait_ready().await;
    assert_eq!(stored_refresh_token(dir.path()), standin.refresh_token());
}

#[tokio::test]
async fn the_token_endpoint_failing_while_the_token_is_valid_is_invisible_to_clients() {
    let s = setup(short_lived(10), |_| {}).await;
    // The proactive refresh, about 5 s in, meets two failures before it works.
    s.standin.push_fault(Fault::Status(500));
    s.standin.push_fault(Fault::Garbage);
    let target = s.standin.token_requests() + 3;
    let traffic = Traffic::start(s.proxy.url("/x"), 2);
    wait_for("two failed token requests and a good one", || async {
        s.standin.token_requests() >= target
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let statuses = traffic.stop().await;
    assert!(
        statuses.len() > 20,
        "too little traffic to mean anything: {}",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|s| *s == 200),
        "clients saw errors: {statuses:?}"
    );
    assert_eq!(s.standin.api_refusals(), 0);
    assert_eq!(
        s.proxy
            .metric("goto_proxy_token_refreshes_total{result=\"error_status\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        s.proxy
            .metric("goto_proxy_token_refreshes_total{result=\"bad_answer\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn requests_during_a_start_up_outage_wait_for_the_token() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    standin.push_fault(Fault::Status(503));
    standin.push_fault(Fault::TooManyRequests {
        retry_after_secs: 1,
    });
    let dir = tempfile::tempdir().unwrap();
    let mut options = options_for(&standin, dir.path());
    options.token_wait = Some("25s".into());
    let proxy = start_proxy(settings(options, Some(standin.refresh_token()))).await;
    // Sent at once: there is no token yet, so the request waits for one.
    let response = client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(standin.token_requests(), 3);
}

#[tokio::test]
async fn when_no_token_comes_within_the_wait_the_answer_is_503() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    standin.set_standing_fault(Some(Fault::Hang));
    let dir = tempfile::tempdir().unwrap();
    let mut options = options_for(&standin, dir.path());
    options.token_wait = Some("1s".into());
    options.token_timeout = Some("2s".into());
    let proxy = start_proxy(settings(options, Some(standin.refresh_token()))).await;
    let response = client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"], "token_unavailable");
    assert!(
        standin.recorded_requests().is_empty(),
        "a request went upstream without a token"
    );
    // The hanging endpoint is given up on and retried.
    wait_for("a second token request", || async {
        standin.token_requests() >= 2
    })
    .await;
    standin.set_standing_fault(None);
    proxy.wait_ready().await;
}

#[tokio::test]
async fn a_rejected_refresh_token_means_503_at_once_until_a_new_one_is_stored() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut options = options_for(&standin, dir.path());
    options.token_wait = Some("60s".into());
    let proxy = start_proxy(settings(options, Some("rt-revoked-long-ago".into()))).await;
    wait_for("the rejection", || async { standin.token_requests() >= 1 }).await;
    // With a 60 s token wait, only an immediate answer fits in the bound.
    let response = tokio::time::timeout(PATIENCE, client().get(proxy.url("/x")).send())
        .await
        .expect("a rejected proxy answers at once")
        .unwrap();
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"], "token_unavailable");
    assert!(
        error["message"].as_str().unwrap().contains("login"),
        "{error}"
    );
    let ready = client()
        .get(proxy.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert!(standin.recorded_requests().is_empty());

    // An operator stores a good refresh token (as `login` would): the running proxy takes it.
    FileStore::new(dir.path().join("state.json"))
        .save_blocking(&goto_auth_proxy::store::PersistedState {
            refresh_token: Some(standin.refresh_token().into()),
            ..Default::default()
        })
        .unwrap();
    proxy.wait_ready().await;
    assert_eq!(status_of(proxy.url("/x")).await, 200);
}

#[tokio::test]
async fn a_personal_access_token_is_used_instead_of_a_refresh_token() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pat = standin.pat();
    let env = move |name: &str| match name {
        "GOTO_CLIENT_SECRET" => Some(goto_auth_proxy::standin::CLIENT_SECRET.to_owned()),
        "GOTO_PAT" => Some(pat.clone()),
        _ => None,
    };
    let proxy = start_proxy(options_for(&standin, dir.path()).resolve(&env).unwrap()).await;
    proxy.wait_ready().await;
    assert_eq!(status_of(proxy.url("/x")).await, 200);
    assert!(
        !dir.path().join("state.json").exists(),
        "a PAT has nothing to persist"
    );
}

#[tokio::test]
async fn a_state_file_that_cannot_be_written_is_loud_and_the_proxy_keeps_serving() {
    let mut options = StandInOptions::default();
    options.shape.rotate_every = 1;
    let standin = StandIn::start(options).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let mut options = options_for(&standin, dir.path());
    options.state_file = Some(state_dir.join("state.json"));
    let proxy = start_proxy(settings(options, Some(standin.refresh_token()))).await;
    proxy.wait_ready().await;
    assert_eq!(
        proxy.metric("goto_proxy_state_write_failures_total").await,
        Some(0.0)
    );

    // The state directory turns into a regular file: every write fails from now
    // on, even for root, which permission bits would not stop.
    std::fs::remove_dir_all(&state_dir).unwrap();
    std::fs::write(&state_dir, b"").unwrap();
    standin.revoke_access_tokens();
    assert_eq!(status_of(proxy.url("/x")).await, 200);
    assert!(
        proxy
            .metric("goto_proxy_state_write_failures_total")
            .await
            .unwrap()
            >= 1.0
    );
    // The write is retried, not dropped, and the proxy keeps serving meanwhile.
    wait_for("a retried write", || async {
        proxy
            .metric("goto_proxy_state_write_failures_total")
            .await
            .unwrap()
            >= 2.0
    })
    .await;
    assert_eq!(status_of(proxy.url("/x")).await, 200);

    // Once the disk is back, the rotated token lands.
    std::fs::remove_file(&state_dir).unwrap();
    wait_for("the retried write to succeed", || async {
        FileStore::new(state_dir.join("state.json"))
            .load_blocking()
            .ok()
            .flatten()
            .and_then(|s| s.refresh_token)
            .is_some_and(|t| t.expose_secret() == standin.refresh_token())
    })
    .await;
}

#[tokio::test]
async fn a_refresh_token_revoked_while_running_turns_the_proxy_unready() {
    let s = setup(StandInOptions::default(), |o| {
        o.token_wait = Some("60s".into())
    })
    .await;
    s.standin.revoke_refresh_token();
    s.standin.revoke_access_tokens();
    // The refusal's refresh is rejected: the request learns it at once, not after 60 s.
    let response = tokio::time::timeout(PATIENCE, client().get(s.proxy.url("/x")).send())
        .await
        .expect("answered at once")
        .unwrap();
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"], "token_unavailable");
    assert_eq!(
        s.proxy
            .metric("goto_proxy_token_refreshes_total{result=\"rejected\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_refresh_token_sent_back_unchanged_keeps_its_age() {
    let mut options = short_lived(2);
    options.shape.repeat_refresh_token = true;
    let s = setup(options, |_| {}).await;
    let first = FileStore::new(s.dir.path().join("state.json"))
        .load_blocking()
        .unwrap()
        .unwrap();
    wait_for("three more refreshes", || async {
        s.standin.token_requests() >= 4
    })
    .await;
    let later = FileStore::new(s.dir.path().join("state.json"))
        .load_blocking()
        .unwrap()
        .unwrap();
    assert_eq!(
        later.refresh_token.unwrap().expose_secret(),
        first.refresh_token.unwrap().expose_secret()
    );
    assert_eq!(
        later.refresh_token_first_seen, first.refresh_token_first_seen,
        "a repeated refresh token is not a new one: its age must not restart"
    );
}

#[tokio::test]
async fn a_token_revoked_again_after_a_retry_that_worked_is_refreshed_again() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let before = s.standin.token_requests();
    // One client, one request at a time: the retry itself is the only proof
    // that the new token works.
    for round in 1..=3 {
        s.standin.revoke_access_tokens();
        let status = status_of(s.proxy.url("/x")).await;
        assert_eq!(status, 200, "round {round}");
    }
    assert_eq!(s.standin.token_requests() - before, 3);
}
