r"""Builds the MMG-Ego4D ArrayRecord dataset from raw Ego4D files.

  python -m data_pipeline.mmg_ego4d.build --manual_dir=/data/mmg_ego4d_raw \
      [--data_dir=~/tensorflow_datasets] [--config=paper|small] [--num_workers=N]

Prints a summary (clips written per split, modalities present, quarantined clips and why) and
writes build_report.json and quarantine.jsonl into the dataset directory. Input layout and
preprocessing: data_pipeline/mmg_ego4d/README.md.
"""
import json
import time

import tensorflow_datasets as tfds
from absl import app, flags

from data_pipeline.mmg_ego4d import mmg_ego4d_dataset_builder, report

_MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'Directory of the raw files.',
                                  required=True)
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir (default: the TFDS default).')
_CONFIG = flags.DEFINE_enum('config', 'paper', ['paper', 'small'], 'Builder config (sizes).')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', None,
                                    'Decoding processes (default: one per CPU; 0: none).')
_ANY_CLASS_COUNTS = flags.DEFINE_bool('any_class_counts', False,
                                      'Accept a class list other than 65 base + 14 novel.')


def main(argv):
  del argv
  builder = mmg_ego4d_dataset_builder.MmgEgo4d(
      config=_CONFIG.value, data_dir=_DATA_DIR.value, num_workers=_NUM_WORKERS.value,
      any_class_counts=_ANY_CLASS_COUNTS.value)
  if builder.is_prepared():
    stored = json.loads((builder.data_path / report.REPORT_FILE).read_text())
    print(f'Already built; delete {builder.data_path} to rebuild.')
    print(report.summary(stored, builder.data_path))
    return
  started = time.perf_counter()
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=_MANUAL_DIR.value))
  seconds = time.perf_counter() - started
  splits = builder.info.metadata['build_report']['splits']
  num_clips = sum(counts['written'] + counts['quarantined'] for counts in splits.values())
  print(f'{num_clips} clips in {seconds:.1f} s ({num_clips / seconds:.2f} clips/s) with '
        f'{builder.num_workers} decoding processes.')
  name = 'mmg_ego4d' if _CONFIG.value == 'paper' else f'mmg_ego4d/{_CONFIG.value}'
  print(f'Read it with config.dataset.name={name!r}, data_dir={str(builder.data_dir_root)!r}.')


if __name__ == '__main__':
  app.run(main)
