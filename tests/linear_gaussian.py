r"""A linear-Gaussian latent variable model with closed forms, for testing the SGVB estimators.

.. math::

    p(z) = \mathcal{N}(0, I_k), \qquad p(x \mid z) = \mathcal{N}(W z + b, \sigma^2 I_d)

written as a Pyro model/guide pair in the style of :class:`pyro_aevb.generative.vae.VAE`:
a data plate ``"data"`` at dim -1 (with the same ``num_data`` and ``beta``
keywords), a latent site ``"z"`` and an observed site ``"x"``, both with
event shape of one dimension.

Closed forms (float64 throughout):

* the marginal  :math:`p(x) = \mathcal{N}(x; b, W W^T + \sigma^2 I)`,
* the posterior :math:`\Sigma = (I + W^T W / \sigma^2)^{-1}`,
  :math:`\mu = \Sigma W^T (x - b) / \sigma^2`,
* the ELBO of a diagonal Gaussian guide :math:`q = \mathcal{N}(m, \operatorname{diag} s^2)`:

  .. math::

      \mathbb{E}_q \log p(x|z) - KL(q \| p) = \log \mathcal{N}(x; W m + b, \sigma^2 I)
          - \frac{\operatorname{tr}(W^T W \operatorname{diag} s^2)}{2\sigma^2}
          - KL(\mathcal{N}(m, s^2) \| \mathcal{N}(0, I)).

With the default W (orthogonal columns) :math:`W^T W` is diagonal, so the exact
posterior is a diagonal Gaussian and :meth:`LinearGaussian.exact_guide` (a
``Normal(...).to_event(1)``) is exact; estimator B then uses the registered
Normal/Normal KL. For any W, :meth:`LinearGaussian.exact_mvn_guide` is the exact
full-covariance posterior.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import kl_divergence

import pyro
import pyro.distributions as dist
from pyro import poutine

DTYPE = torch.float64

#: Orthogonal columns: W^T W = diag(2, 1.5), so the exact posterior is diagonal.
W_ORTHOGONAL = ((1.0, 0.5), (1.0, -0.5), (0.0, 1.0))
#: Columns not orthogonal: the exact posterior has a full covariance.
W_CORRELATED = ((1.0, 0.8), (0.5, -0.3), (0.2, 1.0))
B_DEFAULT = (0.3, -0.2, 0.5)
SIGMA_DEFAULT = 0.7


def _plate(x: torch.Tensor, num_data: int | None) -> pyro.plate:
    """The VAE's data plate: size N (default M), subsample of the M rows of x, dim -1."""
    n = x.shape[-2]
    return pyro.plate("data", size=num_data or n, subsample=torch.arange(n), dim=-1)


class LinearGaussian(nn.Module):
    """p(z) = N(0, I_k), p(x|z) = N(W z + b, sigma^2 I_d), with W and b learnable parameters."""

    def __init__(self, W=W_ORTHOGONAL, b=B_DEFAULT, sigma: float = SIGMA_DEFAULT):
        super().__init__()
        self.W = nn.Parameter(torch.as_tensor(W, dtype=DTYPE).clone())  # (d, k)
        self.b = nn.Parameter(torch.as_tensor(b, dtype=DTYPE).clone())  # (d,)
        self.sigma = float(sigma)

    @property
    def data_dim(self) -> int:
        return self.W.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.W.shape[1]

    # ----------------------------------------------------------------- Pyro model
    def prior(self) -> dist.TorchDistribution:
        k = self.latent_dim
        return dist.Normal(torch.zeros(k, dtype=DTYPE), torch.ones(k, dtype=DTYPE)).to_event(1)

    def likelihood(self, z: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1)

    def model(self, x: torch.Tensor, num_data: int | None = None, beta: float = 1.0):
        with _plate(x, num_data):
            with poutine.scale(scale=beta):
                z = pyro.sample("z", self.prior())  # (..., M, k)
            pyro.sample("x", self.likelihood(z), obs=x)
        return z

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x from the model (no Pyro RNG involved), shape (n, d)."""
        with torch.no_grad():
            z = torch.randn(n, self.latent_dim, generator=generator, dtype=DTYPE)
            eps = torch.randn(n, self.data_dim, generator=generator, dtype=DTYPE)
            return z @ self.W.T + self.b + self.sigma * eps

    # --------------------------------------------------------------- closed forms
    def marginal(self) -> dist.MultivariateNormal:
        d = self.data_dim
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(d, dtype=DTYPE)
        return dist.MultivariateNormal(self.b, covariance_matrix=cov)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_i) for each row of x: shape (M,)."""
        return self.marginal().log_prob(x)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact posterior p(z|x_i) = N(mu_i, Sigma): mu of shape (M, k), Sigma of shape (k, k)."""
        k = self.latent_dim
        s2 = self.sigma**2
        cov = torch.linalg.inv(torch.eye(k, dtype=DTYPE) + self.W.T @ self.W / s2)
        mu = (x - self.b) @ self.W @ cov.T / s2  # rows: Sigma W^T (x_i - b) / sigma^2
        return mu, cov

    def closed_form_elbo(self, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The exact ELBO of each datapoint for q(z|x_i) = N(loc_i, diag scale_i^2): shape (M,).

        Differentiable in loc, scale, W and b (the analytic expectation, no sampling).
        """
        expected_log_lik = self.likelihood(loc).log_prob(x) - (scale**2 * (self.W**2).sum(0)).sum(-1) / (
            2 * self.sigma**2
        )  # tr(W^T W diag s^2) = sum_j s_j^2 ||W[:, j]||^2
        kl = kl_divergence(dist.Normal(loc, scale), dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)))
        return expected_log_lik - kl.sum(-1)

    # --------------------------------------------------------------------- guides
    def exact_guide(self, x: torch.Tensor, num_data: int | None = None, beta: float = 1.0):
        """q(z|x) = the exact posterior as a diagonal Normal (exact only if W^T W is diagonal)."""
        with torch.no_grad():
            mu, cov = self.posterior(x)
            scale = cov.diagonal().sqrt().expand_as(mu)
            if not torch.allclose(cov, torch.diag(cov.diagonal()), atol=1e-12):
                raise ValueError("exact_guide needs W with orthogonal columns; use exact_mvn_guide")
        with _plate(x, num_data):
            with poutine.scale(scale=beta):
                return pyro.sample("z", dist.Normal(mu, scale).to_event(1))

    def exact_mvn_guide(self, x: torch.Tensor, num_data: int | None = None, beta: float = 1.0):
        """q(z|x) = the exact full-covariance posterior (any W); event shape (k,) already."""
        with torch.no_grad():
            mu, cov = self.posterior(x)
            tril = torch.linalg.cholesky(cov)
        with _plate(x, num_data):
            with poutine.scale(scale=beta):
                return pyro.sample("z", dist.MultivariateNormal(mu, scale_tril=tril))

    def offset_guide(self, loc_offset, scale_multiplier) -> "DiagonalGuide":
        """A guide N(mu_post(x) + loc_offset, diag(sd_post * scale_multiplier)^2), fixed (no gradients to W, b)."""
        return DiagonalGuide(self, loc_offset=loc_offset, scale_multiplier=scale_multiplier)


class DiagonalGuide:
    """q(z|x_i) = N(loc_i, diag scale_i^2) as a Pyro guide with the VAE's plate/beta structure.

    Either explicit per-datapoint ``loc`` (M, k) and ``log_scale`` (M, k) tensors
    (e.g. leaves requiring grad), or offsets from the exact posterior of ``lg``
    (``loc_offset`` added to mu_post, ``scale_multiplier`` times sd_post).
    """

    def __init__(self, lg: LinearGaussian | None = None, loc=None, log_scale=None,
                 loc_offset=0.0, scale_multiplier=1.0):
        self.lg = lg
        self.loc_ = loc
        self.log_scale_ = log_scale
        self.loc_offset = torch.as_tensor(loc_offset, dtype=DTYPE)
        self.scale_multiplier = torch.as_tensor(scale_multiplier, dtype=DTYPE)

    def params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(z|x), each of shape (M, k)."""
        if self.loc_ is not None:
            return self.loc_, self.log_scale_.exp()
        with torch.no_grad():
            mu, cov = self.lg.posterior(x)
            sd = cov.diagonal().sqrt().expand_as(mu)
        return mu + self.loc_offset, sd * self.scale_multiplier

    def __call__(self, x: torch.Tensor, num_data: int | None = None, beta: float = 1.0):
        loc, scale = self.params(x)
        with _plate(x, num_data):
            with poutine.scale(scale=beta):
                return pyro.sample("z", dist.Normal(loc, scale).to_event(1))


# ------------------------------------------------------------- helpers for the likelihood tests
def offset_guide_chi2(lg: LinearGaussian, x: torch.Tensor, loc_offset: float, scale_multiplier: float) -> torch.Tensor:
    r"""The chi-square divergence :math:`\chi^2(p(z|x_i) \| q) = \mathbb{E}_q[(p(z|x_i)/q(z))^2] - 1` of
    ``lg.offset_guide(loc_offset, scale_multiplier)`` from the exact (diagonal) posterior: shape (M,).

    Per latent dimension, with the offset m = loc_offset / sd_post in posterior sds and s = scale_multiplier,
    :math:`\int p^2/q = s^2 (2s^2 - 1)^{-1/2} \exp(m^2 / (2s^2 - 1))`, infinite when :math:`s^2 \le 1/2`.
    For importance sampling from q, ESS / K tends to :math:`1 / (1 + \chi^2)` as K grows.
    """
    mu, cov = lg.posterior(x)
    if not torch.allclose(cov, torch.diag(cov.diagonal()), atol=1e-12):
        raise ValueError("offset_guide_chi2 needs W with orthogonal columns (a diagonal posterior)")
    s2 = float(scale_multiplier) ** 2
    if s2 <= 0.5:
        return torch.full((x.shape[0],), float("inf"), dtype=DTYPE)
    m2 = loc_offset**2 / cov.diagonal().detach()  # (k,)
    per_dim = s2 / (2 * s2 - 1) ** 0.5 * torch.exp(m2 / (2 * s2 - 1))
    return (per_dim.prod() - 1).expand(x.shape[0]).clone()
