//! Quota replay: a seeded mixed workload through graphcache in process, in
//! front of the mock Graph API, counting the Graph calls it spent on reads
//! against the fewest a cache that is never stale must spend, and the reads
//! that were stale after a completed write.
//!
//!     cargo bench --bench replay                       # 3,000 operations
//!     REPLAY_OPS=20000 REPLAY_SEED=9 cargo bench --bench replay
//!     REPLAY_ROUTES=default|recommended cargo bench --bench replay
//!
//! The workload (issue 12's): 16 clients at about 200 operations/s; Zipf
//! reads over 76 objects (70 ads, 6 ad accounts, whose node or `ads` listing
//! is read); 3 `fields` variants × 3 tokens × 2 user agents; 10 % writes to
//! ads; a fifth of the reads inside client batches sent as the Python SDK
//! sends them (form body, `relative_url` with a trailing slash). Routes:
//! `fresh_ttl = 60`.
//!
//! Graph calls are the mock's reads (single GETs plus GET batch items, 304s
//! included: each is one call on Graph's meters). The never-stale minimum
//! is, per cache key, the number of write epochs of its objects (writes
//! completed before a read started) in which the key was read.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::Harness;

const CLIENTS: usize = 16;
const OPS_PER_SECOND: f64 = 200.0;
const ADS: usize = 70;
const ACCOUNTS: usize = 6;
const TOKENS: [&str; 3] = ["EAAreplay1", "EAAreplay2", "EAAreplay3"];
const AGENTS: [&str; 2] = [
    "facebook-python-business-sdk/23.0.0",
    "fbbizsdk-nodejs-v23.0.0",
];
/// Share of operations that are client batches: with 90 % reads, 3 reads a
/// batch and a fifth of reads batched, 3b / (3b + 0.9 - b) = 0.2.
const BATCH_OPS: f64 = 0.18 / 2.6;
const FIELDS: [&str; 3] = ["id,name", "id,name,version", "name,version"];

fn ad(n: usize) -> String {
    (5001 + n).to_string()
}

/// What one read asks for.
#[derive(Debug, Clone)]
enum Target {
    Ad(usize),
    Account(usize),
    Listing(usize),
}

impl Target {
    fn path(&self) -> String {
        match self {
            Target::Ad(n) => format!("v26.0/{}", ad(*n)),
            Target::Account(n) => format!("v26.0/act_{}", n + 1),
            Target::Listing(n) => format!("v26.0/act_{}/ads", n + 1),
        }
    }

    /// The objects its answer shows (by the mock's version keys).
    fn objects(&self) -> Vec<String> {
        match self {
            Target::Ad(n) => vec![ad(*n)],
            Target::Account(n) => vec![(n + 1).to_string()],
            Target::Listing(n) => {
                let mut all = vec![(n + 1).to_string()];
                all.extend(members(*n));
                all
            }
        }
    }
}

/// Ads of account `n`: ads are dealt round-robin over the accounts.
fn members(n: usize) -> Vec<String> {
    (0..ADS).filter(|a| a % ACCOUNTS == n).map(ad).collect()
}

#[derive(Debug, Clone)]
struct Read {
    target: Target,
    fields: &'static str,
    token: &'static str,
    agent: &'static str,
}

impl Read {
    fn key(&self) -> String {
        format!(
            "{}|{}|{}|{}",
            self.target.path(),
            self.fields,
            self.token,
            self.agent
        )
    }
}

#[derive(Debug, Clone)]
enum Op {
    Read(Read),
    Batch(Vec<Read>),
    Write { ad: usize, token: &'static str },
}

fn workload(seed: u64, ops: usize) -> Vec<Vec<Op>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Zipf (s = 1.1) over 76 objects; ranks shuffled so hot ones are mixed.
    let mut objects: Vec<Target> = (0..ADS).map(Target::Ad).collect();
    objects.extend((0..ACCOUNTS).map(Target::Account));
    for i in (1..objects.len()).rev() {
        objects.swap(i, rng.random_range(0..=i));
    }
    let weights: Vec<f64> = (1..=objects.len())
        .map(|r| 1.0 / (r as f64).powf(1.1))
        .collect();
    let total: f64 = weights.iter().sum();
    let pick = |rng: &mut rand::rngs::StdRng| -> Read {
        let mut x = rng.random::<f64>() * total;
        let mut chosen = objects.len() - 1;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                chosen = i;
                break;
            }
            x -= w;
        }
        let target = match &objects[chosen] {
            // An account is read as its node or as its ads listing.
            Target::Account(n) if rng.random_bool(0.5) => Target::Listing(*n),
            other => other.clone(),
        };
        Read {
            target,
            fields: FIELDS[rng.random_range(0..FIELDS.len())],
            token: TOKENS[rng.random_range(0..TOKENS.len())],
            agent: AGENTS[rng.random_range(0..AGENTS.len())],
        }
    };
    let mut clients = vec![Vec::new(); CLIENTS];
    for i in 0..ops {
        let roll = rng.random::<f64>();
        let op = if roll < 0.10 {
            Op::Write {
                ad: rng.random_range(0..ADS),
                token: TOKENS[rng.random_range(0..TOKENS.len())],
            }
        } else if roll < 0.10 + BATCH_OPS {
            // A fifth of the reads are batch items, 3 reads of one caller
            // per batch.
            let first = pick(&mut rng);
            let mut items = vec![first.clone()];
            for _ in 0..2 {
                let mut item = pick(&mut rng);
                item.token = first.token;
                item.agent = first.agent;
                items.push(item);
            }
            Op::Batch(items)
        } else {
            Op::Read(pick(&mut rng))
        };
        clients[i % CLIENTS].push(op);
    }
    clients
}

/// What the run observed, for the minimum and the stale check.
#[derive(Default)]
struct Log {
    /// Per object, the end times of completed writes.
    writes: HashMap<String, Vec<Instant>>,
    reads: Vec<Observed>,
    errors: usize,
}

/// One client read: when it started, what it asked, the versions it saw.
type Observed = (Instant, Read, Vec<(String, u64)>);

/// The versions an answer shows, by object.
fn shown(target: &Target, body: &Value) -> Vec<(String, u64)> {
    let version = |v: &Value| v["version"].as_u64().unwrap_or(0);
    match target {
        Target::Ad(n) => vec![(ad(*n), version(body))],
        Target::Account(n) => vec![((n + 1).to_string(), version(body))],
        Target::Listing(_) => body["data"]
            .as_array()
            .map(|data| {
                data.iter()
                    .map(|m| (m["id"].as_str().unwrap_or("").to_owned(), version(m)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        out.append_pair(k, v);
    }
    out.finish()
}

async fn run_client(h: Arc<Harness>, ops: Vec<Op>, log: Arc<Mutex<Log>>, pace: Duration) {
    let mut next = Instant::now();
    for op in ops {
        tokio::time::sleep_until(next.into()).await;
        next += pace;
        match op {
            Op::Read(read) => {
                let started = Instant::now();
                let target = format!(
                    "/{}?fields={}&access_token={}",
                    read.target.path(),
                    read.fields,
                    read.token
                );
                let reply = h.get_with(&target, &[("user-agent", read.agent)]).await;
                let mut log = log.lock().unwrap();
                if reply.status != 200 {
                    log.errors += 1;
                    continue;
                }
                let versions = shown(&read.target, &reply.json());
                log.reads.push((started, read, versions));
            }
            Op::Batch(items) => {
                let started = Instant::now();
                let batch: Vec<Value> = items
                    .iter()
                    .map(|r| {
                        json!({"method": "GET", "relative_url": format!("{}/?fields={}", r.target.path(), r.fields)})
                    })
                    .collect();
                let body = form(&[
                    ("access_token", items[0].token),
                    ("batch", &Value::Array(batch).to_string()),
                    ("include_headers", "false"),
                ]);
                let reply = h
                    .send(
                        Method::POST,
                        "/v26.0/",
                        &[
                            ("content-type", "application/x-www-form-urlencoded"),
                            ("user-agent", items[0].agent),
                        ],
                        &body,
                    )
                    .await;
                let mut log = log.lock().unwrap();
                if reply.status != 200 {
                    log.errors += items.len();
                    continue;
                }
                for (read, entry) in items.into_iter().zip(reply.json().as_array().unwrap()) {
                    if entry["code"] != 200 {
                        log.errors += 1;
                        continue;
                    }
                    let body: Value =
                        serde_json::from_str(entry["body"].as_str().unwrap_or("null")).unwrap();
                    let versions = shown(&read.target, &body);
                    log.reads.push((started, read, versions));
                }
            }
            Op::Write { ad: n, token } => {
                // The Python SDK's api_update spells the node with a slash.
                let reply = h
                    .send(
                        Method::POST,
                        &format!("/v26.0/{}/", ad(n)),
                        &[("content-type", "application/x-www-form-urlencoded")],
                        &form(&[("access_token", token), ("name", "renamed")]),
                    )
                    .await;
                let done = Instant::now();
                let mut log = log.lock().unwrap();
                if reply.status != 200 {
                    log.errors += 1;
                    continue;
                }
                log.writes.entry(ad(n)).or_default().push(done);
            }
        }
    }
}

struct Figures {
    reads: usize,
    calls: u64,
    minimum: usize,
    stale: usize,
    errors: usize,
}

fn analyse(log: &Log, calls: u64) -> Figures {
    let completed_before = |object: &str, at: Instant| {
        log.writes
            .get(object)
            .map_or(0, |ends| ends.iter().filter(|end| **end < at).count())
    };
    let mut epochs: HashSet<(String, Vec<usize>)> = HashSet::new();
    let mut stale = 0;
    for (started, read, versions) in &log.reads {
        let epoch: Vec<usize> = read
            .target
            .objects()
            .iter()
            .map(|o| completed_before(o, *started))
            .collect();
        epochs.insert((read.key(), epoch));
        // Stale: shows a version older than a write completed before it began.
        if versions
            .iter()
            .any(|(object, version)| (*version as usize) < completed_before(object, *started))
        {
            stale += 1;
        }
    }
    Figures {
        reads: log.reads.len(),
        calls,
        minimum: epochs.len(),
        stale,
        errors: log.errors,
    }
}

fn main() {
    let ops: usize = std::env::var("REPLAY_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let seed: u64 = std::env::var("REPLAY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let routes = std::env::var("REPLAY_ROUTES").unwrap_or_else(|_| "ttl60".to_owned());
        let h = Arc::new(
            Harness::with(|c| match routes.as_str() {
                // graphcache's defaults: every read revalidated.
                "default" => {}
                // The recommended rules of config/graphcache.toml, uncommented.
                "recommended" => c.routes = support::recommended_routes().0,
                // Issue 12's workload: every route fresh for 60 s.
                _ => c.routes.default.fresh_ttl = Duration::from_secs(60),
            })
            .await,
        );
        println!("routes: {routes}");
        for n in 0..ACCOUNTS {
            let ids = members(n);
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            h.mock.set_members(&format!("act_{}", n + 1), "ads", &ids);
        }
        let log = Arc::new(Mutex::new(Log::default()));
        let pace = Duration::from_secs_f64(CLIENTS as f64 / OPS_PER_SECOND);
        let before = h.mock.reads();
        let started = Instant::now();
        let clients: Vec<_> = workload(seed, ops)
            .into_iter()
            .map(|client| tokio::spawn(run_client(h.clone(), client, log.clone(), pace)))
            .collect();
        for client in clients {
            client.await.unwrap();
        }
        let elapsed = started.elapsed();
        let calls = h.mock.reads() - before;
        let figures = analyse(&log.lock().unwrap(), calls);
        let per_1000 = |n: f64| 1000.0 * n / figures.reads as f64;
        println!(
            "replay: seed {seed}, {ops} operations in {:.1} s, {} client reads",
            elapsed.as_secs_f64(),
            figures.reads
        );
        println!("| | Graph read calls | per 1,000 client reads | × never-stale minimum |");
        println!("|---|---|---|---|");
        println!(
            "| never-stale minimum | {} | {:.0} | 1.00 |",
            figures.minimum,
            per_1000(figures.minimum as f64)
        );
        println!(
            "| graphcache | {} | {:.0} | {:.3} |",
            figures.calls,
            per_1000(figures.calls as f64),
            figures.calls as f64 / figures.minimum as f64
        );
        println!(
            "stale reads after completed writes: {}; errors: {}",
            figures.stale, figures.errors
        );
        let json = json!({
            "routes": std::env::var("REPLAY_ROUTES").unwrap_or_else(|_| "ttl60".to_owned()),
            "seed": seed, "operations": ops, "client_reads": figures.reads,
            "graph_read_calls": figures.calls, "never_stale_minimum": figures.minimum,
            "ratio": figures.calls as f64 / figures.minimum as f64,
            "stale_reads": figures.stale, "errors": figures.errors,
        });
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/replay.json");
        std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        println!("wrote {}", out.display());
    });
}
