"""``pyro-aevb bench``: the cost of a training step, side by side with hand-written PyTorch.

A ratio means something only if both sides compute the same thing, so the
reference step (:func:`reference_loss`, in the style of the pytorch/examples
VAE) reads the very same parameters as our Pyro model/guide, and a test checks
that for the same parameters and noise its loss equals the Pyro loss to 1e-5.

It also times the importance-sampled log-likelihood (:func:`pyro_aevb.log_likelihood`,
K = 5000) against raw ``torch.mm`` calls of the same shapes, to show what share
of the machine's matrix-product throughput the evaluation reaches.

Paths are timed in interleaved rounds (reference, path 1, path 2, ... then
again), so that a machine's drift in speed hits every path alike; we report
medians. Ratios measured in the same run are the numbers to trust.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import pyro

from ..config import Recipe
from ..evaluation.marginal_likelihood import DEFAULT_CHUNK_SIZE, chunk_shape, log_likelihood
from ..generative.vae import VAE, build_vae
from ..infer.registry import kl_status, make_estimator
from ..training.cpu_allocator import allocator_status
from ..training.cuda_graphs import WARMUP_STEPS, CapturedStep
from ..training.setup import make_optimizer, resolve_device
from ..training.tracing import COMPILE_MIN_STEPS, compile_loss
from .common import single_process


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


def _graph_step_fn(name: str, vae: VAE, recipe: Recipe, x: torch.Tensor, num_data: int):
    """The CUDA path of training: the whole step (minibatch gather, ELBO, backward, update) as one graph."""
    estimator = make_estimator(name, recipe.num_particles)
    kl_status(*vae.local_pair(), x)  # as train() does first
    compiled, reason = compile_loss(name, vae, estimator, x, num_data)
    if compiled is None:
        print(f"note: no CUDA graph for {name}: {reason}", file=sys.stderr)
        return None
    optimizer = make_optimizer(recipe, vae.parameters(), capturable=True)
    step = CapturedStep(compiled.traced, vae.parameters(), optimizer, x, x.shape[0], binarize=False, grad_clip=0.0)
    idx = torch.arange(x.shape[0], device=x.device)
    for _ in range(WARMUP_STEPS):  # warm-up and capture
        step(idx, 1.0)
    if step.graph is None:
        print(f"note: no CUDA graph for {name}: {step.status}", file=sys.stderr)
        return None
    return lambda: step(idx, 1.0)[0]


#: the CPU fast paths timed, with the runs each is the default for (pyro_aevb.training.tracing.choose_backend)
CPU_FAST_PATHS = {"jit": f"jit (< {COMPILE_MIN_STEPS:,} steps)", "inductor": "compile (default)"}


def training_paths(recipe: Recipe, x: torch.Tensor, num_data: int, compile: bool = True) -> dict[str, callable]:
    """One step function per path, each on its own copy of the same initial parameters.

    ``compile=False`` leaves out the ``torch.compile`` paths (their first compile takes 10-30 s).
    """
    base = build_vae(recipe, x.shape[1]).to(x.device)
    paths = {}
    vae = copy.deepcopy(base)
    paths["reference"] = _step_fn(lambda: reference_loss(vae, x, num_data), vae, recipe)
    for name in ("sgvb-a", "sgvb-b"):
        estimator = make_estimator(name, recipe.num_particles)
        v = copy.deepcopy(base)
        paths[f"{name} eager"] = _step_fn(
            lambda v=v, e=estimator: e.differentiable_loss(*v.local_pair(), x, num_data=num_data), v, recipe)
        if x.is_cuda:
            graphed = _graph_step_fn(name, copy.deepcopy(base), recipe, x, num_data)
            if graphed is not None:
                paths[f"{name} cuda-graph (default)"] = graphed
            continue
        for backend, label in CPU_FAST_PATHS.items():
            if backend == "inductor" and not compile:
                continue
            v = copy.deepcopy(base)
            kl_status(*v.local_pair(), x)  # as train() does first: the plate's cached arange becomes a constant
            compiled, reason = compile_loss(name, v, estimator, x, num_data, backend=backend)
            if compiled is not None:
                paths[f"{name} {label}"] = _step_fn(lambda c=compiled: c(x, 1.0), v, recipe)
            else:
                print(f"note: no {backend} path for {name}: {reason}", file=sys.stderr)
    return paths


def matmul_shapes(vae: VAE, rows: int, samples: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the matrix products of one importance-sampling pass over ``rows`` datapoints and
    ``samples`` particles each: the encoder on the rows, the decoder on rows x samples latent draws."""
    enc, dec = vae.encoder, vae.decoder
    D, H = enc.hidden[0].in_features, enc.hidden[0].out_features
    Nz, B = enc.loc.out_features, rows * samples
    decoder = [(B, lin.in_features, lin.out_features) for lin in dec.modules() if isinstance(lin, torch.nn.Linear)]
    return [(rows, D, H), (rows, H, Nz), (rows, H, Nz)] + decoder


def likelihood_rows(recipe: Recipe, x: torch.Tensor, num_samples: int, chunk_size: int, rounds: int,
                    sync, compile: bool = True) -> list[dict]:
    """Time ``log_likelihood`` (K = ``num_samples`` on the datapoints x) against raw ``torch.mm`` calls of
    the same shapes, pass by pass, in interleaved rounds: how much of the matmul throughput it reaches."""
    vae = build_vae(recipe, x.shape[1]).to(x.device)
    n = x.shape[0]
    rows, samples = chunk_shape(n, num_samples, chunk_size)
    passes = [(min(rows, n - r0), min(samples, num_samples - k0))
              for r0 in range(0, n, rows) for k0 in range(0, num_samples, samples)]
    operands = {}  # (m, k, n) -> (A, B), allocated once, outside the timing
    for r, k in set(passes):
        for m_, k_, n_ in matmul_shapes(vae, r, k):
            operands.setdefault((m_, k_, n_), (torch.randn(m_, k_, device=x.device),
                                               torch.randn(k_, n_, device=x.device)))
    flops = sum(2 * m_ * k_ * n_ for r, k in passes for m_, k_, n_ in matmul_shapes(vae, r, k))

    def evaluation(compile: bool):
        return lambda: log_likelihood(*vae.local_pair(), x, num_samples=num_samples, chunk_size=chunk_size,
                                      compile=compile)

    def raw_mm():
        for r, k in passes:
            for shape in matmul_shapes(vae, r, k):
                torch.mm(*operands[shape])

    paths = {"mm": raw_mm, "ll": evaluation(False)}
    if compile and x.device.type == "cpu":  # a call records and compiles afresh: time the passes, not the compile
        paths["ll compiled"] = compiled_passes(vae, x, num_samples, chunk_size)
    times = time_paths(paths, rounds, 1, sync, warmup=1)
    t_mm = times["mm"]
    common = {"device": str(x.device), "batch_size": n, "num_samples": num_samples, "chunk_size": chunk_size,
              "network": f"784-{recipe.hidden_dim}-{recipe.latent_dim}", "threads": torch.get_num_threads(),
              "rounds": rounds, "matmul_gflop": flops / 1e9}
    rows = [{"path": "torch.mm, same shapes", **common, "median_step_seconds": t_mm, "steps_per_second": 1 / t_mm,
             "ratio_to_reference": 1.0, "gflops_per_second": flops / t_mm / 1e9}]
    for key, label in (("ll", f"log_likelihood K={num_samples}, eager"),
                       ("ll compiled", f"log_likelihood K={num_samples}, compiled (default for >= 100 passes)")):
        if key in times:
            t = times[key]
            rows.append({"path": label, **common, "median_step_seconds": t, "steps_per_second": 1 / t,
                         "ratio_to_reference": t / t_mm, "gflops_per_second": flops / t / 1e9, "matmul_share": t_mm / t})
    return rows


def compiled_passes(vae: VAE, x: torch.Tensor, num_samples: int, chunk_size: int):
    """All the passes of ``log_likelihood(..., compile=True)`` over x, with the recording and compile done
    once, first (what a long evaluation of thousands of passes amortises)."""
    from ..evaluation.marginal_likelihood import PassWeights, accumulate

    model, guide = vae.local_pair()
    rows, samples = chunk_shape(x.shape[0], num_samples, chunk_size)
    with torch.no_grad(), pyro.validation_enabled(False):  # as log_likelihood runs (no checks' host reads)
        weights = PassWeights(model, guide, x, num_samples, rows, samples, {}, compile=True)
        weights(0, rows, 0, samples)  # the first call compiles
    if weights.compiled != "inductor":
        print(f"note: the compiled evaluation ran eagerly: {weights.compiled}", file=sys.stderr)

    def passes():
        with torch.no_grad(), pyro.validation_enabled(False):
            accumulate(weights, x.shape[0], num_samples, rows, samples)

    return passes


def time_paths(paths: dict, rounds: int, steps: int, sync, warmup: int | None = None) -> dict[str, float]:
    """Median seconds per step of each path, over interleaved rounds of ``steps`` steps."""
    for step in paths.values():  # warm-up: allocator, JIT optimisation passes
        for _ in range(max(3, steps // 2) if warmup is None else warmup):
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
    allocator = allocator_status() if dev.type == "cpu" else "the CUDA caching allocator"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rounds, steps = (3, 5) if quick else (15, 20)
    recipe = Recipe(hidden_dim=50 if quick else 500, latent_dim=20, init="pytorch")
    rows = []
    for m in batch_sizes[:1] if quick else batch_sizes:
        torch.manual_seed(0)
        x = torch.rand(m, 784, device=dev).bernoulli()
        with pyro.validation_enabled(False):  # as in a long run's steady state; the fast path has none
            medians = time_paths(training_paths(recipe, x, num_data=50_000, compile=not quick), rounds, steps, sync)
        ref = medians["reference"]
        for name, t in medians.items():
            rows.append({"path": name, "device": str(dev), "batch_size": m,
                         "network": f"784-{recipe.hidden_dim}-{recipe.latent_dim}",
                         "median_step_seconds": t, "steps_per_second": 1.0 / t, "ratio_to_reference": t / ref,
                         "threads": torch.get_num_threads(), "rounds": rounds, "steps_per_round": steps,
                         "allocator": allocator})
    # The evaluation: K = 5000 importance samples on a slice of data (quick: K = 500 on 10 datapoints)
    torch.manual_seed(0)
    n, k = (10, 500) if quick else (50, 5000)
    x = torch.rand(n, 784, device=dev).bernoulli()
    rows += likelihood_rows(recipe, x, k, DEFAULT_CHUNK_SIZE, 2 if quick else 5, sync, compile=not quick)
    return rows


def _print_table(rows: list[dict]) -> None:
    steps = [r for r in rows if "num_samples" not in r]
    print(f"{'path':<30} {'device':<7} {'M':>5} {'ms/step':>9} {'steps/s':>9} {'ratio':>7}")
    for r in steps:
        print(f"{r['path']:<30} {r['device']:<7} {r['batch_size']:>5} {r['median_step_seconds'] * 1e3:>9.3f} "
              f"{r['steps_per_second']:>9.1f} {r['ratio_to_reference']:>7.3f}")
    evals = [r for r in rows if "num_samples" in r]
    if evals:
        r = evals[0]
        print(f"\nimportance-sampled log p(x): {r['batch_size']} datapoints x K={r['num_samples']}, "
              f"chunk {r['chunk_size']}, {r['matmul_gflop']:.1f} GFLOP of matrix products")
        print(f"{'path':<30} {'device':<7} {'seconds':>9} {'GFLOP/s':>9} {'ratio':>7}")
        for r in evals:
            print(f"{r['path']:<30} {r['device']:<7} {r['median_step_seconds']:>9.3f} "
                  f"{r['gflops_per_second']:>9.1f} {r['ratio_to_reference']:>7.3f}")
        for r in evals[1:]:
            print(f"{r['path']} reaches {r['matmul_share']:.0%} of raw torch.mm throughput")


def command(args) -> None:
    single_process("bench")
    rows = run_bench(args.device, args.quick)
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table(rows)
        print(f"(median of interleaved rounds; ratio = path / hand-written PyTorch reference; "
              f"{torch.get_num_threads()} threads; torch {torch.__version__}, pyro {pyro.__version__})")
        if args.quick and args.device == "cpu":
            print("(--quick leaves out the torch.compile paths, the default for runs of "
                  f"{COMPILE_MIN_STEPS:,} steps or more: their first compile takes 10-30 s)")


def register(subparsers, help: str = "") -> None:
    p = subparsers.add_parser("bench", help=help, description=help)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", action="store_true", help="print a JSON list of results")
    p.add_argument("--quick", action="store_true", help="a few seconds: small network, few rounds, no torch.compile paths")
    p.set_defaults(func=command)
