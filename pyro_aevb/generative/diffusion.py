r"""A diffusion model as a deep latent-variable model: the same model/guide pair, the same two SGVB estimators.

The recognition model is the fixed forward process of Sohl-Dickstein et al. (2015) and Ho et al. (2020) on
the data scaled to :math:`\tilde x = 2x - 1`:

.. math::

    q(z_1 \mid x) = \mathcal N(\sqrt{1-\beta_1}\,\tilde x, \beta_1 I), \qquad
    q(z_t \mid z_{t-1}) = \mathcal N(\sqrt{1-\beta_t}\, z_{t-1}, \beta_t I),

so that :math:`q(z_t \mid x) = \mathcal N(\sqrt{\bar\alpha_t}\,\tilde x, (1-\bar\alpha_t) I)` with
:math:`\bar\alpha_t = \prod_{s \le t}(1-\beta_s)`, and, read backwards, the same joint is
:math:`q(z_T|x)\prod_t q(z_{t-1}|z_t, x)` with the Gaussian posteriors
:math:`q(z_{t-1}|z_t, x) = \mathcal N(\tilde\mu_t(z_t, \tilde x), \tilde\beta_t I)`. The generative model is
the learned reverse chain :math:`p(z_T) = \mathcal N(0, I)`,
:math:`p_\theta(z_{t-1}|z_t) = \mathcal N(\mu_\theta(z_t, t), \tilde\beta_t I)`, and a decoder
:math:`p_\theta(x|z_1)` (Bernoulli for binary images, Gaussian for grey ones, as in the VAE). Its ELBO is

.. math::

    \mathcal L = \mathbb E_{q}\log p_\theta(x|z_1) - D_{KL}(q(z_T|x)\,\|\,p(z_T))
      - \sum_{t=2}^{T} \mathbb E_{q(z_t|x)} D_{KL}\big(q(z_{t-1}|z_t,x)\,\|\,p_\theta(z_{t-1}|z_t)\big),

the sum :math:`L_0 + \sum_t L_{t-1} + L_T` of Ho et al. Two Pyro model/guide pairs compute it:

* the **chain** pair (:attr:`Diffusion.chain_model`, :attr:`Diffusion.chain_guide`): the guide draws
  :math:`z_T` and then each :math:`z_{t-1}` given :math:`z_t` (reverse order), the model scores the
  reverse chain. Each latent site is conditioned on the same :math:`z_t` in model and guide, so
  ``TraceMeanField_ELBO`` (SGVB B) computes exactly the sum of KLs above and ``Trace_ELBO`` (A) its Monte
  Carlo version; it is a true model/guide pair, so importance sampling with the guide as proposal
  estimates :math:`\log p(x)`. It costs T sequential steps.
* the **time-sampled** pair (:attr:`Diffusion.model`, :attr:`Diffusion.guide`), for training: each
  datapoint draws its own k steps :math:`t_j = 2 + \lfloor (T-1) u_j \rfloor` from a site
  ``t_uniform`` :math:`u \sim \mathcal U(0, 1)` of shape (k, L or 1, M) inside a time plate of k slots of
  the T - 1 steps, so scaled by :math:`(T-1)/k`, the same idea as the data plate's N/M:
  :math:`\mathbb E\,[(T-1)/k \sum_j L_{t_j - 1}] = \sum_t L_{t-1}`, unbiased. ``t_uniform`` has the same
  distribution in model and guide, so its terms are exactly 0 under both estimators (its KL is
  registered), and, a sample site, the model replays the guide's steps as it replays every
  latent. For each step the guide draws
  :math:`z_t \sim q(z_t|x)` (closed form) and :math:`z_{t-1} \sim q(z_{t-1}|z_t,x)`; the model scores
  :math:`p_\theta(z_{t-1}|z_t)`. Its site ``z_t`` repeats the guide's :math:`q(z_t|x)`, so that site's
  terms cancel exactly (its KL is 0): this pair is an unbiased training objective, not a generative
  model. With ``time_samples = T - 1`` (:meth:`exact`) it sums every step, in order (no ``t_uniform``).

The reverse means come from one time-conditioned MLP :math:`f_\theta(z_t, t)` shared across t
(:class:`Denoiser`), in one of two parameterizations:

* ``"x"`` (default): the mean of the forward posterior at a predicted image,
  :math:`\mu_\theta(z_t, t) = \tilde\mu_t(z_t, \hat x_\theta)`, with
  :math:`\hat x_\theta = \tanh\big(\sqrt{\bar\alpha_t}\,z_t/(1-\bar\alpha_t) + f_\theta(z_t, t)\big)`. The first
  term is each pixel's own posterior mean :math:`\mathbb E[\tilde x_d \mid z_{t,d}]` for :math:`\tilde x_d = \pm 1`
  equally likely, so the network learns a correction (the other pixels' evidence), and the steps near
  t = 1, whose KLs dominate the bound (the forward posterior's variance there is about :math:`10^{-4}`),
  are right from the start. For grey images (the Gaussian decoder) the skip is the posterior mean for
  :math:`\tilde x_d \sim \mathcal N(0, 1/3)` instead, :math:`\sqrt{\bar\alpha_t}\,z_t/(3 - 2\bar\alpha_t)`,
  and :math:`\hat x_\theta` that plus :math:`f_\theta` (a binary skip would push grey pixels to ±1).
  Then :math:`-L_{t-1} = \bar\alpha_{t-1}\beta_t^2/(1-\bar\alpha_t)^2\,
  \|\tilde x - \hat x_\theta\|^2 / (2\tilde\beta_t)`.
* ``"epsilon"``: Ho et al.'s :math:`\mu_\theta(z_t, t) = (z_t - \beta_t\,\epsilon_\theta(z_t, t)/\sqrt{1-\bar\alpha_t})
  /\sqrt{1-\beta_t}` with :math:`\epsilon_\theta = f_\theta`. Trained on the bound itself (not Ho et al.'s
  re-weighted "simple" loss), on binary images it barely learns the steps near t = 1: predicting
  :math:`\epsilon` there means resolving :math:`\tilde x = \pm 1` from :math:`z_t` with slopes of
  :math:`1/\sqrt{1-\bar\alpha_t} \approx 100` (RESULTS.md measures it).

Any module with a ``mean(z_t, t)`` method can replace the denoiser.

References:
  [1] J. Sohl-Dickstein et al. Deep Unsupervised Learning using Nonequilibrium Thermodynamics. ICML 2015.
  [2] J. Ho, A. Jain, P. Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020, arXiv:2006.11239.
  [3] A. Nichol, P. Dhariwal. Improved Denoising Diffusion Probabilistic Models. ICML 2021 (the cosine schedule).
  [4] D. P. Kingma, T. Salimans, B. Poole, J. Ho. Variational Diffusion Models. NeurIPS 2021.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math

import torch
from torch import nn
from torch.distributions import kl_divergence

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.nn import PyroModule

from ..errors import ConfigError
from .vae import data_plate

SCHEDULES = ("linear", "cosine")
PARAMETERIZATIONS = ("x", "epsilon")
#: dim of the time plate: left of the data plate (-1) and of an evaluation's particle plate (-2)
TIME_DIM = -3

_names = itertools.count()


def beta_schedule(kind: str, steps: int) -> torch.Tensor:
    """:math:`\\beta_1..\\beta_T` (T,): Ho et al.'s linear 1e-4..0.02 at T = 1000 (rescaled by 1000/T for other
    T, as Nichol & Dhariwal do), or the cosine schedule of Nichol & Dhariwal."""
    if kind == "linear":
        scale = 1000 / steps
        return torch.linspace(1e-4 * scale, min(0.02 * scale, 0.999), steps, dtype=torch.float64)
    if kind == "cosine":
        s, t = 0.008, torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ConfigError(f"model_options.schedule = {kind!r} is not valid; choose one of: {', '.join(SCHEDULES)}")


class Schedule(nn.Module):
    """The forward process's constants as buffers, indexed by t = 1..T (``t`` an int or a tensor of them)."""

    def __init__(self, betas: torch.Tensor):
        super().__init__()
        alpha_bar = torch.cumprod(1 - betas, 0)
        prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])  # alpha_bar_{t-1}, with alpha_bar_0 = 1
        self.steps = betas.numel()
        self.register_buffer("beta", betas.float())
        self.register_buffer("alpha_bar", alpha_bar.float())
        # q(z_{t-1} | z_t, x) = N(c_x x~ + c_z z_t, var): Ho et al., Eq. 7
        self.register_buffer("post_cx", (prev.sqrt() * betas / (1 - alpha_bar)).float())
        self.register_buffer("post_cz", ((1 - betas).sqrt() * (1 - prev) / (1 - alpha_bar)).float())
        self.register_buffer("post_var", ((1 - prev) / (1 - alpha_bar) * betas).float())

    @staticmethod
    def at(values: torch.Tensor, t) -> torch.Tensor:
        """values[t - 1]: a number for an int t; for the time plate's t (k, L or 1, M), or (T - 1, 1, 1) for
        every step, shape t.shape + (1,), to broadcast against (k, L or 1, M, D) tensors (time plate at dim -3,
        particles at -2, data at -1, then the event)."""
        return values[t - 1].unsqueeze(-1) if torch.is_tensor(t) else values[t - 1]

    def marginal(self, t, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""(loc, scale) of :math:`q(z_t|x) = \mathcal N(\sqrt{\bar\alpha_t}\tilde x, (1-\bar\alpha_t) I)`."""
        ab = self.at(self.alpha_bar, t)
        loc = ab.sqrt() * x0
        return loc, (1 - ab).sqrt() * torch.ones_like(loc)

    def posterior(self, t, z_t: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""(loc, scale) of :math:`q(z_{t-1}|z_t, x)`, t >= 2."""
        loc = self.at(self.post_cx, t) * x0 + self.at(self.post_cz, t) * z_t
        return loc, self.std(t, loc)

    def std(self, t, like: torch.Tensor) -> torch.Tensor:
        r""":math:`\sqrt{\tilde\beta_t}`, the scale of both the posterior and the reverse step, shaped like ``like``."""
        return self.at(self.post_var, t).sqrt() * torch.ones_like(like)


class Denoiser(nn.Module):
    """:math:`f_\\theta(z_t, t)`: an MLP on ``[z_t, embedding(t)]`` (sinusoidal, 64 numbers), ``depth`` hidden
    layers of ``width`` SiLU units, shared across t, its last layer zero at the start; the reverse mean
    comes from it by ``parameterization`` ``"x"`` or ``"epsilon"`` (see the module)."""

    def __init__(self, data_dim: int, schedule: Schedule, width: int = 512, depth: int = 2, embed: int = 64,
                 parameterization: str = "x", binary: bool = True):
        super().__init__()
        self.binary = binary  # the "x" skip: each pixel's posterior mean for x~ = +-1, or for grey x~ (see mean)
        if parameterization not in PARAMETERIZATIONS:
            raise ConfigError(f"model_options.parameterization = {parameterization!r} is not valid; choose one "
                              f"of: {', '.join(PARAMETERIZATIONS)}")
        self.schedule = (schedule,)  # a reference: the schedule is the Diffusion's own submodule
        self.parameterization = parameterization
        layers, d = [], data_dim + embed
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        self.net = nn.Sequential(*layers, nn.Linear(d, data_dim))
        nn.init.zeros_(self.net[-1].weight)  # starts at f = 0: the per-pixel posterior mean, or epsilon = 0
        nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("frequencies", torch.exp(-math.log(10_000) * torch.arange(embed // 2) / (embed // 2)))

    def embedding(self, t, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
        angles = t.reshape(t.shape + (1,)) * self.frequencies  # (..., E/2)
        e = torch.cat([angles.sin(), angles.cos()], -1)
        while e.dim() < like.dim():  # (k, E) against z_t (k, L, M, D): (k, 1, 1, E)
            e = e.unsqueeze(-2)
        return e.expand(like.shape[:-1] + e.shape[-1:])

    def mean(self, z_t: torch.Tensor, t) -> torch.Tensor:
        s = self.schedule[0]
        f = self.net(torch.cat([z_t, self.embedding(t, z_t)], -1))
        beta, ab = s.at(s.beta, t), s.at(s.alpha_bar, t)
        if self.parameterization == "epsilon":
            return (z_t - beta / (1 - ab).sqrt() * f) / (1 - beta).sqrt()
        if self.binary:  # E[x~ | z_t] for x~ = +-1 equally likely, corrected in logit space
            x_hat = torch.tanh(ab.sqrt() / (1 - ab) * z_t + f)
        else:  # grey images: E[x~ | z_t] for x~ ~ N(0, 1/3) (the variance of U(-1, 1)), corrected additively
            v = 1 / 3
            x_hat = ab.sqrt() * v / (ab * v + 1 - ab) * z_t + f
        return s.posterior(t, z_t, x_hat)[0]


class PixelBernoulli(nn.Module):
    """:math:`p(x|z_1) = \\prod_d \\mathrm{Bernoulli}(\\sigma(a_d z_{1,d} + b_d))`: each pixel from its own latent."""

    def __init__(self, data_dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((data_dim,), 4.0))
        self.bias = nn.Parameter(torch.zeros(data_dim))

    def forward(self, z: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=self.scale * z + self.bias).to_event(1)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scale * z + self.bias)


class PixelGaussian(nn.Module):
    """:math:`p(x|z_1) = \\mathcal N(\\sigma(a \\odot z_1 + b), \\operatorname{diag} e^{s})`, for grey images."""

    def __init__(self, data_dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((data_dim,), 2.0))
        self.bias = nn.Parameter(torch.zeros(data_dim))
        self.log_var = nn.Parameter(torch.full((data_dim,), -4.0))

    def forward(self, z: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(self.mean(z), torch.exp(0.5 * self.log_var)).to_event(1)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scale * z + self.bias)


def _normal(loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
    return dist.Normal(loc, scale).to_event(1)


class _Pair(PyroModule):
    """A model or guide over the Diffusion's modules (shared, see :class:`Diffusion`). A model holds the
    reverse steps and the decoder as its own submodules, so that, called, it records their parameters
    as ``pyro.param`` sites (``pyro.infer.SVI`` with ``pyro.optim`` trains them); the forward process
    (the schedule, the time plate) is read from the owner."""

    def __init__(self, owner: "Diffusion", name: str):
        super().__init__(name)
        self.owner = (owner,)
        if not isinstance(self, (TimeSampledGuide, ChainGuide)):
            self.reverse, self.decoder = owner.reverse, owner.decoder

    @property
    def d(self) -> "Diffusion":
        return self.owner[0]


class TimeSampledModel(_Pair):
    """The time-sampled pair's model (training): see the module docstring."""

    def forward(self, x: torch.Tensor, num_data: int | None = None, beta: float = 1.0):
        d = self.d
        x0 = d.to_latent(x)
        with data_plate(x, num_data):
            with poutine.scale(scale=beta):
                pyro.sample("z_T", _normal(torch.zeros_like(x0), torch.ones_like(x0)))
                z1 = pyro.sample("z_1", _normal(*d.schedule.marginal(1, x0)))  # cancels with the guide's
            pyro.sample("x", self.decoder(z1), obs=x)
            with d.time_steps(x0) as t, poutine.scale(scale=beta):  # t in 2..T: (k, L or 1, M)
                z_t = pyro.sample("z_t", _normal(*d.schedule.marginal(t, x0)))  # cancels with the guide's
                mean = self.reverse.mean(z_t, t)  # (k, L or 1, M, D)
                pyro.sample("z_prev", _normal(mean, d.schedule.std(t, mean)))


class TimeSampledGuide(_Pair):
    """The time-sampled pair's guide: the forward process's closed forms, no parameters."""

    def forward(self, x: torch.Tensor, num_data: int | None = None, beta: float = 1.0):
        d = self.d
        x0, T = d.to_latent(x), d.schedule.steps
        with data_plate(x, num_data):
            with poutine.scale(scale=beta):
                pyro.sample("z_T", _normal(*d.schedule.marginal(T, x0)))
                pyro.sample("z_1", _normal(*d.schedule.marginal(1, x0)))
            with d.time_steps(x0) as t, poutine.scale(scale=beta):
                z_t = pyro.sample("z_t", _normal(*d.schedule.marginal(t, x0)))
                pyro.sample("z_prev", _normal(*d.schedule.posterior(t, z_t, x0)))


class ChainModel(_Pair):
    """The reverse chain: :math:`p(z_T)\\prod_t p_\\theta(z_{t-1}|z_t)\\,p_\\theta(x|z_1)`, sites ``z{t}``."""

    def forward(self, x: torch.Tensor, num_data: int | None = None, beta: float = 1.0):
        d = self.d
        T, s = d.schedule.steps, d.schedule
        shape = x.shape[:-1] + (d.data_dim,)
        with data_plate(x, num_data):
            with poutine.scale(scale=beta):
                z = pyro.sample(f"z{T}", _normal(x.new_zeros(shape), x.new_ones(shape)))
                reverse = self.reverse  # one pyro.module statement, not T - 1
                for t in range(T, 1, -1):
                    mean = reverse.mean(z, t)
                    z = pyro.sample(f"z{t - 1}", _normal(mean, s.std(t, mean)))
            pyro.sample("x", self.decoder(z), obs=x)
        return z


class ChainGuide(_Pair):
    """The forward process read backwards: :math:`q(z_T|x)\\prod_t q(z_{t-1}|z_t,x)`, sites ``z{t}``."""

    def forward(self, x: torch.Tensor, num_data: int | None = None, beta: float = 1.0):
        d = self.d
        x0, T = d.to_latent(x), d.schedule.steps
        with data_plate(x, num_data), poutine.scale(scale=beta):
            z = pyro.sample(f"z{T}", _normal(*d.schedule.marginal(T, x0)))
            for t in range(T, 1, -1):
                z = pyro.sample(f"z{t - 1}", _normal(*d.schedule.posterior(t, z, x0)))
        return z


class Diffusion(nn.Module):
    """A diffusion model with its pairs: ``model``/``guide`` (time-sampled, for training), ``chain_model`` /
    ``chain_guide`` (the reverse chain, for the IS log-likelihood) and :meth:`evaluation_pair` (every t).

    :param schedule: the forward process (:class:`Schedule`).
    :param reverse: a module with ``mean(z_t, t)``, the reverse steps' means (:class:`Denoiser`).
    :param decoder: :math:`p(x|z_1)` (a module returning a distribution, with ``mean(z)`` for images).
    :param time_samples: k, steps sampled per datapoint in training (at most T - 1: all of them).
    :param to_latent: the data's scaling into the chain (default :math:`2x - 1`).
    """

    max_plate_nesting = -TIME_DIM
    #: the importance-sampling passes run eagerly: a graph of T sequential steps is too big to compile
    likelihood_compile = False

    def __init__(self, schedule: Schedule, reverse: nn.Module, decoder: nn.Module, data_dim: int,
                 time_samples: int = 4, to_latent=None, name: str | None = None):
        super().__init__()
        self.schedule, self.reverse, self.decoder = schedule, reverse, decoder
        self.data_dim = data_dim
        self.time_samples = max(1, min(time_samples, schedule.steps - 1))
        self.to_latent = to_latent or (lambda x: 2 * x - 1)
        self._name_pairs(name)

    def _name_pairs(self, name: str | None) -> None:
        name = name or f"diffusion{next(_names)}"
        for attr, cls in (("model", TimeSampledModel), ("guide", TimeSampledGuide), ("chain_model", ChainModel),
                          ("chain_guide", ChainGuide)):
            object.__setattr__(self, attr, cls(self, f"{name}.{attr}"))

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in ("model", "guide", "chain_model", "chain_guide"):
                object.__setattr__(new, key, copy.deepcopy(value, memo))
        new._name_pairs(None)
        return new

    @contextlib.contextmanager
    def time_steps(self, like: torch.Tensor):
        """The steps t in 2..T a pass sums, inside the time plate (dim -3): k per datapoint, drawn through the
        site ``t_uniform`` and scaled by (T - 1)/k, shape (k, L or 1, M); or, under :meth:`exact`, every
        step in order, shape (T - 1, 1, 1). ``like``: a tensor of the run's dtype and device."""
        T, k = self.schedule.steps, self.time_samples
        if k >= T - 1:
            with pyro.plate("time", T - 1, subsample=torch.arange(T - 1, device=like.device), dim=TIME_DIM):
                yield torch.arange(2, T + 1, device=like.device).reshape(-1, 1, 1)
            return
        # k slots of the T - 1 steps: the plate's full size over its size scales the terms by (T - 1)/k, for
        # Pyro's ELBOs and the per-datapoint evaluations alike; each datapoint fills the slots with its own steps
        with pyro.plate("time", T - 1, subsample=torch.arange(k, device=like.device), dim=TIME_DIM):
            # the plates broadcast u to (k, L or 1, M): each datapoint (and particle) its own k steps
            u = pyro.sample("t_uniform", dist.Uniform(like.new_zeros(()), like.new_ones(())))
            yield (u.detach() * (T - 1)).long().clamp(max=T - 2) + 2

    @contextlib.contextmanager
    def exact(self):
        """Every step instead of a sample of them: the time-sampled pair computes the full sum."""
        saved, self.time_samples = self.time_samples, self.schedule.steps - 1
        try:
            yield self
        finally:
            self.time_samples = saved

    def local_pair(self):
        """(model, guide) without ``pyro.param`` sites: the time-sampled pair, for training loops."""
        return self.model.forward, self.guide.forward

    def evaluation_pair(self):
        """(model, guide) of the bound with every step (the time-sampled pair, ``exact``)."""

        def model(*args, **kwargs):
            with self.exact():
                return self.model.forward(*args, **kwargs)

        def guide(*args, **kwargs):
            with self.exact():
                return self.guide.forward(*args, **kwargs)

        return model, guide

    def likelihood_pair(self):
        """(model, guide) for importance sampling: the chain pair, a true model and guide of one joint."""
        return self.chain_model.forward, self.chain_guide.forward

    @property
    def evaluation_rows(self) -> int:
        """Datapoints per pass of the exact bound, so that a pass over every step holds about 20,000
        (step, row) pairs."""
        return max(1, 20_000 // (self.schedule.steps - 1))

    @property
    def likelihood_chunk(self) -> int:
        """(particle, datapoint) pairs per importance-sampling pass: a chain trace holds T latents of D
        numbers each, so about 500,000 / T pairs (1.5 GB for binarized MNIST)."""
        return max(1, 500_000 // self.schedule.steps)

    @torch.no_grad()
    def bound_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        r"""The bound's terms for each row of x (M, D), one draw of each :math:`z_t` (estimator B):
        ``"L_T"`` :math:`-D_{KL}(q(z_T|x)\|p(z_T))` (M,), ``"L_t"`` (T - 1, M) the
        :math:`-D_{KL}(q(z_{t-1}|z_t,x)\|p_\theta(z_{t-1}|z_t))` of t = 2..T, and ``"L_0"``
        :math:`\log p_\theta(x|z_1)` (M,); their sum is the bound of :meth:`evaluation_pair`."""
        with self.exact():
            guide_trace = poutine.trace(self.guide.forward).get_trace(x)
            model_trace = poutine.trace(poutine.replay(self.model.forward, trace=guide_trace)).get_trace(x)

        def kl(name):
            return kl_divergence(guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"])

        site = model_trace.nodes["x"]
        return {"L_T": -kl("z_T"), "L_t": -kl("z_prev").reshape(self.schedule.steps - 1, -1),
                "L_0": site["fn"].log_prob(site["value"])}

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Ancestral sampling of the reverse chain: decoder means at z_1, shape (n, D)."""
        s = self.schedule
        z = torch.randn(n, self.data_dim, device=s.beta.device)
        for t in range(s.steps, 1, -1):
            z = self.reverse.mean(z, t) + s.post_var[t - 1].sqrt() * torch.randn_like(z)
        return self.decoder.mean(z)

    @torch.no_grad()
    def forward_chain(self, x: torch.Tensor, steps: list[int]) -> list[torch.Tensor]:
        """Draws of :math:`z_t \\sim q(z_t|x)` at the given steps, by running the forward chain one step at a time."""
        s, out = self.schedule, []
        z = (1 - s.beta[0]).sqrt() * self.to_latent(x) + s.beta[0].sqrt() * torch.randn_like(x)
        for t in range(1, max(steps) + 1):
            if t > 1:
                z = (1 - s.beta[t - 1]).sqrt() * z + s.beta[t - 1].sqrt() * torch.randn_like(z)
            if t in steps:
                out.append(z.clone())
        return out

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder means at the mean of :math:`q(z_1|x)`, shape (M, D)."""
        return self.decoder.mean(self.schedule.marginal(1, self.to_latent(x))[0])


#: ``[model_options]`` of ``model = "diffusion"``, with their defaults
def diffusion_options(data_dim: int = 0, steps: int = 1000, schedule: str = "linear", width: int = 512,
                      depth: int = 2, time_samples: int = 4, parameterization: str = "x") -> dict:
    """The diffusion's recipe options (a registry factory: its keyword defaults are the valid keys)."""
    return {"steps": steps, "schedule": schedule, "width": width, "depth": depth, "time_samples": time_samples,
            "parameterization": parameterization}


def build_diffusion(recipe, data_dim: int) -> Diffusion:
    """The diffusion of a recipe: ``[model_options]`` steps, schedule, width, depth, time_samples,
    parameterization; the
    decoder by ``likelihood`` (Bernoulli for binary images, Gaussian for grey ones)."""
    options = diffusion_options(**recipe.model_options)
    if options["steps"] < 2 or options["width"] < 1 or options["depth"] < 1 or options["time_samples"] < 1:
        raise ConfigError(f"[model_options] steps must be >= 2, width, depth and time_samples >= 1; got {options}")
    schedule = Schedule(beta_schedule(options["schedule"], options["steps"]))
    decoder = PixelBernoulli(data_dim) if recipe.likelihood == "bernoulli" else PixelGaussian(data_dim)
    denoiser = Denoiser(data_dim, schedule, options["width"], options["depth"],
                        parameterization=options["parameterization"], binary=recipe.likelihood == "bernoulli")
    return Diffusion(schedule, denoiser, decoder, data_dim, options["time_samples"])
