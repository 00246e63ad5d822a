//! The local CA as its users meet it: `ca init` through the binary, and
//! minted leaves served over real TLS to clients that trust only the CA
//! (rustls, and Python with OpenSSL's strict X.509 checks).

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use goto_auth_proxy::ca::{CaError, CertificateAuthority};
use goto_auth_proxy::tls;
use rustls_pki_types::ServerName;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::AsyncWriteExt;

const HOST: &str = "api.getgo.com";
const GREETING: &str = "hello\n";

/// A CA as an AD-style corporate PKI names it: two `DC=` parts, which a
/// leaf's issuer must repeat byte for byte. Test material only.
const CORPORATE_CA: &str = "-----BEGIN CERTIFICATE-----
MIICUjCCAdegAwIBAgIUamhPniF0TnQgXTtMJbTjC61lhXowCgYIKoZIzj0EAwMw
ZzETMBEGCgmSJomT8ixkARkWA2NvbTEXMBUGCgmSJomT8ixkARkWB2V4YW1wbGUx
FTATBgNVBAoMDEV4YW1wbGUgQ29ycDEgMB4GA1UEAwwXRXhhbXBsZSBDb3JwIElz
c3VpbmcgQ0EwIBcNMjAwMTAxMDAwMDAwWhgPMjEyMDAxMDEwMDAwMDBaMGcxEzAR
BgoJkiaJk/IsZAEZFgNjb20xFzAVBgoJkiaJk/IsZAEZFgdleGFtcGxlMRUwEwYD
VQQKDAxFeGFtcGxlIENvcnAxIDAeBgNVBAMMF0V4YW1wbGUgQ29ycCBJc3N1aW5n
IENBMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEtIK4y7pd3lIP/8c4Z0iHAx0Izjhq
CcgjLbcTk/ksNsUc2GyyVTxeFdlpiKKiadOhdM7fv65NRsPL2pvUvi200n49cuHz
jH/rxf8d8iJ2gm3eDRUawE9WMV9ZXsouJMYWo0IwQDAPBgNVHRMBAf8EBTADAQH/
MA4GA1UdDwEB/wQEAwIBBjAdBgNVHQ4EFgQUg+7dNzICvSZIZ9HXLmCou+ebXR8w
CgYIKoZIzj0EAwMDaQAwZgIxAMSpeiWCgOTdG+LI+VCVFc7seosHhiX2oa0v9Efw
qwIWdkznVgAGLwFb6NjfziE9BQIxAIidQGnQq/WVP1uR//zZbst68sVNn9OldFLV
Izg+EB/3F9l25tIFyJfvinuxq2MFNg==
-----END CERTIFICATE-----
";
const CORPORATE_CA_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDC+Si0BUKW/Sgh2rPW9
SUtYnpfEdbR8RUacG0KfCMUg4cqJfMhYXsqE7ftKKETz1m+hZANiAAS0grjLul3e
Ug//xzhnSIcDHQjOOGoJyCMttxOT+Sw2xRzYbLJVPF4V2WmIoqJp06F0zt+/rk1G
w8vam9S+LbTSfj1y4fOMf+vF/x3yInaCbd4NFRrAT1YxX1leyi4kxhY=
-----END PRIVATE KEY-----
";

/// Connects to 127.0.0.1:PORT, expects the server to be HOST, and either
/// completes the handshake ("accept") or sees the certificate refused
/// ("refuse"). Python 3.13 verifies strictly by default; older versions are
/// asked to.
const PYTHON_CLIENT: &str = r#"
import socket, ssl, sys
port, cafile, name, expect = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=cafile)
if sys.version_info >= (3, 13):
    assert ctx.verify_flags & ssl.VERIFY_X509_STRICT, "VERIFY_X509_STRICT is not on"
else:
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
ctx.set_alpn_protocols(["h2", "http/1.1"])
try:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        with ctx.wrap_socket(sock, server_hostname=name) as conn:
            alpn = conn.selected_alpn_protocol()
            data = conn.recv(64)
except ssl.SSLCertVerificationError as error:
    print(sys.version.split()[0], "refused:", error.verify_message)
    sys.exit(0 if expect == "refuse" else 1)
print(sys.version.split()[0], "accepted, ALPN", alpn)
assert expect == "accept", "a certificate for another name was accepted"
assert alpn == "h2", alpn
assert data == b"hello\n", data
"#;

/// A tokio-rustls server on 127.0.0.1:0 that sends [`GREETING`] on each
/// connection after the handshake; it stops when dropped.
struct TlsServer {
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl TlsServer {
    fn start(config: Arc<rustls::ServerConfig>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A refused certificate ends the handshake: nothing to answer.
                    if let Ok(mut tls) = acceptor.accept(stream).await {
                        let _ = tls.write_all(GREETING.as_bytes()).await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        Self {
            addr,
            _runtime: runtime,
        }
    }
}

/// A rustls client that trusts only `ca_pem` connects for `name`: the
/// negotiated ALPN protocol and what the server said, or why TLS failed.
fn rustls_client(
    ca_pem: &str,
    addr: SocketAddr,
    name: &str,
    alpn: &[&[u8]],
) -> Result<(Option<Vec<u8>>, String), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in tls::certificates_from_pem(ca_pem.as_bytes()).unwrap() {
        roots.add(certificate).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let connection = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
    let mut stream = rustls::StreamOwned::new(connection, TcpStream::connect(addr).unwrap());
    let mut text = String::new();
    match stream.read_to_string(&mut text) {
        Ok(_) => Ok((stream.conn.alpn_protocol().map(<[u8]>::to_vec), text)),
        Err(error) => Err(error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .cloned()
            .unwrap_or_else(|| panic!("not a TLS error: {error}"))),
    }
}

fn assert_accepted_for_host_only(ca_pem: &str, server: &TlsServer) {
    let both: &[&[u8]] = &[b"h2", b"http/1.1"];
    let (alpn, text) = rustls_client(ca_pem, server.addr, HOST, both).unwrap();
    assert_eq!(
        (alpn.as_deref(), text.as_str()),
        (Some(&b"h2"[..]), GREETING)
    );
    let (alpn, _) = rustls_client(ca_pem, server.addr, HOST, &[b"http/1.1"]).unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));

    let error = rustls_client(ca_pem, server.addr, "api.goto.com", both).unwrap_err();
    assert!(
        matches!(
            error,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{error:?}"
    );
}

/// Whether `program --version` runs (with `env` set).
fn available(program: &str, env: &[(&str, &str)]) -> bool {
    Command::new(program)
        .arg("--version")
        .envs(env.iter().copied())
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Runs [`PYTHON_CLIENT`] with `program` against `server`, trusting `ca_file`.
fn python(
    program: &str,
    env: &[(&str, &str)],
    server: &TlsServer,
    ca_file: &Path,
    name: &str,
    expect: &str,
) {
    let output = Command::new(program)
        .envs(env.iter().copied())
        .arg("-c")
        .arg(PYTHON_CLIENT)
        .arg(server.addr.port().to_string())
        .arg(ca_file)
        .arg(name)
        .arg(expect)
        .output()
        .unwrap();
    let (stdout, stderr) = texts(&output);
    assert!(
        output.status.success(),
        "{program} did not {expect} {name}:\n{stdout}\n{stderr}"
    );
    println!("{program}: {}", stdout.trim());
}

const PYTHON_313: (&str, &[(&str, &str)]) = ("python3.13", &[("PYENV_VERSION", "3.13.0")]);
const PYTHON_3: (&str, &[(&str, &str)]) = ("python3", &[]);

/// Python 3.13 (strict by default) and the usual python3 (asked to be
/// strict) accept the leaf for HOST and refuse it for another name; a
/// missing interpreter is skipped, loudly.
fn assert_python_accepts(server: &TlsServer, ca_file: &Path) {
    for (program, env) in [PYTHON_313, PYTHON_3] {
        if !available(program, env) {
            println!("skipped: no {program} here to check strict X.509 verification");
            continue;
        }
        python(program, env, server, ca_file, HOST, "accept");
        python(program, env, server, ca_file, "api.goto.com", "refuse");
    }
}

fn texts(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn ca_init(args: &[&str], env: &[(&str, &Path)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_goto-auth-proxy"))
        .args(["ca", "init"])
        .args(args)
        // No defaults from this machine's HOME, XDG_STATE_HOME or GOTO_* settings.
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The base64 lines of a PEM key: none may ever be printed.
fn key_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|line| !line.starts_with("-----"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn ca_init_writes_the_files_says_how_to_trust_them_and_keeps_them_without_force() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("state");
    let state_file = dir.join("state.json");
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let env = [("GOTO_STATE_FILE", state_file.as_path())];

    let output = ca_init(&[], &env);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert_eq!(mode(&dir), 0o700, "the directory is created private");
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&cert), 0o644);
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let cert_pem = std::fs::read_to_string(&cert).unwrap();
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let cert_path = cert.display().to_string();
    for line in [
        format!("curl --proxy http://127.0.0.1:8080 --cacert {cert_path} https://{HOST}/"),
        format!("REQUESTS_CA_BUNDLE={cert_path} "),
        format!("SSL_CERT_FILE={cert_path} "),
        format!("NODE_EXTRA_CA_CERTS={cert_path} "),
        "NODE_USE_ENV_PROXY=1".to_owned(),
        "ProxyAgent".to_owned(),
        format!("sudo cp {cert_path} /usr/local/share/ca-certificates/goto-auth-proxy.crt"),
        "sudo update-ca-certificates".to_owned(),
        format!("security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {cert_path}"),
        format!("{}", key.display()),
        "finds these files by default".to_owned(),
    ] {
        assert!(stdout.contains(&line), "missing {line:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("--ca-cert-file"), "{stdout}");
    for line in key_lines(&key_pem) {
        assert!(!stdout.contains(&line) && !stderr.contains(&line));
    }
    assert!(!stdout.contains("PRIVATE KEY"), "{stdout}");
    CertificateAuthority::load(&cert, &key).unwrap();

    // Again without --force: refused, naming the file and --force; nothing changes.
    let output = ca_init(&[], &env);
    let (stdout, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&cert_path) && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), cert_pem);
    assert_eq!(std::fs::read_to_string(&key).unwrap(), key_pem);

    // With --force: a new CA, the key still private from the start.
    let output = ca_init(&["--force"], &env);
    assert!(output.status.success(), "{:?}", texts(&output));
    assert_ne!(std::fs::read_to_string(&cert).unwrap(), cert_pem);
    assert_ne!(std::fs::read_to_string(&key).unwrap(), key_pem);
    assert_eq!(mode(&key), 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name != "ca.pem" && name != "ca-key.pem")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn ca_init_follows_the_config_file_and_names_the_settings_for_another_dir() {
    let temp = tempfile::tempdir().unwrap();
    let state_file = temp.path().join("from-config/state.json");
    let config = temp.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!("state_file = \"{}\"\n", state_file.display()),
    )
    .unwrap();
    let output = ca_init(&[], &[("GOTO_PROXY_CONFIG", config.as_path())]);
    assert!(output.status.success(), "{:?}", texts(&output));
    assert!(temp.path().join("from-config/ca-key.pem").exists());

    let other = temp.path().join("elsewhere");
    let output = ca_init(
        &[
            "--config",
            &config.to_string_lossy(),
            "--dir",
            &other.to_string_lossy(),
        ],
        &[],
    );
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let (cert, key) = (other.join("ca.pem"), other.join("ca-key.pem"));
    for line in [
        format!(
            "--ca-cert-file {} --ca-key-file {}",
            cert.display(),
            key.display()
        ),
        format!(
            "GOTO_CA_CERT_FILE={} GOTO_CA_KEY_FILE={}",
            cert.display(),
            key.display()
        ),
    ] {
        assert!(stdout.contains(&line), "missing {line:?} in:\n{stdout}");
    }
}

#[test]
fn a_leaf_is_accepted_for_its_host_by_clients_trusting_only_the_ca() {
    let temp = tempfile::tempdir().unwrap();
    let new = CertificateAuthority::generate().unwrap();
    let ca = CertificateAuthority::from_pem(&new.cert_pem, &new.key_pem).unwrap();
    let server = TlsServer::start(ca.server_config(HOST).unwrap());
    assert_accepted_for_host_only(ca.cert_pem(), &server);

    let ca_file = temp.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    assert_python_accepts(&server, &ca_file);
}

#[test]
fn a_ca_made_elsewhere_mints_leaves_that_verify() {
    // One made here with another subject, an explicit key identifier and P-384.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CountryName, "DE");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationalUnitName, "Platform Security");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Test Intermediate CA R7");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let key_id: Vec<u8> = (1..=20).collect();
    params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(key_id.clone());
    let foreign = params.self_signed(&key).unwrap();
    let foreign_key = SecretString::from(key.serialize_pem());

    let temp = tempfile::tempdir().unwrap();
    for (name, cert_pem, key_pem) in [
        ("made with rcgen", foreign.pem(), foreign_key),
        (
            "with two DC parts",
            CORPORATE_CA.to_owned(),
            SecretString::from(CORPORATE_CA_KEY),
        ),
    ] {
        let ca = CertificateAuthority::from_pem(&cert_pem, &key_pem)
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        let server = TlsServer::start(ca.server_config(HOST).unwrap());
        assert_accepted_for_host_only(&cert_pem, &server);
        let ca_file = temp.path().join("ca.pem");
        std::fs::write(&ca_file, &cert_pem).unwrap();
        assert_python_accepts(&server, &ca_file);
    }

    // The leaves' Authority Key Identifier is the CA's own, not one derived anew.
    let ca =
        CertificateAuthority::from_pem(&foreign.pem(), &SecretString::from(key.serialize_pem()))
            .unwrap();
    let leaf = ca.certified_key(HOST).unwrap();
    assert!(
        leaf.cert[0]
            .windows(key_id.len())
            .any(|window| window == key_id),
        "the leaf carries the CA's key identifier"
    );
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused() {
    let temp = tempfile::tempdir().unwrap();
    let (cert, key) = (temp.path().join("ca.pem"), temp.path().join("ca-key.pem"));
    let one = CertificateAuthority::generate().unwrap();
    std::fs::write(&cert, &one.cert_pem).unwrap();
    std::fs::write(&key, CORPORATE_CA_KEY).unwrap();
    let error = CertificateAuthority::load(&cert, &key).unwrap_err();
    assert!(matches!(error, CaError::KeyMismatch { .. }), "{error}");
    let text = error.to_string();
    assert!(
        text.contains(&*cert.to_string_lossy()) && text.contains(&*key.to_string_lossy()),
        "{text}"
    );
    for line in key_lines(CORPORATE_CA_KEY)
        .iter()
        .chain(&key_lines(one.key_pem.expose_secret()))
    {
        assert!(!text.contains(line.as_str()) && !format!("{error:?}").contains(line.as_str()));
    }
}
