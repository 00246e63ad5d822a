//! The stand-in's OAuth token endpoint.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{json, lock, random_token, Fault, IssuedToken, PendingCode, Shared, State, PRINCIPAL};
use crate::proxy::body::ProxyBody;

/// Padding that makes access tokens as long as GoTo's (kilobytes).
const TOKEN_PADDING: usize = 1200;

pub(super) async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<ProxyBody> {
    if request.method() == Method::GET && request.uri().path() == "/oauth/authorize" {
        return authorize(shared, &request);
    }
    shared
        .counters
        .token_requests
        .fetch_add(1, Ordering::SeqCst);
    lock(shared).token_request_times.push(Instant::now());
    if request.method() != Method::POST || request.uri().path() != "/oauth/token" {
        return json(404, &serde_json::json!({"error": "not_found"}));
    }
    let authorized = basic_credentials(request.headers());
    let Ok(body) = request.into_body().collect().await else {
        return json(400, &serde_json::json!({"error": "invalid_request"}));
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(&body.to_bytes())
        .into_owned()
        .collect();
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };

    let fault = {
        let mut state = lock(shared);
        let count = state.token_request_times.len() as u64;
        let scheduled = state.shape.fail_every > 0 && count.is_multiple_of(state.shape.fail_every);
        state
            .faults
            .pop_front()
            .or_else(|| state.standing_fault.clone())
            .or(scheduled.then_some(Fault::Status(503)))
    };
    if let Some(fault) = fault {
        return play(fault).await;
    }

    let mut state = lock(shared);
    if authorized.as_ref() != Some(&(state.client_id.clone(), state.client_secret.clone())) {
        return json(401, &serde_json::json!({"error": "invalid_client"}));
    }
    let code_grant = field("grant_type") == Some("authorization_code");
    let accepted = match field("grant_type") {
        Some("refresh_token") => state.accepts_refresh_token(field("refresh_token")),
        Some("personal_access_token") => field("pat") == Some(state.pat.as_str()),
        Some("authorization_code") => redeem_code(
            &mut state,
            field("code"),
            field("code_verifier"),
            field("redirect_uri"),
        ),
        _ => return json(400, &serde_json::json!({"error": "unsupported_grant_type"})),
    };
    if !accepted {
        return json(
            400,
            &serde_json::json!({"error": "invalid_grant", "error_description": "token not valid"}),
        );
    }
    if code_grant {
        // A consent starts a new refresh-token chain.
        state.rotate_refresh_token();
    }
    let grant = issue(shared, &mut state, code_grant);
    json(200, &grant)
}

/// The consent screen, consented to at once: redirects back with a code
/// bound to the PKCE challenge and the redirect URI.
fn authorize(shared: &Shared, request: &Request<Incoming>) -> Response<ProxyBody> {
    let field = |name: &str| crate::login::query_field(request.uri(), name);
    let mut state = lock(shared);
    let (Some(redirect_uri), Some(challenge), Some(client_state)) = (
        field("redirect_uri"),
        field("code_challenge"),
        field("state"),
    ) else {
        return json(400, &serde_json::json!({"error": "invalid_request"}));
    };
    if field("client_id").as_deref() != Some(state.client_id.as_str())
        || field("response_type").as_deref() != Some("code")
        || field("code_challenge_method").as_deref() != Some("S256")
    {
        return json(400, &serde_json::json!({"error": "invalid_request"}));
    }
    let code = random_token("code");
    state.codes.insert(
        code.clone(),
        PendingCode {
            challenge,
            redirect_uri: redirect_uri.clone(),
        },
    );
    let location = format!(
        "{redirect_uri}?{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("code", &code)
            .append_pair("state", &client_state)
            .finish()
    );
    let mut response = Response::new(ProxyBody::Empty);
    *response.status_mut() = http::StatusCode::FOUND;
    if let Ok(value) = http::HeaderValue::try_from(location) {
        response.headers_mut().insert(http::header::LOCATION, value);
    }
    response
}

/// Whether `code` was issued for this verifier and redirect URI; a code works once.
fn redeem_code(
    state: &mut State,
    code: Option<&str>,
    verifier: Option<&str>,
    redirect_uri: Option<&str>,
) -> bool {
    let (Some(code), Some(verifier)) = (code, verifier) else {
        return false;
    };
    let Some(pending) = state.codes.remove(code) else {
        return false;
    };
    Some(pending.redirect_uri.as_str()) == redirect_uri
        && crate::login::pkce_challenge(verifier) == pending.challenge
}

/// Issues an access token (and, when due or asked, the refresh token).
fn issue(shared: &Shared, state: &mut State, send_refresh_token: bool) -> serde_json::Value {
    let number = shared.counters.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
    state.token_issue_times.push(Instant::now());
    let lifetime = state.shape.lifetime;
    let access_token = jwt_like(number, lifetime);
    state.issued.insert(
        access_token.clone(),
        IssuedToken {
            number,
            issued_at: Instant::now(),
            expires_at: Instant::now() + lifetime,
            revoked: false,
        },
    );
    state.issued.retain(|_, t| t.expires_at > Instant::now());
    state.refreshes += 1;
    let rotate =
        state.shape.rotate_every > 0 && state.refreshes.is_multiple_of(state.shape.rotate_every);
    if rotate {
        state.rotate_refresh_token();
    }
    let mut grant = serde_json::json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "principal": PRINCIPAL,
        "scope": "collab: identity:",
        "account_key": "1234567890",
        "organizer_key": "9876543210",
    });
    if state.shape.send_expires_in {
        grant["expires_in"] = lifetime.as_secs().into();
    }
    if rotate || send_refresh_token || state.shape.repeat_refresh_token {
        grant["refresh_token"] = state.refresh_token.clone().into();
    }
    grant
}

/// A token shaped like a JWT, with an `exp` claim, about 1.5 KB long.
fn jwt_like(number: u64, lifetime: Duration) -> String {
    let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        + lifetime;
    let claims = serde_json::json!({
        "sub": PRINCIPAL,
        "exp": exp.as_secs(),
        "n": number,
        "jti": random_token("jti"),
        "pad": "x".repeat(TOKEN_PADDING),
    });
    format!(
        "{}.{}.{}",
        encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        encode(claims.to_string().as_bytes()),
        encode(random_token("sig").as_bytes())
    )
}

fn basic_credentials(headers: &http::HeaderMap) -> Option<(String, String)> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

async fn play(fault: Fault) -> Response<ProxyBody> {
    match fault {
        Fault::Status(status) => json(status, &serde_json::json!({})),
        Fault::TooManyRequests { retry_after_secs } => {
            let mut response = json(429, &serde_json::json!({"error": "rate_limited"}));
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, retry_after_secs.into());
            response
        }
        Fault::InvalidGrant => json(400, &serde_json::json!({"error": "invalid_grant"})),
        Fault::Hang => std::future::pending().await,
        Fault::SlowDrip => {
            // A grant that never finishes: one byte every 300 ms until the client leaves.
            let (sender, receiver) = tokio::sync::mpsc::channel(1);
            tokio::spawn(async move {
                for byte in br#"{"access_token":"drip"#.iter().cycle().take(2000) {
                    if sender
                        .send(bytes::Bytes::copy_from_slice(&[*byte]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            });
            let mut response = Response::new(ProxyBody::Channel(receiver));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
        Fault::Garbage => crate::proxy::body::response(
            http::StatusCode::OK,
            "text/html",
            "<html><body>Service temporarily unavailable</body></html>",
        ),
        Fault::NoAccessToken => json(
            200,
            &serde_json::json!({"token_type": "Bearer", "expires_in": 3600}),
        ),
        Fault::HugeBody => json(
            200,
            &serde_json::json!({"access_token": "x".repeat(4 * 1024 * 1024)}),
        ),
    }
}
