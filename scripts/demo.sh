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
# The pipeline file holds the GPU recipe (480x480, 80 epochs); on 2 CPU cores the demo trains a
# smaller version of it: 224x224, 12 epochs, batch 16, ImageNet MobileNetV2 as in the file.
"$bin" run pipelines/ingest-to-submission.toml \
  --set train.input_size=224 --set train.epochs=12 --set train.batch_size=16 \
  --set train.warmup_epochs=1 --set train.lr=5e-4 --set train.head_lr=5e-3 "$@"
echo
echo "images in the lake:"
"$bin" query "SELECT count(*) AS images, count(DISTINCT individual_id) AS individuals FROM images"
echo "after cleaning:"
"$bin" query "SELECT count(*) AS photos, count(DISTINCT individual_id) AS individuals FROM clean"
echo "retrieval quality of the model on photos it did not train on:"
"$bin" query "SELECT model_id, queries, gallery, rerank, n_queries, round(precision_at_1, 3) AS p_at_1, round(map_at_20, 3) AS map_at_20 FROM evaluate ORDER BY queries, gallery, rerank"
echo "model files and TensorBoard events: data/lake/models/ (tensorboard --logdir data/lake/models)"
