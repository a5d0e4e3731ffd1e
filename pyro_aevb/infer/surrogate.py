"""Pyro's ELBO interface from a single ``differentiable_loss``.

An estimator whose update is the gradient of one surrogate tensor (whose value
is its loss estimate) needs only ``differentiable_loss``; this mixin supplies
``loss`` and ``loss_and_grads`` the way Pyro's ELBOs define them, so the
training loop, ``compare`` and ``grad-variance`` treat it like any Pyro ELBO.
"""

from __future__ import annotations

import torch


class SurrogateLossMixin:
    """``loss`` and ``loss_and_grads`` from ``differentiable_loss(model, guide, *args, **kwargs)``."""

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()
