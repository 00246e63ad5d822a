//! The client key (`--client-key-file`): with one set, every request on the
//! main listener (for a tunnel, its `CONNECT`) must carry it in
//! `Proxy-Authorization`, as `Bearer <key>` or as the password of `Basic`,
//! which is what clients send for `HTTPS_PROXY=http://user:KEY@host:port`.

use base64::Engine;
use http::header::PROXY_AUTHORIZATION;
use http::HeaderMap;
use ring::digest::{digest, SHA256};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

/// The key clients must present; its `Debug` shows nothing of it.
pub struct ClientKey {
    /// SHA-256 of the key: compared in constant time against the digest of
    /// what a client sends, so neither the bytes nor the length leak.
    digest: [u8; 32],
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKey([redacted])")
    }
}

impl ClientKey {
    /// The key `secret`.
    pub fn new(secret: &SecretString) -> Self {
        Self {
            digest: sha256(secret.expose_secret().as_bytes()),
        }
    }

    /// Whether `headers` carry the key in `Proxy-Authorization`.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(PROXY_AUTHORIZATION)
            .iter()
            .filter_map(|value| presented_key(value.as_bytes()))
            .any(|key| bool::from(sha256(&key).ct_eq(&self.digest)))
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// The user name of `Proxy-Authorization: Basic` credentials, which in
/// forward mode may name the account.
pub fn basic_user(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(PROXY_AUTHORIZATION)
        .iter()
        .find_map(|value| basic_credentials(value.as_bytes()))
        .and_then(|(user, _)| String::from_utf8(user).ok())
        .filter(|user| !user.is_empty())
}

/// The key in one `Proxy-Authorization` value: a `Bearer` token, or the
/// password of `Basic` credentials.
fn presented_key(value: &[u8]) -> Option<Vec<u8>> {
    let (scheme, credentials) = scheme_and_credentials(value)?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(credentials.as_bytes().to_vec());
    }
    basic_credentials(value).map(|(_, key)| key)
}

/// The user name and password of `Basic` credentials.
fn basic_credentials(value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (scheme, credentials) = scheme_and_credentials(value)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials)
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

fn scheme_and_credentials(value: &[u8]) -> Option<(&str, &str)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, credentials) = text.split_once(' ')?;
    Some((scheme, credentials.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(PROXY_AUTHORIZATION, value.parse().unwrap());
        }
        map
    }

    fn basic(user_and_key: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_and_key)
        )
    }

    #[test]
    fn the_key_is_taken_as_bearer_or_as_the_basic_password() {
        let key = ClientKey::new(&SecretString::from("s3cret:with-colon"));
        assert!(key.admits(&headers(&["Bearer s3cret:with-colon"])));
        assert!(key.admits(&headers(&["bearer  s3cret:with-colon "])));
        assert!(key.admits(&headers(&[&basic("anyone:s3cret:with-colon")])));
        assert!(key.admits(&headers(&[&basic(":s3cret:with-colon")])));
        for refused in [
            vec![],
            vec!["Bearer s3cret"],
            vec!["s3cret:with-colon"],
            vec!["Basic !!!"],
        ] {
            assert!(!key.admits(&headers(&refused)), "{refused:?}");
        }
        assert!(!key.admits(&headers(&[&basic("s3cret:with-colon")])));
        assert!(!format!("{key:?}").contains("s3cret"));
    }

    #[test]
    fn the_basic_user_name_is_read_for_account_selection() {
        assert_eq!(
            basic_user(&headers(&[&basic("sales:k")])).as_deref(),
            Some("sales")
        );
        assert_eq!(basic_user(&headers(&[&basic(":k")])), None);
        assert_eq!(basic_user(&headers(&["Bearer k"])), None);
    }
}
