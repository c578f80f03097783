"""The embedded MMG dataset: `import data_pipeline.synthetic` registers the TFDS builder
`mmg_synthetic` (configs `small`, the default, and `tiny`)."""
from data_pipeline.synthetic import mmg_synthetic  # noqa: F401 (registers the builder)
