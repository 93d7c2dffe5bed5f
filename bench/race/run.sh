#!/usr/bin/env bash
# The performance race (issue 9): graphcache beside nginx proxy_cache,
# Varnish and a bare hyper server (the ceiling), side by side in one run.
#
#   apt-get install nginx varnish wrk     # once
#   bench/race/run.sh                     # DUR=10 ROUNDS=2 WARM=2 by default
#
# Every server is pinned to core 0, wrk (-t1 -c64) to core 1; each target is
# started fresh for each measurement and the rounds are interleaved. The
# origin is nginx serving 1,000 generated 2 KB Graph-like objects with a
# strong ETag, Graph's `Cache-Control: private, no-cache, no-store,
# must-revalidate`, an `Expires` in the past, and clean 304s; nginx and
# Varnish are configured to cache them anyway and revalidate with
# If-None-Match. Access logs are off everywhere but the origin's, which
# counts what reaches it. Prints a table of medians and ratios and writes
# bench/race/latest.json. Only processes it started are stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."

DUR=${DUR:-10}
ROUNDS=${ROUNDS:-2}
WARM=${WARM:-2}
OUT=${OUT:-bench/race/latest.json}
for tool in nginx varnishd wrk taskset curl python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install nginx varnish wrk" >&2; exit 1; }
done
cargo build --release --quiet --bin graphcache --example mock-graph --example bare-hyper
BIN=$PWD/target/release/graphcache
MOCK=$PWD/target/release/examples/mock-graph
BARE=$PWD/target/release/examples/bare-hyper

work=$(mktemp -d)
# nginx workers and Varnish's child drop privileges: let them in.
chmod 755 "$work"
pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); }
trap 'stop_all; rm -rf "$work"' EXIT

ORIGIN_PORT=18081 NGINX_PORT=18082 VARNISH_PORT=18083 GC_PORT=18084 GC_ADMIN=18085 BARE_PORT=18086 MOCK_PORT=18087

# --- content: 1,000 objects of about 2 KB ---------------------------------
mkdir -p "$work/www/v26.0" "$work/cache" "$work/logs"
chmod 777 "$work/cache"
python3 - "$work/www/v26.0" <<'EOF'
import json, sys
for i in range(1000):
    body = {"id": f"obj{i}", "name": f"Object {i}", "status": "ACTIVE",
            "data": ("x" * 1900)}
    open(f"{sys.argv[1]}/obj{i}", "w").write(json.dumps(body))
EOF

wait_port() { # port
  for _ in $(seq 1 200); do
    curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.05
  done
  echo "nothing answers on port $1" >&2; return 1
}

# The head every nginx config here shares: one worker, in the foreground.
nginx_head() { # name
  cat <<EOF
worker_processes 1;
daemon off;
pid $work/$1.pid;
error_log $work/logs/$1-error.log warn;
events { worker_connections 4096; }
EOF
}

# --- the origin (stays up for the whole run) --------------------------------
{ nginx_head origin; cat <<EOF; } > "$work/origin.conf"
http {
  access_log $work/logs/origin-access.log;
  server {
    listen 127.0.0.1:$ORIGIN_PORT;
    root $work/www;
    default_type application/json;
    etag on;
    location / {
      add_header Cache-Control "private, no-cache, no-store, must-revalidate" always;
      add_header Expires "Sat, 01 Jan 2000 00:00:00 GMT" always;
    }
  }
}
EOF
taskset -c 0 nginx -c "$work/origin.conf" -p "$work" &
pids+=($!)
origin_pid=$!
wait_port "$ORIGIN_PORT"
origin_count() { wc -l < "$work/logs/origin-access.log"; }

# --- targets -----------------------------------------------------------------
# Each start_* runs one target on core 0 against $1 (an origin URL) with
# TTL $2 seconds (0: revalidate every hit), and records its pid.
target_pid=""
start_nginx() { # upstream ttl (0: nginx's least, 1 s; -1: no cache, a plain proxy)
  local upstream=$1 ttl=$2 valid caching
  valid=$(( ttl == 0 ? 1 : ttl ))
  caching="proxy_cache graph;
      proxy_cache_key \$request_uri;
      proxy_ignore_headers Cache-Control Expires Set-Cookie;
      proxy_cache_valid 200 ${valid}s;
      proxy_cache_revalidate on;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 5s;"
  # Not caching: no cache directives at all (with a zero TTL, nginx's cache
  # lock would serialise the identical requests instead).
  [ "$ttl" -lt 0 ] && caching="proxy_cache off;"
  rm -rf "$work/cache"/*
  { nginx_head nginx; cat <<EOF; } > "$work/nginx.conf"
http {
  access_log off;
  proxy_cache_path $work/cache keys_zone=graph:50m max_size=1g inactive=1h use_temp_path=off;
  upstream origin { server ${upstream#http://}; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      $caching
    }
  }
}
EOF
  taskset -c 0 nginx -c "$work/nginx.conf" -p "$work" &
  target_pid=$!
  pids+=($target_pid)
  wait_port "$NGINX_PORT"
}
start_varnish() {
  local upstream=$1 ttl=$2 host port
  host=${upstream#http://}; port=${host##*:}; host=${host%:*}
  cat > "$work/race.vcl" <<EOF
vcl 4.1;
backend origin { .host = "$host"; .port = "$port"; }
sub vcl_recv { unset req.http.Cookie; unset req.http.Authorization; return (hash); }
sub vcl_backend_response {
  unset beresp.http.Cache-Control;
  unset beresp.http.Expires;
  set beresp.ttl = ${ttl}s;
  set beresp.grace = 0s;
  set beresp.keep = 1h;
  return (deliver);
}
EOF
  taskset -c 0 varnishd -F -a "127.0.0.1:$VARNISH_PORT" -f "$work/race.vcl" -n "$work/varnish" \
    -s malloc,256m -p thread_pools=1 >/dev/null 2>&1 &
  target_pid=$!
  pids+=($target_pid)
  wait_port "$VARNISH_PORT"
}
start_graphcache() { # upstream ttl [packing] [coalescing]
  local upstream=$1 ttl=$2 batch=${3:-false} coalesce=${4:-true}
  GRAPHCACHE_LISTEN=127.0.0.1:$GC_PORT GRAPHCACHE_ADMIN_LISTEN=127.0.0.1:$GC_ADMIN \
  GRAPHCACHE_UPSTREAM=$upstream GRAPHCACHE_FRESH_TTL=$ttl GRAPHCACHE_ACCESS_LOG=false \
  GRAPHCACHE_BATCH=$batch GRAPHCACHE_COALESCE=$coalesce GRAPHCACHE_LOG_LEVEL=warn \
    taskset -c 0 "$BIN" >"$work/logs/graphcache.log" 2>&1 &
  target_pid=$!
  pids+=($target_pid)
  wait_port "$GC_PORT"
}
start_bare() {
  taskset -c 0 "$BARE" "127.0.0.1:$BARE_PORT" >/dev/null 2>&1 &
  target_pid=$!
  pids+=($target_pid)
  wait_port "$BARE_PORT"
}
stop_target() {
  kill "$target_pid" 2>/dev/null || true
  wait "$target_pid" 2>/dev/null || true
  local kept=()
  for p in "${pids[@]}"; do [ "$p" != "$target_pid" ] && kept+=("$p"); done
  pids=("${kept[@]}")
}
port_of() { case $1 in nginx) echo $NGINX_PORT;; varnish) echo $VARNISH_PORT;; graphcache) echo $GC_PORT;; bare) echo $BARE_PORT;; direct) echo $MOCK_PORT;; esac; }

# wrk scripts: S2 spreads over 1,000 URLs; S5 sends the stored ETag.
cat > "$work/many.lua" <<'EOF'
local i = 0
request = function()
  i = (i + 1) % 1000
  return wrk.format("GET", "/v26.0/obj" .. i .. "?access_token=EAArace")
end
EOF

# M: every request a distinct URL (a miss), one connection.
cat > "$work/unique.lua" <<'EOF'
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/v26.0/obj" .. (i % 1000) .. "?access_token=EAArace&n=" .. i)
end
EOF

# The warm-up before a measurement (not counted anywhere).
warm() { # url [extra wrk args...]
  local url=$1; shift
  taskset -c 1 wrk -t1 -c64 -d"${WARM}s" "$@" "$url" >/dev/null 2>&1 || true
}

# One wrk measurement: prints "req/s p99_ms cpu_percent".
measure() { # url [extra wrk args...]
  local url=$1; shift
  TIMEFORMAT='%U %S'
  { time taskset -c 1 wrk -t1 -c64 -d"${DUR}s" --latency "$@" "$url" > "$work/wrk.out" 2>&1 ; } 2> "$work/wrk.time"
  local rps p99 cpu
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v=v/1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v=v*1000}; print v}' "$work/wrk.out")
  cpu=$(awk -v d="$DUR" '{printf "%.0f", ($1+$2)/d*100}' "$work/wrk.time")
  grep -q "Non-2xx\|Socket errors" "$work/wrk.out" && grep -E "Non-2xx|Socket errors" "$work/wrk.out" | sed 's/^/  warning: /' >&2
  echo "${rps:-0} ${p99:-0} ${cpu:-0}"
}

# A latency measurement, one connection: prints "p50_ms p99_ms req/s".
latency() { # url [extra wrk args...]
  local url=$1; shift
  taskset -c 1 wrk -t1 -c1 -d"${DUR}s" --latency "$@" "$url" > "$work/wrk.out" 2>&1
  awk 'function ms(v) { if (v ~ /us$/) {sub("us","",v); return v/1000} if (v ~ /ms$/) {sub("ms","",v); return v} sub("s","",v); return v*1000 }
       $1=="50%" {p50=ms($2)} $1=="99%" {p99=ms($2)} /Requests\/sec/ {r=$2} END {print p50+0, p99+0, r+0}' "$work/wrk.out"
}

results="$work/results.txt"
: > "$results"
record() { echo "$*" >> "$results"; }

hot="/v26.0/obj1?access_token=EAArace"
origin="http://127.0.0.1:$ORIGIN_PORT"
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round" >&2
  # S1 hot hit, S2 1,000 URLs, S5 client If-None-Match: long TTL.
  for target in bare nginx varnish graphcache; do
    for scenario in S1 S2 S5; do
      case $target in
        bare) start_bare;; nginx) start_nginx "$origin" 3600;;
        varnish) start_varnish "$origin" 3600;; graphcache) start_graphcache "$origin" 3600;;
      esac
      port=$(port_of $target)
      base="http://127.0.0.1:$port"
      curl -s -o /dev/null "$base$hot"
      etag=$(curl -s -D - -o /dev/null "$base$hot" | awk 'tolower($1)=="etag:" {print $2}' | tr -d '\r')
      case $scenario in
        S1) args=();;
        S2) args=(-s "$work/many.lua");;
        S5) args=(-H "If-None-Match: $etag");;
      esac
      warm "$base$hot" "${args[@]}"
      sleep 0.2   # the origin logs a request after answering it
      before=$(origin_count)
      m=$(measure "$base$hot" "${args[@]}")
      sleep 0.2
      after=$(origin_count)
      record "$round $scenario $target $m $((after - before))"
      echo "  $scenario $target: $m origin=$((after - before))" >&2
      stop_target
    done
  done
  # S3: every hit revalidated (TTL 0), packing off against the static
  # origin. S3 proper: nginx at its least TTL (1 s), Varnish at TTL 0 with
  # keep, graphcache with coalescing (identical concurrent revalidations
  # share one call). S3p: one upstream request per client request, nginx
  # not caching (a plain proxy) beside graphcache with coalescing off, each
  # of its requests a conditional GET answered 304. Then graphcache once
  # more against the mock, which answers batches, with packing on.
  for variant in "S3 nginx" "S3 varnish" "S3 graphcache" "S3p nginx" "S3p graphcache"; do
    read -r scen target <<<"$variant"
    case $variant in
      "S3 nginx") start_nginx "$origin" 0;;
      "S3 varnish") start_varnish "$origin" 0;;
      "S3 graphcache") start_graphcache "$origin" 0 false true;;
      "S3p nginx") start_nginx "$origin" -1;;
      "S3p graphcache") start_graphcache "$origin" 0 false false;;
    esac
    base="http://127.0.0.1:$(port_of $target)"
    curl -s -o /dev/null "$base$hot"
    warm "$base$hot"
    sleep 0.2
    before=$(origin_count)
    m=$(measure "$base$hot")
    sleep 0.2
    after=$(origin_count)
    record "$round $scen $target $m $((after - before))"
    echo "  $scen $target: $m origin=$((after - before))" >&2
    stop_target
  done
  MOCK_GRAPH_DELAY_MS=0 taskset -c 0 "$MOCK" "127.0.0.1:$MOCK_PORT" > "$work/logs/mock.log" 2>&1 &
  mock_pid=$!; pids+=($mock_pid); wait_port "$MOCK_PORT"
  start_graphcache "http://127.0.0.1:$MOCK_PORT" 0 true
  base="http://127.0.0.1:$GC_PORT"
  curl -s -o /dev/null "$base$hot"
  warm "$base$hot"
  m=$(measure "$base$hot")
  record "$round S3b graphcache $m -1"
  echo "  S3b graphcache (mock origin, packing on): $m" >&2
  stop_target
  target_pid=$mock_pid; stop_target
  # S4: 200 identical cold GETs at once, origin delay 200 ms (the mock);
  # "direct" sends 200 distinct GETs straight to the mock: the client's and
  # the origin's own time, with nothing between.
  for target in direct nginx varnish graphcache; do
    MOCK_GRAPH_DELAY_MS=200 taskset -c 0 "$MOCK" "127.0.0.1:$MOCK_PORT" > "$work/logs/mock.log" 2>&1 &
    mock_pid=$!; pids+=($mock_pid); wait_port "$MOCK_PORT"
    case $target in
      nginx) start_nginx "http://127.0.0.1:$MOCK_PORT" 3600;;
      varnish) start_varnish "http://127.0.0.1:$MOCK_PORT" 3600;;
      graphcache) start_graphcache "http://127.0.0.1:$MOCK_PORT" 3600;;
      direct) target_pid="";;
    esac
    sleep 0.5   # the mock prints its count every 100 ms; let the probes' show
    probe=$(awk '/requests received/ {n=$3} END {print n+0}' "$work/logs/mock.log")
    base="http://127.0.0.1:$(port_of $target)"
    args=()
    for i in $(seq 1 200); do
      if [ "$target" = direct ]; then args+=(-o /dev/null "$base/v26.0/cold$i?access_token=EAArace")
      else args+=(-o /dev/null "$base/v26.0/cold1?access_token=EAArace"); fi
    done
    # A failed transfer must not end the run (pipefail): its time still counts.
    max=$({ taskset -c 1 curl -s --no-progress-meter --parallel --parallel-immediate --parallel-max 200 \
      -w '%{time_total}\n' "${args[@]}" 2>/dev/null || true; } | sort -n | tail -1)
    sleep 0.3
    calls=$(awk '/requests received/ {n=$3} END {print n+0}' "$work/logs/mock.log" | tr -d ,)
    max_ms=$(awk -v s="$max" 'BEGIN {printf "%.0f", s*1000}')
    record "$round S4 $target $max_ms 0 0 $((calls - probe))"
    echo "  S4 $target: origin calls $((calls - probe)), max ${max_ms} ms" >&2
    [ -n "$target_pid" ] && stop_target
    target_pid=$mock_pid; stop_target
  done
  # M: what a lone miss adds: one connection, every request a new URL, to
  # the origin directly and through graphcache (defaults, packing on).
  m=$(latency "$origin" -s "$work/unique.lua")
  record "$round M direct $m 0"
  echo "  M direct: p50/p99 ms, req/s $m" >&2
  start_graphcache "$origin" 3600 true
  m=$(latency "http://127.0.0.1:$GC_PORT" -s "$work/unique.lua")
  record "$round M graphcache $m 0"
  echo "  M graphcache: p50/p99 ms, req/s $m" >&2
  stop_target
done

python3 - "$results" "$OUT" "$DUR" "$ROUNDS" <<'EOF'
import json, statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
data = {}
for r in rows:
    rnd, scen, target, a, b, c, origin = r[0], r[1], r[2], float(r[3]), float(r[4]), float(r[5]), int(r[6])
    data.setdefault((scen, target), []).append((a, b, c, origin))
def med(scen, target, i):
    v = data.get((scen, target))
    return statistics.median(x[i] for x in v) if v else None
out = {"duration_s": int(sys.argv[3]), "rounds": int(sys.argv[4]), "scenarios": {}}
print(f"\n{'scenario':<34}{'bare':>14}{'nginx':>14}{'varnish':>14}{'graphcache':>14}{'gc/bare':>9}{'gc/nginx':>10}")
names = {"S1": "S1 hot hit, req/s", "S2": "S2 1,000 URLs, req/s", "S3": "S3 revalidate every hit, req/s",
         "S3p": "S3 one upstream req per request", "S3b": "S3 vs mock, packing on, req/s",
         "S5": "S5 client If-None-Match, req/s"}
for scen in ["S1", "S2", "S3", "S3p", "S3b", "S5"]:
    vals = {t: med(scen, t, 0) for t in ["bare", "nginx", "varnish", "graphcache"]}
    p99 = {t: med(scen, t, 1) for t in vals}
    cpu = {t: med(scen, t, 2) for t in vals}
    origin = {t: med(scen, t, 3) for t in vals}
    out["scenarios"][scen] = {t: {"rps": vals[t], "p99_ms": p99[t], "wrk_cpu_pct": cpu[t], "origin_requests": origin[t]} for t in vals if vals[t] is not None}
    fmt = lambda v: f"{v:>14.0f}" if v is not None else f"{'-':>14}"
    gc = vals["graphcache"]
    rb = f"{gc / vals['bare']:>9.2f}" if vals["bare"] and gc else f"{'-':>9}"
    rn = f"{gc / vals['nginx']:>10.2f}" if vals["nginx"] and gc else f"{'-':>10}"
    print(f"{names[scen]:<34}{fmt(vals['bare'])}{fmt(vals['nginx'])}{fmt(vals['varnish'])}{fmt(gc)}{rb}{rn}")
    print(f"{'  p99 ms / origin requests':<34}" + "".join(
        f"{(f'{p99[t]:.2f} / {origin[t]:.0f}' if vals[t] is not None else '-'):>14}" for t in vals))
print(f"\n{'S4 200 cold GETs, 200 ms origin':<34}{'direct':>16}{'nginx':>16}{'varnish':>16}{'graphcache':>16}")
s4 = {}
for t in ["direct", "nginx", "varnish", "graphcache"]:
    v = data.get(("S4", t))
    if v:
        s4[t] = {"origin_calls": statistics.median(x[3] for x in v), "max_ms": statistics.median(x[0] for x in v)}
print(f"{'  origin calls / max ms':<34}" + "".join(f"{(str(int(s4[t]['origin_calls'])) + ' / ' + str(int(s4[t]['max_ms']))):>16}" for t in s4))
out["scenarios"]["S4"] = s4
m = {}
for t in ["direct", "graphcache"]:
    v = data.get(("M", t))
    if v:
        m[t] = {"p50_ms": statistics.median(x[0] for x in v), "p99_ms": statistics.median(x[1] for x in v),
                "rps": statistics.median(x[2] for x in v)}
if len(m) == 2:
    added = m["graphcache"]["p50_ms"] - m["direct"]["p50_ms"]
    print(f"\n{'M lone miss, p50 / p99 ms':<34}{'direct':>16}{'graphcache':>16}{'added p50':>12}")
    print(f"{'':<34}" + "".join(f"{m[t]['p50_ms']:.3f} / {m[t]['p99_ms']:.3f}".rjust(16) for t in m) + f"{added:>12.3f}")
    m["added_p50_ms"] = added
out["scenarios"]["M"] = m
for scen in ["S1", "S2", "S3", "S5"]:
    for t, v in out["scenarios"].get(scen, {}).items():
        if v["wrk_cpu_pct"] and v["wrk_cpu_pct"] >= 95:
            print(f"warning: wrk used {v['wrk_cpu_pct']:.0f}% of its core in {scen} against {t}: the client may be the limit")
json.dump(out, open(sys.argv[2], "w"), indent=2)
print(f"\nwrote {sys.argv[2]}")
EOF
