"""UMT5 / T5 text encoders and their sentencepiece tokenizer against transformers."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compiled, edit_model_config

from sora_jax.interop import export, tensors
from sora_jax.interop.load import load_sentencepiece_tokenizer, load_umt5_encoder
from sora_jax.models.tokenizer import train_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, d_model=24, d_kv=6, d_ff=40, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu", dropout_rate=0.0)

PROMPTS = ["a red circle moves left", "a red circle " * 12, "two blue squares bounce quickly up and down",
           "Green  triangle,   slowly!", "", "unseen wörds like zebra café"]


def make_torch_encoder(tmp_path, kind="umt5", **overrides):
  torch.manual_seed(0)
  if kind == "umt5":
    model = transformers.UMT5EncoderModel(transformers.UMT5Config(**{**TINY, **overrides}))
  else:
    model = transformers.T5EncoderModel(transformers.T5Config(**{**TINY, **overrides}))
  path = str(tmp_path / kind)
  model.eval().save_pretrained(path)
  return model, path


@pytest.mark.parametrize("kind,length", [("umt5", 9), ("umt5", 30), ("t5", 12)])
def test_encoder_matches_transformers(tmp_path, kind, length):
  model, path = make_torch_encoder(tmp_path, kind)
  ours = load_umt5_encoder(path)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 97, (3, length)).astype(np.int64)
  mask = np.ones((3, length), bool)
  mask[1, length // 2:] = False                      # padded prompts
  mask[2, 3:] = False
  ids[~mask] = 0
  with torch.no_grad():
    expected = model(input_ids=torch.from_numpy(ids),
                     attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state
  got = compiled()(ours, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  chex.assert_shape(got, (3, length, 24))
  expected = expected.numpy()
  error = np.abs(np.asarray(got, np.float64) - expected).max() / np.abs(expected).max()
  assert error < 1e-4


def test_export_round_trip(tmp_path):
  model, path = make_torch_encoder(tmp_path)
  ours = load_umt5_encoder(path)
  out = str(tmp_path / "exported")
  export.save_umt5_encoder(ours, out)
  reloaded = transformers.UMT5EncoderModel.from_pretrained(out).eval()
  ids = torch.tensor([[5, 9, 22, 1, 0, 0]])
  mask = (ids > 0).long()
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(input_ids=ids, attention_mask=mask).last_hidden_state,
                                  model(input_ids=ids, attention_mask=mask).last_hidden_state)
  original, again = tensors.SafetensorsCheckpoint(path), tensors.SafetensorsCheckpoint(out)
  for name in again.names():
    np.testing.assert_array_equal(again.read(name), original.read(name), err_msg=name)


def test_wrong_width_names_the_tensor(tmp_path):
  _, path = make_torch_encoder(tmp_path)
  edit_model_config(path, d_ff=48)
  with pytest.raises(tensors.CheckpointMismatch, match=r"DenseReluDense\.wi_0\.weight"):
    load_umt5_encoder(path)


def test_tokenizer_ids_match_transformers(tmp_path):
  captions = [f"a {c} {s} moves {d} {v}" for c in ("red", "green", "blue") for s in
              ("circle", "square", "triangle") for d in ("left", "up") for v in ("slowly", "fast")]
  path = str(tmp_path / "spiece.model")
  train_tokenizer(captions * 4, path, vocab_size=60, model_type="unigram")
  ours = load_sentencepiece_tokenizer(path)
  export.save_t5_tokenizer(path, str(tmp_path / "tokenizer"), max_length=16)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
  ids, mask = ours.encode(PROMPTS, 16)
  expected = theirs(PROMPTS, padding="max_length", max_length=16, truncation=True,
                    return_tensors="np")
  np.testing.assert_array_equal(ids, expected["input_ids"])
  np.testing.assert_array_equal(mask, expected["attention_mask"].astype(bool))
