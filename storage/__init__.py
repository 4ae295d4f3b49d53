"""scalr storage: what persists (feature stores, manifests, checkpoints, run records)."""
