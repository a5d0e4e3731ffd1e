"""``pyro-aevb train``: train a VAE from a recipe, or continue a run exactly with ``--resume``."""

from __future__ import annotations

from pathlib import Path

from ..config import load_recipe
from ..errors import ConfigError
from ..training.distributed import world
from ..training.loop import train
from .common import add_data_arguments, default_out_dir, overrides_of, run_recipe


def command(args) -> None:
    overrides = overrides_of(args) + (["tensorboard=true"] if args.tensorboard else [])
    if args.resume:
        if args.out or args.overwrite:
            raise ConfigError("--resume DIR continues DIR; it takes neither --out nor --overwrite")
        out = Path(args.resume)
        # the run's own recipe, with any overrides on top (which only --force accepts)
        recipe = load_recipe(args.recipe, overrides) if args.recipe else run_recipe(out, overrides)
    else:
        if args.force:
            raise ConfigError("--force only applies with --resume")
        recipe = load_recipe(args.recipe, overrides)
        out = Path(args.out) if args.out else default_out_dir("", args.recipe)
    result = train(recipe, out, overwrite=args.overwrite, progress=not args.no_progress,
                   resume=bool(args.resume), force=args.force)
    if not world().main:  # under torchrun, rank 0 reports
        return
    final, info = result.run_info["final"], result.run_info
    print(f"test bound {final['test_elbo']:.2f} ± {final['test_elbo_se']:.2f} nats/datapoint, "
          f"train {final['train_elbo']:.2f}, after {info['samples']:,} samples in {info['train_seconds']:.1f} s "
          f"(KL: {info['kl']}); run: {result.run_dir}")


def register(subparsers, help: str = "") -> None:
    p = subparsers.add_parser("train", help=help, description=help)
    p.add_argument("recipe", nargs="?", help="a .toml path or a recipe name in models/")
    p.add_argument("--out", help="run directory (default: runs/NAME-TIMESTAMP)")
    add_data_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="start afresh in an existing --out (the old one is moved aside)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint, exactly")
    p.add_argument("--force", action="store_true", help="with --resume: accept a changed recipe")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the metrics as TensorBoard scalars to RUN/tensorboard/ (recipe key tensorboard)")
    p.set_defaults(func=command)
