"""Checkpoint interop: Wan 2.1 (diffusers) and UMT5 (transformers) import and export."""
