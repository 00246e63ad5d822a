//! Tokens at rest in a shared store, sealed with AES-256-GCM under a key
//! that only the replicas hold.
//!
//! A key file holds one key as 32 raw bytes, or one or more keys as lines
//! of 64 hex characters: the first line seals, every line opens. Each sealed
//! record names the id of the key that sealed it (a hash of the key, which
//! tells nothing about it), so a key is rotated by putting the new one first,
//! restarting or reloading the replicas, and dropping the old line once every
//! record has been written again.

use std::fmt;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Why a key file cannot be used, or a sealed record cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read the key file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the key file {path} must hold 32 raw bytes, or lines of 64 hex characters (make one with `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'`)")]
    Format { path: std::path::PathBuf },
    #[error("the record is sealed with key {0}, which this replica does not have: give it the same --store-key-file as the others")]
    UnknownKey(String),
    #[error("the record does not open with key {0}: it was altered, or sealed for another place")]
    Forged(String),
    #[error("the record is not sealed, and this replica only trusts sealed records: delete it (the replicas write it again) or remove --store-key-file")]
    NotSealed,
}

/// A sealed value, as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sealed {
    /// Which key sealed it.
    pub key_id: String,
    /// The nonce, base64.
    pub nonce: String,
    /// Ciphertext and tag, base64.
    pub ciphertext: String,
}

struct StoreKey {
    id: String,
    key: LessSafeKey,
}

/// The keys of `--store-key-file`: the first seals, all open.
pub struct Keyring {
    keys: Vec<StoreKey>,
    random: SystemRandom,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.key_ids())
            .finish()
    }
}

impl Keyring {
    /// The keys in the file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, SealError> {
        let bytes = std::fs::read(path).map_err(|source| SealError::Read {
            path: path.to_owned(),
            source,
        })?;
        let format = || SealError::Format {
            path: path.to_owned(),
        };
        let raw_keys = parse_keys(&bytes).ok_or_else(format)?;
        Self::from_keys(&raw_keys).ok_or_else(format)
    }

    /// A keyring of the given 32-byte keys, the first sealing.
    pub fn from_keys(raw_keys: &[[u8; 32]]) -> Option<Self> {
        let keys = raw_keys
            .iter()
            .map(|raw| {
                let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, raw).ok()?);
                Some(StoreKey {
                    id: key_id(raw),
                    key,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        (!keys.is_empty()).then(|| Self {
            keys,
            random: SystemRandom::new(),
        })
    }

    /// The ids of the keys, the sealing one first.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// Seals `plaintext`, bound to `context` (where and as what it is stored).
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Sealed {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .expect("the system's random source works");
        let mut buffer = plaintext.to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut buffer,
            )
            .expect("a record is far below AES-GCM's size limit");
        Sealed {
            key_id: key.id.clone(),
            nonce: BASE64.encode(nonce),
            ciphertext: BASE64.encode(buffer),
        }
    }

    /// Opens what [`Keyring::seal`] sealed with the same `context`.
    pub fn open(&self, sealed: &Sealed, context: &[u8]) -> Result<Vec<u8>, SealError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == sealed.key_id)
            .ok_or_else(|| SealError::UnknownKey(sealed.key_id.clone()))?;
        let forged = || SealError::Forged(sealed.key_id.clone());
        let nonce: [u8; NONCE_LEN] = BASE64
            .decode(&sealed.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(forged)?;
        let mut buffer = BASE64.decode(&sealed.ciphertext).map_err(|_| forged())?;
        let plaintext = key
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut buffer,
            )
            .map_err(|_| forged())?;
        Ok(plaintext.to_vec())
    }
}

/// 32 raw bytes, or lines of 64 hex characters (blank lines and `#` comments skipped).
fn parse_keys(bytes: &[u8]) -> Option<Vec<[u8; 32]>> {
    if let Ok(raw) = <[u8; 32]>::try_from(bytes) {
        if !raw.iter().all(u8::is_ascii_hexdigit) {
            return Some(vec![raw]);
        }
    }
    let text = std::str::from_utf8(bytes).ok()?;
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(parse_hex_key)
        .collect()
}

fn parse_hex_key(line: &str) -> Option<[u8; 32]> {
    if line.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (byte, pair) in key.iter_mut().zip(line.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(key)
}

/// A key's public name: the start of a hash of it, which reveals nothing of it.
fn key_id(raw: &[u8; 32]) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(b"goto-auth-proxy store key id\0");
    context.update(raw);
    hex(&context.finish().as_ref()[..8])
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_of(keys: &[[u8; 32]]) -> Keyring {
        Keyring::from_keys(keys).unwrap()
    }

    #[test]
    fn sealed_text_opens_with_the_key_and_context_only() {
        let ring = ring_of(&[[7; 32]]);
        let sealed = ring.seal(b"rt-secret", b"place:1");
        assert!(!sealed.ciphertext.contains("rt-secret"));
        assert_eq!(ring.open(&sealed, b"place:1").unwrap(), b"rt-secret");
        assert!(matches!(
            ring.open(&sealed, b"place:2"),
            Err(SealError::Forged(_))
        ));
        let other = ring_of(&[[8; 32]]);
        assert!(matches!(
            other.open(&sealed, b"place:1"),
            Err(SealError::UnknownKey(_))
        ));
    }

    #[test]
    fn an_altered_ciphertext_is_refused() {
        let ring = ring_of(&[[7; 32]]);
        let mut sealed = ring.seal(b"rt-secret", b"place");
        let mut bytes = BASE64.decode(&sealed.ciphertext).unwrap();
        bytes[0] ^= 1;
        sealed.ciphertext = BASE64.encode(bytes);
        assert!(matches!(
            ring.open(&sealed, b"place"),
            Err(SealError::Forged(_))
        ));
    }

    #[test]
    fn a_rotated_keyring_opens_old_records_and_seals_with_the_new_key() {
        let old = ring_of(&[[1; 32]]);
        let sealed_before = old.seal(b"before", b"c");
        let rotated = ring_of(&[[2; 32], [1; 32]]);
        assert_eq!(rotated.open(&sealed_before, b"c").unwrap(), b"before");
        let sealed_after = rotated.seal(b"after", b"c");
        assert_eq!(sealed_after.key_id, rotated.key_ids()[0]);
        assert_ne!(sealed_after.key_id, sealed_before.key_id);
    }

    #[test]
    fn key_files_hold_raw_bytes_or_hex_lines() {
        let raw = [0xAB; 32];
        assert_eq!(parse_keys(&raw).unwrap(), vec![raw]);
        let text = format!("# current\n{}\n\n{}\n", "ab".repeat(32), "01".repeat(32));
        assert_eq!(
            parse_keys(text.as_bytes()).unwrap(),
            vec![[0xAB; 32], [0x01; 32]]
        );
        assert!(parse_keys(b"too short").is_none());
        assert!(parse_keys(format!("{}zz\n", "ab".repeat(31)).as_bytes()).is_none());
        assert!(parse_keys(b"").unwrap().is_empty());
        assert!(Keyring::from_keys(&[]).is_none());
    }

    #[test]
    fn debug_shows_key_ids_only() {
        let ring = ring_of(&[[0x42; 32]]);
        let shown = format!("{ring:?}");
        assert!(shown.contains(ring.key_ids()[0]), "{shown}");
        assert!(!shown.contains("42424242"), "{shown}");
    }
}
