"""The ``pyro-aevb`` command (also ``python -m pyro_aevb``): train, evaluate, sample, compare, figure3,
grad-variance, bench.

Errors a user can fix print one line, ``pyro-aevb: error: ...``, with no
traceback, and exit non-zero (2 for usage errors). ``pyro-aevb --debug ...``
shows the traceback. Only the module of the command that runs is imported, so
``pyro-aevb --help`` answers without loading PyTorch.
"""

from __future__ import annotations

import importlib
import os
import sys

from ..errors import AEVBError, ConfigError
from ..version import __version__
from .common import Parser

#: command -> (module in pyro_aevb.commands, one-line help)
COMMANDS = {
    "train": ("train", "train a VAE from a recipe (default: mnist-5k, offline)"),
    "evaluate": ("evaluate", "average lower bound per datapoint of a trained run (and log p(x), diagnostics)"),
    "sample": ("sample", "a grid of samples from a trained run"),
    "compare": ("compare", "train several estimators from the same start (Figure 2)"),
    "figure2": ("figure2", "the paper's Figure 2: AEVB against wake-sleep, every panel, one figure"),
    "figure3": ("figure3", "marginal likelihood against training samples: AEVB, wake-sleep, MCEM (Figure 3)"),
    "grad-variance": ("grad_variance", "gradient variance and SNR of each estimator on one minibatch"),
    "bench": ("bench", "time training steps against a hand-written PyTorch reference"),
}


def build_parser(only: str | None = None) -> Parser:
    """The parser; with ``only``, just that command's options are built (the others are listed by name)."""
    parser = Parser(prog="pyro-aevb", description="Auto-Encoding Variational Bayes with Pyro.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"pyro-aevb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (module, help) in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(f"{__package__}.{module}").register(sub, help)
        else:
            sub.add_parser(name, help=help)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug, rank = "--debug" in argv, 0
    try:
        command = next((a for a in argv if a in COMMANDS), "")  # "": no command's options are needed
        args = build_parser(command).parse_args(argv)
        os.environ.setdefault("MPLBACKEND", "Agg")  # figures are files: no display on servers or in CI
        from ..training import distributed
        from ..training.cpu_allocator import tune_cpu_allocator

        tune_cpu_allocator()  # every command's CPU work reuses freed memory (see pyro_aevb.training.cpu_allocator)
        if distributed.launched():  # torchrun: join the process group (gloo; NCCL on CUDA)
            rank = distributed.init().rank
        finished = False
        try:
            args.func(args)
            finished = True
        finally:
            distributed.shutdown(finished)
    except AEVBError as e:
        if debug:
            raise
        if rank == 0 or not isinstance(e, ConfigError):  # a usage error is the same on every rank: say it once
            print(f"pyro-aevb: error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("pyro-aevb: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
