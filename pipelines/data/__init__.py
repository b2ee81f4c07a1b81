"""The `mova data` stage: the synthetic data set, converters from public formats and validation
(the manifest reader itself is shared: :mod:`pipelines.common.manifests`)."""
