r"""A diffusion model with closed forms: Gaussian data, reverse means linear in z_t, a linear-Gaussian decoder.

Each of the D dimensions is an independent chain (the schedule is shared, the coefficients are per
dimension), with the data used as it is (:math:`\tilde x = x`):

.. math::

    q:\; z_1 = \sqrt{1-\beta_1}\,x + \sqrt{\beta_1}\,\epsilon_1,\quad z_t = \sqrt{1-\beta_t}\,z_{t-1}
        + \sqrt{\beta_t}\,\epsilon_t; \qquad
    p:\; z_T \sim \mathcal N(0, 1),\quad z_{t-1} \mid z_t \sim \mathcal N(a_t z_t + b_t, \tilde\beta_t),\quad
        x \mid z_1 \sim \mathcal N(c\,z_1 + e, \sigma^2).

Per dimension, q(z_{1:T} | x) is a T-variate Gaussian with mean :math:`\sqrt{\bar\alpha_t}\,x` and
:math:`\operatorname{Cov}(z_s, z_t) = \sqrt{\bar\alpha_t/\bar\alpha_s}\,(1-\bar\alpha_s)` for s <= t; every
factor of p is a Gaussian whose residual is linear in z, so

.. math::

    \mathbb E_q \log \mathcal N(r; 0, v) = -\tfrac12\big[\log 2\pi v + ((Gm + h)^2 + G S G^\top)/v\big]
    \quad (r = G z + h), \qquad \mathcal L = \sum_{\text{factors}} \mathbb E_q \log p + \tfrac12\log\det(2\pi e S),

and the marginal :math:`p(x)` is Gaussian, its mean and variance pushed down the chain.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import pyro.distributions as dist

from pyro_aevb.generative.diffusion import Diffusion, Schedule, beta_schedule

DTYPE = torch.float64


def _at(values: torch.Tensor, t) -> torch.Tensor:
    """values (T, D) at step t: (D,) for an int, t.shape + (D,) for the time plate's t (k, L or 1, M)."""
    return values[t - 1]


class LinearReverse(nn.Module):
    """:math:`\\mu_\\theta(z_t, t) = a_t z_t + b_t`, per dimension."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a, self.b = nn.Parameter(a.clone()), nn.Parameter(b.clone())

    def mean(self, z_t: torch.Tensor, t) -> torch.Tensor:
        return _at(self.a, t) * z_t + _at(self.b, t)


class LinearDecoder(nn.Module):
    """:math:`p(x|z_1) = \\mathcal N(c z_1 + e, \\sigma^2 I)`."""

    def __init__(self, c: torch.Tensor, e: torch.Tensor, sigma: float):
        super().__init__()
        self.c, self.e, self.sigma = nn.Parameter(c.clone()), nn.Parameter(e.clone()), sigma

    def forward(self, z: torch.Tensor):
        loc = self.c * z + self.e
        return dist.Normal(loc, self.sigma * torch.ones_like(loc)).to_event(1)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return self.c * z + self.e


def linear_diffusion(steps: int = 4, dim: int = 2, time_samples: int = 1, seed: int = 0, perturb: float = 0.1,
                     data_loc: float = 0.3, data_scale: float = 0.5, schedule: str = "linear") -> Diffusion:
    r"""A float64 diffusion whose linear reverse steps and decoder are those of the forward process run on data
    from :math:`\mathcal N(\mu_0, s_0^2)` per dimension (the reverse conditionals of that joint Gaussian), each
    coefficient then perturbed by a relative ``perturb``: a model close to, not at, its forward process, so
    that the bound has a gap and importance sampling closes it."""
    g = torch.Generator().manual_seed(seed)
    s = Schedule(beta_schedule(schedule, steps)).double()
    ab = s.alpha_bar.to(DTYPE)
    # the joint of (x, z_1..z_T) under the data: E z_t = sqrt(ab_t) mu_0, Var z_t = ab_t s_0^2 + 1 - ab_t,
    # Cov(z_{t-1}, z_t) = sqrt(1 - beta_t) Var z_{t-1}
    mean = ab.sqrt() * data_loc
    var = ab * data_scale**2 + 1 - ab
    a, b = torch.zeros(steps, dtype=DTYPE), torch.zeros(steps, dtype=DTYPE)
    a[1:] = (1 - s.beta[1:]).sqrt() * var[:-1] / var[1:]
    b[1:] = mean[:-1] - a[1:] * mean[1:]
    c = (1 - s.beta[0]).sqrt() * data_scale**2 / var[0]
    e = data_loc - c * mean[0]
    sigma = math.sqrt(data_scale**2 - c * (1 - s.beta[0]).sqrt() * data_scale**2)

    def jitter(v):  # (T,) or () -> per dimension, perturbed
        v = v[:, None].expand(v.shape + (dim,)) if v.dim() else v.expand(dim)
        return v * (1 + perturb * torch.randn(v.shape, generator=g, dtype=DTYPE))

    d = Diffusion(s, LinearReverse(jitter(a), jitter(b)), LinearDecoder(jitter(c), jitter(e), sigma), dim,
                  time_samples, to_latent=lambda x: x)
    return d.double()


def _q_moments(s: Schedule, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D, T) and covariance (T, T) of q(z_{1:T}|x) per dimension (the covariance is shared)."""
    ab = s.alpha_bar.to(DTYPE)
    idx = torch.arange(ab.numel())
    lo, hi = torch.minimum(idx[:, None], idx[None, :]), torch.maximum(idx[:, None], idx[None, :])
    cov = (ab[hi] / ab[lo]).sqrt() * (1 - ab[lo])
    return ab.sqrt()[None, :] * x[:, None], cov


def _expected_log_normal(g: torch.Tensor, h: torch.Tensor, v, m: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """E_q log N(g.z + h; 0, v) for z ~ N(m (D, T), cov (T, T)), g (D, T), h (D,): shape (D,)."""
    mean = (g * m).sum(-1) + h
    var = torch.einsum("dt,ts,ds->d", g, cov, g)
    return -0.5 * (torch.log(2 * math.pi * v) + (mean**2 + var) / v)


@torch.no_grad()
def exact_elbo(d: Diffusion, x: torch.Tensor) -> torch.Tensor:
    """The closed-form ELBO of each row of x (N, D): shape (N,)."""
    return torch.stack([_exact_elbo_row(d, row) for row in x.to(DTYPE)])


def _exact_elbo_row(d: Diffusion, x: torch.Tensor) -> torch.Tensor:
    s, rev, dec = d.schedule, d.reverse, d.decoder
    T, D = s.steps, x.numel()
    m, cov = _q_moments(s, x)
    unit = torch.eye(T, dtype=DTYPE)
    total = _expected_log_normal(unit[T - 1].expand(D, T), torch.zeros(D, dtype=DTYPE), torch.tensor(1.0), m, cov)
    for t in range(T, 1, -1):  # z_{t-1} - a_t z_t - b_t, variance post_var_t
        g = unit[t - 2][None, :] - rev.a[t - 1][:, None] * unit[t - 1][None, :]
        total = total + _expected_log_normal(g, -rev.b[t - 1], s.post_var[t - 1], m, cov)
    g = -dec.c[:, None] * unit[0][None, :]  # x - c z_1 - e, with x a constant
    total = total + _expected_log_normal(g, x - dec.e, torch.tensor(dec.sigma**2, dtype=DTYPE), m, cov)
    entropy = 0.5 * torch.logdet(2 * math.pi * math.e * cov)
    return (total + entropy).sum()


@torch.no_grad()
def exact_log_marginal(d: Diffusion, x: torch.Tensor) -> torch.Tensor:
    """log p(x) of each row of x (N, D), the reverse chain's mean and variance pushed down to x: (N,)."""
    s, rev, dec = d.schedule, d.reverse, d.decoder
    mean, var = torch.zeros(d.data_dim, dtype=DTYPE), torch.ones(d.data_dim, dtype=DTYPE)
    for t in range(s.steps, 1, -1):
        mean, var = rev.a[t - 1] * mean + rev.b[t - 1], rev.a[t - 1] ** 2 * var + s.post_var[t - 1]
    loc, scale = dec.c * mean + dec.e, (dec.c**2 * var + dec.sigma**2).sqrt()
    return torch.distributions.Normal(loc, scale).log_prob(x.to(DTYPE)).sum(-1)
