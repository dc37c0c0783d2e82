#!/usr/bin/env bash
# Issue 5, benchmarks 4-6: the agent's upgrade against the reference pipeline,
# the agent's footprint, and a fleet simulation. Rewrites bench/AGENT.md (and
# bench/fleet.png). Needs Debian 12 as root (installs what is missing, mounts
# tmpfs and loop ext4 file systems under its own temp folder).
#
#   bench/agent.sh [--smoke] [--runs N] [--devices N] [--skip-upgrade]
#                  [--skip-footprint] [--skip-fleet] [--skip-bandwidth]
#                  [--only-bandwidth] [--out FILE]
#
# --smoke: seconds, debug builds, a ~20 MB image, one run, 150 devices; asserts
# only that everything runs and reports (writes to a temp file unless --out).
# Env: SLUICE_BENCH_CACHE (default /var/tmp/sluice-bench-cache) keeps the
# generated image between runs; SLUICE_BENCH_AGENT another sluice-agent binary
# to measure; SLUICE_BENCH_COMPARE a second one run in the same loop (e.g. the
# build before a change, reported beside it); SLUICE_BENCH_SKIP_BUILD=1 uses
# the binaries already built; CARGO_TARGET_DIR as for the other scripts.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=../scripts/services.sh
. "$ROOT/scripts/services.sh"

SMOKE=0 RUNS=5 DEVICES=10000 DO_UPGRADE=1 DO_FOOT=1 DO_FLEET=1 DO_BW=1 OUT=
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --runs) RUNS=$2; shift ;;
    --devices) DEVICES=$2; shift ;;
    --skip-upgrade) DO_UPGRADE=0 ;;
    --skip-footprint) DO_FOOT=0 ;;
    --skip-fleet) DO_FLEET=0 ;;
    --skip-bandwidth) DO_BW=0 ;;
    --only-bandwidth) DO_UPGRADE=0 DO_FOOT=0 DO_FLEET=0 ;;
    --out) OUT=$2; shift ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "error: bench/agent.sh needs root (mounts, loop devices)" >&2; exit 1; }

if [ "$SMOKE" = 1 ]; then
  RUNS=1 DEVICES=150 SCALE=0.04 PROFILE=${SLUICE_BENCH_PROFILE:-debug} POLL_S=2
  FLEET_ARGS=(--ramp-minutes 0.25 --apply-s 1 3 --reboot-s 0.5 --gate-min-reports 10 --tail-s 3 --max-s 120)
  OUT=${OUT:-$(mktemp "${TMPDIR:-/tmp}/sluice-agent-bench.XXXXXX.md")}
else
  SCALE=${SLUICE_BENCH_SCALE:-1} PROFILE=${SLUICE_BENCH_PROFILE:-release} POLL_S=10
  FLEET_ARGS=(--ramp-minutes 2 --apply-s 8 25 --reboot-s 5 --gate-min-reports 100 --tail-s 20 --max-s 900)
  OUT=${OUT:-$ROOT/bench/AGENT.md}
fi
PNG="$(dirname "$OUT")/fleet.png"
# Benchmark 7's slow link: 100 Mbit/s.
LINK_BYTES_S=${SLUICE_BENCH_LINK_BYTES_S:-12500000}

need_apt skopeo umoci e2fsprogs time bc python3 python3-cryptography zstd
# The adoption curve's PNG; the smoke run does without.
[ "$SMOKE" = 1 ] || need_apt python3-matplotlib
need_rust
export SQLX_OFFLINE=true
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice-target}"
# The smoke run takes the debug binaries `cargo test --workspace` left, if any.
if [ "$SMOKE" = 1 ] && [ "$PROFILE" = debug ] && [ -x "$CARGO_TARGET_DIR/debug/sluice" ] && [ -x "$CARGO_TARGET_DIR/debug/sluice-agent" ]; then
  SLUICE_BENCH_SKIP_BUILD=1
fi
echo "==> building sluice-agent and sluice-server ($PROFILE)"
# One package at a time: the agent's binary gets only its own crate features.
for p in sluice-agent sluice-server; do
  [ -n "${SLUICE_BENCH_SKIP_BUILD:-}" ] && break
  cargo build -q --profile "$([ "$PROFILE" = debug ] && echo dev || echo release)" -p "$p"
done
[ -n "${SLUICE_BENCH_SKIP_BUILD:-}" ] || cargo build -q --profile "$([ "$PROFILE" = debug ] && echo dev || echo release)" -p sluice-agent --example folder_device
FOLDER_DEVICE="$CARGO_TARGET_DIR/$PROFILE/examples/folder_device"
AGENT="${SLUICE_BENCH_AGENT:-$CARGO_TARGET_DIR/$PROFILE/sluice-agent}"
SLUICE="$CARGO_TARGET_DIR/$PROFILE/sluice"
PY=/usr/bin/python3

STATE=$(mktemp -d /var/tmp/sluice-bench.XXXXXX)
SERVER_PID= DAEMON_PID= LINK_PID=
MOUNTS=()
cleanup() {
  set +e
  [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null
  [ -n "$LINK_PID" ] && kill "$LINK_PID" 2>/dev/null
  if [ -n "$SERVER_PID" ]; then kill -TERM "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; fi
  for m in "${MOUNTS[@]}"; do mountpoint -q "$m" && umount "$m"; done
  stop_registry
  stop_postgres
  rm -rf "$STATE" /dev/shm/"$(basename "$STATE")"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
SHM=/dev/shm/$(basename "$STATE")
mkdir -p "$SHM"

# ---- the image, generated once per generator version and scale ----
CACHE=${SLUICE_BENCH_CACHE:-/var/tmp/sluice-bench-cache}
KEY=$(cat bench/mkimage.py | sha256sum | cut -c1-12)-$SCALE
IMG="$CACHE/image-$KEY"
if [ ! -f "$IMG/summary.json" ]; then
  echo "==> generating the OS-like image (scale $SCALE) into $IMG"
  rm -rf "$IMG"
  mkdir -p "$CACHE"
  "$PY" bench/mkimage.py "$IMG.tmp" --scale "$SCALE" >"$IMG.summary"
  mv "$IMG.tmp" "$IMG" && mv "$IMG.summary" "$IMG/summary.json"
fi
summary() { "$PY" -c "import json,sys; print(json.load(open('$IMG/summary.json'))$1)"; }
TAR_MB=$(summary "['tar_bytes']/1e6")
GZ_MB=$(summary "['gzip_bytes']/1e6")
FILES=$(summary "['files']")

# ---- services: PostgreSQL, registry, the server (this build) ----
PG_PORT=$(free_port)
REG_PORT=$(free_port "$PG_PORT")
SRV_PORT=$(free_port "$PG_PORT" "$REG_PORT")
PG_FSYNC=off PG_DB=sluice start_postgres
start_registry
export SLUICE_LISTEN="127.0.0.1:$SRV_PORT" SLUICE_DATA_DIR="$STATE/data" SLUICE_KEY_PASSPHRASE=bench-passphrase \
  SLUICE_ADMIN_PASSWORD=bench-admin-password SLUICE_INSECURE_REGISTRIES="$REGISTRY" SLUICE_POLL_AFTER_S=$POLL_S \
  SLUICE_ENROLL_BURST=10000000 SLUICE_ENROLL_RATE=100000 SLUICE_ENROLL_PRODUCT_BURST=10000000 SLUICE_ENROLL_PRODUCT_RATE=100000
API="http://$SLUICE_LISTEN"
start_sluice "$SLUICE" "$STATE/server.log" || { SERVER_PID=${SLUICE_PID:-}; exit 1; }
SERVER_PID=$SLUICE_PID
export SLUICE_SERVER=$API
SLUICE_TOKEN=$(SLUICE_PASSWORD=bench-admin-password "$SLUICE" login --username admin)
export SLUICE_TOKEN
api() { curl -fsS -X "$1" -H "Authorization: Bearer $SLUICE_TOKEN" -H 'content-type: application/json' "$API$2" ${3:+-d "$3"}; }

REPO="$REGISTRY/bench/os"
echo "==> pushing the image to $REPO:1.0.0"
skopeo copy -q --dest-tls-verify=false "oci:$IMG:1.0.0" "docker://$REPO:1.0.0"
SECRET=$(api POST /v1/products "{\"name\":\"bench\",\"repository\":\"$REPO\"}" | jq -r .enrollment_secret)
api POST /v1/products/bench/channels '{"name":"stable"}' >/dev/null
api POST /v1/products/bench/channels '{"name":"idle"}' >/dev/null
t0=$(date +%s.%N)
"$SLUICE" release publish --product bench --version 1.0.0 --image "$REPO:1.0.0" --channel stable >"$STATE/publish.json"
t1=$(date +%s.%N)
DIGEST=$(jq -r '.platforms[0].digest // .digest' "$STATE/publish.json")
curl -fsS "$API/v1/keys" >"$STATE/keys.json"
echo "    published 1.0.0 ($DIGEST) in $(echo "$t1 - $t0" | bc) s"

# A device whose slots live under $1 (a mounted file system); its agent.toml
# is written by the agent's own configuration type (agent/examples/folder_device.rs).
# Extra arguments go to folder_device (`--mirror FROM=TO`, more `--insecure`).
device_config() {
  local d=$1 channel=${2:-stable}
  shift $(($# < 2 ? $# : 2))
  mkdir -p "$d"
  echo "root=/dev/vda sluice.slot=A" >"$d/cmdline"
  # The kernel's boot id as the agent reads it: a simulated reboot changes it.
  cat /proc/sys/kernel/random/uuid >"$d/boot_id"
  "$FOLDER_DEVICE" "$d" --server "$API" --product bench --channel "$channel" --secret "$SECRET" \
    --keys "$STATE/keys.json" --machine-id "bench-$(basename "$d")-$RANDOM$RANDOM" --insecure "$REGISTRY" "$@"
}

# Mounts a fresh file system of kind $1 (tmpfs | ext4) at $2.
fresh_fs() {
  local kind=$1 mnt=$2
  mkdir -p "$mnt"
  if [ "$kind" = tmpfs ]; then
    mount -t tmpfs -o size=4g sluice-bench "$mnt"
  else
    rm -f "$SHM/ext4.img"
    truncate -s 4G "$SHM/ext4.img"
    mkfs.ext4 -q -F "$SHM/ext4.img"
    mount -o loop "$SHM/ext4.img" "$mnt"
  fi
  MOUNTS+=("$mnt")
}
drop_fs() {
  umount "$1"
  rm -f "$SHM/ext4.img"
}

now() { date +%s.%N; }
# Runs a command under /usr/bin/time; appends "seconds peak_kb" to $1.
timed() {
  local out=$1
  shift
  /usr/bin/time -f '%e %M' -o "$STATE/time.txt" "$@" >"$STATE/cmd.log" 2>&1 || { cat "$STATE/cmd.log" >&2; return 1; }
  cat "$STATE/time.txt" >>"$out"
}
# What both results must share: every entry's type, mode and link target, and
# every file's content. (Not sizes of folders: ext4's depend on their history.)
fingerprint() {
  (cd "$1" && { find . -mindepth 1 -printf '%P %y %m %l\n' | LC_ALL=C sort
    find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-16)
}

RESULTS="$STATE/results.tsv"
: >"$RESULTS"
run_agent() {
  local fs=$1 i=$2 bin=${3:-$AGENT} label=${4:-agent} mnt="$STATE/mnt"
  fresh_fs "$fs" "$mnt"
  device_config "$mnt/dev"
  : >"$STATE/t.agent"
  local s e
  s=$(now)
  timed "$STATE/t.agent" "$bin" --config "$mnt/dev/agent.toml" apply
  sync
  e=$(now)
  grep -q "applied 1.0.0" "$STATE/cmd.log" || { cat "$STATE/cmd.log" >&2; return 1; }
  read -r _ rss <"$STATE/t.agent"
  echo -e "$label\t$fs\t$i\t$(echo "$e - $s" | bc)\t$rss" >>"$RESULTS"
  [ "$i" = 1 ] && fingerprint "$mnt/dev/b" >"$STATE/fp.$label.$fs"
  drop_fs "$mnt"
}
run_reference() {
  local fs=$1 i=$2 mnt="$STATE/mnt"
  fresh_fs "$fs" "$mnt"
  : >"$STATE/t.ref"
  local s e
  s=$(now)
  timed "$STATE/t.ref" skopeo copy -q --src-tls-verify=false "docker://$REPO@$DIGEST" "oci:$mnt/layout:t"
  timed "$STATE/t.ref" umoci raw unpack --rootless --image "$mnt/layout:t" "$mnt/rootfs"
  sync
  e=$(now)
  local rss
  rss=$(awk '$2>m{m=$2} END{print m}' "$STATE/t.ref")
  echo -e "reference\t$fs\t$i\t$(echo "$e - $s" | bc)\t$rss\t$(head -1 "$STATE/t.ref" | cut -d' ' -f1)\t$(tail -1 "$STATE/t.ref" | cut -d' ' -f1)" >>"$RESULTS"
  [ "$i" = 1 ] && fingerprint "$mnt/rootfs" >"$STATE/fp.ref.$fs"
  drop_fs "$mnt"
}

if [ "$DO_UPGRADE" = 1 ]; then
  echo "==> benchmark 4: $RUNS runs each, agent and reference alternating, on tmpfs and ext4"
  # Warm the page cache of the registry's blobs once, untimed.
  cat "$STATE"/registry/docker/registry/v2/blobs/sha256/*/*/data >/dev/null
  for i in $(seq 1 "$RUNS"); do
    for fs in tmpfs ext4; do
      if [ $((i % 2)) = 1 ]; then run_agent "$fs" "$i"; run_reference "$fs" "$i"
      else run_reference "$fs" "$i"; run_agent "$fs" "$i"; fi
      [ -n "${SLUICE_BENCH_COMPARE:-}" ] && run_agent "$fs" "$i" "$SLUICE_BENCH_COMPARE" other
      echo "    run $i $fs: $(grep -P "\t$fs\t$i\t" "$RESULTS" | cut -f1,4,5 | tr '\n\t' '; ')"
    done
  done
  for fs in tmpfs ext4; do
    if [ -n "${SLUICE_BENCH_COMPARE:-}" ] && ! cmp -s "$STATE/fp.other.$fs" "$STATE/fp.ref.$fs"; then
      echo "error: on $fs the other agent's slot differs from umoci's rootfs" >&2
      exit 1
    fi
    if ! cmp -s "$STATE/fp.agent.$fs" "$STATE/fp.ref.$fs"; then
      echo "error: on $fs the agent's slot differs from umoci's rootfs: $(cat "$STATE/fp.agent.$fs") vs $(cat "$STATE/fp.ref.$fs")" >&2
      exit 1
    fi
  done
  echo "    same tree as umoci's on both (types, modes, sizes, links, contents)"
fi

# ---- benchmark 5: footprint ----
if [ "$DO_FOOT" = 1 ]; then
  echo "==> benchmark 5: binary size and idle RSS"
  BIN_BYTES=$(stat -c %s "$AGENT")
  cp "$AGENT" "$STATE/agent.stripped" && strip "$STATE/agent.stripped"
  STRIPPED_BYTES=$(stat -c %s "$STATE/agent.stripped")
  d="$SHM/idle"
  device_config "$d" stable
  # Bring the device up to date (slot B holds 1.0.0, booted, marked good):
  # then the daemon's polls all answer "nothing to do", as on an idle device.
  "$AGENT" --config "$d/agent.toml" apply >"$STATE/idle-setup.log" 2>&1 || { cat "$STATE/idle-setup.log" >&2; exit 1; }
  # The reboot, as GRUB and the kernel play it: B on trial spends its try
  # (saved before it boots), the kernel has a new boot id, the command line
  # names B.
  grub-editenv "$d/grubenv" set B_TRY=1
  cat /proc/sys/kernel/random/uuid >"$d/boot_id"
  echo "root=/dev/vda sluice.slot=B" >"$d/cmdline"
  "$AGENT" --config "$d/agent.toml" mark-good >"$STATE/idle-setup.log" 2>&1 || { cat "$STATE/idle-setup.log" >&2; exit 1; }
  before=$(stat -c %Y.%y "$d/state/state.json")
  "$AGENT" --config "$d/agent.toml" run >"$STATE/daemon.log" 2>&1 &
  DAEMON_PID=$!
  # Polled once: each poll saves the answer's serial in state.json.
  for _ in $(seq 1 100); do [ "$(stat -c %Y.%y "$d/state/state.json")" != "$before" ] && break; sleep 0.1; done
  [ "$(stat -c %Y.%y "$d/state/state.json")" != "$before" ] || { echo "error: the daemon did not poll" >&2; cat "$STATE/daemon.log" >&2; exit 1; }
  sleep 1
  IDLE_KB=$(awk '/VmRSS/{print $2}' "/proc/$DAEMON_PID/status")
  IDLE_HWM_KB=$(awk '/VmHWM/{print $2}' "/proc/$DAEMON_PID/status")
  # And after the next poll (the server says every $POLL_S s, ±10 %).
  sleep $((POLL_S * 12 / 10 + 1))
  IDLE2_KB=$(awk '/VmRSS/{print $2}' "/proc/$DAEMON_PID/status")
  kill -TERM "$DAEMON_PID"
  wait "$DAEMON_PID" || true
  DAEMON_PID=
  if grep -q "failed" "$STATE/daemon.log"; then cat "$STATE/daemon.log" >&2; exit 1; fi
  echo "    binary $BIN_BYTES bytes (strip: $STRIPPED_BYTES), idle RSS $IDLE_KB kB, after another poll $IDLE2_KB kB (peak $IDLE_HWM_KB kB)"
fi

# ---- benchmark 7: bandwidth ----
# v1 (the image above) → v2 (mkimage --update 0.02: about 2 % of the files
# rewritten, a few added and removed), as 4 layers and squashed into one,
# each as gzip, zstd and zstd:chunked. A device on tmpfs installs v1, boots
# it, then installs v2 (timed); the registry's access log says how many
# bytes it served. skopeo + umoci pulling v2 (gzip) is the reference.
if [ "$DO_BW" = 1 ]; then
  echo "==> benchmark 7: bandwidth of a v1 → v2 upgrade"
  IMG2="$CACHE/image-$KEY-v2"
  if [ ! -f "$IMG2/summary.json" ]; then
    rm -rf "$IMG2"
    "$PY" bench/mkimage.py "$IMG2.tmp" --scale "$SCALE" --version 2.0.0 --update 0.02 >"$IMG2.summary"
    mv "$IMG2.tmp" "$IMG2" && mv "$IMG2.summary" "$IMG2/summary.json"
  fi
  BW="$STATE/bw"
  mkdir -p "$BW"
  BW_RESULTS="$BW/results.tsv"
  : >"$BW_RESULTS"
  # The squashed images (each version's tree as one layer) and the
  # recompressed ones are made once per image, like the image itself.
  LAYOUTS="$CACHE/bw-$KEY"
  mkdir -p "$LAYOUTS"
  if [ ! -f "$LAYOUTS/squashed.done" ]; then
    for v in 1 2; do
      src=$([ "$v" = 1 ] && echo "$IMG:1.0.0" || echo "$IMG2:2.0.0")
      rm -rf "$BW/tree$v" "$LAYOUTS/squashed-gzip-$v"
      umoci raw unpack --image "$src" "$BW/tree$v" >/dev/null
      tar -C "$BW/tree$v" --numeric-owner --xattrs -cf "$BW/tree$v.tar" .
      fingerprint "$BW/tree$v" >"$LAYOUTS/fp.v$v"
      rm -rf "$BW/tree$v"
      umoci init --layout "$LAYOUTS/squashed-gzip-$v" >/dev/null
      umoci new --image "$LAYOUTS/squashed-gzip-$v:t" >/dev/null
      umoci raw add-layer --image "$LAYOUTS/squashed-gzip-$v:t" "$BW/tree$v.tar" >/dev/null
      rm -f "$BW/tree$v.tar"
    done
    touch "$LAYOUTS/squashed.done"
  fi
  cp "$LAYOUTS/fp.v1" "$LAYOUTS/fp.v2" "$BW/"
  # RUNS timed v1 → v2 upgrades of case $1 (channel bw$2); $3, when given,
  # is the address of a slow link to the registry (bench/throttle.py): the
  # device pulls through it, and the case is recorded as link-$1.
  bw_runs() {
    local name=$1 n=$2 link=${3:-} label=$1
    [ -n "$link" ] && label="link-$1"
    for i in $(seq 1 "$RUNS"); do
      mnt="$STATE/mnt"
      fresh_fs tmpfs "$mnt"
      d="$mnt/dev"
      if [ -n "$link" ]; then
        device_config "$d" "bw$n" --insecure "$link" --mirror "$REGISTRY=$link"
      else
        device_config "$d" "bw$n"
      fi
      "$AGENT" --config "$d/agent.toml" apply >"$BW/v1.log" 2>&1 || { cat "$BW/v1.log" >&2; exit 1; }
      grub-editenv "$d/grubenv" set B_TRY=1
      cat /proc/sys/kernel/random/uuid >"$d/boot_id"
      echo "root=/dev/vda sluice.slot=B" >"$d/cmdline"
      "$AGENT" --config "$d/agent.toml" mark-good >"$BW/v1.log" 2>&1 || { cat "$BW/v1.log" >&2; exit 1; }
      "$SLUICE" channel promote --product bench --channel "bw$n" --version 7.$n.2 --percent 100 >/dev/null
      [ "$i" = 1 ] && curl -fsS -H "Authorization: Bearer $SLUICE_TOKEN" "$API/v1/products/bench/channels/bw$n/transfer" >"$BW/transfer-$name.json"
      from=$(wc -l <"$STATE/registry.log")
      : >"$STATE/t.agent"
      # Nothing written before (a layout just made) is flushed in the timing.
      sync
      s=$(now)
      timed "$STATE/t.agent" "$AGENT" --config "$d/agent.toml" apply
      sync
      e=$(now)
      grep -q "applied 7.$n.2" "$STATE/cmd.log" || { cat "$STATE/cmd.log" >&2; exit 1; }
      [ "$i" = 1 ] && cp "$STATE/cmd.log" "$BW/v2-$label.log"
      read -r _ rss <"$STATE/t.agent"
      bytes=$(tail -n +$((from + 1)) "$STATE/registry.log" | awk '$7 ~ /\/blobs\// && $6 == "\"GET" {b += $10} END {print b + 0}')
      [ "$i" = 1 ] && fingerprint "$d/a" >"$BW/fp.$label"
      # The floor under any A/B writer over loopback: copying the new slot's
      # files locally, no network and no hashing (beside the squashed
      # partial pull, on the same file system).
      if [ "$label" = squashed-zstd-chunked ]; then
        local c0 c1
        c0=$(now)
        cp -a "$d/a" "$mnt/floor"
        sync
        c1=$(now)
        echo -e "floor\t$i\t$(echo "$c1 - $c0" | bc)\t0\t0" >>"$BW_RESULTS"
      fi
      echo -e "$label\t$i\t$(echo "$e - $s" | bc)\t$rss\t$bytes" >>"$BW_RESULTS"
      drop_fs "$mnt"
      # The next run starts from v1 again.
      "$SLUICE" channel rollback --product bench --channel "bw$n" --version 7.$n.1 >/dev/null
    done
  }
  n=0
  for layering in layers4 squashed; do
    for fmt in gzip zstd zstd:chunked; do
      n=$((n + 1))
      name="$layering-${fmt/:/-}"
      # A development knob: only these cases (space-separated names), no
      # reference and no report (for profiling one case).
      if [ -n "${SLUICE_BENCH_BW_ONLY:-}" ] && [[ " $SLUICE_BENCH_BW_ONLY " != *" $name "* ]]; then
        continue
      fi
      api POST /v1/products/bench/channels "{\"name\":\"bw$n\"}" >/dev/null
      for v in 1 2; do
        case "$layering-$v" in
          layers4-1) src="oci:$IMG:1.0.0" ;;
          layers4-2) src="oci:$IMG2:2.0.0" ;;
          *) src="oci:$LAYOUTS/squashed-gzip-$v:t" ;;
        esac
        if [ "$fmt" != gzip ]; then
          if [ ! -d "$LAYOUTS/$name-$v" ]; then
            rm -rf "$LAYOUTS/$name-$v.tmp"
            skopeo copy -q --dest-compress-format "$fmt" "$src" "oci:$LAYOUTS/$name-$v.tmp:t" 2>/dev/null
            mv "$LAYOUTS/$name-$v.tmp" "$LAYOUTS/$name-$v"
          fi
          src="oci:$LAYOUTS/$name-$v:t"
        fi
        skopeo copy -q --dest-tls-verify=false --preserve-digests "$src" "docker://$REPO:bw-$name-$v" 2>/dev/null
        "$SLUICE" release publish --product bench --version "7.$n.$v" --image "$REPO:bw-$name-$v" >/dev/null
      done
      "$SLUICE" channel promote --product bench --channel "bw$n" --version 7.$n.1 --percent 100 >/dev/null
      bw_runs "$name" "$n"
      if ! cmp -s "$BW/fp.$name" "$BW/fp.v2"; then
        echo "error: $name: the slot differs from v2's tree" >&2
        exit 1
      fi
      echo "    $name: $(grep -P "^$name\t" "$BW_RESULTS" | cut -f3,4,5 | tr '\n\t' '; ')"
    done
  done
  # The same upgrades over a slow link (a metered or cellular line rather
  # than loopback): the full gzip and zstd pulls and the partial ones.
  LINK_PORT=$(free_port "$PG_PORT" "$REG_PORT" "$SRV_PORT")
  "$PY" bench/throttle.py "$LINK_PORT" "$REGISTRY" "$LINK_BYTES_S" &
  LINK_PID=$!
  sleep 0.5
  for c in 1:layers4-gzip 2:layers4-zstd 3:layers4-zstd-chunked 6:squashed-zstd-chunked; do
    n=${c%%:*} name=${c#*:}
    if [ -n "${SLUICE_BENCH_BW_ONLY:-}" ] && [[ " $SLUICE_BENCH_BW_ONLY " != *" $name "* ]]; then
      continue
    fi
    bw_runs "$name" "$n" "127.0.0.1:$LINK_PORT"
    if ! cmp -s "$BW/fp.link-$name" "$BW/fp.v2"; then
      echo "error: link-$name: the slot differs from v2's tree" >&2
      exit 1
    fi
    echo "    link-$name: $(grep -P "^link-$name\t" "$BW_RESULTS" | cut -f3,4,5 | tr '\n\t' '; ')"
  done
  kill "$LINK_PID" 2>/dev/null || true
  if [ -n "${SLUICE_BENCH_BW_ONLY:-}" ]; then
    echo "==> SLUICE_BENCH_BW_ONLY: no reference, no report"
    exit 0
  fi
  # The reference: skopeo + umoci pull v2 (4 gzip layers) whole.
  for i in $(seq 1 "$RUNS"); do
    mnt="$STATE/mnt"
    fresh_fs tmpfs "$mnt"
    from=$(wc -l <"$STATE/registry.log")
    s=$(now)
    skopeo copy -q --src-tls-verify=false "docker://$REPO:bw-layers4-gzip-2" "oci:$mnt/layout:t"
    umoci raw unpack --rootless --image "$mnt/layout:t" "$mnt/rootfs" >/dev/null
    sync
    e=$(now)
    bytes=$(tail -n +$((from + 1)) "$STATE/registry.log" | awk '$7 ~ /\/blobs\// && $6 == "\"GET" {b += $10} END {print b + 0}')
    echo -e "reference\t$i\t$(echo "$e - $s" | bc)\t0\t$bytes" >>"$BW_RESULTS"
    drop_fs "$mnt"
  done
  # What changed, compressed: the zstd:chunked v2 files whose digest v1
  # lacks, and the tables of contents (from the layouts themselves).
  "$PY" - "$LAYOUTS" >"$BW/changed.json" <<'PY'
import json, subprocess, sys
bw = sys.argv[1]
def tocs(layout):
    idx = json.load(open(f"{layout}/index.json"))
    m = json.load(open(f"{layout}/blobs/sha256/{idx['manifests'][0]['digest'][7:]}"))
    out = []
    for l in m["layers"]:
        off, length, _, _ = map(int, l["annotations"]["io.containers.zstd-chunked.manifest-position"].split(":"))
        with open(f"{layout}/blobs/sha256/{l['digest'][7:]}", "rb") as f:
            f.seek(off)
            raw = f.read(length)
        toc = json.loads(subprocess.run(["zstd", "-dc"], input=raw, capture_output=True, check=True).stdout)
        out.append((length, toc["entries"]))
    return out
res = {}
for layering in ["layers4", "squashed"]:
    v1 = tocs(f"{bw}/{layering}-zstd-chunked-1")
    v2 = tocs(f"{bw}/{layering}-zstd-chunked-2")
    held = {e["digest"] for _, es in v1 for e in es if e.get("digest")}
    changed = sum(e["endOffset"] - e["offset"] for _, es in v2 for e in es
                  if e["type"] == "reg" and e.get("size", 0) > 0 and e["digest"] not in held)
    files = sum(1 for _, es in v2 for e in es if e["type"] == "reg" and e.get("size", 0) > 0 and e["digest"] not in held)
    res[layering] = {"changed_bytes": changed, "changed_files": files, "toc_bytes": sum(n for n, _ in v2)}
json.dump(res, sys.stdout)
PY
  export BW_RESULTS BW_CHANGED="$BW/changed.json" BW_DIR="$BW"
fi

# ---- benchmark 6: fleet simulation ----
if [ "$DO_FLEET" = 1 ]; then
  echo "==> benchmark 6: fleet simulation with $DEVICES devices"
  for v in 1.0.0 1.1.0 1.2.0; do
    "$PY" bench/mkimage.py "$STATE/fleet-img" --scale 0.002 --version "$v" --seed 7 >/dev/null
    skopeo copy -q --dest-tls-verify=false "oci:$STATE/fleet-img:$v" "docker://$REGISTRY/bench/fleet:$v"
  done
  "$PY" bench/fleet.py --server "$API" --token "$SLUICE_TOKEN" --repository "$REGISTRY/bench/fleet" \
    --devices "$DEVICES" --poll-s "$POLL_S" --png "$PNG" --json "$STATE/fleet.json" "${FLEET_ARGS[@]}" | tee "$STATE/fleet.txt"
fi

# ---- the report ----
echo "==> writing $OUT"
export SLUICE_BENCH_COMPARE=${SLUICE_BENCH_COMPARE:-} SLUICE_BENCH_COMPARE_LABEL=${SLUICE_BENCH_COMPARE_LABEL:-}
export RESULTS OUT PNG TAR_MB GZ_MB FILES RUNS DEVICES SMOKE PROFILE SCALE DIGEST
export BIN_BYTES=${BIN_BYTES:-} STRIPPED_BYTES=${STRIPPED_BYTES:-} IDLE_KB=${IDLE_KB:-} IDLE2_KB=${IDLE2_KB:-} IDLE_HWM_KB=${IDLE_HWM_KB:-}
export FLEET_JSON=$([ "$DO_FLEET" = 1 ] && echo "$STATE/fleet.json" || echo "")
export DO_UPGRADE DO_FOOT DO_FLEET DO_BW POLL_S
export BW_RESULTS=${BW_RESULTS:-} BW_CHANGED=${BW_CHANGED:-} BW_DIR=${BW_DIR:-} LINK_BYTES_S
export PUBLISH_S=$(echo "$t1 - $t0" | bc)
export CPU_MODEL=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo) NPROC=$(nproc) MEM_GB=$(free -g | awk '/Mem:/{print $2}')
export KERNEL=$(uname -r) LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
export SKOPEO_V=$(skopeo --version | awk '{print $3}') UMOCI_V=$(umoci --version | awk '{print $3}')
export COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- agent bench || echo "+changes")
export FLEET_ARGS_STR="${FLEET_ARGS[*]}"
"$PY" bench/report.py
echo "==> done: $OUT"
