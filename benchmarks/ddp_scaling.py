"""One process with 2 threads against 2 torchrun ranks with 1 thread each, on the same machine, interleaved:
training samples per second of a recipe, and the importance-sampled log-likelihood of test digits.

    python benchmarks/ddp_scaling.py --data-dir ../shared/data [--rounds 2] [--samples 200000] [--digits 10000]

Prints one JSON object: per configuration the median wall time of each measured part and the throughput,
and the scaling efficiency (throughput of 2 ranks / throughput of 1 process). Run directories go to a
temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="mnist_nz20")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--samples", type=int, default=200_000)
    p.add_argument("--digits", type=int, default=10_000, help="test digits of the K = 5000 evaluation (0: none)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ddp-scaling-"))
    py = [sys.executable, "-m"]
    launch = {"1 process x 2 threads": (py + ["pyro_aevb"], 2),
              "2 ranks x 1 thread": (py + ["torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                                           "pyro_aevb"], 1)}
    sets = ["--set", f"max_samples={args.samples}", "--set", f"eval_every={args.samples}", "--set",
            f"checkpoint_every={args.samples}", "--set", "fast_path=jit", "--data-dir", args.data_dir, "--no-progress"]
    times = {name: {"train": [], "evaluate": []} for name in launch}
    for r in range(args.rounds):
        for name, (prefix, threads) in launch.items():
            run = work / f"{name.split()[0]}-{r}"
            times[name]["train"].append(_run(prefix + ["train", args.recipe, *sets, "--out", str(run)], threads))
            train_seconds = json.loads((run / "run.json").read_text())["train_seconds"]
            times[name].setdefault("train_seconds", []).append(train_seconds)
            if args.digits:
                ev = ["evaluate", str(run), "--data-dir", args.data_dir, "--num-samples", "5000", "--json",
                      "--no-progress", "--seed", "0", "--khat-points", "0", "--max-datapoints", str(args.digits)]
                times[name]["evaluate"].append(_run(prefix + ev, threads))
    out = {"recipe": args.recipe, "samples": args.samples, "rounds": args.rounds, "configurations": {}}
    for name, t in times.items():
        train = statistics.median(t["train_seconds"])
        out["configurations"][name] = {"train_seconds": train, "samples_per_second": args.samples / train,
                                       "train_wall_seconds": statistics.median(t["train"]),
                                       "evaluate_wall_seconds": statistics.median(t["evaluate"]) if t["evaluate"] else None}
    one, two = (out["configurations"][n] for n in launch)
    out["training_scaling_efficiency"] = two["samples_per_second"] / one["samples_per_second"]
    if one["evaluate_wall_seconds"]:
        out["evaluation_speedup"] = one["evaluate_wall_seconds"] / two["evaluate_wall_seconds"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
