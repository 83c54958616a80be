#!/usr/bin/env bash
# Command B: install what is missing, build, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo nextest run --workspace --no-fail-fast "$@"
