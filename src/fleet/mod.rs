//! The shared tier of a fleet of sidecars: one Redis (or Valkey) that every
//! replica reads and writes, so the fleet acts as one cache.
//!
//! This module speaks Redis and nothing of graphcache's types: the cache
//! stage stores opaque entry bytes under blake3 keys through it, and the
//! rate-limit stage shares throttle scopes as strings. What it guarantees:
//!
//! - **Write marks.** A write bumps one fleet-wide sequence number and marks
//!   each object it changed with the new value ([`Fleet::mark_written`]),
//!   before its client is answered. A read takes the sequence before it goes
//!   upstream ([`Fleet::ticket`]) and its entry carries that [`Stamp`]; an
//!   entry is served only while no object it depends on carries a later
//!   mark ([`Fleet::check`]): one `MGET` per hit.
//! - **Epochs.** The sequence lives under a random epoch, kept in Redis
//!   without a TTL. A Redis that lost its data has no epoch (or another
//!   one): every stamp of the old epoch is then void, and each replica drops
//!   its memory the first time it sees the change.
//! - **Fills.** A miss takes a lock (`SET NX PX` with a random token,
//!   released by compare-and-delete) so one replica fetches and the others
//!   wait for its entry ([`Fleet::claim`]).
//! - **Degradation.** Every call is bounded by `redis_timeout_ms`; a failure
//!   counts, flips the state to degraded (logged once), and graphcache goes
//!   on from memory and upstream. Marks that could not be sent are kept and
//!   sent when Redis answers again.
//!
//! Keys are `<namespace>:v1:…`; none holds a token or a piece of one (cache
//! keys and caller identities are keyed blake3 hashes, object ids are
//! hashed too).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, Script};

use crate::config::{redact_url, FleetSettings};

/// Format version of keys and values; bump on any incompatible change, so
/// replicas of two versions never read each other's entries.
pub const FORMAT_VERSION: u32 = 1;

/// Objects a replica remembers having written while Redis was unreachable;
/// past it, the replay marks everything instead.
const MAX_PENDING_MARKS: usize = 10_000;

pub const REDIS_UP: &str = "graphcache_redis_up";
pub const REDIS_ERRORS: &str = "graphcache_redis_errors_total";
pub const REDIS_DURATION: &str = "graphcache_redis_call_duration_seconds";
pub const L2_LOOKUPS: &str = "graphcache_l2_lookups_total";
pub const L2_STORES: &str = "graphcache_l2_stores_total";
pub const LOCK_WAITS: &str = "graphcache_fleet_lock_waits_total";
pub const MARKS_SENT: &str = "graphcache_fleet_invalidations_sent_total";
pub const MARKS_RECEIVED: &str = "graphcache_fleet_invalidations_received_total";
pub const THROTTLES_SHARED: &str = "graphcache_fleet_throttles_shared_total";

/// The fleet's metrics, registered beside graphcache's own.
pub struct FleetMetrics {
    pub up: IntGauge,
    pub errors: IntCounterVec,
    pub duration: Histogram,
    /// `hit`, `miss`, or `invalid` (a write mark newer than the entry).
    pub l2_lookups: IntCounterVec,
    /// `stored`, or `refused` (a write landed while the read was upstream).
    pub l2_stores: IntCounterVec,
    /// How a wait for another replica's fill ended: `filled`, `released`
    /// (no entry: the holder's answer was not storable), `timeout`.
    pub lock_waits: IntCounterVec,
    /// Objects (or `everything`) this replica marked written.
    pub marks_sent: IntCounter,
    /// Stored entries this replica dropped because of a sibling's mark.
    pub marks_received: IntCounter,
    /// Throttle and pressure scopes `sent` to and `received` from the fleet.
    pub throttles: IntCounterVec,
}

impl FleetMetrics {
    pub fn new(registry: &Registry) -> Self {
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let up = IntGauge::new(
            REDIS_UP,
            "1 while the fleet's Redis answers, 0 while degraded",
        )
        .expect("valid metric");
        registry.register(Box::new(up.clone())).expect("unique");
        let duration = Histogram::with_opts(
            HistogramOpts::new(REDIS_DURATION, "Redis call latency, seconds").buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(duration.clone()))
            .expect("unique");
        let metrics = Self {
            up,
            duration,
            errors: counter_vec(REDIS_ERRORS, "Redis calls that failed or timed out", "op"),
            l2_lookups: counter_vec(L2_LOOKUPS, "Lookups in the shared tier", "result"),
            l2_stores: counter_vec(L2_STORES, "Entries offered to the shared tier", "result"),
            lock_waits: counter_vec(
                LOCK_WAITS,
                "Misses that waited for another replica's fetch",
                "result",
            ),
            marks_sent: counter(MARKS_SENT, "Write marks this replica sent to the fleet"),
            marks_received: counter(
                MARKS_RECEIVED,
                "Stored entries dropped for a write made through another replica",
            ),
            throttles: counter_vec(
                THROTTLES_SHARED,
                "Throttle and pressure scopes shared with the fleet",
                "direction",
            ),
        };
        // Every series exists from the start, so dashboards and rates see
        // a zero rather than nothing.
        for op in OPS {
            metrics.errors.with_label_values(&[op]);
        }
        for (vec, labels) in [
            (&metrics.l2_lookups, &["hit", "miss", "invalid"][..]),
            (&metrics.l2_stores, &["stored", "refused", "error"][..]),
            (
                &metrics.lock_waits,
                &["filled", "released", "timeout", "error"][..],
            ),
            (&metrics.throttles, &["sent", "received"][..]),
        ] {
            for label in labels {
                vec.with_label_values(&[label]);
            }
        }
        metrics
    }
}

/// The `op` labels of Redis calls.
const OPS: [&str; 11] = [
    "get", "put", "check", "mark", "lock", "ticket", "throttle", "ping", "remove", "secret",
    "config",
];

/// Where a read stood in the fleet's write history when it started: the
/// epoch of Redis's data and the write sequence within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    pub epoch: u64,
    pub seq: u64,
}

/// Whether a stored entry may still be served, by the fleet's write marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// No object of the entry was written since its read started.
    Valid,
    /// One was (or may have been: a mark this replica could not send yet,
    /// or Redis lost its data): the entry is pre-write data.
    Written,
    /// Redis answers, but the entry has no stamp (it was stored while Redis
    /// did not answer): revalidate it before serving it.
    Unstamped,
    /// Redis did not answer: the caller applies the degraded rule.
    Unknown,
}

/// What a miss learns from the fleet lock.
pub enum Claim {
    /// This replica fetches; release the lock with [`Fleet::release`].
    Held(LockToken),
    /// Another replica stored the entry while this one waited: its bytes.
    Filled(Vec<u8>),
    /// Fetch without the lock (no answer from Redis, the holder gave up or
    /// stored nothing, or the wait ran out).
    Proceed,
}

/// Proof of holding one fill lock.
pub struct LockToken {
    key: String,
    token: String,
}

/// What offering an entry to Redis came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Stored,
    /// A write mark newer than the entry's stamp: it is pre-write data.
    Refused,
    /// Redis did not answer.
    Failed,
}

/// Objects written while Redis could not be told, each with the number of
/// the attempt that last added it: a replay forgets only what it sent, not
/// what a newer write added again meanwhile.
#[derive(Default)]
struct Pending {
    objects: HashMap<String, u64>,
    everything: Option<u64>,
    generation: u64,
}

/// The fleet's sync interval, in ms (throttles and mark replays).
pub const SYNC_WINDOW_MS: u64 = 250;

/// Consecutive failed calls before the fleet counts as degraded (one slow
/// answer is not an outage).
const FAILURES_TO_DEGRADE: u32 = 3;

/// The connection to the fleet's Redis and what rides on it.
pub struct Fleet {
    conn: ConnectionManager,
    prefix: String,
    settings: FleetSettings,
    pub metrics: FleetMetrics,
    healthy: AtomicBool,
    failures: AtomicU32,
    /// When Redis last started answering again (ms since `started`): marks
    /// a sibling kept during the outage may still be on their way.
    recovered_ms: AtomicU64,
    started: Instant,
    /// The epoch of Redis's data this replica knows (0: none yet).
    epoch: AtomicU64,
    /// How long write marks live: longer than any entry may be kept.
    mark_ttl_ms: AtomicU64,
    /// How long a fill lock lives: longer than any upstream exchange.
    lock_ttl: Duration,
    pending: Mutex<Pending>,
    /// Fast path: false while nothing is pending.
    has_pending: AtomicBool,
    /// Set when Redis lost its data: every entry in memory must go.
    lost_data: AtomicBool,
}

const MARK: &str = r"
local s = redis.call('INCR', KEYS[1])
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], s, 'PX', ARGV[1])
end
return s
";

const PUT: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[4] then return 0 end
local stamp = tonumber(ARGV[1])
for i = 3, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v and (tonumber(v) or math.huge) > stamp then return 0 end
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
return 1
";

const POLL: &str = r"
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {0, ''} end
return {2, ''}
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Keeps, per field, the report that expires last; drops expired ones.
/// ARGV: now, then (field, expiry, value) triples.
const SHARE: &str = r"
local now = tonumber(ARGV[1])
for i = 2, #ARGV, 3 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  local keep = old and tonumber(string.match(old, '^(%d+)') or '0') or 0
  if tonumber(ARGV[i + 1]) > keep then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
  end
end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if (tonumber(string.match(all[i + 1], '^(%d+)') or '0') or 0) <= now then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return redis.call('HVALS', KEYS[1])
";

/// A Redis call's failure, for logs.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis unreachable; not asked until it answers a ping")]
    Degraded,
}

impl Fleet {
    /// Connects lazily: graphcache starts, and serves, with Redis down.
    /// Fill locks outlive `upstream_timeout`, so a slow fetch keeps its lock.
    pub fn new(
        settings: FleetSettings,
        upstream_timeout: Duration,
        registry: &Registry,
    ) -> Result<Arc<Self>, FleetError> {
        let client = redis::Client::open(settings.url.as_str())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let metrics = FleetMetrics::new(registry);
        metrics.up.set(1);
        Ok(Arc::new(Self {
            conn,
            prefix: format!("{}:v{FORMAT_VERSION}:", settings.namespace),
            settings,
            metrics,
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            recovered_ms: AtomicU64::new(0),
            started: Instant::now(),
            epoch: AtomicU64::new(0),
            mark_ttl_ms: AtomicU64::new(86_400_000),
            lock_ttl: upstream_timeout + Duration::from_secs(5),
            pending: Mutex::default(),
            has_pending: AtomicBool::new(false),
            lost_data: AtomicBool::new(false),
        }))
    }

    pub fn settings(&self) -> &FleetSettings {
        &self.settings
    }

    /// True while Redis answers.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Write marks must outlive every entry that may depend on them: the
    /// longest retention of the routes, at least a day (so a reload that
    /// lengthens TTLs finds marks still there), plus ten minutes.
    pub fn set_longest_retention(&self, retention: Duration) {
        let retention = retention.max(Duration::from_secs(86_400));
        let ms = (retention + Duration::from_secs(600)).as_millis();
        // Never lowered: entries stored under a longer retention (before a
        // reload) still need their marks.
        self.mark_ttl_ms
            .fetch_max(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Takes (and clears) the flag that Redis lost its data since the last
    /// call: the caller drops everything it holds in memory.
    pub fn take_lost_data(&self) -> bool {
        self.lost_data.swap(false, Ordering::AcqRel)
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }

    /// The key of an entry or lock under a cache key's 32 bytes.
    fn entry_key(&self, kind: &str, key: &[u8; 32]) -> String {
        // blake3's fixed-size hex: no allocation per byte.
        self.key(kind, &blake3::Hash::from_bytes(*key).to_hex())
    }

    /// The key of an object's write mark. Hashed: ids come from client
    /// paths, which could hold anything.
    fn mark_key(&self, object: &str) -> String {
        let hash = blake3::hash(object.as_bytes());
        self.key("w", &hash.to_hex()[..32])
    }

    fn all_key(&self) -> String {
        format!("{}all", self.prefix)
    }

    fn seq_key(&self) -> String {
        format!("{}seq", self.prefix)
    }

    /// Runs one Redis call under the timeout, counting and timing it, and
    /// keeping the health state (logged once per change). While degraded,
    /// the request path does not wait on a dead Redis: only pings and write
    /// marks (a write can afford one try) go out.
    async fn call<T, F>(&self, op: &'static str, call: F) -> Result<T, FleetError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        if !self.is_healthy() && op != "ping" && op != "mark" {
            return Err(FleetError::Degraded);
        }
        let started = Instant::now();
        let result = match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(FleetError::Redis(e)),
            Err(_) => Err(FleetError::Timeout(self.settings.timeout)),
        };
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => {
                self.failures.store(0, Ordering::Release);
                self.set_health(true, None);
            }
            Err(e) => {
                self.metrics.errors.with_label_values(&[op]).inc();
                // A script or type error is a bug or a bad key, not an
                // outage: it fails its call but not the fleet.
                let outage = match e {
                    FleetError::Redis(e) => {
                        e.is_timeout()
                            || e.is_io_error()
                            || e.is_connection_dropped()
                            || e.is_connection_refusal()
                    }
                    _ => true,
                };
                if outage {
                    let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
                    if failures >= FAILURES_TO_DEGRADE || op == "ping" {
                        self.set_health(false, Some(e));
                    }
                }
            }
        }
        result
    }

    fn set_health(&self, healthy: bool, error: Option<&FleetError>) {
        if self.healthy.swap(healthy, Ordering::AcqRel) == healthy {
            return;
        }
        self.metrics.up.set(i64::from(healthy));
        let url = redact_url(&self.settings.url);
        match error {
            None => {
                let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.recovered_ms.store(now.max(1), Ordering::Release);
                tracing::info!(redis = %url, "fleet Redis answers again; shared tier back")
            }
            Some(error) => tracing::warn!(
                redis = %url,
                %error,
                "fleet Redis unreachable; serving from memory and upstream (degraded)"
            ),
        }
    }

    /// False for a short while after Redis answers again (two sync rounds
    /// and a timeout): siblings may still be sending the marks they kept
    /// during the outage, so the degraded rule still applies to hits.
    pub fn marks_settled(&self) -> bool {
        let recovered = self.recovered_ms.load(Ordering::Acquire);
        if recovered == 0 {
            return true;
        }
        let timeout = u64::try_from(self.settings.timeout.as_millis()).unwrap_or(u64::MAX);
        let window = (2 * SYNC_WINDOW_MS).saturating_add(timeout);
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        now.saturating_sub(recovered) >= window
    }

    async fn query<T: FromRedisValue>(&self, op: &'static str, cmd: Cmd) -> Result<T, FleetError> {
        let mut conn = self.conn.clone();
        self.call(op, async move {
            match cmd.query_async(&mut conn).await {
                Err(e) if reconnects(&e) => cmd.query_async(&mut conn).await,
                other => other,
            }
        })
        .await
    }

    async fn script<T: FromRedisValue>(
        &self,
        op: &'static str,
        code: &str,
        keys: &[String],
        args: &[&[u8]],
    ) -> Result<T, FleetError> {
        let script = Script::new(code);
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        let mut conn = self.conn.clone();
        self.call(op, async move {
            match invocation.invoke_async(&mut conn).await {
                Err(e) if reconnects(&e) => invocation.invoke_async(&mut conn).await,
                other => other,
            }
        })
        .await
    }

    /// The fleet's identity secret: the configured one, else the one kept
    /// in Redis (created by the first replica to ask).
    pub async fn identity_secret(&self) -> Result<[u8; 32], FleetError> {
        if let Some(secret) = &self.settings.secret {
            return Ok(blake3::derive_key(
                "graphcache fleet identity v1",
                secret.as_bytes(),
            ));
        }
        let key = self.key("meta", "secret");
        let fresh: [u8; 32] = rand::random();
        let hex = blake3::Hash::from_bytes(fresh).to_hex();
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(hex.as_str()).arg("NX");
        let _: Option<String> = self.query("secret", set).await?;
        let mut get = redis::cmd("GET");
        get.arg(&key);
        let stored: String = self.query("secret", get).await?;
        Ok(blake3::derive_key(
            "graphcache fleet identity v1",
            stored.as_bytes(),
        ))
    }

    /// Warns when Redis may evict write marks before the entries that
    /// depend on them (any policy but `noeviction` and `volatile-ttl`).
    /// Managed Redis often refuses `CONFIG`: then nothing is said.
    pub async fn check_eviction_policy(&self) {
        let mut get = redis::cmd("CONFIG");
        get.arg("GET").arg("maxmemory-policy");
        if let Ok(pair) = self.query::<Vec<String>>("config", get).await {
            if let Some(policy) = pair.get(1) {
                if policy != "noeviction" && policy != "volatile-ttl" {
                    tracing::warn!(
                        policy = %policy,
                        "the fleet's Redis may evict write marks before the entries they guard; use maxmemory-policy volatile-ttl (README, Fleet mode)"
                    );
                }
            }
        }
    }

    fn epoch_key(&self) -> String {
        format!("{}epoch", self.prefix)
    }

    /// The epoch Redis holds, given what a read of the epoch key returned:
    /// a missing one is created (the first replica's wins). When it differs
    /// from the one this replica knew, Redis lost its data: memory must be
    /// dropped (see [`Fleet::take_lost_data`]). None when Redis does not
    /// answer.
    async fn current_epoch(&self, read: Option<u64>) -> Option<u64> {
        let epoch = match read {
            Some(epoch) => epoch,
            None => {
                let mut set = redis::cmd("SET");
                set.arg(self.epoch_key())
                    .arg(rand::random::<u64>() | 1)
                    .arg("NX");
                let _: Option<String> = self.query("ticket", set).await.ok()?;
                let mut get = redis::cmd("GET");
                get.arg(self.epoch_key());
                self.query::<Option<u64>>("ticket", get).await.ok()??
            }
        };
        let known = self.epoch.swap(epoch, Ordering::AcqRel);
        if known != 0 && known != epoch {
            tracing::warn!(
                "fleet Redis lost its data (a new epoch); dropping every entry in memory"
            );
            self.lost_data.store(true, Ordering::Release);
        }
        Some(epoch)
    }

    /// Where the fleet's writes stand now, taken before a read goes
    /// upstream. None when Redis does not answer.
    pub async fn ticket(&self) -> Option<Stamp> {
        let mut mget = redis::cmd("MGET");
        mget.arg(self.epoch_key()).arg(self.seq_key());
        let read: Vec<Option<u64>> = self.query("ticket", mget).await.ok()?;
        let epoch = self.current_epoch(read.first().copied().flatten()).await?;
        Some(Stamp {
            epoch,
            seq: read.get(1).copied().flatten().unwrap_or(0),
        })
    }

    async fn mark(&self, marks: &[String]) -> Result<u64, FleetError> {
        let mut keys = Vec::with_capacity(marks.len() + 1);
        keys.push(self.seq_key());
        keys.extend(marks.iter().cloned());
        let ttl = self.mark_ttl_ms.load(Ordering::Relaxed).to_string();
        self.script("mark", MARK, &keys, &[ttl.as_bytes()]).await
    }

    fn keep_pending(&self, objects: &[&str], everything: bool) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.generation += 1;
        let generation = pending.generation;
        if everything || pending.objects.len() + objects.len() > MAX_PENDING_MARKS {
            pending.objects.clear();
            pending.everything = Some(generation);
        } else {
            for object in objects {
                pending.objects.insert((*object).to_owned(), generation);
            }
        }
        self.has_pending.store(true, Ordering::Release);
    }

    /// Marks `objects` written (every entry depending on one, in every
    /// replica, stops being served). Awaited before the write's client is
    /// answered; a failed attempt is tried once more. When Redis still does
    /// not answer, the marks are kept: this replica treats those objects as
    /// written until they are sent, and sends them as soon as it can.
    pub async fn mark_written(&self, objects: &[&str]) {
        let marks: Vec<String> = objects.iter().map(|o| self.mark_key(o)).collect();
        for _ in 0..2 {
            if self.mark(&marks).await.is_ok() {
                self.metrics.marks_sent.inc_by(objects.len() as u64);
                return;
            }
        }
        self.keep_pending(objects, false);
    }

    /// Marks everything written (a write graphcache cannot attribute).
    pub async fn mark_everything(&self) {
        for _ in 0..2 {
            if self.mark(&[self.all_key()]).await.is_ok() {
                self.metrics.marks_sent.inc();
                return;
            }
        }
        self.keep_pending(&[], true);
    }

    /// True when one of `objects` was written by this replica and the mark
    /// has not reached Redis yet.
    fn pending_for(&self, objects: &[&str]) -> bool {
        if !self.has_pending.load(Ordering::Acquire) {
            return false;
        }
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.everything.is_some() || objects.iter().any(|o| pending.objects.contains_key(*o))
    }

    /// Whether an entry stamped `stamp` (None: stored while Redis was
    /// unreachable) over `objects` may be served. One `MGET`, which also
    /// reads the epoch, so a Redis that lost its data is noticed on hits.
    pub async fn check(&self, stamp: Option<Stamp>, objects: &[&str]) -> Check {
        if self.pending_for(objects) {
            return Check::Written;
        }
        let mut mget = redis::cmd("MGET");
        mget.arg(self.epoch_key()).arg(self.all_key());
        for object in objects {
            mget.arg(self.mark_key(object));
        }
        let read: Vec<Option<String>> = match self.query("check", mget).await {
            Ok(read) => read,
            Err(_) => return Check::Unknown,
        };
        let epoch = read
            .first()
            .cloned()
            .flatten()
            .and_then(|e| e.parse::<u64>().ok());
        let Some(epoch) = self.current_epoch(epoch).await else {
            return Check::Unknown;
        };
        let Some(stamp) = stamp else {
            return Check::Unstamped;
        };
        if stamp.epoch != epoch {
            return Check::Written;
        }
        // A mark that does not parse counts as a write.
        let written = read[1..]
            .iter()
            .flatten()
            .any(|m| m.parse::<u64>().map_or(true, |m| m > stamp.seq));
        if written {
            Check::Written
        } else {
            Check::Valid
        }
    }

    /// The bytes stored under a cache key, if any. Errors count as a miss.
    pub async fn get(&self, key: &[u8; 32]) -> Option<Vec<u8>> {
        let mut get = redis::cmd("GET");
        get.arg(self.entry_key("e", key));
        self.query("get", get).await.ok().flatten()
    }

    /// Stores `value` for `retention`, unless Redis's epoch is not the
    /// stamp's or one of `objects` was marked after it (checked by Redis in
    /// the same step).
    pub async fn put(
        &self,
        key: &[u8; 32],
        stamp: Stamp,
        objects: &[&str],
        value: &[u8],
        retention: Duration,
    ) -> Put {
        let mut keys = Vec::with_capacity(objects.len() + 3);
        keys.push(self.entry_key("e", key));
        keys.push(self.epoch_key());
        keys.push(self.all_key());
        keys.extend(objects.iter().map(|o| self.mark_key(o)));
        let ttl = retention.as_millis().max(1).to_string();
        let seq = stamp.seq.to_string();
        let epoch = stamp.epoch.to_string();
        let stored: Result<i64, _> = self
            .script(
                "put",
                PUT,
                &keys,
                &[seq.as_bytes(), ttl.as_bytes(), value, epoch.as_bytes()],
            )
            .await;
        let (put, label) = match stored {
            Ok(1) => (Put::Stored, "stored"),
            Ok(_) => (Put::Refused, "refused"),
            Err(_) => (Put::Failed, "error"),
        };
        self.metrics.l2_stores.with_label_values(&[label]).inc();
        put
    }

    /// Drops the entry under a cache key if it still holds `value` (a
    /// sibling may have stored a newer one since it was read).
    pub async fn remove_if(&self, key: &[u8; 32], value: &[u8]) {
        let _: Result<i64, _> = self
            .script("remove", RELEASE, &[self.entry_key("e", key)], &[value])
            .await;
    }

    /// Drops the entry under a cache key.
    pub async fn remove(&self, key: &[u8; 32]) {
        let mut del = redis::cmd("DEL");
        del.arg(self.entry_key("e", key));
        let _: Result<i64, _> = self.query("remove", del).await;
    }

    /// Takes the fill lock of a cache key for reads stamped `stamp`, or
    /// waits (at most `redis_lock_wait_ms`) for the replica that holds it
    /// to store its answer. A read that starts after a write gets a lock of
    /// its own: it never waits on a fetch from before the write. The lock
    /// lives longer than any upstream exchange.
    pub async fn claim(&self, key: &[u8; 32], stamp: Stamp) -> Claim {
        let lock = format!("{}:{}:{}", self.entry_key("l", key), stamp.epoch, stamp.seq);
        let token: String = format!("{:032x}", rand::random::<u128>());
        let mut set = redis::cmd("SET");
        set.arg(&lock)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(self.lock_ttl.as_millis()).unwrap_or(u64::MAX));
        match self.query::<Option<String>>("lock", set).await {
            Ok(Some(_)) => return Claim::Held(LockToken { key: lock, token }),
            Ok(None) => {
                // A retried SET (the first reply was lost) finds our own.
                let mut get = redis::cmd("GET");
                get.arg(&lock);
                if let Ok(Some(holder)) = self.query::<Option<String>>("lock", get).await {
                    if holder == token {
                        return Claim::Held(LockToken { key: lock, token });
                    }
                }
            }
            Err(_) => return Claim::Proceed,
        }
        let entry = self.entry_key("e", key);
        let deadline = Instant::now() + self.settings.lock_wait;
        let mut pause = Duration::from_millis(2);
        let waits = &self.metrics.lock_waits;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                waits.with_label_values(&["timeout"]).inc();
                return Claim::Proceed;
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(Duration::from_millis(25));
            let polled: Result<(i64, Option<Vec<u8>>), _> = self
                .script("lock", POLL, &[entry.clone(), lock.clone()], &[])
                .await;
            match polled {
                Ok((1, Some(bytes))) => {
                    waits.with_label_values(&["filled"]).inc();
                    return Claim::Filled(bytes);
                }
                Ok((0, _)) => continue,
                Ok(_) => {
                    waits.with_label_values(&["released"]).inc();
                    return Claim::Proceed;
                }
                Err(_) => {
                    waits.with_label_values(&["error"]).inc();
                    return Claim::Proceed;
                }
            }
        }
    }

    /// Releases a fill lock if it is still this replica's.
    pub async fn release(&self, lock: LockToken) {
        let _: Result<i64, _> = self
            .script("lock", RELEASE, &[lock.key], &[lock.token.as_bytes()])
            .await;
    }

    /// Sends this replica's throttle and pressure reports (`(field, expiry
    /// as Unix ms, value)`, the value starting with the expiry) and returns
    /// every unexpired report of the fleet. One report per field is kept,
    /// the one that expires last. None when Redis does not answer.
    pub async fn exchange_throttles(
        &self,
        reports: &[(String, u64, String)],
    ) -> Option<Vec<String>> {
        let now = unix_ms().to_string();
        let mut args: Vec<Vec<u8>> = vec![now.into_bytes()];
        for (field, until, value) in reports {
            args.push(field.clone().into_bytes());
            args.push(until.to_string().into_bytes());
            args.push(value.clone().into_bytes());
        }
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let values: Vec<String> = self
            .script("throttle", SHARE, &[self.key("meta", "throttles")], &args)
            .await
            .ok()?;
        self.metrics
            .throttles
            .with_label_values(&["sent"])
            .inc_by(reports.len() as u64);
        Some(values)
    }

    /// One health round: a `PING` while degraded (so recovery is noticed
    /// without traffic), then any marks that could not be sent. A replay
    /// forgets only what it sent.
    pub async fn tend(&self) {
        if !self.is_healthy() {
            let _: Result<String, _> = self.query("ping", redis::cmd("PING")).await;
        }
        if !self.is_healthy() || !self.has_pending.load(Ordering::Acquire) {
            return;
        }
        let (objects, everything, generation) = {
            let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let objects: Vec<String> = pending.objects.keys().cloned().collect();
            (objects, pending.everything, pending.generation)
        };
        let sent = if everything.is_some() {
            self.mark(&[self.all_key()]).await.is_ok()
        } else {
            let marks: Vec<String> = objects.iter().map(|o| self.mark_key(o)).collect();
            let mut ok = true;
            for chunk in marks.chunks(500) {
                ok &= self.mark(chunk).await.is_ok();
            }
            ok
        };
        if !sent {
            return;
        }
        self.metrics.marks_sent.inc_by(if everything.is_some() {
            1
        } else {
            objects.len() as u64
        });
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        // What was sent covers every object kept up to `generation` (marking
        // everything covers them all); newer additions stay.
        pending.objects.retain(|_, g| *g > generation);
        if everything.is_some() && pending.everything.is_some_and(|g| g <= generation) {
            pending.everything = None;
        }
        if pending.everything.is_none() && pending.objects.is_empty() {
            self.has_pending.store(false, Ordering::Release);
        }
    }

    /// Pending marks not yet sent (tests, metrics).
    #[cfg(test)]
    pub fn pending_marks(&self) -> usize {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.objects.len() + usize::from(pending.everything.is_some())
    }
}

/// True for a failure the connection manager answers by reconnecting (a
/// connection Redis dropped, e.g. on restart): worth one retry within the
/// same timeout, so a restart costs no request its shared state.
fn reconnects(error: &redis::RedisError) -> bool {
    error.is_connection_dropped() || error.is_io_error()
}

/// Wall-clock milliseconds: the one clock replicas share.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Arc<Fleet> {
        let settings = FleetSettings {
            url: "redis://127.0.0.1:1/".to_owned(),
            namespace: "t".to_owned(),
            timeout: Duration::from_millis(50),
            degraded_max_age: Duration::from_secs(2),
            lock_wait: Duration::from_millis(100),
            required: false,
            secret: Some("0123456789abcdef".to_owned()),
        };
        Fleet::new(settings, Duration::from_secs(1), &Registry::new()).unwrap()
    }

    #[tokio::test]
    async fn keys_are_namespaced_versioned_and_hold_no_raw_id() {
        let f = fleet();
        assert_eq!(f.seq_key(), "t:v1:seq");
        let mark = f.mark_key("act_123");
        assert!(
            mark.starts_with("t:v1:w:") && !mark.contains("act_123"),
            "{mark}"
        );
        assert_eq!(
            f.entry_key("e", &[0xab; 32]),
            format!("t:v1:e:{}", "ab".repeat(32))
        );
    }

    #[tokio::test]
    async fn an_unreachable_redis_degrades_and_keeps_marks_for_later() {
        let f = fleet();
        // One failure is not an outage; three in a row are.
        assert_eq!(f.ticket().await, None);
        assert!(f.is_healthy());
        let stamp = Some(Stamp { epoch: 1, seq: 1 });
        assert_eq!(f.check(stamp, &["1"]).await, Check::Unknown);
        assert_eq!(f.check(stamp, &["1"]).await, Check::Unknown);
        assert!(!f.is_healthy());
        // While degraded nothing waits on Redis (only the ping goes out).
        let started = Instant::now();
        assert_eq!(f.check(stamp, &["2"]).await, Check::Unknown);
        assert!(started.elapsed() < Duration::from_millis(5));
        f.mark_written(&["1", "2"]).await;
        assert_eq!(f.pending_marks(), 2);
        // This replica treats what it could not mark as written.
        assert_eq!(f.check(stamp, &["2", "9"]).await, Check::Written);
        assert_eq!(f.check(stamp, &["9"]).await, Check::Unknown);
        f.tend().await;
        assert_eq!(f.pending_marks(), 2, "kept while Redis is down");
        assert!(matches!(
            f.claim(&[0; 32], Stamp { epoch: 1, seq: 1 }).await,
            Claim::Proceed
        ));
    }

    #[tokio::test]
    async fn a_configured_secret_keys_identities_without_redis() {
        let a = fleet().identity_secret().await.unwrap();
        assert_eq!(
            a,
            fleet().identity_secret().await.unwrap(),
            "alike fleet-wide"
        );
        let mut other = fleet().settings.clone();
        other.secret = Some("another-secret-0123".to_owned());
        let b = Fleet::new(other, Duration::from_secs(1), &Registry::new())
            .unwrap()
            .identity_secret()
            .await
            .unwrap();
        assert_ne!(a, b);
        assert_ne!(
            &a[..16],
            b"0123456789abcdef",
            "derived, not the secret itself"
        );
    }
}
