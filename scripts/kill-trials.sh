#!/usr/bin/env bash
# Kill trials: `pipeline run` of pipelines/ingest-to-submission.toml killed with SIGKILL, then run
# again to the end, TRIALS times; each lake is compared with one from a run never killed
# (`pipeline digest`: every table's rows and content, every model file). Half the trials kill at
# a random instant of the run, half at a named instant no random kill is likely to hit (a
# table's rows all sent but its version not written, a version written but not recorded, a
# model file's temporary copy not yet renamed, a detector being published: PIPELINE_KILL_AT,
# see crates/lake/src/kill.rs). The README's figures:
#
#   TRIALS=20 scripts/kill-trials.sh
#
# INDIVIDUALS, PER (photos each), WIDTH x HEIGHT, EPOCHS and SEED size it (a small lake: the
# trials are about where a run dies, not how long it runs).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --quiet --bin pipeline
bin="$CARGO_TARGET_DIR/debug/pipeline"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/shared"
"$bin" demo-lake --out "$dir/shared/demo-lake" --individuals "${INDIVIDUALS:-8}" --photos-per "${PER:-5}" \
  --width "${WIDTH:-1200}" --height "${HEIGHT:-500}" >/dev/null
sets=(--set train.input_size=64 --set train.epochs="${EPOCHS:-3}" --set detect.epochs=5 --set detect.input_size=128)
# A project folder per run: the repository's pipeline, SQL and schemas, the shared photos.
project() {
  mkdir -p "$dir/$1/pipelines" "$dir/$1/data"
  ln -s "$PWD/sql" "$dir/$1/sql"
  ln -s "$PWD/schemas" "$dir/$1/schemas"
  ln -s "$dir/shared/demo-lake" "$dir/$1/data/demo-lake"
  sed 's/device = "auto"/device = "cpu"/' pipelines/ingest-to-submission.toml > "$dir/$1/pipelines/p.toml"
}
run() { "$bin" run -q "$dir/$1/pipelines/p.toml" "${sets[@]}"; }
digest() { "$bin" digest --pipeline "$dir/$1/pipelines/p.toml"; }

project reference
run reference >/dev/null
digest reference > "$dir/reference.digest"
# A second run never killed: it must agree with the first (the comparison is fair), and its time
# (caches warm, as the trials' are) sets the range of the random instants.
project again
start=$(date +%s.%N)
run again >/dev/null
took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
digest again > "$dir/again.digest"
if ! cmp -s "$dir/reference.digest" "$dir/again.digest"; then
  echo "two runs never killed disagree:"; diff "$dir/reference.digest" "$dir/again.digest"; exit 1
fi
echo "reference runs: identical, ${took}s; $(grep -c '^table' "$dir/reference.digest") tables, $(grep -c '^file' "$dir/reference.digest") model files"

points=(commit:images committed:detections publish save:best.safetensors "save:last.json@2" commit:embeddings
        committed:models commit:submissions commit:evaluate "commit:clean" committed:images "save:model.json")
RANDOM=${SEED:-7}
identical=0 lost=0 doubled=0 killed=0
printf '%-5s %-32s %-8s %-10s %s\n' trial "killed at" killed "re-run" digest
for i in $(seq 1 "${TRIALS:-20}"); do
  project "t$i"
  if (( i % 2 == 1 )); then
    what=${points[$(( (i / 2) % ${#points[@]} ))]}
    set +e
    # (In a subshell, so that the shell's own "Killed" notice stays out of the table.)
    ( PIPELINE_KILL_AT="$what" "$bin" run -q "$dir/t$i/pipelines/p.toml" "${sets[@]}" >/dev/null 2>"$dir/t$i.err"; exit $? ) 2>/dev/null
    code=$?
    set -e
  else
    # Between 2 % and 90 % of the second reference run's time.
    at=$(awk -v t="$took" -v r="$(( 2 + RANDOM % 89 ))" 'BEGIN { printf "%.2f", t * r / 100 }')
    what="random, ${at}s in"
    "$bin" run -q "$dir/t$i/pipelines/p.toml" "${sets[@]}" >/dev/null 2>"$dir/t$i.err" &
    pid=$!
    sleep "$at"
    kill -9 "$pid" 2>/dev/null || true
    set +e
    wait "$pid" 2>/dev/null
    code=$?
    set -e
  fi
  was_killed=no
  if [ "$code" = 137 ]; then was_killed=yes; killed=$((killed + 1)); fi
  if run "t$i" >/dev/null 2>"$dir/t$i.rerun"; then rerun=ok; else rerun=FAILED; fi
  digest "t$i" > "$dir/t$i.digest"
  if cmp -s "$dir/reference.digest" "$dir/t$i.digest"; then
    verdict=identical
    identical=$((identical + 1))
  else
    verdict=DIFFERENT
    diff "$dir/reference.digest" "$dir/t$i.digest" | sed 's/^/      /' || true
  fi
  # Rows lost or written twice, table by table, against the reference.
  read -r l d < <(awk '$1 == "table" { if (FNR == NR) want[$2] = $4; else { got = $4; if (got < want[$2]) l += want[$2] - got; if (got > want[$2]) d += got - want[$2]; d += $6 } }
                      END { print l + 0, d + 0 }' "$dir/reference.digest" "$dir/t$i.digest")
  lost=$((lost + l)) doubled=$((doubled + d))
  printf '%-5s %-32s %-8s %-10s %s\n' "$i" "$what" "$was_killed" "$rerun" "$verdict"
done
echo "kill trials: $identical/${TRIALS:-20} identical to the run never killed ($killed killed before the end), rows lost: $lost, rows written twice: $doubled"
[ "$identical" = "${TRIALS:-20}" ]
