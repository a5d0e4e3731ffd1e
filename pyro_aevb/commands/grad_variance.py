r"""``pyro-aevb grad-variance``: how noisy is each estimator's gradient, at fixed parameters, on one minibatch?

The AEVB paper's claim (Sec. 2.2, 2.3): the reparameterised gradient has much
lower variance than the score-function (REINFORCE) gradient of the same bound.
With the VAE's parameters fixed (at initialisation, or from a trained run) and
ONE fixed minibatch x of M datapoints, each estimator gives ``draws``
independent gradient estimates :math:`g^{(1..R)}` (fresh noise each), the
gradient the training loop would use (num_data = N). For the encoder's (phi)
and the decoder's (theta, with the prior's) parameters separately:

.. math::

    \text{variance} = \frac1P\sum_{j=1}^P \widehat{\operatorname{Var}}(g_j),
    \qquad
    \text{SNR} = \frac1P\sum_{j=1}^P \frac{|\bar g_j|}{\widehat{\operatorname{sd}}(g_j)}

over the P parameters of the group (parameters whose gradient never varies
are left out of the SNR), and both relative to ``sgvb-b``. A gradient that is
pure noise has an SNR of about :math:`\sqrt{2/(\pi R)}` (:func:`snr_noise_floor`):
SNRs near that floor say "no signal within R draws", not a number to rank by.

Draw i of every estimator uses the same seed (common random numbers): the
z drawn for the decoder's gradient is the same in every method, and that
gradient, :math:`\nabla_\theta \log p_\theta(x|z)` with z ~ q, is the same
estimator in all of them, so the decoder columns coincide; the estimators
differ in the encoder's gradient.

Baselines are fitted first: the decaying average and the neural baseline
(NVIL) are trained for ``baseline_steps`` steps on random training minibatches
at the fixed VAE parameters (only the baseline changes), and then frozen while
the draws are taken, as they would be at that point of training. Wake-sleep's
encoder gradient is the sleep phase's, the gradient of a different objective;
its decoder gradient is the wake phase's (the same as SGVB A's in distribution).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

import pyro

from ..config import load_recipe
from ..errors import ConfigError
from ..evaluation.bounds import log_weights
from ..infer.registry import backward, make_estimator
from ..training.run_directory import load
from ..training.setup import initial_vae, prepare_data, resolve_device
from .common import add_data_arguments, overrides_of, run_recipe, single_process

REFERENCE = "sgvb-b"
GROUPS = ("encoder", "decoder")


def default_estimators(data_dim: int) -> dict[str, tuple[str, dict]]:
    """label -> (registered name, options), in the order they are reported."""
    return {
        "sgvb-b": ("sgvb-b", {}),
        "sgvb-a": ("sgvb-a", {}),
        "score-function/neural": ("score-function", {"baseline": "neural", "data_dim": data_dim}),
        "score-function/decaying-average": ("score-function", {"baseline": "decaying-average"}),
        "score-function/none": ("score-function", {"baseline": "none"}),
        "wake-sleep": ("wake-sleep", {}),
    }


OBJECTIVES = {"wake-sleep": "encoder: sleep phase, E_p[log q(z|x)] (not the ELBO); decoder: wake phase"}


def snr_noise_floor(draws: int) -> float:
    """E|mean|/sd of R draws of zero-mean Gaussian noise, approximately sqrt(2 / (pi R))."""
    return math.sqrt(2.0 / (math.pi * draws))


def parameter_groups(vae) -> dict[str, list[torch.nn.Parameter]]:
    """``encoder``: phi; ``decoder``: theta (the decoder's and the prior's parameters, if any)."""
    encoder = list(vae.encoder.parameters())
    ids = {id(p) for p in encoder}
    decoder = [p for p in vae.parameters() if id(p) not in ids]
    return {"encoder": encoder, "decoder": decoder}


class _Moments:
    """Running sums over draws of a flat gradient vector (float64): mean and unbiased variance per parameter."""

    def __init__(self):
        self.n, self.sum, self.sum_sq = 0, None, None

    def add(self, g: torch.Tensor) -> None:
        g = g.detach().to(torch.float64)
        if self.sum is None:
            self.sum, self.sum_sq = torch.zeros_like(g), torch.zeros_like(g)
        self.n += 1
        self.sum += g
        self.sum_sq += g * g

    def summary(self) -> dict:
        mean = self.sum / self.n
        var = ((self.sum_sq - self.n * mean * mean) / (self.n - 1)).clamp_min(0.0)
        sd = var.sqrt()
        varies = sd > 1e-12 * (mean.abs() + 1e-30)
        snr = (mean.abs()[varies] / sd[varies]).mean().item() if varies.any() else float("nan")
        return {"variance": var.mean().item(), "snr": snr, "parameters": mean.numel(),
                "parameters_without_variance": int((~varies).sum())}


def _flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def fit_baseline(estimator, vae, batches, num_data: int, steps: int, lr: float = 3e-3) -> dict:
    """Train the estimator's own parameters (a neural baseline) and warm up its decaying average, VAE fixed.

    ``batches()`` returns a fresh training minibatch. Returns the squared error of
    the baseline against the learning signal, averaged over the first and the
    last 10% of the steps (from Pyro's baseline loss, nats^2 scaled by (N/M)^2).
    """
    params = list(estimator.parameters()) if isinstance(estimator, torch.nn.Module) else []
    optimizer = torch.optim.Adam(params, lr=lr) if params else None
    requires = [p.requires_grad for p in vae.parameters()]
    for p in vae.parameters():  # only the baseline learns; no gradient work for the VAE
        p.requires_grad_(False)
    errors = []
    try:
        for _ in range(steps):
            x = batches()
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            backward(estimator, *vae.local_pair(), x, num_data=num_data)
            if optimizer is not None:
                optimizer.step()
            errors.append(_baseline_error(estimator, vae, x, num_data))
    finally:
        for p, r in zip(vae.parameters(), requires):
            p.requires_grad_(r)
    k = max(1, steps // 10)
    return {"steps": steps, "squared_error_first": sum(errors[:k]) / k, "squared_error_last": sum(errors[-k:]) / k}


@torch.no_grad()
def _baseline_error(estimator, vae, x, num_data) -> float:
    """Mean over datapoints of (learning signal - baseline)^2 on x, for one fresh z per datapoint (nats^2)."""
    scale = num_data / x.shape[0]
    signal = scale * log_weights(*vae.local_pair(), x, 1)[0]  # (M,), like Pyro's downstream cost
    baseline = torch.zeros_like(signal)
    for average in getattr(estimator, "averages", {}).values():  # Pyro's decaying average, one per batch position
        baseline = baseline + average.reshape(signal.shape)
    if getattr(estimator, "baseline_net", None) is not None:
        baseline = baseline + scale * estimator.baseline_net(x)
    return ((signal - baseline) ** 2).mean().item() / scale**2  # per datapoint, unscaled


def gradient_moments(estimator, vae, x: torch.Tensor, num_data: int, draws: int, seed: int = 0) -> dict:
    """``draws`` gradient estimates on the fixed batch x; per group, the summary of :class:`_Moments`.

    An estimator with a decaying average is reset to its fitted state before
    each draw, so the average is not fitted to this one batch while measuring.
    """
    groups = parameter_groups(vae)
    moments = {g: _Moments() for g in GROUPS}
    saved = copy.deepcopy(getattr(estimator, "averages", None))
    for i in range(draws):
        if saved is not None:
            estimator.averages = copy.deepcopy(saved)
        for p in vae.parameters():
            p.grad = None
        pyro.set_rng_seed(seed + i)
        backward(estimator, *vae.local_pair(), x, num_data=num_data)
        for g in GROUPS:
            moments[g].add(_flat_grad(groups[g]))
    return {g: moments[g].summary() for g in GROUPS}


def measure(vae, x: torch.Tensor, num_data: int, draws: int, batches=None, baseline_steps: int = 300,
            estimators: dict[str, tuple[str, dict]] | None = None, seed: int = 0) -> tuple[dict, dict]:
    """Gradient variance and SNR of each estimator at fixed ``vae`` on the batch x.

    Returns (results, fits): results = {label: {"encoder": {...}, "decoder": {...}}} with values relative to
    ``sgvb-b`` (when measured) added; fits = {label: baseline fit summary}.
    """
    if draws < 2:
        raise ConfigError(f"--draws must be >= 2 to estimate a variance, got {draws}")
    estimators = estimators or default_estimators(x.shape[-1])
    results, fits = {}, {}
    for label, (name, options) in estimators.items():
        estimator = make_estimator(name, 1, **options)
        if isinstance(estimator, torch.nn.Module):
            estimator.to(x.device)
        if options.get("baseline", "none") != "none" and baseline_steps > 0:
            pyro.set_rng_seed(seed + 10_000)
            fits[label] = fit_baseline(estimator, vae, batches or (lambda: x), num_data, baseline_steps)
        results[label] = gradient_moments(estimator, vae, x, num_data, draws, seed)
        if label in OBJECTIVES:
            results[label]["objective"] = OBJECTIVES[label]
    if REFERENCE in results:
        for label, r in results.items():
            for g in GROUPS:
                ref = results[REFERENCE][g]
                r[g]["variance_rel"] = r[g]["variance"] / ref["variance"] if ref["variance"] > 0 else math.nan
                r[g]["snr_rel"] = r[g]["snr"] / ref["snr"] if ref["snr"] > 0 else math.nan
    return results, fits


def format_table(results: dict) -> str:
    lines = [f"{'estimator':<32} {'enc variance':>13} {'(rel)':>10} {'enc SNR':>9} "
             f"{'dec variance':>13} {'(rel)':>10} {'dec SNR':>9}"]
    for label, r in results.items():
        e, d = r["encoder"], r["decoder"]
        lines.append(f"{label:<32} {e['variance']:>13.4g} {e.get('variance_rel', math.nan):>10.3g} "
                     f"{e['snr']:>9.3g} {d['variance']:>13.4g} {d.get('variance_rel', math.nan):>10.3g} "
                     f"{d['snr']:>9.3g}")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str = "", draws: int | None = None) -> None:
    """Bars per estimator, encoder and decoder: variance and SNR, both on log axes (SNR's noise floor dashed)."""
    from ..plots import plt

    labels = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.38
    for ax, key, ylabel in ((axes[0], "variance", "mean per-parameter gradient variance"),
                            (axes[1], "snr", "mean per-parameter SNR |mean|/sd")):
        for j, (group, colour) in enumerate(zip(GROUPS, ("tab:blue", "tab:orange"))):
            values = [results[lab][group][key] for lab in labels]
            ax.bar([i + (j - 0.5) * width for i in range(len(labels))], values, width, color=colour, label=group)
        ax.set_yscale("log")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize="small")
        ax.set_ylabel(ylabel)
        if key == "snr" and draws:
            ax.axhline(snr_noise_floor(draws), color="grey", ls="--", lw=1, label=f"pure noise, {draws} draws")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def command(args) -> None:
    single_process("grad-variance")
    if args.draws < 2:
        raise ConfigError(f"--draws must be >= 2 to estimate a variance, got {args.draws}")
    if args.baseline_steps < 0:
        raise ConfigError(f"--baseline-steps must be >= 0, got {args.baseline_steps}")
    if args.checkpoint and args.recipe:
        raise ConfigError("--checkpoint uses the run's own recipe; drop RECIPE (use --set for data_dir etc.)")
    recipe = run_recipe(args.checkpoint, overrides_of(args)) if args.checkpoint else load_recipe(args.recipe,
                                                                                                  overrides_of(args))
    data = prepare_data(recipe, resolve_device(recipe.device))
    if args.checkpoint:
        vae = load(args.checkpoint, device=recipe.device)
        where = f"checkpoint {args.checkpoint} (step {vae.step})"
    else:
        vae, where = initial_vae(recipe, data.dataset.dim, data.train), "initialisation"
    N, M = data.num_data, recipe.batch_size
    gen = torch.Generator().manual_seed(recipe.seed + 777)

    def batch() -> torch.Tensor:
        return data.minibatch(torch.randint(N, (M,), generator=gen).to(data.train.device))

    x = batch()  # the one fixed minibatch
    results, fits = measure(vae, x, N, args.draws, batches=batch, baseline_steps=args.baseline_steps,
                            seed=recipe.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grad_variance.json").write_text(json.dumps(results, indent=2) + "\n")
    setup = {"recipe": recipe.to_dict(), "parameters": where, "draws": args.draws, "batch_size": M,
             "num_data": N, "baseline_steps": args.baseline_steps, "baseline_fits": fits,
             "reference": REFERENCE, "snr_noise_floor": snr_noise_floor(args.draws)}
    (out / "grad_variance_setup.json").write_text(json.dumps(setup, indent=2) + "\n")
    plot(results, out / "grad_variance.png",
         title=f"{data.dataset.name}, $N_z$={recipe.latent_dim}, {where}: {args.draws} draws, M={M}", draws=args.draws)
    print(format_table(results))
    print(f"(parameters at {where}; one minibatch of M={M}, N={N}; {args.draws} draws each; baselines fitted for "
          f"{args.baseline_steps} steps first; pure noise has SNR ~{snr_noise_floor(args.draws):.2f}) "
          f"-> {out}/grad_variance.json, {out}/grad_variance.png")


def register(subparsers, help: str = "") -> None:
    """Add ``grad-variance`` to the ``pyro-aevb`` command's subparsers."""
    p = subparsers.add_parser("grad-variance", help=help, description=help)
    p.add_argument("recipe", nargs="?", help="a .toml path or a recipe name in models/ (parameters at init)")
    p.add_argument("--checkpoint", metavar="RUN_DIR", help="take the parameters (and recipe) of a trained run")
    p.add_argument("--draws", type=int, default=100, help="gradient estimates per estimator (default 100)")
    p.add_argument("--baseline-steps", type=int, default=300,
                   help="steps fitting the baselines before measuring (default 300)")
    add_data_arguments(p)  # --seed seeds the minibatch, the baselines' fit and the draws
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=command)
