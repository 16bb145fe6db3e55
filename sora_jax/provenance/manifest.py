"""Signed C2PA manifests on generated files, and their verification (c2pa-python).

Every file `sora-jax sample` writes carries a manifest with a `c2pa.actions` assertion:
`c2pa.created` with IPTC's digitalSourceType `trainedAlgorithmicMedia` (`c2pa.opened` +
`c2pa.edited` for outputs made from inputs, recorded as `parentOf` / `componentOf`
ingredients that keep their own manifests when they have one), the generator name and version, and an
`org.sora_jax.generation` assertion with the hash of the model config, the checkpoint
step, the seed and the sampler settings (the prompt only when the user opts in).

Verification (`verify`) reports one of `STATUSES`; `sora-jax verify` exits with
`EXIT_CODES[status]` (0 only for a valid manifest chained to a given trust anchor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import c2pa

from sora_jax.provenance.credentials import Credentials

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MIME_TYPES = {".mp4": "video/mp4", ".png": "image/png", ".gif": "image/gif",
              ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
STATUSES = ("trusted", "no_manifest", "tampered", "untrusted", "unreadable")
# "unreadable": missing, or not a media file the C2PA reader can parse.
EXIT_CODES = {"trusted": 0, "no_manifest": 2, "tampered": 3, "untrusted": 4, "unreadable": 5}


def _version() -> str:
  try:
    import importlib.metadata  # pylint: disable=g-import-not-at-top
    return importlib.metadata.version("sora_jax")
  except Exception:  # pylint: disable=broad-except  # running from a source tree
    return "0.0.0+source"


def config_hash(config: Any) -> str:
  """sha256 of a config's canonical JSON (the model that made an output)."""
  data = config.to_dict() if hasattr(config, "to_dict") else config
  return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def ingredient_labels(count: int) -> list[str]:
  """Labels of an output's input files: the first is its parent (`parentOf`), the others
  (a connected video's second clip) are components (`componentOf`)."""
  return ["parent0" if i == 0 else f"component{i}" for i in range(count)]


def generation_manifest(*, title: str, generation: dict[str, Any], ingredients: int = 0
                        ) -> dict[str, Any]:
  """The manifest definition of a generated file (`generation`: config hash, step, seed,
  sampler settings, optionally the prompt). With `ingredients` input files the output is
  an edit: `c2pa.opened` of the parent, then `c2pa.edited` (C2PA requires the first
  action to be created or opened)."""
  agent = {"name": "sora_jax", "version": _version()}
  labels = ingredient_labels(ingredients)
  if labels:
    actions = [{"action": "c2pa.opened", "parameters": {"ingredientIds": labels[:1]}},
               {"action": "c2pa.edited", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": agent, "parameters": {"ingredientIds": labels}}]
  else:
    actions = [{"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": agent}]
  return {"claim_generator_info": [agent], "title": title,
          "assertions": [{"label": "c2pa.actions", "data": {"actions": actions}},
                         {"label": "org.sora_jax.generation",
                          "data": _arrays_as_text(generation)}]}


def _arrays_as_text(value: Any) -> Any:
  """`value` with every list or tuple written as its JSON text ("[0.0, 1.0]"): the C2PA
  library stores the arrays of an assertion's JSON as byte strings (floats come back as
  empty strings), so a record's arrays are kept as text to survive signing."""
  if isinstance(value, dict):
    return {k: _arrays_as_text(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return json.dumps(list(value))
  return value


def mime_type(path: str) -> str:
  ext = os.path.splitext(path)[1].lower()
  if ext not in MIME_TYPES:
    raise ValueError(f"{path!r}: C2PA signing supports {sorted(MIME_TYPES)} files.")
  return MIME_TYPES[ext]


def sign_file(source: str, dest: str, manifest: dict[str, Any], credentials: Credentials,
              ingredients: tuple[str, ...] = ()) -> None:
  """Writes `source` with `manifest` signed by `credentials` to `dest` (may equal
  `source`; replaced only once signing succeeded). `ingredients`: input files the output
  was made from, added as `parentOf` ingredients."""
  signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(
      alg=credentials.alg.encode(), sign_cert=credentials.chain_pem,
      private_key=credentials.key_pem, ta_url=None))
  builder = c2pa.Builder(manifest)
  try:
    for path, label in zip(ingredients, ingredient_labels(len(ingredients))):
      relationship = "parentOf" if label == "parent0" else "componentOf"
      with open(path, "rb") as f:
        builder.add_ingredient({"title": os.path.basename(path), "relationship": relationship,
                                "label": label}, mime_type(path), f)
    tmp = dest + ".signing"
    with open(source, "rb") as src, open(tmp, "w+b") as out:
      builder.sign(signer, mime_type(dest), src, out)
    os.replace(tmp, dest)
  finally:
    builder.close()
    signer.close()


@dataclasses.dataclass(frozen=True)
class Verification:
  """What `verify` found: `status` (one of `STATUSES`), the active manifest (or None),
  and the validator's failure codes."""
  status: str
  manifest: dict[str, Any] | None
  failures: tuple[str, ...]

  def assertion(self, label: str) -> Any:
    """The data of the active manifest's assertion `label` (a versioned label `x.v2`
    matches `x`), or None."""
    for a in (self.manifest or {}).get("assertions", []):
      if a["label"].split(".v")[0] == label:
        return a.get("data")
    return None

  @property
  def generation(self) -> dict[str, Any] | None:
    """The `org.sora_jax.generation` record (config hash, step, sampler, ...), or None."""
    return self.assertion("org.sora_jax.generation")

  def summary(self) -> str:
    if self.status == "unreadable":
      return f"not a media file that can be read: {self.failures[0]}"
    if self.manifest is None:
      return "no C2PA manifest"
    m = self.manifest
    gen = ", ".join(f"{g.get('name')} {g.get('version', '')}".strip()
                    for g in m.get("claim_generator_info", []))
    actions = [a["action"] for x in m.get("assertions", []) if x["label"].startswith("c2pa.actions")
               for a in x["data"].get("actions", [])]
    ingredients = [i.get("title") for i in m.get("ingredients", [])]
    signer = (m.get("signature_info") or {}).get("common_name") or (
        m.get("signature_info") or {}).get("issuer")
    lines = [f"status: {self.status}", f"generator: {gen}", f"actions: {actions}",
             f"ingredients: {ingredients}", f"signer: {signer}"]
    if self.failures:
      lines.append(f"failures: {list(self.failures)}")
    return "\n".join(lines)


def verify(path: str, trust_anchors_pem: str | None = None) -> Verification:
  """Validates `path`'s manifest; with `trust_anchors_pem` (PEM CA certificates) the
  signer must chain to one of them to be `trusted`."""
  settings = {"verify": {"verify_trust": trust_anchors_pem is not None}}
  if trust_anchors_pem is not None:
    settings["trust"] = {"trust_anchors": trust_anchors_pem}
  context = c2pa.Context(c2pa.Settings.from_json(json.dumps(settings)))
  if not os.path.isfile(path):
    return Verification("unreadable", None, (f"{path}: no such file",))
  try:
    reader = c2pa.Reader(path, context=context)
  except c2pa.C2paError as e:
    if "ManifestNotFound" in type(e).__name__ or "ManifestNotFound" in str(e):
      return Verification("no_manifest", None, ())
    if isinstance(e, (c2pa.C2paError.NotSupported, c2pa.C2paError.Io, c2pa.C2paError.Decoding,
                      c2pa.C2paError.FileNotFound)):
      return Verification("unreadable", None, (f"{path}: {e}",))
    raise
  try:
    state = reader.get_validation_state()
    results = reader.get_validation_results() or {}
    failures = tuple(f["code"] for f in (results.get("activeManifest") or {}).get("failure", []))
    manifest = reader.get_active_manifest()
  finally:
    reader.close()
  if state == "Trusted":
    status = "trusted"
  elif state == "Valid" or all(f.startswith("signingCredential") for f in failures):
    status = "untrusted"
  else:
    status = "tampered"
  return Verification(status, manifest, failures)


def signed_by(credentials: Credentials) -> str:
  """Who signs with `credentials`, as outputs report it."""
  return ("a local, untrusted development identity (set SORA_JAX_C2PA_CERT/KEY for yours)"
          if credentials.local else credentials.subject)


def sign_output(path: str, credentials: Credentials | None, *, generation: dict[str, Any],
                ingredients: tuple[str, ...] = (), dest: str | None = None) -> str:
  """Signs a file the system just wrote into `dest` (default: `path` itself; `dest`
  appears only once signed); returns a line saying by whom. `credentials=None` (only
  from an explicit `--no-sign`) moves it to `dest` unsigned and says so."""
  dest = dest or path
  if credentials is None:
    os.replace(path, dest)
    return f"{dest}: NOT signed (--no-sign): no provenance manifest."
  manifest = generation_manifest(title=os.path.basename(dest), generation=generation,
                                 ingredients=len(ingredients))
  sign_file(path, dest, manifest, credentials, ingredients)
  return f"{dest}: C2PA manifest signed by {signed_by(credentials)}."


def strip_copy(source: str, dest: str) -> None:
  """A copy of `source` without its manifest (for tests and comparisons): the media
  re-written by PIL (images) or remuxed by PyAV (mp4)."""
  if source.lower().endswith(".png"):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    Image.open(source).save(dest)
    return
  import av  # pylint: disable=g-import-not-at-top
  with av.open(source) as inp, av.open(dest, "w") as out:
    stream = inp.streams.video[0]
    out_stream = out.add_stream_from_template(stream)
    for packet in inp.demux(stream):
      if packet.dts is None:
        continue
      packet.stream = out_stream
      out.mux(packet)
