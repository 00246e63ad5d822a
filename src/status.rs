//! `goto-auth-proxy status`: what the state file says, without any secret.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::PersistedState;
use crate::token::{REFRESH_TOKEN_LIFETIME, REFRESH_TOKEN_WARN_AGE};

/// What `status` concludes, and so its exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A refresh token younger than the warning age.
    Usable,
    /// No state file, or one without a refresh token.
    Missing,
    /// The refresh token is older than the warning age: it may soon stop working.
    Stale,
}

impl Verdict {
    /// The verdict on several accounts: missing if any is, else stale if
    /// any is, else usable.
    pub fn worst(verdicts: &[Verdict]) -> Verdict {
        [Verdict::Missing, Verdict::Stale]
            .into_iter()
            .find(|bad| verdicts.contains(bad))
            .unwrap_or(Verdict::Usable)
    }

    /// 0 usable, 1 missing, 2 stale.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Usable => 0,
            Verdict::Missing => 1,
            Verdict::Stale => 2,
        }
    }
}

/// The report for the state stored at `location` (`None`: nothing stored) as of `now`.
pub fn report(
    location: &str,
    state: Option<&PersistedState>,
    now: SystemTime,
) -> (String, Verdict) {
    let mut text = String::new();
    let _ = writeln!(text, "state file:     {location}");
    let Some(state) = state else {
        let _ = writeln!(
            text,
            "no state file: run `goto-auth-proxy login`, or start `run` with a bootstrap refresh token"
        );
        return (text, Verdict::Missing);
    };
    let _ = writeln!(
        text,
        "principal:      {}",
        state.principal.as_deref().unwrap_or("(unknown)")
    );
    match state.access_token_expires_at {
        Some(expires) => {
            let _ = writeln!(text, "access token:   {}", describe_expiry(expires, now));
        }
        None => {
            let _ = writeln!(text, "access token:   none obtained yet");
        }
    }
    if state.refresh_token.is_none() {
        let _ = writeln!(text, "refresh token:  none: run `goto-auth-proxy login`");
        return (text, Verdict::Missing);
    }
    let Some(since) = state.refresh_token_first_seen.map(unix_to_time) else {
        let _ = writeln!(text, "refresh token:  present, age unknown");
        return (text, Verdict::Usable);
    };
    let age = now.duration_since(since).unwrap_or_default();
    let _ = writeln!(
        text,
        "refresh token:  present, first seen {} ({} ago); warning after {} days, GoTo's lifetime {} days",
        humantime::format_rfc3339_seconds(since),
        round_to_minutes(age),
        REFRESH_TOKEN_WARN_AGE.as_secs() / 86_400,
        REFRESH_TOKEN_LIFETIME.as_secs() / 86_400,
    );
    if age >= REFRESH_TOKEN_WARN_AGE {
        let _ = writeln!(
            text,
            "WARNING: the refresh token has not rotated for {} days and may stop working by day {}; \
             run `goto-auth-proxy login` to get a new one",
            age.as_secs() / 86_400,
            REFRESH_TOKEN_LIFETIME.as_secs() / 86_400,
        );
        return (text, Verdict::Stale);
    }
    (text, Verdict::Usable)
}

fn describe_expiry(expires: SystemTime, now: SystemTime) -> String {
    let at = humantime::format_rfc3339_seconds(expires);
    match expires.duration_since(now) {
        Ok(left) => format!("expires {at} (in {})", round_to_minutes(left)),
        Err(past) => format!(
            "expired {at} ({} ago; a running proxy refreshes it on its own)",
            round_to_minutes(past.duration())
        ),
    }
}

fn unix_to_time(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds)
}

/// Durations for people: whole minutes once past one.
fn round_to_minutes(duration: Duration) -> humantime::FormattedDuration {
    let seconds = duration.as_secs();
    let shown = if seconds >= 60 {
        seconds - seconds % 60
    } else {
        seconds
    };
    humantime::format_duration(Duration::from_secs(shown))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    const DAY: u64 = 86_400;

    fn state(first_seen_days_ago: u64, now: u64) -> PersistedState {
        PersistedState {
            refresh_token: Some(SecretString::from("rt-do-not-print")),
            refresh_token_first_seen: Some(now - first_seen_days_ago * DAY),
            principal: Some("ann@example.com".into()),
            access_token: None,
            access_token_expires_at: Some(unix_to_time(now + 1800)),
            updated_at: now,
        }
    }

    #[test]
    fn a_young_refresh_token_is_usable_and_never_printed() {
        let now = 1_800_000_000;
        let (text, verdict) = report("/s.json", Some(&state(3, now)), unix_to_time(now));
        assert_eq!(verdict, Verdict::Usable);
        assert!(text.contains("ann@example.com"), "{text}");
        assert!(text.contains("(in 30m)"), "{text}");
        assert!(text.contains("3days ago"), "{text}");
        assert!(!text.contains("rt-do-not-print"), "{text}");
    }

    #[test]
    fn an_old_refresh_token_is_stale() {
        let now = 1_800_000_000;
        let (text, verdict) = report("/s.json", Some(&state(26, now)), unix_to_time(now));
        assert_eq!(verdict, Verdict::Stale);
        assert_eq!(verdict.exit_code(), 2);
        assert!(text.contains("WARNING"), "{text}");
    }

    #[test]
    fn no_state_or_no_refresh_token_is_missing() {
        let now = unix_to_time(1_800_000_000);
        assert_eq!(report("/s.json", None, now).1, Verdict::Missing);
        let empty = PersistedState::default();
        assert_eq!(report("/s.json", Some(&empty), now).1, Verdict::Missing);
    }
}
