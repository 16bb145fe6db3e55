"""One process of the 2-process test run (see test_multihost.py); not a test itself."""

import json
import sys


def main():
  port, process_id, workdir, data_dir, stops = sys.argv[1:6]
  from sora_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
  sys.path.insert(0, sys.argv[6])           # tests/ (for conftest's config helper)
  from conftest import make_test_config  # pylint: disable=g-import-not-at-top
  from sora_jax.train.loop import train  # pylint: disable=g-import-not-at-top
  config = make_test_config(data_dir)
  config.train.update(steps=10, log_every=1, checkpoint_every=3)   # as conftest.reference_run
  # One run per stop: each after the first resumes from the checkpoint the last one wrote
  # (a new trainer restoring a two-process checkpoint; no second process start-up).
  histories = [train(config, workdir, progress=False, stop_at=int(stop))["history"]
               for stop in stops.split(",")]
  print("RESULT " + json.dumps({"process": jax.process_index(), "histories": histories}))


if __name__ == "__main__":
  main()
