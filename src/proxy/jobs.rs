//! What graphcache has learnt about Marketing API async jobs, from Graph's
//! own answers: the replies that create them and the status reads that say
//! they finished ([`crate::graph::jobs`]). A finished job's status and
//! results are kept for the route's whole retention with no revalidation;
//! a running job's status is served for `async_poll_interval`, so polls
//! within it share one call (per caller: entries never cross identities).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::graph::jobs::{job_read, JobRead, JobState};
use crate::graph::routes::{CachePolicy, ObjectId};

/// Most jobs remembered; the oldest are forgotten first (then their reads
/// simply follow the route again).
const MAX_JOBS: u64 = 10_000;

pub(crate) struct Jobs {
    known: moka::sync::Cache<ObjectId, JobState>,
    /// False until a job is learnt: reads skip the lookup until then.
    used: AtomicBool,
}

impl Jobs {
    pub(crate) fn new() -> Self {
        Self {
            known: moka::sync::Cache::builder()
                .max_capacity(MAX_JOBS)
                .time_to_idle(Duration::from_secs(24 * 3600))
                .build(),
            used: AtomicBool::new(false),
        }
    }

    /// Records where job `id` stands. A finished job stays finished.
    pub(crate) fn learn(&self, id: ObjectId, state: JobState) {
        if state == JobState::Running && self.known.get(&id) == Some(JobState::Finished) {
            return;
        }
        self.known.insert(id, state);
        self.used.store(true, Ordering::Release);
    }

    /// The policy for a read of `path`, given the route's: a finished job's
    /// status and results are fresh for the route's retention; a running
    /// job's status for `poll` (0 leaves the route's policy).
    pub(crate) fn policy(&self, path: &str, route: CachePolicy, poll: Duration) -> CachePolicy {
        if !route.cache || !self.used.load(Ordering::Acquire) {
            return route;
        }
        let Some((node, read)) = job_read(path) else {
            return route;
        };
        let Some(id) = ObjectId::parse(node) else {
            return route;
        };
        match (self.known.get(&id), read) {
            (Some(JobState::Finished), _) => CachePolicy {
                fresh_ttl: route.retention(),
                always_revalidate: false,
                ..route
            },
            (Some(JobState::Running), JobRead::Status) if !poll.is_zero() => CachePolicy {
                fresh_ttl: poll,
                always_revalidate: false,
                ..route
            },
            _ => route,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> CachePolicy {
        CachePolicy {
            fresh_ttl: Duration::ZERO,
            max_stale: Duration::from_secs(3600),
            cache: true,
            always_revalidate: true,
        }
    }

    #[test]
    fn finished_jobs_are_fresh_for_the_retention_and_running_ones_for_a_poll() {
        let jobs = Jobs::new();
        let poll = Duration::from_secs(5);
        assert_eq!(jobs.policy("/v26.0/61", route(), poll), route());
        jobs.learn(ObjectId::parse("61").unwrap(), JobState::Running);
        assert_eq!(jobs.policy("/v26.0/61", route(), poll).fresh_ttl, poll);
        assert!(!jobs.policy("/v26.0/61", route(), poll).always_revalidate);
        assert_eq!(jobs.policy("/v26.0/61/requests", route(), poll), route());
        assert_eq!(jobs.policy("/v26.0/61", route(), Duration::ZERO), route());
        jobs.learn(ObjectId::parse("61").unwrap(), JobState::Finished);
        for path in ["/v26.0/61", "/v26.0/61/requests", "/v26.0/61/insights/"] {
            let policy = jobs.policy(path, route(), poll);
            assert_eq!(policy.fresh_ttl, Duration::from_secs(3600), "{path}");
            assert!(!policy.always_revalidate);
        }
        // Finished stays finished; other objects and edges follow the route.
        jobs.learn(ObjectId::parse("61").unwrap(), JobState::Running);
        assert_eq!(
            jobs.policy("/v26.0/61", route(), poll).fresh_ttl,
            Duration::from_secs(3600)
        );
        assert_eq!(jobs.policy("/v26.0/62", route(), poll), route());
        assert_eq!(jobs.policy("/v26.0/61/ads", route(), poll), route());
        let uncached = CachePolicy {
            cache: false,
            ..route()
        };
        assert_eq!(jobs.policy("/v26.0/61", uncached, poll), uncached);
    }
}
