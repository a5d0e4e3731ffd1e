r"""Monte Carlo EM with Hamiltonian Monte Carlo in the E-step: the AEVB paper's Figure 3 baseline.

Each datapoint :math:`x_i` keeps one persistent Markov chain :math:`z_i` on its
posterior :math:`p_\theta(z \mid x_i)`. A training step on a minibatch of M
datapoints is

* **E-step**: ``e_steps`` HMC transitions [2] of every chain in the minibatch,
  all chains together (one vectorised leapfrog integration, ``leapfrog_steps``
  steps, identity mass matrix), each accepted or rejected on its own, with the
  potential :math:`U_i(z) = -\log p_\theta(x_i, z)`;
* **M-step**: a gradient step on :math:`\theta` of

.. math::

    \mathcal{J}(\theta) = \frac{N}{M} \sum_{i=1}^{M} \log p_\theta(x_i, z_i),
    \qquad \text{loss} = -\mathcal{J}(\theta),

with the chains' states :math:`z_i` held fixed (no gradient through them). By
Fisher's identity, :math:`\mathbb{E}_{p_\theta(z|x_i)}\nabla_\theta \log
p_\theta(x_i, z) = \nabla_\theta \log p_\theta(x_i)`, so at a stationary chain
this is a stochastic gradient of the marginal log-likelihood.

The step size :math:`\epsilon` is shared by all chains and adapted by
Robbins-Monro on :math:`\log\epsilon` towards an average acceptance
probability of ``target_accept`` (the paper: 90%):

.. math::

    \log\epsilon \leftarrow \log\epsilon + \gamma_t (\bar a_t - \delta), \qquad
    \gamma_t = \max\big(2 (t + 1)^{-0.6},\ 0.02\big),

where :math:`\bar a_t` is the minibatch mean of :math:`\min(1, e^{-\Delta H_i})`.
The floor on :math:`\gamma_t` keeps :math:`\epsilon` following
:math:`\theta` as it trains. Chains start, lazily on the first call, at a draw
from the model's prior (its latent sample site).

The chains, the step size and the adaptation counter are buffers of this
``nn.Module``, so a checkpoint carries them and a resumed run continues the
same chains. The chain buffer is ``(N, Nz)`` (``N`` from ``num_data``); it is
empty until the first call, and :meth:`load_state_dict` takes the saved shape.

.. warning:: The loss reported is :math:`-\mathcal{J}`, the scaled log joint at
   the chains' states: it is **not** an ELBO and not comparable with one. The
   guide (the encoder) is not used: it stays at its initial values, so the
   training loop's ELBO columns are meaningless for this estimator; Figure 3
   (:mod:`pyro_aevb.figure3`) reports the marginal likelihood instead.

.. warning:: The paper runs several M-steps (5) on each E-step's samples. The
   training loop takes one gradient step per minibatch, so here each step
   alternates ``e_steps`` HMC transitions with one M-step on a fresh
   minibatch. ``beta`` is accepted and ignored (the M-step uses beta = 1).
   The model must have exactly one latent sample site with event shape
   ``(Nz,)``, inside a data plate at dim -1.

References:
  [1] D. P. Kingma, M. Welling. Auto-Encoding Variational Bayes. ICLR 2014, arXiv:1312.6114, Sec. 5, Figure 3.
  [2] R. M. Neal. MCMC using Hamiltonian dynamics. Handbook of Markov Chain Monte Carlo, 2011.
  [3] G. C. G. Wei, M. A. Tanner. A Monte Carlo implementation of the EM algorithm. JASA 85, 1990.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .errors import ConfigError
from .hmc import latent_site
from .surrogate import SurrogateLossMixin

#: Robbins-Monro schedule of the log step size: gamma_t = max(GAIN (t + 1)^-KAPPA, MIN_RATE). The error
#: a_t - delta is at most 1 - delta = 0.1 above the target, so a large gain lets a too-small step grow.
_GAIN, _KAPPA, _MIN_RATE = 2.0, 0.6, 0.02
#: Rows per model call when the chains are first drawn from the prior.
_INIT_CHUNK = 4096


def log_joint_rows(model, x: torch.Tensor, z: torch.Tensor, site: str = "z") -> torch.Tensor:
    r""":math:`\log p_\theta(x_i, z_i)` for each row: x (M, D), z (M, Nz) -> (M,).

    The model is traced conditioned on ``site = z`` and the unscaled log-densities of its
    sample sites are summed (so a data plate's N/M scale does not enter). Differentiable
    in z and in the model's parameters.
    """
    trace = poutine.trace(poutine.condition(model, data={site: z})).get_trace(x)
    total = torch.zeros(x.shape[0], dtype=z.dtype, device=z.device)
    for node in trace.nodes.values():
        if node["type"] == "sample" and not site_is_subsample(node):
            total = total + node["fn"].log_prob(node["value"])
    return total


class MonteCarloEM(SurrogateLossMixin, nn.Module):
    r"""Monte Carlo EM with persistent per-datapoint HMC chains (see the module docstring for the objective).

    :param num_particles: must be 1 (one chain per datapoint).
    :param leapfrog_steps: leapfrog steps per HMC transition (the paper: 10).
    :param target_accept: the average acceptance probability the step size is adapted to (the paper: 0.9).
    :param e_steps: HMC transitions of the minibatch's chains per training step.
    :param step_size: the initial leapfrog step size.

    ``differentiable_loss(model, guide, x, num_data=N, beta=..., indices=idx)``: ``idx`` (M,) are
    the rows of x in the training set (``needs_indices``); without it x is the whole training set.
    """

    needs_indices = True

    def __init__(self, num_particles: int = 1, leapfrog_steps: int = 10, target_accept: float = 0.9,
                 e_steps: int = 1, step_size: float = 0.1):
        super().__init__()
        if num_particles != 1:
            raise ConfigError(f"mcem keeps one chain per datapoint: num_particles must be 1, got {num_particles}")
        if leapfrog_steps < 1 or e_steps < 1:
            raise ConfigError(f"mcem: leapfrog_steps and e_steps must be >= 1, got {leapfrog_steps}, {e_steps}")
        if not 0.0 < target_accept < 1.0:
            raise ConfigError(f"mcem: target_accept must lie in (0, 1), got {target_accept}")
        if not step_size > 0:
            raise ConfigError(f"mcem: step_size must be > 0, got {step_size}")
        self.num_particles = 1
        self.leapfrog_steps = int(leapfrog_steps)
        self.target_accept = float(target_accept)
        self.e_steps = int(e_steps)
        self._site: str | None = None
        self.register_buffer("chains", torch.zeros(0, 0))  # (N, Nz) once allocated
        self.register_buffer("log_step_size", torch.tensor(math.log(step_size), dtype=torch.float64))
        self.register_buffer("adapt_count", torch.zeros((), dtype=torch.long))  # transitions adapted so far
        self.register_buffer("accept_rate", torch.zeros((), dtype=torch.float64))  # last transition's mean

    @property
    def step_size(self) -> float:
        return float(self.log_step_size.exp())

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "chains")
        if saved is not None and saved.shape != self.chains.shape:  # lazily allocated: take the saved shape
            self.chains = torch.empty(saved.shape, dtype=saved.dtype, device=self.chains.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _latent_site(model, x: torch.Tensor) -> str:
        """The model's latent site name, found by a trace that leaves the RNG untouched (resume stays exact)."""
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return latent_site(model, x[:1])[0]

    @torch.no_grad()
    def _allocate(self, model, x: torch.Tensor, num_data: int) -> None:
        """Draw all N chains from the prior: the model's latent site, unconditioned, on copies of a row of x."""
        self._site = self._site or self._latent_site(model, x)
        rows = []
        for start in range(0, num_data, _INIT_CHUNK):
            n = min(_INIT_CHUNK, num_data - start)
            trace = poutine.trace(model).get_trace(x[:1].expand(n, *x.shape[1:]))
            rows.append(trace.nodes[self._site]["value"].reshape(n, -1))
        self.chains = torch.cat(rows).to(x.device)

    # ------------------------------------------------------------------ E-step
    def _potential_and_grad(self, model, x, z) -> tuple[torch.Tensor, torch.Tensor]:
        """U_i(z_i) = -log p(x_i, z_i) (M,) and its gradient in z (M, Nz); no gradient into theta."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            potential = -log_joint_rows(model, x, z, self._site)
            (grad,) = torch.autograd.grad(potential.sum(), z)  # rows are independent: the sum's gradient
        return potential.detach(), grad

    @torch.no_grad()
    def transition(self, model, x: torch.Tensor, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One HMC transition of every row's chain: (new z (M, Nz), acceptance probabilities (M,)).

        Adapts the step size afterwards (no host synchronisation).
        """
        eps = self.log_step_size.exp().to(z0.dtype)
        momentum0 = torch.randn_like(z0)
        potential0, grad = self._potential_and_grad(model, x, z0)
        z, momentum = z0, momentum0 - 0.5 * eps * grad
        for step in range(self.leapfrog_steps):
            z = z + eps * momentum
            potential, grad = self._potential_and_grad(model, x, z)
            if step < self.leapfrog_steps - 1:
                momentum = momentum - eps * grad
        momentum = momentum - 0.5 * eps * grad
        energy0 = potential0 + 0.5 * momentum0.pow(2).sum(-1)
        energy = potential + 0.5 * momentum.pow(2).sum(-1)
        log_accept = (energy0 - energy).nan_to_num(nan=-math.inf).clamp(max=0.0)  # a divergence is rejected
        accept_prob = log_accept.exp()  # (M,)
        accept = torch.rand_like(accept_prob) < accept_prob
        z_new = torch.where(accept.unsqueeze(-1), z, z0)
        # Robbins-Monro on log step size towards the target acceptance
        rate = (_GAIN * (self.adapt_count.to(torch.float64) + 1.0) ** -_KAPPA).clamp(min=_MIN_RATE)
        mean_accept = accept_prob.mean().to(torch.float64)
        self.log_step_size.add_(rate * (mean_accept - self.target_accept))
        self.adapt_count.add_(1)
        self.accept_rate.copy_(mean_accept)
        return z_new, accept_prob

    def e_step(self, model, x: torch.Tensor, indices: torch.Tensor, num_data: int) -> torch.Tensor:
        """``e_steps`` transitions of the chains of rows ``indices``; returns their new states (M, Nz), detached."""
        if self.chains.numel() == 0:
            self._allocate(model, x, num_data)
        elif self.chains.shape[0] != num_data:
            raise ConfigError(f"mcem holds {self.chains.shape[0]} chains but num_data is {num_data}; "
                              "one estimator serves one training set")
        if self._site is None:  # e.g. after load_state_dict
            self._site = self._latent_site(model, x)
        z = self.chains[indices]
        for _ in range(self.e_steps):
            z, _ = self.transition(model, x, z)
        self.chains[indices] = z
        return z

    # ------------------------------------------------------------------ Pyro's ELBO face
    def differentiable_loss(self, model, guide, x, num_data: int | None = None, beta: float = 1.0,
                            indices: torch.Tensor | None = None) -> torch.Tensor:
        r"""E-step, then :math:`-\frac{N}{M}\sum_i \log p_\theta(x_i, z_i)` (not an ELBO), differentiable in theta."""
        M = x.shape[0]
        N = num_data or M
        if indices is None:
            if N != M:
                raise ValueError("mcem needs the minibatch's row indices (indices=...) when num_data > M")
            indices = torch.arange(M, device=x.device)
        z = self.e_step(model, x, indices, N)
        return -(N / M) * log_joint_rows(model, x, z.detach(), self._site).sum()
