"""One training step, four ways: eager Pyro, the JIT trace, the compiled graph, and a CUDA graph.

Every step has the same call, ``step(idx, beta) -> (loss, finite)``: the
gradient of the estimator's minibatch bound on the training rows ``idx`` (M,)
(which the data plate scales by N/M), gradient clipping, and the optimizer's
update. ``loss`` (the -ELBO estimate) and ``finite`` (loss and gradient norm
finite) are 0-d tensors left on the device; the loop does not read them at
every step. A step built with ``skip_nonfinite`` looks at ``finite`` on the
host before updating and leaves the parameters alone when it is False, so that
the loop's NaN guard can stop or skip; otherwise the update is applied and the
guard finds out later (the deferred checks of ``sync_every``).

:func:`choose_step` picks the step for a run and says in ``fast_path`` which
one it is and, where it fell back, why.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..infer.registry import backward
from .cuda_graphs import CapturedStep, capture_plan
from .guard import diagnose_nonfinite
from .distributed import every_rank, wrap
from .setup import LossModule, Run
from .tracing import JIT_ESTIMATORS, choose_backend, compile_loss


class EagerStep:
    """The estimator's own ``differentiable_loss`` / ``loss_and_grads`` through eager Pyro."""

    def __init__(self, run: Run, skip_nonfinite: bool, fast_path: str):
        self.run = run
        self.skip_nonfinite = skip_nonfinite
        self.fast_path = fast_path
        self.max_norm = run.recipe.grad_clip if run.recipe.grad_clip > 0 else float("inf")
        self.last_x = None  # the last minibatch (M, D), for the NaN guard's diagnosis
        self.on_change = None  # unused: an eager step never changes its path
        # under torchrun: the loss inside DistributedDataParallel, whose backward averages the ranks' gradients
        self.ddp = wrap(self.loss_module(), run.world) if run.world.distributed else None

    def loss_module(self) -> torch.nn.Module:
        return LossModule(self.run)

    def ddp_loss(self, x: torch.Tensor, idx: torch.Tensor, beta: float) -> torch.Tensor:
        return self.ddp(x, beta, idx)

    def loss_and_grad(self, x: torch.Tensor, idx: torch.Tensor, beta: float) -> torch.Tensor:
        run = self.run
        try:
            if self.ddp is not None:
                loss = self.ddp_loss(x, idx, beta)
                loss.backward()
                return loss.detach()
            return backward(run.estimator, *run.vae.local_pair(), x, **run.loss_kwargs(idx, beta))
        except ValueError:  # Pyro's validation refusing a NaN distribution parameter
            if diagnose_nonfinite(run.vae, x, run.params) is None:
                raise  # not a non-finite value: a genuine bug, show it
            return torch.tensor(float("nan"), device=run.device)

    def __call__(self, idx: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.last_x = self.run.data.minibatch(idx)  # (M, D)
        self.run.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_and_grad(x, idx, beta)
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.run.params.values()), self.max_norm)
        finite = every_rank(torch.isfinite(loss) & torch.isfinite(grad_norm))  # the same decision on every rank
        if not (self.skip_nonfinite and not finite):  # with skip_nonfinite: one host read per step
            self.run.optimizer.step()
        return loss, finite


class TracedStep(EagerStep):
    """The ELBO traced once (``torch.jit`` or ``torch.compile``) and replayed: no Pyro Python per step."""

    def __init__(self, run: Run, compiled, skip_nonfinite: bool, fast_path: str):
        self.compiled = compiled
        super().__init__(run, skip_nonfinite, fast_path)

    def loss_module(self) -> torch.nn.Module:
        return _TracedLoss(self.run.vae, self.compiled)

    def ddp_loss(self, x: torch.Tensor, idx: torch.Tensor, beta: float) -> torch.Tensor:
        return self.ddp(x, beta)

    def loss_and_grad(self, x: torch.Tensor, idx: torch.Tensor, beta: float) -> torch.Tensor:
        loss = self.compiled(x, beta) if self.ddp is None else self.ddp_loss(x, idx, beta)
        loss.backward()
        return loss.detach()


class _TracedLoss(torch.nn.Module):
    """The traced loss as a module over the VAE's parameters, for ``DistributedDataParallel`` to wrap."""

    def __init__(self, vae, compiled):
        super().__init__()
        self.vae = vae
        self.compiled = compiled

    def forward(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        return self.compiled(x, beta)


class GraphStep:
    """The whole step as one CUDA graph (:class:`pyro_aevb.training.cuda_graphs.CapturedStep`).

    If capture fails, the same body runs uncaptured; ``fast_path`` then says why, and ``on_change``
    (set by the loop) is told once.
    """

    skip_nonfinite = False

    def __init__(self, run: Run, compiled):
        self.run = run
        self.captured = CapturedStep(compiled.traced, run.params.values(), run.optimizer, run.data.train,
                                     run.recipe.batch_size, run.data.dynamic_binarization, run.recipe.grad_clip)
        self.fast_path = "cuda-graph"
        self.last_x = None  # never materialised on the host side of a graph
        self.on_change = None

    def __call__(self, idx: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        loss, finite = self.captured(idx, beta)
        if self.captured.failure is not None and self.fast_path == "cuda-graph":
            self.fast_path = f"jit: {self.captured.failure}"
            if self.on_change is not None:
                self.on_change(self.fast_path, f"notice: {self.captured.failure}; training continues without the graph")
        return loss, finite


def choose_step(run: Run, skip_nonfinite: bool, total_steps: int, progress: bool = False):
    """The fastest step that applies to ``run``: a CUDA graph, the compiled or JIT-traced ELBO, or eager
    Pyro; each fallback is recorded in the step's ``fast_path``."""
    recipe, device = run.recipe, run.device
    backend = choose_backend(recipe.fast_path, device, total_steps)
    if backend is None:
        return EagerStep(run, skip_nonfinite, 'off (fast_path = "off")')
    # On the CPU the traced ELBO skips Pyro's Python; on CUDA it is also what makes the step capturable,
    # since eager Pyro reads loss values back to the host (torch_item).
    example = run.data.train[: run.local_batch_size].clone()  # (M, D): the inductor graph is specialised to it
    if run.data.dynamic_binarization:
        example = example.round()  # binary, like the minibatches, without drawing from the run's RNG
    if backend == "inductor" and progress and recipe.estimator in JIT_ESTIMATORS:
        tqdm.write("compiling the ELBO with torch.compile: seconds to tens of seconds, faster once cached")
    compiled, reason = compile_loss(recipe.estimator, run.vae, run.estimator, example, run.num_data, backend)
    fast_path = backend
    if compiled is None and backend == "inductor":  # an estimator outside JIT_ESTIMATORS fails here alike
        compiled, jit_reason = compile_loss(recipe.estimator, run.vae, run.estimator, example, run.num_data, "jit")
        fast_path, reason = (f"jit: {reason}", reason) if compiled is not None else (None, jit_reason)
        if progress and compiled is not None:
            tqdm.write(f"notice: {reason}; training uses the JIT trace")
    if compiled is None:
        return EagerStep(run, skip_nonfinite, f"eager Pyro: {reason}")
    no_capture = capture_plan(recipe, recipe.estimator, device)
    if no_capture is None:
        return GraphStep(run, compiled)
    if device.type == "cuda":
        fast_path = f"jit, no CUDA graph: {no_capture}"
    return TracedStep(run, compiled, skip_nonfinite, fast_path)
