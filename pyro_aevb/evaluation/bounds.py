r"""Per-datapoint lower bounds, from the shared trace utility.

Pyro's ELBOs return one number for a whole batch. To report the average bound
per datapoint with a standard error, and to keep memory bounded on 10,000 test
images, we take the per-datapoint terms of :func:`pyro_aevb.infer.traces.log_densities`,
each of shape (L, M): L particles by M datapoints. Densities come from the
sites' own distributions, so custom priors and decoders work unchanged.

For each datapoint, with z^(l) ~ q(z|x):

.. math::

    \text{A:}\quad \frac1L\sum_l \log p(x, z^{(l)}) - \log q(z^{(l)}|x)
    \qquad
    \text{B:}\quad \frac1L\sum_l \log p(x|z^{(l)}) - D_{KL}(q(z|x)\,\|\,p(z))

B is used for a latent site when ``kl_divergence`` is registered for it, as
``TraceMeanField_ELBO`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributions import kl_divergence

from ..errors import ConfigError
from ..infer.traces import log_densities, per_datapoint, sample_sites


@dataclass
class Bound:
    """An average over datapoints with its standard error (nats)."""

    mean: float
    se: float
    n: int

    @classmethod
    def from_sums(cls, total: float, total_sq: float, n: int) -> "Bound":
        """The mean and its standard error from the sum, the sum of squares and the count of the values
        (what processes that each hold part of the values can add up)."""
        mean = total / n
        var = max(total_sq - n * mean * mean, 0.0) / (n - 1) if n > 1 else float("nan")
        return cls(mean, math.sqrt(var / n) if n > 1 else float("nan"), int(n))


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean of a 1-d collection of values (the SE is NaN for one value)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = v.numel()
    return v.mean().item(), (v.std().item() / math.sqrt(n) if n > 1 else float("nan"))


#: The seed of every fixed random subset of a split (``evaluate --max-datapoints``, ``figure3``): the same
#: rows on every call, for every run, so scores of runs are paired.
SUBSET_SEED = 0


def fixed_subset_rows(size: int, n: int, seed: int = SUBSET_SEED) -> torch.Tensor:
    """The indices of n of ``size`` rows, drawn without replacement by a generator seeded with ``seed``:
    the same rows on every call, for every run (splits may be ordered by class, so the first n are not a
    sample). All rows, in order, when n >= size."""
    if n >= size:
        return torch.arange(size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]


#: The rules for which n rows of a split a command keeps: a fixed random subset, or the first n.
SUBSET_RULES = ("random", "first")


def subset_rows(size: int, n: int, rule: str = "random") -> torch.Tensor:
    """The indices of the n rows of ``size`` that ``rule`` keeps: :func:`fixed_subset_rows` (seed
    :data:`SUBSET_SEED`) for ``"random"``, the first n for ``"first"``."""
    if rule not in SUBSET_RULES:
        raise ConfigError(f"subset must be one of {', '.join(SUBSET_RULES)}, got {rule!r}")
    return torch.arange(min(n, size)) if rule == "first" else fixed_subset_rows(size, n, SUBSET_SEED)


def fixed_subset(x: torch.Tensor, n: int, seed: int = SUBSET_SEED) -> torch.Tensor:
    """n rows of x (N, ...) chosen by :func:`fixed_subset_rows`. All of x when n >= N."""
    if n >= x.shape[0]:
        return x
    return x[fixed_subset_rows(x.shape[0], n, seed).to(x.device)]


def log_weights(model, guide, x: torch.Tensor, num_particles: int = 1, **kwargs) -> torch.Tensor:
    r"""Importance log-weights :math:`\log p(x_i, z_{k}) - \log q(z_{k}|x_i)`, shape (K, M), z_k ~ q(z|x_i).

    One vectorized pass over K particles; differentiable (call under
    ``torch.no_grad()`` when no gradient is needed). Site scales (``beta``,
    ``num_data``) are not applied: these are the per-datapoint weights.
    """
    return log_densities(model, guide, x, num_particles=num_particles, **kwargs).log_weights


def _bound_terms(model, guide, x, num_particles: int, analytic_kl: bool, **kwargs) -> torch.Tensor:
    """(L, M) per-datapoint bounds: estimator B's KL for the latent sites that have one, else A's terms."""
    terms = log_densities(model, guide, x, num_particles=num_particles, **kwargs)
    if not analytic_kl:
        return terms.log_weights
    shape, bound = terms.log_lik.shape, terms.log_lik
    for name, site in sample_sites(terms.model_trace, observed=False).items():
        q_site = terms.guide_trace.nodes[name]
        try:
            bound = bound - per_datapoint(kl_divergence(q_site["fn"], site["fn"]), shape, site)
        except NotImplementedError:
            bound = bound + per_datapoint(site["unscaled_log_prob"] - q_site["unscaled_log_prob"], shape, site)
    return bound


@torch.no_grad()
def elbo_per_datapoint(
    model, guide, x: torch.Tensor, num_particles: int = 1, analytic_kl: bool = True, **kwargs
) -> torch.Tensor:
    """The lower bound of each datapoint of x (shape (M, D)), averaged over L particles: shape (M,).

    ``analytic_kl=True`` gives estimator B where a KL is registered, else A.
    Site scales are not applied, so this is always the beta = 1 bound.
    """
    return _bound_terms(model, guide, x, num_particles, analytic_kl, **kwargs).mean(0)


def average_bound(
    model,
    guide,
    x: torch.Tensor,
    num_particles: int = 1,
    analytic_kl: bool = True,
    chunk_size: int = 1000,
    transform=None,
) -> Bound:
    """The average lower bound per datapoint over x, in chunks of ``chunk_size`` rows.

    ``transform`` (e.g. dynamic binarization) is applied to each chunk first.
    """
    values = bound_values(model, guide, x, num_particles, analytic_kl, chunk_size, transform)
    _, se = mean_se(values)
    return Bound(values.mean().item(), se, values.numel())


def bound_values(model, guide, x: torch.Tensor, num_particles: int = 1, analytic_kl: bool = True,
                 chunk_size: int = 1000, transform=None) -> torch.Tensor:
    """:func:`elbo_per_datapoint` of every row of x, in chunks of ``chunk_size`` rows: shape (N,)."""
    values = []
    for start in range(0, x.shape[0], chunk_size):
        chunk = x[start : start + chunk_size]
        if transform is not None:
            chunk = transform(chunk)
        values.append(elbo_per_datapoint(model, guide, chunk, num_particles, analytic_kl))
    return torch.cat(values)
