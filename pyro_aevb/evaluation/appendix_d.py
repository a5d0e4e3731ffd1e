r"""The marginal likelihood estimator of Kingma & Welling (2013), Appendix D, per datapoint.

For one datapoint x, with posterior samples from Hamiltonian Monte Carlo [2]
(Pyro's ``NUTS`` [3] by default):

1. draw L samples :math:`z^{(l)} \sim p_\theta(z|x)` by HMC on
   :math:`\log p_\theta(z) + \log p_\theta(x|z)`;
2. fit a density :math:`q(z)` to them; here a full-covariance Gaussian,
   :math:`q = \mathcal{N}(\bar z, S)` with the sample mean and the unbiased
   sample covariance of the L samples;
3. draw L *fresh* posterior samples :math:`z^{(l)} \sim p_\theta(z|x)` (the next
   L draws of the same chain) and plug them into

.. math::

    p_\theta(x) \simeq \Big(\frac1L \sum_{l=1}^{L}
        \frac{q(z^{(l)})}{p_\theta(z^{(l)})\, p_\theta(x|z^{(l)})}\Big)^{-1},
    \qquad z^{(l)} \sim p_\theta(z|x),

i.e. in log space

.. math::

    \log p_\theta(x) \simeq -\Big(\operatorname{logsumexp}_l
        \big[\log q(z^{(l)}) - \log p_\theta(x, z^{(l)})\big] - \log L\Big).

It is a harmonic-mean-type estimator with q as the "importance" density, and
consistent because :math:`\mathbb{E}_{p(z|x)}[q(z)/p(x, z)] = \int q(z)\,dz / p(x) = 1/p(x)`.
Its variance is finite when q has lighter tails than the posterior, hence a
fitted Gaussian rather than a heavy-tailed q. By Jensen's inequality the
log-estimate is biased *upwards* for finite L.

.. warning::
    The paper reports that the estimator is good only for low-dimensional
    latent spaces (fewer than about 5 dimensions) with enough samples. For
    a latent of 5 or more dimensions :func:`hmc_log_likelihood` issues a
    ``UserWarning`` (it still returns the estimate). One chain per datapoint
    is slow (seconds a datapoint on a CPU); ``points_per_chain`` runs G
    datapoints in one chain on the product of their independent posteriors.

Log-densities :math:`\log p_\theta(x, z)` come from Pyro traces of the model
conditioned on z (unscaled site log-densities), so custom priors and decoders
work unchanged. The model must take x of shape (1, D) for one datapoint, with
one latent sample site (``"z"`` in :class:`pyro_aevb.vae.VAE`).

References:
  [1] D. P. Kingma, M. Welling. Auto-Encoding Variational Bayes. ICLR 2014, arXiv:1312.6114, Appendix D.
  [2] R. M. Neal. MCMC using Hamiltonian dynamics. Handbook of Markov Chain Monte Carlo, 2011.
  [3] M. D. Hoffman, A. Gelman. The No-U-Turn Sampler. JMLR 15, 2014.
"""

from __future__ import annotations

import math
import warnings

import torch

import pyro.distributions as dist
from pyro.infer.mcmc import HMC, MCMC, NUTS

from ..infer.traces import latent_site, log_joint

#: Latent dimension from which the Appendix D estimator is flagged as unreliable.
MAX_RELIABLE_LATENT_DIM = 4

KERNELS = {"nuts": NUTS, "hmc": HMC}


def _as_row(x: torch.Tensor) -> torch.Tensor:
    """One datapoint as shape (1, D)."""
    if x.dim() == 1:
        return x.unsqueeze(0)
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"expected one datapoint of shape (D,) or (1, D), got {tuple(x.shape)}")
    return x


def run_chain(model, x, num_samples, warmup_steps=None, kernel="nuts", kernel_options=None, progress=False,
              **kwargs):
    """One HMC/NUTS chain on p(z|x) for the G rows of x (G, D) jointly: samples (L, G, Nz) and a (L,) bool
    mask of divergent transitions.

    The rows' posteriors are independent, so the chain's target is their product: each row's draws are
    draws from its own posterior (with one step size and one trajectory for all G, and a diagonal mass
    matrix adapted per coordinate). G = 1 is one chain per datapoint.
    """
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"expected datapoints of shape (G, D), got {tuple(x.shape)}")
    name, dim = latent_site(model, x, **kwargs)
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel '{kernel}'; valid kernels: {', '.join(KERNELS)}")
    kern = KERNELS[kernel](model, **(kernel_options or {}))
    warmup_steps = num_samples if warmup_steps is None else warmup_steps
    mcmc = MCMC(kern, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=not progress)
    mcmc.run(x, **kwargs)
    z = mcmc.get_samples()[name].reshape(num_samples, x.shape[0], dim)  # (L, G, Nz)
    diverging = torch.zeros(num_samples, dtype=torch.bool)
    diverging[list(mcmc.diagnostics().get("divergences", {}).get("chain 0", []))] = True
    return z.detach(), diverging


def hmc_posterior_samples(
    model,
    x: torch.Tensor,
    num_samples: int = 1000,
    warmup_steps: int | None = None,
    kernel: str = "nuts",
    kernel_options: dict | None = None,
    progress: bool = False,
    **kwargs,
) -> torch.Tensor:
    r"""L samples of :math:`z \sim p_\theta(z|x)` for one datapoint x ((D,) or (1, D)): shape (L, Nz).

    One chain of ``pyro.infer.mcmc`` ``NUTS`` (``kernel="nuts"``, step size
    and diagonal mass matrix adapted during warm-up) or ``HMC``
    (``kernel="hmc"``), with ``kernel_options`` passed to the kernel and
    ``warmup_steps`` (default: ``num_samples``) discarded. The potential is
    :math:`-\log p_\theta(z) - \log p_\theta(x|z)` from the model's trace;
    ``kwargs`` go to the model.
    """
    z, _ = run_chain(model, _as_row(x), num_samples, warmup_steps, kernel, kernel_options, progress, **kwargs)
    return z[:, 0]  # (L, 1, Nz) -> (L, Nz)


@torch.no_grad()
def log_joint_at(model, x: torch.Tensor, z: torch.Tensor, site: str = "z", **kwargs) -> torch.Tensor:
    r""":math:`\log p_\theta(x, z_l)` for one datapoint x (1, D) at L values z (L, Nz): shape (L,).

    :func:`pyro_aevb.infer.traces.log_joint` with the L values in a particle plate at dim -2 (the data
    plate is at -1): the unscaled log-densities of all the model's sample sites, summed.
    """
    x = _as_row(x)
    num = z.shape[0]
    return log_joint(model, {site: z.unsqueeze(-2)}, x, num_particles=num, **kwargs).reshape(num)


def fit_gaussian(z: torch.Tensor) -> dist.MultivariateNormal:
    """q(z) = N(sample mean, sample covariance) of samples z (L, Nz) (unbiased covariance).

    Raises ``ValueError`` if the covariance is singular (e.g. a chain that never moved).
    """
    loc = z.mean(0)
    cov = torch.atleast_2d(torch.cov(z.T))
    scale_tril, info = torch.linalg.cholesky_ex(cov)
    if info != 0:
        raise ValueError(
            f"the sample covariance of {z.shape[0]} posterior samples is singular (a chain that did not move?); "
            "increase warmup_steps or num_samples"
        )
    return dist.MultivariateNormal(loc, scale_tril=scale_tril)


def hmc_log_likelihood(
    model,
    x: torch.Tensor,
    num_samples: int = 1000,
    warmup_steps: int | None = None,
    kernel: str = "nuts",
    kernel_options: dict | None = None,
    progress: bool = False,
    points_per_chain: int = 1,
    **kwargs,
) -> torch.Tensor:
    r"""The Appendix D estimate of :math:`\log p_\theta(x_i)` for each row of x (N, D): shape (N,).

    Per datapoint, ``warmup_steps`` (default L) + 2L draws: the first L fit
    :math:`q = \mathcal{N}(\bar z, S)`, the next L are the fresh posterior samples of

    .. math::

        \log p_\theta(x_i) \simeq -\Big(\operatorname{logsumexp}_{l=1}^{L}
            \big[\log q(z^{(l)}) - \log p_\theta(x_i, z^{(l)})\big] - \log L\Big).

    ``points_per_chain`` = G: the datapoints go G at a time into one chain on the product of their
    posteriors (:func:`run_chain`). G = 1 (the default) gives each datapoint its own chain and
    adaptation; a larger G shares one step size and trajectory among G datapoints, which costs about
    as much per draw as one datapoint does on a CPU (the model's forward pass is batched), so it is
    many times faster for the same estimator. Warns if the latent has 5 or more dimensions (see the
    module's warning). ``kwargs`` go to the model.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"expected x of shape (N, D) with N >= 1, got {tuple(x.shape)}")
    if points_per_chain < 1:
        raise ValueError(f"points_per_chain must be >= 1, got {points_per_chain}")
    name, dim = latent_site(model, x[:1], **kwargs)
    if dim > MAX_RELIABLE_LATENT_DIM:
        warnings.warn(
            f"the Appendix D marginal likelihood estimator is reliable only for low-dimensional latents "
            f"(Kingma & Welling 2013: fewer than 5 dimensions); this latent has {dim}",
            stacklevel=2,
        )
    warmup_steps = num_samples if warmup_steps is None else warmup_steps
    estimates = []
    for start in range(0, x.shape[0], points_per_chain):
        rows = x[start : start + points_per_chain]  # (G, D)
        z, _ = run_chain(model, rows, 2 * num_samples, warmup_steps, kernel, kernel_options, progress, **kwargs)
        for i in range(rows.shape[0]):
            q = fit_gaussian(z[:num_samples, i])  # fitted on the first L draws
            fresh = z[num_samples:, i]  # the next L draws, (L, Nz)
            log_ratio = q.log_prob(fresh) - log_joint_at(model, rows[i : i + 1], fresh, site=name, **kwargs)  # (L,)
            estimates.append(-(log_ratio.logsumexp(0) - math.log(num_samples)))
    return torch.stack(estimates)
