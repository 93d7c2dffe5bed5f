//! Per-route cache policy and the Graph objects a request touches.
//!
//! Patterns match the path with its version prefix removed, segment by
//! segment: `*` inside a segment matches any run of characters (`act_*`), and a
//! `**` segment matches any number of segments. A trailing slash is ignored,
//! since the Python SDK adds one to object reads.

use std::time::Duration;

/// What a route rule sets; unset fields fall back to the global defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    /// The pattern as written in the config, for messages.
    pub pattern: String,
    segments: Vec<String>,
    pub fresh_ttl: Option<Duration>,
    pub max_stale: Option<Duration>,
    pub cache: bool,
}

impl RouteRule {
    /// Builds a rule; `pattern` must be non-empty.
    pub fn new(
        pattern: &str,
        fresh_ttl: Option<Duration>,
        max_stale: Option<Duration>,
        cache: bool,
    ) -> Self {
        Self {
            pattern: pattern.to_owned(),
            segments: split_path(strip_version(pattern))
                .map(str::to_owned)
                .collect(),
            fresh_ttl,
            max_stale,
            cache,
        }
    }

    fn matches(&self, path: &[&str]) -> bool {
        match_segments(&self.segments, path)
    }
}

/// The effective policy for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    pub fresh_ttl: Duration,
    pub max_stale: Duration,
    pub cache: bool,
    /// Always revalidated: no fresh TTL, and no serving from memory under
    /// quota pressure (only while Graph throttles).
    pub always_revalidate: bool,
}

impl CachePolicy {
    /// A cacheable policy with these TTLs in seconds (tests).
    #[cfg(test)]
    pub(crate) fn ttls(fresh: u64, stale: u64) -> Self {
        Self {
            fresh_ttl: Duration::from_secs(fresh),
            max_stale: Duration::from_secs(stale),
            cache: true,
            always_revalidate: false,
        }
    }

    /// How long an entry is worth keeping after it was stored or validated.
    pub fn retention(&self) -> Duration {
        self.fresh_ttl.max(self.max_stale)
    }
}

/// The ordered rules plus the global defaults; the first matching rule wins.
#[derive(Debug, Clone)]
pub struct RoutePolicies {
    pub default: CachePolicy,
    pub rules: Vec<RouteRule>,
}

impl RoutePolicies {
    /// The policy for `path` (as sent, version prefix included).
    pub fn policy_for(&self, path: &str) -> CachePolicy {
        let mut policy = self.configured_policy(path);
        if is_async_status_read(path) {
            // Async request sets change until they complete: always revalidate.
            policy.fresh_ttl = Duration::ZERO;
            policy.always_revalidate = true;
        }
        policy
    }

    /// The longest any entry may be kept under these rules.
    pub fn longest_retention(&self) -> Duration {
        self.rules
            .iter()
            .map(|r| {
                r.fresh_ttl
                    .unwrap_or(self.default.fresh_ttl)
                    .max(r.max_stale.unwrap_or(self.default.max_stale))
            })
            .fold(self.default.retention(), Duration::max)
    }

    fn configured_policy(&self, path: &str) -> CachePolicy {
        if self.rules.is_empty() {
            return self.default;
        }
        let segments: Vec<&str> = split_path(strip_version(path)).collect();
        match self.rules.iter().find(|r| r.matches(&segments)) {
            Some(rule) => CachePolicy {
                fresh_ttl: rule.fresh_ttl.unwrap_or(self.default.fresh_ttl),
                max_stale: rule.max_stale.unwrap_or(self.default.max_stale),
                cache: rule.cache,
                always_revalidate: false,
            },
            None => self.default,
        }
    }
}

/// Edges listing Marketing API async requests and request sets (contract
/// §7), whose state changes as Graph works through them.
const ASYNC_STATUS_EDGES: [&str; 4] = [
    "asyncadrequestsets",
    "asyncadrequests",
    "async_requests",
    "requests",
];

fn is_async_status_read(path: &str) -> bool {
    split_path(strip_version(path))
        .nth(1)
        .is_some_and(|edge| ASYNC_STATUS_EDGES.contains(&edge))
}

/// True for a Graph version segment such as `v26.0` or `v3`.
pub fn is_version_segment(segment: &str) -> bool {
    let Some(rest) = segment.strip_prefix('v') else {
        return false;
    };
    let (major, minor) = rest.split_once('.').unwrap_or((rest, "0"));
    !major.is_empty()
        && major.bytes().all(|b| b.is_ascii_digit())
        && !minor.is_empty()
        && minor.bytes().all(|b| b.is_ascii_digit())
}

/// The path without its leading `/vX.Y` segment, if it has one.
pub fn strip_version(path: &str) -> &str {
    let trimmed = path.trim_start_matches('/');
    match trimmed.split_once('/') {
        Some((first, rest)) if is_version_segment(first) => rest,
        None if is_version_segment(trimmed) => "",
        _ => trimmed,
    }
}

fn split_path(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

fn match_segments(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| match_segments(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((segment, path_rest)) => {
                wildcard_match(first.as_bytes(), segment.as_bytes())
                    && match_segments(rest, path_rest)
            }
            None => false,
        },
    }
}

/// `*` matches any run of bytes (including none); everything else literally.
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| wildcard_match(rest, &text[skip..])),
        Some((c, rest)) => text.first() == Some(c) && wildcard_match(rest, &text[1..]),
    }
}

/// A Graph object a request reads or changes, normalised so `act_123` and
/// `123` (an ad account named by `account_id`) are the same object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(Box<str>);

impl ObjectId {
    /// An object id from a path segment or parameter value (`act_` dropped).
    pub fn parse(raw: &str) -> Option<Self> {
        let raw = raw.trim();
        let bare = raw.strip_prefix("act_").unwrap_or(raw);
        if bare.is_empty() || !bare.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return None;
        }
        Some(Self(bare.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lookups by `&str` without building an id (the hash of a `Box<str>` is
/// its `str`'s).
impl std::borrow::Borrow<str> for ObjectId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// The first path segment after the version, as sent (`act_123`).
pub fn path_node(path: &str) -> Option<&str> {
    split_path(strip_version(path)).next()
}

/// The objects a request concerns: first the node after the version
/// (`act_123` in `/v26.0/act_123/ads`), then, sorted and deduplicated, every
/// id named by an `ids`, `id`, `*_id` or `*_ids` parameter. The node comes
/// first because usage headers without an id (X-Ad-Account-Usage) speak
/// about it.
pub fn objects_of<'a>(
    path: &str,
    params: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<ObjectId> {
    // Percent-encoded ids (`%31%32%33`, `act%5F1`) name the same object.
    let node = split_path(strip_version(path)).next().and_then(|segment| {
        percent_encoding::percent_decode_str(segment)
            .decode_utf8()
            .ok()
            .and_then(|decoded| ObjectId::parse(&decoded))
    });
    let mut named = Vec::new();
    for (name, value) in params {
        if names_ids(name) {
            named.extend(ids_in(value));
        }
    }
    named.sort();
    named.dedup();
    if let Some(node) = node {
        named.retain(|o| *o != node);
        named.insert(0, node);
    }
    named
}

/// True for a parameter whose value names objects: `ids`, `id`, `*_id`,
/// `*_ids`.
pub fn names_ids(name: &str) -> bool {
    name == "ids" || name == "id" || name.ends_with("_id") || name.ends_with("_ids")
}

/// Id-looking tokens (`123`, `act_123`) in a parameter value, which may be a
/// comma list or JSON (`["1","2"]`, `{"id":"3"}`).
fn ids_in(value: &str) -> impl Iterator<Item = ObjectId> + '_ {
    value
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| {
            let bare = t.strip_prefix("act_").unwrap_or(t);
            !bare.is_empty() && bare.bytes().all(|b| b.is_ascii_digit())
        })
        .filter_map(ObjectId::parse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::query::QueryParams;

    fn policies() -> RoutePolicies {
        RoutePolicies {
            default: CachePolicy {
                fresh_ttl: Duration::ZERO,
                max_stale: Duration::from_secs(3600),
                cache: true,
                always_revalidate: false,
            },
            rules: vec![
                RouteRule::new("*/insights", Some(Duration::from_secs(300)), None, true),
                RouteRule::new("act_*/campaigns", None, Some(Duration::from_secs(5)), true),
                RouteRule::new("me/**", None, None, false),
            ],
        }
    }

    #[test]
    fn version_prefix_is_ignored_and_first_rule_wins() {
        let p = policies();
        assert_eq!(
            p.policy_for("/v26.0/act_1/insights").fresh_ttl,
            Duration::from_secs(300)
        );
        assert_eq!(
            p.policy_for("/123/insights/").fresh_ttl,
            Duration::from_secs(300)
        );
        let c = p.policy_for("/v19.0/act_9/campaigns");
        assert_eq!(
            (c.fresh_ttl, c.max_stale),
            (Duration::ZERO, Duration::from_secs(5))
        );
        assert!(!p.policy_for("/v1.0/me/adaccounts").cache);
        assert!(!p.policy_for("/me").cache);
        assert_eq!(p.policy_for("/v26.0/123"), p.default);
        assert_eq!(p.policy_for("/v26.0/9/campaigns"), p.default);
    }

    #[test]
    fn async_request_set_reads_always_revalidate() {
        let mut p = policies();
        p.default.fresh_ttl = Duration::from_secs(60);
        assert_eq!(
            p.policy_for("/v26.0/act_1/asyncadrequestsets").fresh_ttl,
            Duration::ZERO
        );
        assert_eq!(
            p.policy_for("/v26.0/6000/requests").fresh_ttl,
            Duration::ZERO
        );
        assert_eq!(
            p.policy_for("/v26.0/act_1/async_requests").fresh_ttl,
            Duration::ZERO
        );
        assert_eq!(
            p.policy_for("/v26.0/act_1/ads").fresh_ttl,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn version_segments() {
        assert!(is_version_segment("v26.0"));
        assert!(is_version_segment("v3"));
        assert!(!is_version_segment("v"));
        assert!(!is_version_segment("vx.0"));
        assert!(!is_version_segment("26.0"));
        assert_eq!(strip_version("/v26.0/act_1/ads"), "act_1/ads");
        assert_eq!(strip_version("/v26.0"), "");
        assert_eq!(strip_version("/me"), "me");
    }

    #[test]
    fn objects_from_path_and_parameters() {
        let q = QueryParams::parse(Some(
            "adset_id=42&fields=a,b&ids=7,act_8&creative={\"creative_id\":\"9\"}&name=5",
        ));
        let got: Vec<String> = objects_of("/v26.0/act_123/ads", q.iter())
            .iter()
            .map(|o| o.as_str().to_owned())
            .collect();
        assert_eq!(got, ["123", "42", "7", "8"]);
        // The node leads even when a parameter id sorts before it.
        let q = QueryParams::parse(Some("adset_id=55"));
        let got: Vec<String> = objects_of("/v26.0/act_9/ads", q.iter())
            .iter()
            .map(|o| o.as_str().to_owned())
            .collect();
        assert_eq!(got, ["9", "55"]);
        assert!(objects_of("/v26.0/", []).is_empty());
        assert_eq!(objects_of("/me/feed", [])[0].as_str(), "me");
        assert_eq!(objects_of("/v26.0/%31%32%33", [])[0].as_str(), "123");
        assert_eq!(objects_of("/v26.0/act%5F9/ads", [])[0].as_str(), "9");
    }
}
