r"""Per-datapoint marginal log-likelihood by importance sampling, with the effective sample size.

Lower bounds are not likelihoods. For each datapoint :math:`x_i`, with
:math:`z_{k} \sim q(z|x_i)`, :math:`k = 1..K`, the importance-weighted estimate
of Burda et al. [1] (the quantity inside their :math:`\mathcal{L}_K` bound) is

.. math::

    \log p(x_i) \approx \log \frac1K \sum_{k=1}^K w_{ik}, \qquad
    \log w_{ik} = \log p(x_i, z_{k}) - \log q(z_{k}|x_i),

a stochastic lower bound whose expectation rises monotonically towards
:math:`\log p(x_i)` as K grows ([1], Theorem 1). The importance-sampling
effective sample size (Kong 1992; [2], Section 9.3) of the same weights is

.. math::

    \mathrm{ESS}_i = \frac{\big(\sum_k w_{ik}\big)^2}{\sum_k w_{ik}^2}
    = \exp\Big(2 \operatorname{logsumexp}_k \log w_{ik}
               - \operatorname{logsumexp}_k 2\log w_{ik}\Big) \in [1, K].

The log-weights come from :func:`pyro_aevb.evaluation.bounds.log_weights`, i.e. from
Pyro traces of the guide and of the model replayed against it, so custom
priors and decoders work unchanged. Pyro's ``Importance(...).get_log_normalizer()``
would instead give one number jointly for a whole minibatch.

Memory. Work is split into passes of at most ``chunk_size`` (particle,
datapoint) pairs: whole rows of K particles when K <= ``chunk_size``
(``chunk_size // K`` datapoints a pass), else one datapoint and
``chunk_size`` particles a pass. Across the particle chunks of a datapoint a
running :math:`\operatorname{logsumexp}` of :math:`\log w` and of
:math:`2\log w` is kept (float64), so only N numbers of each survive a pass.
Peak memory is that of one pass of the model and guide on ``B =
chunk_size`` pairs; for the VAE of :mod:`pyro_aevb.vae` (hidden width H,
data dimension D) with ``b`` bytes per float it is

.. math::

    \text{peak} \approx b \cdot B \cdot (2H + 2D)

on top of the model and the data (the decoder's hidden layer and tanh
output, its logits and one temporary of the Bernoulli log-density; z and the
weights, :math:`O(B N_z)`, are small). For the paper's 784-500-20 MNIST
network in float32: 4 x B x 2,568 bytes, i.e. 0.2 GB at the default B =
20,000. On a CPU the pass size matters little once a pass is large enough to
keep the matrix products efficient; on a GPU, larger passes amortize the
per-pass tracing overhead (measurements: BENCHMARKS.md).

References:
  [1] Y. Burda, R. Grosse, R. Salakhutdinov. Importance Weighted Autoencoders. ICLR 2016, arXiv:1509.00519.
  [2] A. B. Owen. Monte Carlo theory, methods and examples. 2013, Chapter 9.
  [3] D. P. Kingma, M. Welling. Auto-Encoding Variational Bayes. ICLR 2014, arXiv:1312.6114.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

import pyro

from ..graphs import compile_graph, quiet_compiler, record
from .bounds import log_weights, mean_se

#: Default bound on (particle, datapoint) pairs per vectorized pass; see the module docstring for memory.
DEFAULT_CHUNK_SIZE = 20_000
#: ``compile="auto"`` compiles the passes when there are at least this many (a compile takes seconds)
COMPILE_MIN_PASSES = 100


@dataclass
class LikelihoodResult:
    """Per-datapoint importance-sampling estimates from :func:`log_likelihood`.

    :ivar log_likelihood: (N,) estimates of log p(x_i), nats.
    :ivar ess: (N,) importance-sampling effective sample sizes, each in [1, K].
    :ivar num_samples: K, importance samples per datapoint.
    :ivar log_weights: (K, n) log-weights of the first n datapoints when
        ``keep_log_weights=n`` was asked for (e.g. for PSIS k-hat), else ``None``.
    :ivar compiled: ``"inductor"`` if the passes ran compiled, else why they ran eagerly.
    """

    log_likelihood: torch.Tensor
    ess: torch.Tensor
    num_samples: int
    log_weights: torch.Tensor | None = None
    compiled: str = "eager"  # "inductor", or why the passes ran eagerly

    @property
    def mean(self) -> float:
        """Average estimate over datapoints (nats)."""
        return self.log_likelihood.mean().item()

    @property
    def se(self) -> float:
        """Standard error of :attr:`mean` over datapoints (NaN for one datapoint)."""
        return mean_se(self.log_likelihood)[1]


class PassWeights:
    """``(r0, r1, k0, k1) -> (k1 - k0, r1 - r0)`` log-weights of one pass, for :func:`accumulate`.

    Passes of the full shape (``rows`` datapoints, ``samples`` particles) replay a compiled recording
    where one could be made; others (the last, shorter ones) run eagerly.
    """

    def __init__(self, model, guide, x, num_samples: int, rows: int, samples: int, kwargs: dict,
                 compile: bool | str = "auto"):
        self.model, self.guide, self.x, self.kwargs = model, guide, x, kwargs
        self.shape, self.replay, self.compiled = (rows, samples), None, "eager"
        passes = (x.shape[0] // rows) * (num_samples // samples)  # of the full shape
        wanted = compile is True or (compile == "auto" and x.device.type == "cpu" and passes >= COMPILE_MIN_PASSES)
        if wanted:
            self.replay, self.compiled = self._record(x[:rows], samples)

    def _eager(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        return log_weights(self.model, self.guide, x, samples, **self.kwargs)

    def _record(self, example: torch.Tensor, samples: int):
        """(compiled pass, "inductor"), or (None, the reason it could not be)."""
        try:
            # recording runs the pass once: leave the random stream as it was, so the noise is eager's
            with torch.random.fork_rng(devices=[example.device] if example.is_cuda else []), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = record(lambda xc: self._eager(xc, samples), example)
            return compile_graph(graph), "inductor"
        except Exception as e:  # noqa: BLE001 - anything a recording or the compiler cannot express runs eagerly
            first = (str(e).splitlines() or [""])[0]
            return None, f"eager: compiling failed ({type(e).__name__}: {first[:120]})"

    def __call__(self, r0: int, r1: int, k0: int, k1: int) -> torch.Tensor:
        x = self.x[r0:r1]
        if self.replay is not None and (r1 - r0, k1 - k0) == self.shape:
            try:
                with quiet_compiler():
                    return self.replay(x)
            except Exception as e:  # noqa: BLE001 - the first call compiles: a missing compiler shows here
                first = (str(e).splitlines() or [""])[0]
                self.replay, self.compiled = None, f"eager: compiling failed ({type(e).__name__}: {first[:120]})"
        return self._eager(x, k1 - k0)


def chunk_shape(num_data: int, num_samples: int, chunk_size: int) -> tuple[int, int]:
    """(datapoints, particles) per pass so that their product is at most ``chunk_size``.

    Whole rows of K particles while K <= chunk_size, else one datapoint and
    ``chunk_size`` particles per pass.
    """
    if chunk_size < 1 or num_samples < 1:
        raise ValueError(f"chunk_size and num_samples must be positive, got {chunk_size} and {num_samples}")
    if num_samples <= chunk_size:
        return max(1, min(num_data, chunk_size // num_samples)), num_samples
    return 1, chunk_size


def accumulate(
    weight_fn: Callable[[int, int, int, int], torch.Tensor],
    num_data: int,
    num_samples: int,
    rows_per_chunk: int,
    samples_per_chunk: int,
    keep_log_weights: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    r"""Streaming :math:`\operatorname{logsumexp}_k \log w_{ik}` and :math:`\operatorname{logsumexp}_k 2\log w_{ik}`.

    ``weight_fn(r0, r1, k0, k1)`` returns the log-weights of datapoints
    ``r0:r1`` and particles ``k0:k1``, shape (k1 - k0, r1 - r0). Every
    (particle, datapoint) pair is asked for exactly once. Returns the two (N,)
    float64 running sums and the (K, n) log-weights of the first
    ``n = keep_log_weights`` datapoints (``None`` if n = 0).
    """
    # Outputs are allocated once, up front: small tensors kept alive between the passes' large
    # temporaries would pin the heap and let it fragment (glibc), growing the process pass by pass.
    lse_w = lse_w2 = kept = None
    bar = tqdm(total=num_data * num_samples, unit="sample", unit_scale=True, desc="log p(x)", disable=not progress)
    for r0 in range(0, num_data, rows_per_chunk):
        r1 = min(num_data, r0 + rows_per_chunk)
        for k0 in range(0, num_samples, samples_per_chunk):
            k1 = min(num_samples, k0 + samples_per_chunk)
            lw = weight_fn(r0, r1, k0, k1)  # (k1 - k0, r1 - r0)
            if lw.shape != (k1 - k0, r1 - r0):
                raise ValueError(f"log-weights of shape {tuple(lw.shape)}, expected {(k1 - k0, r1 - r0)}")
            if lse_w is None:
                lse_w = torch.full((num_data,), -math.inf, dtype=torch.float64, device=lw.device)
                lse_w2 = torch.full_like(lse_w, -math.inf)
                n_keep = min(keep_log_weights, num_data)
                kept = torch.empty(num_samples, n_keep, dtype=lw.dtype, device=lw.device) if n_keep else None
            lw64 = lw.to(torch.float64)
            # running logsumexp over particle chunks; logaddexp(-inf, a) = a starts it
            torch.logaddexp(lse_w[r0:r1], lw64.logsumexp(0), out=lse_w[r0:r1])
            torch.logaddexp(lse_w2[r0:r1], (2 * lw64).logsumexp(0), out=lse_w2[r0:r1])
            if r0 < keep_log_weights:
                kept[k0:k1, r0 : min(r1, keep_log_weights)] = lw[:, : keep_log_weights - r0]
            bar.update((k1 - k0) * (r1 - r0))
    bar.close()
    return lse_w, lse_w2, kept


@torch.no_grad()
def log_likelihood(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int = 5000,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_diagnostics: bool = False,
    keep_log_weights: int = 0,
    progress: bool = False,
    validate: bool = False,
    compile: bool | str = "auto",
    **kwargs,
) -> torch.Tensor | LikelihoodResult:
    r"""Importance-sampling estimate of :math:`\log p(x_i)` for each row of x (shape (N, D)).

    .. math::

        \log p(x_i) \approx \operatorname{logsumexp}_{k=1}^{K}
            \big[\log p(x_i, z_{k}) - \log q(z_{k}|x_i)\big] - \log K,
        \qquad z_{k} \sim q(z|x_i)

    (Burda et al. 2016). ``model(x)`` and ``guide(x)`` are a Pyro pair
    with a data plate at dim -1 (as :class:`pyro_aevb.vae.VAE`); ``kwargs``
    go to both. Runs under ``torch.no_grad()``, vectorized over particles in
    passes of at most ``chunk_size`` (particle, datapoint) pairs (see the
    module docstring for the memory formula). Any ``chunk_size`` gives the
    same estimator; only the order in which random numbers are drawn changes.

    :param num_samples: K, importance samples per datapoint.
    :param return_diagnostics: if False (default) return the (N,) tensor of
        estimates; if True return a :class:`LikelihoodResult` with the
        estimates, the per-datapoint importance-sampling ESS and K.
    :param keep_log_weights: with ``return_diagnostics``, keep the full (K, n)
        log-weights of the first n datapoints in
        :attr:`LikelihoodResult.log_weights` (K * n floats), e.g. for
        :func:`pyro_aevb.diagnostics.psis_khat`.
    :param progress: a tqdm progress bar over the N * K samples.
    :param validate: keep Pyro's and torch's distribution checks on. Off by
        default, as in ``pyro.infer.mcmc.MCMC``: they re-check every parameter
        of every pass (a NaN check of all K x rows x D logits), about 20% of
        the time of the paper's MNIST network.
    :param compile: record one pass of the model and guide as an ATen graph and compile it with
        TorchInductor (:mod:`pyro_aevb.graphs`), then replay it for every pass of that shape: the
        element-wise work around the matrix products is fused, the same noise is drawn from the same
        seed, and the estimates agree with the eager ones to float rounding. ``"auto"`` (default)
        compiles on the CPU when there are at least :data:`COMPILE_MIN_PASSES` passes, which repay
        the compile's seconds; ``True`` always; ``False`` never. A pair that cannot be recorded
        (a shape that depends on the data) runs eagerly; :attr:`LikelihoodResult.compiled` says which.
    :returns: a float64 tensor of shape (N,) on x's device, or a :class:`LikelihoodResult`.

    It leaves the process's allocator alone; the ``evaluate`` command tunes it first
    (:func:`pyro_aevb.training.cpu_allocator.tune_cpu_allocator`), so that the passes' temporaries
    are reused rather than page-faulted afresh.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"expected x of shape (N, D) with N >= 1, got {tuple(x.shape)}")
    n = x.shape[0]
    rows, samples = chunk_shape(n, num_samples, chunk_size)
    with pyro.validation_enabled(validate):
        weight_fn = PassWeights(model, guide, x, num_samples, rows, samples, kwargs, compile)
        lse_w, lse_w2, kept = accumulate(weight_fn, n, num_samples, rows, samples, keep_log_weights, progress)
    estimate = lse_w - math.log(num_samples)
    if not return_diagnostics:
        return estimate
    ess = torch.exp(2 * lse_w - lse_w2)
    return LikelihoodResult(estimate, ess, num_samples, kept, weight_fn.compiled)
