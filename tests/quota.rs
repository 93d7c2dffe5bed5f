//! Quota: one Graph object is one entry however its path is spelt, and a
//! listing is dropped by a write to any object it shows, so fresh TTLs above
//! 0 stay safe for data written through graphcache.

mod support;

use std::time::Duration;

use serde_json::json;
use support::Harness;

const TOKEN: &str = "access_token=EAAquota";

fn fresh(seconds: u64) -> impl FnOnce(&mut graphcache::Config) {
    move |c| c.routes.default.fresh_ttl = Duration::from_secs(seconds)
}

async fn write(h: &Harness, path: &str) -> support::Reply {
    write_to(h, path, "name=changed").await
}

#[test]
fn the_shipped_recommended_routes_are_valid_when_uncommented() {
    let (routes, rules) = support::recommended_routes();
    assert_eq!(routes.rules.len(), 5, "{rules}");
    let ttl = |path: &str| routes.policy_for(path).fresh_ttl.as_secs();
    assert_eq!(ttl("/v26.0/act_1/insights"), 900);
    assert_eq!(ttl("/v26.0/6001/insights"), 900);
    assert_eq!(ttl("/v26.0/act_1"), 300);
    assert_eq!(ttl("/v26.0/act_1/ads/"), 60);
    assert_eq!(ttl("/v26.0/555"), 60);
    assert!(!routes.policy_for("/v26.0/me/adaccounts").cache);
    assert!(!routes.policy_for("/v26.0/me").cache);
}

#[tokio::test]
async fn a_trailing_slash_is_the_same_entry_for_singles_and_batch_items() {
    let h = Harness::with(fresh(60)).await;
    let first = h.get(&format!("/v26.0/123/?{TOKEN}")).await;
    assert!(first.is_miss());
    let second = h.get(&format!("/v26.0/123?{TOKEN}")).await;
    assert_eq!(second.cache_status(), "graphcache; hit");
    assert_eq!(second.body, first.body);
    // The Python SDK's batch items carry the slash too.
    let batch = h
        .post_batch(
            &format!("/?{TOKEN}"),
            &json!([{"method": "GET", "relative_url": "v26.0/123/"}]),
            &[],
        )
        .await;
    assert_eq!(batch.status, 200);
    assert_eq!(batch.json()[0]["code"], 200);
    assert_eq!(h.mock.reads(), 1, "one Graph call for three spellings");
    // And a write through either spelling drops it.
    write(&h, "/v26.0/123/").await;
    let after = h.get(&format!("/v26.0/123?{TOKEN}")).await;
    assert!(after.is_miss(), "{}", after.cache_status());
    assert_eq!(after.json()["version"], 1);
}

#[tokio::test]
async fn a_write_to_a_listed_object_drops_the_listing() {
    let h = Harness::with(fresh(60)).await;
    h.mock.set_members("act_1", "ads", &["555", "556"]);
    let target = format!("/v26.0/act_1/ads?{TOKEN}");
    assert!(h.get(&target).await.is_miss());
    assert_eq!(h.get(&target).await.cache_status(), "graphcache; hit");
    let reads = h.mock.reads();

    // A write to ad 556 names neither act_1 nor its ads edge.
    write(&h, "/v26.0/556").await;
    let listing = h.get(&target).await;
    assert!(listing.is_miss(), "{}", listing.cache_status());
    let data = listing.json()["data"].clone();
    assert_eq!(
        data[0],
        json!({"id": "555", "name": "Object 555", "version": 0})
    );
    assert_eq!(data[1]["version"], 1, "the listing shows the write");
    assert_eq!(h.mock.reads(), reads + 1);
    // A write to an object the listing does not show leaves it alone.
    write(&h, "/v26.0/999").await;
    assert_eq!(h.get(&target).await.cache_status(), "graphcache; hit");
    assert_eq!(h.mock.reads(), reads + 1);
}

#[tokio::test]
async fn an_ids_answer_is_dropped_by_a_write_to_any_of_its_objects() {
    let h = Harness::with(fresh(60)).await;
    let target = format!("/v26.0/?ids=555,556&{TOKEN}");
    assert!(h.get(&target).await.is_miss());
    assert_eq!(h.get(&target).await.cache_status(), "graphcache; hit");
    write(&h, "/v26.0/555").await;
    let after = h.get(&target).await;
    assert!(after.is_miss(), "{}", after.cache_status());
    assert_eq!(after.json()["555"]["version"], 1);
}

#[tokio::test]
async fn a_listing_showing_more_objects_than_an_entry_may_carry_is_always_revalidated() {
    let h = Harness::with(fresh(60)).await;
    let ids: Vec<String> = (0..150).map(|i| (7000 + i).to_string()).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    h.mock.set_members("act_2", "ads", &ids);
    let target = format!("/v26.0/act_2/ads?{TOKEN}");
    let first = h.get(&target).await;
    assert!(first.is_miss());
    assert!(first.cache().stored, "{}", first.cache_status());
    // Not fresh despite fresh_ttl = 60: its members are not indexed, so
    // Graph is asked (a 304 while nothing changed) ...
    let again = h.get(&target).await;
    assert_eq!(
        again.cache().fwd.as_deref(),
        Some("stale"),
        "{}",
        again.cache_status()
    );
    assert_eq!(again.cache().fwd_status, Some(304));
    assert_eq!(h.mock.not_modified(), 1);
    // ... and a write to a member shows at once.
    write(&h, "/v26.0/7149").await;
    let after = h.get(&target).await;
    assert_eq!(after.status, 200);
    assert_eq!(after.json()["data"][149]["version"], 1);
}

// === async jobs: final results are kept, running statuses are polls ===

async fn create(h: &Harness, edge: &str, field: &str) -> String {
    let reply = write_to(h, &format!("/v26.0/act_1/{edge}"), "name=job").await;
    reply.json()[field]
        .as_str()
        .expect("the reply names the job")
        .to_owned()
}

async fn write_to(h: &Harness, path: &str, body: &str) -> support::Reply {
    let reply = h.post_form(&format!("{path}?{TOKEN}"), body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply
}

#[tokio::test]
async fn a_finished_request_set_and_its_results_are_kept_without_revalidation() {
    // The defaults: fresh_ttl = 0, every other read is revalidated.
    let h = Harness::start().await;
    let set = create(&h, "async_batch_requests", "id").await;
    let status = format!("/v26.0/{set}?fields=is_completed&{TOKEN}");
    let results = format!("/v26.0/{set}/requests?fields=id,status,result&{TOKEN}");

    // Running: polls within async_poll_interval share one Graph call.
    let first = h.get(&status).await;
    assert!(first.is_miss());
    assert_eq!(first.json()["is_completed"], false);
    let reads = h.mock.reads();
    assert_eq!(h.get(&status).await.cache_status(), "graphcache; hit");
    assert_eq!(h.mock.reads(), reads);
    // Its results change while it runs: revalidated on every read.
    assert!(h.get(&results).await.is_miss());
    let again = h.get(&results).await;
    assert_eq!(
        again.cache().fwd_status,
        Some(304),
        "{}",
        again.cache_status()
    );

    // Graph finishes it; a poll that asks Graph learns so.
    h.mock.finish_job(&set);
    let done = h.get_with(&status, &[("cache-control", "no-cache")]).await;
    assert_eq!(done.json()["is_completed"], true);
    let fetched = h.get(&results).await;
    assert_eq!(fetched.json()["data"][0]["status"], "SUCCESS");
    // Final now: served from memory with no call, though fresh_ttl = 0.
    let reads = h.mock.reads();
    for _ in 0..3 {
        let reply = h.get(&results).await;
        assert_eq!(reply.cache_status(), "graphcache; hit");
        assert_eq!(reply.json()["data"][0]["result"]["id"], "9001");
    }
    assert_eq!(h.mock.reads(), reads);
}

#[tokio::test]
async fn a_completed_report_run_keeps_its_insights() {
    let h = Harness::start().await;
    let run = create(&h, "insights", "report_run_id").await;
    let status = format!("/v26.0/{run}?{TOKEN}");
    let insights = format!("/v26.0/{run}/insights?{TOKEN}");
    assert_eq!(h.get(&status).await.json()["async_status"], "Job Running");
    assert_eq!(h.get(&status).await.cache_status(), "graphcache; hit");
    // Not ready: Graph's error, not stored.
    let early = h.get(&insights).await;
    assert_eq!(early.status, 400);
    assert!(!early.cache().stored);

    h.mock.finish_job(&run);
    let done = h.get_with(&status, &[("cache-control", "no-cache")]).await;
    assert_eq!(done.json()["async_status"], "Job Completed");
    assert!(h.get(&insights).await.is_miss());
    let reads = h.mock.reads();
    let kept = h.get(&insights).await;
    assert_eq!(kept.cache_status(), "graphcache; hit");
    assert_eq!(kept.json()["data"][0]["spend"], "12.50");
    assert_eq!(h.mock.reads(), reads);
}

#[tokio::test]
async fn a_job_created_elsewhere_is_learnt_from_its_status_reads() {
    let h = Harness::start().await;
    // Created straight at Graph (another process, Ads Manager).
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let request = http::Request::post(format!("{}/v26.0/act_1/insights?{TOKEN}", h.mock.url()))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let reply = client.request(request).await.unwrap();
    let body = http_body_util::BodyExt::collect(reply.into_body())
        .await
        .unwrap()
        .to_bytes();
    let run = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["report_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let status = format!("/v26.0/{run}?{TOKEN}");
    // Unknown at first, but its first status answer says it runs: that
    // answer is stored as a poll, so the next reads share it.
    assert!(h.get(&status).await.is_miss());
    let reads = h.mock.reads();
    assert_eq!(h.get(&status).await.cache_status(), "graphcache; hit");
    assert_eq!(h.get(&status).await.cache_status(), "graphcache; hit");
    assert_eq!(h.mock.reads(), reads);
    h.mock.finish_job(&run);
    let done = h.get_with(&status, &[("cache-control", "no-cache")]).await;
    assert_eq!(done.json()["async_status"], "Job Completed");
    let insights = format!("/v26.0/{run}/insights?{TOKEN}");
    assert!(h.get(&insights).await.is_miss());
    assert_eq!(h.get(&insights).await.cache_status(), "graphcache; hit");
}
