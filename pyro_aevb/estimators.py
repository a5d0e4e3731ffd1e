r"""The estimator registry: SGVB estimators A and B are Pyro's ELBOs.

Estimator A (the paper's Eq. 6), the Monte Carlo estimate of the joint:

.. math::

    \tilde{\mathcal{L}}^A(\theta, \phi; x) = \frac1L \sum_{l=1}^L
        \log p_\theta(x, z^{(l)}) - \log q_\phi(z^{(l)} \mid x),
    \qquad z^{(l)} = g_\phi(\epsilon^{(l)}, x)

is :class:`pyro.infer.Trace_ELBO`. Estimator B (Eq. 7), analytic KL plus a
Monte Carlo reconstruction term:

.. math::

    \tilde{\mathcal{L}}^B(\theta, \phi; x) = -D_{KL}(q_\phi(z|x) \,\|\, p_\theta(z))
        + \frac1L \sum_{l=1}^L \log p_\theta(x \mid z^{(l)})

is :class:`pyro.infer.TraceMeanField_ELBO`. L is ``num_particles``, drawn in
one vectorized pass when L > 1.

.. warning:: ``TraceMeanField_ELBO`` falls back to estimator A's Monte Carlo
   term, silently, for a latent site whose (guide, prior) pair has no
   registered KL. :func:`kl_status` finds out which one runs, and training
   records it in ``run.json`` (key ``kl``).

Every estimator has the face of a Pyro ELBO (``loss``, ``differentiable_loss``,
``loss_and_grads``), so the training loop treats them all alike.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.distributions import kl_divergence

import pyro.infer
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .errors import ConfigError


def _trace_elbo(num_particles: int = 1, **kwargs) -> pyro.infer.ELBO:
    return pyro.infer.Trace_ELBO(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=1,
        **kwargs,
    )


def _trace_mean_field_elbo(num_particles: int = 1, **kwargs) -> pyro.infer.ELBO:
    return pyro.infer.TraceMeanField_ELBO(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=1,
        **kwargs,
    )


#: name -> factory(num_particles=L, **options) -> an object with Pyro's ELBO interface
ESTIMATORS: dict[str, Callable[..., pyro.infer.ELBO]] = {
    "sgvb-a": _trace_elbo,
    "sgvb-b": _trace_mean_field_elbo,
}


def make_estimator(name: str, num_particles: int = 1, **options) -> pyro.infer.ELBO:
    """The estimator registered as ``name``, with L = ``num_particles``."""
    if name not in ESTIMATORS:
        raise ConfigError(f"unknown estimator '{name}'; valid estimators: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name](num_particles=num_particles, **options)


def backward(estimator, model, guide, *args, **kwargs) -> torch.Tensor:
    """One gradient evaluation: fills ``.grad`` and returns the loss (-ELBO estimate) as a detached tensor.

    Uses ``differentiable_loss`` where the estimator has it (no host sync, which
    matters on a GPU), else Pyro's ``loss_and_grads``.
    """
    if hasattr(estimator, "differentiable_loss"):
        loss = estimator.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.detach()
    return torch.as_tensor(estimator.loss_and_grads(model, guide, *args, **kwargs))


def estimator_parameters(estimator) -> list[torch.nn.Parameter]:
    """Trainable parameters an estimator owns itself (e.g. a neural baseline), optimised with the model's."""
    params = getattr(estimator, "parameters", None)
    return list(params()) if callable(params) else []


def analytic_kl_sites(model, guide, *args, **kwargs) -> dict[str, bool]:
    """For each latent site: does ``kl_divergence(q, p)`` exist for its (guide, model) pair?

    This is the test ``TraceMeanField_ELBO`` itself applies before falling back
    to Monte Carlo, run once on one trace.
    """
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    analytic = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        try:
            kl_divergence(guide_trace.nodes[name]["fn"], site["fn"])
            analytic[name] = True
        except NotImplementedError:
            analytic[name] = False
    return analytic


def kl_status(model, guide, *args, **kwargs) -> str:
    """``"analytic"`` if every latent site has an analytic KL (estimator B really runs), else ``"monte-carlo"``."""
    sites = analytic_kl_sites(model, guide, *args, **kwargs)
    return "analytic" if sites and all(sites.values()) else "monte-carlo"


def _register_baselines() -> None:
    """The estimators the AEVB paper compares against, and IWAE (imported here, late: they use this package)."""
    from .iwae import IWAE
    from .mcem import MonteCarloEM
    from .rws import ReweightedWakeSleep
    from .score_function import ScoreFunctionELBO
    from .wake_sleep import WakeSleep

    ESTIMATORS.update({
        "wake-sleep": WakeSleep,
        "reweighted-wake-sleep": ReweightedWakeSleep,
        "score-function": ScoreFunctionELBO,
        "iwae": IWAE,
        "mcem": MonteCarloEM,
    })


_register_baselines()
