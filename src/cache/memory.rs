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

/// Called for every eviction with its cause, for metrics.
pub type EvictionObserver = Arc<dyn Fn(RemovalCause) + Send + Sync>;

/// The cache and its object index. Cloning is cheap and shares both.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<CacheKey, Arc<CachedResponse>, KeyHashing>,
    index: Arc<Mutex<Index>>,
    write_seq: Arc<AtomicU64>,
    next_entry_id: Arc<AtomicU64>,
    /// How long a write mark is kept: longer than any read can be in flight.
    write_memory: Duration,
}

struct Retention;

impl Expiry<CacheKey, Arc<CachedResponse>> for Retention {
    fn expire_after_create(
        &self,
        _: &CacheKey,
        value: &Arc<CachedResponse>,
        _: Instant,
    ) -> Option<Duration> {
        Some(value.policy.retention())
    }

    fn expire_after_update(
        &self,
        _: &CacheKey,
        value: &Arc<CachedResponse>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.policy.retention())
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
            .weigher(|_: &CacheKey, v: &Arc<CachedResponse>| v.weight())
            .expire_after(Retention)
            .eviction_listener(
                move |key: Arc<CacheKey>, value: Arc<CachedResponse>, cause| {
                    if cause != RemovalCause::Replaced {
                        on_evict(cause);
                    }
                    unindex(&mut lock(&listener_index), &key, &value);
                },
            )
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
}

impl Store for MemoryStore {
    /// The entry under `key`, if any. Shares the entry; copies nothing.
    async fn get(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        self.cache.get(key).await
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
    async fn put(&self, key: CacheKey, mut entry: CachedResponse, ticket: ReadTicket) -> bool {
        // Write marks are forgotten after `write_memory`: a read older than
        // that can no longer prove no write overtook it.
        if ticket.taken.elapsed() >= self.write_memory {
            return false;
        }
        if written_since(&lock(&self.index), &entry.objects, ticket) {
            return false;
        }
        entry.entry_id = self.next_entry_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(entry);
        self.cache.insert(key, entry.clone()).await;
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
            return false;
        }
        true
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
        CachedResponse::new(
            crate::cache::entry::StoredHeaders::default(),
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
}
