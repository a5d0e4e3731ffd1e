r"""The score-function (REINFORCE) gradient of the ELBO, with optional baselines.

The AEVB paper's point (Kingma & Welling 2013, Sec. 2.2) is that the naive
Monte Carlo gradient of the bound with respect to the variational parameters,

.. math::

    \nabla_\phi \mathcal{L} = \mathbb{E}_{q_\phi(z|x)}\big[(\log p_\theta(x, z)
        - \log q_\phi(z|x) - b(x))\, \nabla_\phi \log q_\phi(z|x)\big],

"exhibits very high variance". This module computes exactly that estimator for
the guide the reparameterised estimators use: :class:`NonReparam` draws the
guide's latent sites without a reparameterised path (z is detached), and
:class:`pyro.infer.TraceGraph_ELBO` builds the surrogate loss, with the
baseline b(x) given through Pyro's ``infer={"baseline": ...}`` site options.
"""

from __future__ import annotations

import torch
from torch import nn

import pyro
import pyro.infer

from ..errors import ConfigError
from .handlers import NonReparam
from .traces import plate_scale

BASELINES = ("none", "decaying-average", "neural")
_AVERAGE_KEY = "__baseline_avg_downstream_cost_"  # the param-store name TraceGraph_ELBO uses, + site name


class _NeuralBaseline(nn.Module):
    """b_psi(x): one hidden tanh layer, x (M, D) -> (M,). The last layer starts at 0 (b = the average)."""

    def __init__(self, data_dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(data_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class ScoreFunctionELBO(nn.Module):
    r"""The ELBO's gradient through the score function only (REINFORCE [1]), as :class:`TraceGraph_ELBO` [2].

    For each datapoint, with :math:`z \sim q_\phi(z|x)` drawn without a path to
    :math:`\phi` (L particles), the learning signal
    :math:`\ell = \log p_\theta(x, z) - \log q_\phi(z|x)` gives

    .. math::

        \hat\nabla_\phi = \frac{N}{M}\sum_{i=1}^M \big(\ell_i - b_i\big)\,\nabla_\phi \log q_\phi(z_i|x_i),
        \qquad
        \hat\nabla_\theta = \frac{N}{M}\sum_{i=1}^M \nabla_\theta \log p_\theta(x_i, z_i),

    with the baseline :math:`b_i`:

    * ``"none"``: :math:`b = 0`;
    * ``"decaying-average"``: :math:`b \leftarrow \beta_b b + (1 - \beta_b)\ell`, an
      exponential average of earlier learning signals (Pyro's
      ``use_decaying_avg_baseline``; ``baseline_beta`` is :math:`\beta_b`);
    * ``"neural"``: NVIL [3]: the decaying average plus an input-dependent
      :math:`\frac{N}{M} b_\psi(x_i)`, an MLP trained to minimise
      :math:`(\ell_i - b_i)^2` (Pyro's ``nn_baseline``). Its parameters belong to
      this estimator (an ``nn.Module``), so the training loop optimises them.

    ``loss`` is the -ELBO estimate (estimator A, scaled by N/M, like
    :class:`Trace_ELBO`); ``loss_and_grads`` also fills ``.grad``. A baseline does
    not change the expected gradient, only its variance.

    .. warning:: Pyro keeps the decaying average per *position* of the site's
       batch, shape (L, M) here. With shuffled minibatches every position sees
       random datapoints, so it is an average over the data; on a batch repeated
       in the same order it becomes a per-datapoint average (an input-dependent
       baseline). This estimator keeps the average as its own state (swapped in
       and out of Pyro's param store around each call), and restarts it when the
       batch shape changes.

    .. warning:: ``baseline="neural"`` needs ``data_dim`` (D, the width of x:
       784 for MNIST, 560 for Frey Face) to build the network before the
       optimiser is made; ``pyro-aevb compare`` and ``grad-variance`` fill it in.
       The network starts at zero, so until it is trained it adds nothing to
       the decaying average. NVIL's variance normalisation of the signal is not
       done.

    .. warning:: Only the guide's latent sites are made non-reparameterised;
       ``beta`` scales the latent sites as in the other estimators.

    References:
      [1] R. J. Williams. Simple statistical gradient-following algorithms for
          connectionist reinforcement learning. Machine Learning 8, 1992.
      [2] J. Schulman, N. Heess, T. Weber, P. Abbeel. Gradient estimation using
          stochastic computation graphs. NeurIPS 2015.
      [3] A. Mnih, K. Gregor. Neural variational inference and learning in belief
          networks. ICML 2014, arXiv:1402.0030.
      [4] D. P. Kingma, M. Welling. Auto-Encoding Variational Bayes. ICLR 2014, Sec. 2.2.
    """

    def __init__(self, num_particles: int = 1, baseline: str = "none", baseline_beta: float = 0.9,
                 data_dim: int = 0, hidden_dim: int = 100):
        super().__init__()
        if baseline not in BASELINES:
            raise ConfigError(f"unknown baseline '{baseline}' for score-function; choose one of: {', '.join(BASELINES)}")
        if not 0.0 <= baseline_beta < 1.0:
            raise ConfigError(f"baseline_beta must be in [0, 1), got {baseline_beta}")
        if baseline == "neural" and data_dim <= 0:
            raise ConfigError("score-function with baseline 'neural' needs estimator_options.data_dim = D, the width "
                              "of x (784 for MNIST, 560 for Frey Face)")
        self.num_particles = num_particles
        self.baseline = baseline
        self.baseline_beta = baseline_beta
        self.data_dim = data_dim
        self.baseline_net = _NeuralBaseline(data_dim, hidden_dim) if baseline == "neural" else None
        self.averages: dict[str, torch.Tensor] = {}  # site name -> decaying average, shape (L, M) or (M,)
        self.elbo = pyro.infer.TraceGraph_ELBO(num_particles=num_particles,
                                               vectorize_particles=num_particles > 1, max_plate_nesting=1)
        self._x = None

    # ------------------------------------------------------------------ baselines
    def _site_options(self, msg) -> dict:
        if self.baseline == "none":
            return {}
        name, shape = msg["name"], msg["fn"].batch_shape
        store = pyro.get_param_store()
        if _AVERAGE_KEY + name in store:  # another estimator's average: not ours
            del store[_AVERAGE_KEY + name]
        if name in self.averages and self.averages[name].shape == shape:
            store[_AVERAGE_KEY + name] = self.averages[name].to(self._x.device)
        options = {"use_decaying_avg_baseline": True, "baseline_beta": self.baseline_beta}
        if self.baseline_net is not None:
            if self._x.shape[-1] != self.data_dim:
                raise ConfigError(f"the neural baseline was built for data_dim={self.data_dim}, "
                                  f"but x has {self._x.shape[-1]} columns")
            scale, net = plate_scale(msg), self.baseline_net
            # (M, D) -> (M,), times N/M like the learning signal, broadcast to the site's (L, M)
            options.update(nn_baseline=lambda x: (scale * net(x)).expand(shape), nn_baseline_input=self._x)
        return {"baseline": options}

    def _collect_averages(self) -> None:
        store = pyro.get_param_store()
        for name in list(store.keys()):
            if name.startswith(_AVERAGE_KEY):
                self.averages[name[len(_AVERAGE_KEY):]] = store[name].detach()
                del store[name]

    def _run(self, method, model, guide, args, kwargs):
        self._x = args[0] if args else kwargs.get("x")
        try:
            with NonReparam(infer=self._site_options):
                return method(model, guide, *args, **kwargs)
        finally:
            if self.baseline != "none":
                self._collect_averages()
            self._x = None

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict:
        """The decaying averages go into the ``state_dict`` (hence the checkpoint): a resumed run continues them."""
        return {"averages": dict(self.averages)}

    def set_extra_state(self, state: dict) -> None:
        self.averages = dict(state.get("averages", {}))

    # ------------------------------------------------------------------ ELBO face
    def loss(self, model, guide, *args, **kwargs) -> float:
        """The -ELBO estimate (no gradient; baselines are not touched)."""
        with torch.no_grad(), NonReparam():
            return self.elbo.loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The -ELBO estimate; fills ``.grad`` with the score-function gradient (and the baseline's)."""
        return self._run(self.elbo.loss_and_grads, model, guide, args, kwargs)
