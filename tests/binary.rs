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

/// Reads JSON log lines until every one of `fields` was seen; their values.
fn fields_from_logs<const N: usize>(stdout: &mut impl BufRead, fields: [&str; N]) -> [String; N] {
    let mut found: [Option<String>; N] = std::array::from_fn(|_| None);
    while found.iter().any(Option::is_none) {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "graphcache exited early"
        );
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        for (slot, field) in found.iter_mut().zip(fields) {
            if let Some(value) = event["fields"][field].as_str() {
                *slot = Some(value.to_owned());
            }
        }
    }
    found.map(Option::unwrap)
}

/// Reads JSON log lines until one's message contains `text`.
fn wait_for_log(stdout: &mut impl BufRead, text: &str) {
    loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "graphcache exited early"
        );
        if line.contains(text) {
            return;
        }
    }
}

#[tokio::test]
async fn sighup_reloads_the_config_file_and_a_bad_one_keeps_the_running_config() {
    let mock = MockGraph::start().await;
    let dir = std::env::temp_dir().join(format!("graphcache-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("graphcache.toml");
    let write = |fresh_ttl: &str| {
        std::fs::write(
            &file,
            format!(
                "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nupstream = \"{}\"\nlog_format = \"json\"\nfresh_ttl = {fresh_ttl}\n",
                mock.url()
            ),
        )
        .unwrap()
    };
    write("0");
    let mut child = Running(Some(
        Command::new(BIN)
            .arg("--config")
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let pid = child.0.as_ref().unwrap().id().to_string();
    let mut stdout = BufReader::new(child.0.as_mut().unwrap().stdout.take().unwrap());
    let [admin, addr] = fields_from_logs(&mut stdout, ["admin", "listen"]);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let get = |uri: String| {
        let client = client.clone();
        async move {
            let response = client.get(uri.parse().unwrap()).await.unwrap();
            let status = response
                .headers()
                .get("cache-status")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap();
            (status, body.to_bytes())
        }
    };
    let hup = || {
        assert!(Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success());
    };
    // A broken file: logged, counted, the running configuration stays.
    std::fs::write(&file, "fresh_ttl = \"soon\"\n").unwrap();
    hup();
    wait_for_log(&mut stdout, "configuration reload failed");
    // A good file with a longer TTL: applies to the next requests.
    write("60");
    hup();
    wait_for_log(&mut stdout, "configuration reloaded");
    let target = format!("http://{addr}/v26.0/91?access_token=EAAx");
    get(target.clone()).await;
    let (status, _) = get(target).await;
    assert_eq!(status, "graphcache; hit");
    let (_, metrics) = get(format!("http://{admin}/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert!(
        metrics.contains("graphcache_config_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("graphcache_config_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut process = child.0.take().unwrap();
    let exit = tokio::task::spawn_blocking(move || process.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A child graphcache, killed if the test fails before it stops it.
struct Running(Option<std::process::Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn check_config_prints_the_effective_configuration_as_toml_with_sources() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(BIN);
        command.args(args);
        for (k, v) in env {
            command.env(k, v);
        }
        let out = command.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let printed = run(
        &[
            "--check-config",
            "--config",
            "config/graphcache.toml",
            "--fresh-ttl",
            "7",
        ],
        &[("GRAPHCACHE_MAX_STALE", "99")],
    );
    let line = |key: &str| {
        printed
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} missing:\n{printed}"))
            .to_owned()
    };
    assert!(
        line("fresh_ttl").starts_with("fresh_ttl = 7 ") && line("fresh_ttl").ends_with("# flag")
    );
    assert!(
        line("max_stale").starts_with("max_stale = 99 ") && line("max_stale").ends_with("# env")
    );
    assert!(line("upstream").ends_with("# file"), "{}", line("upstream"));
    // Valid TOML, and read back as a file it is the same configuration.
    let table: toml::Table = toml::from_str(&printed).unwrap();
    let dir = std::env::temp_dir().join(format!("graphcache-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("effective.toml");
    std::fs::write(&file, &printed).unwrap();
    let again = run(&["--check-config", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(toml::from_str::<toml::Table>(&again).unwrap(), table);
    let _ = std::fs::remove_dir_all(&dir);
    // Nothing printed is Rust's Debug output.
    assert!(
        !printed.contains("Duration") && !printed.contains("0ns"),
        "{printed}"
    );
}
