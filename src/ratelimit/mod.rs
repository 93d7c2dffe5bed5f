//! Graph's rate limits, in three steps: [`observe`] reads what an answer
//! says (pure), [`export`] turns it into metrics, and [`RateLimits`] keeps
//! the state: throttling answers put their scope (the app, a caller, or a
//! business object such as an ad account) into a throttled state, and high
//! usage counts as pressure. The read path asks for a [`Verdict`] before
//! spending quota on a stored entry.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderMap, StatusCode};

use crate::cache::TokenIdentity;
pub use crate::config::ThrottleSettings;
use crate::graph::routes::ObjectId;
use crate::metrics::Metrics;

mod export;
mod observe;
pub mod share;

#[cfg(test)]
use observe::{seconds, MAX_WAIT};

/// Whose quota an answer speaks about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    App,
    Object(ObjectId),
    /// One caller's token: user-level limits (code 17 without a business
    /// header, code 32) throttle that caller, not everyone.
    Caller(TokenIdentity),
}

/// Whom an upstream answer speaks about.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    /// The path node of each request the answer covers (one for a single
    /// request, one per item for a batch).
    pub nodes: Vec<ObjectId>,
    /// The ad account named in the path (`act_<id>`), which
    /// X-Ad-Account-Usage speaks about.
    pub account: Option<ObjectId>,
    /// The caller's token identity.
    pub caller: Option<TokenIdentity>,
}

impl Subject {
    /// The subject of a single request to `path` by `caller`.
    pub fn of_request(path: &str, caller: Option<TokenIdentity>) -> Self {
        let node = crate::graph::routes::path_node(path);
        Self {
            account: node
                .filter(|n| n.starts_with("act_"))
                .and_then(ObjectId::parse),
            nodes: node.and_then(ObjectId::parse).into_iter().collect(),
            caller,
        }
    }

    /// The subject of several requests (a batch) by one caller.
    pub fn of_batch<'a>(
        subjects: impl IntoIterator<Item = &'a Subject>,
        caller: Option<TokenIdentity>,
    ) -> Self {
        let mut nodes: Vec<ObjectId> = subjects
            .into_iter()
            .flat_map(|s| s.nodes.iter().cloned())
            .collect();
        nodes.sort();
        nodes.dedup();
        Self {
            nodes,
            account: None,
            caller,
        }
    }
}

#[derive(Debug)]
struct ScopeState {
    throttled_until: Option<Instant>,
    code: i64,
    /// Highest usage ratio last reported for the scope, and when.
    usage: Option<(f64, Instant)>,
}

impl ScopeState {
    /// A scope first heard of: neither throttled nor under known usage.
    fn new(code: i64) -> Self {
        Self {
            throttled_until: None,
            code,
            usage: None,
        }
    }
}

/// What the read path may do for a request's scopes right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Throttled: the remaining wait and the Graph error code behind it.
    pub throttled: Option<(Duration, i64)>,
    /// Highest recent usage ratio of the request's scopes (0 if unknown).
    pub usage: f64,
}

impl Verdict {
    const CLEAR: Verdict = Verdict {
        throttled: None,
        usage: 0.0,
    };
}

/// Usage older than this no longer counts as pressure.
pub(crate) const USAGE_MEMORY: Duration = Duration::from_secs(300);
/// At most one warning per this interval for malformed headers.
pub(super) const WARN_INTERVAL_SECS: u64 = 60;

/// Rate-limit state shared by all requests.
pub struct RateLimits {
    settings: arc_swap::ArcSwap<ThrottleSettings>,
    scopes: Mutex<HashMap<Scope, ScopeState>>,
    /// False until any usage or throttle was seen: keeps the common path
    /// lock-free.
    active: AtomicBool,
    labels: Mutex<HashSet<String>>,
    last_warning: AtomicU64,
    /// In a fleet: what this replica saw, for [`share`] to send.
    outbox: Option<Mutex<HashMap<String, share::Shared>>>,
}

impl RateLimits {
    pub fn new(settings: ThrottleSettings) -> Self {
        Self {
            settings: arc_swap::ArcSwap::from_pointee(settings),
            scopes: Mutex::default(),
            active: AtomicBool::new(false),
            labels: Mutex::default(),
            last_warning: AtomicU64::new(0),
            outbox: None,
        }
    }

    /// State that also shares what it sees with a fleet (see [`share`]).
    pub fn shared(settings: ThrottleSettings) -> Self {
        Self {
            outbox: Some(Mutex::default()),
            ..Self::new(settings)
        }
    }

    /// Queues a report for the fleet, when there is one: one per kind and
    /// scope, the one that expires last.
    fn share(&self, report: share::Shared) {
        if let Some(outbox) = &self.outbox {
            let mut outbox = outbox.lock().unwrap_or_else(|e| e.into_inner());
            match outbox.get(&report.field) {
                Some(queued) if queued.until_ms >= report.until_ms => {}
                _ if outbox.len() >= share::MAX_QUEUED && !outbox.contains_key(&report.field) => {}
                _ => {
                    outbox.insert(report.field.clone(), report);
                }
            }
        }
    }

    /// What was queued for the fleet since the last call.
    pub(crate) fn take_shared(&self) -> Vec<share::Shared> {
        self.outbox.as_ref().map_or_else(Vec::new, |outbox| {
            let mut outbox = outbox.lock().unwrap_or_else(|e| e.into_inner());
            outbox.drain().map(|(_, report)| report).collect()
        })
    }

    /// Puts back reports that could not be sent (Redis did not answer).
    pub(crate) fn requeue(&self, reports: Vec<(String, u64, String)>) {
        if let Some(outbox) = &self.outbox {
            let mut outbox = outbox.lock().unwrap_or_else(|e| e.into_inner());
            for (field, until_ms, value) in reports {
                if outbox.len() < share::MAX_QUEUED && until_ms > crate::fleet::unix_ms() {
                    outbox
                        .entry(field.clone())
                        .or_insert(share::Shared::from_parts(field, until_ms, value));
                }
            }
        }
    }

    /// Applies a throttle another replica saw, when it lasts longer than
    /// what this replica knows. Returns whether it changed anything.
    pub(crate) fn import_throttle(&self, scope: Scope, wait: Duration, code: i64) -> bool {
        let now = Instant::now();
        let Some(until) = now.checked_add(wait) else {
            return false;
        };
        self.active.store(true, Ordering::Release);
        let mut scopes = self.lock();
        prune(&mut scopes, now);
        let state = scopes.entry(scope).or_insert(ScopeState::new(code));
        // Its own report coming back differs by rounding only.
        if state
            .throttled_until
            .is_some_and(|u| u + Duration::from_millis(500) >= until)
        {
            return false;
        }
        state.throttled_until = Some(until);
        state.code = code;
        true
    }

    /// Applies a usage reading another replica took `at`, when it is newer
    /// than this replica's own. Returns whether it changed anything.
    pub(crate) fn import_pressure(&self, scope: Scope, ratio: f64, at: Instant) -> bool {
        let now = Instant::now();
        if now.saturating_duration_since(at) >= USAGE_MEMORY {
            return false;
        }
        self.active.store(true, Ordering::Release);
        let mut scopes = self.lock();
        prune(&mut scopes, now);
        let state = scopes.entry(scope).or_insert(ScopeState::new(0));
        if state
            .usage
            .is_some_and(|(_, seen)| seen + Duration::from_millis(10) >= at)
        {
            return false;
        }
        state.usage = Some((ratio, at));
        true
    }

    /// Reads the usage headers of one upstream answer (a response, a 304,
    /// a batch, or a batch item) about `subject`: parse, export, then update.
    pub fn observe(&self, headers: &HeaderMap, subject: &Subject, metrics: &Metrics) {
        let observations = observe::usage_of(headers, subject);
        self.export(&observations, subject, metrics);
        if observations.scopes.is_empty() {
            return;
        }
        let now = Instant::now();
        self.active.store(true, Ordering::Release);
        let mut scopes = self.lock();
        prune(&mut scopes, now);
        for update in observations.scopes {
            let state = scopes
                .entry(update.scope.clone())
                .or_insert(ScopeState::new(0));
            let previous = state
                .usage
                .filter(|(_, at)| *at == now)
                .map_or(0.0, |(r, _)| r);
            // Pressure is shared while it lasts, and once more as it ends, so
            // siblings see the drop too.
            let was_pressed = state
                .usage
                .is_some_and(|(r, _)| r >= self.settings().pressure_threshold);
            state.usage = Some((update.ratio.max(previous), now));
            if let Some(wait) = update.blocked {
                state.throttled_until = now.checked_add(wait);
                if state.code == 0 {
                    state.code = 80_000;
                }
            }
            if let Some(wait) = update.blocked {
                self.share(share::Shared::throttle(&update.scope, wait, state.code));
            }
            if update.ratio >= self.settings().pressure_threshold || was_pressed {
                self.share(share::Shared::pressure(&update.scope, update.ratio));
            }
        }
    }

    /// Reads an upstream answer whose body is at hand: its usage headers and,
    /// for an error, whether it is a throttling answer.
    pub fn observe_answer(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        subject: &Subject,
        metrics: &Metrics,
    ) {
        self.observe(headers, subject, metrics);
        let Some(throttle) =
            observe::throttle_of(status, headers, body, subject, self.settings().backoff)
        else {
            return;
        };
        let code = throttle.code;
        metrics
            .usage
            .throttle_responses
            .with_label_values(&[&code.to_string()])
            .inc();
        let now = Instant::now();
        self.active.store(true, Ordering::Release);
        let mut scopes = self.lock();
        prune(&mut scopes, now);
        for (scope, wait) in throttle.blocked {
            let scope_key = scope.clone();
            tracing::warn!(scope = ?scope, code, wait_seconds = wait.as_secs(), "Graph is throttling; serving stored entries for this scope");
            let state = scopes.entry(scope).or_insert(ScopeState::new(code));
            state.throttled_until = now.checked_add(wait);
            state.code = code;
            self.share(share::Shared::throttle(&scope_key, wait, code));
        }
    }

    /// The state of the app, of `objects` and of the caller for one read.
    pub fn verdict(&self, objects: &[ObjectId], caller: Option<TokenIdentity>) -> Verdict {
        if !self.active.load(Ordering::Acquire) {
            return Verdict::CLEAR;
        }
        let now = Instant::now();
        let scopes = self.lock();
        let mut verdict = Verdict::CLEAR;
        let app = std::iter::once(Scope::App);
        let caller = caller.map(Scope::Caller);
        for scope in app
            .chain(caller)
            .chain(objects.iter().cloned().map(Scope::Object))
        {
            let Some(state) = scopes.get(&scope) else {
                continue;
            };
            if let Some(until) = state.throttled_until.filter(|u| *u > now) {
                let remaining = until - now;
                if verdict.throttled.is_none_or(|(r, _)| remaining > r) {
                    verdict.throttled = Some((remaining, state.code));
                }
            }
            if let Some((ratio, at)) = state.usage {
                if now.duration_since(at) < USAGE_MEMORY {
                    verdict.usage = verdict.usage.max(ratio);
                }
            }
        }
        verdict
    }

    /// The fresh TTL to apply at `usage`, stretched when quota is scarce.
    pub fn stretched_ttl(&self, fresh_ttl: Duration, usage: f64) -> Duration {
        let settings = self.settings();
        stretch(
            fresh_ttl,
            usage,
            settings.quota_ttl_from,
            settings.quota_ttl_max,
        )
    }

    /// The settings in force (a reload swaps them).
    pub fn settings(&self) -> arc_swap::Guard<std::sync::Arc<ThrottleSettings>> {
        self.settings.load()
    }

    /// Replaces the settings for what comes next (SIGHUP).
    pub fn set_settings(&self, settings: ThrottleSettings) {
        self.settings.store(std::sync::Arc::new(settings));
    }

    /// Scopes throttled right now (for the gauge).
    pub fn throttled_scopes(&self) -> usize {
        let now = Instant::now();
        self.lock()
            .values()
            .filter(|s| s.throttled_until.is_some_and(|u| u > now))
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Scope, ScopeState>> {
        self.scopes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Scopes kept before stale ones are pruned.
const SCOPES_BEFORE_PRUNING: usize = 4096;

/// Drops scopes that are neither throttled nor carry recent usage, once the
/// map is large: every object id an answer spoke about would otherwise stay.
fn prune(scopes: &mut HashMap<Scope, ScopeState>, now: Instant) {
    if scopes.len() < SCOPES_BEFORE_PRUNING {
        return;
    }
    scopes.retain(|_, state| {
        state.throttled_until.is_some_and(|u| u > now)
            || state
                .usage
                .is_some_and(|(_, at)| now.duration_since(at) < USAGE_MEMORY)
    });
}

/// Linear stretch of `fresh_ttl` towards `max` as usage goes from `from` to 1.
pub fn stretch(fresh_ttl: Duration, usage: f64, from: Option<f64>, max: Duration) -> Duration {
    let Some(from) = from else { return fresh_ttl };
    if usage <= from || max <= fresh_ttl {
        return fresh_ttl;
    }
    let share = ((usage - from) / (1.0 - from).max(f64::EPSILON)).clamp(0.0, 1.0);
    fresh_ttl + (max - fresh_ttl).mul_f64(share)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::routes::objects_of;

    use crate::headers::header_map as headers;
    #[test]
    fn nothing_seen_means_a_clear_verdict() {
        let limits = RateLimits::new(ThrottleSettings::default());
        assert_eq!(
            limits.verdict(&objects_of("/v1/act_1", []), None),
            Verdict::CLEAR
        );
    }

    #[test]
    fn usage_headers_become_pressure_on_their_scope() {
        let limits = RateLimits::new(ThrottleSettings::default());
        let metrics = Metrics::new();
        let act = objects_of("/v1/act_42/ads", []);
        limits.observe(
            &headers(&[(
                "x-app-usage",
                r#"{"call_count":50,"total_time":96,"total_cputime":3}"#,
            )]),
            &Subject::of_request("/v1/act_42/ads", None),
            &metrics,
        );
        assert_eq!(
            limits.verdict(&objects_of("/v1/other", []), None).usage,
            0.96
        );
        limits.observe(
            &headers(&[(
                "x-business-use-case-usage",
                r#"{"42":[{"type":"ads_management","call_count":99}]}"#,
            )]),
            &Subject::of_request("/v1/act_42/ads", None),
            &metrics,
        );
        assert_eq!(limits.verdict(&act, None).usage, 0.99);
        assert_eq!(
            limits.verdict(&objects_of("/v1/act_7", []), None).usage,
            0.96
        );
    }

    #[test]
    fn throttle_answers_block_the_business_named_in_the_header() {
        let limits = RateLimits::new(ThrottleSettings::default());
        let metrics = Metrics::new();
        let act = objects_of("/v1/act_42/insights", []);
        let h = headers(&[(
            "x-business-use-case-usage",
            r#"{"42":[{"type":"ads_insights","call_count":100,"estimated_time_to_regain_access":2}]}"#,
        )]);
        let body = br#"{"error":{"code":80000,"error_subcode":2446079,"message":"too many"}}"#;
        limits.observe_answer(
            StatusCode::BAD_REQUEST,
            &h,
            body,
            &Subject::of_request("/v1/act_42/insights", None),
            &metrics,
        );
        let (wait, code) = limits.verdict(&act, None).throttled.unwrap();
        assert_eq!(code, 80000);
        assert!(
            wait > Duration::from_secs(110) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        // Another account is not throttled.
        assert!(limits
            .verdict(&objects_of("/v1/act_7", []), None)
            .throttled
            .is_none());
        assert_eq!(limits.throttled_scopes(), 1);
    }

    #[test]
    fn app_level_throttles_use_the_configured_backoff() {
        let settings = ThrottleSettings {
            backoff: Duration::from_secs(30),
            ..ThrottleSettings::default()
        };
        let limits = RateLimits::new(settings);
        let metrics = Metrics::new();
        let body = br#"{"error":{"code":4,"message":"(#4) Application request limit reached"}}"#;
        limits.observe_answer(
            StatusCode::FORBIDDEN,
            &HeaderMap::new(),
            body,
            &Subject::of_request("/v1/me", None),
            &metrics,
        );
        let (wait, code) = limits
            .verdict(&objects_of("/v1/anything", []), None)
            .throttled
            .unwrap();
        assert_eq!(code, 4);
        assert!(wait <= Duration::from_secs(30) && wait > Duration::from_secs(25));
        // A non-throttle error changes nothing.
        let other = RateLimits::new(ThrottleSettings::default());
        other.observe_answer(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            br#"{"error":{"code":190}}"#,
            &Subject::default(),
            &metrics,
        );
        assert!(other.verdict(&[], None).throttled.is_none());
    }

    #[test]
    fn user_level_limits_throttle_only_their_caller() {
        let limits = RateLimits::new(ThrottleSettings::default());
        let metrics = Metrics::new();
        let hasher = crate::cache::TokenHasher::with_secret([5; 32]);
        let (a, b) = (
            hasher.identify(&crate::cache::identity::Credentials {
                token: Some("a"),
                ..Default::default()
            }),
            hasher.identify(&crate::cache::identity::Credentials {
                token: Some("b"),
                ..Default::default()
            }),
        );
        let body = br#"{"error":{"code":17,"message":"(#17) User request limit reached"}}"#;
        limits.observe_answer(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            body,
            &Subject::of_request("/v1/me", Some(a)),
            &metrics,
        );
        let me = objects_of("/v1/me", []);
        assert!(limits.verdict(&me, Some(a)).throttled.is_some());
        assert!(limits.verdict(&me, Some(b)).throttled.is_none());
    }

    #[test]
    fn ad_account_usage_speaks_about_act_nodes_only() {
        let limits = RateLimits::new(ThrottleSettings::default());
        let metrics = Metrics::new();
        let h = headers(&[("x-ad-account-usage", r#"{"acc_id_util_pct":97}"#)]);
        limits.observe(
            &h,
            &Subject::of_request("/v1/6001/insights", None),
            &metrics,
        );
        assert_eq!(limits.verdict(&objects_of("/v1/6001", []), None).usage, 0.0);
        limits.observe(&h, &Subject::of_request("/v1/act_5/ads", None), &metrics);
        assert_eq!(
            limits.verdict(&objects_of("/v1/act_5", []), None).usage,
            0.97
        );
    }

    #[test]
    fn malformed_headers_are_counted_and_ignored() {
        let limits = RateLimits::new(ThrottleSettings::default());
        let metrics = Metrics::new();
        limits.observe(
            &headers(&[("x-app-usage", "{oops"), ("x-ad-account-usage", "[]")]),
            &Subject::default(),
            &metrics,
        );
        assert_eq!(
            metrics
                .usage
                .parse_errors
                .with_label_values(&["x-app-usage"])
                .get(),
            1
        );
        assert_eq!(
            metrics
                .usage
                .parse_errors
                .with_label_values(&["x-ad-account-usage"])
                .get(),
            1
        );
        assert_eq!(limits.verdict(&[], None), Verdict::CLEAR);
    }

    #[test]
    fn labels_past_the_limit_fold_into_other() {
        let settings = ThrottleSettings {
            label_limit: 2,
            ..ThrottleSettings::default()
        };
        let limits = RateLimits::new(settings);
        let metrics = Metrics::new();
        let buc = r#"{"1":[{"type":"ads_management","call_count":1}],"2":[{"type":"ads_management","call_count":2}],"3":[{"type":"ads_management","call_count":3}]}"#;
        limits.observe(
            &headers(&[("x-business-use-case-usage", buc)]),
            &Subject::default(),
            &metrics,
        );
        assert_eq!(metrics.usage.labels_folded.get(), 1);
        let other = metrics
            .usage
            .business_usage
            .with_label_values(&["other", "ads_management", "call_count"])
            .get();
        assert_eq!(other, 0.03);
    }

    #[test]
    fn absurd_waits_in_headers_are_clamped_not_fatal() {
        assert_eq!(seconds(1e300), MAX_WAIT);
        assert_eq!(seconds(f64::INFINITY), MAX_WAIT);
        assert_eq!(seconds(-5.0), Duration::ZERO);
        assert_eq!(seconds(f64::NAN), Duration::ZERO);
        let limits = RateLimits::new(ThrottleSettings::default());
        let metrics = Metrics::new();
        let h = headers(&[
            (
                "x-business-use-case-usage",
                r#"{"9":[{"type":"pages","call_count":100,"estimated_time_to_regain_access":1e300}]}"#,
            ),
            (
                "x-ad-account-usage",
                r#"{"acc_id_util_pct":100,"reset_time_duration":1e308}"#,
            ),
        ]);
        limits.observe_answer(
            StatusCode::BAD_REQUEST,
            &h,
            br#"{"error":{"code":80001}}"#,
            &Subject::of_request("/v1/9", None),
            &metrics,
        );
        let (wait, _) = limits
            .verdict(&objects_of("/v1/9", []), None)
            .throttled
            .unwrap();
        assert!(wait <= MAX_WAIT);
    }

    #[test]
    fn fresh_ttl_stretches_with_usage() {
        let max = Duration::from_secs(300);
        assert_eq!(stretch(Duration::ZERO, 0.9, None, max), Duration::ZERO);
        assert_eq!(
            stretch(Duration::ZERO, 0.5, Some(0.75), max),
            Duration::ZERO
        );
        assert_eq!(
            stretch(Duration::ZERO, 0.875, Some(0.75), max),
            Duration::from_secs(150)
        );
        assert_eq!(stretch(Duration::from_secs(10), 1.2, Some(0.75), max), max);
        assert_eq!(
            stretch(Duration::from_secs(600), 1.0, Some(0.75), max),
            Duration::from_secs(600)
        );
    }
}
