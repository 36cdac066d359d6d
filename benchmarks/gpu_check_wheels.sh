#!/usr/bin/env bash
# Fetch, here, the wheels benchmarks/gpu_check.py needs on the GPU machine, into .whl/ (ignored by git).
#
# That machine has torch, numpy, networkx, scipy, pyyaml, tqdm and numba but no registry to
# install from. Of placer's own dependencies the check imports only gymnasium (through
# `import envs`, which registers the environments) and its one missing requirement,
# farama-notifications; both are pure Python. The versions are the ones this checkout is
# tested with. Then run on the device tool:
#     run(command="bash benchmarks/gpu_check_run.sh", carry=[".whl"], timeout_s=420)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl gymnasium==1.4.0 farama-notifications==0.0.6
ls -l .whl/gymnasium-*.whl .whl/farama_notifications-*.whl
