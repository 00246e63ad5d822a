//! Token rotation under load: steady concurrent traffic while the stand-in
//! issues 2-second tokens, rotates the refresh token every third refresh,
//! fails every fourth token request, and revokes tokens at random moments.
//!
//! Runs 15 s by default; set GOTO_SOAK_SECONDS for a longer run, e.g.
//! `GOTO_SOAK_SECONDS=600 cargo test --release --test soak -- --nocapture`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, setup, wait_for};
use goto_auth_proxy::standin::{GrantShape, StandInOptions};
use goto_auth_proxy::store::FileStore;
use secrecy::ExposeSecret;

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    failed: AtomicU64,
    unauthorized: AtomicU64,
}

fn soak_duration() -> Duration {
    let seconds = std::env::var("GOTO_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    Duration::from_secs(seconds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_revocation_and_failing_refreshes_under_load_lose_no_request() {
    let shape = GrantShape {
        lifetime: Duration::from_secs(2),
        rotate_every: 3,
        fail_every: 4,
        ..GrantShape::default()
    };
    let s = Arc::new(
        setup(
            StandInOptions {
                shape,
                ..StandInOptions::default()
            },
            |o| o.token_wait = Some("20s".into()),
        )
        .await,
    );
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));

    let workers: Vec<_> = (0..8)
        .map(|worker| {
            let (s, tally, stop) = (s.clone(), tally.clone(), stop.clone());
            tokio::spawn(async move {
                let client = client();
                let mut turn = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    turn += 1;
                    let request = if (worker + turn).is_multiple_of(2) {
                        client.get(s.proxy.url(&format!("/G2M/rest/meetings/{turn}")))
                    } else {
                        client
                            .post(s.proxy.url("/G2W/rest/v2/webinars"))
                            .body(format!("{{\"n\":{turn}}}"))
                    };
                    tally.sent.fetch_add(1, Ordering::Relaxed);
                    match request.send().await.map(|r| r.status().as_u16()) {
                        Ok(200) => {}
                        Ok(401) => {
                            tally.unauthorized.fetch_add(1, Ordering::Relaxed);
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            if tally.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("failed: {other:?}");
                            }
                        }
                    }
                }
            })
        })
        .collect();

    // Revocations at random moments. Only tokens older than 600 ms go, so the
    // token a retry carries (moments old) is never the one revoked.
    let revoker = {
        let (s, stop) = (s.clone(), stop.clone());
        tokio::spawn(async move {
            let mut revocations = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(300 + fastrand::u64(0..900))).await;
                s.standin
                    .revoke_access_tokens_older_than(Duration::from_millis(600));
                revocations += 1;
            }
            revocations
        })
    };

    let started = Instant::now();
    let duration = soak_duration();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let revocations = revoker.await.unwrap();
    let elapsed = started.elapsed();

    let sent = tally.sent.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let unauthorized = tally.unauthorized.load(Ordering::Relaxed);
    let token_requests = s.standin.token_requests();
    let rotations = s.standin.refresh_token_history().len() - 1;
    let refusals = s.standin.api_refusals();
    let retries = s
        .proxy
        .metric("goto_proxy_auth_retries_total")
        .await
        .unwrap_or(0.0);
    eprintln!(
        "soak {elapsed:.1?}: {sent} requests sent, {failed} failed, {unauthorized} 401s reached a client; \
         {token_requests} token requests ({rotations} rotations, every 4th failed on purpose); \
         {revocations} revocations, {refusals} refusals upstream, {retries} retries"
    );
    assert!(sent > 100, "too little traffic to mean anything: {sent}");
    assert_eq!(failed, 0, "requests failed");
    assert_eq!(unauthorized, 0, "401s reached clients");
    assert!(
        rotations >= 2,
        "too few rotations to mean anything: {rotations}"
    );
    assert!(
        refusals >= 1,
        "no revocation hit a request; the soak tested nothing of 401s"
    );
    // The newest refresh token is on disk (after the last refresh's write).
    let state_file = s.dir.path().join("state.json");
    wait_for("the newest refresh token on disk", || {
        let stored = FileStore::new(&state_file)
            .load_blocking()
            .ok()
            .flatten()
            .and_then(|st| st.refresh_token);
        std::future::ready(stored.is_some_and(|t| {
            Some(t.expose_secret().to_owned()) == s.standin.refresh_token_history().last().cloned()
        }))
    })
    .await;
}
