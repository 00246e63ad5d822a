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

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Turns a client's request headers into the upstream's: hop-by-hop headers
/// and the client's own credentials go, `Host` is left for the client to set
/// from the upstream URI, and the proxy's `Authorization` goes in.
pub fn rewrite_request_headers(headers: &mut HeaderMap, authorization: HeaderValue) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    // The proxy has already answered `Expect: 100-continue` by reading the body.
    headers.remove(header::EXPECT);
    // `insert` drops every `Authorization` the client sent, however many.
    headers.insert(header::AUTHORIZATION, authorization);
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
        let mut headers = map(&[
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
        ]);
        rewrite_request_headers(&mut headers, HeaderValue::from_static("Bearer proxy"));
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
    }

    #[test]
    fn garbage_in_connection_is_ignored() {
        let mut headers = map(&[("connection", ", ,bad header name,,"), ("x-keep", "1")]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
    }
}
