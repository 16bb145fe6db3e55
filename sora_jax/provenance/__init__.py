"""Provenance of generated media: signed C2PA manifests (`credentials`, `manifest`)."""
