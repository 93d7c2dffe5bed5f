//! Tasks that must finish even if their client leaves (writes, client
//! batches with writes): tracked for shutdown, bounded in number.

use std::sync::Arc;

use crate::error::ProxyError;

/// The tracker and its slots.
pub(crate) struct Detached {
    tracker: tokio_util::task::TaskTracker,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Detached {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            tracker: tokio_util::task::TaskTracker::new(),
            slots: Arc::new(tokio::sync::Semaphore::new(limit)),
        }
    }

    /// Spawns `task` once a slot is free, waiting at most `wait` for one.
    pub(crate) async fn spawn<F>(
        &self,
        wait: std::time::Duration,
        task: F,
    ) -> Result<tokio::task::JoinHandle<F::Output>, ProxyError>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let slot = tokio::time::timeout(wait, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| ProxyError::Overloaded("every write task slot is busy"))?
            .expect("the semaphore is never closed");
        Ok(self.tracker.spawn(async move {
            let output = task.await;
            drop(slot);
            output
        }))
    }

    /// Stops taking tasks and waits for those running.
    pub(crate) async fn drain(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}
