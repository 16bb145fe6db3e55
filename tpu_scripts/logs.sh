#!/usr/bin/env bash
# Streams the training log of worker 0 (--worker N for another).
#   tpu_scripts/logs.sh --name my-tpu --zone us-central2-b [--worker 0]
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_common_flags "$@"
worker=0
if [[ ${#EXTRA_ARGS[@]} -ge 2 && "${EXTRA_ARGS[0]}" == "--worker" ]]; then worker="${EXTRA_ARGS[1]}"; fi

mapfile -t flags < <(project_flags)
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" "${flags[@]}" --worker="$worker" \
  --command="tail -n 100 -f ~/train.log"
