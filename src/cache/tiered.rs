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
use std::time::Instant;

use crate::cache::entry::CachedResponse;
use crate::cache::key::CacheKey;
use crate::cache::memory::{MemoryStore, ReadTicket};
use crate::cache::wire::{self, Secrets};
use crate::cache::Store;
use crate::fleet::{unix_ms, Check, Claim, Fleet, LockToken};
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
    /// Fetch; release the lock (if any) with [`TieredStore::release`].
    Fetch(Option<LockToken>),
    /// Another replica fetched it meanwhile: serve this.
    Filled(Arc<CachedResponse>),
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
    pub fn set_longest_retention(&self, retention: std::time::Duration) {
        if let Some(fleet) = &self.fleet {
            fleet.set_longest_retention(retention);
        }
    }

    /// For a miss with no entry at all: the fleet's fill lock, or the entry
    /// the replica holding it stored.
    pub async fn claim(&self, key: &CacheKey, secrets: Secrets<'_>) -> FillClaim {
        let Some(fleet) = self.fleet.as_ref().filter(|_| self.shared_entries) else {
            return FillClaim::Fetch(None);
        };
        let local = self.memory.read_ticket().await;
        match fleet.claim(key.as_bytes()).await {
            Claim::Held(token) => FillClaim::Fetch(Some(token)),
            Claim::Proceed => FillClaim::Fetch(None),
            Claim::Filled(bytes) => match self.admit(fleet, key, &bytes, local, secrets).await {
                Some(entry) => FillClaim::Filled(entry),
                None => FillClaim::Fetch(None),
            },
        }
    }

    /// Releases a fill lock taken by [`TieredStore::claim`].
    pub async fn release(&self, lock: Option<LockToken>) {
        if let (Some(fleet), Some(lock)) = (&self.fleet, lock) {
            fleet.release(lock).await;
        }
    }

    /// An entry read from Redis, if its stamp is still good: kept in memory
    /// too, under a local ticket taken before it was read (so a local write
    /// in between keeps it out).
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
            Check::Written => {
                lookups.with_label_values(&["invalid"]).inc();
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
            match fleet.check(entry.fleet_stamp, &names(&entry.objects)).await {
                Check::Valid => return Some(entry),
                Check::Unknown => return Some(degraded(entry, fleet.settings().degraded_max_age)),
                Check::Written => {
                    fleet.metrics.marks_received.inc();
                    self.memory.remove(key).await;
                }
            }
        }
        self.shared_get(fleet, key, secrets).await
    }
}

fn names(objects: &[ObjectId]) -> Vec<&str> {
    objects.iter().map(ObjectId::as_str).collect()
}

/// While Redis cannot say whether `entry` was written, it is served only if
/// upstream validated it within `max_age`; otherwise a copy that is no
/// longer fresh goes back, so the read revalidates it (a 304 is cheap).
fn degraded(entry: Arc<CachedResponse>, max_age: std::time::Duration) -> Arc<CachedResponse> {
    let now = Instant::now();
    if entry.age(now) < max_age || entry.freshness(now) != super::Freshness::Fresh {
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

    async fn put(&self, key: CacheKey, mut entry: CachedResponse, ticket: ReadTicket) -> bool {
        let Some(fleet) = &self.fleet else {
            return self.memory.put(key, entry, ticket).await;
        };
        entry.fleet_stamp = ticket.fleet;
        let shared = match ticket.fleet.filter(|_| self.shared_entries) {
            Some(stamp) => Some((
                stamp,
                wire::encode(&entry, stamp, Instant::now(), unix_ms()),
                entry.objects.clone(),
                entry.policy.retention(),
            )),
            None => None,
        };
        if !self.memory.put(key, entry, ticket).await {
            return false;
        }
        if let Some((stamp, bytes, objects, retention)) = shared {
            fleet
                .put(key.as_bytes(), stamp, &names(&objects), &bytes, retention)
                .await;
        }
        true
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
