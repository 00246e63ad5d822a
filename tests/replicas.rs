//! Several proxies (replicas) sharing one GoTo account's token state
//! through a real `redis-server`, in front of one stand-in GoTo.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::redis::RedisProcess;
use common::{
    client, metric_at, options_for, settings, start_proxy, wait_for, wait_ready_at, Proxy, PATIENCE,
};
use goto_auth_proxy::config::StoreUrl;
use goto_auth_proxy::standin::{Fault, GrantShape, StandIn, StandInOptions};
use redis::AsyncCommands as _;
use tokio::time::Instant;

/// Proxies sharing one Redis store, each with its own state file.
struct Replicas {
    proxies: Vec<Proxy>,
    _dirs: Vec<tempfile::TempDir>,
}

async fn start_replicas(standin: &StandIn, redis: &RedisProcess, count: usize) -> Replicas {
    let mut proxies = Vec::with_capacity(count);
    let mut dirs = Vec::with_capacity(count);
    for _ in 0..count {
        let dir = tempfile::tempdir().unwrap();
        let mut options = options_for(standin, dir.path());
        options.store = Some(StoreUrl(redis.url()));
        proxies.push(start_proxy(settings(options, Some(standin.refresh_token()))).await);
        dirs.push(dir);
    }
    for proxy in &proxies {
        proxy.wait_ready().await;
    }
    Replicas {
        proxies,
        _dirs: dirs,
    }
}

fn standin_with(lifetime: Duration, rotate_every: u64) -> StandInOptions {
    StandInOptions {
        shape: GrantShape {
            lifetime,
            rotate_every,
            ..GrantShape::default()
        },
        ..StandInOptions::default()
    }
}

/// One request a client sent through a replica.
#[derive(Clone, Copy, Debug)]
struct Seen {
    replica: usize,
    sent_at: Instant,
    status: u16,
    token_number: Option<u64>,
}

/// Sends a request through every replica every 50 ms for `duration`.
async fn clients_on_all(replicas: &Replicas, duration: Duration) -> Vec<Seen> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for (replica, proxy) in replicas.proxies.iter().enumerate() {
        let url = proxy.url("/rest/echo");
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let sent_at = Instant::now();
                let (status, token_number) = presented(&url).await;
                seen.lock().unwrap().push(Seen {
                    replica,
                    sent_at,
                    status,
                    token_number,
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    Arc::try_unwrap(seen).unwrap().into_inner().unwrap()
}

fn failures(seen: &[Seen]) -> Vec<Seen> {
    seen.iter().filter(|s| s.status != 200).copied().collect()
}

/// For each access token issued between `from` and `until`, how long until
/// every replica's requests carried it (or a newer one).
fn propagation(
    standin: &StandIn,
    seen: &[Seen],
    replicas: usize,
    from: Instant,
    until: Instant,
) -> Vec<Duration> {
    let issued = standin.token_issue_times();
    let mut delays = Vec::new();
    for (index, issued_at) in issued.iter().enumerate() {
        let issued_at = Instant::from_std(*issued_at);
        if issued_at < from || issued_at > until {
            continue;
        }
        let number = index as u64 + 1;
        let reached: Option<Vec<Instant>> = (0..replicas)
            .map(|replica| {
                seen.iter()
                    .filter(|s| s.replica == replica && s.token_number >= Some(number))
                    .map(|s| s.sent_at)
                    .min()
            })
            .collect();
        let reached =
            reached.unwrap_or_else(|| panic!("token #{number} never reached every replica"));
        let last = reached.into_iter().max().unwrap();
        delays.push(last.saturating_duration_since(issued_at));
    }
    delays
}

/// The status and the number of the token with which a request through
/// `url` (a replica's `/rest/echo`) reached the API.
async fn presented(url: &str) -> (u16, Option<u64>) {
    match client().get(url).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            (status, body["token_number"].as_u64())
        }
        Err(_) => (0, None),
    }
}

async fn stored_refresh_token(redis: &RedisProcess) -> Option<String> {
    let mut connection = redis.connection().await;
    let keys: Vec<String> = connection.keys("goto-auth-proxy:*:state").await.unwrap();
    let data: String = connection.hget(keys.first()?, "data").await.ok()?;
    let record: serde_json::Value = serde_json::from_str(&data).unwrap();
    record["secrets"]["refresh_token"]
        .as_str()
        .map(str::to_owned)
}

/// One run of `count` replicas on 2-second tokens rotating every third
/// refresh: returns (token requests per refresh cycle, propagation delays).
async fn measure(redis: &RedisProcess, count: usize) -> (f64, Vec<Duration>) {
    let lifetime = Duration::from_secs(2);
    let standin = StandIn::start(standin_with(lifetime, 3)).await.unwrap();
    let replicas = start_replicas(&standin, redis, count).await;
    assert_eq!(
        standin.token_requests(),
        1,
        "{count} replicas starting together make one token request"
    );
    let before = standin.token_requests();
    let started = Instant::now();
    let seen = clients_on_all(&replicas, Duration::from_secs(10)).await;
    let elapsed = started.elapsed();
    let requests = standin.token_requests() - before;
    assert!(
        failures(&seen).is_empty(),
        "{count} replicas: failed requests {:?}",
        failures(&seen)
    );
    // A refresh is due at half the lifetime: one cycle a second.
    let cycles = elapsed.as_secs_f64() / (lifetime.as_secs_f64() / 2.0);
    let per_cycle = requests as f64 / cycles;
    assert!(
        requests as f64 <= cycles + 2.0,
        "{count} replicas made {requests} token requests in {cycles:.1} cycles"
    );
    assert!(
        requests as f64 >= cycles / 2.0,
        "the tokens were refreshed: {requests} requests in {cycles:.1} cycles"
    );
    let delays = propagation(
        &standin,
        &seen,
        count,
        started,
        started + elapsed.saturating_sub(Duration::from_millis(1500)),
    );
    assert!(!delays.is_empty());
    // No rotation was lost: Redis holds the refresh token the endpoint takes now.
    assert_eq!(
        stored_refresh_token(redis).await.as_deref(),
        Some(standin.refresh_token().as_str())
    );
    for proxy in replicas.proxies {
        proxy.stop().await.unwrap();
    }
    let _: () = redis.connection().await.flushdb().await.unwrap();
    (per_cycle, delays)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_make_one_token_request_per_refresh_cycle_and_share_each_token_within_a_second() {
    let Some(redis) = RedisProcess::start().await else {
        return;
    };
    for count in [1, 3, 10] {
        let (per_cycle, mut delays) = measure(&redis, count).await;
        delays.sort();
        let worst = *delays.last().unwrap();
        let median = delays[delays.len() / 2];
        // The figures of the README and the closing note.
        eprintln!(
            "replicas={count} token_requests_per_refresh_cycle={per_cycle:.2} \
             new_token_reaches_every_replica_median_ms={} max_ms={} (requests every 50 ms)",
            median.as_millis(),
            worst.as_millis()
        );
        assert!(
            worst < Duration::from_secs(1),
            "{count} replicas: a new token took {worst:?} to reach them all"
        );
    }
}

#[tokio::test]
async fn a_401_on_one_replica_makes_one_refresh_for_all() {
    let Some(redis) = RedisProcess::start().await else {
        return;
    };
    let standin = StandIn::start(standin_with(Duration::from_secs(600), 0))
        .await
        .unwrap();
    let replicas = start_replicas(&standin, &redis, 3).await;
    assert_eq!(standin.token_requests(), 1);
    standin.revoke_access_tokens();
    let http = client();
    let first = http
        .get(replicas.proxies[0].url("/rest/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(standin.token_requests(), 2, "one refresh after the 401");
    for proxy in &replicas.proxies[1..] {
        let response = http.get(proxy.url("/rest/echo")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(
        standin.token_requests(),
        2,
        "the other replicas use the new token without a request of their own"
    );
}

/// Kills Redis just after a shared refresh, for long enough that every
/// replica's 6-second token nears expiry, then starts it again; returns the
/// token requests made meanwhile.
async fn redis_outage(standin: &StandIn, redis: &mut RedisProcess) -> u64 {
    let requests = standin.token_requests();
    wait_for("a shared refresh", || {
        std::future::ready(standin.token_requests() > requests)
    })
    .await;
    let during = standin.token_requests();
    redis.kill();
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let alone = standin.token_requests() - during;
    redis.restart().await;
    alone
}

/// Waits until Redis holds the refresh token the endpoint issued last and
/// every replica presents one access token; then checks that refreshing
/// goes on from there without a failed request.
async fn assert_converged(standin: &StandIn, redis: &RedisProcess, replicas: &Replicas) {
    wait_for("Redis to hold the newest refresh token", || async {
        stored_refresh_token(redis).await.as_deref() == Some(standin.refresh_token().as_str())
    })
    .await;
    wait_for("every replica to present the same token", || async {
        let mut numbers = Vec::new();
        for proxy in &replicas.proxies {
            numbers.push(presented(&proxy.url("/rest/echo")).await);
        }
        numbers
            .iter()
            .all(|n| n.0 == 200 && n.1.is_some() && n.1 == numbers[0].1)
    })
    .await;
    let before = standin.token_requests();
    let seen = clients_on_all(replicas, Duration::from_secs(7)).await;
    assert!(failures(&seen).is_empty(), "{:?}", failures(&seen));
    assert!(standin.token_requests() > before);
}

/// The sum of `name` over every replica.
async fn summed(replicas: &Replicas, name: &str) -> f64 {
    let mut sum = 0.0;
    for proxy in &replicas.proxies {
        sum += proxy.metric(name).await.unwrap_or(0.0);
    }
    sum
}

fn six_second_tokens(rotate_every: u64, accept_every_issued: bool) -> StandInOptions {
    StandInOptions {
        shape: GrantShape {
            lifetime: Duration::from_secs(6),
            rotate_every,
            accept_every_issued_refresh_token: accept_every_issued,
            ..GrantShape::default()
        },
        ..StandInOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_through_a_redis_outage_and_converge_when_it_returns() {
    let Some(mut redis) = RedisProcess::start().await else {
        return;
    };
    // The endpoint rotates every other refresh without revoking what it
    // handed out before, so that replicas refreshing alone (each with the
    // refresh token it holds, in whatever order) all succeed.
    let standin = StandIn::start(six_second_tokens(2, true)).await.unwrap();
    let replicas = start_replicas(&standin, &redis, 3).await;
    let (seen, alone) = tokio::join!(
        clients_on_all(&replicas, Duration::from_secs(24)),
        redis_outage(&standin, &mut redis)
    );
    assert!(
        failures(&seen).is_empty(),
        "failed requests {:?}",
        failures(&seen)
    );
    assert!(alone >= 1, "replicas refreshed alone while Redis was away");
    assert!(
        summed(&replicas, "goto_proxy_store_refreshes_alone_total").await >= 1.0,
        "refreshing alone is counted"
    );
    assert!(
        summed(&replicas, "goto_proxy_store_errors_total").await >= 1.0,
        "the outage shows as store errors"
    );
    assert_converged(&standin, &redis, &replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_an_endpoint_that_revokes_on_rotation_replicas_recover_when_redis_returns() {
    let Some(mut redis) = RedisProcess::start().await else {
        return;
    };
    // Every refresh rotates and revokes the token before: of the replicas
    // refreshing alone, the first succeeds and the others are refused
    // (their requests fail once their token runs out, as the README says).
    let standin = StandIn::start(six_second_tokens(1, false)).await.unwrap();
    let replicas = start_replicas(&standin, &redis, 3).await;
    let alone = redis_outage(&standin, &mut redis).await;
    assert!(
        alone >= 2,
        "every replica tried alone: {alone} token requests"
    );
    // Redis is back: the one rotation made alone reaches it, and every
    // replica takes it up again.
    assert_converged(&standin, &redis, &replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_lease_holder_dies_mid_refresh_another_takes_over_and_nothing_is_lost() {
    use common::process::{run_command, Running};
    let Some(redis) = RedisProcess::start().await else {
        return;
    };
    // Every refresh rotates: a rotation lost on the way would show.
    let standin = StandIn::start(standin_with(Duration::from_secs(8), 1))
        .await
        .unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas: Vec<Option<Running>> = dirs
        .iter()
        .map(|dir| {
            let mut command = run_command(&standin, dir.path(), &standin.refresh_token());
            command
                .env("GOTO_STORE", redis.url())
                .env("GOTO_TOKEN_TIMEOUT", "120s");
            Some(Running::spawn(command))
        })
        .collect();
    let mut admins = Vec::new();
    let mut listens = Vec::new();
    for running in replicas.iter().flatten() {
        admins.push(running.logged_value("admin").await);
        listens.push(running.logged_value("listen").await);
    }
    for admin in &admins {
        wait_ready_at(admin).await;
    }
    assert_eq!(
        standin.token_requests(),
        1,
        "replicas starting together make one token request:\n{}",
        replicas
            .iter()
            .flatten()
            .map(Running::log_text)
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
    // The next refresh hangs at the endpoint; its lease holder dies then.
    standin.set_standing_fault(Some(Fault::Hang));
    wait_for("the refresh at half the token's lifetime", || {
        std::future::ready(standin.token_requests() >= 2)
    })
    .await;
    let leader = Mutex::new(None);
    wait_for("the lease holder to show in its metrics", || async {
        for (index, admin) in admins.iter().enumerate() {
            if metric_at(admin, "goto_proxy_store_leader").await == Some(1.0) {
                *leader.lock().unwrap() = Some(index);
                return true;
            }
        }
        false
    })
    .await;
    let leader = leader.into_inner().unwrap().unwrap();
    let mut killed = replicas[leader].take().unwrap();
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    standin.set_standing_fault(None);
    // Once the dead holder's lease runs out (at most 15 s), a survivor
    // refreshes with the stored refresh token, and all survivors serve.
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let deadline = Instant::now() + PATIENCE * 2;
    loop {
        let mut numbers = Vec::new();
        for index in &survivors {
            numbers.push(presented(&format!("http://{}/rest/echo", listens[*index])).await);
        }
        if numbers
            .iter()
            .all(|(status, number)| *status == 200 && *number == Some(2))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no replica took over: {numbers:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        standin.token_issue_times().len(),
        2,
        "one token at start, one from the replica that took over"
    );
    assert_eq!(
        stored_refresh_token(&redis).await.as_deref(),
        Some(standin.refresh_token().as_str()),
        "the rotation of the takeover refresh is stored"
    );
    for running in replicas.into_iter().flatten() {
        running.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_over_tls_and_redis_credentials_never_show() {
    use common::process::{proxy_command, run_command, Running};
    const PASSWORD: &str = "redis-password-that-must-not-show";
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = common::pki::Pki::server(pki_dir.path(), "redis", &["127.0.0.1"]);
    let ca = pki.ca.clone();
    let Some(redis) = RedisProcess::start_tls(PASSWORD, pki).await else {
        return;
    };
    let standin = StandIn::start(standin_with(Duration::from_secs(600), 0))
        .await
        .unwrap();
    let password_file = pki_dir.path().join("redis-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let inline_url = redis
        .url()
        .replace("rediss://", &format!("rediss://:{PASSWORD}@"));
    // One replica with the password in a file, one with it in the URL.
    let stores = [
        (redis.url(), Some(password_file.clone())),
        (inline_url.clone(), None),
    ];
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let command_for = |index: usize, check: bool| {
        let (url, file) = &stores[index];
        let mut command = if check {
            let mut command = proxy_command();
            command
                .args(["run", "--check"])
                .env("GOTO_UPSTREAM", standin.api_url())
                .env("GOTO_TOKEN_URL", standin.token_url())
                .env("GOTO_CLIENT_ID", goto_auth_proxy::standin::CLIENT_ID)
                .env(
                    "GOTO_CLIENT_SECRET",
                    goto_auth_proxy::standin::CLIENT_SECRET,
                )
                .env("GOTO_REFRESH_TOKEN", standin.refresh_token())
                .env("GOTO_STATE_FILE", dirs[index].path().join("state.json"));
            command
        } else {
            run_command(&standin, dirs[index].path(), &standin.refresh_token())
        };
        command
            .env("GOTO_STORE", url)
            .env("GOTO_UPSTREAM_CA_FILE", &ca)
            .env("RUST_LOG", "trace");
        if let Some(file) = file {
            command.env("GOTO_STORE_PASSWORD_FILE", file);
        }
        command
    };
    let first = Running::spawn(command_for(0, false));
    wait_ready_at(&first.logged_value("admin").await).await;
    let second = Running::spawn(command_for(1, false));
    wait_ready_at(&second.logged_value("admin").await).await;
    assert_eq!(
        standin.token_requests(),
        1,
        "the second replica took the first one's token from Redis over TLS"
    );
    for index in 0..2 {
        let output = command_for(index, true).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{text}");
        assert!(text.contains("store = rediss://"), "{text}");
        assert!(
            !text.contains(PASSWORD),
            "run --check shows the password:\n{text}"
        );
    }
    let log = format!("{}\n{}", first.stop().await, second.stop().await);
    assert!(log.contains("rediss://127.0.0.1"), "{log}");
    assert!(
        !log.contains(PASSWORD),
        "the log shows the password:\n{log}"
    );
}
