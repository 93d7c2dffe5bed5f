//! Single flight: concurrent identical requests share one upstream call.
//!
//! The call runs in its own task, so a waiter that disconnects (even the
//! one that started it) does not cancel it for the others, and its result
//! still reaches the cache.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// In-flight calls by key; `T` is the shared result.
pub struct Flights<K, T> {
    map: Arc<Mutex<HashMap<K, watch::Receiver<Option<T>>>>>,
}

impl<K, T> Default for Flights<K, T> {
    fn default() -> Self {
        Self {
            map: Arc::default(),
        }
    }
}

/// A place in a flight: wait on it for the shared result.
pub struct Ticket<T> {
    receiver: watch::Receiver<Option<T>>,
    /// True when this request joined a call another request started.
    pub joined: bool,
}

impl<T: Clone> Ticket<T> {
    /// The shared result, or None if the call's task died without one.
    pub async fn wait(mut self) -> Option<T> {
        let value = self.receiver.wait_for(Option::is_some).await.ok()?;
        value.clone()
    }
}

impl<K, T> Flights<K, T>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Joins the call in flight for `key`, or starts `call` as a new one.
    pub fn join_or_start<F>(&self, key: K, call: impl FnOnce() -> F) -> Ticket<T>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let sender = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(receiver) = map.get(&key) {
                return Ticket {
                    receiver: receiver.clone(),
                    joined: true,
                };
            }
            let (sender, receiver) = watch::channel(None);
            map.insert(key.clone(), receiver);
            sender
        };
        let receiver = sender.subscribe();
        let call = call();
        let guard = Landing {
            map: self.map.clone(),
            key: Some(key),
        };
        tokio::spawn(async move {
            let value = call.await;
            // Publish first, then leave the map: a request arriving in
            // between still joins and gets the value at once.
            sender.send_replace(Some(value));
            drop(guard);
        });
        Ticket {
            receiver,
            joined: false,
        }
    }

    /// Calls in flight now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes a flight from the map when its task ends, even by panic.
struct Landing<K: Hash + Eq, T> {
    map: Arc<Mutex<HashMap<K, watch::Receiver<Option<T>>>>>,
    key: Option<K>,
}

impl<K: Hash + Eq, T> Drop for Landing<K, T> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.map
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    #[tokio::test]
    async fn concurrent_callers_share_one_call() {
        let flights: Flights<u32, u32> = Flights::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Notify::new());
        let mut tickets = Vec::new();
        for _ in 0..10 {
            let (calls, gate) = (calls.clone(), gate.clone());
            tickets.push(flights.join_or_start(7, move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                gate.notified().await;
                42
            }));
        }
        assert_eq!(tickets.iter().filter(|t| t.joined).count(), 9);
        gate.notify_one();
        for t in tickets {
            assert_eq!(t.wait().await, Some(42));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn a_dropped_waiter_does_not_cancel_the_call() {
        let flights: Flights<u32, u32> = Flights::default();
        let gate = Arc::new(Notify::new());
        let g = gate.clone();
        let first = flights.join_or_start(1, move || async move {
            g.notified().await;
            5
        });
        let second = flights.join_or_start(1, || async { unreachable!() });
        drop(first);
        gate.notify_one();
        assert_eq!(second.wait().await, Some(5));
    }

    #[tokio::test]
    async fn a_panicking_call_leaves_the_map_and_waiters_get_none() {
        let flights: Flights<u32, u32> = Flights::default();
        let ticket = flights.join_or_start(1, || async { panic!("boom") });
        assert_eq!(ticket.wait().await, None);
        assert!(flights.is_empty());
    }
}
