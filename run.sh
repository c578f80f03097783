#!/usr/bin/env bash
# The common runs of mmg-jax. Extra arguments go to `python -m mmg_jax.main` (e.g. --workdir=DIR,
# --config.seed=1). Re-running a command resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'EOF'
usage: ./run.sh COMMAND [ARGS...] [main flags...]

  demo                          few-shot pipeline on the embedded dataset, CPU-sized (small)
  paper                         many-shot and few-shot tables at paper size (needs the
                                mmg_ego4d dataset built: data_pipeline/mmg_ego4d/README.md)
  paper-smoke [WORKDIR]         every stage and evaluation of the paper configs on CPU, at
                                paper sizes, for 2 steps a stage on generated media; prints
                                both tables and each part's time and peak memory
                                (mmg_jax/tools/paper_smoke.py; default runs/paper_smoke)
  tpu-pod NAME ZONE CONFIG      CONFIG (e.g. configs/fewshot.py:paper) on every worker of the
                                TPU VM NAME; the repo must be at ~/mmg-jax on each worker with
                                requirements.txt and jax[tpu] installed, and --workdir a path
                                every worker shares (gs://bucket/run with gcsfs installed, or NFS)
  local-multiprocess N CONFIG   CONFIG on N processes on this machine (jax.distributed over
                                localhost), e.g. to check a multi-host launch on CPU
EOF
}

main_py=(python -m mmg_jax.main)

command="${1:-}"
[[ $# -gt 0 ]] && shift
case "$command" in
  demo)
    "${main_py[@]}" --config=configs/fewshot.py:small "$@"
    ;;
  paper)
    "${main_py[@]}" --config=configs/manyshot.py:paper "$@"
    "${main_py[@]}" --config=configs/fewshot.py:paper "$@"
    ;;
  paper-smoke)
    python -m mmg_jax.tools.paper_smoke --workdir="${1:-runs/paper_smoke}"
    ;;
  tpu-pod)
    [[ $# -ge 3 ]] || { usage >&2; exit 2; }
    name="$1" zone="$2" config="$3"
    shift 3
    gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all \
      --command="cd ~/mmg-jax && python -m mmg_jax.main --config=$config --distributed=on $*"
    ;;
  local-multiprocess)
    [[ $# -ge 2 ]] || { usage >&2; exit 2; }
    num_processes="$1" config="$2"
    shift 2
    port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    pids=()
    trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
    for ((i = 0; i < num_processes; i++)); do
      "${main_py[@]}" --config="$config" --coordinator_address="127.0.0.1:$port" \
        --num_processes="$num_processes" --process_id="$i" "$@" &
      pids+=($!)
    done
    # The first process to fail stops the others: its peers would wait for it in their next
    # collective until jax's heartbeat timeout.
    status=0
    for ((i = 0; i < num_processes; i++)); do
      wait -n && continue
      code=$?
      if ((status == 0)); then
        status=$code
        kill "${pids[@]}" 2>/dev/null || true  # some may have exited already
      fi
    done
    exit "$status"
    ;;
  *)
    usage
    [[ -z "$command" || "$command" == -h || "$command" == --help ]] || exit 2
    ;;
esac
