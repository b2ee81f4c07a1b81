"""Data: manifests (LLaVA-style records), validation, converters and the synthetic data set."""
