"""The NaN guard: a non-finite loss or gradient stops the run (or skips the step), naming what went wrong.

Two modes, set by ``sync_every`` (and ``on_nan``):

* checked (``check_every == 1``): the step reads its finiteness flag on the host
  before updating; a non-finite step is diagnosed at once, then skipped
  (``on_nan = "skip"``, up to ``max_nan_skips``) or stops the run;
* deferred (``check_every > 1``): updates are applied unchecked, and a flag on
  the device keeps the first step that went non-finite. The loop reads it
  every ``check_every`` steps and before every evaluation and checkpoint, so a
  checkpoint on disk is always finite.

Either way the run stops with one line that names the step and the parameter,
gradient or model/guide site that went non-finite.
"""

from __future__ import annotations

import torch

import pyro

from ..errors import TrainingError
from ..infer.traces import sample_sites, trace_pair


def diagnose_nonfinite(vae, x: torch.Tensor, params: dict[str, torch.Tensor]) -> str | None:
    """Name what went non-finite: a parameter, a gradient, or a site's log-probability on the batch x.

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
        model_trace, guide_trace = trace_pair(*vae.local_pair(), x)
    for trace, which in ((guide_trace, "guide"), (model_trace, "model")):
        for name, site in sample_sites(trace).items():
            if not torch.isfinite(site["unscaled_log_prob"]).all():
                site_msg = f"the {which} site '{name}' has a non-finite log-probability"
                return f"{culprit}; {site_msg}" if culprit else site_msg
    return culprit


class NaNGuard:
    """Watches each step's finiteness flag; raises :class:`TrainingError` when the run must stop."""

    def __init__(self, run, check_every: int, run_dir, nan_skips: int = 0):
        self.run = run
        self.run_dir = run_dir
        self.check_every = check_every
        self.nan_skips = nan_skips
        self.first_bad = torch.full((), -1, dtype=torch.long, device=run.device)  # first non-finite step, -1: none

    @property
    def deferred(self) -> bool:
        return self.check_every > 1

    def error(self, step: int, where: str, detail: str = "") -> TrainingError:
        M = self.run.recipe.batch_size
        return TrainingError(
            f"non-finite loss at step {step} (sample {step * M:,}){detail}: {where}. The last good checkpoint "
            f"in {self.run_dir} is untouched; lower lr, set grad_clip, or set on_nan = \"skip\"")

    def after_step(self, step: int, finite: torch.Tensor, x: torch.Tensor) -> None:
        """After step number ``step`` (1-based) on the batch x: skip, stop, or note the flag for later."""
        if self.deferred:
            self.first_bad = torch.where((self.first_bad < 0) & ~finite, step, self.first_bad)
            return
        if finite:  # one host read per step
            return
        recipe = self.run.recipe
        where = diagnose_nonfinite(self.run.vae, x, self.run.params) or "the loss is non-finite"
        if recipe.on_nan == "skip" and self.nan_skips < recipe.max_nan_skips:
            self.nan_skips += 1  # the step made no update; the data and RNG move on as usual
            return
        limit = f" after {self.nan_skips} skipped steps (max_nan_skips)" if recipe.on_nan == "skip" else ""
        raise self.error(step, where, limit)

    def due(self, step: int) -> bool:
        """Is a deferred check due after ``step`` (every ``check_every`` steps)?"""
        return self.deferred and step % self.check_every == 0

    def check(self, step: int, x: torch.Tensor) -> None:
        """Read the device's flag back (one host sync) and stop if some step up to ``step`` went non-finite."""
        if not self.deferred:
            return
        bad = int(self.first_bad)
        if bad >= 0:
            where = diagnose_nonfinite(self.run.vae, x, self.run.params) or "the loss is non-finite"
            raise self.error(bad, where, f", seen at step {step} (flags are read every {self.check_every} steps)")
