r"""``pyro-aevb compare``: the AEVB paper's Figure 2, estimators side by side.

Every estimator trains the same VAE from the same initial parameters, with
the same seed, data and budget of training samples; only the gradient
estimator differs. Each run is an ordinary run directory (``OUT/<name>/``);
``OUT/comparison.json`` collects the bound against samples, ``OUT/bound.png``
draws them (train solid, test dashed) and a table is printed.

Options for one estimator: ``--option NAME:KEY=VALUE`` (repeatable), e.g.
``--option score-function:baseline=neural``. The key ``num_particles`` sets
that estimator's L or K (``--option iwae:num_particles=5``). ``--set`` changes
the recipe for all of them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..config import Recipe, check_options, factory_options, load_recipe, make_recipe, parse_value
from ..data import load_dataset
from ..errors import ConfigError
from ..infer.registry import ESTIMATORS
from ..training.loop import train
from ..training.setup import initial_vae
from .common import add_run_arguments, default_out_dir, overrides_of, single_process

DEFAULT_ESTIMATORS = "sgvb-b,wake-sleep"


def parse_estimators(text: str) -> list[str]:
    """``"sgvb-b,wake-sleep"`` -> registered names, in order, each once."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--estimators is empty; give names separated by commas, e.g. sgvb-b,wake-sleep")
    for name in names:
        if name not in ESTIMATORS:
            raise ConfigError(f"unknown estimator '{name}' in --estimators; valid estimators: {', '.join(ESTIMATORS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--estimators names an estimator twice: {text}")
    return names


def parse_options(items: list[str] | None, names: list[str]) -> dict[str, dict]:
    """``["score-function:baseline=neural", ...]`` -> {name: {key: value}}; values are TOML literals or bare words."""
    options: dict[str, dict] = {name: {} for name in names}
    for item in items or []:
        head, eq, raw = item.partition("=")
        name, colon, key = head.partition(":")
        name, key, raw = name.strip(), key.strip(), raw.strip()
        if not (eq and colon and name and key):
            raise ConfigError(f"--option expects NAME:KEY=VALUE, got {item!r}")
        if name not in options:
            raise ConfigError(f"--option {item!r}: '{name}' is not in --estimators ({', '.join(names)})")
        options[name][key] = parse_value(raw)
    return options


def estimator_recipe(recipe: Recipe, name: str, options: dict, data_dim: int) -> Recipe:
    """The recipe of one estimator's run: ``estimator = name`` and its own options, checked.

    ``num_particles`` in ``options`` sets the recipe's L; ``data_dim`` is filled
    in where the estimator takes it (the score function's neural baseline).
    The recipe's own ``estimator_options`` apply to the recipe's estimator only.
    """
    options = dict(options)
    overrides = {"estimator": name, "estimator_options": {}}
    if "num_particles" in options:
        overrides["num_particles"] = options.pop("num_particles")
    if name == recipe.estimator:
        options = {**recipe.estimator_options, **options}
    if "data_dim" in factory_options(ESTIMATORS[name]) and "data_dim" not in options:
        options["data_dim"] = data_dim
    overrides["estimator_options"] = check_options(ESTIMATORS[name], options, "estimator_options",
                                                   f"estimator '{name}'")
    return make_recipe(overrides, base=recipe)


def initial_state(recipe: Recipe, dataset) -> dict[str, torch.Tensor]:
    """The VAE parameters every run starts from: :func:`~pyro_aevb.training.setup.initial_vae`, as ``train``
    builds them (on the CPU)."""
    vae = initial_vae(recipe, dataset.dim, dataset.train)
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of the parameters' bytes, in key order: equal digests, equal starting points."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def compare(recipe: Recipe, names: list[str], out_dir: str | Path, options: dict[str, dict] | None = None,
            dataset=None, overwrite: bool = False, progress: bool = False) -> dict:
    """Train each estimator in ``names`` from the same start; write ``out_dir``; return comparison.json's content."""
    from ..plots import plot_bound

    out_dir = Path(out_dir)
    options = options or {}
    dataset = dataset or load_dataset(recipe.dataset, recipe.data_dir or None)
    recipes = {name: estimator_recipe(recipe, name, options.get(name, {}), dataset.dim) for name in names}
    for name in names:  # fail before training anything, not after the first run
        run_dir = out_dir / name
        if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
            raise ConfigError(f"run directory {run_dir} already exists; choose another --out, or pass --overwrite")
    state = initial_state(recipe, dataset)
    digest = state_digest(state)

    results, curves = {}, {}
    for name in names:
        result = train(recipes[name], out_dir / name, overwrite=overwrite, progress=progress, dataset=dataset,
                       initial_state=state)
        rows = result.metrics
        curves[name] = rows
        results[name] = {
            "samples": [r["samples"] for r in rows],
            "train_elbo": [r["train_elbo"] for r in rows],
            "test_elbo": [r["test_elbo"] for r in rows],
            "final_test_elbo": rows[-1]["test_elbo"],
            "final_test_elbo_se": rows[-1]["test_elbo_se"],
            "final_train_elbo": rows[-1]["train_elbo"],
            "train_seconds": result.run_info["train_seconds"],
            "num_particles": recipes[name].num_particles,
            "estimator_options": recipes[name].estimator_options,
            "run_dir": str(result.run_dir),
        }
    comparison = {
        "estimators": results,
        "recipe": recipe.to_dict(),
        "dataset": dataset.name,
        "initial_state_sha256": digest,
    }
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    title = f"{dataset.name}, $N_z$={recipe.latent_dim}: same start, same budget"
    plot_bound(curves, out_dir / "bound.png", title=title)
    return comparison


def format_table(comparison: dict) -> str:
    """One line per estimator: final samples, train and test bound (nats per datapoint), seconds."""
    lines = [f"{'estimator':<24} {'samples':>12} {'train bound':>12} {'test bound':>18} {'seconds':>9}"]
    for name, r in comparison["estimators"].items():
        test = f"{r['final_test_elbo']:.2f} ± {r['final_test_elbo_se']:.2f}"
        lines.append(f"{name:<24} {r['samples'][-1]:>12,} {r['final_train_elbo']:>12.2f} {test:>18} "
                     f"{r['train_seconds']:>9.1f}")
    return "\n".join(lines)


def command(args) -> None:
    single_process("compare")
    names = parse_estimators(args.estimators)
    options = parse_options(args.option, names)
    recipe = load_recipe(args.recipe, overrides_of(args))
    out = Path(args.out) if args.out else default_out_dir("compare", args.recipe)
    comparison = compare(recipe, names, out, options, overwrite=args.overwrite, progress=not args.no_progress)
    print(format_table(comparison))
    print(f"(average lower bound per datapoint, nats; same initial parameters "
          f"{comparison['initial_state_sha256'][:12]}, seed {recipe.seed}) -> {out}/comparison.json, {out}/bound.png")


def register(subparsers, help: str = "") -> None:
    """Add ``compare`` to the ``pyro-aevb`` command's subparsers."""
    p = subparsers.add_parser("compare", help=help, description=help)
    p.add_argument("recipe", nargs="?", help="a .toml path or a recipe name in models/")
    p.add_argument("--estimators", default=DEFAULT_ESTIMATORS,
                   help=f"registered names, comma-separated (default: {DEFAULT_ESTIMATORS})")
    add_run_arguments(p, "compare", "score-function:baseline=neural")
    p.set_defaults(func=command)
