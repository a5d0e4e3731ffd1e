#!/usr/bin/env bash
# The GPU check, in one script for a GPU machine that has PyTorch but neither Pyro nor a network
# (prepare the wheels first, here: benchmarks/gpu_wheels.sh). Under 6 minutes on an H100 or H200:
#   1. installs pyro-ppl and this project from the wheels in .whl/ (into /tmp/site, nothing else touched);
#   2. runs the cuda tests (tests/test_cuda.py) against the installed wheel: any fallback from the CUDA graph fails;
#   3. runs `pyro-aevb bench --device cuda --json`;
#   4. prints one JSON summary (and leaves the logs in $OUT, default /tmp/gpu_check).
# Usage there:  bash benchmarks/gpu_check.sh       (the device tool: carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/install.log" 2>&1 || { echo '{"error": "installing the wheels from .whl/ failed; see install.log"}'; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
work=$(mktemp -d)
cp -r "$REPO/tests" "$work/"  # the tests import the installed wheel, not this source tree
(cd "$work" && timeout 270 python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider \
   --junitxml="$OUT/cuda_tests.xml") > "$OUT/cuda_tests.log" 2>&1
tests_rc=$?
cd "$work"  # the installed wheel, not this source tree
timeout 150 python3 -m pyro_aevb bench --device cuda --json > "$OUT/bench.json" 2> "$OUT/bench.err"
bench_rc=$?
TESTS_RC=$tests_rc BENCH_RC=$bench_rc python3 - "$OUT" <<'PY'
import json, os, sys, xml.etree.ElementTree as ET
out = sys.argv[1]
summary = {"tests_rc": int(os.environ["TESTS_RC"]), "bench_rc": int(os.environ["BENCH_RC"])}
try:
    import torch
    summary.update(torch=torch.__version__, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    import pyro, pyro_aevb
    summary.update(pyro=pyro.__version__, pyro_aevb=pyro_aevb.__version__, pyro_aevb_from=pyro_aevb.__file__)
except Exception as e:  # noqa: BLE001 - the summary says what broke
    summary["import_error"] = f"{type(e).__name__}: {e}"
try:
    suite = ET.parse(os.path.join(out, "cuda_tests.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    summary["tests_failed"] = [c.get("name") for c in suite.iter("testcase")
                               if c.find("failure") is not None or c.find("error") is not None]
except Exception as e:  # noqa: BLE001
    summary["tests_error"] = f"{type(e).__name__}: {e}"
try:
    rows = json.load(open(os.path.join(out, "bench.json")))
    steps = [r for r in rows if "num_samples" not in r]
    summary["bench"] = [{k: r[k] for k in ("path", "batch_size", "steps_per_second", "ratio_to_reference")}
                        for r in steps]
    for r in steps:
        if r["batch_size"] == 100 and "cuda-graph" in r["path"]:
            ref = next(x for x in steps if x["batch_size"] == 100 and x["path"] == "reference")
            summary.setdefault("goal", {})[r["path"]] = {
                "steps_per_second": r["steps_per_second"], "speedup_over_hand_written_eager": ref["median_step_seconds"] / r["median_step_seconds"],
                "meets_10k_steps_per_second": r["steps_per_second"] >= 10_000,
                "meets_3x": ref["median_step_seconds"] / r["median_step_seconds"] >= 3}
    evals = [r for r in rows if "num_samples" in r]
    summary["log_likelihood_matmul_share"] = {r["path"]: r["matmul_share"] for r in evals[1:]}
except Exception as e:  # noqa: BLE001
    summary["bench_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(summary, indent=1))
PY
[ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ]
