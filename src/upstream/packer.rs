//! Sending cacheable GETs upstream: alone when the group is idle, packed into
//! Graph batch requests when calls pile up.
//!
//! A group is (API version, token identity, User-Agent): items of one batch
//! share the batch's token and User-Agent, and inherit its version. Each group
//! has a bounded number of upstream calls in flight; a GET that finds a free
//! slot goes out at once as a plain GET (no added latency when idle); GETs
//! that find none queue, and when a call finishes, the queue leaves together
//! as one batch of at most 50 items.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, StatusCode};
use tokio::sync::oneshot;

use crate::cache::TokenIdentity;
use crate::config::PackingSettings;
use crate::graph::batch::{self, GetItem};
use crate::metrics::Metrics;
use crate::ratelimit::{RateLimits, Subject};
use crate::upstream::request::{self, FORM};
use crate::upstream::{full_body, Answer, BatchFailure, Upstream, UpstreamError};

/// Which GETs may share a batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub version: Option<Box<str>>,
    pub identity: TokenIdentity,
    pub user_agent: Option<HeaderValue>,
    /// Graph varies on `Origin`: items of one batch share the one it sends.
    pub origin: Option<HeaderValue>,
}

/// A cacheable GET ready to go upstream, alone or as a batch item.
#[derive(Debug)]
pub struct UpstreamGet {
    pub path_and_query: PathAndQuery,
    /// Headers for the plain GET: filtered, with the `If-None-Match` to send.
    pub headers: HeaderMap,
    pub group: GroupKey,
    /// The item's `relative_url` if it rides in a batch.
    pub relative_url: String,
    pub access_token: Option<String>,
    /// The caller's proof for `access_token`; part of its identity, so
    /// every GET of a group has the same one.
    pub appsecret_proof: Option<String>,
    /// Whom the answer speaks about, for its usage headers.
    pub subject: Subject,
}

struct Queued {
    get: UpstreamGet,
    reply: oneshot::Sender<Result<Answer, UpstreamError>>,
}

#[derive(Default)]
struct Group {
    in_flight: usize,
    queue: Vec<Queued>,
}

/// Sends cacheable GETs upstream, alone or packed. Cloning shares it.
#[derive(Clone)]
pub struct Packer(Arc<Inner>);

struct Inner {
    groups: Mutex<HashMap<GroupKey, Group>>,
    settings: arc_swap::ArcSwap<PackingSettings>,
    upstream: Arc<Upstream>,
    limits: Arc<RateLimits>,
    metrics: Arc<Metrics>,
}

/// Frees a group's slot when its call ends, however it ends, and starts
/// the next batch if GETs are waiting.
struct Slot {
    packer: Packer,
    group: Option<GroupKey>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            self.packer.slot_freed(group);
        }
    }
}

impl Packer {
    pub fn new(
        settings: PackingSettings,
        upstream: Arc<Upstream>,
        limits: Arc<RateLimits>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self(Arc::new(Inner {
            groups: Mutex::default(),
            settings: arc_swap::ArcSwap::from_pointee(settings),
            upstream,
            limits,
            metrics,
        }))
    }

    /// Replaces the settings for GETs dispatched from now on (SIGHUP).
    pub fn set_settings(&self, settings: PackingSettings) {
        self.0.settings.store(Arc::new(settings));
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<GroupKey, Group>> {
        self.0.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the usage headers and any throttling error of an answer.
    fn observe(&self, answer: &Answer, subject: &Subject) {
        self.0.limits.observe_answer(
            answer.status,
            &answer.headers,
            &answer.body,
            subject,
            &self.0.metrics,
        );
    }

    /// Sends `get` upstream now, or queues it for the group's next batch.
    pub async fn dispatch(&self, get: UpstreamGet) -> Result<Answer, UpstreamError> {
        let settings = self.0.settings.load();
        if !settings.enabled {
            return self.single_get(get).await;
        }
        let key = get.group.clone();
        let waiting = {
            let mut groups = self.lock();
            let group = groups.entry(get.group.clone()).or_default();
            if group.in_flight < settings.max_in_flight && settings.window.is_zero() {
                group.in_flight += 1;
                Err(get)
            } else {
                let (reply, waiting) = oneshot::channel();
                let first = group.queue.is_empty();
                group.queue.push(Queued { get, reply });
                self.0.metrics.packing.queued.inc();
                if first && !settings.window.is_zero() && group.in_flight < settings.max_in_flight {
                    // A collection window: the first queued GET opens it.
                    group.in_flight += 1;
                    let window = settings.window;
                    // The slot exists before the task: it is freed even if
                    // the task never runs.
                    let slot = Slot {
                        packer: self.clone(),
                        group: Some(key.clone()),
                    };
                    tokio::spawn(async move {
                        tokio::time::sleep(window).await;
                        drop(slot);
                    });
                }
                Ok(waiting)
            }
        };
        match waiting {
            // A free slot: go now, alone.
            Err(get) => {
                let _slot = Slot {
                    packer: self.clone(),
                    group: Some(key),
                };
                self.single_get(get).await
            }
            Ok(waiting) => waiting.await.unwrap_or(Err(UpstreamError::Lost)),
        }
    }

    /// A call of `group` ended: launch what queued behind it, as one batch.
    fn slot_freed(&self, key: GroupKey) {
        let mut groups = self.lock();
        let Some(group) = groups.get_mut(&key) else {
            return;
        };
        group.in_flight -= 1;
        if group.queue.is_empty() {
            if group.in_flight == 0 {
                groups.remove(&key);
            }
            return;
        }
        let take = group.queue.len().min(self.0.settings.load().max_items);
        let items: Vec<Queued> = group.queue.drain(..take).collect();
        group.in_flight += 1;
        self.0.metrics.packing.queued.sub(items.len() as i64);
        drop(groups);
        let slot = Slot {
            packer: self.clone(),
            group: Some(key),
        };
        let packer = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            packer.run_batch(items).await;
        });
    }

    /// Sends queued GETs as one batch (or one plain GET if alone) and hands
    /// each its own answer.
    async fn run_batch(&self, mut items: Vec<Queued>) {
        if items.len() == 1 {
            let Queued { get, reply } = items.pop().expect("one item");
            let _ = reply.send(self.single_get(get).await);
            return;
        }
        match self.batch_get(&items).await {
            Ok(replies) => {
                for (queued, reply) in items.into_iter().zip(replies) {
                    match reply {
                        Some(answer) => {
                            let _ = queued.reply.send(Ok(answer));
                        }
                        None => {
                            // Not executed (batch time-out): retried once, alone.
                            self.0.metrics.packing.null_retried.inc();
                            self.retry_alone(queued);
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, items = items.len(), "batch failed as a whole; falling back to plain GETs");
                self.0.metrics.packing.fallbacks.inc();
                for queued in items {
                    self.retry_alone(queued);
                }
            }
        }
    }

    fn retry_alone(&self, queued: Queued) {
        let packer = self.clone();
        tokio::spawn(async move {
            let _ = queued.reply.send(packer.single_get(queued.get).await);
        });
    }

    /// One plain GET, its body collected.
    async fn single_get(&self, get: UpstreamGet) -> Result<Answer, UpstreamError> {
        let request = request::build(
            &self.0.upstream,
            Method::GET,
            Some(&get.path_and_query),
            get.headers,
            crate::upstream::empty_body(),
        );
        self.0.metrics.packing.single_calls.inc();
        let answer = self.0.upstream.exchange(request, &self.0.metrics).await?;
        self.observe(&answer, &get.subject);
        Ok(answer)
    }

    /// One upstream batch for `items`; per item its answer, or None if the
    /// entry came back `null`.
    async fn batch_get(&self, items: &[Queued]) -> Result<Vec<Option<Answer>>, UpstreamError> {
        let first = &items[0].get;
        let batch_items: Vec<GetItem<'_>> = items
            .iter()
            .map(|q| GetItem {
                method: "GET",
                relative_url: &q.get.relative_url,
                headers: q
                    .get
                    .headers
                    .get(header::IF_NONE_MATCH)
                    .and_then(|v| v.to_str().ok())
                    .map(|tag| vec![format!("If-None-Match: {tag}")])
                    .unwrap_or_default(),
            })
            .collect();
        // Items share the group's identity, which covers the token and its
        // proof: the batch never borrows another caller's proof.
        let form = batch::form_body(
            first.access_token.as_deref(),
            first.appsecret_proof.as_deref(),
            &batch::encode_items(&batch_items),
        );
        let root = match &first.group.version {
            Some(version) => format!("/{version}/"),
            None => "/".to_owned(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, FORM);
        if let Some(ua) = &first.group.user_agent {
            headers.insert(header::USER_AGENT, ua.clone());
        }
        if let Some(origin) = &first.group.origin {
            headers.insert(header::ORIGIN, origin.clone());
        }
        if let Some(auth) = first.headers.get(header::AUTHORIZATION) {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }
        let request = request::build(
            &self.0.upstream,
            Method::POST,
            Some(&PathAndQuery::try_from(root).expect("a version segment is a valid path")),
            headers,
            full_body(Bytes::from(form)),
        );
        let metrics = &self.0.metrics;
        metrics.packing.batch_calls.inc();
        metrics.packing.batch_items.observe(items.len() as f64);
        let answer = self.0.upstream.exchange(request, metrics).await?;
        let subject = Subject::of_batch(
            items.iter().map(|q| &q.get.subject),
            Some(first.group.identity),
        );
        self.observe(&answer, &subject);
        if answer.status != StatusCode::OK {
            if crate::graph::usage::throttle_error(&answer.body).is_some() {
                // Retrying each item alone would spend quota Graph just
                // refused: every waiter gets the throttling answer instead.
                return Ok(items.iter().map(|_| Some(answer.clone())).collect());
            }
            return Err(UpstreamError::BatchFailed(BatchFailure::Status(
                answer.status,
            )));
        }
        let replies = batch::decode_reply(&answer.body, items.len())
            .map_err(|e| UpstreamError::BatchFailed(BatchFailure::Reply(Arc::new(e))))?;
        // The batch's round trip is every item's upstream time.
        let upstream_us = answer.upstream_us;
        for (reply, queued) in replies.iter().zip(items) {
            if let Some(r) = reply {
                let body = r.body.as_deref().unwrap_or_default();
                self.0.limits.observe_answer(
                    r.status,
                    &r.headers,
                    body,
                    &queued.get.subject,
                    &self.0.metrics,
                );
            }
        }
        Ok(replies
            .into_iter()
            .map(|reply| {
                reply.map(|r| Answer {
                    status: r.status,
                    headers: r.headers,
                    body: r.body.unwrap_or_default(),
                    upstream_us,
                })
            })
            .collect())
    }
}
