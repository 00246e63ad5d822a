//! The JWT `exp` fallback: any string gives a lifetime in the future or none.
#![no_main]

use goto_auth_proxy::token::grant::jwt_lifetime;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let now = 1_800_000_000;
    if let Some(lifetime) = jwt_lifetime(token, now) {
        assert!(!lifetime.is_zero());
    }
});
