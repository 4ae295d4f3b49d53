"""Stage 1: frozen teachers over every camera image, their targets into a feature store."""
