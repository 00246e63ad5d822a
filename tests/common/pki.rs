//! Certificates made for one test: a CA and a server (or client)
//! certificate it signed, written as PEM files into a directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA and one certificate it issued, on disk.
pub struct Pki {
    /// The CA's certificate.
    pub ca: PathBuf,
    /// The issued certificate followed by the CA's (a chain to serve).
    pub chain: PathBuf,
    /// The issued certificate's key.
    pub key: PathBuf,
}

impl Pki {
    /// A CA named `name` issuing a server certificate for `hosts`, in `dir`.
    pub fn server(dir: &Path, name: &str, hosts: &[&str]) -> Self {
        Self::issue(dir, name, hosts, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A CA named `name` issuing a client certificate, in `dir`.
    pub fn client(dir: &Path, name: &str) -> Self {
        Self::issue(
            dir,
            name,
            &["client.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn issue(dir: &Path, name: &str, hosts: &[&str], usage: ExtendedKeyUsagePurpose) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        let mut params = CertificateParams::new(hosts).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test certificate"));
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer).unwrap();
        let write = |file: &str, text: String| {
            let path = dir.join(format!("{name}-{file}"));
            std::fs::write(&path, text).unwrap();
            path
        };
        Self {
            ca: write("ca.pem", ca_cert.pem()),
            chain: write("chain.pem", format!("{}{}", cert.pem(), ca_cert.pem())),
            key: write("key.pem", key.serialize_pem()),
        }
    }

    /// The chain and key as the stand-in's TLS option takes them.
    pub fn tls(&self) -> (Vec<u8>, Vec<u8>) {
        (
            std::fs::read(&self.chain).unwrap(),
            std::fs::read(&self.key).unwrap(),
        )
    }
}
