r"""The variational auto-encoder of Kingma & Welling (2013) as a Pyro model/guide pair.

Generative model (the paper's Section 3 and Appendix C):

.. math::

    z_i \sim p_\theta(z), \qquad x_i \mid z_i \sim p_\theta(x \mid z_i), \qquad i = 1..N

Recognition model (the amortized guide):

.. math::

    q_\phi(z \mid x_i) = \mathcal{N}\big(z;\ \mu_\phi(x_i),\ \operatorname{diag}\sigma^2_\phi(x_i)\big)

Both run inside ``pyro.plate("data", size=N, subsample=...)``, so a minibatch
of M datapoints is scaled by N/M to an unbiased estimate of the full-data
bound (the paper's Eq. 8). The latent site's log-densities, in the model and
in the guide, are scaled by ``beta`` through ``poutine.scale``: with
``TraceMeanField_ELBO`` the analytic KL term is then scaled by exactly beta.

References:
  [1] D. P. Kingma, M. Welling. Auto-Encoding Variational Bayes. ICLR 2014, arXiv:1312.6114.
  [2] I. Higgins et al. beta-VAE. ICLR 2017 (the beta-weighted KL).
"""

from __future__ import annotations

import copy
import itertools
from typing import Sequence

import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.nn import PyroModule

from ..errors import ConfigError, DataError
from .priors import check_prior, make_prior


#: recipe key ``activation`` -> the hidden layers' nonlinearity (the paper's is tanh)
DECODER_VARIANCES = ("pixel", "network")  # the Gaussian decoder's variance: see GaussianDecoder
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "elu": nn.ELU, "gelu": nn.GELU,
               "leaky-relu": nn.LeakyReLU, "sigmoid": nn.Sigmoid}


def hidden_layers(in_dim: int, hidden: int | Sequence[int], activation: str = "tanh") -> list[nn.Module]:
    """Linear, nonlinearity, Linear, nonlinearity, ... through the hidden widths (one int: one layer)."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    layers, width = [], in_dim
    for h in widths:
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        width = h
    return layers


def mlp(in_dim: int, hidden: int | Sequence[int], out_dim: int, activation: str = "tanh") -> nn.Sequential:
    """An MLP through the hidden widths; one hidden tanh layer is the paper's network (Appendix C.1)."""
    last = hidden if isinstance(hidden, int) else hidden[-1]
    return nn.Sequential(*hidden_layers(in_dim, hidden, activation), nn.Linear(last, out_dim))


class Encoder(nn.Module):
    r"""x -> (loc, scale) of :math:`q_\phi(z|x)`; the MLP outputs mu and log sigma^2 (Appendix C.2)."""

    def __init__(self, data_dim: int, hidden: int | Sequence[int], latent_dim: int, activation: str = "tanh"):
        super().__init__()
        self.hidden = nn.Sequential(*hidden_layers(data_dim, hidden, activation))
        last = hidden if isinstance(hidden, int) else hidden[-1]
        self.loc = nn.Linear(last, latent_dim)
        self.log_var = nn.Linear(last, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(x)  # (..., M, H)
        return self.loc(h), torch.exp(0.5 * self.log_var(h))  # (..., M, Nz) each


class BernoulliDecoder(nn.Module):
    r""":math:`p_\theta(x|z) = \prod_d \mathrm{Bernoulli}(x_d; \mathrm{sigmoid}(f_\theta(z))_d)`, logits parameterised (Appendix C.1)."""

    def __init__(self, latent_dim: int, hidden: int | Sequence[int], data_dim: int, activation: str = "tanh"):
        super().__init__()
        self.logits = mlp(latent_dim, hidden, data_dim, activation)

    def forward(self, z: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=self.logits(z)).to_event(1)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z))


class GaussianDecoder(nn.Module):
    r""":math:`p_\theta(x|z) = \mathcal{N}(x; \mathrm{sigmoid}(f_\theta(z)), \operatorname{diag}\sigma^2_\theta(z))`.

    The mean is squashed into [0, 1] by a sigmoid, like the paper's Frey Face decoder. ``variance``:

    * ``"network"``: the paper's (Appendix C.2), :math:`\log\sigma^2 = W h + b` from the decoder's last hidden
      layer h, so each datapoint its own variances;
    * ``"pixel"`` (default): a learned per-pixel :math:`\log\sigma^2 = s`, shared across z.
    """

    def __init__(self, latent_dim: int, hidden: int | Sequence[int], data_dim: int, activation: str = "tanh",
                 variance: str = "pixel"):
        super().__init__()
        if variance not in DECODER_VARIANCES:
            raise ConfigError(f"decoder_variance = {variance!r} is not valid; choose one of: "
                              f"{', '.join(DECODER_VARIANCES)}")
        self.loc = mlp(latent_dim, hidden, data_dim, activation)
        last = hidden if isinstance(hidden, int) else hidden[-1]
        # "network": a second head on loc's hidden layers, as the encoder's log-variance (Appendix C.2)
        self.log_var = nn.Linear(last, data_dim) if variance == "network" else nn.Parameter(torch.zeros(data_dim))

    def forward(self, z: torch.Tensor) -> dist.TorchDistribution:
        if isinstance(self.log_var, nn.Linear):
            h = self.loc[:-1](z)  # (..., M, H): the hidden layers
            return dist.Normal(torch.sigmoid(self.loc[-1](h)), torch.exp(0.5 * self.log_var(h))).to_event(1)
        return dist.Normal(self.mean(z), torch.exp(0.5 * self.log_var)).to_event(1)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.loc(z))


DECODERS = {"bernoulli": BernoulliDecoder, "gaussian": GaussianDecoder}


_names = itertools.count()  # each VAE's model/guide get their own param-store names


class VAEModel(PyroModule):
    r"""The generative model :math:`p_\theta(z)\,p_\theta(x|z)` as a Pyro model: ``model(x, num_data=None, beta=1.0)``.

    A ``PyroModule``: called, it records its parameters (the prior's and the decoder's) as ``pyro.param``
    sites, so ``pyro.infer.SVI`` with a ``pyro.optim`` optimizer trains them, and it is an ``nn.Module``,
    so Pyro's ``ELBOModule`` (``TraceMeanField_ELBO()(vae.model, vae.guide)``) and ``torch.optim`` do too.
    """

    def __init__(self, prior: nn.Module, decoder: nn.Module, name: str):
        super().__init__(name)
        self.prior = prior
        self.decoder = decoder

    def forward(self, x: torch.Tensor, num_data: int | None = None, beta: float = 1.0):
        decoder = self.decoder
        if isinstance(decoder, BernoulliDecoder) and pyro.poutine.util.is_validation_enabled():
            _check_binary(x)
        with data_plate(x, num_data):
            with poutine.scale(scale=beta):
                z = pyro.sample("z", self.prior())  # (..., M, Nz)
            pyro.sample("x", decoder(z), obs=x)
        return z


class VAEGuide(PyroModule):
    r"""The recognition model :math:`q_\phi(z|x)` as a Pyro guide: ``guide(x, num_data=None, beta=1.0)``."""

    def __init__(self, encoder: nn.Module, name: str):
        super().__init__(name)
        self.encoder = encoder

    def forward(self, x: torch.Tensor, num_data: int | None = None, beta: float = 1.0):
        with data_plate(x, num_data):
            loc, scale = self.encoder(x)  # (M, Nz) each
            with poutine.scale(scale=beta):
                return pyro.sample("z", dist.Normal(loc, scale).to_event(1))


_ARANGES: dict = {}  # (M, device) -> arange(M): the plate only needs len(subsample) for its N/M scale


def data_plate(x: torch.Tensor, num_data: int | None) -> pyro.plate:
    """The data plate over the M rows of x, of size N (``num_data``; default M), at dim -1."""
    n = x.shape[-2]
    key = (n, x.device)
    if key not in _ARANGES:
        _ARANGES[key] = torch.arange(n, device=x.device)
    return pyro.plate("data", size=num_data or n, subsample=_ARANGES[key], dim=-1)


class VAE(nn.Module):
    r"""The model/guide pair. ``vae.model(x)`` and ``vae.guide(x)`` take x of shape (M, D).

    :param prior: a prior module (see :mod:`pyro_aevb.generative.priors`), called for p(z).
    :param encoder: a module mapping x to the (loc, scale) of q(z|x).
    :param decoder: a module mapping z to the distribution p(x|z).
    :param name: the prefix of the pair's ``pyro.param`` names (default: ``vae0``, ``vae1``, ... one
        per VAE made in this process, so that two VAEs never share parameters in Pyro's global
        param store; a deep copy gets a new one).

    ``vae.model`` (:class:`VAEModel`) and ``vae.guide`` (:class:`VAEGuide`) are ``PyroModule``\ s over
    the VAE's own ``prior``, ``encoder`` and ``decoder``; the VAE's ``state_dict`` holds those three
    (keys ``prior.*``, ``encoder.*``, ``decoder.*``). ``num_data`` (N) scales a minibatch to the full
    data set; ``None`` means x is the whole data set. ``beta`` weights the latent site (1 gives the ELBO).
    """

    def __init__(self, prior: nn.Module, encoder: nn.Module, decoder: nn.Module, name: str | None = None):
        super().__init__()
        self.prior = prior
        self.encoder = encoder
        self.decoder = decoder
        self._name_pair(name)

    def _name_pair(self, name: str | None) -> None:
        name = name or f"vae{next(_names)}"
        # Not submodules of the VAE: they share its modules, and its state_dict stays prior/encoder/decoder.
        object.__setattr__(self, "model", VAEModel(self.prior, self.decoder, f"{name}.model"))
        object.__setattr__(self, "guide", VAEGuide(self.encoder, f"{name}.guide"))

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in ("model", "guide"):
                object.__setattr__(new, key, copy.deepcopy(value, memo))
        new._name_pair(None)  # a copy must not share param-store names with its original
        return new

    def local_pair(self):
        """``(model, guide)`` as plain functions that record no ``pyro.param`` sites: for training loops
        that optimize ``vae.parameters()`` with a ``torch.optim`` optimizer themselves, and for tracing
        the ELBO (a param statement inside ``torch.jit``/``make_fx`` would sync with Pyro's param store)."""
        return self.model.forward, self.guide.forward

    #: datapoints per pass of the reported bound, and (particle, datapoint) pairs per pass of importance
    #: sampling (None: the evaluation's own default); a model with bigger traces sets smaller ones
    evaluation_rows: int = 1000
    likelihood_chunk: int | None = None
    likelihood_compile: bool | str = "auto"  # ``compile`` of the importance-sampling passes

    def evaluation_pair(self):
        """``(model, guide)`` of the reported bound: :meth:`local_pair` (a diffusion's sums every step)."""
        return self.local_pair()

    def likelihood_pair(self):
        """``(model, guide)`` for the importance-sampled log-likelihood: :meth:`local_pair`."""
        return self.local_pair()

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Decoder means at n draws from the prior, shape (n, D)."""
        z = self.prior().sample((n,))
        return self.decoder.mean(z)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder means at the encoder's mean of q(z|x), shape (M, D)."""
        loc, _ = self.encoder(x)
        return self.decoder.mean(loc)


def _check_binary(x: torch.Tensor) -> None:
    if not torch._C._get_tracing_state() and not ((x == 0) | (x == 1)).all():
        raise DataError(
            "the Bernoulli decoder needs binary x, but x has values other than 0 and 1; binarize grey-scale "
            "images (torch.bernoulli(x), as training does dynamically) or use likelihood = \"gaussian\""
        )


def init_normal_(module: nn.Module, std: float) -> None:
    """The paper's initialisation: every weight and bias ~ N(0, std^2) (Section 5: N(0, 0.01))."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, 0.0, std)
            nn.init.normal_(sub.bias, 0.0, std)


def build_vae(recipe, data_dim: int) -> VAE:
    """The VAE a recipe describes (layer sizes, likelihood, prior and initialisation)."""
    prior = make_prior(recipe.prior, recipe.latent_dim, **recipe.prior_options)
    hidden = list(recipe.hidden_dims) or [recipe.hidden_dim]  # the encoder's widths; the decoder mirrors them
    encoder = Encoder(data_dim, hidden, recipe.latent_dim, recipe.activation)
    variance = {"variance": recipe.decoder_variance} if recipe.likelihood == "gaussian" else {}
    decoder = DECODERS[recipe.likelihood](recipe.latent_dim, hidden[::-1], data_dim, recipe.activation, **variance)
    if recipe.init == "normal":
        init_normal_(encoder, recipe.init_scale)
        init_normal_(decoder, recipe.init_scale)
    vae = VAE(prior, encoder, decoder)
    if hasattr(prior, "bind"):  # a prior that needs the VAE, e.g. VampPrior uses the encoder
        prior.bind(vae)
        check_prior(prior, recipe.latent_dim, recipe.prior)
    return vae
