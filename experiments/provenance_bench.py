"""Watermark robustness and the generated-vs-real classifier, measured on a trained run's samples.

  python -m experiments.provenance_bench --workdir runs/demo [--clips 200] [--train-clips 400]
      [--scale 8] [--out provenance_bench.json]

Clips: `--clips` held-out world clips (real) and as many samples of the run, prompted with
those clips' captions (generated), plus `--train-clips` of each from the train split for the
classifier. Every clip goes through the files the system writes: `write_mp4` at `--scale`
(upscaled), decoded back.

Watermark: each sample is written watermarked (the run's payload) and unwatermarked. The
invisibility is the PSNR of the watermarked frames against the unwatermarked ones (as
encoded, and as decoded from the two files). Every attack of `provenance.attacks.ATTACKS`
is applied to the decoded watermarked samples and to the null set (the unwatermarked
samples and the real clips); reported per attack: TPR and FPR at the detector's threshold,
TPR at the null's 99th percentile (FPR <= 1%), ROC AUC, payload bit accuracy (mean and
5th percentile over all watermarked clips; mean, and the share read without an error,
over those detected at the threshold), and every score (for calibrating the threshold).

Classifier: trained on the train-split real clips vs unwatermarked samples (at the model's
size, after the mp4 round trip), evaluated on the held-out ones: accuracy at 0.5 and ROC AUC,
clean and after a CRF-28 re-encode of the upscaled file.

Writes JSON (`--out`), a markdown table (`.md` beside it) and the score distributions
(`.png`).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import time
import types
from typing import Any, Iterator, Sequence

import numpy as np

from experiments.report import markdown_table, pyplot, report, save_figure
from sora_jax import configs, video_io
from sora_jax.data.world import SPLIT_SEEDS, render_example
from sora_jax.evaluation.reconstruction import psnr_uint8
from sora_jax.provenance import attacks, classifier, manifest, watermark
from sora_jax.sample import Sampler


def world_clips(config, split: str, count: int, offset: int = 0
                ) -> tuple[np.ndarray, list[str]]:
  """`count` clips of a world split from its `offset`-th on, and their captions."""
  world = configs.world_config(config)
  examples = [render_example(world, SPLIT_SEEDS[split] + offset + i, holdout=split == "train")
              for i in range(count)]
  return np.stack([e["video"] for e in examples]), [e["caption"] for e in examples]


def through_file(video: np.ndarray, path: str, scale: int, mark=None) -> np.ndarray:
  """`video` written as the system writes it (`write_mp4`, upscaled) and decoded back."""
  video_io.write_mp4(path, video, fps=8, scale=scale, mark=mark)
  return video_io.read_video(path)


def attack_and_detect(args: tuple[str, np.ndarray]) -> tuple[float, np.ndarray]:
  """`(attack name, uint8 video [T, H, W, 3])` -> the detector's score and bits after the
  attack (one argument: a multiprocessing map target)."""
  name, video = args
  found = watermark.detect(attacks.ATTACKS[name](video))
  return found.score, found.bits


@contextlib.contextmanager
def attack_pool(workers: int) -> Iterator[Any]:
  """Something with `.map(fn, items, chunksize=...)`: a pool of `workers` spawned processes,
  or this process itself when `workers` is 1 (no start-up of a second JAX)."""
  if workers <= 1:
    yield types.SimpleNamespace(map=lambda fn, items, chunksize=1: list(map(fn, items)))
    return
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    yield pool


def watermark_rows(marked: list[np.ndarray], null: list[np.ndarray], bits: np.ndarray,
                   threshold: float, workers: int
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Per attack: detection and payload metrics at `threshold`; also every score (for the plot)."""
  rows, scores = [], {}
  with attack_pool(workers) as pool:
    for name in attacks.ATTACKS:
      start = time.perf_counter()
      pos = pool.map(attack_and_detect, [(name, v) for v in marked], chunksize=4)
      neg = pool.map(attack_and_detect, [(name, v) for v in null], chunksize=4)
      pos_scores = np.array([s for s, _ in pos])
      neg_scores = np.array([s for s, _ in neg])
      accuracy = np.array([np.mean(b == bits) for _, b in pos])
      found = pos_scores >= threshold
      at_1pct = float(np.quantile(neg_scores, 0.99))
      rows.append({
          "attack": name, "clips": len(marked), "null_clips": len(null),
          "tpr": float(np.mean(pos_scores >= threshold)),
          "fpr": float(np.mean(neg_scores >= threshold)),
          "tpr_at_fpr_1pct": float(np.mean(pos_scores > at_1pct)),
          "null_99th_percentile": at_1pct, "auc": classifier.roc_auc(pos_scores, neg_scores),
          "bit_accuracy": float(accuracy.mean()),
          "bit_accuracy_p5": float(np.quantile(accuracy, 0.05)),
          "bit_accuracy_detected": float(accuracy[found].mean()) if found.any() else None,
          "payload_exact_detected": float(np.mean(accuracy[found] == 1)) if found.any() else None,
          "score_median": float(np.median(pos_scores)),
          "null_score_max": float(neg_scores.max()),
          "seconds": time.perf_counter() - start})
      rows[-1]["scores"] = {"watermarked": np.round(pos_scores, 3).tolist(),
                            "null": np.round(neg_scores, 3).tolist()}
      scores[name] = (pos_scores, neg_scores)
      r = rows[-1]
      print(f"{name:>11}: TPR {r['tpr']:.3f} FPR {r['fpr']:.3f} bits {r['bit_accuracy']:.3f} "
            f"({r['seconds']:.0f} s)", flush=True)
  return rows, scores


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the study; `argv` (default: the command line) as the script takes it."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="A trained run (sora-jax train/demo).")
  parser.add_argument("--clips", type=int, default=200, help="held-out clips of each kind")
  parser.add_argument("--train-clips", type=int, default=400,
                      help="classifier training clips of each kind")
  parser.add_argument("--classifier-steps", type=int, default=400)
  parser.add_argument("--no-classifier", action="store_true",
                      help="measure the watermark only (no train-split samples, no classifier)")
  parser.add_argument("--scale", type=int, default=8, help="upscaling of the written files")
  parser.add_argument("--steps", type=int, default=None, help="sampling steps (run default)")
  parser.add_argument("--workers", type=int, default=2,
                      help="processes for the attacks (1: this process)")
  parser.add_argument("--out", default="provenance_bench.json")
  args = parser.parse_args(argv)

  sampler = Sampler.from_workdir(args.workdir)
  config = sampler.config
  tmp = os.path.splitext(args.out)[0] + "_files"
  os.makedirs(tmp, exist_ok=True)
  start = time.perf_counter()
  real_test, test_captions = world_clips(config, "test", args.clips)
  options = {} if args.steps is None else {"steps": args.steps}
  gen_test = sampler.generate(test_captions, list(range(args.clips)), **options)
  print(f"sampled {len(gen_test)} clips in {time.perf_counter() - start:.0f} s", flush=True)

  # Watermark: the run's payload, files as `sora-jax sample` writes them.
  config_sha256 = manifest.config_hash(config)
  bits = watermark.payload_bits(*watermark.payload_ids(config_sha256, sampler.step))
  mark = watermark.marker(config_sha256, sampler.step)
  path = os.path.join(tmp, "clip.mp4")
  encoded_psnr, file_psnr, marked, null = [], [], [], []
  for video in gen_test:
    frames = video_io.upscale(video, args.scale)
    encoded_psnr.append(psnr_uint8(mark(frames), frames))
    marked.append(through_file(video, path, args.scale, mark))
    plain = through_file(video, path, args.scale)
    file_psnr.append(psnr_uint8(marked[-1], plain))
    null.append(plain)
  null += [through_file(video, path, args.scale) for video in real_test]
  threshold = watermark.WatermarkConfig.from_env().threshold
  rows, scores = watermark_rows(marked, null, bits, threshold, args.workers)

  invisibility = {"psnr_encoded_mean": float(np.mean(encoded_psnr)),
                  "psnr_encoded_min": float(np.min(encoded_psnr)),
                  "psnr_files_mean": float(np.mean(file_psnr)),
                  "psnr_files_min": float(np.min(file_psnr))}
  classifier_rows, classifier_scores, train_seconds = [], {}, None
  if not args.no_classifier:
    classifier_rows, classifier_scores, train_seconds = classifier_bench(
        sampler, args, real_test, null, path, options)
  write_report(args, sampler, rows, scores, invisibility, classifier_rows, classifier_scores,
               train_seconds, null, marked, threshold)


def classifier_bench(sampler: Sampler, args: argparse.Namespace, real_test: np.ndarray,
                     null: list[np.ndarray], path: str, options: dict[str, Any]
                     ) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
  """Trains the classifier on train-split clips (real vs unwatermarked samples) and
  evaluates it on the held-out ones, clean and re-encoded: rows, scores, training seconds."""
  real_train, train_captions = world_clips(sampler.config, "train", args.train_clips)
  gen_train = sampler.generate(train_captions, list(range(10_000, 10_000 + args.train_clips)),
                               **options)
  # Classifier: real vs unwatermarked samples at the model's size, after the mp4 round trip
  # (the held-out clips' decoded files are the null set's).
  size = real_test.shape[1:4]
  def at_model_size(decoded, crf=None):
    if crf is not None:
      decoded = [attacks.reencode(d, crf=crf) for d in decoded]
    return np.stack([video_io.resize(d, *size[1:]) for d in decoded])
  def written(videos):
    return [through_file(video, path, args.scale) for video in videos]
  start = time.perf_counter()
  model = classifier.train_classifier(at_model_size(written(real_train)),
                                      at_model_size(written(gen_train)),
                                      steps=args.classifier_steps)
  train_seconds = time.perf_counter() - start
  classifier_rows, classifier_scores = [], {}
  decoded_gen, decoded_real = null[:len(null) - len(real_test)], null[len(null) - len(real_test):]
  for condition, crf in (("clean", None), ("re-encoded CRF 28", 28)):
    p_gen = classifier.generated_probability(model, at_model_size(decoded_gen, crf))
    p_real = classifier.generated_probability(model, at_model_size(decoded_real, crf))
    classifier_scores[condition] = (p_gen, p_real)
    classifier_rows.append({
        "condition": condition, "clips": len(p_gen) + len(p_real),
        "accuracy": float((np.mean(p_gen > 0.5) + np.mean(p_real <= 0.5)) / 2),
        "tpr": float(np.mean(p_gen > 0.5)), "fpr": float(np.mean(p_real > 0.5)),
        "auc": classifier.roc_auc(p_gen, p_real)})
  return classifier_rows, classifier_scores, train_seconds


def write_report(args: argparse.Namespace, sampler: Sampler, rows: list[dict[str, Any]],
                 scores: dict[str, Any], invisibility: dict[str, float],
                 classifier_rows: list[dict[str, Any]], classifier_scores: dict[str, Any],
                 train_seconds: float | None, null: list[np.ndarray], marked: list[np.ndarray],
                 threshold: float) -> None:
  """JSON (`args.out`), the markdown tables beside it, and the score plot."""
  print(f"\nInvisibility: PSNR {invisibility['psnr_encoded_mean']:.2f} dB mean, "
        f"{invisibility['psnr_encoded_min']:.2f} min (frames as encoded); decoded files "
        f"{invisibility['psnr_files_mean']:.2f} / {invisibility['psnr_files_min']:.2f}")
  watermark_columns = [
      ("attack", lambda r: r["attack"]),
      ("TPR @ threshold", lambda r: f"{r['tpr']:.3f}"),
      ("FPR @ threshold", lambda r: f"{r['fpr']:.3f}"),
      ("TPR @ FPR<=1%", lambda r: f"{r['tpr_at_fpr_1pct']:.3f}"),
      ("AUC", lambda r: f"{r['auc']:.4f}"),
      ("bit accuracy (mean / p5)", lambda r: f"{r['bit_accuracy']:.3f} / {r['bit_accuracy_p5']:.3f}"),
      ("detected: bit accuracy / exact", lambda r: "-" if r["bit_accuracy_detected"] is None
       else f"{r['bit_accuracy_detected']:.3f} / {r['payload_exact_detected']:.3f}"),
      ("score median / null max", lambda r: f"{r['score_median']:.1f} / {r['null_score_max']:.1f}"),
  ]
  classifier_columns = [
      ("classifier, held-out", lambda r: r["condition"]),
      ("accuracy", lambda r: f"{r['accuracy']:.3f}"),
      ("TPR / FPR", lambda r: f"{r['tpr']:.3f} / {r['fpr']:.3f}"),
      ("ROC AUC", lambda r: f"{r['auc']:.4f}"),
  ]
  report(rows, watermark_columns, args.out, workdir=args.workdir, step=sampler.step,
         clips=args.clips, null_clips=len(null), scale=args.scale,
         frame_size=list(marked[0].shape), threshold=threshold,
         invisibility=invisibility, classifier=classifier_rows,
         classifier_train_clips=args.train_clips if classifier_rows else None,
         classifier_train_seconds=train_seconds)
  if classifier_rows:
    print("\n" + markdown_table(classifier_rows, classifier_columns))
  with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as f:
    f.write(f"Invisibility (PSNR vs unwatermarked, {args.clips} clips of "
            f"{'x'.join(map(str, marked[0].shape[:3]))}): "
            f"{invisibility['psnr_encoded_mean']:.2f} dB mean, "
            f"{invisibility['psnr_encoded_min']:.2f} dB min\n\n")
    f.write(markdown_table(rows, watermark_columns) + "\n\n")
    if classifier_rows:
      f.write(markdown_table(classifier_rows, classifier_columns) + "\n")
  plot(scores, classifier_scores, threshold,
       os.path.splitext(args.out)[0] + ".png")


def plot(scores: dict[str, tuple[np.ndarray, np.ndarray]],
         classifier_scores: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float,
         path: str) -> None:
  plt = pyplot()
  if plt is None:
    return
  panels = list(scores.items()) + [(f"classifier, {k}", v) for k, v in classifier_scores.items()]
  cols = 4
  fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(4 * cols, 6))
  for ax, (name, (pos, neg)) in zip(axes.flat, panels):
    bins = np.linspace(min(pos.min(), neg.min()), max(pos.max(), neg.max()), 40)
    ax.hist(neg, bins=bins, alpha=0.6, label="no watermark" if "classifier" not in name
            else "real")
    ax.hist(pos, bins=bins, alpha=0.6, label="watermarked" if "classifier" not in name
            else "generated")
    if "classifier" not in name:
      ax.axvline(threshold, color="k", ls="--", lw=1)
    ax.set_title(name)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  print(f"Wrote {save_figure(fig, path)}")


if __name__ == "__main__":
  main()
