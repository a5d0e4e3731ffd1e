"""Recipes: typed defaults, TOML files in ``models/`` and ``--set`` overrides.

A recipe is a short TOML file of overrides on the documented defaults of
:class:`Recipe`. Every key is type-checked; an unknown key is an error that
lists the valid ones. The resolved recipe is saved with every run and in every
checkpoint, so a run can be read, repeated and resumed from its directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from importlib import resources
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .data import DATASETS
from .errors import ConfigError
from .generative.priors import resolve_prior_factory
from .generative.registry import DIFFUSION_ESTIMATORS, MODELS
from .generative.vae import ACTIVATIONS, DECODER_VARIANCES
from .infer.registry import ESTIMATORS

#: Where the recipes shipped with the project live: the package ``pyro_aevb.recipes``, which is the
#: folder ``models/`` of the repository (an editable install) or inside the installed wheel.
def _recipe_dir() -> Path:
    try:
        return Path(str(resources.files("pyro_aevb.recipes")))
    except ModuleNotFoundError:  # a source tree on sys.path that was never installed
        return Path(__file__).resolve().parent.parent / "models"


RECIPE_DIR = _recipe_dir()


@dataclass
class Recipe:
    """Every setting of a run. Defaults give the small offline run of ``pyro-aevb train``."""

    # --- what the recipe is ---
    description: str = "The paper's MNIST VAE (Nz=20, 500 tanh units) on the offline mnist-5k digits."

    # --- data ---
    dataset: str = "mnist-5k"  # a name in pyro_aevb.data.DATASETS
    data_dir: str = ""  # where data files live; "" means $PYRO_AEVB_DATA, then a user cache dir
    eval_train_size: int = 10_000  # size of the fixed training subset the train bound is evaluated on
    # datapoints of a validation split, evaluated with the bounds; the best checkpoint by its bound is kept as
    # best.pt. From the data set's own validation split (binarized MNIST: 10,000), else the last
    # validation_size training points are held out of training (Frey Face). 0: no validation split
    validation_size: int = 0

    # --- model: p(z) p(x|z) and q(z|x), one hidden tanh layer each (paper, Appendix C) ---
    model: str = "vae"  # "vae", or "diffusion": a diffusion model as a deep latent-variable model
    model_options: dict = field(default_factory=dict)  # the model's own keys (diffusion: steps, schedule, ...)
    latent_dim: int = 20  # Nz
    hidden_dim: int = 500  # hidden units of the encoder and the decoder MLPs (one layer: the paper's)
    hidden_dims: list = field(default_factory=list)  # several hidden layers, e.g. [300, 300]; [] means [hidden_dim]
    activation: str = "tanh"  # the hidden layers' nonlinearity: a name in pyro_aevb.generative.vae.ACTIVATIONS
    likelihood: str = "bernoulli"  # "bernoulli" (binary data) or "gaussian" (real-valued, Frey Face)
    decoder_variance: str = "pixel"  # the Gaussian decoder's: "network" (the paper's, per datapoint) or "pixel"
    prior: str = "standard-normal"  # p(z): a name in pyro_aevb.generative.priors.PRIORS, "module:factory" or "file.py:factory"
    prior_options: dict = field(default_factory=dict)  # the prior's own keys, as a [prior_options] table
    init: str = "pytorch"  # "pytorch": nn.Linear's default (trains faster here); "normal": N(0, init_scale^2), the paper's
    init_scale: float = 0.01  # std of the paper's initialisation

    # --- the estimator (SGVB A/B, Section 2.3) ---
    estimator: str = "sgvb-b"  # a name in pyro_aevb.infer.registry.ESTIMATORS
    estimator_options: dict = field(default_factory=dict)  # the estimator's own keys, as a [estimator_options] table
    num_particles: int = 1  # L, samples of z per datapoint
    beta: float = 1.0  # weight of the KL (latent site's log-densities), > 0; 1 is the true ELBO
    kl_warmup: int = 0  # training samples over which beta rises linearly to `beta`; 0 disables warm-up

    # --- optimisation (Algorithm 1) ---
    batch_size: int = 100  # M
    optimizer: str = "adagrad"  # "adagrad" (the paper's) or "adam"
    lr: float = 0.01  # step size; of the paper's {0.01, 0.02, 0.1}, 0.01 trains MNIST best early on
    lr_milestones: list = field(default_factory=list)  # training samples at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1  # the step schedule's factor (pythae's VAE recipes: 10^(-1/5) at each milestone)
    grad_clip: float = 0.0  # clip the gradient's global norm to this; 0 disables
    on_nan: str = "error"  # a non-finite loss or gradient: "error" stops the run, "skip" skips the step
    max_nan_skips: int = 100  # with on_nan = "skip": stop after this many skipped steps
    weight_decay: float = 1.0  # lambda/2 ||params||^2 added to the full-data loss; 1.0 is a N(0, I) prior (MAP)
    max_samples: int = 1_000_000  # training budget, in training samples (steps x M)

    # --- evaluation, checkpoints, reproducibility ---
    eval_every: int = 50_000  # evaluate the bound every this many training samples
    eval_particles: int = 1  # samples of z per datapoint when evaluating the bound
    checkpoint_every: int = 200_000  # write checkpoint.pt every this many training samples
    seed: int = 0  # seeds torch, numpy, random and pyro
    device: str = "cpu"  # "cpu" or "cuda"
    # "auto": on the CPU torch.compile for runs of >= 20,000 steps, else the JIT trace; on CUDA a CUDA graph;
    # eager Pyro where none applies. "compile" (CPU) or "jit" force one; "off": eager Pyro
    fast_path: str = "auto"
    sync_every: int = 0  # steps between host reads of the loss and the finiteness check; 0: 1 on CPU, 50 on CUDA
    tensorboard: bool = False  # also write metrics.jsonl's scalars to RUN/tensorboard/ (needs the tensorboard package)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved recipe as TOML (all keys, so a saved recipe is self-contained)."""
        lines, tables = [], []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):  # TOML tables go after the top-level keys
                tables += ["", f"[{f.name}]"] + [f"{k} = {_toml_value(v)}" for k, v in value.items()]
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        return "\n".join(lines + tables) + "\n"


_POSITIVE = {
    "beta",
    "eval_train_size",
    "latent_dim",
    "hidden_dim",
    "num_particles",
    "batch_size",
    "max_samples",
    "eval_every",
    "eval_particles",
    "checkpoint_every",
    "lr",
    "init_scale",
}
_NON_NEGATIVE = {"kl_warmup", "weight_decay", "seed", "grad_clip", "max_nan_skips", "sync_every", "validation_size"}
_POSITIVE.add("lr_gamma")
_CHOICES = {
    "likelihood": ("bernoulli", "gaussian"),
    "init": ("normal", "pytorch"),
    "optimizer": ("adagrad", "adam"),
    "on_nan": ("error", "skip"),
    "fast_path": ("auto", "compile", "jit", "off"),
    "device": ("cpu", "cuda"),
    "activation": tuple(ACTIVATIONS),
    "decoder_variance": tuple(DECODER_VARIANCES),
    "model": tuple(MODELS),
}


def valid_keys() -> list[str]:
    return [f.name for f in fields(Recipe)]


def _toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _check_type(key: str, value: Any, default: Any) -> Any:
    """Return ``value`` converted to the type of ``default``, or raise ConfigError."""
    expected = type(default)
    if expected is dict:
        ok = isinstance(value, dict)
        value = dict(value) if ok else value
    elif expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is list:
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(
            f"recipe key '{key}' must be {expected.__name__}, got {type(value).__name__} {value!r}"
        )
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"recipe key '{key}' must be a finite number, got {value!r}")
    return value


def _check_value(key: str, value: Any) -> None:
    if key in _POSITIVE and not value > 0:
        raise ConfigError(f"recipe key '{key}' must be > 0, got {value!r}")
    if key in _NON_NEGATIVE and not value >= 0:
        raise ConfigError(f"recipe key '{key}' must be >= 0, got {value!r}")
    if key == "hidden_dims" and not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in value):
        raise ConfigError(f"recipe key 'hidden_dims' must be a list of positive integers, got {value!r}")
    if key == "lr_milestones" and not (all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in value)
                                       and value == sorted(set(value))):
        raise ConfigError(f"recipe key 'lr_milestones' must be increasing positive integers (training samples), "
                          f"got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(
            f"recipe key '{key}' = {value!r} is not valid; choose one of: {', '.join(_CHOICES[key])}"
        )


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(
        f"unknown recipe key '{key}'{hint}; valid keys: {', '.join(valid_keys())}"
    )


def make_recipe(overrides: dict[str, Any], base: Recipe | None = None) -> Recipe:
    """Apply ``overrides`` to ``base`` (default: the typed defaults), checking keys, types and ranges."""
    base = base or Recipe()
    if not isinstance(overrides, dict):
        raise ConfigError(f"a recipe must be a table of keys, got {type(overrides).__name__}")
    values = base.to_dict()
    for key, value in overrides.items():
        if key not in values:
            raise _unknown_key(str(key))
        values[key] = _check_type(key, value, values[key])
    for key, value in values.items():
        _check_value(key, value)
    _check_registered(values)
    return Recipe(**values)


def _check_registered(values: dict[str, Any]) -> None:
    """Names that select from a registry must be registered (read at call time: registries grow)."""
    for key, registry, what in (("dataset", DATASETS, "datasets"), ("estimator", ESTIMATORS, "estimators")):
        if values[key] not in registry:
            raise ConfigError(f"unknown {key} '{values[key]}'; valid {what}: {', '.join(sorted(registry))}")
    # a PRIORS name, "package.module:factory" or "path/to/file.py:factory" (ConfigError if it does not resolve)
    prior_factory = resolve_prior_factory(values["prior"])
    values["prior_options"] = check_options(prior_factory, values["prior_options"], "prior_options",
                                            f"prior '{values['prior']}'")
    values["estimator_options"] = check_options(ESTIMATORS[values["estimator"]], values["estimator_options"],
                                                "estimator_options", f"estimator '{values['estimator']}'")
    if values["model"] in MODELS:
        values["model_options"] = check_options(MODELS[values["model"]][1], values["model_options"],
                                                "model_options", f"model '{values['model']}'")
    if values["model"] == "diffusion" and (values["estimator"] not in DIFFUSION_ESTIMATORS
                                           or values["num_particles"] != 1):
        raise ConfigError(f"model 'diffusion' trains with estimator {' or '.join(DIFFUSION_ESTIMATORS)} and "
                          f"num_particles = 1, got '{values['estimator']}' with {values['num_particles']}")
    if values["decoder_variance"] != "pixel" and (values["likelihood"] != "gaussian" or values["model"] != "vae"):
        raise ConfigError(f"decoder_variance = '{values['decoder_variance']}' is a Gaussian VAE decoder's; set "
                          f"likelihood = \"gaussian\" (model = \"vae\") or remove the key")


def factory_options(factory) -> dict[str, Any]:
    """The keyword options a registry factory takes, with their defaults (its first argument is not one)."""
    params = list(inspect.signature(factory).parameters.values())[1:]
    return {p.name: p.default for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty}


def check_options(factory, options: dict[str, Any], table: str, owner: str) -> dict[str, Any]:
    """Check a [prior_options]/[estimator_options] table against the factory's keyword defaults."""
    valid, checked = factory_options(factory), {}
    for key, value in options.items():
        if key not in valid:
            listing = ", ".join(valid) if valid else "none"
            raise ConfigError(f"unknown key '{key}' in [{table}] for {owner}; valid keys: {listing}")
        checked[key] = _check_type(f"{table}.{key}", value, valid[key]) if valid[key] is not None else value
    return checked


def parse_value(raw: str) -> Any:
    """A command-line value: a TOML literal (``0.01``, ``true``, ``[300, 300]``), else the bare word itself."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word such as adam or sgvb-a


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``--set key=value`` (or ``table.key=value``). Values are TOML literals; bare words are strings.

    A dotted key returns ``(table, {key: value})``, to be merged into that table.
    """
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    table, _, sub = key.partition(".")
    if table not in valid_keys():
        raise _unknown_key(table)
    value = parse_value(raw)
    default = getattr(Recipe(), table)
    if isinstance(default, dict):
        if not sub:
            raise ConfigError(f"'{table}' is a table: set one of its keys with --set {table}.KEY=VALUE")
        return table, {sub: value}
    if sub:
        raise ConfigError(f"recipe key '{table}' is not a table; use --set {table}=VALUE")
    if isinstance(default, str) and not isinstance(value, str):
        value = raw  # e.g. data_dir=123 is a path, not a number
    return key, value


def find_recipe(name_or_path: str) -> Path:
    """A recipe by path, or by name in ``models/`` (``mnist_nz20`` or ``mnist_nz20.toml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (RECIPE_DIR / name_or_path, RECIPE_DIR / f"{name_or_path}.toml"):
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in RECIPE_DIR.glob("*.toml")) if RECIPE_DIR.is_dir() else []
    raise ConfigError(
        f"recipe '{name_or_path}' not found: give a path to a .toml file"
        + (f" or one of: {', '.join(available)}" if available else "")
    )


def read_recipe_file(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path} is not valid TOML: {e}") from None


def load_recipe(
    recipe: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> Recipe:
    """Resolve a recipe: typed defaults, then the TOML file (if any), then overrides."""
    values: dict[str, Any] = {}
    if recipe is not None:
        values.update(read_recipe_file(find_recipe(str(recipe))))
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        values = apply_overrides(values, overrides or [])
    return make_recipe(values)


def command_line_overrides(sets: list[str] | None, data_dir: str | None = None, device: str | None = None,
                           seed: int | None = None) -> list[str]:
    """The ``--set`` overrides of a command, with its ``--data-dir``, ``--device`` and ``--seed`` appended."""
    overrides = list(sets or [])
    if data_dir is not None:
        overrides.append(f"data_dir={_toml_value(str(data_dir))}")
    if device is not None:
        overrides.append(f"device={device}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    return overrides


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``values`` with each ``--set key=value`` applied in order (table keys merge into their table)."""
    values = dict(values)
    for text in overrides:
        key, value = parse_override(text)
        if isinstance(value, dict):
            value = {**values.get(key, {}), **value}
        values[key] = value
    return values


def recipe_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ, as ``key: old -> new`` lines."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


__all__ = [
    "Recipe",
    "RECIPE_DIR",
    "find_recipe",
    "load_recipe",
    "make_recipe",
    "parse_override",
    "recipe_diff",
    "valid_keys",
]
