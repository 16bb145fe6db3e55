#!/usr/bin/env bash
# The lent-GPU run of experiments/device_bench.py, as one command from the repository root:
# installs the wheels carried in .whl/ (fetched here by experiments/device_wheels.sh: what
# the GPU image lacks), then writes device_bench.json and .md to $OUT.
#   device run: carry [".whl"], command "bash experiments/device_bench.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv || true
exec python3 -m experiments.device_bench --out-dir "${OUT:-docs/results}" "$@"
