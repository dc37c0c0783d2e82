# Sourced by scripts/run, scripts/test and the benchmarks: installs what is
# missing and starts a private PostgreSQL cluster and OCI registry on loopback,
# under a folder we own, and `sluice serve` (start_sluice).
# Needs: STATE (the folder), PG_PORT, REG_PORT. Exports DATABASE_URL and REGISTRY.
# Also: port checks, the Rust toolchain and cosign checks, and the database the
# sqlx macros check queries against at compile time (prepare_build_db).

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
    # Another apt (a second script, unattended upgrades) may hold the dpkg
    # lock for a while: wait for it rather than fail.
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
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
  local pid
  pid=$(cat "$STATE/registry.pid" 2>/dev/null || true)
  # Only our own registry: a stale pid file may name some other process by now.
  if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$STATE/registry.yml"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$STATE/registry.pid"
}

# start_sluice BIN [LOG]: `BIN serve` in the background with the caller's
# SLUICE_* and DATABASE_URL environment, output to LOG (appended; none: the
# caller's own output); waits up to 30 s for http://$SLUICE_LISTEN/healthz.
# Sets SLUICE_PID; on failure prints the log's tail and returns 1.
start_sluice() {
  local bin=$1 log=${2:-} url="http://$SLUICE_LISTEN"
  if [ -n "$log" ]; then
    "$bin" serve >>"$log" 2>&1 9>&- &
  else
    "$bin" serve 9>&- &
  fi
  SLUICE_PID=$!
  for _ in $(seq 1 300); do
    curl -fsS "$url/healthz" >/dev/null 2>&1 && return 0
    kill -0 "$SLUICE_PID" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$log" ] && tail -20 "$log" >&2
  if kill -0 "$SLUICE_PID" 2>/dev/null; then
    echo "error: sluice serve did not answer $url/healthz within 30 s${log:+ (log: $log)}" >&2
  else
    echo "error: sluice serve exited before it answered $url/healthz${log:+ (log: $log)}" >&2
  fi
  return 1
}

# True when nothing accepts connections on 127.0.0.1:$1.
port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Fails with a clear message when 127.0.0.1:$1 is taken; $2 names the env var to change it.
require_port() {
  port_free "$1" && return 0
  echo "error: port 127.0.0.1:$1 is already in use; stop what listens there or set $2 to another port" >&2
  return 1
}

# Prints a port nobody listens on (random, from 20000 to the ephemeral range), other than any given as arguments.
free_port() {
  local p low
  # Below the kernel's ephemeral range: a port there that is free now can be
  # taken by any outgoing connection before the service binds it.
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$low" -gt 21000 ] 2>/dev/null || low=32768
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % (low - 20000)))
    case " $* " in *" $p "*) continue ;; esac
    port_free "$p" && { echo "$p"; return 0; }
  done
  echo "error: no free port found on 127.0.0.1" >&2
  return 1
}

# Rust >= 1.94 with rustfmt and clippy; Debian's own rustc is too old.
need_rust() {
  if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null || {
    echo "error: cargo not found. Install Rust >= 1.94 with rustup:" >&2
    echo "  curl --proto '=https' -sSf https://sh.rustup.rs | sh -s -- -y --component rustfmt,clippy" >&2
    return 1
  }
  local v
  v=$(rustc --version | awk '{print $2}')
  if [ "$(printf '%s\n1.94.0\n' "$v" | sort -V | head -n1)" != "1.94.0" ]; then
    echo "error: rustc $v is too old: Sluice needs >= 1.94 (rustup update stable)" >&2
    return 1
  fi
  for c in fmt clippy; do
    cargo "$c" --version >/dev/null 2>&1 && continue
    if command -v rustup >/dev/null; then
      rustup component add "$( [ "$c" = fmt ] && echo rustfmt || echo clippy )"
    else
      echo "error: cargo $c is missing: install the rustfmt and clippy components" >&2
      return 1
    fi
  done
}

# Sets COSIGN to a working cosign CLI: $COSIGN, one on PATH, or one installed by
# scripts/install-cosign (Debian 12 has no cosign package; it takes Debian 13's).
need_cosign() {
  if [ -n "${COSIGN:-}" ] && "$COSIGN" version >/dev/null 2>&1; then export COSIGN; return 0; fi
  if command -v cosign >/dev/null && cosign version >/dev/null 2>&1; then
    COSIGN=$(command -v cosign); export COSIGN; return 0
  fi
  echo "==> installing cosign (scripts/install-cosign)"
  COSIGN=$(bash "$ROOT/scripts/install-cosign") || {
    echo "error: cosign could not be installed; install cosign >= 2 on PATH or set COSIGN=/path/to/cosign" >&2
    return 1
  }
  export COSIGN
}

# The database the sqlx query macros check against while compiling. With a
# committed .sqlx/ folder builds are offline (SQLX_OFFLINE=true); otherwise a
# fresh `sluice_build` database in our cluster gets every migration by psql,
# so it always matches migrations/. Exports BUILD_DATABASE_URL.
prepare_build_db() {
  if [ -d "$ROOT/.sqlx" ]; then
    export SQLX_OFFLINE=true
    export BUILD_DATABASE_URL="${DATABASE_URL}"
    return 0
  fi
  local psql=(env PGOPTIONS='-c client_min_messages=warning' psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres)
  "${psql[@]}" -d postgres -c 'DROP DATABASE IF EXISTS sluice_build WITH (FORCE)' -c 'CREATE DATABASE sluice_build' >/dev/null
  local f
  for f in "$ROOT"/migrations/*.sql; do
    "${psql[@]}" -d sluice_build -f "$f" >/dev/null || { echo "error: migration $f failed" >&2; return 1; }
  done
  export BUILD_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/sluice_build"
}

# haproxy_config FILE PORT SOCKET BACKEND...: an HAProxy configuration in FILE
# that listens on 127.0.0.1:PORT and balances HTTP over the BACKENDs
# (`host:port`, named sluice1, sluice2, ... in order). A server is taken out
# after two failed `GET /readyz` a second apart and back after two good ones;
# a request that cannot reach its server, or whose server dies before
# answering, goes to another one, but after a server saw it only a GET or
# HEAD is sent again (an event POSTed twice would be recorded twice). The
# admin socket SOCKET answers `show servers state` (tests wait on it).
# docker-compose.yml's balancer reads deploy/haproxy.cfg, the same settings.
haproxy_config() {
  local file=$1 port=$2 socket=$3 i=0 b
  shift 3
  {
    cat <<CFG
# Made by scripts/services.sh haproxy_config; rewritten at each start.
global
  # No maxconn: HAProxy takes it from the open-files limit (ulimit -n). No
  # log either: in the foreground (-db) it says on stderr when a server goes
  # DOWN or UP, and nothing per request.
  stats socket $socket mode 600 level user

defaults
  mode http
  timeout connect 2s
  # A client that sends no whole request head in 10 s is dropped (slowloris).
  timeout http-request 10s
  timeout http-keep-alive 30s
  timeout client 60s
  # Publishing reads the registry and pushes signatures: give it time.
  timeout server 120s
  timeout queue 10s
  timeout check 2s
  # Every retry goes to another server; requests a dead server saw but never
  # answered are retried too, for GET and HEAD only (see below).
  retries 3
  option redispatch 1
  retry-on conn-failure empty-response junk-response
  # The client's address for the server, replacing any it sent itself.
  option forwardfor
  default-server inter 1s fastinter 500ms downinter 1s fall 2 rise 2 check

frontend sluice
  bind 127.0.0.1:$port
  http-request del-header X-Forwarded-For
  http-request disable-l7-retry unless METH_GET || METH_HEAD
  default_backend sluice

backend sluice
  balance roundrobin
  option httpchk GET /readyz
  http-check expect status 200
  # Which server answered: for debugging and the tests (the signature covers
  # the body only, so the header changes nothing a device checks).
  http-response set-header X-Sluice-Server %[srv_name]
CFG
    for b in "$@"; do
      i=$((i + 1))
      echo "  server sluice$i $b"
    done
  } >"$file"
}

# start_haproxy PORT BACKEND...: HAProxy on 127.0.0.1:PORT in front of the
# BACKENDs (`host:port`), configuration $STATE/haproxy.cfg, output to
# $STATE/haproxy.log; waits until PORT accepts connections. Sets HAPROXY_PID.
start_haproxy() {
  local port=$1 bin
  shift
  bin=$(command -v haproxy || echo /usr/sbin/haproxy)
  haproxy_config "$STATE/haproxy.cfg" "$port" "$STATE/haproxy.sock" "$@"
  "$bin" -c -q -f "$STATE/haproxy.cfg" || { echo "error: $bin refused $STATE/haproxy.cfg" >&2; return 1; }
  # -db: in the foreground of its own process, so $! is HAProxy itself.
  "$bin" -db -f "$STATE/haproxy.cfg" >>"$STATE/haproxy.log" 2>&1 9>&- &
  HAPROXY_PID=$!
  echo "$HAPROXY_PID" >"$STATE/haproxy.pid"
  for _ in $(seq 1 100); do
    port_free "$port" || return 0
    kill -0 "$HAPROXY_PID" 2>/dev/null || break
    sleep 0.1
  done
  tail -20 "$STATE/haproxy.log" >&2
  echo "error: haproxy did not listen on 127.0.0.1:$port (log: $STATE/haproxy.log)" >&2
  return 1
}

stop_haproxy() {
  local pid
  pid=$(cat "$STATE/haproxy.pid" 2>/dev/null || true)
  # Only our own balancer: a stale pid file may name some other process by now.
  if [ -n "$pid" ] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF "$STATE/haproxy.cfg"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$STATE/haproxy.pid"
}
