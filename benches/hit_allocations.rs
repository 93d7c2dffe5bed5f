//! Heap allocations per fresh cache hit, side by side with a bare hyper
//! server returning the same 2 KB body, in one process with one client. The
//! difference is what graphcache's hit path adds on top of hyper itself.
//!
//!     cargo bench --bench hit_allocations

#[path = "../tests/support/mod.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{test_config, timed_get, Harness, MockGraph};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const REQUESTS: u64 = 5_000;

async fn per_request(uri: &str) -> f64 {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let get = || timed_get(&client, uri);
    for _ in 0..100 {
        get().await;
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..REQUESTS {
        get().await;
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / REQUESTS as f64
}

/// A bare hyper server answering every request with a fixed 2 KB body and
/// Graph-like headers: the floor graphcache builds on.
async fn bare_server(body: Bytes) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let mut response = http::Response::new(Full::new(body.clone()));
                    let h = response.headers_mut();
                    h.insert(
                        "content-type",
                        http::HeaderValue::from_static("application/json; charset=UTF-8"),
                    );
                    h.insert(
                        "etag",
                        http::HeaderValue::from_static(
                            "\"0123456789012345678901234567890123456789\"",
                        ),
                    );
                    h.insert(
                        "cache-control",
                        http::HeaderValue::from_static(
                            "private, no-cache, no-store, must-revalidate",
                        ),
                    );
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mock = MockGraph::start().await;
    let mut config = test_config(&mock.url());
    config.routes.default.fresh_ttl = Duration::from_secs(3600);
    let graphcache = Harness::start_with_mock(mock, config).await;
    let target = "/v26.0/big?bytes=1950&access_token=EAAbench";
    let body = graphcache
        .get_with(target, &[("user-agent", "bench")])
        .await
        .body;
    let bare = bare_server(body).await;

    let floor = per_request(&format!("http://{bare}{target}")).await;
    let hit = per_request(&format!("http://{}{target}", graphcache.addr)).await;
    println!("allocations per request (client and server in one process, {REQUESTS} sequential requests):");
    println!("  bare hyper server, static 2 KB body: {floor:.1}");
    println!("  graphcache fresh hit, 2 KB body:     {hit:.1}");
    println!(
        "  added by graphcache's hit path:      {:.1} ({:.2}x the bare server)",
        hit - floor,
        hit / floor
    );
}
