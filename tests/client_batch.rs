//! Client batch requests in the shapes the SDKs send (contract §2, §6):
//! items the cache can answer are answered, the rest go upstream as one
//! batch, and the reply keeps one entry per item in request order.

mod support;

use std::time::Duration;

use http::Method;
use serde_json::{json, Value};
use support::{Harness, Reply};

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const JSON: (&str, &str) = ("content-type", "application/json");
const PY_UA: &str = "fbbizsdk-python-v26.0.3";

fn fresh(seconds: u64) -> impl FnOnce(&mut graphcache::Config) {
    move |c| c.routes.default.fresh_ttl = Duration::from_secs(seconds)
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut f = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        f.append_pair(k, v);
    }
    f.finish()
}

fn entries(reply: &Reply) -> Vec<Value> {
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply
        .json()
        .as_array()
        .expect("a batch reply is an array")
        .clone()
}

fn body_of(entry: &Value) -> Value {
    serde_json::from_str(entry["body"].as_str().expect("body is a string")).unwrap()
}

/// The Python SDK's batch: form `batch=[...]`, tokens in the query string,
/// posted to `/v26.0/`, trailing-slash relative URLs.
async fn python_batch(h: &Harness, ids: &[&str]) -> Reply {
    let items: Vec<Value> = ids
        .iter()
        .map(|id| json!({"method": "GET", "relative_url": format!("{id}/?fields=name")}))
        .collect();
    h.send(
        Method::POST,
        "/v26.0/?access_token=EAAtokenA&appsecret_proof=9967",
        &[FORM, ("user-agent", PY_UA)],
        &form(&[("batch", &serde_json::to_string(&items).unwrap())]),
    )
    .await
}

#[tokio::test]
async fn python_sdk_batches_are_stored_like_single_gets_and_then_served_whole() {
    let h = Harness::with(fresh(60)).await;
    let first = python_batch(&h, &["111", "222", "333"]).await;
    let items = entries(&first);
    assert_eq!(items.len(), 3);
    for (entry, id) in items.iter().zip(["111", "222", "333"]) {
        assert_eq!(entry["code"], 200);
        assert_eq!(body_of(entry)["id"], id);
    }
    assert_eq!(
        first.cache_status(),
        "graphcache; fwd=method; fwd-status=200; detail=cached-0-of-3"
    );
    assert_eq!((h.mock.batches(), h.mock.batch_items()), (1, 3));
    let (upstream_form, upstream_items) = h.mock.seen_batches().pop().unwrap();
    assert_eq!(upstream_form["include_headers"], "true");
    assert_eq!(upstream_items[0]["relative_url"], "111/?fields=name");
    assert_eq!(
        h.mock.last().query,
        "access_token=EAAtokenA&appsecret_proof=9967"
    );

    // The item answers were stored under the single GET's key, for the
    // same token and proof.
    let single = h
        .get_with(
            "/v26.0/111/?fields=name&access_token=EAAtokenA&appsecret_proof=9967",
            &[("user-agent", PY_UA)],
        )
        .await;
    assert_eq!(single.cache_status(), "graphcache; hit");
    assert_eq!(single.json(), body_of(&items[0]));

    // The same batch again: no upstream call at all.
    let again = python_batch(&h, &["111", "222", "333"]).await;
    assert_eq!(
        again.cache_status(),
        "graphcache; hit; detail=cached-3-of-3"
    );
    let again_items = entries(&again);
    for (a, b) in again_items.iter().zip(&items) {
        assert_eq!(a["code"], 200);
        assert_eq!(body_of(a), body_of(b));
        let etag = a["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == "ETag")
            .unwrap();
        assert!(etag["value"].as_str().unwrap().starts_with('"'));
    }
    assert_eq!(h.mock.requests(), 1);
    assert_eq!(
        h.metric("graphcache_client_batch_items_total{result=\"hit\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn node_sdk_json_batches_share_entries_with_encoded_single_gets() {
    let h = Harness::with(fresh(60)).await;
    let ua = "fbbizsdk-nodejs-v24.0.0";
    let single = h
        .get_with(
            "/v24.0/111?fields=name%2Cstatus&access_token=EAAtokenA",
            &[("user-agent", ua)],
        )
        .await;
    assert_eq!(single.status, 200);
    let batch = json!({"batch": [
        {"method": "GET", "relative_url": "111?fields=name,status"},
        {"method": "GET", "relative_url": "222?fields=name,status"}
    ]});
    let reply = h
        .send(
            Method::POST,
            "/v24.0?access_token=EAAtokenA",
            &[JSON, ("user-agent", ua)],
            &batch.to_string(),
        )
        .await;
    let items = entries(&reply);
    assert_eq!(body_of(&items[0]), single.json());
    assert_eq!(body_of(&items[1])["id"], "222");
    assert_eq!(
        reply.cache_status(),
        "graphcache; fwd=partial; fwd-status=200; detail=cached-1-of-2"
    );
    // Only the uncached item went upstream, posted where the client posted.
    let (_, upstream_items) = h.mock.seen_batches().pop().unwrap();
    assert_eq!(
        upstream_items,
        vec![json!({"method": "GET", "relative_url": "222?fields=name,status"})]
    );
    assert_eq!(h.mock.last().path, "/v24.0");
}

#[tokio::test]
async fn documented_form_with_string_headers_at_the_root() {
    let h = Harness::with(fresh(60)).await;
    h.get("/v26.0/act_1/ads?access_token=EAAtokenA").await;
    let items = json!([
        {"method": "GET", "relative_url": "v26.0/act_1/ads"},
        {"method": "GET", "relative_url": "/v26.0/act_2/ads", "headers": ["Accept-Language: en_US"]},
    ]);
    let reply = h
        .send(
            Method::POST,
            "/",
            &[FORM],
            &form(&[("access_token", "EAAtokenA"), ("batch", &items.to_string())]),
        )
        .await;
    let entries = entries(&reply);
    assert_eq!(entries.len(), 2);
    assert_eq!(body_of(&entries[0])["data"][0]["id"], "act_1_ads_0");
    assert_eq!(body_of(&entries[1])["data"][0]["id"], "act_2_ads_0");
    let (upstream_form, upstream_items) = h.mock.seen_batches().pop().unwrap();
    assert_eq!(upstream_form["access_token"], "EAAtokenA");
    assert_eq!(upstream_items.len(), 1);
    assert_eq!(
        upstream_items[0]["headers"],
        json!(["Accept-Language: en_US"])
    );
}

#[tokio::test]
async fn partial_hits_send_only_the_rest_and_keep_the_order() {
    let h = Harness::with(fresh(60)).await;
    python_batch(&h, &["1", "3"]).await;
    let reply = python_batch(&h, &["1", "2", "3"]).await;
    let items = entries(&reply);
    let ids: Vec<String> = items
        .iter()
        .map(|e| body_of(e)["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["1", "2", "3"]);
    let (_, upstream_items) = h.mock.seen_batches().pop().unwrap();
    assert_eq!(upstream_items.len(), 1);
    assert_eq!(upstream_items[0]["relative_url"], "2/?fields=name");
    assert_eq!(
        reply.cache_status(),
        "graphcache; fwd=partial; fwd-status=200; detail=cached-2-of-3"
    );
}

#[tokio::test]
async fn stale_items_are_revalidated_inside_the_batch() {
    let h = Harness::start().await;
    let first = entries(&python_batch(&h, &["41", "42"]).await);
    h.mock.touch("42");
    let second = entries(&python_batch(&h, &["41", "42"]).await);
    // 41 unchanged: a 304 item, turned back into a 200 with the stored body.
    assert_eq!(second[0]["code"], 200);
    assert_eq!(second[0]["body"], first[0]["body"]);
    assert_eq!(body_of(&second[1])["version"], 1);
    let (_, upstream_items) = h.mock.seen_batches().pop().unwrap();
    for item in &upstream_items {
        let header = item["headers"][0].as_str().unwrap();
        assert!(header.starts_with("If-None-Match: \""), "{header}");
    }
    assert_eq!(h.mock.not_modified(), 1);
    assert_eq!(
        h.metric("graphcache_client_batch_items_total{result=\"revalidated\"}")
            .await,
        1.0
    );

    // An item with its own matching conditional gets the 304 it asked for.
    let etag = second[0]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "ETag")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let items = json!([{"method": "GET", "relative_url": "41/?fields=name", "headers": [{"name": "If-None-Match", "value": etag}]}]);
    let reply = h
        .send(
            Method::POST,
            "/v26.0/?access_token=EAAtokenA",
            &[FORM, ("user-agent", PY_UA)],
            &form(&[("batch", &items.to_string())]),
        )
        .await;
    let entry = &entries(&reply)[0];
    assert_eq!(entry["code"], 304);
    assert!(entry["body"].is_null());
}

#[tokio::test]
async fn dependency_chains_go_upstream_unchanged_and_in_order() {
    let h = Harness::with(fresh(60)).await;
    // Even cached, items in a chain are not answered locally.
    h.get("/v26.0/act_7/campaigns?access_token=EAAtokenA").await;
    let items = json!([
        {"method": "GET", "relative_url": "act_7/campaigns", "name": "get-campaigns"},
        {"method": "GET", "relative_url": "?ids={result=get-campaigns:$.data.*.id}"},
        {"method": "POST", "relative_url": "act_7/adcreatives", "name": "create_creative", "body": "name=x"},
        {"method": "POST", "relative_url": "act_7/ads", "body": "creative={\"creative_id\":\"{result=create_creative:$.id}\"}"},
    ]);
    let reply = h
        .send(
            Method::POST,
            "/v26.0?access_token=EAAtokenA",
            &[FORM],
            &form(&[("batch", &items.to_string())]),
        )
        .await;
    let got = entries(&reply);
    assert_eq!(got.len(), 4);
    // Depended-on items come back null (omit_response_on_success).
    assert!(got[0].is_null() && got[2].is_null());
    let ids = body_of(&got[1]);
    assert!(ids.get("act_7_campaigns_0").is_some(), "{ids}");
    assert_eq!(got[3]["code"], 200);
    let (_, upstream_items) = h.mock.seen_batches().pop().unwrap();
    assert_eq!(Value::Array(upstream_items), items);
}

#[tokio::test]
async fn a_write_in_the_batch_keeps_reads_of_its_object_upstream_and_invalidates_it() {
    let h = Harness::with(fresh(60)).await;
    h.get("/v26.0/act_5?access_token=EAAtokenA").await;
    h.get("/v26.0/act_6?access_token=EAAtokenA").await;
    let items = json!([
        {"method": "POST", "relative_url": "act_5", "body": "name=renamed"},
        {"method": "GET", "relative_url": "act_5"},
        {"method": "GET", "relative_url": "act_6"},
    ]);
    let reply = h
        .send(
            Method::POST,
            "/v26.0/?access_token=EAAtokenA",
            &[FORM],
            &form(&[("batch", &items.to_string())]),
        )
        .await;
    let got = entries(&reply);
    assert_eq!(got[0]["code"], 200);
    let (_, upstream_items) = h.mock.seen_batches().pop().unwrap();
    assert_eq!(
        upstream_items.len(),
        2,
        "act_6 came from the cache, act_5 did not"
    );
    assert_eq!(h.mock.writes(), 1);
    // The write item invalidated act_5 for later single reads.
    let after = h.get("/v26.0/act_5?access_token=EAAtokenA").await;
    assert!(after.is_miss(), "{}", after.cache_status());
    assert_eq!(after.json()["version"], 1);
    assert_eq!(
        h.get("/v26.0/act_6?access_token=EAAtokenA")
            .await
            .cache_status(),
        "graphcache; hit"
    );
}

#[tokio::test]
async fn include_headers_false_is_honoured_on_the_way_out_only() {
    let h = Harness::with(fresh(60)).await;
    python_batch(&h, &["61"]).await;
    let items = json!([{"method": "GET", "relative_url": "61/?fields=name"}, {"method": "GET", "relative_url": "62/?fields=name"}]);
    let reply = h
        .send(
            Method::POST,
            "/v26.0/?access_token=EAAtokenA",
            &[FORM, ("user-agent", PY_UA)],
            &form(&[("include_headers", "false"), ("batch", &items.to_string())]),
        )
        .await;
    for entry in entries(&reply) {
        assert!(entry.get("headers").is_none(), "{entry}");
        assert_eq!(entry["code"], 200);
    }
    let (upstream_form, _) = h.mock.seen_batches().pop().unwrap();
    assert_eq!(upstream_form["include_headers"], "true");
}

#[tokio::test]
async fn null_items_come_back_null_for_the_sdk_to_retry() {
    let h = Harness::start().await;
    h.mock.null_once("72");
    let got = entries(&python_batch(&h, &["71", "72", "73"]).await);
    assert_eq!(got[0]["code"], 200);
    assert!(got[1].is_null());
    assert_eq!(got[2]["code"], 200);
    assert_eq!(h.mock.requests(), 1);
}

#[tokio::test]
async fn more_than_fifty_items_get_graphs_answer_and_nothing_is_forwarded() {
    let h = Harness::start().await;
    let ids: Vec<String> = (0..51).map(|i| i.to_string()).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let reply = python_batch(&h, &ids).await;
    assert_eq!(reply.status, 400);
    let error = &reply.json()["error"];
    assert_eq!(
        error["message"],
        "Too many requests in batch message. Maximum batch size is 50"
    );
    assert_eq!(error["type"], "GraphBatchException");
    assert_eq!(h.mock.requests(), 0);
}

#[tokio::test]
async fn malformed_batches_are_refused_before_anything_is_forwarded() {
    let h = Harness::start().await;
    for batch in [
        "[{\"method\":\"GET\"",
        "{\"method\":\"GET\"}",
        "[{\"relative_url\":\"me\"}]",
        "[{\"method\":\"GET\",\"relative_url\":\"me\",\"headers\":[\"X-A: 1\\r\\nX-B: 2\"]}]",
        "[{\"method\":\"GET\",\"relative_url\":\"me\",\"headers\":[\"no colon\"]}]",
    ] {
        let reply = h
            .send(
                Method::POST,
                "/v26.0/?access_token=EAAtokenA",
                &[FORM],
                &form(&[("batch", batch)]),
            )
            .await;
        assert_eq!(reply.status, 400, "{batch}");
        assert_eq!(
            reply.json()["error"]["type"],
            "GraphBatchException",
            "{batch}"
        );
    }
    let reply = h
        .send(
            Method::POST,
            "/v26.0/?access_token=EAAtokenA",
            &[JSON],
            r#"{"batch":"[not json"}"#,
        )
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(h.mock.requests(), 0);
    // A JSON POST that is not an object and names no batch is just a write.
    let write = h
        .send(
            Method::POST,
            "/v26.0/act_1/ads?access_token=EAAtokenA",
            &[JSON],
            "[1,2]",
        )
        .await;
    assert_eq!(
        write.cache_status(),
        "graphcache; fwd=method; fwd-status=200"
    );
    assert_eq!(h.mock.writes(), 1);
}

#[tokio::test]
async fn multipart_batches_and_jsonp_pass_through_untouched() {
    let h = Harness::with(fresh(60)).await;
    let multipart = "--XyZ\r\nContent-Disposition: form-data; name=\"batch\"\r\n\r\n[{\"method\":\"POST\",\"relative_url\":\"act_1/adimages\",\"attached_files\":\"file1\"}]\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file1\"; filename=\"a.png\"\r\n\r\nPNGDATA\r\n--XyZ--\r\n";
    let reply = h
        .send(
            Method::POST,
            "/v26.0/?access_token=EAAtokenA",
            &[("content-type", "multipart/form-data; boundary=XyZ")],
            multipart,
        )
        .await;
    assert_eq!(
        reply.cache_status(),
        "graphcache; fwd=method; fwd-status=200"
    );
    assert_eq!(h.mock.last().body, multipart.as_bytes());
    let jsonp = h
        .send(
            Method::POST,
            "/v26.0/?access_token=EAAtokenA&callback=cb",
            &[FORM],
            &form(&[("batch", "[{\"method\":\"GET\",\"relative_url\":\"me\"}]")]),
        )
        .await;
    assert_eq!(
        jsonp.cache_status(),
        "graphcache; fwd=method; fwd-status=200"
    );
}

#[tokio::test]
async fn async_batch_api_passes_through_as_a_write_and_request_sets_revalidate() {
    let h = Harness::with(fresh(60)).await;
    h.get("/v26.0/act_8/campaigns?access_token=EAAtokenA").await;
    let adbatch = json!([{"name": "create", "relative_url": "act_8/ads", "body": "name=x"}]);
    let reply = h
        .send(
            Method::POST,
            "/v26.0/act_8/async_batch_requests?access_token=EAAtokenA",
            &[FORM],
            &form(&[("adbatch", &adbatch.to_string()), ("name", "my set")]),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(h.mock.writes(), 1);
    assert!(h
        .get("/v26.0/act_8/campaigns?access_token=EAAtokenA")
        .await
        .is_miss());
    // Reads of request sets are stored but always revalidated.
    h.get("/v26.0/act_8/asyncadrequestsets?access_token=EAAtokenA")
        .await;
    let again = h
        .get("/v26.0/act_8/asyncadrequestsets?access_token=EAAtokenA")
        .await;
    assert_eq!(
        again.cache_status(),
        "graphcache; fwd=stale; fwd-status=304"
    );
}

#[tokio::test]
async fn a_write_item_answered_null_still_invalidates() {
    let h = Harness::with(fresh(60)).await;
    h.get("/v26.0/555?access_token=EAAtokenA").await;
    h.mock.null_once("555");
    let items = json!([{"method": "POST", "relative_url": "555", "body": "name=renamed"}]);
    let reply = h
        .send(
            Method::POST,
            "/v26.0/?access_token=EAAtokenA",
            &[FORM],
            &form(&[("batch", &items.to_string())]),
        )
        .await;
    assert!(entries(&reply)[0].is_null());
    let after = h.get("/v26.0/555?access_token=EAAtokenA").await;
    assert!(after.is_miss(), "{}", after.cache_status());
}

#[tokio::test]
async fn a_batch_failing_whole_with_a_5xx_still_invalidates_its_writes() {
    let h = Harness::with(fresh(60)).await;
    h.get("/v26.0/act_4?access_token=EAAtokenA").await;
    h.mock
        .set_batch_failure(support::mock_graph::BatchFailure::Status(500));
    let items = json!([{"method": "POST", "relative_url": "act_4", "body": "name=x"}]);
    let reply = h
        .post_batch("/v26.0/?access_token=EAAtokenA", &items, &[])
        .await;
    assert_eq!(reply.status, 500);
    h.mock
        .set_batch_failure(support::mock_graph::BatchFailure::None);
    let after = h.get("/v26.0/act_4?access_token=EAAtokenA").await;
    assert!(after.is_miss(), "{}", after.cache_status());
}

#[tokio::test]
async fn a_batch_whose_client_disconnects_still_invalidates_its_writes() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::with(fresh(60)).await;
    h.get("/v26.0/act_6/ads?access_token=EAAtokenA").await;
    h.mock.hold("/v26.0/");
    let items = json!([{"method": "POST", "relative_url": "act_6/ads", "body": "name=x"}]);
    let body = form(&[("batch", &items.to_string())]);
    let mut client = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "POST /v26.0/?access_token=EAAtokenA HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(body.as_bytes()).await.unwrap();
    h.mock.wait_for_requests(2).await;
    drop(client);
    h.mock.release();
    h.wait_for_metric_at_least("graphcache_cache_invalidated_entries_total", 1.0)
        .await;
    let after = h.get("/v26.0/act_6/ads?access_token=EAAtokenA").await;
    assert!(after.is_miss(), "{}", after.cache_status());
}

#[tokio::test]
async fn different_tokens_in_query_and_body_keep_the_batch_out_of_the_cache() {
    let h = Harness::with(fresh(60)).await;
    h.get("/v26.0/90?access_token=EAAtokenA").await;
    let items = json!([{"method": "GET", "relative_url": "90"}]);
    let reply = h
        .send(
            Method::POST,
            "/v26.0/?access_token=EAAtokenA",
            &[FORM],
            &form(&[("access_token", "EAAtokenB"), ("batch", &items.to_string())]),
        )
        .await;
    assert_eq!(
        reply.cache_status(),
        "graphcache; fwd=method; fwd-status=200; detail=cached-0-of-1"
    );
    assert_eq!(h.mock.batches(), 1);
}
