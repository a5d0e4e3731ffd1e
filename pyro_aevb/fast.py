"""The fast training path: Pyro's ELBO traced once with the PyTorch JIT, then replayed.

Every eager step of ``Trace_ELBO`` re-runs Pyro's tracing machinery in Python
(messengers, trace graphs, site bookkeeping), which costs as much as the
arithmetic of a small network. Like Pyro's own ``JitTrace_ELBO``, we record the
operations of one ``differentiable_loss`` call with ``torch.jit.trace`` and
replay them: the Pyro model/guide stay the single source of truth, and the
replayed graph draws fresh noise (``aten::normal``) at every call.

Unlike ``JitTrace_ELBO`` it wraps the VAE as an ``nn.Module``, so parameters
are module parameters (no param-store round trip), and beta is a tensor input
(a KL warm-up does not force a re-trace at each step). On CUDA the traced graph
is what :mod:`pyro_aevb.cuda_graphs` records into a CUDA graph: its replay reads
nothing back to the host, whereas eager Pyro calls ``torch_item`` on the loss.

.. warning:: A traced graph has static structure. Priors or guides whose
   control flow depends on values, and estimators that are not plain
   reparameterized ELBOs, cannot use it: :func:`compile_loss` then returns
   ``None`` with the reason, and training falls back to eager Pyro.
"""

from __future__ import annotations

import warnings

import torch

import pyro

#: estimators whose loss is one reparameterized, static graph
JIT_ESTIMATORS = ("sgvb-a", "sgvb-b")


class ELBOModule(torch.nn.Module):
    """``x, beta -> estimator.differentiable_loss(model, guide, x, num_data=N, beta=beta)``."""

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
        for model_trace, guide_trace in est._get_traces(self.vae.model, self.vae.guide, (x,), kwargs):
            _, surrogate = est._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + surrogate / est.num_particles
        return loss


class CompiledLoss:
    """A traced loss: ``compiled(x, beta) -> loss`` (a 0-d tensor that backpropagates to the VAE)."""

    def __init__(self, traced, device: torch.device):
        self.traced = traced
        self.device = device
        self._betas: dict[float, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        if beta not in self._betas:  # one small tensor per distinct beta, reused
            if len(self._betas) > 64:
                self._betas.clear()
            self._betas[beta] = torch.tensor(float(beta), device=self.device)
        return self.traced(x, self._betas[beta])


def compile_loss(name: str, vae, estimator, example_x: torch.Tensor, num_data: int):
    """Trace the loss of estimator ``name`` once; returns ``(CompiledLoss, None)`` or ``(None, reason)``."""
    if name not in JIT_ESTIMATORS:
        return None, f"estimator '{name}' is not a plain reparameterized ELBO"
    module = ELBOModule(vae, estimator, num_data)
    beta = torch.tensor(1.0, device=example_x.device)
    # tracing draws noise: leave the run's random stream as it was
    devices = [example_x.device] if example_x.is_cuda else []
    try:
        with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python values becoming constants
            traced = torch.jit.trace(module, (example_x, beta), check_trace=False)
            traced(example_x, beta)  # a second call must work too (it is the one that is optimised)
    except Exception as e:  # anything a static trace cannot express
        first = (str(e).splitlines() or [""])[0]
        return None, f"tracing failed ({type(e).__name__}: {first[:120]})"
    return CompiledLoss(traced, example_x.device), None
