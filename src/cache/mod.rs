//! The cache stage: what is stored, under which key, for which caller.
//!
//! - [`key`]: the blake3 cache key of a read;
//! - [`identity`]: the caller identity every key and flight carries;
//! - [`entry`]: a stored answer with its freshness, `Vary` and 304 rules;
//! - [`memory`]: the byte-bounded in-process store (moka) and its object index;
//! - [`tiered`]: memory as L1 before the fleet's Redis as L2 (`redis_url`),
//!   with the entry format of [`wire`].
//!
//! The request path sees a store only through [`Store`], so a shared store
//! (Redis, for a fleet of sidecars) can stand beside the in-process one.

use std::future::Future;
use std::sync::Arc;

pub mod entry;
pub mod identity;
pub mod key;
pub mod memory;
pub mod tiered;
pub mod wire;

pub use entry::{CachedResponse, Freshness};
pub use identity::{TokenHasher, TokenIdentity};
pub use key::CacheKey;
pub use memory::{MemoryStore, ReadTicket};
pub use tiered::{FillClaim, TieredStore};
pub use wire::{OwnedSecrets, Secrets};

use crate::graph::routes::ObjectId;

/// What a write changed, as far as graphcache can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteScope {
    /// These objects (never empty).
    Objects(Vec<ObjectId>),
    /// It cannot tell (an unresolved reference, no object named): every
    /// entry must go.
    Everything,
}

impl WriteScope {
    /// The scope of a write naming `objects`: everything when it names none,
    /// or more than an entry may depend on (one pass over the cache instead
    /// of work under the index lock proportional to a client's list).
    pub fn of(objects: Vec<ObjectId>) -> Self {
        if objects.is_empty() || objects.len() > entry::MAX_ENTRY_OBJECTS {
            Self::Everything
        } else {
            Self::Objects(objects)
        }
    }
}

/// What the request path needs of a store. A read takes a [`ReadTicket`]
/// before it goes upstream and stores with it, so a write that lands in
/// between keeps its pre-write answer out.
pub trait Store: Send + Sync {
    /// The entry under `key`, shared, copying nothing.
    fn get(&self, key: &CacheKey) -> impl Future<Output = Option<Arc<CachedResponse>>> + Send;
    /// A snapshot of the write sequence, taken before going upstream (in a
    /// fleet, the fleet's too: one Redis round trip).
    fn read_ticket(&self) -> impl Future<Output = ReadTicket> + Send;
    /// Stores `entry` unless a write to its objects landed after `ticket`.
    fn put(
        &self,
        key: CacheKey,
        entry: CachedResponse,
        ticket: ReadTicket,
    ) -> impl Future<Output = bool> + Send;
    /// Drops one entry (the object is gone or unreadable upstream).
    fn remove(&self, key: &CacheKey) -> impl Future<Output = ()> + Send;
    /// A write to `objects`: drops their entries for every caller.
    fn invalidate_objects(&self, objects: &[ObjectId]) -> impl Future<Output = usize> + Send;
    /// A write graphcache cannot attribute: drops everything.
    fn invalidate_all(&self) -> impl Future<Output = usize> + Send;
}
