"""``pyro-aevb sample``: a grid of samples from a trained run."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .common import single_process
from ..training.run_directory import load


def command(args) -> None:
    single_process("sample")
    from ..plots import save_grid

    vae = load(args.run_dir, device=args.device)
    if args.n <= 0:
        raise ConfigError(f"-n must be a positive number of samples, got {args.n}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(vae.sample(args.n), vae.image_shape, out, nrow=max(1, int(args.n**0.5)))
    print(f"wrote {args.n} samples to {out}")


def register(subparsers, help: str = "") -> None:
    p = subparsers.add_parser("sample", help=help, description=help)
    p.add_argument("run_dir")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.set_defaults(func=command)
