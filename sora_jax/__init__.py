"""sora_jax: text-to-video generation with a diffusion transformer over spacetime patches.

Layers, lowest first. A module imports only from its own layer or lower ones, at the
top of the file or inside a function alike; `tests/test_layers.py` enforces it over
the import graph of every module, and docs/architecture.md draws it.

  0 parallel      mesh, logical axis rules, activation constraints, ring attention
  1 diffusion     rectified-flow objective, ODE solvers, frame-conditioning masks
    models        tokenizer, text encoder, DiT, VAE and their layers (pure modules)
    video_io      reading and writing media files
  2 data          procedural world, user folders, TFDS sources, Grain pipeline, packing
    interop.*     pretrained formats read into modules: safetensors, Wan, UMT5, Wan VAE, CLIP
  3 configs       the config schema: typed model configs, validation, what a config's
                  autoencoder diffuses
    evaluation    deterministic analyses of videos (ShapesBench, FVD, reconstruction)
    provenance    watermark, C2PA manifests, detector, the writer of every output
  4 train         runs: train state, jitted steps, loops, checkpoints, restoring, building
                  autoencoders, latent datasets
  5 sample        the jitted sampler over a run
    plan          compiling a config for a TPU slice here: memory, collectives, FLOPs
    interop.export, interop.wan_import   runs in and out of the ecosystem's formats
  6 prompting     image-to-video, extension, loops, connection over the sampler
    demo          the `make demo` recipe
    studio        the web studio: checked requests, signed results, the Gradio page
  7 cli           the `sora-jax` console script
"""

__version__ = "0.1.0"

# The layers above as data, lowest first: an entry names a subpackage or module
# (the longest entry that prefixes a module's dotted name below `sora_jax` wins).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("parallel",),
    ("diffusion", "models", "video_io"),
    ("data", "interop.tensors", "interop.wan", "interop.umt5", "interop.wan_vae",
     "interop.clip", "interop.load"),
    ("configs", "evaluation", "provenance"),
    ("train",),
    ("sample", "autoregressive", "plan", "interop", "interop.export", "interop.wan_import"),
    ("prompting", "demo", "studio"),
    ("cli",),
)
