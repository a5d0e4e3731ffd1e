"""``pyro-aevb bench``: the cost of a training step, side by side with hand-written PyTorch.

A ratio means something only if both sides compute the same thing, so the
reference step (:func:`reference_loss`, in the style of the pytorch/examples
VAE) reads the very same parameters as our Pyro model/guide, and a test checks
that for the same parameters and noise its loss equals the Pyro loss to 1e-5.

Paths are timed in interleaved rounds (reference, path 1, path 2, ... then
again), so that a machine's drift in speed hits every path alike; we report
medians. Ratios measured in the same run are the numbers to trust.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

import pyro

from .config import Recipe
from .estimators import make_estimator
from .fast import compile_loss
from .train import make_optimizer, resolve_device
from .vae import VAE, build_vae


def reference_loss(vae: VAE, x: torch.Tensor, num_data: int) -> torch.Tensor:
    r"""Estimator B by hand, for the paper's Bernoulli VAE: :math:`-\frac{N}{M}\sum_i [\log p(x_i|z_i) - KL_i]`.

    Reads ``vae.encoder`` and ``vae.decoder.logits`` directly; the noise is drawn
    exactly as Pyro's ``Normal.rsample`` draws it, so the same seed gives the same loss.
    """
    h = vae.encoder.hidden(x)  # (M, H)
    loc, log_var = vae.encoder.loc(h), vae.encoder.log_var(h)  # (M, Nz)
    scale = torch.exp(0.5 * log_var)
    z = loc + torch.empty_like(loc).normal_() * scale  # the reparameterization trick
    log_lik = -F.binary_cross_entropy_with_logits(vae.decoder.logits(z), x, reduction="sum")
    kl = 0.5 * torch.sum(loc.pow(2) + scale.pow(2) - 1 - 2 * torch.log(scale))  # Appendix B
    return -(num_data / x.shape[0]) * (log_lik - kl)


def _step_fn(loss_fn, vae, recipe):
    optimizer = make_optimizer(recipe, vae.parameters())

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def training_paths(recipe: Recipe, x: torch.Tensor, num_data: int) -> dict[str, callable]:
    """One step function per path, each on its own copy of the same initial parameters."""
    base = build_vae(recipe, x.shape[1]).to(x.device)
    paths = {}
    vae = copy.deepcopy(base)
    paths["reference"] = _step_fn(lambda: reference_loss(vae, x, num_data), vae, recipe)
    for name in ("sgvb-a", "sgvb-b"):
        estimator = make_estimator(name, recipe.num_particles)
        v = copy.deepcopy(base)
        paths[f"{name} eager"] = _step_fn(
            lambda v=v, e=estimator: e.differentiable_loss(v.model, v.guide, x, num_data=num_data), v, recipe)
        v = copy.deepcopy(base)
        compiled, reason = compile_loss(name, v, estimator, x, num_data)
        if compiled is not None:
            paths[f"{name} jit (default)"] = _step_fn(lambda c=compiled: c(x, 1.0), v, recipe)
        else:
            print(f"note: no fast path for {name}: {reason}")
    return paths


def time_paths(paths: dict, rounds: int, steps: int, sync) -> dict[str, float]:
    """Median seconds per step of each path, over interleaved rounds of ``steps`` steps."""
    for step in paths.values():  # warm-up: allocator, JIT optimisation passes
        for _ in range(max(3, steps // 2)):
            step()
    sync()
    times = {name: [] for name in paths}
    for _ in range(rounds):
        for name, step in paths.items():
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def run_bench(device: str = "cpu", quick: bool = False, batch_sizes=(100, 1000)) -> list[dict]:
    dev = resolve_device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rounds, steps = (3, 5) if quick else (15, 20)
    recipe = Recipe(hidden_dim=50 if quick else 500, latent_dim=20, init="pytorch")
    rows = []
    for m in batch_sizes[:1] if quick else batch_sizes:
        torch.manual_seed(0)
        x = torch.rand(m, 784, device=dev).bernoulli()
        with pyro.validation_enabled(False):  # as in a long run's steady state; the fast path has none
            medians = time_paths(training_paths(recipe, x, num_data=50_000), rounds, steps, sync)
        ref = medians["reference"]
        for name, t in medians.items():
            rows.append({"path": name, "device": str(dev), "batch_size": m,
                         "network": f"784-{recipe.hidden_dim}-{recipe.latent_dim}",
                         "median_step_seconds": t, "steps_per_second": 1.0 / t, "ratio_to_reference": t / ref,
                         "threads": torch.get_num_threads(), "rounds": rounds, "steps_per_round": steps})
    return rows


def _print_table(rows: list[dict]) -> None:
    print(f"{'path':<22} {'device':<7} {'M':>5} {'ms/step':>9} {'steps/s':>9} {'ratio':>7}")
    for r in rows:
        print(f"{r['path']:<22} {r['device']:<7} {r['batch_size']:>5} {r['median_step_seconds'] * 1e3:>9.3f} "
              f"{r['steps_per_second']:>9.1f} {r['ratio_to_reference']:>7.3f}")


def command(args) -> None:
    rows = run_bench(args.device, args.quick)
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table(rows)
        print(f"(median of interleaved rounds; ratio = path / hand-written PyTorch reference; "
              f"{torch.get_num_threads()} threads; torch {torch.__version__}, pyro {pyro.__version__})")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time training steps against a hand-written PyTorch reference")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", action="store_true", help="print a JSON list of results")
    p.add_argument("--quick", action="store_true", help="a few seconds: small network, few rounds")
    p.set_defaults(func=command)
