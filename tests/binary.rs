//! The binary as users run it: settings precedence, `run --check`, exit
//! codes, signals, and what reaches the log at trace level.

mod common;

use common::process::{proxy_command, run_command, Running};
use common::{client, wait_for};
use goto_auth_proxy::standin::{StandIn, StandInOptions, CLIENT_ID, CLIENT_SECRET};

#[test]
fn flags_win_over_env_which_wins_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "file-secret-value\n").unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:1111\"\ntoken_wait = \"7s\"\nrefresh_margin = \"100s\"\n\
             client_id = \"from-file\"\nclient_secret_file = \"{}\"\nstate_file = \"{}\"\n",
            secret.display(),
            dir.path().join("state.json").display()
        ),
    )
    .unwrap();
    let output = proxy_command()
        .args(["run", "--check", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:3333"])
        .env("GOTO_PROXY_LISTEN", "127.0.0.1:2222")
        .env("GOTO_TOKEN_WAIT", "8s")
        .env("GOTO_REFRESH_TOKEN", "env-refresh-token-value")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("listen = 127.0.0.1:3333\n"),
        "flag over env and file:\n{stdout}"
    );
    assert!(
        stdout.contains("token_wait = 8s\n"),
        "env over file:\n{stdout}"
    );
    assert!(
        stdout.contains("refresh_margin = 1m 40s\n"),
        "file over default:\n{stdout}"
    );
    assert!(stdout.contains("client_id = from-file\n"), "{stdout}");
    assert!(
        stdout.contains("admin_listen = 127.0.0.1:9090\n"),
        "default:\n{stdout}"
    );
    assert!(
        stdout.contains("GOTO_REFRESH_TOKEN"),
        "the check names where the token comes from:\n{stdout}"
    );
    assert!(
        !stdout.contains("file-secret-value") && !stdout.contains("env-refresh-token-value"),
        "{stdout}"
    );

    // The config file alone, through GOTO_PROXY_CONFIG.
    let output = proxy_command()
        .args(["run", "--check"])
        .env("GOTO_PROXY_CONFIG", &config)
        .env("GOTO_REFRESH_TOKEN", "x")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("listen = 127.0.0.1:1111\n"));
}

#[test]
fn a_listener_others_can_reach_needs_client_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let check = |extra: &[(&str, &str)]| {
        let mut command = proxy_command();
        command
            .args([
                "run",
                "--check",
                "--listen",
                "0.0.0.0:0",
                "--client-id",
                "x",
            ])
            .env("GOTO_CLIENT_SECRET", "s")
            .env("GOTO_REFRESH_TOKEN", "r")
            .env("GOTO_STATE_FILE", dir.path().join("state.json"));
        for (name, value) in extra {
            command.env(name, value);
        }
        command.output().unwrap()
    };
    let refused = check(&[]);
    assert_eq!(refused.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--allow-remote-clients"), "{stderr}");
    assert!(stderr.contains("--client-key-file"), "{stderr}");
    for allowed in [
        [("GOTO_PROXY_CLIENT_KEY", "k")],
        [("GOTO_PROXY_ALLOW_REMOTE_CLIENTS", "true")],
    ] {
        let output = check(&allowed);
        assert!(output.status.success(), "{allowed:?}: {output:?}");
    }
}

#[test]
fn forward_mode_without_its_ca_exits_64_naming_ca_init() {
    let dir = tempfile::tempdir().unwrap();
    let output = proxy_command()
        .args(["run", "--check", "--forward", "--client-id", "x"])
        .env("GOTO_CLIENT_SECRET", "s")
        .env("GOTO_REFRESH_TOKEN", "r")
        .env("GOTO_STATE_FILE", dir.path().join("state.json"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("goto-auth-proxy ca init"), "{stderr}");
    assert!(
        stderr.contains(&dir.path().join("ca.pem").display().to_string()),
        "{stderr}"
    );
}

#[test]
fn bad_settings_exit_64_naming_the_setting() {
    let output = proxy_command()
        .args(["run", "--check", "--listen", "nonsense", "--client-id", "x"])
        .env("GOTO_CLIENT_SECRET", "s")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--listen"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let output = proxy_command()
        .args(["run", "--check", "--client-id", "x"])
        .env("GOTO_CLIENT_SECRET", "s")
        .env("GOTO_STATE_FILE", dir.path().join("none.json"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("goto-auth-proxy login"),
        "says what to do next: {stderr}"
    );
}

#[tokio::test]
async fn trace_logs_hold_no_secret() {
    // TLS and HTTP/2 upstream, so rustls and h2 log too.
    let mut options = StandInOptions {
        tls: Some((
            std::fs::read(common::cert_path("localhost.pem")).unwrap(),
            std::fs::read(common::cert_path("localhost.key")).unwrap(),
        )),
        ..StandInOptions::default()
    };
    options.shape.rotate_every = 1;
    let standin = StandIn::start(options).await.unwrap();
    let bootstrap = standin.refresh_token();
    let dir = tempfile::tempdir().unwrap();
    let mut command = run_command(&standin, dir.path(), &bootstrap);
    command
        .env("RUST_LOG", "trace")
        .env("GOTO_UPSTREAM_CA_FILE", common::cert_path("test-ca.pem"));
    let running = Running::spawn(command);
    let listen = running.logged_value("listen").await;
    let mut refresh_tokens = vec![bootstrap];
    wait_for("the first token", || async {
        !standin.issued_access_tokens().is_empty()
    })
    .await;
    refresh_tokens.push(standin.refresh_token());

    let url = format!("http://{listen}/G2M/rest/meetings");
    assert_eq!(
        client()
            .get(&url)
            .bearer_auth("client-own-token-xyz")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    standin.revoke_access_tokens();
    let h2c = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    assert_eq!(
        h2c.get(&url)
            .bearer_auth("client-own-token-xyz")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    refresh_tokens.push(standin.refresh_token());
    let log = running.stop().await;
    assert!(log.contains(" TRACE "), "trace logging was not on:\n{log}");
    assert!(
        log.contains("h2::"),
        "the HTTP/2 layers did not log:\n{log}"
    );
    let basic = base64_basic(CLIENT_ID, CLIENT_SECRET);
    let mut secrets: Vec<String> = vec![
        CLIENT_SECRET.to_owned(),
        basic,
        "client-own-token-xyz".to_owned(),
    ];
    secrets.extend(refresh_tokens);
    secrets.extend(standin.issued_access_tokens());
    assert_no_secret(&log, &secrets);
}

/// Fails if any 24-character piece of a secret is in `log` (tokens are
/// long: a piece is as much a leak as the whole).
fn assert_no_secret(log: &str, secrets: &[String]) {
    for secret in secrets {
        let piece = &secret[..secret.len().min(24)];
        assert!(!log.contains(piece), "a secret reached the log: {piece}");
    }
}

#[tokio::test]
async fn trace_logs_hold_no_secret_in_forward_mode() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::pki::Pki::server(dir.path(), "goto", &["api.getgo.com", "localhost"]);
    let standin = StandIn::start(StandInOptions {
        tls: Some(pki.tls()),
        ..StandInOptions::default()
    })
    .await
    .unwrap();
    let init = proxy_command()
        .args(["ca", "init", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let api_port = standin.api_url().rsplit(':').next().unwrap().to_owned();
    let bootstrap = standin.refresh_token();
    let mut command = run_command(&standin, dir.path(), &bootstrap);
    command
        .env("RUST_LOG", "trace")
        .env("GOTO_UPSTREAM_CA_FILE", &pki.ca)
        .env("GOTO_PROXY_FORWARD", "true")
        .env("GOTO_PROXY_CLIENT_KEY", "the-clients-key-for-the-proxy")
        .env(
            "GOTO_CONNECT_TO",
            format!("api.getgo.com:443:127.0.0.1:{api_port}"),
        );
    let running = Running::spawn(command);
    let listen = running.logged_value("listen").await;
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .proxy(
            reqwest::Proxy::all(format!(
                "http://user:the-clients-key-for-the-proxy@{listen}"
            ))
            .unwrap(),
        )
        .build()
        .unwrap();
    for _ in 0..2 {
        let response = client
            .get("https://api.getgo.com/G2M/rest/meetings")
            .bearer_auth("client-own-token-xyz")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        standin.revoke_access_tokens();
    }
    let log = running.stop().await;
    assert!(log.contains(" TRACE "), "trace logging was not on:\n{log}");
    assert!(
        log.contains("rustls::"),
        "the TLS layers did not log:\n{log}"
    );
    let ca_key = std::fs::read_to_string(dir.path().join("ca-key.pem")).unwrap();
    let ca_key_body: String = ca_key
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let mut secrets = vec![
        CLIENT_SECRET.to_owned(),
        "the-clients-key-for-the-proxy".to_owned(),
        base64_basic("user", "the-clients-key-for-the-proxy"),
        "client-own-token-xyz".to_owned(),
        bootstrap,
        standin.refresh_token(),
        ca_key_body,
    ];
    secrets.extend(standin.issued_access_tokens());
    assert_no_secret(&log, &secrets);
}

fn base64_basic(id: &str, secret: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_and_exits_0() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let running = Running::spawn(run_command(&standin, dir.path(), &standin.refresh_token()));
    let listen = running.logged_value("listen").await;
    let admin = running.logged_value("admin").await;
    common::wait_ready_at(&admin).await;
    let in_flight = tokio::spawn(client().get(format!("http://{listen}/sleep/2000")).send());
    wait_for("the request to reach the API", || async {
        !standin.recorded_requests().is_empty()
    })
    .await;
    running.signal("TERM");
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200, "the request in flight was cut off");
    let mut running = running;
    assert_eq!(running.wait_exit().await.code(), Some(0));
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(&listen).await.is_err());
    assert!(running.log_text().contains("shutting down"));
}

#[tokio::test]
async fn the_drain_is_bounded_by_the_drain_timeout() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut command = run_command(&standin, dir.path(), &standin.refresh_token());
    command.args(["--drain-timeout", "1s"]);
    let running = Running::spawn(command);
    let listen = running.logged_value("listen").await;
    // This request would take ten minutes; the drain gives it one second.
    let stuck = tokio::spawn(client().get(format!("http://{listen}/sleep/600000")).send());
    wait_for("the request to reach the API", || async {
        !standin.recorded_requests().is_empty()
    })
    .await;
    running.signal("INT");
    let mut running = running;
    assert_eq!(running.wait_exit().await.code(), Some(0));
    assert!(
        running.log_text().contains("drain timeout reached"),
        "{}",
        running.log_text()
    );
    stuck.abort();
}

#[tokio::test]
async fn the_demo_answers_through_the_proxy_and_stops_on_ctrl_c() {
    let started = std::time::Instant::now();
    let mut command = proxy_command();
    command.args([
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    let running = Running::spawn(command);
    let mut curl_url = None;
    wait_for("the curl line", || {
        curl_url = running.log.lock().unwrap().iter().find_map(|line| {
            let url = line.trim().strip_prefix("curl -s ")?;
            url.contains("/G2M/").then(|| url.to_owned())
        });
        std::future::ready(curl_url.is_some())
    })
    .await;
    let response = client().get(curl_url.unwrap()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.unwrap();
    eprintln!(
        "demo: first proxied answer {:?} after start",
        started.elapsed()
    );
    assert_eq!(echo["headers"]["authorization"], "Bearer [access token #1]");
    running.signal("INT");
    let mut running = running;
    assert_eq!(running.wait_exit().await.code(), Some(0));
    let log = running.log_text();
    assert!(log.contains("access token obtained"), "{log}");
}

fn write_state(path: &std::path::Path, refresh_token: &str, days_old: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    goto_auth_proxy::store::FileStore::new(path)
        .save_blocking(&goto_auth_proxy::store::PersistedState {
            refresh_token: Some(refresh_token.into()),
            refresh_token_first_seen: Some(now - days_old * 86_400),
            principal: Some("ann@example.com".into()),
            access_token: None,
            access_token_expires_at: Some(
                std::time::SystemTime::now() + std::time::Duration::from_secs(1200),
            ),
            updated_at: now,
        })
        .unwrap();
}

#[test]
fn status_lists_every_account_and_exits_by_the_worst() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "client_id = \"top\"\nstate_file = \"{}\"\n\n[accounts.eu]\nclient_id = \"eu\"\n",
            dir.path().join("state.json").display()
        ),
    )
    .unwrap();
    write_state(
        &dir.path().join("state.json"),
        "rt-default-must-not-show",
        1,
    );
    let status = || {
        let output = proxy_command()
            .args(["status", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            output.status.code(),
        )
    };
    let (text, code) = status();
    assert_eq!(code, Some(1), "the eu account has no state yet:\n{text}");
    assert!(text.contains("account:        default"), "{text}");
    assert!(text.contains("account:        eu"), "{text}");
    assert!(text.contains("state-eu.json"), "{text}");
    write_state(&dir.path().join("state-eu.json"), "rt-eu-must-not-show", 1);
    let (text, code) = status();
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("must-not-show"), "{text}");
}

#[test]
fn status_reports_the_state_without_secrets_and_exits_by_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let status = |args: &[&str]| {
        let output = proxy_command().arg("status").args(args).output().unwrap();
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            output.status.code(),
        )
    };
    let (text, code) = status(&["--state-file", path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("login"), "{text}");

    write_state(&path, "rt-must-not-show", 2);
    let (text, code) = status(&["--state-file", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("ann@example.com") && text.contains("expires"),
        "{text}"
    );
    assert!(!text.contains("rt-must-not-show"), "{text}");

    // The same file found through a config file, as `run` would.
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, format!("state_file = \"{}\"\n", path.display())).unwrap();
    let (text, code) = status(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");

    write_state(&path, "rt-must-not-show", 26);
    let (text, code) = status(&["--state-file", path.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("WARNING") && !text.contains("rt-must-not-show"),
        "{text}"
    );
}

#[tokio::test]
async fn an_old_refresh_token_is_warned_about_in_the_log() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_state(&dir.path().join("state.json"), &standin.refresh_token(), 26);
    let running = Running::spawn(run_command(&standin, dir.path(), "rt-bootstrap-unused"));
    wait_for("the age warning", || {
        std::future::ready(running.log_text().contains("has not rotated for 26 days"))
    })
    .await;
}

#[test]
fn bench_reports_the_added_latency_and_plots_both_distributions() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("latency.svg");
    let output = proxy_command()
        .args(["bench", "--requests", "300", "--concurrency", "4", "--plot"])
        .arg(&plot)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for row in ["direct", "proxy", "added"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(row) && l.contains("ms")),
            "no {row} row:\n{stdout}"
        );
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
}

#[test]
fn bench_forward_compares_intercepted_requests_with_reverse_mode() {
    let output = proxy_command()
        .args([
            "bench",
            "--forward",
            "--requests",
            "200",
            "--concurrency",
            "2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("over TLS"), "{stdout}");
    for row in ["reverse", "intercepted", "added"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(row) && l.contains("ms")),
            "no {row} row:\n{stdout}"
        );
    }
    // The intercepted host is named as a GoTo API host: shaped to GoTo's 10
    // requests per second, two connections would wait about 200 ms a request.
    let intercepted_p50: f64 = stdout
        .lines()
        .find(|l| l.starts_with("intercepted"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p50| p50.strip_suffix("ms"))
        .and_then(|p50| p50.parse().ok())
        .unwrap_or_else(|| panic!("no p50 in:\n{stdout}"));
    assert!(
        intercepted_p50 < 100.0,
        "intercepted requests were rate-shaped:\n{stdout}"
    );
}

#[test]
fn status_warns_of_a_state_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    write_state(&path, "rt-status-secret", 1);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = proxy_command()
        .args(["status", "--state-file"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("can be read by other users"), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("rt-status-secret") && !stderr.contains("rt-status-secret"));
}

#[test]
fn a_path_that_is_not_utf8_exits_64_naming_the_setting() {
    use std::os::unix::ffi::OsStrExt;
    let odd = std::ffi::OsStr::from_bytes(b"/tmp/\xff\xfe/state.json");
    let output = proxy_command()
        .args(["run", "--check", "--client-id", "x", "--state-file"])
        .arg(odd)
        .env("GOTO_CLIENT_SECRET", "s")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--state-file"), "{stderr}");
    assert!(stderr.contains("UTF-8"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_duration_that_would_overflow_exits_64() {
    for (flag, value) in [
        ("--refresh-margin", "10000000000000000000s"),
        ("--drain-timeout", "600000years"),
    ] {
        let output = proxy_command()
            .args(["run", "--check", "--client-id", "x", flag, value])
            .env("GOTO_CLIENT_SECRET", "s")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{flag}: {stderr}");
        assert!(stderr.contains(flag), "{stderr}");
    }
}

#[tokio::test]
async fn the_access_log_has_a_line_per_request_and_no_secret_or_query() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = standin.refresh_token();
    let mut command = run_command(&standin, dir.path(), &bootstrap);
    command.args(["--log-format", "json"]);
    let running = Running::spawn(command);
    let listen = running.logged_json_value("listen").await;
    let given = client()
        .get(format!(
            "http://{listen}/G2M/rest/meetings?email=ann%40example.com"
        ))
        .header("x-request-id", "trace-me-42")
        .bearer_auth("client-own-token-xyz")
        .send()
        .await
        .unwrap();
    assert_eq!(given.status(), 200);
    assert_eq!(given.headers()["x-request-id"], "trace-me-42");
    let body = given.text().await.unwrap();
    let made = client()
        .post(format!("http://{listen}/upload"))
        .body("twelve bytes")
        .send()
        .await
        .unwrap();
    let made_id = made.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(made_id.len(), 16);
    assert_eq!(made.text().await.unwrap(), "twelve bytes");
    // The upstream saw the same id.
    let recorded = standin.recorded_requests();
    assert_eq!(recorded[0].headers["x-request-id"], "trace-me-42");
    let lines = || -> Vec<serde_json::Value> {
        running
            .log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["target"] == "access")
            .collect()
    };
    wait_for("two access lines", || {
        std::future::ready(lines().len() >= 2)
    })
    .await;
    let lines = lines();
    let first = lines
        .iter()
        .find(|l| l["request_id"] == "trace-me-42")
        .expect("the line of the first request");
    assert_eq!(first["account"], "default");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/G2M/rest/meetings");
    assert_eq!(first["status"], 200);
    assert_eq!(first["retried"], false);
    assert_eq!(first["complete"], true);
    assert_eq!(first["bytes_out"], body.len());
    assert!(first["upstream_ms"].as_f64().unwrap() > 0.0, "{first}");
    let second = lines
        .iter()
        .find(|l| l["request_id"] == made_id.as_str())
        .expect("the line of the second request");
    assert_eq!(second["method"], "POST");
    assert_eq!(second["bytes_in"], 12);
    assert_eq!(second["bytes_out"], 12);
    let log = running.stop().await;
    for id in ["trace-me-42", made_id.as_str()] {
        let written = log
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["target"] == "access" && line["request_id"] == id)
            .count();
        assert_eq!(written, 1, "one line for request {id}:\n{log}");
    }
    assert!(
        !log.contains("ann%40example.com") && !log.contains("email="),
        "{log}"
    );
    let mut secrets = vec![
        CLIENT_SECRET.to_owned(),
        "client-own-token-xyz".to_owned(),
        bootstrap,
    ];
    secrets.extend(standin.issued_access_tokens());
    assert_no_secret(&log, &secrets);
}

#[tokio::test]
async fn the_access_log_can_be_turned_off() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut command = run_command(&standin, dir.path(), &standin.refresh_token());
    command.args(["--log-format", "json", "--access-log", "false"]);
    let running = Running::spawn(command);
    let listen = running.logged_json_value("listen").await;
    let response = client()
        .get(format!("http://{listen}/G2M/rest/meetings"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let log = running.stop().await;
    assert!(!log.contains("\"target\":\"access\""));
}

/// With access lines filtered out (`RUST_LOG=warn`) none is made, and the
/// request id still goes upstream and back.
#[tokio::test]
async fn filtered_access_lines_keep_the_request_id() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut command = run_command(&standin, dir.path(), &standin.refresh_token());
    command
        .args(["--log-format", "json"])
        .env("RUST_LOG", "warn,goto_auth_proxy::app=info");
    let running = Running::spawn(command);
    let listen = running.logged_json_value("listen").await;
    let response = client()
        .get(format!("http://{listen}/G2M/rest/meetings"))
        .header("x-request-id", "kept-when-filtered")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "kept-when-filtered");
    assert_eq!(
        standin.recorded_requests()[0].headers["x-request-id"],
        "kept-when-filtered"
    );
    let log = running.stop().await;
    assert!(!log.contains("\"target\":\"access\""), "{log}");
}

#[tokio::test]
async fn a_request_whose_client_leaves_is_logged_as_499() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut command = run_command(&standin, dir.path(), &standin.refresh_token());
    command.args(["--log-format", "json"]);
    let running = Running::spawn(command);
    let listen = running.logged_json_value("listen").await;
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_millis(300))
        .build()
        .unwrap();
    let gone = impatient
        .get(format!("http://{listen}/sleep/3000"))
        .header("x-request-id", "left-early")
        .send()
        .await;
    assert!(gone.is_err());
    wait_for("the line of the abandoned request", || {
        let found = running.log.lock().unwrap().iter().any(|line| {
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|l| {
                l["target"] == "access" && l["request_id"] == "left-early" && l["status"] == 499
            })
        });
        std::future::ready(found)
    })
    .await;
    running.stop().await;
}

/// Connections are served on one thread per core the process may use: run
/// on one CPU (`taskset`, as a container's CPU limit of 1 would), it starts
/// one, says so, and serves.
#[tokio::test]
async fn one_worker_thread_per_core_the_process_may_use() {
    let standin = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let command = run_command(&standin, dir.path(), &standin.refresh_token());
    let mut pinned = std::process::Command::new("taskset");
    pinned
        .args(["--cpu-list", "0"])
        .arg(command.get_program())
        .args(command.get_args())
        .env_clear();
    for (name, value) in command.get_envs() {
        if let Some(value) = value {
            pinned.env(name, value);
        }
    }
    let running = Running::spawn(pinned);
    assert_eq!(running.logged_value("worker_threads").await, "1");
    let listen = running.logged_value("listen").await;
    wait_for("an answer through the one worker", || async {
        client()
            .get(format!("http://{listen}/G2M/rest/meetings"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let threads = std::fs::read_dir(format!("/proc/{}/task", running.child.id()))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("proxy-worker"))
        .count();
    assert_eq!(threads, 1);
    running.stop().await;
}
