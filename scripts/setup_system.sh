#!/usr/bin/env bash
# System packages the test suite drives for real: Debian's Chromium (the web UI tests, through Playwright)
# and PostgreSQL (the server's metadata on PostgreSQL). Installed with apt-get when missing and when this
# runs as root (or with passwordless sudo); otherwise the tests that need them are skipped, naming this script.
set -uo pipefail
need=()
[ -x /usr/bin/chromium ] || need+=(chromium chromium-driver)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo -n); else
  echo "[setup] cannot install ${need[*]} (not root): their tests will be skipped" >&2; exit 0
fi
echo "[setup] installing ${need[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq >/dev/null && "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  || echo "[setup] apt-get could not install ${need[*]}: their tests will be skipped" >&2
exit 0
