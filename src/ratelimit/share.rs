//! Throttle state shared by a fleet: a throttle (or quota pressure) one
//! replica sees protects every replica. Each replica queues what it sees;
//! [`sync`] sends the queue to the fleet's Redis and applies what the others
//! sent, every [`SYNC_INTERVAL`]. Usage gauges stay per replica.
//!
//! On the wire a scope is `app`, `o:<object id>` or `c:<caller identity in
//! hex>` (a keyed hash, never a token), in a sorted set scored by expiry.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::TokenIdentity;
use crate::fleet::{unix_ms, Fleet};
use crate::graph::routes::ObjectId;
use crate::ratelimit::{RateLimits, Scope, USAGE_MEMORY};

/// How often a replica exchanges throttle state with the fleet: the
/// longest a sibling's throttle can go unseen.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(250);

/// Scopes queued between two syncs at most (a storm of distinct ones is
/// cut, never unbounded).
pub(super) const MAX_QUEUED: usize = 1024;

/// One scope as it goes to the fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct Shared {
    member: String,
    until_ms: u64,
}

impl Shared {
    /// `scope` throttled for `wait` (zero: not throttled) with `code`, at
    /// usage `ratio`.
    pub(super) fn new(scope: &Scope, wait: Duration, code: i64, ratio: f64) -> Self {
        let scope = match scope {
            Scope::App => "app".to_owned(),
            Scope::Object(id) => format!("o:{}", id.as_str()),
            Scope::Caller(identity) => {
                let hex: String = identity.0.iter().map(|b| format!("{b:02x}")).collect();
                format!("c:{hex}")
            }
        };
        let lasts = if wait.is_zero() { USAGE_MEMORY } else { wait };
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        Self {
            // The expiry is in the member, so two reports of one scope
            // with different waits are both kept until their own end.
            member: format!("{code}|{ratio:.3}|{wait_ms}|{scope}"),
            until_ms: unix_ms()
                .saturating_add(u64::try_from(lasts.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// A member read back: scope, remaining throttle, code, ratio.
fn parse(member: &str, until_ms: u64, now_ms: u64) -> Option<(Scope, Option<Duration>, i64, f64)> {
    let mut parts = member.splitn(4, '|');
    let code: i64 = parts.next()?.parse().ok()?;
    let ratio: f64 = parts.next()?.parse().ok()?;
    let wait_ms: u64 = parts.next()?.parse().ok()?;
    let scope = match parts.next()? {
        "app" => Scope::App,
        s if s.starts_with("o:") => Scope::Object(ObjectId::parse(&s[2..])?),
        s if s.starts_with("c:") && s.len() == 66 => {
            let mut bytes = [0u8; 32];
            for (i, byte) in bytes.iter_mut().enumerate() {
                *byte = u8::from_str_radix(s.get(2 + 2 * i..4 + 2 * i)?, 16).ok()?;
            }
            Scope::Caller(TokenIdentity(bytes))
        }
        _ => return None,
    };
    let remaining = Duration::from_millis(until_ms.saturating_sub(now_ms));
    let throttled = (wait_ms > 0 && !remaining.is_zero()).then_some(remaining);
    Some((scope, throttled, code, ratio.clamp(0.0, 1.0)))
}

/// Sends and applies throttle state until the task is dropped; also tends
/// the fleet's health (replays write marks once Redis answers again).
pub async fn sync(limits: Arc<RateLimits>, fleet: Arc<Fleet>) {
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        fleet.tend().await;
        let outgoing: Vec<(String, u64)> = limits
            .take_shared()
            .into_iter()
            .map(|s| (s.member, s.until_ms))
            .collect();
        fleet.share_throttles(&outgoing).await;
        let Some(scopes) = fleet.throttles().await else {
            continue;
        };
        let now_ms = unix_ms();
        let mut received = 0;
        for (member, until) in scopes {
            if let Some((scope, wait, code, ratio)) = parse(&member, until, now_ms) {
                if limits.import(scope, wait, code, ratio) {
                    received += 1;
                }
            }
        }
        fleet
            .metrics
            .throttles
            .with_label_values(&["received"])
            .inc_by(received);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_and_never_carry_more_than_a_hash() {
        let caller = Scope::Caller(TokenIdentity([0xab; 32]));
        for (scope, wait, ratio) in [
            (Scope::App, Duration::from_secs(60), 0.0),
            (
                Scope::Object(ObjectId::parse("act_1").unwrap()),
                Duration::ZERO,
                0.97,
            ),
            (caller, Duration::from_secs(5), 0.0),
        ] {
            let shared = Shared::new(&scope, wait, 17, ratio);
            let now = unix_ms();
            let (back, throttled, code, r) = parse(&shared.member, shared.until_ms, now).unwrap();
            assert_eq!(back, scope);
            assert_eq!(code, 17);
            assert_eq!(r, ratio);
            assert_eq!(throttled.is_some(), !wait.is_zero());
        }
        assert!(parse("17|0.5|0|x:1", unix_ms() + 1000, unix_ms()).is_none());
        assert!(parse("junk", 0, 0).is_none());
    }

    #[test]
    fn an_imported_throttle_protects_this_replica() {
        let limits = RateLimits::new(Default::default());
        let act = ObjectId::parse("act_9").unwrap();
        assert!(limits.import(
            Scope::Object(act.clone()),
            Some(Duration::from_secs(30)),
            80004,
            0.0
        ));
        let verdict = limits.verdict(std::slice::from_ref(&act), None);
        assert_eq!(verdict.throttled.map(|(_, code)| code), Some(80004));
        // The same report again changes nothing (not counted twice).
        assert!(!limits.import(
            Scope::Object(act),
            Some(Duration::from_secs(30)),
            80004,
            0.0
        ));
    }
}
