//! Fleet mode against one process, side by side in one run, as ratios: hits
//! from memory (L1, one MGET to Redis each in a fleet), hits from Redis (L2),
//! and misses; then upstream calls per 1,000 reads of a Zipf workload for
//! one process, three independent processes and a fleet of three.
//! Needs `redis-server` (Debian's package). Bounded: a fixed number of
//! requests per measurement, over loopback.
//!
//!     cargo bench --bench fleet

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::{Rng, SeedableRng};
use support::redis::RedisServer;
use support::{test_config, timed_get, Harness, MockGraph};

const REQUESTS: usize = 10_000;
const CONCURRENCY: usize = 32;
const TOKEN: &str = "EAAbenchfleet";

/// Requests/s and p50 over `REQUESTS` GETs of `target(i)` against `base`.
async fn run(
    base: &str,
    target: impl Fn(usize) -> String + Send + Sync + 'static,
) -> (f64, Duration) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let target = Arc::new(target);
    let next = Arc::new(AtomicUsize::new(0));
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
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= REQUESTS {
                    break latencies;
                }
                latencies.push(timed_get(&client, &format!("{base}{}", target(i))).await);
            }
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let rate = REQUESTS as f64 / started.elapsed().as_secs_f64();
    latencies.sort();
    (rate, latencies[latencies.len() / 2])
}

fn url(h: &Harness) -> String {
    format!("http://{}", h.addr)
}

fn object(prefix: &str, i: usize) -> String {
    format!("/v26.0/{prefix}{i}?bytes=1950&access_token={TOKEN}")
}

async fn replica(mock: &MockGraph, redis: Option<&RedisServer>, namespace: &str) -> Harness {
    let mut config = test_config(&mock.url());
    config.routes.default.fresh_ttl = Duration::from_secs(3600);
    config.fleet = redis.map(|r| r.settings(namespace));
    Harness::start_with_mock(mock.clone(), config).await
}

/// Zipf(s = 1.1) ranks over `n` objects, seeded.
fn zipf(n: usize, count: usize, seed: u64) -> Vec<usize> {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(1.1)).collect();
    let total: f64 = weights.iter().sum();
    let mut cumulative = Vec::with_capacity(n);
    let mut sum = 0.0;
    for w in weights {
        sum += w / total;
        cumulative.push(sum);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let x: f64 = rng.random();
            cumulative.partition_point(|c| *c < x).min(n - 1)
        })
        .collect()
}

/// Upstream reads per 1,000 client reads of one Zipf sequence, spread
/// round-robin over `replicas`.
async fn upstream_per_thousand(mock: &MockGraph, replicas: &[Harness], ranks: &[usize]) -> f64 {
    let before = mock.reads();
    for (i, rank) in ranks.iter().enumerate() {
        let h = &replicas[i % replicas.len()];
        let reply = h.get(&format!("/v26.0/z{rank}?access_token={TOKEN}")).await;
        assert_eq!(reply.status, 200);
    }
    (mock.reads() - before) as f64 * 1000.0 / ranks.len() as f64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let redis = RedisServer::start().await;
    let mock = MockGraph::start().await;
    let alone = replica(&mock, None, "").await;
    let fleet = [
        replica(&mock, Some(&redis), "bench").await,
        replica(&mock, Some(&redis), "bench").await,
        replica(&mock, Some(&redis), "bench").await,
    ];

    // L1 hits: one hot object, read again and again.
    let hot = object("hot", 0);
    alone.get(&hot).await;
    fleet[0].get(&hot).await;
    let hot_a = hot.clone();
    let l1_alone = run(&url(&alone), move |_| hot_a.clone()).await;
    let hot_f = hot.clone();
    let l1_fleet = run(&url(&fleet[0]), move |_| hot_f.clone()).await;

    // Misses: every request a new object.
    let miss_alone = run(&url(&alone), |i| object("ma", i)).await;
    let miss_fleet = run(&url(&fleet[0]), |i| object("mf", i)).await;

    // L2 hits: objects replica 1 fetched, read once through replica 2.
    let l2_fleet = run(&url(&fleet[1]), |i| object("mf", i)).await;
    let reads = mock.reads();
    let l2_again = run(&url(&fleet[2]), |i| object("mf", i)).await;
    assert_eq!(mock.reads(), reads, "L2 hits go nowhere upstream");

    println!("fleet of three sharing one redis-server vs one process, {REQUESTS} GETs x {CONCURRENCY} concurrent, 2 KB answers");
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "path", "req/s", "p50 ms", "ratio"
    );
    let row = |name: &str, (rate, p50): (f64, Duration), base: f64| {
        println!(
            "{name:<28} {rate:>10.0} {:>10.3} {:>10.2}",
            p50.as_secs_f64() * 1000.0,
            rate / base
        );
    };
    row("one process: L1 hit", l1_alone, l1_alone.0);
    row("fleet: L1 hit (+MGET)", l1_fleet, l1_alone.0);
    row("fleet: L2 hit", l2_fleet, l1_alone.0);
    row("fleet: L2 hit, 3rd replica", l2_again, l1_alone.0);
    row("one process: miss", miss_alone, miss_alone.0);
    row("fleet: miss", miss_fleet, miss_alone.0);

    // Upstream calls per 1,000 reads: Zipf over 1,000 objects.
    let ranks = zipf(1000, 3000, 7);
    let one = upstream_per_thousand(&mock, std::slice::from_ref(&alone), &ranks).await;
    let three_alone = [
        replica(&mock, None, "").await,
        replica(&mock, None, "").await,
        replica(&mock, None, "").await,
    ];
    let independent = upstream_per_thousand(&mock, &three_alone, &ranks).await;
    let fleet_z = [
        replica(&mock, Some(&redis), "zipf").await,
        replica(&mock, Some(&redis), "zipf").await,
        replica(&mock, Some(&redis), "zipf").await,
    ];
    let shared = upstream_per_thousand(&mock, &fleet_z, &ranks).await;
    println!(
        "upstream reads per 1,000 reads, Zipf(1.1) over 1,000 objects, 3,000 reads round-robin"
    );
    println!("  one process            {one:>7.1}");
    println!(
        "  three, each alone      {independent:>7.1}  ({:.2} x one)",
        independent / one
    );
    println!(
        "  fleet of three         {shared:>7.1}  ({:.2} x one)",
        shared / one
    );
}
