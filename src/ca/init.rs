//! `goto-auth-proxy ca init`: make a CA, write it where `run --forward`
//! looks for it, and say how to make clients trust it.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use secrecy::ExposeSecret;

use super::{CaError, CertificateAuthority};
use crate::config::DEFAULT_LISTEN;
use crate::store::write_atomically;

/// The CA certificate's file name in its directory.
pub const CERT_FILE_NAME: &str = "ca.pem";
/// The CA key's file name in its directory (mode 0600).
pub const KEY_FILE_NAME: &str = "ca-key.pem";

/// Where a CA's certificate and key are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaPaths {
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// The private key, PKCS#8 PEM.
    pub key: PathBuf,
}

impl CaPaths {
    /// [`CERT_FILE_NAME`] and [`KEY_FILE_NAME`] in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join(CERT_FILE_NAME),
            key: dir.join(KEY_FILE_NAME),
        }
    }
}

/// The directory of `state_file`: where the CA goes by default.
pub fn default_dir(state_file: &Path) -> PathBuf {
    match state_file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Where `run --forward` finds the CA unless told otherwise: beside the state file.
pub fn default_paths(state_file: &Path) -> CaPaths {
    CaPaths::in_dir(&default_dir(state_file))
}

/// Why `ca init` wrote nothing, or not everything.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A file is in the way and `--force` was not given.
    #[error(
        "{} already exists; pass --force to replace the CA (clients that trust the old one \
         will then need the new one)",
        path.display()
    )]
    Exists { path: PathBuf },
    /// The CA could not be made.
    #[error(transparent)]
    Generate(#[from] CaError),
    /// A file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// A CA that [`init`] wrote.
#[derive(Debug)]
pub struct Written {
    /// Where its files are.
    pub paths: CaPaths,
    /// Its common name, as trust stores list it.
    pub name: String,
}

/// Makes a new CA and writes it into `dir` (created with mode 0700 if
/// needed): the certificate (0644) and the key (0600 from the start), each
/// atomically. Without `force`, an existing file of either name is left
/// alone and nothing is written.
pub fn init(dir: &Path, force: bool) -> Result<Written, InitError> {
    let paths = CaPaths::in_dir(dir);
    if !force {
        // Any entry counts, a dangling symlink too: the rename would replace it.
        if let Some(path) = [&paths.cert, &paths.key]
            .into_iter()
            .find(|path| path.symlink_metadata().is_ok())
        {
            return Err(InitError::Exists { path: path.clone() });
        }
    }
    let authority = CertificateAuthority::generate()?;
    let write_error = |path: &Path| {
        let path = path.to_owned();
        move |source| InitError::Write { path, source }
    };
    // The key first, so a certificate on disk always has its key beside it.
    write_atomically(&paths.key, authority.key_pem.expose_secret().as_bytes())
        .map_err(write_error(&paths.key))?;
    write_atomically(&paths.cert, authority.cert_pem.as_bytes())
        .and_then(|()| {
            std::fs::set_permissions(&paths.cert, std::fs::Permissions::from_mode(0o644))
        })
        .map_err(write_error(&paths.cert))?;
    Ok(Written {
        paths,
        name: authority.name,
    })
}

/// What `ca init` prints: where the files are, how to make clients trust the
/// CA, and, unless the files are where `run --forward` looks by default, the
/// settings that point it at them. Never the key.
pub fn report(written: &Written, default_location: bool) -> String {
    let cert = shell_quoted(&written.paths.cert);
    let key = shell_quoted(&written.paths.key);
    let proxy = format!("http://{DEFAULT_LISTEN}");
    let mut text = format!(
        "Created the CA \"{name}\":\n  \
         certificate  {cert}\n  \
         key          {key} (mode 0600; keep it private, it can vouch for any host)\n\n",
        name = written.name,
    );
    if default_location {
        text.push_str("`run --forward` finds these files by default.\n\n");
    } else {
        let _ = write!(
            text,
            "Tell `run --forward` where they are:\n  \
             --ca-cert-file {cert} --ca-key-file {key}\n  \
             or GOTO_CA_CERT_FILE={cert} GOTO_CA_KEY_FILE={key}\n  \
             or ca_cert_file and ca_key_file in the config file\n\n"
        );
    }
    let _ = write!(
        text,
        "Make the clients that use the proxy trust the CA (the examples assume the default\n\
         --listen, {DEFAULT_LISTEN}):\n\
         \n  \
         curl:\n    \
         curl --proxy {proxy} --cacert {cert} https://api.getgo.com/...\n  \
         Python requests:\n    \
         REQUESTS_CA_BUNDLE={cert} HTTPS_PROXY={proxy} python3 app.py\n  \
         Python httpx and the standard library (urllib, ssl):\n    \
         SSL_CERT_FILE={cert} HTTPS_PROXY={proxy} python3 app.py\n  \
         Node.js:\n    \
         NODE_EXTRA_CA_CERTS={cert} HTTPS_PROXY={proxy} node app.js\n    \
         Node's built-in fetch uses HTTPS_PROXY only with NODE_USE_ENV_PROXY=1 (Node 24+)\n    \
         or with an undici ProxyAgent.\n  \
         The system store, Debian/Ubuntu:\n    \
         sudo cp {cert} /usr/local/share/ca-certificates/goto-auth-proxy.crt\n    \
         sudo update-ca-certificates\n  \
         The system store, macOS:\n    \
         sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {cert}\n\
         \n\
         REQUESTS_CA_BUNDLE, SSL_CERT_FILE and --cacert replace the usual roots: a program that\n\
         also reaches other HTTPS hosts needs a bundle of both, for example\n  \
         cat /etc/ssl/certs/ca-certificates.crt {cert} > bundle.pem\n\
         or the system store.\n"
    );
    text
}

/// `path` as a shell word: unchanged if it is safe bare, else single-quoted.
fn shell_quoted(path: &Path) -> String {
    let text = path.to_string_lossy();
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@%=".contains(c);
    if !text.is_empty() && text.chars().all(safe) {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_paths_are_beside_the_state_file() {
        let paths = default_paths(Path::new("/var/lib/gap/state.json"));
        assert_eq!(paths.cert, Path::new("/var/lib/gap/ca.pem"));
        assert_eq!(paths.key, Path::new("/var/lib/gap/ca-key.pem"));
        assert_eq!(default_dir(Path::new("state.json")), Path::new("."));
    }

    #[test]
    fn paths_are_quoted_for_the_shell_when_needed() {
        assert_eq!(shell_quoted(Path::new("/a/ca.pem")), "/a/ca.pem");
        assert_eq!(
            shell_quoted(Path::new("/my dir/ca.pem")),
            "'/my dir/ca.pem'"
        );
        assert_eq!(shell_quoted(Path::new("/it's")), r"'/it'\''s'");
    }

    #[test]
    fn the_report_names_the_settings_only_off_the_default_location() {
        let written = Written {
            paths: CaPaths::in_dir(Path::new("/x")),
            name: "n".to_owned(),
        };
        let elsewhere = report(&written, false);
        assert!(elsewhere.contains("--ca-cert-file /x/ca.pem --ca-key-file /x/ca-key.pem"));
        assert!(elsewhere.contains("GOTO_CA_CERT_FILE=/x/ca.pem"));
        let default = report(&written, true);
        assert!(!default.contains("--ca-cert-file") && !default.contains("GOTO_CA_KEY_FILE"));
        assert!(default.contains("NODE_EXTRA_CA_CERTS=/x/ca.pem"));
    }
}
