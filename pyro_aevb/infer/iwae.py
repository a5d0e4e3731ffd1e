r"""The importance-weighted bound (IWAE; Burda, Grosse & Salakhutdinov 2015), per datapoint.

Pyro's :class:`pyro.infer.RenyiELBO` (alpha = 0) is the IWAE bound of the
*whole batch* as one datapoint: it sums the log-weights over the batch before
the logsumexp over particles, so for M > 1 it is a looser bound that weights
particles jointly. Here each datapoint has its own K particles and its own
logsumexp, from the (K, M) log-weights of :func:`pyro_aevb.infer.traces.log_densities`.
"""

from __future__ import annotations

import math

import torch

from .surrogate import SurrogateLossMixin
from .traces import log_densities


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    r"""Per-datapoint :math:`\log \frac1K \sum_k w_{ik}` from (K, M) log-weights: shape (M,)."""
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


class IWAE(SurrogateLossMixin):
    r"""The K-sample importance-weighted bound [1], one per datapoint, reparameterised, minibatches of M.

    .. math::

        \mathcal{L}_K = \frac{N}{M}\sum_{i=1}^M \log \frac1K \sum_{k=1}^K
            \frac{p_\theta(x_i, z_{ik})}{q_\phi(z_{ik}|x_i)},
        \qquad z_{ik} = g_\phi(\epsilon_{ik}, x_i),

    :math:`\mathcal{L}_1 \le \mathcal{L}_K \le \mathcal{L}_{K+1} \le \log p(x)` in
    expectation; K = 1 is SGVB estimator A. ``loss`` and ``differentiable_loss``
    are :math:`-\mathcal{L}_K` (the objective itself, as Pyro's ``RenyiELBO``
    reports it): for K > 1 this is *not* the ELBO the other estimators report,
    it is higher. The training loop's evaluation still reports the ELBO. N/M is
    the data plate's scale.

    :param num_particles: K, importance samples per datapoint, drawn in one vectorized pass.

    .. warning:: Not :class:`pyro.infer.RenyiELBO`: that one applies the
       logsumexp to the batch's summed log-weights (one bound for the whole
       batch), which is not the sum of per-datapoint bounds and is not scaled
       per datapoint by N/M.

    .. warning:: A ``poutine.scale`` (``beta``) does not enter: the log-weights
       are of the unscaled joint. Gradients flow through reparameterised z; the
       guide's latent sites must have ``rsample``.

    References:
      [1] Y. Burda, R. Grosse, R. Salakhutdinov. Importance weighted autoencoders. ICLR 2016, arXiv:1509.00519.
      [2] D. P. Kingma, M. Welling. Auto-Encoding Variational Bayes. ICLR 2014, arXiv:1312.6114.
    """

    def __init__(self, num_particles: int = 1):
        self.num_particles = num_particles

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-L_K, differentiable (in theta directly, in phi through z)."""
        terms = log_densities(model, guide, *args, num_particles=self.num_particles, **kwargs)
        return -terms.scale * iwae_bound(terms.log_weights).sum()  # log_weights (K, M)
