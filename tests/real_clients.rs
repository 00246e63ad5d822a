//! Forward mode with the clients people actually point at the proxy: curl,
//! Python `requests`, Python's standard library (including 3.13's strict
//! certificate verification) and Node's `https` module, each run as a
//! subprocess with a clean proxy environment.
//!
//! A client that is not installed is skipped with a `skipped:` line on
//! stderr, unless `GOTO_PROXY_REQUIRE_CLIENTS=1` (as in CI) makes its
//! absence a failure. Python 3.13 is required only with
//! `GOTO_PROXY_REQUIRE_PYTHON313=1`, since not every machine has it.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use common::forward::{bearer_of, start, Forward, OTHER_HOST};

/// How long one client run may take on a loaded machine.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The variables through which a client could pick up a proxy or trusted
/// roots from the machine running the tests; each test sets its own.
const INHERITED_SETTINGS: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "NODE_OPTIONS",
];

/// The inject host and path every client asks for.
const GOTO_URL: &str = "https://api.getgo.com/G2M/rest/meetings";

/// The client key of the tests that set one.
const CLIENT_KEY: &str = "k3y-for-clients";

/// Python `requests`: the status on one line, the body after it.
const PYTHON_REQUESTS: &str = r#"
import sys
import requests

response = requests.get(sys.argv[1], timeout=50)
print(response.status_code)
print(response.text)
"#;

/// Python's standard library, with the default context `urlopen` uses;
/// `strict` as the second argument asserts that it verifies strictly.
const PYTHON_URLLIB: &str = r#"
import ssl
import sys
import urllib.request

strict = bool(ssl.create_default_context().verify_flags & ssl.VERIFY_X509_STRICT)
print("python", sys.version.split()[0], "VERIFY_X509_STRICT" if strict else "not strict", file=sys.stderr)
if sys.argv[2] == "strict":
    assert strict, "the default context does not set VERIFY_X509_STRICT"
with urllib.request.urlopen(sys.argv[1], timeout=50) as response:
    print(response.status)
    print(response.read().decode())
"#;

/// Node: a hand-made CONNECT (Node 20's fetch ignores HTTPS_PROXY), then
/// `https.get` over the tunnel, trusting what NODE_EXTRA_CA_CERTS adds.
const NODE_CONNECT: &str = r#"
const http = require('http');
const https = require('https');
const [proxyHost, proxyPort] = process.argv.slice(-2);
const fail = (what) => { console.error(what); process.exit(1); };
const connect = http.request({
  method: 'CONNECT',
  host: proxyHost,
  port: Number(proxyPort),
  path: 'api.getgo.com:443',
  headers: { host: 'api.getgo.com:443' },
});
connect.on('connect', (answer, socket) => {
  if (answer.statusCode !== 200) fail(`CONNECT answered ${answer.statusCode}`);
  https.get({
    host: 'api.getgo.com',
    path: '/G2M/rest/meetings',
    socket,
    agent: false,
    servername: 'api.getgo.com',
  }, (response) => {
    let body = '';
    response.setEncoding('utf8');
    response.on('data', (chunk) => { body += chunk; });
    response.on('end', () => {
      console.log(response.statusCode);
      console.log(body);
      socket.destroy();
    });
  }).on('error', (error) => fail(`request: ${error.stack}`));
});
connect.on('error', (error) => fail(`CONNECT: ${error.stack}`));
connect.end();
"#;

/// What a client run left behind.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Everything the client printed, for failure messages and secret checks.
    fn output(&self) -> String {
        format!(
            "exit: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// The status and JSON body a script printed (status line, then body),
    /// failing with the whole output if the client did not succeed.
    fn answer(&self) -> (u16, serde_json::Value) {
        assert!(
            self.status.success(),
            "the client failed:\n{}",
            self.output()
        );
        let (status, body) = self
            .stdout
            .trim()
            .split_once('\n')
            .unwrap_or_else(|| panic!("no status and body:\n{}", self.output()));
        let status = status
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no status line:\n{}", self.output()));
        let body = serde_json::from_str(body)
            .unwrap_or_else(|_| panic!("the body is not JSON:\n{}", self.output()));
        (status, body)
    }
}

/// Kills the client if the test ends before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `program` with the test host's proxy and trust settings removed and
/// nothing on stdin.
fn clean(program: &str) -> Command {
    let mut command = Command::new(program);
    for name in INHERITED_SETTINGS {
        command.env_remove(name);
    }
    command.stdin(Stdio::null());
    command
}

/// Reads `pipe` to its end on a blocking thread.
fn read_all(
    mut pipe: impl Read + Send + 'static,
) -> tokio::task::JoinHandle<std::io::Result<String>> {
    tokio::task::spawn_blocking(move || {
        let mut bytes = Vec::new();
        pipe.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    })
}

/// Runs `command` to its end, failing the test if it cannot start.
async fn run(command: Command) -> Run {
    let shown = format!("{command:?}");
    try_run(command)
        .await
        .unwrap_or_else(|e| panic!("starting {shown}: {e}"))
}

/// Runs `command` to its end within [`CLIENT_TIMEOUT`], collecting its
/// output, while the proxy and the stand-ins keep being served: the wait
/// polls (the crate's tokio has no `process` feature), so it never blocks
/// the test's runtime. Errs only if it cannot start.
async fn try_run(mut command: Command) -> std::io::Result<Run> {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut child = KillOnDrop(child);
    let stdout = read_all(child.0.stdout.take().unwrap());
    let stderr = read_all(child.0.stderr.take().unwrap());
    let deadline = tokio::time::Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{command:?} did not finish within {CLIENT_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let collect = |reader: tokio::task::JoinHandle<std::io::Result<String>>| async {
        tokio::time::timeout(CLIENT_TIMEOUT, reader)
            .await
            .expect("the client's output ends with it")
            .unwrap()
            .unwrap()
    };
    Ok(Run {
        status,
        stdout: collect(stdout).await,
        stderr: collect(stderr).await,
    })
}

/// The environment variable that makes a missing client a failure.
const REQUIRE_CLIENTS: &str = "GOTO_PROXY_REQUIRE_CLIENTS";
/// The one that makes a missing Python 3.13 a failure.
const REQUIRE_PYTHON313: &str = "GOTO_PROXY_REQUIRE_PYTHON313";

/// Whether `check` shows that `tool` works here. When it does not, the
/// test fails if `require` is set to `1`, and otherwise says it is skipped.
async fn available(tool: &str, check: Command, require: &str) -> bool {
    let works = match try_run(check).await {
        Ok(checked) if checked.status.success() => {
            let version = format!("{}{}", checked.stdout, checked.stderr);
            eprintln!("using {tool}: {}", version.lines().next().unwrap_or(""));
            true
        }
        Ok(checked) => {
            eprintln!("{tool} does not work here:\n{}", checked.output());
            false
        }
        Err(_) => false,
    };
    if !works {
        assert!(
            std::env::var(require).as_deref() != Ok("1"),
            "{tool} not installed, and {require}=1 requires it"
        );
        eprintln!("skipped: {tool} not installed");
    }
    works
}

async fn curl_available() -> bool {
    let mut check = clean("curl");
    check.arg("--version");
    available("curl", check, REQUIRE_CLIENTS).await
}

async fn requests_available() -> bool {
    let mut check = clean("python3");
    check.args([
        "-c",
        "import requests; print('requests', requests.__version__)",
    ]);
    available("Python requests", check, REQUIRE_CLIENTS).await
}

/// Python 3.13 as pyenv provides it (or a `python3.13` on PATH).
fn python313() -> Command {
    let mut command = clean("python3.13");
    command.env("PYENV_VERSION", "3.13.0");
    command
}

async fn python313_available() -> bool {
    let mut check = python313();
    check.arg("--version");
    available("Python 3.13", check, REQUIRE_PYTHON313).await
}

async fn python3_available() -> bool {
    let mut check = clean("python3");
    check.arg("--version");
    available("python3", check, REQUIRE_CLIENTS).await
}

async fn node_available() -> bool {
    let mut check = clean("node");
    check.arg("--version");
    available("node", check, REQUIRE_CLIENTS).await
}

/// Fails if a client printed the refresh token or any access token.
fn assert_keeps_secrets(f: &Forward, run: &Run) {
    let output = run.output();
    let mut secrets = f.goto.refresh_token_history();
    secrets.push(f.goto.refresh_token());
    secrets.extend(f.goto.issued_access_tokens());
    for secret in secrets {
        assert!(
            !output.contains(&secret),
            "a token reached the client's output:\n{output}"
        );
    }
}

/// Checks a client's answer from GoTo's stand-in: 200, the echo of the
/// path asked for, and a valid token added by the proxy.
fn assert_got_the_token(f: &Forward, run: &Run) {
    let (status, echo) = run.answer();
    assert_eq!(status, 200, "{}", run.output());
    assert_eq!(echo["path"], "/G2M/rest/meetings", "{echo}");
    assert!(
        echo["token_number"].as_u64().is_some_and(|n| n >= 1),
        "{echo}"
    );
    let recorded = f.goto.recorded_requests();
    let last = recorded.last().expect("the stand-in saw the request");
    assert_eq!(
        bearer_of(last).as_ref(),
        f.goto.issued_access_tokens().last(),
        "the stand-in got the newest token"
    );
    assert!(!last.headers.contains_key("proxy-authorization"));
    assert_keeps_secrets(f, run);
}

/// A proxy whose clients must present [`CLIENT_KEY`].
async fn start_with_client_key() -> Forward {
    start(|options, dir| {
        let key_file = dir.join("client-key");
        std::fs::write(&key_file, format!("{CLIENT_KEY}\n")).unwrap();
        options.client_key_file = Some(key_file);
    })
    .await
}

/// `curl` through `proxy` trusting `ca`, with `extra` arguments before the
/// URL. It prints the body, then a last line `HTTP_CODE CONNECT_CODE`.
fn curl(proxy: &str, ca: &Path, url: &str, extra: &[&str]) -> Command {
    let mut command = clean("curl");
    command
        // -q first: no ~/.curlrc.
        .args(["-q", "--silent", "--show-error", "--proxy", proxy])
        .arg("--cacert")
        .arg(ca)
        .args(["--write-out", "\n%{http_code} %{http_connect}\n"])
        .args(extra)
        .arg(url);
    command
}

/// The body and the `(http_code, http_connect)` pair of a curl run.
fn curl_answer(run: &Run) -> (String, (u16, u16)) {
    let (body, codes) = run
        .stdout
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", run.stdout.trim()));
    let mut codes = codes.split(' ').map(|code| code.parse().unwrap_or(0));
    let pair = (codes.next().unwrap_or(0), codes.next().unwrap_or(0));
    (body.to_owned(), pair)
}

#[tokio::test]
async fn curl_gets_the_token_added_for_an_inject_host() {
    if !curl_available().await {
        return;
    }
    let f = start(|_, _| {}).await;
    let proxy = format!("http://{}", f.proxy.addr);
    let done = run(curl(&proxy, &f.ca, GOTO_URL, &[])).await;
    assert!(done.status.success(), "{}", done.output());
    let (body, (code, connect)) = curl_answer(&done);
    assert_eq!((code, connect), (200, 200), "{}", done.output());
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| {
        panic!("not JSON:\n{}", done.output());
    });
    assert!(
        echo["token_number"].as_u64().is_some_and(|n| n >= 1),
        "{echo}"
    );
    assert_eq!(echo["path"], "/G2M/rest/meetings", "{echo}");
    let recorded = f.goto.recorded_requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(
        bearer_of(&recorded[0]).as_ref(),
        f.goto.issued_access_tokens().last()
    );
    assert_keeps_secrets(&f, &done);
}

#[tokio::test]
async fn curl_to_another_host_keeps_its_own_authorization() {
    if !curl_available().await {
        return;
    }
    let f = start(|_, _| {}).await;
    let proxy = format!("http://{}", f.proxy.addr);
    let url = format!("https://{OTHER_HOST}/x");
    let done = run(curl(
        &proxy,
        &f.other_ca,
        &url,
        &["-H", "Authorization: Bearer own"],
    ))
    .await;
    // The other host judges the client's own token (and refuses it).
    assert!(done.status.success(), "{}", done.output());
    let (_, (code, connect)) = curl_answer(&done);
    assert_eq!((code, connect), (401, 200), "{}", done.output());
    let recorded = f.other.recorded_requests();
    assert_eq!(recorded.len(), 1, "{}", done.output());
    let authorizations: Vec<_> = recorded[0]
        .headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .collect();
    assert_eq!(authorizations, ["Bearer own"]);
    assert!(f.goto.recorded_requests().is_empty());
    assert_keeps_secrets(&f, &done);
}

#[tokio::test]
async fn curl_is_refused_another_host_when_other_hosts_are_denied() {
    if !curl_available().await {
        return;
    }
    let f = start(|options, _| options.other_hosts = Some("deny".into())).await;
    let proxy = format!("http://{}", f.proxy.addr);
    let url = format!("https://{OTHER_HOST}/x");
    let done = run(curl(&proxy, &f.other_ca, &url, &[])).await;
    assert!(!done.status.success(), "{}", done.output());
    let (_, (_, connect)) = curl_answer(&done);
    assert_eq!(connect, 403, "{}", done.output());
    assert!(done.stderr.contains("403"), "{}", done.output());
    assert!(f.other.recorded_requests().is_empty());
    assert_keeps_secrets(&f, &done);
}

#[tokio::test]
async fn curl_needs_the_client_key_in_its_proxy_url() {
    if !curl_available().await {
        return;
    }
    let f = start_with_client_key().await;
    let without = run(curl(
        &format!("http://{}", f.proxy.addr),
        &f.ca,
        GOTO_URL,
        &[],
    ))
    .await;
    assert!(!without.status.success(), "{}", without.output());
    let (_, (_, connect)) = curl_answer(&without);
    assert_eq!(connect, 407, "{}", without.output());
    assert!(f.goto.recorded_requests().is_empty());
    assert_keeps_secrets(&f, &without);
    let with_key = format!("http://user:{CLIENT_KEY}@{}", f.proxy.addr);
    let done = run(curl(&with_key, &f.ca, GOTO_URL, &[])).await;
    assert!(done.status.success(), "{}", done.output());
    let (body, (code, connect)) = curl_answer(&done);
    assert_eq!((code, connect), (200, 200), "{}", done.output());
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        echo["token_number"].as_u64().is_some_and(|n| n >= 1),
        "{echo}"
    );
    let recorded = f.goto.recorded_requests();
    assert_eq!(recorded.len(), 1);
    assert!(!recorded[0].headers.contains_key("proxy-authorization"));
    assert_eq!(
        bearer_of(&recorded[0]).as_ref(),
        f.goto.issued_access_tokens().last()
    );
    assert_keeps_secrets(&f, &done);
}

/// Python `requests` with HTTPS_PROXY set to `proxy`.
fn python_requests(proxy: &str, ca: &Path) -> Command {
    let mut command = clean("python3");
    command
        .args(["-c", PYTHON_REQUESTS, GOTO_URL])
        .env("HTTPS_PROXY", proxy)
        .env("REQUESTS_CA_BUNDLE", ca);
    command
}

#[tokio::test]
async fn python_requests_honours_https_proxy() {
    if !requests_available().await {
        return;
    }
    let f = start(|_, _| {}).await;
    let done = run(python_requests(&format!("http://{}", f.proxy.addr), &f.ca)).await;
    assert_got_the_token(&f, &done);
}

#[tokio::test]
async fn python_requests_sends_the_client_key_from_https_proxy() {
    if !requests_available().await {
        return;
    }
    let f = start_with_client_key().await;
    let proxy = format!("http://user:{CLIENT_KEY}@{}", f.proxy.addr);
    let done = run(python_requests(&proxy, &f.ca)).await;
    assert_got_the_token(&f, &done);
}

/// `python` running `urlopen` through HTTPS_PROXY, trusting SSL_CERT_FILE.
fn python_urllib(mut python: Command, f: &Forward, strict: bool) -> Command {
    python
        .args(["-c", PYTHON_URLLIB, GOTO_URL])
        .arg(if strict { "strict" } else { "default" })
        .env("HTTPS_PROXY", format!("http://{}", f.proxy.addr))
        .env("SSL_CERT_FILE", &f.ca);
    python
}

#[tokio::test]
async fn python313_standard_library_accepts_the_certificates_strictly() {
    if !python313_available().await {
        return;
    }
    let f = start(|_, _| {}).await;
    let done = run(python_urllib(python313(), &f, true)).await;
    assert_got_the_token(&f, &done);
}

#[tokio::test]
async fn python3_standard_library_honours_https_proxy() {
    if !python3_available().await {
        return;
    }
    let f = start(|_, _| {}).await;
    let done = run(python_urllib(clean("python3"), &f, false)).await;
    assert_got_the_token(&f, &done);
}

#[tokio::test]
async fn node_https_over_a_connect_trusts_node_extra_ca_certs() {
    if !node_available().await {
        return;
    }
    let f = start(|_, _| {}).await;
    let mut node = clean("node");
    node.args(["-e", NODE_CONNECT, "--"])
        .arg(f.proxy.addr.ip().to_string())
        .arg(f.proxy.addr.port().to_string())
        .env("NODE_EXTRA_CA_CERTS", &f.ca);
    let done = run(node).await;
    assert_got_the_token(&f, &done);
}
