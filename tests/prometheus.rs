//! The dashboard and alert rules against a real Prometheus (Debian's
//! `prometheus` package, installed by `.ci/run`): Prometheus scrapes
//! graphcache's admin port every second while traffic drives every panel,
//! then every dashboard query and every alert rule must be valid and return
//! data. Also runs `promtool check metrics` and `promtool check rules`.
//! graphcache runs in fleet mode on a real `redis-server`, so the fleet
//! panels have data too; Redis is killed at the end for the fleet alert.
//! Without Prometheus the test says loudly that it skipped; under CI it fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use support::{Harness, Outage};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn find(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file())
}

/// Kills Prometheus and removes its directory however the test ends.
struct Running {
    child: Child,
    dir: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn http_get(url: &str) -> Option<(u16, Bytes)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::get(url).body(Full::new(Bytes::new())).ok()?;
    let response = client.request(request).await.ok()?;
    let status = response.status().as_u16();
    Some((
        status,
        response.into_body().collect().await.ok()?.to_bytes(),
    ))
}

async fn query(prometheus: &str, expr: &str) -> Value {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", expr)
        .finish();
    match http_get(&format!("http://{prometheus}/api/v1/query?{q}")).await {
        Some((_, body)) => serde_json::from_slice(&body).unwrap_or(Value::Null),
        None => Value::Null,
    }
}

fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/dashboards/graphcache.json")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "5m");
            out.push((
                format!("panel '{}'", panel["title"].as_str().unwrap()),
                expr,
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_queries_return_data_from_a_real_prometheus() {
    let (Some(prometheus_bin), Some(promtool)) = (find("prometheus"), find("promtool")) else {
        if std::env::var_os("CI").is_some() {
            panic!("prometheus and promtool must be installed in CI (.ci/run installs Debian's prometheus)");
        }
        eprintln!("\n**********************************************************************");
        eprintln!("*** SKIPPED: prometheus/promtool not installed; the dashboard and   ***");
        eprintln!("*** alert queries were NOT checked. `apt-get install prometheus`.   ***");
        eprintln!("**********************************************************************\n");
        return;
    };

    let rules = format!("{ROOT}/dashboards/graphcache-alerts.yml");
    let check = Command::new(&promtool)
        .args(["check", "rules", &rules])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check rules: {}",
        String::from_utf8_lossy(&check.stdout)
    );

    let mut redis = support::redis::RedisServer::start().await;
    let fleet = redis.settings("prometheus");
    let h = Arc::new(
        Harness::with(move |c| {
            c.fleet = Some(fleet);
            c.cache_max_bytes = 40_000;
            c.packing.max_in_flight = 1;
            c.routes.rules = vec![graphcache::routes::RouteRule::new(
                "*/insights",
                Some(Duration::from_secs(60)),
                None,
                true,
            )];
        })
        .await,
    );

    // Prometheus on loopback, scraping graphcache's admin port every second.
    let dir = std::env::temp_dir().join(format!("graphcache-prometheus-{}", rand::random::<u64>()));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: graphcache\n    static_configs:\n      - targets: ['{}']\n",
        h.admin
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let child = Command::new(&prometheus_bin)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus starts");
    let _running = Running { child, dir };
    let prometheus = format!("127.0.0.1:{port}");

    // Wait (bounded) until Prometheus has scraped graphcache once.
    let mut up = false;
    for _ in 0..300 {
        let v = query(&prometheus, "up{job=\"graphcache\"}").await;
        if v["data"]["result"][0]["value"][1] == "1" {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "Prometheus never scraped graphcache");

    drive_traffic(&h).await;
    // The fleet's Redis goes away: graphcache notices, and the alert's
    // query has something to show.
    redis.kill();
    h.wait_for_metric("graphcache_redis_up", 0.0).await;

    // promtool lints the exposition once every series exists.
    let exposition = h.admin_get("/metrics").await.body;
    let mut lint = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(lint.stdin.as_mut().unwrap(), &exposition).unwrap();
    let lint = lint.wait_with_output().unwrap();
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    // Every alert rule as Prometheus loaded it.
    let loaded: Value = serde_json::from_slice(
        &http_get(&format!("http://{prometheus}/api/v1/rules"))
            .await
            .unwrap()
            .1,
    )
    .unwrap();
    let mut queries = dashboard_queries();
    for group in loaded["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            queries.push((
                format!("alert {}", rule["name"].as_str().unwrap()),
                rule["query"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert_eq!(
        queries
            .iter()
            .filter(|(n, _)| n.starts_with("alert"))
            .count(),
        4,
        "all alert rules loaded"
    );

    // Poll (bounded) until every query has data: scrapes lag traffic by ~1 s.
    let mut missing = Vec::new();
    for _ in 0..60 {
        missing.clear();
        for (name, expr) in &queries {
            let v = query(&prometheus, expr).await;
            assert_eq!(v["status"], "success", "{name}: `{expr}` is not valid: {v}");
            let has_data = v["data"]["result"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|s| s["value"][1].as_str().is_some_and(|x| x != "NaN"))
            });
            if !has_data {
                missing.push(format!("{name}: {expr}"));
            }
        }
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        missing.is_empty(),
        "queries without data:\n{}",
        missing.join("\n")
    );
}

/// Traffic that gives every panel and alert something to show: hits, misses,
/// revalidations, writes, a client batch, packed batches, evictions, high
/// usage, throttling and upstream errors. Bounded in count.
async fn drive_traffic(h: &Arc<Harness>) {
    h.mock.set_usage(&[
        ("x-app-usage", r#"{"call_count":40,"total_time":20,"total_cputime":10}"#),
        ("x-ad-account-usage", r#"{"acc_id_util_pct":20.5,"reset_time_duration":60}"#),
        ("x-business-use-case-usage", r#"{"1":[{"type":"ads_management","call_count":30,"total_cputime":5,"total_time":5,"estimated_time_to_regain_access":0}]}"#),
        ("x-fb-ads-insights-throttle", r#"{"app_id_util_pct":3,"acc_id_util_pct":7,"ads_api_access_tier":"standard_access"}"#),
        ("x-page-usage", r#"{"call_count":12,"total_time":4,"total_cputime":2}"#),
    ]);
    for round in 0..3 {
        for i in 0..5 {
            h.get(&format!(
                "/v26.0/act_1/insights?level=ad&n={i}&access_token=EAAprom"
            ))
            .await;
            h.get(&format!("/v26.0/act_1/ads?n={i}&access_token=EAAprom"))
                .await;
        }
        if round == 1 {
            h.send(
                Method::POST,
                "/v26.0/act_1/ads?access_token=EAAprom",
                &[],
                "name=x&adset_id=9",
            )
            .await;
        }
    }
    let items = json!([{"method": "GET", "relative_url": "act_1/ads?n=0"}, {"method": "GET", "relative_url": "act_1/campaigns"}]);
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("batch", &items.to_string())
        .finish();
    h.send(
        Method::POST,
        "/v26.0/?access_token=EAAprom",
        &[("content-type", "application/x-www-form-urlencoded")],
        &body,
    )
    .await;
    // Distinct reads piling up behind a slow upstream ride in batches.
    h.mock.set_delay(Duration::from_millis(50));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move {
                h.get(&format!("/v26.0/{}?access_token=EAAprom", 5000 + i))
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    h.mock.set_delay(Duration::ZERO);
    // Large answers push the cache past its byte bound.
    for i in 0..10 {
        h.get(&format!("/v26.0/big?bytes=8000&n={i}&access_token=EAAprom"))
            .await;
    }
    // Usage climbs past 90 %, then Graph throttles, then fails.
    h.mock.set_usage(&[
        ("x-app-usage", r#"{"call_count":93,"total_time":40,"total_cputime":30}"#),
        ("x-ad-account-usage", r#"{"acc_id_util_pct":91.5,"reset_time_duration":120}"#),
        ("x-business-use-case-usage", r#"{"1":[{"type":"ads_management","call_count":96,"total_cputime":50,"total_time":50,"estimated_time_to_regain_access":0}]}"#),
    ]);
    h.get("/v26.0/act_1/campaigns?fresh=1&access_token=EAAprom")
        .await;
    h.mock.throttle(
        80004,
        &[("x-business-use-case-usage", r#"{"1":[{"type":"ads_management","call_count":100,"total_cputime":60,"total_time":60,"estimated_time_to_regain_access":5}]}"#)],
    );
    h.get("/v26.0/act_1/adsets?access_token=EAAprom").await;
    h.get("/v26.0/act_1/ads?n=1&access_token=EAAprom").await;
    h.mock.stop_throttling();
    h.mock.set_outage(Outage::Status(503));
    for i in 0..5 {
        h.get(&format!("/v26.0/down{i}?access_token=EAAprom")).await;
    }
    h.mock.set_outage(Outage::None);
}
