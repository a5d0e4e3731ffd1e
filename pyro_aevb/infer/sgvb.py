r"""The SGVB estimators of Kingma & Welling (2013) are Pyro's ELBOs.

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
one vectorized pass when L > 1. The data plate's N/M scales a minibatch to the
full data set (the paper's Eq. 8).

.. warning:: ``TraceMeanField_ELBO`` falls back to estimator A's Monte Carlo
   term, silently, for a latent site whose (guide, prior) pair has no
   registered KL. :func:`pyro_aevb.infer.registry.kl_status` finds out which
   one runs, and training records it in ``run.json`` (key ``kl``).

References:
  [1] D. P. Kingma, M. Welling. Auto-Encoding Variational Bayes. ICLR 2014, arXiv:1312.6114.
"""

from __future__ import annotations

import pyro.infer


def trace_elbo(num_particles: int = 1, max_plate_nesting: int = 1, **kwargs) -> pyro.infer.ELBO:
    """SGVB estimator A: ``Trace_ELBO`` with L = ``num_particles``, vectorized (the particles' plate left of
    the model's ``max_plate_nesting`` plates: 1, the data plate, for the VAE)."""
    return pyro.infer.Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                                 max_plate_nesting=max_plate_nesting, **kwargs)


def trace_mean_field_elbo(num_particles: int = 1, max_plate_nesting: int = 1, **kwargs) -> pyro.infer.ELBO:
    """SGVB estimator B: ``TraceMeanField_ELBO`` with L = ``num_particles``, vectorized."""
    return pyro.infer.TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                                          max_plate_nesting=max_plate_nesting, **kwargs)
