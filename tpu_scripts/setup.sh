#!/usr/bin/env bash
# Copies this checkout (without .venv, runs/, .git) to every worker, installs sora_jax with jax[tpu] in a virtual
# environment, and mounts the GCS bucket (gcsfuse) where data, runs and checkpoints live.
#   tpu_scripts/setup.sh --name my-tpu --zone us-central2-b --bucket my-bucket
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"
parse_common_flags "$@"
if [[ -z "$BUCKET" ]]; then echo "--bucket is required" >&2; exit 2; fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
archive="${TMPDIR:-/tmp}/sora_jax_checkout.tgz"
mapfile -t flags < <(project_flags)
run tar czf "$archive" --exclude=.venv --exclude=runs --exclude=.git -C "$repo" .
run gcloud compute tpus tpu-vm scp "$archive" "$NAME:~/sora_jax_checkout.tgz" --zone="$ZONE" \
  "${flags[@]}" --worker=all

on_all_workers "set -e
mkdir -p ~/sora_jax && tar xzf ~/sora_jax_checkout.tgz -C ~/sora_jax
sudo apt-get update -q && sudo apt-get install -yq python3-venv gcsfuse || true
sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT
cd ~/sora_jax && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e . 'jax[tpu]'
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
