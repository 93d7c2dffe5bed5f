//! The pure step: what one upstream answer says about Graph's limits. No
//! metrics and no state here, so every parse is testable on its own.

use std::time::Duration;

use http::header::HeaderName;
use http::{HeaderMap, StatusCode};

use crate::graph::routes::ObjectId;
use crate::graph::usage::{self, UsageError};
use crate::ratelimit::{Scope, Subject};

/// One gauge value an answer's usage headers carry.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    /// `X-App-Usage`: `call_count`, `total_time` or `total_cputime`, as a ratio.
    App { metric: &'static str, ratio: f64 },
    /// `X-Ad-Account-Usage`, about the subject's ad account.
    AdAccount {
        ratio: Option<f64>,
        reset_seconds: Option<f64>,
    },
    /// `X-Business-Use-Case-Usage`, per business object and use case.
    Business {
        id: String,
        kind: String,
        metric: &'static str,
        ratio: f64,
    },
    /// Seconds until a business use case regains access (0 when it has it).
    BusinessRegain {
        id: String,
        kind: String,
        seconds: f64,
    },
    /// `X-FB-Ads-Insights-Throttle`, for the app or the account.
    Insights { scope: &'static str, ratio: f64 },
    /// `X-FB-Ads-Insights-Throttle`'s account share, about the subject's
    /// ad account.
    InsightsAccount { ratio: f64 },
    /// `X-Page-Usage`, about the subject's node (the page).
    Page { metric: &'static str, ratio: f64 },
    /// The app's Marketing API access tier, as a usage header names it.
    AccessTier(String),
}

/// A scope's new usage ratio, and how long it is blocked if it is.
#[derive(Debug, Clone, PartialEq)]
pub struct ScopeUsage {
    pub scope: Scope,
    pub ratio: f64,
    pub blocked: Option<Duration>,
}

/// Everything an answer's usage headers say.
#[derive(Debug, Default)]
pub struct UsageObservations {
    /// The usage headers present, whether or not they parsed.
    pub seen: Vec<&'static str>,
    pub readings: Vec<Reading>,
    pub scopes: Vec<ScopeUsage>,
    pub errors: Vec<(&'static str, UsageError)>,
}

/// Reads the usage headers of one answer (a response, a 304, a batch, or a
/// batch item) about `subject`.
pub fn usage_of(headers: &HeaderMap, subject: &Subject) -> UsageObservations {
    // The names built once: a `&str` key is parsed on every lookup, and
    // this runs on every upstream answer.
    const NAMES: [HeaderName; 5] = [
        HeaderName::from_static(usage::HEADERS[0]),
        HeaderName::from_static(usage::HEADERS[1]),
        HeaderName::from_static(usage::HEADERS[2]),
        HeaderName::from_static(usage::HEADERS[3]),
        HeaderName::from_static(usage::HEADERS[4]),
    ];
    let mut out = UsageObservations::default();
    for (header, name) in usage::HEADERS.into_iter().zip(&NAMES) {
        let Some(value) = headers.get(name) else {
            continue;
        };
        out.seen.push(header);
        if let Err(error) = read_header(header, value.as_bytes(), subject, &mut out) {
            out.errors.push((header, error));
        }
    }
    out
}

fn read_header(
    header: &'static str,
    value: &[u8],
    subject: &Subject,
    out: &mut UsageObservations,
) -> Result<(), UsageError> {
    let metrics = |call, time, cpu| {
        [
            ("call_count", call),
            ("total_time", time),
            ("total_cputime", cpu),
        ]
    };
    match header {
        usage::APP_USAGE => {
            let u = usage::parse_app(value)?;
            for (metric, v) in metrics(u.call_count, u.total_time, u.total_cputime) {
                if let Some(v) = v {
                    out.readings.push(Reading::App {
                        metric,
                        ratio: v / 100.0,
                    });
                }
            }
            out.scopes.push(ScopeUsage {
                scope: Scope::App,
                ratio: max_ratio(&[u.call_count, u.total_time, u.total_cputime]),
                blocked: None,
            });
        }
        usage::PAGE_USAGE => {
            let u = usage::parse_page(value)?;
            for (metric, v) in metrics(u.call_count, u.total_time, u.total_cputime) {
                if let Some(v) = v {
                    out.readings.push(Reading::Page {
                        metric,
                        ratio: v / 100.0,
                    });
                }
            }
        }
        usage::AD_ACCOUNT_USAGE => {
            let u = usage::parse_ad_account(value)?;
            if let Some(tier) = &u.ads_api_access_tier {
                out.readings.push(Reading::AccessTier(tier.clone()));
            }
            out.readings.push(Reading::AdAccount {
                ratio: u.acc_id_util_pct.map(|v| v / 100.0),
                reset_seconds: u.reset_time_duration,
            });
            if let Some(object) = &subject.account {
                out.scopes.push(ScopeUsage {
                    scope: Scope::Object(object.clone()),
                    ratio: max_ratio(&[u.acc_id_util_pct]),
                    blocked: None,
                });
            }
        }
        usage::BUSINESS_USAGE => {
            let u = usage::parse_business(value)?;
            for (id, entries) in &u.0 {
                let bare = id.trim_start_matches("act_");
                for e in entries {
                    let kind = if e.kind.is_empty() {
                        "unknown"
                    } else {
                        e.kind.as_str()
                    };
                    for (metric, v) in metrics(e.call_count, e.total_time, e.total_cputime) {
                        if let Some(v) = v {
                            out.readings.push(Reading::Business {
                                id: bare.to_owned(),
                                kind: kind.to_owned(),
                                metric,
                                ratio: v / 100.0,
                            });
                        }
                    }
                    if let Some(tier) = &e.ads_api_access_tier {
                        out.readings.push(Reading::AccessTier(tier.clone()));
                    }
                    let regain = e.estimated_time_to_regain_access.unwrap_or(0.0).max(0.0) * 60.0;
                    out.readings.push(Reading::BusinessRegain {
                        id: bare.to_owned(),
                        kind: kind.to_owned(),
                        seconds: regain,
                    });
                    if let Some(object) = ObjectId::parse(id) {
                        out.scopes.push(ScopeUsage {
                            scope: Scope::Object(object),
                            ratio: max_ratio(&[e.call_count, e.total_time, e.total_cputime]),
                            blocked: (regain > 0.0).then(|| seconds(regain)),
                        });
                    }
                }
            }
        }
        _ => {
            let u = usage::parse_insights(value)?;
            if let Some(tier) = &u.ads_api_access_tier {
                out.readings.push(Reading::AccessTier(tier.clone()));
            }
            if let Some(v) = u.app_id_util_pct {
                out.readings.push(Reading::Insights {
                    scope: "app",
                    ratio: v / 100.0,
                });
                out.scopes.push(ScopeUsage {
                    scope: Scope::App,
                    ratio: v / 100.0,
                    blocked: None,
                });
            }
            if let Some(v) = u.acc_id_util_pct {
                out.readings.push(Reading::Insights {
                    scope: "account",
                    ratio: v / 100.0,
                });
                out.readings
                    .push(Reading::InsightsAccount { ratio: v / 100.0 });
                if let Some(object) = &subject.account {
                    out.scopes.push(ScopeUsage {
                        scope: Scope::Object(object.clone()),
                        ratio: v / 100.0,
                        blocked: None,
                    });
                }
            }
        }
    }
    Ok(())
}

/// What a throttling answer blocks: Graph's code, and each scope with how
/// long it waits.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttle {
    pub code: i64,
    pub blocked: Vec<(Scope, Duration)>,
}

/// The throttle an answer whose body is at hand reports, if any. The scope
/// is the business object whose use case is exhausted; else the app (codes
/// 4 and 341), the caller (user-level codes 17 without a business header,
/// and 32), or the objects the request named; `backoff` when the answer
/// names no wait.
pub fn throttle_of(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    subject: &Subject,
    backoff: Duration,
) -> Option<Throttle> {
    if status.is_success() && !body.trim_ascii_start().starts_with(b"{\"error\"") {
        return None;
    }
    let (code, subcode) = usage::throttle_error(body)?;
    let mut blocked: Vec<(Scope, Duration)> = Vec::new();
    if let Some(Ok(buc)) = headers
        .get(usage::BUSINESS_USAGE)
        .map(|v| usage::parse_business(v.as_bytes()))
    {
        for (id, entries) in &buc.0 {
            let exhausted = entries.iter().any(|e| {
                e.estimated_time_to_regain_access.unwrap_or(0.0) > 0.0
                    || max_ratio(&[e.call_count, e.total_time, e.total_cputime]) >= 1.0
            });
            let regain = entries
                .iter()
                .filter_map(|e| e.estimated_time_to_regain_access)
                .fold(0.0_f64, f64::max);
            if let (true, Some(object)) = (exhausted, ObjectId::parse(id)) {
                let wait = if regain > 0.0 {
                    seconds(regain * 60.0)
                } else {
                    backoff
                };
                blocked.push((Scope::Object(object), wait));
            }
        }
    }
    if blocked.is_empty() {
        let reset = headers
            .get(usage::AD_ACCOUNT_USAGE)
            .and_then(|v| usage::parse_ad_account(v.as_bytes()).ok())
            .and_then(|u| u.reset_time_duration)
            .filter(|s| *s > 0.0)
            .map(seconds);
        let wait = reset.unwrap_or(backoff);
        let user_level = code == 32 || (code == 17 && subcode.is_none());
        match (code, subject.caller) {
            (4 | 341, _) => blocked.push((Scope::App, wait)),
            (_, Some(caller)) if user_level => blocked.push((Scope::Caller(caller), wait)),
            // A user's limit, but the user is not known: widening it to the
            // object or the app would refuse everyone else.
            (_, None) if user_level => {}
            _ if subject.nodes.is_empty() => blocked.push((Scope::App, wait)),
            _ => blocked.extend(
                subject
                    .nodes
                    .iter()
                    .map(|n| (Scope::Object(n.clone()), wait)),
            ),
        }
    }
    Some(Throttle { code, blocked })
}

/// Longest wait graphcache honours from a header: Graph's own windows are an
/// hour at most, so anything longer is treated as a day.
pub(super) const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// A wait from a header value in seconds, clamped (huge, negative or NaN
/// values must never panic or overflow).
pub(super) fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).map_or(
        if value > 0.0 {
            MAX_WAIT
        } else {
            Duration::ZERO
        },
        |d| d.min(MAX_WAIT),
    )
}

fn max_ratio(values: &[Option<f64>]) -> f64 {
    values.iter().flatten().fold(0.0_f64, |a, &b| a.max(b)) / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::headers::header_map as headers;
    #[test]
    fn usage_headers_become_readings_and_scopes_without_side_effects() {
        let subject = Subject::of_request("/v26.0/act_42/insights", None);
        let obs = usage_of(
            &headers(&[
                (
                    "x-app-usage",
                    r#"{"call_count":50,"total_time":10,"total_cputime":5}"#,
                ),
                (
                    "x-ad-account-usage",
                    r#"{"acc_id_util_pct":80,"reset_time_duration":30}"#,
                ),
                ("x-business-use-case-usage", "not json"),
            ]),
            &subject,
        );
        assert_eq!(obs.seen.len(), 3);
        assert!(obs.readings.contains(&Reading::App {
            metric: "call_count",
            ratio: 0.5
        }));
        assert!(obs.readings.contains(&Reading::AdAccount {
            ratio: Some(0.8),
            reset_seconds: Some(30.0)
        }));
        assert_eq!(obs.scopes[0].scope, Scope::App);
        assert_eq!(obs.scopes[0].ratio, 0.5);
        assert_eq!(
            obs.scopes[1].scope,
            Scope::Object(ObjectId::parse("42").unwrap())
        );
        assert_eq!(obs.errors.len(), 1);
        assert_eq!(obs.errors[0].0, "x-business-use-case-usage");
    }

    #[test]
    fn throttles_name_their_scope_and_wait() {
        let subject = Subject::of_request("/v26.0/act_7/ads", None);
        let backoff = Duration::from_secs(60);
        let body = br#"{"error":{"code":4,"message":"(#4) limit"}}"#;
        let app = throttle_of(
            StatusCode::FORBIDDEN,
            &HeaderMap::new(),
            body,
            &subject,
            backoff,
        )
        .unwrap();
        assert_eq!(app.blocked, [(Scope::App, backoff)]);
        let body = br#"{"error":{"code":80004,"error_subcode":2446079}}"#;
        let buc = headers(&[(
            "x-business-use-case-usage",
            r#"{"7":[{"type":"ads_management","call_count":100,"estimated_time_to_regain_access":2}]}"#,
        )]);
        let object = throttle_of(StatusCode::BAD_REQUEST, &buc, body, &subject, backoff).unwrap();
        assert_eq!(
            object.blocked,
            [(
                Scope::Object(ObjectId::parse("7").unwrap()),
                Duration::from_secs(120)
            )]
        );
        assert!(throttle_of(StatusCode::OK, &HeaderMap::new(), b"{}", &subject, backoff).is_none());
        assert_eq!(seconds(f64::NAN), Duration::ZERO);
        assert_eq!(seconds(1e300), MAX_WAIT);
    }
}
