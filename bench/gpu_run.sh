#!/usr/bin/env bash
# Everything GPU in one device call, from the repository root of the GPU machine:
#   bash bench/gpu_run.sh [bench/gpu_train.py arguments]
#   GPU_PARTS=fidelity bash bench/gpu_run.sh        # a second call: the FP8 loss fidelity runs (~4 min)
# installs the carried wheels (.whl/, see bench/gpu_wheels.sh), runs the tests marked `gpu`, then
# bench/gpu_fp8.py, bench/gpu_attention.py and bench/gpu_train.py (GPU_PARTS, default
# "tests fp8 attention train", picks among them and "fidelity"); logs go to $OUT (or /tmp/gpu_out) and
# the console.
set -uo pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
parts=" ${GPU_PARTS:-tests fp8 attention train} "
[[ $parts == *" tests "* ]] && timeout 190 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log"
[[ $parts == *" fp8 "* ]] && timeout 100 python3 bench/gpu_fp8.py 2>&1 | tee "$out/gpu_fp8.log"
[[ $parts == *" attention "* ]] && timeout 40 python3 bench/gpu_attention.py 2>&1 | tee "$out/gpu_attention.log"
[[ $parts == *" train "* ]] && timeout 240 python3 bench/gpu_train.py "$@" 2>&1 | tee "$out/gpu_train.log"
[[ $parts == *" fidelity "* ]] && timeout 540 python3 bench/fp8_fidelity.py --trainer --json "$out/fidelity.json" \
    2>&1 | tee "$out/fidelity.log"
exit 0
