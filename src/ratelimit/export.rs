//! The export step: an answer's observations become Prometheus gauges, with
//! id labels bounded by `usage_label_limit`.

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::graph::usage::UsageError;
use crate::metrics::Metrics;
use crate::ratelimit::observe::{Reading, UsageObservations};
use crate::ratelimit::{RateLimits, Subject, WARN_INTERVAL_SECS};

impl RateLimits {
    /// Sets the gauges `observations` carry and counts their parse errors.
    pub(super) fn export(
        &self,
        observations: &UsageObservations,
        subject: &Subject,
        metrics: &Metrics,
    ) {
        let m = &metrics.usage;
        for header in &observations.seen {
            m.last_seen.with_label_values(&[header]).set(unix_now());
        }
        // One label per id and answer, so a folded id is counted once.
        let mut labels: Vec<(String, String)> = Vec::new();
        let mut label_of = |id: &str| -> String {
            if let Some((_, label)) = labels.iter().find(|(seen, _)| seen == id) {
                return label.clone();
            }
            let label = self.label(id, metrics);
            labels.push((id.to_owned(), label.clone()));
            label
        };
        for reading in &observations.readings {
            match reading {
                Reading::App { metric, ratio } => {
                    m.app_usage.with_label_values(&[metric]).set(*ratio);
                }
                Reading::AdAccount {
                    ratio,
                    reset_seconds,
                } => {
                    let label = subject
                        .account
                        .as_ref()
                        .map_or_else(|| "unknown".to_owned(), |o| label_of(o.as_str()));
                    if let Some(ratio) = ratio {
                        m.ad_account_usage.with_label_values(&[&label]).set(*ratio);
                    }
                    if let Some(reset) = reset_seconds {
                        m.ad_account_reset.with_label_values(&[&label]).set(*reset);
                    }
                }
                Reading::Business {
                    id,
                    kind,
                    metric,
                    ratio,
                } => {
                    let label = label_of(id);
                    m.business_usage
                        .with_label_values(&[label.as_str(), kind.as_str(), metric])
                        .set(*ratio);
                }
                Reading::BusinessRegain { id, kind, seconds } => {
                    let label = label_of(id);
                    m.business_regain
                        .with_label_values(&[label.as_str(), kind.as_str()])
                        .set(*seconds);
                }
                Reading::Insights { scope, ratio } => {
                    m.insights_throttle.with_label_values(&[scope]).set(*ratio);
                }
                Reading::InsightsAccount { ratio } => {
                    let label = subject
                        .account
                        .as_ref()
                        .map_or_else(|| "unknown".to_owned(), |o| label_of(o.as_str()));
                    m.insights_account.with_label_values(&[&label]).set(*ratio);
                }
                Reading::Page { metric, ratio } => {
                    // A batch answer speaks for several nodes: which page
                    // is unknown.
                    let label = match subject.nodes.as_slice() {
                        [page] => label_of(page.as_str()),
                        _ => "unknown".to_owned(),
                    };
                    m.page_usage
                        .with_label_values(&[label.as_str(), metric])
                        .set(*ratio);
                }
                Reading::AccessTier(tier) => m.set_access_tier(tier),
            }
        }
        for (header, error) in &observations.errors {
            m.parse_errors.with_label_values(&[header]).inc();
            self.warn_now_and_then(error);
        }
    }

    /// A bounded label value: past the limit, ids fold into `other`.
    pub(super) fn label(&self, id: &str, metrics: &Metrics) -> String {
        let mut labels = self.labels.lock().unwrap_or_else(|e| e.into_inner());
        if labels.contains(id) {
            return id.to_owned();
        }
        if labels.len() < self.settings().label_limit {
            labels.insert(id.to_owned());
            return id.to_owned();
        }
        metrics.usage.labels_folded.inc();
        "other".to_owned()
    }

    fn warn_now_and_then(&self, error: &UsageError) {
        let now = unix_now() as u64;
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + WARN_INTERVAL_SECS
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(%error, "ignoring a malformed usage header (counted in graphcache_graph_usage_parse_errors_total)");
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
