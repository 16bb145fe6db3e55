"""A bounded load test of the web studio on localhost: concurrent requests from several
clients against its queue, side by side for several queue sizes in one run.

  python -m experiments.studio_load --workdir RUN [--requests 20] [--clients 4] \
      [--queue-sizes 2,4,8] [--steps 4] [--out FILE.json]

For each queue size the studio (`sora_jax.studio.app.serve`, in this process) is served
on a free localhost port; one request compiles the shape first; then `--requests`
requests of that one shape (different seeds) go out at once from `--clients` Gradio
clients. Every request either completes with a signed file or is refused with the
queue's message; none may be lost. Reported per queue size: completed, refused, lost,
the sampling functions compiled during the load (0: one per shape), the server
process's resident memory before and after the load (MiB) and the wall time of the load.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import tempfile
import time
from typing import Any

from experiments.report import report

PROMPT = "a red circle moves left slowly"
COLUMNS = [("queue size", lambda r: str(r["queue_size"])),
           ("requests", lambda r: str(r["requests"])),
           ("completed", lambda r: str(r["completed"])),
           ("refused with a message", lambda r: str(r["refused"])),
           ("lost", lambda r: str(r["lost"])),
           ("compiled during the load", lambda r: str(r["compiled_during_load"])),
           ("memory before / after (MiB)",
            lambda r: f"{r['rss_before_mib']:.0f} / {r['rss_after_mib']:.0f}"),
           ("wall (s)", lambda r: f"{r['seconds']:.1f}")]


def rss_mib() -> float:
  """This process's resident memory (Linux /proc)."""
  with open("/proc/self/status", encoding="utf-8") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def load(studio, *, requests: int = 20, clients: int = 4, queue_size: int = 4,
         steps: int = 4, download_dir: str | None = None) -> dict[str, Any]:
  """Serves `studio` with `queue_size`, sends `requests` concurrent text-to-video requests
  from `clients` clients, and returns the counts (module docstring) with every refusal's
  message (`messages`) and every completed file (`files`: the clients' downloads, under
  `download_dir`, else gradio_client's default, the system's temporary gradio folder)."""
  from gradio_client import Client  # pylint: disable=g-import-not-at-top
  from sora_jax.studio import app  # pylint: disable=g-import-not-at-top
  port = free_port()
  page = app.serve(studio, port=port, queue_size=queue_size, block=False, quiet=True)
  try:
    where = {} if download_dir is None else {"download_files": download_dir}
    pool_of_clients = [Client(f"http://127.0.0.1:{port}/", verbose=False, **where)
                       for _ in range(clients)]
    d = studio.defaults()

    def one(seed: int) -> tuple[str, str]:
      job = pool_of_clients[seed % clients].submit(
          PROMPT, "text", "video", None, None, d.solver, steps, d.cfg_scale, seed, d.frames,
          d.height, d.width, "forward", 1, 0.6, api_name="/generate")
      try:
        return "completed", job.result(timeout=600)[2]
      except Exception as e:  # pylint: disable=broad-except  (what the client was told)
        return "refused", str(e)

    one(requests)                          # the shape compiles here, before the load
    compiled, before, start = studio.sampler.compiled_shapes, rss_mib(), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(requests) as pool:
      outcomes = list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - start
  finally:
    page.close()
  files = [o for kind, o in outcomes if kind == "completed"]
  messages = [o for kind, o in outcomes if kind == "refused"]
  return {"queue_size": queue_size, "requests": requests, "clients": clients,
          "completed": len(files), "refused": len(messages),
          "lost": requests - len(files) - len(messages),
          "compiled_during_load": studio.sampler.compiled_shapes - compiled,
          "rss_before_mib": before, "rss_after_mib": rss_mib(), "seconds": seconds,
          "refusal_messages": sorted(set(messages)), "files": files}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--requests", type=int, default=20)
  parser.add_argument("--clients", type=int, default=4)
  parser.add_argument("--queue-sizes", default="2,4,8")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  from sora_jax.studio.engine import Studio  # pylint: disable=g-import-not-at-top
  studio = Studio.from_workdir(args.workdir)
  rows = []
  for size in (int(v) for v in args.queue_sizes.split(",") if v):
    with tempfile.TemporaryDirectory(prefix="studio_load_") as downloads:
      row = load(studio, requests=args.requests, clients=args.clients, queue_size=size,
                 steps=args.steps, download_dir=downloads)
    row.pop("files")
    rows.append(row)
  out = args.out or os.path.join(studio.out_dir, "studio_load.json")
  report(rows, COLUMNS, out, workdir=args.workdir, steps=args.steps)


if __name__ == "__main__":
  main()
