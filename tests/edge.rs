//! Bad input, limits, protocols, operations: what a new user tries first.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use support::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes and reads until the server closes or `timeout` passes.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn absolute_form_targets_naming_another_host_are_refused() {
    let h = Harness::start().await;
    let reply = raw(
        h.addr,
        b"GET http://evil.example/v26.0/me?access_token=EAAx HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(
        reply.contains("\"type\":\"GraphcacheException\""),
        "{reply}"
    );
    assert!(
        reply.contains("x-graphcache-error: foreign_target"),
        "{reply}"
    );
    assert_eq!(h.mock.requests(), 0);
    // The upstream's own host in absolute form is served, by the upstream.
    let own = format!(
        "GET http://{}/v26.0/me?access_token=EAAx HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        h.mock.addr, h.mock.addr
    );
    let reply = raw(h.addr, own.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(h.mock.requests(), 1);
    // The upstream's host on another port (or the default port, or another
    // scheme's default) is another authority: refused, nothing sent.
    let other_port = support::dead_address().await.port();
    for target in [
        format!("http://127.0.0.1:{other_port}"),
        "http://127.0.0.1".to_owned(),
        format!("https://127.0.0.1:{}", h.mock.addr.port() + 1),
    ] {
        let request = format!(
            "GET {target}/v26.0/me?access_token=EAAx HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        );
        let reply = raw(h.addr, request.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{target}: {reply}");
        assert!(
            reply.contains("x-graphcache-error: foreign_target"),
            "{reply}"
        );
    }
    assert_eq!(h.mock.requests(), 1);
}

#[tokio::test]
async fn asterisk_form_targets_are_refused() {
    let h = Harness::start().await;
    for method in ["OPTIONS", "DELETE"] {
        let reply = raw(
            h.addr,
            format!("{method} * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        assert!(reply.contains("asterisk-form"), "{reply}");
    }
    assert_eq!(h.mock.requests(), 0);
}

#[tokio::test]
async fn connect_is_refused() {
    let h = Harness::start().await;
    let reply = raw(h.addr, b"CONNECT graph.facebook.com:443 HTTP/1.1\r\nHost: graph.facebook.com:443\r\nConnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
    assert!(reply.contains("not a forward proxy"), "{reply}");
    assert_eq!(h.mock.requests(), 0);
}

#[tokio::test]
async fn silent_connections_are_closed_and_free_their_slots() {
    let h = Harness::with(|c| {
        c.max_connections = 2;
        c.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    // One sends nothing; one stalls inside the HTTP/2 preface.
    let mut silent = TcpStream::connect(h.addr).await.unwrap();
    let mut stalled = TcpStream::connect(h.addr).await.unwrap();
    stalled.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    for stream in [&mut silent, &mut stalled] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("graphcache closes the connection in time");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    // Both slots are free again.
    let reply = h.get("/v26.0/1?access_token=EAAx").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        h.metric("graphcache_client_connections_closed_total{reason=\"first_request_timeout\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_malformed_streamed_upload_is_the_clients_400_not_a_502() {
    let h = Harness::start().await;
    let request = "POST /v26.0/act_1/adimages?access_token=EAAx HTTP/1.1\r\nHost: x\r\n\
        Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\
        Connection: close\r\n\r\n5\r\nhello\r\nzz\r\nbroken\r\n0\r\n\r\n";
    let reply = raw(h.addr, request.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("x-graphcache-error: client_body"), "{reply}");
}

#[tokio::test]
async fn methods_graph_does_not_accept_get_a_405_and_are_not_forwarded() {
    let h = Harness::start().await;
    for method in ["TRACE", "get", "Post", "BREW", "PROPFIND"] {
        let request = format!(
            "{method} /v26.0/me?access_token=EAAx HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let reply = raw(h.addr, request.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 405"), "{method}: {reply}");
        assert!(
            reply.contains("x-graphcache-error: method_not_allowed"),
            "{reply}"
        );
        assert!(
            reply
                .to_ascii_lowercase()
                .contains("allow: get, head, post"),
            "{reply}"
        );
    }
    assert_eq!(h.mock.requests(), 0);
}

#[tokio::test]
async fn oversized_heads_and_bodies_get_envelopes() {
    let h = Harness::with(|c| {
        c.max_header_bytes = 4096;
        c.max_body_bytes = 1000;
    })
    .await;
    let big = "x".repeat(6000);
    let reply = h
        .get_with("/v26.0/me?access_token=EAAx", &[("x-big", &big)])
        .await;
    assert_eq!(reply.status, 431);
    assert_eq!(reply.json()["error"]["code"], 100);
    let body = "a".repeat(2000);
    let reply = h
        .send(
            Method::POST,
            "/v26.0/act_1/ads?access_token=EAAx",
            &[],
            &body,
        )
        .await;
    assert_eq!(reply.status, 413);
    assert!(reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("1000 bytes"));
    assert_eq!(h.mock.requests(), 0);
    // Far beyond any limit, hyper itself refuses the head; nothing is forwarded.
    let huge = format!(
        "GET /v26.0/me HTTP/1.1\r\nHost: x\r\nX-Huge: {}\r\n\r\n",
        "y".repeat(200_000)
    );
    let reply = raw(h.addr, huge.as_bytes()).await;
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431"),
        "{reply}"
    );
    assert_eq!(h.mock.requests(), 0);
}

#[tokio::test]
async fn chunked_write_bodies_over_the_limit_are_not_forwarded_whole() {
    let h = Harness::with(|c| c.max_body_bytes = 1000).await;
    let chunk = "a".repeat(1500);
    let request = format!(
        "POST /v26.0/act_1/adimages?access_token=EAAx HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let reply = raw(h.addr, request.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("body_too_large"), "{reply}");
    // The upstream never received a complete oversized body.
    assert!(h.mock.seen().iter().all(|s| s.body.len() <= 1000));
}

#[tokio::test]
async fn malformed_requests_are_rejected_without_reaching_upstream() {
    let h = Harness::start().await;
    for bad in [
        &b"GET /v26.0/ me HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GARBAGE\r\n\r\n",
        b"GET /v26.0/me HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET /v26.0/me HTTP/9.9\r\nHost: x\r\n\r\n",
    ] {
        let reply = raw(h.addr, bad).await;
        // hyper's parser answers these itself, with a bare 400.
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    }
    assert_eq!(h.mock.requests(), 0);
    // An undecodable escape is not malformed HTTP: it is forwarded as sent,
    // as Graph itself would receive it.
    let reply = raw(
        h.addr,
        b"GET /v26.0/me?x=%ZZ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(h.mock.last().query, "x=%ZZ");
}

#[tokio::test]
async fn slow_clients_are_cut_off_after_the_header_timeout() {
    let h = Harness::with(|c| c.header_read_timeout = Duration::from_secs(1)).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(b"GET /v26.0/me HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the connection was closed by graphcache");
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert_eq!(h.mock.requests(), 0);
}

#[tokio::test]
async fn a_client_trickling_a_write_body_gets_a_408_and_nothing_is_forwarded() {
    let h = Harness::with(|c| c.upstream_timeout = Duration::from_secs(1)).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(b"POST /v26.0/act_1/ads?access_token=EAAx HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nname=slow")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("client_timeout"), "{text}");
    assert_eq!(h.mock.requests(), 0);
}

#[tokio::test]
async fn http2_cleartext_clients_are_served() {
    let h = Harness::with(|c| c.routes.default.fresh_ttl = Duration::from_secs(60)).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    for expected in [
        "graphcache; fwd=uri-miss; fwd-status=200; stored",
        "graphcache; hit",
    ] {
        let request = Request::get(format!("http://{}/v26.0/h2?access_token=EAAx", h.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.headers()["cache-status"], expected);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("\"id\":\"h2\""));
    }
    assert_eq!(h.mock.requests(), 1);
}

#[tokio::test]
async fn admin_endpoints_and_metrics_never_show_tokens() {
    let h = Harness::start().await;
    h.get("/v26.0/act_1/ads?access_token=EAAsecretToken&appsecret_proof=proofvalue")
        .await;
    h.get("/v26.0/act_1/ads?access_token=EAAsecretToken&appsecret_proof=proofvalue")
        .await;
    assert_eq!(h.admin_get("/healthz").await.status, 200);
    assert_eq!(h.admin_get("/readyz").await.status, 200);
    assert_eq!(h.admin_get("/nope").await.status, 404);
    let metrics = h.admin_get("/metrics").await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert!(!text.contains("EAAsecretToken") && !text.contains("proofvalue"));
    for name in [
        "graphcache_requests_total{cache=\"miss\"} 1",
        "graphcache_requests_total{cache=\"revalidated\"} 1",
        "graphcache_upstream_requests_total{status_class=\"2xx\"} 1",
        "graphcache_upstream_requests_total{status_class=\"3xx\"} 1",
        "graphcache_upstream_request_duration_seconds_count 2",
        "graphcache_cache_entries 1",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    assert!(h.metric("graphcache_cache_size_bytes").await > 0.0);
}

#[tokio::test]
async fn evictions_keep_the_cache_within_its_byte_bound() {
    let h = Harness::with(|c| {
        c.cache_max_bytes = 20_000;
        c.routes.default.fresh_ttl = Duration::from_secs(60);
    })
    .await;
    for i in 0..40 {
        h.get(&format!("/v26.0/big?bytes=2000&n={i}&access_token=EAAx"))
            .await;
    }
    let bytes = h.metric("graphcache_cache_size_bytes").await;
    assert!(bytes <= 20_000.0, "{bytes}");
    assert!(
        h.metric("graphcache_cache_evictions_total{cause=\"size\"}")
            .await
            > 0.0
    );
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_stops() {
    let mut h = Harness::with(|c| c.shutdown_grace = Duration::from_secs(10)).await;
    h.mock.hold("/slow");
    let addr = h.addr;
    let in_flight = tokio::spawn(async move {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let request = Request::get(format!("http://{addr}/v26.0/slow?access_token=EAAx"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = client.request(request).await.unwrap();
        let status = response.status();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    });
    h.mock.wait_for_requests(1).await;
    h.signal_shutdown();
    // Readiness flips to 503 while draining (the admin listener stays up).
    let admin = h.admin;
    let mut drained = false;
    for _ in 0..200 {
        let reply = raw(
            admin,
            b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        if reply.starts_with("HTTP/1.1 503") {
            drained = true;
            break;
        }
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        tokio::task::yield_now().await;
    }
    assert!(drained);
    h.mock.release();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("\"id\":\"slow\""));
    h.wait_stopped().await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn get_bodies_over_64_kib_get_a_413_and_slow_ones_a_408() {
    let h = Harness::with(|c| c.header_read_timeout = Duration::from_secs(1)).await;
    let big = "x".repeat(70 << 10);
    let reply = h
        .send(
            http::Method::GET,
            "/v26.0/me?access_token=EAAx",
            &[("content-type", "application/json")],
            &big,
        )
        .await;
    assert_eq!(reply.status, 413);
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(
            b"GET /v26.0/me?access_token=EAAx HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{",
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(h.mock.requests(), 0);
}

#[tokio::test]
async fn a_tls_upstream_is_reached_over_http2_by_alpn() {
    let (mock, ca_pem) = support::MockGraph::start_tls().await;
    let dir = std::env::temp_dir().join(format!("graphcache-ca-{}.pem", rand::random::<u64>()));
    std::fs::write(&dir, &ca_pem).unwrap();
    let config = graphcache::Config::load(
        &graphcache::Cli::default(),
        [
            (
                "GRAPHCACHE_UPSTREAM".to_owned(),
                format!("https://localhost:{}", mock.addr.port()),
            ),
            (
                "GRAPHCACHE_UPSTREAM_CA_FILE".to_owned(),
                dir.display().to_string(),
            ),
            ("GRAPHCACHE_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
            (
                "GRAPHCACHE_ADMIN_LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            ("GRAPHCACHE_ACCESS_LOG".to_owned(), "false".to_owned()),
        ],
    )
    .unwrap();
    std::fs::remove_file(&dir).unwrap();
    let h = Harness::start_with_mock(mock, config).await;
    let first = h.get("/v26.0/act_1/ads?access_token=EAAx").await;
    assert_eq!(first.status, 200, "{}", first.text());
    let second = h.get("/v26.0/act_1/ads?access_token=EAAx").await;
    assert_eq!(
        second.cache_status(),
        "graphcache; fwd=stale; fwd-status=304"
    );
    let seen = h.mock.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|s| s.version == http::Version::HTTP_2),
        "{:?}",
        seen.iter().map(|s| s.version).collect::<Vec<_>>()
    );
    // Without the CA, the self-signed upstream is refused: a 502, never plain text.
    let (untrusted, _) = support::MockGraph::start_tls().await;
    let mut config = support::test_config(&format!("https://localhost:{}", untrusted.addr.port()));
    config.upstream_ca.clear();
    let refused = Harness::start_with_mock(untrusted, config).await;
    let reply = refused.get("/v26.0/me?access_token=EAAx").await;
    assert_eq!(reply.status, 502);
    assert_eq!(refused.mock.requests(), 0);
}

#[tokio::test]
async fn a_bad_upstream_ca_file_is_a_config_error() {
    let err = graphcache::Config::load(
        &graphcache::Cli::default(),
        [(
            "GRAPHCACHE_UPSTREAM_CA_FILE".to_owned(),
            "/nonexistent/ca.pem".to_owned(),
        )],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("upstream_ca_file") && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );
}

#[tokio::test]
async fn a_reload_applies_to_new_requests_and_keeps_what_needs_a_restart() {
    let h = Harness::start().await;
    let target = "/v26.0/90?access_token=EAAx";
    h.get(target).await;
    assert!(!h.get(target).await.cache().hit, "fresh_ttl 0 revalidates");
    let mut next = h.config.clone();
    next.routes.default.fresh_ttl = Duration::from_secs(60);
    next.rewrite_paging_links = false;
    next.listen = "127.0.0.1:1".parse().unwrap();
    next.max_connections = 1;
    let ignored = h.reloader.reload(next);
    assert_eq!(ignored, ["listen", "max_connections"]);
    // Routes and TTLs apply to the next request; the listener is untouched.
    h.get(target).await;
    assert!(h.get(target).await.cache().hit);
    let page = h.get("/v26.0/act_1/ads?access_token=EAAx").await;
    assert!(page.json()["paging"]["next"]
        .as_str()
        .unwrap()
        .starts_with("https://graph.facebook.com/"));
    assert_eq!(
        h.metric("graphcache_config_reloads_total{result=\"ok\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_bodies_have_a_global_budget() {
    let h = std::sync::Arc::new(Harness::with(|c| c.max_buffered_bytes = 1000).await);
    h.mock.hold("/v26.0/act_5");
    let body = format!("name={}", "x".repeat(595));
    let first = {
        let (h, body) = (h.clone(), body.clone());
        tokio::spawn(async move {
            h.post_form("/v26.0/act_5/ads?access_token=EAAx", &body)
                .await
        })
    };
    h.mock.wait_for_requests(1).await;
    // The first body is still held (its write is upstream): no room for a second.
    let second = h
        .post_form("/v26.0/act_6/ads?access_token=EAAx", &body)
        .await;
    assert_eq!(second.status, 503);
    assert_eq!(second.header("retry-after"), Some("1"));
    assert_eq!(second.header("x-graphcache-error"), Some("overloaded"));
    h.mock.release();
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(h.mock.writes(), 1);
    // With the budget free again, the same write goes through.
    let third = h
        .post_form("/v26.0/act_6/ads?access_token=EAAx", &body)
        .await;
    assert_eq!(third.status, 200);
    assert_eq!(h.mock.writes(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_a_bounded_time_for_a_task_slot() {
    let h = Harness::with(|c| {
        c.max_connections = 1;
        c.write_slot_wait = Duration::from_secs(1);
    })
    .await;
    h.mock.hold("/v26.0/act_7");
    // HTTP/2: two writes on the one connection max_connections allows.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let post = |path: &str| {
        Request::post(format!("http://{}{path}", h.addr))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from_static(b"name=x")))
            .unwrap()
    };
    let first = tokio::spawn(client.request(post("/v26.0/act_7/ads?access_token=EAAx")));
    h.mock.wait_for_requests(1).await;
    let second = client
        .request(post("/v26.0/act_8/ads?access_token=EAAx"))
        .await
        .unwrap();
    assert_eq!(second.status(), 503);
    assert_eq!(second.headers()["retry-after"], "1");
    h.mock.release();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(h.mock.writes(), 1);
}

#[tokio::test]
async fn reads_naming_too_many_ids_are_relayed_not_stored() {
    let h = Harness::with(|c| c.routes.default.fresh_ttl = Duration::from_secs(60)).await;
    // Graph ignores unknown parameters; an id list in one costs graphcache
    // nothing beyond the cap.
    let junk: Vec<String> = (0..300).map(|i| (100_000 + i).to_string()).collect();
    let target = format!("/v26.0/95?x_ids={}&access_token=EAAx", junk.join(","));
    for _ in 0..2 {
        let reply = h.get(&target).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.cache().fwd.as_deref(), Some("bypass"));
    }
    assert_eq!(h.mock.requests(), 2);
    // Within the cap, the same kind of read is cached.
    let few = format!("/v26.0/95?x_ids={}&access_token=EAAx", junk[..50].join(","));
    h.get(&few).await;
    assert!(h.get(&few).await.cache().hit);
    assert_eq!(h.mock.requests(), 3);
}
