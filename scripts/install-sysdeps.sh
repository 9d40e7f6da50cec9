#!/usr/bin/env bash
# Debian packages the test suite drives as foreign peers: dcmtk (storescu, findscu, movescu, getscu, ...).
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
# PostgreSQL server binaries (initdb, pg_ctl): tests/harness/postgres.py starts a throwaway cluster
command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
# Node.js + npm: the FHIR engine (Medplum) and the OIDC provider the tests run are npm packages (machines
# of this kind ship Node 20; Debian's package is the fallback)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
# Chromium: the browser tests drive the OHIF Viewer in Debian's headless chromium (tests/harness/browser.py);
# no tool may download a browser of its own
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
