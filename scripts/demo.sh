#!/usr/bin/env bash
# Command A: generate the demo lake and run the main pipeline on it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --quiet --bin pipeline
bin=bin/pipeline
if [ ! -f data/demo-lake/ground_truth.csv ]; then
  "$bin" demo-lake --out data/demo-lake
fi
"$bin" run pipelines/ingest-to-submission.toml "$@"
echo
echo "images in the lake:"
"$bin" query "SELECT count(*) AS images, count(DISTINCT individual_id) AS individuals FROM images"
echo "after cleaning:"
"$bin" query "SELECT count(*) AS photos, count(DISTINCT individual_id) AS individuals FROM clean"
