//! Quota: one Graph object is one entry however its path is spelt, and a
//! listing is dropped by a write to any object it shows, so fresh TTLs above
//! 0 stay safe for data written through graphcache.

mod support;

use std::time::Duration;

use http::Method;
use serde_json::json;
use support::Harness;

const TOKEN: &str = "access_token=EAAquota";

fn fresh(seconds: u64) -> impl FnOnce(&mut graphcache::Config) {
    move |c| c.routes.default.fresh_ttl = Duration::from_secs(seconds)
}

async fn write(h: &Harness, path: &str) -> support::Reply {
    let reply = h
        .send(
            Method::POST,
            &format!("{path}?{TOKEN}"),
            &[("content-type", "application/x-www-form-urlencoded")],
            "name=changed",
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply
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
