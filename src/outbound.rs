//! Where outgoing connections go. `--connect-to` rules, as curl's option of
//! that name, send a connection meant for HOST:PORT to ADDR:PORT instead.
//! Only the address dialed changes: TLS still verifies HOST, and requests
//! still name it. Every outgoing connection goes through here: upstream
//! pools, forward-mode targets, tunnels and the token endpoint.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

/// How long an outgoing connection may sit silent before the kernel asks
/// the peer whether it is still there (TCP keepalive), so that a tunnel
/// or pooled connection to a peer that vanished does not stay open forever.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// The interval of keepalive probes once they start.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// An error on the way to a connection.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One `HOST:PORT:ADDR:PORT` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    /// Lower case, without brackets.
    host: String,
    port: u16,
    to_host: String,
    to_port: u16,
}

/// The `--connect-to` rules; the first that names a host and port wins.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectTo {
    rules: Vec<Rule>,
}

impl ConnectTo {
    /// Parses comma-separated `HOST:PORT:ADDR:PORT` rules (IPv6 addresses in
    /// brackets). The error says what is wrong with which rule.
    pub fn parse(value: &str) -> Result<Self, String> {
        let rules = crate::config::parse::list_items(value)
            .map(parse_rule)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { rules })
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Where a connection to `host:port` goes instead, if a rule says so.
    pub fn target(&self, host: &str, port: u16) -> Option<(&str, u16)> {
        let host = unbracketed(host);
        self.rules
            .iter()
            .find(|rule| rule.port == port && rule.host.eq_ignore_ascii_case(host))
            .map(|rule| (rule.to_host.as_str(), rule.to_port))
    }

    /// Opens a TCP connection to `host:port`, or where a rule sends it,
    /// within `timeout`.
    pub async fn dial(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        let (host, port) = self.target(host, port).unwrap_or((unbracketed(host), port));
        let stream = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "connecting took longer than {}",
                        humantime::format_duration(timeout)
                    ),
                )
            })??;
        stream.set_nodelay(true)?;
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL);
        socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
        Ok(stream)
    }
}

impl std::fmt::Display for ConnectTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.rules.is_empty() {
            return f.write_str("none");
        }
        let shown = |host: &str| {
            if host.contains(':') {
                format!("[{host}]")
            } else {
                host.to_owned()
            }
        };
        for (index, rule) in self.rules.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(
                f,
                "{}:{}:{}:{}",
                shown(&rule.host),
                rule.port,
                shown(&rule.to_host),
                rule.to_port
            )?;
        }
        Ok(())
    }
}

fn parse_rule(rule: &str) -> Result<Rule, String> {
    let invalid = || format!("{rule:?} is not HOST:PORT:ADDR:PORT (IPv6 addresses in brackets)");
    let fields = split_fields(rule).ok_or_else(invalid)?;
    let [host, port, to_host, to_port] = fields.as_slice() else {
        return Err(invalid());
    };
    let port_of = |text: &str| text.parse::<u16>().ok().filter(|p| *p != 0);
    match (port_of(port), port_of(to_port)) {
        (Some(port), Some(to_port)) if !host.is_empty() && !to_host.is_empty() => Ok(Rule {
            host: host.to_ascii_lowercase(),
            port,
            to_host: (*to_host).to_owned(),
            to_port,
        }),
        _ => Err(invalid()),
    }
}

/// The `:`-separated fields of a rule, a bracketed field taken whole.
fn split_fields(rule: &str) -> Option<Vec<&str>> {
    let mut fields = Vec::with_capacity(4);
    let mut rest = rule;
    loop {
        let (field, after) = match rest.strip_prefix('[') {
            Some(inner) => {
                let end = inner.find(']')?;
                (&inner[..end], &inner[end + 1..])
            }
            None => rest.split_at(rest.find(':').unwrap_or(rest.len())),
        };
        fields.push(field);
        match after.strip_prefix(':') {
            Some(next) => rest = next,
            None if after.is_empty() => return Some(fields),
            None => return None,
        }
    }
}

fn unbracketed(host: &str) -> &str {
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The default port of `uri`'s scheme, or the one it names.
fn port_of(uri: &Uri) -> u16 {
    uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    })
}

/// A TCP connector for hyper's clients that follows the rules. It sits
/// under the TLS layer, which sees the original URI and so verifies the
/// original host.
#[derive(Clone, Debug)]
pub struct Dialer {
    tcp: HttpConnector,
    connect_to: Arc<ConnectTo>,
}

impl Dialer {
    /// Dials with `tcp` (its timeouts and socket options), redirected by `connect_to`.
    pub fn new(mut tcp: HttpConnector, connect_to: Arc<ConnectTo>) -> Self {
        tcp.enforce_http(false);
        Self { tcp, connect_to }
    }
}

impl Service<Uri> for Dialer {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialed = match uri
            .host()
            .and_then(|host| self.connect_to.target(host, port_of(&uri)))
        {
            Some((host, port)) => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.to_owned()
                };
                match Uri::try_from(format!("http://{host}:{port}")) {
                    Ok(redirected) => redirected,
                    Err(error) => return Box::pin(std::future::ready(Err(error.into()))),
                }
            }
            None => uri,
        };
        let connecting = self.tcp.call(dialed);
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

/// A name resolver for the token endpoint's client (reqwest): names with a
/// rule for `port` resolve to the rule's address and port, others as usual.
/// reqwest dials the port a resolver gives unless the URL names one, so
/// [`ConnectTo::check_token_url`] refuses the one case it cannot follow.
#[derive(Debug)]
pub struct Resolver {
    connect_to: Arc<ConnectTo>,
    port: u16,
}

impl Resolver {
    /// Resolves for connections to `port`.
    pub fn new(connect_to: Arc<ConnectTo>, port: u16) -> Self {
        Self { connect_to, port }
    }
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (host, port) = match self.connect_to.target(name.as_str(), self.port) {
            Some((host, port)) => (host.to_owned(), port),
            None => (name.as_str().to_owned(), 0),
        };
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl ConnectTo {
    /// Whether the token endpoint's client can follow the rules for `url`:
    /// it dials the rule's port only when the URL names no port of its own.
    pub fn check_token_url(&self, url: &reqwest::Url) -> Result<(), String> {
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return Ok(());
        };
        match self.target(host, port) {
            Some((_, to_port)) if url.port().is_some() && to_port != port => Err(format!(
                "the token URL names port {port}; a rule for it must keep that port \
                 (or drop the port from the URL)"
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_as_curl_writes_them() {
        let rules =
            ConnectTo::parse("api.getgo.com:443:127.0.0.1:8443, [::1]:80:[::1]:8080").unwrap();
        assert_eq!(
            rules.target("API.getgo.com", 443),
            Some(("127.0.0.1", 8443))
        );
        assert_eq!(rules.target("[::1]", 80), Some(("::1", 8080)));
        assert_eq!(rules.target("api.getgo.com", 80), None);
        assert_eq!(rules.target("api.goto.com", 443), None);
        assert_eq!(
            rules.to_string(),
            "api.getgo.com:443:127.0.0.1:8443,[::1]:80:[::1]:8080"
        );
        let none = ConnectTo::parse("").unwrap();
        assert!(none.is_empty());
        assert_eq!(none.to_string(), "none");
    }

    #[test]
    fn malformed_rules_are_refused() {
        for bad in [
            "api.getgo.com:443:127.0.0.1",
            "api.getgo.com:443:127.0.0.1:0",
            "api.getgo.com:x:127.0.0.1:1",
            ":443:127.0.0.1:1",
            "a:1:b:2:c",
            "[::1:80:x:1",
            "a:1::2",
        ] {
            assert!(ConnectTo::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_token_url_with_its_own_port_needs_a_rule_that_keeps_it() {
        let rules =
            ConnectTo::parse("auth.example:8443:127.0.0.1:9000,auth.example:443:127.0.0.1:9001")
                .unwrap();
        let url = |text: &str| reqwest::Url::parse(text).unwrap();
        assert!(rules
            .check_token_url(&url("https://auth.example:8443/t"))
            .is_err());
        assert!(rules
            .check_token_url(&url("https://auth.example/t"))
            .is_ok());
        assert!(rules
            .check_token_url(&url("https://other.example:8443/t"))
            .is_ok());
    }

    #[tokio::test]
    async fn dialing_follows_the_rules() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let rules = ConnectTo::parse(&format!("api.getgo.com:443:127.0.0.1:{port}")).unwrap();
        let dialed = rules
            .dial("api.getgo.com", 443, Duration::from_secs(10))
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(dialed.local_addr().unwrap(), accepted.peer_addr().unwrap());
        let socket = socket2::SockRef::from(&dialed);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
    }
}
