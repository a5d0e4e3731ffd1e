r"""Per-datapoint, per-particle log-density terms of a Pyro model/guide pair: the one trace utility.

Every objective, bound, likelihood estimate and diagnostic in this package reads
a model/guide pair the same way: the guide is traced, the model is replayed
against it, subsample sites are pruned and each site's log-density is computed,
all by Pyro's own :func:`pyro.infer.enum.get_importance_trace` (which also runs
Pyro's shape and support checks when validation is on). What this module adds
is the bookkeeping the per-datapoint quantities need. For particles
:math:`z_{il} \sim q(z|x_i)`, each term has shape (L, M), L particles by M
datapoints:

.. math::

    \log p(x_i|z_{il}), \qquad \log p(z_{il}), \qquad \log q(z_{il}|x_i),
    \qquad \log w_{il} = \log p(x_i, z_{il}) - \log q(z_{il}|x_i).

They are *unscaled*: Pyro's ``site["unscaled_log_prob"]``, without the data
plate's N/M or a ``poutine.scale`` (beta). The data plate's N/M is returned
beside them (:attr:`LogDensities.scale`), read from the plate's frame, as Pyro's
ELBOs read it.

Conventions (those of :class:`pyro_aevb.generative.vae.VAE`, and of most Pyro
models of i.i.d. data): the data plate is at dim -1 and every sample site is
inside it; L > 1 particles are drawn in one vectorized pass by a ``particles``
plate at dim -2. Plates further left (dim -3 and beyond, e.g. the diffusion
model's subsampled time steps) are summed over, each scaled by its own
``full_size / size``, so a datapoint's terms are unbiased for the full sums.
The model and guide are called with the same ``*args, **kwargs``; nothing here
assumes their names.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

import pyro
from pyro import poutine
from pyro.infer.enum import get_importance_trace
from pyro.poutine.util import prune_subsample_sites

#: dim of the vectorized particle plate (the data plate is at -1)
PARTICLE_DIM = -2
#: plates Pyro's shape checks allow: data (-1), particles (-2) and one more, further left (-3)
MAX_PLATE_NESTING = 3


def particle_plate(num_particles: int | None):
    """A ``particles`` plate of size L at dim -2, or nothing for ``None``."""
    if num_particles is None:
        return contextlib.nullcontext()
    return pyro.plate("particles", num_particles, dim=PARTICLE_DIM)


def in_particle_plate(fn, num_particles: int | None):
    """``fn`` run inside its own :func:`particle_plate`, as Pyro's ELBOs vectorize particles: the plate
    must be inside ``poutine.replay``/``condition``, or it would not broadcast the replayed sites."""
    if num_particles is None:
        return fn

    def wrapped(*args, **kwargs):
        with particle_plate(num_particles):
            return fn(*args, **kwargs)

    return wrapped


def sample_sites(trace: poutine.Trace, observed: bool | None = None) -> dict[str, dict]:
    """The trace's sample sites that are not subsample sites, by name; ``observed`` selects one kind."""
    trace = prune_subsample_sites(trace)
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and (observed is None or site["is_observed"] == observed)}


def trace_pair(model, guide, *args, num_particles: int | None = None, **kwargs):
    """``(model_trace, guide_trace)``: the guide traced, the model replayed against it, log-densities computed.

    Pyro's :func:`~pyro.infer.enum.get_importance_trace` does the work; ``num_particles``
    wraps both in a ``particles`` plate at dim -2.
    """
    model, guide = in_particle_plate(model, num_particles), in_particle_plate(guide, num_particles)
    return get_importance_trace("flat", MAX_PLATE_NESTING, model, guide, args, kwargs)


def trace_fn(fn, *args, num_particles: int | None = None, condition: dict | None = None, **kwargs):
    """The trace of a model or guide ``fn`` (conditioned on ``condition``, if given), in a particle plate
    with ``num_particles``, subsample sites pruned, log-densities computed."""
    fn = in_particle_plate(fn, num_particles)
    fn = poutine.condition(fn, data=condition) if condition else fn
    trace = prune_subsample_sites(poutine.trace(fn).get_trace(*args, **kwargs))
    trace.compute_log_prob()
    return trace


def plate_scale(site: dict) -> float:
    """N/M of a site: the product of ``full_size / size`` over its plates (1 outside subsampled plates)."""
    scale = 1.0
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None and frame.size:
            scale *= frame.full_size / frame.size
    return scale


def outer_scale(site: dict) -> float:
    """The product of ``full_size / size`` over a site's plates left of the particle plate (dim < -2)."""
    scale = 1.0
    for frame in site["cond_indep_stack"]:
        if frame.dim is not None and frame.dim < PARTICLE_DIM and frame.full_size is not None and frame.size:
            scale *= frame.full_size / frame.size
    return scale


def per_datapoint(log_prob: torch.Tensor, shape: torch.Size, site: dict | None = None) -> torch.Tensor:
    """A site's batch-shaped log-density as the terms' (L, M), or (M,) without particles: broadcast, and
    summed over plates further left (scaled by their ``full_size / size``, from ``site``)."""
    extra = log_prob.dim() - len(shape)
    if extra > 0:
        log_prob = log_prob.sum(tuple(range(extra))) * (outer_scale(site) if site is not None else 1.0)
    return log_prob.expand(shape)


def sum_sites(sites: dict[str, dict], shape: torch.Size, key: str = "unscaled_log_prob") -> torch.Tensor:
    """Sum of the sites' log-densities (``site[key]``), each reduced to ``shape``."""
    total = None
    for site in sites.values():
        term = per_datapoint(site[key], shape, site)
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(shape)


def terms_shape(sites: dict[str, dict]) -> torch.Size:
    """(L, M) or (M,): the batch shape of the data plate and the particle plate (every site lies in the data
    plate; dims further left are other plates, summed over)."""
    shapes = [site["unscaled_log_prob"].shape[-2:] if any(
        f.dim == PARTICLE_DIM for f in site["cond_indep_stack"]) else site["unscaled_log_prob"].shape[-1:]
        for site in sites.values()]
    return max(shapes, key=len) if shapes else torch.Size()


@dataclass
class LogDensities:
    """The per-datapoint terms of one trace pair, each of shape (L, M) (or (M,) with no particle plate).

    :ivar log_lik: :math:`\\log p(x_i|z_{il})`, summed over the model's observed sites.
    :ivar log_prior: :math:`\\log p(z_{il})`, summed over the model's latent sites.
    :ivar log_q: :math:`\\log q(z_{il}|x_i)`, summed over the guide's latent sites.
    :ivar scale: N/M, the data plate's scale (1 when x is the whole data set).
    """

    log_lik: torch.Tensor
    log_prior: torch.Tensor
    log_q: torch.Tensor
    scale: float
    model_trace: poutine.Trace
    guide_trace: poutine.Trace

    @property
    def log_joint(self) -> torch.Tensor:
        """:math:`\\log p(x_i, z_{il})`."""
        return self.log_lik + self.log_prior

    @property
    def log_weights(self) -> torch.Tensor:
        """Importance log-weights :math:`\\log p(x_i, z_{il}) - \\log q(z_{il}|x_i)`."""
        return self.log_joint - self.log_q


def log_densities(model, guide, *args, num_particles: int | None = None, **kwargs) -> LogDensities:
    """The :class:`LogDensities` of one guide draw per particle (differentiable, as the draws are)."""
    model_trace, guide_trace = trace_pair(model, guide, *args, num_particles=num_particles, **kwargs)
    observed, latent = sample_sites(model_trace, True), sample_sites(model_trace, False)
    q_sites = sample_sites(guide_trace, False)
    shape = terms_shape({**observed, **latent, **q_sites})
    scales = [plate_scale(site) for site in observed.values()]
    return LogDensities(
        log_lik=sum_sites(observed, shape),
        log_prior=sum_sites(latent, shape),
        log_q=sum_sites(q_sites, shape),
        scale=scales[0] if scales else 1.0,
        model_trace=model_trace,
        guide_trace=guide_trace,
    )


def log_joint(model, values: dict[str, torch.Tensor], *args, num_particles: int | None = None,
              **kwargs) -> torch.Tensor:
    """:math:`\\log p(x_i, z_i)` per datapoint (and particle) with the latent sites set to ``values``.

    The model is traced conditioned on ``values``; the unscaled log-densities of all its sample sites
    are summed. Shape (M,), or (L, M) with ``num_particles``; differentiable in the values and the model.
    """
    sites = sample_sites(trace_fn(model, *args, num_particles=num_particles, condition=values, **kwargs))
    return sum_sites(sites, terms_shape(sites))


def latent_site(model, *args, **kwargs) -> tuple[str, int]:
    """(name, dimension) of the model's one latent sample site, from one trace (no gradient).

    Raises ``ValueError`` unless there is exactly one, with a one-dimensional event.
    """
    with torch.no_grad():
        latents = sample_sites(poutine.trace(model).get_trace(*args, **kwargs), observed=False)
    if len(latents) != 1:
        raise ValueError(f"expected exactly one latent sample site in the model, found {sorted(latents)}")
    name, site = next(iter(latents.items()))
    if len(site["fn"].event_shape) != 1:
        raise ValueError(f"the latent site '{name}' must have a one-dimensional event shape, "
                         f"got {tuple(site['fn'].event_shape)}")
    return name, site["fn"].event_shape[0]
