#!/usr/bin/env bash
# Prepare, on a development machine, the wheels of what the GPU machine lacks (../shared/MACHINE.md: hydra,
# omegaconf and antlr4 for the config, datasets with dill and multiprocess for the data pipeline, zstandard for .zst corpora), in .whl/
# (ignored by git), for a device call that carries `.whl`. antlr4-python3-runtime 4.9.3 ships no wheel: one
# is built from its source distribution.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
py=${PYTHON:-python3}
$py -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl hydra-core==1.3.2 omegaconf==2.3.0 datasets dill multiprocess zstandard
$py -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls .whl
