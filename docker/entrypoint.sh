#!/bin/sh
# The image's entrypoint: `torchrun $TORCHRUN_ARGS /opt/haillm/launch/train.py <config overrides>`, run in
# the working directory (/runs), so that relative paths in the overrides resolve there.
# TORCHRUN_ARGS defaults to one node with every visible GPU (--standalone --nproc_per_node=gpu); for several
# nodes pass e.g. -e TORCHRUN_ARGS="--nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d
# --rdzv-endpoint=HEAD:29500 --rdzv-id=JOB" to `docker run` on every node.
# Without overrides: the smoke run, the tiny model in one process (dp=1, whatever the number of GPUs).
# Without a visible GPU (no `--gpus` given to `docker run`) and without TORCHRUN_ARGS: one process on the CPU,
# without torchrun (whose own error for a missing GPU is a traceback), said in one line.
set -eu
if [ "$#" -eq 0 ]; then
    set -- model=tiny output_dir=/runs/tiny
    TORCHRUN_ARGS=${TORCHRUN_ARGS:---standalone --nproc_per_node=1}
fi
if [ -z "${TORCHRUN_ARGS:-}" ] && ! { nvidia-smi -L 2>/dev/null || true; } | grep -q '^GPU'; then
    echo "haillm: no GPU visible (docker run --gpus all ... to use them): training in one process on the CPU" >&2
    exec python /opt/haillm/launch/train.py "$@"
fi
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options: split it on spaces
exec torchrun ${TORCHRUN_ARGS:---standalone --nproc_per_node=gpu} /opt/haillm/launch/train.py "$@"
