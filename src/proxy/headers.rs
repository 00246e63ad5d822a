//! Header rewriting between the client and the upstream (RFC 9110 §7.6.1).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Request headers the proxy sets itself or has dealt with: `Host` comes
/// from the upstream URI, the client's own credentials never go upstream, and
/// the proxy has already answered `Expect: 100-continue` by reading the body.
const REPLACED: [HeaderName; 3] = [header::HOST, header::AUTHORIZATION, header::EXPECT];

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One scan of the few names present, while `Connection` is still there
    // to say what it lists; the doomed names are kept on the stack (a
    // response rarely has more than one or two), so nothing is allocated.
    let mut doomed: [Option<HeaderName>; 4] = Default::default();
    let mut more = Vec::new();
    let listed = Listed::in_connection(headers);
    for (found, name) in headers
        .keys()
        .filter(|name| is_hop_by_hop(name, &listed))
        .enumerate()
    {
        match doomed.get_mut(found) {
            Some(slot) => *slot = Some(name.clone()),
            None => more.push(name.clone()),
        }
    }
    for name in doomed.into_iter().flatten().chain(more) {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName, listed: &Listed<'_>) -> bool {
    describes_the_connection(name) || listed.names(name)
}

/// Headers that describe one connection, not the message, and so never
/// cross the proxy: RFC 9110 §7.6.1, plus `Proxy-Connection` (a
/// pre-standard alias) and the proxy credentials, which are addressed to
/// this hop. Matched on the name's text (a switch on its length, then one
/// comparison): every header of every message passes here, and nine
/// `HeaderName` comparisons cost several times more.
fn describes_the_connection(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "proxy-connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// The header names a message's `Connection` header lists, parsed once
/// (RFC 9110 §7.6.1): up to four on the stack; a longer list is read
/// again for each name asked about.
struct Listed<'a> {
    headers: &'a HeaderMap,
    first: [&'a str; 4],
    count: usize,
}

impl<'a> Listed<'a> {
    fn in_connection(headers: &'a HeaderMap) -> Self {
        let mut listed = Self {
            headers,
            first: [""; 4],
            count: 0,
        };
        // Loops, not an iterator chain: `flat_map` over the values cost
        // about 500 instructions a message (callgrind), most of the parse.
        for value in headers.get_all(header::CONNECTION) {
            let Ok(list) = value.to_str() else {
                continue;
            };
            for token in list.split(',').map(str::trim) {
                if token.is_empty() {
                    continue;
                }
                if let Some(slot) = listed.first.get_mut(listed.count) {
                    *slot = token;
                }
                listed.count += 1;
            }
        }
        listed
    }

    /// Whether `name` is listed (`Connection` itself does not count).
    fn names(&self, name: &HeaderName) -> bool {
        if self.count == 0 || name == header::CONNECTION {
            return false;
        }
        match self.first.get(..self.count) {
            Some(tokens) => tokens.iter().any(|t| t.eq_ignore_ascii_case(name.as_str())),
            None => connection_lists(self.headers, name.as_str()),
        }
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
    let listed = Listed::in_connection(client);
    for (name, value) in client {
        if !is_hop_by_hop(name, &listed) && !also_dropped(name) {
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
    fn a_long_connection_list_and_many_hop_by_hop_headers_all_go() {
        let mut pairs = vec![("connection", "x-a, x-b, x-c, x-d, x-e, x-f")];
        let listed = ["x-a", "x-b", "x-c", "x-d", "x-e", "x-f"];
        pairs.extend(listed.iter().map(|name| (*name, "1")));
        pairs.extend([
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("keep-alive", "timeout=5"),
            ("x-kept", "1"),
        ]);
        let mut headers = map(&pairs);
        strip_hop_by_hop(&mut headers);
        let names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        let passed = passed_on_request_headers(&map(&pairs));
        let names: Vec<_> = passed.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn garbage_in_connection_is_ignored() {
        let mut headers = map(&[("connection", ", ,bad header name,,"), ("x-keep", "1")]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
    }
}
