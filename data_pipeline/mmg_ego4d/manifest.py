"""The builder's inputs besides media: class list, per-split clip manifests, Ego4D metadata.

manual_dir layout (see README.md):
  classes.csv          name,kind  (kind base|novel; ids: base 0.. then novel, in file order)
  clips/<split>.csv    clip_uid,video_uid,start_sec,end_sec,label[,participant_id]
  videos/<video_uid>.mp4, imu/<video_uid>.csv, ego4d.json (optional)
"""
import csv
import dataclasses
import json
import pathlib

from data_pipeline import features
from data_pipeline.errors import DataError

LABELED_SPLITS = ('train', 'val', 'test', 'novel')
# Splits the evaluation reads: unlabeled clips must not share data with them.
EVALUATION_SPLITS = ('test', 'novel')
CLIP_COLUMNS = ('clip_uid', 'video_uid', 'start_sec', 'end_sec', 'label')


@dataclasses.dataclass(frozen=True)
class Clip:
  clip_uid: str
  video_uid: str
  start_s: float
  end_s: float
  label: int  # features.UNLABELED for the unlabeled split.
  split: str
  participant_id: str = ''

  def window(self, seconds):
    """(start, end) in seconds of the `seconds` long window centered on the clip."""
    center = (self.start_s + self.end_s) / 2
    return center - seconds / 2, center + seconds / 2


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What ego4d.json says of a video; None where it says nothing."""
  has_imu: bool | None = None
  has_audio: bool | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
  class_names: tuple[str, ...]  # Indexed by label id.
  num_base_classes: int
  clips: dict  # split -> list[Clip], only the splits that have a manifest file.
  videos: dict  # video_uid -> VideoInfo from ego4d.json (empty without it).


def read_classes(path, *, any_class_counts=False):
  """(names by id, number of base classes) from classes.csv: base ids first, then novel.

  Without `any_class_counts` the list must hold the paper's 65 base and 14 novel classes.
  """
  rows = _read_csv(path, ('name', 'kind'))
  names = [row['name'].strip() for row in rows]
  kinds = [row['kind'].strip().lower() for row in rows]
  unknown = sorted({kind for kind in kinds if kind not in ('base', 'novel')})
  if unknown:
    raise DataError(f'{path}: kind must be "base" or "novel", found {unknown}')
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise DataError(f'{path}: class names must be unique; repeated: {duplicates}')
  base = [name for name, kind in zip(names, kinds, strict=True) if kind == 'base']
  novel = [name for name, kind in zip(names, kinds, strict=True) if kind == 'novel']
  expected = (features.NUM_BASE_CLASSES, features.NUM_NOVEL_CLASSES)
  if not any_class_counts and (len(base), len(novel)) != expected:
    raise DataError(
        f'{path} lists {len(base)} base and {len(novel)} novel classes; MMG-Ego4D has '
        f'{expected[0]} and {expected[1]}. Fix the list, or build with --any_class_counts for '
        'your own taxonomy (then set config.model.num_classes to your base count).')
  if not base:
    raise DataError(f'{path} lists no base class')
  return tuple(base + novel), len(base)


def read_clips(path, split, class_ids, num_base_classes):
  """Clips of one split; labels checked against the split (base, novel or empty)."""
  clips = []
  for line, row in enumerate(_read_csv(path, CLIP_COLUMNS), start=2):
    where = f'{path}:{line}'
    name = row['label'].strip()
    if split == 'unlabeled':
      if name:
        raise DataError(f'{where}: unlabeled clips must have an empty label, found {name!r}')
      label = features.UNLABELED
    else:
      if name not in class_ids:
        raise DataError(f'{where}: label {name!r} is not in classes.csv')
      label = class_ids[name]
      if (split == 'novel') != (label >= num_base_classes):
        kind = 'novel' if split == 'novel' else 'base'
        raise DataError(f'{where}: split {split!r} takes {kind} classes only; {name!r} is not')
    try:
      start_s, end_s = float(row['start_sec']), float(row['end_sec'])
    except ValueError as e:
      raise DataError(f'{where}: start_sec and end_sec must be numbers ({e})') from e
    if not 0 <= start_s < end_s:
      raise DataError(f'{where}: need 0 <= start_sec < end_sec, got {start_s}, {end_s}')
    clips.append(Clip(clip_uid=row['clip_uid'].strip(), video_uid=row['video_uid'].strip(),
                      start_s=start_s, end_s=end_s, label=label, split=split,
                      participant_id=(row.get('participant_id') or '').strip()))
  return clips


def read_metadata(path):
  """video_uid -> VideoInfo from Ego4D's ego4d.json (`videos[*]`).

  has_imu is the video's `has_imu`; has_audio is False when `video_metadata.audio_duration_sec`
  is present but null or 0 (a video without audio), else unknown.
  """
  with open(path) as f:
    videos = json.load(f).get('videos', [])
  infos = {}
  for video in videos:
    has_imu = video.get('has_imu')
    has_audio = None
    metadata = video.get('video_metadata') or {}
    if 'audio_duration_sec' in metadata and not metadata['audio_duration_sec']:
      has_audio = False
    infos[video['video_uid']] = VideoInfo(
        has_imu=None if has_imu is None else bool(has_imu), has_audio=has_audio)
  return infos


def check_disjoint(clips_by_split):
  """Raises when a clip uid repeats, or a video feeds two labeled splits."""
  seen_clips, video_split = {}, {}
  for split, clips in clips_by_split.items():
    for clip in clips:
      if clip.clip_uid in seen_clips:
        raise DataError(f'clip_uid {clip.clip_uid!r} appears in {seen_clips[clip.clip_uid]!r} '
                        f'and {split!r}; clip uids must be unique')
      seen_clips[clip.clip_uid] = split
      if split not in LABELED_SPLITS:
        continue
      other = video_split.setdefault(clip.video_uid, split)
      if other != split:
        raise DataError(
            f'video {clip.video_uid!r} has clips in splits {other!r} and {split!r}; labeled '
            'splits must be disjoint by video: move all its clips to one split')


def overlapping_unlabeled(clips_by_split, window_seconds):
  """unlabeled clip_uid -> the test or novel clip_uid of the same video whose window overlaps.

  Windows are `window_seconds` long and centered on the clips, the data an example holds;
  windows that only touch do not overlap. Alignment pre-training on such a clip would see test
  data.
  """
  held_out = {}
  for split in EVALUATION_SPLITS:
    for clip in clips_by_split.get(split, ()):
      held_out.setdefault(clip.video_uid, []).append(clip)
  overlaps = {}
  for clip in clips_by_split.get('unlabeled', ()):
    start, end = clip.window(window_seconds)
    for other in held_out.get(clip.video_uid, ()):
      other_start, other_end = other.window(window_seconds)
      if start < other_end and other_start < end:
        overlaps[clip.clip_uid] = other.clip_uid
        break
  return overlaps


def shared_participants(clips_by_split):
  """participant_id -> labeled splits it appears in, for those in more than one."""
  splits = {}
  for split in LABELED_SPLITS:
    for clip in clips_by_split.get(split, ()):
      if clip.participant_id:
        splits.setdefault(clip.participant_id, set()).add(split)
  return {p: sorted(s) for p, s in sorted(splits.items()) if len(s) > 1}


def load(manual_dir, *, any_class_counts=False):
  """Reads and validates everything but the media of `manual_dir`."""
  root = pathlib.Path(manual_dir)
  if not (root / 'classes.csv').exists():
    raise DataError(f'{root / "classes.csv"} not found; see '
                    'data_pipeline/mmg_ego4d/README.md for the manual_dir layout')
  names, num_base = read_classes(root / 'classes.csv', any_class_counts=any_class_counts)
  class_ids = {name: i for i, name in enumerate(names)}
  clips = {split: read_clips(root / 'clips' / f'{split}.csv', split, class_ids, num_base)
           for split in features.SPLITS if (root / 'clips' / f'{split}.csv').exists()}
  if not clips:
    raise DataError(f'no clip manifest in {root / "clips"}; expected <split>.csv for '
                    f'splits {list(features.SPLITS)}')
  empty = [split for split, split_clips in clips.items() if not split_clips]
  if empty:
    raise DataError(
        f'{[str(root / "clips" / f"{split}.csv") for split in empty]} hold a header but no clip; '
        'add their clips, or delete the files to build without those splits.')
  check_disjoint(clips)
  metadata = root / 'ego4d.json'
  videos = read_metadata(metadata) if metadata.exists() else {}
  return Manifest(class_names=names, num_base_classes=num_base, clips=clips, videos=videos)


def _read_csv(path, required):
  with open(path, newline='', encoding='utf-8-sig') as f:  # -sig: spreadsheets write a BOM.
    reader = csv.DictReader(f, skipinitialspace=True)
    header = [name.strip() for name in reader.fieldnames or []]
    missing = [name for name in required if name not in header]
    if missing:
      raise DataError(f'{path} lacks columns {missing}; its header is {header}')
    reader.fieldnames = header
    return list(reader)
