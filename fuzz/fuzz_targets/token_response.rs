//! The token endpoint's answer: any bytes parse to a grant or an error, and
//! a grant always has a usable token and a positive lifetime.
#![no_main]

use goto_auth_proxy::token::grant::parse_grant;
use goto_auth_proxy::token::AccessToken;
use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;

fuzz_target!(|data: &[u8]| {
    if let Ok(grant) = parse_grant(data, 1_800_000_000) {
        assert!(!grant.access_token.expose_secret().trim().is_empty());
        assert!(!grant.lifetime.is_zero());
        if let Some(refresh) = &grant.refresh_token {
            assert!(!refresh.expose_secret().trim().is_empty());
        }
        // Whatever was accepted either becomes a header or is refused cleanly.
        let _ = AccessToken::new(&grant.access_token, grant.lifetime);
    }
});
