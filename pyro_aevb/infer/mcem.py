r"""Monte Carlo EM with Hamiltonian Monte Carlo in the E-step: the AEVB paper's Figure 3 baseline.

Each datapoint :math:`x_i` keeps one persistent Markov chain :math:`z_i` on its
posterior :math:`p_\theta(z \mid x_i)`. A training step on a minibatch of M
datapoints is

* **E-step**: ``e_steps`` HMC transitions [2] of every chain in the minibatch,
  all chains together (one vectorised leapfrog integration of ``leapfrog_steps``
  steps by Pyro's :func:`pyro.ops.integrator.velocity_verlet`, identity mass
  matrix), each accepted or rejected on its own, with the potential
  :math:`U_i(z) = -\log p_\theta(x_i, z)`;
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
from the model's prior (its latent sample site's distribution).

The chains, the step size and the adaptation counter are buffers of this
``nn.Module``, so a checkpoint carries them and a resumed run continues the
same chains. The chain buffer is ``(N, Nz)`` (``N`` from the data plate); it is
empty until the first call, and :meth:`load_state_dict` takes the saved shape.

.. warning:: The loss reported is :math:`-\mathcal{J}`, the scaled log joint at
   the chains' states: it is **not** an ELBO and not comparable with one. The
   guide (the encoder) is not used: it stays at its initial values, so the
   training loop's ELBO columns are meaningless for this estimator; Figure 3
   (:mod:`pyro_aevb.commands.figure3`) reports the marginal likelihood instead.

.. warning:: The paper runs several M-steps (5) on each E-step's samples. The
   training loop takes one gradient step per minibatch, so here each step
   alternates ``e_steps`` HMC transitions with one M-step on a fresh
   minibatch. A ``poutine.scale`` (``beta``) is ignored (the M-step uses the
   unscaled joint). The model must have exactly one latent sample site with
   event shape ``(Nz,)``, inside a data plate at dim -1.

References:
  [1] D. P. Kingma, M. Welling. Auto-Encoding Variational Bayes. ICLR 2014, arXiv:1312.6114, Sec. 5, Figure 3.
  [2] R. M. Neal. MCMC using Hamiltonian dynamics. Handbook of Markov Chain Monte Carlo, 2011.
  [3] G. C. G. Wei, M. A. Tanner. A Monte Carlo implementation of the EM algorithm. JASA 85, 1990.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pyro.ops.integrator import potential_grad, velocity_verlet

from ..errors import ConfigError
from .surrogate import SurrogateLossMixin
from .traces import latent_site, log_joint, trace_fn

#: Robbins-Monro schedule of the log step size: gamma_t = max(GAIN (t + 1)^-KAPPA, MIN_RATE). The error
#: a_t - delta is at most 1 - delta = 0.1 above the target, so a large gain lets a too-small step grow.
_GAIN, _KAPPA, _MIN_RATE = 2.0, 0.6, 0.02


class MonteCarloEM(SurrogateLossMixin, nn.Module):
    r"""Monte Carlo EM with persistent per-datapoint HMC chains (see the module docstring for the objective).

    :param num_particles: must be 1 (one chain per datapoint).
    :param leapfrog_steps: leapfrog steps per HMC transition (the paper: 10).
    :param target_accept: the average acceptance probability the step size is adapted to (the paper: 0.9).
    :param e_steps: HMC transitions of the minibatch's chains per training step.
    :param step_size: the initial leapfrog step size.

    ``differentiable_loss(model, guide, *args, indices=idx, **kwargs)``: ``idx`` (M,) are the rows of
    the minibatch in the training set (``needs_indices``); without it the minibatch is the whole training set.
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

    def _inspect(self, model, args, kwargs):
        """(the latent site, its prior, N, M) from one trace of the model, leaving the RNG untouched
        (so that a resumed run stays exact)."""
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            if self._site is None:
                self._site = latent_site(model, *args, **kwargs)[0]
            site = trace_fn(model, *args, **kwargs).nodes[self._site]
        frame = next(f for f in site["cond_indep_stack"] if f.dim == -1)  # the data plate
        return site["fn"], frame.full_size, frame.size

    @torch.no_grad()
    def _allocate(self, prior, num_data: int) -> None:
        """Draw all N chains from the prior (its (M, Nz) batch, drawn ceil(N/M) times)."""
        rows = prior.batch_shape[0]
        draws = prior.sample((math.ceil(num_data / rows),))  # (ceil(N/M), M, Nz)
        self.chains = draws.reshape(-1, draws.shape[-1])[:num_data].clone()

    # ------------------------------------------------------------------ E-step
    @torch.no_grad()
    def transition(self, model, z0: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """One HMC transition of every row's chain: (new z (M, Nz), acceptance probabilities (M,)).

        ``model(*args, **kwargs)`` scores the minibatch. Adapts the step size afterwards (no host sync).
        """
        eps = self.log_step_size.exp().to(z0.dtype)
        momentum0 = torch.randn_like(z0)
        rows = {}  # the per-row potentials U_i of the last evaluation, (M,)

        def potential(z: dict) -> torch.Tensor:  # rows are independent: the sum's gradient is each row's
            rows["last"] = -log_joint(model, {self._site: z[self._site]}, *args, **kwargs)
            return rows["last"].sum()

        with torch.enable_grad():  # gradients in z only; the model's parameters are left alone
            grads, _ = potential_grad(potential, {self._site: z0.clone()})
            potential0 = rows["last"].detach()
            z, momentum, _, _ = velocity_verlet({self._site: z0}, {self._site: momentum0}, potential,
                                                lambda r: r, eps, self.leapfrog_steps, z_grads=grads)
        z, momentum, potential1 = z[self._site], momentum[self._site], rows["last"].detach()
        energy0 = potential0 + 0.5 * momentum0.pow(2).sum(-1)
        energy = potential1 + 0.5 * momentum.pow(2).sum(-1)
        log_accept = (energy0 - energy).nan_to_num(nan=-math.inf).clamp(max=0.0)  # a divergence is rejected
        accept_prob = log_accept.exp()  # (M,)
        accept = torch.rand_like(accept_prob) < accept_prob
        z_new = torch.where(accept.unsqueeze(-1), z, z0)
        self._adapt(accept_prob)
        return z_new, accept_prob

    def _adapt(self, accept_prob: torch.Tensor) -> None:
        """Robbins-Monro on the log step size towards the target acceptance."""
        rate = (_GAIN * (self.adapt_count.to(torch.float64) + 1.0) ** -_KAPPA).clamp(min=_MIN_RATE)
        mean_accept = accept_prob.mean().to(torch.float64)
        self.log_step_size.add_(rate * (mean_accept - self.target_accept))
        self.adapt_count.add_(1)
        self.accept_rate.copy_(mean_accept)

    def e_step(self, model, indices: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        """``e_steps`` transitions of the chains of rows ``indices`` (None: all rows, the minibatch being the
        whole training set) for the minibatch ``model(*args, **kwargs)`` scores; their new states (M, Nz)."""
        return self._e_step(model, indices, args, kwargs)[0]

    def _e_step(self, model, indices, args, kwargs) -> tuple[torch.Tensor, int, int]:
        prior, N, M = self._inspect(model, args, kwargs)
        if indices is None:
            if N != M:
                raise ValueError("mcem needs the minibatch's row indices (indices=...) when num_data > M")
            indices = torch.arange(M, device=self.chains.device)
        if self.chains.numel() == 0:
            self._allocate(prior, N)
        elif self.chains.shape[0] != N:
            raise ConfigError(f"mcem holds {self.chains.shape[0]} chains but num_data is {N}; "
                              "one estimator serves one training set")
        z = self.chains[indices]
        for _ in range(self.e_steps):
            z, _ = self.transition(model, z, *args, **kwargs)
        self.chains[indices] = z
        return z, N, M

    # ------------------------------------------------------------------ Pyro's ELBO face
    def differentiable_loss(self, model, guide, *args, indices: torch.Tensor | None = None,
                            **kwargs) -> torch.Tensor:
        r"""E-step, then :math:`-\frac{N}{M}\sum_i \log p_\theta(x_i, z_i)` (not an ELBO), differentiable in theta."""
        z, N, M = self._e_step(model, indices, args, kwargs)
        return -(N / M) * log_joint(model, {self._site: z.detach()}, *args, **kwargs).sum()
