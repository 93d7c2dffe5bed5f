//! Coalescing and batch packing against an upstream with a fixed latency:
//! upstream HTTP requests per client request and the latency graphcache adds,
//! side by side with going direct, in one run. Bounded: fixed request counts.
//!
//!     cargo bench --bench coalesce

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{test_config, timed_get, Harness, HttpClient, MockGraph};

const LATENCY: Duration = Duration::from_millis(20);
const CONCURRENT: usize = 200;
const LONE: usize = 100;

/// Fires all `uris` at once; returns the sorted latencies.
async fn burst(client: &HttpClient, uris: Vec<String>) -> Vec<Duration> {
    let tasks: Vec<_> = uris
        .into_iter()
        .map(|uri| {
            let client = client.clone();
            tokio::spawn(async move { timed_get(&client, &uri).await })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.push(t.await.unwrap());
    }
    latencies.sort();
    latencies
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(name: &str, clients: usize, upstream: u64, latencies: &[Duration]) {
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    println!(
        "{name:<44} {:>9.3} {:>9.1} {:>9.1}",
        upstream as f64 / clients as f64,
        ms(p50),
        ms(p99)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mock = MockGraph::start().await;
    mock.set_delay(LATENCY);
    let packed = Harness::start_with_mock(mock.clone(), test_config(&mock.url())).await;
    let mut plain_config = test_config(&mock.url());
    plain_config.coalesce.enabled = false;
    plain_config.packing.enabled = false;
    let plain = Harness::start_with_mock(mock.clone(), plain_config).await;
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CONCURRENT)
        .build_http();
    let direct = mock.url();
    let via = |h: &Harness| format!("http://{}", h.addr);

    println!("upstream latency {}ms; {CONCURRENT} concurrent clients per burst; lone misses one at a time", LATENCY.as_millis());
    println!(
        "{:<44} {:>9} {:>9} {:>9}",
        "scenario", "up/client", "p50 ms", "p99 ms"
    );

    // A lone miss: what graphcache adds when there is nothing to share.
    for (name, base) in [
        ("lone miss, direct", direct.clone()),
        ("lone miss, through graphcache", via(&packed)),
    ] {
        let before = mock.requests();
        let mut latencies = Vec::new();
        for i in 0..LONE {
            latencies.push(
                timed_get(
                    &client,
                    &format!(
                        "{base}/v26.0/{}?access_token=EAAlone{name_len}",
                        10_000 + i,
                        name_len = name.len()
                    ),
                )
                .await,
            );
        }
        latencies.sort();
        report(name, LONE, mock.requests() - before, &latencies);
    }

    // Identical cold GETs.
    for (name, base, key) in [
        ("identical burst, direct", direct.clone(), "a"),
        (
            "identical burst, graphcache, no coalescing",
            via(&plain),
            "b",
        ),
        ("identical burst, graphcache, coalescing", via(&packed), "c"),
    ] {
        let before = mock.requests();
        let uris =
            vec![format!("{base}/v26.0/act_1/insights?access_token=EAAsame{key}"); CONCURRENT];
        let latencies = burst(&client, uris).await;
        report(name, CONCURRENT, mock.requests() - before, &latencies);
    }

    // Distinct cold GETs of one token and User-Agent.
    for (name, base, offset) in [
        ("distinct burst, direct", direct.clone(), 20_000),
        (
            "distinct burst, graphcache, no packing",
            via(&plain),
            30_000,
        ),
        ("distinct burst, graphcache, packing", via(&packed), 40_000),
    ] {
        let before = mock.requests();
        let uris = (0..CONCURRENT)
            .map(|i| format!("{base}/v26.0/{}?access_token=EAAdistinct", offset + i))
            .collect();
        let latencies = burst(&client, uris).await;
        report(name, CONCURRENT, mock.requests() - before, &latencies);
    }
    println!("(up/client: upstream HTTP requests per client request; a batch POST counts as one)");
}
