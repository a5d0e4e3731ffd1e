r"""Priors p(z): modules that return a distribution over z, chosen by name or import path.

**The protocol.** A prior is a ``torch.nn.Module`` whose ``forward()`` returns a
Pyro distribution over z with ``event_shape == (latent_dim,)`` and an empty (or
broadcastable) ``batch_shape``; the model's data plate broadcasts it to one copy
per datapoint. Its ``nn.Parameter``\ s are learned with the model and saved in
the checkpoint, because it is a submodule of the VAE. Two optional hooks:

- ``bind(vae)``, called by :func:`pyro_aevb.generative.vae.build_vae` once the encoder
  exists (the VampPrior needs it). Parameters created here must have shapes
  fixed by the recipe and the data dimension alone, so that
  :func:`pyro_aevb.load` rebuilds them before ``load_state_dict``.
- ``initialize_from_data(x)``, called by the training loop with the training
  set x of shape (N, D), before the first step (not when a run is reloaded).

**The priors** (:data:`PRIORS`; recipe key ``prior``, options in ``[prior_options]``):

.. math::

    \text{standard-normal:}\quad p(z) &= \mathcal N(z; 0, I) \\
    \text{gaussian:}\quad p_\lambda(z) &= \mathcal N(z; \mu, \operatorname{diag}\sigma^2) \\
    \text{mog:}\quad p_\lambda(z) &= \textstyle\sum_{k=1}^K w_k\, \mathcal N(z; \mu_k, \operatorname{diag}\sigma_k^2),
        \quad w = \operatorname{softmax}(\alpha) \\
    \text{vamp:}\quad p_\lambda(z) &= \textstyle\frac1K \sum_{k=1}^K q_\phi(z \mid u_k) \\
    \text{flow:}\quad p_\lambda(z) &= \mathcal N(f(z); 0, I)\, \lvert\det \partial f(z)/\partial z\rvert,
        \quad f = f_L \circ \dots \circ f_1

The VampPrior [1] is the aggregate posterior of K learned pseudo-inputs u_k
(shape (K, D)) under the model's own encoder. The flow prior pushes N(0, I)
through learned bijections [2, 3]: masked autoregressive affine layers [4]
(``kind = "affine-autoregressive"``: density in one network pass, sampling in
Nz passes) or linear-rational spline couplings [5]
(``kind = "spline-coupling"``), with the coordinate order reversed between layers.

**Estimator B with these priors.** ``sgvb-b`` (``TraceMeanField_ELBO``) uses the
analytic KL only where ``kl_divergence(Normal(loc, scale).to_event(1), prior)``
is registered. It is for ``standard-normal`` and ``gaussian`` (diagonal Gaussian
against diagonal Gaussian). A mixture, a VampPrior or a flow has no closed-form
KL from a Gaussian, so for them B's KL term is the one-sample Monte Carlo
estimate :math:`\log q(z|x) - \log p(z)`, i.e. B becomes estimator A; the run
records ``"kl": "monte-carlo"`` in ``run.json`` and says so at start-up. No KL
is registered here: the ones torch has are the ones used.

**A user's prior.** ``prior = "package.module:factory"`` (importable) or
``prior = "path/to/file.py:factory"`` (a file, relative to the working
directory) calls ``factory(latent_dim, **prior_options)``; see
:func:`resolve_prior_factory` and ``models/my_prior.py``.

References:
  [1] J. M. Tomczak, M. Welling. VAE with a VampPrior. AISTATS 2018, arXiv:1705.07120.
  [2] D. J. Rezende, S. Mohamed. Variational Inference with Normalizing Flows. ICML 2015.
  [3] G. Papamakarios et al. Normalizing Flows for Probabilistic Modeling and Inference. JMLR 2021.
  [4] G. Papamakarios, T. Pavlakou, I. Murray. Masked Autoregressive Flow for Density Estimation. NeurIPS 2017.
  [5] C. Durkan et al. Neural Spline Flows. NeurIPS 2019 (H. M. Dolatabadi et al., AISTATS 2020, for
      the linear-rational splines Pyro implements).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import pyro.distributions as dist
import pyro.distributions.transforms as T
from pyro.nn import AutoRegressiveNN

from ..errors import ConfigError
from .mixture import DiagonalNormalMixture


class StandardNormalPrior(nn.Module):
    r"""The paper's prior, :math:`p_\theta(z) = \mathcal{N}(z; 0, I)` (Kingma & Welling 2013, Sec. 3).

    Mean and scale are buffers, not parameters: they move with ``.to(device)``
    and are never trained. Estimator B has the analytic KL
    :math:`-D_{KL} = \tfrac12 \sum_j (1 + \log\sigma_j^2 - \mu_j^2 - \sigma_j^2)`
    (the paper's Appendix B) through Pyro's registered ``Normal``/``Normal`` KL.
    """

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class GaussianPrior(nn.Module):
    r"""A learned diagonal Gaussian, :math:`\mathcal N(z; \mu, \operatorname{diag}\sigma^2)`.

    Parameters ``loc`` (Nz,) and ``log_scale`` (Nz,), starting at N(0, init_scale^2 I).
    The KL from the diagonal-Gaussian guide is analytic, so estimator B stays B.
    (With an MLP decoder this prior adds little: an affine map of z is absorbed
    by the decoder's first layer. It is the simplest learned prior, and a check.)
    """

    def __init__(self, latent_dim: int, init_scale: float = 1.0):
        super().__init__()
        _require(init_scale > 0, f"prior_options.init_scale must be > 0, got {init_scale}")
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.full((latent_dim,), math.log(init_scale)))

    def forward(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)


class MixtureOfGaussiansPrior(nn.Module):
    r"""A mixture of K diagonal Gaussians, :math:`\sum_k w_k \mathcal N(z; \mu_k, \operatorname{diag}\sigma_k^2)`.

    Parameters: ``logits`` (K,) with w = softmax(logits), starting uniform;
    ``locs`` (K, Nz), starting at draws from N(0, I) so that the components
    differ; ``log_scales`` (K, Nz), starting at log(init_scale). No analytic KL
    exists from a Gaussian to a mixture: estimator B's KL term is Monte Carlo.
    """

    def __init__(self, latent_dim: int, components: int = 10, init_scale: float = 1.0):
        super().__init__()
        _require(components >= 1, f"prior_options.components must be >= 1, got {components}")
        _require(init_scale > 0, f"prior_options.init_scale must be > 0, got {init_scale}")
        self.logits = nn.Parameter(torch.zeros(components))
        self.locs = nn.Parameter(torch.randn(components, latent_dim))
        self.log_scales = nn.Parameter(torch.full((components, latent_dim), math.log(init_scale)))

    def forward(self) -> dist.TorchDistribution:
        return DiagonalNormalMixture(self.logits, self.locs, self.log_scales.exp())  # batch (), event (Nz,)


class VampPrior(nn.Module):
    r"""The VampPrior (Tomczak & Welling 2018): :math:`p_\lambda(z) = \frac1K \sum_k q_\phi(z \mid u_k)`.

    The mixture of the encoder's Gaussians at K learned pseudo-inputs ``u``
    (an ``nn.Parameter`` of shape (K, D), created in :meth:`bind` because D is
    known only from the encoder), with equal weights, as in the paper. The
    encoder is shared with the guide but not registered as a submodule here,
    so its parameters appear once in ``state_dict()`` and in the optimizer.

    ``init = "data"``: u starts at K random training images
    (:meth:`initialize_from_data`, drawn with the global torch RNG);
    ``"random"``: u starts at pixels drawn from U(0, 1). The pseudo-inputs are
    unconstrained reals (the encoder is defined on all of R^D; the paper's
    hard-tanh to [0, 1] is not applied); the loop's weight decay acts on them
    like on every other parameter.

    No analytic KL exists from a Gaussian to a mixture: B's KL term is Monte Carlo.
    """

    INITS = ("data", "random")

    def __init__(self, latent_dim: int, components: int = 500, init: str = "data"):
        super().__init__()
        _require(components >= 1, f"prior_options.components must be >= 1, got {components}")
        _require(init in self.INITS, f"prior_options.init = {init!r} is not valid; choose one of: data, random")
        self.latent_dim = latent_dim
        self.components = components
        self.init = init
        self.register_parameter("pseudo_inputs", None)  # (K, D), created by bind()
        self._encoder: tuple = ()  # (encoder,): a reference, deliberately not a submodule

    def bind(self, vae: nn.Module) -> None:
        """Share ``vae.encoder`` and create the pseudo-inputs, shape (K, D) with D the encoder's input size."""
        encoder = vae.encoder
        first = next((m for m in encoder.modules() if isinstance(m, nn.Linear)), None)
        if first is None:
            raise ConfigError("the VampPrior needs an encoder with an nn.Linear layer, to read the data dimension")
        self._encoder = (encoder,)
        weight = first.weight
        self.pseudo_inputs = nn.Parameter(
            torch.rand(self.components, first.in_features, device=weight.device, dtype=weight.dtype)
        )
        check_prior(self, self.latent_dim)

    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor) -> None:
        """With ``init = "data"``, set u to K distinct random rows of x (N, D) (with replacement if N < K)."""
        if self.init != "data":
            return
        n, k = x.shape[0], self.components
        rows = torch.randperm(n, device=x.device)[:k] if n >= k else torch.randint(n, (k,), device=x.device)
        self.pseudo_inputs.copy_(x[rows])

    def forward(self) -> dist.TorchDistribution:
        if not self._encoder:
            raise ConfigError("the VampPrior has no encoder yet; build it with build_vae or call prior.bind(vae)")
        loc, scale = self._encoder[0](self.pseudo_inputs)  # (K, Nz) each
        return DiagonalNormalMixture(loc.new_zeros(self.components), loc, scale)  # equal weights 1/K


class FlowPrior(nn.Module):
    r"""A normalizing-flow prior, :math:`\log p(z) = \log \mathcal N(f(z); 0, I) + \log\lvert\det \partial_z f\rvert`.

    ``f = f_L o ... o f_1`` maps z to the base variable; its layers are Pyro
    ``TransformModule``\ s in an ``nn.ModuleList`` (trained and saved). The
    distribution is ``TransformedDistribution(N(0, I), [f_L^{-1}, ..., f_1^{-1}])``,
    so ``log_prob`` evaluates each f_i forwards.

    - ``kind = "affine-autoregressive"``: MAF layers (Papamakarios et al. 2017),
      :math:`f_i(z)_j = z_j e^{s_j(z_{<j})} + m_j(z_{<j})` with a MADE of one hidden
      layer of ``hidden_dim`` units; layers alternate the variable order. The
      density takes one pass, a sample Nz passes. With Nz = 1 a layer has no
      z_{<j} to condition on: it is a learned affine map z -> a z + b.
    - ``kind = "spline-coupling"``: linear-rational spline couplings (Durkan et
      al. 2019; Dolatabadi et al. 2020), 8 bins on [-3, 3], identity outside:
      the first half of z goes through learned element-wise splines, and
      parameterises, through a DenseNN of two hidden layers of ``hidden_dim``
      units, the splines of the second half; z is reversed between layers.
      With Nz = 1 each layer is an element-wise learned spline.

    ``hidden_dim = 0`` picks 3 Nz + 1 (Pyro's default MADE width). Every layer
    starts at (nearly) the identity, so the untrained prior is N(0, I), the
    paper's. No analytic KL exists from a Gaussian to a flow: estimator B's KL
    term is Monte Carlo.
    """

    KINDS = ("affine-autoregressive", "spline-coupling")

    def __init__(self, latent_dim: int, layers: int = 2, kind: str = "affine-autoregressive", hidden_dim: int = 0):
        super().__init__()
        _require(layers >= 1, f"prior_options.layers must be >= 1, got {layers}")
        _require(kind in self.KINDS,
                 f"prior_options.kind = {kind!r} is not valid; choose one of: {', '.join(self.KINDS)}")
        _require(hidden_dim >= 0, f"prior_options.hidden_dim must be >= 0 (0: the default), got {hidden_dim}")
        hidden = hidden_dim or 3 * latent_dim + 1
        _require(kind != "affine-autoregressive" or hidden >= latent_dim,
                 f"prior_options.hidden_dim = {hidden_dim} is below latent_dim = {latent_dim}; an autoregressive "
                 "layer needs at least latent_dim hidden units (or 0 for the default)")
        self.register_buffer("base_loc", torch.zeros(latent_dim))
        self.register_buffer("base_scale", torch.ones(latent_dim))
        modules, chain = [], []  # chain: f_1, ..., f_L in the z -> base direction, with the reversals
        for i in range(layers):
            if kind == "affine-autoregressive":
                order = torch.arange(latent_dim)
                with warnings.catch_warnings():  # Pyro warns for input_dim == 1; a learned affine map is intended
                    warnings.simplefilter("ignore")
                    arn = AutoRegressiveNN(latent_dim, [hidden], permutation=order if i % 2 == 0 else order.flip(0))
                layer = T.AffineAutoregressive(arn)
            elif latent_dim == 1:
                layer = T.Spline(1, count_bins=8, bound=3.0)
            else:
                layer = T.spline_coupling(latent_dim, hidden_dims=[hidden, hidden], count_bins=8, bound=3.0)
                if i > 0:  # reverse the coordinates between couplings (volume preserving)
                    chain.append(T.Permute(torch.arange(latent_dim - 1, -1, -1)))
            _start_at_identity(layer)
            modules.append(layer)
            chain.append(layer)
        self.layers = nn.ModuleList(modules)
        self._chain = chain  # a plain list: the modules in it are registered through self.layers

    def forward(self) -> dist.TorchDistribution:
        for layer in self.layers:  # Pyro's transforms cache the last (x, y) by identity: forget values
            layer._cached_x_y = (None, None)  # computed with parameters an optimizer step may have changed
        base = dist.Normal(self.base_loc, self.base_scale).to_event(1)
        return dist.TransformedDistribution(base, [f.inv for f in reversed(self._chain)])


_SOFTPLUS_INV_1 = math.log(math.expm1(1.0 - 1e-3))  # Pyro's spline knot slope is 1e-3 + softplus(.): this gives 1


@torch.no_grad()
def _start_at_identity(layer: nn.Module) -> None:
    """Make a flow layer (nearly) the identity, so that the flow prior starts at the paper's N(0, I).

    Pyro initialises splines from N(0, 1) draws, which gives densities with
    spikes (peaks of 10-300 in one dimension); an untrained prior should not.
    The output layer of each conditioner network is zeroed (as in Glow's
    zero-initialised last layer) and its bias set to the identity's parameters:
    loc 0 and log-scale 0 (affine), or equal bins with unit knot slopes (spline).
    """
    if isinstance(layer, T.AffineAutoregressive):
        last = layer.arn.layers[-1]  # outputs (loc, log_scale)
        last.weight.zero_()
        last.bias.zero_()
        return
    splines = [layer] if isinstance(layer, T.Spline) else [layer.lower_spline]
    for spline in splines:  # unconditioned splines: (dims, bins) parameters
        spline.unnormalized_widths.zero_()
        spline.unnormalized_heights.zero_()
        spline.unnormalized_derivatives.fill_(_SOFTPLUS_INV_1)
        spline.unnormalized_lambdas.zero_()
    if isinstance(layer, T.SplineCoupling):  # the conditioner's output: [widths, heights, derivatives, lambdas]
        net = layer.upper_spline.nn
        last = net.layers[-1]
        last.weight.zero_()
        last.bias.zero_()
        n, bins = layer.upper_spline.input_dim, layer.upper_spline.count_bins
        last.bias[2 * n * bins : 2 * n * bins + n * (bins - 1)] = _SOFTPLUS_INV_1


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


#: name -> factory(latent_dim, **options) -> prior module. Options are keyword
#: arguments with defaults of type int, float, str or bool (what [prior_options] checks against).
PRIORS: dict[str, Callable[..., nn.Module]] = {
    "standard-normal": StandardNormalPrior,
    "gaussian": GaussianPrior,
    "mog": MixtureOfGaussiansPrior,
    "vamp": VampPrior,
    "flow": FlowPrior,
}

_FILE_MODULES: dict[tuple[str, int], object] = {}  # (resolved path, mtime) -> module, so classes stay the same


def _import_file(path_text: str, name: str):
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"prior '{name}': file {path_text} not found (relative to {Path.cwd()}); "
                          "give a path to a .py file, or an importable module as package.module:factory")
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _FILE_MODULES:
        module_name = f"_pyro_aevb_prior_{abs(hash(key[0]))}_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # e.g. dataclasses in the file look themselves up here
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise ConfigError(f"prior '{name}': running {path_text} failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}; fix the file") from None
        _FILE_MODULES[key] = module
    return _FILE_MODULES[key]


def _import_module(module_name: str, name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"prior '{name}': cannot import module '{module_name}' ({e}); put its folder on "
                          "PYTHONPATH, or give a file path such as models/my_prior.py:laplace_prior") from None
    except Exception as e:
        raise ConfigError(f"prior '{name}': importing '{module_name}' failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}; fix the module") from None


def resolve_prior_factory(name: str) -> Callable[..., nn.Module]:
    """The factory a ``prior`` value names: a key of :data:`PRIORS`, ``module:attr`` or ``path/file.py:attr``.

    The factory is called as ``factory(latent_dim, **prior_options)``; its
    keyword arguments with defaults are the valid ``[prior_options]`` keys.
    Raises :class:`ConfigError` (one line, with the fix) for an unknown name, a
    module or file that does not import, a missing attribute, or a non-callable.
    """
    if ":" not in name:
        if name not in PRIORS:
            raise ConfigError(f"unknown prior '{name}'; valid priors: {', '.join(PRIORS)}, "
                              "or your own as module:factory or path/to/file.py:factory")
        return PRIORS[name]
    where, _, attr = name.rpartition(":")
    if not where or not attr:
        raise ConfigError(f"prior '{name}' is not of the form module:factory or path/to/file.py:factory")
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    module = _import_file(where, name) if is_file else _import_module(where, name)
    if not hasattr(module, attr):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ConfigError(f"prior '{name}': {where} has no attribute '{attr}'; callables there: "
                          f"{', '.join(found) or 'none'}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise ConfigError(f"prior '{name}': {attr} is a {type(factory).__name__}, not callable; name a function "
                          "or class called as factory(latent_dim, **prior_options)")
    return factory


@contextlib.contextmanager
def user_code(what: str):
    """An exception raised by the user's own prior code becomes one line that names the recipe key."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"{what} raised {type(e).__name__}: {first[:200]}; fix the prior, or its "
                          "[prior_options]") from None


def make_prior(name: str, latent_dim: int, **options) -> nn.Module:
    """Build the prior ``name`` (see :func:`resolve_prior_factory`) with ``options``, and check the protocol.

    A prior with a ``bind`` hook cannot produce its distribution before it is
    bound to the VAE; it is checked when bound (the VampPrior checks itself).
    """
    factory = resolve_prior_factory(name)
    with user_code(f"recipe key 'prior' = {name!r}: {getattr(factory, '__name__', 'the factory')}"
                   f"({latent_dim}, **prior_options)"):
        prior = factory(latent_dim, **options)
    if not isinstance(prior, nn.Module):
        raise ConfigError(
            f"prior '{name}' returned {type(prior).__name__}, not a torch.nn.Module; return a module whose "
            "forward() gives the distribution of z, so that its parameters are trained and saved"
        )
    if not hasattr(prior, "bind"):
        check_prior(prior, latent_dim, name)
    return prior


def check_prior(prior: nn.Module, latent_dim: int, name: str | None = None) -> None:
    """Fail at start-up, not mid-training, if ``prior()`` is not a distribution over z."""
    label = f"'{name}'" if name else type(prior).__name__
    with user_code(f"recipe key 'prior' = {label}: its forward()"):
        d = prior()
    if not isinstance(d, torch.distributions.Distribution):
        raise ConfigError(
            f"prior {label} forward() returned {type(d).__name__}, not a distribution; "
            "return a pyro.distributions object"
        )
    if tuple(d.event_shape) != (latent_dim,):
        raise ConfigError(
            f"prior {label} has event_shape {tuple(d.event_shape)}, expected "
            f"({latent_dim},) = (latent_dim,); use .to_event(1) on a per-dimension distribution"
        )
    if d.batch_shape.numel() != 1:
        raise ConfigError(
            f"prior {label} has batch_shape {tuple(d.batch_shape)}, expected (); "
            "the data plate broadcasts the prior to each datapoint"
        )
