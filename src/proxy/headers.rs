//! Header rewriting between the client and the upstream (RFC 9110 §7.6.1).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, not the message, and so never cross
/// the proxy: RFC 9110 §7.6.1, plus `Proxy-Connection` (a pre-standard alias)
/// and the proxy credentials, which are addressed to this hop.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Request headers the proxy sets itself or has dealt with: `Host` comes
/// from the upstream URI, the client's own credentials never go upstream, and
/// the proxy has already answered `Expect: 100-continue` by reading the body.
const REPLACED: [HeaderName; 3] = [header::HOST, header::AUTHORIZATION, header::EXPECT];

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Found one at a time by a scan of the few names present, so that nothing
    // is allocated to remember them and absent ones cost no hash lookup. What
    // `Connection` names goes first, while `Connection` is still there to say it.
    if headers.contains_key(header::CONNECTION) {
        remove_each(headers, listed_in_connection);
    }
    remove_each(headers, |_, name| HOP_BY_HOP.contains(name));
}

fn remove_each(headers: &mut HeaderMap, doomed: impl Fn(&HeaderMap, &HeaderName) -> bool) {
    while let Some(name) = headers.keys().find(|name| doomed(headers, name)).cloned() {
        headers.remove(name);
    }
}

/// The upstream's request headers made from a client's: hop-by-hop headers,
/// `Host`, `Expect` and the client's own credentials are left out, and the
/// proxy's `Authorization` goes in. One pass into a map of the right size,
/// with room for the `Host` the upstream client adds.
pub fn upstream_request_headers(client: &HeaderMap, authorization: HeaderValue) -> HeaderMap {
    let mut headers = end_to_end(client, |name| REPLACED.contains(name));
    headers.insert(header::AUTHORIZATION, authorization);
    headers
}

/// The headers of a request passed on without the token (forward mode, a
/// host that is not an inject host): the client's own `Authorization`
/// stays; hop-by-hop headers, `Host` and `Expect` go.
pub fn passed_on_request_headers(client: &HeaderMap) -> HeaderMap {
    end_to_end(client, |name| {
        name == header::HOST || name == header::EXPECT
    })
}

/// The client's headers less hop-by-hop ones and those `also_dropped`,
/// in one pass into a map with room for two more.
fn end_to_end(client: &HeaderMap, also_dropped: impl Fn(&HeaderName) -> bool) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(client.len() + 2);
    let has_connection = client.contains_key(header::CONNECTION);
    for (name, value) in client {
        let dropped = HOP_BY_HOP.contains(name)
            || also_dropped(name)
            || (has_connection && listed_in_connection(client, name));
        if !dropped {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

/// `Retry-After` (RFC 9110 §10.2.3) as delay-seconds or an HTTP date; a
/// date in the past is no delay.
pub fn retry_after(headers: &HeaderMap) -> Option<std::time::Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    match value.parse::<u64>() {
        Ok(seconds) => Some(std::time::Duration::from_secs(seconds)),
        Err(_) => Some(
            httpdate::parse_http_date(value)
                .ok()?
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default(),
        ),
    }
}

/// Whether the `Connection` header names `name` as hop-by-hop (RFC 9110 §7.6.1).
fn listed_in_connection(headers: &HeaderMap, name: &HeaderName) -> bool {
    name != header::CONNECTION && connection_lists(headers, name.as_str())
}

/// Whether a `Connection` header lists `token` (such as `upgrade`).
pub fn connection_lists(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .any(|listed| listed.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn request_headers_are_rewritten() {
        let headers = map(&[
            ("host", "proxy.local"),
            ("authorization", "Bearer client-own"),
            ("authorization", "Basic second"),
            ("proxy-authorization", "Basic cHJveHk="),
            ("connection", "keep-alive, x-drop-me"),
            ("x-drop-me", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("expect", "100-continue"),
            ("accept", "application/json"),
            ("content-length", "3"),
            ("x-repeated", "a"),
            ("x-repeated", "b"),
        ]);
        let headers = upstream_request_headers(&headers, HeaderValue::from_static("Bearer proxy"));
        let names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(headers.get_all(header::AUTHORIZATION).iter().count(), 1);
        assert_eq!(headers[header::AUTHORIZATION], "Bearer proxy");
        for gone in [
            "host",
            "proxy-authorization",
            "connection",
            "x-drop-me",
            "keep-alive",
            "te",
            "transfer-encoding",
            "upgrade",
            "expect",
        ] {
            assert!(!names.contains(&gone), "{gone} survived: {names:?}");
        }
        assert_eq!(headers[header::ACCEPT], "application/json");
        assert_eq!(headers[header::CONTENT_LENGTH], "3");
        let repeated: Vec<_> = headers.get_all("x-repeated").iter().collect();
        assert_eq!(repeated, ["a", "b"]);
    }

    #[test]
    fn response_headers_lose_what_connection_names() {
        let mut headers = map(&[
            ("connection", "close, X-Trace"),
            ("connection", "x-other"),
            ("x-trace", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("content-type", "application/json"),
        ]);
        strip_hop_by_hop(&mut headers);
        let names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type"]);
    }

    #[test]
    fn garbage_in_connection_is_ignored() {
        let mut headers = map(&[("connection", ", ,bad header name,,"), ("x-keep", "1")]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
    }
}
