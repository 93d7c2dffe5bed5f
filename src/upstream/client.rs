//! The upstream client: one pooled hyper-util client over rustls (HTTP/2 by
//! ALPN), speaking only to the configured upstream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::RelayGuard;
use crate::body::{collect_up_to, Collected};
use crate::config::Config;
use crate::headers::strip_hop_by_hop;
use crate::metrics::Metrics;
use crate::upstream::{Answer, UpstreamBody, UpstreamError, UpstreamTimer};

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
    /// Largest answer collected whole (`max_body_bytes`).
    pub max_body: usize,
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
            max_body: config.max_body_bytes,
        }
    }

    /// True when an absolute-form target names the upstream itself: the same
    /// host and the same port (explicit, or the default of each scheme).
    pub fn is_upstream_target(&self, target: &Uri) -> bool {
        let Some(authority) = target.authority() else {
            return true;
        };
        let port = |authority: &Authority, scheme: Option<&str>| {
            authority.port_u16().unwrap_or(match scheme {
                Some(s) if s.eq_ignore_ascii_case("http") => 80,
                _ => 443,
            })
        };
        authority.host().eq_ignore_ascii_case(self.authority.host())
            && port(authority, target.scheme_str())
                == port(&self.authority, Some(self.scheme.as_str()))
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
    /// reach the upstream at most once. The guard carries the exchange's
    /// deadline and in-flight count to whoever reads the body.
    pub async fn send(
        &self,
        mut request: Request<UpstreamBody>,
        metrics: &Metrics,
        timer: &UpstreamTimer,
    ) -> Result<(Response<Incoming>, RelayGuard), UpstreamError> {
        request.headers_mut().insert(HOST, self.host.clone());
        let in_flight = metrics.upstream_in_flight();
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started) + self.timeout;
        let result = tokio::time::timeout_at(deadline, self.client.request(request)).await;
        let elapsed = started.elapsed();
        timer.add(elapsed);
        let elapsed = elapsed.as_secs_f64();
        match result {
            Ok(Ok(response)) => {
                metrics.observe_upstream(Some(response.status()), elapsed);
                Ok((response, RelayGuard::new(deadline, in_flight)))
            }
            Ok(Err(e)) => {
                metrics.observe_upstream(None, elapsed);
                Err(UpstreamError::Unreachable(Arc::new(e)))
            }
            Err(_) => {
                metrics.observe_upstream(None, elapsed);
                Err(UpstreamError::Timeout(self.timeout))
            }
        }
    }

    /// Sends `request` and collects its whole answer (up to `max_body`)
    /// within the timeout: a body that breaks off, hangs or drips past the
    /// deadline is an error, never a partial answer.
    pub async fn exchange(
        &self,
        request: Request<UpstreamBody>,
        metrics: &Metrics,
    ) -> Result<Answer, UpstreamError> {
        let timer = UpstreamTimer::default();
        let (response, guard) = self.send(request, metrics, &timer).await?;
        let (head, body) = response.into_parts();
        let limit = self.max_body;
        let collected = tokio::time::timeout_at(guard.deadline(), collect_up_to(body, limit))
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?
            .map_err(|e| UpstreamError::Body(Arc::new(e)))?;
        drop(guard);
        let body = match collected {
            Collected::Complete(body) => body,
            Collected::Overflow { .. } => return Err(UpstreamError::TooLarge { limit }),
        };
        let mut headers = head.headers;
        strip_hop_by_hop(&mut headers);
        Ok(Answer {
            status: head.status,
            headers,
            body,
            upstream_us: timer.micros().unwrap_or(0),
        })
    }
}
