# Sourced by scripts/run and scripts/test: installs what is missing and starts a
# private PostgreSQL cluster and OCI registry on loopback, under a folder we own.
# Needs: STATE (the folder), PG_PORT, REG_PORT. Exports DATABASE_URL and REGISTRY.

need_apt() {
  local missing=()
  command -v docker-registry >/dev/null || missing+=(docker-registry)
  command -v umoci >/dev/null || missing+=(umoci)
  command -v skopeo >/dev/null || missing+=(skopeo)
  command -v grub-editenv >/dev/null || missing+=(grub-common)
  command -v curl >/dev/null || missing+=(curl)
  command -v jq >/dev/null || missing+=(jq)
  [ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15)
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

PG_BIN=/usr/lib/postgresql/15/bin

start_postgres() {
  local dir="$STATE/postgres"
  mkdir -p "$dir" "$STATE/pgsock" "$STATE/pglog"
  chown postgres:postgres "$dir" "$STATE/pgsock" "$STATE/pglog"
  # postgres must be able to reach its folder through every parent.
  local p="$STATE"; while [ "$p" != "/" ]; do chmod o+x "$p" 2>/dev/null || true; p=$(dirname "$p"); done
  if [ ! -f "$dir/PG_VERSION" ]; then
    su postgres -s /bin/sh -c "$PG_BIN/initdb -D '$dir' --auth=trust -U postgres -E UTF8" >"$STATE/initdb.log" 2>&1 \
      || { cat "$STATE/initdb.log"; return 1; }
  fi
  su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$dir' -l '$STATE/pglog/postgres.log' -w -o \"-c listen_addresses=127.0.0.1 -p $PG_PORT -k '$STATE/pgsock' -c max_connections=300 -c fsync=${PG_FSYNC:-on}\" start" >/dev/null \
    || { tail -20 "$STATE/pglog/postgres.log"; return 1; }
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/${PG_DB:-sluice}"
  su postgres -s /bin/sh -c "$PG_BIN/../bin/psql -h 127.0.0.1 -p $PG_PORT -U postgres -tAc \"SELECT 1 FROM pg_database WHERE datname='${PG_DB:-sluice}'\"" 2>/dev/null | grep -q 1 \
    || su postgres -s /bin/sh -c "psql -h 127.0.0.1 -p $PG_PORT -U postgres -qc 'CREATE DATABASE \"${PG_DB:-sluice}\"'" >/dev/null
}

stop_postgres() {
  [ -f "$STATE/postgres/postmaster.pid" ] && su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$STATE/postgres' -m fast -w stop" >/dev/null 2>&1 || true
}

start_registry() {
  mkdir -p "$STATE/registry"
  cat >"$STATE/registry.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $STATE/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$REG_PORT
YML
  docker-registry serve "$STATE/registry.yml" >"$STATE/registry.log" 2>&1 &
  echo $! >"$STATE/registry.pid"
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$REG_PORT/v2/" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fsS "http://127.0.0.1:$REG_PORT/v2/" >/dev/null || { cat "$STATE/registry.log"; return 1; }
  export REGISTRY="127.0.0.1:$REG_PORT"
}

stop_registry() {
  [ -f "$STATE/registry.pid" ] && kill "$(cat "$STATE/registry.pid")" 2>/dev/null || true
  rm -f "$STATE/registry.pid"
}
