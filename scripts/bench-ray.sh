#!/usr/bin/env bash
# The map stages (ingest, detect, embed) as shards on Ray against the local executor: same
# machine, same photos, one after the other, each on a lake of its own on a local S3-compatible
# server (moto), as a cluster's nodes would share the lake. Ray runs on loopback only
# (tests/e2e/ray_cluster.py: NODES simulated nodes of one CPU each).
#
#   scripts/bench-ray.sh [INDIVIDUALS] [PHOTOS_PER] [SHARDS]
#
# Prints seconds per map stage and photos per second for: local, Ray with 1 node, Ray with 2
# nodes. Detector training runs on the driver in every case (before the shards of detect) and is
# reported apart. Needs the binary built (cargo build) and setup.sh's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
individuals="${1:-12}"; per="${2:-10}"; shards="${3:-4}"
bin="$CARGO_TARGET_DIR/debug/pipeline"
py="$VIRTUAL_ENV/bin/python"
work="$(mktemp -d /tmp/bench-ray.XXXXXX)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled RAY_TMPDIR="$work/r"
mkdir -p "$RAY_TMPDIR"
port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$VIRTUAL_ENV/bin/moto_server" -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
export AWS_ENDPOINT="http://127.0.0.1:$port" AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true
for _ in $(seq 50); do curl -s "$AWS_ENDPOINT" >/dev/null && break; sleep 0.2; done
curl -s -X PUT "$AWS_ENDPOINT/bench" >/dev/null
"$bin" demo-lake --out "$work/demo" --individuals "$individuals" --photos-per "$per" --width 2400 --height 1000 >/dev/null
for f in labels.csv boxes.csv $(cd "$work/demo" && ls photos/*); do
  curl -s -f -T "$work/demo/$f" "$AWS_ENDPOINT/bench/$f" >/dev/null
done
photos=$(ls "$work/demo/photos" | wc -l)
pipeline_for() {  # NAME -> a pipeline file whose lake is s3://bench/NAME
  sed -e "s#file://../data/lake#s3://bench/$1#" -e "s#file://../data/demo-lake/#s3://bench/#" \
      -e "s#\"../sql/#\"$PWD/sql/#" pipelines/ingest-to-submission.toml > "$work/$1.toml"
  echo "$work/$1.toml"
}
sets=(--set train.input_size=128 --set train.epochs=1 --set train.batch_size=16 --set detect.epochs=5)
stage_seconds() {  # FILE -> "ingest detect embed" seconds of the last run
  "$bin" query --pipeline "$1" --format csv \
    "SELECT stage, round(extract(epoch FROM ended_at) - extract(epoch FROM started_at), 1) AS s, summary FROM runs WHERE stage IN ('ingest','detect','embed') ORDER BY started_at" \
    | tail -n +2
}
echo "photos: $photos ($individuals individuals x $per, 2400x1000 JPEGs), shards per stage: $shards"
run() {  # LABEL FILE ARGS...
  local label="$1" file="$2"; shift 2
  local t0=$SECONDS
  "$bin" run -q "$file" --until embed "${sets[@]}" "$@" >/dev/null
  echo "== $label: whole run $((SECONDS - t0)) s"
  stage_seconds "$file" | while IFS=, read -r stage s rest; do
    printf '   %-7s %7s s  %6.1f photos/s   %s\n' "$stage" "$s" "$(echo "$photos / $s" | bc -l)" "$(echo "$rest" | cut -c1-110)"
  done
}
run local "$(pipeline_for local)"
for nodes in 1 2; do
  "$py" tests/e2e/ray_cluster.py "$RAY_TMPDIR" "$nodes" > "$work/cluster-$nodes" < <(sleep 100000) &
  cluster=$!
  for _ in $(seq 120); do [ -s "$work/cluster-$nodes" ] && break; sleep 0.5; done
  address=$(head -1 "$work/cluster-$nodes")
  PIPELINE_BIN="$bin" run "ray, $nodes node(s)" "$(pipeline_for "ray$nodes")" --executor "ray=$address" --shards "$shards"
  kill "$cluster"; wait "$cluster" 2>/dev/null || true
done
