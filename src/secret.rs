//! Reading secrets from files or the environment, never from flag values.

use std::path::{Path, PathBuf};

use secrecy::SecretString;

/// Where a secret came from, for `--check` output and error texts (never its value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretOrigin {
    /// Read from this file.
    File(PathBuf),
    /// Taken from this environment variable.
    Env(&'static str),
}

impl std::fmt::Display for SecretOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretOrigin::File(path) => write!(f, "file {}", path.display()),
            SecretOrigin::Env(name) => write!(f, "environment variable {name}"),
        }
    }
}

/// A secret with its origin.
#[derive(Clone, Debug)]
pub struct LoadedSecret {
    /// The value; its `Debug` is redacted.
    pub value: SecretString,
    /// Where it came from.
    pub origin: SecretOrigin,
}

/// Why a secret could not be loaded. Texts name the source, never the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("both {file_setting} and {env} are set; set only one")]
    Ambiguous {
        file_setting: &'static str,
        env: &'static str,
    },
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin} is empty")]
    Empty { origin: SecretOrigin },
}

/// Loads a secret from `file` (a path from a flag, env var or TOML) or from
/// the environment variable `env` holding the value itself.
pub fn load_secret(
    file: Option<&Path>,
    file_setting: &'static str,
    env: &'static str,
    lookup_env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<LoadedSecret>, SecretError> {
    let inline = lookup_env(env).filter(|v| !v.is_empty());
    let (value, origin) = match (file, inline) {
        (Some(_), Some(_)) => return Err(SecretError::Ambiguous { file_setting, env }),
        (None, None) => return Ok(None),
        (None, Some(value)) => (value, SecretOrigin::Env(env)),
        (Some(path), None) => return load_secret_file(path).map(Some),
    };
    checked(value, origin).map(Some)
}

/// Loads a secret from the file at `path`, which has no inline alternative.
pub fn load_secret_file(path: &Path) -> Result<LoadedSecret, SecretError> {
    let value = std::fs::read_to_string(path).map_err(|source| SecretError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    checked(value, SecretOrigin::File(path.to_owned()))
}

fn checked(value: String, origin: SecretOrigin) -> Result<LoadedSecret, SecretError> {
    let value = without_line_ending(value);
    if value.is_empty() {
        return Err(SecretError::Empty { origin });
    }
    Ok(LoadedSecret {
        value: SecretString::from(value),
        origin,
    })
}

/// A trailing newline (as editors and `echo` add) is not part of a secret.
fn without_line_ending(mut value: String) -> String {
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn file_secret_loses_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cr3t\r\n").unwrap();
        let loaded = load_secret(Some(&path), "--client-secret-file", "X", &no_env)
            .unwrap()
            .unwrap();
        assert_eq!(loaded.value.expose_secret(), "s3cr3t");
        assert_eq!(loaded.origin, SecretOrigin::File(path));
    }

    #[test]
    fn env_secret_is_used_and_both_is_an_error() {
        let env = |name: &str| (name == "GOTO_X").then(|| "v".to_owned());
        let loaded = load_secret(None, "--x-file", "GOTO_X", &env)
            .unwrap()
            .unwrap();
        assert_eq!(loaded.value.expose_secret(), "v");
        let err = load_secret(Some(Path::new("/x")), "--x-file", "GOTO_X", &env).unwrap_err();
        assert!(err.to_string().contains("set only one"), "{err}");
    }

    #[test]
    fn empty_and_missing_files_are_errors_without_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            load_secret(Some(&path), "f", "E", &no_env),
            Err(SecretError::Empty { .. })
        ));
        let missing = dir.path().join("missing");
        assert!(matches!(
            load_secret(Some(&missing), "f", "E", &no_env),
            Err(SecretError::Unreadable { .. })
        ));
        assert!(load_secret(None, "f", "E", &no_env).unwrap().is_none());
    }
}
