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
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, StatusCode};
use tokio::sync::oneshot;

use crate::batch::{self, GetItem, MAX_ITEMS};
use crate::body::{collect_up_to, Collected};
use crate::error::ProxyError;
use crate::handler::Proxy;
use crate::key::TokenIdentity;
use crate::upstream::UpstreamTimer;

/// Which GETs may share a batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub version: Option<Box<str>>,
    pub identity: TokenIdentity,
    pub user_agent: Option<HeaderValue>,
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
    pub appsecret_proof: Option<String>,
    /// Whom the answer speaks about, for its usage headers.
    pub subject: crate::ratelimit::Subject,
}

/// A complete upstream answer to one GET (plain or batch item).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Microseconds spent waiting on upstream for it.
    pub upstream_us: u64,
}

struct Queued {
    get: UpstreamGet,
    reply: oneshot::Sender<Result<Answer, ProxyError>>,
}

#[derive(Default)]
struct Group {
    in_flight: usize,
    queue: Vec<Queued>,
}

/// Per-group state of the packer.
#[derive(Default)]
pub struct Groups(Mutex<HashMap<GroupKey, Group>>);

impl Groups {
    fn lock(&self) -> MutexGuard<'_, HashMap<GroupKey, Group>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Frees a group's slot when its call ends, however it ends, and starts
/// the next batch if GETs are waiting.
struct Slot {
    proxy: Arc<Proxy>,
    group: Option<GroupKey>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            self.proxy.slot_freed(group);
        }
    }
}

impl Proxy {
    /// Sends `get` upstream now, or queues it for the group's next batch.
    pub(crate) async fn dispatch(self: &Arc<Self>, get: UpstreamGet) -> Result<Answer, ProxyError> {
        let settings = &self.config.packing;
        if !settings.enabled {
            return self.single_get(get).await;
        }
        let key = get.group.clone();
        let waiting = {
            let mut groups = self.groups.lock();
            let group = groups.entry(get.group.clone()).or_default();
            if group.in_flight < settings.max_in_flight && settings.window.is_zero() {
                group.in_flight += 1;
                Err(get)
            } else {
                let (reply, waiting) = oneshot::channel();
                let first = group.queue.is_empty();
                group.queue.push(Queued { get, reply });
                self.metrics.packing.queued.inc();
                if first && !settings.window.is_zero() && group.in_flight < settings.max_in_flight {
                    // A collection window: the first queued GET opens it.
                    group.in_flight += 1;
                    let window = settings.window;
                    // The slot exists before the task: it is freed even if
                    // the task never runs.
                    let slot = Slot {
                        proxy: self.clone(),
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
                    proxy: self.clone(),
                    group: Some(key),
                };
                self.single_get(get).await
            }
            Ok(waiting) => waiting.await.unwrap_or(Err(ProxyError::FlightLost)),
        }
    }

    /// A call of `group` ended: launch what queued behind it, as one batch.
    fn slot_freed(self: &Arc<Self>, key: GroupKey) {
        let mut groups = self.groups.lock();
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
        let take = group.queue.len().min(self.config.packing.max_items);
        let items: Vec<Queued> = group.queue.drain(..take).collect();
        group.in_flight += 1;
        self.metrics.packing.queued.sub(items.len() as i64);
        drop(groups);
        let slot = Slot {
            proxy: self.clone(),
            group: Some(key),
        };
        let proxy = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            proxy.run_batch(items).await;
        });
    }

    /// Sends queued GETs as one batch (or one plain GET if alone) and hands
    /// each its own answer.
    async fn run_batch(self: &Arc<Self>, mut items: Vec<Queued>) {
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
                            self.metrics.packing.null_retried.inc();
                            self.retry_alone(queued);
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, items = items.len(), "batch failed as a whole; falling back to plain GETs");
                self.metrics.packing.fallbacks.inc();
                for queued in items {
                    self.retry_alone(queued);
                }
            }
        }
    }

    fn retry_alone(self: &Arc<Self>, queued: Queued) {
        let proxy = self.clone();
        tokio::spawn(async move {
            let _ = queued.reply.send(proxy.single_get(queued.get).await);
        });
    }

    /// One plain GET, its body collected.
    pub(crate) async fn single_get(&self, get: UpstreamGet) -> Result<Answer, ProxyError> {
        let mut request = Request::new(crate::handler::empty_body());
        *request.uri_mut() = self.upstream.uri_for(Some(&get.path_and_query));
        *request.headers_mut() = get.headers;
        self.metrics.packing.single_calls.inc();
        let answer = self.exchange(request).await?;
        self.observe(&answer, &get.subject);
        Ok(answer)
    }

    /// One upstream batch for `items`; per item its answer, or None if the
    /// entry came back `null`.
    async fn batch_get(&self, items: &[Queued]) -> Result<Vec<Option<Answer>>, ProxyError> {
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
        let form = batch::form_body(
            first.access_token.as_deref(),
            items.iter().find_map(|q| q.get.appsecret_proof.as_deref()),
            &batch::encode_items(&batch_items),
        );
        let root = match &first.group.version {
            Some(version) => format!("/{version}/"),
            None => "/".to_owned(),
        };
        let mut request = Request::new(crate::handler::full_body(Bytes::from(form)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.upstream.uri_for(Some(
            &PathAndQuery::try_from(root).expect("a version segment is a valid path"),
        ));
        let headers = request.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        if let Some(ua) = &first.group.user_agent {
            headers.insert(header::USER_AGENT, ua.clone());
        }
        if let Some(auth) = first.headers.get(header::AUTHORIZATION) {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }
        self.metrics.packing.batch_calls.inc();
        self.metrics.packing.batch_items.observe(items.len() as f64);
        let answer = self.exchange(request).await?;
        let subject = crate::ratelimit::Subject::of_batch(
            items.iter().map(|q| &q.get.subject),
            Some(first.group.identity),
        );
        self.observe(&answer, &subject);
        if answer.status != StatusCode::OK {
            if crate::usage::throttle_error(&answer.body).is_some() {
                // Retrying each item alone would spend quota Graph just
                // refused: every waiter gets the throttling answer instead.
                return Ok(items.iter().map(|_| Some(answer.clone())).collect());
            }
            return Err(ProxyError::BatchFailed(format!(
                "the batch was answered {}",
                answer.status
            )));
        }
        let replies = batch::decode_reply(&answer.body, items.len())
            .map_err(|e| ProxyError::BatchFailed(e.to_string()))?;
        // The batch's round trip is every item's upstream time.
        let upstream_us = answer.upstream_us;
        for (reply, queued) in replies.iter().zip(items) {
            if let Some(r) = reply {
                let body = r.body.as_deref().unwrap_or_default();
                self.limits.observe_answer(
                    r.status,
                    &r.headers,
                    body,
                    &queued.get.subject,
                    &self.metrics,
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

    /// Sends `request` and collects its whole answer within the timeout.
    pub(crate) async fn exchange(
        &self,
        request: Request<crate::upstream::UpstreamBody>,
    ) -> Result<Answer, ProxyError> {
        let timer = UpstreamTimer::default();
        let deadline = tokio::time::Instant::now() + self.upstream.timeout;
        let response = self.upstream.send(request, &self.metrics, &timer).await?;
        let (head, body) = response.into_parts();
        let limit = self.config.max_body_bytes;
        let collected = tokio::time::timeout_at(deadline, collect_up_to(body, limit))
            .await
            .map_err(|_| ProxyError::UpstreamTimeout(self.upstream.timeout))?
            .map_err(|e| ProxyError::UpstreamBody(Arc::new(e)))?;
        let body = match collected {
            Collected::Complete(body) => body,
            Collected::Overflow { .. } => return Err(ProxyError::UpstreamTooLarge { limit }),
        };
        let mut headers = head.headers;
        crate::headers::strip_hop_by_hop(&mut headers);
        Ok(Answer {
            status: head.status,
            headers,
            body,
            upstream_us: timer.micros().unwrap_or(0),
        })
    }
}

/// Packing settings (validated config).
#[derive(Debug, Clone)]
pub struct PackingSettings {
    pub enabled: bool,
    /// Upstream calls in flight per group before GETs queue for a batch.
    pub max_in_flight: usize,
    /// Items per batch, at most 50.
    pub max_items: usize,
    /// Optional wait to collect GETs into a batch; zero by default.
    pub window: Duration,
}

impl Default for PackingSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_in_flight: 4,
            max_items: MAX_ITEMS,
            window: Duration::ZERO,
        }
    }
}
