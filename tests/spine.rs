//! The request spine's seams (issue: one request path): conditionals on a
//! miss, writes that invalidate what they change, caller identities, paging
//! links, ranges, `Vary` and what a 304 updates. Each test asserts what the
//! client got and what the mock Graph counted.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};
use support::{spawn_get, Harness, MockGraph, Reply};

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const WAITING: &str = "graphcache_coalesce_waiting_requests";

fn fresh(seconds: u64) -> impl FnOnce(&mut graphcache::Config) {
    move |c| c.routes.default.fresh_ttl = Duration::from_secs(seconds)
}

fn batch_form(items: &Value, extra: &[(&str, &str)]) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (k, v) in extra {
        form.append_pair(k, v);
    }
    form.append_pair("batch", &items.to_string());
    form.finish()
}

/// Posts `items` as a form batch to `/v26.0/` with token A in the query, the
/// way the Python SDK sends it.
async fn post_batch_as_a(h: &Harness, items: &Value) -> Reply {
    h.send(
        Method::POST,
        "/v26.0/?access_token=EAAtokenA",
        &[FORM],
        &batch_form(items, &[]),
    )
    .await
}

fn entries(reply: &Reply) -> Vec<Value> {
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json().as_array().expect("an array").clone()
}

fn body_of(entry: &Value) -> Value {
    serde_json::from_str(entry["body"].as_str().expect("body is a string")).unwrap()
}

// === 1. a client conditional on a miss fills the cache ===

#[tokio::test]
async fn clients_that_always_send_if_none_match_are_served_from_the_cache() {
    let h = Harness::with(fresh(60)).await;
    let target = "/v26.0/31?access_token=EAAtokenA";
    let first = h.get(target).await;
    let etag = first.header("etag").unwrap().to_owned();
    // A client-side ETag cache: every later read is conditional.
    for _ in 0..5 {
        let reply = h.get_with(target, &[("if-none-match", &etag)]).await;
        assert_eq!(reply.status, 304);
        assert!(reply.cache().hit);
    }
    // A different client's first conditional read, on a cold key: fetched
    // whole, stored, answered 304 here.
    let other = "/v26.0/32?access_token=EAAtokenA";
    let tag = MockGraph::etag_for(
        &serde_json::to_vec(&json!({"id": "32", "name": "Object 32", "version": 0})).unwrap(),
        "",
    );
    let cold = h.get_with(other, &[("if-none-match", &tag)]).await;
    assert_eq!(cold.status, 304);
    assert!(cold.cache().stored);
    assert!(h.get(other).await.cache().hit);
    assert_eq!((h.mock.requests(), h.mock.conditional()), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_and_plain_reads_of_a_cold_key_share_one_call() {
    let h = Arc::new(Harness::with(fresh(60)).await);
    h.mock.hold("/v26.0/33");
    let target = "/v26.0/33?access_token=EAAtokenA";
    let plain = spawn_get(&h, target, &[]);
    h.mock.wait_for_requests(1).await;
    let conditional = spawn_get(&h, target, &[("if-none-match", "\"nothing-matches\"")]);
    h.wait_for_metric(WAITING, 2.0).await;
    h.mock.release();
    let (plain, conditional) = (plain.await.unwrap(), conditional.await.unwrap());
    assert_eq!(
        (plain.status.as_u16(), conditional.status.as_u16()),
        (200, 200)
    );
    assert_eq!(plain.body, conditional.body);
    assert_eq!(h.mock.requests(), 1);
}

#[tokio::test]
async fn a_batch_item_conditional_on_a_miss_is_fetched_whole_and_answered_locally() {
    let h = Harness::with(fresh(60)).await;
    let tag = MockGraph::etag_for(
        &serde_json::to_vec(&json!({"id": "34", "name": "Object 34", "version": 0})).unwrap(),
        "",
    );
    let items = json!([{"method": "GET", "relative_url": "34", "headers": [format!("If-None-Match: {tag}")]}]);
    let reply = post_batch_as_a(&h, &items).await;
    let entry = &entries(&reply)[0];
    assert_eq!(entry["code"], 304);
    assert!(entry["body"].is_null());
    let (_, sent) = h.mock.seen_batches().pop().unwrap();
    let conditionals = sent[0]["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| {
            h.as_str()
                .is_some_and(|h| h.to_ascii_lowercase().starts_with("if-none-match"))
        })
        .count();
    assert_eq!(conditionals, 0, "{sent:?}");
    // What came back was stored for single reads too.
    assert!(h.get("/v26.0/34?access_token=EAAtokenA").await.cache().hit);
    assert_eq!((h.mock.batch_items(), h.mock.conditional()), (1, 0));
}

// === 2. every write Graph applies invalidates what it changed ===

/// Stores `/v26.0/{id}` for token A and returns its version.
async fn cached_version(h: &Harness, id: &str) -> Value {
    let target = format!("/v26.0/{id}?access_token=EAAtokenA");
    let reply = h.get(&target).await;
    assert_eq!(reply.status, 200);
    assert!(h.get(&target).await.cache().hit, "{id} is cached");
    reply.json()["version"].clone()
}

/// Reads `/v26.0/{id}` again: it must come from upstream, changed.
async fn assert_refetched_changed(h: &Harness, id: &str, before: &Value) {
    let reply = h.get(&format!("/v26.0/{id}?access_token=EAAtokenA")).await;
    assert!(
        !reply.cache().hit,
        "{id} was served stale: {}",
        reply.cache_status()
    );
    assert_ne!(&reply.json()["version"], before, "{id} changed upstream");
}

#[tokio::test]
async fn a_batch_write_to_a_reference_invalidates_the_referenced_object() {
    let h = Harness::with(fresh(300)).await;
    let before = cached_version(&h, "555").await;
    let unrelated = cached_version(&h, "777").await;
    // The reference's target is visible in the reply: exactly it is dropped.
    let items = json!([
        {"method": "GET", "relative_url": "555?fields=id", "name": "obj", "omit_response_on_success": false},
        {"method": "POST", "relative_url": "{result=obj:$.id}", "body": "name=renamed"}
    ]);
    let reply = post_batch_as_a(&h, &items).await;
    assert_eq!(entries(&reply).len(), 2);
    assert_refetched_changed(&h, "555", &before).await;
    assert!(h.get("/v26.0/777?access_token=EAAtokenA").await.cache().hit);
    assert_eq!(h.mock.writes(), 1);
    let _ = unrelated;
}

#[tokio::test]
async fn a_write_whose_target_cannot_be_told_drops_everything() {
    let h = Harness::with(fresh(300)).await;
    let before = cached_version(&h, "556").await;
    let unrelated = cached_version(&h, "778").await;
    // The referenced parent is omitted from the reply (the default), so
    // graphcache cannot see what the write touched: it drops everything.
    let items = json!([
        {"method": "GET", "relative_url": "556?fields=id", "name": "obj"},
        {"method": "POST", "relative_url": "{result=obj:$.id}", "body": "name=renamed"}
    ]);
    let reply = post_batch_as_a(&h, &items).await;
    assert!(entries(&reply)[0].is_null(), "the parent is omitted");
    assert_refetched_changed(&h, "556", &before).await;
    let other = h.get("/v26.0/778?access_token=EAAtokenA").await;
    assert!(other.is_miss(), "{}", other.cache_status());
    assert_eq!(other.json()["version"], unrelated);
    // The id in a body parameter, by reference: the same rule.
    let before = cached_version(&h, "557").await;
    let items = json!([
        {"method": "POST", "relative_url": "act_9/adsets", "name": "set", "body": "name=s"},
        {"method": "POST", "relative_url": "act_9/ads", "body": "adset_id={result=set:$.id}&name=a"}
    ]);
    post_batch_as_a(&h, &items).await;
    assert!(h.get("/v26.0/557?access_token=EAAtokenA").await.is_miss());
    let _ = before;
}

#[tokio::test]
async fn a_batch_sent_as_a_get_with_method_post_invalidates_its_writes() {
    let h = Harness::with(fresh(300)).await;
    let before = cached_version(&h, "558").await;
    let items = json!([{"method": "POST", "relative_url": "558", "body": "name=x"}]);
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("method", "post")
        .append_pair("access_token", "EAAtokenA")
        .append_pair("batch", &items.to_string())
        .finish();
    let reply = h.get(&format!("/v26.0/?{query}")).await;
    assert_eq!(entries(&reply)[0]["code"], 200);
    assert_eq!((h.mock.batches(), h.mock.writes()), (1, 1));
    let sent = h.mock.last();
    assert_eq!(sent.method, Method::POST);
    assert!(!sent.query.contains("method="), "{}", sent.query);
    assert_refetched_changed(&h, "558", &before).await;
}

#[tokio::test]
async fn a_batch_in_the_query_beside_another_body_drops_everything() {
    let h = Harness::with(fresh(300)).await;
    let before = cached_version(&h, "559").await;
    let unrelated = cached_version(&h, "779").await;
    let items = json!([{"method": "POST", "relative_url": "559", "body": "name=x"}]);
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("access_token", "EAAtokenA")
        .append_pair("batch", &items.to_string())
        .finish();
    let reply = h
        .send(
            Method::POST,
            // On a node: graphcache cannot see the batch's items in the
            // query beside this body, so the node alone would not do.
            &format!("/v26.0/act_9?{query}"),
            &[("content-type", "text/plain")],
            "not a form",
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(h.mock.batches(), 1);
    assert_refetched_changed(&h, "559", &before).await;
    let other = h.get("/v26.0/779?access_token=EAAtokenA").await;
    assert!(other.is_miss(), "{}", other.cache_status());
    assert_eq!(other.json()["version"], unrelated);
}

#[tokio::test]
async fn a_form_write_too_large_to_read_whole_drops_everything() {
    let h = Harness::with(fresh(300)).await;
    let named = cached_version(&h, "561").await;
    let unrelated = cached_version(&h, "781").await;
    // `adset_id=561` comes after the first MiB, which is all graphcache reads
    // of a body before forwarding it: it cannot see what the write names.
    let body = format!("name=x&pad={}&adset_id=561", "p".repeat(1 << 20));
    let write = h
        .send(
            Method::POST,
            "/v26.0/act_9/ads?access_token=EAAtokenA",
            &[FORM],
            &body,
        )
        .await;
    assert_eq!(write.status, 200);
    assert_eq!(h.mock.writes(), 1, "forwarded once");
    assert_refetched_changed(&h, "561", &named).await;
    let other = h.get("/v26.0/781?access_token=EAAtokenA").await;
    assert!(other.is_miss(), "{}", other.cache_status());
    assert_eq!(other.json()["version"], unrelated);
    // A large multipart upload to a node (an ad image) names only its node:
    // it drops nothing else.
    let kept = cached_version(&h, "782").await;
    let upload = format!(
        "--b\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n{}\r\n--b--\r\n",
        "i".repeat(1 << 20)
    );
    let write = h
        .send(
            Method::POST,
            "/v26.0/act_9/adimages?access_token=EAAtokenA",
            &[("content-type", "multipart/form-data; boundary=b")],
            &upload,
        )
        .await;
    assert_eq!(write.status, 200);
    assert_eq!(h.mock.writes(), 2);
    let still = h.get("/v26.0/782?access_token=EAAtokenA").await;
    assert!(still.cache().hit, "{}", still.cache_status());
    assert_eq!(still.json()["version"], kept);
}

#[tokio::test]
async fn percent_encoded_ids_and_repeated_methods_are_writes_to_their_object() {
    let h = Harness::with(fresh(300)).await;
    let before = cached_version(&h, "560").await;
    let write = h
        .send(
            Method::POST,
            "/v26.0/%35%36%30?access_token=EAAtokenA",
            &[FORM],
            "name=x",
        )
        .await;
    assert_eq!(write.status, 200);
    assert_refetched_changed(&h, "560", &before).await;
    // `method` twice is ambiguous: a write, never cached, and it invalidates.
    let before = cached_version(&h, "561").await;
    let ambiguous = h
        .get("/v26.0/561?method=get&method=post&access_token=EAAtokenA")
        .await;
    assert_eq!(ambiguous.cache().fwd.as_deref(), Some("method"));
    assert_eq!(h.mock.writes(), 2);
    assert_refetched_changed(&h, "561", &before).await;
}

// === 3. the caller identity covers every credential ===

#[tokio::test]
async fn a_get_item_with_its_own_token_in_the_body_is_never_filed_under_the_batch_token() {
    let h = Harness::with(fresh(300)).await;
    let items = json!([{"method": "GET", "relative_url": "me", "body": "access_token=EAAtokenB"}]);
    let reply = post_batch_as_a(&h, &items).await;
    let made_for_b = body_of(&entries(&reply)[0]);
    let a = h.get("/v26.0/me?access_token=EAAtokenA").await;
    assert!(a.is_miss(), "{}", a.cache_status());
    assert_ne!(a.json()["id"], made_for_b["id"]);
}

#[tokio::test]
async fn two_top_level_tokens_in_a_batch_touch_no_cache() {
    let h = Harness::with(fresh(300)).await;
    let items = json!([{"method": "GET", "relative_url": "me"}]);
    let body = batch_form(
        &items,
        &[("access_token", "EAAtokenA"), ("access_token", "EAAtokenB")],
    );
    let reply = h.send(Method::POST, "/v26.0/", &[FORM], &body).await;
    assert_eq!(entries(&reply).len(), 1);
    for token in ["EAAtokenA", "EAAtokenB"] {
        let plain = h.get(&format!("/v26.0/me?access_token={token}")).await;
        assert!(plain.is_miss(), "{token}: {}", plain.cache_status());
    }
    // The same batch again goes upstream again.
    h.send(Method::POST, "/v26.0/", &[FORM], &body).await;
    assert_eq!(h.mock.batch_items(), 2);
}

#[tokio::test]
async fn empty_tokens_never_touch_the_cache() {
    let h = Harness::with(fresh(300)).await;
    let items = json!([{"method": "GET", "relative_url": "me?access_token="}]);
    for _ in 0..2 {
        post_batch_as_a(&h, &items).await;
    }
    assert_eq!(h.mock.batch_items(), 2);
    for _ in 0..2 {
        let plain = h.get("/v26.0/me?access_token=").await;
        assert_eq!(plain.cache().fwd.as_deref(), Some("bypass"));
    }
    assert_eq!(h.mock.requests(), 4);
}

#[tokio::test]
async fn appsecret_proof_is_part_of_the_identity() {
    let h = Harness::with(fresh(300)).await;
    let right = "/v26.0/62?access_token=EAAtokenA&appsecret_proof=right";
    assert!(h.get(right).await.is_miss());
    assert!(h.get(right).await.cache().hit);
    // A wrong or missing proof is Graph's to refuse, never the entry's to serve.
    for other in [
        "/v26.0/62?access_token=EAAtokenA&appsecret_proof=wrong",
        "/v26.0/62?access_token=EAAtokenA",
    ] {
        assert!(h.get(other).await.is_miss(), "{other}");
    }
    let twice = h
        .get("/v26.0/62?access_token=EAAtokenA&appsecret_proof=right&appsecret_proof=right")
        .await;
    assert_eq!(twice.cache().fwd.as_deref(), Some("bypass"));
    assert_eq!(h.mock.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_batches_never_borrow_another_callers_proof() {
    let h = Arc::new(
        Harness::with(|c| {
            c.packing.max_in_flight = 1;
            c.routes.default.fresh_ttl = Duration::from_secs(60);
        })
        .await,
    );
    h.mock.hold("/v26.0/");
    let first = spawn_get(
        &h,
        "/v26.0/70?access_token=EAAtokenA&appsecret_proof=one",
        &[],
    );
    let second = spawn_get(&h, "/v26.0/71?access_token=EAAtokenA", &[]);
    h.mock.wait_for_requests(2).await;
    let queued = [
        spawn_get(
            &h,
            "/v26.0/72?access_token=EAAtokenA&appsecret_proof=one",
            &[],
        ),
        spawn_get(
            &h,
            "/v26.0/73?access_token=EAAtokenA&appsecret_proof=one",
            &[],
        ),
        spawn_get(&h, "/v26.0/74?access_token=EAAtokenA", &[]),
        spawn_get(&h, "/v26.0/75?access_token=EAAtokenA", &[]),
    ];
    h.wait_for_metric("graphcache_batch_queued_requests", 4.0)
        .await;
    h.mock.release();
    for task in [first, second].into_iter().chain(queued) {
        assert_eq!(task.await.unwrap().status, 200);
    }
    let batches = h.mock.seen_batches();
    assert_eq!(batches.len(), 2);
    for (form, items) in batches {
        let mut ids: Vec<&str> = items
            .iter()
            .map(|i| i["relative_url"].as_str().unwrap())
            .collect();
        ids.sort_unstable();
        match form.get("appsecret_proof").map(String::as_str) {
            Some("one") => assert_eq!(ids, ["72", "73"]),
            None => assert_eq!(ids, ["74", "75"]),
            other => panic!("unexpected proof {other:?}"),
        }
    }
}

// === 4. paging links stay inside the proxy by default ===

#[tokio::test]
async fn paging_links_inside_batch_items_point_back_at_graphcache() {
    let h = Harness::start().await;
    let items = json!([{"method": "GET", "relative_url": "act_1/ads"}]);
    let reply = post_batch_as_a(&h, &items).await;
    let entry = &entries(&reply)[0];
    let next = body_of(entry)["paging"]["next"]
        .as_str()
        .unwrap()
        .to_owned();
    let prefix = format!("http://{}/", h.addr);
    assert!(next.starts_with(&prefix), "{next}");
    let etag = entry["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "ETag")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(etag.starts_with("W/"), "{etag}");
    // Following it stays on graphcache.
    let page2 = h.get(&next[prefix.len() - 1..]).await;
    assert_eq!(page2.status, 200);
    assert_eq!(
        h.mock.last().query,
        "access_token=EAAtokenA&limit=3&after=QVFI"
    );
}

// === 6. a client's Range never reaches a shared call or an entry ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_and_whole_reads_share_a_whole_answer() {
    let h = Arc::new(Harness::with(fresh(60)).await);
    h.mock.hold("/v26.0/80");
    let target = "/v26.0/80?access_token=EAAtokenA";
    let ranged = spawn_get(&h, target, &[("range", "bytes=0-4")]);
    h.mock.wait_for_requests(1).await;
    let whole = spawn_get(&h, target, &[]);
    h.wait_for_metric(WAITING, 2.0).await;
    h.mock.release();
    let (ranged, whole) = (ranged.await.unwrap(), whole.await.unwrap());
    assert_eq!((ranged.status.as_u16(), whole.status.as_u16()), (200, 200));
    assert_eq!(ranged.body, whole.body);
    assert_eq!(whole.json()["id"], "80");
    assert_eq!(h.mock.last().header("range"), None);
    let later = h.get_with(target, &[("range", "bytes=0-1")]).await;
    assert_eq!(
        (later.status.as_u16(), later.body.clone()),
        (200, whole.body)
    );
    assert_eq!(h.mock.requests(), 1);
}

// === 7. Vary is honoured ===

#[tokio::test]
async fn entries_are_served_only_to_requests_that_match_their_vary() {
    let h = Harness::with(fresh(60)).await;
    let target = "/v26.0/varies?access_token=EAAtokenA";
    let one = h.get_with(target, &[("foo", "1")]).await;
    assert_eq!(one.json()["foo"], "1");
    assert!(h.get_with(target, &[("foo", "1")]).await.cache().hit);
    let two = h.get_with(target, &[("foo", "2")]).await;
    assert_eq!(two.cache().fwd.as_deref(), Some("vary-miss"));
    assert_eq!(two.json()["foo"], "2");
    let none = h.get(target).await;
    assert!(!none.cache().hit);
    assert!(none.json()["foo"].is_null());
    assert_eq!(h.mock.requests(), 3);
    // `Vary: *` is never served from the cache.
    let star = "/v26.0/varyall?access_token=EAAtokenA";
    h.get(star).await;
    assert!(!h.get(star).await.cache().hit);
    assert_eq!(h.mock.requests(), 5);
    // Graph's own `Vary: Origin`: requests without Origin share entries.
    h.get("/v26.0/81?access_token=EAAtokenA").await;
    assert!(h.get("/v26.0/81?access_token=EAAtokenA").await.cache().hit);
    let browser = h
        .get_with(
            "/v26.0/81?access_token=EAAtokenA",
            &[("origin", "https://app.example")],
        )
        .await;
    assert_eq!(browser.cache().fwd.as_deref(), Some("vary-miss"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_call_serves_only_requests_that_match_its_vary() {
    let h = Arc::new(Harness::with(fresh(60)).await);
    h.mock.hold("/v26.0/varies");
    let target = "/v26.0/varies?access_token=EAAtokenA";
    let one = spawn_get(&h, target, &[("foo", "1")]);
    h.mock.wait_for_requests(1).await;
    let two = spawn_get(&h, target, &[("foo", "2")]);
    h.wait_for_metric(WAITING, 2.0).await;
    h.mock.release();
    let (one, two) = (one.await.unwrap(), two.await.unwrap());
    assert_eq!(one.json()["foo"], "1");
    assert_eq!(two.json()["foo"], "2");
    assert_eq!(h.mock.requests(), 2);
}

// === 8. a 304 updates the stored headers ===

#[tokio::test]
async fn a_304_replaces_the_stored_headers_except_usage() {
    let h = Harness::with(fresh(60)).await;
    h.mock.tag_answers();
    let target = "/v26.0/82?access_token=EAAtokenA";
    let first = h.get(target).await;
    assert_eq!(first.header("x-mock-answer"), Some("1"));
    h.mock.set_usage(&[(
        "x-app-usage",
        r#"{"call_count":5,"total_cputime":1,"total_time":1}"#,
    )]);
    let revalidated = h.get_with(target, &[("cache-control", "no-cache")]).await;
    assert_eq!(revalidated.cache().fwd_status, Some(304));
    assert_eq!(revalidated.header("x-mock-answer"), Some("2"));
    let hit = h.get(target).await;
    assert!(hit.cache().hit);
    assert_eq!(hit.header("x-mock-answer"), Some("2"));
    assert_eq!(hit.header("x-app-usage"), None);
    assert_eq!(hit.header("etag"), first.header("etag"));
    assert_eq!((h.mock.requests(), h.mock.not_modified()), (2, 1));
}

#[tokio::test]
async fn a_user_limit_on_a_batch_write_throttles_that_user_only() {
    let h = Harness::with(|c| c.throttle.answer_locally = true).await;
    // Graph answers the batch's write item with a user-level limit (code 17,
    // no business header): it speaks about the batch's caller, A.
    h.mock.throttle(17, &[]);
    let items = json!([{"method": "POST", "relative_url": "act_3/ads", "body": "name=x"}]);
    let reply = post_batch_as_a(&h, &items).await;
    assert_eq!(entries(&reply)[0]["code"], 400);
    h.mock.stop_throttling();
    // A is answered locally; B, reading the same account, is not refused.
    let a = h.get("/v26.0/act_3/campaigns?access_token=EAAtokenA").await;
    assert_eq!(a.header("x-graphcache-error"), Some("throttled"));
    let b = h.get("/v26.0/act_3/campaigns?access_token=EAAtokenB").await;
    assert_eq!(b.status, 200, "{}", b.text());
}
