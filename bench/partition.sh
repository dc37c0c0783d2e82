#!/usr/bin/env bash
# The devices table at fleet scale, unpartitioned and hash-partitioned by
# device id, side by side: a scratch PostgreSQL with Sluice's schema (every
# migration, by psql), BENCH_ROWS devices loaded with generate_series (with
# the columns a real device fills: key, labels, host status, offers), a
# partitioned copy (PARTITION BY HASH (id), BENCH_PARTITIONS partitions, the
# same indexes and fill factor) loaded from it, then the check-in batch and
# the fleet's queries timed against both, alternately. Saves
# bench/results/partition.json and rewrites BENCHMARKS.md (section 5).
#
#   bench/partition.sh           10 000 000 devices (about 10 minutes)
#   bench/partition.sh --smoke   100 000 devices, report in the temp folder
#
# Knobs (environment): BENCH_ROWS (10000000), BENCH_PARTITIONS (16),
# BENCH_REPS (5), BENCH_BATCH (10000: devices in one check-in batch).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=../scripts/services.sh
. "$ROOT/scripts/services.sh"

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $arg (usage: bench/partition.sh [--smoke])" >&2; exit 2 ;;
  esac
done
ROWS=${BENCH_ROWS:-$([ "$SMOKE" = 1 ] && echo 100000 || echo 10000000)}
PARTS=${BENCH_PARTITIONS:-16}
REPS=${BENCH_REPS:-$([ "$SMOKE" = 1 ] && echo 2 || echo 5)}
BATCH=${BENCH_BATCH:-10000}
need_apt python3

STATE=$(mktemp -d "${TMPDIR:-/tmp}/sluice-partition.XXXXXX")
OUT="$STATE/results"
mkdir -p "$OUT"
cleanup() {
  stop_postgres
  [ -n "${BENCH_KEEP:-}" ] || rm -rf "$STATE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { echo "==> $*" >&2; }

PG_PORT=$(free_port)
log "postgres 127.0.0.1:$PG_PORT, state $STATE"
PG_DB=fleet start_postgres
PSQL=(env PGOPTIONS='-c client_min_messages=warning' psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres)
# A database server with room for the table in memory, as a fleet's would
# have; fsync and synchronous commit on.
"${PSQL[@]}" -d postgres \
  -c "ALTER SYSTEM SET shared_buffers = '2GB'" \
  -c "ALTER SYSTEM SET max_wal_size = '16GB'" \
  -c "ALTER SYSTEM SET checkpoint_timeout = '30min'" \
  -c "ALTER SYSTEM SET maintenance_work_mem = '1GB'" \
  -c "ALTER SYSTEM SET work_mem = '64MB'" >/dev/null
su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$STATE/postgres' -w restart" >/dev/null
for f in migrations/*.sql; do
  "${PSQL[@]}" -d fleet -f "$f" >/dev/null || { echo "error: migration $f failed" >&2; exit 1; }
done

ms() { echo $((($(date +%s%N) - $1) / 1000000)); }
log "loading $ROWS devices"
t0=$(date +%s%N)
# One product, two channels (9 in 10 devices on stable), half the fleet on
# each of two releases, 1 in 100 failed; labels, a key, the host status
# and the last offer as an agent of today reports them.
"${PSQL[@]}" -d fleet >/dev/null <<SQL
-- Indexes are built after the load (as a restore would), not row by row.
CREATE TEMP TABLE idx AS SELECT indexname, indexdef FROM pg_indexes
WHERE tablename = 'devices' AND indexname NOT IN ('devices_pkey', 'devices_product_machine_key');
SELECT format('DROP INDEX %I', indexname) FROM idx \gexec
ALTER TABLE devices DROP CONSTRAINT devices_product_machine_key;
-- The gate's tallies are rebuilt after the load too: their triggers update
-- one row per device, and one transaction updating a row millions of times
-- walks an ever longer chain of its versions.
ALTER TABLE devices DISABLE TRIGGER USER;
INSERT INTO products (id, name, repository, enrollment_secret_hash)
VALUES ('00000000-0000-0000-0000-0000000000aa', 'bench', 'registry.example/bench/os', '\x00');
INSERT INTO devices (id, product_id, machine_id, channel, arch, labels, current_version, current_digest,
                     booted_slot, status, status_version, status_offered, last_seen, public_key, key_bound_at,
                     keys_version, offered, host, host_at, created_at)
SELECT md5('bench-' || i)::uuid, '00000000-0000-0000-0000-0000000000aa', 'machine-' || md5(i::text),
       CASE WHEN i % 10 = 0 THEN 'beta' ELSE 'stable' END, 'amd64',
       jsonb_build_object('site', 'site-' || (i % 500), 'ring', 'ring-' || (i % 4)),
       v.version, v.digest, CASE WHEN i % 2 = 0 THEN 'A' ELSE 'B' END,
       CASE WHEN i % 100 = 7 THEN 'failed' ELSE 'healthy' END, v.version, true,
       now() - (i % 900) * interval '1 second', sha256(i::text::bytea), now() - interval '30 days', 3,
       ARRAY[v.version || '@' || v.digest],
       jsonb_build_object('state', 'idle', 'reboot_pending', false,
         'booted', jsonb_build_object('slot', 'A', 'version', v.version, 'digest', v.digest, 'boot', 'default'),
         'rollback', jsonb_build_object('slot', 'B', 'version', '0.9.0', 'digest', 'sha256:' || repeat('0', 64), 'boot', 'fallback')),
       now() - (i % 900) * interval '1 second', now() - interval '60 days'
FROM generate_series(1, $ROWS) AS i,
     LATERAL (SELECT CASE WHEN i % 2 = 0 THEN '1.0.0' ELSE '1.1.0' END AS version,
                     'sha256:' || CASE WHEN i % 2 = 0 THEN repeat('a', 64) ELSE repeat('b', 64) END AS digest) v;
ALTER TABLE devices ADD CONSTRAINT devices_product_machine_key UNIQUE (product_id, machine_id);
SELECT indexdef FROM idx \gexec
ALTER TABLE devices ENABLE TRIGGER USER;
SELECT gate_tallies_rebuild();
SQL
load_ms=$(ms "$t0")
"${PSQL[@]}" -d fleet -c "VACUUM (ANALYZE) devices" >/dev/null

log "the hash-partitioned copy ($PARTS partitions)"
t0=$(date +%s%N)
# The same columns, defaults and fill factor. A unique constraint on a
# partitioned table must include the partition key, so (product_id,
# machine_id) stays a plain index here: enrollment would check it in a table
# of its own (see BENCHMARKS.md, the capacity model).
"${PSQL[@]}" -d fleet >/dev/null <<SQL
CREATE TABLE devices_hash (LIKE devices INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY HASH (id);
ALTER TABLE devices_hash ADD PRIMARY KEY (id);
SELECT format('CREATE TABLE devices_hash_%s PARTITION OF devices_hash FOR VALUES WITH (MODULUS $PARTS, REMAINDER %s) WITH (fillfactor = 75)', r, r)
FROM generate_series(0, $PARTS - 1) r \gexec
INSERT INTO devices_hash SELECT * FROM devices;
SELECT replace(replace(replace(indexdef, 'UNIQUE ', ''), ' ON public.devices ', ' ON devices_hash '),
               'INDEX devices_', 'INDEX devices_hash_')
FROM pg_indexes WHERE tablename = 'devices' AND indexname <> 'devices_pkey' \gexec
VACUUM (ANALYZE) devices_hash;
SQL
copy_ms=$(ms "$t0")
"${PSQL[@]}" -d fleet -tAc "SELECT json_build_object('load_s', $load_ms / 1000.0, 'copy_s', $copy_ms / 1000.0,
    'plain_mb', pg_total_relation_size('devices') / 1048576.0,
    'hash_mb', (SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits
                WHERE inhparent = 'devices_hash'::regclass) / 1048576.0)" >"$OUT/info.jsonl"
cat "$OUT/info.jsonl" >&2

# The check-in batches: BATCH random devices each, the same for both tables.
"${PSQL[@]}" -d fleet >/dev/null <<SQL
CREATE TABLE batches AS
SELECT r AS rep, md5('bench-' || (1 + floor(random() * $ROWS))::bigint)::uuid AS id
FROM generate_series(1, $REPS) r, generate_series(1, $BATCH);
ANALYZE batches;
SQL

# Each query: a name and its SQL with TBL for the table, REP for the
# repetition and ID for a device of its batch (a constant, as the server's
# bound parameters are).
QUERIES=(
  "check-in batch ($BATCH devices, the UPDATE of resolve/checkins.rs)|UPDATE TBL d SET last_seen = now(), channel = 'stable', arch = 'amd64',
     current_digest = coalesce(u.digest, d.current_digest),
     current_version = CASE WHEN u.digest IS NULL OR u.digest = d.current_digest THEN d.current_version ELSE u.version END,
     keys_version = coalesce(u.keys_version, d.keys_version),
     offered = CASE WHEN u.offered IS NULL OR u.offered = ANY(d.offered) THEN d.offered
                    ELSE (d.offered || u.offered)[greatest(1, cardinality(d.offered) - 6):] END
   FROM (SELECT id, 'sha256:' || repeat('b', 64) AS digest, '1.1.0'::text AS version, 3::bigint AS keys_version,
                NULL::text AS offered
         FROM unnest((SELECT array_agg(id) FROM batches WHERE rep = REP)) AS id) u
   WHERE d.id = u.id AND d.last_seen <= now()"
  "one device by id (reports, enrollment)|SELECT * FROM TBL WHERE id = 'ID'"
  "fleet list, first page of 50 (GET /v1/devices?product=)|SELECT d.id, d.machine_id, d.channel, d.current_version, d.status, d.last_seen FROM TBL d JOIN products p ON p.id = d.product_id
   WHERE p.name = 'bench' ORDER BY d.id LIMIT 50"
  "fleet list, a page in the middle|SELECT d.id, d.machine_id, d.channel, d.current_version, d.status, d.last_seen FROM TBL d JOIN products p ON p.id = d.product_id
   WHERE p.name = 'bench' AND d.id > 'ID' ORDER BY d.id LIMIT 50"
  "fleet list, failed devices (1 in 100), first page|SELECT d.id, d.machine_id, d.status FROM TBL d JOIN products p ON p.id = d.product_id
   WHERE p.name = 'bench' AND d.status = 'failed' ORDER BY d.id LIMIT 50"
  "a label selector (site), first page|SELECT d.id FROM TBL d WHERE d.labels @> '{\"site\": \"site-42\"}' ORDER BY d.id LIMIT 50"
  "the channel view's counts by version and status|SELECT current_version, status, count(*) FROM TBL
   WHERE product_id = '00000000-0000-0000-0000-0000000000aa' AND channel = 'stable' GROUP BY current_version, status"
  "the health gate's tally (one row of gate_tallies, kept by triggers; the same for both tables)|SELECT reports, failures FROM gate_tallies
   WHERE product_id = '00000000-0000-0000-0000-0000000000aa' AND channel = 'stable' AND version = '1.1.0'"
  "the health gate's count over the devices (what it read before gate_tallies)|SELECT count(*), count(*) FILTER (WHERE status = 'failed') FROM TBL
   WHERE product_id = '00000000-0000-0000-0000-0000000000aa' AND channel = 'stable' AND status_version = '1.1.0'
     AND status = ANY('{healthy,failed,rolled_back}') AND status_offered"
  "the snapshot's pinned devices|SELECT id, pin_version FROM TBL
   WHERE product_id = '00000000-0000-0000-0000-0000000000aa' AND (pin_version IS NOT NULL OR pin_image IS NOT NULL)"
)

# explain_ms SQL: the execution time EXPLAIN (ANALYZE) reports, in a
# transaction rolled back, so an UPDATE leaves the table as it was.
explain_ms() {
  "${PSQL[@]}" -d fleet -tA <<SQL | sed -n 's/^Execution Time: \([0-9.]*\) ms$/\1/p'
BEGIN;
EXPLAIN (ANALYZE) $1;
ROLLBACK;
SQL
}

for rep in $(seq 1 "$REPS"); do
  log "repetition $rep/$REPS"
  id=$("${PSQL[@]}" -d fleet -tAc "SELECT id FROM batches WHERE rep = $rep LIMIT 1")
  for q in "${QUERIES[@]}"; do
    name=${q%%|*}
    sql=${q#*|}
    # Alternate which table goes first.
    tables=(devices devices_hash)
    [ $((rep % 2)) = 0 ] && tables=(devices_hash devices)
    for t in "${tables[@]}"; do
      s=${sql//TBL/$t}
      s=${s//REP/$rep}
      v=$(explain_ms "${s//ID/$id}")
      [ -n "$v" ] || { echo "error: no execution time for: $name on $t" >&2; exit 1; }
      jq -cn --arg q "$name" --arg t "$t" --argjson r "$rep" --argjson ms "$v" \
        '{query: $q, table: $t, rep: $r, ms: $ms}' >>"$OUT/timings.jsonl"
      log "  $(printf '%-13s' "$t") ${v} ms  $name"
    done
  done
done

RESULTS="$ROOT/bench/results"
REPORT="$ROOT/BENCHMARKS.md"
if [ "$SMOKE" = 1 ]; then
  mkdir -p "$STATE/report" && cp -r "$RESULTS/." "$STATE/report/" 2>/dev/null || true
  RESULTS="$STATE/report" REPORT="$STATE/BENCHMARKS.md"
fi
BENCH_CMD="bench/partition.sh$([ "$SMOKE" = 1 ] && echo ' --smoke')" BENCH_ROWS=$ROWS BENCH_PARTITIONS=$PARTS \
  BENCH_REPS=$REPS BENCH_BATCH=$BATCH BENCH_PRODUCTS=1 \
  python3 bench/server_report.py save partition "$OUT" "$RESULTS/partition.json"
python3 bench/server_report.py render "$RESULTS" "$REPORT"
log "report written to $REPORT"
[ "$SMOKE" = 1 ] && sed -n '/^## 5/,/^## 6/p' "$REPORT"
exit 0
