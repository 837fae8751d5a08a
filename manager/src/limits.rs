//! Rate limits on log-ins and sign-ups: fixed windows in memory, counted
//! before the costly work they guard, so a burst cannot slip under them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Too many attempts from this address or at this account (`rate_limited`).
#[derive(Debug, thiserror::Error)]
#[error("too many attempts; wait a minute and try again")]
pub struct RateLimited;

/// Failed log-ins allowed per account, and per client address (an IPv6
/// client's whole /64), within [`LIMIT_WINDOW`]. An attempt is counted as a
/// failure *before* its password is checked and given back when it
/// succeeds, so a burst of concurrent guesses cannot all slip under the
/// limit while their hashes run. A user who types the right password is
/// never slowed by someone else guessing from another address, beyond the
/// per-account cap that protects that account.
pub const MAX_FAILURES_PER_ACCOUNT: u32 = 10;
pub const MAX_FAILURES_PER_ADDRESS: u32 = 30;
/// Sign-ups allowed per client address within [`LIMIT_WINDOW`].
pub const MAX_SIGNUPS_PER_ADDRESS: u32 = 10;
pub const LIMIT_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Keys the limiter holds at most (each under ~300 bytes: emails are
/// bounded). When every slot holds a live window, new keys are refused
/// (`rate_limited`) rather than letting the map grow or forgetting the
/// counts that protect accounts under attack.
const LIMITER_MAX_KEYS: usize = 100_000;

/// Fixed-window counters in memory (one manager process; a restart
/// forgets them, which only helps the attacker for one window).
#[derive(Default)]
pub struct Limiter {
    counts: Mutex<HashMap<String, (Instant, u32)>>,
}

impl Limiter {
    /// Whether `key` has already reached `max` within the window.
    pub fn exceeded(&self, key: &str, max: u32) -> bool {
        let counts = self.counts.lock().expect("not poisoned");
        counts
            .get(key)
            .is_some_and(|(at, n)| at.elapsed() < LIMIT_WINDOW && *n >= max)
    }

    /// Counts one attempt against every `(key, max)` at once, unless one of
    /// them has reached its max (or the limiter is full): then nothing is
    /// counted and the answer is `false`. One lock, so concurrent callers
    /// cannot all see the last free slot.
    pub fn try_take(&self, keys: &[(&str, u32)]) -> bool {
        let mut counts = self.counts.lock().expect("not poisoned");
        let live = |e: &(Instant, u32)| e.0.elapsed() < LIMIT_WINDOW;
        if keys
            .iter()
            .any(|(k, max)| counts.get(*k).is_some_and(|e| live(e) && e.1 >= *max))
        {
            return false;
        }
        let new_keys = keys
            .iter()
            .filter(|(k, _)| !counts.contains_key(*k))
            .count();
        if counts.len() + new_keys > LIMITER_MAX_KEYS {
            counts.retain(|_, e| live(e));
            if counts.len() + new_keys > LIMITER_MAX_KEYS {
                tracing::warn!(
                    keys = counts.len(),
                    "rate limiter full: refusing new clients until windows expire"
                );
                return false;
            }
        }
        for (k, _) in keys {
            let e = counts.entry(k.to_string()).or_insert((Instant::now(), 0));
            if !live(e) {
                *e = (Instant::now(), 0);
            }
            e.1 = e.1.saturating_add(1);
        }
        true
    }

    /// Takes back one attempt counted by [`try_take`](Limiter::try_take).
    pub fn give_back(&self, key: &str) {
        let mut counts = self.counts.lock().expect("not poisoned");
        if let Some(e) = counts.get_mut(key) {
            e.1 = e.1.saturating_sub(1);
        }
    }
}

/// A log-in attempt, counted as a failure from the start. Unless
/// [`failed`](Self::failed) says the password was wrong, dropping it gives
/// the count back: a right password, a `busy` answer or our own error must
/// not use up the account's budget.
pub struct LoginAttempt {
    limits: Arc<Limiter>,
    ip_key: String,
    account_key: String,
    wrong: bool,
}

impl LoginAttempt {
    /// The password was wrong: the attempt stays counted.
    pub fn failed(mut self) {
        self.wrong = true;
    }
}

impl Drop for LoginAttempt {
    fn drop(&mut self) {
        if !self.wrong {
            self.limits.give_back(&self.ip_key);
            self.limits.give_back(&self.account_key);
        }
    }
}

/// Counts a log-in attempt before its password is checked; refused
/// (`rate_limited`) when the address or the account failed too often.
pub fn begin_login(
    limits: &Arc<Limiter>,
    ip: &str,
    email: &str,
) -> Result<LoginAttempt, RateLimited> {
    let (ip_key, account_key) = (format!("login-ip:{ip}"), format!("login-account:{email}"));
    if !limits.try_take(&[
        (&ip_key, MAX_FAILURES_PER_ADDRESS),
        (&account_key, MAX_FAILURES_PER_ACCOUNT),
    ]) {
        tracing::warn!(%ip, "log-in rate limited");
        return Err(RateLimited);
    }
    Ok(LoginAttempt {
        limits: limits.clone(),
        ip_key,
        account_key,
        wrong: false,
    })
}

/// The client's address as a rate-limit key: IPv4 as is, IPv6 as its /64
/// (one home or server usually holds a whole /64).
pub fn limit_key(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().expect("checked").to_string(),
        v4 => v4.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_limited_per_64() {
        let a: std::net::IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let c: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(limit_key(a), limit_key(b));
        assert_ne!(limit_key(a), limit_key(c));
        assert_eq!(limit_key("192.0.2.7".parse().unwrap()), "192.0.2.7");
        assert_eq!(limit_key("::ffff:192.0.2.7".parse().unwrap()), "192.0.2.7");
    }

    #[test]
    fn attempts_are_counted_before_they_run_and_given_back_on_success() {
        let l = Limiter::default();
        for _ in 0..3 {
            assert!(l.try_take(&[("ip", 30), ("acct", 3)]));
        }
        assert!(
            !l.try_take(&[("ip", 30), ("acct", 3)]),
            "the fourth is refused"
        );
        assert!(
            !l.try_take(&[("other-ip", 30), ("acct", 3)]),
            "from any address"
        );
        assert!(l.exceeded("acct", 3));
        l.give_back("acct");
        assert!(
            l.try_take(&[("ip", 30), ("acct", 3)]),
            "a success freed a slot"
        );
        // A refused attempt counted nothing anywhere.
        assert!(!l.exceeded("other-ip", 1));
    }

    #[test]
    fn the_limiter_never_holds_more_than_its_bound() {
        let l = Limiter::default();
        for i in 0..LIMITER_MAX_KEYS {
            assert!(l.try_take(&[(&format!("k{i}"), 10)]));
        }
        assert!(!l.try_take(&[("one-more", 10)]), "full of live windows");
        assert_eq!(l.counts.lock().unwrap().len(), LIMITER_MAX_KEYS);
        assert!(l.try_take(&[("k7", 10)]), "known keys still count");
    }
}
