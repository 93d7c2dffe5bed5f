//! What graphcache has learnt about Marketing API async jobs, from Graph's
//! own answers: the replies that create them and the status reads that say
//! where they stand ([`crate::graph::jobs`]). A finished job's status and
//! results are kept for the route's whole retention with no revalidation;
//! a running job's status is served for `async_poll_interval`, so polls
//! within it share one call (per caller: entries never cross identities).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use crate::graph::jobs::{job_read, JobRead, JobState};
use crate::graph::routes::{CachePolicy, ObjectId};

/// Most jobs remembered. When full the map starts over: a forgotten job's
/// reads follow the route again, which costs calls, never freshness.
const MAX_JOBS: usize = 10_000;

pub(crate) struct Jobs {
    known: RwLock<HashMap<ObjectId, JobState>>,
    /// False until a job is learnt: reads skip the lookup until then.
    used: AtomicBool,
}

impl Jobs {
    pub(crate) fn new() -> Self {
        Self {
            known: RwLock::default(),
            used: AtomicBool::new(false),
        }
    }

    /// Records where job `id` stands. A finished job stays finished.
    pub(crate) fn learn(&self, id: ObjectId, state: JobState) {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        if known.len() >= MAX_JOBS && !known.contains_key(&id) {
            known.clear();
        }
        let entry = known.entry(id).or_insert(state);
        if *entry == JobState::Running {
            *entry = state;
        }
        self.used.store(true, Ordering::Release);
    }

    /// The policy for a read of `path`, given the route's: a finished job's
    /// status and results are fresh for the route's retention; a running
    /// job's status is a poll (see [`Self::poll_policy`]). Reads of other
    /// objects cost one atomic load, or a read-locked lookup without
    /// allocating once a job is known.
    pub(crate) fn policy(&self, path: &str, route: CachePolicy, poll: Duration) -> CachePolicy {
        if !route.cache || !self.used.load(Ordering::Acquire) {
            return route;
        }
        let Some((node, read)) = job_read(path) else {
            return route;
        };
        let state = self
            .known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .copied();
        match (state, read) {
            (Some(JobState::Finished), _) => self.poll_policy(JobState::Finished, route, poll),
            (Some(JobState::Running), JobRead::Status) => {
                self.poll_policy(JobState::Running, route, poll)
            }
            _ => route,
        }
    }

    /// The policy of a job's status (or, once finished, results) read:
    /// finished, fresh for the route's retention; running, fresh for `poll`
    /// at most and never stretched or served under quota pressure, so its
    /// completion shows at most `poll` late (0 leaves the route's policy).
    pub(crate) fn poll_policy(
        &self,
        state: JobState,
        route: CachePolicy,
        poll: Duration,
    ) -> CachePolicy {
        match state {
            JobState::Finished => CachePolicy {
                fresh_ttl: route.retention(),
                always_revalidate: false,
                ..route
            },
            JobState::Running if poll.is_zero() => route,
            JobState::Running => CachePolicy {
                fresh_ttl: poll,
                always_revalidate: true,
                ..route
            },
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
        assert!(jobs.policy("/v26.0/61", route(), poll).always_revalidate);
        assert_eq!(jobs.policy("/v26.0/61/requests", route(), poll), route());
        assert_eq!(jobs.policy("/v26.0/61", route(), Duration::ZERO), route());
        // A long route TTL is cut to the poll for a running job's status.
        let long = CachePolicy {
            fresh_ttl: Duration::from_secs(60),
            always_revalidate: false,
            ..route()
        };
        assert_eq!(jobs.policy("/v26.0/61", long, poll).fresh_ttl, poll);
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

    #[test]
    fn a_full_map_starts_over() {
        let jobs = Jobs::new();
        for n in 0..MAX_JOBS {
            jobs.learn(ObjectId::parse(&n.to_string()).unwrap(), JobState::Finished);
        }
        let poll = Duration::from_secs(5);
        assert_ne!(jobs.policy("/v26.0/0", route(), poll), route());
        jobs.learn(ObjectId::parse("fresh").unwrap(), JobState::Running);
        assert_eq!(jobs.policy("/v26.0/0", route(), poll), route());
        assert_eq!(jobs.policy("/v26.0/fresh", route(), poll).fresh_ttl, poll);
    }
}
