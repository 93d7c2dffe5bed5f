//! Fleet mode: three graphcache instances in this process share one real
//! `redis-server` and one mock Graph, as sidecars of three app pods would.

mod support;

use std::sync::Arc;
use std::time::Duration;

use graphcache::config::FleetSettings;
use support::mock_graph::MockGraph;
use support::redis::RedisServer;
use support::{spawn_get, test_config, Harness};

const TOKEN: &str = "EAAfleetTokenABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// Three replicas over one mock and one Redis, adjusted alike.
async fn fleet(
    redis: &RedisServer,
    adjust: impl Fn(&mut graphcache::Config, usize),
) -> (MockGraph, Vec<Arc<Harness>>) {
    let mock = MockGraph::start().await;
    let mut replicas = Vec::new();
    for i in 0..3 {
        let mut config = test_config(&mock.url());
        config.routes.default.fresh_ttl = Duration::from_secs(60);
        config.fleet = Some(redis.settings("test"));
        adjust(&mut config, i);
        replicas.push(Arc::new(
            Harness::start_with_mock(mock.clone(), config).await,
        ));
    }
    (mock, replicas)
}

fn version(reply: &support::Reply) -> u64 {
    reply.json()["version"].as_u64().expect("a version field")
}

fn settings(h: &Harness) -> &FleetSettings {
    h.config.fleet.as_ref().unwrap()
}

#[tokio::test]
async fn entries_are_shared_and_a_write_through_one_replica_is_seen_by_all() {
    let redis = RedisServer::start().await;
    let (mock, r) = fleet(&redis, |_, _| {}).await;
    let target = format!("/v26.0/act_1?fields=name,version&access_token={TOKEN}");
    let first = r[0].get(&target).await;
    assert!(first.is_miss(), "{}", first.cache_status());
    assert_eq!(version(&first), 0);
    // Replicas 2 and 3 find it in Redis: no further upstream read.
    for h in &r[1..] {
        let reply = h.get(&target).await;
        assert_eq!(reply.status, 200);
        assert!(reply.cache().hit, "{}", reply.cache_status());
        assert_eq!(reply.body, first.body);
    }
    assert_eq!(mock.reads(), 1, "one upstream read for three replicas");
    assert_eq!(
        r[1].metric("graphcache_l2_lookups_total{result=\"hit\"}")
            .await,
        1.0
    );
    // Now each replica holds it in memory; a write through each in turn
    // is seen by the next read through every replica.
    for round in 0..3u64 {
        let writer = &r[round as usize];
        let wrote = writer
            .post_form(&format!("/v26.0/act_1?access_token={TOKEN}"), "name=x")
            .await;
        assert_eq!(wrote.status, 200);
        for (i, h) in r.iter().enumerate() {
            let reply = h.get(&target).await;
            assert_eq!(
                version(&reply),
                round + 1,
                "replica {i} after write {round} through replica {}: {}",
                round,
                reply.cache_status()
            );
        }
    }
    assert_eq!(mock.writes(), 3, "each write forwarded once");
    assert!(
        r[2].metric("graphcache_fleet_invalidations_received_total")
            .await
            >= 1.0
    );
    assert!(
        r[0].metric("graphcache_fleet_invalidations_sent_total")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_write_to_a_listed_member_drops_the_listing_in_every_replica() {
    let redis = RedisServer::start().await;
    let (mock, r) = fleet(&redis, |_, _| {}).await;
    mock.set_members("act_7", "ads", &["601", "602"]);
    let listing = format!("/v26.0/act_7/ads?access_token={TOKEN}");
    for h in &r {
        h.get(&listing).await;
    }
    let reads = mock.reads();
    assert_eq!(reads, 1);
    r[1].post_form(&format!("/v26.0/602?access_token={TOKEN}"), "status=PAUSED")
        .await;
    // The listing shows 602's new version through replicas 1 and 3.
    for h in [&r[0], &r[2]] {
        let reply = h.get(&listing).await;
        let members = reply.json()["data"].as_array().unwrap().clone();
        let member = members.iter().find(|m| m["id"] == "602").unwrap();
        assert_eq!(member["version"], 1, "{}", reply.cache_status());
    }
}

#[tokio::test]
async fn identical_cold_misses_through_three_replicas_reach_the_upstream_once() {
    let redis = RedisServer::start().await;
    let (mock, r) = fleet(&redis, |_, _| {}).await;
    mock.set_delay(Duration::from_millis(300));
    let target = format!("/v26.0/act_2/campaigns?access_token={TOKEN}");
    let mut calls = Vec::new();
    for h in &r {
        for _ in 0..4 {
            calls.push(spawn_get(h, &target, &[]));
        }
    }
    let mut bodies = Vec::new();
    for call in calls {
        let reply = call.await.unwrap();
        assert_eq!(reply.status, 200);
        // Paging links point at each replica itself; the data is one.
        bodies.push(reply.json()["data"].clone());
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(mock.reads(), 1, "one upstream call for the whole fleet");
    let filled: f64 = {
        let mut sum = 0.0;
        for h in &r {
            sum += h
                .metric("graphcache_fleet_lock_waits_total{result=\"filled\"}")
                .await;
        }
        sum
    };
    assert_eq!(filled, 2.0, "the two other replicas waited for the holder");
}

#[tokio::test]
async fn a_throttle_seen_by_one_replica_protects_the_others() {
    let redis = RedisServer::start().await;
    let (mock, r) = fleet(&redis, |c, _| {
        c.throttle.answer_locally = true;
        c.throttle.backoff = Duration::from_secs(120);
    })
    .await;
    mock.throttle(4, &[]);
    let first = r[0].get(&format!("/v26.0/me?access_token={TOKEN}")).await;
    assert_eq!(first.status, 403);
    mock.stop_throttling();
    // Replica 2 learns it from the fleet (its throttled-scope gauge says so).
    r[1].wait_for_metric_at_least("graphcache_throttled_scopes", 1.0)
        .await;
    let calls = mock.requests();
    let local = r[1]
        .get(&format!("/v26.0/act_9/ads?access_token={TOKEN}"))
        .await;
    assert_eq!(local.status, 400);
    assert_eq!(local.json()["error"]["code"], 4);
    assert_eq!(local.header("x-graphcache-error"), Some("throttled"));
    assert_eq!(mock.requests(), calls, "nothing forwarded while throttled");
    assert!(
        r[1].metric("graphcache_fleet_throttles_shared_total{direction=\"received\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn with_redis_killed_every_request_is_answered_and_nothing_stale_outlives_the_window() {
    let mut redis = RedisServer::start().await;
    // A zero window: while degraded, every entry in memory is revalidated.
    let (mock, r) = fleet(&redis, |c, i| {
        let fleet = c.fleet.as_mut().unwrap();
        fleet.degraded_max_age = Duration::ZERO;
        fleet.required = i == 2;
    })
    .await;
    let target = format!("/v26.0/act_3?fields=name,version&access_token={TOKEN}");
    for h in &r {
        assert_eq!(version(&h.get(&target).await), 0);
    }
    redis.kill();
    // A write through replica 1 while Redis is down…
    let wrote = r[0]
        .post_form(&format!("/v26.0/act_3?access_token={TOKEN}"), "name=y")
        .await;
    assert_eq!(wrote.status, 200);
    assert_eq!(mock.writes(), 1);
    // …is seen by every replica: memory entries are revalidated upstream.
    for (i, h) in r.iter().enumerate() {
        let reply = h.get(&target).await;
        assert_eq!(reply.status, 200);
        assert_eq!(version(&reply), 1, "replica {i}: {}", reply.cache_status());
    }
    for h in &r {
        h.wait_for_metric("graphcache_redis_up", 0.0).await;
    }
    assert!(
        r[0].metric("graphcache_redis_errors_total{op=\"mark\"}")
            .await
            >= 1.0,
        "the write's mark failed and was kept"
    );
    let sent_before = r[0]
        .metric("graphcache_fleet_invalidations_sent_total")
        .await;
    let ready = r[0].admin_get("/readyz").await;
    assert_eq!(ready.status, 200);
    assert!(ready.text().contains("degraded"), "{}", ready.text());
    assert_eq!(
        r[2].admin_get("/readyz").await.status,
        503,
        "redis_required"
    );
    // Requests keep being answered (new keys go upstream).
    let other = r[1]
        .get(&format!("/v26.0/act_4?access_token={TOKEN}"))
        .await;
    assert_eq!(other.status, 200);

    redis.restart().await;
    for h in &r {
        h.wait_for_metric("graphcache_redis_up", 1.0).await;
    }
    // The mark kept during the outage is sent once Redis answers.
    r[0].wait_for_metric_at_least(
        "graphcache_fleet_invalidations_sent_total",
        sent_before + 1.0,
    )
    .await;
    assert_eq!(r[2].admin_get("/readyz").await.status, 200);
    // The shared tier works again: a new key fetched once for all three.
    let fresh = format!("/v26.0/act_5?access_token={TOKEN}");
    let reads = mock.reads();
    r[0].get(&fresh).await;
    r[1].get(&fresh).await;
    r[2].get(&fresh).await;
    assert_eq!(mock.reads(), reads + 1);
    // And writes are marked again: one through replica 3 reaches replica 1.
    r[2].post_form(&format!("/v26.0/act_5?access_token={TOKEN}"), "name=z")
        .await;
    let after = r[0].get(&fresh).await;
    assert_eq!(version(&after), 1, "{}", after.cache_status());
}

#[tokio::test]
async fn redis_restarted_empty_drops_what_memory_holds() {
    let mut redis = RedisServer::start().await;
    let (mock, r) = fleet(&redis, |_, _| {}).await;
    let target = format!("/v26.0/act_6?fields=version&access_token={TOKEN}");
    // Advance the fleet's write sequence, then fill every replica.
    r[0].post_form(&format!("/v26.0/act_60?access_token={TOKEN}"), "a=1")
        .await;
    for h in &r {
        h.get(&target).await;
    }
    // A write through replica 1 is marked; then Redis restarts empty
    // before replica 3, which only reads, has looked at its memory entry.
    r[0].post_form(&format!("/v26.0/act_6?access_token={TOKEN}"), "b=1")
        .await;
    redis.restart().await;
    // A write to another object first: it must not hide the loss.
    r[0].post_form(&format!("/v26.0/act_61?access_token={TOKEN}"), "d=1")
        .await;
    // The mark is gone, but so is the epoch: replica 3 notices on its hit
    // and does not serve what memory holds.
    let reply = r[2].get(&target).await;
    assert_eq!(version(&reply), 1, "{}", reply.cache_status());
    // A write through replica 2, which never wrote before (its entry came
    // from Redis), reaches replicas 1 and 3.
    r[0].get(&target).await;
    r[1].post_form(&format!("/v26.0/act_6?access_token={TOKEN}"), "c=1")
        .await;
    for h in [&r[2], &r[0]] {
        let reply = h.get(&target).await;
        assert_eq!(version(&reply), 2, "{}", reply.cache_status());
    }
    assert_eq!(mock.writes(), 4);
}

#[tokio::test]
async fn no_token_reaches_redis_in_any_key_or_value() {
    let redis = RedisServer::start().await;
    let (mock, r) = fleet(&redis, |_, _| {}).await;
    let bearer = "EAAbearerTokenZYXWVUTSRQPONMLKJIHGFEDCBA9876543210";
    r[0].get(&format!("/v26.0/act_8/ads?access_token={TOKEN}"))
        .await;
    r[1].get_with(
        "/v26.0/act_8/adsets",
        &[("authorization", &format!("Bearer {bearer}"))],
    )
    .await;
    let items = serde_json::json!([{"method": "GET", "relative_url": "act_8/campaigns"}]);
    r[2].post_batch(&format!("/v26.0/?access_token={TOKEN}"), &items, &[])
        .await;
    r[0].post_form(&format!("/v26.0/act_8?access_token={TOKEN}"), "name=n")
        .await;
    mock.throttle(4, &[]);
    r[1].get_with(
        "/v26.0/act_8/insights",
        &[("authorization", &format!("Bearer {bearer}"))],
    )
    .await;
    mock.stop_throttling();
    r[1].wait_for_metric_at_least(
        "graphcache_fleet_throttles_shared_total{direction=\"sent\"}",
        1.0,
    )
    .await;
    let dump = redis.dump().await;
    assert!(
        dump.iter().any(|(k, _)| k.starts_with(b"test:v1:e:")),
        "entries stored"
    );
    for token in [TOKEN, bearer] {
        for window in token.as_bytes().windows(16) {
            for (key, value) in &dump {
                assert!(
                    memchr::memmem::find(key, window).is_none()
                        && memchr::memmem::find(value, window).is_none(),
                    "a piece of a token in {}",
                    String::from_utf8_lossy(key)
                );
            }
        }
    }
    // The identity key came from Redis (none was configured).
    assert!(settings(&r[0]).secret.is_none());
    assert!(dump.iter().any(|(k, _)| k == b"test:v1:meta:secret"));
}

#[tokio::test]
async fn a_read_after_a_sibling_s_write_never_joins_a_fetch_from_before_it() {
    let redis = RedisServer::start().await;
    // A lock wait longer than the test's own bound: a read waiting on the
    // older fetch's lock would hold the test up until it fails.
    let (mock, r) = fleet(&redis, |c, _| {
        c.fleet.as_mut().unwrap().lock_wait = Duration::from_secs(30);
    })
    .await;
    let listing = format!("/v26.0/act_11/campaigns?access_token={TOKEN}");
    // Replica 2 starts a fetch that Graph holds.
    mock.hold("campaigns");
    let before = spawn_get(&r[1], &listing, &[]);
    mock.wait_for_requests(1).await;
    // A write through replica 1 returns meanwhile.
    let wrote = r[0]
        .post_form(&format!("/v26.0/act_11?access_token={TOKEN}"), "name=w")
        .await;
    assert_eq!(wrote.status, 200);
    // A read through replica 2 now must not share the older fetch.
    let after = spawn_get(&r[1], &listing, &[]);
    mock.wait_for_requests(3).await;
    mock.release();
    assert_eq!(before.await.unwrap().status, 200);
    assert_eq!(after.await.unwrap().status, 200);
    assert_eq!(
        mock.reads(),
        2,
        "the read after the write made its own call"
    );
}
