#!/usr/bin/env bash
# The GPU measurements in device calls of at most ~5 minutes each, the most important figures first, from the
# repository root of the GPU machine (the device budget is 15 minutes with the machine's start included):
#   bash bench/gpu_run.sh [bench/gpu_train.py arguments]   # call 1 (~4.5 min): train, fp8
#   GPU_PARTS="model tests attention" bash bench/gpu_run.sh # call 2 (~4.5 min)
#   GPU_PARTS=profile bash bench/gpu_run.sh                 # when time is left
#   GPU_PARTS=fidelity GPU_DEADLINE=560 bash bench/gpu_run.sh  # the FP8 loss fidelity runs: a call of its own
# Parts (GPU_PARTS picks among them, in this order whatever order it names them):
#   train     bench/gpu_train.py --sections trainer: the trainer's step in BF16, BF16+FP8, BF16+compile
#             (tokens/s, MFU, peak memory): the acceptance figures;
#   fp8       bench/gpu_fp8.py: FP8 GEMM accuracy and TFLOP/s, FP8 linears and grouped experts vs BF16;
#   model     bench/gpu_train.py --sections model: our forward+backward (eager, compiled) vs transformers';
#   tests     the tests marked `gpu` (kernels against the CPU reference), one line per test as it finishes;
#   attention bench/gpu_attention.py: which attention kernel serves MLA's head dims;
#   profile   bench/gpu_train.py --sections profile: one profiled trainer step, eager and compiled;
#   fidelity  bench/fp8_fidelity.py --trainer: three 300-step runs of the 1.38B model (no checkpoints written).
# Each part runs under its own limit, cut to what is left of GPU_DEADLINE (seconds since the start, default
# 290); a part that cannot get 20 s is skipped. A part that runs out gets SIGINT (pytest then prints its
# summary; scripts print each figure as it is measured), SIGKILL 15 s later. After each part one status line
# is printed and appended to $OUT/summary.txt, so a cut-off call still says what finished; at the end the
# summary is printed again. Installs the carried wheels (.whl/, see bench/gpu_wheels.sh) first; logs go to
# $OUT (or /tmp/gpu_out) and the console.
# CPU dry run of the harness (the scripts print one line without CUDA; --cpu makes gpu_train.py run its tiny
# configuration): PYTHON=.venv/bin/python GPU_PARTS="train fp8 model tests attention profile" \
#   bash bench/gpu_run.sh --cpu
set -uo pipefail
py=${PYTHON:-python3}
start=$SECONDS
deadline=${GPU_DEADLINE:-290}
if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
: > "$out/summary.txt"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
fi
parts=" ${GPU_PARTS:-train fp8} "

say() {  # a status line, on the console and in summary.txt as it happens
    echo "$1" >> "$out/summary.txt"
    echo "== $1"
}

part() {  # part NAME LIMIT_S COMMAND...: run COMMAND if NAME is in GPU_PARTS, within LIMIT_S and the deadline
    local name=$1 limit=$2
    shift 2
    [[ $parts == *" $name "* ]] || return 0
    local left=$((deadline - (SECONDS - start)))
    if ((left < 20)); then
        say "$name: skipped, ${left} s of the ${deadline} s deadline left"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most $limit s): $*"
    local t0=$SECONDS
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee "$out/gpu_$name.log"
    local rc=${PIPESTATUS[0]} status=ok
    if ((rc == 124 || rc == 137)); then
        status="CUT OFF at its $limit s limit (what finished is above and in gpu_$name.log)"
    elif ((rc != 0)); then
        status="FAILED (exit $rc)"
    fi
    if [[ $name == tests ]]; then  # counted from pytest's -v lines: there even when its summary is not
        local n
        n=$(for w in PASSED FAILED ERROR SKIPPED XFAIL; do
                c=$(grep -cE "(::| )[^ ]*[ ]+$w|^$w " "$out/gpu_$name.log"); ((c)) && printf '%s %s, ' "$c" "${w,,}"
            done)
        status="$status; ${n%, }"
    fi
    say "$name: $status, $((SECONDS - t0)) s (total $((SECONDS - start)) s)"
}

part train 160 $py bench/gpu_train.py --sections trainer --time-budget 100 "$@"
part fp8 100 $py bench/gpu_fp8.py
part model 110 $py bench/gpu_train.py --sections model --time-budget 60 "$@"
part tests 150 $py -m pytest -v -rfE -m gpu -p no:cacheprovider tests
part attention 40 $py bench/gpu_attention.py
part profile 150 $py bench/gpu_train.py --sections profile --time-budget 90 "$@"
part fidelity 540 $py bench/fp8_fidelity.py --trainer --json "$out/fidelity.json"
echo "== summary (parts:$parts; $((SECONDS - start)) s of the $deadline s deadline)"
cat "$out/summary.txt"
exit 0
