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

/// The key in one `Proxy-Authorization` value: a `Bearer` token, or the
/// password of `Basic` credentials (the user name selects nothing here).
fn presented_key(value: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, credentials) = text.split_once(' ')?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(credentials.as_bytes().to_vec());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .ok()?;
        let colon = decoded.iter().position(|b| *b == b':')?;
        return Some(decoded[colon + 1..].to_vec());
    }
    None
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
}
