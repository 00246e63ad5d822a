//! Parsing of the token endpoint's JSON answer into a [`TokenGrant`].
//!
//! Kept free of I/O so that it can be unit-tested and fuzzed on its own.

use std::time::Duration;

use base64::Engine as _;
use secrecy::SecretString;
use serde::Deserialize;

/// Lifetime assumed when the answer names none and the token carries no `exp` claim.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// The longest lifetime believed: GoTo's tokens live an hour, and a larger
/// figure (up to 10^19 seconds has been seen from broken servers) would only
/// keep a token past its real end, or overflow the clock.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// What a successful token request yields.
#[derive(Debug)]
pub struct TokenGrant {
    /// The bearer token to put on upstream requests.
    pub access_token: SecretString,
    /// How long the access token stays valid, counted from when the answer arrived.
    pub lifetime: Duration,
    /// A new refresh token, when the endpoint rotated it; `None` keeps the current one.
    pub refresh_token: Option<SecretString>,
    /// The account the token acts for (GoTo sends the user's e-mail address).
    pub principal: Option<String>,
}

/// Why a 200 answer could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrantError {
    #[error("the token endpoint answered with something that is not JSON")]
    NotJson,
    #[error("the token endpoint's JSON answer has no access_token")]
    MissingAccessToken,
    #[error("the token endpoint answered token_type {0:?}, not Bearer")]
    UnsupportedTokenType(String),
    #[error("the access token holds characters that cannot be sent in an HTTP header")]
    UnsendableToken,
    #[error("the token endpoint answered an expires_in that is not a positive number of seconds")]
    BadLifetime,
}

#[derive(Deserialize)]
struct RawGrant {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
    principal: Option<String>,
}

/// Parses the body of a 200 answer from the token endpoint.
///
/// Unknown fields are ignored. An empty or missing `refresh_token` means
/// "keep the one you have": storing it would strand the proxy.
pub fn parse_grant(body: &[u8], now_unix: u64) -> Result<TokenGrant, GrantError> {
    let raw: RawGrant = serde_json::from_slice(body).map_err(|_| GrantError::NotJson)?;
    let access_token = raw
        .access_token
        .filter(|t| !t.trim().is_empty())
        .ok_or(GrantError::MissingAccessToken)?;
    if let Some(kind) = raw.token_type.as_deref() {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(GrantError::UnsupportedTokenType(kind.to_owned()));
        }
    }
    let stated = match raw.expires_in {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => Some(seconds_from_json(&value).ok_or(GrantError::BadLifetime)?),
    };
    let lifetime = stated
        .or_else(|| jwt_lifetime(&access_token, now_unix))
        .unwrap_or(DEFAULT_LIFETIME)
        .min(MAX_LIFETIME);
    Ok(TokenGrant {
        access_token: SecretString::from(access_token),
        lifetime,
        refresh_token: raw
            .refresh_token
            .filter(|t| !t.trim().is_empty())
            .map(SecretString::from),
        principal: raw.principal.filter(|p| !p.is_empty()),
    })
}

/// `expires_in` is a number in the OAuth spec, but some servers send a
/// string or a fraction. Zero, negative and non-numeric values are `None`.
fn seconds_from_json(value: &serde_json::Value) -> Option<Duration> {
    let seconds = match value {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }?;
    // Anything from one second up is believed, capped later; `as` saturates.
    (seconds.is_finite() && seconds >= 1.0).then(|| Duration::from_secs(seconds as u64))
}

/// The time left until the `exp` claim of a JWT, if the token is one and the
/// claim lies in the future. The signature is not checked: the token is the
/// endpoint's to vouch for, this only reads when it runs out.
pub fn jwt_lifetime(token: &str, now_unix: u64) -> Option<Duration> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(Deserialize)]
    struct Claims {
        exp: Option<serde_json::Value>,
    }
    let claims: Claims = serde_json::from_slice(&decoded).ok()?;
    let exp = match claims.exp? {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f as u64)),
        _ => None,
    }?;
    exp.checked_sub(now_unix)
        .filter(|left| *left > 0)
        .map(|left| Duration::from_secs(left).min(MAX_LIFETIME))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn jwt(claims: &str) -> String {
        let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            enc.encode(r#"{"alg":"RS256"}"#),
            enc.encode(claims)
        )
    }

    #[test]
    fn full_answer_is_read() {
        let body = br#"{"access_token":"abc","token_type":"Bearer","expires_in":3600,
            "refresh_token":"r2","principal":"ann@example.com","scope":"x","extra":{"a":1}}"#;
        let grant = parse_grant(body, 0).unwrap();
        assert_eq!(grant.access_token.expose_secret(), "abc");
        assert_eq!(grant.lifetime, Duration::from_secs(3600));
        assert_eq!(grant.refresh_token.unwrap().expose_secret(), "r2");
        assert_eq!(grant.principal.as_deref(), Some("ann@example.com"));
    }

    #[test]
    fn missing_or_empty_refresh_token_keeps_the_current_one() {
        for body in [
            &br#"{"access_token":"a","expires_in":60}"#[..],
            br#"{"access_token":"a","expires_in":60,"refresh_token":""}"#,
            br#"{"access_token":"a","expires_in":60,"refresh_token":null}"#,
        ] {
            assert!(parse_grant(body, 0).unwrap().refresh_token.is_none());
        }
    }

    #[test]
    fn expires_in_as_string_is_accepted() {
        let grant = parse_grant(br#"{"access_token":"a","expires_in":"120"}"#, 0).unwrap();
        assert_eq!(grant.lifetime, Duration::from_secs(120));
    }

    #[test]
    fn absurd_lifetimes_are_capped_and_nonsense_is_refused() {
        for huge in ["10000000000000000000", "1e300", "\"10000000000000000000\""] {
            let body = format!(r#"{{"access_token":"a","expires_in":{huge}}}"#);
            let grant = parse_grant(body.as_bytes(), 0).unwrap();
            assert_eq!(grant.lifetime, MAX_LIFETIME, "{huge}");
        }
        for nonsense in ["0", "-5", "0.2", "\"soon\"", "\"\"", "true", "[]", "{}"] {
            let body = format!(r#"{{"access_token":"a","expires_in":{nonsense}}}"#);
            assert_eq!(
                parse_grant(body.as_bytes(), 0).unwrap_err(),
                GrantError::BadLifetime,
                "{nonsense}"
            );
        }
        let grant = parse_grant(br#"{"access_token":"a","expires_in":null}"#, 0).unwrap();
        assert_eq!(grant.lifetime, DEFAULT_LIFETIME);
        let far = jwt(r#"{"exp":18446744073709551615}"#);
        assert_eq!(jwt_lifetime(&far, 0), Some(MAX_LIFETIME));
    }

    #[test]
    fn lifetime_falls_back_to_jwt_exp_then_default() {
        let token = jwt(r#"{"exp":1000600,"sub":"x"}"#);
        let body = format!(r#"{{"access_token":"{token}"}}"#);
        let grant = parse_grant(body.as_bytes(), 1_000_000).unwrap();
        assert_eq!(grant.lifetime, Duration::from_secs(600));

        let grant = parse_grant(br#"{"access_token":"opaque"}"#, 0).unwrap();
        assert_eq!(grant.lifetime, DEFAULT_LIFETIME);
    }

    #[test]
    fn jwt_in_the_past_or_malformed_gives_no_lifetime() {
        assert_eq!(jwt_lifetime(&jwt(r#"{"exp":5}"#), 10), None);
        assert_eq!(jwt_lifetime(&jwt(r#"{"exp":"soon"}"#), 0), None);
        assert_eq!(jwt_lifetime("a.b", 0), None);
        assert_eq!(jwt_lifetime("a.!!!.c", 0), None);
        assert_eq!(jwt_lifetime("a.b.c.d", 0), None);
    }

    #[test]
    fn unusable_answers_are_errors() {
        assert_eq!(parse_grant(b"<html>", 0).unwrap_err(), GrantError::NotJson);
        assert_eq!(
            parse_grant(br#"{"expires_in":5}"#, 0).unwrap_err(),
            GrantError::MissingAccessToken
        );
        assert_eq!(
            parse_grant(br#"{"access_token":" "}"#, 0).unwrap_err(),
            GrantError::MissingAccessToken
        );
        assert!(matches!(
            parse_grant(br#"{"access_token":"a","token_type":"mac"}"#, 0),
            Err(GrantError::UnsupportedTokenType(_))
        ));
    }
}
