r"""Reweighted wake-sleep (Bornschein & Bengio 2015), with per-datapoint weights and minibatches.

Pyro's :class:`pyro.infer.ReweightedWakeSleep` sums the log-weights over the
whole batch before normalising, needs K >= 2 and an ``observations`` keyword.
Here the K importance weights are normalised separately for each datapoint
(from :func:`pyro_aevb.infer.traces.log_densities`, shape (K, M)), a minibatch is
scaled by its data plate's N/M, and the model/guide pair is called like any other
estimator's.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .handlers import NonReparam
from .surrogate import SurrogateLossMixin
from .traces import log_densities
from .wake_sleep import sleep_log_q


def normalized_weights(log_w: torch.Tensor) -> torch.Tensor:
    r"""Self-normalised importance weights :math:`\tilde w_{ik}`, per datapoint: softmax over K of (K, M) log-weights.

    Each column sums to 1. Detached: the weights are constants in every update.
    """
    return torch.softmax(log_w.detach(), dim=0)


def wake_terms(model, guide, *args, num_particles: int = 1, **kwargs):
    r"""Per-datapoint (K, M) tensors for :math:`z_{ik} \sim q(z|x_i)` drawn with no path to the guide:

    ``(log_w, log_p, log_q)``: :math:`\log p(x_i, z_{ik})` with gradients through the model only,
    :math:`\log q(z_{ik}|x_i)` through the guide only, and :math:`\log w = \log p - \log q`.
    """
    terms = _wake_densities(model, guide, args, kwargs, num_particles)
    return terms.log_weights, terms.log_joint, terms.log_q


def _wake_densities(model, guide, args, kwargs, num_particles: int):
    with NonReparam():
        return log_densities(model, guide, *args, num_particles=num_particles, **kwargs)


class ReweightedWakeSleep(SurrogateLossMixin):
    r"""Reweighted wake-sleep [1] with K particles, per-datapoint importance weights, minibatches of M.

    For each datapoint :math:`x_i` of the minibatch, :math:`z_{ik} \sim q_\phi(z|x_i)`
    (k = 1..K, no gradient through z), log-weights
    :math:`\log w_{ik} = \log p_\theta(x_i, z_{ik}) - \log q_\phi(z_{ik}|x_i)` and
    weights normalised over k for that datapoint alone,
    :math:`\tilde w_{ik} = w_{ik} / \sum_{k'} w_{ik'}`. Then

    .. math::

        \text{wake-}\theta:\ \frac{N}{M}\sum_{i=1}^M \sum_{k=1}^K \tilde w_{ik}\,\nabla_\theta \log p_\theta(x_i, z_{ik}),
        \qquad
        \text{wake-}\phi:\ \frac{N}{M}\sum_{i=1}^M \sum_{k=1}^K \tilde w_{ik}\,\nabla_\phi \log q_\phi(z_{ik}|x_i),

    .. math::

        \text{sleep-}\phi:\ \frac{N}{S}\sum_{s=1}^S \nabla_\phi \log q_\phi(z_s|x_s),\quad (z_s, x_s) \sim p_\theta,

    and the step is wake-theta for theta and
    ``mixing`` * wake-phi + (1 - ``mixing``) * sleep-phi for phi (Pyro's
    ``insomnia``). Wake-theta is the gradient of the IWAE bound with respect to
    theta; wake-phi follows the inclusive KL(p(z|x) || q(z|x)).

    ``loss`` / the value of ``differentiable_loss`` is the -ELBO estimate (the
    mean over the K particles of log w, summed over the minibatch and scaled by
    N/M), the quantity AEVB reports; the gradient is RWS's update.

    :param num_particles: K.
    :param mixing: weight of wake-phi in phi's update, in [0, 1]; sleep-phi gets 1 - mixing.
    :param sleep_samples: S, dreams per step for sleep-phi; 0 means S = M.

    .. warning:: With K = 1 the weight is 1: wake-theta is wake-sleep's wake phase
       and wake-phi has expectation zero (pure noise). Use K >= 5 or so.
       The self-normalised weights make every update biased for finite K.

    .. warning:: A ``poutine.scale`` (``beta``) is ignored (the weights are of the
       unscaled joint). Sleep-phi assumes one observed site whose value is the
       first argument, as in :class:`pyro_aevb.infer.wake_sleep.WakeSleep`.

    References:
      [1] J. Bornschein, Y. Bengio. Reweighted wake-sleep. ICLR 2015, arXiv:1406.2751.
      [2] T. A. Le, A. R. Kosiorek, N. Siddharth, Y. W. Teh, F. Wood. Revisiting
          reweighted wake-sleep for models with stochastic control flow. UAI 2019.
      [3] G. E. Hinton, P. Dayan, B. J. Frey, R. M. Neal. The "wake-sleep" algorithm. Science 268, 1995.
    """

    def __init__(self, num_particles: int = 1, mixing: float = 0.5, sleep_samples: int = 0):
        if not 0.0 <= mixing <= 1.0:
            raise ConfigError(f"mixing must be in [0, 1] (the weight of wake-phi), got {mixing}")
        if sleep_samples < 0:
            raise ConfigError(f"sleep_samples must be >= 0 (0 means the minibatch size), got {sleep_samples}")
        self.num_particles = num_particles
        self.mixing = mixing
        self.sleep_samples = sleep_samples

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        terms = _wake_densities(model, guide, args, kwargs, self.num_particles)
        log_w, log_p, log_q, scale = terms.log_weights, terms.log_joint, terms.log_q, terms.scale
        weights = normalized_weights(log_w)  # (K, M), columns sum to 1
        elbo = scale * log_w.detach().mean(0).sum()
        surrogate = scale * (weights * (log_p + self.mixing * log_q)).sum()  # wake-theta + mixing * wake-phi
        if self.mixing < 1.0:
            surrogate = surrogate + (1.0 - self.mixing) * sleep_log_q(model, guide, *args,
                                                                      num_samples=self.sleep_samples, **kwargs)
        return -elbo + (-surrogate - (-surrogate).detach())

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The -ELBO estimate: -(N/M) sum_i mean_k log w_ik."""
        with torch.no_grad():
            terms = log_densities(model, guide, *args, num_particles=self.num_particles, **kwargs)
        return -(terms.scale * terms.log_weights.mean(0).sum()).item()
