"""Building a run: the device, the data on it, the seeded VAE, the estimator and the optimizer.

``train``, ``compare`` and ``grad-variance`` all start a model the same way,
through :func:`initial_vae`, so that the same recipe and seed give the same
initial parameters everywhere; :func:`build_run` adds what training needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import pyro

from ..config import Recipe
from ..data import Dataset, binarize, load_dataset
from ..errors import ConfigError, DataError, TrainingError
from ..generative.registry import build_model
from ..generative.vae import VAE
from ..infer.registry import estimator_parameters, kl_status, make_estimator
from .cuda_graphs import capture_plan
from .distributed import World, device_for, seed_rank_streams, world
from .schedule import milestone_steps


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available here; use --device cpu")
    return torch.device(name)


@dataclass
class TrainingData:
    """The data of a run, resident on the run's device."""

    dataset: Dataset
    train: torch.Tensor  # (N, D), grey or binary
    train_eval: torch.Tensor  # (n_eval, D), fixed (binarized once if dynamic)
    test: torch.Tensor  # (N_test, D), fixed (binarized once if dynamic)
    dynamic_binarization: bool  # draw fresh binary images from grey-scale pixels at each minibatch
    valid: torch.Tensor | None = None  # (N_valid, D), fixed, or None without a validation split

    @property
    def num_data(self) -> int:
        return self.train.shape[0]

    def minibatch(self, idx: torch.Tensor) -> torch.Tensor:
        """The training rows ``idx`` (M,), binarized afresh when binarization is dynamic: (M, D)."""
        x = self.train[idx]
        return binarize(x) if self.dynamic_binarization else x


def prepare_data(recipe: Recipe, device: torch.device, dataset: Dataset | None = None) -> TrainingData:
    """Load the data set, check it suits the likelihood, and move it to ``device`` once."""
    dataset = dataset or load_dataset(recipe.dataset, recipe.data_dir or None)
    for split, x in (("train", dataset.train), ("test", dataset.test)):
        if not torch.isfinite(x).all():
            raise DataError(f"data set '{dataset.name}' ({split}) contains NaN or Inf values")
        if x.min() < 0 or x.max() > 1:
            raise DataError(f"data set '{dataset.name}' ({split}) has values outside [0, 1]; rescale it")
    dynamic = recipe.likelihood == "bernoulli" and not dataset.binary
    train, valid = validation_split(dataset, recipe.validation_size)
    # A fixed generator: the evaluation sets are the same binary images at every evaluation.
    gen = torch.Generator().manual_seed(recipe.seed + 12345)
    fixed = (lambda x: torch.bernoulli(x, generator=gen)) if dynamic else (lambda x: x)
    train_eval = fixed(train[: recipe.eval_train_size])
    test = fixed(dataset.test)
    valid = fixed(valid).to(device) if valid is not None else None
    return TrainingData(dataset, train.to(device), train_eval.to(device), test.to(device), dynamic, valid)


def validation_split(dataset: Dataset, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training rows, validation rows): the data set's own validation split's first ``size`` rows, else the
    last ``size`` training rows, held out of training; ``size = 0``: all training rows and no validation."""
    if size == 0:
        return dataset.train, None
    if dataset.valid is not None:
        if size > dataset.valid.shape[0]:
            raise ConfigError(f"validation_size {size} is larger than {dataset.name}'s validation split "
                              f"({dataset.valid.shape[0]}); lower validation_size")
        return dataset.train, dataset.valid[:size]
    if size >= dataset.train.shape[0]:
        raise ConfigError(f"validation_size {size} would hold out all of {dataset.name}'s {dataset.train.shape[0]} "
                          "training points; lower validation_size")
    return dataset.train[:-size], dataset.train[-size:]


def make_optimizer(recipe: Recipe, params, capturable: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimizer. ``capturable``: one whose step runs inside a CUDA graph (no ``.item()``):
    the fused Adagrad kernel keeps its step count on the device; Adam has ``capturable=True``.

    Adagrad is the fused kernel where this torch has one: one pass over each parameter instead of
    five element-wise ops (BENCHMARKS.md)."""
    params = list(params)
    if recipe.optimizer == "adagrad":
        try:
            return torch.optim.Adagrad(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True)
        except (TypeError, RuntimeError, ValueError):  # torch < 2.4 (CPU) or < 2.8 (CUDA) has no fused Adagrad
            return torch.optim.Adagrad(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    on_gpu = any(p.is_cuda for p in params)  # Adam's capturable mode exists for accelerators only
    extra = {"capturable": True, "foreach": True} if capturable and on_gpu else {}
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay, **extra)


def initial_vae(recipe: Recipe, data_dim: int, train: torch.Tensor) -> VAE:
    """The VAE a run starts from: seeded by ``recipe.seed``, built, moved to ``train``'s device, and its
    prior initialised from the training data ``train`` (N, D) where it has that hook (the VampPrior)."""
    pyro.set_rng_seed(recipe.seed)  # torch, numpy and random
    vae = build_model(recipe, data_dim).to(train.device)
    if hasattr(getattr(vae, "prior", None), "initialize_from_data"):  # VampPrior's pseudo-inputs from images
        vae.prior.initialize_from_data(train)
    return vae


@dataclass
class Run:
    """Everything a training run computes with; built once by :func:`build_run`."""

    recipe: Recipe
    device: torch.device
    data: TrainingData
    vae: VAE
    estimator: object  # an object with Pyro's ELBO interface (pyro_aevb.infer.registry)
    params: dict[str, torch.nn.Parameter]  # every trainable tensor, the estimator's own included
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # the recipe's step schedule (constant without milestones)
    kl: str  # "analytic" or "monte-carlo": what estimator B really computes (kl_status)
    world: World = World()  # this process's rank among the run's processes (one, without torchrun)

    @property
    def num_data(self) -> int:
        return self.data.num_data

    @property
    def local_batch_size(self) -> int:
        """The rows of a minibatch this process computes: M, or M/W of it under torchrun."""
        return self.recipe.batch_size // self.world.size

    def loss_kwargs(self, idx: torch.Tensor, beta: float) -> dict:
        """The keywords of one loss evaluation on the rows ``idx``: N, beta, and the rows themselves
        for an estimator with per-datapoint state (``needs_indices``, e.g. MCEM's chains)."""
        extra = {"indices": idx} if getattr(self.estimator, "needs_indices", False) else {}
        return {"num_data": self.num_data, "beta": beta, **extra}


def build_run(recipe: Recipe, dataset: Dataset | None = None, initial_state: dict | None = None) -> Run:
    """The data, VAE, estimator and optimizer of ``recipe``, checked: nothing is written yet.

    ``initial_state`` (a VAE ``state_dict``) replaces the seeded initial parameters, e.g. in ``compare``,
    where every estimator starts from the same point. Where the step will be a CUDA graph, the
    optimizer is a capturable one.
    """
    w = world()
    device = device_for(resolve_device(recipe.device).type, w)
    if device.type == "cuda" and recipe.fast_path == "compile":
        raise ConfigError('fast_path = "compile" is for the CPU; on CUDA use "auto", which captures the step '
                          "as a CUDA graph")
    pyro.set_rng_seed(recipe.seed)  # before the data: dataset loaders may draw
    data = prepare_data(recipe, device, dataset)
    vae = initial_vae(recipe, data.dataset.dim, data.train)
    if initial_state is not None:
        vae.load_state_dict(initial_state)
    nesting = getattr(vae, "max_plate_nesting", 1)  # the diffusion's time plate is a second one, at dim -3
    extra = {"max_plate_nesting": nesting} if recipe.estimator in ("sgvb-a", "sgvb-b") and nesting > 1 else {}
    estimator = make_estimator(recipe.estimator, recipe.num_particles, **recipe.estimator_options, **extra)
    if w.distributed:
        check_distributed(recipe, estimator, w)
        seed_rank_streams(recipe.seed, w)  # the parameters are the same on every rank; the noise is not
    if isinstance(estimator, torch.nn.Module):
        estimator.to(device)
    params = dict(vae.named_parameters())
    params.update({f"estimator.{i}": p for i, p in enumerate(estimator_parameters(estimator))})
    capturable = capture_plan(recipe, recipe.estimator, device) is None  # the step becomes one CUDA graph
    optimizer = make_optimizer(recipe, list(params.values()), capturable=capturable)
    if recipe.batch_size > data.num_data:
        raise ConfigError(f"batch_size {recipe.batch_size} is larger than the training set ({data.num_data}); "
                          "lower batch_size")
    bad = [name for name, p in params.items() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"parameter '{bad[0]}' is non-finite before training; check the initial state")
    kl = kl_status(*vae.local_pair(), data.train_eval[: recipe.batch_size])
    return Run(recipe, device, data, vae, estimator, params, optimizer, make_scheduler(recipe, optimizer), kl, w)


def check_distributed(recipe: Recipe, estimator, w: World) -> None:
    """What data-parallel training needs: M divisible by W, and an estimator that is one differentiable loss
    with no per-datapoint state of its own (DistributedDataParallel averages the gradients of that loss)."""
    if recipe.batch_size % w.size:
        raise ConfigError(f"batch_size {recipe.batch_size} is not divisible by the {w.size} processes; make "
                          f"batch_size a multiple of {w.size}, or change --nproc_per_node")
    if not hasattr(estimator, "differentiable_loss") or getattr(estimator, "needs_indices", False):
        raise ConfigError(f"estimator '{recipe.estimator}' cannot train data-parallel (it updates through its own "
                          "loss_and_grads or keeps per-datapoint state on each process); train it in one process")


class LossModule(torch.nn.Module):
    """``(x, beta, idx) ->`` the estimator's differentiable loss on the rows x of the training set (M/W of them
    on a rank): the module ``DistributedDataParallel`` wraps, as Pyro's ``ELBOModule`` is in its Lightning example."""

    def __init__(self, run: "Run"):
        super().__init__()
        self.vae = run.vae
        self.run = (run,)  # a reference, not a submodule

    def forward(self, x: torch.Tensor, beta: float, idx: torch.Tensor) -> torch.Tensor:
        run = self.run[0]
        return run.estimator.differentiable_loss(*self.vae.local_pair(), x, **run.loss_kwargs(idx, beta))


def make_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.MultiStepLR:
    """lr times ``lr_gamma`` at each of ``lr_milestones`` (training samples, here turned into steps of M):
    ``MultiStepLR``, stepped once per training step, its state in the checkpoint."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestone_steps(recipe), gamma=recipe.lr_gamma)
