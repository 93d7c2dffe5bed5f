//! End-to-end behaviour of the core proxy against the mock Graph upstream.
//! Every test asserts what the client received and what the upstream counted.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::{dead_address, test_config, Harness, MockGraph, Outage};

const TOKEN_A: &str = "EAAtokenA";
const TOKEN_B: &str = "EAAtokenB";

fn fresh(seconds: u64) -> impl FnOnce(&mut graphcache::Config) {
    move |c| c.routes.default.fresh_ttl = Duration::from_secs(seconds)
}

// === misses, hits, revalidation ===

#[tokio::test]
async fn miss_is_stored_then_revalidated_with_the_stored_etag() {
    // Graph's own tags, so the listing's paging links stay as Graph sent them.
    let h = Harness::with(|c| c.rewrite_paging_links = false).await;
    let first = h
        .get("/v26.0/act_1/campaigns?access_token=EAAtokenA&fields=name")
        .await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.cache_status(),
        "graphcache; fwd=uri-miss; fwd-status=200; stored"
    );
    let etag = first.header("etag").unwrap().to_owned();
    assert_eq!(etag, MockGraph::etag_for(&first.body, ""));
    assert_eq!((h.mock.requests(), h.mock.conditional()), (1, 0));

    let second = h
        .get("/v26.0/act_1/campaigns?access_token=EAAtokenA&fields=name")
        .await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body, first.body);
    assert_eq!(
        second.cache_status(),
        "graphcache; fwd=stale; fwd-status=304"
    );
    assert!(second.header("age").is_some());
    // The 304 carried no ETag: the stored one is kept.
    assert_eq!(second.header("etag"), Some(etag.as_str()));
    assert_eq!(
        (
            h.mock.requests(),
            h.mock.conditional(),
            h.mock.not_modified()
        ),
        (2, 1, 1)
    );
    assert_eq!(h.mock.last().header("if-none-match"), Some(etag.as_str()));
    assert_eq!(
        h.metric("graphcache_requests_total{cache=\"revalidated\"}")
            .await,
        1.0
    );
    assert_eq!(
        h.metric("graphcache_requests_total{cache=\"miss\"}").await,
        1.0
    );
}

#[tokio::test]
async fn fresh_hit_makes_no_upstream_call() {
    let h = Harness::with(fresh(60)).await;
    let first = h.get("/v26.0/123?access_token=EAAtokenA").await;
    let second = h.get("/v26.0/123?access_token=EAAtokenA").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.cache_status(), "graphcache; hit");
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("etag"), first.header("etag"));
    assert_eq!(second.header("content-type"), first.header("content-type"));
    assert!(second.header("age").unwrap().parse::<u64>().unwrap() < 60);
    assert_eq!(h.mock.requests(), 1);
    assert_eq!(
        h.metric("graphcache_requests_total{cache=\"hit\"}").await,
        1.0
    );
}

#[tokio::test]
async fn changed_data_replaces_the_entry() {
    let h = Harness::start().await;
    let first = h.get("/v26.0/77?access_token=EAAtokenA").await;
    h.mock.touch("77");
    let second = h.get("/v26.0/77?access_token=EAAtokenA").await;
    assert_eq!(
        second.cache_status(),
        "graphcache; fwd=stale; fwd-status=200; stored"
    );
    assert_ne!(second.body, first.body);
    assert_eq!(second.json()["version"], 1);
    assert_ne!(second.header("etag"), first.header("etag"));
    // The new entry is what the next revalidation sends.
    let third = h.get("/v26.0/77?access_token=EAAtokenA").await;
    assert_eq!(
        third.cache_status(),
        "graphcache; fwd=stale; fwd-status=304"
    );
    assert_eq!(third.body, second.body);
    assert_eq!(
        (
            h.mock.requests(),
            h.mock.conditional(),
            h.mock.not_modified()
        ),
        (3, 2, 1)
    );
}

#[tokio::test]
async fn client_conditional_matching_the_entry_gets_a_304() {
    let h = Harness::with(fresh(60)).await;
    let first = h.get("/v26.0/5?access_token=EAAtokenA").await;
    let etag = first.header("etag").unwrap();
    let second = h
        .get_with(
            "/v26.0/5?access_token=EAAtokenA",
            &[("if-none-match", etag)],
        )
        .await;
    assert_eq!(second.status, 304);
    assert!(second.body.is_empty());
    assert_eq!(second.header("etag"), Some(etag));
    assert_eq!(h.mock.requests(), 1);
    // A conditional that does not match gets the full body.
    let third = h
        .get_with(
            "/v26.0/5?access_token=EAAtokenA",
            &[("if-none-match", "\"nope\"")],
        )
        .await;
    assert_eq!(
        (third.status, third.body.clone()),
        (StatusCode::OK, first.body.clone())
    );
}

#[tokio::test]
async fn client_conditional_on_a_miss_fills_the_cache_and_is_answered_locally() {
    let h = Harness::start().await;
    let body =
        serde_json::to_vec(&serde_json::json!({"id": "9", "name": "Object 9", "version": 0}))
            .unwrap();
    let etag = MockGraph::etag_for(&body, "curl/8");
    let reply = h
        .get_with(
            "/v26.0/9?access_token=EAAtokenA",
            &[("if-none-match", &etag), ("user-agent", "curl/8")],
        )
        .await;
    assert_eq!(reply.status, 304);
    assert!(reply.body.is_empty());
    // Fetched whole (nginx and Varnish do the same), stored, and the
    // client's conditional answered here.
    assert_eq!((h.mock.conditional(), h.mock.not_modified()), (0, 0));
    assert_eq!(h.mock.last().header("if-none-match"), None);
    let status = reply.cache();
    assert_eq!(status.fwd.as_deref(), Some("uri-miss"));
    assert!(status.stored);
    assert_eq!(reply.header("etag"), Some(etag.as_str()));
    // The next conditional revalidates graphcache's own entry.
    let again = h
        .get_with(
            "/v26.0/9?access_token=EAAtokenA",
            &[("if-none-match", &etag), ("user-agent", "curl/8")],
        )
        .await;
    assert_eq!(again.status, 304);
    assert_eq!(again.cache().fwd.as_deref(), Some("stale"));
    assert_eq!(h.mock.last().header("if-none-match"), Some(etag.as_str()));
    assert_eq!((h.mock.requests(), h.mock.not_modified()), (2, 1));
}

#[tokio::test]
async fn head_is_answered_from_the_get_entry() {
    let h = Harness::with(fresh(60)).await;
    let head = h
        .send(Method::HEAD, "/v26.0/8?access_token=EAAtokenA", &[], "")
        .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    // HEAD was fetched upstream as a GET, so the entry serves both.
    assert_eq!(h.mock.last().method, Method::GET);
    let get = h.get("/v26.0/8?access_token=EAAtokenA").await;
    assert_eq!(get.cache_status(), "graphcache; hit");
    assert_eq!(
        head.header("content-length"),
        Some(get.body.len().to_string().as_str())
    );
    assert_eq!(h.mock.requests(), 1);
}

// === the key ===

#[tokio::test]
async fn entries_never_cross_token_identities() {
    let h = Harness::with(fresh(60)).await;
    let a = h.get(&format!("/v26.0/me?access_token={TOKEN_A}")).await;
    let b = h.get(&format!("/v26.0/me?access_token={TOKEN_B}")).await;
    let bearer = h
        .get_with("/v26.0/me", &[("authorization", "Bearer EAAtokenA")])
        .await;
    let oauth = h
        .get_with("/v26.0/me", &[("authorization", "OAuth EAAtokenB")])
        .await;
    let anonymous = h.get("/v26.0/me").await;
    assert_eq!(h.mock.requests(), 5);
    assert_ne!(a.json()["id"], b.json()["id"]);
    assert_eq!(bearer.json()["id"], a.json()["id"]);
    assert_eq!(oauth.json()["id"], b.json()["id"]);
    assert_ne!(anonymous.json()["id"], a.json()["id"]);
    // Each identity now hits its own entry.
    let a2 = h.get(&format!("/v26.0/me?access_token={TOKEN_A}")).await;
    let bearer2 = h
        .get_with("/v26.0/me", &[("authorization", "Bearer EAAtokenA")])
        .await;
    assert_eq!(
        (a2.cache_status(), a2.body.clone()),
        ("graphcache; hit", a.body.clone())
    );
    assert_eq!(bearer2.body, bearer.body);
    assert_eq!(h.mock.requests(), 5);
}

#[tokio::test]
async fn paging_links_with_the_token_stay_with_their_token() {
    let h = Harness::with(fresh(60)).await;
    let a = h
        .get(&format!("/v26.0/act_1/ads?access_token={TOKEN_A}"))
        .await;
    let b = h
        .get(&format!("/v26.0/act_1/ads?access_token={TOKEN_B}"))
        .await;
    assert!(a.text().contains(TOKEN_A) && !a.text().contains(TOKEN_B));
    assert!(b.text().contains(TOKEN_B) && !b.text().contains(TOKEN_A));
    assert_eq!(h.mock.requests(), 2);
}

#[tokio::test]
async fn query_order_and_encoding_share_one_entry() {
    let h = Harness::with(fresh(60)).await;
    h.get("/v24.0/1?fields=name%2Cstatus&access_token=EAAtokenA")
        .await;
    let other = h
        .get("/v24.0/1?access_token=EAAtokenA&fields=name,status")
        .await;
    assert_eq!(other.cache_status(), "graphcache; hit");
    assert_eq!(h.mock.requests(), 1);
    // appsecret_proof is part of the caller's identity: a request with
    // another (or no) proof never gets this entry, but its own.
    let proof = h
        .get("/v24.0/1?appsecret_proof=abc&fields=name,status&access_token=EAAtokenA")
        .await;
    assert!(proof.is_miss());
    let proof = h
        .get("/v24.0/1?fields=name%2Cstatus&access_token=EAAtokenA&appsecret_proof=abc")
        .await;
    assert_eq!(proof.cache_status(), "graphcache; hit");
}

#[tokio::test]
async fn user_agent_and_version_are_part_of_the_key() {
    let h = Harness::with(fresh(60)).await;
    let python = h
        .get_with(
            "/v26.0/1?access_token=EAAtokenA",
            &[("user-agent", "fbbizsdk-python-v26.0.3")],
        )
        .await;
    let node = h
        .get_with(
            "/v26.0/1?access_token=EAAtokenA",
            &[("user-agent", "fbbizsdk-nodejs-v24.0.0")],
        )
        .await;
    assert_eq!(h.mock.requests(), 2);
    assert_ne!(python.header("etag"), node.header("etag"));
    h.get_with(
        "/v25.0/1?access_token=EAAtokenA",
        &[("user-agent", "fbbizsdk-python-v26.0.3")],
    )
    .await;
    assert_eq!(h.mock.requests(), 3);
}

// === what is not cached ===

#[tokio::test]
async fn client_no_store_bypasses_and_no_cache_revalidates() {
    let h = Harness::with(fresh(60)).await;
    let bypass = h
        .get_with(
            "/v26.0/2?access_token=EAAtokenA",
            &[("cache-control", "no-store")],
        )
        .await;
    assert_eq!(
        bypass.cache_status(),
        "graphcache; fwd=bypass; fwd-status=200"
    );
    let miss = h.get("/v26.0/2?access_token=EAAtokenA").await;
    assert!(
        miss.cache_status().starts_with("graphcache; fwd=uri-miss"),
        "{}",
        miss.cache_status()
    );
    let forced = h
        .get_with(
            "/v26.0/2?access_token=EAAtokenA",
            &[("cache-control", "no-cache")],
        )
        .await;
    assert_eq!(
        forced.cache_status(),
        "graphcache; fwd=request; fwd-status=304"
    );
    assert_eq!((h.mock.requests(), h.mock.conditional()), (3, 1));
}

#[tokio::test]
async fn write_overrides_and_jsonp_are_never_cached() {
    let h = Harness::with(fresh(60)).await;
    for _ in 0..2 {
        let r = h
            .get("/v26.0/act_3/ads?method=post&name=x&access_token=EAAtokenA")
            .await;
        assert_eq!(r.cache_status(), "graphcache; fwd=method; fwd-status=200");
        let r = h
            .get("/v26.0/act_3?callback=cb&access_token=EAAtokenA")
            .await;
        assert_eq!(r.cache_status(), "graphcache; fwd=bypass; fwd-status=200");
    }
    assert_eq!(h.mock.requests(), 4);
}

#[tokio::test]
async fn node_sdk_get_with_empty_json_body_is_cached_and_keeps_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::with(fresh(60)).await;
    let mut stream = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let request = "GET /v24.0/31?access_token=EAAtokenA HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    let mut replies = String::new();
    for _ in 0..2 {
        stream.write_all(request.as_bytes()).await.unwrap();
        // Read one whole response: head, then Content-Length bytes.
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.unwrap();
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap();
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.unwrap();
        replies.push_str(&head);
    }
    assert_eq!(replies.matches("HTTP/1.1 200 OK").count(), 2);
    assert!(replies.contains("cache-status: graphcache; hit"));
    assert_eq!(h.mock.requests(), 1);
    assert!(
        h.mock.last().body.is_empty(),
        "the SDK's {{}} is not forwarded"
    );

    // Any other GET body passes through, uncached, with its body.
    let r = h
        .send(
            Method::GET,
            "/v26.0/32?access_token=EAAtokenA",
            &[("content-type", "application/json")],
            "{\"q\":1}",
        )
        .await;
    assert_eq!(r.cache_status(), "graphcache; fwd=bypass; fwd-status=200");
    assert_eq!(&h.mock.last().body[..], b"{\"q\":1}");
}

#[tokio::test]
async fn errors_cookies_batch_links_and_large_bodies_are_not_stored() {
    let h = Harness::with(|c| {
        c.routes.default.fresh_ttl = Duration::from_secs(60);
        c.max_entry_bytes = 4096;
    })
    .await;
    for target in [
        "/v26.0/me?access_token=bad",
        "/v26.0/suppressed?access_token=EAAtokenA",
        "/v26.0/cookie?access_token=EAAtokenA",
        "/v26.0/batchlinks?access_token=EAAtokenA",
        "/v26.0/big?bytes=10000&access_token=EAAtokenA",
        "/v26.0/missing?access_token=EAAtokenA",
    ] {
        let first = h.get(target).await;
        let second = h.get(target).await;
        assert!(
            !second.cache_status().contains("hit"),
            "{target}: {}",
            second.cache_status()
        );
        assert!(
            !first.cache_status().contains("stored"),
            "{target}: {}",
            first.cache_status()
        );
        assert_eq!(first.body, second.body, "{target}");
    }
    assert_eq!(h.mock.requests(), 12);
    let big = h.get("/v26.0/big?bytes=10000&access_token=EAAtokenA").await;
    assert_eq!(big.json()["blob"].as_str().unwrap().len(), 10000);
    let error = h.get("/v26.0/me?access_token=bad").await;
    assert_eq!(error.status, 400);
    assert_eq!(error.json()["error"]["code"], 190);
}

#[tokio::test]
async fn route_rules_set_ttl_and_turn_caching_off() {
    let mut config = None;
    let h = Harness::with(|c| {
        c.routes.rules = vec![
            graphcache::routes::RouteRule::new(
                "*/insights",
                Some(Duration::from_secs(300)),
                None,
                true,
            ),
            graphcache::routes::RouteRule::new("act_*/adsets", None, None, false),
        ];
        config = Some(c.clone());
    })
    .await;
    h.get("/v26.0/act_1/insights?access_token=EAAtokenA").await;
    let hit = h.get("/v26.0/act_1/insights?access_token=EAAtokenA").await;
    assert_eq!(hit.cache_status(), "graphcache; hit");
    h.get("/v26.0/act_1/adsets?access_token=EAAtokenA").await;
    let again = h.get("/v26.0/act_1/adsets?access_token=EAAtokenA").await;
    assert_eq!(
        again.cache_status(),
        "graphcache; fwd=bypass; fwd-status=200"
    );
    // Other paths keep the global fresh TTL of 0: revalidated.
    h.get("/v26.0/act_1?access_token=EAAtokenA").await;
    let other = h.get("/v26.0/act_1?access_token=EAAtokenA").await;
    assert_eq!(
        other.cache_status(),
        "graphcache; fwd=stale; fwd-status=304"
    );
    assert_eq!(h.mock.requests(), 5);
}

// === upstream failure ===

#[tokio::test]
async fn stale_entries_are_served_when_upstream_fails() {
    let h = Harness::with(|c| c.upstream_timeout = Duration::from_millis(300)).await;
    let stored = h.get("/v26.0/40?access_token=EAAtokenA").await;
    h.mock.set_outage(Outage::Status(503));
    let on_5xx = h.get("/v26.0/40?access_token=EAAtokenA").await;
    assert_eq!(
        (on_5xx.status, on_5xx.body.clone()),
        (StatusCode::OK, stored.body.clone())
    );
    assert_eq!(
        on_5xx.cache_status(),
        "graphcache; fwd=stale; fwd-status=503; detail=stale-if-error"
    );
    h.mock.set_outage(Outage::Close);
    let on_close = h.get("/v26.0/40?access_token=EAAtokenA").await;
    assert_eq!(on_close.body, stored.body);
    assert_eq!(
        on_close.cache_status(),
        "graphcache; fwd=stale; detail=stale-if-error"
    );
    h.mock.set_outage(Outage::None);
    h.mock.set_delay(Duration::from_secs(2));
    let on_timeout = h.get("/v26.0/40?access_token=EAAtokenA").await;
    assert_eq!(on_timeout.body, stored.body);
    assert_eq!(h.mock.requests(), 4);
    assert_eq!(
        h.metric("graphcache_requests_total{cache=\"stale\"}").await,
        3.0
    );
}

#[tokio::test]
async fn without_a_usable_entry_failures_are_graph_envelopes() {
    let h = Harness::with(|c| {
        c.upstream_timeout = Duration::from_millis(300);
        c.routes.default.max_stale = Duration::ZERO;
        c.routes.default.fresh_ttl = Duration::from_secs(1);
    })
    .await;
    h.mock.set_delay(Duration::from_secs(2));
    let timeout = h.get("/v26.0/41?access_token=EAAtokenA").await;
    assert_eq!(timeout.status, 504);
    assert_eq!(timeout.json()["error"]["code"], 2);
    assert_eq!(
        timeout.header("x-graphcache-error"),
        Some("upstream_timeout")
    );
    h.mock.set_delay(Duration::ZERO);
    h.mock.set_outage(Outage::Status(500));
    let five = h.get("/v26.0/41?access_token=EAAtokenA").await;
    // A 5xx with no stale entry is relayed as Graph sent it.
    assert_eq!(five.status, 500);
    assert_eq!(five.json()["error"]["code"], 2);

    let dead = dead_address().await;
    let mut config = test_config(&format!("http://{dead}"));
    config.connect_timeout = Duration::from_secs(1);
    let down = Harness::start_with_mock(MockGraph::start().await, config).await;
    let unreachable = down.get("/v26.0/41?access_token=EAAtokenA").await;
    assert_eq!(unreachable.status, 502);
    assert_eq!(unreachable.json()["error"]["type"], "GraphcacheException");
    assert!(!unreachable.text().contains("EAAtokenA"));
}

// === writes ===

#[tokio::test]
async fn writes_are_forwarded_once_and_invalidate_their_object_for_every_token() {
    let h = Harness::with(fresh(300)).await;
    for token in [TOKEN_A, TOKEN_B] {
        h.get(&format!("/v26.0/act_9/ads?access_token={token}"))
            .await;
        h.get(&format!("/v26.0/act_9?access_token={token}&fields=name"))
            .await;
    }
    h.get(&format!("/v26.0/act_10?access_token={TOKEN_A}"))
        .await;
    assert_eq!(h.mock.requests(), 5);

    let write = h
        .send(
            Method::POST,
            &format!("/v26.0/act_9/ads?access_token={TOKEN_A}"),
            &[("content-type", "application/x-www-form-urlencoded")],
            "name=New+ad&adset_id=555&status=PAUSED",
        )
        .await;
    assert_eq!(write.status, 200);
    assert_eq!(
        write.cache_status(),
        "graphcache; fwd=method; fwd-status=200"
    );
    assert_eq!(h.mock.writes(), 1);
    let seen = h.mock.last();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(&seen.body[..], b"name=New+ad&adset_id=555&status=PAUSED");

    for token in [TOKEN_A, TOKEN_B] {
        let ads = h
            .get(&format!("/v26.0/act_9/ads?access_token={token}"))
            .await;
        assert!(ads.is_miss(), "{}", ads.cache_status());
        assert_eq!(ads.json()["data"][0]["version"], 1);
    }
    // Another object stays cached.
    let other = h
        .get(&format!("/v26.0/act_10?access_token={TOKEN_A}"))
        .await;
    assert_eq!(other.cache_status(), "graphcache; hit");
    assert_eq!(
        h.metric("graphcache_cache_invalidated_entries_total").await,
        4.0
    );
    assert_eq!(
        h.metric("graphcache_requests_total{cache=\"write\"}").await,
        1.0
    );
}

#[tokio::test]
async fn objects_named_in_write_parameters_are_invalidated() {
    let h = Harness::with(fresh(300)).await;
    h.get("/v26.0/555?access_token=EAAtokenA").await;
    h.get("/v26.0/act_77/campaigns?access_token=EAAtokenA")
        .await;
    h.send(
        Method::POST,
        "/v26.0/act_1/ads?access_token=EAAtokenA",
        &[("content-type", "application/json")],
        r#"{"adset_id":"555","account_id":77}"#,
    )
    .await;
    assert!(h.get("/v26.0/555?access_token=EAAtokenA").await.is_miss());
    assert!(h
        .get("/v26.0/act_77/campaigns?access_token=EAAtokenA")
        .await
        .is_miss());
    // DELETE and a GET with method=delete invalidate as well.
    h.get("/v26.0/556?access_token=EAAtokenA").await;
    h.send(Method::DELETE, "/v26.0/556?access_token=EAAtokenA", &[], "")
        .await;
    assert!(h.get("/v26.0/556?access_token=EAAtokenA").await.is_miss());
    h.get("/v26.0/557?access_token=EAAtokenA").await;
    h.get("/v26.0/557?method=delete&access_token=EAAtokenA")
        .await;
    assert!(h.get("/v26.0/557?access_token=EAAtokenA").await.is_miss());
}

#[tokio::test]
async fn a_failed_write_invalidates_nothing_and_is_not_retried() {
    let h = Harness::with(fresh(300)).await;
    h.get("/v26.0/fail?access_token=EAAtokenA").await;
    let write = h
        .send(
            Method::POST,
            "/v26.0/fail?access_token=EAAtokenA",
            &[],
            "x=1",
        )
        .await;
    assert_eq!(write.status, 400);
    assert_eq!(h.mock.writes(), 1);
    assert_eq!(
        h.get("/v26.0/fail?access_token=EAAtokenA")
            .await
            .cache_status(),
        "graphcache; hit"
    );

    // A write that times out is reported, never replayed.
    let slow = Harness::with(|c| c.upstream_timeout = Duration::from_millis(200)).await;
    slow.mock.set_delay(Duration::from_secs(1));
    let timed_out = slow
        .send(
            Method::POST,
            "/v26.0/act_1/ads?access_token=EAAtokenA",
            &[],
            "name=x",
        )
        .await;
    assert_eq!(timed_out.status, 504);
    slow.mock.set_delay(Duration::ZERO);
    slow.get("/v26.0/other?access_token=EAAtokenA").await;
    assert_eq!(slow.mock.writes(), 1);
}

#[tokio::test]
async fn a_read_in_flight_when_a_write_lands_does_not_store_old_data() {
    let h = Harness::with(fresh(300)).await;
    // Only the read is held; the write to its object goes through.
    h.mock.hold("/act_5/campaigns");
    let client = std::sync::Arc::new(h);
    let reader = {
        let h = client.clone();
        tokio::spawn(async move { h.get("/v26.0/act_5/campaigns?access_token=EAAtokenA").await })
    };
    client.mock.wait_for_requests(1).await;
    let write = client
        .send(
            Method::POST,
            "/v26.0/act_5?access_token=EAAtokenA",
            &[],
            "name=new",
        )
        .await;
    assert_eq!(write.status, 200);
    client.mock.release();
    let old = reader.await.unwrap();
    assert_eq!(old.status, 200);
    assert!(
        !old.cache_status().contains("stored"),
        "{}",
        old.cache_status()
    );
    let next = client
        .get("/v26.0/act_5/campaigns?access_token=EAAtokenA")
        .await;
    assert!(next.is_miss(), "{}", next.cache_status());
    assert_eq!(next.json()["data"][0]["version"], 1);
}

// === headers and hygiene ===

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_and_host_is_the_upstream() {
    let h = Harness::start().await;
    let reply = h
        .get_with(
            "/v26.0/60?access_token=EAAtokenA",
            &[
                ("connection", "keep-alive, x-private"),
                ("x-private", "secret"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic eA=="),
                ("accept-encoding", "gzip"),
                ("x-custom", "kept"),
                ("user-agent", "fbbizsdk-python-v26.0.3"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let seen = h.mock.last();
    for gone in [
        "x-private",
        "keep-alive",
        "te",
        "proxy-authorization",
        "accept-encoding",
    ] {
        assert!(seen.header(gone).is_none(), "{gone} reached the upstream");
    }
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert_eq!(seen.header("user-agent"), Some("fbbizsdk-python-v26.0.3"));
    assert_eq!(seen.header("host"), Some(h.mock.addr.to_string().as_str()));
    // Graph's own cache headers reach the client unchanged; no gzip.
    assert_eq!(
        reply.header("cache-control"),
        Some("private, no-cache, no-store, must-revalidate")
    );
    assert!(reply.header("content-encoding").is_none());
}

#[tokio::test]
async fn per_call_headers_are_not_replayed_from_cache() {
    let h = Harness::with(fresh(60)).await;
    let first = h.get("/v26.0/61?access_token=EAAtokenA").await;
    assert!(first.header("x-app-usage").is_some());
    let hit = h.get("/v26.0/61?access_token=EAAtokenA").await;
    assert_eq!(hit.cache_status(), "graphcache; hit");
    assert!(hit.header("x-app-usage").is_none());
    assert!(hit.header("x-fb-trace-id").is_none());
    assert_eq!(hit.header("facebook-api-version"), Some("v26.0"));
}

#[tokio::test]
async fn an_encoded_answer_never_reaches_a_client_that_did_not_accept_it() {
    let h = Harness::start().await;
    let refused = h.get("/v26.0/gzipped?access_token=EAAtokenA").await;
    assert_eq!(refused.status, 502);
    assert_eq!(
        refused.header("x-graphcache-error"),
        Some("upstream_encoding")
    );
    let accepted = h
        .get_with(
            "/v26.0/gzipped?access_token=EAAtokenA",
            &[("accept-encoding", "gzip")],
        )
        .await;
    assert_eq!(accepted.header("content-encoding"), Some("gzip"));
    assert!(!accepted.cache_status().contains("stored"));
}

#[tokio::test]
async fn writes_that_may_have_applied_invalidate_even_without_an_answer() {
    let h = Harness::with(|c| {
        c.routes.default.fresh_ttl = Duration::from_secs(300);
        c.upstream_timeout = Duration::from_millis(300);
    })
    .await;
    h.get("/v26.0/act_11/ads?access_token=EAAtokenA").await;
    h.mock.set_delay(Duration::from_secs(1));
    let timed_out = h
        .send(
            Method::POST,
            "/v26.0/act_11/ads?access_token=EAAtokenA",
            &[],
            "name=x",
        )
        .await;
    assert_eq!(timed_out.status, 504);
    h.mock.set_delay(Duration::ZERO);
    let after = h.get("/v26.0/act_11/ads?access_token=EAAtokenA").await;
    assert!(after.is_miss(), "{}", after.cache_status());
    assert_eq!(h.mock.writes(), 1);
}

#[tokio::test]
async fn a_write_whose_client_disconnects_still_invalidates() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::with(fresh(300)).await;
    h.get("/v26.0/act_12/ads?access_token=EAAtokenA").await;
    h.mock.hold("/act_12/ads");
    let mut client = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    client
        .write_all(b"POST /v26.0/act_12/ads?access_token=EAAtokenA HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nname=x")
        .await
        .unwrap();
    h.mock.wait_for_requests(2).await;
    drop(client);
    h.mock.release();
    // The write completes upstream and its invalidation runs regardless.
    h.wait_for_metric_at_least("graphcache_cache_invalidated_entries_total", 1.0)
        .await;
    assert!(h
        .get("/v26.0/act_12/ads?access_token=EAAtokenA")
        .await
        .is_miss());
    assert_eq!(h.mock.writes(), 1);
}

#[tokio::test]
async fn any_authorization_header_identifies_the_caller() {
    let h = Harness::with(fresh(60)).await;
    h.get_with("/v26.0/70", &[("authorization", "Basic dXNlcjE=")])
        .await;
    let other = h
        .get_with("/v26.0/70", &[("authorization", "Basic dXNlcjI=")])
        .await;
    let anonymous = h.get("/v26.0/70").await;
    assert!(other.is_miss(), "{}", other.cache_status());
    assert!(anonymous.is_miss(), "{}", anonymous.cache_status());
    assert_eq!(h.mock.requests(), 3);
}

#[tokio::test]
async fn two_tokens_in_one_query_bypass_the_cache() {
    let h = Harness::with(fresh(60)).await;
    h.get("/v26.0/me?access_token=EAAtokenA").await;
    let both = h
        .get("/v26.0/me?access_token=EAAtokenA&access_token=EAAtokenB")
        .await;
    assert_eq!(
        both.cache_status(),
        "graphcache; fwd=bypass; fwd-status=200"
    );
    let again = h
        .get("/v26.0/me?access_token=EAAtokenA&access_token=EAAtokenB")
        .await;
    assert_eq!(
        again.cache_status(),
        "graphcache; fwd=bypass; fwd-status=200"
    );
    assert_eq!(h.mock.requests(), 3);
}

#[tokio::test]
async fn paging_links_can_point_back_at_graphcache() {
    let h = Harness::with(|c| {
        c.rewrite_paging_links = true;
        c.routes.default.fresh_ttl = Duration::from_secs(60);
    })
    .await;
    let page1 = h.get("/v26.0/act_1/ads?access_token=EAAtokenA").await;
    let next = page1.json()["paging"]["next"].as_str().unwrap().to_owned();
    let prefix = format!("http://{}/", h.addr);
    assert!(next.starts_with(&prefix), "{next}");
    // Following the link verbatim (as the Node SDK's cursor does) stays on
    // graphcache; a cached copy is rewritten the same way.
    let page2 = h.get(&next[prefix.len() - 1..]).await;
    assert_eq!(page2.status, 200);
    assert!(
        page2.json()["paging"].get("next").is_none(),
        "page 2 is the last"
    );
    assert_eq!(
        h.mock.last().query,
        "access_token=EAAtokenA&limit=3&after=QVFI"
    );
    let again = h.get("/v26.0/act_1/ads?access_token=EAAtokenA").await;
    assert_eq!(again.cache_status(), "graphcache; hit");
    assert_eq!(again.body, page1.body);
    assert_eq!(h.mock.requests(), 2);
}

#[tokio::test]
async fn a_4xx_answer_to_a_revalidation_drops_the_entry() {
    let h = Harness::with(|c| c.routes.default.max_stale = Duration::from_secs(3600)).await;
    h.get("/v26.0/80?access_token=EAAtokenA").await;
    // The token is no longer accepted: Graph answers the revalidation 400.
    h.mock.throttle(190, &[]);
    let refused = h.get("/v26.0/80?access_token=EAAtokenA").await;
    assert_eq!(refused.status, 400);
    h.mock.stop_throttling();
    // No entry is left to revalidate: the next read is a plain miss.
    let next = h.get("/v26.0/80?access_token=EAAtokenA").await;
    assert!(next.is_miss(), "{}", next.cache_status());
    assert_eq!(h.mock.seen().last().unwrap().header("if-none-match"), None);
}

#[tokio::test]
async fn paging_links_are_rewritten_by_default_and_left_alone_when_off_and_in_writes() {
    let h = Harness::with(|c| c.rewrite_paging_links = false).await;
    let page = h.get("/v26.0/act_1/ads?access_token=EAAtokenA").await;
    assert!(page.json()["paging"]["next"]
        .as_str()
        .unwrap()
        .starts_with("https://graph.facebook.com/"));
    // The default rewrites them (the Node SDK and Airbyte follow them).
    let rewriting = Harness::start().await;
    // A write's answer is never rewritten, whatever it holds.
    let write = rewriting
        .send(
            Method::POST,
            "/v26.0/act_1/ads?access_token=EAAtokenA",
            &[],
            "name=x",
        )
        .await;
    assert_eq!(write.status, 200);
    let page = rewriting
        .get("/v26.0/act_1/ads?access_token=EAAtokenA")
        .await;
    assert!(page.json()["paging"]["next"]
        .as_str()
        .unwrap()
        .starts_with("http://127.0.0.1:"));
    assert!(
        page.header("etag").unwrap().starts_with("W/\""),
        "a rewritten body has a weak tag"
    );
}

#[tokio::test]
async fn hits_have_their_paging_links_rewritten_and_plain_entries_skip_the_scan() {
    let h = Harness::with(|c| c.routes.default.fresh_ttl = Duration::from_secs(60)).await;
    let target = "/v26.0/act_1/ads?access_token=EAAtokenA";
    h.get(target).await;
    // The entry remembers it holds a link: a hit is rewritten like a miss.
    let hit = h.get(target).await;
    assert!(hit.cache().hit, "{}", hit.cache_status());
    let next = hit.json()["paging"]["next"].as_str().unwrap().to_owned();
    assert!(next.starts_with(&format!("http://{}/", h.addr)), "{next}");
    // A node without links is served as stored.
    h.get("/v26.0/act_1?access_token=EAAtokenA").await;
    let plain = h.get("/v26.0/act_1?access_token=EAAtokenA").await;
    assert!(plain.cache().hit);
    assert!(!plain.text().contains("127.0.0.1"));
    assert_eq!(
        plain.header("etag").map(|t| t.starts_with("W/")),
        Some(false)
    );
}
