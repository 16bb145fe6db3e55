"""Captions of the user's media: a CSV or JSONL file (path -> caption), or sidecar `.txt` files.

  CSV    a header row with columns `path` and `caption` (any others are ignored)
  JSONL  one object per line with keys `path` and `caption`
  .txt   `clip.mp4` is described by `clip.txt` beside it (when no file gives a caption)

Paths are relative to the media folder (absolute paths inside it are accepted too).
`caption_text` reads a record's caption back as text, whichever source wrote it.
"""

from __future__ import annotations

import csv
import json
import os


def caption_text(value: bytes | str) -> str:
  """A record's `caption` as text (TFDS records hold bytes, in-memory sources str)."""
  return value.decode() if isinstance(value, bytes) else str(value)


def _key(path: str, media_dir: str) -> str:
  if os.path.isabs(path):
    path = os.path.relpath(path, media_dir)
  return os.path.normpath(path)


def load_captions(path: str, media_dir: str) -> dict[str, str]:
  """Reads a captions file into `{path relative to media_dir: caption}`.

  Raises:
    FileNotFoundError: no such file. ValueError: a malformed file (naming the line).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--captions {path}: no such file.")
  captions: dict[str, str] = {}
  with open(path, encoding="utf-8", newline="") as f:
    if path.lower().endswith(".csv"):
      reader = csv.DictReader(f)
      if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
        raise ValueError(f"{path}: a CSV of captions needs a header with 'path' and 'caption' "
                         f"columns (found {reader.fieldnames}).")
      for row in reader:
        captions[_key(row["path"], media_dir)] = (row["caption"] or "").strip()
    elif path.lower().endswith((".jsonl", ".json")):
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          captions[_key(row["path"], media_dir)] = str(row["caption"]).strip()
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{number}: expected an object with 'path' and 'caption' "
                           f"({e}).") from None
    else:
      raise ValueError(f"{path}: captions must be a .csv or .jsonl file.")
  return captions


def caption_for(relpath: str, media_dir: str, captions: dict[str, str]) -> str:
  """The caption of a file: from `captions`, else its sidecar `.txt`, else ""."""
  key = os.path.normpath(relpath)
  if key in captions:
    return captions[key]
  sidecar = os.path.join(media_dir, os.path.splitext(key)[0] + ".txt")
  if os.path.isfile(sidecar):
    with open(sidecar, encoding="utf-8", errors="replace") as f:
      return f.read().strip()
  return ""
