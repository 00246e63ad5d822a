//! `--store` and what goes with it: where token state is shared.

use std::path::PathBuf;
use std::sync::Arc;

use secrecy::SecretString;
use serde::{Serialize, Serializer};

use super::parse;
use super::ConfigError;
use crate::secret::{load_secret_file, LoadedSecret};
use crate::store::seal::Keyring;

/// Where token state lives.
#[derive(Clone, Debug, Serialize)]
pub struct StoreSettings {
    /// The state files alone, or Redis.
    #[serde(rename = "store", serialize_with = "kind")]
    pub kind: StoreKind,
    /// The Redis password, when not in the URL.
    #[serde(
        rename = "store_password_file",
        serialize_with = "super::optional_origin"
    )]
    pub password: Option<LoadedSecret>,
    /// The key file that seals tokens in Redis.
    #[serde(rename = "store_key_file", serialize_with = "key_file")]
    pub key: Option<(PathBuf, Arc<Keyring>)>,
}

/// The kinds of store.
#[derive(Clone, Debug)]
pub enum StoreKind {
    /// Each account's state file, nothing shared.
    File,
    /// One Redis server shared by replicas.
    Redis {
        /// The URL as given, password and all.
        url: SecretString,
        /// The URL without its password, for logs and `run --check`.
        location: String,
    },
}

impl StoreSettings {
    /// The file store alone.
    pub fn file() -> Self {
        Self {
            kind: StoreKind::File,
            password: None,
            key: None,
        }
    }

    /// `--store`, `--store-password-file` and `--store-key-file`, checked.
    pub fn resolve(
        store: Option<&str>,
        password_file: Option<PathBuf>,
        key_file: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        let kind = match store.unwrap_or("file") {
            "file" => StoreKind::File,
            url => StoreKind::Redis {
                location: redis_location(url)?,
                url: SecretString::from(url.to_owned()),
            },
        };
        let redis = matches!(kind, StoreKind::Redis { .. });
        let needs_redis = |setting: &'static str| {
            ConfigError::new(
                setting,
                "only has a use with a Redis store: set --store redis://HOST:PORT",
            )
        };
        let password = match parse::utf8_path("--store-password-file", password_file)? {
            Some(_) if !redis => return Err(needs_redis("--store-password-file")),
            Some(path) => Some(
                load_secret_file(&path)
                    .map_err(|e| ConfigError::new("--store-password-file", e.to_string()))?,
            ),
            None => None,
        };
        let key = match parse::utf8_path("--store-key-file", key_file)? {
            Some(_) if !redis => return Err(needs_redis("--store-key-file")),
            Some(path) => {
                let keyring = Keyring::from_file(&path)
                    .map_err(|e| ConfigError::new("--store-key-file", e.to_string()))?;
                Some((path, Arc::new(keyring)))
            }
            None => None,
        };
        Ok(Self {
            kind,
            password,
            key,
        })
    }

    /// Whether `other` names the same store, password and keys.
    pub fn same_as(&self, other: &StoreSettings) -> bool {
        let location = |s: &StoreSettings| match &s.kind {
            StoreKind::File => None,
            StoreKind::Redis { location, .. } => Some(location.clone()),
        };
        let password = |s: &StoreSettings| s.password.as_ref().map(|p| p.origin.clone());
        let keys = |s: &StoreSettings| {
            s.key.as_ref().map(|(_, keyring)| {
                keyring
                    .key_ids()
                    .into_iter()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
        };
        location(self) == location(other)
            && password(self) == password(other)
            && keys(self) == keys(other)
    }

    /// The keyring that seals tokens, if any.
    pub fn keyring(&self) -> Option<Arc<Keyring>> {
        self.key.as_ref().map(|(_, keyring)| keyring.clone())
    }
}

/// Checks a Redis URL and returns it without its password.
fn redis_location(url: &str) -> Result<String, ConfigError> {
    let invalid = |why: &str| {
        ConfigError::new(
            "--store",
            format!(
                "{why}: expected `file`, or redis://[user[:password]@]host:port[/db] or rediss://…, got {}",
                without_password(url)
            ),
        )
    };
    let parsed = url::Url::parse(url).map_err(|_| invalid("not a URL"))?;
    if !matches!(parsed.scheme(), "redis" | "rediss") {
        return Err(invalid("not a Redis URL"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    let db = parsed.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return Err(invalid("the path must be a database number"));
    }
    Ok(without_password(url))
}

/// `url` with any password replaced, for every place a store URL is shown.
pub fn without_password(url: &str) -> String {
    match url::Url::parse(url) {
        // `@` outside the user part (`redis:/user:pw@host`, say) may still be a password.
        Ok(parsed) if parsed.host_str().is_none() && url.contains('@') => {
            "[a value with `@` but no host]".to_owned()
        }
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("REDACTED"));
            }
            parsed.to_string()
        }
        // Not a URL: nothing to take apart, and nothing shown that may be a secret.
        Err(_) if url.contains('@') => "[a value with `@` that is not a URL]".to_owned(),
        Err(_) => url.to_owned(),
    }
}

fn kind<S: Serializer>(value: &StoreKind, s: S) -> Result<S::Ok, S::Error> {
    match value {
        StoreKind::File => s.serialize_str("file"),
        StoreKind::Redis { location, .. } => s.serialize_str(location),
    }
}

fn key_file<S: Serializer>(
    value: &Option<(PathBuf, Arc<Keyring>)>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some((path, keyring)) => s.collect_str(&format_args!(
            "{} (key ids {})",
            path.display(),
            keyring.key_ids().join(", ")
        )),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let shown = without_password("redis://app:hunter2@redis.internal:6379/2");
        assert_eq!(shown, "redis://app:REDACTED@redis.internal:6379/2");
        assert!(!format!(
            "{:?}",
            super::super::options::StoreUrl("redis://:hunter2@h:1".into())
        )
        .contains("hunter2"));
        let settings = StoreSettings::resolve(Some("redis://:hunter2@h:6379"), None, None).unwrap();
        assert!(!format!("{settings:?}").contains("hunter2"));
        let error = StoreSettings::resolve(Some("redis:/x@hunter2"), None, None).unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    #[test]
    fn only_file_or_redis_urls_are_stores() {
        assert!(matches!(
            StoreSettings::resolve(None, None, None).unwrap().kind,
            StoreKind::File
        ));
        for bad in ["http://h:1", "redis://", "redis://h:1/zero", "mysql"] {
            let error = StoreSettings::resolve(Some(bad), None, None).unwrap_err();
            assert!(error.to_string().contains("--store"), "{bad}: {error}");
        }
        assert!(StoreSettings::resolve(Some("rediss://h:6380/1"), None, None).is_ok());
    }

    #[test]
    fn redis_only_settings_need_redis() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "ab".repeat(32)).unwrap();
        let error = StoreSettings::resolve(None, None, Some(key.clone())).unwrap_err();
        assert!(error.to_string().contains("--store-key-file"), "{error}");
        let settings = StoreSettings::resolve(Some("redis://h:1"), None, Some(key)).unwrap();
        assert!(settings.keyring().is_some());
        std::fs::write(dir.path().join("bad"), "not a key").unwrap();
        let error = StoreSettings::resolve(Some("redis://h:1"), None, Some(dir.path().join("bad")))
            .unwrap_err();
        assert!(error.to_string().contains("64 hex"), "{error}");
    }
}
