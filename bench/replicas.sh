# Sourced by `bench/server.sh --replicas` once its one fleet is set up (its
# server, database and data folder): two more servers on the same database
# and data folder (the same JWT secret and signing keys), HAProxy (the
# configuration of scripts/services.sh, health checks on /readyz) in front
# of 1, 2 and 3 of them, and resolve straight to server 1 and through each
# balancer in interleaved rounds. Then PostgreSQL's cost of check-ins: a
# fixed set of distinct devices polls once each through the 3-server
# balancer, and the database's CPU (its processes' /proc times), commits,
# rows and WAL are read before and after.

N=${FLEET[0]}
DB="bench_$N"
DATA="$STATE/data-$N"
# Server 1 is the fleet's; 2 and 3 start one after the other on its folder.
SERVERS=("$N" s2 s3)
start_server s2 "$DB" "$DATA"
start_server s3 "$DB" "$DATA"
declare -A LB_PORT LB_PID LB_SERVERS
for k in 1 2 3; do
  backends=()
  for s in "${SERVERS[@]:0:k}"; do backends+=("127.0.0.1:${PORT[$s]}"); done
  mkdir -p "$STATE/haproxy-$k"
  HAPROXY_STATES+=("$STATE/haproxy-$k")
  LB_PORT[$k]=$(free_port "$PG_PORT" "$REG_PORT" "${PORT[@]}" "${LB_PORT[@]}")
  STATE="$STATE/haproxy-$k" start_haproxy "${LB_PORT[$k]}" "${backends[@]}" 9>&-
  LB_PID[$k]=$HAPROXY_PID
  LB_SERVERS[$k]="${SERVERS[*]:0:k}"
  log "HAProxy $k on 127.0.0.1:${LB_PORT[$k]} in front of ${backends[*]}"
done
server_pids() { local s p=(); for s in "$@"; do p+=("${PID[$s]}"); done; echo "${p[*]}"; }

# Every server answers through the 3-server balancer, with the same signing key.
for _ in 1 2 3 4 5 6; do
  curl -fsS -o /dev/null -D "$STATE/lb.h" -H "Authorization: Bearer $(head -1 "$STATE/tokens-$N.txt")" \
    "http://127.0.0.1:${LB_PORT[3]}$RESOLVE?arch=amd64&nonce=probe-lb-$RANDOM$RANDOM"
  grep -i '^x-sluice-server:' "$STATE/lb.h" | tr -d '\r' >>"$STATE/lb-servers"
done
[ "$(sort -u "$STATE/lb-servers" | wc -l)" = 3 ] \
  || { cat "$STATE/lb-servers" >&2; echo "error: the balancer did not reach all 3 servers" >&2; exit 1; }

if [ "$SMOKE" = 0 ]; then
  log "warm-up"
  run_wrk warmup "http://127.0.0.1:${PORT[$N]}" "$STATE/tokens-$N.txt" "${DIGESTS[$N]}" 2s >/dev/null
  for k in 1 2 3; do
    run_wrk warmup "http://127.0.0.1:${LB_PORT[$k]}" "$STATE/tokens-$N.txt" "${DIGESTS[$N]}" 1s >/dev/null
  done
fi

RUNS=(direct 1 2 3)
for r in $(seq 1 "$ROUNDS"); do
  log "round $r/$ROUNDS"
  for i in "${!RUNS[@]}"; do
    v=${RUNS[$(((i + r - 1) % ${#RUNS[@]}))]}
    if [ "$v" = direct ]; then
      line=$(run_wrk direct "http://127.0.0.1:${PORT[$N]}" "$STATE/tokens-$N.txt" "${DIGESTS[$N]}" "" \
        "$(server_pids "$N")")
    else
      read -r -a behind <<<"${LB_SERVERS[$v]}"
      line=$(run_wrk "haproxy-$v" "http://127.0.0.1:${LB_PORT[$v]}" "$STATE/tokens-$N.txt" "${DIGESTS[$N]}" "" \
        "$(server_pids "${behind[@]}")" "${LB_PID[$v]}")
    fi
    echo "$line" | jq -c --argjson r "$r" --arg v "$v" '. + {round: $r, variant: $v}' >>"$OUT/replicas.jsonl"
    log "  $(printf '%-7s' "$v") $line"
  done
done

# PostgreSQL's cost per check-in: devices that each poll once per run.
log "check-in cost: $CHECKIN_DEVICES distinct devices"
python3 bench/helper.py tokens "$DATA" bench "$CHECKIN_DEVICES" "$N" "$STATE/checkin-tokens.txt"
pg_counters() { # one JSON object of the database's cumulative counters
  "${PSQL[@]}" -d "$DB" -tAc "SELECT json_build_object(
      'upd', (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'devices'),
      'hot_upd', (SELECT n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'devices'),
      'commits', (SELECT xact_commit FROM pg_stat_database WHERE datname = '$DB'),
      'wal_records', (SELECT wal_records FROM pg_stat_wal), 'wal_fpi', (SELECT wal_fpi FROM pg_stat_wal),
      'buffers_written', (SELECT buffers_checkpoint + buffers_clean + buffers_backend FROM pg_stat_bgwriter))"
}
lsn() { "${PSQL[@]}" -d "$DB" -tAc "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"; }
# Backends publish their statistics within 10 s of going idle: counters are
# read after that; the CPU time and the WAL position over the run itself.
STATS_S=$([ "$SMOKE" = 1 ] && echo 3 || echo 11)
# The database's own idle cost (the servers' snapshot reloads and
# revocation polls, autovacuum, the checkpointer), subtracted below.
sleep "$STATS_S"
g0=$(cpu_ticks $(pg_pids)); sleep 5; g1=$(cpu_ticks $(pg_pids))
idle_per_s=$(awk -v d=$((g1 - g0)) -v t="$TICK" 'BEGIN {print d / t / 5}')
duration=$([ "$SMOKE" = 1 ] && echo 1s || echo 4s)
for rep in 1 2 3; do
  before=$(pg_counters)
  since=$("${PSQL[@]}" -d "$DB" -tAc "SELECT now()")
  w0=$(lsn); t0=$(date +%s%N); g0=$(cpu_ticks $(pg_pids))
  line=$(run_wrk checkins "http://127.0.0.1:${LB_PORT[3]}" "$STATE/checkin-tokens.txt" "${DIGESTS[$N]}" "$duration" \
    "$(server_pids "${SERVERS[@]}")" "${LB_PID[3]}")
  # Until every check-in is written (each server writes its batch every
  # SLUICE_CHECKIN_FLUSH_MS, 1 s): the count holds still for 2 s.
  rows=-1
  for _ in $(seq 1 40); do
    sleep 1
    now_rows=$("${PSQL[@]}" -d "$DB" -tAc "SELECT count(*) FROM devices WHERE last_seen >= '$since'")
    [ "$now_rows" = "$rows" ] && [ "${still:-0}" = 1 ] && break
    still=$([ "$now_rows" = "$rows" ] && echo 1 || echo 0)
    rows=$now_rows
  done
  g1=$(cpu_ticks $(pg_pids)); t1=$(date +%s%N); w1=$(lsn)
  sleep "$STATS_S"
  after=$(pg_counters)
  jq -cn --argjson w "$line" --argjson b "$before" --argjson a "$after" --argjson idle "$idle_per_s" \
    --argjson pg "$((g1 - g0))" --argjson tck "$TICK" --argjson el "$(((t1 - t0) / 1000000))" --argjson rep "$rep" \
    --argjson rows "$rows" --argjson wal "$((w1 - w0))" \
    '{rep: $rep, requests: $w.requests, errors: ($w.non2xx + $w.socket_errors), rps: $w.rps, servers_cpu_s: $w.cpu_s, lb_cpu_s: $w.lb_cpu_s,
      pg_cpu_s: ($pg / $tck), idle_pg_cpu_per_s: $idle, elapsed_s: ($el / 1000), rows: $rows, wal_bytes: $wal}
     + ($a | with_entries(.value -= $b[.key]))' >>"$OUT/checkin-cost.jsonl"
  log "  check-ins: $(tail -1 "$OUT/checkin-cost.jsonl")"
done

# A failed check-in write is retried, but should not happen (a deadlock
# between servers writing the same devices, say): counted in the report.
failed=$(cat "$STATE"/server-*.log | grep -c "writing check-ins failed" || true)
echo "{\"checkin_write_failures\":$failed}" >"$OUT/checkin-failures.jsonl"
log "failed check-in writes (retried): $failed"

RESULTS="$ROOT/bench/results"
REPORT="$ROOT/BENCHMARKS.md"
if [ "$SMOKE" = 1 ]; then
  mkdir -p "$STATE/report" && cp -r "$RESULTS/." "$STATE/report/" 2>/dev/null || true
  RESULTS="$STATE/report" REPORT="$STATE/BENCHMARKS.md"
fi
BENCH_CMD="bench/server.sh --replicas$([ "$SMOKE" = 1 ] && echo ' --smoke')" BENCH_WRK="wrk ${WRK_ARGS[*]} -s bench/resolve.lua" \
  BENCH_MAIN=$N BENCH_FLEETS="$N" BENCH_PROFILE=$PROFILE BENCH_NTOKENS=$NTOKENS BENCH_CHECKIN_DEVICES=$CHECKIN_DEVICES \
  python3 bench/server_report.py save replicas "$OUT" "$RESULTS/replicas.json"
python3 bench/server_report.py render "$RESULTS" "$REPORT"
log "report written to $REPORT"
if [ "$SMOKE" = 1 ]; then cat "$REPORT"; fi
