//! `--allow-requests`: which methods and paths may be asked of GoTo with
//! the token. With rules set, a request that would carry the token must
//! match one; a path the upstream could read differently from the proxy
//! (dot segments, percent-encoded `/`, `\`, `.` or `%`, a `\` that some
//! servers take for `/`, a `;` that some take to end a segment, as in
//! `..;`) is refused outright, so a prefix check cannot be walked around.

use http::Method;

use super::path;

/// One `METHOD /path/prefix` rule; no method means `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    method: Option<Method>,
    prefix: String,
}

/// The rules; none means everything is allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestRules {
    rules: Vec<Rule>,
}

/// Why a request may not carry the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No rule matches.
    #[error("{method} {path} is not among the requests this proxy allows (--allow-requests)")]
    NotAllowed {
        /// The request's method.
        method: Method,
        /// Its path, as far as it is safe to echo.
        path: String,
    },
    /// The path could mean another path upstream.
    #[error(
        "while --allow-requests is set, paths with . or .. segments, a percent-encoded /, \\, . or %, a \\ or a ; are refused"
    )]
    AmbiguousPath,
}

impl RequestRules {
    /// Parses comma-separated `METHOD /prefix` rules (`*` for any method).
    pub fn parse(value: &str) -> Result<Self, String> {
        let rules = crate::config::parse::list_items(value)
            .map(parse_rule)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { rules })
    }

    /// Whether no rules are set (everything is allowed).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `method` may be asked of `path` (query excluded).
    pub fn check(&self, method: &Method, path: &str) -> Result<(), Refusal> {
        if self.rules.is_empty() {
            return Ok(());
        }
        let ambiguous = path::has_dot_segment(path)
            || path::has_encoded_separator(path)
            || has_encoded_dot(path)
            || path.contains(['\\', ';'])
            || path.contains("%25");
        if ambiguous {
            return Err(Refusal::AmbiguousPath);
        }
        let matches = |rule: &Rule| {
            rule.method.as_ref().is_none_or(|m| m == method) && path.starts_with(&rule.prefix)
        };
        if self.rules.iter().any(matches) {
            return Ok(());
        }
        Err(Refusal::NotAllowed {
            method: method.clone(),
            path: path.chars().take(200).collect(),
        })
    }
}

impl std::fmt::Display for RequestRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.rules.is_empty() {
            return f.write_str("everything");
        }
        for (index, rule) in self.rules.iter().enumerate() {
            let method = rule.method.as_ref().map_or("*", Method::as_str);
            let separator = if index > 0 { "," } else { "" };
            write!(f, "{separator}{method} {}", rule.prefix)?;
        }
        Ok(())
    }
}

fn parse_rule(rule: &str) -> Result<Rule, String> {
    let invalid = || {
        format!("{rule:?} is not a rule such as `GET /G2W/rest/` or `* /admin/rest/v1/` (METHOD, a space, a path prefix)")
    };
    let (method, prefix) = rule.split_once(char::is_whitespace).ok_or_else(invalid)?;
    let prefix = prefix.trim();
    if !prefix.starts_with('/') || prefix.contains(char::is_whitespace) {
        return Err(invalid());
    }
    if path::has_dot_segment(prefix) || prefix.contains('%') {
        return Err(format!(
            "{rule:?}: write the prefix plainly, without dot segments or percent-escapes"
        ));
    }
    let method = match method {
        "*" => None,
        name if name.bytes().all(|b| b.is_ascii_uppercase()) => {
            Some(Method::from_bytes(name.as_bytes()).map_err(|_| invalid())?)
        }
        _ => {
            return Err(format!(
                "{rule:?}: the method must be * or upper case, such as GET"
            ))
        }
    };
    Ok(Rule {
        method,
        prefix: prefix.to_owned(),
    })
}

fn has_encoded_dot(path: &str) -> bool {
    path.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'e'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> RequestRules {
        RequestRules::parse("GET /G2W/rest/, POST /messaging/v1/messages,* /admin/rest/v1/users")
            .unwrap()
    }

    #[test]
    fn a_request_must_match_a_rule_by_method_and_prefix() {
        let rules = rules();
        assert!(rules
            .check(&Method::GET, "/G2W/rest/v2/organizers/1/webinars")
            .is_ok());
        assert!(rules.check(&Method::POST, "/messaging/v1/messages").is_ok());
        assert!(rules
            .check(&Method::DELETE, "/admin/rest/v1/users/7")
            .is_ok());
        for (method, path) in [
            (Method::POST, "/G2W/rest/v2/x"),
            (Method::GET, "/g2w/rest/x"),
            (Method::GET, "/G2W/res"),
            (Method::GET, "/messaging/v1/messages"),
        ] {
            assert!(
                matches!(rules.check(&method, path), Err(Refusal::NotAllowed { .. })),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn paths_that_could_mean_another_path_are_refused_while_rules_are_set() {
        let rules = rules();
        for path in [
            "/G2W/rest/../../admin",
            "/G2W/rest/%2e%2e/admin",
            "/G2W/rest/x%2Fy",
            "/G2W/rest/x%5cy",
            "/G2W/rest/%2Ex",
            "/G2W/rest/./x",
            "/G2W/rest/..;/..;/admin/rest/v1/users",
            "/G2W/rest/..\\..\\admin",
            "/G2W/rest/%252e%252e/admin",
        ] {
            assert_eq!(
                rules.check(&Method::GET, path),
                Err(Refusal::AmbiguousPath),
                "{path}"
            );
        }
        assert!(RequestRules::default()
            .check(&Method::GET, "/a/../b")
            .is_ok());
    }

    #[test]
    fn malformed_rules_are_refused_and_good_ones_print_back() {
        for bad in [
            "GET",
            "get /x",
            "GET x",
            "GET /a/../b",
            "GET /%41",
            "G@T /x",
        ] {
            assert!(RequestRules::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            rules().to_string(),
            "GET /G2W/rest/,POST /messaging/v1/messages,* /admin/rest/v1/users"
        );
        assert_eq!(RequestRules::default().to_string(), "everything");
    }
}
