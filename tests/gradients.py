"""A loss and its gradients under a seed: how the tests compare two computations of one loss."""

from __future__ import annotations

import torch


def seeded_loss_and_grads(module: torch.nn.Module, seed: int, loss_fn) -> tuple[torch.Tensor, dict]:
    """``loss_fn()`` after ``torch.manual_seed(seed)``, backpropagated into ``module``'s parameters from zero:
    (the loss, {parameter name: its gradient})."""
    torch.manual_seed(seed)
    loss = loss_fn()
    module.zero_grad()
    loss.backward()
    return loss, {name: p.grad.clone() for name, p in module.named_parameters()}
