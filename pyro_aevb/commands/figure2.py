r"""``pyro-aevb figure2``: the AEVB paper's Figure 2, AEVB against wake-sleep in every panel.

Kingma & Welling (2013, Sec. 5, Figure 2) compare AEVB with wake-sleep on MNIST with
Nz = 3, 5, 10, 20 and 200 and on Frey Face with Nz = 2, 5, 10 and 20: the average lower bound per
datapoint against the number of training samples evaluated, on a log axis, training bound solid,
test bound dashed.

Each (panel, estimator) is an ordinary run directory, ``OUT/<recipe>/<estimator>/``, trained from
the panel's shipped recipe (``models/mnist_nz3.toml``, ...) with ``estimator`` and ``max_samples`` set
(and the command's ``--set`` overrides), so it can equally be made by ``pyro-aevb train RECIPE --set
estimator=... --out OUT/<recipe>/<estimator>``. The command trains what is missing, resumes what was
interrupted (``--resume``, exactly), continues a finished run to a larger budget, and collects what
is done; then it writes ``OUT/figure2.json`` (every curve, final bounds) and ``OUT/figure2.png``.
Both estimators of a panel start from the same initial parameters (same recipe, same seed).

Beside each run it sets the paper's own curve: ``models/figure2_paper.csv`` holds Figure 2 as printed in
arXiv:1312.6114v10, read from the vector paths of its PDF (``benchmarks/paper_figure2.py``: each panel
calibrated on its tick marks, the curves resampled every 0.05 decade of samples where the printed panel
shows them; about 1 nat on MNIST and 5 on Frey Face). The figure draws it faint behind ours, and the
table and ``figure2.json`` give its value at the run's last evaluation (``paper_train``,
``paper_test``; ``None`` where the printed curve does not reach those samples).
"""

from __future__ import annotations

import csv
import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..config import RECIPE_DIR, Recipe, load_recipe, make_recipe
from ..errors import ConfigError
from ..infer.registry import estimator_label
from ..training.loop import train
from ..training.checkpoint import load_checkpoint
from ..training.run_directory import read_metrics
from .common import add_data_arguments, overrides_of, run_recipe, single_process

MNIST_PANELS = ("mnist_nz3", "mnist_nz5", "mnist_nz10", "mnist_nz20", "mnist_nz200")
FREY_PANELS = ("frey_nz2", "frey_nz5", "frey_nz10", "frey_nz20")
PANELS = MNIST_PANELS + FREY_PANELS
ESTIMATORS = ("sgvb-b", "wake-sleep")
PAPER_CSV = RECIPE_DIR / "figure2_paper.csv"


@lru_cache(maxsize=1)
def paper_curves() -> dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]:
    """The paper's Figure 2: ``(panel, estimator, split) -> (log10 samples, bound)``, 36 curves (none if the
    file is missing: the figure is then drawn without them)."""
    curves: dict = {}
    if not PAPER_CSV.is_file():
        return curves
    with open(PAPER_CSV, newline="") as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            key = (row["panel"], row["estimator"], row["split"])
            curves.setdefault(key, ([], []))
            curves[key][0].append(float(row["log10_samples"]))
            curves[key][1].append(float(row["bound"]))
    return {key: (np.array(x), np.array(y)) for key, (x, y) in curves.items()}


def paper_bound(panel: str, estimator: str, split: str, samples: float) -> float | None:
    """The paper's bound at ``samples`` training samples, interpolated in log10 samples; ``None`` where
    the paper has no such curve or its printed curve does not reach ``samples``."""
    curve = paper_curves().get((panel, estimator, split))
    if curve is None or samples <= 0:
        return None
    x, y = curve
    at = math.log10(samples)
    return float(np.interp(at, x, y)) if x[0] - 1e-9 <= at <= x[-1] + 1e-9 else None


def panel_recipe(panel: str, estimator: str, budget: int, overrides: list[str]) -> Recipe:
    """The shipped recipe of ``panel`` with the estimator, the budget and ``overrides``; the evaluation
    every budget/100 samples unless ``overrides`` set ``eval_every``."""
    recipe = load_recipe(panel, overrides)
    extra = {"estimator": estimator, "estimator_options": {}, "max_samples": budget}
    if not any(o.split("=", 1)[0].strip() == "eval_every" for o in overrides):
        extra["eval_every"] = max(1, budget // 100)
    return make_recipe(extra, base=recipe)


def run_state(run_dir: Path) -> tuple[str, int]:
    """(``"missing"`` | ``"interrupted"`` | ``"complete"``, training samples done) of a run directory."""
    info_path = run_dir / "run.json"
    if not (run_dir / "checkpoint.pt").is_file() or not info_path.is_file():
        return "missing", 0
    info = json.loads(info_path.read_text())
    if info.get("status") == "complete":
        return "complete", info["samples"]
    return "interrupted", 0


def train_panel(recipe: Recipe, run_dir: Path, progress: bool) -> str:
    """Train, resume or continue one run to ``recipe.max_samples``; returns what was done.

    A run already there goes on with its own recipe (from its checkpoint), only the budget set: an
    interrupted one exactly from its checkpoint, a finished shorter one on to the larger budget."""
    state, samples = run_state(run_dir)
    if state == "complete" and samples >= recipe.max_samples:
        return "collected"
    if state == "missing":
        train(recipe, run_dir, overwrite=run_dir.exists(), progress=progress)
        return "trained"
    own = run_recipe(run_dir, [f"max_samples={recipe.max_samples}"])
    saved = load_checkpoint(run_dir / "checkpoint.pt")["recipe"]
    train(own, run_dir, progress=progress, resume=True, force=saved["max_samples"] != own.max_samples)
    return "resumed" if state == "interrupted" else "continued"


def figure2(out_dir: str | Path, panels=PANELS, estimators=ESTIMATORS, budget: int = 10_000_000,
            overrides: list[str] | None = None, collect_only: bool = False, progress: bool = False) -> dict:
    """Train or collect every (panel, estimator) run under ``out_dir``; write figure2.json and figure2.png."""
    out_dir = Path(out_dir)
    overrides = list(overrides or [])
    figure = {"budget": budget, "overrides": overrides, "panels": {}}
    for panel in panels:
        curves = {}
        for estimator in estimators:
            run_dir = out_dir / panel / estimator
            if collect_only:
                action = "collected" if run_state(run_dir)[0] != "missing" else "missing"
            else:
                action = train_panel(panel_recipe(panel, estimator, budget, overrides), run_dir, progress)
            rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["samples"] <= budget]
            last = rows[-1]["samples"] if rows else 0
            curves[estimator] = {"action": action, "run_dir": str(run_dir),
                                 "samples": [r["samples"] for r in rows],
                                 "train_elbo": [r["train_elbo"] for r in rows],
                                 "test_elbo": [r["test_elbo"] for r in rows],
                                 "final": rows[-1] if rows else None,
                                 "paper_train": paper_bound(panel, estimator, "train", last),
                                 "paper_test": paper_bound(panel, estimator, "test", last)}
        figure["panels"][panel] = curves
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "figure2.json").write_text(json.dumps(figure, indent=1) + "\n")
    plot_figure2(figure, out_dir / "figure2.png")
    return figure


def plot_figure2(figure: dict, path: Path) -> None:
    """One panel per recipe, MNIST on the top row and Frey Face below, as in the paper."""
    from ..plots import plot_train_test, plt

    panels = list(figure["panels"])
    rows = [[p for p in panels if p.startswith("mnist")], [p for p in panels if not p.startswith("mnist")]]
    rows = [r for r in rows if r]
    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.6 * ncols, 3.2 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(row):
                ax.set_axis_off()
                continue
            curves = {e: c for e, c in figure["panels"][row[j]].items() if c["samples"]}
            series = {estimator_label(e): (c["samples"], c["train_elbo"], c["test_elbo"]) for e, c in curves.items()}
            dataset, nz = row[j].split("_nz")
            colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
            for estimator, colour in zip(curves, colours):  # the paper's curves, faint and wide, behind ours
                for split, style in (("train", "-"), ("test", "--")):
                    paper = paper_curves().get((row[j], estimator, split))
                    if paper is not None:
                        ax.plot(10 ** paper[0], paper[1], style, color=colour, lw=3, alpha=0.3,
                                label=f"paper: {estimator_label(estimator)}" if split == "train" else None)
            plot_train_test(series, path, "bound per datapoint" if j == 0 else "",
                            f"{'MNIST' if dataset == 'mnist' else 'Frey Face'}, $N_z$ = {nz}", ax=ax,
                            colours=colours, marker="o")
            ax.legend(fontsize="xx-small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(figure: dict) -> str:
    """One line per run: its last bounds, and the paper's test bound at the same training samples."""
    lines = [f"{'panel':<12} {'estimator':<12} {'samples':>12} {'train bound':>12} {'test bound':>18} "
             f"{'paper test':>11} {'action':>10}"]
    for panel, curves in figure["panels"].items():
        for estimator, c in curves.items():
            f = c["final"]
            if f is None:
                lines.append(f"{panel:<12} {estimator:<12} {'-':>12} {'-':>12} {'-':>18} {'-':>11} {c['action']:>10}")
                continue
            test = f"{f['test_elbo']:.2f} ± {f['test_elbo_se']:.2f}"
            paper = "-" if c.get("paper_test") is None else f"{c['paper_test']:.1f}"
            lines.append(f"{panel:<12} {estimator:<12} {f['samples']:>12,} {f['train_elbo']:>12.2f} {test:>18} "
                         f"{paper:>11} {c['action']:>10}")
    return "\n".join(lines)


def parse_names(text: str, valid: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if not names or unknown:
        raise ConfigError(f"--{what} {text!r}: give names separated by commas from {', '.join(valid)}")
    return names


def command(args) -> None:
    single_process("figure2")
    budget = int(float(args.budget))
    if not math.isfinite(float(args.budget)) or budget <= 0:
        raise ConfigError(f"--budget must be a positive number of training samples, got {args.budget}")
    figure = figure2(args.out, parse_names(args.panels, PANELS, "panels"),
                     parse_names(args.estimators, ESTIMATORS, "estimators"), budget, overrides_of(args),
                     collect_only=args.collect_only, progress=not args.no_progress)
    print(format_table(figure))
    print(f"(average lower bound per datapoint, nats, at up to {budget:,} training samples; paper test: the "
          "paper's Figure 2 at the same samples, read from its PDF) -> "
          f"{args.out}/figure2.json, {args.out}/figure2.png")


def register(subparsers, help: str = "") -> None:
    p = subparsers.add_parser("figure2", help=help, description=help)
    p.add_argument("--out", required=True, help="the figure's folder: one run directory per panel and estimator")
    p.add_argument("--budget", default="1e7", help="training samples per run (default 1e7; the paper's: 1e8)")
    p.add_argument("--panels", default=",".join(PANELS), help=f"recipes, comma-separated (default: all {len(PANELS)})")
    p.add_argument("--estimators", default=",".join(ESTIMATORS), help="default: sgvb-b,wake-sleep")
    p.add_argument("--collect-only", action="store_true", help="draw from the run directories there, train nothing")
    add_data_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=command)
