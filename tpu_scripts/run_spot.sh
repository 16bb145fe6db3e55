#!/usr/bin/env bash
# Keeps a spot (preemptible) training run going: creates the TPU, sets it up, launches,
# and whenever the TPU is preempted deletes it, recreates it and relaunches; the run
# resumes from its last checkpoint in the workdir on the bucket.
#   tpu_scripts/run_spot.sh --name my-tpu --zone us-central2-b --type v5litepod-16 \
#       --bucket my-bucket -- --config configs/world_tiny.py --workdir /gcs/runs/tiny
# Under --dry-run it prints one round of commands and stops.
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_common_flags "$@"
here="$(dirname "$0")"
common=(--name "$NAME" --zone "$ZONE" --type "$TYPE" --version "$VERSION" --spot)
if [[ -n "$PROJECT" ]]; then common+=(--project "$PROJECT"); fi
if [[ "$QUEUED" == 1 ]]; then common+=(--queued); fi
if [[ "$DRY_RUN" == 1 ]]; then common+=(--dry-run); fi
mapfile -t flags < <(project_flags)

state() {
  gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" "${flags[@]}" \
    --format='value(state)' 2>/dev/null || echo MISSING
}

while true; do
  bash "$here/create.sh" "${common[@]}"
  bash "$here/setup.sh" "${common[@]}" --bucket "$BUCKET" --bucket-mount "$MOUNT"
  bash "$here/launch.sh" "${common[@]}" --bucket-mount "$MOUNT" -- "${EXTRA_ARGS[@]}"
  if [[ "$DRY_RUN" == 1 ]]; then
    run gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" "${flags[@]}" \
      --format='value(state)'
    exit 0
  fi
  while [[ "$(state)" == "READY" ]]; do sleep 60; done
  echo "TPU $NAME is $(state): recreating it and resuming from the last checkpoint."
  bash "$here/stop.sh" "${common[@]}" --delete || true
done
