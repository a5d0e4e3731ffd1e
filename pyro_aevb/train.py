r"""The AEVB algorithm (Kingma & Welling 2013, Algorithm 1) as one training loop.

Repeat until the budget of training samples is spent:

1. draw a minibatch of M datapoints (an index draw on the device; grey-scale
   data for a Bernoulli decoder is binarized afresh at every draw);
2. draw noise and take the gradient of the estimator's minibatch bound, which
   Pyro's ``pyro.plate(size=N)`` scales by N/M to the full data set;
3. update (theta, phi) with Adagrad or Adam. Weight decay lambda adds
   lambda/2 ||theta, phi||^2 to the full-data loss, so lambda = 1 is the
   paper's N(0, I) prior on the parameters (a MAP estimate).

Every ``eval_every`` training samples it evaluates the average bound per
datapoint on a fixed training subset and the test split (estimator B where the
KL is analytic), appends a row to ``metrics.jsonl``, and every
``checkpoint_every`` samples writes ``checkpoint.pt``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

import pyro
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from . import __version__
from .checkpoint import atomic_write, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Recipe, recipe_diff
from .data import Dataset, binarize, load_dataset
from .errors import CheckpointError, ConfigError, DataError, Interrupted, TrainingError
from .estimators import backward, estimator_parameters, kl_status, make_estimator
from .evaluation import average_bound
from .cpu_allocator import tune_cpu_allocator
from .cuda_graphs import CapturedStep, capture_plan
from .fast import JIT_ESTIMATORS, choose_backend, compile_loss
from .plots import manifold_images, plot_bound, save_grid
from .vae import VAE, build_vae


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
    binarize: bool  # draw fresh binary images from grey-scale pixels at each minibatch

    @property
    def num_data(self) -> int:
        return self.train.shape[0]


def prepare_data(recipe: Recipe, device: torch.device, dataset: Dataset | None = None) -> TrainingData:
    """Load the data set, check it suits the likelihood, and move it to ``device`` once."""
    dataset = dataset or load_dataset(recipe.dataset, recipe.data_dir or None)
    for split, x in (("train", dataset.train), ("test", dataset.test)):
        if not torch.isfinite(x).all():
            raise DataError(f"data set '{dataset.name}' ({split}) contains NaN or Inf values")
        if x.min() < 0 or x.max() > 1:
            raise DataError(f"data set '{dataset.name}' ({split}) has values outside [0, 1]; rescale it")
    binarize = recipe.likelihood == "bernoulli" and not dataset.binary
    # A fixed generator: the evaluation sets are the same binary images at every evaluation.
    gen = torch.Generator().manual_seed(recipe.seed + 12345)
    fixed = (lambda x: torch.bernoulli(x, generator=gen)) if binarize else (lambda x: x)
    train_eval = fixed(dataset.train[: recipe.eval_train_size])
    test = fixed(dataset.test)
    return TrainingData(dataset, dataset.train.to(device), train_eval.to(device), test.to(device), binarize)


def kl_warmup_beta(recipe: Recipe, samples: int) -> float:
    """beta for the step that ends at ``samples`` training samples: rising linearly to ``recipe.beta``
    over ``kl_warmup`` samples (never 0: Pyro's ``poutine.scale`` needs a positive scale)."""
    if recipe.kl_warmup <= 0:
        return recipe.beta
    return recipe.beta * min(1.0, samples / recipe.kl_warmup)


def make_optimizer(recipe: Recipe, params, capturable: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimizer. ``capturable``: one whose step runs inside a CUDA graph (no ``.item()``):
    the fused Adagrad kernel keeps its step count on the device; Adam has ``capturable=True``.

    Adagrad is the fused kernel where this torch has one: one pass over each parameter instead of five element-wise ops,
    0.23 against 0.55 ms per step for the paper's network on 2 CPU cores (BENCHMARKS.md)."""
    params = list(params)
    if recipe.optimizer == "adagrad":
        try:
            return torch.optim.Adagrad(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True)
        except (TypeError, RuntimeError, ValueError):  # torch < 2.4 (CPU) or < 2.8 (CUDA) has no fused Adagrad
            return torch.optim.Adagrad(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    on_gpu = any(p.is_cuda for p in params)  # Adam's capturable mode exists for accelerators only
    extra = {"capturable": True, "foreach": True} if capturable and on_gpu else {}
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay, **extra)


def evaluate(vae: VAE, data: TrainingData, recipe: Recipe, kl: str) -> dict:
    """Average bound per datapoint (with its standard error) on the train subset and the test split."""
    analytic = kl == "analytic"
    train = average_bound(vae.model, vae.guide, data.train_eval, recipe.eval_particles, analytic)
    test = average_bound(vae.model, vae.guide, data.test, recipe.eval_particles, analytic)
    return {
        "train_elbo": train.mean,
        "train_elbo_se": train.se,
        "test_elbo": test.mean,
        "test_elbo_se": test.se,
    }


def versions() -> dict[str, str]:
    import numpy

    return {
        "pyro_aevb": __version__,
        "pyro": pyro.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def prepare_run_dir(out_dir: Path, overwrite: bool) -> Path:
    """Create the run directory. An existing one is never deleted: ``overwrite`` moves it aside."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory; choose another --out")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"run directory {out_dir} already exists; choose another --out, "
                              "continue it with --resume, or pass --overwrite (the old one is kept as DIR.old-*)")
        backup = out_dir.with_name(f"{out_dir.name}.old-{datetime.now():%Y%m%d-%H%M%S-%f}")
        out_dir.rename(backup)
        tqdm.write(f"notice: moved the existing {out_dir} to {backup}")
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    return out_dir


@dataclass
class TrainResult:
    vae: VAE
    run_dir: Path
    metrics: list[dict] = field(default_factory=list)
    run_info: dict = field(default_factory=dict)


class _StopSignals:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and stops cleanly."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _kill_hook(step: int) -> None:
    """Test hooks: ``PYRO_AEVB_TEST_KILL_AT_STEP=n`` SIGKILLs this process after step n's update;
    ``PYRO_AEVB_TEST_SIGNAL_AT_STEP=n:SIGTERM`` sends it that signal there."""
    if os.environ.get("PYRO_AEVB_TEST_KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    at, _, name = os.environ.get("PYRO_AEVB_TEST_SIGNAL_AT_STEP", "").partition(":")
    if at == str(step):
        os.kill(os.getpid(), getattr(signal, name or "SIGINT"))


def diagnose_nonfinite(vae: VAE, x: torch.Tensor, params: dict[str, torch.Tensor]) -> str | None:
    """Name what went non-finite: a parameter, a gradient, or a site's log-probability on this batch.

    Returns None if nothing is non-finite.
    """
    for name, p in params.items():
        if not torch.isfinite(p).all():
            return f"parameter '{name}' is non-finite"
    culprit = None
    for name, p in params.items():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            culprit = f"the gradient of parameter '{name}' is non-finite"
            break
    with torch.no_grad(), pyro.validation_enabled(False):
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
        for trace, which in ((guide_trace, "guide"), (model_trace, "model")):
            for name, site in trace.nodes.items():
                if site["type"] == "sample" and not site_is_subsample(site):
                    if not torch.isfinite(site["fn"].log_prob(site["value"])).all():
                        site_msg = f"the {which} site '{name}' has a non-finite log-probability"
                        return f"{culprit}; {site_msg}" if culprit else site_msg
    return culprit


def train(
    recipe: Recipe,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    dataset: Dataset | None = None,
    initial_state: dict | None = None,
    resume: bool = False,
    force: bool = False,
) -> TrainResult:
    """Train the VAE of ``recipe`` and write the run directory ``out_dir``. Returns the trained model.

    ``resume=True`` continues the run in ``out_dir`` from its checkpoint, exactly: parameters,
    optimizer, data order and every RNG are restored, and evaluation rows written after the
    checkpoint are dropped and recomputed. A changed recipe is refused unless ``force``.
    """
    started = time.time()
    device = resolve_device(recipe.device)
    if device.type == "cuda" and recipe.fast_path == "compile":
        raise ConfigError('fast_path = "compile" is for the CPU; on CUDA use "auto", which captures the step '
                          "as a CUDA graph")
    allocator = tune_cpu_allocator() if device.type == "cpu" else "the CUDA caching allocator"
    run_dir = Path(out_dir)
    payload = _resume_checkpoint(run_dir, recipe, force) if resume else None
    pyro.set_rng_seed(recipe.seed)  # torch, numpy and random
    data = prepare_data(recipe, device, dataset)
    vae = build_vae(recipe, data.dataset.dim).to(device)
    if hasattr(vae.prior, "initialize_from_data"):  # e.g. VampPrior's pseudo-inputs from training images
        vae.prior.initialize_from_data(data.train)
    if initial_state is not None:  # e.g. `compare`: every estimator starts from the same parameters
        vae.load_state_dict(initial_state)
    estimator = make_estimator(recipe.estimator, recipe.num_particles, **recipe.estimator_options)
    if isinstance(estimator, torch.nn.Module):
        estimator.to(device)
    params = dict(vae.named_parameters())
    params.update({f"estimator.{i}": p for i, p in enumerate(estimator_parameters(estimator))})
    no_capture = capture_plan(recipe, recipe.estimator, device)  # None: the step becomes one CUDA graph
    optimizer = make_optimizer(recipe, list(params.values()), capturable=no_capture is None)
    N, M = data.num_data, recipe.batch_size
    if M > N:
        raise ConfigError(f"batch_size {M} is larger than the training set ({N}); lower batch_size")
    # An estimator with per-datapoint state (e.g. MCEM's persistent Markov chains) sets
    # `needs_indices = True` and gets the minibatch's row indices into the training set.
    extra = (lambda idx: {"indices": idx}) if getattr(estimator, "needs_indices", False) else (lambda idx: {})
    bad = [name for name, p in params.items() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"parameter '{bad[0]}' is non-finite before training; check the initial state")
    kl = kl_status(vae.model, vae.guide, data.train_eval[:M])
    steps_per_epoch = N // M  # an epoch is a permutation of the data, in full minibatches
    total_steps = math.ceil(recipe.max_samples / M)
    compiled, captured, fast_path = None, None, "off (fast_path = \"off\")"
    backend = choose_backend(recipe.fast_path, device, total_steps)
    if backend is not None:
        # The traced ELBO: on the CPU it skips Pyro's Python; on CUDA it is also what makes the step
        # capturable, since eager Pyro reads loss values back to the host (torch_item).
        example = data.train[:M].clone()  # (M, D): the inductor graph is specialised to the minibatch shape
        if data.binarize:
            example = example.round()  # binary, like the minibatches, without drawing from the run's RNG
        if backend == "inductor" and progress and recipe.estimator in JIT_ESTIMATORS:
            tqdm.write("compiling the ELBO with torch.compile: 10-30 s the first time, seconds once cached")
        compiled, reason = compile_loss(recipe.estimator, vae, estimator, example, N, backend=backend)
        fast_path = backend if compiled is not None else f"eager Pyro: {reason}"
        if compiled is None and backend == "inductor":  # an estimator outside JIT_ESTIMATORS fails here alike
            compiled, jit_reason = compile_loss(recipe.estimator, vae, estimator, example, N, backend="jit")
            fast_path = f"jit: {reason}" if compiled is not None else f"eager Pyro: {jit_reason}"
            if progress and compiled is not None:
                tqdm.write(f"notice: {reason}; training uses the JIT trace")
        if compiled is not None and no_capture is None:
            captured = CapturedStep(compiled.traced, params.values(), optimizer, data.train, M, data.binarize,
                                    recipe.grad_clip)
            fast_path = "cuda-graph"
        elif compiled is not None and device.type == "cuda":
            fast_path = f"jit, no CUDA graph: {no_capture}"
    # Host reads: with check_every > 1 updates are applied unchecked, and flags on the device say which
    # step first went non-finite; they are read back every check_every steps and before any evaluation
    # or checkpoint, so that a checkpoint is always finite. on_nan = "skip" must look before each update.
    check_every = recipe.sync_every or (1 if device.type == "cpu" else 50)
    if recipe.on_nan == "skip":
        check_every = 1
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step, -1: none

    start_step, train_seconds, perm, nan_skips = 0, 0.0, None, 0
    if payload is not None:
        vae.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if isinstance(estimator, torch.nn.Module) and "estimator" in payload:
            estimator.load_state_dict(payload["estimator"])
        start_step, train_seconds = payload["step"], payload["train_seconds"]
        perm, nan_skips = payload["perm"].to(device), payload["nan_skips"]
        set_rng_state(payload["rng"])
        run_info = json.loads((run_dir / "run.json").read_text())
        run_info.setdefault("resumed_at_steps", []).append(start_step)
        run_info.setdefault("resumed_fast_paths", []).append(fast_path)  # may differ: max_samples, machine
        metrics = _truncate_metrics(run_dir / "metrics.jsonl", start_step)
    else:
        # Only now, with every input checked, is anything written.
        run_dir = prepare_run_dir(run_dir, overwrite)
        (run_dir / "recipe.toml").write_text(recipe.to_toml())
        run_info = {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "estimator": recipe.estimator,
            "kl": kl,
            "fast_path": fast_path,
            "sync_every": check_every,
            "allocator": allocator,
            "device": str(device),
            "seed": recipe.seed,
            "versions": versions(),
            "machine": machine(device),
            "data": {
                "name": data.dataset.name,
                "source": data.dataset.source,
                "n_train": N,
                "n_test": data.test.shape[0],
                "n_train_eval": data.train_eval.shape[0],
                "dynamic_binarization": data.binarize,
                "load_seconds": round(data.dataset.load_seconds, 3),
            },
        }
        metrics = []
        (run_dir / "metrics.jsonl").write_text("")
    run_info["status"] = "running"
    _write_json(run_dir / "run.json", run_info)
    if recipe.estimator == "sgvb-b" and kl != "analytic":
        tqdm.write(f"notice: KL: Monte Carlo. No analytic KL is registered for prior '{recipe.prior}' against "
                   "the Gaussian guide, so sgvb-b (TraceMeanField_ELBO) uses a Monte Carlo KL term")

    def checkpoint(step: int) -> None:
        save_checkpoint(
            run_dir / "checkpoint.pt",
            model=vae.state_dict(),
            optimizer=optimizer.state_dict(),
            **({"estimator": estimator.state_dict()} if isinstance(estimator, torch.nn.Module) else {}),
            step=step,
            samples=step * M,
            train_seconds=train_seconds + (time.time() - t0 if step > start_step else 0.0),
            perm=perm.cpu() if perm is not None else torch.arange(N),
            nan_skips=nan_skips,
            recipe=recipe.to_dict(),
            image_shape=list(data.dataset.image_shape),
            rng=rng_state(),
        )

    t0, step = time.time(), start_step
    if payload is None:
        checkpoint(0)  # so that a run killed before its first periodic checkpoint still resumes exactly
    metrics_file = open(run_dir / "metrics.jsonl", "a")
    bar = tqdm(total=total_steps * M, initial=start_step * M, unit="sample", unit_scale=True,
               disable=not progress, desc="AEVB")
    running_loss, running_steps = torch.zeros((), device=device), 0

    def fail(at_step: int, where: str, detail: str = "") -> None:
        bar.close()
        metrics_file.close()
        run_info.update(status="failed", nan_skips=nan_skips)
        _write_json(run_dir / "run.json", run_info)
        raise TrainingError(
            f"non-finite loss at step {at_step} (sample {at_step * M:,}){detail}: {where}. "
            f"The last good checkpoint in {run_dir} is untouched; lower lr, set grad_clip, "
            "or set on_nan = \"skip\"")

    def check_deferred(x: torch.Tensor) -> None:
        """Read back the device's flag (one host sync) and stop if some step since the last read went non-finite."""
        bad = int(first_bad)
        if bad >= 0:
            where = diagnose_nonfinite(vae, x, params) or "the loss is non-finite"
            fail(bad, where, f", seen at step {step} (flags are read every {check_every} steps)")

    with _StopSignals() as stop:
        while step < total_steps and stop.received is None:
            # 1. a minibatch: indices into device-resident data
            pos = step % steps_per_epoch
            if pos == 0:
                perm = torch.randperm(N, device=device)
            idx = perm[pos * M : (pos + 1) * M]  # (M,)
            samples_before, samples = step * M, (step + 1) * M
            beta = kl_warmup_beta(recipe, samples)
            if captured is not None:
                # 2.+3. gradient and update, replayed as one CUDA graph once captured
                loss, finite = captured(idx, beta)
                if captured.failure is not None and fast_path == "cuda-graph":
                    fast_path = run_info["fast_path"] = f"jit: {captured.failure}"
                    tqdm.write(f"notice: {captured.failure}; training continues without the graph")
                x = None
            else:
                x = data.train[idx]  # (M, D)
                if data.binarize:
                    x = binarize(x)
                # 2. gradient of the scaled minibatch bound
                optimizer.zero_grad(set_to_none=True)
                try:
                    if compiled is not None:
                        loss = compiled(x, beta)
                        loss.backward()
                        loss = loss.detach()
                    else:
                        loss = backward(estimator, vae.model, vae.guide, x, num_data=N, beta=beta, **extra(idx))
                except ValueError:  # Pyro's validation refusing a NaN distribution parameter
                    if diagnose_nonfinite(vae, x, params) is None:
                        raise  # not a non-finite value: a genuine bug, show it
                    loss = torch.tensor(float("nan"), device=device)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    list(params.values()), recipe.grad_clip if recipe.grad_clip > 0 else float("inf"))
                finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
                if check_every == 1 and not finite:  # one host sync per step
                    where = diagnose_nonfinite(vae, x, params) or "the loss is non-finite"
                    if recipe.on_nan == "skip" and nan_skips < recipe.max_nan_skips:
                        nan_skips += 1  # skip the update; the data and RNG move on as usual
                    else:
                        limit = f" after {nan_skips} skipped steps (max_nan_skips)" if recipe.on_nan == "skip" else ""
                        fail(step + 1, where, limit)
                else:
                    # 3. the update
                    optimizer.step()
            if check_every > 1:
                first_bad = torch.where((first_bad < 0) & ~finite, step + 1, first_bad)
            running_loss += torch.where(finite, loss, 0.0)
            running_steps += 1
            step += 1
            bar.update(M)
            _kill_hook(step)

            do_eval = samples // recipe.eval_every > samples_before // recipe.eval_every or step == total_steps
            do_checkpoint = samples // recipe.checkpoint_every > samples_before // recipe.checkpoint_every or step == total_steps
            if check_every > 1 and (step % check_every == 0 or do_eval or do_checkpoint):
                check_deferred(x if x is not None else data.train[idx])
            if running_steps == 50 or step == total_steps:  # read the loss back every 50 steps
                bar.set_postfix(bound=f"{-running_loss.item() / running_steps / N:.2f}", refresh=False)
                running_loss.zero_()
                running_steps = 0
            if do_eval:
                train_seconds += time.time() - t0
                t_eval = time.time()
                # Evaluation draws its noise on a fork of the random stream, so that how often a run
                # evaluates does not change its training trajectory.
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    bounds = evaluate(vae, data, recipe, kl)
                row = {"step": step, "samples": samples, "epoch": samples / N,
                       "beta": kl_warmup_beta(recipe, samples), **bounds,
                       "nan_skips": nan_skips,
                       "seconds": round(train_seconds, 3), "eval_seconds": round(time.time() - t_eval, 3)}
                metrics.append(row)
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                bar.set_postfix(bound=f"{row['train_elbo']:.2f}", test=f"{row['test_elbo']:.2f}", refresh=True)
                t0 = time.time()
            if do_checkpoint:
                checkpoint(step)
        if stop.received is not None and step < total_steps:
            if check_every > 1:
                check_deferred(data.train[:M])
            checkpoint(step)
    bar.close()
    metrics_file.close()
    train_seconds += time.time() - t0

    if stop.received is not None and step < total_steps:
        run_info.update(status="interrupted", steps=step, samples=step * M, nan_skips=nan_skips)
        _write_json(run_dir / "run.json", run_info)
        raise Interrupted(
            f"stopped by {stop.received} at step {step} ({step * M:,} samples); checkpoint written. "
            f"Continue with: pyro-aevb train --resume {run_dir}", signal_name=stop.received)

    write_figures(vae, data, metrics, run_dir, recipe)
    final = metrics[-1]
    run_info.update(
        status="complete",
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=round(time.time() - started, 3),
        train_seconds=round(train_seconds, 3),
        steps=total_steps,
        samples=total_steps * M,
        nan_skips=nan_skips,
        final={k: final[k] for k in ("train_elbo", "train_elbo_se", "test_elbo", "test_elbo_se")},
    )
    _write_json(run_dir / "run.json", run_info)
    return TrainResult(vae, run_dir, metrics, run_info)


def _resume_checkpoint(run_dir: Path, recipe: Recipe, force: bool) -> dict:
    """The checkpoint to resume from, after checking the recipe is the one it was trained with."""
    if not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(f"cannot resume {run_dir}: it has no checkpoint.pt; start a new run with --out")
    payload = load_checkpoint(run_dir / "checkpoint.pt")
    for key in ("perm", "train_seconds", "nan_skips", "rng", "optimizer"):
        if key not in payload:
            raise CheckpointError(f"{run_dir / 'checkpoint.pt'} lacks '{key}'; it cannot be resumed exactly")
    # The data may move; keys a checkpoint lacks (older versions) had their default values.
    saved = {k: v for k, v in (Recipe().to_dict() | payload["recipe"]).items() if k != "data_dir"}
    changed = recipe_diff(saved, {k: v for k, v in recipe.to_dict().items() if k != "data_dir"})
    if changed and not force:
        raise ConfigError(f"refusing to resume {run_dir} with a changed recipe ({'; '.join(changed)}); "
                          "drop the changes, or pass --force")
    return payload


def _truncate_metrics(path: Path, step: int) -> list[dict]:
    """Keep the evaluation rows up to the checkpoint's step; later rows are recomputed after resume."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    rows = [r for r in rows if r["step"] <= step]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
    return rows


@torch.no_grad()
def write_figures(vae: VAE, data: TrainingData, metrics: list[dict], run_dir: Path, recipe: Recipe) -> None:
    """The bound against samples (Fig. 2), samples, reconstructions and, for Nz = 2, the manifold (Fig. 4)."""
    fig_dir = run_dir / "figures"
    shape = data.dataset.image_shape
    title = f"{data.dataset.name}, $N_z$={recipe.latent_dim}, {recipe.estimator}"
    plot_bound({"AEVB": metrics}, fig_dir / "bound.png", title=title)
    save_grid(vae.sample(64), shape, fig_dir / "samples.png", title="samples (decoder means)")
    x = data.test[torch.linspace(0, data.test.shape[0] - 1, 32).long()]  # spread out: a split may be sorted by class
    pairs = torch.stack([x, vae.reconstruct(x)], 1).reshape(-1, x.shape[-1])  # original, reconstruction, ...
    save_grid(pairs, shape, fig_dir / "reconstructions.png", title="test images and reconstructions")
    if recipe.latent_dim == 2:
        n = 20
        images = manifold_images(vae.decoder.mean, n, device=data.test.device)
        save_grid(images, shape, fig_dir / "manifold.png", nrow=n, title="learned 2-D manifold")
