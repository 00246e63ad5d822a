//! Several accounts in one proxy: each request goes with its own
//! account's token to its own account's upstream, one account's failure
//! leaves the others serving, and readiness and metrics report each.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::forward::bearer_of;
use common::{client, settings, start_proxy, wait_for, Proxy};
use goto_auth_proxy::config::{AccountTable, RunOptions};
use goto_auth_proxy::standin::{StandIn, StandInOptions, CLIENT_ID, CLIENT_SECRET};
use serde_json::Value;

/// An `[accounts.NAME]` table for `standin`, its secrets in files in `dir`.
fn table_for(standin: &StandIn, dir: &Path, name: &str) -> AccountTable {
    let secret = dir.join(format!("{name}-client-secret"));
    std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
    let refresh = dir.join(format!("{name}-refresh-token"));
    std::fs::write(&refresh, standin.refresh_token()).unwrap();
    AccountTable {
        client_id: Some(CLIENT_ID.into()),
        client_secret_file: Some(secret),
        refresh_token_file: Some(refresh),
        upstream: Some(standin.api_url()),
        token_url: Some(standin.token_url()),
        ..AccountTable::default()
    }
}

/// Two stand-ins, `default` (the top-level settings) on the first and
/// `sales` on the second, and a ready proxy.
struct TwoAccounts {
    first: StandIn,
    second: StandIn,
    proxy: Proxy,
    _dir: tempfile::TempDir,
}

async fn two_accounts(adjust: impl FnOnce(&mut RunOptions)) -> TwoAccounts {
    let first = StandIn::start(StandInOptions::default()).await.unwrap();
    let second = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut options = common::options_for(&first, dir.path());
    options.accounts = Some(BTreeMap::from([(
        "sales".to_owned(),
        table_for(&second, dir.path(), "sales"),
    )]));
    adjust(&mut options);
    let proxy = start_proxy(settings(options, Some(first.refresh_token()))).await;
    proxy.wait_ready().await;
    TwoAccounts {
        first,
        second,
        proxy,
        _dir: dir,
    }
}

async fn get(proxy: &Proxy, path: &str, account_header: Option<&str>) -> reqwest::Response {
    let mut request = client().get(proxy.url(path));
    if let Some(name) = account_header {
        request = request.header("x-goto-account", name);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn each_request_carries_its_own_accounts_token_to_its_own_upstream() {
    let t = two_accounts(|_| {}).await;
    for (path, header) in [
        ("/acct/sales/G2M/rest/meetings", None),
        ("/G2M/rest/meetings", Some("sales")),
    ] {
        let response = get(&t.proxy, path, header).await;
        assert_eq!(response.status(), 200, "{path}");
    }
    let response = get(&t.proxy, "/G2M/rest/meetings", None).await;
    assert_eq!(response.status(), 200);
    let at_second = t.second.recorded_requests();
    assert_eq!(at_second.len(), 2);
    for request in &at_second {
        assert_eq!(request.path_and_query, "/G2M/rest/meetings");
        assert!(!request.headers.contains_key("x-goto-account"));
        let token = bearer_of(request).unwrap();
        assert!(t.second.issued_access_tokens().contains(&token));
    }
    let at_first = t.first.recorded_requests();
    assert_eq!(at_first.len(), 1);
    let token = bearer_of(&at_first[0]).unwrap();
    assert!(t.first.issued_access_tokens().contains(&token));
    assert!(!t.second.issued_access_tokens().contains(&token));
    let unknown = get(&t.proxy, "/acct/nobody/x", None).await;
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"], "unknown_account");
    // Metrics and readiness per account.
    assert_eq!(
        t.proxy
            .metric("goto_proxy_requests_total{account=\"sales\",class=\"2xx\"}")
            .await,
        Some(2.0)
    );
    assert_eq!(
        t.proxy
            .metric("goto_proxy_requests_total{account=\"default\",class=\"2xx\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        t.proxy
            .metric("goto_proxy_token_ready{account=\"sales\"}")
            .await,
        Some(1.0)
    );
    let ready: Value = client()
        .get(t.proxy.admin_url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["accounts"]["default"]["ready"], true, "{ready}");
    assert_eq!(ready["accounts"]["sales"]["ready"], true, "{ready}");
}

#[tokio::test]
async fn one_accounts_rejected_credential_leaves_the_other_serving() {
    let t = two_accounts(|_| {}).await;
    t.second.revoke_refresh_token();
    t.second.revoke_access_tokens();
    let refused = get(&t.proxy, "/acct/sales/G2M/rest/meetings", None).await;
    assert_eq!(refused.status(), 503);
    wait_for("the sales account to report not ready", || async {
        let response = client()
            .get(t.proxy.admin_url("/readyz"))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        status == 503
            && body["accounts"]["sales"]["ready"] == false
            && body["accounts"]["sales"]["state"] == "rejected"
            && body["accounts"]["default"]["ready"] == true
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            get(&t.proxy, "/G2M/rest/meetings", None).await.status(),
            200
        );
    }
    assert_eq!(
        t.proxy
            .metric("goto_proxy_token_refreshes_total{account=\"sales\",result=\"rejected\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        t.proxy
            .metric("goto_proxy_token_ready{account=\"default\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn without_a_default_account_a_request_must_name_one() {
    let first = StandIn::start(StandInOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = RunOptions {
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        accounts: Some(BTreeMap::from([(
            "eu".to_owned(),
            table_for(&first, dir.path(), "eu"),
        )])),
        state_file: Some(dir.path().join("state.json")),
        ..RunOptions::default()
    };
    let proxy = start_proxy(settings(options, None)).await;
    proxy.wait_ready().await;
    let response = get(&proxy, "/G2M/rest/meetings", None).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "account_required");
    assert_eq!(
        get(&proxy, "/acct/eu/G2M/rest/meetings", None)
            .await
            .status(),
        200
    );
    // Its state file defaults to one of its own beside the default's.
    wait_for("the eu account's state file", || async {
        dir.path().join("state-eu.json").exists()
    })
    .await;
}

#[tokio::test]
async fn in_forward_mode_the_proxy_user_name_selects_the_account() {
    let second = StandIn::start(StandInOptions::default()).await.unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let table = table_for(&second, secrets.path(), "sales");
    let f = common::forward::start(|options, _| {
        options.accounts = Some(BTreeMap::from([("sales".to_owned(), table)]));
    })
    .await;
    let as_sales = format!("http://sales:unused@{}", f.proxy.addr);
    let response = common::forward::client_via(&as_sales, &[&f.ca])
        .get("https://api.getgo.com/G2M/rest/meetings")
        .send()
        .await
        .unwrap();
    // GoTo's stand-in does not know the sales account's tokens: it refuses
    // them, which shows whose token went.
    assert_eq!(response.status(), 401);
    let recorded = f.goto.recorded_requests();
    assert!(!recorded.is_empty());
    for request in &recorded {
        let token = bearer_of(request).unwrap();
        assert!(second.issued_access_tokens().contains(&token));
    }
    // A user name that names no account leaves the choice to the default.
    let as_anyone = format!("http://anyone:unused@{}", f.proxy.addr);
    let response = common::forward::client_via(&as_anyone, &[&f.ca])
        .get("https://api.getgo.com/G2M/rest/meetings")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}
