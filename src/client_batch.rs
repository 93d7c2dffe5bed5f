//! Client batch requests (contract §2): recognise and validate a batch, answer
//! the standalone GET items the cache can, send the rest upstream as one
//! batch in their original relative order, and reassemble a reply with
//! exactly one entry per item, in request order.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode};
use serde_json::{Map, Value};

use crate::batch::{api_version, ItemReply, MAX_ITEMS};
use crate::body::ResponseBody;
use crate::cache::{CachedResponse, Freshness};
use crate::dispatch::Answer;
use crate::error::ProxyError;
use crate::handler::{cache_status, full_body, Cacheable, Handled, Protection, Proxy, Settled};
use crate::headers::{
    client_cache_control, if_none_match_matches, is_media_type, strip_hop_by_hop,
};
use crate::key::{authorization_credential, cache_key, QueryParams};
use crate::metrics::Outcome;
use crate::ratelimit::Subject;
use crate::routes::{objects_of, ObjectId};
use crate::upstream::UpstreamTimer;

/// A client batch, parsed and validated.
#[derive(Debug)]
pub struct ClientBatch {
    pub items: Vec<Item>,
    /// Top-level parameters from the body, except `batch` and
    /// `include_headers` (the query string is forwarded as sent).
    pub top_level: Vec<(String, String)>,
    /// The client's `include_headers` (default true).
    pub include_headers: bool,
}

/// One request object of a client batch.
#[derive(Debug)]
pub struct Item {
    /// The object as the client sent it, forwarded unchanged (but for an
    /// added `If-None-Match` when graphcache revalidates).
    pub raw: Map<String, Value>,
    pub method: String,
    pub relative_url: String,
    /// Item headers as (name, value), from either accepted form.
    pub headers: Vec<(String, String)>,
    pub name: Option<String>,
    pub depends_on: Option<String>,
    pub has_files: bool,
    pub body: Option<String>,
}

/// Why a client batch is refused before anything is forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchInputError {
    #[error("the batch parameter is not valid JSON: {0}")]
    Json(String),
    #[error("the batch parameter must be a JSON array of request objects")]
    NotArray,
    #[error("batch item {0} is not an object")]
    NotObject(usize),
    #[error("batch item {0} has no method")]
    NoMethod(usize),
    #[error("batch item {0} has no relative_url")]
    NoRelativeUrl(usize),
    #[error("batch item {0} has a malformed header")]
    BadHeader(usize),
    #[error("Too many requests in batch message. Maximum batch size is 50")]
    TooMany,
}

/// The `batch` parameter and the other top-level parameters of a POST, if it
/// is a batch: from the query string, a form body, or a JSON body (`batch` as
/// an array or as a string). None when the request carries no `batch`.
pub fn parse(
    query: &QueryParams<'_>,
    content_type: Option<&HeaderValue>,
    body: &[u8],
) -> Result<Option<ClientBatch>, BatchInputError> {
    let is_json = is_media_type(content_type, "application/json");
    let mut top_level = Vec::new();
    let mut batch: Option<Value> = None;
    let mut include_headers = None;
    if is_json {
        // A JSON body that is not an object carries no parameters: such a
        // POST is a batch only if its query string says so.
        let object = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(object)) => object,
            _ => Map::new(),
        };
        for (name, value) in object {
            match name.as_str() {
                "batch" => batch = Some(value),
                "include_headers" => include_headers = Some(flag(&scalar(&value))),
                _ => top_level.push((name, scalar(&value))),
            }
        }
    } else {
        for (name, value) in form_urlencoded::parse(body) {
            match name.as_ref() {
                "batch" => batch = Some(Value::String(value.into_owned())),
                "include_headers" => include_headers = Some(flag(&value)),
                _ => top_level.push((name.into_owned(), value.into_owned())),
            }
        }
    }
    if batch.is_none() {
        batch = query.get("batch").map(|b| Value::String(b.to_owned()));
    }
    if include_headers.is_none() {
        include_headers = query.get("include_headers").map(flag);
    }
    let Some(batch) = batch else { return Ok(None) };
    let batch = match batch {
        Value::String(text) => {
            serde_json::from_str(&text).map_err(|e| BatchInputError::Json(e.to_string()))?
        }
        other => other,
    };
    let Value::Array(values) = batch else {
        return Err(BatchInputError::NotArray);
    };
    if values.len() > MAX_ITEMS {
        return Err(BatchInputError::TooMany);
    }
    let items = values
        .into_iter()
        .enumerate()
        .map(|(i, v)| item(i, v))
        .collect::<Result<_, _>>()?;
    Ok(Some(ClientBatch {
        items,
        top_level,
        include_headers: include_headers.unwrap_or(true),
    }))
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn flag(value: &str) -> bool {
    !matches!(value.trim().to_ascii_lowercase().as_str(), "false" | "0")
}

fn item(index: usize, value: Value) -> Result<Item, BatchInputError> {
    let Value::Object(raw) = value else {
        return Err(BatchInputError::NotObject(index));
    };
    let method = raw
        .get("method")
        .and_then(Value::as_str)
        .filter(|m| !m.trim().is_empty())
        .ok_or(BatchInputError::NoMethod(index))?
        .trim()
        .to_ascii_uppercase();
    let relative_url = raw
        .get("relative_url")
        .and_then(Value::as_str)
        .ok_or(BatchInputError::NoRelativeUrl(index))?
        .to_owned();
    let mut headers = Vec::new();
    for header in raw
        .get("headers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (name, value) = match header {
            Value::String(line) => {
                let (n, v) = line
                    .split_once(':')
                    .ok_or(BatchInputError::BadHeader(index))?;
                (n.trim().to_owned(), v.trim().to_owned())
            }
            Value::Object(o) => (
                o.get("name")
                    .and_then(Value::as_str)
                    .ok_or(BatchInputError::BadHeader(index))?
                    .to_owned(),
                o.get("value")
                    .and_then(Value::as_str)
                    .ok_or(BatchInputError::BadHeader(index))?
                    .to_owned(),
            ),
            _ => return Err(BatchInputError::BadHeader(index)),
        };
        // CR/LF (or any control) would split the header upstream.
        if HeaderName::from_bytes(name.as_bytes()).is_err()
            || HeaderValue::from_str(&value).is_err()
        {
            return Err(BatchInputError::BadHeader(index));
        }
        headers.push((name, value));
    }
    let text = |key: &str| raw.get(key).and_then(Value::as_str).map(str::to_owned);
    Ok(Item {
        method,
        name: text("name"),
        depends_on: text("depends_on"),
        body: text("body"),
        has_files: raw.contains_key("attached_files") || raw.contains_key("attachedFiles"),
        relative_url,
        headers,
        raw,
    })
}

impl Item {
    /// The path and query the same request would have as a single call, with
    /// the batch's version applied when the item names none.
    pub fn single_target(&self, outer_path: &str) -> (String, Option<String>) {
        let url = self.relative_url.trim_start_matches('/');
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (url, None),
        };
        let path = if api_version(&format!("/{path}")).is_some() {
            format!("/{path}")
        } else {
            match api_version(outer_path) {
                Some(version) => format!("/{version}/{path}"),
                None => format!("/{path}"),
            }
        };
        (path, query)
    }

    /// The item's own `If-None-Match`, if it sent one.
    pub fn if_none_match(&self) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("if-none-match"))
            .map(|(_, v)| v.as_str())
    }

    /// The objects a write item touches: its node and the ids in its
    /// parameters (relative_url query and form body).
    pub fn objects(&self, outer_path: &str) -> Vec<ObjectId> {
        let (path, query) = self.single_target(outer_path);
        let query = QueryParams::parse(query.as_deref());
        let body: Vec<(String, String)> = self
            .body
            .as_deref()
            .map(|b| form_urlencoded::parse(b.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        objects_of(
            &path,
            query
                .iter()
                .chain(body.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        )
    }

    pub fn is_write(&self) -> bool {
        if self.method != "GET" && self.method != "HEAD" {
            return true;
        }
        let (_, query) = self.single_target("/");
        QueryParams::parse(query.as_deref()).overrides_to_write()
    }
}

/// Which items graphcache may answer from its cache: GETs that stand alone
/// (not named by a dependency or a `{result=}` reference, no `depends_on`,
/// no reference of their own, no files, no JSONP) and that read no object a
/// write in the same batch touches.
pub fn standalone(batch: &ClientBatch, outer_path: &str) -> Vec<bool> {
    let referenced: HashSet<&str> = batch
        .items
        .iter()
        .flat_map(|item| {
            let mut names: Vec<&str> = item.depends_on.as_deref().into_iter().collect();
            for text in [Some(item.relative_url.as_str()), item.body.as_deref()]
                .into_iter()
                .flatten()
            {
                names.extend(result_references(text));
            }
            names
        })
        .collect();
    let written: HashSet<ObjectId> = batch
        .items
        .iter()
        .filter(|i| i.is_write())
        .flat_map(|i| i.objects(outer_path))
        .collect();
    batch
        .items
        .iter()
        .map(|item| {
            let (path, query) = item.single_target(outer_path);
            let query = QueryParams::parse(query.as_deref());
            item.method == "GET"
                && !item.is_write()
                && item.depends_on.is_none()
                && !item.has_files
                && !item.relative_url.contains("{result=")
                && !query.contains("callback")
                && !item.name.as_deref().is_some_and(|n| referenced.contains(n))
                && !objects_of(&path, query.iter())
                    .iter()
                    .any(|o| written.contains(o))
        })
        .collect()
}

/// Names referenced as `{result=<name>:<jsonpath>}` in `text`.
fn result_references(text: &str) -> impl Iterator<Item = &str> {
    text.match_indices("{result=")
        .filter_map(move |(at, marker)| {
            let rest = &text[at + marker.len()..];
            let end = rest.find([':', '}'])?;
            Some(&rest[..end])
        })
}

/// One entry of the reply: `{code, headers, body}`; `headers` left out when
/// the client asked `include_headers=false`.
pub fn reply_entry(
    code: u16,
    headers: &HeaderMap,
    body: Option<&Bytes>,
    include_headers: bool,
) -> Value {
    let mut entry = Map::new();
    entry.insert("code".into(), Value::from(code));
    if include_headers {
        let list: Vec<Value> = headers
            .iter()
            .map(|(n, v)| {
                serde_json::json!({"name": graph_header_name(n.as_str()), "value": String::from_utf8_lossy(v.as_bytes())})
            })
            .collect();
        entry.insert("headers".into(), Value::Array(list));
    }
    entry.insert(
        "body".into(),
        match body {
            Some(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
            None => Value::Null,
        },
    );
    Value::Object(entry)
}

/// Header names as Graph spells them in batch items (`ETag`, `Content-Type`).
fn graph_header_name(name: &str) -> String {
    if name == "etag" {
        return "ETag".to_owned();
    }
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

// === the request stage ===

/// What graphcache does with one item of a client batch.
enum Plan {
    /// Answered from the cache: the reply entry.
    Local(Value),
    /// Sent upstream; its answer settles in the cache like a single read's.
    Cacheable(Cacheable),
    /// A write: on success its objects are invalidated.
    Write(Vec<ObjectId>),
    /// Sent upstream and relayed, nothing else.
    Pass,
}

impl Proxy {
    /// Serves a client batch: cached items locally, the rest upstream as one
    /// batch, the reply reassembled in request order.
    pub(crate) async fn client_batch(
        self: &Arc<Self>,
        parts: &Parts,
        params: &QueryParams<'_>,
        mut batch: ClientBatch,
        timer: &UpstreamTimer,
    ) -> Result<Handled, ProxyError> {
        let outer_path = parts.uri.path();
        let standalone = standalone(&batch, outer_path);
        let control = client_cache_control(&parts.headers);
        let body_token = batch
            .top_level
            .iter()
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.as_str());
        let top_token = params.get("access_token").or(body_token).map(str::to_owned);
        // Two different tokens for one batch: which one Graph uses is not
        // ours to guess, so nothing of this batch touches the cache.
        let ambiguous_token = params.count("access_token") > 1
            || matches!((params.get("access_token"), body_token), (Some(q), Some(b)) if q != b);
        let header_token = authorization_credential(&parts.headers);
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .map_or(&b""[..], HeaderValue::as_bytes);
        let ticket = self.store.read_ticket();
        let now = Instant::now();
        let mut plans = Vec::with_capacity(batch.items.len());
        let mut subjects = Vec::with_capacity(batch.items.len());
        for (item, standalone) in batch.items.iter_mut().zip(&standalone) {
            let (path, query) = item.single_target(outer_path);
            let query = QueryParams::parse(query.as_deref());
            let token = query.get("access_token").or(top_token.as_deref());
            let identity = self.tokens.identify(token, header_token.as_deref());
            subjects.push(Subject::of_request(&path, Some(identity)));
            if item.is_write() {
                plans.push(Plan::Write(item.objects(outer_path)));
                continue;
            }
            let policy = self.config.routes.policy_for(&path);
            if !standalone
                || control.no_store
                || ambiguous_token
                || query.count("access_token") > 1
                || !policy.cache
            {
                plans.push(Plan::Pass);
                continue;
            }
            let key = cache_key(&path, &query, user_agent, &identity);
            let objects: Arc<[ObjectId]> = objects_of(&path, query.iter()).into();
            let entry = self.store.get(&key).await;
            if let Some(entry) = &entry {
                if !control.no_cache && entry.freshness(now) == Freshness::Fresh {
                    self.metrics.client_batch_items.hit.inc();
                    self.metrics.usage.avoided.fresh_hit.inc();
                    plans.push(Plan::Local(local_entry(item, entry, batch.include_headers)));
                    continue;
                }
            }
            match self.protection(entry.as_deref(), &objects, identity, control.no_cache, now) {
                Protection::Forward => {}
                Protection::Serve(..) => {
                    let entry = entry
                        .as_deref()
                        .expect("protection serves only a stored entry");
                    plans.push(Plan::Local(local_entry(item, entry, batch.include_headers)));
                    continue;
                }
                Protection::Refuse(error) => {
                    let envelope = Bytes::from(error.envelope());
                    plans.push(Plan::Local(reply_entry(
                        error.status().as_u16(),
                        &HeaderMap::new(),
                        Some(&envelope),
                        batch.include_headers,
                    )));
                    continue;
                }
            }
            let validator = entry
                .as_ref()
                .and_then(|e| e.etag.as_ref())
                .and_then(|t| t.to_str().ok());
            if let Some(tag) = validator {
                set_if_none_match(item, tag);
            }
            plans.push(Plan::Cacheable(Cacheable {
                key,
                policy,
                objects,
                ticket,
                validated: validator.is_some(),
                entry,
            }));
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
            let status = cache_status_hit(local);
            return Ok(Handled::new(
                batch_reply(&replies, None, status),
                Outcome::Batch,
            ));
        }
        self.metrics
            .client_batch_items
            .forwarded
            .inc_by(forwarded.len() as u64);
        let writes: Vec<ObjectId> = plans
            .iter()
            .filter_map(|p| match p {
                Plan::Write(objects) => Some(objects.iter().cloned()),
                _ => None,
            })
            .flatten()
            .collect();
        let answer = match self.forward_batch(parts, &batch, &forwarded, timer).await {
            Ok(answer) => answer,
            Err(error) => {
                // The writes may have run: their objects cannot be trusted.
                self.invalidate(&writes).await;
                return Err(error);
            }
        };
        let caller = self
            .tokens
            .identify(top_token.as_deref(), header_token.as_deref());
        let sent = forwarded.iter().map(|&i| &subjects[i]);
        self.observe(&answer, &Subject::of_batch(sent, Some(caller)));
        if answer.status != StatusCode::OK {
            // The batch failed as a whole upstream: relay Graph's answer. Only
            // a 4xx says for sure that no write ran.
            if !answer.status.is_client_error() {
                self.invalidate(&writes).await;
            }
            let status = cache_status("method", Some(answer.status.as_u16()), false, None);
            return Ok(Handled::new(
                answer_to_client(&answer, status),
                Outcome::Batch,
            ));
        }
        let upstream = match crate::batch::decode_reply(&answer.body, forwarded.len()) {
            Ok(upstream) => upstream,
            Err(error) => {
                self.invalidate(&writes).await;
                return Err(ProxyError::BatchFailed(error.to_string()));
            }
        };
        let mut upstream = upstream.into_iter();
        for ((plan, item), subject) in plans.into_iter().zip(&batch.items).zip(&subjects) {
            let reply = match plan {
                Plan::Local(entry) => entry,
                plan => {
                    let reply = upstream
                        .next()
                        .expect("one upstream entry per forwarded item");
                    self.settle_item(plan, item, subject, reply, batch.include_headers)
                        .await
                }
            };
            replies.push(reply);
        }
        let fwd = if local > 0 { "partial" } else { "method" };
        let detail = format!("cached-{local}-of-{}", replies.len());
        let status = cache_status(fwd, Some(200), false, Some(&detail));
        Ok(Handled::new(
            batch_reply(&replies, Some(&answer.headers), status),
            Outcome::Batch,
        ))
    }

    /// Sends the forwarded items upstream as one batch, in their order, with
    /// the client's top-level parameters and `include_headers=true`.
    async fn forward_batch(
        &self,
        parts: &Parts,
        batch: &ClientBatch,
        forwarded: &[usize],
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
        let query = crate::batch::query_without(parts.uri.query(), &["batch", "include_headers"]);
        let target = match query {
            Some(q) => format!("{}?{q}", parts.uri.path()),
            None => parts.uri.path().to_owned(),
        };
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        for name in [
            header::ACCEPT_ENCODING,
            header::CONTENT_LENGTH,
            header::CACHE_CONTROL,
            header::PRAGMA,
        ] {
            headers.remove(name);
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        let mut request = Request::new(full_body(Bytes::from(form)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self
            .upstream
            .uri_for(Some(&PathAndQuery::try_from(target).map_err(|_| {
                ProxyError::BadRequest("the request target is malformed")
            })?));
        *request.headers_mut() = headers;
        let answer = self.exchange(request).await?;
        timer.add(std::time::Duration::from_micros(answer.upstream_us));
        Ok(answer)
    }

    /// Turns one upstream entry into the client's entry, updating the cache
    /// as a single request would have.
    async fn settle_item(
        &self,
        plan: Plan,
        item: &Item,
        subject: &Subject,
        reply: Option<ItemReply>,
        include_headers: bool,
    ) -> Value {
        // A null entry stays null, so SDKs retry the item. A write that comes
        // back null may have run (a successful parent is omitted by default):
        // invalidate as if it succeeded.
        let Some(reply) = reply else {
            if let Plan::Write(objects) = &plan {
                self.invalidate(objects).await;
            }
            return Value::Null;
        };
        let body = reply.body.as_deref().unwrap_or_default();
        self.limits
            .observe_answer(reply.status, &reply.headers, body, subject, &self.metrics);
        let as_is = |r: &ItemReply| {
            reply_entry(
                r.status.as_u16(),
                &r.headers,
                r.body.as_ref(),
                include_headers,
            )
        };
        match plan {
            Plan::Local(entry) => entry,
            Plan::Pass => as_is(&reply),
            Plan::Write(objects) => {
                // Only a 4xx says for sure the write did not run.
                if !reply.status.is_client_error() {
                    self.invalidate(&objects).await;
                }
                as_is(&reply)
            }
            Plan::Cacheable(cacheable) => {
                let answer = Answer {
                    status: reply.status,
                    headers: reply.headers.clone(),
                    body: reply.body.clone().unwrap_or_default(),
                    upstream_us: 0,
                };
                match self.settle(&cacheable, &answer).await {
                    Settled::Revalidated(entry) => {
                        self.metrics.client_batch_items.revalidated.inc();
                        local_entry(item, &entry, include_headers)
                    }
                    Settled::Stale(entry) => local_entry(item, &entry, include_headers),
                    Settled::Relay { .. } => as_is(&reply),
                }
            }
        }
    }
}

/// A cached answer as a batch entry: 304 with no body when the item sent its
/// own matching `If-None-Match`, else 200 with the stored body.
fn local_entry(item: &Item, entry: &CachedResponse, include_headers: bool) -> Value {
    let matches = match (item.if_none_match(), &entry.etag) {
        (Some(theirs), Some(ours)) => {
            let mut asked = HeaderMap::new();
            match HeaderValue::from_str(theirs) {
                Ok(v) => {
                    asked.insert(header::IF_NONE_MATCH, v);
                    if_none_match_matches(&asked, ours)
                }
                Err(_) => false,
            }
        }
        _ => false,
    };
    if matches {
        reply_entry(304, &entry.headers, None, include_headers)
    } else {
        reply_entry(200, &entry.headers, Some(&entry.body), include_headers)
    }
}

/// Replaces the item's own `If-None-Match` with graphcache's validator, in
/// the documented `"Name: value"` form.
fn set_if_none_match(item: &mut Item, tag: &str) {
    let mut headers: Vec<Value> = item
        .raw
        .get("headers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|h| {
            let name = match h {
                Value::String(line) => line.split(':').next().unwrap_or(""),
                Value::Object(o) => o.get("name").and_then(Value::as_str).unwrap_or(""),
                _ => "",
            };
            !name.trim().eq_ignore_ascii_case("if-none-match")
        })
        .collect();
    headers.push(Value::String(format!("If-None-Match: {tag}")));
    item.raw.insert("headers".into(), Value::Array(headers));
}

fn cache_status_hit(items: usize) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "graphcache; hit; detail=cached-{items}-of-{items}"
    ))
    .expect("ASCII")
}

/// The reply array, with Graph's headers from the upstream batch when there
/// was one.
fn batch_reply(
    entries: &[Value],
    upstream: Option<&HeaderMap>,
    cache_status: HeaderValue,
) -> Response<ResponseBody> {
    let body = Bytes::from(serde_json::to_vec(entries).expect("reply serialises"));
    let mut response = Response::new(ResponseBody::full(body));
    let headers = response.headers_mut();
    if let Some(upstream) = upstream {
        headers.extend(upstream.iter().map(|(n, v)| (n.clone(), v.clone())));
        headers.remove(header::CONTENT_LENGTH);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static(
            "private, no-cache, no-store, must-revalidate",
        ));
    headers.insert("cache-status", cache_status);
    response
}

fn answer_to_client(answer: &Answer, cache_status: HeaderValue) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(answer.body.clone()));
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    headers.extend(answer.headers.iter().map(|(n, v)| (n.clone(), v.clone())));
    headers.remove(header::CONTENT_LENGTH);
    headers.insert("cache-status", cache_status);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_form(body: &str) -> Result<Option<ClientBatch>, BatchInputError> {
        parse(&QueryParams::parse(None), None, body.as_bytes())
    }

    #[test]
    fn python_sdk_form_batch() {
        let batch = r#"[{"method":"GET","relative_url":"111/?fields=name"},{"method":"GET","relative_url":"222/?fields=name","headers":[{"name":"If-None-Match","value":"\"x\""}]}]"#;
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("batch", batch)
            .finish();
        let parsed = parse_form(&body).unwrap().unwrap();
        assert_eq!(parsed.items.len(), 2);
        assert!(parsed.include_headers);
        assert_eq!(
            parsed.items[0].single_target("/v26.0/"),
            ("/v26.0/111/".into(), Some("fields=name".into()))
        );
        assert_eq!(parsed.items[1].if_none_match(), Some("\"x\""));
    }

    #[test]
    fn node_sdk_json_batch_and_string_batch() {
        let json = br#"{"batch":[{"method":"GET","relative_url":"111?fields=name,status"}],"include_headers":false}"#;
        let ct = HeaderValue::from_static("application/json");
        let parsed = parse(&QueryParams::parse(Some("access_token=t")), Some(&ct), json)
            .unwrap()
            .unwrap();
        assert!(!parsed.include_headers);
        assert_eq!(
            parsed.items[0].single_target("/v24.0"),
            ("/v24.0/111".into(), Some("fields=name,status".into()))
        );
        let json = br#"{"batch":"[{\"method\":\"get\",\"relative_url\":\"/v25.0/me\"}]","access_token":"t"}"#;
        let parsed = parse(&QueryParams::parse(None), Some(&ct), json)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.items[0].method, "GET");
        assert_eq!(
            parsed.items[0].single_target("/"),
            ("/v25.0/me".into(), None)
        );
        assert_eq!(
            parsed.top_level,
            [("access_token".to_owned(), "t".to_owned())]
        );
    }

    #[test]
    fn query_string_batch_and_bare_query_items() {
        let q = QueryParams::parse(Some("batch=%5B%7B%22method%22%3A%22GET%22%2C%22relative_url%22%3A%22%3Fids%3D1%2C2%22%7D%5D"));
        let parsed = parse(&q, None, b"").unwrap().unwrap();
        assert_eq!(
            parsed.items[0].single_target("/v26.0"),
            ("/v26.0/".into(), Some("ids=1,2".into()))
        );
        assert!(parse(&QueryParams::parse(Some("a=1")), None, b"x=1")
            .unwrap()
            .is_none());
    }

    #[test]
    fn malformed_batches_are_refused() {
        assert!(matches!(
            parse_form("batch=%5Bnot"),
            Err(BatchInputError::Json(_))
        ));
        assert_eq!(
            parse_form("batch=%7B%7D").unwrap_err(),
            BatchInputError::NotArray
        );
        assert_eq!(
            parse_form("batch=%5B1%5D").unwrap_err(),
            BatchInputError::NotObject(0)
        );
        assert_eq!(
            parse_form(r#"batch=[{"relative_url":"me"}]"#).unwrap_err(),
            BatchInputError::NoMethod(0)
        );
        assert_eq!(
            parse_form(r#"batch=[{"method":"GET"}]"#).unwrap_err(),
            BatchInputError::NoRelativeUrl(0)
        );
        let crlf = form_urlencoded::Serializer::new(String::new())
            .append_pair(
                "batch",
                r#"[{"method":"GET","relative_url":"me","headers":["X-A: 1\r\nX-B: 2"]}]"#,
            )
            .finish();
        assert_eq!(
            parse_form(&crlf).unwrap_err(),
            BatchInputError::BadHeader(0)
        );
        let many: Vec<String> = (0..51)
            .map(|i| format!(r#"{{"method":"GET","relative_url":"{i}"}}"#))
            .collect();
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("batch", &format!("[{}]", many.join(",")))
            .finish();
        assert_eq!(parse_form(&body).unwrap_err(), BatchInputError::TooMany);
    }

    #[test]
    fn dependencies_references_writes_and_files_are_not_standalone() {
        let batch = r#"[
            {"method":"POST","relative_url":"act_1/adcreatives","name":"create_creative","body":"name=x"},
            {"method":"POST","relative_url":"act_1/ads","body":"creative={\"creative_id\":\"{result=create_creative:$.id}\"}"},
            {"method":"GET","relative_url":"act_1/campaigns"},
            {"method":"GET","relative_url":"555","name":"unreferenced"},
            {"method":"GET","relative_url":"556","depends_on":"unreferenced"},
            {"method":"GET","relative_url":"?ids={result=get-friends:$.data.*.id}"},
            {"method":"GET","relative_url":"557","name":"get-friends"},
            {"method":"GET","relative_url":"558?callback=x"},
            {"method":"GET","relative_url":"559","attached_files":"file1"},
            {"method":"POST","relative_url":"560?adset_id=561","body":"x=1"},
            {"method":"GET","relative_url":"561/ads"}
        ]"#;
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("batch", batch)
            .finish();
        let parsed = parse_form(&body).unwrap().unwrap();
        let alone = standalone(&parsed, "/v26.0/");
        assert_eq!(
            alone,
            [false, false, false, false, false, false, false, false, false, false, false]
        );
        let reads = r#"[{"method":"GET","relative_url":"1"},{"method":"GET","relative_url":"2","name":"n"}]"#;
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("batch", reads)
            .finish();
        assert_eq!(
            standalone(&parse_form(&body).unwrap().unwrap(), "/v26.0/"),
            [true, true]
        );
    }

    #[test]
    fn reply_entries_honour_include_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("etag", HeaderValue::from_static("\"e\""));
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        let body = Bytes::from_static(b"{\"id\":\"1\"}");
        let entry = reply_entry(200, &headers, Some(&body), true);
        assert_eq!(entry["code"], 200);
        assert_eq!(entry["headers"][0]["name"], "ETag");
        assert_eq!(entry["headers"][1]["name"], "Content-Type");
        assert_eq!(entry["body"], "{\"id\":\"1\"}");
        let bare = reply_entry(304, &headers, None, false);
        assert!(bare.get("headers").is_none());
        assert!(bare["body"].is_null());
    }
}
