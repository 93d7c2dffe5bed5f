//! Test kit: graphcache in process on ephemeral ports, in front of the mock
//! Graph upstream, plus a small HTTP client.

#![allow(dead_code)]

pub mod faults;
pub mod mock_graph;
pub mod redis;

use std::net::SocketAddr;

use bytes::Bytes;
use graphcache::{Config, Graphcache};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[allow(unused_imports)]
pub use mock_graph::{MockGraph, Outage};

/// One answer as a client saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }
    /// True when graphcache had no entry and fetched the answer.
    pub fn is_miss(&self) -> bool {
        self.cache().fwd.as_deref() == Some("uri-miss")
    }
    /// The `Cache-Status` header, parsed (RFC 9211).
    pub fn cache(&self) -> CacheStatus {
        CacheStatus::parse(self.cache_status())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is JSON ({e}): {:?}", self.body))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One `Cache-Status` entry (RFC 9211), as graphcache writes it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheStatus {
    pub cache: String,
    pub hit: bool,
    pub fwd: Option<String>,
    pub fwd_status: Option<u16>,
    pub stored: bool,
    pub detail: Option<String>,
}

impl CacheStatus {
    pub fn parse(value: &str) -> Self {
        let mut parts = value.split(';').map(str::trim);
        let mut status = CacheStatus {
            cache: parts.next().unwrap_or("").to_owned(),
            ..CacheStatus::default()
        };
        for part in parts {
            match part.split_once('=') {
                None if part == "hit" => status.hit = true,
                None if part == "stored" => status.stored = true,
                Some(("fwd", v)) => status.fwd = Some(v.to_owned()),
                Some(("fwd-status", v)) => status.fwd_status = Some(v.parse().unwrap()),
                Some(("detail", v)) => status.detail = Some(v.to_owned()),
                _ => panic!("unexpected Cache-Status parameter {part:?} in {value:?}"),
            }
        }
        status
    }
}

/// graphcache running in front of a fresh mock.
pub struct Harness {
    pub mock: MockGraph,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The configuration it started with, and a handle to reload another.
    pub config: Config,
    pub reloader: graphcache::Reloader,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// The configuration tests start from: ephemeral ports, quiet, mock upstream.
pub fn test_config(upstream: &str) -> Config {
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.admin_listen = "127.0.0.1:0".parse().unwrap();
    config.upstream = upstream.parse().unwrap();
    config.access_log = false;
    config
}

impl Harness {
    pub async fn start() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(adjust: impl FnOnce(&mut Config)) -> Self {
        let mock = MockGraph::start().await;
        let mut config = test_config(&mock.url());
        adjust(&mut config);
        Self::start_with_mock(mock, config).await
    }

    pub async fn start_with_mock(mock: MockGraph, config: Config) -> Self {
        let started = config.clone();
        let server = Graphcache::bind(config).await.expect("graphcache binds");
        let reloader = server.reloader();
        let addr = server.local_addr();
        let admin = server.admin_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Self {
            mock,
            addr,
            admin,
            config: started,
            reloader,
            shutdown: Some(tx),
            task: Some(task),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn get(&self, target: &str) -> Reply {
        self.send(Method::GET, target, &[], "").await
    }

    pub async fn get_with(&self, target: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(Method::GET, target, headers, "").await
    }

    pub async fn send(
        &self,
        method: Method,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.addr, target));
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let response = self
            .client
            .request(request)
            .await
            .expect("graphcache answers");
        let (head, body) = response.into_parts();
        Reply {
            status: head.status,
            headers: head.headers,
            body: body.collect().await.expect("body arrives").to_bytes(),
        }
    }

    /// POSTs a form body (a write, the way the SDKs send one).
    pub async fn post_form(&self, target: &str, body: &str) -> Reply {
        let form = [("content-type", "application/x-www-form-urlencoded")];
        self.send(Method::POST, target, &form, body).await
    }

    /// POSTs a client batch the documented way: a form body with `batch`.
    pub async fn post_batch(
        &self,
        target: &str,
        items: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> Reply {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("batch", &items.to_string())
            .finish();
        let mut all = vec![("content-type", "application/x-www-form-urlencoded")];
        all.extend_from_slice(headers);
        self.send(Method::POST, target, &all, &body).await
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        let request = Request::get(format!("http://{}{}", self.admin, path))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = self.client.request(request).await.expect("admin answers");
        let (head, body) = response.into_parts();
        Reply {
            status: head.status,
            headers: head.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// The value of one sample in /metrics, e.g. `metric("x_total{cache=\"hit\"}")`.
    /// A sample that is not exported fails the test: a misspelt name must
    /// not read as zero.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.admin_get("/metrics").await.text();
        text.lines()
            .find_map(|line| {
                line.strip_prefix(sample)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("no sample {sample} in /metrics"))
    }
    /// Signals shutdown and waits for graphcache to finish draining.
    pub async fn stop(mut self) {
        self.shutdown.take().unwrap().send(()).ok();
        self.task.take().unwrap().await.unwrap();
    }

    pub fn signal_shutdown(&mut self) {
        self.shutdown.take().unwrap().send(()).ok();
    }

    pub async fn wait_stopped(&mut self) {
        self.task.take().unwrap().await.unwrap();
    }
}

/// An address nothing listens on.
pub async fn dead_address() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

/// The client benches share.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One GET for benches: asserts a 200, reads the whole body, and returns how
/// long it took.
pub async fn timed_get(client: &HttpClient, uri: &str) -> std::time::Duration {
    let started = std::time::Instant::now();
    let request = Request::get(uri)
        .header("user-agent", "bench")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    started.elapsed()
}

impl Harness {
    /// Waits until the counter sample reaches at least `min` (bounded), for
    /// work that finishes after the response (detached writes, shared calls).
    pub async fn wait_for_metric_at_least(&self, sample: &str, min: f64) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let got = self.metric(sample).await;
            if got >= min {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{sample} stayed at {got}, expected at least {min}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Waits until the metric sample reaches `value` (bounded; polls the
    /// admin endpoint, which is the signal graphcache gives).
    pub async fn wait_for_metric(&self, sample: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let got = self.metric(sample).await;
            if got == value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{sample} stayed at {got}, expected {value}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// Starts a GET in its own task, for requests that must overlap.
pub fn spawn_get(
    h: &std::sync::Arc<Harness>,
    target: &str,
    headers: &[(&str, &str)],
) -> JoinHandle<Reply> {
    let h = h.clone();
    let target = target.to_owned();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::spawn(async move {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        h.get_with(&target, &headers).await
    })
}

/// The recommended `[[route]]` rules shipped commented in
/// config/graphcache.toml, uncommented and loaded as graphcache loads a
/// config file; with the rules' text, for messages.
pub fn recommended_routes() -> (graphcache::routes::RoutePolicies, String) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("config/graphcache.toml")).unwrap();
    let (_, recommended) = text.split_once("# Recommended rules.").unwrap();
    let rules: String = recommended
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| {
            ["[[route]]", "match =", "fresh_ttl =", "cache ="]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let file = std::env::temp_dir().join(format!(
        "graphcache-recommended-{}-{:?}.toml",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&file, &rules).unwrap();
    let cli = graphcache::Cli {
        config: Some(file.clone()),
        ..graphcache::Cli::default()
    };
    let config = graphcache::Config::load(&cli, std::iter::empty());
    let _ = std::fs::remove_file(file);
    (config.expect("the recommended rules load").routes, rules)
}
