"""Your own prior, in one file: a factorised Laplace p(z) = prod_j Laplace(z_j; 0, scale).

From the repository root:

    pyro-aevb train --set prior=models/my_prior.py:laplace_prior --set prior_options.scale=0.7

The factory is called as laplace_prior(latent_dim, **prior_options); its keyword
arguments with defaults are the valid [prior_options] keys. The module's forward()
returns a distribution with event_shape (latent_dim,). torch registers the
Normal -> Laplace KL, so estimator B keeps its analytic KL (run.json: "kl": "analytic").
"""

import torch
from torch import nn

import pyro.distributions as dist


class LaplacePrior(nn.Module):
    def __init__(self, latent_dim: int, scale: float):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))  # buffers: fixed, and moved by .to(device)
        self.register_buffer("scale", torch.full((latent_dim,), scale))

    def forward(self):
        return dist.Laplace(self.loc, self.scale).to_event(1)


def laplace_prior(latent_dim: int, scale: float = 1.0) -> nn.Module:
    return LaplacePrior(latent_dim, scale)
