//! Graph's usage headers as metrics, and throttle protection: the mock
//! raises usage, then throttles, and graphcache's metrics and answers follow.

mod support;

use std::time::Duration;

use http::Method;
use serde_json::json;
use support::Harness;

const BUC_SAMPLE: &str = r#"{"66782684":[{"type":"ads_management","call_count":95,"total_cputime":20,"total_time":20,"estimated_time_to_regain_access":0,"ads_api_access_tier":"development_access"}],"66782684":[{"type":"ads_insights","call_count":97,"total_cputime":23,"total_time":23,"estimated_time_to_regain_access":0}]}"#;

#[tokio::test]
async fn usage_headers_become_gauges() {
    let h = Harness::start().await;
    let before = h.admin_get("/metrics").await.text();
    // Never seen means unknown: no sample at all, not zero.
    assert!(!before.contains("graphcache_graph_business_usage_ratio{"));
    h.mock.set_usage(&[
        ("x-app-usage", r#"{"call_count":42,"total_time":30,"total_cputime":10}"#),
        ("x-ad-account-usage", r#"{"acc_id_util_pct":9.67,"reset_time_duration":100,"ads_api_access_tier":"standard_access"}"#),
        ("x-business-use-case-usage", BUC_SAMPLE),
        ("x-fb-ads-insights-throttle", r#"{"app_id_util_pct":0.02,"acc_id_util_pct":12,"ads_api_access_tier":"development_access"}"#),
    ]);
    let reply = h
        .get("/v26.0/act_66782684/insights?access_token=EAAtokenA")
        .await;
    assert_eq!(reply.status, 200);
    for (sample, value) in [
        ("graphcache_graph_app_usage_ratio{metric=\"call_count\"}", 0.42),
        ("graphcache_graph_app_usage_ratio{metric=\"total_time\"}", 0.3),
        ("graphcache_graph_app_usage_ratio{metric=\"total_cputime\"}", 0.1),
        ("graphcache_graph_ad_account_usage_ratio{account=\"66782684\"}", 0.0967),
        ("graphcache_graph_ad_account_reset_seconds{account=\"66782684\"}", 100.0),
        ("graphcache_graph_business_usage_ratio{business_id=\"66782684\",metric=\"call_count\",type=\"ads_management\"}", 0.95),
        // The repeated key's entry is kept too.
        ("graphcache_graph_business_usage_ratio{business_id=\"66782684\",metric=\"call_count\",type=\"ads_insights\"}", 0.97),
        ("graphcache_graph_business_regain_access_seconds{business_id=\"66782684\",type=\"ads_insights\"}", 0.0),
        ("graphcache_graph_insights_throttle_ratio{scope=\"app\"}", 0.0002),
        ("graphcache_graph_insights_throttle_ratio{scope=\"account\"}", 0.12),
    ] {
        let got = h.metric(sample).await;
        assert!((got - value).abs() < 1e-9, "{sample} = {got}, expected {value}");
    }
    assert!(
        h.metric("graphcache_graph_usage_last_seen_timestamp_seconds{header=\"x-app-usage\"}")
            .await
            > 1.7e9
    );
    // The insights throttle per account, and the access tier (the header
    // read last names development_access).
    assert_eq!(
        h.metric("graphcache_graph_insights_account_throttle_ratio{account=\"66782684\"}")
            .await,
        0.12
    );
    assert_eq!(
        h.metric("graphcache_graph_ads_api_access_tier_info{tier=\"development_access\"}")
            .await,
        1.0
    );
    assert_eq!(
        h.metric("graphcache_graph_ads_api_access_tier_info{tier=\"standard_access\"}")
            .await,
        0.0
    );

    // Account 66782684 reported 97 %: its reads are now under pressure.
    let pressured = h
        .get("/v26.0/act_66782684/insights?access_token=EAAtokenA")
        .await;
    assert_eq!(
        pressured.cache_status(),
        "graphcache; hit; detail=quota-pressure"
    );

    // A 304 carries usage too: a revalidation updates the gauges.
    h.mock.set_usage(&[(
        "x-app-usage",
        r#"{"call_count":43,"total_time":30,"total_cputime":10}"#,
    )]);
    h.get("/v26.0/777?access_token=EAAtokenA").await;
    h.mock.set_usage(&[(
        "x-app-usage",
        r#"{"call_count":44,"total_time":30,"total_cputime":10}"#,
    )]);
    let again = h.get("/v26.0/777?access_token=EAAtokenA").await;
    assert_eq!(
        again.cache_status(),
        "graphcache; fwd=stale; fwd-status=304"
    );
    assert_eq!(
        h.metric("graphcache_graph_app_usage_ratio{metric=\"call_count\"}")
            .await,
        0.44
    );
}

#[tokio::test]
async fn usage_inside_batch_items_is_read() {
    let h = Harness::start().await;
    h.mock.set_usage(&[(
        "x-business-use-case-usage",
        r#"{"555":[{"type":"ads_management","call_count":61}]}"#,
    )]);
    let items = json!([{"method": "GET", "relative_url": "act_555/ads"}]);
    let reply = h
        .post_batch("/v26.0/?access_token=EAAtokenA", &items, &[])
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        h.metric("graphcache_graph_business_usage_ratio{business_id=\"555\",metric=\"call_count\",type=\"ads_management\"}").await,
        0.61
    );
}

#[tokio::test]
async fn malformed_usage_headers_are_counted_never_fatal() {
    let h = Harness::start().await;
    h.mock.set_usage(&[
        ("x-app-usage", "{oops"),
        ("x-business-use-case-usage", "[1]"),
    ]);
    let reply = h.get("/v26.0/7?access_token=EAAtokenA").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        h.metric("graphcache_graph_usage_parse_errors_total{header=\"x-app-usage\"}")
            .await,
        1.0
    );
    assert_eq!(
        h.metric("graphcache_graph_usage_parse_errors_total{header=\"x-business-use-case-usage\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn while_throttled_stored_entries_are_served_without_upstream_calls() {
    let h = Harness::start().await;
    let stored = h.get("/v26.0/act_1/insights?access_token=EAAtokenA").await;
    h.get("/v26.0/act_2/insights?access_token=EAAtokenA").await;
    h.mock.throttle(
        80000,
        &[("x-business-use-case-usage", r#"{"1":[{"type":"ads_insights","call_count":100,"estimated_time_to_regain_access":3}]}"#)],
    );
    // An uncached read of account 1 meets the throttle and passes it on.
    let refused = h.get("/v26.0/act_1/campaigns?access_token=EAAtokenA").await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.json()["error"]["code"], 80000);
    let calls = h.mock.requests();
    // The stored entry of account 1 is now served without asking Graph.
    let served = h.get("/v26.0/act_1/insights?access_token=EAAtokenA").await;
    assert_eq!(served.status, 200);
    assert_eq!(served.body, stored.body);
    assert_eq!(served.cache_status(), "graphcache; hit; detail=throttled");
    assert_eq!(h.mock.requests(), calls);
    // Account 2 is another scope: still revalidated upstream, and when that
    // meets the throttle too, its stored entry is served rather than the
    // error (and kept, not dropped as a 4xx would be).
    let other = h.get("/v26.0/act_2/insights?access_token=EAAtokenA").await;
    assert_eq!(other.status, 200);
    assert_eq!(
        other.cache_status(),
        "graphcache; fwd=stale; fwd-status=400; detail=stale-if-error"
    );
    assert_eq!(h.mock.requests(), calls + 1);
    assert_eq!(
        h.metric("graphcache_graph_throttle_responses_total{code=\"80000\"}")
            .await,
        2.0
    );
    assert_eq!(
        h.metric("graphcache_upstream_calls_avoided_total{reason=\"throttled\"}")
            .await,
        1.0
    );
    assert_eq!(h.metric("graphcache_throttled_scopes").await, 1.0);
    assert_eq!(h.metric("graphcache_graph_business_regain_access_seconds{business_id=\"1\",type=\"ads_insights\"}").await, 180.0);
    assert_eq!(
        h.metric("graphcache_requests_total{cache=\"throttled\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn app_level_throttling_uses_the_backoff_and_can_answer_locally() {
    let h = Harness::with(|c| {
        c.throttle.answer_locally = true;
        c.throttle.backoff = Duration::from_secs(120);
    })
    .await;
    h.mock.throttle(4, &[]);
    let first = h.get("/v26.0/me?access_token=EAAtokenA").await;
    assert_eq!(first.status, 403);
    let calls = h.mock.requests();
    let local = h.get("/v26.0/act_9/ads?access_token=EAAtokenA").await;
    assert_eq!(local.status, 400);
    assert_eq!(local.json()["error"]["code"], 4);
    assert_eq!(local.json()["error"]["type"], "OAuthException");
    assert_eq!(local.header("x-graphcache-error"), Some("throttled"));
    let retry: u64 = local.header("retry-after").unwrap().parse().unwrap();
    assert!(retry > 100 && retry <= 120, "{retry}");
    assert_eq!(
        h.mock.requests(),
        calls,
        "nothing forwarded while throttled"
    );
    // Writes still go through: graphcache never drops a write.
    h.send(
        Method::POST,
        "/v26.0/act_9/ads?access_token=EAAtokenA",
        &[],
        "name=x",
    )
    .await;
    assert_eq!(h.mock.requests(), calls + 1);
}

#[tokio::test]
async fn throttling_seen_in_a_batch_item_protects_its_scope() {
    let h = Harness::start().await;
    h.get("/v26.0/act_3/ads?access_token=EAAtokenA").await;
    h.mock.throttle(
        80004,
        &[("x-business-use-case-usage", r#"{"3":[{"type":"ads_management","call_count":100,"estimated_time_to_regain_access":1}]}"#)],
    );
    let items = json!([{"method": "GET", "relative_url": "act_3/adsets"}]);
    let reply = h
        .post_batch("/v26.0/?access_token=EAAtokenA", &items, &[])
        .await;
    assert_eq!(reply.json()[0]["code"], 400);
    let calls = h.mock.requests();
    let served = h.get("/v26.0/act_3/ads?access_token=EAAtokenA").await;
    assert_eq!(served.cache_status(), "graphcache; hit; detail=throttled");
    assert_eq!(h.mock.requests(), calls);
}

#[tokio::test]
async fn usage_at_the_threshold_counts_as_pressure() {
    let h = Harness::start().await;
    let stored = h.get("/v26.0/act_4/ads?access_token=EAAtokenA").await;
    h.mock.set_usage(&[(
        "x-app-usage",
        r#"{"call_count":96,"total_time":10,"total_cputime":10}"#,
    )]);
    // The next upstream answer reports 96 %.
    h.get("/v26.0/act_4/ads?access_token=EAAtokenA").await;
    let calls = h.mock.requests();
    let served = h.get("/v26.0/act_4/ads?access_token=EAAtokenA").await;
    assert_eq!(
        served.cache_status(),
        "graphcache; hit; detail=quota-pressure"
    );
    assert_eq!(served.body, stored.body);
    assert_eq!(h.mock.requests(), calls);
    assert_eq!(
        h.metric("graphcache_upstream_calls_avoided_total{reason=\"pressure\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn quota_aware_freshness_stretches_the_ttl_as_usage_climbs() {
    let h = Harness::with(|c| {
        c.throttle.quota_ttl_from = Some(0.5);
        c.throttle.quota_ttl_max = Duration::from_secs(300);
    })
    .await;
    h.mock.set_usage(&[(
        "x-app-usage",
        r#"{"call_count":40,"total_time":1,"total_cputime":1}"#,
    )]);
    h.get("/v26.0/act_5/ads?access_token=EAAtokenA").await;
    // At 40 % the TTL is the configured 0: revalidated.
    let low = h.get("/v26.0/act_5/ads?access_token=EAAtokenA").await;
    assert_eq!(low.cache_status(), "graphcache; fwd=stale; fwd-status=304");
    h.mock.set_usage(&[(
        "x-app-usage",
        r#"{"call_count":80,"total_time":1,"total_cputime":1}"#,
    )]);
    h.get("/v26.0/act_5/ads?access_token=EAAtokenA").await;
    let calls = h.mock.requests();
    // At 80 % the TTL stretched to 180 s: served from memory.
    let high = h.get("/v26.0/act_5/ads?access_token=EAAtokenA").await;
    assert_eq!(high.cache_status(), "graphcache; hit; detail=quota-ttl");
    assert_eq!(h.mock.requests(), calls);
}

#[tokio::test]
async fn id_labels_are_bounded() {
    let h = Harness::with(|c| c.throttle.label_limit = 2).await;
    h.mock.set_usage(&[(
        "x-business-use-case-usage",
        r#"{"11":[{"type":"pages","call_count":1}],"12":[{"type":"pages","call_count":2}],"13":[{"type":"pages","call_count":3}]}"#,
    )]);
    h.get("/v26.0/x?access_token=EAAtokenA").await;
    let text = h.admin_get("/metrics").await.text();
    assert!(text.contains("business_id=\"other\""));
    assert!(!text.contains("business_id=\"13\""));
    assert_eq!(
        h.metric("graphcache_graph_usage_labels_folded_total").await,
        1.0
    );
}

#[tokio::test]
async fn ad_account_usage_attaches_to_the_account_in_the_path() {
    let h = Harness::start().await;
    h.mock.set_usage(&[(
        "x-ad-account-usage",
        r#"{"acc_id_util_pct":50,"reset_time_duration":10}"#,
    )]);
    h.get("/v26.0/act_9/ads?adset_id=55&access_token=EAAtokenA")
        .await;
    assert_eq!(
        h.metric("graphcache_graph_ad_account_usage_ratio{account=\"9\"}")
            .await,
        0.5
    );
    assert!(!h
        .admin_get("/metrics")
        .await
        .text()
        .contains("account=\"55\""));
}

#[tokio::test]
async fn client_batch_items_are_protected_while_throttled() {
    let h = Harness::with(|c| c.throttle.answer_locally = true).await;
    let stored = h.get("/v26.0/act_1/ads?access_token=EAAtokenA").await;
    h.mock.throttle(
        80004,
        &[("x-business-use-case-usage", r#"{"1":[{"type":"ads_management","call_count":100,"estimated_time_to_regain_access":2}]}"#)],
    );
    h.get("/v26.0/act_1/campaigns?access_token=EAAtokenA").await;
    let calls = h.mock.requests();
    let items = json!([
        {"method": "GET", "relative_url": "act_1/ads"},
        {"method": "GET", "relative_url": "act_1/adsets"},
    ]);
    let reply = h
        .post_batch("/v26.0/?access_token=EAAtokenA", &items, &[])
        .await;
    let entries = reply.json();
    // The stored item is served; the uncached one gets Graph's throttling
    // envelope locally; nothing reached Graph.
    assert_eq!(entries[0]["code"], 200);
    assert_eq!(
        entries[0]["body"].as_str().unwrap().as_bytes(),
        &stored.body[..]
    );
    assert_eq!(entries[1]["code"], 400);
    let error: serde_json::Value =
        serde_json::from_str(entries[1]["body"].as_str().unwrap()).unwrap();
    assert_eq!(error["error"]["code"], 80004);
    assert_eq!(h.mock.requests(), calls);
}

#[tokio::test]
async fn async_request_set_reads_are_not_served_from_memory_under_pressure() {
    let h = Harness::start().await;
    h.mock.set_usage(&[(
        "x-app-usage",
        r#"{"call_count":97,"total_time":1,"total_cputime":1}"#,
    )]);
    h.get("/v26.0/act_2/asyncadrequestsets?access_token=EAAtokenA")
        .await;
    let again = h
        .get("/v26.0/act_2/asyncadrequestsets?access_token=EAAtokenA")
        .await;
    assert_eq!(
        again.cache_status(),
        "graphcache; fwd=stale; fwd-status=304"
    );
    // An ordinary read of the same account is protected.
    h.get("/v26.0/act_2/ads?access_token=EAAtokenA").await;
    let ads = h.get("/v26.0/act_2/ads?access_token=EAAtokenA").await;
    assert_eq!(ads.cache_status(), "graphcache; hit; detail=quota-pressure");
}

#[tokio::test]
async fn a_user_level_limit_protects_only_that_callers_reads() {
    let h = Harness::with(|c| c.throttle.answer_locally = true).await;
    h.mock.throttle(17, &[]);
    let first = h.get("/v26.0/me?access_token=EAAtokenA").await;
    assert_eq!(first.json()["error"]["code"], 17);
    h.mock.stop_throttling();
    let calls = h.mock.requests();
    // Token A is answered locally; token B still reaches Graph.
    let a = h.get("/v26.0/act_3/ads?access_token=EAAtokenA").await;
    assert_eq!(a.header("x-graphcache-error"), Some("throttled"));
    let b = h.get("/v26.0/act_3/ads?access_token=EAAtokenB").await;
    assert_eq!(b.status, 200);
    assert_eq!(h.mock.requests(), calls + 1);
}

#[tokio::test]
async fn page_usage_is_exported_per_page() {
    let h = Harness::start().await;
    h.mock.set_usage(&[(
        "x-page-usage",
        r#"{"call_count":12,"total_time":7,"total_cputime":3}"#,
    )]);
    assert_eq!(
        h.get("/v26.0/4401?access_token=EAAtokenA").await.status,
        200
    );
    for (metric, value) in [
        ("call_count", 0.12),
        ("total_time", 0.07),
        ("total_cputime", 0.03),
    ] {
        let sample =
            format!("graphcache_graph_page_usage_ratio{{metric=\"{metric}\",page=\"4401\"}}");
        assert_eq!(h.metric(&sample).await, value, "{sample}");
    }
    assert!(
        h.metric("graphcache_graph_usage_last_seen_timestamp_seconds{header=\"x-page-usage\"}")
            .await
            > 1.7e9
    );
}
