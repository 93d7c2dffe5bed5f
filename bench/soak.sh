#!/usr/bin/env bash
# Bounded soak: a mixed read/write workload through graphcache in front of
# the mock Graph on loopback, for a fixed number of rounds of a fixed number
# of requests each; graphcache's RSS is sampled after every round. After the
# warm-up rounds (which span the first expiries, so revalidation is part of
# the steady state) RSS must stay flat (within +-5 % of its post-warm-up mean).
# Needs wrk (Debian package). Every round is bounded in requests (PER_ROUND)
# and time (ROUND_SECONDS; wrk always runs for its whole duration).
#
#     bench/soak.sh                      # 12 rounds x 40,000 requests, TTL 10 s
#     ROUNDS=20 PER_ROUND=100000 bench/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-12}
WARMUP=${WARMUP:-4}
PER_ROUND=${PER_ROUND:-40000}
# shellcheck source=bench/common.sh
. bench/common.sh

"$MOCK" 127.0.0.1:18489 >"$work/mock.log" 2>&1 & pids+=($!)
GRAPHCACHE_ACCESS_LOG=false ${SOAK_ENV:-} "$BIN" --listen 127.0.0.1:18490 --admin-listen 127.0.0.1:18491 \
  --upstream http://127.0.0.1:18489 --fresh-ttl "${SOAK_TTL:-10}" --cache-max-bytes $((32 << 20)) >"$work/gc.log" 2>&1 &
gc=$!; pids+=($gc)
for _ in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:18491/healthz && break; sleep 0.1; done

# 80 % reads over 5,000 objects (a few hot), 3 tokens, 2 fields variants;
# 10 % writes; 10 % client batches of 3 reads. Each thread stops after its
# share of PER_ROUND requests.
cat >"$work/soak.lua" <<LUA
local n, limit = 0, $((PER_ROUND / 2))
local tokens = {"EAAsoak1", "EAAsoak2", "EAAsoak3"}
local fields = {"id,name", "id,name,status"}
function request()
  n = n + 1
  if n > limit then wrk.thread:stop() end
  local r = math.random()
  local id = (math.random() < 0.5) and math.random(1, 50) or math.random(1, 5000)
  local token = tokens[math.random(1, 3)]
  if r < 0.8 then
    return wrk.format("GET", "/v26.0/" .. id .. "?fields=" .. fields[math.random(1, 2)] .. "&access_token=" .. token)
  elseif r < 0.9 then
    return wrk.format("POST", "/v26.0/" .. id .. "?access_token=" .. token,
      {["Content-Type"] = "application/x-www-form-urlencoded"}, "name=n" .. n)
  else
    local b = '[{"method":"GET","relative_url":"v26.0/' .. id .. '"},{"method":"GET","relative_url":"v26.0/' .. (id + 1) .. '"},{"method":"GET","relative_url":"v26.0/' .. (id + 2) .. '"}]'
    return wrk.format("POST", "/?access_token=" .. token,
      {["Content-Type"] = "application/x-www-form-urlencoded"}, "batch=" .. b)
  end
end
LUA

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$gc/status"; }
samples=()
for round in $(seq "$ROUNDS"); do
  wrk -t2 -c32 -d"${ROUND_SECONDS:-15}s" -s "$work/soak.lua" http://127.0.0.1:18490 >"$work/wrk.$round" 2>&1 || true
  rss=$(rss_kib)
  samples+=("$rss")
  reqs=$(awk '/requests in/ {print $1}' "$work/wrk.$round")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.$round")
  entries=$(curl -s http://127.0.0.1:18491/metrics | awk '/^graphcache_cache_entries /{print $2}')
  printf 'round %2d: %s requests, non-2xx %s, RSS %.1f MiB, entries %s\n' \
    "$round" "$reqs" "${non2xx:-0}" "$(awk -v k="$rss" 'BEGIN{print k/1024}')" "$entries"
done
printf '%s\n' "${samples[@]:$WARMUP}" | awk -v warm="$WARMUP" '
  { v[NR] = $1; s += $1 }
  END {
    mean = s / NR; worst = 0
    for (i = 1; i <= NR; i++) { d = (v[i] - mean) / mean; if (d < 0) d = -d; if (d > worst) worst = d }
    printf "after %d warm-up rounds: RSS mean %.1f MiB, largest deviation %.1f %% (bound 5 %%): %s\n",
      warm, mean / 1024, worst * 100, (worst <= 0.05 ? "flat" : "NOT FLAT")
    exit (worst <= 0.05 ? 0 : 1)
  }'
