"""Priors p(z): objects passed to the model, chosen by name.

The protocol: a prior is a ``torch.nn.Module`` whose ``forward()`` returns a
Pyro distribution over z with ``event_shape == (latent_dim,)`` and an empty
(or broadcastable) ``batch_shape``; the model's data plate broadcasts it to
one copy per datapoint. Its parameters, if any, are learned with the model and
saved in the checkpoint, because it is a submodule of the VAE.
"""

from __future__ import annotations

import torch
from torch import nn

import pyro.distributions as dist

from .errors import ConfigError


class StandardNormalPrior(nn.Module):
    r"""The paper's prior, :math:`p_\theta(z) = \mathcal{N}(z; 0, I)` (Kingma & Welling 2013, Sec. 3).

    Mean and scale are buffers, not parameters: they move with ``.to(device)``
    and are never trained. Estimator B has the analytic KL
    :math:`-D_{KL} = \tfrac12 \sum_j (1 + \log\sigma_j^2 - \mu_j^2 - \sigma_j^2)`
    (the paper's Appendix B) through Pyro's registered ``Normal``/``Normal`` KL.
    """

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


#: name -> factory(latent_dim) -> prior module
PRIORS = {
    "standard-normal": StandardNormalPrior,
}


def make_prior(name: str, latent_dim: int, **options) -> nn.Module:
    """Build the prior called ``name`` with its ``options``, and check it honours the protocol above."""
    if name not in PRIORS:
        raise ConfigError(f"unknown prior '{name}'; valid priors: {', '.join(PRIORS)}")
    prior = PRIORS[name](latent_dim, **options)
    check_prior(prior, latent_dim)
    return prior


def check_prior(prior: nn.Module, latent_dim: int) -> None:
    """Fail at start-up, not mid-training, if ``prior()`` is not a distribution over z."""
    d = prior()
    if not isinstance(d, torch.distributions.Distribution):
        raise ConfigError(
            f"prior {type(prior).__name__}() returned {type(d).__name__}, not a distribution; "
            "return a pyro.distributions object"
        )
    if tuple(d.event_shape) != (latent_dim,):
        raise ConfigError(
            f"prior {type(prior).__name__} has event_shape {tuple(d.event_shape)}, expected "
            f"({latent_dim},) = (latent_dim,); use .to_event(1) on a per-dimension distribution"
        )
    if d.batch_shape.numel() != 1:
        raise ConfigError(
            f"prior {type(prior).__name__} has batch_shape {tuple(d.batch_shape)}, expected (); "
            "the data plate broadcasts the prior to each datapoint"
        )
