//! Parsers for Graph's rate-limit headers (contract §4). Every header is JSON
//! inside a header value; numbers may be integers or floats; absence means
//! unknown, not zero; a malformed value is an error to count, never fatal.

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

pub const APP_USAGE: &str = "x-app-usage";
pub const AD_ACCOUNT_USAGE: &str = "x-ad-account-usage";
pub const BUSINESS_USAGE: &str = "x-business-use-case-usage";
pub const INSIGHTS_THROTTLE: &str = "x-fb-ads-insights-throttle";
/// The legacy Pages header: X-App-Usage's three fields, about the page.
pub const PAGE_USAGE: &str = "x-page-usage";

/// The usage headers graphcache reads, in a fixed order (metric labels).
pub const HEADERS: [&str; 5] = [
    APP_USAGE,
    AD_ACCOUNT_USAGE,
    BUSINESS_USAGE,
    INSIGHTS_THROTTLE,
    PAGE_USAGE,
];

/// `X-App-Usage`: percentages of the app's hourly budget.
#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
pub struct AppUsage {
    pub call_count: Option<f64>,
    pub total_time: Option<f64>,
    pub total_cputime: Option<f64>,
}

/// `X-Ad-Account-Usage`.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct AdAccountUsage {
    pub acc_id_util_pct: Option<f64>,
    /// Seconds until the score resets.
    pub reset_time_duration: Option<f64>,
    pub ads_api_access_tier: Option<String>,
}

/// One entry of `X-Business-Use-Case-Usage`.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct BusinessUseCase {
    #[serde(rename = "type", default)]
    pub kind: String,
    pub call_count: Option<f64>,
    pub total_time: Option<f64>,
    pub total_cputime: Option<f64>,
    /// Minutes until access returns; 0 while not blocked.
    pub estimated_time_to_regain_access: Option<f64>,
    pub ads_api_access_tier: Option<String>,
}

/// `X-Business-Use-Case-Usage`: per business object id, its entries. A key
/// may repeat (the documented sample does): every entry is kept.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BusinessUsage(pub Vec<(String, Vec<BusinessUseCase>)>);

/// `X-FB-Ads-Insights-Throttle`.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct InsightsThrottle {
    pub app_id_util_pct: Option<f64>,
    pub acc_id_util_pct: Option<f64>,
    pub ads_api_access_tier: Option<String>,
}

impl<'de> Deserialize<'de> for BusinessUsage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct All;
        impl<'de> Visitor<'de> for All {
            type Value = BusinessUsage;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of business ids to arrays of use cases")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BusinessUsage, A::Error> {
                let mut all = Vec::new();
                while let Some((id, entries)) = map.next_entry::<String, OneOrMany>()? {
                    all.push((id, entries.0));
                }
                Ok(BusinessUsage(all))
            }
        }
        deserializer.deserialize_map(All)
    }
}

/// An array of entries, or a lone entry (tolerated).
struct OneOrMany(Vec<BusinessUseCase>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            Many(Vec<BusinessUseCase>),
            One(BusinessUseCase),
        }
        Ok(OneOrMany(match Shape::deserialize(deserializer)? {
            Shape::Many(v) => v,
            Shape::One(e) => vec![e],
        }))
    }
}

/// Why a usage header could not be read.
#[derive(Debug, thiserror::Error)]
#[error("malformed {header}: {reason}")]
pub struct UsageError {
    pub header: &'static str,
    pub reason: String,
}

fn parse<T: for<'de> Deserialize<'de>>(
    header: &'static str,
    value: &[u8],
) -> Result<T, UsageError> {
    serde_json::from_slice(value).map_err(|e| UsageError {
        header,
        reason: e.to_string(),
    })
}

pub fn parse_app(value: &[u8]) -> Result<AppUsage, UsageError> {
    parse(APP_USAGE, value)
}

pub fn parse_ad_account(value: &[u8]) -> Result<AdAccountUsage, UsageError> {
    parse(AD_ACCOUNT_USAGE, value)
}

pub fn parse_business(value: &[u8]) -> Result<BusinessUsage, UsageError> {
    parse(BUSINESS_USAGE, value)
}

pub fn parse_insights(value: &[u8]) -> Result<InsightsThrottle, UsageError> {
    parse(INSIGHTS_THROTTLE, value)
}

pub fn parse_page(value: &[u8]) -> Result<AppUsage, UsageError> {
    parse(PAGE_USAGE, value)
}

/// Graph's throttling error codes (contract §3.2).
pub fn is_throttle_code(code: i64, subcode: Option<i64>) -> bool {
    // Spend-limit changes (17/1885172) are a policy block, not a rate.
    if code == 17 && subcode == Some(1_885_172) {
        return false;
    }
    matches!(code, 4 | 17 | 32 | 341 | 613 | 80_000..=80_014)
}

/// The throttling error in a Graph error body, if it is one: (code, subcode).
pub fn throttle_error(body: &[u8]) -> Option<(i64, Option<i64>)> {
    #[derive(Deserialize)]
    struct Envelope {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        code: Option<serde_json::Value>,
        error_subcode: Option<serde_json::Value>,
    }
    let envelope: Envelope = serde_json::from_slice(body).ok()?;
    let number = |v: Option<serde_json::Value>| match v? {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    };
    let code = number(envelope.error.code)?;
    let subcode = number(envelope.error.error_subcode);
    is_throttle_code(code, subcode).then_some((code, subcode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_usage_documented_sample() {
        let u = parse_app(br#"{"call_count":28,"total_time":25,"total_cputime":25}"#).unwrap();
        assert_eq!(
            (u.call_count, u.total_time, u.total_cputime),
            (Some(28.0), Some(25.0), Some(25.0))
        );
    }

    #[test]
    fn ad_account_usage_documented_sample_with_floats() {
        let u = parse_ad_account(br#"{"acc_id_util_pct":9.67,"reset_time_duration":100,"ads_api_access_tier":"standard_access"}"#)
            .unwrap();
        assert_eq!(u.acc_id_util_pct, Some(9.67));
        assert_eq!(u.reset_time_duration, Some(100.0));
        assert_eq!(u.ads_api_access_tier.as_deref(), Some("standard_access"));
    }

    #[test]
    fn business_usage_keeps_repeated_keys_and_every_entry() {
        let sample = br#"{"66782684":[{"type":"ads_management","call_count":95,"total_cputime":20,"total_time":20,"estimated_time_to_regain_access":0,"ads_api_access_tier":"development_access"}],
                         "66782684":[{"type":"ads_insights","call_count":97,"total_cputime":23,"total_time":23,"estimated_time_to_regain_access":5},{"type":"custom_audience","call_count":1}]}"#;
        let u = parse_business(sample).unwrap();
        assert_eq!(u.0.len(), 2);
        assert_eq!(u.0[0].0, "66782684");
        assert_eq!(u.0[1].1.len(), 2);
        assert_eq!(u.0[1].1[0].kind, "ads_insights");
        assert_eq!(u.0[1].1[0].estimated_time_to_regain_access, Some(5.0));
        assert_eq!(
            u.0[0].1[0].ads_api_access_tier.as_deref(),
            Some("development_access")
        );
    }

    #[test]
    fn insights_throttle_sample() {
        let u = parse_insights(br#"{"app_id_util_pct":0.02,"acc_id_util_pct":0,"ads_api_access_tier":"development_access"}"#).unwrap();
        assert_eq!(
            (u.app_id_util_pct, u.acc_id_util_pct),
            (Some(0.02), Some(0.0))
        );
    }

    #[test]
    fn malformed_values_are_errors_not_panics() {
        assert!(parse_app(b"").is_err());
        assert!(parse_app(b"{\"call_count\":\"many\"}").is_err());
        assert!(parse_business(b"[1,2]").is_err());
        assert!(parse_business(b"{\"1\":[{\"call_count\":{}}]}").is_err());
        assert!(parse_insights(b"{").is_err());
        let err = parse_ad_account(b"nope").unwrap_err();
        assert_eq!(err.header, AD_ACCOUNT_USAGE);
        // Unknown fields are ignored; missing ones are unknown, not zero.
        let u = parse_app(b"{\"new_field\":1}").unwrap();
        assert_eq!(u.call_count, None);
    }

    #[test]
    fn throttle_codes_from_error_bodies() {
        let body = br#"{"error":{"message":"(#80004) There have been too many calls","type":"OAuthException","code":80004,"error_subcode":2446079,"fbtrace_id":"x"}}"#;
        assert_eq!(throttle_error(body), Some((80004, Some(2446079))));
        assert_eq!(throttle_error(br#"{"error":{"code":4}}"#), Some((4, None)));
        assert_eq!(
            throttle_error(br#"{"error":{"code":613,"error_subcode":1487742}}"#),
            Some((613, Some(1487742)))
        );
        assert_eq!(
            throttle_error(br#"{"error":{"code":17,"error_subcode":1885172}}"#),
            None
        );
        assert_eq!(throttle_error(br#"{"error":{"code":190}}"#), None);
        assert_eq!(throttle_error(br#"{"error":{"code":80015}}"#), None);
        assert_eq!(throttle_error(br#"{"id":"1"}"#), None);
        assert_eq!(throttle_error(b"garbage"), None);
    }

    proptest::proptest! {
        /// Usage headers are JSON in a header value, from a server we do
        /// not control: any bytes parse or fail, never panic.
        #[test]
        fn usage_parsers_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse_app(&bytes);
            let _ = parse_ad_account(&bytes);
            let _ = parse_business(&bytes);
            let _ = parse_insights(&bytes);
            let _ = throttle_error(&bytes);
        }

        #[test]
        fn numbers_of_any_size_parse_without_panic(n in proptest::num::f64::ANY, code in proptest::num::i64::ANY) {
            let app = format!(r#"{{"call_count":{n},"total_time":1,"total_cputime":1}}"#);
            let _ = parse_app(app.as_bytes());
            let error = format!(r#"{{"error":{{"code":{code},"error_subcode":{code}}}}}"#);
            let _ = throttle_error(error.as_bytes());
        }
    }
}
