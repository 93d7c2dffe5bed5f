//! Stage 3d: a client batch. Each standalone read item goes through the same
//! lookup as a single GET; the rest go upstream as one batch in their
//! original order; answers settle in the cache as single reads' do; writes
//! invalidate what they touched, their `{result=}` references resolved from
//! the reply; the reply has one entry per item, in request order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::uri::PathAndQuery;
use http::{Method, StatusCode};
use serde_json::{Map, Value};

use crate::cache::key::cache_key;
use crate::cache::{Secrets, Store};
use crate::client_batch::plan::{
    item_caller, item_identity, set_validator, standalone, write_scope, WriteScope,
};
use crate::client_batch::reply::{batch_reply, conditional_entry, reply_entry, rewrite_bodies};
use crate::client_batch::{ClientBatch, Item};
use crate::config::Config;
use crate::error::ProxyError;
use crate::graph::batch::ItemReply;
use crate::graph::query::QueryParams;
use crate::metrics::Outcome;
use crate::proxy::classify::BatchRequest;
use crate::proxy::lookup::{Lookup, ReadKey};
use crate::proxy::respond::{whole_answer, CacheStatus, Detail, Fwd, Handled};
use crate::proxy::settle::{job_status_of, Cacheable, Settled};
use crate::proxy::Proxy;
use crate::ratelimit::Subject;
use crate::upstream::request::{self, forward_headers, Exchange, FORM};
use crate::upstream::{full_body, Answer, BatchFailure, UpstreamError, UpstreamTimer};

/// What graphcache does with one item of a client batch.
enum Plan {
    /// Answered from the cache: the reply entry.
    Local(Value),
    /// Sent upstream; its answer settles in the cache like a single read's.
    Cacheable(Box<Cacheable>),
    /// A write: unless Graph refused it, what it touched is invalidated.
    Write,
    /// Sent upstream and relayed, nothing else.
    Pass,
}

impl Proxy {
    /// Serves a client batch; one with writes runs in its own task, so its
    /// writes settle (and invalidate) even when the client disconnects.
    pub(crate) async fn batch(
        self: &Arc<Self>,
        request: Box<BatchRequest>,
        timer: &UpstreamTimer,
    ) -> Result<Handled, ProxyError> {
        if !request.batch.items.iter().any(Item::is_write) {
            return self.serve_batch(request, timer).await;
        }
        let proxy = self.clone();
        let wait = request.config.write_slot_wait;
        let task = self
            .detached
            .spawn(wait, async move {
                let timer = UpstreamTimer::default();
                let result = proxy.serve_batch(request, &timer).await;
                (result, timer.micros())
            })
            .await?;
        let (result, upstream_us) = match task.await {
            Ok(done) => done,
            Err(_) => {
                // The task died (a panic) after its writes may have gone out.
                self.invalidate(&WriteScope::Everything).await;
                return Err(ProxyError::FlightLost);
            }
        };
        if let Some(us) = upstream_us {
            timer.add(Duration::from_micros(us));
        }
        result
    }

    async fn serve_batch(
        &self,
        request: Box<BatchRequest>,
        timer: &UpstreamTimer,
    ) -> Result<Handled, ProxyError> {
        let BatchRequest {
            head,
            config,
            mut batch,
            credentials,
            method_override,
            budget: _budget,
        } = *request;
        let outer_path = head.uri.path();
        let alone = standalone(&batch, outer_path);
        let control = crate::headers::client_cache_control(&head.headers);
        let user_agent = head
            .headers
            .get(header::USER_AGENT)
            .map_or(&b""[..], |v| v.as_bytes());
        let ticket = self.store.read_ticket().await;
        let now = Instant::now();
        let include_headers = batch.include_headers;
        let routes = &config.routes;
        let mut plans = Vec::with_capacity(batch.items.len());
        let mut subjects = Vec::with_capacity(batch.items.len());
        for (item, standalone) in batch.items.iter_mut().zip(&alone) {
            let (path, query) = item.single_target(outer_path);
            let query = QueryParams::parse(query.as_deref());
            let identity = item_identity(item, &credentials, &self.tokens);
            let caller = item_caller(item, &credentials, &self.tokens);
            subjects.push(Subject::of_request(&path, caller));
            if item.is_write() {
                plans.push(Plan::Write);
                continue;
            }
            let policy =
                self.jobs
                    .policy(&path, routes.policy_for(&path), config.async_poll_interval);
            let identity = match identity {
                Some(identity) if *standalone && !control.no_store && policy.cache => identity,
                _ => {
                    plans.push(Plan::Pass);
                    continue;
                }
            };
            let batch_credentials = credentials.as_ref().ok();
            let read = ReadKey {
                key: cache_key(&path, &query, user_agent, &identity),
                path: &path,
                query: &query,
                identity,
                headers: &head.headers,
                control,
                secrets: Secrets::of(
                    query
                        .get("access_token")
                        .or_else(|| batch_credentials.and_then(|c| c.token.as_deref())),
                    batch_credentials.and_then(|c| c.authorization.as_deref()),
                    query
                        .get("appsecret_proof")
                        .or_else(|| batch_credentials.and_then(|c| c.proof.as_deref())),
                ),
            };
            match self.lookup(&read, now).await {
                Lookup::Serve(entry, reason) => {
                    if reason == crate::proxy::respond::HitReason::Fresh {
                        self.metrics.client_batch_items.hit.inc();
                    }
                    plans.push(Plan::Local(conditional_entry(
                        item,
                        entry.etag.as_ref(),
                        entry.headers.iter(),
                        &entry.body,
                        include_headers,
                    )));
                }
                Lookup::Bypass => plans.push(Plan::Pass),
                Lookup::Refuse(error) => {
                    let envelope = Bytes::from(error.envelope());
                    plans.push(Plan::Local(reply_entry(
                        error.status().as_u16(),
                        &HeaderMap::new(),
                        Some(&envelope),
                        include_headers,
                    )));
                }
                Lookup::Fetch { entry, objects, .. } => {
                    let validator = entry
                        .as_ref()
                        .and_then(|e| e.etag.as_ref())
                        .and_then(|t| t.to_str().ok());
                    // A miss is fetched whole; the item's own conditional
                    // is answered locally from what comes back.
                    set_validator(item, validator);
                    plans.push(Plan::Cacheable(Box::new(Cacheable {
                        key: read.key,
                        policy,
                        objects,
                        ticket,
                        validated: validator.is_some(),
                        entry,
                        vary_basis: head.headers.clone(),
                        status_of: job_status_of(&path, &query),
                        secrets: read.secrets.to_owned(),
                    })));
                }
            }
        }
        let forwarded: Vec<usize> = (0..plans.len())
            .filter(|&i| !matches!(plans[i], Plan::Local(_)))
            .collect();
        let local = plans.len() - forwarded.len();
        let mut replies: Vec<Value> = Vec::with_capacity(plans.len());
        if forwarded.is_empty() {
            replies.extend(plans.into_iter().map(|plan| match plan {
                Plan::Local(entry) => entry,
                _ => unreachable!("every item was answered locally"),
            }));
            self.rewrite_item_paging(&config, &head, &mut replies);
            let status = CacheStatus::BatchHit { items: local };
            return Ok(Handled::new(
                batch_reply(&replies, None, status.header()),
                Outcome::Batch,
            ));
        }
        self.metrics
            .client_batch_items
            .forwarded
            .inc_by(forwarded.len() as u64);
        let answer = match self
            .forward_batch(&head, &batch, &forwarded, method_override, timer)
            .await
        {
            Ok(answer) => answer,
            Err(error) => {
                // The writes may have run: what they touched cannot be trusted.
                self.invalidate_writes(&batch, &plans, outer_path, &|_| None)
                    .await;
                return Err(error);
            }
        };
        let caller = credentials.as_ref().ok().map(|c| c.identity(&self.tokens));
        let sent = forwarded.iter().map(|&i| &subjects[i]);
        self.limits.observe_answer(
            answer.status,
            &answer.headers,
            &answer.body,
            &Subject::of_batch(sent, caller),
            &self.metrics,
        );
        if answer.status != StatusCode::OK {
            // The batch failed as a whole upstream: relay Graph's answer. Only
            // a 4xx says for sure that no write ran.
            if !answer.status.is_client_error() {
                self.invalidate_writes(&batch, &plans, outer_path, &|_| None)
                    .await;
            }
            let status = CacheStatus::forward(Fwd::Method, answer.status.as_u16());
            return Ok(Handled::new(whole_answer(&answer, status), Outcome::Batch));
        }
        let upstream = match crate::graph::batch::decode_reply(&answer.body, forwarded.len()) {
            Ok(upstream) => upstream,
            Err(error) => {
                self.invalidate_writes(&batch, &plans, outer_path, &|_| None)
                    .await;
                return Err(
                    UpstreamError::BatchFailed(BatchFailure::Reply(Arc::new(error))).into(),
                );
            }
        };
        let mut by_item: Vec<Option<ItemReply>> = vec![None; plans.len()];
        for (&index, reply) in forwarded.iter().zip(upstream) {
            by_item[index] = reply;
        }
        // Results visible in the reply, by item name, for `{result=}` references.
        let named: HashMap<&str, usize> = batch
            .items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| item.name.as_deref().map(|n| (n, i)))
            .collect();
        let result = |name: &str| -> Option<Value> {
            let reply = by_item[*named.get(name)?].as_ref()?;
            serde_json::from_slice(reply.body.as_deref()?).ok()
        };
        for (index, ((plan, item), subject)) in plans
            .into_iter()
            .zip(&batch.items)
            .zip(&subjects)
            .enumerate()
        {
            let reply = match plan {
                Plan::Local(entry) => entry,
                Plan::Write => {
                    let reply = by_item[index].as_ref();
                    // A null entry may have run (a successful parent is
                    // omitted by default); only a 4xx says for sure it did not.
                    if !reply.is_some_and(|r| r.status.is_client_error()) {
                        let scope = write_scope(&batch, index, outer_path, &result);
                        self.invalidate(&scope).await;
                    }
                    self.item_entry(reply, subject, include_headers)
                }
                Plan::Pass => self.item_entry(by_item[index].as_ref(), subject, include_headers),
                Plan::Cacheable(cacheable) => {
                    self.settle_item(
                        &cacheable,
                        item,
                        subject,
                        by_item[index].as_ref(),
                        include_headers,
                    )
                    .await
                }
            };
            replies.push(reply);
        }
        self.rewrite_item_paging(&config, &head, &mut replies);
        let status = CacheStatus::Forward {
            fwd: if local > 0 { Fwd::Partial } else { Fwd::Method },
            fwd_status: Some(200),
            stored: false,
            detail: Some(Detail::Cached {
                local,
                total: replies.len(),
            }),
        };
        Ok(Handled::new(
            batch_reply(&replies, Some(&answer.headers), status.header()),
            Outcome::Batch,
        ))
    }

    /// Invalidates what every write item may have touched, with `result`
    /// resolving references (nothing visible when the batch failed).
    async fn invalidate_writes(
        &self,
        batch: &ClientBatch,
        plans: &[Plan],
        outer_path: &str,
        result: &(dyn Fn(&str) -> Option<Value> + Sync),
    ) {
        for (index, _) in plans
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p, Plan::Write))
        {
            let scope = write_scope(batch, index, outer_path, result);
            self.invalidate(&scope).await;
            if scope == WriteScope::Everything {
                return;
            }
        }
    }

    /// Sends the forwarded items upstream as one batch, in their order, with
    /// the client's top-level parameters and `include_headers=true`.
    async fn forward_batch(
        &self,
        head: &http::request::Parts,
        batch: &ClientBatch,
        forwarded: &[usize],
        method_override: bool,
        timer: &UpstreamTimer,
    ) -> Result<Answer, ProxyError> {
        let items: Vec<&Map<String, Value>> =
            forwarded.iter().map(|&i| &batch.items[i].raw).collect();
        let form = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            for (name, value) in &batch.top_level {
                form.append_pair(name, value);
            }
            form.append_pair("include_headers", "true");
            form.append_pair(
                "batch",
                &serde_json::to_string(&items).expect("items serialise"),
            );
            form.finish()
        };
        let dropped: &[&str] = if method_override {
            &["batch", "include_headers", "method"]
        } else {
            &["batch", "include_headers"]
        };
        let query = crate::graph::batch::query_without(head.uri.query(), dropped);
        let target = match query {
            Some(q) => format!("{}?{q}", head.uri.path()),
            None => head.uri.path().to_owned(),
        };
        let target = PathAndQuery::try_from(target)
            .map_err(|_| ProxyError::BadRequest("the request target is malformed"))?;
        let mut headers = forward_headers(&head.headers, Exchange::Batch);
        headers.insert(header::CONTENT_TYPE, FORM);
        let upstream = request::build(
            &self.upstream,
            Method::POST,
            Some(&target),
            headers,
            full_body(Bytes::from(form)),
        );
        let answer = self.upstream.exchange(upstream, &self.metrics).await?;
        timer.add(Duration::from_micros(answer.upstream_us));
        Ok(answer)
    }

    /// An upstream entry relayed as it came (null stays null, so SDKs retry
    /// the item), its usage headers read.
    fn item_entry(
        &self,
        reply: Option<&ItemReply>,
        subject: &Subject,
        include_headers: bool,
    ) -> Value {
        let Some(reply) = reply else {
            return Value::Null;
        };
        self.observe_item(reply, subject);
        reply_entry(
            reply.status.as_u16(),
            &reply.headers,
            reply.body.as_ref(),
            include_headers,
        )
    }

    fn observe_item(&self, reply: &ItemReply, subject: &Subject) {
        let body = reply.body.as_deref().unwrap_or_default();
        self.limits
            .observe_answer(reply.status, &reply.headers, body, subject, &self.metrics);
    }

    /// Turns one upstream entry of a cacheable item into the client's entry,
    /// updating the cache as a single read would have.
    async fn settle_item(
        &self,
        cacheable: &Cacheable,
        item: &Item,
        subject: &Subject,
        reply: Option<&ItemReply>,
        include_headers: bool,
    ) -> Value {
        let Some(reply) = reply else {
            return Value::Null;
        };
        self.observe_item(reply, subject);
        let answer = Answer {
            status: reply.status,
            headers: reply.headers.clone(),
            body: reply.body.clone().unwrap_or_default(),
            upstream_us: 0,
        };
        let local = |entry: &crate::cache::CachedResponse| {
            conditional_entry(
                item,
                entry.etag.as_ref(),
                entry.headers.iter(),
                &entry.body,
                include_headers,
            )
        };
        match self.settle(cacheable, &answer).await {
            Settled::Revalidated(entry) => {
                self.metrics.client_batch_items.revalidated.inc();
                local(&entry)
            }
            Settled::Stale(entry) => local(&entry),
            Settled::Relay { .. } if answer.status == StatusCode::OK => conditional_entry(
                item,
                answer.headers.get(header::ETAG),
                &answer.headers,
                &answer.body,
                include_headers,
            ),
            Settled::Relay { .. } => reply_entry(
                reply.status.as_u16(),
                &reply.headers,
                reply.body.as_ref(),
                include_headers,
            ),
        }
    }

    /// Points paging links inside item bodies back at graphcache.
    fn rewrite_item_paging(
        &self,
        config: &Config,
        head: &http::request::Parts,
        entries: &mut [Value],
    ) {
        if !config.rewrite_paging_links {
            return;
        }
        let rewriter = &self.paging;
        let Some(origin) =
            crate::graph::paging::PagingRewriter::client_origin(&head.headers, &head.uri)
        else {
            return;
        };
        rewrite_bodies(
            entries,
            |body| rewriter.has_links(body),
            |body| rewriter.rewrite(body, &origin),
        );
    }
}
