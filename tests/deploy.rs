//! The deploy examples agree with what graphcache serves: the YAML parses,
//! probes and ports are graphcache's, the shipped configurations pass
//! `--check-config`, and promtool accepts the Prometheus files as mounted.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_graphcache");

fn load(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path} parses: {e}"))
}

fn str_of<'a>(value: &'a Yaml, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is a string: {value:?}"))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// `256Mi`, `1Gi`, `512M` or plain bytes, as Kubernetes writes memory.
fn bytes_of(quantity: &str) -> u64 {
    let units = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("M", 1_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = quantity.strip_suffix(suffix) {
            return n.parse::<u64>().unwrap() * factor;
        }
    }
    quantity.parse().unwrap()
}

/// Runs `graphcache --check-config` on `toml` with `env`; its stdout.
fn check_config(toml: &str, env: &[(&str, &str)]) -> String {
    // One directory per call: two tests checking the same text at once
    // must not remove each other's file.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "graphcache-deploy-{}-{call}-{}",
        std::process::id(),
        blake3::hash(toml.as_bytes()).to_hex()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("graphcache.toml");
    std::fs::write(&file, toml).unwrap();
    let mut command = Command::new(BIN);
    command.arg("--config").arg(&file).arg("--check-config");
    for (key, _) in std::env::vars() {
        if key.starts_with("GRAPHCACHE_") {
            command.env_remove(key);
        }
    }
    let out = command.envs(env.iter().copied()).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "--check-config failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// What Kubernetes injects into every pod of a namespace with a Service
/// named `graphcache`.
const SERVICE_ENV: [(&str, &str); 4] = [
    ("GRAPHCACHE_SERVICE_HOST", "10.96.0.12"),
    ("GRAPHCACHE_SERVICE_PORT", "9090"),
    ("GRAPHCACHE_PORT", "tcp://10.96.0.12:9090"),
    ("GRAPHCACHE_PORT_9090_TCP_ADDR", "10.96.0.12"),
];

struct Kubernetes {
    config: toml::Table,
    docs: Vec<Yaml>,
    /// `--check-config`'s output for the sidecar as it runs: the image's
    /// ENV, the container's env and args, the ConfigMap's file, and what a
    /// Service named graphcache injects.
    effective: String,
}

impl Kubernetes {
    fn load() -> Self {
        let docs = load("examples/kubernetes/graphcache.yaml");
        let text = str_of(
            &Self::kind(&docs, "ConfigMap")["data"]["graphcache.toml"],
            "the ConfigMap's graphcache.toml",
        )
        .to_owned();
        let mut k8s = Self {
            config: text.parse().expect("the ConfigMap's config is TOML"),
            docs,
            effective: String::new(),
        };
        let mut env: Vec<(String, String)> = dockerfile_env()
            .into_iter()
            .filter(|(k, _)| k != "GRAPHCACHE_CONFIG")
            .collect();
        for var in k8s.container("graphcache")["env"].as_vec().unwrap() {
            env.push((
                str_of(&var["name"], "env name").to_owned(),
                str_of(&var["value"], "env value").to_owned(),
            ));
        }
        env.extend(
            SERVICE_ENV
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        k8s.effective = check_config(&text, &pairs);
        k8s
    }

    /// An effective value, as `--check-config` prints it.
    fn effective(&self, key: &str) -> String {
        self.effective
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")))
            .and_then(|rest| rest.split('#').next())
            .map(|v| v.trim().trim_matches('"').to_owned())
            .unwrap_or_else(|| panic!("no effective {key} in {}", self.effective))
    }

    fn kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("a {kind}"))
    }

    fn pod(&self) -> &Yaml {
        &Self::kind(&self.docs, "Deployment")["spec"]["template"]
    }

    fn container(&self, name: &str) -> &Yaml {
        self.pod()["spec"]["containers"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("a container named {name}"))
    }

    fn port(&self, key: &str) -> u16 {
        port_of(&self.effective(key))
    }
}

#[test]
fn kubernetes_example_starts_with_its_configmap_beside_a_service_named_graphcache() {
    let k8s = Kubernetes::load();
    let out = &k8s.effective;
    for (name, _) in SERVICE_ENV {
        assert!(
            out.contains(&format!("# ignored environment variable {name}")),
            "{out}"
        );
    }
    let service = Kubernetes::kind(&k8s.docs, "Service");
    assert_eq!(service["metadata"]["name"].as_str(), Some("graphcache"));
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some("admin")
    );
}

#[test]
fn kubernetes_example_probes_ports_and_limits_are_graphcaches() {
    let k8s = Kubernetes::load();
    let (listen, admin) = (k8s.port("listen"), k8s.port("admin_listen"));
    // As it runs: the proxy only on the pod's loopback (else anything in
    // the cluster could use it); the admin port on the pod IP, where the
    // kubelet and Prometheus come in.
    assert!(
        k8s.effective("listen").starts_with("127.0.0.1:"),
        "{}",
        k8s.effective
    );
    assert!(k8s.effective("admin_listen").starts_with("0.0.0.0:"));
    let sidecar = k8s.container("graphcache");
    let ports: Vec<(&str, i64)> = sidecar["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports, [("proxy", listen as i64), ("admin", admin as i64)]);
    let resolve = |port: &Yaml| match port {
        Yaml::Integer(n) => *n,
        Yaml::String(name) => ports.iter().find(|(n, _)| n == name).unwrap().1,
        other => panic!("a probe port: {other:?}"),
    };
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &sidecar[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(resolve(&get["port"]), admin as i64, "{probe}");
    }
    let annotations = &k8s.pod()["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(admin.to_string().as_str())
    );
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));
    // The app's Graph base URL is the sidecar.
    let app_env = k8s.container("app")["env"].as_vec().unwrap();
    assert!(app_env
        .iter()
        .any(|e| e["value"].as_str() == Some(format!("http://127.0.0.1:{listen}").as_str())));

    // Memory: the README's rule, 1.3 x cache_max_bytes + 64 MiB.
    let cache = k8s.config["cache_max_bytes"].as_integer().unwrap() as f64;
    let resources = &sidecar["resources"];
    for bound in ["requests", "limits"] {
        assert!(resources[bound]["cpu"].as_str().is_some(), "{bound}.cpu");
        let memory = bytes_of(str_of(&resources[bound]["memory"], "memory")) as f64;
        assert!(
            memory >= 1.3 * cache + 64.0 * 1048576.0,
            "{bound}.memory {memory} is below 1.3 x {cache} + 64 MiB"
        );
    }
    // Non-root (the image's numeric USER), read-only root, no escalation.
    let security = &sidecar["securityContext"];
    assert_eq!(security["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let user = security["runAsUser"].as_i64().unwrap();
    assert!(
        dockerfile.contains(&format!("USER {user}:")),
        "Dockerfile USER is {user}"
    );
    // The config comes from the ConfigMap, where --config reads it.
    let args: Vec<&str> = sidecar["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let file = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let mount = &sidecar["volumeMounts"][0];
    assert_eq!(
        Path::new(file).parent().unwrap(),
        Path::new(mount["mountPath"].as_str().unwrap())
    );
    let volume = &k8s.pod()["spec"]["volumes"][0];
    assert_eq!(volume["name"].as_str(), mount["name"].as_str());
    assert_eq!(
        volume["configMap"]["name"].as_str(),
        Kubernetes::kind(&k8s.docs, "ConfigMap")["metadata"]["name"].as_str()
    );
    // Kubernetes' grace outlasts graphcache's drain.
    let grace = k8s.pod()["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap();
    assert!(grace > k8s.config["shutdown_grace"].as_integer().unwrap());
}

#[tokio::test]
async fn the_example_probe_paths_answer_on_the_admin_port() {
    let k8s = Kubernetes::load();
    let sidecar = k8s.container("graphcache");
    let h = support::Harness::start().await;
    for probe in ["readinessProbe", "livenessProbe"] {
        let path = sidecar[probe]["httpGet"]["path"].as_str().unwrap();
        assert_eq!(h.admin_get(path).await.status, 200, "{probe} {path}");
    }
    let scrape = k8s.pod()["metadata"]["annotations"]["prometheus.io/path"]
        .as_str()
        .unwrap();
    let metrics = h.admin_get(scrape).await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.text().contains("graphcache_requests_total"));
}

/// `ENV` values the Dockerfile's final image sets.
fn dockerfile_env() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let last = joined
        .lines()
        .rfind(|l| l.starts_with("ENV "))
        .expect("the image sets ENV");
    last["ENV ".len()..]
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join("promtool"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool must be installed in CI (.ci/run installs Debian's prometheus)"
        );
        eprintln!("*** SKIPPED: promtool not installed; the compose Prometheus files were NOT checked ***");
    }
    found
}

#[test]
fn compose_example_wires_graphcache_the_mock_and_prometheus_with_the_alert_rules() {
    let compose = &load("examples/compose/compose.yaml")[0];
    let services = &compose["services"];
    let graphcache = &services["graphcache"];
    let env = &graphcache["environment"];
    let upstream = str_of(&env["GRAPHCACHE_UPSTREAM"], "GRAPHCACHE_UPSTREAM");
    // The upstream is the mock service, on the port the mock listens on.
    let (host, port) = upstream
        .strip_prefix("http://")
        .unwrap()
        .split_once(':')
        .unwrap();
    assert!(services[host].as_hash().is_some(), "a service {host}");
    let mock_listen = str_of(&services[host]["command"][0], "mock address");
    assert_eq!(port_of(mock_listen), port.parse::<u16>().unwrap());
    assert_eq!(
        services[host]["build"]["target"].as_str(),
        Some("mock-graph")
    );
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("AS mock-graph"));

    // The image's own settings plus compose's pass --check-config with the
    // shipped config file, and the result is the mock upstream.
    let mut all: Vec<(String, String)> = dockerfile_env()
        .into_iter()
        .filter(|(k, _)| k != "GRAPHCACHE_CONFIG")
        .collect();
    for (k, v) in env.as_hash().unwrap() {
        all.push((
            k.as_str().unwrap().to_owned(),
            v.as_str().unwrap().to_owned(),
        ));
    }
    let pairs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let shipped = std::fs::read_to_string(Path::new(ROOT).join("config/graphcache.toml")).unwrap();
    let out = check_config(&shipped, &pairs);
    assert!(out.contains(&format!("upstream = \"{upstream}\"")), "{out}");
    let lookup = |key: &str| {
        all.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| port_of(v))
            .unwrap()
    };
    let (listen, admin) = (
        lookup("GRAPHCACHE_LISTEN"),
        lookup("GRAPHCACHE_ADMIN_LISTEN"),
    );
    let published: Vec<u16> = graphcache["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| port_of(p.as_str().unwrap()))
        .collect();
    assert_eq!(published, [listen, admin]);

    // Prometheus scrapes graphcache's admin port and loads the alert rules.
    let prometheus = &services["prometheus"];
    let dir = std::env::temp_dir().join(format!("graphcache-compose-{}", std::process::id()));
    let mut config_path = None;
    for volume in prometheus["volumes"].as_vec().unwrap() {
        let mut parts = volume.as_str().unwrap().split(':');
        let (host_path, container_path) = (parts.next().unwrap(), parts.next().unwrap());
        let source = Path::new(ROOT).join("examples/compose").join(host_path);
        let target = dir.join(container_path.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&source, &target)
            .unwrap_or_else(|e| panic!("{} is mounted: {e}", source.display()));
        if container_path == "/etc/prometheus/prometheus.yml" {
            config_path = Some(target);
        }
    }
    let config_path = config_path.expect("prometheus.yml is mounted where Prometheus reads it");
    let scrape = &load("examples/compose/prometheus.yml")[0]["scrape_configs"][0];
    assert_eq!(
        scrape["static_configs"][0]["targets"][0].as_str(),
        Some(format!("graphcache:{admin}").as_str())
    );
    if let Some(promtool) = promtool() {
        // Checks the config and every rule file it names, as mounted.
        let out = Command::new(promtool)
            .arg("check")
            .arg("config")
            .arg(&config_path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("graphcache-alerts.yml"), "{text}");
        assert!(text.contains("rules found"), "{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kubernetes_fleet_example_points_every_sidecar_at_its_redis_service() {
    let docs = load("examples/kubernetes/fleet.yaml");
    let config_map = Kubernetes::kind(&docs, "ConfigMap");
    let text = str_of(&config_map["data"]["graphcache.toml"], "the fleet config");
    let deployments: Vec<&Yaml> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Deployment"))
        .collect();
    let app = deployments
        .iter()
        .find(|d| d["metadata"]["name"].as_str() == Some("ads-reporter"))
        .expect("the app's Deployment");
    assert!(
        app["spec"]["replicas"].as_i64().unwrap() > 1,
        "several pods"
    );
    let sidecar = app["spec"]["template"]["spec"]["containers"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some("graphcache"))
        .expect("a graphcache sidecar");
    // The secret comes from a Secret; everything else as the pod runs it.
    let mut env: Vec<(String, String)> = dockerfile_env()
        .into_iter()
        .filter(|(k, _)| k != "GRAPHCACHE_CONFIG")
        .collect();
    for var in sidecar["env"].as_vec().unwrap() {
        let name = str_of(&var["name"], "env name").to_owned();
        match var["value"].as_str() {
            Some(value) => env.push((name, value.to_owned())),
            None => {
                assert_eq!(name, "GRAPHCACHE_FLEET_SECRET");
                assert_eq!(
                    var["valueFrom"]["secretKeyRef"]["name"].as_str(),
                    Some("graphcache-fleet")
                );
                env.push((name, "0123456789abcdef0123456789abcdef".to_owned()));
            }
        }
    }
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let effective = check_config(text, &pairs);
    let service = docs
        .iter()
        .find(|d| {
            d["kind"].as_str() == Some("Service")
                && d["metadata"]["name"].as_str() == Some("graphcache-redis")
        })
        .expect("a Service for Redis");
    let port = service["spec"]["ports"][0]["port"].as_i64().unwrap();
    assert!(
        effective.contains(&format!(
            "redis_url = \"redis://graphcache-redis:{port}/0\""
        )),
        "{effective}"
    );
    assert!(
        !effective.contains("0123456789abcdef"),
        "the secret is never printed"
    );
    // Redis as a cache: no persistence, evicting closest-to-expiry first.
    let redis = deployments
        .iter()
        .find(|d| d["metadata"]["name"].as_str() == Some("graphcache-redis"))
        .expect("Redis's Deployment");
    let args: Vec<&str> = redis["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args
        .windows(2)
        .any(|w| w == ["--maxmemory-policy", "volatile-ttl"]));
    assert!(args.windows(2).any(|w| w == ["--save", ""]));
}
