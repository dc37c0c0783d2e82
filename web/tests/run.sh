#!/usr/bin/env bash
# The dashboard's browser tests: builds the dashboard (web/dist) and the
# `sluice` binary, then runs `node --test` in headless Chromium against a real
# server per test file, each with its own database in the given PostgreSQL
# cluster and the given registry.
#
#   DATABASE_URL          a PostgreSQL URL (any database: the tests make their own `dash_*` ones)
#   SLUICE_TEST_REGISTRY  host:port of a plain-HTTP registry (or REGISTRY)
#   CARGO_TARGET_DIR      where cargo builds (default: <repo>/target)
#   SLUICE_BIN            a prebuilt `sluice` binary instead of building one
#   SKIP_WEB_BUILD=1      use web/dist as it is
# Installs Debian's chromium when /usr/bin/chromium is missing (as root).
set -euo pipefail
WEB=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(cd "$WEB/.." && pwd)
cd "$WEB"

: "${DATABASE_URL:?set DATABASE_URL to a PostgreSQL URL (the tests create their own dash_* databases there)}"
export SLUICE_TEST_PG="$DATABASE_URL"
export SLUICE_TEST_REGISTRY="${SLUICE_TEST_REGISTRY:-${REGISTRY:?set SLUICE_TEST_REGISTRY (or REGISTRY) to the registry host:port}}"

if [ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
  echo "==> installing chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if [ ! -d node_modules ]; then
  echo "==> npm ci"
  npm ci --no-audit --no-fund
fi
if [ "${SKIP_WEB_BUILD:-}" != 1 ]; then
  echo "==> npm run build"
  npm run build --silent >/dev/null
fi
if [ -z "${SLUICE_BIN:-}" ]; then
  echo "==> cargo build -p sluice-server --bin sluice"
  (cd "$ROOT" && cargo build -q -p sluice-server --bin sluice)
  export SLUICE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/sluice"
fi
echo "==> browser tests (chromium $("${CHROMIUM:-/usr/bin/chromium}" --version 2>/dev/null | awk '{print $2}'), registry $SLUICE_TEST_REGISTRY)"
exec node --test --test-reporter=spec tests/
