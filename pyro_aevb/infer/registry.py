"""The estimator registry: every objective by name, with the face of a Pyro ELBO.

Every estimator has ``loss``, ``differentiable_loss`` and/or ``loss_and_grads``
taking ``(model, guide, *args, **kwargs)``, so the training loop, ``compare`` and
``grad-variance`` treat them all alike, and any model/guide pair with a data
plate trains with any of them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.distributions import kl_divergence

from ..errors import ConfigError
from .iwae import IWAE
from .mcem import MonteCarloEM
from .rws import ReweightedWakeSleep
from .score_function import ScoreFunctionELBO
from .sgvb import trace_elbo, trace_mean_field_elbo
from .traces import sample_sites, trace_pair
from .wake_sleep import WakeSleep

#: name -> factory(num_particles=L, **options) -> an object with Pyro's ELBO interface
ESTIMATORS: dict[str, Callable[..., object]] = {
    "sgvb-a": trace_elbo,
    "sgvb-b": trace_mean_field_elbo,
    "wake-sleep": WakeSleep,
    "reweighted-wake-sleep": ReweightedWakeSleep,
    "score-function": ScoreFunctionELBO,
    "iwae": IWAE,
    "mcem": MonteCarloEM,
}


def estimator_label(name: str) -> str:
    """How figures and progress bars name an estimator: "AEVB" for the two SGVB estimators, else its name."""
    return {"sgvb-a": "AEVB", "sgvb-b": "AEVB", "iwae": "IWAE", "mcem": "MCEM"}.get(name, name)


def make_estimator(name: str, num_particles: int = 1, **options):
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
        model_trace, guide_trace = trace_pair(model, guide, *args, **kwargs)
    analytic = {}
    for name, site in sample_sites(model_trace, observed=False).items():
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
