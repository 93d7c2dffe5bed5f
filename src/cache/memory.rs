//! The in-process response store: a byte-bounded moka cache plus an index from Graph
//! objects to the keys that hold them, so a write invalidates exactly the
//! entries of the objects it touches, at a cost that scales with those
//! entries rather than with the whole cache.
//!
//! Writes also advance a sequence number. A read snapshots it before going
//! upstream ([`ReadTicket`]); when its answer comes back, it is stored only if
//! no write touched its objects in between, so a fetch in flight while a write
//! lands can never put pre-write data back.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::Expiry;

use crate::cache::entry::CachedResponse;
use crate::cache::key::{CacheKey, KeyHashing};
use crate::cache::Store;
use crate::graph::routes::ObjectId;

/// A snapshot of the write sequence, taken before a read goes upstream.
#[derive(Debug, Clone, Copy)]
pub struct ReadTicket {
    sequence: u64,
    taken: Instant,
    /// The fleet's write sequence, in a fleet whose Redis answered.
    pub(super) fleet: Option<crate::fleet::Stamp>,
}

impl ReadTicket {
    /// The write sequence number when the read started.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// Where the fleet's writes stood when the read started, if known.
    pub fn fleet_stamp(&self) -> Option<crate::fleet::Stamp> {
        self.fleet
    }
}

#[derive(Default)]
struct ObjectRecord {
    /// Keys holding this object, with the entry id last indexed under each.
    keys: HashMap<CacheKey, u64>,
    /// Sequence number of the last successful write to this object.
    last_write: u64,
}

#[derive(Default)]
struct Index {
    objects: HashMap<ObjectId, ObjectRecord>,
    /// Sequence number of the last write that could not say what it
    /// touched, and so counts as a write to every object.
    last_write_to_all: u64,
    /// Written objects in write order, so write marks can be forgotten once no
    /// read that started before them can still be in flight.
    recent_writes: VecDeque<(Instant, u64, ObjectId)>,
}

/// What moka holds under a key: the entry, which a 304 replaces in place
/// (no re-insert: moka's insert is most of a revalidation's cache work),
/// and the weight it was admitted with.
struct Slot {
    entry: ArcSwap<CachedResponse>,
    weight: u32,
}

impl Slot {
    fn new(entry: Arc<CachedResponse>) -> Arc<Self> {
        let weight = entry.weight();
        Arc::new(Self {
            entry: ArcSwap::new(entry),
            weight,
        })
    }
}

/// How much more an entry refreshed in place may weigh than it was admitted
/// with (a 304's trace ids and dates differ a little in length); a heavier
/// one is re-inserted, so the bound holds within this per entry.
const REFRESH_SLACK: u32 = 64;

/// Called for every eviction with its cause, for metrics.
pub type EvictionObserver = Arc<dyn Fn(RemovalCause) + Send + Sync>;

/// The cache and its object index. Cloning is cheap and shares both.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<CacheKey, Arc<Slot>, KeyHashing>,
    index: Arc<Mutex<Index>>,
    write_seq: Arc<AtomicU64>,
    next_entry_id: Arc<AtomicU64>,
    /// How long a write mark is kept: longer than any read can be in flight.
    write_memory: Duration,
}

struct Retention;

impl Expiry<CacheKey, Arc<Slot>> for Retention {
    fn expire_after_create(&self, _: &CacheKey, slot: &Arc<Slot>, _: Instant) -> Option<Duration> {
        Some(slot.entry.load().policy.retention())
    }

    fn expire_after_update(
        &self,
        _: &CacheKey,
        slot: &Arc<Slot>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.entry.load().policy.retention())
    }

    /// An entry refreshed in place is kept its retention from the refresh,
    /// as a re-inserted one would be (see [`MemoryStore::refresh`]). Left
    /// alone otherwise, so a plain hit never reschedules moka's timer.
    fn expire_after_read(
        &self,
        _: &CacheKey,
        slot: &Arc<Slot>,
        read_at: Instant,
        until_expiry: Option<Duration>,
        _: Instant,
    ) -> Option<Duration> {
        let entry = slot.entry.load();
        let wanted =
            (entry.stored_at + entry.policy.retention()).saturating_duration_since(read_at);
        // A plain hit wants a little less than moka holds (moka stamped the
        // insert just after `stored_at`): only a refresh moves it past this.
        match until_expiry {
            Some(left) if wanted > left + Duration::from_millis(10) => Some(wanted),
            other => other,
        }
    }
}

impl MemoryStore {
    /// A store bounded to `max_bytes` of bodies and headers. `write_memory`
    /// must exceed the longest time a read can spend upstream.
    pub fn new(max_bytes: u64, write_memory: Duration, on_evict: EvictionObserver) -> Self {
        let index: Arc<Mutex<Index>> = Arc::default();
        let listener_index = index.clone();
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &CacheKey, slot: &Arc<Slot>| slot.weight)
            .expire_after(Retention)
            .eviction_listener(move |key: Arc<CacheKey>, slot: Arc<Slot>, cause| {
                if cause != RemovalCause::Replaced {
                    on_evict(cause);
                }
                unindex(&mut lock(&listener_index), &key, &slot.entry.load());
            })
            .build_with_hasher(KeyHashing::default());
        Self {
            cache,
            index,
            write_seq: Arc::new(AtomicU64::new(0)),
            next_entry_id: Arc::new(AtomicU64::new(1)),
            write_memory,
        }
    }

    /// Entries currently stored (approximate until pending work runs).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Weighted size in bytes (approximate until pending work runs).
    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Runs moka's pending housekeeping so counts are exact (scrapes, tests).
    pub async fn sync(&self) {
        self.cache.run_pending_tasks().await;
    }

    /// Write marks are forgotten after `write_memory`: a read older than
    /// that can no longer prove no write overtook it, and is not stored.
    fn outlived(&self, ticket: ReadTicket) -> bool {
        ticket.taken.elapsed() >= self.write_memory
    }

    /// [`Store::put`], returning the entry shared as stored.
    async fn insert(
        &self,
        key: CacheKey,
        mut entry: CachedResponse,
        ticket: ReadTicket,
    ) -> (Arc<CachedResponse>, bool) {
        if self.outlived(ticket) {
            return (Arc::new(entry), false);
        }
        if written_since(&lock(&self.index), &entry.objects, ticket) {
            return (Arc::new(entry), false);
        }
        entry.entry_id = self.next_entry_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(entry);
        self.cache.insert(key, Slot::new(entry.clone())).await;
        // Index after inserting, then look again: a write that landed while we
        // inserted could not have seen this key in the index.
        let raced = {
            let mut index = lock(&self.index);
            for object in entry.objects.iter() {
                index
                    .objects
                    .entry(object.clone())
                    .or_default()
                    .keys
                    .insert(key, entry.entry_id);
            }
            written_since(&index, &entry.objects, ticket)
        };
        if raced {
            self.cache.invalidate(&key).await;
            return (entry, false);
        }
        (entry, true)
    }

    /// Stores `refreshed`, the revalidation of `current` by a 304, unless a
    /// write to its objects landed after `ticket`; returns it shared, and
    /// whether it was stored. While the key still holds `current`'s slot
    /// (with `current`, or a sibling's refresh of it) and `refreshed` weighs
    /// about the same, it replaces what the slot holds in place: same slot,
    /// same index records, no moka insert. The write check
    /// and the swap happen under the index lock, so a write either comes
    /// before (nothing stored) or finds the key indexed and drops the slot
    /// with its new content.
    pub async fn refresh(
        &self,
        key: CacheKey,
        current: &Arc<CachedResponse>,
        mut refreshed: CachedResponse,
        ticket: ReadTicket,
    ) -> (Arc<CachedResponse>, bool) {
        // The slot `current` came from, perhaps refreshed in place since by
        // a sibling revalidation (entry ids are unique per insert). A policy
        // a reload changed is inserted anew, so moka applies its retention.
        let slot = self.cache.get(&key).await.filter(|slot| {
            let held = slot.entry.load();
            current.entry_id != 0
                && held.entry_id == current.entry_id
                && held.policy == refreshed.policy
                && refreshed.weight() <= slot.weight.saturating_add(REFRESH_SLACK)
        });
        let Some(slot) = slot else {
            return self.insert(key, refreshed, ticket).await;
        };
        refreshed.entry_id = current.entry_id;
        let refreshed = Arc::new(refreshed);
        if self.outlived(ticket) {
            return (refreshed, false);
        }
        let replaced = {
            let index = lock(&self.index);
            if written_since(&index, &refreshed.objects, ticket) {
                return (refreshed, false);
            }
            // A sibling's later refresh stays.
            (slot.entry.load().stored_at <= refreshed.stored_at)
                .then(|| slot.entry.swap(refreshed.clone()))
        };
        // Freed outside the lock.
        drop(replaced);
        // A read lets moka's expiry see the new validation time; the slot
        // may have gone meanwhile (evicted, expired, replaced, dropped by a
        // write), taking the refresh with it.
        let still = self.cache.get(&key).await;
        let stored = still.is_some_and(|now| Arc::ptr_eq(&now, &slot));
        (refreshed, stored)
    }
}

impl Store for MemoryStore {
    /// The entry under `key`, if any. Shares the entry; copies nothing.
    async fn get(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        Some(self.cache.get(key).await?.entry.load_full())
    }

    /// Take before going upstream for a read that may be stored.
    async fn read_ticket(&self) -> ReadTicket {
        ReadTicket {
            sequence: self.write_seq.load(Ordering::Acquire),
            taken: Instant::now(),
            fleet: None,
        }
    }

    /// Stores `entry` unless a write to one of its objects landed after
    /// `ticket` was taken. Returns whether it was stored.
    async fn put(&self, key: CacheKey, entry: CachedResponse, ticket: ReadTicket) -> bool {
        self.insert(key, entry, ticket).await.1
    }

    /// Drops the entry under `key` (e.g. the object is gone upstream).
    async fn remove(&self, key: &CacheKey) {
        self.cache.invalidate(key).await;
    }

    /// Records a successful write to `objects` and removes all their entries,
    /// for every token and user agent. Returns how many keys were dropped.
    async fn invalidate_objects(&self, objects: &[ObjectId]) -> usize {
        let keys: Vec<CacheKey> = {
            let mut index = lock(&self.index);
            let seq = self.write_seq.fetch_add(1, Ordering::AcqRel) + 1;
            let now = Instant::now();
            forget_old_writes(&mut index, now, self.write_memory);
            let mut keys = Vec::new();
            for object in objects {
                let record = index.objects.entry(object.clone()).or_default();
                record.last_write = seq;
                keys.extend(record.keys.drain().map(|(k, _)| k));
                index.recent_writes.push_back((now, seq, object.clone()));
            }
            keys
        };
        for key in &keys {
            self.cache.invalidate(key).await;
        }
        keys.len()
    }

    /// Records a write whose objects graphcache cannot tell, and drops every
    /// entry: erring toward dropping more, never toward serving stale.
    /// Reads in flight since before it are not stored either.
    async fn invalidate_all(&self) -> usize {
        let dropped = {
            let mut index = lock(&self.index);
            let seq = self.write_seq.fetch_add(1, Ordering::AcqRel) + 1;
            index.last_write_to_all = seq;
            let dropped = index.objects.values().map(|r| r.keys.len()).sum();
            index.objects.retain(|_, record| {
                record.keys.clear();
                record.last_write != 0
            });
            dropped
        };
        self.cache.invalidate_all();
        dropped
    }
}

fn lock(index: &Mutex<Index>) -> MutexGuard<'_, Index> {
    // The index holds no invariant a panic could break half-way.
    index.lock().unwrap_or_else(|e| e.into_inner())
}

/// Drops write marks older than `memory` from records that hold no keys.
fn forget_old_writes(index: &mut Index, now: Instant, memory: Duration) {
    while let Some((at, seq, _)) = index.recent_writes.front() {
        if now.saturating_duration_since(*at) < memory {
            break;
        }
        let (seq, object) = (
            *seq,
            index.recent_writes.pop_front().expect("front exists").2,
        );
        if let Some(record) = index.objects.get_mut(&object) {
            if record.last_write == seq {
                record.last_write = 0;
                if record.keys.is_empty() {
                    index.objects.remove(&object);
                }
            }
        }
    }
}

fn written_since(index: &Index, objects: &[ObjectId], ticket: ReadTicket) -> bool {
    index.last_write_to_all > ticket.sequence
        || objects.iter().any(|o| {
            index
                .objects
                .get(o)
                .is_some_and(|r| r.last_write > ticket.sequence)
        })
}

/// Removes `key` from its objects' records if this entry is still the one
/// indexed there; drops records left with nothing to remember (no keys and
/// no recent write mark).
fn unindex(index: &mut Index, key: &CacheKey, entry: &CachedResponse) {
    for object in entry.objects.iter() {
        if let Some(record) = index.objects.get_mut(object) {
            if record.keys.get(key) == Some(&entry.entry_id) {
                record.keys.remove(key);
            }
            if record.keys.is_empty() && record.last_write == 0 {
                index.objects.remove(object);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::identity::{Credentials, TokenHasher};
    use crate::cache::key::cache_key;
    use crate::graph::query::QueryParams;
    use crate::graph::routes::{objects_of, CachePolicy};
    use bytes::Bytes;

    fn policy(fresh: u64, stale: u64) -> CachePolicy {
        CachePolicy::ttls(fresh, stale)
    }
    fn entry(path: &str) -> CachedResponse {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::ETAG, "\"a\"".parse().unwrap());
        CachedResponse::new(
            crate::cache::entry::StoredHeaders::copied(&headers),
            Bytes::from_static(b"{}"),
            None,
            policy(60, 60),
            objects_of(path, []).into(),
        )
    }

    fn key(path: &str, token: &str) -> CacheKey {
        let id = TokenHasher::with_secret([0; 32]).identify(&Credentials {
            token: Some(token),
            ..Credentials::default()
        });
        cache_key(path, &QueryParams::parse(None), b"ua", &id)
    }

    fn store() -> MemoryStore {
        MemoryStore::new(1 << 20, Duration::from_secs(60), Arc::new(|_| {}))
    }

    #[tokio::test]
    async fn a_write_invalidates_every_token_of_its_object_only() {
        let s = store();
        for (path, token) in [
            ("/v1/act_1/ads", "a"),
            ("/v1/act_1", "b"),
            ("/v1/act_2", "a"),
        ] {
            assert!(
                s.put(key(path, token), entry(path), s.read_ticket().await)
                    .await
            );
        }
        let dropped = s.invalidate_objects(&objects_of("/v1/act_1/ads", [])).await;
        assert_eq!(dropped, 2);
        assert!(s.get(&key("/v1/act_1/ads", "a")).await.is_none());
        assert!(s.get(&key("/v1/act_1", "b")).await.is_none());
        assert!(s.get(&key("/v1/act_2", "a")).await.is_some());
    }

    #[tokio::test]
    async fn a_read_that_started_before_a_write_is_not_stored() {
        let s = store();
        let ticket = s.read_ticket().await;
        s.invalidate_objects(&objects_of("/v1/7", [])).await;
        assert!(!s.put(key("/v1/7", "t"), entry("/v1/7"), ticket).await);
        assert!(s.get(&key("/v1/7", "t")).await.is_none());
        // A read that starts after the write stores normally.
        assert!(
            s.put(key("/v1/7", "t"), entry("/v1/7"), s.read_ticket().await)
                .await
        );
    }

    #[tokio::test]
    async fn reads_older_than_the_write_memory_are_not_stored() {
        let s = MemoryStore::new(1 << 20, Duration::ZERO, Arc::new(|_| {}));
        assert!(
            !s.put(key("/v1/8", "t"), entry("/v1/8"), s.read_ticket().await)
                .await
        );
    }

    #[tokio::test]
    async fn old_write_marks_are_forgotten() {
        let s = MemoryStore::new(1 << 20, Duration::ZERO, Arc::new(|_| {}));
        s.invalidate_objects(&objects_of("/v1/1", [])).await;
        s.invalidate_objects(&objects_of("/v1/2", [])).await;
        // The second write pruned the first object's record.
        assert_eq!(lock(&s.index).objects.len(), 1);
    }

    #[tokio::test]
    async fn replacing_an_entry_keeps_it_indexed() {
        let s = store();
        let k = key("/v1/9", "t");
        s.put(k, entry("/v1/9"), s.read_ticket().await).await;
        s.put(k, entry("/v1/9"), s.read_ticket().await).await;
        s.sync().await;
        assert_eq!(s.invalidate_objects(&objects_of("/v1/9", [])).await, 1);
        assert!(s.get(&k).await.is_none());
    }

    #[tokio::test]
    async fn a_write_to_everything_drops_all_and_stops_older_reads() {
        let s = store();
        let ticket = s.read_ticket().await;
        s.put(key("/v1/1", "t"), entry("/v1/1"), s.read_ticket().await)
            .await;
        assert_eq!(s.invalidate_all().await, 1);
        assert!(s.get(&key("/v1/1", "t")).await.is_none());
        assert!(!s.put(key("/v1/2", "t"), entry("/v1/2"), ticket).await);
        assert!(
            s.put(key("/v1/2", "t"), entry("/v1/2"), s.read_ticket().await)
                .await
        );
    }

    /// The 304's view of an entry: a new ETag header, revalidated now.
    fn refreshed(current: &CachedResponse) -> CachedResponse {
        let mut updated = http::HeaderMap::new();
        updated.insert(http::header::ETAG, "\"b\"".parse().unwrap());
        current.revalidated(&updated)
    }

    /// A store holding one entry for `path`: the store, its key, the entry.
    async fn holding(path: &str) -> (MemoryStore, CacheKey, Arc<CachedResponse>) {
        let s = store();
        let k = key(path, "t");
        assert!(s.put(k, entry(path), s.read_ticket().await).await);
        let current = s.get(&k).await.unwrap();
        (s, k, current)
    }

    /// `current` refreshed by a 304 now, with a fresh ticket.
    async fn refresh_now(
        s: &MemoryStore,
        k: CacheKey,
        current: &Arc<CachedResponse>,
    ) -> (Arc<CachedResponse>, bool) {
        s.refresh(k, current, refreshed(current), s.read_ticket().await)
            .await
    }

    #[tokio::test]
    async fn a_304_refreshes_the_entry_in_place_and_keeps_it_indexed() {
        let (s, k, current) = holding("/v1/10").await;
        let ticket = s.read_ticket().await;
        let (shared, stored) = s.refresh(k, &current, refreshed(&current), ticket).await;
        assert!(stored);
        let now = s.get(&k).await.unwrap();
        assert!(Arc::ptr_eq(&now, &shared), "the key serves the refresh");
        assert_eq!(now.etag.as_ref().unwrap(), "\"b\"");
        assert_eq!(now.entry_id, current.entry_id, "the same slot");
        // A sibling that revalidated the same entry at once refreshes the
        // slot too, in place.
        let (sibling, stored) = refresh_now(&s, k, &current).await;
        assert!(stored);
        assert!(Arc::ptr_eq(&s.get(&k).await.unwrap(), &sibling));
        assert_eq!(sibling.entry_id, current.entry_id);
        s.sync().await;
        assert_eq!(s.entry_count(), 1);
        // Still indexed: a write to its object finds and drops it.
        assert_eq!(s.invalidate_objects(&objects_of("/v1/10", [])).await, 1);
        assert!(s.get(&k).await.is_none());
    }

    #[tokio::test]
    async fn a_write_after_the_ticket_keeps_a_refresh_out() {
        let (s, k, current) = holding("/v1/11").await;
        let ticket = s.read_ticket().await;
        // A write to another object leaves it alone...
        s.invalidate_objects(&objects_of("/v1/12", [])).await;
        let (_, stored) = s.refresh(k, &current, refreshed(&current), ticket).await;
        assert!(stored);
        // ...one to its own keeps a refresh that started before it out,
        // even while the slot is still there to be refreshed.
        let current = s.get(&k).await.unwrap();
        let ticket = s.read_ticket().await;
        lock(&s.index)
            .objects
            .get_mut(&objects_of("/v1/11", [])[0])
            .unwrap()
            .last_write = s.write_seq.fetch_add(1, Ordering::AcqRel) + 1;
        let (shared, stored) = s.refresh(k, &current, refreshed(&current), ticket).await;
        assert!(!stored);
        assert!(!Arc::ptr_eq(&s.get(&k).await.unwrap(), &shared));
        // And once the write has dropped it, nothing comes back.
        s.invalidate_objects(&objects_of("/v1/11", [])).await;
        let (_, stored) = s.refresh(k, &current, refreshed(&current), ticket).await;
        assert!(!stored);
        assert!(s.get(&k).await.is_none());
    }

    #[tokio::test]
    async fn a_refresh_of_a_replaced_or_grown_entry_is_stored_anew() {
        let (s, k, old) = holding("/v1/13").await;
        s.put(k, entry("/v1/13"), s.read_ticket().await).await;
        let (shared, stored) = refresh_now(&s, k, &old).await;
        assert!(stored);
        let now = s.get(&k).await.unwrap();
        assert!(Arc::ptr_eq(&now, &shared));
        assert_ne!(now.entry_id, old.entry_id, "inserted, not swapped");
        // A 304 that makes the entry much heavier is weighed again.
        let mut updated = http::HeaderMap::new();
        updated.insert("x-big", "y".repeat(500).parse().unwrap());
        let grown = now.revalidated(&updated);
        let (shared, stored) = s.refresh(k, &now, grown, s.read_ticket().await).await;
        assert!(stored);
        assert_ne!(s.get(&k).await.unwrap().entry_id, now.entry_id);
        assert!(Arc::ptr_eq(&s.get(&k).await.unwrap(), &shared));
    }

    #[tokio::test]
    async fn a_refreshed_entry_is_kept_its_retention_from_the_refresh() {
        let s = store();
        let k = key("/v1/15", "t");
        let mut e = entry("/v1/15");
        e.policy.fresh_ttl = Duration::ZERO;
        e.policy.max_stale = Duration::from_millis(300);
        s.put(k, e, s.read_ticket().await).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let current = s.get(&k).await.unwrap();
        let (_, stored) = refresh_now(&s, k, &current).await;
        assert!(stored);
        // 400 ms after the insert, 200 ms after the refresh: still held.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(s.get(&k).await.is_some(), "moka expired a refreshed entry");
    }

    #[tokio::test]
    async fn an_older_refresh_does_not_replace_a_newer_one() {
        let (s, k, current) = holding("/v1/16").await;
        let mut older = refreshed(&current);
        older.stored_at -= Duration::from_millis(1);
        let (newer, _) = refresh_now(&s, k, &current).await;
        s.refresh(k, &current, older, s.read_ticket().await).await;
        assert!(Arc::ptr_eq(&s.get(&k).await.unwrap(), &newer));
    }

    #[tokio::test]
    async fn a_reloaded_policy_is_inserted_anew() {
        let (s, k, current) = holding("/v1/17").await;
        let mut changed = refreshed(&current);
        changed.policy = policy(0, 5);
        let (shared, stored) = s.refresh(k, &current, changed, s.read_ticket().await).await;
        assert!(stored);
        let now = s.get(&k).await.unwrap();
        assert!(Arc::ptr_eq(&now, &shared));
        assert_ne!(now.entry_id, current.entry_id, "inserted, not swapped");
    }

    #[test]
    fn a_read_extends_the_expiry_only_of_an_entry_refreshed_since() {
        let now = Instant::now();
        let mut e = entry("/v1/14"); // retention 60 s
        e.stored_at = now;
        let slot = Slot::new(Arc::new(e));
        let k = key("/v1/14", "t");
        let read = |left| Retention.expire_after_read(&k, &slot, now, Some(left), now);
        // Expiring as the refresh says (within 10 ms): left alone.
        assert_eq!(
            read(Duration::from_millis(59_995)),
            Some(Duration::from_millis(59_995))
        );
        // Expiring by an older validation: kept 60 s from the refresh.
        assert_eq!(read(Duration::from_secs(5)), Some(Duration::from_secs(60)));
        assert_eq!(Retention.expire_after_read(&k, &slot, now, None, now), None);
    }
}
