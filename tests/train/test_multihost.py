"""Two processes x 4 CPU devices (gloo on 127.0.0.1) train like one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import subprocess_env

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, data_dir, stops):
  env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                       JAX_PLATFORMS="cpu")
  port = _free_port()
  worker = os.path.join(TESTS, "train", "multihost_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), workdir, data_dir,
                             stops, TESTS], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
    results.append(json.loads(line[len("RESULT "):]))
  assert results[0]["histories"] == results[1]["histories"]   # both see the same losses
  return results[0]["histories"]


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
def test_two_process_run_matches_one_process_and_resumes(data_dir, tmp_path, reference_run):
  reference = reference_run[2]["history"]         # the same config in one process, 10 steps

  workdir = str(tmp_path / "multi")
  first, second = _two_processes(workdir, data_dir, "3,6")   # the second resumes from step 3
  assert {f for f in os.listdir(os.path.join(workdir, "checkpoints", "3", "data"))} >= {
      "process_0-of-2.json", "process_1-of-2.json"}
  assert [s for s, _ in first] == [1, 2, 3]
  steps, losses = zip(*(first + second))
  assert list(steps) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose(losses, [loss for _, loss in reference[:6]], rtol=1e-5)
