#!/usr/bin/env bash
# Command B: install what is missing, build, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# The review page's end-to-end test drives a real headless browser (Debian's chromium; loopback
# only). Command A does not need it.
command -v chromium >/dev/null || apt_install chromium
cargo nextest run --workspace --no-fail-fast "$@"
