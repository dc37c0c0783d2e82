#!/usr/bin/env bash
# Server benchmarks (issue 5, items 1-3), side by side in one run:
#   1. resolve throughput and latency with 100 000 devices mid-rollout, against
#      the ceiling: the same requests to a trivial handler in the same binary;
#   2. the same resolve figure with 10 000 and 1 000 000 devices, and the RSS;
#   3. publish: `sluice release publish` until signed, in the registry, resolvable.
# One server per fleet size, each with its own database in one private
# PostgreSQL; rounds interleave them so machine noise hits all alike.
# Rewrites BENCHMARKS.md.
#
#   bench/server.sh            the full run (release build; about 10 minutes)
#   bench/server.sh --smoke    seconds: tiny fleet, 1 s wrk runs, one publish,
#                              debug build; checks that it runs and reports,
#                              writes its report to the temp folder, not BENCHMARKS.md
#
# Knobs (environment): BENCH_ROUNDS (5), BENCH_DURATION (10s), BENCH_FLEETS
# ("10000 100000 1000000"), BENCH_TOKENS (10000), BENCH_PUBLISHES (7),
# BENCH_PERF=FILE (after the rounds, profile the server with perf into FILE).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=../scripts/services.sh
. "$ROOT/scripts/services.sh"

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $arg (usage: bench/server.sh [--smoke])" >&2; exit 2 ;;
  esac
done

if [ "$SMOKE" = 1 ]; then
  ROUNDS=${BENCH_ROUNDS:-1}; DURATION=${BENCH_DURATION:-1s}; FLEETS=${BENCH_FLEETS:-"2000 5000"}
  NTOKENS=${BENCH_TOKENS:-2000}; PUBLISHES=${BENCH_PUBLISHES:-1}; PROFILE=${BENCH_PROFILE:-debug}
else
  ROUNDS=${BENCH_ROUNDS:-5}; DURATION=${BENCH_DURATION:-10s}; FLEETS=${BENCH_FLEETS:-"10000 100000 1000000"}
  NTOKENS=${BENCH_TOKENS:-10000}; PUBLISHES=${BENCH_PUBLISHES:-7}; PROFILE=${BENCH_PROFILE:-release}
fi
read -r -a FLEET <<<"$FLEETS"
# The fleet the ceiling and the publish run against: the middle one (100 000).
MAIN=${FLEET[$(((${#FLEET[@]} - 1) / 2))]}
WRK_ARGS=(-t2 -c64 -d"$DURATION" --latency)

need_apt wrk python3 gcc libc6-dev pkg-config ca-certificates
need_rust

STATE=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
OUT="$STATE/results"
mkdir -p "$OUT"
declare -A PID PORT
cleanup() {
  local p
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

log "building the server ($PROFILE)"
BUILD=(cargo build -p sluice-server)
[ "$PROFILE" = release ] && BUILD+=(--release)
# Symbols kept (the code is the same as a stripped release build) so perf can name functions.
CARGO_PROFILE_RELEASE_STRIP=false DATABASE_URL=$BUILD_DATABASE_URL "${BUILD[@]}" >&2
SLUICE="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE/sluice"
[ -x "$SLUICE" ] || { echo "error: $SLUICE was not built" >&2; exit 1; }

PASS=bench-admin-password
export SLUICE_KEY_PASSPHRASE=bench-passphrase

# wrk plays each of its devices several times a second, which the per-device
# rate limit (60 at once, 1/s after) would answer 429: the limits are raised
# so every answer is a real one; the limiter still runs on every request.
start_server() { # fleet [ceiling-bytes]
  local n=$1 port
  port=$(free_port "$PG_PORT" "$REG_PORT" "${PORT[@]}")
  PORT[$n]=$port
  DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/bench_$n" SLUICE_LISTEN="127.0.0.1:$port" \
    SLUICE_DATA_DIR="$STATE/data-$n" SLUICE_INSECURE_REGISTRIES="$REGISTRY" RUST_LOG=warn \
    SLUICE_DEVICE_BURST=1000000 SLUICE_DEVICE_RATE=1000 SLUICE_DEVICE_TOKEN_TTL_S=21600 \
    SLUICE_BENCH_CEILING="${2:-}" start_sluice "$SLUICE" "$STATE/server-$n.log" || {
    echo "error: the server for fleet $n did not start" >&2
    return 1
  }
  PID[$n]=$SLUICE_PID
}

stop_server() { # fleet
  kill -TERM "${PID[$1]}" && wait "${PID[$1]}" || true
  unset "PID[$1]"
}

api() { # fleet method path [json]
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
  start_server "$n"
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
  python3 bench/helper.py tokens "$STATE/data-$n" bench 1 "$n" "$STATE/probe-token-$n.txt"
}

for n in "${FLEET[@]}"; do
  t0=$(date +%s%N)
  setup_fleet "$n"
  echo "{\"fleet\":$n,\"setup_s\":$((($(date +%s%N) - t0) / 1000000))e-3}" >>"$OUT/setup.jsonl"
done

# The ceiling's body is as large as a resolve answer plus its signature header.
probe_resolve() { # fleet -> the answer's size in bytes (body + Sluice-Signature header)
  local n=$1
  curl -fsS -D "$STATE/probe.h" -o "$STATE/probe.json" \
    -H "Authorization: Bearer $(cat "$STATE/probe-token-$n.txt")" \
    "http://127.0.0.1:${PORT[$n]}/v1/products/bench/channels/stable/resolve?arch=amd64&current=${DIGESTS[$n]%%,*}&nonce=probe-$RANDOM$RANDOM"
  echo $(($(stat -c %s "$STATE/probe.json") + $(grep -i '^sluice-signature:' "$STATE/probe.h" | wc -c)))
}
SIZE=$(probe_resolve "$MAIN")
jq -e '.release.version and .device_id and .nonce' "$STATE/probe.json" >/dev/null \
  || { cat "$STATE/probe.json" >&2; echo "error: resolve gave no release" >&2; exit 1; }
log "resolve answers $SIZE bytes (body + signature header); restarting fleet $MAIN's server with the ceiling route"
stop_server "$MAIN"
start_server "$MAIN" "$SIZE"

run_wrk() { # fleet path label [duration]
  local n=$1 path=$2 label=$3 out args=("${WRK_ARGS[@]}")
  [ -n "${4:-}" ] && args=(-t2 -c64 -d"$4")
  out=$(BENCH_PATH=$path BENCH_TOKENS="$STATE/tokens-$n.txt" BENCH_DIGESTS=${DIGESTS[$n]} BENCH_SALT="$label$RANDOM" \
    wrk "${args[@]}" -s bench/resolve.lua "http://127.0.0.1:${PORT[$n]}")
  echo "$out" >>"$OUT/wrk-$label.txt"
  echo "$out" | sed -n 's/^BENCH //p'
}
RESOLVE=/v1/products/bench/channels/stable/resolve

if [ "$SMOKE" = 0 ]; then
  log "warm-up"
  for n in "${FLEET[@]}"; do
    run_wrk "$n" "$RESOLVE" warmup 1s >/dev/null
  done
  run_wrk "$MAIN" /bench/ceiling warmup 1s >/dev/null
fi

# Each round runs the ceiling and every fleet once, in an order rotated by
# one each round, so no variant always follows the same neighbour (a previous
# run's autovacuum or check-in flush, the machine warming up).
RUNS=(ceiling "${FLEET[@]}")
for r in $(seq 1 "$ROUNDS"); do
  log "round $r/$ROUNDS"
  for k in "${!RUNS[@]}"; do
    n=${RUNS[$(((k + r - 1) % ${#RUNS[@]}))]}
    if [ "$n" = ceiling ]; then
      line=$(run_wrk "$MAIN" /bench/ceiling ceiling)
      echo "$line" >>"$OUT/ceiling.jsonl"
      log "  ceiling          $line"
    else
      line=$(run_wrk "$n" "$RESOLVE" "resolve-$n")
      echo "$line" >>"$OUT/resolve-$n.jsonl"
      log "  resolve $(printf '%-8s' "$n") $line"
    fi
  done
done

if [ -n "${BENCH_PERF:-}" ]; then
  # A profile of the server under the resolve load, written to $BENCH_PERF.
  log "perf: one more resolve run on fleet $MAIN, profiled"
  perf record -q -F 499 -g -o "$STATE/perf.data" -p "${PID[$MAIN]}" -- sleep 8 2>/dev/null &
  perf_pid=$!
  run_wrk "$MAIN" "$RESOLVE" perf 10s >/dev/null
  wait "$perf_pid" || true
  perf report -i "$STATE/perf.data" --no-children --percent-limit 0.7 --stdio -g none >"$BENCH_PERF" 2>/dev/null
  perf report -i "$STATE/perf.data" --children --percent-limit 3 --stdio -g none >"$BENCH_PERF.children" 2>/dev/null
fi

for n in "${FLEET[@]}"; do
  grep -E '^(VmHWM|VmRSS)' "/proc/${PID[$n]}/status" | awk -v n="$n" \
    '{kb[$1]=$2} END {printf "{\"fleet\":%d,\"hwm_mb\":%.1f,\"rss_mb\":%.1f}\n", n, kb["VmHWM:"]/1024, kb["VmRSS:"]/1024}' \
    >>"$OUT/rss.jsonl"
done
# Check-ins reach the database within a couple of seconds.
sleep 2
for n in "${FLEET[@]}"; do
  seen=$("${PSQL[@]}" -d "bench_$n" -tAc "SELECT count(*) FROM devices WHERE last_seen > now() - interval '9 minutes'")
  echo "{\"fleet\":$n,\"devices_seen\":$seen}" >>"$OUT/checkins.jsonl"
done

log "publish x$PUBLISHES on fleet $MAIN"
versions=()
for i in $(seq 1 "$PUBLISHES"); do versions+=("3.0.$i"); done
python3 bench/helper.py publish "http://127.0.0.1:${PORT[$MAIN]}" "${PUBLISHER[$MAIN]}" "$REGISTRY" "bench-$MAIN/os" \
  bench "$(cat "$STATE/probe-token-$MAIN.txt")" "$SLUICE" "${versions[@]}" >"$OUT/publish.jsonl"
cat "$OUT/publish.jsonl" >&2

REPORT="$ROOT/BENCHMARKS.md"
[ "$SMOKE" = 1 ] && REPORT="$STATE/BENCHMARKS.md"
BENCH_CMD="bench/server.sh$([ "$SMOKE" = 1 ] && echo ' --smoke')" BENCH_WRK="wrk ${WRK_ARGS[*]} -s bench/resolve.lua" \
  BENCH_MAIN=$MAIN BENCH_FLEETS="${FLEET[*]}" BENCH_PROFILE=$PROFILE BENCH_SIZE=$SIZE BENCH_NTOKENS=$NTOKENS \
  python3 bench/helper.py report "$OUT" "$REPORT"
log "report written to $REPORT"
[ "$SMOKE" = 1 ] && cat "$REPORT"
exit 0
