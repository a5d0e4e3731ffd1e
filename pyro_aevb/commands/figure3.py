r"""``pyro-aevb figure3``: the AEVB paper's Figure 3, the marginal likelihood against training samples.

Kingma & Welling (2013, Sec. 5) compare AEVB with wake-sleep and Monte Carlo EM
(:mod:`pyro_aevb.infer.mcem`) on MNIST with a small latent space (Nz = 3, 100 hidden
units) and two training-set sizes (1,000 and 50,000 points), measuring the
estimated marginal log-likelihood :math:`\log p_\theta(x)` of training and
test points with the Appendix D estimator
(:func:`pyro_aevb.evaluation.appendix_d.hmc_log_likelihood`),
which is reliable only for such small latent spaces.

For each estimator every run starts from the same initial parameters
(:func:`pyro_aevb.commands.compare.initial_state`). It is trained to the first budget of
training samples, evaluated, then continued exactly from its checkpoint
(``train(..., resume=True, force=True)`` with the next, larger budget), and so
on. At every budget :math:`\log p_\theta(x)` is estimated on ``eval_points``
training and test points: a fixed random subset of each split (``subset="random"``,
the rows ``evaluate --max-datapoints`` scores), or the first ones (``"first"``).
``train_size`` likewise keeps a fixed random subset of the training set, or its
first points: mnist-5k's splits are sorted by digit and binarized MNIST's test
split comes in blocks of similar digits, so the first points are not a sample.
``OUT/figure3.json`` holds the curves, ``OUT/figure3.png`` draws them (train solid, test dashed, log x-axis,
as in the paper) and a table is printed.

.. warning:: The Appendix D estimator's NUTS chains cost a few seconds a datapoint on a CPU with one
   chain per datapoint (``--points-per-chain 1``); the default runs 50 datapoints in one chain on the
   product of their posteriors, which gives the same estimates, several times faster (RESULTS.md). The
   command's default ``--eval-points`` is 100; the paper used 1000. The log-estimate is biased upwards
   for a finite number of HMC samples.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import Recipe, load_recipe, make_recipe
from ..data import Dataset, load_dataset
from ..errors import ConfigError
from ..evaluation.appendix_d import hmc_log_likelihood
from ..evaluation.bounds import SUBSET_RULES, SUBSET_SEED, mean_se, subset_rows
from ..training.loop import train
from .common import add_run_arguments, default_out_dir, overrides_of, single_process
from .compare import estimator_recipe, initial_state, parse_estimators, parse_options, state_digest

DEFAULT_ESTIMATORS = "sgvb-b,wake-sleep,mcem"
DEFAULT_BUDGETS = "1e4,1e5,1e6,1e7"
#: Datapoints per NUTS chain (:func:`pyro_aevb.evaluation.appendix_d.hmc_log_likelihood`'s ``points_per_chain``).
DEFAULT_POINTS_PER_CHAIN = 50


def parse_budgets(text: str) -> list[int]:
    """``"1e4,1e5"`` -> [10000, 100000]: positive and strictly increasing."""
    try:
        budgets = [int(float(b)) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--budgets expects numbers separated by commas, e.g. 1e4,1e5; got {text!r}") from None
    if not budgets or budgets[0] <= 0 or any(b <= a for a, b in zip(budgets, budgets[1:])):
        raise ConfigError(f"--budgets must be positive and strictly increasing, got {text!r}")
    return budgets


def subset_dataset(dataset, train_size: int | None, subset: str = "random"):
    """The data set with only ``train_size`` of its training points (None: all of them): a fixed random
    subset, in the split's order, or the first ``train_size`` (``subset="first"``)."""
    if train_size is None:
        return dataset
    n = dataset.train.shape[0]
    if not 0 < train_size <= n:
        raise ConfigError(f"--train-size must lie in 1..{n} (the training set of '{dataset.name}'), got {train_size}")
    rows = subset_rows(n, train_size, subset).sort().values  # (train_size,)
    labels = dataset.train_labels[rows] if dataset.train_labels is not None else None
    which = f"first {train_size:,}" if subset == "first" else f"a fixed random {train_size:,} (seed {SUBSET_SEED})"
    return Dataset(name=dataset.name, train=dataset.train[rows], test=dataset.test,
                   image_shape=dataset.image_shape, binary=dataset.binary, train_labels=labels,
                   test_labels=dataset.test_labels, valid=dataset.valid,
                   source=f"{dataset.source} ({which} training points)",
                   load_seconds=dataset.load_seconds)


def evaluation_points(recipe: Recipe, dataset, eval_points: int,
                      subset: str = "random") -> tuple[torch.Tensor, torch.Tensor]:
    """``eval_points`` training and test points (a fixed random subset of each split, or the first ones),
    binarized once (fixed seed) for grey data."""
    train_x = dataset.train[subset_rows(dataset.train.shape[0], eval_points, subset)]
    test_x = dataset.test[subset_rows(dataset.test.shape[0], eval_points, subset)]
    if recipe.likelihood == "bernoulli" and not dataset.binary:
        gen = torch.Generator().manual_seed(recipe.seed + 54321)
        train_x, test_x = torch.bernoulli(train_x, generator=gen), torch.bernoulli(test_x, generator=gen)
    return train_x, test_x


def _log_likelihood(vae, x: torch.Tensor, hmc: dict) -> list[float]:
    """The Appendix D estimate of log p(x_i) for each row of x."""
    device = next(vae.parameters()).device
    return hmc_log_likelihood(vae.local_pair()[0], x.to(device), **hmc).detach().cpu().double().tolist()


def paired_differences(figure: dict, split: str) -> dict[str, list[tuple[float, float]]]:
    """For each estimator after the first, at each budget: mean and standard error of
    log p(x_i) [estimator] - log p(x_i) [first estimator] over the same evaluation points.

    Pairing removes the spread between datapoints, which dominates the unpaired standard errors.
    """
    names = list(figure["estimators"])
    base = figure["estimators"][names[0]][f"{split}_values"]
    out = {}
    for name in names[1:]:
        values = figure["estimators"][name][f"{split}_values"]
        out[name] = [mean_se([a - b for a, b in zip(v, b0)]) for v, b0 in zip(values, base)]
    return out


def figure3(recipe: Recipe, names: list[str], out_dir: str | Path, budgets: list[int],
            options: dict[str, dict] | None = None, dataset=None, train_size: int | None = None,
            subset: str = "random", eval_points: int = 100, hmc_samples: int = 100, warmup_steps: int | None = None,
            kernel: str = "nuts", points_per_chain: int = DEFAULT_POINTS_PER_CHAIN, overwrite: bool = False,
            progress: bool = False) -> dict:
    """Train each estimator in ``names`` through ``budgets``; estimate log p(x) at each; return figure3.json."""

    out_dir = Path(out_dir)
    options = options or {}
    if eval_points < 1 or hmc_samples < 2 or points_per_chain < 1:
        raise ConfigError(f"eval_points and points_per_chain must be >= 1 and hmc_samples >= 2, got "
                          f"{eval_points}, {points_per_chain}, {hmc_samples}")
    dataset = subset_dataset(dataset or load_dataset(recipe.dataset, recipe.data_dir or None), train_size, subset)
    recipes = {name: estimator_recipe(recipe, name, options.get(name, {}), dataset.dim) for name in names}
    for name in names:  # fail before training anything
        run_dir = out_dir / name
        if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
            raise ConfigError(f"run directory {run_dir} already exists; choose another --out, or pass --overwrite")
    state = initial_state(recipe, dataset)
    train_x, test_x = evaluation_points(recipe, dataset, eval_points, subset)
    hmc = {"num_samples": hmc_samples, "warmup_steps": warmup_steps, "kernel": kernel,
           "points_per_chain": points_per_chain}

    results = {}
    for name in names:
        curve = {"samples": [], "train_log_likelihood": [], "train_log_likelihood_se": [],
                 "test_log_likelihood": [], "test_log_likelihood_se": [], "train_seconds": [], "eval_seconds": [],
                 "train_values": [], "test_values": []}  # values: per budget, log p(x_i) of each point
        for k, budget in enumerate(budgets):
            r = make_recipe({"max_samples": budget}, base=recipes[name])
            if k == 0:
                result = train(r, out_dir / name, overwrite=overwrite, progress=progress, dataset=dataset,
                               initial_state=state)
            else:  # continue the same run exactly, to the larger budget
                result = train(r, out_dir / name, progress=progress, dataset=dataset, resume=True, force=True)
            t0 = time.time()
            result.vae.eval()
            train_values = _log_likelihood(result.vae, train_x, hmc)
            test_values = _log_likelihood(result.vae, test_x, hmc)
            (train_ll, train_se), (test_ll, test_se) = mean_se(train_values), mean_se(test_values)
            curve["train_values"].append(train_values)
            curve["test_values"].append(test_values)
            curve["samples"].append(result.run_info["samples"])
            curve["train_log_likelihood"].append(train_ll)
            curve["train_log_likelihood_se"].append(train_se)
            curve["test_log_likelihood"].append(test_ll)
            curve["test_log_likelihood_se"].append(test_se)
            curve["train_seconds"].append(result.run_info["train_seconds"])
            curve["eval_seconds"].append(round(time.time() - t0, 3))
        results[name] = {**curve, "num_particles": recipes[name].num_particles,
                         "estimator_options": recipes[name].estimator_options, "run_dir": str(out_dir / name)}
    figure = {
        "estimators": results,
        "recipe": recipe.to_dict(),
        "dataset": dataset.name,
        "n_train": dataset.train.shape[0],
        "eval_points": {"train": train_x.shape[0], "test": test_x.shape[0]},
        "subset": {"rule": subset, "seed": SUBSET_SEED if subset == "random" else None, "source": dataset.source},
        "hmc": {**hmc, "estimator": "Kingma & Welling (2013), Appendix D"},
        "initial_state_sha256": state_digest(state),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "figure3.json").write_text(json.dumps(figure, indent=2) + "\n")
    title = f"{dataset.name}, $N_z$={recipe.latent_dim}, N$_{{train}}$={dataset.train.shape[0]:,}"
    plot_log_likelihood(results, out_dir / "figure3.png", title=title)
    return figure


def plot_log_likelihood(results: dict[str, dict], path: Path, title: str = "") -> None:
    """Estimated marginal log-likelihood against training samples: train solid, test dashed, log x-axis."""
    from ..plots import plot_train_test

    series = {name: (r["samples"], r["train_log_likelihood"], r["test_log_likelihood"]) for name, r in results.items()}
    plot_train_test(series, path, r"marginal log-likelihood $\log p_\theta(x)$ (nats)", title, marker="o")


def format_table(figure: dict) -> str:
    """One line per (estimator, budget): samples, train and test log p(x) (nats per datapoint)."""
    lines = [f"{'estimator':<24} {'samples':>12} {'train log p(x)':>18} {'test log p(x)':>18}"]
    for name, r in figure["estimators"].items():
        for i, samples in enumerate(r["samples"]):
            train = f"{r['train_log_likelihood'][i]:.2f} ± {r['train_log_likelihood_se'][i]:.2f}"
            test = f"{r['test_log_likelihood'][i]:.2f} ± {r['test_log_likelihood_se'][i]:.2f}"
            lines.append(f"{name:<24} {samples:>12,} {train:>18} {test:>18}")
    names = list(figure["estimators"])
    if len(names) > 1 and all("train_values" in r for r in figure["estimators"].values()):
        lines.append(f"\npaired differences from {names[0]} on the same points (nats; ± standard error):")
        diffs = {split: paired_differences(figure, split) for split in ("train", "test")}
        for name in names[1:]:
            for i, samples in enumerate(figure["estimators"][name]["samples"]):
                if i >= len(diffs["train"][name]):
                    break
                train, test = (f"{d[name][i][0]:+.2f} ± {d[name][i][1]:.2f}" for d in (diffs["train"], diffs["test"]))
                lines.append(f"{name + ' - ' + names[0]:<24} {samples:>12,} {train:>18} {test:>18}")
    return "\n".join(lines)


def command(args) -> None:
    single_process("figure3")
    names = parse_estimators(args.estimators)
    options = parse_options(args.option, names)
    budgets = parse_budgets(args.budgets)
    recipe = load_recipe(args.recipe, overrides_of(args))
    out = Path(args.out) if args.out else default_out_dir("figure3", args.recipe)
    figure = figure3(recipe, names, out, budgets, options, train_size=args.train_size, subset=args.subset,
                     eval_points=args.eval_points, hmc_samples=args.hmc_samples, warmup_steps=args.warmup_steps,
                     kernel=args.kernel, points_per_chain=args.points_per_chain, overwrite=args.overwrite,
                     progress=not args.no_progress)
    print(format_table(figure))
    print(f"(Appendix D estimate of log p(x) per datapoint, nats, ± standard error over "
          f"{figure['eval_points']['train']} train / {figure['eval_points']['test']} test points, "
          f"{args.hmc_samples} HMC samples; N_train = {figure['n_train']:,}) -> {out}/figure3.json, {out}/figure3.png")


def register(subparsers, help: str = "") -> None:
    """Add ``figure3`` to the ``pyro-aevb`` command's subparsers."""
    p = subparsers.add_parser("figure3", help=help, description=help)
    p.add_argument("recipe", nargs="?", help="a .toml path or a recipe name in models/ (e.g. figure3_mnist_n1000)")
    p.add_argument("--estimators", default=DEFAULT_ESTIMATORS,
                   help=f"registered names, comma-separated (default: {DEFAULT_ESTIMATORS})")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS,
                   help=f"training samples at which to evaluate, increasing (default: {DEFAULT_BUDGETS})")
    p.add_argument("--train-size", type=int,
                   help="use only N training points, chosen by --subset (the paper: 1000 and 50000; default: all)")
    p.add_argument("--subset", choices=SUBSET_RULES, default="random",
                   help="which points --train-size and --eval-points keep: a fixed random subset, the same on "
                        "every call (default; the rows evaluate --max-datapoints scores), or the first N (the "
                        "splits may be sorted by digit)")
    p.add_argument("--eval-points", type=int, default=100,
                   help="training and test points on which log p(x) is estimated (default 100, for a CPU; "
                        "the paper used 1000)")
    p.add_argument("--hmc-samples", type=int, default=100,
                   help="L of the Appendix D estimator: L draws fit q, L more estimate (default 100)")
    p.add_argument("--warmup-steps", type=int, help="HMC warm-up draws per datapoint (default: L)")
    p.add_argument("--kernel", choices=["nuts", "hmc"], default="nuts", help="the HMC kernel (default nuts)")
    p.add_argument("--points-per-chain", type=int, default=DEFAULT_POINTS_PER_CHAIN,
                   help="datapoints sampled jointly by one chain, on the product of their posteriors "
                        f"(default {DEFAULT_POINTS_PER_CHAIN}; 1: a chain per datapoint, several times slower)")
    add_run_arguments(p, "figure3", "mcem:e_steps=2")
    p.set_defaults(func=command)
