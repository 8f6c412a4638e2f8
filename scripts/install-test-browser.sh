#!/usr/bin/env bash
# Install the headless browser the explanation-page tests drive, and print its path.
#
#   bash scripts/install-test-browser.sh        # install (or find) it; prints /usr/bin/chromium
#
# Idempotent: Debian's chromium package is installed only when missing (as root, through
# apt-get, waiting for a lock another install holds); the Python driver is the `playwright`
# package of the test extra (pip install -e ".[test]"), which drives this Chromium directly:
# no browser download from anywhere else. Only the path goes to stdout; progress to stderr.
# tests/browser_support.py finds the browser the same way (CDS_TEST_CHROMIUM overrides it).
set -euo pipefail

log() { echo "install-test-browser: $*" >&2; }
BROWSER="${CDS_TEST_CHROMIUM:-/usr/bin/chromium}"

if [[ ! -x "$BROWSER" ]]; then
  if [[ $(id -u) -ne 0 ]]; then
    log "Chromium is not installed and only root can install it (apt-get install chromium)"
    exit 1
  fi
  log "installing Debian's chromium package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium >&2
fi
if [[ ! -x "$BROWSER" ]]; then
  log "$BROWSER is still missing after the install"
  exit 1
fi
# A browser that cannot start headless is as good as none: say so here, not in a test.
if ! "$BROWSER" --headless --no-sandbox --disable-gpu --no-first-run --dump-dom about:blank \
  >/dev/null 2>&1; then
  log "$BROWSER is installed but does not start headless"
  exit 1
fi
log "$("$BROWSER" --version 2>/dev/null || echo "$BROWSER")"
echo "$BROWSER"
