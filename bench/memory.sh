#!/usr/bin/env bash
# Memory under load, against the mock Graph on loopback: graphcache's RSS
# after (1) filling the default 256 MiB cache with distinct ~2 KB answers,
# (2) 20,000 distinct reads carrying a junk x_ids= list of 300 ids into a
# 16 MiB cache, and (3) exactly 100,000 distinct 2 KB answers in a cache
# large enough to keep them all, against the race's goal of 1.3 x their
# payload + 30 MiB. Bounded in requests and time; needs wrk (Debian package).
#
#     bench/memory.sh            # builds the release binary and example first
#     ONLY_GOAL=1 bench/memory.sh   # only (3)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/common.sh
. bench/common.sh

"$MOCK" 127.0.0.1:18389 >"$work/mock.log" 2>&1 & pids+=($!)
sleep 0.5

rss_mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

run() { # name cache_bytes requests lua
  local name=$1 cache=$2 requests=$3 lua=$4 port=18400
  GRAPHCACHE_ACCESS_LOG=false "$BIN" --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$((port+1)) \
    --upstream http://127.0.0.1:18389 --fresh-ttl 3600 --cache-max-bytes "$cache" >"$work/$name.log" 2>&1 &
  local pid=$!; pids+=($pid)
  for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$((port+1))/healthz" && break; sleep 0.1; done
  local start; start=$(rss_mib $pid)
  cat >"$work/$name.lua" <<LUA
$lua
LUA
  # Two passes, so retention shows apart from growth.
  for pass in 1 2; do
    wrk -t2 -c32 -d60s -s "$work/$name.lua" "http://127.0.0.1:$port" >"$work/$name.wrk.$pass" 2>&1 || true
    local entries bytes
    entries=$(curl -s "http://127.0.0.1:$((port+1))/metrics" | awk '/^graphcache_cache_entries /{print $2}')
    bytes=$(curl -s "http://127.0.0.1:$((port+1))/metrics" | awk '/^graphcache_cache_size_bytes /{print $2}')
    echo "$name pass $pass: RSS $(rss_mib $pid) MiB (started at $start MiB), cache_max_bytes $((cache/1048576)) MiB, entries $entries, weighted bytes $bytes, bound 1.3x+30 = $(awk -v c="$cache" 'BEGIN{printf "%.0f", c/1048576*1.3+30}') MiB"
  done
  kill $pid; wait $pid 2>/dev/null || true
}

# distinct reads of `bytes`-sized answers; each wrk thread counts its own
# requests and stops after `limit`.
fill_lua() { # limit bytes
  cat <<LUA
local n, limit = 0, $1
function setup(thread) thread:set("id", math.random(1, 1000000000)) end
function init() n = 0 end
function request()
  n = n + 1
  if n > limit then wrk.thread:stop() end
  return wrk.format("GET", "/v26.0/big?bytes=$2&access_token=EAAmem&n=" .. id .. "-" .. n)
end
LUA
}
plain_lua=$(fill_lua "${FILL_REQUESTS:-75000}" 1950)
[ "${ONLY_GOAL:-}" = 1 ] || run plain $((256 << 20)) 0 "$plain_lua"

junk=$(seq -s, 100000 100299)
junk_lua='
local n, limit = 0, 10000
function setup(thread) thread:set("id", math.random(1, 1000000000)) end
function request()
  n = n + 1
  if n > limit then wrk.thread:stop() end
  return wrk.format("GET", "/v26.0/" .. n .. "?access_token=EAAmem&t=" .. id .. "&x_ids='"$junk"'")
end'
[ "${ONLY_GOAL:-}" = 1 ] || run junk $((16 << 20)) 0 "$junk_lua"

# (3) 100,000 entries of 2 KB: RSS against their payload (the bodies).
goal_lua=$(fill_lua 50000 2048)
port=18410
GRAPHCACHE_ACCESS_LOG=false "$BIN" --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$((port+1)) \
  --upstream http://127.0.0.1:18389 --fresh-ttl 3600 --cache-max-bytes $((1 << 30)) >"$work/goal.log" 2>&1 &
pid=$!; pids+=($pid)
for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$((port+1))/healthz" && break; sleep 0.1; done
body=$(curl -s "http://127.0.0.1:18389/v26.0/big?bytes=2048&access_token=EAAmem&n=probe" | wc -c)
echo "$goal_lua" >"$work/goal.lua"
wrk -t2 -c32 -d"${GOAL_SECONDS:-40}s" -s "$work/goal.lua" "http://127.0.0.1:$port" >"$work/goal.wrk" 2>&1 || true
entries=$(curl -s "http://127.0.0.1:$((port+1))/metrics" | awk '/^graphcache_cache_entries /{print $2}')
rss=$(rss_mib $pid)
awk -v e="$entries" -v b="$body" -v r="$rss" 'BEGIN {
  payload = e * b / 1048576; bound = payload * 1.3 + 30
  printf "100k goal: %d entries of %d bytes = %.1f MiB payload; RSS %.1f MiB = %.2f x payload (goal <= %.1f MiB: %s)\n",
    e, b, payload, r, r / payload, bound, (r <= bound ? "met" : "not met") }'
kill $pid; wait $pid 2>/dev/null || true
