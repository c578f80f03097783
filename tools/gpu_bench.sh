#!/usr/bin/env bash
# mmg_jax/tools/bench.py on one NVIDIA GPU (an H100 is the reference) at paper size, in at most
# 8 minutes: the encoders' fwd+bwd beside PyTorch's on the same GPU (bfloat16 autocast), the full
# train step's clips/s and MFU, MViT in the CPU layer forms beside the native ones, and few-shot
# evaluation. Writes $OUT/bench_gpu.json after each part (a timeout keeps what was measured) and
# the log $OUT/bench_gpu.log.
#
#   bash tools/gpu_bench.sh wheels            # once, where PyPI answers: what the image lacks
#   OUT=dir bash tools/gpu_bench.sh           # on the GPU machine, with .whl/ beside this folder
#   OUT=dir SIZE=tiny WHEELS= bash tools/gpu_bench.sh --kernels=native  # seconds on a CPU
#
# The GPU image has jax with CUDA, flax, optax, orbax, torch, torchvision and transformers, and
# no network. bench imports model_stats and so pipeline and loaders: ml_collections,
# tensorflow_datasets, grain and tensorboardX too. Those, at requirements.txt's pins, and what
# they import that the image lacks travel as wheels for its Python (3.12) in .whl/, installed
# with --no-deps into /tmp/site, so nothing the image holds changes (without them: an ImportError
# of ml_collections, tensorflow_datasets, grain or tensorboardX).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Pinned in requirements.txt; then their imports the image lacks, at the versions checked with
# them (promise has no wheel on PyPI: built here, pure Python).
PINNED='ml-collections|tensorflow-datasets|grain|array_record|tensorboardX'
UNPINNED='immutabledict==4.3.1 toml==0.10.2 tensorflow-metadata==1.21.0 portpicker==1.6.0'

if [[ ${1:-} == wheels ]]; then
  mkdir -p .whl
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $(grep -E "^($PINNED)==" requirements.txt) $UNPINNED
  "$PYTHON" -m pip wheel -q --no-deps -w .whl promise==2.3
  ls .whl
  exit
fi

OUT=${OUT:?OUT: the folder for bench_gpu.json}
WHEELS=${WHEELS-.whl}  # WHEELS= : install none
if [[ -n $WHEELS && -d $WHEELS ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
fi
export PYTHONUNBUFFERED=1
# Batch 8: the memory plan (docs/benchmarks.md) puts the step at 33 GiB in bfloat16 without remat on XLA:CPU;
# the planner on the GPU (bench.py's docstring) gives the largest that fits.
timeout "${TIMEOUT:-420}" "$PYTHON" -m mmg_jax.tools.bench --size="${SIZE:-paper}" \
  --only=sgemm,encoders,train_step,mvit_cpu_kernels,fewshot_eval --batch_size="${BATCH_SIZE:-8}" \
  --repeats="${REPEATS:-10}" --output="$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
