//! Prometheus metrics. Names are constants here because dashboards and alert
//! rules depend on the exact strings. No label ever carries a token.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::cache::MemoryStore;

pub const REQUESTS: &str = "graphcache_requests_total";
pub const UPSTREAM_REQUESTS: &str = "graphcache_upstream_requests_total";
pub const UPSTREAM_DURATION: &str = "graphcache_upstream_request_duration_seconds";
pub const CACHE_ENTRIES: &str = "graphcache_cache_entries";
pub const CACHE_BYTES: &str = "graphcache_cache_size_bytes";
pub const CACHE_EVICTIONS: &str = "graphcache_cache_evictions_total";
pub const CACHE_INVALIDATIONS: &str = "graphcache_cache_invalidated_entries_total";
pub const UPSTREAM_CALLS: &str = "graphcache_upstream_calls_total";
pub const BATCH_ITEMS: &str = "graphcache_batch_items";
pub const BATCH_NULL_RETRIED: &str = "graphcache_batch_null_items_retried_total";
pub const BATCH_FALLBACKS: &str = "graphcache_batch_fallbacks_total";
pub const BATCH_QUEUED: &str = "graphcache_batch_queued_requests";
pub const COALESCED: &str = "graphcache_coalesced_requests_total";
pub const COALESCE_WAITING: &str = "graphcache_coalesce_waiting_requests";
pub const CLIENT_BATCH_ITEMS: &str = "graphcache_client_batch_items_total";
pub const APP_USAGE: &str = "graphcache_graph_app_usage_ratio";
pub const AD_ACCOUNT_USAGE: &str = "graphcache_graph_ad_account_usage_ratio";
pub const AD_ACCOUNT_RESET: &str = "graphcache_graph_ad_account_reset_seconds";
pub const BUSINESS_USAGE: &str = "graphcache_graph_business_usage_ratio";
pub const BUSINESS_REGAIN: &str = "graphcache_graph_business_regain_access_seconds";
pub const INSIGHTS_ACCOUNT_THROTTLE: &str = "graphcache_graph_insights_account_throttle_ratio";
pub const PAGE_USAGE: &str = "graphcache_graph_page_usage_ratio";
pub const ACCESS_TIER: &str = "graphcache_graph_ads_api_access_tier_info";
pub const INSIGHTS_THROTTLE: &str = "graphcache_graph_insights_throttle_ratio";
pub const USAGE_LAST_SEEN: &str = "graphcache_graph_usage_last_seen_timestamp_seconds";
pub const USAGE_PARSE_ERRORS: &str = "graphcache_graph_usage_parse_errors_total";
pub const USAGE_LABELS_FOLDED: &str = "graphcache_graph_usage_labels_folded_total";
pub const THROTTLE_RESPONSES: &str = "graphcache_graph_throttle_responses_total";
pub const THROTTLED_SCOPES: &str = "graphcache_throttled_scopes";
pub const CONFIG_RELOADS: &str = "graphcache_config_reloads_total";
pub const CONNECTIONS_CLOSED: &str = "graphcache_client_connections_closed_total";
pub const UPSTREAM_IN_FLIGHT: &str = "graphcache_upstream_in_flight_requests";
pub const CALLS_AVOIDED: &str = "graphcache_upstream_calls_avoided_total";

/// Graph's usage headers and throttling, as graphcache saw them.
pub struct UsageMetrics {
    pub app_usage: GaugeVec,
    pub ad_account_usage: GaugeVec,
    pub ad_account_reset: GaugeVec,
    pub business_usage: GaugeVec,
    pub business_regain: GaugeVec,
    pub insights_throttle: GaugeVec,
    pub insights_account: GaugeVec,
    pub page_usage: GaugeVec,
    /// 1 for the access tier Graph named last, 0 for the others seen.
    access_tier: GaugeVec,
    access_tier_lock: std::sync::Mutex<()>,
    pub last_seen: GaugeVec,
    pub parse_errors: IntCounterVec,
    pub labels_folded: IntCounter,
    pub throttle_responses: IntCounterVec,
    pub throttled_scopes: IntGauge,
    pub avoided: AvoidedCalls,
    avoided_by_reason: IntCounterVec,
}

/// Upstream calls graphcache did not make, by reason.
pub struct AvoidedCalls {
    pub fresh_hit: IntCounter,
    pub shared_call: IntCounter,
    pub throttled: IntCounter,
    pub pressure: IntCounter,
}

impl UsageMetrics {
    /// Marks `tier` as the access tier now. Only Graph's documented tiers
    /// become labels (anything else is `other`), so a header cannot mint
    /// series; the lock keeps exactly one at 1.
    pub fn set_access_tier(&self, tier: &str) {
        const TIERS: [&str; 4] = [
            "development_access",
            "standard_access",
            "advanced_access",
            "other",
        ];
        let tier = TIERS[..3]
            .iter()
            .find(|t| **t == tier)
            .copied()
            .unwrap_or("other");
        if self.access_tier.with_label_values(&[tier]).get() == 1.0 {
            return;
        }
        let _one_at_a_time = self
            .access_tier_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for other in TIERS {
            if other != tier && self.access_tier.with_label_values(&[other]).get() != 0.0 {
                self.access_tier.with_label_values(&[other]).set(0.0);
            }
        }
        self.access_tier.with_label_values(&[tier]).set(1.0);
    }

    fn new() -> Self {
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            GaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let avoided = IntCounterVec::new(
            Opts::new(
                CALLS_AVOIDED,
                "Upstream calls not made, by reason (fresh_hit, shared_call, throttled, pressure).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        Self {
            app_usage: gauge(APP_USAGE, "X-App-Usage: share of the app's hourly budget used.", &["metric"]),
            ad_account_usage: gauge(AD_ACCOUNT_USAGE, "X-Ad-Account-Usage: share of the ad account's budget used.", &["account"]),
            ad_account_reset: gauge(AD_ACCOUNT_RESET, "X-Ad-Account-Usage: seconds until the ad account's score resets.", &["account"]),
            business_usage: gauge(
                BUSINESS_USAGE,
                "X-Business-Use-Case-Usage: share of the hourly budget used, by business id, use case and metric.",
                &["business_id", "type", "metric"],
            ),
            business_regain: gauge(
                BUSINESS_REGAIN,
                "X-Business-Use-Case-Usage: seconds until access is regained (0 when not blocked).",
                &["business_id", "type"],
            ),
            insights_throttle: gauge(INSIGHTS_THROTTLE, "X-FB-Ads-Insights-Throttle: utilisation, by scope (app, account).", &["scope"]),
            insights_account: gauge(INSIGHTS_ACCOUNT_THROTTLE, "X-FB-Ads-Insights-Throttle: the ad account's utilisation, by account.", &["account"]),
            page_usage: gauge(PAGE_USAGE, "X-Page-Usage: share of the page's budget used, by page and metric.", &["page", "metric"]),
            access_tier_lock: std::sync::Mutex::new(()),
            access_tier: gauge(ACCESS_TIER, "The app's Marketing API access tier (ads_api_access_tier), 1 for the one Graph named last.", &["tier"]),
            last_seen: gauge(USAGE_LAST_SEEN, "When each usage header was last seen (Unix time).", &["header"]),
            parse_errors: IntCounterVec::new(Opts::new(USAGE_PARSE_ERRORS, "Usage headers that could not be read."), &["header"])
                .expect("valid metric"),
            labels_folded: IntCounter::new(USAGE_LABELS_FOLDED, "Usage samples whose id label was folded into `other`.")
                .expect("valid metric"),
            throttle_responses: IntCounterVec::new(
                Opts::new(THROTTLE_RESPONSES, "Throttling answers from Graph, by error code."),
                &["code"],
            )
            .expect("valid metric"),
            throttled_scopes: IntGauge::new(THROTTLED_SCOPES, "Scopes (app or business objects) throttled now.").expect("valid metric"),
            avoided: AvoidedCalls {
                fresh_hit: avoided.with_label_values(&["fresh_hit"]),
                shared_call: avoided.with_label_values(&["shared_call"]),
                throttled: avoided.with_label_values(&["throttled"]),
                pressure: avoided.with_label_values(&["pressure"]),
            },
            avoided_by_reason: avoided,
        }
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.app_usage.clone()),
            Box::new(self.ad_account_usage.clone()),
            Box::new(self.ad_account_reset.clone()),
            Box::new(self.business_usage.clone()),
            Box::new(self.business_regain.clone()),
            Box::new(self.insights_throttle.clone()),
            Box::new(self.insights_account.clone()),
            Box::new(self.page_usage.clone()),
            Box::new(self.access_tier.clone()),
            Box::new(self.last_seen.clone()),
            Box::new(self.parse_errors.clone()),
            Box::new(self.labels_folded.clone()),
            Box::new(self.throttle_responses.clone()),
            Box::new(self.throttled_scopes.clone()),
            Box::new(self.avoided_by_reason.clone()),
        ]
    }
}

/// Items of client batches by what graphcache did with them.
pub struct ClientBatchMetrics {
    /// Answered from a fresh entry, not sent upstream.
    pub hit: IntCounter,
    /// Sent upstream with graphcache's validator and answered 304.
    pub revalidated: IntCounter,
    /// Sent upstream.
    pub forwarded: IntCounter,
}

/// Packing of reads into Graph batches.
pub struct PackingMetrics {
    /// Plain GETs sent for cacheable reads.
    pub single_calls: IntCounter,
    /// Batch POSTs sent for packed reads.
    pub batch_calls: IntCounter,
    pub batch_items: Histogram,
    pub null_retried: IntCounter,
    pub fallbacks: IntCounter,
    /// Reads waiting for the next batch of their group.
    pub queued: IntGauge,
}

/// Sharing of identical reads.
pub struct CoalesceMetrics {
    /// Requests served by a call another request started.
    pub joined: IntCounter,
    /// Requests waiting on a shared call now.
    pub waiting: IntGauge,
}

/// What the cache did for one client request; the `cache` label of
/// [`REQUESTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from memory, no upstream call.
    Hit,
    /// Revalidated upstream, 304, stored body served.
    Revalidated,
    /// Revalidated upstream, changed: new body stored and served.
    Refreshed,
    /// No entry: forwarded.
    Miss,
    /// Upstream failed; a stale entry was served.
    Stale,
    /// Cacheable method but not cached by rule or request.
    Bypass,
    /// A write, forwarded once.
    Write,
    /// Any other request, passed through.
    Pass,
    /// Answered by graphcache with an error envelope.
    Error,
    /// A client batch (its items are counted separately).
    Batch,
    /// Served from a stored entry because Graph is throttling its scope.
    Throttled,
    /// Served from a stored entry because its scope's quota is nearly spent.
    Pressure,
}

impl Outcome {
    pub const ALL: [Outcome; 12] = [
        Outcome::Hit,
        Outcome::Revalidated,
        Outcome::Refreshed,
        Outcome::Miss,
        Outcome::Stale,
        Outcome::Bypass,
        Outcome::Write,
        Outcome::Pass,
        Outcome::Error,
        Outcome::Batch,
        Outcome::Throttled,
        Outcome::Pressure,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Revalidated => "revalidated",
            Outcome::Refreshed => "refreshed",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Bypass => "bypass",
            Outcome::Write => "write",
            Outcome::Pass => "pass",
            Outcome::Error => "error",
            Outcome::Batch => "batch",
            Outcome::Throttled => "throttled",
            Outcome::Pressure => "pressure",
        }
    }
}

/// All of graphcache's metrics in one registry.
pub struct Metrics {
    registry: Registry,
    /// Pre-resolved per outcome, so counting a hit does no label lookup.
    requests: [IntCounter; Outcome::ALL.len()],
    upstream_requests: IntCounterVec,
    upstream_duration: Histogram,
    /// Upstream exchanges from send until their body is read or dropped.
    upstream_in_flight: IntGauge,
    cache_entries: IntGauge,
    cache_bytes: IntGauge,
    evictions: IntCounterVec,
    invalidations: IntCounter,
    pub packing: PackingMetrics,
    pub coalesce: CoalesceMetrics,
    pub client_batch_items: ClientBatchMetrics,
    pub usage: UsageMetrics,
    /// Client connections by why they ended.
    connections_closed: IntCounterVec,
    /// Configuration reloads (SIGHUP) by result.
    reloads: IntCounterVec,
}

/// One upstream exchange counted in flight; dropping it ends the count, so
/// every path out (answer read, error, timeout, client gone) is covered.
#[derive(Debug)]
pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why a client connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// No complete request head within `header_read_timeout` of connecting
    /// (silent sockets, a stalled protocol sniff or HTTP/2 preface).
    FirstRequestTimeout,
    /// The connection failed (protocol error, reset, hyper's own timers).
    Error,
    /// Closed in order by either side.
    Closed,
}

impl CloseReason {
    pub const ALL: [CloseReason; 3] = [Self::FirstRequestTimeout, Self::Error, Self::Closed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::FirstRequestTimeout => "first_request_timeout",
            Self::Error => "error",
            Self::Closed => "closed",
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests_vec = IntCounterVec::new(
            Opts::new(REQUESTS, "Client requests by what the cache did."),
            &["cache"],
        )
        .expect("valid metric");
        let requests = Outcome::ALL.map(|o| requests_vec.with_label_values(&[o.as_str()]));
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                UPSTREAM_REQUESTS,
                "Requests sent upstream, by response status class (or error).",
            ),
            &["status_class"],
        )
        .expect("valid metric");
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                UPSTREAM_DURATION,
                "Time from sending a request upstream to its response head.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
        )
        .expect("valid metric");
        let upstream_in_flight = IntGauge::new(
            UPSTREAM_IN_FLIGHT,
            "Upstream exchanges under way: sent, and their answer not yet read to its end or dropped.",
        )
        .expect("valid metric");
        let cache_entries =
            IntGauge::new(CACHE_ENTRIES, "Entries in the cache.").expect("valid metric");
        let cache_bytes = IntGauge::new(
            CACHE_BYTES,
            "Weighted size of the cache (bodies and headers).",
        )
        .expect("valid metric");
        let evictions = IntCounterVec::new(
            Opts::new(
                CACHE_EVICTIONS,
                "Entries removed by the cache, by cause (size, expired, explicit).",
            ),
            &["cause"],
        )
        .expect("valid metric");
        let invalidations = IntCounter::new(
            CACHE_INVALIDATIONS,
            "Entries dropped because a write changed their object.",
        )
        .expect("valid metric");
        let calls = IntCounterVec::new(
            Opts::new(
                UPSTREAM_CALLS,
                "Upstream calls made for cacheable reads, by kind (single GET or batch POST).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let packing = PackingMetrics {
            single_calls: calls.with_label_values(&["single"]),
            batch_calls: calls.with_label_values(&["batch"]),
            batch_items: Histogram::with_opts(
                HistogramOpts::new(BATCH_ITEMS, "Items per upstream batch graphcache packed.")
                    .buckets(vec![2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0]),
            )
            .expect("valid metric"),
            null_retried: IntCounter::new(
                BATCH_NULL_RETRIED,
                "Batch items answered null (not executed) and retried alone.",
            )
            .expect("valid metric"),
            fallbacks: IntCounter::new(
                BATCH_FALLBACKS,
                "Batches that failed as a whole and fell back to plain GETs.",
            )
            .expect("valid metric"),
            queued: IntGauge::new(BATCH_QUEUED, "Reads waiting for their group's next batch.")
                .expect("valid metric"),
        };
        let coalesce = CoalesceMetrics {
            joined: IntCounter::new(
                COALESCED,
                "Requests served by an upstream call another identical request started.",
            )
            .expect("valid metric"),
            waiting: IntGauge::new(
                COALESCE_WAITING,
                "Requests waiting on a shared upstream call.",
            )
            .expect("valid metric"),
        };
        let items = IntCounterVec::new(
            Opts::new(
                CLIENT_BATCH_ITEMS,
                "Items of client batches by what graphcache did (hit, revalidated, forwarded; revalidated items also count as forwarded).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let client_batch_items = ClientBatchMetrics {
            hit: items.with_label_values(&["hit"]),
            revalidated: items.with_label_values(&["revalidated"]),
            forwarded: items.with_label_values(&["forwarded"]),
        };
        let connections_closed = IntCounterVec::new(
            Opts::new(CONNECTIONS_CLOSED, "Client connections by why they ended."),
            &["reason"],
        )
        .expect("valid metric");
        for reason in CloseReason::ALL {
            connections_closed.with_label_values(&[reason.as_str()]);
        }
        let reloads = IntCounterVec::new(
            Opts::new(CONFIG_RELOADS, "Configuration reloads (SIGHUP) by result."),
            &["result"],
        )
        .expect("valid metric");
        for result in ["ok", "error"] {
            reloads.with_label_values(&[result]);
        }
        let usage = UsageMetrics::new();
        for c in usage.collectors() {
            registry.register(c).expect("metric names are unique");
        }
        // Series that dashboards and alerts read exist from the start at 0.
        for class in ["2xx", "3xx", "4xx", "5xx", "error"] {
            upstream_requests.with_label_values(&[class]);
        }
        for cause in ["size", "expired", "explicit"] {
            evictions.with_label_values(&[cause]);
        }
        for c in [
            Box::new(items) as Box<dyn prometheus::core::Collector>,
            Box::new(calls),
            Box::new(packing.batch_items.clone()),
            Box::new(packing.null_retried.clone()),
            Box::new(packing.fallbacks.clone()),
            Box::new(packing.queued.clone()),
            Box::new(coalesce.joined.clone()),
            Box::new(coalesce.waiting.clone()),
            Box::new(requests_vec),
            Box::new(upstream_requests.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(upstream_in_flight.clone()),
            Box::new(cache_entries.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(evictions.clone()),
            Box::new(invalidations.clone()),
            Box::new(connections_closed.clone()),
            Box::new(reloads.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            upstream_requests,
            upstream_duration,
            upstream_in_flight,
            cache_entries,
            cache_bytes,
            evictions,
            invalidations,
            packing,
            coalesce,
            client_batch_items,
            usage,
            connections_closed,
            reloads,
        }
    }

    pub fn count_reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    pub fn count_closed(&self, reason: CloseReason) {
        self.connections_closed
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    pub fn count_request(&self, outcome: Outcome) {
        self.requests[outcome as usize].inc();
    }

    /// Counts one upstream exchange in flight until the guard drops.
    pub fn upstream_in_flight(&self) -> InFlight {
        self.upstream_in_flight.inc();
        InFlight(self.upstream_in_flight.clone())
    }

    /// Records one upstream exchange: its status (None for a transport error
    /// or timeout) and how long the response head took.
    pub fn observe_upstream(&self, status: Option<http::StatusCode>, seconds: f64) {
        let class = match status.map(|s| s.as_u16() / 100) {
            Some(1) => "1xx",
            Some(2) => "2xx",
            Some(3) => "3xx",
            Some(4) => "4xx",
            Some(5) => "5xx",
            _ => "error",
        };
        self.upstream_requests.with_label_values(&[class]).inc();
        self.upstream_duration.observe(seconds);
    }

    pub fn count_eviction(&self, cause: moka::notification::RemovalCause) {
        use moka::notification::RemovalCause::*;
        let cause = match cause {
            Size => "size",
            Expired => "expired",
            Explicit => "explicit",
            Replaced => "replaced",
        };
        self.evictions.with_label_values(&[cause]).inc();
    }

    pub fn count_invalidated(&self, entries: usize) {
        self.invalidations.inc_by(entries as u64);
    }

    /// The registry, for parts that keep their own metrics (the fleet).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition, with cache and throttle gauges read now.
    pub async fn render(&self, store: &MemoryStore, throttled_scopes: usize) -> String {
        self.usage.throttled_scopes.set(throttled_scopes as i64);
        store.sync().await;
        self.cache_entries.set(store.entry_count() as i64);
        self.cache_bytes.set(store.weighted_size() as i64);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
