r"""Is the guide good enough to trust an importance-sampled likelihood? PSIS k-hat and ArviZ exports.

PSIS k-hat [1, 2]. Fit a generalized Pareto distribution to the largest
importance ratios :math:`w_{k} = p(x_i, z_k) / q(z_k|x_i)`, :math:`z_k \sim q(z|x_i)`,
of one datapoint; its shape :math:`\hat k` estimates how many moments of w
exist (:math:`1/k`). Yao et al. [1] use it to judge a variational
approximation: the usual bins are

=================  ===========  =========================================================
:math:`\hat k`     bin          meaning
=================  ===========  =========================================================
:math:`\le 0.5`    ``good``     finite variance; the IS estimate converges quickly
:math:`(0.5, 0.7]` ``ok``       finite mean, infinite variance; PSIS still usable
:math:`(0.7, 1]`   ``bad``      impractically slow convergence; q misses posterior mass
:math:`> 1`        ``very_bad`` the mean of w may not exist
=================  ===========  =========================================================

(Vehtari et al. [2] refine the 0.7 threshold to :math:`\min(1 - 1/\log_{10} S, 0.7)`
for S samples; with S >= 5000 this is 0.7.) The fit is ``arviz.psislw``.

ArviZ exports. :func:`guide_inference_data` and :func:`hmc_inference_data`
put draws of z for a few datapoints into ``arviz.InferenceData`` with
posterior variable ``z`` of dims ``(chain, draw, datapoint, latent)``, so
that ``az.plot_pair``, ``az.ess``, ``az.rhat`` and ``az.summary`` compare the
guide with the HMC posterior.

References:
  [1] Y. Yao, A. Vehtari, D. Simpson, A. Gelman. Yes, but did it work?: Evaluating variational
      inference. ICML 2018, arXiv:1802.02538.
  [2] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry. Pareto smoothed importance sampling.
      JMLR 25(72), 2024, arXiv:1507.02646.
  [3] R. Kumar, C. Carroll, A. Hartikainen, O. Martin. ArviZ. JOSS 4(33), 2019.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..infer.traces import latent_site, sample_sites, trace_fn
from .appendix_d import run_chain
from .marginal_likelihood import DEFAULT_CHUNK_SIZE, log_likelihood

#: Bins of k-hat (upper edges, inclusive), Yao et al. (2018).
KHAT_BINS = (("good", 0.5), ("ok", 0.7), ("bad", 1.0), ("very_bad", math.inf))
#: Log-weights whose range (max - min, nats) is below this, or below 64 rounding units of their
#: magnitude, are taken as equal: k-hat = -inf.
EQUAL_WEIGHTS_ATOL = 1e-6


def psis_khat(log_weights: torch.Tensor, reff: float = 1.0) -> torch.Tensor:
    r"""PSIS :math:`\hat k` of each datapoint from log importance weights of shape (K, M): shape (M,).

    ``arviz.psislw`` fits the tail of each column (it wants the sample
    dimension last, so the weights are transposed). ``reff`` is the relative
    efficiency of the draws (1 for independent draws from q).

    Weights that are all equal (range below ``EQUAL_WEIGHTS_ATOL`` nats or 64
    rounding units of their dtype: the guide is the exact posterior) have no tail to fit; their k-hat is
    ``-inf``, the limit of bounded weights. ArviZ would return ``+inf`` there
    ("too few tail samples"), which would read as the worst case.
    """
    if log_weights.dim() != 2:
        raise ValueError(f"expected log-weights of shape (K, M), got {tuple(log_weights.shape)}")
    import arviz

    lw = log_weights.detach().to("cpu", torch.float64).numpy().T.copy()  # (M, K), samples last
    _, khat = arviz.psislw(lw, reff=reff)
    khat = torch.as_tensor(np.atleast_1d(khat), dtype=torch.float64)
    eps = torch.finfo(log_weights.dtype).eps if log_weights.is_floating_point() else 0.0
    tol = np.maximum(EQUAL_WEIGHTS_ATOL, 64 * eps * np.abs(lw).max(axis=1))
    equal = torch.as_tensor(np.ptp(lw, axis=1) < tol)
    return torch.where(equal, torch.tensor(-math.inf, dtype=torch.float64), khat)


def khat_summary(khat: torch.Tensor) -> dict:
    """Counts and fractions of k-hat values per bin (``good``, ``ok``, ``bad``, ``very_bad``), with max and mean.

    Returns ``{"n", "max", "mean", "counts": {bin: int}, "fractions": {bin: float}}``.
    A NaN k-hat (a failed fit) counts as ``very_bad``; ``max`` and ``mean`` are
    over the other values (NaN if there are none).
    """
    khat = torch.as_tensor(khat, dtype=torch.float64).reshape(-1)
    n = khat.numel()
    counts, lower = {}, None
    for name, upper in KHAT_BINS:
        above = khat > lower if lower is not None else torch.ones_like(khat, dtype=torch.bool)  # -inf is good
        counts[name] = int((above & (khat <= upper)).sum())
        lower = upper
    counts["very_bad"] += int(khat.isnan().sum())
    fitted = khat[~khat.isnan()]
    return {
        "n": n,
        "max": fitted.max().item() if fitted.numel() else math.nan,
        "mean": fitted.mean().item() if fitted.numel() else math.nan,
        "counts": counts,
        "fractions": {name: c / n if n else math.nan for name, c in counts.items()},
    }


def _to_inference_data(z: np.ndarray, x: torch.Tensor, name: str, sample_stats: dict | None = None):
    """InferenceData with posterior ``name`` of shape (chain, draw, datapoint, latent) and observed x."""
    import arviz

    m, nz = z.shape[2], z.shape[3]
    coords = {"datapoint": np.arange(m), "latent": np.arange(nz), "feature": np.arange(x.shape[-1])}
    dims = {name: ["datapoint", "latent"], "x": ["datapoint", "feature"], "diverging": ["datapoint"]}
    return arviz.from_dict(
        posterior={name: z},
        sample_stats=sample_stats,
        observed_data={"x": x.detach().cpu().numpy()},
        coords=coords,
        dims=dims,
    )


@torch.no_grad()
def guide_inference_data(guide, x: torch.Tensor, num_samples: int = 1000, **kwargs):
    """Draws z ~ q(z|x_i) of each row of x (M, D) as ``arviz.InferenceData``.

    Groups ``posterior`` (the guide's one latent site, e.g. ``z``, dims
    ``(chain=1, draw=num_samples, datapoint=M, latent=Nz)``) and
    ``observed_data`` (``x``, dims ``(datapoint, feature)``). One vectorized
    pass with a particle plate at dim -2; ``kwargs`` go to the guide.
    """
    latents = list(sample_sites(trace_fn(guide, x, num_particles=num_samples, **kwargs), observed=False).items())
    if len(latents) != 1:
        raise ValueError(f"expected one latent sample site in the guide, found {[n for n, _ in latents]}")
    name, site = latents[0]
    z = site["value"].detach().cpu().numpy()  # (S, M, Nz)
    return _to_inference_data(z[None], x, name)


def hmc_inference_data(
    model,
    x: torch.Tensor,
    num_samples: int = 1000,
    warmup_steps: int | None = None,
    num_chains: int = 2,
    kernel: str = "nuts",
    kernel_options: dict | None = None,
    progress: bool = False,
    **kwargs,
):
    """HMC draws of z ~ p(z|x_i) for each row of x (M, D) as ``arviz.InferenceData``.

    For each datapoint, ``num_chains`` independent chains (run one after the
    other, each with its own random initialisation and warm-up; see
    :func:`pyro_aevb.evaluation.appendix_d.hmc_posterior_samples`). Groups ``posterior``
    (``z``, dims ``(chain, draw, datapoint, latent)``), ``sample_stats``
    (``diverging``, dims ``(chain, draw, datapoint)``) and ``observed_data``
    (``x``). Use ``num_chains >= 2`` for ``az.rhat``.
    """
    name, _ = latent_site(model, x[:1], **kwargs)
    z, diverging = [], []
    for c in range(num_chains):
        zc, dc = [], []
        for i in range(x.shape[0]):
            zi, di = run_chain(model, x[i : i + 1], num_samples, warmup_steps, kernel, kernel_options, progress,
                                **kwargs)
            zc.append(zi[:, 0])  # (L, 1, Nz) -> (L, Nz)
            dc.append(di)
        z.append(torch.stack(zc, 1))  # (L, M, Nz)
        diverging.append(torch.stack(dc, 1))  # (L, M)
    z = torch.stack(z).cpu().numpy()  # (C, L, M, Nz)
    diverging = torch.stack(diverging).numpy()  # (C, L, M)
    return _to_inference_data(z, x, name, sample_stats={"diverging": diverging})


def likelihood_summary(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int = 5000,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    khat_points: int = 100,
    progress: bool = False,
    **kwargs,
) -> dict:
    """Importance-sampled log-likelihood of x (N, D) with its diagnostics, as a JSON-ready dict.

    One call of :func:`pyro_aevb.evaluation.marginal_likelihood.log_likelihood`, which also keeps
    the full K log-weights of the first ``khat_points`` datapoints (K x
    khat_points floats; k-hat needs all K weights of a datapoint, so it is
    computed on that subset only). Keys:

    ``log_likelihood``
        mean over datapoints of the estimates of log p(x_i), nats
    ``log_likelihood_se``
        its standard error over datapoints
    ``n``, ``num_samples``
        N datapoints, K importance samples per datapoint
    ``ess_mean``, ``ess_min``
        mean and minimum over datapoints of the importance-sampling ESS (out of K)
    ``khat``
        :func:`khat_summary` of the PSIS k-hat of the first ``khat_points`` datapoints
    """
    result = log_likelihood(model, guide, x, num_samples, chunk_size, return_diagnostics=True,
                            keep_log_weights=khat_points, progress=progress, **kwargs)
    khat = psis_khat(result.log_weights) if result.log_weights is not None else torch.zeros(0)
    return {
        "log_likelihood": result.mean,
        "log_likelihood_se": result.se,
        "n": x.shape[0],
        "num_samples": num_samples,
        "ess_mean": result.ess.mean().item(),
        "ess_min": result.ess.min().item(),
        "khat": khat_summary(khat),
        "compiled": result.compiled,
    }
