"""MMG-Ego4D from raw Ego4D files: the TFDS builder `mmg_ego4d` (see README.md here).

`import data_pipeline.mmg_ego4d.mmg_ego4d_dataset_builder` registers the builder with TFDS. This
package file imports nothing, so that decoding workers start without TFDS.
"""
