#!/usr/bin/env bash
# Run HERE (a machine with pip and a network to the package registries), before benchmarks/gpu_check.sh
# goes to a GPU machine that has PyTorch but neither Pyro nor a network: puts into .whl/ (ignored by git)
# the wheels that machine lacks, pyro-ppl and pyro-api, and this project's own wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/pyro_aevb-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "pyro-ppl==$(python3 -c 'import pyro; print(pyro.__version__)')" pyro-api
python3 -m pip wheel -q --no-deps --no-build-isolation . -w .whl
ls -l .whl
