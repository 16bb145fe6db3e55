"""A sentencepiece tokenizer trained on the dataset's captions and saved with the run."""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def train_tokenizer(captions: Iterable[str], path: str, vocab_size: int,
                    model_type: str = "unigram") -> "Tokenizer":
  """Trains a sentencepiece model on `captions`, writes it to `path` and loads it.

  `vocab_size` is an upper bound: a small caption vocabulary yields fewer pieces.
  Ids: 0 pad, 1 end of sequence, 2 unknown (T5's convention); no BOS.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(captions)), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, path)
  return Tokenizer(path)


class Tokenizer:
  """Encodes captions to fixed-length id arrays with a padding mask."""

  def __init__(self, path: str):
    if not os.path.exists(path):
      raise FileNotFoundError(f"tokenizer model {path!r} does not exist.")
    self.path = path
    self.processor = spm.SentencePieceProcessor(model_file=path)

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  def encode(self, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns `ids [B, length]` int32 (text, EOS, then padding) and `mask [B, length]` bool.

    Texts longer than `length - 1` pieces are truncated; EOS is always kept.
    """
    ids, mask, _ = self.encode_counted(texts, length)
    return ids, mask

  def encode_counted(self, texts: Sequence[str], length: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`encode`, and each text's number of pieces before truncation, int32 `[B]` (more
    than `length - 1`: the text was truncated)."""
    ids = np.full((len(texts), length), PAD_ID, np.int32)
    counts = np.zeros(len(texts), np.int32)
    for row, pieces in enumerate(self.processor.encode(list(texts))):
      counts[row] = len(pieces)
      pieces = pieces[:length - 1] + [EOS_ID]
      ids[row, :len(pieces)] = pieces
    return ids, ids != PAD_ID, counts

  def num_pieces(self, text: str) -> int:
    """Pieces of `text` before truncation (without EOS)."""
    return len(self.processor.encode(text))

  def decode(self, ids: np.ndarray) -> list[str]:
    return [self.processor.decode([int(i) for i in row if i not in (PAD_ID, EOS_ID)])
            for row in np.asarray(ids)]
