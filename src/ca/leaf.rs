//! Leaf certificates minted per host, and the bounded in-memory cache that
//! keeps each one (with its TLS server configuration) until it nears its end.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::ServerConfig;
use rustls_pki_types::{DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{der, random_serial, CaError, CertificateAuthority};

/// How many hosts' leaves are kept; past that the oldest is dropped.
pub(super) const MAX_HOSTS: usize = 1024;
/// How long a leaf is valid, counted from its backdated notBefore.
const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How far a leaf's notBefore lies in the past, for clients whose clocks run behind.
const LEAF_BACKDATE: Duration = Duration::from_secs(3600);
/// A cached leaf with less than this left is replaced, so no client sees one expire.
const RENEW_BEFORE: Duration = Duration::from_secs(3600);
/// RFC 5280's upper bound on a common name.
const MAX_COMMON_NAME: usize = 64;

/// A minted leaf: its chain and key, and a server configuration presenting it.
pub(super) struct Leaf {
    pub(super) certified_key: Arc<CertifiedKey>,
    pub(super) server_config: Arc<ServerConfig>,
    minted: SystemTime,
    not_after: SystemTime,
}

impl Leaf {
    fn fresh_at(&self, now: SystemTime) -> bool {
        self.not_after
            .duration_since(now)
            .is_ok_and(|left| left >= RENEW_BEFORE)
    }
}

/// Leaves by host name. Every intercepted connection reads it, so the lock
/// is held only to look up or insert, never while minting.
pub(super) struct LeafCache {
    capacity: usize,
    leaves: Mutex<HashMap<String, Arc<Leaf>>>,
}

impl LeafCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            leaves: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    fn get(&self, host: &str, now: SystemTime) -> Option<Arc<Leaf>> {
        self.lock()
            .get(host)
            .filter(|leaf| leaf.fresh_at(now))
            .cloned()
    }

    fn insert(&self, host: String, leaf: Arc<Leaf>) {
        let mut leaves = self.lock();
        if leaves.len() >= self.capacity && !leaves.contains_key(&host) {
            // A scan, but only when full; the proxy intercepts a handful of hosts.
            let oldest = leaves
                .iter()
                .min_by_key(|(_, leaf)| leaf.minted)
                .map(|(host, _)| host.clone());
            if let Some(oldest) = oldest {
                leaves.remove(&oldest);
            }
        }
        leaves.insert(host, leaf);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Leaf>>> {
        // Every update is a single insert or remove: a panic elsewhere cannot
        // leave the map half-changed.
        self.leaves.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl CertificateAuthority {
    /// `host`'s leaf: the cached one while fresh at `now`, else a new one.
    /// Two connections racing for a new host may both mint; one leaf wins the
    /// cache and both are valid.
    pub(super) fn leaf(&self, host: &str, now: SystemTime) -> Result<Arc<Leaf>, CaError> {
        let (name, san) = subject_alt_name(host)?;
        if let Some(leaf) = self.leaves.get(&name, now) {
            return Ok(leaf);
        }
        let leaf = Arc::new(self.mint(&name, san, now)?);
        self.leaves.insert(name, Arc::clone(&leaf));
        Ok(leaf)
    }

    fn mint(&self, name: &str, san: SanType, now: SystemTime) -> Result<Leaf, CaError> {
        let key = KeyPair::generate()?;
        let not_before = now - LEAF_BACKDATE;
        let not_after = not_before + LEAF_LIFETIME;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        // A longer name is in the SAN alone; rcgen then marks the SAN
        // critical, as RFC 5280 requires of a certificate with an empty subject.
        if name.len() <= MAX_COMMON_NAME {
            params.distinguished_name.push(DnType::CommonName, name);
        }
        params.subject_alt_names = vec![san];
        params.serial_number = Some(random_serial()?);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let certificate = params.signed_by(&key, &self.issuer)?;
        let leaf = der::with_issuer(certificate.der(), &self.subject, self.issuer.key())?;

        let chain = std::iter::once(leaf)
            .chain(self.chain.iter().cloned())
            .collect();
        let private_key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = self.provider.key_provider.load_private_key(private_key)?;
        let certified_key = Arc::new(CertifiedKey::new(chain, signing_key));
        let mut server_config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(Arc::clone(&certified_key))));
        server_config.alpn_protocols = crate::tls::SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Leaf {
            certified_key,
            server_config: Arc::new(server_config),
            minted: now,
            not_after,
        })
    }
}

/// The normalized name for `host` (the cache key and the common name) and
/// its SAN: an IP address (brackets optional) or a DNS name, lower-cased,
/// without a trailing dot.
fn subject_alt_name(host: &str) -> Result<(String, SanType), CaError> {
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok((ip.to_string(), SanType::IpAddress(ip)));
    }
    let invalid = || CaError::InvalidHost {
        host: host.to_owned(),
    };
    let dns = host.strip_suffix('.').unwrap_or(host);
    let name = DnsName::try_from(dns)
        .map_err(|_| invalid())?
        .to_lowercase_owned();
    let name: &str = name.as_ref();
    let san = Ia5String::try_from(name).map_err(|_| invalid())?;
    Ok((name.to_owned(), SanType::DnsName(san)))
}
