#!/usr/bin/env bash
# Creates a TPU VM or pod slice (on-demand, --spot, or through a --queued resource).
#   tpu_scripts/create.sh --name my-tpu --zone us-central2-b --type v4-32 [--spot] [--queued]
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_common_flags "$@"

mapfile -t flags < <(project_flags)
capacity=()
if [[ "$SPOT" == 1 ]]; then capacity+=(--spot); fi

if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" --zone="$ZONE" \
    "${flags[@]}" --accelerator-type="$TYPE" --runtime-version="$VERSION" "${capacity[@]}"
  echo "Queued. Watch it with: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE"
else
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" "${flags[@]}" \
    --accelerator-type="$TYPE" --version="$VERSION" "${capacity[@]}"
fi
