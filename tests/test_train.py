"""train.run_stage on a toy MLP: device-count invariance, accumulation, logs, skip, errors,
the stop on a non-finite step."""
import contextlib
import functools
import io
import json
import os
import re
import struct
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from tensorboardX.proto import event_pb2

from mmg_jax import sharding, train
from tests import tensorboard_runs, toy_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(workdir, name='toy'):
  with open(os.path.join(workdir, name, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _saved_states(workdir, name='toy'):
  """{step: train state as saved} of every checkpoint of a stage, read back by orbax alone."""
  directory = os.path.join(workdir, name, 'checkpoints')
  if not os.path.isdir(directory):
    return {}
  return {int(step): ocp.StandardCheckpointer().restore(os.path.join(directory, step, 'state'))
          for step in os.listdir(directory) if step.isdigit()}


def _assert_trees_close(a, b, **tolerance):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A finished 4-step toy stage on 8 devices, its console output, and its caller's params."""
  workdir = str(tmp_path_factory.mktemp('toy'))
  mesh = sharding.make_mesh()
  model = toy_task.ToyMLP()
  init = sharding.replicate(toy_task.init_params(model), mesh)
  init_copy = jax.tree.map(np.asarray, init)
  console = io.StringIO()
  with contextlib.redirect_stdout(console):
    params = train.run_stage(
        'toy', workdir=workdir, model=model, loss_fn=toy_task.make_loss_fn(model),
        init_params=init, loader=toy_task.make_loader(8),
        optimizer=toy_task.optimizer_config(), num_steps=4, mesh=mesh, seed=0, log_every=2,
        checkpoint_every=2)
  return {'workdir': workdir, 'params': params, 'console': console.getvalue(), 'init': init,
          'init_copy': init_copy}


def test_one_device_and_eight_devices_train_alike(finished_run, tmp_path):
  """Same loader, same seed: a mesh of 1 or 8 devices gives the same losses and params."""
  params_1 = toy_task.run(str(tmp_path), sharding.make_mesh(jax.devices()[:1]), num_steps=4,
                          log_every=2)
  losses_1 = [r['loss'] for r in _metrics(tmp_path)]
  losses_8 = [r['loss'] for r in _metrics(finished_run['workdir'])]
  assert len(losses_1) == 2
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  _assert_trees_close(finished_run['params'], params_1, rtol=1e-5, atol=1e-6)
  assert finished_run['params']['Dense_0']['kernel'].sharding.is_fully_replicated


def _step_on(accumulate_steps, state, batch, mesh, tx, config):
  step = jax.jit(functools.partial(
      train.train_step, loss_fn=toy_task.make_loss_fn(toy_task.ToyMLP(dropout=0.0)),
      optimizer=tx, schedule=train.learning_rate_schedule(config, 10),
      accumulate_steps=accumulate_steps, mesh=mesh))
  return step(state, batch, jax.random.PRNGKey(0))


def test_gradient_accumulation_matches_the_full_batch():
  """A mean loss over 2 micro-batches of 8 has the gradient and metrics of one batch of 16."""
  mesh = sharding.make_mesh()
  config = toy_task.optimizer_config()
  tx = train.make_optimizer(config, 10)
  params = sharding.replicate(toy_task.init_params(toy_task.ToyMLP()), mesh)
  batch = sharding.shard_batch(next(iter(toy_task.make_loader(16))), mesh)
  full = _step_on(1, train.init_state(params, tx), batch, mesh, tx, config)
  accumulated = _step_on(2, train.init_state(params, tx), batch, mesh, tx, config)
  _assert_trees_close(accumulated, full, rtol=1e-5, atol=1e-7)


def test_learning_rate_schedule_warms_up_linearly_then_decays_by_cosine():
  config = toy_task.optimizer_config(learning_rate=0.1, warmup_steps=4)
  schedule = train.learning_rate_schedule(config, 20)
  expected = [0.1 * s / 4 for s in range(4)]
  expected += [0.05 * (1 + np.cos(np.pi * (s - 4) / 16)) for s in range(4, 21)]
  np.testing.assert_allclose([float(schedule(s)) for s in range(21)], expected, atol=1e-7)
  config.schedule = 'constant'
  schedule = train.learning_rate_schedule(config, 20)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 4, 19)], [0, 0.05, 0.1, 0.1])


def test_weight_decay_shrinks_matrices_only():
  """With zero gradients AdamW moves params only by decay: kernels shrink, biases stay."""
  config = toy_task.optimizer_config(learning_rate=0.1, warmup_steps=0, schedule='constant',
                                     weight_decay=0.5, grad_clip_norm=0.0)
  optimizer = train.make_optimizer(config, 10)
  params = {'kernel': np.ones((2, 2), np.float32), 'bias': np.ones(2, np.float32)}
  updates, _ = jax.jit(optimizer.update)(jax.tree.map(np.zeros_like, params),
                                         optimizer.init(params), params)
  np.testing.assert_allclose(updates['kernel'], -0.1 * 0.5 * params['kernel'])
  np.testing.assert_array_equal(updates['bias'], 0.0)


def _numpy_adamw(config, num_steps, params, grads_seq, b1=0.9, b2=0.999, eps=1e-8):
  """AdamW by hand in NumPy (Loshchilov & Hutter, as optax computes it): the updates of each
  step of `grads_seq`, after clipping the global norm of the trainable gradients, with decay on
  matrices only and no update of params outside `trainable`."""
  schedule = train.learning_rate_schedule(config, num_steps)
  trained = set(config.trainable or params)
  flat = {(k, name): np.asarray(v, np.float64) for k in params for name, v in params[k].items()}
  mu = {key: np.zeros_like(v) for key, v in flat.items() if key[0] in trained}
  nu = {key: np.zeros_like(v) for key, v in mu.items()}
  all_updates = []
  for t, grads in enumerate(grads_seq):
    g = {key: np.asarray(grads[key[0]][key[1]], np.float64) for key in mu}
    norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
    if config.grad_clip_norm and norm >= config.grad_clip_norm:
      g = {key: x * config.grad_clip_norm / norm for key, x in g.items()}
    lr = float(schedule(t))
    updates = {}
    for key, p in flat.items():
      if key not in mu:
        updates[key] = np.zeros_like(p)
        continue
      mu[key] = b1 * mu[key] + (1 - b1) * g[key]
      nu[key] = b2 * nu[key] + (1 - b2) * g[key] ** 2
      step = (mu[key] / (1 - b1 ** (t + 1))) / (np.sqrt(nu[key] / (1 - b2 ** (t + 1))) + eps)
      if p.ndim > 1:
        step = step + config.weight_decay * p
      updates[key] = -lr * step
    # The params are float32, as the optimizer's caller keeps them.
    flat = {key: (p + updates[key]).astype(np.float32).astype(np.float64)
            for key, p in flat.items()}
    all_updates.append(updates)
  return all_updates, mu, nu


def _random_tree(rng, scale=1.0):
  """Leaves of ndim 0 to 3 in three top-level groups."""
  shapes = {'encoder': {'kernel': (3, 4), 'bias': (4,), 'scale': ()},
            'fusion': {'conv': (2, 3, 2), 'gain': ()},
            'head': {'kernel': (4, 5), 'bias': (5,), 'token': (1, 1, 4)}}
  return jax.tree.map(lambda shape: (scale * rng.normal(size=shape)).astype(np.float32),
                      shapes, is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize('trainable', [None, ('fusion', 'head')])
@pytest.mark.parametrize('grad_clip_norm', [1.0, 0.0])
def test_make_optimizer_is_adamw_by_hand(trainable, grad_clip_norm):
  """Over warmup and cosine steps, gradients above and below the clipping norm: the updates of
  a NumPy AdamW in float64 (to float32 rounding: 1 - 0.999**t alone is off by 6e-5 relative
  in float32 at t = 1); frozen params get exact zeros and no moments; the moments are per
  param leaf, shaped like their params."""
  config = toy_task.optimizer_config(learning_rate=0.1, warmup_steps=2, weight_decay=0.3,
                                     grad_clip_norm=grad_clip_norm, trainable=trainable)
  optimizer = train.make_optimizer(config, 8)
  rng = np.random.default_rng(0)
  params = _random_tree(rng)
  grads_seq = [_random_tree(rng, scale) for scale in (0.01, 3.0, 0.1, 10.0, 0.5, 2.0)]
  expected, mu, nu = _numpy_adamw(config, 8, params, grads_seq)
  state = optimizer.init(params)
  for grads, wanted in zip(grads_seq, expected, strict=True):
    updates, state = jax.jit(optimizer.update)(grads, state, params)
    for (k, name), value in wanted.items():
      np.testing.assert_allclose(updates[k][name], value, rtol=1e-4, atol=1e-6,
                                 err_msg=f'{k}/{name}')
    params = jax.tree.map(np.asarray, optax.apply_updates(params, updates))
  for moments, reference in (('mu', mu), ('nu', nu)):
    found = optax.tree.get_all_with_path(state, moments)
    assert len(found) == 1, f'one {moments} in the state, found {len(found)}'
    tree = found[0][1]
    leaves = {tuple(key.key for key in path): v  # frozen groups are empty MaskedNodes
              for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert sorted(leaves) == sorted(reference)
    for key, value in reference.items():
      np.testing.assert_allclose(leaves[key], value, rtol=1e-4, atol=1e-12, err_msg=str(key))


@pytest.mark.parametrize('name,kwargs,weight_decay', [
    ('lion', {'b1': 0.95}, 0.1), ('adafactor', {}, 0.0), ('sgd', {'momentum': 0.9}, 0.0)])
def test_any_optax_optimizer_by_name(name, kwargs, weight_decay):
  """optimizer.name picks an optax optimizer and optimizer.kwargs its arguments: the same
  updates as optax's own, clipped and on the schedule."""
  config = toy_task.optimizer_config(name=name, kwargs=kwargs, weight_decay=weight_decay,
                                     learning_rate=0.1, warmup_steps=2)
  optimizer = train.make_optimizer(config, 8)
  extra = {'weight_decay': weight_decay, 'mask': lambda p: jax.tree.map(lambda x: x.ndim > 1, p)}
  reference = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), getattr(optax, name)(
      train.learning_rate_schedule(config, 8), **kwargs, **(extra if weight_decay else {})))
  rng = np.random.default_rng(1)
  params = _random_tree(rng)
  state, reference_state = optimizer.init(params), reference.init(params)
  for scale in (0.1, 5.0, 1.0):
    grads = _random_tree(rng, scale)
    updates, state = jax.jit(optimizer.update)(grads, state, params)
    wanted, reference_state = jax.jit(reference.update)(grads, reference_state, params)
    _assert_trees_close(updates, wanted, rtol=1e-6, atol=1e-9)
    params = jax.tree.map(np.asarray, optax.apply_updates(params, updates))


@pytest.mark.parametrize('updates,match', [
    ({'name': 'adamx'}, r"optimizer.name='adamx' is not an optax optimizer"),
    ({'name': 'sgd', 'weight_decay': 0.1}, r'optax.sgd takes no weight_decay; set '
                                           r'optimizer.weight_decay=0'),
    ({'kwargs': {'beta1': 0.9}}, r"optimizer.kwargs \['beta1'\] are not arguments of "
                                 r'optax.adamw \(its arguments: learning_rate, b1, b2')])
def test_a_bad_optimizer_config_is_an_error_naming_the_field(updates, match):
  with pytest.raises(ValueError, match=match):
    train.make_optimizer(toy_task.optimizer_config(**updates), 8)


def test_an_eagerly_made_optimizer_state_can_be_donated():
  """init outside jit (as the bench does) gives each moment its own buffer: a step that donates
  the state would otherwise fail with 'donate the same buffer twice'."""
  optimizer = train.make_optimizer(toy_task.optimizer_config(), 8)
  state = optimizer.init(_random_tree(np.random.default_rng(0)))
  state = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)(state)
  for leaf in jax.tree.leaves(optax.tree.get(state, 'mu')):
    np.testing.assert_array_equal(leaf, 1.0)


def test_params_outside_trainable_stay_bit_identical_while_the_rest_train(tmp_path):
  """Frozen params get neither gradient steps nor weight decay; the others still train."""
  mesh = sharding.make_mesh()
  init = toy_task.init_params(toy_task.ToyMLP())
  params = toy_task.run(str(tmp_path), mesh, num_steps=4,
                        optimizer=toy_task.optimizer_config(trainable=('Dense_1',)))
  for name in ('kernel', 'bias'):
    np.testing.assert_array_equal(params['Dense_0'][name], init['Dense_0'][name])
    assert not np.allclose(params['Dense_1'][name], init['Dense_1'][name])


def test_an_unknown_trainable_param_is_an_error(tmp_path):
  with pytest.raises(ValueError, match=r"names \['encoder'\].*'Dense_0', 'Dense_1'"):
    toy_task.run(str(tmp_path), sharding.make_mesh(), num_steps=2,
                 optimizer=toy_task.optimizer_config(trainable=('Dense_1', 'encoder')))


def _read_events(path):
  """Scalar (tag, step, value) records of a TensorBoard event file."""
  scalars = []
  with open(path, 'rb') as f:
    while header := f.read(12):
      (length,) = struct.unpack('<Q', header[:8])
      event = event_pb2.Event.FromString(f.read(length))
      f.read(4)
      scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return scalars


def test_logs_hold_every_metric_per_log_step(finished_run):
  stage_dir = os.path.join(finished_run['workdir'], 'toy')
  records = _metrics(finished_run['workdir'])
  assert [r['step'] for r in records] == [2, 4]
  keys = {'step', 'loss', 'accuracy', 'lr', 'grad_norm', 'examples_per_sec'}
  assert all(set(r) == keys for r in records)
  assert all(0 <= r['accuracy'] <= 1 and r['examples_per_sec'] > 0 for r in records)
  [events] = [f for f in os.listdir(stage_dir) if f.startswith('events.out.tfevents')]
  scalars = _read_events(os.path.join(stage_dir, events))
  assert {(tag, step) for tag, step, _ in scalars} == {
      (k, r['step']) for r in records for k in keys - {'step'}}
  logged = {(tag, step): value for tag, step, value in scalars}
  for r in records:
    assert logged['loss', r['step']] == pytest.approx(r['loss'], rel=1e-6)
  assert '[toy] step 4/4 (100%)' in finished_run['console']
  assert 'ETA 0:00:00' in finished_run['console']


def test_the_stages_of_a_pipeline_continue_one_tensorboard_step_axis(tmp_path):
  """Stages 1 and 2 of pipeline 'p', toy stages of 4 steps: in the pipeline's run the second
  continues the first from step 5, and what an earlier attempt at the second left there (step 7)
  is hidden. The console lines name the pipeline and the stage, with the run's ETA."""
  run_dir = tmp_path / 'tensorboard' / 'p'
  mesh, console = sharding.make_mesh(), io.StringIO()
  with contextlib.redirect_stdout(console):
    for i, name in enumerate(('a', 'b')):
      if name == 'b':
        train.write_events(str(run_dir), 7, scalars={'loss': -1.0})
      context = train.StageContext(f'p 1/1 | {name} {i + 1}/2', step_offset=4 * i,
                                   event_dirs=(str(run_dir),), later_steps=4 - 4 * i)
      toy_task.run(str(tmp_path), mesh, num_steps=4, log_every=2, checkpoint_every=4, name=name,
                   context=context)
  scalars, _ = tensorboard_runs.read(run_dir)
  logged = [(4 * i + r['step'], r['loss']) for i, name in enumerate('ab')
            for r in _metrics(str(tmp_path), name)]
  assert [step for step, _ in scalars['loss']] == [step for step, _ in logged] == [2, 4, 6, 8]
  assert [v for _, v in scalars['loss']] == pytest.approx([v for _, v in logged], rel=1e-6)
  assert not list((tmp_path / 'a').glob('events.out.tfevents.*'))  # in the pipeline's run only
  out = console.getvalue()
  assert '[p 1/1 | a 1/2] step 2/4 (50%)' in out and '[p 1/1 | b 2/2] step 4/4 (100%)' in out
  assert re.search(r'^\[p 1/1 \| a 1/2\] step 4/4 .* \| ETA stage 0:00:00, run ~\d+:\d\d:\d\d$',
                   out, re.M)


def test_importing_train_imports_no_torch_and_leaves_torch_importable():
  """tensorboardX's writer imports torch wherever it is installed (2.3 s a process); the event
  files above are written without it, and a user's own `import torch` still works."""
  pytest.importorskip('torch', reason='only an installed torch could be imported')
  code = ('import sys; from mmg_jax import train; print("torch" in sys.modules); '
          'import torch; print(torch.zeros(2).sum().item())')
  run = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split() == ['False', '0.0']


def test_the_run_eta_takes_the_later_stages_at_the_current_rate():
  assert train.eta_text(10, None, 2.0) == 'ETA 0:00:05'
  assert train.eta_text(10, 7190, 2.0) == 'ETA stage 0:00:05, run ~1:00:00'
  assert train.eta_text(10, 7190, 0.0) == 'ETA after the next log'  # no step timed yet


def test_a_resumed_stage_keeps_one_metrics_record_per_step(tmp_path):
  """Records past the checkpoint (logged again on resume) and a line cut by a kill go."""
  lines = [json.dumps({'step': step, 'loss': 1.0}) + '\n' for step in (1, 2, 3)]
  (tmp_path / 'metrics.jsonl').write_text(''.join(lines) + '{"step": 4, "lo')
  train.StageLog(str(tmp_path), train.StageContext('toy'), start_step=2, num_steps=4).close()
  assert (tmp_path / 'metrics.jsonl').read_text() == ''.join(lines[:2])


class _NeverRead:
  def __iter__(self):
    raise AssertionError('a finished stage must not read data')


def test_a_finished_stage_is_skipped_and_returns_its_params(finished_run):
  records = _metrics(finished_run['workdir'])
  model = toy_task.ToyMLP()
  again = train.run_stage(
      'toy', workdir=finished_run['workdir'], model=model, loss_fn=toy_task.make_loss_fn(model),
      init_params=toy_task.init_params(model, seed=1), loader=_NeverRead(),
      optimizer=toy_task.optimizer_config(), num_steps=4, mesh=sharding.make_mesh(), seed=0)
  _assert_trees_close(again, finished_run['params'], rtol=0, atol=0)
  assert _metrics(finished_run['workdir']) == records


def test_the_callers_params_survive_the_donated_train_state(finished_run):
  _assert_trees_close(finished_run['init'], finished_run['init_copy'], rtol=0, atol=0)


def test_zero_steps_is_an_error(tmp_path):
  with pytest.raises(ValueError, match='num_steps=0 must be at least 1'):
    toy_task.run(str(tmp_path), sharding.make_mesh(), num_steps=0)


def test_a_batch_that_does_not_split_into_micro_batches_is_an_error(tmp_path):
  with pytest.raises(ValueError, match='8 devices x 3 accumulation steps = 24'):
    toy_task.run(str(tmp_path), sharding.make_mesh(), num_steps=2, global_batch_size=16,
                 optimizer=toy_task.optimizer_config(accumulate_steps=3))


def test_a_checkpoint_of_another_model_asks_for_a_fresh_workdir(finished_run):
  with pytest.raises(ValueError, match='use a fresh --workdir'):
    toy_task.run(finished_run['workdir'], sharding.make_mesh(), num_steps=4, hidden=8)


def _run_main_probe(tmp_path, *flags, env=None):
  """mmg_jax.main with a stand-in pipeline (tests/main_probe.py); returns the process."""
  config_file = tmp_path / 'experiment.py'
  config_file.write_text('import ml_collections\n\n\ndef get_config(arg=None):\n'
                         "  return ml_collections.ConfigDict({'size': arg or 'small', "
                         "'seed': 0})\n")
  # Run from tmp_path, so that the default workdir (and main's lock file in it) lands there.
  return subprocess.run(
      [sys.executable, '-m', 'tests.main_probe', f'--config={config_file}:tiny', *flags],
      cwd=tmp_path, env=(env or os.environ) | {'PYTHONPATH': REPO}, capture_output=True,
      text=True, timeout=120)


def test_main_hands_the_overridden_config_and_default_workdir_to_the_pipeline(tmp_path):
  process = _run_main_probe(tmp_path, '--config.seed=3')
  assert process.returncode == 0, process.stderr[-3000:]
  report = json.loads(process.stdout.strip().splitlines()[-1])
  assert report['config'] == {'size': 'tiny', 'seed': 3}
  assert report['workdir'] == os.path.join('runs', 'experiment_tiny')
  assert report['process_count'] == 1 and report['train_missing']
  assert (tmp_path / 'runs' / 'experiment_tiny' / 'run.lock').is_file()


@pytest.mark.parametrize('flag,environ,expected', [
    (None, None, os.path.join('runs', 'experiment_tiny', 'compilation_cache')),
    (None, '/elsewhere', '/elsewhere'),
    ('--compilation_cache=/mine', '/elsewhere', '/mine'),
    ('--compilation_cache=none', '/elsewhere', None)])
def test_main_sets_the_compilation_cache_before_anything_compiles(tmp_path, flag, environ,
                                                                   expected):
  """The workdir's cache by default, $JAX_COMPILATION_CACHE_DIR when set, the flag over both;
  'none' leaves jax without one."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  if environ:
    env['JAX_COMPILATION_CACHE_DIR'] = environ
  process = _run_main_probe(tmp_path, *([flag] if flag else []), env=env)
  assert process.returncode == 0, process.stderr[-3000:]
  assert json.loads(process.stdout.strip().splitlines()[-1])['compilation_cache'] == expected


def test_main_names_the_missing_distributed_flags(tmp_path):
  process = _run_main_probe(tmp_path, '--num_processes=2')
  assert process.returncode != 0
  assert "missing: ['coordinator_address', 'process_id']" in process.stderr


@pytest.mark.parametrize('sync_every_step,reads', [(True, 8), (False, 3)],
                         ids=['cpu', 'accelerator'])
def test_off_the_cpu_the_finite_flags_are_read_at_log_and_save_steps_only(
    tmp_path, monkeypatch, sync_every_step, reads):
  """On the CPU backend the loop waits for every step (its finite flag); on an accelerator only
  at the first step and the log and save steps (4 and 8), with every step's flag checked."""
  monkeypatch.setattr(train, '_syncs_every_step', lambda: sync_every_step)
  checked = []
  check = train._check_finite

  def counting_check(name, steps, **kwargs):
    checked.append([step for step, _ in steps])
    return check(name, steps, **kwargs)
  monkeypatch.setattr(train, '_check_finite', counting_check)
  toy_task.run(str(tmp_path), sharding.make_mesh(), num_steps=8, checkpoint_every=4,
               log_every=4)
  assert len(checked) == reads
  assert sorted(step for steps in checked for step in steps) == list(range(1, 9))


def test_a_nan_learning_rate_stops_the_stage_at_its_first_step(tmp_path):
  """The first step's lr is NaN (its loss, from the init params, is still finite): the stage
  stops there, before the checkpoint and the log of that step."""
  with pytest.raises(train.NonFinite) as raised:
    toy_task.run(str(tmp_path), sharding.make_mesh(), num_steps=4, checkpoint_every=1,
                 log_every=1, optimizer=toy_task.optimizer_config(learning_rate=float('nan')))
  message = str(raised.value)
  assert message.startswith("stage 'toy' stopped at step 1: lr not finite (")
  for part in ('loss', 'accuracy', 'grad_norm'):
    assert re.search(rf'\b{part} \d', message), part
  assert 'lr nan' in message and 'no checkpoint was saved' in message
  assert 'Lower the learning rate (optimizer.learning_rate=nan)' in message
  assert 'check the data' in message
  assert isinstance(raised.value, train.StageStopped)
  assert _saved_states(tmp_path) == {}
  assert not os.path.exists(os.path.join(tmp_path, 'toy', 'metrics.jsonl'))


@pytest.mark.parametrize('sync_every_step', [True, False], ids=['cpu', 'accelerator'])
def test_data_that_turns_nan_stops_the_stage_and_keeps_the_last_finite_checkpoint(
    tmp_path, monkeypatch, sync_every_step):
  """Step 5's batch is NaN: the stage stops before it saves or logs step 6, and checkpoint 4,
  the last finite one, stays the latest; also when the loop reads the finite flags only at
  log and save steps, as off the CPU."""
  monkeypatch.setattr(train, '_syncs_every_step', lambda: sync_every_step)
  source = toy_task.PoisonedSource(toy_task.examples(), nan_read=4 * 8 + 1)
  with pytest.raises(train.NonFinite) as raised:
    toy_task.run(str(tmp_path), sharding.make_mesh(), num_steps=8, global_batch_size=8,
                 source=source, checkpoint_every=2, log_every=2, keep=3)
  message = str(raised.value)
  assert message.startswith("stage 'toy' stopped at step 5: grad_norm, loss not finite (")
  assert 'loss nan' in message and re.search(r'\blr \d', message)
  assert 'the last checkpoint (step 4) holds finite params and is kept' in message
  saved = _saved_states(tmp_path)
  assert sorted(saved) == [2, 4]
  for state in saved.values():
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))
  assert [r['step'] for r in _metrics(tmp_path)] == [2, 4]
