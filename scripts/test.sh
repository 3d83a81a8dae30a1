#!/usr/bin/env bash
# Run the test suite as the README says. The visualizer tests (tests/test_page.py) drive Debian's chromium through
# Playwright's own driver (no `playwright install`, no browser download): install it first when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "scripts/test.sh: installing Debian's chromium for the browser tests" >&2
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
exec python -X faulthandler -m pytest -q "$@"  # a crash (even at exit) prints every thread's stack
