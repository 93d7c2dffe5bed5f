//! The graphcache binary as a user runs it: flags, config checking, logs
//! that never show tokens, and exit 0 on SIGTERM after draining.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use support::MockGraph;

const BIN: &str = env!("CARGO_BIN_EXE_graphcache");

#[test]
fn check_config_accepts_the_shipped_file_and_rejects_typos() {
    let ok = Command::new(BIN)
        .args(["--check-config", "--config", "config/graphcache.toml"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // A GRAPHCACHE_ variable that names no key (Kubernetes injects
    // GRAPHCACHE_PORT for a Service named graphcache) is ignored and named.
    let unknown = Command::new(BIN)
        .args(["--check-config", "--fresh-ttl", "5"])
        .env("GRAPHCACHE_MAX_STAEL", "3")
        .env("GRAPHCACHE_PORT", "tcp://10.96.0.12:8080")
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(0));
    let listed = String::from_utf8_lossy(&unknown.stdout);
    assert!(
        listed.contains("ignored environment variable GRAPHCACHE_MAX_STAEL"),
        "{listed}"
    );
    assert!(
        listed.contains("ignored environment variable GRAPHCACHE_PORT"),
        "{listed}"
    );
    // A known key with a bad value is still an error.
    let bad = Command::new(BIN)
        .args(["--check-config"])
        .env("GRAPHCACHE_MAX_STALE", "soon")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("GRAPHCACHE_MAX_STALE"));
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--config",
        "--listen",
        "--upstream",
        "--admin-listen",
        "--fresh-ttl",
        "--max-stale",
        "--cache-max-bytes",
        "--check-config",
        "--version",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

#[tokio::test]
async fn logs_redact_tokens_and_sigterm_exits_zero() {
    let mock = MockGraph::start().await;
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            &mock.url(),
        ])
        .env("GRAPHCACHE_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    // A start-up line names the bound address.
    let addr = loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "graphcache exited early"
        );
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(listen) = event["fields"]["listen"].as_str() {
            break listen.to_owned();
        }
    };

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri = format!("http://{addr}/v26.0/me?access_token=EAAverysecret&appsecret_proof=proof123");
    let response = client.get(uri.parse().unwrap()).await.unwrap();
    assert_eq!(response.status(), 200);
    drop(response);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(
        !rest.contains("EAAverysecret") && !rest.contains("proof123"),
        "{rest}"
    );
    let access = rest
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "graphcache::access")
        .expect("an access log line");
    assert_eq!(
        access["fields"]["target"],
        "/v26.0/me?access_token=REDACTED&appsecret_proof=REDACTED"
    );
    assert_eq!(access["fields"]["cache"], "miss");
    assert!(access["fields"]["upstream_us"].as_u64().is_some());
    assert_eq!(mock.requests(), 1);
}
