r"""The wake-sleep algorithm, as the AEVB paper compared against it (its Figure 2).

Two phases per minibatch, each a gradient step on its own objective:

* wake, for the generative model: z ~ q(z|x) (no gradient into q), then a step
  up :math:`\log p_\theta(x, z)`;
* sleep, for the recognition model: dreams (z, x) ~ p_theta(z) p_theta(x|z)
  (no gradient into p), then a step up :math:`\log q_\phi(z|x)` on the dreams.

Neither is a gradient of one bound: the sleep phase fits q to the model's
posterior in the wrong KL direction, on the model's own fantasies rather than
on the data. :func:`dream` and :func:`sleep_log_q` are shared with the
reweighted wake-sleep estimator (:mod:`pyro_aevb.infer.rws`).
"""

from __future__ import annotations

import torch

from pyro import poutine

from ..errors import ConfigError
from .handlers import NonReparam
from .surrogate import SurrogateLossMixin
from .traces import log_densities, plate_scale, sample_sites, sum_sites, terms_shape, trace_fn


def dream(model, x: torch.Tensor, num_samples: int, *args, **kwargs) -> tuple[poutine.Trace, torch.Tensor]:
    """``num_samples`` draws (z, x) from the model, with no gradient: the model's trace and the dreamed x.

    The model is run unconditioned, with its data argument x (the first) replaced
    by a placeholder of ``num_samples`` rows shaped like x, so its data plate has
    that many members and its observed site is sampled. The dreamed data is the
    value of the one site that was observed; the other arguments (e.g. a
    ``num_data`` keyword) pass through, so the plate keeps its N.
    """
    placeholder = x.new_zeros((num_samples,) + tuple(x.shape[1:]))
    with torch.no_grad():
        trace = poutine.trace(poutine.uncondition(model)).get_trace(placeholder, *args, **kwargs)  # unpruned: replayed whole
    observed = [site for site in trace.nodes.values()
                if site["type"] == "sample" and site["infer"].get("was_observed", False)]
    if len(observed) != 1:
        raise NotImplementedError(f"sleep phase needs exactly one observed site in the model, found {len(observed)}")
    return trace, observed[0]["value"]


def sleep_log_q(model, guide, x: torch.Tensor, *args, num_samples: int = 0, **kwargs) -> torch.Tensor:
    r"""The sleep-phase objective :math:`\frac{N}{S}\sum_{s=1}^S \log q_\phi(z_s|x_s)`, (z_s, x_s) ~ p_theta.

    S = ``num_samples`` (0 means the number of rows of x); N/S is the guide's data
    plate scale. Unscaled by any ``poutine.scale`` (beta). Differentiable in the
    guide's parameters only: the dreams carry no gradient.
    """
    num_samples = num_samples or x.shape[0]
    dreams, x_dream = dream(model, x, num_samples, *args, **kwargs)
    sites = sample_sites(trace_fn(poutine.replay(guide, trace=dreams), x_dream, *args, **kwargs), observed=False)
    scale = plate_scale(next(iter(sites.values()))) if sites else 1.0
    return scale * sum_sites(sites, terms_shape(sites)).sum()


class WakeSleep(SurrogateLossMixin):
    r"""Wake-sleep [1] with the AEVB recognition model, minibatches of M and L samples of z per datapoint.

    Wake (updates :math:`\theta`), with :math:`z_{il} \sim q_\phi(z|x_i)` detached:

    .. math::

        \Delta\theta \propto \nabla_\theta\, \frac{N}{M} \sum_{i=1}^M \frac1L \sum_{l=1}^L \log p_\theta(x_i, z_{il})

    Sleep (updates :math:`\phi`), with S dreams :math:`(z_s, x_s) \sim p_\theta(z)p_\theta(x|z)` detached:

    .. math::

        \Delta\phi \propto \nabla_\phi\, \frac{N}{S} \sum_{s=1}^S \log q_\phi(z_s \mid x_s)

    Both updates come from one surrogate, so the training loop takes one step on
    (theta, phi). ``loss`` / the value of ``differentiable_loss`` is the -ELBO
    estimate of the current (q, p) on the minibatch (estimator A with the same
    z, scaled by N/M like :class:`pyro.infer.Trace_ELBO`), the quantity AEVB
    reports; the gradient is wake-sleep's own update, which is not the gradient
    of that ELBO (nor of any one objective).

    :param num_particles: L, samples of z per datapoint in the wake phase.
    :param sleep_samples: S, dreams per step; 0 means S = M.

    .. warning:: A ``poutine.scale`` (``beta``) is ignored: both phases, and the
       reported ELBO, use the unscaled densities. The sleep phase assumes the
       model has one observed site, whose value is the first argument of model
       and guide (the data x), and that the model uses x only for its shape and
       as the observation; N/M (N/S) is the data plate's scale.

    .. warning:: The sleep-phase gradient of a parameter that both p and q use
       (e.g. a VampPrior's encoder) is only the q part; wake sees the p part.

    References:
      [1] G. E. Hinton, P. Dayan, B. J. Frey, R. M. Neal. The "wake-sleep"
          algorithm for unsupervised neural networks. Science 268, 1995.
      [2] D. P. Kingma, M. Welling. Auto-Encoding Variational Bayes. ICLR 2014, Sec. 5 and Figure 2.
    """

    def __init__(self, num_particles: int = 1, sleep_samples: int = 0):
        if sleep_samples < 0:
            raise ConfigError(f"sleep_samples must be >= 0 (0 means the minibatch size), got {sleep_samples}")
        self.num_particles = num_particles
        self.sleep_samples = sleep_samples

    def _wake(self, model, guide, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(elbo, wake objective): both scaled sums over the minibatch, averaged over L particles."""
        L = self.num_particles
        with NonReparam():  # z ~ q with no path to phi
            terms = log_densities(model, guide, *args, num_particles=L if L > 1 else None, **kwargs)
        log_joint = terms.scale * terms.log_joint.sum() / L
        elbo = log_joint - terms.scale * terms.log_q.sum() / L
        return elbo, log_joint

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        elbo, wake = self._wake(model, guide, args, kwargs)
        sleep = sleep_log_q(model, guide, *args, num_samples=self.sleep_samples, **kwargs)
        surrogate = -(wake + sleep)
        return -elbo.detach() + (surrogate - surrogate.detach())

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The -ELBO estimate of the current q and p (estimator A, one draw per particle)."""
        with torch.no_grad():
            elbo, _ = self._wake(model, guide, args, kwargs)
        return -elbo.item()
