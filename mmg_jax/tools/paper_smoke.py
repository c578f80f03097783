r"""The paper-size smoke run: every stage and every evaluation of the `paper` configs, on CPU.

  python -m mmg_jax.tools.paper_smoke --workdir=runs/paper_smoke      # or ./run.sh paper-smoke

Runs four parts in order, each as the documented command in a child process (W = --workdir):
  media     python -m data_pipeline.mmg_ego4d.sample_media --manual_dir=W/raw
  build     python -m data_pipeline.mmg_ego4d.build --manual_dir=W/raw --data_dir=W/tfds
                --config=paper
  fewshot   python -m mmg_jax.main --config=configs/fewshot.py:paper_smoke --workdir=W/fewshot
                --config.dataset.data_dir=W/tfds
  manyshot  the same with configs/manyshot.py:paper_smoke and W/manyshot
so the models, input shapes (16x224x224 video, 384x128 audio, 1000x6 IMU), dataset and stages
are the paper's, with 2 steps a stage, batches of 2 and tiny episodes (configs/common.py,
`smoke_schedule`). Each part's output streams through (the two results tables at the end of
theirs). Then prints, and writes to W/measurements.json, each part's wall time, CPU time and
peak resident memory (of its largest process, from os.wait4), and the whole run's. A re-run
resumes (finished stages are restored, a built dataset is kept): measure in a fresh workdir.
Measured on 2 CPU cores (docs/benchmarks.md): 29 min, peak 11.7 GiB; checkpoints (params and
AdamW state) take 14 GB of disk.
"""
import json
import os
import subprocess
import sys
import time

from absl import app, flags

PARTS = ('media', 'build', 'fewshot', 'manyshot')
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string('workdir', 'runs/paper_smoke', 'where every part writes')
_PARTS = flags.DEFINE_list('parts', list(PARTS), f'the parts to run, in order, among {PARTS}')


def commands(workdir):
  """part -> the argv of its command."""
  raw, data_dir = os.path.join(workdir, 'raw'), os.path.join(workdir, 'tfds')

  def main(name):
    return ['-m', 'mmg_jax.main', f'--config=configs/{name}.py:paper_smoke',
            f'--workdir={os.path.join(workdir, name)}', f'--config.dataset.data_dir={data_dir}']

  argvs = {
      'media': ['-m', 'data_pipeline.mmg_ego4d.sample_media', f'--manual_dir={raw}'],
      'build': ['-m', 'data_pipeline.mmg_ego4d.build', f'--manual_dir={raw}',
                f'--data_dir={data_dir}', '--config=paper'],
      'fewshot': main('fewshot'),
      'manyshot': main('manyshot'),
  }
  return {part: [sys.executable, *argv] for part, argv in argvs.items()}


def measure(argv):
  """Runs argv from the repository root to its end.

  Returns (exit status, wall s, CPU s, peak RSS in bytes of its largest process).

  os.wait4 gives the child's own resource use, its waited-for descendants included (the
  builder's decoding processes), whatever ran before it in this process. Call it from a small
  process (this command's is): until it execs, a child forked from a large one counts its
  parent's pages in its peak.
  """
  started = time.perf_counter()
  process = subprocess.Popen(argv, cwd=REPO)
  _, status, usage = os.wait4(process.pid, 0)
  process.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - started
  return process.returncode, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def table(rows):
  """Markdown table of measurement rows."""
  lines = ['| part | wall | CPU | peak RSS |', '|---|---|---|---|']
  for row in rows:
    lines.append(f"| {row['part']} | {_minutes(row['wall_s'])} | {_minutes(row['cpu_s'])} | "
                 f"{row['peak_rss_bytes'] / 2**30:.2f} GiB |")
  return '\n'.join(lines)


def _minutes(seconds):
  return f'{int(seconds // 60)} min {seconds % 60:04.1f} s'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  unknown = sorted(set(_PARTS.value) - set(PARTS))
  if unknown:
    raise app.UsageError(f'--parts {unknown} are not among {PARTS}')
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  argvs = commands(workdir)
  rows = []
  for part in (p for p in PARTS if p in _PARTS.value):
    print(f'[paper_smoke] {part}: {" ".join(argvs[part][1:])}', flush=True)
    status, wall, cpu, peak = measure(argvs[part])
    rows.append({'part': part, 'wall_s': wall, 'cpu_s': cpu, 'peak_rss_bytes': peak})
    print(f'[paper_smoke] {part} done in {_minutes(wall)} (exit status {status}).', flush=True)
    if status:
      raise SystemExit(f'part {part!r} failed (exit status {status}); its output is above.')
  rows.append({'part': 'all', 'wall_s': sum(r['wall_s'] for r in rows),
               'cpu_s': sum(r['cpu_s'] for r in rows),
               'peak_rss_bytes': max(r['peak_rss_bytes'] for r in rows)})
  with open(os.path.join(workdir, 'measurements.json'), 'w') as f:
    json.dump({'cpu_count': os.cpu_count(), 'parts': rows}, f, indent=2)
    f.write('\n')
  print(table(rows), flush=True)


if __name__ == '__main__':
  app.run(main)
