#!/bin/bash
# Multi-node training with plain torchrun, no scheduler: run the same command on every node.
#
#   HEAD_NODE=node01 NNODES=4 launch/multinode.sh model=v3_671b parallel=v3_2048gpu ...
#
# HEAD_NODE: a hostname or address every node can reach (the c10d rendezvous runs there, port RDZV_PORT,
# default 29500); NNODES: how many nodes join; GPUS_PER_NODE: default every GPU nvidia-smi lists; JOB_ID:
# any string shared by the nodes of one run (default haillm). Arguments are config overrides for
# launch/train.py; nodes x GPUs per node must equal parallel.dp * pp * tp.
# As launch/slurm.sbatch: it runs from the repository root (this script's checkout, wherever it is called
# from), so relative paths in the overrides resolve there, with the checkout's .venv if there is one.
set -euo pipefail
: "${HEAD_NODE:?set HEAD_NODE to the rendezvous host}" "${NNODES:?set NNODES to the number of nodes}"
cd "$(dirname "$0")/.."
gpus_per_node=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
if [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi

exec torchrun \
    --nnodes="$NNODES" \
    --nproc_per_node="$gpus_per_node" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="${HEAD_NODE}:${RDZV_PORT:-29500}" \
    --rdzv-id="${JOB_ID:-haillm}" \
    launch/train.py "$@"
