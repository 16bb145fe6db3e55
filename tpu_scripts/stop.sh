#!/usr/bin/env bash
# Stops training on every worker; --delete also deletes the TPU VM (or queued resource).
#   tpu_scripts/stop.sh --name my-tpu --zone us-central2-b [--delete] [--queued]
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_common_flags "$@"

on_all_workers "pkill -INT -f 'sora-jax train' || true"
if [[ " ${EXTRA_ARGS[*]-} " == *" --delete "* ]]; then
  mapfile -t flags < <(project_flags)
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" "${flags[@]}" \
      --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" "${flags[@]}" --quiet
  fi
fi
