//! The store the request path uses: memory (L1) alone, or in a fleet,
//! memory before the fleet's Redis (L2).
//!
//! In a fleet every entry carries the fleet's write sequence from when its
//! read started, and is served (from either tier) only while no object it
//! depends on has a later write mark: one `MGET` per hit. A miss in memory
//! looks in Redis before going upstream, and what is fetched is stored in
//! both. While Redis does not answer, memory entries validated upstream
//! within `redis_degraded_max_age` are served; older ones are revalidated.

use std::sync::Arc;
use std::time::{Duration, Instant};

use memchr::memmem;

use crate::cache::entry::CachedResponse;
use crate::cache::key::CacheKey;
use crate::cache::memory::{MemoryStore, ReadTicket};
use crate::cache::wire::{self, Secrets};
use crate::cache::{Freshness, Store};
use crate::fleet::{unix_ms, Check, Claim, Fleet, LockToken, Put};
use crate::graph::routes::ObjectId;

/// The store: memory, and the fleet's Redis when there is one.
#[derive(Clone)]
pub struct TieredStore {
    memory: MemoryStore,
    fleet: Option<Arc<Fleet>>,
    /// Entries go to and come from Redis only when every replica keys
    /// caller identities alike (the fleet's secret was obtained).
    shared_entries: bool,
}

/// What a cold miss learns from the fleet before going upstream.
pub enum FillClaim {
    /// Fetch, holding the fleet's fill lock if there is one.
    Fetch(Option<FillLock>),
    /// Another replica fetched it meanwhile: serve this.
    Filled(Arc<CachedResponse>),
}

/// The fleet's fill lock for one key. Released with [`FillLock::release`]
/// once the answer is stored; if the fetch is dropped first (a client gone,
/// coalescing off), released from a task, so siblings never wait it out.
pub struct FillLock {
    fleet: Arc<Fleet>,
    token: Option<LockToken>,
}

impl FillLock {
    pub async fn release(mut self) {
        if let Some(token) = self.token.take() {
            self.fleet.release(token).await;
        }
    }
}

impl Drop for FillLock {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            let fleet = self.fleet.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { fleet.release(token).await });
            }
        }
    }
}

impl TieredStore {
    /// Memory only: one process.
    pub fn alone(memory: MemoryStore) -> Self {
        Self {
            memory,
            fleet: None,
            shared_entries: false,
        }
    }

    /// Memory before `fleet`'s Redis. Without `shared_entries` only write
    /// marks and throttles are shared.
    pub fn with_fleet(memory: MemoryStore, fleet: Arc<Fleet>, shared_entries: bool) -> Self {
        Self {
            memory,
            fleet: Some(fleet),
            shared_entries,
        }
    }

    pub fn memory(&self) -> &MemoryStore {
        &self.memory
    }

    /// Keeps the fleet's write marks alive as long as entries may live.
    pub fn set_longest_retention(&self, retention: Duration) {
        if let Some(fleet) = &self.fleet {
            fleet.set_longest_retention(retention);
        }
    }

    /// For a miss with no entry at all: the fleet's fill lock, or the entry
    /// the replica holding it stored.
    pub async fn claim(
        &self,
        key: &CacheKey,
        ticket: ReadTicket,
        secrets: Secrets<'_>,
    ) -> FillClaim {
        let Some(fleet) = self.fleet.as_ref().filter(|_| self.shared_entries) else {
            return FillClaim::Fetch(None);
        };
        // Without the fleet's sequence (Redis did not answer) there is no
        // lock to share.
        let Some(stamp) = ticket.fleet_stamp() else {
            return FillClaim::Fetch(None);
        };
        let local = self.memory.read_ticket().await;
        match fleet.claim(key.as_bytes(), stamp).await {
            Claim::Held(token) => FillClaim::Fetch(Some(FillLock {
                fleet: fleet.clone(),
                token: Some(token),
            })),
            Claim::Proceed => FillClaim::Fetch(None),
            Claim::Filled(bytes) => match self.admit(fleet, key, &bytes, local, secrets).await {
                Some(entry) => FillClaim::Filled(entry),
                None => FillClaim::Fetch(None),
            },
        }
    }

    /// An entry read from Redis, if its stamp is still good: kept in memory
    /// too, under a local ticket taken before it was read (so a local write
    /// in between keeps it out). One that a write mark outdates is deleted
    /// from Redis, so the next miss waits on the fill lock instead of
    /// finding it again.
    async fn admit(
        &self,
        fleet: &Fleet,
        key: &CacheKey,
        bytes: &[u8],
        local: ReadTicket,
        secrets: Secrets<'_>,
    ) -> Option<Arc<CachedResponse>> {
        let lookups = &fleet.metrics.l2_lookups;
        let Some(entry) = wire::decode(bytes, Instant::now(), unix_ms(), secrets) else {
            lookups.with_label_values(&["miss"]).inc();
            return None;
        };
        match fleet.check(entry.fleet_stamp, &names(&entry.objects)).await {
            Check::Valid => {}
            Check::Written | Check::Unstamped => {
                lookups.with_label_values(&["invalid"]).inc();
                fleet.remove_if(key.as_bytes(), bytes).await;
                return None;
            }
            Check::Unknown => return None,
        }
        lookups.with_label_values(&["hit"]).inc();
        let shared = Arc::new(entry.clone());
        self.memory.put(*key, entry, local).await;
        Some(shared)
    }

    async fn shared_get(
        &self,
        fleet: &Fleet,
        key: &CacheKey,
        secrets: Secrets<'_>,
    ) -> Option<Arc<CachedResponse>> {
        if !self.shared_entries {
            return None;
        }
        let local = self.memory.read_ticket().await;
        let Some(bytes) = fleet.get(key.as_bytes()).await else {
            fleet.metrics.l2_lookups.with_label_values(&["miss"]).inc();
            return None;
        };
        self.admit(fleet, key, &bytes, local, secrets).await
    }

    /// The entry under `key`: memory, checked against the fleet's write
    /// marks, then Redis. `secrets` are the reading caller's credentials,
    /// which go back into the links of an entry read from Redis.
    pub async fn get_for(
        &self,
        key: &CacheKey,
        secrets: Secrets<'_>,
    ) -> Option<Arc<CachedResponse>> {
        let entry = self.memory.get(key).await;
        let Some(fleet) = &self.fleet else {
            return entry;
        };
        if fleet.take_lost_data() {
            self.memory.invalidate_all().await;
            return self.shared_get(fleet, key, secrets).await;
        }
        if let Some(entry) = entry {
            let check = fleet.check(entry.fleet_stamp, &names(&entry.objects)).await;
            if fleet.take_lost_data() {
                self.memory.invalidate_all().await;
                return self.shared_get(fleet, key, secrets).await;
            }
            match check {
                // Just back from an outage, siblings may still be sending
                // the marks they kept: the degraded rule holds a moment more.
                Check::Valid if !fleet.marks_settled() => {
                    return Some(degraded(
                        entry,
                        fleet.settings().degraded_max_age,
                        Instant::now(),
                    ))
                }
                Check::Valid => return Some(entry),
                Check::Unknown => {
                    return Some(degraded(
                        entry,
                        fleet.settings().degraded_max_age,
                        Instant::now(),
                    ))
                }
                // Stored while Redis did not answer: revalidate (a 304
                // stamps it).
                Check::Unstamped => return Some(degraded(entry, Duration::ZERO, Instant::now())),
                Check::Written => {
                    fleet.metrics.marks_received.inc();
                    self.memory.remove(key).await;
                }
            }
        }
        self.shared_get(fleet, key, secrets).await
    }

    /// Stores `entry` in memory and, in a fleet, in Redis, unless a write
    /// to its objects landed after `ticket`. `secrets` are the credentials
    /// of the caller it was fetched for: an entry that carries one (or any
    /// credential-looking field) stays in memory only.
    pub async fn put_for(
        &self,
        key: CacheKey,
        mut entry: CachedResponse,
        ticket: ReadTicket,
        secrets: Secrets<'_>,
    ) -> bool {
        let Some(fleet) = &self.fleet else {
            return self.memory.put(key, entry, ticket).await;
        };
        entry.fleet_stamp = ticket.fleet;
        let shared = match ticket.fleet.filter(|_| self.shared_entries) {
            Some(stamp) => {
                let body = wire::scrub(&entry.body);
                shareable(&entry, &body, secrets).then(|| {
                    (
                        stamp,
                        wire::encode(&entry, &body, stamp, Instant::now(), unix_ms()),
                        entry.objects.clone(),
                        entry.policy.retention(),
                    )
                })
            }
            None => None,
        };
        if !self.memory.put(key, entry, ticket).await {
            return false;
        }
        if let Some((stamp, bytes, objects, retention)) = shared {
            let put = fleet
                .put(key.as_bytes(), stamp, &names(&objects), &bytes, retention)
                .await;
            if put == Put::Refused {
                // A sibling's write landed while this read was upstream.
                self.memory.remove(&key).await;
                return false;
            }
        }
        true
    }

    /// Stores `refreshed`, the revalidation of `current` by a 304, like
    /// [`Self::put_for`]; returns it shared, and whether it was stored.
    /// Alone, memory refreshes the entry in place; in a fleet the entry
    /// takes the new fleet stamp and goes to Redis too, so it is stored anew.
    pub async fn refresh_for(
        &self,
        key: CacheKey,
        current: &Arc<CachedResponse>,
        refreshed: CachedResponse,
        ticket: ReadTicket,
        secrets: Secrets<'_>,
    ) -> (Arc<CachedResponse>, bool) {
        if self.fleet.is_none() {
            return self.memory.refresh(key, current, refreshed, ticket).await;
        }
        let shared = Arc::new(refreshed.clone());
        let stored = self.put_for(key, refreshed, ticket, secrets).await;
        (shared, stored)
    }
}

fn names(objects: &[ObjectId]) -> Vec<&str> {
    objects.iter().map(ObjectId::as_str).collect()
}

/// Headers whose values are credentials: an entry that varies on one keeps
/// the caller's credential among its `Vary` values.
const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

/// True when `entry` (whose body, scrubbed of link credentials, is `body`)
/// may go to Redis: no credential of its caller anywhere in it, no
/// `access_token` field (page tokens in `/me/accounts`, token exchanges),
/// no `Vary` on a credential header.
fn shareable(entry: &CachedResponse, body: &[u8], secrets: Secrets<'_>) -> bool {
    if memmem::find(body, b"\"access_token\"").is_some() {
        return false;
    }
    if entry.vary.as_ref().is_some_and(|values| {
        values
            .iter()
            .any(|(name, _)| CREDENTIAL_HEADERS.contains(&name.as_str()))
    }) {
        return false;
    }
    for secret in [secrets.token, secrets.proof].into_iter().flatten() {
        let secret = secret.as_bytes();
        if memmem::find(body, secret).is_some()
            || entry
                .headers
                .values()
                .any(|v| memmem::find(v.as_bytes(), secret).is_some())
            || entry
                .objects
                .iter()
                .any(|o| memmem::find(o.as_str().as_bytes(), secret).is_some())
        {
            return false;
        }
    }
    true
}

/// While Redis cannot say whether `entry` was written, it is served only if
/// upstream validated it within `max_age`; otherwise a copy that is no
/// longer fresh goes back, so the read revalidates it (a 304 is cheap).
fn degraded(entry: Arc<CachedResponse>, max_age: Duration, now: Instant) -> Arc<CachedResponse> {
    if entry.age(now) < max_age || entry.freshness(now) != Freshness::Fresh {
        return entry;
    }
    // Aged by its whole fresh TTL from when it was stored, so it is not
    // fresh at any instant the caller's lookup may judge it by.
    let mut copy = (*entry).clone();
    copy.stored_at = entry
        .stored_at
        .checked_sub(copy.policy.fresh_ttl)
        .unwrap_or(entry.stored_at);
    Arc::new(copy)
}

impl Store for TieredStore {
    /// [`TieredStore::get_for`] a caller presenting no credential.
    async fn get(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        self.get_for(key, Secrets::default()).await
    }

    async fn read_ticket(&self) -> ReadTicket {
        let mut ticket = self.memory.read_ticket().await;
        if let Some(fleet) = &self.fleet {
            ticket.fleet = fleet.ticket().await;
        }
        ticket
    }

    /// [`TieredStore::put_for`] a caller presenting no credential.
    async fn put(&self, key: CacheKey, entry: CachedResponse, ticket: ReadTicket) -> bool {
        self.put_for(key, entry, ticket, Secrets::default()).await
    }

    async fn remove(&self, key: &CacheKey) {
        self.memory.remove(key).await;
        if let Some(fleet) = self.fleet.as_ref().filter(|_| self.shared_entries) {
            fleet.remove(key.as_bytes()).await;
        }
    }

    async fn invalidate_objects(&self, objects: &[ObjectId]) -> usize {
        let dropped = self.memory.invalidate_objects(objects).await;
        if let Some(fleet) = &self.fleet {
            fleet.mark_written(&names(objects)).await;
        }
        dropped
    }

    async fn invalidate_all(&self) -> usize {
        let dropped = self.memory.invalidate_all().await;
        if let Some(fleet) = &self.fleet {
            fleet.mark_everything().await;
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::routes::{objects_of, CachePolicy};
    use bytes::Bytes;
    use http::{HeaderName, HeaderValue};

    fn entry(body: &'static [u8], path: &str) -> CachedResponse {
        CachedResponse::new(
            crate::cache::entry::StoredHeaders::default(),
            Bytes::from_static(body),
            None,
            CachePolicy::ttls(60, 600),
            objects_of(path, []).into(),
        )
    }

    #[test]
    fn entries_carrying_a_credential_stay_in_memory() {
        let token = Secrets {
            token: Some("EAAsecretsecret"),
            proof: None,
        };
        let plain = entry(b"{\"id\":\"1\"}", "/v1/1");
        assert!(shareable(&plain, &plain.body, token));
        // Page tokens (/me/accounts), token exchanges (/oauth/access_token).
        let pages = entry(
            b"{\"data\":[{\"access_token\":\"EAAp\"}]}",
            "/v1/me/accounts",
        );
        assert!(!shareable(&pages, &pages.body, Secrets::default()));
        // The caller's own token echoed anywhere.
        let echoed = entry(b"{\"note\":\"EAAsecretsecret\"}", "/v1/1");
        assert!(!shareable(&echoed, &echoed.body, token));
        let mut in_header = plain.clone();
        let mut headers = in_header.headers.to_map();
        headers.insert("x-echo", HeaderValue::from_static("EAAsecretsecret"));
        in_header.headers = crate::cache::entry::StoredHeaders::copied(&headers);
        assert!(!shareable(&in_header, &in_header.body, token));
        // Varying on a credential header keeps the credential as a value.
        let mut varies = plain.clone();
        varies.vary = Some(Box::new([(
            HeaderName::from_static("authorization"),
            Some(HeaderValue::from_static("Bearer EAAx")),
        )]));
        assert!(!shareable(&varies, &varies.body, Secrets::default()));
    }

    #[test]
    fn while_degraded_only_recently_validated_entries_stay_fresh() {
        let now = Instant::now();
        let mut young = entry(b"{}", "/v1/1");
        young.stored_at = now - Duration::from_secs(1);
        let young = Arc::new(young);
        let kept = degraded(young.clone(), Duration::from_secs(2), now);
        assert!(Arc::ptr_eq(&kept, &young), "served as it is");
        let mut old = entry(b"{}", "/v1/1");
        old.stored_at = now - Duration::from_secs(3);
        let aged = degraded(Arc::new(old), Duration::from_secs(2), now);
        assert_ne!(aged.freshness(now), Freshness::Fresh, "revalidated");
        // Not fresh at an earlier instant either (the lookup's own clock).
        assert_ne!(
            aged.freshness(now - Duration::from_millis(500)),
            Freshness::Fresh
        );
        assert!(
            aged.freshness(now) != Freshness::Expired,
            "still usable if Graph fails"
        );
    }
}
