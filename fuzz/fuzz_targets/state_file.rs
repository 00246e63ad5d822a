//! The state-file loader: any bytes parse or give a position, never a panic,
//! and a parsed refresh token is never empty.
#![no_main]

use goto_auth_proxy::store::parse_state;
use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = parse_state(data) {
        if let Some(token) = state.refresh_token {
            assert!(!token.expose_secret().is_empty());
        }
    }
});
