"""What the commands share: output folder names, a run's own recipe with overrides, common options.

Light at import (the standard library only), so that ``pyro-aevb --help`` stays fast.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from ..errors import ConfigError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other usage error
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def default_out_dir(prefix: str, recipe: str | None) -> Path:
    """``runs/PREFIX-NAME-TIMESTAMP`` (``runs/NAME-TIMESTAMP`` without a prefix), NAME the recipe's stem."""
    name = Path(recipe).stem if recipe else "default"
    return Path("runs") / "-".join(filter(None, (prefix, name, f"{datetime.now():%Y%m%d-%H%M%S}")))


def overrides_of(args) -> list[str]:
    """A command's ``--set`` overrides, with its ``--data-dir``, ``--device`` and ``--seed``."""
    from ..config import command_line_overrides

    return command_line_overrides(getattr(args, "set", None), getattr(args, "data_dir", None),
                                  getattr(args, "device", None), getattr(args, "seed", None))


def run_recipe(run_dir: str | Path, overrides: list[str]):
    """The recipe a run directory was trained with (from its checkpoint), with ``overrides`` on top."""
    from ..config import apply_overrides, make_recipe
    from ..training.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(f"{run_dir} has no checkpoint.pt: it is not a run directory; train one with "
                          "`pyro-aevb train --out DIR`")
    return make_recipe(apply_overrides(load_checkpoint(run_dir / "checkpoint.pt")["recipe"], overrides))


def single_process(command: str) -> None:
    """Refuse, in one line, a command that runs in one process only when torchrun started several."""
    from ..training.distributed import world

    if world().distributed:
        raise ConfigError(f"`pyro-aevb {command}` runs in one process: launch it without torchrun (only `train` "
                          "and `evaluate` run data-parallel)")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """``--set``, ``--data-dir``, ``--device`` and ``--seed``: the recipe overrides every training command takes."""
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--data-dir", help="where data files live (default: $PYRO_AEVB_DATA)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int)


def add_run_arguments(p: argparse.ArgumentParser, command: str, option_example: str) -> None:
    """The options every multi-estimator command shares (``compare``, ``figure3``)."""
    p.add_argument("--option", action="append", metavar="NAME:KEY=VALUE",
                   help=f"an option of one estimator, e.g. {option_example} (repeatable)")
    add_data_arguments(p)
    p.add_argument("--out", help=f"output directory (default: runs/{command}-NAME-TIMESTAMP)")
    p.add_argument("--overwrite", action="store_true", help="write into existing run directories")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
