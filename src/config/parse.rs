//! Value parsers: one setting's text to its typed value, or an error that
//! names the setting and says what a good value looks like.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{ConfigError, LogFormat, UpstreamUrl, GOTO_API_HOSTS};

/// The longest duration any setting takes. Far beyond any sensible value,
/// and far below what would overflow a deadline computed from it.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

pub(super) fn addr(setting: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| {
        ConfigError::new(
            setting,
            format!("{value:?} is not an IP address with a port, such as 127.0.0.1:8080"),
        )
    })
}

/// Whether `host` names this machine (for http upstreams and token URLs).
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Parses and checks an upstream URL: https (http only to loopback), a GoTo
/// API host unless `allow_custom`, and a base path without dot segments.
pub(super) fn upstream(value: &str, allow_custom: bool) -> Result<UpstreamUrl, ConfigError> {
    const SETTING: &str = "--upstream";
    let uri: http::Uri = value.trim().parse().map_err(|_| {
        ConfigError::new(
            SETTING,
            format!("{value:?} is not a URL such as https://api.getgo.com"),
        )
    })?;
    let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
        return Err(ConfigError::new(
            SETTING,
            format!("{value:?} needs a scheme and a host, such as https://api.getgo.com"),
        ));
    };
    if authority.as_str().contains('@') {
        return Err(ConfigError::new(
            SETTING,
            "credentials in the URL are not supported",
        ));
    }
    if uri.query().is_some() {
        return Err(ConfigError::new(
            SETTING,
            "a query string in the upstream URL is not supported",
        ));
    }
    let loopback = is_loopback_host(authority.host());
    if scheme == http::uri::Scheme::HTTP && !loopback {
        return Err(ConfigError::new(
            SETTING,
            "plain http would send the token in clear text; use https (http is only for loopback test servers)",
        ));
    }
    if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
        return Err(ConfigError::new(
            SETTING,
            format!("unsupported scheme {scheme}; use https"),
        ));
    }
    let known = GOTO_API_HOSTS
        .iter()
        .any(|h| authority.host().eq_ignore_ascii_case(h));
    if !known && !loopback && !allow_custom {
        return Err(ConfigError::new(
            SETTING,
            format!(
                "{} is not a GoTo API host ({}), and the proxy sends the GoTo token to it; \
                 if that is intended (an egress gateway, say), also set --allow-custom-upstream",
                authority.host(),
                GOTO_API_HOSTS.join(", ")
            ),
        ));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    if crate::proxy::path::has_dot_segment(&base_path) {
        return Err(ConfigError::new(
            SETTING,
            format!("the base path {base_path:?} has a . or .. segment; write the path it means"),
        ));
    }
    Ok(UpstreamUrl {
        scheme,
        authority,
        base_path,
    })
}

pub(super) fn token_url(value: &str) -> Result<reqwest::Url, ConfigError> {
    const SETTING: &str = "--token-url";
    let url = reqwest::Url::parse(value.trim())
        .map_err(|e| ConfigError::new(SETTING, format!("{value:?} is not a URL: {e}")))?;
    let loopback = url.host_str().is_some_and(is_loopback_host);
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err(ConfigError::new(
            SETTING,
            "the token endpoint must be https (http is only for loopback test servers)",
        )),
    }
}

/// The contents of a PEM file of root certificates, checked to hold at least one.
pub(super) fn ca_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    const SETTING: &str = "--upstream-ca-file";
    let pem = std::fs::read(path)
        .map_err(|e| ConfigError::new(SETTING, format!("cannot read {}: {e}", path.display())))?;
    let certificates = crate::tls::certificates_from_pem(&pem)
        .map_err(|e| ConfigError::new(SETTING, format!("{}: {e}", path.display())))?;
    if certificates.is_empty() {
        return Err(ConfigError::new(
            SETTING,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(pem)
}

/// A whole number of requests (per second, or at once), 0 allowed.
pub(super) fn rate(setting: &'static str, value: &str) -> Result<u32, ConfigError> {
    value.trim().parse().map_err(|_| {
        ConfigError::new(
            setting,
            format!(
                "{value:?} is not a whole number of requests, such as 10 (0 turns shaping off)"
            ),
        )
    })
}

/// The state file of the account `name` declared without one: `state-NAME.json`
/// in the directory of the default account's state file.
pub fn named_state_file(default_state_file: &Path, name: &str) -> PathBuf {
    default_state_file
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default()
        .join(format!("state-{name}.json"))
}

/// The items of a comma-separated setting, trimmed, empty ones left out.
pub fn list_items(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

/// A comma-separated list of host names (lower-cased), at least one.
pub(super) fn hosts(setting: &'static str, value: &str) -> Result<Vec<String>, ConfigError> {
    let hosts: Vec<String> = list_items(value).map(str::to_ascii_lowercase).collect();
    if hosts.is_empty() {
        return Err(ConfigError::new(setting, "name at least one host"));
    }
    for host in &hosts {
        let valid = http::uri::Authority::try_from(host.as_str())
            .is_ok_and(|a| a.port().is_none() && a.host() == host);
        if !valid {
            return Err(ConfigError::new(
                setting,
                format!("{host:?} is not a host name (write it without scheme, port or path)"),
            ));
        }
    }
    Ok(hosts)
}

/// `tunnel` or `deny`.
pub(super) fn other_hosts(value: Option<&str>) -> Result<super::OtherHosts, ConfigError> {
    match value.map(str::trim) {
        None | Some("tunnel") => Ok(super::OtherHosts::Tunnel),
        Some("deny") => Ok(super::OtherHosts::Deny),
        Some(other) => Err(ConfigError::new(
            "--other-hosts",
            format!("{other:?} is neither tunnel nor deny"),
        )),
    }
}

/// The main listener's TLS configuration from its PEM files.
pub(super) fn listener_tls(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: Option<&Path>,
) -> Result<rustls::ServerConfig, ConfigError> {
    let read = |setting, path: &Path| {
        std::fs::read(path)
            .map_err(|e| ConfigError::new(setting, format!("cannot read {}: {e}", path.display())))
    };
    let chain = read("--tls-cert-file", cert_file)?;
    let key = read("--tls-key-file", key_file)?;
    let client_ca = client_ca_file
        .map(|path| read("--client-ca-file", path))
        .transpose()?;
    crate::tls::listener_config(&chain, &key, client_ca.as_deref()).map_err(|e| {
        let setting = match e {
            crate::tls::TlsError::ClientRoots(_) => "--client-ca-file",
            _ => "--tls-cert-file",
        };
        ConfigError::new(
            setting,
            format!("{e}; check --tls-cert-file, --tls-key-file and --client-ca-file"),
        )
    })
}

/// A path that is valid UTF-8: paths appear in logs, `status` and
/// `run --check`, where a lossy rendering would name another file.
pub(super) fn utf8_path(
    setting: &'static str,
    path: Option<PathBuf>,
) -> Result<Option<PathBuf>, ConfigError> {
    match path {
        Some(path) if path.to_str().is_none() => Err(ConfigError::new(
            setting,
            format!(
                "the path {:?} is not valid UTF-8; use a path made of UTF-8 characters",
                path.display().to_string()
            ),
        )),
        other => Ok(other),
    }
}

/// `parse(value)` for a value given, `default` for none.
fn given_or<T>(
    value: Option<String>,
    default: T,
    parse: impl FnOnce(&str) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    value.map_or(Ok(default), |value| parse(&value))
}

/// A duration such as `300s` or `1h30m`, at most [`MAX_DURATION`].
pub(super) fn duration(
    setting: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    given_or(value, default, |value| duration_value(setting, value))
}

fn duration_value(setting: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let parsed = humantime::parse_duration(value.trim()).map_err(|_| {
        ConfigError::new(
            setting,
            format!("{value:?} is not a duration such as 300s, 5m or 1h30m"),
        )
    })?;
    if parsed > MAX_DURATION {
        return Err(ConfigError::new(
            setting,
            format!(
                "{value:?} is longer than the most any setting takes ({})",
                humantime::format_duration(MAX_DURATION)
            ),
        ));
    }
    Ok(parsed)
}

/// A duration that must be longer than zero.
pub(super) fn positive_duration(
    setting: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let parsed = duration(setting, value, default)?;
    if parsed.is_zero() {
        return Err(ConfigError::new(setting, "must be longer than zero"));
    }
    Ok(parsed)
}

/// A byte size: a plain number, or one with a KiB/MiB/KB/MB suffix.
pub(super) fn size(
    setting: &'static str,
    value: Option<String>,
    default: usize,
) -> Result<usize, ConfigError> {
    given_or(value, default, |value| size_value(setting, value))
}

fn size_value(setting: &'static str, value: &str) -> Result<usize, ConfigError> {
    let text = value.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1024,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1024 * 1024,
        _ => 0,
    };
    number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .filter(|_| multiplier > 0)
        .ok_or_else(|| {
            ConfigError::new(
                setting,
                format!("{value:?} is not a size such as 65536, 64KiB or 1MiB"),
            )
        })
}

/// A whole number of at least one.
pub(super) fn count(
    setting: &'static str,
    value: Option<String>,
    default: usize,
) -> Result<usize, ConfigError> {
    given_or(value, default, |value| {
        value
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                ConfigError::new(
                    setting,
                    format!("{value:?} is not a whole number of at least 1"),
                )
            })
    })
}

pub(super) fn log_format(value: Option<&str>) -> Result<LogFormat, ConfigError> {
    match value.map(str::trim) {
        None | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(ConfigError::new(
            "--log-format",
            format!("{other:?} is neither text nor json"),
        )),
    }
}

/// The documented default place for the state file.
pub fn default_state_file(lookup_env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    let non_empty = |name: &str| {
        lookup_env(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = non_empty("STATE_DIRECTORY") {
        // systemd's StateDirectory= may list several, separated by colons.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_owned();
        return PathBuf::from(first).join("state.json");
    }
    if let Some(dir) = non_empty("XDG_STATE_HOME") {
        return dir.join("goto-auth-proxy/state.json");
    }
    if let Some(home) = non_empty("HOME") {
        return home.join(".local/state/goto-auth-proxy/state.json");
    }
    PathBuf::from("goto-auth-proxy-state.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_beyond_any_use_are_refused() {
        for (value, ok) in [
            ("300s", true),
            ("365days", true),
            ("366days", false),
            ("10000000000000000000s", false),
            ("584542046090years", false),
        ] {
            let result = duration("--token-wait", Some(value.into()), Duration::ZERO);
            assert_eq!(result.is_ok(), ok, "{value}: {result:?}");
        }
    }

    #[test]
    fn counts_are_whole_and_positive() {
        assert_eq!(count("--max-connections", Some("8".into()), 1).unwrap(), 8);
        for bad in ["0", "-1", "many", "1.5"] {
            assert!(
                count("--max-connections", Some(bad.into()), 1).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn default_state_file_follows_the_environment() {
        let env = |name: &str| match name {
            "XDG_STATE_HOME" => Some("/x".to_owned()),
            "HOME" => Some("/home/u".to_owned()),
            _ => None,
        };
        assert_eq!(
            default_state_file(&env),
            PathBuf::from("/x/goto-auth-proxy/state.json")
        );
        let home = |name: &str| (name == "HOME").then(|| "/home/u".to_owned());
        assert_eq!(
            default_state_file(&home),
            PathBuf::from("/home/u/.local/state/goto-auth-proxy/state.json")
        );
        let systemd =
            |name: &str| (name == "STATE_DIRECTORY").then(|| "/var/lib/gap:/other".to_owned());
        assert_eq!(
            default_state_file(&systemd),
            PathBuf::from("/var/lib/gap/state.json")
        );
    }
}
