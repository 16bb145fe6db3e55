#!/usr/bin/env bash
# Starts the same training command on every worker (multi-host through
# SORA_JAX_DISTRIBUTED=1); a rerun resumes from the last checkpoint in the workdir.
#   tpu_scripts/launch.sh --name my-tpu --zone us-central2-b -- \
#       --config configs/world_tiny.py --workdir /gcs/runs/tiny [--config.KEY=VALUE ...]
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_common_flags "$@"
if [[ ${#EXTRA_ARGS[@]} -eq 0 ]]; then
  echo "give the train arguments after --, e.g. -- --config configs/world_tiny.py --workdir $MOUNT/runs/x" >&2
  exit 2
fi

train_args="$(printf '%q ' "${EXTRA_ARGS[@]}")"
on_all_workers "cd ~/sora_jax && (SORA_JAX_DISTRIBUTED=1 nohup .venv/bin/sora-jax train $train_args > ~/train.log 2>&1 &) && echo started on \$(hostname)"
