"""sora_jax: text-to-video generation with a diffusion transformer over spacetime patches.

Layers, lowest first. A module imports only from its own layer or lower ones, at the
top of the file or inside a function alike; `tests/test_layers.py` enforces it over
the import graph of every module, and docs/architecture.md draws it.

  1 parallel      mesh, logical axis rules, activation constraints, ring attention
  2 diffusion     rectified-flow objective, ODE solvers, frame-conditioning masks
    models        tokenizer, text encoder, DiT, VAE and their layers (pure modules)
    video_io      reading and writing media files
  3 data          procedural world, user folders, TFDS sources, Grain pipeline, packing
    interop.*     pretrained formats read into modules: safetensors, Wan, UMT5, Wan VAE
  4 configs       the config schema: typed model configs, validation, what a config's
                  autoencoder diffuses
    evaluation    deterministic analyses of videos (ShapesBench, FVD, reconstruction)
    provenance    watermark, C2PA manifests, detector, the writer of every output
  5 train         runs: train state, jitted steps, loops, checkpoints, restoring, building
                  autoencoders, latent datasets
  6 sample        the jitted sampler over a run
    interop.export, interop.wan_import   runs in and out of the ecosystem's formats
  7 prompting     image-to-video, extension, loops, connection over the sampler
    demo          the `make demo` recipe
  8 cli           the `sora-jax` console script
"""

__version__ = "0.1.0"

# The layers above as data, lowest first: an entry names a subpackage or module
# (the longest entry that prefixes a module's dotted name below `sora_jax` wins).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("parallel",),
    ("diffusion", "models", "video_io"),
    ("data", "interop.tensors", "interop.wan", "interop.umt5", "interop.wan_vae",
     "interop.load"),
    ("configs", "evaluation", "provenance"),
    ("train",),
    ("sample", "interop", "interop.export", "interop.wan_import"),
    ("prompting", "demo"),
    ("cli",),
)
