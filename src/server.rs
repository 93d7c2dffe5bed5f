//! Listeners and connections: accept, serve HTTP/1.1 and HTTP/2 (cleartext,
//! by preface) with explicit limits, and drain gracefully on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::admin::Admin;
use crate::cache::{MemoryStore, TieredStore, TokenHasher};
use crate::config::Config;
use crate::fleet::Fleet;
use crate::metrics::{CloseReason, Metrics};
use crate::proxy::Proxy;
use crate::ratelimit::RateLimits;

/// The fleet's identity secret, asked of Redis for up to two seconds. Without
/// it this replica's callers would get identities no sibling shares, so it
/// runs with a key of its own and shares only write marks and throttles.
async fn fleet_identity(fleet: &Fleet) -> Option<[u8; 32]> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match fleet.identity_secret().await {
            Ok(secret) => return Some(secret),
            Err(error) if std::time::Instant::now() >= deadline => {
                tracing::error!(%error, "cannot get the fleet's identity key from Redis: entries stay in this replica (set fleet_secret to start without Redis)");
                return None;
            }
            Err(_) => {
                // Degraded after a few failures: a ping notices Redis back.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                fleet.tend().await;
            }
        }
    }
}

/// A bound, not yet running graphcache: both listeners are open, so a caller
/// (or a test) can learn the ephemeral ports before traffic starts.
pub struct Graphcache {
    listener: TcpListener,
    admin_listener: TcpListener,
    proxy: Arc<Proxy>,
    admin: Arc<Admin>,
    ready: Arc<AtomicBool>,
}

impl Graphcache {
    /// Binds the client and admin listeners and builds the shared state, in
    /// order: metrics, store, rate-limit state, then the request path.
    pub async fn bind(config: Config) -> std::io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        let admin_listener = TcpListener::bind(config.admin_listen).await?;
        // 1. Metrics, which every other part reports to.
        let metrics = Arc::new(Metrics::new());
        // 2. The store; write marks must outlive any read in flight, and
        //    reads time out upstream.
        let evictions = metrics.clone();
        let store = MemoryStore::new(
            config.cache_max_bytes,
            config.upstream_timeout * 2,
            Arc::new(move |cause| evictions.count_eviction(cause)),
        );
        // 3. In a fleet, the shared tier and the fleet's identity key.
        let (store, tokens, fleet) = match &config.fleet {
            None => (TieredStore::alone(store), TokenHasher::random(), None),
            Some(settings) => {
                let fleet = Fleet::new(
                    settings.clone(),
                    config.upstream_timeout,
                    metrics.registry(),
                )
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                fleet.set_longest_retention(config.routes.longest_retention());
                fleet.check_eviction_policy().await;
                let (tokens, shared) = match fleet_identity(&fleet).await {
                    Some(secret) => (TokenHasher::with_secret(secret), true),
                    None => (TokenHasher::random(), false),
                };
                (
                    TieredStore::with_fleet(store, fleet.clone(), shared),
                    tokens,
                    Some(fleet),
                )
            }
        };
        // 4. Graph's usage and throttle state (shared in a fleet).
        let limits = Arc::new(match fleet {
            Some(_) => RateLimits::shared(config.throttle.clone()),
            None => RateLimits::new(config.throttle.clone()),
        });
        // 5. The request path: upstream client, packer, flights.
        let proxy = Arc::new(Proxy::new(
            Arc::new(config),
            store.clone(),
            tokens,
            limits.clone(),
            metrics.clone(),
        ));
        let ready = Arc::new(AtomicBool::new(false));
        let admin = Arc::new(Admin {
            metrics,
            limits,
            store: store.memory().clone(),
            fleet,
            ready: ready.clone(),
        });
        Ok(Self {
            listener,
            admin_listener,
            proxy,
            admin,
            ready,
        })
    }

    /// A handle that applies reloaded configurations (SIGHUP) to the running
    /// server.
    pub fn reloader(&self) -> Reloader {
        Reloader(self.proxy.clone())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// requests finish for up to the configured grace period, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let config = self.proxy.config.load_full();
        let builder = connection_builder(&config);
        let graceful = GracefulShutdown::new();
        let permits = Arc::new(Semaphore::new(config.max_connections));
        // The admin listener outlives the drain, so /readyz can say "draining".
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = tokio::spawn(serve_admin(
            self.admin_listener,
            self.admin.clone(),
            builder.clone(),
            admin_stopped,
        ));
        // In a fleet: throttle sharing and Redis health, until shutdown.
        let fleet_task = self.admin.fleet.clone().map(|fleet| {
            tokio::spawn(crate::ratelimit::share::sync(
                self.admin.limits.clone(),
                fleet,
            ))
        });
        self.ready.store(true, Ordering::Release);
        tracing::info!(
            listen = %self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            upstream = %config.upstream,
            "graphcache serving"
        );
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = accept_with_permit(&self.listener, &permits) => {
                    let Some((stream, peer, permit)) = accepted else { continue };
                    let proxy = self.proxy.clone();
                    // Set when the first request head is complete: until then
                    // the connection has `header_read_timeout` to send one,
                    // protocol sniff and HTTP/2 preface included.
                    let started = Arc::new(AtomicBool::new(false));
                    let first = started.clone();
                    let service = service_fn(move |request| {
                        first.store(true, Ordering::Relaxed);
                        let proxy = proxy.clone();
                        async move { Ok::<_, std::convert::Infallible>(proxy.handle(request).await) }
                    });
                    let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    let connection = graceful.watch(connection);
                    let metrics = self.proxy.metrics.clone();
                    let deadline = config.header_read_timeout;
                    tokio::spawn(async move {
                        tokio::pin!(connection);
                        let result = match tokio::time::timeout(deadline, &mut connection).await {
                            Ok(result) => result,
                            Err(_) if !started.load(Ordering::Relaxed) => {
                                tracing::debug!(%peer, "no request within header_read_timeout; closing");
                                metrics.count_closed(CloseReason::FirstRequestTimeout);
                                drop(permit);
                                return;
                            }
                            Err(_) => connection.await,
                        };
                        match result {
                            Ok(()) => metrics.count_closed(CloseReason::Closed),
                            Err(error) => {
                                tracing::debug!(%peer, %error, "client connection ended with an error");
                                metrics.count_closed(CloseReason::Error);
                            }
                        }
                        drop(permit);
                    });
                }
            }
        }
        self.ready.store(false, Ordering::Release);
        drop(self.listener);
        tracing::info!(grace = ?config.shutdown_grace, "shutting down: draining connections");
        let drained = async {
            graceful.shutdown().await;
            // Writes whose clients left still settle (and invalidate).
            self.proxy.drain().await;
        };
        tokio::select! {
            () = drained => tracing::info!("all connections and writes drained"),
            () = tokio::time::sleep(config.shutdown_grace) => {
                tracing::warn!("grace period over with connections or writes still open");
            }
        }
        let _ = admin_stop.send(());
        let _ = admin_task.await;
        if let Some(task) = fleet_task {
            // Marks that never reached Redis go with one last try.
            task.abort();
            if let Some(fleet) = &self.admin.fleet {
                fleet.tend().await;
            }
        }
    }
}

/// Applies a reloaded configuration to a running graphcache.
#[derive(Clone)]
pub struct Reloader(Arc<Proxy>);

impl Reloader {
    /// Applies `config` to new requests atomically and counts the reload;
    /// returns the keys that need a restart and kept their running value.
    pub fn reload(&self, config: Config) -> Vec<&'static str> {
        self.0.reload(config)
    }

    /// Counts a reload that failed (the running configuration stays).
    pub fn failed(&self) {
        self.0.metrics.count_reload(false);
    }
}

/// Serves the admin endpoints until `stop` fires.
async fn serve_admin(
    listener: TcpListener,
    admin: Arc<Admin>,
    builder: auto::Builder<TokioExecutor>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    tracing::info!(admin = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin serving");
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let admin = admin.clone();
                let service = service_fn(move |request| {
                    let admin = admin.clone();
                    async move { admin.handle(request).await }
                });
                let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), graceful.shutdown()).await;
}

/// Accepts one connection once a connection slot is free. Accept errors
/// (e.g. out of file descriptors) are logged and retried after a pause.
async fn accept_with_permit(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
) -> Option<(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
    let permit = permits.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            // Peers that vanish without closing are found and their slot freed.
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(std::time::Duration::from_secs(60))
                .with_interval(std::time::Duration::from_secs(10));
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
            Some((stream, peer, permit))
        }
        Err(error) => {
            tracing::warn!(%error, "accept failed");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            None
        }
    }
}

/// One connection builder for all listeners, with explicit limits.
fn connection_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own head limit sits above graphcache's, so an oversized head
    // normally gets graphcache's 431 envelope; hyper's bare 431 is the backstop.
    let head_limit = (config.max_header_bytes + (16 << 10)).max(8192);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(head_limit)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head_limit).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        // A peer that does not answer a ping within this is gone.
        .keep_alive_timeout(std::time::Duration::from_secs(20));
    builder
}
