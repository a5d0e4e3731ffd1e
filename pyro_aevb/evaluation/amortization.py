r"""The amortization gap (Cremer, Li & Duvenaud 2018): how much of the bound the encoder gives away.

An amortized guide :math:`q_\phi(z|x)` uses one network for every datapoint.
For a datapoint :math:`x_i` the gap between the marginal likelihood and the
bound splits into two parts [1]:

.. math::

    \underbrace{\log p(x_i) - \mathcal L[q_\phi(z|x_i)]}_{\text{inference gap}}
    = \underbrace{\log p(x_i) - \mathcal L[q^*_i]}_{\text{approximation gap}}
    + \underbrace{\mathcal L[q^*_i] - \mathcal L[q_\phi(z|x_i)]}_{\text{amortization gap}},

where :math:`\mathcal L[q] = \mathbb E_q[\log p(x_i, z) - \log q(z)]` is the
ELBO and :math:`q^*_i` is the best member of the guide's family *for this one
datapoint* (here: a diagonal Gaussian with its own free mean and scale). The
approximation gap is what the family cannot do; the amortization gap is what
the encoder fails to do although the family could.

:func:`amortization_gap` estimates the three quantities per datapoint:

1. :math:`q^*_i`: the guide's latent site, with its distribution replaced by
   :math:`\mathcal N(m_i, \operatorname{diag} s_i^2)` with free parameters per
   datapoint, started at the encoder's output and optimised by stochastic
   variational inference (Adam on Pyro's ``TraceMeanField_ELBO``, the
   analytic KL where one is registered, else ``Trace_ELBO``). The guide's own
   plates and scales are kept, so the model and the local guide are an
   ordinary Pyro pair. Optimising the sum over datapoints with Adam, which
   acts element-wise, optimises each :math:`q_i` independently.
2. :math:`\mathcal L[q_\phi]` and :math:`\mathcal L[q^*_i]`: the same
   per-datapoint estimator for both, :func:`pyro_aevb.evaluation.bounds.elbo_per_datapoint`
   with ``eval_particles`` draws, as estimator A (the Monte Carlo average of
   :math:`\log p(x_i, z) - \log q(z)`): its variance vanishes as q approaches
   the posterior, so the small gaps near :math:`q^*_i` are measured precisely
   (estimator B's does not: its :math:`\log p(x_i|z)` term varies with z).
3. :math:`\log p(x_i)`: importance sampling with K samples
   (:func:`pyro_aevb.evaluation.marginal_likelihood.log_likelihood`) from :math:`q^*_i` by default
   (``proposal="optimized"``). Its expectation lies between
   :math:`\mathcal L[q^*_i]` and :math:`\log p(x_i)` and rises with K (Burda et
   al. [2], Theorem 1), so the approximation gap reported is a lower estimate
   and never negative in expectation; the importance-sampling ESS is returned
   to judge K.

Every density comes from Pyro traces of the model and the guide; nothing is
written by hand, so custom priors and decoders work unchanged.

.. warning::
    The guide must have latent sites distributed as a diagonal Normal
    (``Normal(loc, scale).to_event(k)``, as :class:`pyro_aevb.generative.vae.VAE`'s guide)
    inside one data plate at dim -1, with ``guide(x)`` taking x of shape (N, D);
    the model must score x with the same plate. The model's parameters are
    not changed (gradients are taken with respect to the local parameters only).

References:
  [1] C. Cremer, X. Li, D. Duvenaud. Inference Suboptimality in Variational Autoencoders. ICML 2018,
      arXiv:1801.03558.
  [2] Y. Burda, R. Grosse, R. Salakhutdinov. Importance Weighted Autoencoders. ICLR 2016, arXiv:1509.00519.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import pyro
import pyro.distributions as dist
import pyro.infer
from pyro.poutine.messenger import Messenger

from ..infer.traces import sample_sites, trace_fn
from .bounds import SUBSET_SEED, elbo_per_datapoint, fixed_subset, mean_se
from .marginal_likelihood import DEFAULT_CHUNK_SIZE, log_likelihood

PROPOSALS = ("optimized", "amortized")


def _gaussian_sites(guide, x: torch.Tensor, **kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Each latent site of the guide at x (N, D): name -> (loc (N, *event), scale (N, *event), event dims).

    Raises ``ValueError`` if a site is not a diagonal Normal with batch shape (N,).
    """
    n = x.shape[0]
    with torch.no_grad():
        trace = trace_fn(guide, x, **kwargs)
    sites = {}
    for name, site in sample_sites(trace, observed=False).items():
        fn, event_dims = site["fn"], 0
        while isinstance(fn, torch.distributions.Independent):
            event_dims += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        if not isinstance(fn, torch.distributions.Normal):
            raise ValueError(f"amortization_gap needs diagonal Normal guide sites; site '{name}' is "
                             f"{type(site['fn']).__name__} (over {type(fn).__name__})")
        if tuple(site["fn"].batch_shape) != (n,):
            raise ValueError(f"guide site '{name}' has batch shape {tuple(site['fn'].batch_shape)}, expected "
                             f"({n},): one data plate at dim -1 over the N rows of x")
        loc, scale = torch.broadcast_tensors(fn.loc, fn.scale)  # (N, *event)
        sites[name] = (loc.detach(), scale.detach(), event_dims)
    if not sites:
        raise ValueError("the guide has no latent sample site")
    return sites


class _LocalGaussian(Messenger):
    """Replace the distribution of the named guide sites by Normal(loc, exp(log_scale)) with free parameters.

    Entered around the guide call, it sees each site after the guide's own
    plates have broadcast it and before any outer plate (e.g. a particle
    plate) does; the new distribution is expanded to that batch shape, so the
    outer plates broadcast it as they would the original.
    """

    def __init__(self, params: dict[str, tuple[torch.Tensor, torch.Tensor, int]]):
        super().__init__()
        self.params = params

    def _process_message(self, msg):
        if msg["type"] != "sample" or msg["name"] not in self.params:
            return
        loc, log_scale, event_dims = self.params[msg["name"]]
        new = dist.Normal(loc, log_scale.exp()).to_event(event_dims)
        if new.batch_shape != msg["fn"].batch_shape:
            new = new.expand(msg["fn"].batch_shape)
        msg["fn"] = new


def local_guide(guide, params: dict[str, tuple[torch.Tensor, torch.Tensor, int]]):
    """The guide with each named site's distribution replaced by per-datapoint free Gaussians.

    ``params``: site name -> (loc (M, *event), log_scale (M, *event), event dims), for the M rows of the
    x the returned guide is called with.
    """

    def guide_fn(*args, **kwargs):
        with _LocalGaussian(params):
            return guide(*args, **kwargs)

    return guide_fn


def _rows(params, r0: int, r1: int):
    return {name: (loc[r0:r1], log_scale[r0:r1], k) for name, (loc, log_scale, k) in params.items()}


@dataclass
class AmortizationGap:
    """Per-datapoint estimates from :func:`amortization_gap` (nats; float64 tensors of shape (N,)).

    :ivar log_likelihood: log p(x_i), importance sampling with ``num_samples`` draws from the proposal.
    :ivar elbo_amortized: the ELBO of the amortized guide q_phi(z|x_i).
    :ivar elbo_optimized: the ELBO of the locally optimised q*_i.
    :ivar ess: importance-sampling effective sample size of the log p(x_i) estimate, in [1, K].
    :ivar locs, scales: site name -> the (N, *event) mean and scale of q*_i.
    :ivar elbo_history: (num_steps,) the optimisation's noisy ELBO estimate, averaged over datapoints.
    :ivar event_dims: site name -> number of event dimensions of the site.
    """

    log_likelihood: torch.Tensor
    elbo_amortized: torch.Tensor
    elbo_optimized: torch.Tensor
    ess: torch.Tensor
    locs: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    elbo_history: torch.Tensor
    event_dims: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def approximation_gap(self) -> torch.Tensor:
        """log p(x_i) - ELBO(q*_i): what the Gaussian family cannot represent."""
        return self.log_likelihood - self.elbo_optimized

    @property
    def amortization_gap(self) -> torch.Tensor:
        """ELBO(q*_i) - ELBO(q_phi(z|x_i)): what the encoder gives away."""
        return self.elbo_optimized - self.elbo_amortized

    @property
    def inference_gap(self) -> torch.Tensor:
        """log p(x_i) - ELBO(q_phi(z|x_i)) = approximation gap + amortization gap."""
        return self.log_likelihood - self.elbo_amortized

    def optimized_guide(self, guide, rows=None):
        """q*_i as a Pyro guide: ``guide`` with its sites replaced by the optimised Gaussians of ``rows``.

        ``rows`` (a slice, index tensor or list; default all) selects the datapoints; call the result with
        the matching rows of x, e.g. ``gap.optimized_guide(vae.guide, [3, 7])(x[[3, 7]])``.
        """
        rows = slice(None) if rows is None else rows
        return local_guide(guide, {name: (self.locs[name][rows], self.scales[name][rows].log(),
                                          self.event_dims[name]) for name in self.locs})

    def summary(self) -> dict:
        """Averages over datapoints with standard errors (over datapoints), as a JSON-ready dict.

        Keys: ``n``; ``log_likelihood``, ``elbo_amortized``, ``elbo_optimized``, ``approximation_gap``,
        ``amortization_gap``, ``inference_gap`` (means, nats per datapoint) each with ``*_se``;
        ``amortization_fraction`` (amortization gap / inference gap, of the means); ``ess_mean``,
        ``ess_min``; and the settings (``num_samples``, ``num_steps``, ``lr``, ``elbo_particles``,
        ``eval_particles``, ``proposal``, ``analytic_kl``).
        """
        n = self.log_likelihood.numel()
        out: dict = {"n": n}
        for key in ("log_likelihood", "elbo_amortized", "elbo_optimized", "approximation_gap",
                    "amortization_gap", "inference_gap"):
            out[key], out[f"{key}_se"] = mean_se(getattr(self, key))
        out["amortization_fraction"] = (out["amortization_gap"] / out["inference_gap"]
                                        if out["inference_gap"] != 0 else math.nan)
        out["ess_mean"] = self.ess.mean().item()
        out["ess_min"] = self.ess.min().item()
        out.update(self.settings)
        return out


def optimize_local(model, guide, x: torch.Tensor, num_steps: int = 500, lr: float = 0.02,
                   elbo_particles: int = 10, analytic_kl: bool = True, progress: bool = False, **kwargs):
    """Fit q*_i, a free diagonal Gaussian per row of x (N, D), by SVI, starting from the guide's output.

    Adam on the (loc, log scale) of every datapoint, with the step size
    decaying from ``lr`` to ``lr / 100`` on a cosine, ``elbo_particles``
    vectorized draws per step. Returns ``(params, history)``: site name ->
    (loc, log_scale, event dims) detached, and the (num_steps,) mean ELBO per
    datapoint at each step (the noisy training estimate).
    """
    start = _gaussian_sites(guide, x, **kwargs)
    params = {name: (loc.clone().requires_grad_(True), scale.log().clone().requires_grad_(True), k)
              for name, (loc, scale, k) in start.items()}
    leaves = [t for loc, log_scale, _ in params.values() for t in (loc, log_scale)]
    make = pyro.infer.TraceMeanField_ELBO if analytic_kl else pyro.infer.Trace_ELBO
    elbo = make(num_particles=elbo_particles, vectorize_particles=elbo_particles > 1, max_plate_nesting=1)
    optimizer = torch.optim.Adam(leaves, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, num_steps), eta_min=lr / 100)
    q = local_guide(guide, params)
    history = torch.empty(num_steps, dtype=torch.float64, device=x.device)  # read back once, at the end
    n = x.shape[0]
    for step in tqdm(range(num_steps), desc="local q", disable=not progress):
        loss = elbo.differentiable_loss(model, q, x, **kwargs)
        grads = torch.autograd.grad(loss, leaves)  # the local parameters only: the model is left alone
        for leaf, grad in zip(leaves, grads):
            leaf.grad = grad
        optimizer.step()
        schedule.step()
        history[step] = -loss.detach().double() / n
    return {name: (loc.detach(), log_scale.detach(), k) for name, (loc, log_scale, k) in params.items()}, history.cpu()


def amortization_gap(
    model,
    guide,
    x: torch.Tensor,
    num_steps: int = 500,
    lr: float = 0.02,
    num_samples: int = 1000,
    elbo_particles: int = 10,
    eval_particles: int = 1000,
    proposal: str = "optimized",
    analytic_kl: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
    **kwargs,
) -> AmortizationGap:
    r"""Approximation and amortization gaps of the guide on each row of x (shape (N, D)).

    :param model, guide: a Pyro pair, e.g. ``vae.model, vae.guide`` (see the module's warning).
    :param num_steps, lr: Adam steps and initial step size of the local optimisation of each q*_i.
    :param num_samples: K, importance samples per datapoint for log p(x_i).
    :param elbo_particles: draws of z per datapoint in each optimisation step.
    :param eval_particles: draws of z per datapoint for the two reported ELBOs (estimator A).
    :param proposal: ``"optimized"`` (q*_i, default) or ``"amortized"`` (q_phi) for importance sampling.
    :param analytic_kl: optimise q*_i with the analytic KL where registered (``TraceMeanField_ELBO``),
        else ``Trace_ELBO``.
    :param chunk_size: at most this many (particle, datapoint) pairs per evaluation pass (memory).
    :param kwargs: passed to the model and the guide; leave ``beta`` out: the gaps are of the ELBO (beta = 1).
    :returns: an :class:`AmortizationGap`; ``.summary()`` gives a JSON-ready dict.
    """
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
    for key, value in (("num_samples", num_samples), ("elbo_particles", elbo_particles),
                       ("eval_particles", eval_particles), ("chunk_size", chunk_size)):
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if num_steps < 0 or lr <= 0:
        raise ValueError(f"num_steps must be >= 0 and lr > 0, got {num_steps} and {lr}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"expected x of shape (N, D) with N >= 1, got {tuple(x.shape)}")
    n = x.shape[0]
    params, history = optimize_local(model, guide, x, num_steps, lr, elbo_particles, analytic_kl, progress,
                                     **kwargs)

    def blocks(particles: int):
        rows = max(1, chunk_size // particles)
        return [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]

    def elbos(params_or_none) -> torch.Tensor:
        values = []
        for r0, r1 in blocks(eval_particles):
            q = guide if params_or_none is None else local_guide(guide, _rows(params_or_none, r0, r1))
            values.append(elbo_per_datapoint(model, q, x[r0:r1], eval_particles, analytic_kl=False, **kwargs))
        return torch.cat(values).to(torch.float64)

    elbo_amortized = elbos(None)
    elbo_optimized = elbos(params)
    estimates, ess = [], []
    for r0, r1 in blocks(num_samples):  # log_likelihood makes one pass per block (or chunks particles if K is large)
        q = guide if proposal == "amortized" else local_guide(guide, _rows(params, r0, r1))
        result = log_likelihood(model, q, x[r0:r1], num_samples, chunk_size, return_diagnostics=True,
                                progress=False, **kwargs)
        estimates.append(result.log_likelihood)
        ess.append(result.ess)
    return AmortizationGap(
        log_likelihood=torch.cat(estimates).to(torch.float64),
        elbo_amortized=elbo_amortized,
        elbo_optimized=elbo_optimized,
        ess=torch.cat(ess).to(torch.float64),
        locs={name: loc for name, (loc, _, _) in params.items()},
        scales={name: log_scale.exp() for name, (_, log_scale, _) in params.items()},
        elbo_history=history,
        event_dims={name: k for name, (_, _, k) in params.items()},
        settings={"num_samples": num_samples, "num_steps": num_steps, "lr": lr, "elbo_particles": elbo_particles,
                  "eval_particles": eval_particles, "proposal": proposal, "analytic_kl": analytic_kl},
    )


def amortization_gap_summary(model, guide, x: torch.Tensor, num_points: int | None = None,
                             subset_seed: int = SUBSET_SEED, **kwargs) -> dict:
    """:func:`amortization_gap` on ``num_points`` rows of x (N, D), as a JSON-ready dict (for ``evaluate``).

    The rows are drawn without replacement by a generator seeded with
    ``subset_seed`` (test sets may be sorted by class, as ``mnist-5k``'s is), so
    the same rows are used every time; ``None`` or ``num_points >= N`` takes all
    rows. ``kwargs`` go to :func:`amortization_gap`. Returns
    :meth:`AmortizationGap.summary` with ``subset_seed`` added.
    """
    if num_points is not None and num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if num_points is not None:
        x = fixed_subset(x, num_points, subset_seed)
    summary = amortization_gap(model, guide, x, **kwargs).summary()
    summary["subset_seed"] = subset_seed
    return summary


__all__ = ["AmortizationGap", "amortization_gap", "amortization_gap_summary", "local_guide", "optimize_local"]
