//! Header rewriting: from any header list, the upstream gets exactly one
//! Authorization (the proxy's), no hop-by-hop header, no header the
//! Connection header named, and no Host.
#![no_main]

use goto_auth_proxy::proxy::headers::rewrite_request_headers;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "host",
];

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let named: Vec<HeaderName> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| n != "authorization")
        .collect();
    rewrite_request_headers(&mut headers, HeaderValue::from_static("Bearer proxy"));
    let authorizations: Vec<_> = headers.get_all("authorization").iter().collect();
    assert_eq!(authorizations, [HeaderValue::from_static("Bearer proxy")]);
    for name in HOP_BY_HOP {
        assert!(!headers.contains_key(name), "{name} crossed");
    }
    for name in named {
        assert!(
            !headers.contains_key(&name),
            "{name}, named by Connection, crossed"
        );
    }
});
