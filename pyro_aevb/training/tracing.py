"""The traced training losses: Pyro's ELBO recorded once, then replayed, by the JIT or by ``torch.compile``.

Every eager step of ``Trace_ELBO`` re-runs Pyro's tracing machinery in Python
(messengers, trace graphs, site bookkeeping), which costs as much as the
arithmetic of a small network. We record the operations of one loss
computation and replay them; the Pyro model/guide stay the single source of
truth, and the replayed graph draws fresh noise at every call. Two backends:

* ``"jit"``: like Pyro's own ``JitTrace_ELBO``, ``torch.jit.trace``. It wraps the
  model/guide pair as an ``nn.Module`` (:class:`SurrogateLossModule`), so parameters are module parameters (no param-store
  round trip), and beta is a tensor input (a KL warm-up does not force a
  re-trace at each step). Ready in about a second. While tracing, Normal's
  noise is drawn as eager PyTorch draws it (``empty(...).normal_()``; under a
  trace PyTorch would switch to ``torch.normal(zeros, ones)``, a different
  stream), so a seed gives the JIT path eager Pyro's very noise. On CUDA it is what
  :mod:`pyro_aevb.training.cuda_graphs` records into a CUDA graph: its replay reads
  nothing back to the host, whereas eager Pyro calls ``torch_item`` on the loss.
* ``"inductor"``: the same computation recorded as ATen operations with
  ``make_fx``, then compiled by ``torch.compile`` (TorchInductor: fused C++
  loops for the element-wise work, one autograd node for the whole backward).
  On the CPU it is about as fast as the hand-written PyTorch step
  (BENCHMARKS.md), but compiling takes seconds to tens of seconds and needs a
  C++ compiler, so training uses it for long runs only
  (:data:`COMPILE_MIN_STEPS`). Random draws go through
  ATen (``fallback_random``), so a seed gives the same noise as eager Pyro.

.. warning:: A traced graph has static structure. Priors or guides whose
   control flow depends on values, and estimators that are not plain
   reparameterized ELBOs, cannot use it: :func:`compile_loss` then returns
   ``None`` with the reason, and training falls back (inductor to the JIT, the
   JIT to eager Pyro). The inductor graph is also specialised to the example's
   minibatch shape.
"""

from __future__ import annotations

import contextlib
import warnings
from itertools import chain
from unittest import mock

import torch

import pyro
import pyro.infer.trace_elbo
import pyro.infer.trace_mean_field_elbo

from ..graphs import compile_graph, quiet_compiler, record

#: estimators whose loss is one reparameterized, static graph
JIT_ESTIMATORS = ("sgvb-a", "sgvb-b")
#: the backends of :func:`compile_loss`
BACKENDS = ("inductor", "jit")
#: ``fast_path = "auto"`` compiles (backend "inductor") CPU runs of at least this many steps: compiling
#: costs seconds more than tracing, which the faster steps of a long run repay (BENCHMARKS.md)
COMPILE_MIN_STEPS = 20_000


def choose_backend(fast_path: str, device: torch.device, steps: int) -> str | None:
    """The :func:`compile_loss` backend a run of ``steps`` steps uses under recipe key ``fast_path``;
    ``None``: eager Pyro."""
    if fast_path == "off":
        return None
    if fast_path in ("compile", "jit"):
        return "inductor" if fast_path == "compile" else "jit"
    return "inductor" if device.type == "cpu" and steps >= COMPILE_MIN_STEPS else "jit"


class SurrogateLossModule(torch.nn.Module):
    """``x, beta ->`` the sum over particles of Pyro's surrogate loss for ``vae.local_pair()``
    at ``(x, num_data=N, beta=beta)``: the value of ``differentiable_loss``, without its host reads.

    Not Pyro's ``ELBOModule`` (whose ``forward`` calls ``differentiable_loss``, with the reads).
    """

    def __init__(self, vae, estimator, num_data: int):
        super().__init__()
        self.vae = vae
        self.estimator = estimator
        self.num_data = num_data

    def forward(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        # As Pyro's JitTraceMeanField_ELBO does: sum the particles' surrogate losses. Calling
        # differentiable_loss would bake `torch_item(surrogate_loss)` into the graph as a constant
        # (its value at trace time), which is harmless for the gradient but wrong for the value.
        # For reparameterized sites the surrogate equals the loss, in value and in gradient.
        est, loss = self.estimator, 0.0
        kwargs = {"num_data": self.num_data, "beta": beta}
        for model_trace, guide_trace in est._get_traces(*self.vae.local_pair(), (x,), kwargs):
            _, surrogate = est._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + surrogate / est.num_particles
        return loss


class CompiledLoss:
    """A traced loss: ``compiled(x, beta) -> loss`` (a 0-d tensor that backpropagates to the VAE).

    ``traced(x, beta_tensor)`` is the replayed graph itself; ``backend`` is "jit" or "inductor".
    """

    def __init__(self, traced, device: torch.device, backend: str = "jit"):
        self.traced = traced
        self.device = device
        self.backend = backend
        self._betas: dict[float, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        if beta not in self._betas:  # one small tensor per distinct beta, reused
            if len(self._betas) > 64:
                self._betas.clear()
            self._betas[beta] = torch.tensor(float(beta), device=self.device)
        return self.traced(x, self._betas[beta])


def compile_loss(name: str, vae, estimator, example_x: torch.Tensor, num_data: int, backend: str = "jit"):
    """Trace the loss of estimator ``name`` once; returns ``(CompiledLoss, None)`` or ``(None, reason)``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if name not in JIT_ESTIMATORS:
        return None, f"estimator '{name}' is not a plain reparameterized ELBO"
    module = SurrogateLossModule(vae, estimator, num_data)
    beta = torch.tensor(1.0, device=example_x.device)
    # tracing draws noise: leave the run's random stream as it was
    devices = [example_x.device] if example_x.is_cuda else []
    try:
        with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python values becoming constants
            if backend == "jit":
                with _eager_noise():
                    traced = torch.jit.trace(module, (example_x, beta), check_trace=False)
                traced(example_x, beta)  # a second call must work too (it is the one that is optimised)
            else:
                traced = _inductor(module, example_x, beta)  # runs forward and backward once
    except Exception as e:  # anything a static trace, or the compiler, cannot express
        first = (str(e).splitlines() or [""])[0]
        what = "tracing" if backend == "jit" else "torch.compile"
        return None, f"{what} failed ({type(e).__name__}: {first[:120]})"
    return CompiledLoss(traced, example_x.device, backend), None


def _standard_normal_as_eager(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device).normal_()


@contextlib.contextmanager
def _eager_noise():
    """``Normal.rsample``'s noise, traced as eager PyTorch draws it: ``torch.distributions`` switches to
    ``torch.normal(zeros, ones)`` under ``torch.jit`` (an old JIT workaround), which draws other numbers."""
    with mock.patch.object(torch.distributions.normal, "_standard_normal", _standard_normal_as_eager):
        yield


@contextlib.contextmanager
def _loss_values_unread():
    """Pyro's particle losses read the (non-differentiable) ELBO value with ``torch_item``, which
    ``make_fx`` cannot record; :class:`SurrogateLossModule` discards that value, so during tracing it reads 0."""
    with mock.patch.object(pyro.infer.trace_elbo, "torch_item", lambda value: 0.0), \
            mock.patch.object(pyro.infer.trace_mean_field_elbo, "torch_item", lambda value: 0.0):
        yield


def _inductor(module: SurrogateLossModule, example_x: torch.Tensor, beta: torch.Tensor):
    """``(x, beta) -> loss``: the ELBO recorded as ATen operations, compiled by TorchInductor.

    Parameters and buffers are inputs of the graph (not constants), so optimizer updates and
    ``load_state_dict`` reach it; the returned function passes the module's own tensors.
    """
    names, tensors = zip(*chain(module.named_parameters(), module.named_buffers()))

    def loss(x, beta, *state):
        return torch.func.functional_call(module, dict(zip(names, state)), (x, beta))

    with _loss_values_unread():
        graph = record(loss, example_x, beta, *tensors)  # refuses a shape that the data decides
    # fullgraph: one graph, so forward and backward are one compiled function each, or an error here.
    compiled = compile_graph(graph)
    shape = tuple(example_x.shape)

    def call(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != shape:
            raise ValueError(f"the compiled loss was traced for minibatches of shape {shape}, got "
                             f"{tuple(x.shape)}; use fast_path = \"jit\" for minibatches of varying size")
        return compiled(x, beta, *tensors)

    with quiet_compiler():  # compile now, the backward too, so that a failure falls back here and not mid-run
        trainable = [t for t in tensors if t.requires_grad]
        torch.autograd.grad(call(example_x, beta), trainable, allow_unused=True)  # leaves .grad alone
    return call
