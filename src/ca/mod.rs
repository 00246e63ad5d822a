//! The local certificate authority behind forward mode's TLS interception.
//!
//! A client that sends `CONNECT api.getgo.com:443` through the proxy gets its
//! TLS terminated with a certificate for that host, minted here from a CA the
//! client has been told to trust (`goto-auth-proxy ca init` makes one and says
//! how). The CA's key is read once, kept in memory and never shown; minted
//! leaves live only in memory.

mod der;
pub mod init;
mod leaf;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::InconsistentKeys;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};

pub use self::init::{default_paths, CaPaths, CERT_FILE_NAME, KEY_FILE_NAME};
use self::leaf::{LeafCache, MAX_HOSTS};

/// How long a CA made by [`CertificateAuthority::generate`] is valid: about ten years.
const CA_LIFETIME: Duration = Duration::from_secs(3652 * 24 * 3600);
/// How far a new CA's notBefore lies in the past, for clients whose clocks run behind.
const CA_BACKDATE: Duration = Duration::from_secs(24 * 3600);

/// Why a CA could not be made, loaded or used. No text ever holds the key.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The certificate or the key file does not exist (the caller exits 64).
    #[error(
        "no CA at {} and {}; run `goto-auth-proxy ca init` to create one",
        cert.display(),
        key.display()
    )]
    Missing { cert: PathBuf, key: PathBuf },
    /// A file exists but cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The certificate is not PEM, or not one that may sign certificates.
    #[error("the CA certificate ({origin}) cannot be used: {reason}")]
    InvalidCertificate { origin: String, reason: String },
    /// The key is not an unencrypted PKCS#8 key of a supported type.
    #[error("the CA key ({origin}) cannot be used: {reason}")]
    InvalidKey {
        origin: String,
        reason: &'static str,
    },
    /// The key is another certificate's.
    #[error("the CA key ({key}) does not belong to the CA certificate ({cert})")]
    KeyMismatch { cert: String, key: String },
    /// A leaf was asked for a name that is neither a DNS name nor an IP address.
    #[error("cannot make a certificate for {host:?}: it is neither a DNS name nor an IP address")]
    InvalidHost { host: String },
    /// Making or signing a certificate failed.
    #[error("cannot make a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused a minted key or the server configuration.
    #[error("cannot set up TLS with a minted certificate: {0}")]
    Tls(#[from] rustls::Error),
}

/// A freshly generated CA, for `ca init` to write to disk.
#[derive(Debug)]
pub struct NewAuthority {
    /// The CA's common name; its random suffix tells two installs apart in a trust store.
    pub name: String,
    /// The self-signed CA certificate, PEM.
    pub cert_pem: String,
    /// The CA's private key, PKCS#8 PEM.
    pub key_pem: SecretString,
}

/// A CA that mints short-lived leaf certificates for the hosts the proxy
/// intercepts, and caches them (with a TLS server configuration each) in memory.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's subject exactly as its certificate encodes it: the leaves' issuer name.
    subject: Vec<u8>,
    /// The CA certificate and any further ones in its file, sent after each leaf.
    chain: Vec<CertificateDer<'static>>,
    cert_pem: String,
    provider: Arc<CryptoProvider>,
    leaves: LeafCache,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("issuer", &self.issuer)
            .field("key", &"[redacted]")
            .field("cached_hosts", &self.leaves.len())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a new CA: an ECDSA P-256 key and a self-signed certificate
    /// valid for about ten years that may sign leaf certificates only.
    pub fn generate() -> Result<NewAuthority, CaError> {
        let key = KeyPair::generate()?;
        let name = format!(
            "goto-auth-proxy local CA {}",
            random_bytes::<4>()?
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect::<String>()
        );
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "goto-auth-proxy");
        params
            .distinguished_name
            .push(DnType::CommonName, name.as_str());
        params.serial_number = Some(random_serial()?);
        // Path length 0: whoever obtains the key can mint leaves, but no further CAs.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - CA_BACKDATE).into();
        params.not_after = (now + CA_LIFETIME).into();
        // The default key identifier method gives the certificate a Subject Key Identifier.
        let certificate = params.self_signed(&key)?;
        Ok(NewAuthority {
            name,
            cert_pem: certificate.pem(),
            key_pem: SecretString::from(key.serialize_pem()),
        })
    }

    /// Loads the CA certificate (PEM; the first certificate is the CA, any
    /// others are sent after it) and its private key (PKCS#8 PEM).
    ///
    /// Either file missing is [`CaError::Missing`], naming both.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, CaError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => CaError::Missing {
                    cert: cert_file.to_owned(),
                    key: key_file.to_owned(),
                },
                _ => CaError::Unreadable {
                    path: path.to_owned(),
                    source,
                },
            })
        };
        let cert_pem = read(cert_file)?;
        let key_pem = SecretString::from(read(key_file)?);
        warn_if_exposed(key_file);
        Self::parse(
            cert_pem,
            &key_pem,
            &cert_file.display().to_string(),
            &key_file.display().to_string(),
        )
    }

    /// A CA from its certificate and key as PEM text; see [`Self::load`].
    pub fn from_pem(cert_pem: &str, key_pem: &SecretString) -> Result<Self, CaError> {
        Self::parse(cert_pem.to_owned(), key_pem, "PEM text", "PEM text")
    }

    /// The CA certificate (and any further certificates of its file), PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The leaf certificate and key for `host` (a DNS name, or an IP address
    /// with or without brackets), with the chain `[leaf, CA]`.
    pub fn certified_key(&self, host: &str) -> Result<Arc<CertifiedKey>, CaError> {
        Ok(Arc::clone(
            &self.leaf(host, SystemTime::now())?.certified_key,
        ))
    }

    /// A TLS server configuration presenting `host`'s leaf and offering
    /// HTTP/2 and HTTP/1.1 by ALPN.
    pub fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, CaError> {
        Ok(Arc::clone(
            &self.leaf(host, SystemTime::now())?.server_config,
        ))
    }

    fn parse(
        cert_pem: String,
        key_pem: &SecretString,
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Self, CaError> {
        let invalid_certificate = |reason: &str| CaError::InvalidCertificate {
            origin: cert_origin.to_owned(),
            reason: reason.to_owned(),
        };
        let invalid_key = |reason| CaError::InvalidKey {
            origin: key_origin.to_owned(),
            reason,
        };
        let chain = crate::tls::certificates_from_pem(cert_pem.as_bytes())
            .map_err(|error| invalid_certificate(&error.to_string()))?;
        let ca = chain
            .first()
            .ok_or_else(|| invalid_certificate("it holds no PEM certificate"))?;

        let key = match PrivateKeyDer::from_pem_slice(key_pem.expose_secret().as_bytes()) {
            Ok(key @ PrivateKeyDer::Pkcs8(_)) => key,
            Ok(PrivateKeyDer::Pkcs1(_) | PrivateKeyDer::Sec1(_)) => {
                return Err(invalid_key(
                    "it is not in PKCS#8 form; convert it with \
                     `openssl pkcs8 -topk8 -nocrypt -in OLD -out NEW`",
                ))
            }
            _ => return Err(invalid_key("it holds no unencrypted PEM private key")),
        };
        let provider = crate::tls::provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|_| invalid_key(UNSUPPORTED_KEY))?;
        match CertifiedKey::new(vec![ca.clone()], signing_key).keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
                return Err(CaError::KeyMismatch {
                    cert: cert_origin.to_owned(),
                    key: key_origin.to_owned(),
                })
            }
            Err(error) => return Err(invalid_certificate(&error.to_string())),
        }
        let key = KeyPair::try_from(&key).map_err(|_| invalid_key(UNSUPPORTED_KEY))?;

        // The issuer's key identifier comes from the certificate's Subject Key
        // Identifier, so each leaf's Authority Key Identifier matches it.
        let issuer = Issuer::from_ca_cert_der(ca, key)
            .map_err(|error| invalid_certificate(&error.to_string()))?;
        let usages = issuer.key_usages();
        if !usages.is_empty() && !usages.contains(&KeyUsagePurpose::KeyCertSign) {
            return Err(invalid_certificate(
                "its KeyUsage does not allow signing certificates (keyCertSign)",
            ));
        }
        let subject = der::subject(ca)
            .ok_or_else(|| invalid_certificate("its subject cannot be read"))?
            .to_vec();
        Ok(Self {
            issuer,
            subject,
            chain,
            cert_pem,
            provider,
            leaves: LeafCache::new(MAX_HOSTS),
        })
    }
}

const UNSUPPORTED_KEY: &str =
    "its type is not supported (use ECDSA P-256 or P-384, Ed25519, or RSA)";

/// Random bytes from the operating system.
fn random_bytes<const N: usize>() -> Result<[u8; N], CaError> {
    let mut bytes = [0; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    Ok(bytes)
}

/// A random certificate serial number: 16 bytes with the high bit clear
/// (serials are positive) and the next one set (no leading zero to drop).
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = random_bytes::<16>()?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn warn_if_exposed(key_file: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(key_file) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %key_file.display(),
                mode = format_args!("{mode:o}"),
                "the CA key can be read by other users; run `chmod 600` on it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls_pki_types::{ServerName, UnixTime};

    fn authority() -> (NewAuthority, CertificateAuthority) {
        let new = CertificateAuthority::generate().unwrap();
        let authority = CertificateAuthority::from_pem(&new.cert_pem, &new.key_pem).unwrap();
        (new, authority)
    }

    /// Whether `key`'s chain verifies for `name` at `now` against only the CA.
    fn verifies(
        authority: &CertificateAuthority,
        key: &CertifiedKey,
        name: &str,
        now: SystemTime,
    ) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(authority.chain[0].clone()).unwrap();
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
                .build()
                .unwrap();
        let since_epoch = now.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        verifier
            .verify_server_cert(
                &key.cert[0],
                &key.cert[1..],
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                UnixTime::since_unix_epoch(since_epoch),
            )
            .map(|_| ())
    }

    #[test]
    fn the_authority_can_be_shared_between_tasks() {
        fn shareable<T: Send + Sync>() {}
        shareable::<CertificateAuthority>();
    }

    #[test]
    fn leaves_verify_for_their_own_host_only() {
        let (_, authority) = authority();
        let now = SystemTime::now();
        let key = authority.certified_key("api.getgo.com").unwrap();
        assert_eq!(key.cert.len(), 2);
        assert_eq!(key.cert[1], authority.chain[0]);
        verifies(&authority, &key, "api.getgo.com", now).unwrap();
        assert!(verifies(&authority, &key, "api.goto.com", now).is_err());

        for host in ["127.0.0.1", "[::1]"] {
            let key = authority.certified_key(host).unwrap();
            let ip = host.trim_matches(['[', ']']);
            verifies(&authority, &key, ip, now).unwrap();
        }
        let day = Duration::from_secs(24 * 3600);
        assert!(verifies(&authority, &key, "api.getgo.com", now + day).is_err());
    }

    #[test]
    fn a_host_gets_one_leaf_until_it_nears_its_end() {
        let (_, authority) = authority();
        let now = SystemTime::now();
        let first = authority.leaf("api.getgo.com", now).unwrap();
        let again = authority.leaf("API.getgo.com.", now).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "one leaf per host, any case");
        assert!(Arc::ptr_eq(
            &first.server_config,
            &authority.server_config("api.getgo.com").unwrap()
        ));

        let later = now + Duration::from_secs(22 * 3600 + 1800);
        let renewed = authority.leaf("api.getgo.com", later).unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed), "re-minted with <1h left");
        verifies(&authority, &renewed.certified_key, "api.getgo.com", later).unwrap();
    }

    #[test]
    fn the_cache_is_bounded_and_drops_the_oldest_leaf() {
        let (_, mut authority) = authority();
        authority.leaves = LeafCache::new(2);
        let now = SystemTime::now();
        let a = authority.leaf("a.example", now).unwrap();
        authority
            .leaf("b.example", now + Duration::from_secs(1))
            .unwrap();
        authority
            .leaf("c.example", now + Duration::from_secs(2))
            .unwrap();
        assert_eq!(authority.leaves.len(), 2);
        let a_again = authority.leaf("a.example", now).unwrap();
        assert!(!Arc::ptr_eq(&a, &a_again), "the oldest was evicted");
    }

    #[test]
    fn nonsense_hosts_are_refused() {
        let (_, authority) = authority();
        for host in ["", "a b", "bad_host!", "ex\u{e4}mple.com"] {
            assert!(
                matches!(
                    authority.certified_key(host),
                    Err(CaError::InvalidHost { .. })
                ),
                "{host:?}"
            );
        }
    }

    #[test]
    fn the_generated_ca_names_are_unique() {
        let (one, two) = (
            CertificateAuthority::generate().unwrap(),
            CertificateAuthority::generate().unwrap(),
        );
        assert!(one.name.starts_with("goto-auth-proxy local CA "));
        assert_ne!(one.name, two.name);
    }

    #[test]
    fn a_key_of_another_ca_is_refused() {
        let (one, two) = (
            CertificateAuthority::generate().unwrap(),
            CertificateAuthority::generate().unwrap(),
        );
        let error = CertificateAuthority::from_pem(&one.cert_pem, &two.key_pem).unwrap_err();
        assert!(matches!(error, CaError::KeyMismatch { .. }), "{error}");
    }

    #[test]
    fn a_certificate_that_may_not_sign_certificates_is_refused() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["not-a-ca.example".to_owned()]).unwrap();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let certificate = params.self_signed(&key).unwrap();
        let error = CertificateAuthority::from_pem(
            &certificate.pem(),
            &SecretString::from(key.serialize_pem()),
        )
        .unwrap_err();
        assert!(error.to_string().contains("keyCertSign"), "{error}");
    }

    #[test]
    fn missing_files_name_both_paths_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca-key.pem"));
        let new = CertificateAuthority::generate().unwrap();
        std::fs::write(&cert, &new.cert_pem).unwrap();
        let error = CertificateAuthority::load(&cert, &key).unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, CaError::Missing { .. }), "{text}");
        assert!(
            text.contains(&*cert.to_string_lossy())
                && text.contains(&*key.to_string_lossy())
                && text.contains("goto-auth-proxy ca init"),
            "{text}"
        );
    }

    #[test]
    fn files_written_by_generate_load() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca-key.pem"));
        let new = CertificateAuthority::generate().unwrap();
        std::fs::write(&cert, &new.cert_pem).unwrap();
        std::fs::write(&key, new.key_pem.expose_secret()).unwrap();
        let authority = CertificateAuthority::load(&cert, &key).unwrap();
        assert_eq!(authority.cert_pem(), new.cert_pem);
        authority.certified_key("api.jive.com").unwrap();
    }

    /// The base64 lines of a PEM text: what must never be shown of a key.
    fn body_lines(pem: &str) -> Vec<&str> {
        pem.lines()
            .filter(|line| !line.starts_with("-----") && line.len() > 8)
            .collect()
    }

    #[test]
    fn no_text_shows_the_key() {
        let (new, authority) = authority();
        let other = CertificateAuthority::generate().unwrap();
        let sec1 = SecretString::from(
            "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBxGe7n3yQm0aVvQv1hK2w5pZk8cB4mRr5kq2ZbYQ1pLoAoGCCqGSM49\n\
             -----END EC PRIVATE KEY-----\n",
        );
        let garbage = SecretString::from("not a key: c2VjcmV0LWtleS1tYXRlcmlhbA==");
        let errors = [
            CertificateAuthority::from_pem(&new.cert_pem, &other.key_pem).unwrap_err(),
            CertificateAuthority::from_pem(&new.cert_pem, &sec1).unwrap_err(),
            CertificateAuthority::from_pem(&new.cert_pem, &garbage).unwrap_err(),
            CertificateAuthority::from_pem("junk", &new.key_pem).unwrap_err(),
            CertificateAuthority::load(Path::new("/nonexistent/ca.pem"), Path::new("/k"))
                .unwrap_err(),
            CertificateAuthority::load(Path::new("/"), Path::new("/")).unwrap_err(),
            authority.certified_key("a b").unwrap_err(),
        ];
        assert!(errors[1].to_string().contains("PKCS#8"), "{}", errors[1]);
        let mut texts = vec![
            format!("{authority:?}"),
            format!("{new:?}"),
            format!("{other:?}"),
        ];
        for error in &errors {
            texts.push(format!("{error:?}"));
            texts.push(error.to_string());
        }
        let secrets = [&new.key_pem, &other.key_pem, &sec1, &garbage];
        for text in &texts {
            for secret in secrets {
                for line in body_lines(secret.expose_secret()) {
                    assert!(!text.contains(line), "{text}");
                }
            }
            assert!(!text.contains("c2VjcmV0"), "{text}");
        }
    }
}
