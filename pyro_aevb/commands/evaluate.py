"""``pyro-aevb evaluate``: the bound of a trained run, and on request its importance-sampled
log-likelihood with PSIS diagnostics, and the amortization gap."""

from __future__ import annotations

import json

import pyro
import torch

from ..errors import ConfigError
from ..evaluation.bounds import SUBSET_RULES, Bound, average_bound, bound_values, subset_rows
from ..evaluation.marginal_likelihood import DEFAULT_CHUNK_SIZE
from ..infer.registry import kl_status
from ..training.run_directory import load
from ..training.distributed import all_sum, device_for, shard, world
from ..training.setup import prepare_data, resolve_device


def _check(args) -> None:
    if args.num_samples and (args.num_samples <= 0 or (args.chunk_size or 1) <= 0 or args.khat_points < 0):
        raise ConfigError("--num-samples and --chunk-size must be positive, --khat-points >= 0")
    if args.amortization_gap is not None and (args.amortization_gap <= 0 or args.gap_steps < 0 or args.gap_lr <= 0):
        raise ConfigError("--amortization-gap must be positive, --gap-steps >= 0 and --gap-lr > 0")


def command(args) -> None:
    _check(args)
    w = world()
    if w.distributed and args.amortization_gap is not None:
        raise ConfigError("--amortization-gap runs in one process: launch it without torchrun")
    device = str(device_for(args.device, w)) if args.device else None
    vae = load(args.run_dir, device=device, checkpoint=args.checkpoint)
    if args.chunk_size is None:  # a diffusion's chain traces are T times a VAE's: it asks for smaller passes
        args.chunk_size = vae.likelihood_chunk or DEFAULT_CHUNK_SIZE
    if w.distributed and vae.recipe.device == "cuda" and device is None:
        vae.to(device_for("cuda", w))
    recipe = vae.recipe
    if args.data_dir:
        recipe.data_dir = args.data_dir
    data = prepare_data(recipe, resolve_device(str(next(vae.parameters()).device)))
    if args.split == "valid" and data.valid is None:
        raise ConfigError(f"{args.run_dir} was trained without a validation split (validation_size = 0); "
                          "use --split test or train")
    x = {"test": data.test, "train": data.train_eval, "valid": data.valid}[args.split]
    x = datapoint_subset(x, args.max_datapoints, args.subset)
    kl = kl_status(*vae.evaluation_pair(), x[: min(recipe.batch_size, vae.evaluation_rows)])
    particles = args.num_particles or recipe.eval_particles
    bound = _bound(vae, x, particles, kl == "analytic", w)
    result = {"split": args.split, "n": bound.n, "elbo": bound.mean, "elbo_se": bound.se,
              "num_particles": particles, "kl": kl, "run_dir": str(args.run_dir), "checkpoint": args.checkpoint,
              "step": vae.step, **({"subset": args.subset} if args.max_datapoints is not None else {})}
    if args.num_samples:
        result.update(_log_likelihood(vae, x, args))
    if args.amortization_gap is not None:
        result["amortization_gap"] = _amortization_gap(vae, x, args)
    if w.distributed:
        result["world_size"] = w.size
    if w.main:
        print(json.dumps(result) if args.json else _report(result, args))


def datapoint_subset(x: torch.Tensor, n: int | None, subset: str = "random") -> torch.Tensor:
    """The rows scored under ``--max-datapoints n``: a fixed random subset (``subset="random"``, seed
    :data:`~pyro_aevb.evaluation.bounds.SUBSET_SEED`), or the first n rows (``"first"``). ``None``: all of x.

    Random is the default because test splits are often ordered: the binarized MNIST test split comes
    in blocks of similar digits (its first 1,000 have 133 pixels on, on average, its next 1,000 have 60,
    the split 104), so the first 1,000 score about 12 nats below the whole split.
    """
    if n is None:
        return x
    if n <= 0:
        raise ConfigError(f"--max-datapoints must be positive, got {n}")
    return x[subset_rows(x.shape[0], n, subset).to(x.device)]


def _bound(vae, x, particles: int, analytic: bool, w) -> Bound:
    """The average bound over x; under torchrun each rank scores its own rows and the sums are added up."""
    rows = vae.evaluation_rows
    if not w.distributed:
        return average_bound(*vae.evaluation_pair(), x, particles, analytic_kl=analytic, chunk_size=rows)
    values = bound_values(*vae.evaluation_pair(), x[shard(x.shape[0], w)], particles, analytic, rows).to(torch.float64)
    return Bound.from_sums(*all_sum(torch.stack([values.sum(), (values**2).sum(),
                                                 values.new_tensor(values.numel())])).tolist())


def _log_likelihood(vae, x, args) -> dict:
    from ..evaluation.diagnostics import khat_summary, likelihood_summary, psis_khat
    from ..evaluation.marginal_likelihood import log_likelihood

    w = world()
    if args.seed is not None:
        pyro.set_rng_seed(args.seed + w.rank)  # each rank its own noise (its own rows, too)
    keys = ("log_likelihood", "log_likelihood_se", "num_samples", "ess_mean", "ess_min", "khat", "compiled")
    if not w.distributed:
        summary = likelihood_summary(*vae.likelihood_pair(), x, args.num_samples, args.chunk_size, args.khat_points,
                                     progress=not args.no_progress, compile=vae.likelihood_compile)
        return {k: summary[k] for k in keys}
    rows = x[shard(x.shape[0], w)]  # rank 0 holds the first rows: PSIS k-hat is on them, as in one process
    result = log_likelihood(*vae.likelihood_pair(), rows, args.num_samples, args.chunk_size, return_diagnostics=True,
                            keep_log_weights=args.khat_points if w.main else 0, progress=not args.no_progress and w.main,
                            compile=vae.likelihood_compile)
    ll, ess = result.log_likelihood.to(torch.float64), result.ess.to(torch.float64)
    sums = all_sum(torch.stack([ll.sum(), (ll**2).sum(), ll.new_tensor(ll.numel()), ess.sum()]))
    ess_min = -all_sum(torch.zeros(w.size, dtype=torch.float64).index_fill_(0, torch.tensor([w.rank]),
                                                                         -ess.min().item())).max()
    bound = Bound.from_sums(*sums[:3].tolist())
    khat = psis_khat(result.log_weights) if result.log_weights is not None else torch.zeros(0)
    return {"log_likelihood": bound.mean, "log_likelihood_se": bound.se, "num_samples": args.num_samples,
            "ess_mean": (sums[3] / sums[2]).item(), "ess_min": ess_min.item(), "khat": khat_summary(khat),
            "compiled": result.compiled}


def _amortization_gap(vae, x, args) -> dict:
    from ..evaluation.amortization import amortization_gap_summary

    if args.seed is not None:
        pyro.set_rng_seed(args.seed)
    return amortization_gap_summary(
        *vae.local_pair(), x, num_points=args.amortization_gap, num_steps=args.gap_steps, lr=args.gap_lr,
        num_samples=args.num_samples or 1000, chunk_size=args.chunk_size, progress=not args.no_progress)


def _report(result: dict, args) -> str:
    """The human-readable lines of ``result``."""
    split = args.split
    lines = [f"{split}: average lower bound {result['elbo']:.2f} ± {result['elbo_se']:.2f} nats per datapoint "
             f"(n={result['n']}, L={result['num_particles']}, KL: {result['kl']})"]
    if args.num_samples:
        k = result["khat"]
        lines.append(f"{split}: log-likelihood {result['log_likelihood']:.2f} ± {result['log_likelihood_se']:.2f} "
                     f"nats per datapoint (importance sampling, K={args.num_samples}); mean ESS "
                     f"{result['ess_mean']:.1f} of {args.num_samples}; PSIS k-hat on {k['n']} points: "
                     + ", ".join(f"{name} {count}" for name, count in k["counts"].items()))
    if args.amortization_gap is not None:
        g = result["amortization_gap"]
        lines.append(
            f"{split}: on {g['n']} datapoints, log p(x) {g['log_likelihood']:.2f} (K={g['num_samples']}), "
            f"ELBO of the locally optimised q {g['elbo_optimized']:.2f}, of the encoder's q "
            f"{g['elbo_amortized']:.2f}: approximation gap {g['approximation_gap']:.2f} ± "
            f"{g['approximation_gap_se']:.2f}, amortization gap {g['amortization_gap']:.2f} ± "
            f"{g['amortization_gap_se']:.2f} nats ({100 * g['amortization_fraction']:.0f}% of the gap)")
    return "\n".join(lines)


def register(subparsers, help: str = "") -> None:
    p = subparsers.add_parser("evaluate", help=help, description=help)
    p.add_argument("run_dir")
    p.add_argument("--split", choices=["test", "train", "valid"], default="test")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last",
                   help="the end of training (default) or best.pt, the best validation bound's parameters")
    p.add_argument("--num-particles", type=int, help="samples of z per datapoint (default: the recipe's)")
    p.add_argument("--max-datapoints", type=int, metavar="N",
                   help="score only N datapoints of the split: a fixed random subset (see --subset)")
    p.add_argument("--subset", choices=SUBSET_RULES, default="random",
                   help="which N datapoints --max-datapoints keeps: a fixed random subset, the same on every call "
                        "(default; splits are often ordered by class), or the first N")
    p.add_argument("--data-dir")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--num-samples", type=int, help="also estimate log p(x) by importance sampling with K samples")
    p.add_argument("--chunk-size", type=int, help="particles x datapoints per pass (memory; default 20000)")
    p.add_argument("--khat-points", type=int, default=100, help="datapoints whose PSIS k-hat is computed")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--amortization-gap", type=int, metavar="N",
                   help="also the approximation and amortization gaps on N datapoints (a fixed random subset of the "
                        "split, or of the --max-datapoints rows); "
                        "log p(x) uses --num-samples (default 1000)")
    p.add_argument("--gap-steps", type=int, default=500, help="Adam steps of each local q (default 500)")
    p.add_argument("--gap-lr", type=float, default=0.02, help="initial Adam step size of each local q (default 0.02)")
    p.set_defaults(func=command)
