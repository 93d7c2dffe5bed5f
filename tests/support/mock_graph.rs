//! A mock Graph API upstream that behaves like the real one where graphcache
//! cares: strong quoted ETags over body and User-Agent, 304s, per-token data
//! (paging links embed the token), error envelopes, usage headers, writes that
//! change data, and injectable delays, holds and outages. It counts what it
//! receives so tests can assert what reached "Graph".
//!
//! Shared by the integration tests and `cargo run --example mock-graph`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the mock does instead of answering normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    None,
    /// Answer every request with this 5xx status and a Graph error envelope.
    Status(u16),
    /// Close the connection without answering.
    Close,
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub version: http::Version,
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A throttling error code and the extra headers sent with it.
type Throttling = (i64, Vec<(String, String)>);

/// How the mock fails a whole batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchFailure {
    None,
    /// Answer batches with this status and an error envelope.
    Status(u16),
    /// Answer 200 with a body that is not an array.
    NotArray,
    /// Answer an array one entry short.
    WrongLength,
    /// Answer with Graph's throttling error for this code.
    Throttled(i64),
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    conditional: AtomicU64,
    not_modified: AtomicU64,
    writes: AtomicU64,
    batches: AtomicU64,
    batch_items: AtomicU64,
    /// Reads answered (single GETs and batch GET items, 304s included):
    /// what Graph's meters count for reads.
    reads: AtomicU64,
}

struct State {
    /// Per-object change counter; writes bump it, so bodies and ETags change.
    versions: Mutex<HashMap<String, u64>>,
    seen: Mutex<Vec<Seen>>,
    counters: Counters,
    delay: Mutex<Duration>,
    outage: Mutex<Outage>,
    /// While true, requests whose path contains `held_path` wait.
    hold: watch::Sender<bool>,
    held_path: Mutex<Option<String>>,
    /// Notified with the running count of requests received.
    arrivals: watch::Sender<u64>,
    batch_failure: Mutex<BatchFailure>,
    /// Batch items whose relative_url contains one of these come back
    /// `null` (not executed), once each.
    null_once: Mutex<Vec<String>>,
    /// Usage headers added to every answer (name, raw value).
    usage: Mutex<Vec<(String, String)>>,
    /// While true, answers carry `x-mock-answer`, the request count.
    tag_answers: std::sync::atomic::AtomicBool,
    /// While set, reads and writes are answered with this throttling error
    /// code, plus these extra headers.
    throttling: Mutex<Option<Throttling>>,
    /// Edges with real members (`act_1/ads` → ad ids): a listing shows each
    /// member's current version, as Graph's listings show current fields.
    members: Mutex<HashMap<String, Vec<String>>>,
    /// Async jobs created by writes: id → (kind, finished).
    jobs: Mutex<HashMap<String, (JobKind, bool)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    /// `act_<id>/async_batch_requests` or `asyncadrequestsets`.
    RequestSet,
    /// A POST to `act_<id>/insights`.
    ReportRun,
}

/// Handle to a running mock Graph server.
#[derive(Clone)]
pub struct MockGraph {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl MockGraph {
    /// Starts the mock on an ephemeral loopback port.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Self {
        Self::serve(addr, None).await
    }

    /// Starts the mock behind TLS with a self-signed certificate for
    /// `localhost`, offering HTTP/2 and HTTP/1.1 by ALPN as Graph does.
    /// Returns the mock and its certificate as PEM, to trust it.
    pub async fn start_tls() -> (Self, String) {
        use tokio_rustls::rustls;
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let pem = certified.cert.pem();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        (
            Self::serve("127.0.0.1:0".parse().unwrap(), Some(acceptor)).await,
            pem,
        )
    }

    async fn serve(addr: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind(addr).await.expect("mock binds");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            versions: Mutex::default(),
            seen: Mutex::default(),
            counters: Counters::default(),
            delay: Mutex::new(Duration::ZERO),
            outage: Mutex::new(Outage::None),
            hold: watch::channel(false).0,
            held_path: Mutex::new(None),
            arrivals: watch::channel(0).0,
            batch_failure: Mutex::new(BatchFailure::None),
            null_once: Mutex::default(),
            usage: Mutex::new(vec![(
                "x-app-usage".to_owned(),
                r#"{"call_count":5,"total_cputime":1,"total_time":2}"#.to_owned(),
            )]),
            throttling: Mutex::new(None),
            tag_answers: Default::default(),
            members: Mutex::default(),
            jobs: Mutex::default(),
        });
        let serve_state = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = serve_state.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve_connection(state, TokioIo::new(stream)).await;
                            }
                        }
                        None => serve_connection(state, TokioIo::new(stream)).await,
                    }
                });
            }
        });
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received (of any kind, including ones held or failed).
    pub fn requests(&self) -> u64 {
        self.state.counters.requests.load(Ordering::SeqCst)
    }
    /// GETs that carried `If-None-Match`.
    pub fn conditional(&self) -> u64 {
        self.state.counters.conditional.load(Ordering::SeqCst)
    }
    /// 304 answers sent.
    pub fn not_modified(&self) -> u64 {
        self.state.counters.not_modified.load(Ordering::SeqCst)
    }
    /// Non-GET requests received.
    pub fn writes(&self) -> u64 {
        self.state.counters.writes.load(Ordering::SeqCst)
    }
    /// Replaces the usage headers sent with every answer.
    pub fn set_usage(&self, headers: &[(&str, &str)]) {
        *self.state.usage.lock().unwrap() = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }
    /// Answers everything with Graph's throttling error `code` and `headers`
    /// (e.g. a business-use-case header naming the time to regain access).
    pub fn throttle(&self, code: i64, headers: &[(&str, &str)]) {
        *self.state.throttling.lock().unwrap() = Some((
            code,
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
    }
    pub fn stop_throttling(&self) {
        *self.state.throttling.lock().unwrap() = None;
    }
    /// Batch POSTs received.
    pub fn batches(&self) -> u64 {
        self.state.counters.batches.load(Ordering::SeqCst)
    }
    /// Items received inside batches.
    pub fn batch_items(&self) -> u64 {
        self.state.counters.batch_items.load(Ordering::SeqCst)
    }
    pub fn set_batch_failure(&self, failure: BatchFailure) {
        *self.state.batch_failure.lock().unwrap() = failure;
    }
    /// The next batch item whose relative_url contains `part` is answered null.
    pub fn null_once(&self, part: &str) {
        self.state.null_once.lock().unwrap().push(part.to_owned());
    }
    /// The decoded form fields and items of every batch received.
    pub fn seen_batches(&self) -> Vec<(HashMap<String, String>, Vec<Value>)> {
        self.seen()
            .into_iter()
            .filter_map(|s| {
                let form: HashMap<String, String> =
                    form_urlencoded::parse(&s.body).into_owned().collect();
                let items: Vec<Value> = serde_json::from_str(form.get("batch")?).ok()?;
                Some((form, items))
            })
            .collect()
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
    pub fn last(&self) -> Seen {
        self.seen().pop().expect("the mock received a request")
    }
    /// From now on, answers carry `x-mock-answer: <request count>`.
    pub fn tag_answers(&self) {
        self.state.tag_answers.store(true, Ordering::SeqCst);
    }

    /// Reads answered (single GETs plus GET batch items, 304s included).
    pub fn reads(&self) -> u64 {
        self.state.counters.reads.load(Ordering::SeqCst)
    }

    /// Gives `edge` of `node` (`set_members("act_1", "ads", ..)`) these
    /// members; its listing then shows each one's current version.
    pub fn set_members(&self, node: &str, edge: &str, ids: &[&str]) {
        self.state.members.lock().unwrap().insert(
            format!("{}/{edge}", node.trim_start_matches("act_")),
            ids.iter().map(|id| (*id).to_owned()).collect(),
        );
    }

    /// Finishes async job `id` (a request set or a report run), as Graph
    /// does once it has worked through it.
    pub fn finish_job(&self, id: &str) {
        if let Some(job) = self.state.jobs.lock().unwrap().get_mut(id) {
            job.1 = true;
        }
    }

    /// Changes object `id` as a write would: its bodies and ETags change.
    pub fn touch(&self, id: &str) {
        *self
            .state
            .versions
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default() += 1;
    }
    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }
    pub fn set_outage(&self, outage: Outage) {
        *self.state.outage.lock().unwrap() = outage;
    }
    /// Holds requests whose path contains `path_part` until [`Self::release`].
    pub fn hold(&self, path_part: &str) {
        *self.state.held_path.lock().unwrap() = Some(path_part.to_owned());
        self.state.hold.send_replace(true);
    }
    pub fn release(&self) {
        self.state.hold.send_replace(false);
    }
    /// Waits until at least `n` requests have arrived (a signal, not a sleep).
    pub async fn wait_for_requests(&self, n: u64) {
        let mut rx = self.state.arrivals.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|&c| c >= n))
            .await
            .expect("requests arrive at the mock in time")
            .expect("mock is alive");
    }

    /// The ETag the mock gives `body` for `user_agent`.
    pub fn etag_for(body: &[u8], user_agent: &str) -> String {
        let mut h = blake3::Hasher::new();
        h.update(body);
        h.update(b"\0");
        h.update(user_agent.as_bytes());
        format!("\"{}\"", &h.finalize().to_hex()[..40])
    }
}

/// Serves one connection, HTTP/1.1 or HTTP/2.
async fn serve_connection<IO>(state: Arc<State>, io: IO)
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move {
            let response = handle(state.clone(), req).await;
            if *state.outage.lock().unwrap() == Outage::Close {
                // An error from the service makes hyper drop the connection
                // without an answer.
                return Err(std::io::Error::other("outage"));
            }
            Ok::<_, std::io::Error>(response)
        }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(io, service)
        .await;
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let seen = Seen {
        version: parts.version,
        method: parts.method.clone(),
        path: path.clone(),
        query: query.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    };
    state.seen.lock().unwrap().push(seen);
    let n = state.counters.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let is_batch = parts.method == Method::POST
        && (form_urlencoded::parse(&body).any(|(k, _)| k == "batch") || query.contains("batch="));
    // A GET with `method=post` (any value but get) is a write to Graph too.
    let overridden = form_urlencoded::parse(query.as_bytes())
        .any(|(k, v)| k == "method" && !v.eq_ignore_ascii_case("get"));
    let reads = (parts.method == Method::GET || parts.method == Method::HEAD) && !overridden;
    if !reads && !is_batch {
        state.counters.writes.fetch_add(1, Ordering::SeqCst);
    }
    state.arrivals.send_replace(n);

    let held = state.held_path.lock().unwrap().clone();
    if held.is_some_and(|p| path.contains(&p)) {
        let mut rx = state.hold.subscribe();
        let _ = rx.wait_for(|&holding| !holding).await;
    }
    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match *state.outage.lock().unwrap() {
        Outage::None => {}
        Outage::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap();
            return envelope(
                status,
                2,
                "Service temporarily unavailable",
                "OAuthException",
            );
        }
        Outage::Close => return Response::new(Full::new(Bytes::new())),
    }
    let throttling = state.throttling.lock().unwrap().clone();
    if let Some((code, headers)) = throttling {
        let is_batch_post = parts.method == Method::POST
            && form_urlencoded::parse(&body).any(|(k, _)| k == "batch");
        if !is_batch_post {
            return throttled(code, &headers);
        }
    }

    let params: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let token = params
        .get("access_token")
        .cloned()
        .or_else(|| {
            parts
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
                .map(|(_, t)| t.to_owned())
        })
        .unwrap_or_default();
    if token == "bad" {
        return envelope(
            StatusCode::BAD_REQUEST,
            190,
            "Invalid OAuth access token.",
            "OAuthException",
        );
    }
    if parts.method == Method::POST {
        let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
        if let Some(batch) = form.get("batch").or(params.get("batch")) {
            let top_token = form.get("access_token").cloned().unwrap_or(token);
            return run_batch(&state, &parts.headers, batch, &top_token);
        }
    }
    // Graph decodes percent-encoded path segments (`%35%36%30` is 560).
    let decoded: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let segments: Vec<&str> = match segments.first() {
        Some(v)
            if v.starts_with('v')
                && v[1..].chars().all(|c| c.is_ascii_digit() || c == '.')
                && v.len() > 1 =>
        {
            segments[1..].to_vec()
        }
        _ => segments,
    };
    let method_override = params.get("method").map(|m| m.to_ascii_uppercase());
    let is_write = parts.method != Method::GET && parts.method != Method::HEAD
        || method_override.is_some_and(|m| m != "GET");
    if is_write {
        return write(&state, &segments, &params, &body);
    }
    read(&state, &parts.headers, &segments, &params, &token)
}

/// Answers a batch the way Graph does: an array of `{code, headers, body}`
/// with `body` a JSON string (null for a 304), or `null` entries.
fn run_batch(
    state: &State,
    outer: &HeaderMap,
    batch: &str,
    top_token: &str,
) -> Response<Full<Bytes>> {
    state.counters.batches.fetch_add(1, Ordering::SeqCst);
    match *state.batch_failure.lock().unwrap() {
        BatchFailure::None => {}
        BatchFailure::Status(code) => {
            return envelope(
                StatusCode::from_u16(code).unwrap(),
                2,
                "Service temporarily unavailable",
                "OAuthException",
            )
        }
        BatchFailure::NotArray => {
            return json_response(
                StatusCode::OK,
                json!({"unexpected": true}),
                &HeaderMap::new(),
                "",
            )
        }
        BatchFailure::Throttled(code) => return throttled(code, &[]),
        BatchFailure::WrongLength => {
            return json_response(StatusCode::OK, json!([]), &HeaderMap::new(), "")
        }
    }
    let Ok(items) = serde_json::from_str::<Vec<Value>>(batch) else {
        return envelope(
            StatusCode::BAD_REQUEST,
            100,
            "The parameter batch must be a JSON array",
            "GraphBatchException",
        );
    };
    if items.len() > 50 {
        return envelope(
            StatusCode::BAD_REQUEST,
            1,
            "Too many requests in batch message. Maximum batch size is 50",
            "GraphBatchException",
        );
    }
    let mut replies = Vec::new();
    let mut named: HashMap<String, Value> = HashMap::new();
    let mut referenced: Vec<String> = Vec::new();
    for item in &items {
        state.counters.batch_items.fetch_add(1, Ordering::SeqCst);
        if let Some(parent) = item["depends_on"].as_str() {
            referenced.push(parent.to_owned());
        }
        let raw_url = item["relative_url"].as_str().unwrap_or("");
        let resolved_url = resolve_references(raw_url, &named, &mut referenced);
        let relative_url = resolved_url.as_str();
        {
            let mut nulls = state.null_once.lock().unwrap();
            if let Some(i) = nulls.iter().position(|p| relative_url.contains(p.as_str())) {
                nulls.remove(i);
                replies.push(Value::Null);
                continue;
            }
        }
        let (item_path, item_query) = relative_url.split_once('?').unwrap_or((relative_url, ""));
        let params: HashMap<String, String> = form_urlencoded::parse(item_query.as_bytes())
            .into_owned()
            .collect();
        // Like Graph, a GET item's token may also come from its body.
        let body_token = form_urlencoded::parse(item["body"].as_str().unwrap_or("").as_bytes())
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.into_owned());
        let token = params
            .get("access_token")
            .cloned()
            .or(body_token)
            .unwrap_or_else(|| top_token.to_owned());
        let mut headers = HeaderMap::new();
        if let Some(ua) = outer.get("user-agent") {
            headers.insert("user-agent", ua.clone());
        }
        for h in item["headers"].as_array().into_iter().flatten() {
            let (name, value) = match h {
                Value::String(line) => match line.split_once(':') {
                    Some((n, v)) => (n.trim().to_owned(), v.trim().to_owned()),
                    None => continue,
                },
                Value::Object(o) => (
                    o.get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    o.get("value")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                ),
                _ => continue,
            };
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                headers.insert(n, v);
            }
        }
        let segments: Vec<&str> = item_path
            .split('/')
            .filter(|s| !s.is_empty())
            .filter(|s| {
                !(s.starts_with('v')
                    && s.len() > 1
                    && s[1..].chars().all(|c| c.is_ascii_digit() || c == '.'))
            })
            .collect();
        let method = item["method"]
            .as_str()
            .unwrap_or("GET")
            .to_ascii_uppercase();
        let throttling = state.throttling.lock().unwrap().clone();
        let response = if let Some((code, headers)) = throttling {
            throttled(code, &headers)
        } else if token == "bad" {
            envelope(
                StatusCode::BAD_REQUEST,
                190,
                "Invalid OAuth access token.",
                "OAuthException",
            )
        } else if method == "GET" {
            read(state, &headers, &segments, &params, &token)
        } else {
            let body =
                resolve_references(item["body"].as_str().unwrap_or(""), &named, &mut referenced);
            let body = body.into_bytes();
            state.counters.writes.fetch_add(1, Ordering::SeqCst);
            let mut all = params.clone();
            all.extend(form_urlencoded::parse(&body).into_owned());
            write(state, &segments, &all, &body)
        };
        let (head, body) = response.into_parts();
        let body = full_bytes(body);
        let header_list: Vec<Value> = head
            .headers
            .iter()
            .map(|(n, v)| json!({"name": canonical(n.as_str()), "value": v.to_str().unwrap_or("")}))
            .collect();
        let body = if head.status == StatusCode::NOT_MODIFIED {
            Value::Null
        } else {
            Value::String(String::from_utf8_lossy(&body).into_owned())
        };
        if let (Some(name), Value::String(text)) = (item["name"].as_str(), &body) {
            named.insert(
                name.to_owned(),
                serde_json::from_str(text).unwrap_or(Value::Null),
            );
        }
        replies.push(json!({"code": head.status.as_u16(), "headers": header_list, "body": body}));
    }
    // A successful item another item depended on comes back null unless it
    // asked otherwise (omit_response_on_success defaults to true).
    for (item, reply) in items.iter().zip(replies.iter_mut()) {
        let is_parent = item["name"]
            .as_str()
            .is_some_and(|n| referenced.iter().any(|r| r == n));
        let keep = item["omit_response_on_success"].as_bool() == Some(false);
        if is_parent && !keep && reply["code"].as_u64().is_some_and(|c| c < 300) {
            *reply = Value::Null;
        }
    }
    let mut response = Response::new(Full::new(Bytes::from(Value::Array(replies).to_string())));
    graph_headers(response.headers_mut());
    add_usage(response.headers_mut(), state);
    response
}

/// Substitutes `{result=name:$.path}` with values from earlier named items'
/// bodies (a small JSONPath: `.key` steps and `*` over arrays, joined by ',').
fn resolve_references(
    text: &str,
    named: &HashMap<String, Value>,
    referenced: &mut Vec<String>,
) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("{result=") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 8..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let (name, path) = after[..end].split_once(':').unwrap_or((&after[..end], "$"));
        referenced.push(name.to_owned());
        let mut values = vec![named.get(name).cloned().unwrap_or(Value::Null)];
        for step in path
            .trim_start_matches('$')
            .split('.')
            .filter(|s| !s.is_empty())
        {
            values = values
                .into_iter()
                .flat_map(|v| match step {
                    "*" => v.as_array().cloned().unwrap_or_default(),
                    key => vec![v.get(key).cloned().unwrap_or(Value::Null)],
                })
                .collect();
        }
        let joined: Vec<String> = values
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect();
        out.push_str(&joined.join(","));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The bytes of a `Full` body built by this mock.
fn full_bytes(body: Full<Bytes>) -> Bytes {
    use http_body::Body;
    let mut body = std::pin::pin!(body);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match body.as_mut().poll_frame(&mut cx) {
        std::task::Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

/// Header names as Graph spells them in batch items (`ETag`, `Content-Type`).
fn canonical(name: &str) -> String {
    if name == "etag" {
        return "ETag".to_owned();
    }
    name.split('-')
        .map(|part| {
            let mut c = part.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

fn write(
    state: &State,
    segments: &[&str],
    params: &HashMap<String, String>,
    body: &[u8],
) -> Response<Full<Bytes>> {
    if segments.first() == Some(&"fail") {
        return envelope(
            StatusCode::BAD_REQUEST,
            100,
            "Invalid parameter",
            "OAuthException",
        );
    }
    let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    // Creating an async job: the reply names it.
    let kind = match (segments.first(), segments.get(1)) {
        (Some(node), Some(&"async_batch_requests" | &"asyncadrequestsets"))
            if node.starts_with("act_") =>
        {
            Some(JobKind::RequestSet)
        }
        (Some(node), Some(&"insights")) if node.starts_with("act_") => Some(JobKind::ReportRun),
        _ => None,
    };
    if let Some(kind) = kind {
        let mut jobs = state.jobs.lock().unwrap();
        let id = format!("{}", 60_000 + jobs.len());
        jobs.insert(id.clone(), (kind, false));
        let reply = match kind {
            JobKind::RequestSet => json!({"id": id}),
            JobKind::ReportRun => json!({"report_run_id": id}),
        };
        return json_response(StatusCode::OK, reply, &HeaderMap::new(), "");
    }
    let mut versions = state.versions.lock().unwrap();
    if let Some(node) = segments.first() {
        *versions
            .entry(node.trim_start_matches("act_").to_owned())
            .or_default() += 1;
    }
    for (k, v) in params.iter().chain(form.iter()) {
        if k.ends_with("_id") {
            *versions
                .entry(v.trim_start_matches("act_").to_owned())
                .or_default() += 1;
        }
    }
    json_response(
        StatusCode::OK,
        json!({"success": true, "id": format!("{}", versions.len() + 1000)}),
        &HeaderMap::new(),
        "",
    )
}

fn read(
    state: &State,
    headers: &HeaderMap,
    segments: &[&str],
    params: &HashMap<String, String>,
    token: &str,
) -> Response<Full<Bytes>> {
    state.counters.reads.fetch_add(1, Ordering::SeqCst);
    let node = segments.first().copied().unwrap_or("");
    let version = |id: &str| {
        state
            .versions
            .lock()
            .unwrap()
            .get(id.trim_start_matches("act_"))
            .copied()
            .unwrap_or(0)
    };
    let token_tag = &blake3::hash(token.as_bytes()).to_hex()[..8];
    let user_agent = headers
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut extra = HeaderMap::new();
    let job = state.jobs.lock().unwrap().get(node).copied();
    let body = match (node, segments.get(1)) {
        (node, edge) if job.is_some() => {
            let (kind, done) = job.unwrap();
            match (kind, edge.copied()) {
                (JobKind::RequestSet, None) => json!({
                    "id": node, "name": "set", "is_completed": done,
                    "total_count": 1, "success_count": if done { 1 } else { 0 },
                }),
                (JobKind::ReportRun, None) => json!({
                    "id": node,
                    "async_status": if done { "Job Completed" } else { "Job Running" },
                    "async_percent_completion": if done { 100 } else { 40 },
                }),
                (JobKind::RequestSet, Some("requests")) => json!({"data": [{
                    "id": format!("{node}1"),
                    "status": if done { "SUCCESS" } else { "IN_PROGRESS" },
                    "result": if done { json!({"id": "9001"}) } else { Value::Null },
                }]}),
                (JobKind::ReportRun, Some("insights")) if done => json!({"data": [
                    {"impressions": "1000", "spend": "12.50", "date_start": "2026-11-01"}
                ]}),
                _ => {
                    return envelope(
                        StatusCode::BAD_REQUEST,
                        2601,
                        "Report not ready",
                        "OAuthException",
                    )
                }
            }
        }
        ("missing", _) => {
            return envelope(
                StatusCode::BAD_REQUEST,
                100,
                "Unsupported get request. Object does not exist",
                "GraphMethodException",
            )
        }
        ("suppressed", _) => {
            // suppress_http_code=1 style: an error with HTTP 200.
            return json_response(
                StatusCode::OK,
                json!({"error": {"message": "(#100) bad", "type": "OAuthException", "code": 100}}),
                &HeaderMap::new(),
                user_agent,
            );
        }
        ("cookie", _) => {
            extra.insert("set-cookie", HeaderValue::from_static("datr=abc; Path=/"));
            json!({"id": "cookie"})
        }
        ("big", _) => {
            let bytes: usize = params
                .get("bytes")
                .and_then(|b| b.parse().ok())
                .unwrap_or(1024);
            json!({"id": "big", "blob": "x".repeat(bytes)})
        }
        ("varies", _) => {
            // An answer that depends on a request header and says so.
            extra.insert("vary", HeaderValue::from_static("Foo"));
            json!({"id": "varies", "foo": headers.get("foo").and_then(|v| v.to_str().ok())})
        }
        ("varyall", _) => {
            extra.insert("vary", HeaderValue::from_static("*"));
            json!({"id": "varyall"})
        }
        ("gzipped", _) => {
            extra.insert("content-encoding", HeaderValue::from_static("gzip"));
            json!({"id": "gzipped"})
        }
        ("me", None) => {
            json!({"id": format!("user-{token_tag}"), "name": format!("User {token_tag}")})
        }
        ("batchlinks", _) => json!({
            "data": [{"id": "1"}],
            "paging": {"next": format!("https://graph.facebook.com/v26.0/batchlinks?_fb_batch_child_request=1&access_token={token}")}
        }),
        ("", _) => {
            // Multi-id read: GET /?ids=a,b
            let ids = params.get("ids").cloned().unwrap_or_default();
            let mut map = serde_json::Map::new();
            for id in ids.split(',').filter(|s| !s.is_empty()) {
                map.insert(id.to_owned(), json!({"id": id, "version": version(id)}));
            }
            Value::Object(map)
        }
        (node, None) => {
            let mut object =
                json!({"id": node, "name": format!("Object {node}"), "version": version(node)});
            if let Some(fields) = params.get("fields") {
                object["fields"] = json!(fields);
            }
            object
        }
        (node, Some(edge))
            if state
                .members
                .lock()
                .unwrap()
                .contains_key(&format!("{}/{edge}", node.trim_start_matches("act_"))) =>
        {
            let members = state.members.lock().unwrap()
                [&format!("{}/{edge}", node.trim_start_matches("act_"))]
                .clone();
            let data: Vec<Value> = members
                .iter()
                .map(|id| json!({"id": id, "name": format!("Object {id}"), "version": version(id)}))
                .collect();
            json!({"data": data})
        }
        (node, Some(edge)) => {
            let limit: usize = params
                .get("limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(3);
            let data: Vec<Value> = (0..limit)
                .map(|i| json!({"id": format!("{node}_{edge}_{i}"), "version": version(node)}))
                .collect();
            // Two pages: the first links to the second, which is the last.
            if params.contains_key("after") {
                json!({"data": data, "paging": {"cursors": {"before": "QVFI"}}})
            } else {
                json!({
                    "data": data,
                    "paging": {
                        "cursors": {"after": "QVFI"},
                        "next": format!("https://graph.facebook.com/v26.0/{node}/{edge}?access_token={token}&limit={limit}&after=QVFI")
                    }
                })
            }
        }
    };
    let body_bytes = serde_json::to_vec(&body).unwrap();
    let etag = MockGraph::etag_for(&body_bytes, user_agent);
    // Which answer this is: an end-to-end header that changes every time,
    // so a 304's headers can be told from the stored ones (when asked for).
    let served = state
        .tag_answers
        .load(Ordering::SeqCst)
        .then(|| HeaderValue::from(state.counters.requests.load(Ordering::SeqCst)));
    if let Some(inm) = headers.get("if-none-match").and_then(|v| v.to_str().ok()) {
        state.counters.conditional.fetch_add(1, Ordering::SeqCst);
        if inm.split(',').any(|t| t.trim() == etag) {
            state.counters.not_modified.fetch_add(1, Ordering::SeqCst);
            // Like the documented 304: no ETag, empty body.
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            add_usage(response.headers_mut(), state);
            if let Some(served) = served {
                response.headers_mut().insert("x-mock-answer", served);
            }
            return response;
        }
    }
    extra.insert("etag", HeaderValue::from_str(&etag).unwrap());
    if let Some(served) = served {
        extra.insert("x-mock-answer", served);
    }
    // Like any origin that honours ranges: `bytes=a-b` gets a 206.
    if let Some((from, to)) = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
    {
        let to = to.min(body_bytes.len().saturating_sub(1));
        let part = Bytes::copy_from_slice(&body_bytes[from.min(to)..=to]);
        let mut response = Response::new(Full::new(part));
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let h = response.headers_mut();
        graph_headers(h);
        h.insert(
            "content-range",
            HeaderValue::from_str(&format!("bytes {from}-{to}/{}", body_bytes.len())).unwrap(),
        );
        for (k, v) in &extra {
            h.insert(k, v.clone());
        }
        return response;
    }
    let mut response = Response::new(Full::new(Bytes::from(body_bytes)));
    let h = response.headers_mut();
    graph_headers(h);
    add_usage(h, state);
    for (k, v) in &extra {
        h.insert(k, v.clone());
    }
    response
}

fn graph_headers(h: &mut HeaderMap) {
    h.insert(
        "content-type",
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    h.insert(
        "cache-control",
        HeaderValue::from_static("private, no-cache, no-store, must-revalidate"),
    );
    h.insert("pragma", HeaderValue::from_static("no-cache"));
    h.insert(
        "expires",
        HeaderValue::from_static("Sat, 01 Jan 2000 00:00:00 GMT"),
    );
    h.insert("vary", HeaderValue::from_static("Origin"));
    h.insert("facebook-api-version", HeaderValue::from_static("v26.0"));
    h.insert("x-fb-trace-id", HeaderValue::from_static("Cb+uI0bUHiQ"));
    h.insert("x-fb-debug", HeaderValue::from_static("ge7VDrk9=="));
}

fn add_usage(h: &mut HeaderMap, state: &State) {
    for (name, value) in state.usage.lock().unwrap().iter() {
        h.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
}

/// Graph's throttling answer: 403 for the app-level code 4, else 400.
fn throttled(code: i64, headers: &[(String, String)]) -> Response<Full<Bytes>> {
    let status = if code == 4 {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::BAD_REQUEST
    };
    let mut body = json!({"error": {
        "message": format!("(#{code}) There have been too many calls. Wait a bit and try again."),
        "type": "OAuthException", "code": code, "is_transient": true,
        "fbtrace_id": "AmFGcW_3hwDB7qFbl_QdebZ"}});
    // Business use-case limits carry a subcode; app and user limits do not.
    if (80_000..=80_014).contains(&code) {
        body["error"]["error_subcode"] = json!(2446079);
    }
    let mut response = json_response(status, body, &HeaderMap::new(), "");
    for (name, value) in headers {
        response.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    response
}

fn json_response(
    status: StatusCode,
    body: Value,
    extra: &HeaderMap,
    _ua: &str,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    graph_headers(response.headers_mut());
    for (k, v) in extra {
        response.headers_mut().insert(k, v.clone());
    }
    response
}

fn envelope(status: StatusCode, code: u32, message: &str, kind: &str) -> Response<Full<Bytes>> {
    let body = json!({"error": {"message": message, "type": kind, "code": code, "fbtrace_id": "AmFGcW_3hwDB7qFbl_QdebZ"}});
    let mut response = json_response(status, body, &HeaderMap::new(), "");
    response
        .headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    response.headers_mut().insert(
        "www-authenticate",
        HeaderValue::from_str(&format!(
            "OAuth \"Facebook Platform\" \"invalid_request\" \"{message}\""
        ))
        .unwrap(),
    );
    response
}
