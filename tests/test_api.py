"""mmg_jax.api: a trained run's model used outside the pipeline, on the pipeline's own numbers.

On the session's tiny few-shot run (conftest.py's `fewshot_tiny_run`, trained as `python -m
mmg_jax.main` trains it); raw-file loading is checked against a tiny mmg_ego4d build of media
generated at test time, and the command's folder mode on an untrained model of that build.
"""
import dataclasses
import functools
import json
import pathlib
import subprocess
import sys

import av
import grain
import jax
import numpy as np
import pytest

from configs import fewshot
from data_pipeline import features, loaders, preprocess
from data_pipeline.synthetic import clips as synthetic_clips
from mmg_jax import (
  api,
  checkpoint,
  errors,
  evaluate,
  experiment,
  inference_info,
  personalize,
  pipeline,
  prototypes,
  results,
  run_store,
  sharding,
  train,
)
from mmg_jax.models import mmg
from tests import cli, media

CONFIG, FLAGS = 'configs/fewshot.py:tiny', ('--config.eval.fewshot.num_episodes=10',)
ALL = ('video', 'audio', 'imu')


def _config():
  """The run's config, as FLAGS override it."""
  config = fewshot.get_config('tiny')
  config.eval.fewshot.num_episodes = 10
  return config


@pytest.fixture(scope='module')
def run(fewshot_tiny_run):
  """conftest.py's tiny few-shot run (CONFIG and FLAGS), trained once for the session."""
  assert (fewshot_tiny_run.config, fewshot_tiny_run.flags) == (CONFIG, FLAGS)
  return pathlib.Path(fewshot_tiny_run.workdir)


@pytest.fixture(scope='module')
def model(run):
  return api.Model.from_workdir(run)


@pytest.fixture(scope='module')
def novel():
  """The novel split's data source and labels."""
  source = loaders.data_source(_config().dataset, 'novel')
  return source, loaders.split_labels(source)


def _batch(source, indices):
  """The dataset's own batch of examples `indices` (with its label and mask keys)."""
  return loaders.stack([loaders.to_model_example(source[int(i)]) for i in indices])


def _fresh_bank(model):
  model.prototypes = prototypes.PrototypeBank(model.fingerprint, model.model.config.embed_dim)


def _prototype_space(x):
  """evaluate.prototype_embedding, in NumPy: x / |x|."""
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(logits):
  logits = np.asarray(logits, np.float64)
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# The model and its inputs


def test_the_run_saves_what_inference_needs(run):
  info = json.loads((run / inference_info.INFERENCE_FILE).read_text())
  media_features = loaders.data_source(_config().dataset, 'train').dataset_info.features
  assert info['input_shapes'] == {m: list(media_features[m].shape) for m in ALL}
  assert info['input_dtypes'] == {m: np.dtype(media_features[m].np_dtype).name for m in ALL}
  assert info['imu_mean'] == list(synthetic_clips.IMU_MEAN)
  assert info['imu_std'] == list(synthetic_clips.IMU_STD)
  assert info['clip_spec'] is None and len(info['class_names']) == features.NUM_CLASSES
  assert info['num_base_classes'] == features.NUM_BASE_CLASSES


def test_embed_and_classify_equal_the_pipelines_own_forward(run, model, novel):
  """The evaluated params, restored without the dataset, give what the pipeline computes."""
  config, mesh = _config(), sharding.make_mesh()
  trained, params = pipeline.train_pipeline(config, 'train_VAI', str(run), mesh,
                                            run_store.stage_directories(config),
                                            train_missing=False)
  subsets = [ALL, ('audio', 'imu'), ('video',)]
  outputs, _ = evaluate.predict_split(evaluate.make_forward(trained), params, config.dataset,
                                      'novel', subsets, batch_size=config.eval.batch_size,
                                      mesh=mesh)
  indices = [0, 1, 17, 40, 99]
  batch = _batch(novel[0], indices)
  for subset in subsets:
    np.testing.assert_allclose(model.embed(batch, subset), outputs[subset]['fused'][indices],
                               rtol=1e-5, atol=1e-5)
    labels, probabilities = model.classify(batch, subset)
    logits = outputs[subset]['logits'][indices]
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probabilities, _softmax(logits), atol=1e-6)
    np.testing.assert_array_equal(labels, np.argmax(logits, axis=-1))
  assert probabilities.shape == (len(indices), len(model.class_names))
  (row, *_) = results.read(run)['rows']
  assert model.checkpoint == row['checkpoint'] and model.pipeline == 'train_VAI'


def test_absent_modalities_have_no_influence(model, novel):
  """Inputs of modalities left out may hold anything; a clip marked absent in 'present' embeds
  as without that modality."""
  batch = _batch(novel[0], [3, 5, 8])
  rng = np.random.default_rng(0)
  garbage = dict(batch, audio=rng.normal(size=batch['audio'].shape).astype(np.float32) * 50,
                 imu=rng.normal(size=batch['imu'].shape).astype(np.float32) * 50)
  np.testing.assert_array_equal(model.embed(garbage, 'video'), model.embed(batch, 'video'))
  present = batch['present'].copy()
  present[:, 1] = False
  np.testing.assert_allclose(model.embed(dict(batch, present=present), ('video', 'audio')),
                             model.embed(batch, ('video',)), atol=1e-6)


def test_the_fingerprint_is_the_models(run, model):
  """The same run loads with the same fingerprint; other params give another."""
  assert api.Model.from_workdir(run).fingerprint == model.fingerprint
  assert _other_model(model).fingerprint != model.fingerprint


def _other_model(model):
  params = jax.tree.map(lambda x: x * 1.01, model.params)
  return api.Model(model.model, params, model.info, config=model.config,
                   pipeline=model.pipeline, checkpoint=model.checkpoint)


# ------------------------------------------------------------------------------------------------
# Personalization


def test_enroll_recognize_save_load_round_trip(model, novel, tmp_path):
  """Prototypes are running means in the evaluation's space; scores are the softmax of -|q-p|^2
  (NumPy); a saved bank recognizes as the bank it was."""
  source, labels = novel
  classes = np.unique(labels)[:3]
  support = [np.flatnonzero(labels == c)[:3] for c in classes]
  queries = np.concatenate([np.flatnonzero(labels == c)[3:6] for c in classes])
  names = ['wave', 'clap', 'knock']
  _fresh_bank(model)
  first = np.concatenate([s[:2] for s in support])
  model.enroll(_batch(source, first), np.repeat(names, 2), ('audio', 'imu'))
  model.enroll(_batch(source, [support[0][2]]), ['wave'], ('audio', 'imu'))
  assert model.prototypes.labels == names
  np.testing.assert_array_equal(model.prototypes.counts, [3, 2, 2])
  embedded = _prototype_space(model.embed(_batch(source, np.concatenate(support)),
                                          ('audio', 'imu')))
  want = np.stack([embedded[0:3].mean(0), embedded[3:5].mean(0), embedded[6:8].mean(0)])
  np.testing.assert_allclose(model.prototypes.prototypes, want, atol=1e-6)

  query_batch = _batch(source, queries)
  predicted, scores = model.recognize(query_batch, ('video',))
  q = _prototype_space(model.embed(query_batch, ('video',)))
  want_scores = _softmax(-np.sum((q[:, None] - want[None]) ** 2, axis=-1))
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)
  np.testing.assert_allclose(scores.sum(axis=-1), 1.0, atol=1e-6)
  assert predicted.tolist() == [names[i] for i in np.argmax(want_scores, axis=-1)]

  model.prototypes.save(tmp_path / 'bank.npz')
  _fresh_bank(model)
  model.load_prototypes(tmp_path / 'bank.npz')
  again, again_scores = model.recognize(query_batch, ('video',))
  assert again.tolist() == predicted.tolist()
  np.testing.assert_array_equal(again_scores, scores)
  assert (tmp_path / 'bank.npz').stat().st_size < 10_000


def test_a_bank_of_another_model_is_refused(model, novel, tmp_path):
  _fresh_bank(model)
  model.enroll(_batch(novel[0], [0, 1]), [1, 2], ALL)
  model.prototypes.save(tmp_path / 'bank.npz')
  with pytest.raises(errors.UserError, match='another model'):
    _other_model(model).load_prototypes(tmp_path / 'bank.npz')
  (tmp_path / 'notes.npz').write_text('not a bank')
  with pytest.raises(errors.UserError, match='is not a prototype bank'):
    model.load_prototypes(tmp_path / 'notes.npz')


def test_personalize_gives_the_fewshot_tables_rows(run, model):
  """Enrolling and recognizing on the run's episodes is the table's row of those modalities."""
  doc = results.read(run)
  for enroll, query in [(('audio', 'imu'), ('video',)), (ALL, ALL), (('video',), ('imu',))]:
    (row,) = [r for r in doc['rows'] if (tuple(r['train']), tuple(r['test'])) == (enroll, query)]
    got = personalize.fewshot_row(model, enroll, query)
    assert got['n'] == row['n'] and got['k_shot'] == row['k_shot']
    assert got['mean'] == pytest.approx(row['mean'], abs=1e-4)
    assert got['ci95'] == pytest.approx(row['ci95'], abs=1e-4)
  (row,) = [r for r in doc['rows'] if (tuple(r['train']), tuple(r['test'])) == (
      ('audio', 'imu'), ('video',))]
  command = [sys.executable, '-m', 'mmg_jax.personalize', f'--workdir={run}',
             '--enroll_modalities=audio,imu', '--query_modalities=video', '--shots=5']
  done = subprocess.run(command, cwd=cli.ROOT, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f'{row["mean"]:.2f}%' in done.stdout and f'over {row["n"]} episodes' in done.stdout


def test_own_recordings_are_files_sharing_a_stem_in_class_folders(model, tmp_path):
  for name in ('wave/a.mp4', 'wave/a.csv', 'wave/b.wav', 'clap/c.MOV', 'd.mp4'):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(b'')
  got = personalize.recordings(tmp_path)
  assert got == [
      ('clap', 'c', api.RawClip(video=str(tmp_path / 'clap' / 'c.MOV'))),
      ('wave', 'a', api.RawClip(video=str(tmp_path / 'wave' / 'a.mp4'),
                                imu=str(tmp_path / 'wave' / 'a.csv'))),
      ('wave', 'b', api.RawClip(audio=str(tmp_path / 'wave' / 'b.wav'))),
      (None, 'd', api.RawClip(video=str(tmp_path / 'd.mp4')))]
  with pytest.raises(errors.UserError, match='lie in no class folder'):
    personalize.own_recordings(model, ALL, ALL, tmp_path, tmp_path)
  (tmp_path / 'd.mp4').unlink()
  with pytest.raises(errors.UserError, match='rendered'):  # the synthetic model takes no files
    personalize.own_recordings(model, ALL, ALL, tmp_path, tmp_path)
  (tmp_path / 'wave' / 'notes.txt').write_text('')
  with pytest.raises(errors.UserError, match='notes.txt.*neither video'):
    personalize.recordings(tmp_path)


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize('change, modalities, message', [
    (lambda b: b, ('depth',), 'modalities'),
    (lambda b: {'video': b['video']}, ('audio',), r"hold no \['audio'\]"),
    (lambda b: dict(b, depth=b['video']), ALL, r"keys \['depth'\]"),
    (lambda b: dict(b, video=b['video'][:, :, :8]), ALL, 'uint8 \\[B, 4, 16, 16, 3\\]'),
    (lambda b: dict(b, video=b['video'] / 255.0), ALL, 'frames in 0..255'),
    (lambda b: dict(b, audio=np.full_like(b['audio'], np.nan)), ALL, 'non-finite'),
    (lambda b: dict(b, imu=b['imu'][:1]), ALL, 'same number of clips'),
    (lambda b: {m: b[m][:0] for m in ALL}, ALL, 'at least one'),
    (lambda b: dict(b, present=np.zeros_like(b['present'])), ALL, r'clips \[0, 1\] hold none'),
    (lambda b: dict(b, present=b['present'][:, :2]), ALL, r"inputs\['present'\]"),
    (lambda b: [b['video']], ALL, 'must be a dict'),
])
def test_bad_inputs_are_clear_errors(model, novel, change, modalities, message):
  with pytest.raises(errors.UserError, match=message):
    model.embed(change(_batch(novel[0], [0, 1])), modalities)


def test_bad_enrollments_and_queries_are_clear_errors(run, model, novel):
  batch = _batch(novel[0], [0, 1])
  _fresh_bank(model)
  with pytest.raises(errors.UserError, match='no class is enrolled'):
    model.recognize(batch, ALL)
  with pytest.raises(errors.UserError, match='1 labels for 2 examples'):
    model.enroll(batch, ['wave'], ALL)
  with pytest.raises(errors.UserError, match='at least one'):
    model.enroll({m: batch[m][:0] for m in ALL}, [], ALL)
  model.enroll(batch, ['wave', 'clap'], ALL)
  with pytest.raises(errors.UserError, match='all strings or all integers'):
    model.enroll(batch, [3, 4], ALL)
  with pytest.raises(errors.UserError, match='rendered'):
    model.load_clips([api.RawClip(video='any.mp4')])
  with pytest.raises(errors.UserError, match='holds no config.json'):
    api.Model.from_workdir(run / 'train_VAI')
  with pytest.raises(errors.UserError, match=r"no pipeline 'nope'; name one: \['train_VAI'\]"):
    api.Model.from_workdir(run, 'nope')


# ------------------------------------------------------------------------------------------------
# Raw files


SMALL = preprocess.CLIP_SPECS['small']


def _write_minimal_imu_csv(path, t_ms):
  """The documented minimal IMU columns, values as media.write_imu_csv writes them."""
  values = media.imu_signal(t_ms)  # accl xyz, gyro xyz
  lines = ['timestamp_ms,accl_x,accl_y,accl_z,gyro_x,gyro_y,gyro_z']
  lines += [','.join([f'{t:.3f}', *(f'{x:.6f}' for x in v)])
            for t, v in zip(t_ms, values, strict=True)]
  path.write_text('\n'.join(lines) + '\n')


def _write_wav(path, samples, rate=16000):
  """A float32 PCM wav: decoded back sample for sample."""
  with av.open(str(path), 'w', format='wav') as container:
    stream = container.add_stream('pcm_f32le', rate=rate, layout='mono')
    for start in range(0, len(samples), 1024):
      frame = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format='flt',
                                         layout='mono')
      frame.sample_rate, frame.pts = rate, start
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


@pytest.fixture(scope='module')
def ego4d_build(tmp_path_factory):
  """(manual_dir, the built builder) of a `small` mmg_ego4d build of three train clips: AAC at
  16 kHz with an Ego4D IMU CSV, 44.1 kHz stereo with a minimal IMU CSV, a mute video without
  IMU."""
  import tensorflow_datasets as tfds

  from data_pipeline.mmg_ego4d import mmg_ego4d_dataset_builder, sample_media

  root = tmp_path_factory.mktemp('manual')
  (root / 'videos').mkdir(), (root / 'imu').mkdir(), (root / 'clips').mkdir()
  base, novel = sample_media.class_names()
  (root / 'classes.csv').write_text('name,kind\n' + ''.join(
      [f'{n},base\n' for n in base] + [f'{n},novel\n' for n in novel]))
  media.write_video(root / 'videos' / 'va.mp4', seconds=4, audio_rate=16000)
  media.write_video(root / 'videos' / 'vb.mp4', seconds=4, audio_rate=44100,
                    audio_layout='stereo', content_offset_s=1.3)
  media.write_video(root / 'videos' / 'vc.mp4', seconds=4)
  media.write_imu_csv(root / 'imu' / 'va.csv', np.arange(0, 4000, 5.0))
  _write_minimal_imu_csv(root / 'imu' / 'vb.csv', np.arange(0, 4000, 5.0))
  (root / 'clips' / 'train.csv').write_text(
      'clip_uid,video_uid,start_sec,end_sec,label\n'
      'a1,va,0.5,3.5,base_00\nb1,vb,0.2,3.9,base_01\nc1,vc,0,4,base_02\n')
  builder = mmg_ego4d_dataset_builder.MmgEgo4d(
      config='small', data_dir=tmp_path_factory.mktemp('tfds'), num_workers=0)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  return root, builder


def test_load_clips_equals_the_datasets_examples_of_the_same_files(ego4d_build):
  root, builder = ego4d_build
  info = inference_info.build(builder.info)
  assert info['clip_spec'] == dataclasses.asdict(SMALL)
  assert info['imu_mean'] == builder.info.metadata['imu_mean']
  raw = [api.RawClip(video=root / 'videos' / 'va.mp4', imu=root / 'imu' / 'va.csv',
                     start_s=0.5, end_s=3.5),
         api.RawClip(video=root / 'videos' / 'vb.mp4', imu=root / 'imu' / 'vb.csv',
                     start_s=0.2, end_s=3.9),
         api.RawClip(video=str(root / 'videos' / 'vc.mp4'))]
  batch = api.load_clips(raw, info)
  examples = {ex['clip_id'].decode(): ex for ex in builder.as_data_source(split='train')}
  for i, clip_id in enumerate(('a1', 'b1', 'c1')):
    for key in (*ALL, 'present'):
      np.testing.assert_array_equal(batch[key][i], examples[clip_id][key], err_msg=clip_id)
  assert batch['present'].tolist() == [[True] * 3, [True] * 3, [True, False, False]]


def test_a_separate_wav_is_the_clips_audio(ego4d_build, tmp_path):
  """A mute video plus a float wav: the audio is the wav's window, through the AST features."""
  root, builder = ego4d_build
  info = inference_info.build(builder.info)
  samples = media.tone(np.arange(4 * 16000) / 16000).astype(np.float32)
  _write_wav(tmp_path / 'tone.wav', samples)
  batch = api.load_clips([api.RawClip(video=root / 'videos' / 'vc.mp4',
                                      audio=tmp_path / 'tone.wav', start_s=0.0, end_s=4.0),
                          api.RawClip(audio=tmp_path / 'tone.wav')],  # ends with the wav
                         info)
  t = round((2.0 - SMALL.num_audio_samples / 16000 / 2) * 16000) + np.arange(
      SMALL.num_audio_samples)  # the window's sample indices, centered on the clip
  inside = (t >= 0) & (t < len(samples))
  window = np.zeros(SMALL.num_audio_samples, np.float32)
  window[inside] = samples[t[inside]]
  want = preprocess.audio_features(window, SMALL)
  for i in range(2):
    np.testing.assert_allclose(batch['audio'][i], want, atol=1e-4)
  assert batch['present'].tolist() == [[True, True, False], [False, True, False]]


def test_raw_file_mistakes_are_clear_errors(ego4d_build, tmp_path):
  root, builder = ego4d_build
  info = inference_info.build(builder.info)
  media.write_garbage(tmp_path / 'garbage.mp4')
  _write_minimal_imu_csv(tmp_path / 'header.csv', [])
  for clips, message in [
      ([api.RawClip(video=tmp_path / 'none.mp4')], 'do not exist'),
      ([api.RawClip()], 'give at least one'),
      ([api.RawClip(imu=tmp_path / 'header.csv')], 'give its end_s'),
      ([api.RawClip(video=tmp_path / 'garbage.mp4')], 'cannot read its video'),
      ([api.RawClip(video=root / 'videos' / 'va.mp4', start_s=30, end_s=34)],
       'starts after the end of the video'),
      ([], 'no clip')]:
    with pytest.raises(errors.UserError, match=message):
      api.load_clips(clips, info)
  changed = json.loads(json.dumps(info))
  changed['constants']['AUDIO_SAMPLE_RATE'] = 8000
  with pytest.raises(errors.UserError, match='AUDIO_SAMPLE_RATE'):
    api.load_clips([api.RawClip(video=root / 'videos' / 'va.mp4')], changed)


# ------------------------------------------------------------------------------------------------
# Your own recordings


@pytest.fixture(scope='module')
def ego4d_run(ego4d_build, tmp_path_factory):
  """The workdir of a run on the `small` mmg_ego4d build as from_workdir reads it: the few-shot
  config at `small` size on that dataset, its config.json and inference.json as a run writes
  them, and random params of the model's shapes as its last stage's final checkpoint. Untrained:
  the folder mode's plumbing needs the real shapes and decoding, not accuracy, and drawing the
  params saves the 7 s compile of the model's init (2026-12-07)."""
  root, builder = ego4d_build
  config = fewshot.get_config('small')
  config.dataset.update(name=f'mmg_ego4d/{builder.builder_config.name}',
                        data_dir=str(builder.data_dir_root), manual_dir=str(root))
  ((name, pipeline_config),) = config.pipelines.items()
  stages = experiment.ordered_stages(pipeline_config)
  stages[-1].validation.select_best = False  # its final step is the evaluated one
  workdir = tmp_path_factory.mktemp('ego4d_run')
  run_store.write_config(config, workdir)
  inference_info.write(config, workdir)
  model = mmg.MMGModel(config=experiment.model_config(config, pipeline_config))
  shapes = jax.eval_shape(functools.partial(experiment.init_params, model,
                                            experiment.example_batch(config.dataset), config.seed))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(x.dtype), shapes)
  state = train.init_state(params, train.make_optimizer(stages[-1].optimizer,
                                                        stages[-1].num_steps))
  stage_dir = run_store.stage_directories(config)[name, len(stages) - 1]
  with checkpoint.Checkpointer(workdir / stage_dir / 'checkpoints', keep=None) as saver:
    saver.save(stages[-1].num_steps, state.replace(step=jax.numpy.int32(stages[-1].num_steps)),
               iter(grain.MapDataset.range(1).to_iter_dataset()))
  return workdir


def _own_recordings(ego4d_build, directory):
  """(enroll folder, query folder) of generated media, in the documented layout: enrolled
  wave/a (video, its 16 kHz track, Ego4D IMU), wave/b (a wav), clap/c (video, 44.1 kHz stereo
  track, minimal IMU); queries wave/q1 and clap/q2 (mute) in class folders, q3 in none; hidden
  files, which are skipped, beside them."""
  root, _ = ego4d_build
  enroll, query = directory / 'enroll', directory / 'query'
  for folder in (enroll / 'wave', enroll / 'clap', query / 'wave', query / 'clap'):
    folder.mkdir(parents=True)
  for source, target in [('videos/va.mp4', enroll / 'wave' / 'a.mp4'),
                         ('imu/va.csv', enroll / 'wave' / 'a.csv'),
                         ('videos/vb.mp4', enroll / 'clap' / 'c.mp4'),
                         ('imu/vb.csv', enroll / 'clap' / 'c.csv'),
                         ('videos/vc.mp4', query / 'clap' / 'q2.mp4')]:
    target.write_bytes((root / source).read_bytes())
  _write_wav(enroll / 'wave' / 'b.wav',
             media.tone(np.arange(3 * 16000) / 16000 + 1.4).astype(np.float32))
  media.write_video(query / 'wave' / 'q1.mp4', seconds=3, audio_rate=16000, content_offset_s=0.7)
  media.write_video(query / 'q3.mp4', seconds=3, content_offset_s=2.1)
  for hidden in (enroll / '.DS_Store', query / 'wave' / '._q1.mp4'):
    hidden.write_bytes(b'\0')
  return enroll, query


def test_own_recordings_are_enrolled_and_recognized_as_the_api_does(ego4d_run, ego4d_build,
                                                                      tmp_path):
  """The folder mode, in process and as the command, gives every query what load_clips, enroll
  and recognize give on the same files, with the class of its folder."""
  enroll, query = _own_recordings(ego4d_build, tmp_path)
  model = api.Model.from_workdir(ego4d_run)
  model.enroll(model.load_clips([
      api.RawClip(video=enroll / 'clap' / 'c.mp4', imu=enroll / 'clap' / 'c.csv'),
      api.RawClip(video=enroll / 'wave' / 'a.mp4', imu=enroll / 'wave' / 'a.csv'),
      api.RawClip(audio=enroll / 'wave' / 'b.wav')]), ['clap', 'wave', 'wave'], ('audio', 'imu'))
  assert model.prototypes.labels == ['clap', 'wave']
  np.testing.assert_array_equal(model.prototypes.counts, [1, 2])
  predicted, scores = model.recognize(model.load_clips([
      api.RawClip(video=query / 'clap' / 'q2.mp4'), api.RawClip(video=query / 'wave' / 'q1.mp4'),
      api.RawClip(video=query / 'q3.mp4')]), 'video')
  want = [(name, label, str(p), float(s.max())) for name, label, p, s
          in zip(('q2', 'q1', 'q3'), ('clap', 'wave', None), predicted, scores, strict=True)]

  _fresh_bank(model)
  assert personalize.own_recordings(model, ['audio', 'imu'], ['video'], enroll, query) == want
  command = [sys.executable, '-m', 'mmg_jax.personalize', f'--workdir={ego4d_run}',
             '--enroll_modalities=audio,imu', '--query_modalities=video',
             f'--enroll_dir={enroll}', f'--query_dir={query}']
  done = subprocess.run(command, cwd=cli.ROOT, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.splitlines()[-len(want):] == [
      f'{name}: {p} (score {s:.2f})' + (f', class {label}' if label else '')
      for name, label, p, s in want]


def test_own_recordings_mistakes_are_clear_errors(ego4d_run, ego4d_build, tmp_path):
  """Before the model runs: an empty folder, unlabeled enroll clips, a clip without the
  modalities it is enrolled or recognized from, two files of one modality for a clip, a folder
  in a class folder."""
  enroll, query = _own_recordings(ego4d_build, tmp_path)
  model = api.Model.from_workdir(ego4d_run)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(errors.UserError, match='empty: holds no recording'):
    personalize.own_recordings(model, ['audio'], ['video'], enroll, tmp_path / 'empty')
  with pytest.raises(errors.UserError, match=r"clips \['q3'\] lie in no class folder"):
    personalize.own_recordings(model, ['audio'], ['video'], query, query)
  with pytest.raises(errors.UserError, match=r"query: clips \['clap/q2', 'q3'\] hold none of "
                                             r"\['audio'\]"):
    personalize.own_recordings(model, ['audio'], ['audio'], enroll, query)
  with pytest.raises(errors.UserError, match=r"enroll: clips \['wave/b'\] hold none of "
                                             r"\['video', 'imu'\]"):
    personalize.own_recordings(model, ['video', 'imu'], ['video'], enroll, query)
  (enroll / 'wave' / 'b.flac').write_bytes(b'')
  with pytest.raises(errors.UserError, match=r"b.flac and .*b.wav are both the audio of clip 'b'"):
    personalize.recordings(enroll)
  (enroll / 'wave' / 'b.flac').unlink()
  (enroll / 'wave' / 'more').mkdir()
  with pytest.raises(errors.UserError, match=r'wave/more.*neither video'):
    personalize.recordings(enroll)
