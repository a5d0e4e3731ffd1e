r"""The GPU training path: one whole AEVB step recorded as a CUDA graph, then replayed.

On a GPU the paper's 784-500-20 network at M = 100 costs microseconds of
arithmetic per step, and the step's time goes to Python: Pyro's tracing, about
60 small kernel launches, and host synchronisations. A CUDA graph
(``torch.cuda.CUDAGraph``, see "CUDA Graphs" in PyTorch's CUDA semantics
notes) records the kernels of one step once and replays them with a single
launch, so none of that Python runs again. Recorded here, per step:

1. the minibatch: ``x = train[idx]`` from the device-resident data, binarized
   afresh (``torch.bernoulli``) for grey-scale data with a Bernoulli decoder;
2. the loss: the Pyro model/guide's ELBO as traced once by
   :func:`pyro_aevb.training.tracing.compile_loss` (the surrogate-loss sum of ``Trace_ELBO``
   / ``TraceMeanField_ELBO``; eager Pyro would read loss values back to the
   host with ``torch_item``, which a capture forbids), its backward pass and
   gradient clipping;
3. a finiteness flag ``isfinite(loss) & isfinite(|grad|)``;
4. the update, by a capturable optimizer: ``Adagrad(fused=True)`` (its step
   count lives on the device) or ``Adam(capturable=True)``.

The inputs of the graph are static buffers (``idx``, ``beta``) that the loop
fills before each replay; the outputs (``loss``, ``finite``) are static
tensors overwritten by each replay. Noise comes from the CUDA generator's
graph-safe Philox stream, so every replay draws fresh noise.

The update is applied whatever the flag says (a branch would need the host),
so the loop reads the flags back every ``sync_every`` steps and always before
it evaluates or writes a checkpoint: a non-finite step stops the run, and the
checkpoint on disk is the last one known to be finite. ``on_nan = "skip"``
needs a decision before each update and therefore does not use this path.

As PyTorch requires, the first :data:`WARMUP_STEPS` steps run eagerly on a
side stream before capture (they are ordinary training steps of the run).
Where capture is impossible (:func:`capture_plan`) or fails, the step says why
(:attr:`CapturedStep.status`) and training goes on uncaptured.
"""

from __future__ import annotations

import torch

from ..data import binarize
from .distributed import world
from .tracing import JIT_ESTIMATORS

#: eager steps on a side stream before capture (PyTorch's advice: let lazy state and the allocator settle)
WARMUP_STEPS = 3


class CapturedStep:
    """``step(idx, beta)``: one full training step on the minibatch ``train[idx]``; returns ``(loss, finite)``.

    :param loss_module: ``(x, beta) -> loss`` (a 0-d tensor; beta a 0-d tensor), e.g. the ``traced`` module
        of :func:`pyro_aevb.training.tracing.compile_loss`.
    :param params: every trainable tensor (for clipping and the finiteness check).
    :param optimizer: capturable on CUDA (see :func:`pyro_aevb.training.setup.make_optimizer`).
    :param train: (N, D) training data, resident on the device.
    :param batch_size: M.
    :param binarize: draw x ~ Bernoulli(train[idx]) at each step.
    :param grad_clip: maximal gradient norm (0: none).

    After a failed capture (always, on a CPU) the very same body runs eagerly, which is what the CPU
    tests check against the ordinary loop.
    """

    def __init__(self, loss_module, params, optimizer, train: torch.Tensor, batch_size: int,
                 binarize: bool, grad_clip: float):
        self.loss_module = loss_module
        self.params = list(params)
        self.optimizer = optimizer
        self.train = train
        self.binarize = binarize
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")
        self.capture = True  # False once a capture has failed
        device = train.device
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=device)  # static input (M,)
        self.beta = torch.ones((), dtype=train.dtype, device=device)  # static input
        self._beta = 1.0
        self.graph = None
        self.loss = self.finite = None  # static outputs once captured
        self._eager_steps = 0
        self.failure: str | None = None

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.train[self.idx]  # (M, D)
        if self.binarize:
            x = binarize(x)
        loss = self.loss_module(x, self.beta)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        self.optimizer.step()
        return loss.detach(), finite

    def _eager(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        return self._body()

    def _record(self) -> None:
        """Capture the body; after it, gradients live in the graph's memory pool and are written by replay."""
        if not self.train.is_cuda:  # CPU kernels would run once during capture and never on replay
            raise RuntimeError("CUDA graphs need the data and parameters on a CUDA device")
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.loss, self.finite = self._body()
        self.graph = graph

    def __call__(self, idx: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        self.idx.copy_(idx, non_blocking=True)
        if beta != self._beta:  # a launch only when it changes (KL warm-up)
            self.beta.fill_(beta)
            self._beta = beta
        if self.graph is not None:
            self.graph.replay()
            return self.loss, self.finite
        if not self.capture:
            return self._eager()
        if self.train.is_cuda:  # warm-up steps run on a side stream, as torch.cuda.graphs requires
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._eager()
            torch.cuda.current_stream().wait_stream(side)
        else:
            out = self._eager()
        self._eager_steps += 1
        if self._eager_steps == WARMUP_STEPS:
            try:
                self._record()
            except RuntimeError as e:  # an operation that cannot be captured: stay eager, say why
                self.capture, self.graph = False, None
                self.optimizer.zero_grad(set_to_none=True)
                first = (str(e).splitlines() or [""])[0]
                self.failure = f"CUDA graph capture failed ({type(e).__name__}: {first[:120]})"
        return out

    @property
    def status(self) -> str:
        """What this step is now: "cuda-graph", "cuda-graph (warming up)" or the reason it runs eagerly."""
        if self.graph is not None:
            return "cuda-graph"
        if self.capture:
            return "cuda-graph (warming up)"
        return self.failure or "eager"


def capture_plan(recipe, estimator_name: str, device: torch.device) -> str | None:
    """None if a run can use :class:`CapturedStep` with capture, else the reason it cannot."""
    if device.type != "cuda":
        return "CUDA graphs need device = \"cuda\""
    if recipe.fast_path != "auto":
        return f"fast_path = \"{recipe.fast_path}\""
    if estimator_name not in JIT_ESTIMATORS:
        return f"estimator '{estimator_name}' is not a plain reparameterized ELBO"
    if recipe.on_nan == "skip":
        return "on_nan = \"skip\" decides on the host before each update"
    if recipe.lr_milestones:
        return "an lr schedule (lr_milestones) changes lr, which a captured optimizer step would keep fixed"
    if world().distributed:
        return "data-parallel training: the gradient all-reduce is not captured in a CUDA graph here"
    return None
