#!/usr/bin/env bash
# Benchmark: the training pipeline's full run against a night of the nightly pipeline with a few
# new, unlabelled survey photos, on the same lake in the same session (the demo's settings:
# 224x224, 12 epochs). Prints each run stage by stage. INDIVIDUALS, PER (photos each), NEW
# (photos that arrive), WIDTH x HEIGHT (the photos' size), EPOCHS and BOXES (hand-drawn boxes
# the detector trains on; all of the demo's by default) size it. The issue's benchmark:
#
#   INDIVIDUALS=500 PER=10 NEW=50 WIDTH=1200 HEIGHT=500 EPOCHS=2 BOXES=300 scripts/bench-nightly.sh
#
#   1. full: pipelines/ingest-to-submission.toml from nothing (trains and promotes the model);
#   2. catch-up: pipelines/nightly-reingest.toml once with nothing new (its first run: its own
#      ledger, the first vacuum of the lake);
#   3. night: NEW photos arrive, pipelines/nightly-reingest.toml again — the figure that counts.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --quiet --bin pipeline
bin="$CARGO_TARGET_DIR/debug/pipeline"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/p/pipelines" "$dir/p/data"
cp -r sql schemas "$dir/p/"
cp pipelines/ingest-to-submission.toml pipelines/nightly-reingest.toml "$dir/p/pipelines/"
size=(--width "${WIDTH:-2400}" --height "${HEIGHT:-1000}")
"$bin" demo-lake --out "$dir/p/data/demo-lake" --individuals "${INDIVIDUALS:-24}" --photos-per "${PER:-8}" "${size[@]}"
"$bin" demo-lake --out "$dir/extra" --individuals $(( ${NEW:-2} / 2 + 4 )) --photos-per 4 --seed 99 "${size[@]}" >/dev/null
if [ -n "${BOXES:-}" ]; then
  boxes="$dir/p/data/demo-lake/boxes.csv"
  head -n $(( BOXES + 1 )) "$boxes" > "$boxes.tmp" && mv "$boxes.tmp" "$boxes"
fi
sets=(--set train.input_size=224 --set train.epochs="${EPOCHS:-12}" --set train.batch_size=16
      --set train.warmup_epochs=1 --set train.lr=5e-4 --set train.head_lr=5e-3)
timed() { /usr/bin/time -f "wall %e s, max RSS %M KiB" "$bin" run "$@" -q; }
echo "== full run (training pipeline)"
timed "$dir/p/pipelines/ingest-to-submission.toml" "${sets[@]}"
echo "== nightly pipeline, first run, nothing new"
timed "$dir/p/pipelines/nightly-reingest.toml"
# The night's photos: from another survey, not in the labels file (new sightings).
n=0
for f in "$dir"/extra/photos/IMG_*.jpg; do
  grep -q "$(basename "$f")," "$dir/extra/ground_truth.csv" && grep "$(basename "$f")," "$dir/extra/ground_truth.csv" | grep -q ",keep," || continue
  cp "$f" "$dir/p/data/demo-lake/photos/NIGHT_$(basename "$f")"
  n=$((n + 1))
  [ "$n" -ge "${NEW:-2}" ] && break
done
echo "== night: $n new photos (nightly pipeline)"
timed "$dir/p/pipelines/nightly-reingest.toml"
echo "== the same night again"
timed "$dir/p/pipelines/nightly-reingest.toml"
"$bin" runs --lake "file://$dir/p/data/lake"
