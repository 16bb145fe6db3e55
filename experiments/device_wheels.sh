#!/usr/bin/env bash
# Fetches here, into .whl/ (ignored by git), the wheels experiments/device_bench.sh installs
# on the GPU machine, whose image (Python 3.12; jax, flax, optax, orbax, torch,
# transformers already there) lacks diffusers and, of what sora_jax imports on the
# benchmark's path, ml_collections, grain (with its missing dependencies, portpicker among
# them: the first H200 run stopped on it), dm-pix and
# tensorboardX. Versions: those of this project's environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "diffusers==$(version diffusers)" "ml_collections==$(version ml_collections)" \
  "grain==$(version grain)" "array_record==$(version array_record)" \
  "dm-tree==$(version dm-tree)" "dm-pix==$(version dm-pix)" \
  "tensorboardX==$(version tensorboardX)" "portpicker==$(version portpicker)" \
  more-itertools importlib_metadata
du -sh .whl
