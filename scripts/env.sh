# Sourced by the setup scripts: where the project's caches live and how the build finds libtorch.
# Everything lives outside the clone, so a second run (and CI on the same machine) reuses it.
export PIPELINE_CACHE="${PIPELINE_CACHE:-$HOME/.cache/pipeline}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PIPELINE_CACHE/target}"
export VIRTUAL_ENV="$PIPELINE_CACHE/venv"
export PATH="$VIRTUAL_ENV/bin:$HOME/.cargo/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export PIPELINE_WEIGHTS="${PIPELINE_WEIGHTS:-$PIPELINE_CACHE/weights}"
