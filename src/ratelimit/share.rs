//! Throttle state shared by a fleet: a throttle (or quota pressure) one
//! replica sees protects every replica. Each replica queues what it sees,
//! one report per scope; [`sync`] sends the queue to the fleet's Redis and
//! applies what the others sent, every [`SYNC_INTERVAL`]. Usage gauges stay
//! per replica.
//!
//! In Redis the reports are one hash, a field per kind and scope (`t|…` a
//! throttle, `p|…` pressure), each keeping the report that expires last.
//! A scope is `app`, `o:<object id>` or `c:<caller identity in hex>` (a
//! keyed hash, never a token).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::TokenIdentity;
use crate::fleet::{unix_ms, Fleet};
use crate::graph::routes::ObjectId;
use crate::ratelimit::{RateLimits, Scope, USAGE_MEMORY};

/// How often a replica exchanges throttle state with the fleet: the
/// longest a sibling's throttle can go unseen.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(crate::fleet::SYNC_WINDOW_MS);

/// Scopes queued between two syncs at most (a storm of distinct ones is
/// cut, never unbounded).
pub(super) const MAX_QUEUED: usize = 1024;

/// One report as it goes to the fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct Shared {
    /// `t|<scope>` or `p|<scope>`.
    pub(super) field: String,
    /// When the report stops mattering, Unix ms.
    pub(super) until_ms: u64,
    /// `until|observed|code|ratio`, the expiry first (the script keeps the
    /// report per field that expires last).
    value: String,
}

fn scope_text(scope: &Scope) -> String {
    match scope {
        Scope::App => "app".to_owned(),
        Scope::Object(id) => format!("o:{}", id.as_str()),
        Scope::Caller(identity) => {
            format!("c:{}", blake3::Hash::from_bytes(identity.0).to_hex())
        }
    }
}

fn parse_scope(text: &str) -> Option<Scope> {
    Some(match text {
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
    })
}

impl Shared {
    pub(super) fn from_parts(field: String, until_ms: u64, value: String) -> Self {
        Self {
            field,
            until_ms,
            value,
        }
    }

    /// `scope` throttled for `wait` with `code`.
    pub(super) fn throttle(scope: &Scope, wait: Duration, code: i64) -> Self {
        let now = unix_ms();
        let until = now.saturating_add(millis(wait));
        Self {
            field: format!("t|{}", scope_text(scope)),
            until_ms: until,
            value: format!("{until}|{now}|{code}|0|{}", scope_text(scope)),
        }
    }

    /// `scope` at usage `ratio`, observed now.
    pub(super) fn pressure(scope: &Scope, ratio: f64) -> Self {
        let now = unix_ms();
        let until = now.saturating_add(millis(USAGE_MEMORY));
        Self {
            field: format!("p|{}", scope_text(scope)),
            until_ms: until,
            value: format!("{until}|{now}|0|{ratio:.3}|{}", scope_text(scope)),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A report read back, as of `now_ms`.
#[derive(Debug, PartialEq)]
pub(super) enum Report {
    /// Throttled for this much longer, with this code.
    Throttle(Scope, Duration, i64),
    /// At this usage, observed this long ago.
    Pressure(Scope, f64, Duration),
}

pub(super) fn parse(value: &str, now_ms: u64) -> Option<Report> {
    let mut parts = value.splitn(5, '|');
    let until: u64 = parts.next()?.parse().ok()?;
    let observed: u64 = parts.next()?.parse().ok()?;
    let code: i64 = parts.next()?.parse().ok()?;
    let ratio: f64 = parts.next()?.parse().ok()?;
    let scope = parse_scope(parts.next()?)?;
    if until <= now_ms {
        return None;
    }
    Some(if code != 0 {
        Report::Throttle(scope, Duration::from_millis(until - now_ms), code)
    } else {
        let age = Duration::from_millis(now_ms.saturating_sub(observed));
        Report::Pressure(scope, ratio.clamp(0.0, 1.0), age)
    })
}

/// Sends and applies throttle state until the task is dropped; also tends
/// the fleet's health (replays write marks once Redis answers again).
pub async fn sync(limits: Arc<RateLimits>, fleet: Arc<Fleet>) {
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        fleet.tend().await;
        let outgoing: Vec<(String, u64, String)> = limits
            .take_shared()
            .into_iter()
            .map(|s| (s.field, s.until_ms, s.value))
            .collect();
        let Some(reports) = fleet.exchange_throttles(&outgoing).await else {
            // Not sent: queue them again for the next round.
            limits.requeue(outgoing);
            continue;
        };
        let now_ms = unix_ms();
        let now = Instant::now();
        let mut received = 0;
        for value in reports {
            let changed = match parse(&value, now_ms) {
                Some(Report::Throttle(scope, wait, code)) => {
                    limits.import_throttle(scope, wait, code)
                }
                Some(Report::Pressure(scope, ratio, age)) => {
                    limits.import_pressure(scope, ratio, now.checked_sub(age).unwrap_or(now))
                }
                None => false,
            };
            received += u64::from(changed);
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
    fn reports_round_trip_and_never_carry_more_than_a_hash() {
        let caller = Scope::Caller(TokenIdentity([0xab; 32]));
        let act = Scope::Object(ObjectId::parse("act_1").unwrap());
        for scope in [Scope::App, act.clone(), caller] {
            let throttle = Shared::throttle(&scope, Duration::from_secs(60), 17);
            match parse(&throttle.value, unix_ms()).unwrap() {
                Report::Throttle(back, wait, code) => {
                    assert_eq!(back, scope);
                    assert_eq!(code, 17);
                    assert!(wait > Duration::from_secs(59));
                }
                other => panic!("{other:?}"),
            }
            let pressure = Shared::pressure(&scope, 0.97);
            match parse(&pressure.value, unix_ms()).unwrap() {
                Report::Pressure(back, ratio, age) => {
                    assert_eq!(back, scope);
                    assert_eq!(ratio, 0.97);
                    assert!(age < Duration::from_secs(1));
                }
                other => panic!("{other:?}"),
            }
            assert_ne!(throttle.field, pressure.field);
        }
        // Expired reports and junk teach nothing.
        let old = Shared::throttle(&act, Duration::from_secs(1), 4);
        assert!(parse(&old.value, unix_ms() + 2000).is_none());
        assert!(parse("9999999999999|0|0|0.5|x:1", 0).is_none());
        assert!(parse("junk", 0).is_none());
    }

    #[test]
    fn an_imported_throttle_protects_this_replica_once() {
        let limits = RateLimits::new(Default::default());
        let act = ObjectId::parse("act_9").unwrap();
        let scope = Scope::Object(act.clone());
        assert!(limits.import_throttle(scope.clone(), Duration::from_secs(30), 80004));
        let verdict = limits.verdict(std::slice::from_ref(&act), None);
        assert_eq!(verdict.throttled.map(|(_, code)| code), Some(80004));
        // The same report again changes nothing (not counted twice).
        assert!(!limits.import_throttle(scope, Duration::from_secs(30), 80004));
    }

    #[test]
    fn only_newer_pressure_replaces_what_this_replica_saw() {
        let limits = RateLimits::new(Default::default());
        let now = Instant::now();
        let earlier = now - Duration::from_secs(10);
        assert!(limits.import_pressure(Scope::App, 0.97, earlier));
        assert_eq!(limits.verdict(&[], None).usage, 0.97);
        // A newer, lower reading wins; an older one (a replica's own old
        // report coming back) does not.
        assert!(limits.import_pressure(Scope::App, 0.40, now));
        assert!(!limits.import_pressure(Scope::App, 0.97, earlier));
        assert_eq!(limits.verdict(&[], None).usage, 0.40);
    }
}
