#!/usr/bin/env bash
# Debian packages the test suite drives as foreign peers: dcmtk (storescu, findscu, movescu, getscu, ...).
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
# PostgreSQL server binaries (initdb, pg_ctl): tests/harness/postgres.py starts a throwaway cluster
command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
