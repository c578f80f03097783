"""The paper's scenario with a trained model: classes taught from some modalities, recognized
from others, on the few-shot split of the run's dataset.

  python -m mmg_jax.personalize --workdir=W --enroll_modalities=audio,imu \\
      --query_modalities=video --shots=5

  python -m mmg_jax.personalize --workdir=W --enroll_modalities=audio,imu \
      --query_modalities=video --enroll_dir=D --query_dir=Q

Each of the run's fixed few-shot episodes (config.eval.fewshot, with --shots support clips a
class) enrolls its support clips, embedded from the enroll modalities, into a fresh prototype
bank (mmg_jax.prototypes) and recognizes its query clips, embedded from the query modalities.
Printed: the mean accuracy over the episodes with its 95% interval, which with the run's own
shots is the few-shot table's row of the same support and query modalities (the same episodes,
clips and prototypes; a test holds the two equal).

With --enroll_dir and --query_dir it runs on your own recordings instead (`recordings`: one
subfolder per class, or for queries the clips themselves), enrolls every clip of D and prints
each query's prediction and score. Decoding raw files needs a model trained on decoded clips
(mmg_ego4d; mmg_jax.api.load_clips).
"""
import jax
import numpy as np
from absl import app, flags, logging
from etils import epath

from data_pipeline import modalities
from mmg_jax import api, errors, evaluate, prototypes, sharding

# A clip of one's own recordings is the files that share a stem, by suffix.
VIDEO_SUFFIXES = ('.mp4', '.mov', '.mkv', '.webm', '.avi')
AUDIO_SUFFIXES = ('.wav', '.flac', '.mp3', '.m4a')
IMU_SUFFIX = '.csv'


def recordings(directory):
  """[(class name or None, clip name, api.RawClip)] of a folder of recordings, sorted.

  Layout: D/<class>/<clip>.mp4 (video, with its audio track), D/<class>/<clip>.wav (audio,
  which replaces the track), D/<class>/<clip>.csv (IMU, api.RawClip's columns); the files that
  share a stem are one whole clip, any of them may be missing. Clips directly in D have no
  class. Hidden files and folders ('.DS_Store') are skipped. Other files, folders in a class
  folder and two files of one modality for a clip are errors, so that no recording is silently
  left out.
  """
  root = epath.Path(directory)
  if not root.is_dir():
    raise errors.UserError(f'{directory} is not a directory of recordings.')
  groups, unknown = {}, []
  for path in sorted(root.glob('*/*')) + sorted(root.glob('*')):
    if any(part.startswith('.') for part in path.relative_to(root).parts):
      continue
    label = path.parent.name if path.parent != root else None
    if path.is_dir() and label is None:
      continue
    suffix = path.suffix.lower()
    key = (None if path.is_dir() else 'video' if suffix in VIDEO_SUFFIXES
           else 'audio' if suffix in AUDIO_SUFFIXES else 'imu' if suffix == IMU_SUFFIX else None)
    if key is None:
      unknown.append(str(path))
      continue
    files = groups.setdefault((label, path.stem), {})
    if key in files:
      raise errors.UserError(f'{files[key]} and {path} are both the {key} of clip {path.stem!r}; '
                             'keep one, or give the other a name of its own.')
    files[key] = str(path)
  if unknown or not groups:
    raise errors.UserError(
        f'{directory}: ' + (f'{unknown[:5]} are neither video ({VIDEO_SUFFIXES}), audio '
                            f'({AUDIO_SUFFIXES}) nor IMU ({IMU_SUFFIX}) files; move them out'
                            if unknown else 'holds no recording') +
        '. Lay clips out as <class>/<clip>.mp4, <clip>.wav, <clip>.csv.')
  return [(label, stem, api.RawClip(**files)) for (label, stem), files in groups.items()]


def own_recordings(model, enroll, query, enroll_dir, query_dir):
  """[(clip name, its class or None, predicted class, score)] of the clips of `query_dir`
  after enrolling every clip of `enroll_dir` (`recordings`) in the model's bank. Both folders
  are read and checked before the model runs."""
  enrolled, queries = recordings(enroll_dir), recordings(query_dir)
  unlabeled = [name for label, name, _ in enrolled if label is None]
  if unlabeled:
    raise errors.UserError(f'{enroll_dir}: clips {unlabeled[:5]} lie in no class folder; '
                           'enrollment needs each clip in a folder named for its class.')
  support = _clip_batch(model, enrolled, enroll, enroll_dir)
  batch = _clip_batch(model, queries, query, query_dir)
  model.enroll(support, [label for label, _, _ in enrolled], enroll)
  predicted, scores = model.recognize(batch, query)
  return [(name, label, str(p), float(s.max()))
          for (label, name, _), p, s in zip(queries, predicted, scores, strict=True)]


def _clip_batch(model, clips, subset, directory):
  """model.load_clips of `recordings`' clips; a clip without any modality of `subset` is an
  error naming its files' class and stem (load_clips's batch would name only its index)."""
  subset = api.check_modalities(subset)
  batch = model.load_clips([clip for _, _, clip in clips])
  held = batch['present'] & modalities.mask(subset)
  empty = ['/'.join(filter(None, (label, name)))
           for (label, name, _), any_held in zip(clips, held.any(axis=1), strict=True)
           if not any_held]
  if empty:
    raise errors.UserError(f'{directory}: clips {empty[:5]} hold none of {list(subset)} (no such '
                           'file, or no data in it); add those files, or choose modalities the '
                           'clips hold.')
  return batch


def fewshot_row(model, enroll, query, *, shots=None):
  """{'enroll', 'query', 'split', 'n_way', 'k_shot', 'mean', 'ci95', 'n'}: the accuracy (%) of
  enrolling and recognizing on the run's fixed few-shot episodes, with `shots` support clips a
  class (None: the run's), over the episodes the evaluation scores (evaluate.fewshot_row: every
  class has a support clip with an enroll modality, some query a query modality)."""
  enroll, query = api.check_modalities(enroll), api.check_modalities(query)
  config = model.config
  fewshot = config.eval.fewshot.copy_and_resolve_references()
  fewshot.k_shot = fewshot.k_shot if shots is None else shots
  split = config.eval.fewshot_split
  outputs, labels = evaluate.predict_split(
      model.forward, model.params, config.dataset, split, [enroll, query],
      batch_size=config.eval.batch_size, mesh=sharding.make_mesh(jax.devices()[:1]))
  support_idx, query_idx = (np.asarray(x) for x in evaluate.sample_eval_episodes(labels, fewshot))
  embeddings = {s: np.asarray(evaluate.prototype_embedding(outputs[s]['fused']))
                for s in (enroll, query)}
  valid = {s: np.any(outputs[s]['present'], axis=-1) for s in (enroll, query)}
  scored = evaluate.scorable_episodes(support_idx, query_idx, valid[enroll], valid[query])
  if not np.any(scored):
    raise errors.UserError(f'no episode of split {split!r} has a clip with {list(enroll)} for '
                           f'every class and a query with {list(query)}; choose modalities '
                           'its clips hold.')
  accuracies = []
  for support, queries in zip(support_idx[scored], query_idx[scored], strict=True):
    bank = prototypes.PrototypeBank(model.fingerprint, model.model.config.embed_dim)
    support = support.reshape(-1)[valid[enroll][support.reshape(-1)]]
    bank.add(embeddings[enroll][support], labels[support].tolist())
    queries = queries.reshape(-1)[valid[query][queries.reshape(-1)]]
    predicted, _ = bank.recognize(embeddings[query][queries])
    accuracies.append(np.mean(predicted == labels[queries]))
  mean, ci95 = evaluate.mean_ci95(accuracies)
  return {'enroll': enroll, 'query': query, 'split': split, 'n_way': fewshot.n_way,
          'k_shot': fewshot.k_shot, 'mean': 100 * mean, 'ci95': [100 * x for x in ci95],
          'n': len(accuracies)}


def define_flags():
  """The command's flags, defined when it runs (as mmg_jax/tools do): importing the module, as
  the tests do beside mmg_jax.main, defines none."""
  flags.DEFINE_string('workdir', None, 'the workdir of a trained, evaluated run')
  flags.DEFINE_string('pipeline', None,
                      "the run's pipeline (default: its one pipeline that trains a fused model)")
  flags.DEFINE_list('enroll_modalities', None, 'modalities the classes are taught from')
  flags.DEFINE_list('query_modalities', None, 'modalities the queries are recognized from')
  flags.DEFINE_integer('shots', None,
                       "clips enrolled per class (default: the run's few-shot k_shot)")
  flags.DEFINE_string('enroll_dir', None,
                      'your recordings to enroll: one subfolder per class (`recordings`)')
  flags.DEFINE_string('query_dir', None,
                      'your recordings to recognize: clips, or one subfolder per class')
  flags.mark_flags_as_required(['workdir', 'enroll_modalities', 'query_modalities'])


def main(argv):
  values = flags.FLAGS
  if not values['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # as mmg_jax.main: TFDS's INFO lines drown the result
  enroll, query = values.enroll_modalities, values.query_modalities
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if (values.enroll_dir is None) != (values.query_dir is None):
    raise app.UsageError('--enroll_dir and --query_dir go together.')
  try:
    model = api.Model.from_workdir(values.workdir, values.pipeline)
    if values.enroll_dir is not None:
      for name, label, predicted, score in own_recordings(model, enroll, query,
                                                          values.enroll_dir, values.query_dir):
        print(f'{name}: {predicted} (score {score:.2f})' + (f', class {label}' if label else ''))
      return
    row = fewshot_row(model, enroll, query, shots=values.shots)
  except errors.USER_ERRORS as e:
    raise SystemExit(f'error: {e}') from e
  low, high = row['ci95']
  print(f'{row["n_way"]}-way {row["k_shot"]}-shot on {row["split"]!r}, enrolled from '
        f'{modalities.short_name(row["enroll"])}, recognized from '
        f'{modalities.short_name(row["query"])}: {row["mean"]:.2f}% (95% interval {low:.2f}-'
        f'{high:.2f}) over {row["n"]} episodes')


if __name__ == '__main__':
  define_flags()
  app.run(main)
