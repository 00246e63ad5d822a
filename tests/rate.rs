//! Rate shaping against the stand-in: a burst is smoothed to the limit and
//! the excess shed with 429 and Retry-After, APIs have their own buckets,
//! and GoTo's own 429 pauses the bucket (an idempotent request is sent
//! again after the pause, a POST is not).

mod common;

use std::time::{Duration, Instant};

use common::{client, setup};
use goto_auth_proxy::standin::StandInOptions;
use serde_json::Value;

/// The proxy's own 429: `rate_limited` with a whole-second Retry-After.
async fn assert_shed(response: reqwest::Response) {
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
}

#[tokio::test]
async fn a_burst_is_smoothed_to_the_limit_and_the_excess_shed_at_once() {
    const LIMIT: f64 = 10.0;
    const BURST: usize = 10;
    let wait = Duration::from_secs(3);
    let s = setup(StandInOptions::default(), |options| {
        options.rate_limit = Some("10".into());
        options.rate_wait = Some("3s".into());
        options.rate_queue = Some("100".into());
    })
    .await;
    let client = client();
    let started = Instant::now();
    let requests = (0..200).map(|_| {
        let client = client.clone();
        let url = s.proxy.url("/G2M/rest/meetings");
        tokio::spawn(async move {
            let sent = Instant::now();
            let response = client.get(url).send().await.unwrap();
            (response, sent.elapsed())
        })
    });
    let mut served = 0;
    for request in requests.collect::<Vec<_>>() {
        let (response, took) = request.await.unwrap();
        if response.status() == 200 {
            served += 1;
            // Generous: the wait bound plus time for a loaded machine.
            assert!(
                took < wait + Duration::from_secs(5),
                "a request took {took:?}"
            );
        } else {
            assert_shed(response).await;
        }
    }
    let arrived: Vec<Instant> = s
        .standin
        .recorded_requests()
        .iter()
        .map(|r| r.received_at)
        .collect();
    assert_eq!(arrived.len(), served);
    // About the burst plus three seconds' worth; never more than the limit allows.
    assert!(
        served > BURST && served <= BURST + 3 * LIMIT as usize + 2,
        "{served} served"
    );
    for (i, first) in arrived.iter().enumerate() {
        for (j, last) in arrived.iter().enumerate().skip(i + BURST) {
            let window = last.saturating_duration_since(*first).as_secs_f64();
            let allowed = BURST as f64 + LIMIT * window + 1.0;
            assert!(
                (j - i + 1) as f64 <= allowed,
                "{} requests arrived within {window:.3} s",
                j - i + 1
            );
        }
    }
    eprintln!(
        "burst of 200 at 10/s (burst 10, wait 3s): {served} served over {:?}, {} shed",
        started.elapsed(),
        200 - served
    );
    assert_eq!(
        s.proxy.metric("goto_proxy_rate_shed_total").await,
        Some((200 - served) as f64)
    );
    let queued = s
        .proxy
        .metric("goto_proxy_rate_queued_total")
        .await
        .unwrap();
    assert!(queued >= (served - BURST) as f64 - 1.0, "{queued}");
}

#[tokio::test]
async fn each_api_has_a_bucket_of_its_own() {
    let s = setup(StandInOptions::default(), |options| {
        options.rate_limit = Some("1".into());
        options.rate_burst = Some("1".into());
        options.rate_wait = Some("0s".into());
    })
    .await;
    let client = client();
    let (a, b, c) = tokio::join!(
        client.get(s.proxy.url("/G2M/rest/one")).send(),
        client.get(s.proxy.url("/G2M/rest/two")).send(),
        client.get(s.proxy.url("/G2M/rest/three")).send(),
    );
    let statuses: Vec<u16> = [a, b, c]
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    let other_api = client
        .get(s.proxy.url("/G2W/rest/organizers"))
        .send()
        .await
        .unwrap();
    assert_eq!(other_api.status(), 200);
}

#[tokio::test]
async fn gotos_429_pauses_the_bucket_and_only_idempotent_requests_go_again() {
    let s = setup(StandInOptions::default(), |options| {
        options.rate_limit = Some("100".into());
        options.rate_wait = Some("10s".into());
    })
    .await;
    s.standin.throttle_next(1, Some(1));
    let started = Instant::now();
    let get = client()
        .get(s.proxy.url("/G2M/rest/meetings"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    // It waited out the pause GoTo asked for before it went again.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(s.standin.recorded_requests().len(), 2);
    s.standin.throttle_next(1, Some(1));
    let post = client()
        .post(s.proxy.url("/G2M/rest/meetings"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 429, "GoTo's 429 is passed on");
    assert_eq!(s.standin.recorded_requests().len(), 3);
    assert_eq!(
        s.proxy.metric("goto_proxy_upstream_throttled_total").await,
        Some(2.0)
    );
}

#[tokio::test]
async fn shaping_is_off_by_default_for_an_upstream_that_is_not_gotos() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    let client = client();
    let responses = futures_util::future::join_all(
        (0..50).map(|_| client.get(s.proxy.url("/G2M/rest/meetings")).send()),
    )
    .await;
    for response in responses {
        assert_eq!(response.unwrap().status(), 200);
    }
    assert_eq!(
        s.proxy.metric("goto_proxy_rate_shed_total").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn with_shaping_off_gotos_429_is_passed_on_at_once() {
    let s = setup(StandInOptions::default(), |_| {}).await;
    s.standin.throttle_next(1, Some(30));
    let get = client()
        .get(s.proxy.url("/G2M/rest/meetings"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 429);
    assert_eq!(get.headers()["retry-after"], "30");
    assert_eq!(s.standin.recorded_requests().len(), 1);
}
