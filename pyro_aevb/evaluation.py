r"""Per-datapoint lower bounds, computed from Pyro traces.

Pyro's ELBOs return one number for a whole batch. To report the average bound
per datapoint with a standard error, and to keep memory bounded on 10,000
test images, we trace the guide, replay the model against it, and keep each
site's log-density summed over its event dimensions only, so that every term
has shape (L, M): L particles by M datapoints. Densities come from the sites'
own distributions, so custom priors and decoders work unchanged.

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

import pyro
from pyro import poutine
from pyro.poutine.util import site_is_subsample


@dataclass
class Bound:
    """An average over datapoints with its standard error (nats)."""

    mean: float
    se: float
    n: int


def _traces(model, guide, x, num_particles, **kwargs):
    """Guide and model traces with a vectorized particle plate at dim -2 (data plate at -1)."""
    with pyro.plate("particles", num_particles, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, **kwargs)
    return model_trace, guide_trace


def _per_datapoint(log_prob: torch.Tensor, num_particles: int, n: int) -> torch.Tensor:
    """Broadcast a site's batch-shaped log-density to (L, M)."""
    return log_prob.expand(num_particles, n) if log_prob.dim() <= 2 else log_prob


def _latent_terms(model_trace, guide_trace, analytic_kl: bool, x: torch.Tensor, num_particles: int):
    """Per-datapoint (L, M) terms: sum of observed log p(x|z), and the latent part of the bound."""
    n = x.shape[0]
    log_lik = torch.zeros(num_particles, n, device=x.device, dtype=x.dtype)
    latent = torch.zeros_like(log_lik)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if site["is_observed"]:
            log_lik = log_lik + _per_datapoint(site["fn"].log_prob(site["value"]), num_particles, n)
            continue
        q = guide_trace.nodes[name]["fn"]
        try:
            if not analytic_kl:
                raise NotImplementedError
            latent = latent - _per_datapoint(kl_divergence(q, site["fn"]), num_particles, n)
        except NotImplementedError:
            log_p = site["fn"].log_prob(site["value"])
            log_q = q.log_prob(site["value"])
            latent = latent + _per_datapoint(log_p - log_q, num_particles, n)
    return log_lik, latent


def log_weights(model, guide, x: torch.Tensor, num_particles: int = 1, **kwargs) -> torch.Tensor:
    r"""Importance log-weights :math:`\log p(x_i, z_{k}) - \log q(z_{k}|x_i)`, shape (K, M), z_k ~ q(z|x_i).

    One vectorized pass over K particles; differentiable (call under
    ``torch.no_grad()`` when no gradient is needed). Site scales (``beta``,
    ``num_data``) are not applied: these are the per-datapoint weights.
    """
    model_trace, guide_trace = _traces(model, guide, x, num_particles, **kwargs)
    log_lik, latent = _latent_terms(model_trace, guide_trace, False, x, num_particles)
    return log_lik + latent


@torch.no_grad()
def elbo_per_datapoint(
    model, guide, x: torch.Tensor, num_particles: int = 1, analytic_kl: bool = True, **kwargs
) -> torch.Tensor:
    """The lower bound of each datapoint of x (shape (M, D)), averaged over L particles: shape (M,).

    ``analytic_kl=True`` gives estimator B where a KL is registered, else A.
    Site scales are not applied, so this is always the beta = 1 bound.
    """
    model_trace, guide_trace = _traces(model, guide, x, num_particles, **kwargs)
    log_lik, latent = _latent_terms(model_trace, guide_trace, analytic_kl, x, num_particles)
    return (log_lik + latent).mean(0)


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
    values = []
    for start in range(0, x.shape[0], chunk_size):
        chunk = x[start : start + chunk_size]
        if transform is not None:
            chunk = transform(chunk)
        values.append(elbo_per_datapoint(model, guide, chunk, num_particles, analytic_kl))
    values = torch.cat(values)
    n = values.numel()
    se = values.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return Bound(values.mean().item(), se, n)
