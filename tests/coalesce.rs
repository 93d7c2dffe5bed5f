//! Coalescing of identical reads and packing of distinct reads into Graph
//! batches. The mock holds its answers until the expected requests have
//! arrived (a signal, not a sleep); graphcache's own queue gauges say when
//! requests are waiting inside it.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use support::mock_graph::BatchFailure;
use support::{Harness, MockGraph, Reply};

const QUEUED: &str = "graphcache_batch_queued_requests";
const WAITING: &str = "graphcache_coalesce_waiting_requests";

fn packing(max_in_flight: usize, fresh: u64) -> impl FnOnce(&mut graphcache::Config) {
    move |c| {
        c.packing.max_in_flight = max_in_flight;
        c.routes.default.fresh_ttl = Duration::from_secs(fresh);
    }
}

/// Starts GETs of `targets` concurrently, each with the given headers.
fn fire(
    h: &Arc<Harness>,
    targets: Vec<String>,
    headers: Vec<(&'static str, String)>,
) -> Vec<tokio::task::JoinHandle<Reply>> {
    targets
        .into_iter()
        .map(|target| {
            let (h, headers) = (h.clone(), headers.clone());
            tokio::spawn(async move {
                let headers: Vec<(&str, &str)> =
                    headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                h.get_with(&target, &headers).await
            })
        })
        .collect()
}

/// The packing set-up: with the mock holding everything, `first` goes out
/// alone (the group's one slot), then `rest` queue behind it inside
/// graphcache; the mock is released once all of them are queued. Returns
/// every reply, `first` first. `seen` is how many requests the mock had
/// already received.
async fn one_held_rest_queued(
    h: &Arc<Harness>,
    seen: u64,
    first: &str,
    rest: Vec<String>,
    headers: Vec<(&'static str, String)>,
) -> Vec<Reply> {
    h.mock.hold("/v26.0/");
    let queued = rest.len() as f64;
    let first = fire(h, vec![first.to_owned()], headers.clone());
    h.mock.wait_for_requests(seen + 1).await;
    let rest = fire(h, rest, headers);
    h.wait_for_metric(QUEUED, queued).await;
    h.mock.release();
    let mut all = replies(first).await;
    all.extend(replies(rest).await);
    all
}

async fn replies(tasks: Vec<tokio::task::JoinHandle<Reply>>) -> Vec<Reply> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_cold_gets_reach_the_upstream_once() {
    let h = Arc::new(Harness::with(packing(4, 60)).await);
    h.mock.hold("/v26.0/");
    let target = "/v26.0/act_1/insights?fields=spend&access_token=EAAtokenA".to_owned();
    let tasks = fire(&h, vec![target; 200], vec![]);
    h.mock.wait_for_requests(1).await;
    h.wait_for_metric(WAITING, 200.0).await;
    h.mock.release();
    let replies = replies(tasks).await;
    assert_eq!(h.mock.requests(), 1);
    let first = &replies[0];
    assert!(replies
        .iter()
        .all(|r| r.status == 200 && r.body == first.body));
    assert!(replies
        .iter()
        .all(|r| r.header("etag") == first.header("etag")));
    assert_eq!(h.metric("graphcache_coalesced_requests_total").await, 199.0);
    // The shared answer was stored once.
    assert_eq!(
        h.get("/v26.0/act_1/insights?fields=spend&access_token=EAAtokenA")
            .await
            .cache_status(),
        "graphcache; hit"
    );
    assert_eq!(h.mock.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_fan_out_to_every_waiter() {
    let h = Arc::new(Harness::with(packing(4, 60)).await);
    h.mock.hold("/v26.0/");
    let tasks = fire(
        &h,
        vec!["/v26.0/me?access_token=bad".to_owned(); 20],
        vec![],
    );
    h.mock.wait_for_requests(1).await;
    h.wait_for_metric(WAITING, 20.0).await;
    h.mock.release();
    for reply in replies(tasks).await {
        assert_eq!(reply.status, 400);
        assert_eq!(reply.json()["error"]["code"], 190);
    }
    assert_eq!(h.mock.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnecting_waiter_does_not_cancel_the_shared_call() {
    use tokio::io::AsyncWriteExt;
    let h = Arc::new(Harness::with(packing(4, 60)).await);
    h.mock.hold("/v26.0/");
    let target = "/v26.0/act_2/ads?access_token=EAAtokenA";
    // The client that starts the call speaks raw HTTP so it can vanish.
    let mut leader = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    leader
        .write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    h.mock.wait_for_requests(1).await;
    let follower = fire(&h, vec![target.to_owned()], vec![]);
    h.wait_for_metric(WAITING, 2.0).await;
    drop(leader);
    h.mock.release();
    let reply = replies(follower).await.pop().unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(h.get(target).await.cache_status(), "graphcache; hit");
    assert_eq!(h.mock.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_past_its_bound_gets_a_504_and_the_call_goes_on() {
    let h = Arc::new(
        Harness::with(|c| {
            c.coalesce.wait = Duration::from_secs(1);
            c.routes.default.fresh_ttl = Duration::from_secs(60);
        })
        .await,
    );
    h.mock.hold("/v26.0/");
    let target = "/v26.0/act_3/ads?access_token=EAAtokenA";
    let reply = h.get(target).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.header("x-graphcache-error"), Some("coalesce_timeout"));
    h.mock.release();
    // The shared call finished and stored its answer for later requests.
    h.wait_for_metric_at_least("graphcache_cache_entries", 1.0)
        .await;
    assert_eq!(h.get(target).await.cache_status(), "graphcache; hit");
    assert_eq!(h.mock.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_concurrent_gets_ride_in_batches_and_get_their_own_answers() {
    let h = Arc::new(Harness::with(packing(1, 60)).await);
    let ua = "fbbizsdk-python-v26.0.3".to_owned();
    let targets: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "/v26.0/{}?fields=name%2Cid&access_token=EAAtokenA",
                1000 + i
            )
        })
        .collect();
    let all = one_held_rest_queued(
        &h,
        0,
        &targets[0],
        targets[1..].to_vec(),
        vec![("user-agent", ua.clone())],
    )
    .await;
    for (i, reply) in all.iter().enumerate() {
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["id"], (1000 + i).to_string());
        assert_eq!(reply.json()["fields"], "name,id");
        assert_eq!(
            reply.header("etag").unwrap(),
            MockGraph::etag_for(&reply.body, &ua)
        );
        assert!(
            reply.cache_status().ends_with("stored"),
            "{}",
            reply.cache_status()
        );
    }
    // One plain GET, then one batch with the 39 that queued behind it.
    assert_eq!(
        (h.mock.requests(), h.mock.batches(), h.mock.batch_items()),
        (2, 1, 39)
    );
    let (form, items) = h.mock.seen_batches().pop().unwrap();
    assert_eq!(
        form.get("access_token").map(String::as_str),
        Some("EAAtokenA")
    );
    assert_eq!(
        form.get("include_headers").map(String::as_str),
        Some("true")
    );
    // Items keep the path and query as sent, without version or token.
    let urls: HashSet<String> = items
        .iter()
        .map(|i| i["relative_url"].as_str().unwrap().to_owned())
        .collect();
    let expected: HashSet<String> = (1001..1040)
        .map(|i| format!("{i}?fields=name%2Cid"))
        .collect();
    assert_eq!(urls, expected);
    assert!(items.iter().all(|i| i["method"] == "GET"));
    let batch_request = h
        .mock
        .seen()
        .into_iter()
        .find(|s| s.method == http::Method::POST)
        .unwrap();
    assert_eq!(batch_request.path, "/v26.0/");
    assert_eq!(batch_request.header("user-agent"), Some(ua.as_str()));
    assert_eq!(
        h.metric("graphcache_upstream_calls_total{kind=\"batch\"}")
            .await,
        1.0
    );
    assert_eq!(
        h.metric("graphcache_upstream_calls_total{kind=\"single\"}")
            .await,
        1.0
    );
    assert_eq!(h.metric("graphcache_batch_items_sum").await, 39.0);
    // Batch answers were stored under the keys the single GETs have.
    for target in &targets {
        let again = h.get_with(target, &[("user-agent", &ua)]).await;
        assert_eq!(again.cache_status(), "graphcache; hit");
    }
    assert_eq!(h.mock.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_fifty_queued_gets_make_more_batches() {
    let h = Arc::new(Harness::with(packing(1, 60)).await);
    let rest = (2..=71)
        .map(|i| format!("/v26.0/{i}?access_token=EAAtokenA"))
        .collect();
    let all = one_held_rest_queued(&h, 0, "/v26.0/1?access_token=EAAtokenA", rest, vec![]).await;
    for (i, reply) in all.iter().enumerate() {
        assert_eq!(reply.json()["id"], (i + 1).to_string());
    }
    assert_eq!((h.mock.batches(), h.mock.batch_items()), (2, 70));
    let sizes: Vec<usize> = h
        .mock
        .seen_batches()
        .iter()
        .map(|(_, items)| items.len())
        .collect();
    assert_eq!(sizes, [50, 20]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_user_agents_never_share_a_batch() {
    let h = Arc::new(Harness::with(packing(1, 60)).await);
    h.mock.hold("/v26.0/");
    let groups = [
        ("EAAtokenA", "ua-1"),
        ("EAAtokenB", "ua-1"),
        ("EAAtokenA", "ua-2"),
    ];
    let mut tasks = Vec::new();
    for (token, ua) in groups {
        tasks.extend(fire(
            &h,
            vec![format!("/v26.0/500?access_token={token}")],
            vec![("user-agent", ua.to_owned())],
        ));
    }
    h.mock.wait_for_requests(3).await;
    for (token, ua) in groups {
        let targets = (0..5)
            .map(|i| format!("/v26.0/{}?access_token={token}", 600 + i))
            .collect();
        tasks.extend(fire(&h, targets, vec![("user-agent", ua.to_owned())]));
    }
    h.wait_for_metric(QUEUED, 15.0).await;
    h.mock.release();
    for reply in replies(tasks).await {
        assert_eq!(reply.status, 200);
    }
    let batches = h.mock.seen_batches();
    assert_eq!(batches.len(), 3);
    let mut seen_groups = HashSet::new();
    for (form, items) in &batches {
        assert_eq!(items.len(), 5);
        seen_groups.insert(form["access_token"].clone());
    }
    assert_eq!(seen_groups.len(), 2, "both tokens batched separately");
    let uas: HashSet<String> = h
        .mock
        .seen()
        .iter()
        .filter(|s| s.method == http::Method::POST)
        .map(|s| s.header("user-agent").unwrap().to_owned())
        .collect();
    assert_eq!(uas.len(), 2);
    // Each token got its own data: the /me-style token tag differs.
    assert_eq!(h.mock.requests(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidations_ride_in_batches_and_304_items_serve_the_stored_body() {
    let h = Arc::new(Harness::with(packing(1, 0)).await);
    let targets: Vec<String> = (0..6)
        .map(|i| format!("/v26.0/{}?access_token=EAAtokenA", 700 + i))
        .collect();
    let mut stored = Vec::new();
    for t in &targets {
        stored.push(h.get(t).await);
    }
    h.mock.touch("705");
    let all = one_held_rest_queued(&h, 6, &targets[0], targets[1..].to_vec(), vec![]).await;
    for (i, reply) in all.iter().enumerate().take(5) {
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, stored[i].body);
        assert_eq!(
            reply.cache_status(),
            "graphcache; fwd=stale; fwd-status=304"
        );
    }
    // The changed object came back as a 200 item with a new body and ETag.
    assert_eq!(all[5].json()["version"], 1);
    assert_eq!(
        all[5].cache_status(),
        "graphcache; fwd=stale; fwd-status=200; stored"
    );
    let (_, items) = h.mock.seen_batches().pop().unwrap();
    assert_eq!(items.len(), 5);
    // Every item carried its own stored ETag.
    for item in &items {
        let url = item["relative_url"].as_str().unwrap();
        let index = targets
            .iter()
            .position(|t| t.contains(&format!("/{url}?")))
            .unwrap();
        let etag = stored[index].header("etag").unwrap();
        assert_eq!(item["headers"][0], format!("If-None-Match: {etag}"));
    }
    assert_eq!(h.mock.not_modified(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_items_are_retried_alone_and_item_errors_stay_with_their_waiter() {
    let h = Arc::new(Harness::with(packing(1, 60)).await);
    h.mock.null_once("803");
    let rest = vec![
        "/v26.0/801?access_token=EAAtokenA".to_owned(),
        "/v26.0/missing?access_token=EAAtokenA".to_owned(),
        "/v26.0/803?access_token=EAAtokenA".to_owned(),
    ];
    let all = one_held_rest_queued(&h, 0, "/v26.0/800?access_token=EAAtokenA", rest, vec![]).await;
    let rest = &all[1..];
    assert_eq!(rest[0].json()["id"], "801");
    assert_eq!(rest[1].status, 400);
    assert_eq!(rest[1].json()["error"]["code"], 100);
    assert_eq!(rest[2].status, 200);
    assert_eq!(rest[2].json()["id"], "803");
    // 1 plain GET, 1 batch of 3, 1 retry of the null item.
    assert_eq!(
        (h.mock.requests(), h.mock.batches(), h.mock.batch_items()),
        (3, 1, 3)
    );
    assert_eq!(h.mock.last().path, "/v26.0/803");
    assert_eq!(
        h.metric("graphcache_batch_null_items_retried_total").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_failing_as_a_whole_falls_back_to_plain_gets_once() {
    for failure in [
        BatchFailure::Status(500),
        BatchFailure::NotArray,
        BatchFailure::WrongLength,
    ] {
        let h = Arc::new(Harness::with(packing(1, 60)).await);
        h.mock.set_batch_failure(failure);
        let rest = (901..905)
            .map(|i| format!("/v26.0/{i}?access_token=EAAtokenA"))
            .collect();
        let all =
            one_held_rest_queued(&h, 0, "/v26.0/900?access_token=EAAtokenA", rest, vec![]).await;
        for (i, reply) in all.iter().enumerate() {
            assert_eq!(reply.status, 200, "{failure:?}");
            assert_eq!(reply.json()["id"], (900 + i).to_string());
        }
        // 1 plain GET, 1 failed batch, 4 plain GETs: nothing retried twice.
        assert_eq!((h.mock.requests(), h.mock.batches()), (6, 1), "{failure:?}");
        assert_eq!(h.metric("graphcache_batch_fallbacks_total").await, 1.0);
    }
}

#[tokio::test]
async fn coalescing_and_packing_can_be_turned_off() {
    let h = Arc::new(
        Harness::with(|c| {
            c.coalesce.enabled = false;
            c.packing.enabled = false;
        })
        .await,
    );
    h.mock.hold("/v26.0/");
    let tasks = fire(
        &h,
        vec!["/v26.0/1?access_token=EAAtokenA".to_owned(); 5],
        vec![],
    );
    h.mock.wait_for_requests(5).await;
    h.mock.release();
    for reply in replies(tasks).await {
        assert_eq!(reply.status, 200);
    }
    assert_eq!((h.mock.requests(), h.mock.batches()), (5, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_starts_after_a_write_does_not_join_an_older_call() {
    let h = Arc::new(Harness::with(packing(4, 60)).await);
    h.mock.hold("/act_6/ads");
    let target = "/v26.0/act_6/ads?access_token=EAAtokenA".to_owned();
    let before = fire(&h, vec![target.clone()], vec![]);
    h.mock.wait_for_requests(1).await;
    // A write to the object lands while that read is upstream.
    let write = h
        .send(
            http::Method::POST,
            "/v26.0/act_6?access_token=EAAtokenA",
            &[],
            "name=new",
        )
        .await;
    assert_eq!(write.status, 200);
    let after = fire(&h, vec![target.clone()], vec![]);
    h.mock.wait_for_requests(3).await;
    h.mock.release();
    // The later read reached the upstream itself (the third request above)
    // rather than waiting on the call that started before the write.
    for reply in replies(before)
        .await
        .into_iter()
        .chain(replies(after).await)
    {
        assert_eq!(reply.status, 200);
    }
    assert_eq!(h.mock.requests(), 3);
    assert_eq!(h.metric("graphcache_coalesced_requests_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_shared_call_serves_a_young_enough_entry() {
    let h = Arc::new(Harness::with(|c| c.coalesce.wait = Duration::from_secs(1)).await);
    let target = "/v26.0/act_7/ads?access_token=EAAtokenA";
    let stored = h.get(target).await;
    h.mock.hold("/v26.0/");
    let reply = h.get(target).await;
    h.mock.release();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, stored.body);
    assert_eq!(
        reply.cache_status(),
        "graphcache; fwd=stale; detail=stale-if-error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_batch_hands_its_answer_to_every_waiter_without_retries() {
    let h = Arc::new(Harness::with(packing(1, 60)).await);
    h.mock.set_batch_failure(BatchFailure::Throttled(4));
    let rest = (951..955)
        .map(|i| format!("/v26.0/{i}?access_token=EAAtokenA"))
        .collect();
    let all = one_held_rest_queued(&h, 0, "/v26.0/950?access_token=EAAtokenA", rest, vec![]).await;
    for reply in &all[1..] {
        assert_eq!(reply.status, 403);
        assert_eq!(reply.json()["error"]["code"], 4);
    }
    assert_eq!(
        (h.mock.requests(), h.mock.batches()),
        (2, 1),
        "no item retried alone"
    );
    assert_eq!(h.metric("graphcache_batch_fallbacks_total").await, 0.0);
}
