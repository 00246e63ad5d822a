//! The route seam: the first thing decided for every request is which
//! route serves it: the account whose token it carries, the upstream it
//! goes to, and the policy it is held to. The request path after that is
//! the same for every route.
//!
//! The routing table sits behind one [`ArcSwap`], so a reload can replace
//! it whole; a request holds the [`Route`] it started with until it is
//! answered, whatever is swapped in meanwhile.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderName, Uri};

use super::rate::RateShaper;
use super::upstream::Upstream;
use crate::metrics::AccountMetrics;
use crate::token::TokenSource;

/// The header that names the account a request is for (stripped before forwarding).
pub const ACCOUNT_HEADER: HeaderName = HeaderName::from_static("x-goto-account");
/// The path prefix that names the account: `/acct/NAME/...` (stripped before forwarding).
pub const ACCOUNT_PATH_PREFIX: &str = "/acct/";
/// The account a request that names none goes to.
pub const DEFAULT_ACCOUNT: &str = crate::config::DEFAULT_ACCOUNT;

/// How a route's requests are held: how long they wait for a token, how
/// much of their body is kept to send again, and how long the whole
/// exchange with the upstream may take.
#[derive(Clone, Debug)]
pub struct RoutePolicy {
    /// How long a request may wait for a token.
    pub token_wait: Duration,
    /// Request bodies up to this size are kept for a retry.
    pub retry_body_limit: usize,
    /// Upper bound for the upstream's response headers, every retry included.
    pub upstream_timeout: Duration,
}

/// Everything a request needs once it is routed.
#[derive(Debug)]
pub struct Route {
    /// The account's name.
    pub account: String,
    /// The account's token source.
    pub tokens: Arc<TokenSource>,
    /// Where its requests go.
    pub upstream: Upstream,
    /// How its requests are held.
    pub policy: RoutePolicy,
    /// Its series in the metrics.
    pub metrics: AccountMetrics,
    /// Its rate shaping, per API.
    pub shaper: Arc<RateShaper>,
}

/// Why a request has no route.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The request names no account and there is no `default` one.
    #[error("name the account: a path starting /acct/NAME/ or an X-GoTo-Account header")]
    AccountRequired,
    /// The request names an account the proxy does not serve.
    #[error("no account {0} is configured")]
    UnknownAccount(String),
    /// The path prefix and the header name two different accounts.
    #[error("the path and the X-GoTo-Account header name different accounts")]
    Conflicting,
}

/// The routes, one per account.
#[derive(Debug, Default)]
pub struct RoutingTable {
    routes: Vec<Arc<Route>>,
}

impl RoutingTable {
    /// A table of `routes`; the one whose account is `default` serves
    /// requests that name none.
    pub fn new(routes: impl IntoIterator<Item = Route>) -> Self {
        Self {
            routes: routes.into_iter().map(Arc::new).collect(),
        }
    }

    /// A table of routes already shared.
    pub fn from_routes(routes: impl IntoIterator<Item = Arc<Route>>) -> Self {
        Self {
            routes: routes.into_iter().collect(),
        }
    }

    /// The routes, for wiring and reports.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    fn find(&self, account: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|route| route.account == account)
    }
}

/// Picks the route of every request from the current table.
#[derive(Debug)]
pub struct Router {
    table: ArcSwap<RoutingTable>,
}

impl Router {
    /// A router serving `table`.
    pub fn new(table: RoutingTable) -> Self {
        Self {
            table: ArcSwap::from_pointee(table),
        }
    }

    /// Replaces the whole table; requests already routed keep their route.
    pub fn swap(&self, table: RoutingTable) {
        self.table.store(Arc::new(table));
    }

    /// The current table.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// The route for a request, from the account it names (by path prefix
    /// or header, both removed from `parts` here), else from `proxy_user`
    /// (forward mode's `Proxy-Authorization: Basic` user name) when that
    /// names an account, else `default`.
    pub fn route(
        &self,
        parts: &mut Parts,
        proxy_user: Option<&str>,
    ) -> Result<Arc<Route>, RouteError> {
        let from_header = match parts.headers.remove(ACCOUNT_HEADER) {
            Some(value) => Some(
                value
                    .to_str()
                    .map(|name| name.trim().to_owned())
                    .map_err(|_| RouteError::UnknownAccount("(not text)".into()))?,
            ),
            None => None,
        };
        let from_path = strip_account_prefix(&mut parts.uri);
        let named = match (from_header, from_path) {
            (Some(header), Some(path)) if header != path => return Err(RouteError::Conflicting),
            (header, path) => header.or(path),
        };
        let table = self.table.load();
        let named = named.or_else(|| {
            proxy_user
                .filter(|user| table.find(user).is_some())
                .map(str::to_owned)
        });
        match named {
            Some(name) => table
                .find(&name)
                .cloned()
                .ok_or_else(|| RouteError::UnknownAccount(shown_name(&name))),
            None => table
                .find(DEFAULT_ACCOUNT)
                .cloned()
                .ok_or(RouteError::AccountRequired),
        }
    }
}

/// Whether `name` could name an account (`[a-z0-9_-]+`).
pub fn is_account_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A client-given name as an error may echo it: only if it could be one.
fn shown_name(name: &str) -> String {
    if is_account_name(name) && name.len() <= 64 {
        name.to_owned()
    } else {
        "(not a valid account name)".to_owned()
    }
}

/// Takes `/acct/NAME` off the front of the path and returns NAME.
fn strip_account_prefix(uri: &mut Uri) -> Option<String> {
    let rest = uri.path().strip_prefix(ACCOUNT_PATH_PREFIX)?;
    let (name, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    let name = name.to_owned();
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = PathAndQuery::try_from(path_and_query).ok();
    *uri = Uri::from_parts(parts).unwrap_or_default();
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, account_header: Option<&str>) -> Parts {
        let mut builder = http::Request::builder().uri(uri);
        if let Some(name) = account_header {
            builder = builder.header(ACCOUNT_HEADER, name);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_account_prefix_is_taken_off_the_path() {
        let mut uri: Uri = "/acct/sales/G2M/rest/meetings?a=1".parse().unwrap();
        assert_eq!(strip_account_prefix(&mut uri).as_deref(), Some("sales"));
        assert_eq!(uri, "/G2M/rest/meetings?a=1");
        let mut bare: Uri = "/acct/sales".parse().unwrap();
        assert_eq!(strip_account_prefix(&mut bare).as_deref(), Some("sales"));
        assert_eq!(bare, "/");
        let mut other: Uri = "/accounts/x".parse().unwrap();
        assert_eq!(strip_account_prefix(&mut other), None);
        assert_eq!(other, "/accounts/x");
    }

    #[test]
    fn names_are_checked_before_they_are_echoed() {
        assert!(is_account_name("eu-1_x"));
        assert!(!is_account_name("Sales"));
        assert!(!is_account_name(""));
        assert_eq!(shown_name("<script>"), "(not a valid account name)");
    }

    #[test]
    fn a_table_without_default_requires_a_name_and_unknown_names_are_refused() {
        let router = Router::new(RoutingTable::default());
        assert_eq!(
            router.route(&mut parts("/x", None), None).unwrap_err(),
            RouteError::AccountRequired
        );
        assert_eq!(
            router
                .route(&mut parts("/acct/nope/x", None), None)
                .unwrap_err(),
            RouteError::UnknownAccount("nope".into())
        );
        assert_eq!(
            router
                .route(&mut parts("/acct/a/x", Some("b")), None)
                .unwrap_err(),
            RouteError::Conflicting
        );
    }
}
