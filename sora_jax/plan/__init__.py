"""Ahead-of-time plans for TPU slices: compile a config's programs for a named topology on
any machine (libtpu's compiler, no TPU) and report per-chip memory, collectives and FLOPs
(`sora-jax plan`; docs/guides/tpu-and-scaling.md)."""
