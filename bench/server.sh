#!/usr/bin/env bash
# Server benchmarks, side by side in one run:
#   1. resolve throughput, latency and CPU per answer with 100 000 devices
#      mid-rollout, against a bare axum ceiling (bench/ceiling: one route, no
#      middleware) answering as many bytes (the same body size and a
#      Sluice-Signature header of the same size), in interleaved rounds;
#   2. the same resolve figures with 10 000 and 1 000 000 devices, the RSS and
#      the devices table's bytes per device;
#   3. publish: `sluice release publish` until signed, in the registry, resolvable.
# One server per fleet size, each with its own database in one private
# PostgreSQL; rounds interleave them so machine noise hits all alike.
# With --replicas instead: one fleet on one database, resolve straight to one
# server and through HAProxy to 1, 2 and 3 servers, and PostgreSQL's CPU and
# writes per 1 000 check-ins. Each mode saves its figures in
# bench/results/<mode>.json and rewrites BENCHMARKS.md from all of them
# (bench/partition.sh adds the partitioned devices table's).
#
#   bench/server.sh              the full run (release build; about 12 minutes)
#   bench/server.sh --replicas   the balancer run (about 8 minutes)
#   bench/server.sh --smoke      seconds: tiny fleet, 1 s wrk runs, one publish,
#                                debug build; checks that it runs and reports,
#                                writes its report to the temp folder, not BENCHMARKS.md
#   bench/server.sh --replicas --smoke   the same for the balancer run
#
# Knobs (environment): BENCH_ROUNDS (5), BENCH_DURATION (10s), BENCH_FLEETS
# ("10000 100000 1000000"; --replicas: 1000000), BENCH_TOKENS (10000),
# BENCH_CHECKIN_DEVICES (--replicas: distinct devices for the check-in cost,
# 200000), BENCH_PUBLISHES (7), BENCH_SLUICE=BIN (a built `sluice` instead of
# building one), BENCH_PERF=FILE (after the rounds, profile the server with
# perf into FILE, its data in FILE.data; BENCH_PERF_CALLS=dwarf for call
# graphs through code built without frame pointers; BENCH_PERF_OPEN=1 to
# profile under the open-loop load instead of wrk's saturation), BENCH_VARIANTS="LABEL=BIN[@VAR=VALUE,...] ..." (more
# servers on the main fleet's database, each another build or setting,
# measured in every round beside the rest: a change and what it replaces,
# side by side), BENCH_WRK_CPUS=LIST (wrk and openload on these CPUs and the
# servers, the ceiling and PostgreSQL on the others, as `taskset -c` takes
# them: the client off the server's cores, as on a machine of its own),
# BENCH_PG_CPUS=LIST (with BENCH_WRK_CPUS: PostgreSQL on these CPUs instead
# of the servers'; the same as BENCH_WRK_CPUS leaves the servers and the
# ceiling cores of their own, as in production, where the database and the
# devices are other machines), BENCH_DELAY_MS=N
# (each wrk connection waits N ms between answer and next request: a fixed
# load, about 64 / N requests per ms, instead of saturation; latency at that
# load, and the ratios then mean nothing), BENCH_LOAD_RATE (20000: requests/s
# of the open-loop rounds that follow the saturated ones, where the p99
# target is read a second time; BENCH_ROUNDS of them, the ceiling, resolve
# on the main fleet and the variants, sent by bench/ceiling's openload),
# BENCH_PLACED=0 (skip the open-loop rounds run again with the machine
# split as production splits it: the servers alone on half the CPUs,
# PostgreSQL and openload on the rest), OPENLOAD_TRACE_DIR=DIR (openload
# writes each request's due time and latency there, a file per run;
# `python3 bench/trace.py FILE...` shows when the slow ones came).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=../scripts/services.sh
. "$ROOT/scripts/services.sh"

SMOKE=0
MODE=server
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    --replicas) MODE=replicas ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "error: unknown argument $arg (usage: bench/server.sh [--replicas] [--smoke])" >&2; exit 2 ;;
  esac
done

if [ "$MODE" = replicas ] && [ -n "${BENCH_WRK_CPUS:-}" ]; then
  echo "error: BENCH_WRK_CPUS is for the one-server run, not --replicas" >&2
  exit 2
fi
if [ "$MODE" = replicas ]; then
  DEFAULT_FLEETS=1000000
  [ "$SMOKE" = 1 ] && DEFAULT_FLEETS=5000
else
  DEFAULT_FLEETS="10000 100000 1000000"
  [ "$SMOKE" = 1 ] && DEFAULT_FLEETS="2000 5000"
fi
if [ "$SMOKE" = 1 ]; then
  ROUNDS=${BENCH_ROUNDS:-1}; DURATION=${BENCH_DURATION:-1s}; FLEETS=${BENCH_FLEETS:-$DEFAULT_FLEETS}
  NTOKENS=${BENCH_TOKENS:-2000}; PUBLISHES=${BENCH_PUBLISHES:-1}; PROFILE=${BENCH_PROFILE:-debug}
  CHECKIN_DEVICES=${BENCH_CHECKIN_DEVICES:-4000}
else
  ROUNDS=${BENCH_ROUNDS:-5}; DURATION=${BENCH_DURATION:-10s}; FLEETS=${BENCH_FLEETS:-$DEFAULT_FLEETS}
  NTOKENS=${BENCH_TOKENS:-10000}; PUBLISHES=${BENCH_PUBLISHES:-7}; PROFILE=${BENCH_PROFILE:-release}
  CHECKIN_DEVICES=${BENCH_CHECKIN_DEVICES:-200000}
fi
read -r -a FLEET <<<"$FLEETS"
# The fleet the ceiling and the publish run against: the middle one (100 000).
MAIN=${FLEET[$(((${#FLEET[@]} - 1) / 2))]}
WRK_ARGS=(-t2 -c64 -d"$DURATION" --latency)
WRK=(wrk)
LOADER=()
if [ -n "${BENCH_PG_CPUS:-}" ] && [ -z "${BENCH_WRK_CPUS:-}" ]; then
  echo "error: BENCH_PG_CPUS goes with BENCH_WRK_CPUS" >&2
  exit 2
fi
if [ -n "${BENCH_WRK_CPUS:-}" ]; then
  WRK=(taskset -c "$BENCH_WRK_CPUS" wrk)
  LOADER=(taskset -c "$BENCH_WRK_CPUS")
  # The servers' CPUs: every online one that wrk does not get.
  SERVER_CPUS=$(python3 -c 'import os, sys
def cpus(spec):
    out = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out
rest = sorted(os.sched_getaffinity(0) - cpus(sys.argv[1]))
if not rest:
    sys.exit("error: BENCH_WRK_CPUS leaves no CPU for the servers")
print(",".join(map(str, rest)))' "$BENCH_WRK_CPUS")
fi

need_apt wrk python3 gcc libc6-dev pkg-config ca-certificates
[ "$MODE" = replicas ] && { command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need_apt haproxy; }
need_rust

STATE=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
OUT="$STATE/results"
mkdir -p "$OUT"
declare -A PID PORT
HAPROXY_STATES=()
cleanup() {
  local p s
  for s in "${HAPROXY_STATES[@]}"; do STATE=$s stop_haproxy; done
  for p in "${PID[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PID[@]}"; do wait "$p" 2>/dev/null || true; done
  stop_registry
  stop_postgres
  [ -n "${BENCH_KEEP:-}" ] || rm -rf "$STATE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "==> $*" >&2; }

PG_PORT=$(free_port)
REG_PORT=$(free_port "$PG_PORT")
log "postgres 127.0.0.1:$PG_PORT, registry 127.0.0.1:$REG_PORT, state $STATE"
PG_DB=postgres start_postgres
PSQL=(env PGOPTIONS='-c client_min_messages=warning' psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres)
# Room for a million devices in memory and for bulk inserts; fsync and
# synchronous commit stay on, as in production.
"${PSQL[@]}" -d postgres \
  -c "ALTER SYSTEM SET shared_buffers = '512MB'" \
  -c "ALTER SYSTEM SET max_wal_size = '4GB'" \
  -c "ALTER SYSTEM SET checkpoint_timeout = '15min'" \
  -c "ALTER SYSTEM SET maintenance_work_mem = '256MB'" >/dev/null
su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$STATE/postgres' -w restart" >/dev/null
start_registry
prepare_build_db

CEILING_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ -n "${BENCH_SLUICE:-}" ]; then
  SLUICE=$BENCH_SLUICE
  log "using $SLUICE"
else
  log "building the server ($PROFILE)"
  BUILD=(cargo build -p sluice-server)
  [ "$PROFILE" = release ] && BUILD+=(--release)
  # Symbols kept (the code is the same as a stripped release build) so perf can name functions.
  CARGO_PROFILE_RELEASE_STRIP=false DATABASE_URL=$BUILD_DATABASE_URL "${BUILD[@]}" >&2
  SLUICE="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE/sluice"
fi
[ -x "$SLUICE" ] || { echo "error: $SLUICE was not built" >&2; exit 1; }
if [ "$MODE" = server ]; then
  # The ceiling is its own small workspace, built from the same registry cache.
  log "building the bare axum ceiling ($PROFILE)"
  CBUILD=(cargo build --offline --manifest-path bench/ceiling/Cargo.toml --target-dir "$CEILING_DIR")
  [ "$PROFILE" = release ] && CBUILD+=(--release)
  "${CBUILD[@]}" >&2
  CEILING_BIN="$CEILING_DIR/$PROFILE/sluice-bench-ceiling"
  OPENLOAD="$CEILING_DIR/$PROFILE/openload"
fi

PASS=bench-admin-password
export SLUICE_KEY_PASSPHRASE=bench-passphrase

# cpu_ticks PID...: user + system CPU of the processes (all their threads) and
# of their children that have exited, in clock ticks.
cpu_ticks() {
  local p t=0 v
  for p in "$@"; do
    v=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$p/stat" 2>/dev/null || echo 0)
    t=$((t + v))
  done
  echo "$t"
}
TICK=$(getconf CLK_TCK)
# PostgreSQL: the postmaster and every process it started.
pg_pids() {
  local pm
  pm=$(head -1 "$STATE/postgres/postmaster.pid")
  echo "$pm" $(pgrep -P "$pm" || true)
}

# wrk plays each of its devices several times a second, which the per-device
# rate limit (60 at once, 1/s after) would answer 429: the limits are raised
# so every answer is a real one; the limiter still runs on every request.
start_server() { # key database data-dir
  local key=$1 db=$2 data=$3 port
  port=$(free_port "$PG_PORT" "$REG_PORT" "${PORT[@]}")
  PORT[$key]=$port
  # The bench makes device tokens itself (bench/helper.py tokens) with this
  # secret; the server imports it into its database at the first start.
  mkdir -p "$data"
  [ -s "$data/jwt.key" ] || (umask 077 && head -c 32 /dev/urandom >"$data/jwt.key")
  DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/$db" SLUICE_LISTEN="127.0.0.1:$port" \
    SLUICE_DATA_DIR="$data" SLUICE_INSECURE_REGISTRIES="$REGISTRY" RUST_LOG=warn \
    SLUICE_DEVICE_BURST=1000000 SLUICE_DEVICE_RATE=1000 SLUICE_DEVICE_TOKEN_TTL_S=21600 \
    start_sluice "$SLUICE" "$STATE/server-$key.log" || {
    echo "error: the server $key did not start" >&2
    return 1
  }
  PID[$key]=$SLUICE_PID
}

api() { # key method path [json]
  local n=$1 method=$2 path=$3
  curl -fsS -X "$method" "http://127.0.0.1:${PORT[$n]}$path" -H "Authorization: Bearer ${ADMIN[$n]}" \
    -H 'Content-Type: application/json' ${4:+--data "$4"}
}

declare -A ADMIN PUBLISHER DIGESTS
setup_fleet() { # fleet
  local n=$1 db="bench_$1" repo="bench-$1/os" base head
  log "fleet $n: database, server, product, releases, devices"
  "${PSQL[@]}" -d postgres -c "CREATE DATABASE $db" >/dev/null
  DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/$db" "$SLUICE" migrate >/dev/null
  DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/$db" SLUICE_NEW_PASSWORD=$PASS \
    "$SLUICE" admin create --username admin --role admin >/dev/null
  start_server "$n" "$db" "$STATE/data-$n"
  export SLUICE_SERVER="http://127.0.0.1:${PORT[$n]}"
  ADMIN[$n]=$(SLUICE_PASSWORD=$PASS "$SLUICE" login --username admin)
  api "$n" POST /v1/products "{\"name\":\"bench\",\"repository\":\"$REGISTRY/$repo\"}" >/dev/null
  api "$n" POST /v1/products/bench/channels '{"name":"stable"}' >/dev/null
  api "$n" POST /v1/products/bench/channels '{"name":"publish-bench"}' >/dev/null
  PUBLISHER[$n]=$(SLUICE_TOKEN=${ADMIN[$n]} "$SLUICE" token create --name ci --product bench | jq -r .token)
  base=$(python3 bench/helper.py push-image "$REGISTRY" "$repo" 1.0.0)
  head=$(python3 bench/helper.py push-image "$REGISTRY" "$repo" 1.1.0)
  export SLUICE_TOKEN=${PUBLISHER[$n]}
  "$SLUICE" release publish --product bench --version 1.0.0 --image "$REGISTRY/$repo:1.0.0" --channel stable >/dev/null
  "$SLUICE" release publish --product bench --version 1.1.0 --image "$REGISTRY/$repo:1.1.0" --channel stable:50 >/dev/null
  SLUICE_TOKEN=${ADMIN[$n]} "$SLUICE" channel rollout --product bench --channel stable \
    --ramp-to 100 --ramp-over-minutes 600 >/dev/null
  unset SLUICE_SERVER SLUICE_TOKEN
  DIGESTS[$n]="$base,$head"
  # Enrolled devices, straight into the table: half run the base, half the head.
  "${PSQL[@]}" -d "$db" >/dev/null <<SQL
INSERT INTO devices (id, product_id, machine_id, channel, arch, current_version, current_digest, status, last_seen)
SELECT md5('bench-' || i)::uuid, (SELECT id FROM products WHERE name = 'bench'), 'bench-' || i, 'stable', 'amd64',
       CASE WHEN i % 2 = 0 THEN '1.0.0' ELSE '1.1.0' END,
       CASE WHEN i % 2 = 0 THEN '$base' ELSE '$head' END, 'healthy', now() - interval '10 minutes'
FROM generate_series(1, $n) AS i;
VACUUM ANALYZE devices;
SQL
  python3 bench/helper.py tokens "$STATE/data-$n" bench "$NTOKENS" "$n" "$STATE/tokens-$n.txt"
}

for n in "${FLEET[@]}"; do
  t0=$(date +%s%N)
  setup_fleet "$n"
  echo "{\"fleet\":$n,\"setup_s\":$((($(date +%s%N) - t0) / 1000000))e-3}" >>"$OUT/setup.jsonl"
done

RESOLVE=/v1/products/bench/channels/stable/resolve
# run_wrk LABEL URL TOKENS DIGESTS [DURATION] [PIDS] [LB_PIDS]: one wrk run
# of resolve requests (bench/resolve.lua) against URL; prints its BENCH line
# as JSON, with the CPU seconds the PIDS (cpu_s), the LB_PIDS (lb_cpu_s) and
# PostgreSQL (pg_cpu_s) spent meanwhile.
run_wrk() {
  local label=$1 url=$2 tokens=$3 digests=$4 out args=("${WRK_ARGS[@]}") c0 c1 l0 l1 g0 g1 line pids lbs
  [ -n "${5:-}" ] && args=(-t2 -c64 -d"$5" --latency)
  read -r -a pids <<<"${6:-}"
  read -r -a lbs <<<"${7:-}"
  c0=$(cpu_ticks "${pids[@]}"); l0=$(cpu_ticks "${lbs[@]}"); g0=$(cpu_ticks $(pg_pids))
  out=$(BENCH_PATH=${WRK_PATH:-$RESOLVE} BENCH_TOKENS=$tokens BENCH_DIGESTS=$digests BENCH_SALT="$label$RANDOM" \
    "${WRK[@]}" "${args[@]}" -s bench/resolve.lua "$url")
  c1=$(cpu_ticks "${pids[@]}"); l1=$(cpu_ticks "${lbs[@]}"); g1=$(cpu_ticks $(pg_pids))
  echo "$out" >>"$OUT/wrk-$label.txt"
  line=$(echo "$out" | sed -n 's/^BENCH //p')
  [ -n "$line" ] || { echo "$out" >&2; echo "error: wrk printed no BENCH line" >&2; return 1; }
  echo "$line" | jq -c --argjson cpu "$((c1 - c0))" --argjson lb "$((l1 - l0))" --argjson pg "$((g1 - g0))" \
    --argjson tck "$TICK" '. + {cpu_s: ($cpu / $tck), lb_cpu_s: ($lb / $tck), pg_cpu_s: ($pg / $tck)}'
}

# run_load LABEL URL TOKENS DIGESTS _ PIDS: run_wrk's arguments (its
# duration unused), but one open-loop run (openload) at LOAD_RATE requests/s
# over 64 connections, to WRK_PATH if set; prints its BENCH line as JSON,
# with the CPU seconds as run_wrk's.
run_load() {
  local label=$1 url=$2 tokens=$3 digests=$4 out c0 c1 g0 g1 line pids
  read -r -a pids <<<"${6:-}"
  c0=$(cpu_ticks "${pids[@]}"); g0=$(cpu_ticks $(pg_pids))
  out=$("${LOADER[@]}" "$OPENLOAD" "${url#http://}" "${WRK_PATH:-$RESOLVE}" "$tokens" "$digests" "$LOAD_RATE" 64 "${DURATION%s}")
  c1=$(cpu_ticks "${pids[@]}"); g1=$(cpu_ticks $(pg_pids))
  echo "$out" >>"$OUT/load-$label.txt"
  line=$(echo "$out" | sed -n 's/^BENCH //p')
  [ -n "$line" ] || { echo "$out" >&2; echo "error: openload printed no BENCH line" >&2; return 1; }
  echo "$line" | jq -c --argjson cpu "$((c1 - c0))" --argjson pg "$((g1 - g0))" \
    --argjson tck "$TICK" '. + {cpu_s: ($cpu / $tck), lb_cpu_s: 0, pg_cpu_s: ($pg / $tck)}'
}

# probe_sizes URL TOKENS DIGEST: the median body size, and header bytes
# other than the Sluice-Signature value, of 21 resolve answers for devices
# across the token file; run while wrk loads the server.
probe_sizes() {
  local url=$1 tokens=$2 digest=$3 i tok total
  total=$(wc -l <"$tokens")
  for i in $(seq 0 20); do
    tok=$(sed -n "$((1 + i * total / 21))p" "$tokens")
    curl -fsS -D "$STATE/probe.h" -o "$STATE/probe.json" -w '%{size_download} %{size_header}' \
      -H "Authorization: Bearer $tok" "$url$RESOLVE?arch=amd64&current=$digest&nonce=probe-$i-$RANDOM$RANDOM" || return 1
    echo " $(sed -n 's/^sluice-signature: //Ip' "$STATE/probe.h" | tr -d '\r\n' | wc -c)"
  done | awk '{print $1, $2 - $3}' >"$STATE/probes"
  echo "$(cut -d' ' -f1 "$STATE/probes" | sort -n | sed -n 11p) $(cut -d' ' -f2 "$STATE/probes" | sort -n | sed -n 11p)"
}

if [ "$MODE" = replicas ]; then
  . "$ROOT/bench/replicas.sh"
  exit 0
fi

# The ceiling answers as many bytes as resolve does under load: wrk's mean
# bytes per answer (headers and body), with the median body; the rest is the
# Sluice-Signature header (its length follows the batch size, so the load).
log "warm-up with size probes on fleet $MAIN"
( sleep 0.3; probe_sizes "http://127.0.0.1:${PORT[$MAIN]}" "$STATE/tokens-$MAIN.txt" "${DIGESTS[$MAIN]%%,*}" >"$STATE/sizes" ) &
probe=$!
warm=$(run_wrk warmup "http://127.0.0.1:${PORT[$MAIN]}" "$STATE/tokens-$MAIN.txt" "${DIGESTS[$MAIN]}" \
  "$([ "$SMOKE" = 1 ] && echo 2s || echo 5s)")
wait "$probe" || { echo "error: probing resolve's answer size failed" >&2; exit 1; }
read -r BODY OTHER <"$STATE/sizes"
jq -e '.release.version and .device_id and .nonce' "$STATE/probe.json" >/dev/null \
  || { cat "$STATE/probe.json" >&2; echo "error: resolve gave no release" >&2; exit 1; }
SIGVAL=$(($(echo "$warm" | jq '.bytes | round') - BODY - OTHER))
log "resolve answers $(echo "$warm" | jq .bytes) bytes: a $BODY-byte body, a $SIGVAL-byte signature; starting the ceiling with the same"
CEIL_PORT=$(free_port "$PG_PORT" "$REG_PORT" "${PORT[@]}")
"$CEILING_BIN" "127.0.0.1:$CEIL_PORT" "$BODY" "$SIGVAL" >"$STATE/ceiling.log" 2>&1 &
PID[ceiling]=$!
for _ in $(seq 1 100); do port_free "$CEIL_PORT" || break; sleep 0.1; done
echo "{\"body\":$BODY,\"signature\":$SIGVAL}" >"$OUT/sizes.jsonl"

# A second server on fleet $MAIN's database and folder, over HTTPS: a device
# that polls every few minutes opens a new connection, with a full TLS
# handshake, for each poll; this measures what such a poll costs.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1 -keyout "$STATE/tls.key" -out "$STATE/tls.crt" 2>/dev/null
TLS_PORT=$(free_port "$PG_PORT" "$REG_PORT" "$CEIL_PORT" "${PORT[@]}")
DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/bench_$MAIN" SLUICE_LISTEN="127.0.0.1:$TLS_PORT" \
  SLUICE_DATA_DIR="$STATE/data-$MAIN" SLUICE_INSECURE_REGISTRIES="$REGISTRY" RUST_LOG=warn \
  SLUICE_DEVICE_BURST=1000000 SLUICE_DEVICE_RATE=1000 SLUICE_TLS_CERT="$STATE/tls.crt" SLUICE_TLS_KEY="$STATE/tls.key" \
  "$SLUICE" serve >>"$STATE/server-tls.log" 2>&1 9>&- &
PID[tls]=$!
for _ in $(seq 1 300); do curl -fsSk --http1.1 "https://127.0.0.1:$TLS_PORT/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsSk --http1.1 "https://127.0.0.1:$TLS_PORT/healthz" >/dev/null || { tail "$STATE/server-tls.log" >&2; exit 1; }
# BENCH_VARIANTS: more servers on fleet $MAIN's database and folder.
VARIANTS=()
declare -A VPATH
for v in ${BENCH_VARIANTS:-}; do
  label=${v%%=*} rest=${v#*=}
  bin=${rest%%@*} vars=()
  [ "$rest" != "$bin" ] && IFS=, read -r -a vars <<<"${rest#*@}"
  [ -x "$bin" ] || { echo "error: BENCH_VARIANTS: $bin is not an executable" >&2; exit 2; }
  log "variant $label: $bin ${vars[*]}"
  # In a subshell, so the variables stay the variant's.
  (
    SLUICE=$bin
    for a in "${vars[@]}"; do export "${a?}"; done
    start_server "v-$label" "bench_$MAIN" "$STATE/data-$MAIN"
    echo "$SLUICE_PID ${PORT[v-$label]}" >"$STATE/variant-$label"
  )
  read -r PID["v-$label"] PORT["v-$label"] <"$STATE/variant-$label"
  VARIANTS+=("v-$label")
  # A variant may ask for another path (BENCH_PATH=...), e.g. a route of its own.
  for a in "${vars[@]}"; do [ "${a%%=*}" = BENCH_PATH ] && VPATH[v-$label]=${a#*=}; done
done

# place SERVER_CPUS PG_CPUS: every thread of the servers and the ceiling on
# the first CPUs, PostgreSQL's processes (and, through the postmaster, the
# backends it starts later) on the second, as `taskset -c` takes them.
place() {
  local p
  for p in "${PID[@]}"; do taskset -a -cp "$1" "$p" >/dev/null; done
  for p in $(pg_pids); do taskset -a -cp "$2" "$p" >/dev/null; done
}

if [ -n "${SERVER_CPUS:-}" ]; then
  PG_CPUS=${BENCH_PG_CPUS:-$SERVER_CPUS}
  log "wrk and openload on CPUs $BENCH_WRK_CPUS; the servers and the ceiling on $SERVER_CPUS; PostgreSQL on $PG_CPUS"
  place "$SERVER_CPUS" "$PG_CPUS"
fi
if [ "$SMOKE" = 0 ]; then
  for n in "${FLEET[@]}" "${VARIANTS[@]}"; do
    [ "${n#v-}" != "$n" ] && { run_wrk warmup "http://127.0.0.1:${PORT[$n]}" "$STATE/tokens-$MAIN.txt" "${DIGESTS[$MAIN]}" 1s >/dev/null; continue; }
    run_wrk warmup "http://127.0.0.1:${PORT[$n]}" "$STATE/tokens-$n.txt" "${DIGESTS[$n]}" 1s >/dev/null
  done
  run_wrk warmup "http://127.0.0.1:$CEIL_PORT" "$STATE/tokens-$MAIN.txt" "${DIGESTS[$MAIN]}" 1s >/dev/null
  BENCH_CLOSE=1 run_wrk warmup "https://127.0.0.1:$TLS_PORT" "$STATE/tokens-$MAIN.txt" "${DIGESTS[$MAIN]}" 1s >/dev/null
fi

# run_round RUNNER SUFFIX ROUND RUN...: one round, each RUN (ceiling, tls, a
# fleet or a variant v-LABEL) measured by RUNNER (run_wrk or run_load) in
# an order rotated by one each round, so no variant always follows the same
# neighbour (a previous run's autovacuum or check-in flush, the machine
# warming up). Each line goes to $OUT/ceiling, resolve-tls, variants or
# resolve-FLEET (resolve with a SUFFIX) .jsonl, SUFFIX appended. The
# ceiling gets the very same requests (path, query, token) as resolve.
run_round() {
  local runner=$1 suffix=$2 r=$3 runs=("${@:4}") k n line
  for k in "${!runs[@]}"; do
    n=${runs[$(((k + r - 1) % ${#runs[@]}))]}
    if [ "$n" = ceiling ]; then
      line=$($runner ceiling "http://127.0.0.1:$CEIL_PORT" "$STATE/tokens-$MAIN.txt" "${DIGESTS[$MAIN]}" "" "${PID[ceiling]}")
      echo "$line" | jq -c --argjson r "$r" '. + {round: $r}' >>"$OUT/ceiling$suffix.jsonl"
      log "  ceiling          $line"
    elif [ "$n" = tls ]; then
      line=$(BENCH_CLOSE=1 $runner tls "https://127.0.0.1:$TLS_PORT" "$STATE/tokens-$MAIN.txt" "${DIGESTS[$MAIN]}" "" "${PID[tls]}")
      echo "$line" | jq -c --argjson r "$r" '. + {round: $r}' >>"$OUT/resolve-tls$suffix.jsonl"
      log "  resolve, TLS, a connection per request $line"
    elif [ "${n#v-}" != "$n" ]; then
      line=$(WRK_PATH=${VPATH[$n]:-} $runner "$n" "http://127.0.0.1:${PORT[$n]}" "$STATE/tokens-$MAIN.txt" "${DIGESTS[$MAIN]}" "" "${PID[$n]}")
      echo "$line" | jq -c --argjson r "$r" --arg v "${n#v-}" '. + {round: $r, variant: $v}' >>"$OUT/variants$suffix.jsonl"
      log "  variant $(printf '%-8s' "${n#v-}") $line"
    else
      line=$($runner "resolve-$n" "http://127.0.0.1:${PORT[$n]}" "$STATE/tokens-$n.txt" "${DIGESTS[$n]}" "" "${PID[$n]}")
      echo "$line" | jq -c --argjson r "$r" '. + {round: $r}' >>"$OUT/resolve${suffix:--$n}.jsonl"
      log "  resolve $(printf '%-8s' "$n") $line"
    fi
  done
}

for r in $(seq 1 "$ROUNDS"); do
  log "round $r/$ROUNDS"
  run_round run_wrk "" "$r" ceiling "${FLEET[@]}" tls "${VARIANTS[@]}"
done

# Latency at a fixed load, the p99 target's second reading beside the
# saturated one (docs/DECISIONS.md): openload (an open loop, as wrk2) sends
# LOAD_RATE requests/s to the ceiling, resolve on the main fleet and the
# variants, well below what either answers at saturation, and times each
# request from when it was due, so a stall delays every request due
# meanwhile. At saturation the latency is the queue of wrk's 64 connections
# (their number divided by the throughput), not the time a request takes.
# (--smoke: 2 000, which its debug build answers.)
export BENCH_LOAD_RATE=${BENCH_LOAD_RATE:-$([ "$SMOKE" = 1 ] && echo 2000 || echo 20000)}
LOAD_RATE=$BENCH_LOAD_RATE
for r in $(seq 1 "$ROUNDS"); do
  log "fixed load, round $r/$ROUNDS: $LOAD_RATE requests/s, open loop"
  run_round run_load -load "$r" ceiling "$MAIN" "${VARIANTS[@]}"
done

# The same load once more with the machine split as production splits it
# (docs/DECISIONS.md): the servers and the ceiling alone on the upper half
# of the CPUs; PostgreSQL and openload, which stand for other machines (the
# database, the fleet), on the lower half, openload at real-time priority
# where the kernel allows it so that PostgreSQL's statements do not delay
# its sends. Skipped on one CPU, with BENCH_PLACED=0, and when
# BENCH_WRK_CPUS already placed the whole run.
# The lower half, the upper half and all of the CPUs (nothing on one CPU).
read -r PLACED_OTHERS PLACED_SERVERS ALL_CPUS < <(python3 -c 'import os
c = sorted(os.sched_getaffinity(0)); h = len(c) // 2
if h: print(*(",".join(map(str, x)) for x in (c[:h], c[h:], c)))') || true
if [ "${BENCH_PLACED:-1}" != 0 ] && [ -z "${SERVER_CPUS:-}" ] && [ -n "$PLACED_SERVERS" ]; then
  LOADER=(taskset -c "$PLACED_OTHERS")
  prio="at real-time priority"
  if chrt -f 10 true 2>/dev/null; then
    LOADER+=(chrt -f 10)
  else
    prio="at normal priority (chrt -f was refused here)"
  fi
  log "fixed load, placed: servers and ceiling on CPUs $PLACED_SERVERS; PostgreSQL and openload ($prio) on $PLACED_OTHERS"
  export BENCH_PLACED_SPLIT="servers on CPUs $PLACED_SERVERS; PostgreSQL and openload $prio on $PLACED_OTHERS"
  place "$PLACED_SERVERS" "$PLACED_OTHERS"
  for r in $(seq 1 "$ROUNDS"); do
    log "fixed load, placed, round $r/$ROUNDS: $LOAD_RATE requests/s, open loop"
    run_round run_load -placed "$r" ceiling "$MAIN" "${VARIANTS[@]}"
  done
  place "$ALL_CPUS" "$ALL_CPUS"
  LOADER=()
fi

if [ -n "${BENCH_PERF:-}" ]; then
  # A profile of the server under the resolve load, written to $BENCH_PERF.
  PERF_RUN=run_wrk
  [ -n "${BENCH_PERF_OPEN:-}" ] && PERF_RUN=run_load
  log "perf: one more resolve run on fleet $MAIN, profiled ($PERF_RUN)"
  perf record -q -F 499 ${BENCH_PERF_CALLS:+--call-graph "$BENCH_PERF_CALLS"} -g -o "$STATE/perf.data" \
    -p "${PID[$MAIN]}" -- sleep 8 2>/dev/null &
  perf_pid=$!
  $PERF_RUN perf "http://127.0.0.1:${PORT[$MAIN]}" "$STATE/tokens-$MAIN.txt" "${DIGESTS[$MAIN]}" 10s >/dev/null
  wait "$perf_pid" || true
  perf report -i "$STATE/perf.data" --no-children --percent-limit 0.7 --stdio -g none >"$BENCH_PERF" 2>/dev/null
  perf report -i "$STATE/perf.data" --children --percent-limit 3 --stdio -g none >"$BENCH_PERF.children" 2>/dev/null
  cp "$STATE/perf.data" "$BENCH_PERF.data"
  # And the ceiling under the same load, for comparison.
  perf record -q -F 499 -g -o "$STATE/perf-ceiling.data" -p "${PID[ceiling]}" -- sleep 8 2>/dev/null &
  perf_pid=$!
  $PERF_RUN perf "http://127.0.0.1:$CEIL_PORT" "$STATE/tokens-$MAIN.txt" "${DIGESTS[$MAIN]}" 10s >/dev/null
  wait "$perf_pid" || true
  perf report -i "$STATE/perf-ceiling.data" --no-children --percent-limit 0.7 --stdio -g none >"$BENCH_PERF.ceiling" 2>/dev/null
fi

for n in "${FLEET[@]}"; do
  grep -E '^(VmHWM|VmRSS)' "/proc/${PID[$n]}/status" | awk -v n="$n" \
    '{kb[$1]=$2} END {printf "{\"fleet\":%d,\"hwm_mb\":%.1f,\"rss_mb\":%.1f}\n", n, kb["VmHWM:"]/1024, kb["VmRSS:"]/1024}' \
    >>"$OUT/rss.jsonl"
done
# Check-ins reach the database within a couple of seconds.
sleep 2
for n in "${FLEET[@]}"; do
  # The devices table with its indexes and TOAST, per enrolled device.
  "${PSQL[@]}" -d "bench_$n" -tAc "SELECT json_build_object('fleet', $n,
      'devices_seen', (SELECT count(*) FROM devices WHERE last_seen > now() - interval '9 minutes'),
      'table_bytes', pg_total_relation_size('devices'), 'heap_bytes', pg_relation_size('devices'))" \
    >>"$OUT/checkins.jsonl"
done

log "publish x$PUBLISHES on fleet $MAIN"
python3 bench/helper.py tokens "$STATE/data-$MAIN" bench 1 "$MAIN" "$STATE/probe-token-$MAIN.txt"
versions=()
for i in $(seq 1 "$PUBLISHES"); do versions+=("3.0.$i"); done
python3 bench/helper.py publish "http://127.0.0.1:${PORT[$MAIN]}" "${PUBLISHER[$MAIN]}" "$REGISTRY" "bench-$MAIN/os" \
  bench "$(cat "$STATE/probe-token-$MAIN.txt")" "$SLUICE" "${versions[@]}" >"$OUT/publish.jsonl"
cat "$OUT/publish.jsonl" >&2

RESULTS="$ROOT/bench/results"
REPORT="$ROOT/BENCHMARKS.md"
if [ "$SMOKE" = 1 ]; then
  mkdir -p "$STATE/report" && cp -r "$RESULTS/." "$STATE/report/" 2>/dev/null || true
  RESULTS="$STATE/report" REPORT="$STATE/BENCHMARKS.md"
fi
BENCH_CMD="bench/server.sh$([ "$SMOKE" = 1 ] && echo ' --smoke')" BENCH_WRK="${WRK[*]} ${WRK_ARGS[*]} -s bench/resolve.lua" \
  BENCH_MAIN=$MAIN BENCH_FLEETS="${FLEET[*]}" BENCH_PROFILE=$PROFILE BENCH_NTOKENS=$NTOKENS \
  python3 bench/server_report.py save server "$OUT" "$RESULTS/server.json"
python3 bench/server_report.py render "$RESULTS" "$REPORT"
log "report written to $REPORT"
[ "$SMOKE" = 1 ] && cat "$REPORT"
exit 0
