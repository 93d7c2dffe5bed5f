//! Side-by-side throughput of the request paths, in one run, as ratios:
//! the mock upstream direct, graphcache fresh hits, revalidations (304) and
//! misses. Bounded: a fixed number of requests per scenario over loopback.
//!
//!     cargo bench --bench proxy
//!
//! For hits/s and p99 under wrk, see the README's "Performance" section.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{test_config, timed_get, Harness, MockGraph};

const REQUESTS: usize = 20_000;
const CONCURRENCY: usize = 32;

async fn run(
    base: &str,
    target: impl Fn(usize) -> String + Send + Sync + 'static,
) -> (f64, Duration) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let target = Arc::new(target);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, target, next, base) = (
            client.clone(),
            target.clone(),
            next.clone(),
            base.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= REQUESTS {
                    break latencies;
                }
                let uri = format!("{base}{}", target(i));
                latencies.push(timed_get(&client, &uri).await);
            }
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    (
        REQUESTS as f64 / elapsed.as_secs_f64(),
        latencies[latencies.len() * 99 / 100],
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mock = MockGraph::start().await;
    let mut config = test_config(&mock.url());
    config.routes.default.fresh_ttl = Duration::from_secs(3600);
    let fresh = Harness::start_with_mock(mock.clone(), config).await;
    let revalidating = Harness::start_with_mock(mock.clone(), test_config(&mock.url())).await;
    let body = "/v26.0/big?bytes=1950&access_token=EAAbench";

    // Warm both caches with the one entry.
    let _ = run(&format!("http://{}", fresh.addr), move |_| body.to_owned()).await;
    let _ = run(&format!("http://{}", revalidating.addr), move |_| {
        body.to_owned()
    })
    .await;

    let direct = run(&mock.url(), move |_| body.to_owned()).await;
    let hit = run(&format!("http://{}", fresh.addr), move |_| body.to_owned()).await;
    let revalidated = run(&format!("http://{}", revalidating.addr), move |_| {
        body.to_owned()
    })
    .await;
    let miss = run(&format!("http://{}", fresh.addr), move |i| {
        format!("/v26.0/big?bytes=1950&n={i}&access_token=EAAbench")
    })
    .await;

    println!("{REQUESTS} requests per scenario, {CONCURRENCY} concurrent, 2 KB JSON body, client in process");
    println!(
        "{:<28} {:>12} {:>10} {:>16}",
        "scenario", "req/s", "p99", "vs direct"
    );
    for (name, (rps, p99)) in [
        ("mock upstream, direct", direct),
        ("graphcache fresh hit", hit),
        ("graphcache revalidated 304", revalidated),
        ("graphcache miss", miss),
    ] {
        println!(
            "{name:<28} {rps:>12.0} {:>8.2}ms {:>15.2}x",
            p99.as_secs_f64() * 1000.0,
            rps / direct.0
        );
    }
}
