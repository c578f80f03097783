"""What a build did: clips written per split, modalities present, quarantine, IMU normalization.

Written into the dataset directory as `build_report.json` and `quarantine.jsonl` (one line per
skipped clip: clip_uid, split, video_uid, modality, reason), and printed as a summary. Notes
that name a file (an IMU CSV without data) list their files, and the unlabeled clips left out
for overlapping test or novel clips are listed with the clip each overlaps.
"""
import collections
import json

from data_pipeline import modalities

REPORT_FILE = 'build_report.json'
QUARANTINE_FILE = 'quarantine.jsonl'


class BuildReport:
  """Accumulates clip outcomes during a build."""

  def __init__(self, *, config, imu_mean, imu_std, imu_samples, shared_participants,
               unlabeled_overlaps):
    """unlabeled_overlaps: unlabeled clip_uid -> the test or novel clip_uid it overlaps."""
    self.config = config
    self.imu_normalization = {'mean': list(map(float, imu_mean)),
                              'std': list(map(float, imu_std)),
                              'train_samples': int(imu_samples)}
    self.shared_participants = shared_participants
    self.unlabeled_overlaps = unlabeled_overlaps
    self.splits = {}
    self.quarantine = []
    self.noted_files = collections.defaultdict(set)

  def add(self, split, outcome):
    counts = self.splits.setdefault(split, {
        'written': 0, 'present': dict.fromkeys(modalities.MODALITIES, 0), 'quarantined': 0,
        'notes': collections.Counter()})
    clip = outcome.clip
    if outcome.example is None:
      counts['quarantined'] += 1
      modality, reason = outcome.quarantine
      self.quarantine.append({'clip_uid': clip.clip_uid, 'split': split,
                              'video_uid': clip.video_uid, 'modality': modality,
                              'reason': reason})
      return
    counts['written'] += 1
    for name, present in zip(modalities.MODALITIES, outcome.example['present'], strict=True):
      counts['present'][name] += int(present)
    for key, note in outcome.notes.items():
      counts['notes'][f'{key}: {_generic(note)}'] += 1
      self.noted_files[f'{key}: {_generic(note)}'].update(_paths(note))

  def to_json(self):
    splits = {split: {**counts, 'notes': dict(counts['notes'])}
              for split, counts in self.splits.items()}
    reasons = collections.Counter(f'{q["modality"]}: {_generic(q["reason"])}'
                                  for q in self.quarantine)
    noted_files = {note: sorted(paths) for note, paths in sorted(self.noted_files.items())
                   if paths}
    return {'config': self.config, 'splits': splits, 'imu_normalization': self.imu_normalization,
            'quarantine_reasons': dict(reasons), 'noted_files': noted_files,
            'unlabeled_overlaps': {'count': len(self.unlabeled_overlaps),
                                   'clips': self.unlabeled_overlaps},
            'shared_participants': self.shared_participants}

  def write(self, directory):
    (directory / REPORT_FILE).write_text(json.dumps(self.to_json(), indent=1))
    with (directory / QUARANTINE_FILE).open('w') as f:
      for entry in self.quarantine:
        f.write(json.dumps(entry) + '\n')


def _generic(reason):
  """A reason without its file paths and numbers, so that equal causes count together."""
  words = [word for word in reason.split() if '/' not in word]
  return ' '.join('#' if any(c.isdigit() for c in word) else word for word in words)[:120]


def _paths(note):
  """The file paths a note names."""
  return [word.strip(',;:()') for word in note.split() if '/' in word]


def summary(report_json, directory):
  """Human-readable summary of a build_report.json dict."""
  lines = [f'MMG-Ego4D build ({report_json["config"]}) in {directory}']
  for split, counts in report_json['splits'].items():
    present = ', '.join(f'{m} {n}' for m, n in counts['present'].items())
    lines.append(f'  {split:10s} {counts["written"]:6d} clips written ({present} present), '
                 f'{counts["quarantined"]} quarantined')
    lines += [f'      {n:6d} x {note}' for note, n in sorted(counts['notes'].items())]
  norm = report_json['imu_normalization']
  lines.append(f'  IMU standardized per channel (accl xyz, gyro xyz) with statistics of '
               f'{norm["train_samples"]} train grid samples: mean {_fmt(norm["mean"])}, '
               f'std {_fmt(norm["std"])}')
  reasons = report_json['quarantine_reasons']
  lines.append(f'  quarantined: {sum(reasons.values())} clips, listed in '
               f'{directory / QUARANTINE_FILE}')
  lines += [f'      {n:6d} x {reason}' for reason, n in sorted(reasons.items())]
  for note, paths in report_json['noted_files'].items():
    lines.append(f'  warning: {len(paths)} files: {note}: {", ".join(paths[:5])}')
  overlaps = report_json['unlabeled_overlaps']
  if overlaps['count']:
    lines.append(f'  excluded from unlabeled: {overlaps["count"]} clips whose windows overlap '
                 f'test or novel clips of their video (listed in {directory / REPORT_FILE})')
  shared = report_json['shared_participants']
  if shared:
    lines.append(f'  warning: {len(shared)} participants appear in several labeled splits '
                 f'(splits should be disjoint by participant): {dict(list(shared.items())[:5])}')
  return '\n'.join(lines)


def _fmt(values):
  return '[' + ', '.join(f'{v:.4g}' for v in values) + ']'
