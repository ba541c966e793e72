#!/bin/sh
# The image's entrypoint: `torchrun $TORCHRUN_ARGS launch/train.py <config overrides>`.
# TORCHRUN_ARGS defaults to one node with every visible GPU (--standalone --nproc_per_node=gpu); for several
# nodes pass e.g. -e TORCHRUN_ARGS="--nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d
# --rdzv-endpoint=HEAD:29500 --rdzv-id=JOB" to `docker run` on every node.
set -eu
cd /opt/haillm
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options: split it on spaces
exec torchrun ${TORCHRUN_ARGS:---standalone --nproc_per_node=gpu} launch/train.py "$@"
