"""The ``pyro-aevb`` command: train, evaluate and sample.

Errors a user can fix print one line, ``pyro-aevb: error: ...``, with no
traceback, and exit non-zero (2 for usage errors). ``pyro-aevb --debug ...``
shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from .cpu_allocator import tune_cpu_allocator
from .errors import AEVBError, ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other usage error
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _train(args) -> None:
    from .checkpoint import load_checkpoint
    from .config import apply_overrides, command_line_overrides, load_recipe, make_recipe
    from .train import train

    overrides = command_line_overrides(args.set, args.data_dir, args.device, args.seed)
    if args.resume:
        if args.out or args.overwrite:
            raise ConfigError("--resume DIR continues DIR; it takes neither --out nor --overwrite")
        out = Path(args.resume)
        if args.recipe:
            recipe = load_recipe(args.recipe, overrides)
        else:  # the run's own recipe, with any overrides on top (which only --force accepts)
            if not (out / "checkpoint.pt").is_file():
                raise ConfigError(f"cannot resume {out}: it has no checkpoint.pt; start a new run with --out")
            recipe = make_recipe(apply_overrides(load_checkpoint(out / "checkpoint.pt")["recipe"], overrides))
    else:
        if args.force:
            raise ConfigError("--force only applies with --resume")
        recipe = load_recipe(args.recipe, overrides)
        name = Path(args.recipe).stem if args.recipe else "default"
        out = Path(args.out) if args.out else Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    result = train(recipe, out, overwrite=args.overwrite, progress=not args.no_progress,
                   resume=bool(args.resume), force=args.force)
    final = result.run_info["final"]
    print(
        f"test bound {final['test_elbo']:.2f} ± {final['test_elbo_se']:.2f} nats/datapoint, "
        f"train {final['train_elbo']:.2f}, after {result.run_info['samples']:,} samples in "
        f"{result.run_info['train_seconds']:.1f} s (KL: {result.run_info['kl']}); run: {result.run_dir}"
    )


def _evaluate(args) -> None:
    import pyro

    from .data import load_dataset
    from .evaluation import average_bound
    from .estimators import kl_status
    from .run import load
    from .train import prepare_data, resolve_device

    vae = load(args.run_dir, device=args.device)
    recipe = vae.recipe
    if args.data_dir:
        recipe.data_dir = args.data_dir
    data = prepare_data(recipe, resolve_device(str(next(vae.parameters()).device)),
                        load_dataset(recipe.dataset, recipe.data_dir or None))
    x = {"test": data.test, "train": data.train_eval}[args.split]
    kl = kl_status(vae.model, vae.guide, x[: recipe.batch_size])
    particles = args.num_particles or recipe.eval_particles
    bound = average_bound(vae.model, vae.guide, x, particles, analytic_kl=kl == "analytic")
    result = {"split": args.split, "n": bound.n, "elbo": bound.mean, "elbo_se": bound.se,
              "num_particles": particles, "kl": kl, "run_dir": str(args.run_dir)}
    if args.chunk_size is None:
        from .likelihood import DEFAULT_CHUNK_SIZE

        args.chunk_size = DEFAULT_CHUNK_SIZE
    if args.num_samples:
        from .diagnostics import likelihood_summary

        if args.num_samples <= 0 or args.chunk_size <= 0 or args.khat_points < 0:
            raise ConfigError("--num-samples and --chunk-size must be positive, --khat-points >= 0")
        if args.seed is not None:
            pyro.set_rng_seed(args.seed)
        summary = likelihood_summary(vae.model, vae.guide, x, args.num_samples, args.chunk_size,
                                     args.khat_points, progress=not args.no_progress)
        result.update(log_likelihood=summary["log_likelihood"], log_likelihood_se=summary["log_likelihood_se"],
                      num_samples=summary["num_samples"], ess_mean=summary["ess_mean"],
                      ess_min=summary["ess_min"], khat=summary["khat"])
    if args.amortization_gap is not None:
        from .amortization import amortization_gap_summary

        if args.amortization_gap <= 0 or args.gap_steps < 0 or args.gap_lr <= 0:
            raise ConfigError("--amortization-gap must be positive, --gap-steps >= 0 and --gap-lr > 0")
        if args.seed is not None:
            pyro.set_rng_seed(args.seed)
        result["amortization_gap"] = amortization_gap_summary(
            vae.model, vae.guide, x, num_points=args.amortization_gap, num_steps=args.gap_steps, lr=args.gap_lr,
            num_samples=args.num_samples or 1000, chunk_size=args.chunk_size, progress=not args.no_progress)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.split}: average lower bound {bound.mean:.2f} ± {bound.se:.2f} nats per datapoint "
          f"(n={bound.n}, L={particles}, KL: {kl})")
    if args.num_samples:
        k = result["khat"]
        print(f"{args.split}: log-likelihood {result['log_likelihood']:.2f} ± {result['log_likelihood_se']:.2f} "
              f"nats per datapoint (importance sampling, K={args.num_samples}); mean ESS "
              f"{result['ess_mean']:.1f} of {args.num_samples}; PSIS k-hat on {k['n']} points: "
              + ", ".join(f"{name} {count}" for name, count in k["counts"].items()))
    if args.amortization_gap is not None:
        g = result["amortization_gap"]
        print(f"{args.split}: on {g['n']} datapoints, log p(x) {g['log_likelihood']:.2f} (K={g['num_samples']}), "
              f"ELBO of the locally optimised q {g['elbo_optimized']:.2f}, of the encoder's q "
              f"{g['elbo_amortized']:.2f}: approximation gap {g['approximation_gap']:.2f} ± "
              f"{g['approximation_gap_se']:.2f}, amortization gap {g['amortization_gap']:.2f} ± "
              f"{g['amortization_gap_se']:.2f} nats ({100 * g['amortization_fraction']:.0f}% of the gap)")


def _sample(args) -> None:
    import torch

    from .plots import save_grid
    from .run import load

    vae = load(args.run_dir, device=args.device)
    if args.n <= 0:
        raise ConfigError(f"-n must be a positive number of samples, got {args.n}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(vae.sample(args.n), vae.image_shape, out, nrow=max(1, int(args.n**0.5)))
    print(f"wrote {args.n} samples to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyro-aevb", description="Auto-Encoding Variational Bayes with Pyro.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a VAE from a recipe (default: mnist-5k, offline)")
    p.add_argument("recipe", nargs="?", help="a .toml path or a recipe name in models/")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/NAME-TIMESTAMP)")
    p.add_argument("--data-dir", help="where data files live (default: $PYRO_AEVB_DATA)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int)
    p.add_argument("--overwrite", action="store_true", help="start afresh in an existing --out (the old one is moved aside)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint, exactly")
    p.add_argument("--force", action="store_true", help="with --resume: accept a changed recipe")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="average lower bound per datapoint of a trained run")
    p.add_argument("run_dir")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--num-particles", type=int, help="samples of z per datapoint (default: the recipe's)")
    p.add_argument("--data-dir")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--num-samples", type=int, help="also estimate log p(x) by importance sampling with K samples")
    p.add_argument("--chunk-size", type=int,
                   help="particles x datapoints per pass (memory; default 20000)")
    p.add_argument("--khat-points", type=int, default=100, help="datapoints whose PSIS k-hat is computed")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--amortization-gap", type=int, metavar="N",
                   help="also the approximation and amortization gaps on N datapoints (a fixed random subset); "
                        "log p(x) uses --num-samples (default 1000)")
    p.add_argument("--gap-steps", type=int, default=500, help="Adam steps of each local q (default 500)")
    p.add_argument("--gap-lr", type=float, default=0.02, help="initial Adam step size of each local q (default 0.02)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("sample", help="a grid of samples from a trained run")
    p.add_argument("run_dir")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.set_defaults(func=_sample)
    from . import bench, compare, figure3, grad_variance

    compare.register(sub)
    figure3.register(sub)
    grad_variance.register(sub)
    bench.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        tune_cpu_allocator()  # every command's CPU work reuses freed memory (see pyro_aevb.cpu_allocator)
        args.func(args)
    except AEVBError as e:
        if debug:
            raise
        print(f"pyro-aevb: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("pyro-aevb: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
