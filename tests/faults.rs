//! Upstream faults, each against an upstream that commits it: the client
//! gets the stored entry or a Graph-envelope 502/504 within
//! `upstream_timeout`, nothing partial is stored, a write goes out once, and
//! every in-flight gauge returns to zero.

mod support;

use std::time::{Duration, Instant};

use http::Method;
use support::faults::{Fault, FaultyGraph};
use support::{test_config, Harness, MockGraph, Outage};

const TOKEN: &str = "access_token=EAAfaults";
const TIMEOUT: Duration = Duration::from_secs(1);
/// What a bounded answer may take beyond `upstream_timeout` on a busy CI box.
const SLACK: Duration = Duration::from_millis(1500);

async fn graphcache_before(upstream: &str) -> Harness {
    let mut config = test_config(upstream);
    config.upstream_timeout = TIMEOUT;
    config.connect_timeout = TIMEOUT;
    // An unused mock: the harness owns one; the faulty upstream is `upstream`.
    Harness::start_with_mock(MockGraph::start().await, config).await
}

/// No gauge says work is still under way.
async fn settled(h: &Harness) {
    h.wait_for_metric("graphcache_upstream_in_flight_requests", 0.0)
        .await;
    assert_eq!(h.metric("graphcache_coalesce_waiting_requests").await, 0.0);
    assert_eq!(h.metric("graphcache_batch_queued_requests").await, 0.0);
}

fn assert_envelope(reply: &support::Reply, status: u16, kind: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.header("x-graphcache-error"), Some(kind));
    let error = &reply.json()["error"];
    assert!(error["message"].is_string(), "{}", reply.text());
    assert!(error["code"].is_i64(), "{}", reply.text());
    assert!(error["fbtrace_id"].is_string(), "{}", reply.text());
}

/// One fault, end to end: stale entry, envelope, a write once, gauges, heal.
async fn survives(fault: Fault, status: u16, kind: &str) {
    let upstream = FaultyGraph::start().await;
    let h = graphcache_before(&upstream.url()).await;
    let stored = h.get(&format!("/v26.0/1?{TOKEN}")).await;
    assert_eq!(stored.status, 200);
    assert!(stored.is_miss(), "{}", stored.cache_status());
    assert_eq!(stored.text(), FaultyGraph::body_for("/v26.0/1"));

    upstream.set(fault);
    // An entry to fall back on: served stale, within the timeout.
    let started = Instant::now();
    let stale = h.get(&format!("/v26.0/1?{TOKEN}")).await;
    assert!(
        started.elapsed() < TIMEOUT + SLACK,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stale.status, 200);
    assert_eq!(stale.text(), FaultyGraph::body_for("/v26.0/1"));
    let cache = stale.cache();
    assert_eq!(
        cache.fwd.as_deref(),
        Some("stale"),
        "{}",
        stale.cache_status()
    );
    assert_eq!(cache.detail.as_deref(), Some("stale-if-error"));

    // Nothing to fall back on: an envelope, within the timeout.
    let started = Instant::now();
    let failed = h.get(&format!("/v26.0/2?{TOKEN}")).await;
    assert!(
        started.elapsed() < TIMEOUT + SLACK,
        "{:?}",
        started.elapsed()
    );
    assert_envelope(&failed, status, kind);

    // A write reaches the upstream once, and its client learns it failed.
    let posts = upstream.posts();
    let started = Instant::now();
    let write = h
        .post_form(&format!("/v26.0/3?{TOKEN}"), "name=renamed")
        .await;
    assert!(
        started.elapsed() < TIMEOUT + SLACK,
        "{:?}",
        started.elapsed()
    );
    assert_envelope(&write, status, kind);
    assert_eq!(upstream.posts(), posts + 1, "a write is never repeated");
    settled(&h).await;

    // Healed: the failed read stored nothing partial, so it is a miss with
    // the whole body, and the stale entry is still good.
    upstream.set(Fault::Healthy);
    let gets = upstream.gets();
    let healed = h.get(&format!("/v26.0/2?{TOKEN}")).await;
    assert_eq!(healed.status, 200);
    assert!(healed.is_miss(), "{}", healed.cache_status());
    assert_eq!(healed.text(), FaultyGraph::body_for("/v26.0/2"));
    assert_eq!(upstream.gets(), gets + 1);
    let again = h.get(&format!("/v26.0/1?{TOKEN}")).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.text(), FaultyGraph::body_for("/v26.0/1"));
    assert_eq!(
        again.cache().fwd_status,
        Some(304),
        "{}",
        again.cache_status()
    );
    assert_eq!(upstream.posts(), posts + 1);
    settled(&h).await;
}

#[tokio::test]
async fn upstream_reset_mid_body() {
    survives(Fault::ResetMidBody, 502, "upstream_body").await;
}

#[tokio::test]
async fn upstream_truncated_chunked_body() {
    survives(Fault::TruncatedChunked, 502, "upstream_body").await;
}

#[tokio::test]
async fn upstream_content_length_longer_than_body() {
    survives(Fault::LengthMismatch, 502, "upstream_body").await;
}

#[tokio::test]
async fn upstream_hangs_after_headers() {
    survives(Fault::HangAfterHeaders, 504, "upstream_timeout").await;
}

#[tokio::test]
async fn upstream_hangs_mid_body() {
    survives(Fault::HangMidBody, 504, "upstream_timeout").await;
}

#[tokio::test]
async fn upstream_drips_its_body_slower_than_the_timeout() {
    survives(Fault::SlowDrip, 504, "upstream_timeout").await;
}

/// A relayed (uncached) body that stalls is cut off at the deadline: the
/// client's stream ends in an error, never as a complete answer, and it does
/// not hold the exchange forever.
#[tokio::test]
async fn a_relayed_body_that_stalls_is_cut_off_at_the_deadline() {
    use http_body_util::BodyExt;
    let upstream = FaultyGraph::start().await;
    let h = graphcache_before(&upstream.url()).await;
    upstream.set(Fault::HangMidBody);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let request = http::Request::get(format!("http://{}/v26.0/7?{TOKEN}", h.addr))
        .header("cache-control", "no-store")
        .body(http_body_util::Empty::new())
        .unwrap();
    let started = Instant::now();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["cache-status"],
        "graphcache; fwd=bypass; fwd-status=200"
    );
    let body = tokio::time::timeout(TIMEOUT + SLACK, response.into_body().collect())
        .await
        .expect("the relay ends by the deadline");
    assert!(body.is_err(), "a cut-off relay must not look complete");
    assert!(
        started.elapsed() < TIMEOUT + SLACK,
        "{:?}",
        started.elapsed()
    );
    settled(&h).await;
}

/// Every read during a 5xx storm gets the stale entry or Graph's own 5xx
/// envelope; nothing the storm answered is stored.
#[tokio::test]
async fn a_5xx_storm_serves_stale_entries_and_relays_graph_errors() {
    let h = std::sync::Arc::new(
        Harness::with(|c| {
            c.upstream_timeout = TIMEOUT;
        })
        .await,
    );
    for id in 1..=5 {
        assert!(h.get(&format!("/v26.0/{id}?{TOKEN}")).await.is_miss());
    }
    h.mock.set_outage(Outage::Status(503));
    let before = h.mock.requests();
    let storm: Vec<_> = (0..60)
        .map(|n| support::spawn_get(&h, &format!("/v26.0/{}?{TOKEN}", n % 10 + 1), &[]))
        .collect();
    for (n, task) in storm.into_iter().enumerate() {
        let reply = task.await.unwrap();
        if n % 10 < 5 {
            assert_eq!(reply.status, 200, "{}", reply.text());
            assert_eq!(reply.cache().detail.as_deref(), Some("stale-if-error"));
            assert_eq!(reply.json()["id"], (n % 10 + 1).to_string());
        } else {
            assert_eq!(reply.status, 503);
            assert_eq!(reply.json()["error"]["code"], 2);
        }
    }
    let during = h.mock.requests() - before;
    assert!(
        (10..=60).contains(&during),
        "{during} upstream calls for 60 reads"
    );
    let posts = h.mock.writes();
    let write = h.post_form(&format!("/v26.0/3?{TOKEN}"), "name=x").await;
    assert_eq!(write.status, 503);
    assert_eq!(h.mock.writes(), posts + 1);
    settled(&h).await;
    h.mock.set_outage(Outage::None);
    for id in 6..=10 {
        let reply = h.get(&format!("/v26.0/{id}?{TOKEN}")).await;
        assert_eq!(reply.status, 200);
        assert!(
            reply.is_miss(),
            "a storm answer was stored: {}",
            reply.cache_status()
        );
    }
}

#[tokio::test]
async fn an_unresolvable_upstream_host_is_a_502_within_the_timeout() {
    let h = graphcache_before("http://graphcache-no-such-host.invalid").await;
    for (method, body) in [(Method::GET, ""), (Method::POST, "name=x")] {
        let started = Instant::now();
        let reply = h
            .send(
                method,
                &format!("/v26.0/1?{TOKEN}"),
                &[("content-type", "application/x-www-form-urlencoded")],
                body,
            )
            .await;
        assert!(
            started.elapsed() < TIMEOUT + SLACK,
            "{:?}",
            started.elapsed()
        );
        // Resolution fails (502), or a resolver that never answers runs
        // into the timeout (504): either way an envelope, in time.
        match reply.status.as_u16() {
            502 => assert_envelope(&reply, 502, "upstream_unreachable"),
            _ => assert_envelope(&reply, 504, "upstream_timeout"),
        }
    }
    settled(&h).await;
}

#[tokio::test]
async fn a_tls_handshake_failure_is_a_502_and_sends_nothing() {
    // The upstream's certificate is self-signed and not trusted here.
    let (mock, _pem) = MockGraph::start_tls().await;
    let upstream = format!("https://localhost:{}", mock.addr.port());
    let h = graphcache_before(&upstream).await;
    let reply = h.get(&format!("/v26.0/1?{TOKEN}")).await;
    assert_envelope(&reply, 502, "upstream_unreachable");
    let write = h.post_form(&format!("/v26.0/1?{TOKEN}"), "name=x").await;
    assert_envelope(&write, 502, "upstream_unreachable");
    assert_eq!(mock.requests(), 0, "nothing crosses a failed handshake");
    settled(&h).await;
}

/// An upstream that closes idle keep-alive connections without saying so:
/// the next request must not fail on the dead pooled connection, and a
/// write still goes out exactly once.
#[tokio::test]
async fn keep_alive_connections_closed_by_the_upstream_between_requests() {
    let upstream = FaultyGraph::start().await;
    upstream.set(Fault::CloseAfterAnswer);
    let h = graphcache_before(&upstream.url()).await;
    for id in 1..=10 {
        let reply = h.get(&format!("/v26.0/{id}?{TOKEN}")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), FaultyGraph::body_for(&format!("/v26.0/{id}")));
        let write = h.post_form(&format!("/v26.0/{id}?{TOKEN}"), "name=x").await;
        assert_eq!(write.status, 200, "{}", write.text());
        assert_eq!(upstream.posts(), id, "each write exactly once");
    }
    assert_eq!(upstream.gets(), 10);
    assert_eq!(
        upstream.connections(),
        20,
        "every exchange on a fresh connection"
    );
    settled(&h).await;
}
