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
``checkpoint_every`` samples writes ``checkpoint.pt``. The parts live beside
this module: :mod:`~pyro_aevb.training.setup` builds the run,
:mod:`~pyro_aevb.training.steps` is the step (eager, JIT, compiled, CUDA graph),
:mod:`~pyro_aevb.training.guard` the NaN guard, :mod:`~pyro_aevb.training.schedule`
the data order and the schedule, :mod:`~pyro_aevb.training.run_directory` the files.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..config import Recipe, recipe_diff
from ..data import Dataset
from ..errors import CheckpointError, ConfigError, Interrupted, TrainingError
from ..evaluation.bounds import Bound, average_bound, bound_values
from ..generative.vae import VAE
from ..infer.registry import estimator_label
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import all_sum, gather_rng, pack_rng, seed_rank_streams, shard, unpack_rng, world
from .cpu_allocator import allocator_status
from .figures import write_figures
from .guard import NaNGuard
from .run_directory import RunDirectory, SilentRunDirectory, machine, tensorboard_writer, versions
from .schedule import EpochOrder, crosses, kl_warmup_beta, lr_at
from .setup import Run, build_run
from .signals import StopSignals
from .steps import choose_step


@dataclass
class TrainResult:
    vae: VAE
    run_dir: Path
    metrics: list[dict] = field(default_factory=list)
    run_info: dict = field(default_factory=dict)


def train(
    recipe: Recipe,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    dataset: Dataset | None = None,
    initial_state: dict | None = None,
    resume: bool = False,
    force: bool = False,
    callback: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train the VAE of ``recipe`` and write the run directory ``out_dir``. Returns the trained model.

    ``resume=True`` continues the run in ``out_dir`` from its checkpoint, exactly: parameters,
    optimizer, data order and every RNG are restored, and evaluation rows written after the
    checkpoint are dropped and recomputed. A changed recipe is refused unless ``force``.
    ``callback(step)`` is called after every step's update (e.g. a test that stops the process there).
    """
    started = time.time()
    payload = resume_checkpoint(Path(out_dir), recipe, force) if resume else None
    tensorboard = tensorboard_writer() if recipe.tensorboard else None  # refused before anything is written
    run = build_run(recipe, dataset, initial_state)
    M, total_steps = recipe.batch_size, math.ceil(recipe.max_samples / recipe.batch_size)
    check_every = 1 if recipe.on_nan == "skip" else recipe.sync_every or (1 if run.device.type == "cpu" else 50)
    step_fn = choose_step(run, check_every == 1, total_steps, progress and run.world.main)
    order, clock, best = EpochOrder(run.num_data, M, run.device, run.world, recipe.seed), _Clock(), Best()
    start_step, nan_skips = restore(run, order, clock, best, payload) if payload is not None else (0, 0)
    files = open_run_directory(run, out_dir, overwrite, payload is not None, start_step, step_fn, check_every)
    if tensorboard is not None:
        files.open_tensorboard(tensorboard, start_step * M)
    guard = NaNGuard(run, check_every, files.path, nan_skips)

    def save(step: int) -> None:
        save_run_checkpoint(run, files, step, order, clock, guard.nan_skips, best)

    if payload is None:
        save(0)  # so that a run killed before its first periodic checkpoint still resumes exactly
    bar = _Progress(total_steps * M, start_step * M, run.num_data, progress and run.world.main,
                    estimator_label(run.recipe.estimator))
    step = start_step
    try:
        with StopSignals() as stop, peers_watched(run, files.path):
            while step < total_steps and not stop.agreed(run.device):
                idx = order.indices(step)  # 1. a minibatch: (M,) indices (M/W under torchrun) into device data
                before, samples = step * M, (step + 1) * M
                loss, finite = step_fn(idx, kl_warmup_beta(recipe, samples))  # 2.+3. gradient and update
                run.scheduler.step()
                step += 1
                guard.after_step(step, finite, _batch(step_fn, run, idx))
                bar.step(loss, finite, M, last=step == total_steps)
                if callback is not None:
                    callback(step)
                evaluate_now = crosses(before, samples, recipe.eval_every) or step == total_steps
                checkpoint_now = crosses(before, samples, recipe.checkpoint_every) or step == total_steps
                if guard.due(step) or evaluate_now or checkpoint_now:  # a checkpoint is always finite
                    guard.check(step, _batch(step_fn, run, idx))
                if evaluate_now:
                    bar.show(log_evaluation(run, files, clock, step, guard.nan_skips, best))
                if checkpoint_now:
                    save(step)
            if step < total_steps:  # stopped by a signal (on some rank)
                guard.check(step, run.data.train[:M])
                save(step)
    except TrainingError:
        files.update(status="failed", nan_skips=guard.nan_skips)
        raise
    finally:
        bar.close()
        files.close()
    if step < total_steps:
        files.update(status="interrupted", steps=step, samples=step * M, nan_skips=guard.nan_skips)
        signal_name = stop.received or "SIGTERM"
        raise Interrupted(f"stopped by {signal_name} at step {step} ({step * M:,} samples); checkpoint written. "
                          f"Continue with: pyro-aevb train --resume {files.path}", signal_name=signal_name)
    return finish(run, files, clock, started, total_steps, guard.nan_skips, best)


def open_run_directory(run: Run, out_dir, overwrite: bool, resuming: bool, start_step: int, step_fn,
                       check_every: int) -> RunDirectory:
    """The run's files: created, or reopened at ``start_step``; only rank 0 writes them (torchrun)."""
    recipe = run.recipe
    if not run.world.main:
        return SilentRunDirectory.open(out_dir, start_step if resuming else None)
    files = (RunDirectory.reopen(out_dir, start_step, step_fn.fast_path) if resuming else
             RunDirectory.create(out_dir, overwrite, recipe.to_toml(), run_info(run, step_fn.fast_path, check_every)))
    files.update(status="running")
    step_fn.on_change = lambda path, notice: (files.update(fast_path=path), tqdm.write(notice))
    if recipe.estimator == "sgvb-b" and run.kl != "analytic":
        tqdm.write(f"notice: KL: Monte Carlo. No analytic KL is registered for prior '{recipe.prior}' against "
                   "the Gaussian guide, so sgvb-b (TraceMeanField_ELBO) uses a Monte Carlo KL term")
    return files


@contextlib.contextmanager
def peers_watched(run: Run, run_dir: Path):
    """Under torchrun, a collective that fails because another process stopped becomes one line."""
    try:
        yield
    except torch.distributed.DistError as e:
        if not run.world.distributed:
            raise
        first = (str(e).splitlines() or [""])[0]
        raise TrainingError(f"rank {run.world.rank}: a collective failed, so another process of the run has "
                            f"stopped ({type(e).__name__}: {first[:160]}); the last checkpoint in {run_dir} is "
                            f"intact: resume with torchrun ... train --resume {run_dir}") from None


class _Clock:
    """Training seconds: wall time, less the evaluations (paused around each)."""

    def __init__(self, seconds: float = 0.0):
        self.base, self.t0 = seconds, time.time()

    @property
    def seconds(self) -> float:
        return self.base + (time.time() - self.t0 if self.t0 is not None else 0.0)

    def pause(self) -> None:
        self.base, self.t0 = self.seconds, None

    def resume(self) -> None:
        self.t0 = time.time()


class _Progress:
    """The tqdm bar over training samples, with the running bound (read back every 50 steps)."""

    def __init__(self, total: int, initial: int, num_data: int, enabled: bool, label: str):
        self.bar = tqdm(total=total, initial=initial, unit="sample", unit_scale=True, disable=not enabled, desc=label)
        self.num_data, self.loss, self.steps = num_data, None, 0

    def step(self, loss: torch.Tensor, finite: torch.Tensor, batch_size: int, last: bool) -> None:
        term = torch.where(finite, loss, 0.0)  # stays on the device
        self.loss = term if self.loss is None else self.loss + term
        self.steps += 1
        self.bar.update(batch_size)
        if self.steps == 50 or last:
            self.bar.set_postfix(bound=f"{-self.loss.item() / self.steps / self.num_data:.2f}", refresh=False)
            self.loss, self.steps = None, 0

    def show(self, row: dict) -> None:
        self.bar.set_postfix(bound=f"{row['train_elbo']:.2f}", test=f"{row['test_elbo']:.2f}", refresh=True)

    def close(self) -> None:
        self.bar.close()


def _batch(step_fn, run: Run, idx: torch.Tensor) -> torch.Tensor:
    """The minibatch a step used, for the NaN guard's diagnosis (a CUDA graph's is the raw rows)."""
    return step_fn.last_x if step_fn.last_x is not None else run.data.train[idx]


def evaluate(run: Run) -> dict:
    """Average bound per datapoint (with its standard error) on the train subset, the test split and, if
    the recipe has one, the validation split."""
    analytic, vae, particles, data = run.kl == "analytic", run.vae, run.recipe.eval_particles, run.data
    model, guide = vae.local_pair()
    splits = {"train": data.train_eval, "test": data.test, **({"valid": data.valid} if data.valid is not None else {})}
    row, w = {}, run.world
    for split, x in splits.items():
        if w.distributed:  # each rank its own rows; the sums are added up over the ranks
            values = bound_values(model, guide, x[shard(x.shape[0], w)], particles, analytic).to(torch.float64)
            sums = all_sum(torch.stack([values.sum(), (values**2).sum(), values.new_tensor(values.numel())]))
            bound = Bound.from_sums(*sums.tolist())
        else:
            bound = average_bound(model, guide, x, particles, analytic)
        row.update({f"{split}_elbo": bound.mean, f"{split}_elbo_se": bound.se})
    return row


class Best:
    """The best validation bound so far, the step it was reached at, and whether ``value`` beats it."""

    def __init__(self, value: float = -math.inf, step: int | None = None):
        self.value, self.step = value, step

    def improves(self, value: float | None) -> bool:
        return value is not None and math.isfinite(value) and value > self.value


def log_evaluation(run: Run, files: RunDirectory, clock: "_Clock", step: int, nan_skips: int, best: Best) -> dict:
    """Evaluate, append the row to ``metrics.jsonl`` and, on a new best validation bound, write ``best.pt``."""
    row = files.log(evaluation_row(run, clock, step, nan_skips))
    if best.improves(row.get("valid_elbo")):  # the same on every rank: the bounds are added up over ranks
        best.value, best.step = row["valid_elbo"], step
    if best.step == step and run.world.main:
        save_checkpoint(files.path / "best.pt", model=run.vae.state_dict(), step=step, samples=row["samples"],
                        valid_elbo=row["valid_elbo"], recipe=run.recipe.to_dict(),
                        image_shape=list(run.data.dataset.image_shape), data_dim=run.data.dataset.dim)
    return row


def evaluation_row(run: Run, clock: _Clock, step: int, nan_skips: int) -> dict:
    """One ``metrics.jsonl`` row at ``step``; the evaluation does not count as training time."""
    clock.pause()
    t_eval, M = time.time(), run.recipe.batch_size
    # Evaluation draws its noise on a fork of the random stream, so that how often a run
    # evaluates does not change its training trajectory.
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        bounds = evaluate(run)
    row = {"step": step, "samples": step * M, "epoch": step * M / run.num_data,
           "beta": kl_warmup_beta(run.recipe, step * M), "lr": lr_at(run.recipe, step), **bounds,
           "nan_skips": nan_skips,
           "seconds": round(clock.seconds, 3), "eval_seconds": round(time.time() - t_eval, 3)}
    clock.resume()
    return row


def run_info(run: Run, fast_path: str, check_every: int) -> dict:
    """``run.json`` of a new run: what ran, where, with what."""
    data = run.data
    return {
        "estimator": run.recipe.estimator,
        "kl": run.kl,
        "fast_path": fast_path,
        "sync_every": check_every,
        "allocator": allocator_status() if run.device.type == "cpu" else "the CUDA caching allocator",
        "world_size": run.world.size,
        "backend": run.world.backend,
        "device": str(run.device),
        "seed": run.recipe.seed,
        "versions": versions(),
        "machine": machine(run.device),
        "data": {"name": data.dataset.name, "source": data.dataset.source, "n_train": data.num_data,
                 "n_test": data.test.shape[0], "n_train_eval": data.train_eval.shape[0],
                 "dynamic_binarization": data.dynamic_binarization,
                 "load_seconds": round(data.dataset.load_seconds, 3)},
    }


def save_run_checkpoint(run: Run, files: RunDirectory, step: int, order: EpochOrder, clock: _Clock,
                        nan_skips: int, best: Best) -> None:
    """``checkpoint.pt``: model, optimizer, lr schedule (and the estimator's own state), step, data order,
    the best validation bound so far, RNGs (under torchrun: every rank's, gathered; rank 0 writes)."""
    estimator, w = run.estimator, run.world
    ranks = gather_rng(pack_rng(rng_state())) if w.distributed else None  # a collective: every rank is here
    if not w.main:
        return
    save_checkpoint(
        files.path / "checkpoint.pt",
        model=run.vae.state_dict(),
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        **({"estimator": estimator.state_dict()} if isinstance(estimator, torch.nn.Module) else {}),
        **({"best_valid_elbo": best.value, "best_step": best.step} if best.step is not None else {}),
        step=step,
        samples=step * run.recipe.batch_size,
        train_seconds=clock.seconds,
        perm=order.state(),
        nan_skips=nan_skips,
        recipe=run.recipe.to_dict(),
        image_shape=list(run.data.dataset.image_shape),
        data_dim=run.data.dataset.dim,
        rng=rng_state(),
        world_size=w.size,
        **({"rng_ranks": ranks, "order_rng": order.generator.get_state()} if w.distributed else {}),
    )


#: recipe keys that do not change what a run computes: a resume may change them
_NOT_COMPUTATION = ("data_dir", "tensorboard")


def resume_checkpoint(run_dir: Path, recipe: Recipe, force: bool) -> dict:
    """The checkpoint to resume from, after checking the recipe is the one it was trained with."""
    if not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(f"cannot resume {run_dir}: it has no checkpoint.pt; start a new run with --out")
    payload = load_checkpoint(run_dir / "checkpoint.pt")
    for key in ("perm", "train_seconds", "nan_skips", "rng", "optimizer"):
        if key not in payload:
            raise CheckpointError(f"{run_dir / 'checkpoint.pt'} lacks '{key}'; it cannot be resumed exactly")
    # The data may move, and logging may change; keys a checkpoint lacks (older versions) had their defaults.
    saved = {k: v for k, v in (Recipe().to_dict() | payload["recipe"]).items() if k not in _NOT_COMPUTATION}
    changed = recipe_diff(saved, {k: v for k, v in recipe.to_dict().items() if k not in _NOT_COMPUTATION})
    if changed and not force:
        raise ConfigError(f"refusing to resume {run_dir} with a changed recipe ({'; '.join(changed)}); "
                          "drop the changes, or pass --force")
    written_by, now = payload.get("world_size", 1), world().size
    if written_by != now and not force:
        raise ConfigError(f"refusing to resume {run_dir}: {written_by} process(es) wrote it and {now} would "
                          f"continue it; resume with --nproc_per_node={written_by} (torchrun) to continue exactly, "
                          "or pass --force to continue with new random streams")
    return payload


def restore(run: Run, order: EpochOrder, clock: _Clock, best: Best, payload: dict) -> tuple[int, int]:
    """Put the checkpoint's state back into the run (after the step was built, so that a traced graph
    sees the restored parameters in place); returns (step, skipped NaN steps)."""
    run.vae.load_state_dict(payload["model"])
    run.optimizer.load_state_dict(payload["optimizer"])
    if "scheduler" in payload:  # checkpoints written before lr schedules had none: a constant lr
        run.scheduler.load_state_dict(payload["scheduler"])
    if "best_step" in payload:
        best.value, best.step = payload["best_valid_elbo"], payload["best_step"]
    if isinstance(run.estimator, torch.nn.Module) and "estimator" in payload:
        run.estimator.load_state_dict(payload["estimator"])
    order.perm = payload["perm"].to(run.device)
    clock.base = payload["train_seconds"]
    w = run.world
    if not w.distributed:
        set_rng_state(payload["rng"])
    elif len(payload.get("rng_ranks", [])) == w.size:
        set_rng_state(unpack_rng(payload["rng_ranks"][w.rank]))
        order.generator.set_state(payload["order_rng"])
    else:  # another number of processes wrote it (--force): new streams, so not exact
        seed_rank_streams(run.recipe.seed + payload["step"], w)
        if "order_rng" in payload:
            order.generator.set_state(payload["order_rng"])
        if w.main:
            tqdm.write(f"notice: the checkpoint was written by {payload.get('world_size', 1)} process(es), this "
                       f"run has {w.size}: it continues with new random streams, not exactly")
    return payload["step"], payload["nan_skips"]


def finish(run: Run, files: RunDirectory, clock: _Clock, started: float, total_steps: int,
           nan_skips: int, best: Best) -> TrainResult:
    """Figures and the final ``run.json`` of a completed run."""
    train_seconds = clock.seconds
    if run.world.main:
        write_figures(run.vae, run.data, files.metrics, files.path, run.recipe)
    final = files.metrics[-1]
    files.update(
        status="complete",
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=round(time.time() - started, 3),
        train_seconds=round(train_seconds, 3),
        steps=total_steps,
        samples=total_steps * run.recipe.batch_size,
        nan_skips=nan_skips,
        final={k: final[k] for k in ("train_elbo", "train_elbo_se", "test_elbo", "test_elbo_se")},
        **({"best": {"step": best.step, "valid_elbo": best.value}} if best.step is not None else {}),
    )
    return TrainResult(run.vae, files.path, files.metrics, files.info)
