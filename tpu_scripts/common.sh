#!/usr/bin/env bash
# shellcheck disable=SC2034  # the variables are read by the scripts that source this file
# Shared flag parsing and command runner for the TPU scripts (sourced, not run).
#
# Flags every script takes:
#   --name NAME             TPU VM (or queued resource) name              [sora-jax]
#   --zone ZONE             e.g. us-central2-b (v4), us-east5-a (v5p)     [us-central2-b]
#   --project PROJECT       gcloud project (default: gcloud's)
#   --type TYPE             accelerator type: v4-8, v4-32, v5litepod-16, v5p-8, v6e-8 [v4-8]
#   --version VERSION       TPU runtime version (default: by family)
#   --spot                  spot capacity (preemptible)
#   --queued                ask through a queued resource
#   --bucket-mount DIR      where the GCS bucket is mounted on every worker [/gcs]
#   --bucket BUCKET         GCS bucket (without gs://) for data, runs and checkpoints
#   --dry-run               print the gcloud commands instead of running them
#                           (SORA_JAX_TPU_DRY_RUN=1 in the environment forces it)

set -euo pipefail

NAME="sora-jax"
ZONE="us-central2-b"
PROJECT=""
TYPE="v4-8"
VERSION=""
SPOT=0
QUEUED=0
BUCKET=""
MOUNT="/gcs"
DRY_RUN="${SORA_JAX_TPU_DRY_RUN:-0}"
EXTRA_ARGS=()

parse_common_flags() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) NAME="$2"; shift 2 ;;
      --zone) ZONE="$2"; shift 2 ;;
      --project) PROJECT="$2"; shift 2 ;;
      --type) TYPE="$2"; shift 2 ;;
      --version) VERSION="$2"; shift 2 ;;
      --spot) SPOT=1; shift ;;
      --queued) QUEUED=1; shift ;;
      --bucket) BUCKET="$2"; shift 2 ;;
      --bucket-mount) MOUNT="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; EXTRA_ARGS+=("$@"); break ;;
      *) EXTRA_ARGS+=("$1"); shift ;;
    esac
  done
  if [[ -z "$VERSION" ]]; then
    case "$TYPE" in
      v4-*) VERSION="tpu-ubuntu2204-base" ;;
      v5litepod-*) VERSION="v2-alpha-tpuv5-lite" ;;
      v5p-*) VERSION="v2-alpha-tpuv5" ;;
      v6e-*) VERSION="v2-alpha-tpuv6e" ;;
      *) echo "unknown --type $TYPE (expected v4-*, v5litepod-*, v5p-*, v6e-*)" >&2; exit 2 ;;
    esac
  fi
}

# gcloud with the common location flags.
project_flags() {
  if [[ -n "$PROJECT" ]]; then printf -- '--project=%s\n' "$PROJECT"; fi
}

# Runs a command, or prints it (shell-quoted) under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Runs a shell command on every worker of the TPU VM.
on_all_workers() {
  local cmd="$1"
  local flags
  mapfile -t flags < <(project_flags)
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" "${flags[@]}" --worker=all \
    --command="$cmd"
}
