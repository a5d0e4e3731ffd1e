"""The mixture priors' log-density: ``DiagonalNormalMixture`` against Pyro's ``MixtureSameFamily``, interleaved.

    python benchmarks/mixture_density.py [--components 500] [--dim 50] [--rows 20000] [--rounds 3] [--device cpu]

The shape is importance sampling's: ``rows`` (particle, datapoint) pairs per pass, as (K=rows/100, 100)
under a data plate of 100 (the prior expanded to batch shape (100,), as ``pyro.plate`` expands it), against
a VampPrior-sized mixture. Prints one JSON object: the device, the median seconds of each, their ratio and
the largest difference of the log-densities.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import pyro
import pyro.distributions as dist

from pyro_aevb.generative.mixture import DiagonalNormalMixture


def _time(fn, device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--components", type=int, default=500)
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    k, d, plate = args.components, args.dim, 100
    logits = torch.zeros(k, device=device)
    loc, scale = torch.randn(k, d, device=device), torch.rand(k, d, device=device) * 0.5 + 0.05
    z = torch.randn(max(args.rows // plate, 1), plate, d, device=device)  # (particles, datapoints, Nz)
    fast = DiagonalNormalMixture(logits, loc, scale).expand((plate,))
    reference = dist.MixtureSameFamily(dist.Categorical(logits=logits),
                                       dist.Normal(loc, scale).to_event(1)).expand((plate,))
    times = {"DiagonalNormalMixture": [], "MixtureSameFamily": []}
    with torch.no_grad():
        for _ in range(args.rounds):
            t, a = _time(lambda: fast.log_prob(z), device)
            times["DiagonalNormalMixture"].append(t)
            t, b = _time(lambda: reference.log_prob(z), device)
            times["MixtureSameFamily"].append(t)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "pyro": pyro.__version__,
        "components": k, "dim": d, "rows": z.shape[0] * plate, "rounds": args.rounds,
        "seconds": times, "median_seconds": medians,
        "speedup": medians["MixtureSameFamily"] / medians["DiagonalNormalMixture"],
        "max_abs_difference": (a - b).abs().max().item(),
    }))


if __name__ == "__main__":
    main()
