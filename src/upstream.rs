//! The upstream client: one pooled hyper-util client over rustls (HTTP/2 by
//! ALPN), speaking only to the configured upstream.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Config;
use crate::error::ProxyError;
use crate::metrics::Metrics;

/// Boxed error for request bodies of any origin.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body of a request sent upstream.
pub type UpstreamBody = BoxBody<Bytes, BoxError>;

/// Time one client request spent waiting on upstream response heads, for
/// the access log. Atomic only because request futures must be `Send`.
#[derive(Debug, Default)]
pub struct UpstreamTimer {
    micros: std::sync::atomic::AtomicU64,
    used: std::sync::atomic::AtomicBool,
}

impl UpstreamTimer {
    pub fn add(&self, elapsed: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.micros.fetch_add(elapsed.as_micros() as u64, Relaxed);
        self.used.store(true, Relaxed);
    }

    /// Total upstream time in microseconds, or None if nothing went upstream.
    pub fn micros(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        self.used.load(Relaxed).then(|| self.micros.load(Relaxed))
    }
}

/// WebPKI roots plus any configured `upstream_ca_file` certificates (checked
/// when the configuration was loaded).
fn root_store(config: &Config) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let (added, ignored) = roots.add_parsable_certificates(config.upstream_ca.iter().cloned());
    if ignored > 0 {
        tracing::warn!(
            added,
            ignored,
            "some upstream_ca_file certificates are not usable as roots"
        );
    }
    roots
}

/// The configured upstream and a pooled client for it.
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
    scheme: Scheme,
    authority: Authority,
    /// `Host` for every upstream request, rendered once.
    host: HeaderValue,
    /// Deadline for a whole upstream exchange (head and collected body).
    pub timeout: Duration,
}

impl Upstream {
    pub fn new(config: &Config) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(root_store(config))
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        let authority = config
            .upstream
            .authority()
            .expect("validated upstream has an authority")
            .clone();
        Self {
            client,
            scheme: config.upstream.scheme().cloned().unwrap_or(Scheme::HTTPS),
            host: HeaderValue::from_str(authority.as_str()).expect("authority is a valid header"),
            authority,
            timeout: config.upstream_timeout,
        }
    }

    /// True when `host` names the upstream (for absolute-form targets).
    pub fn is_upstream_host(&self, authority: &Authority) -> bool {
        authority.host().eq_ignore_ascii_case(self.authority.host())
    }

    /// The upstream URI for a client's path and query.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(
                path_and_query
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            )
            .build()
            .expect("scheme, authority and path form a URI")
    }

    /// Sends `request` (its URI already from [`Self::uri_for`]) and waits for
    /// the response head, within the timeout. Never retries: a write must
    /// reach the upstream at most once.
    pub async fn send(
        &self,
        mut request: Request<UpstreamBody>,
        metrics: &Metrics,
        timer: &UpstreamTimer,
    ) -> Result<Response<Incoming>, ProxyError> {
        request.headers_mut().insert(HOST, self.host.clone());
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.client.request(request)).await;
        let elapsed = started.elapsed();
        timer.add(elapsed);
        let elapsed = elapsed.as_secs_f64();
        match result {
            Ok(Ok(response)) => {
                metrics.observe_upstream(Some(response.status()), elapsed);
                Ok(response)
            }
            Ok(Err(e)) => {
                metrics.observe_upstream(None, elapsed);
                Err(ProxyError::UpstreamUnreachable(std::sync::Arc::new(e)))
            }
            Err(_) => {
                metrics.observe_upstream(None, elapsed);
                Err(ProxyError::UpstreamTimeout(self.timeout))
            }
        }
    }
}
