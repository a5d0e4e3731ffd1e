"""What happens when: the data order, beta's warm-up, and the evaluation and checkpoint schedule.

All in training samples (steps x M), so that a recipe's numbers mean the same
whatever the minibatch size.
"""

from __future__ import annotations

import torch

from ..config import Recipe


def kl_warmup_beta(recipe: Recipe, samples: int) -> float:
    """beta for the step that ends at ``samples`` training samples: rising linearly to ``recipe.beta``
    over ``kl_warmup`` samples (never 0: Pyro's ``poutine.scale`` needs a positive scale)."""
    if recipe.kl_warmup <= 0:
        return recipe.beta
    return recipe.beta * min(1.0, samples / recipe.kl_warmup)


def milestone_steps(recipe: Recipe) -> list[int]:
    """The steps after which lr drops: milestone m (training samples) is passed by step ceil(m / M)."""
    return [-(-samples // recipe.batch_size) for samples in recipe.lr_milestones]


def lr_at(recipe: Recipe, step: int) -> float:
    """The step size step number ``step`` (1-based) trains with: ``lr`` times ``lr_gamma`` for each milestone
    passed by an earlier step (what ``MultiStepLR``, stepped after every update, gives)."""
    return recipe.lr * recipe.lr_gamma ** sum(m < step for m in milestone_steps(recipe))


def crosses(before: int, after: int, every: int) -> bool:
    """Does the step from ``before`` to ``after`` training samples pass a multiple of ``every``?"""
    return after // every > before // every


class EpochOrder:
    """The data order: a fresh permutation of the N rows at each epoch, cut into full minibatches of M.

    ``perm`` (N,) is the current epoch's permutation; it goes into the checkpoint, so that a resumed run
    continues the same epoch. In one process the permutation is drawn from torch's global RNG on the
    data's device. Under torchrun (``world``) every rank draws the same permutation from a generator of
    its own, seeded with the run's ``seed`` (its state goes into the checkpoint too), and takes its own
    contiguous M/W rows of each minibatch.
    """

    def __init__(self, num_data: int, batch_size: int, device: torch.device, world=None, seed: int = 0):
        self.num_data, self.batch_size, self.device = num_data, batch_size, device
        self.steps_per_epoch = num_data // batch_size  # an epoch is a permutation, in full minibatches
        self.perm = None
        self.world = world
        self.generator = torch.Generator().manual_seed(seed) if world is not None and world.distributed else None

    def indices(self, step: int) -> torch.Tensor:
        """The rows of step ``step`` (0-based) this process computes: (M,), or (M/W,) under torchrun."""
        pos = step % self.steps_per_epoch
        if pos == 0:
            if self.generator is None:
                self.perm = torch.randperm(self.num_data, device=self.device)
            else:
                self.perm = torch.randperm(self.num_data, generator=self.generator).to(self.device)
        batch = self.perm[pos * self.batch_size : (pos + 1) * self.batch_size]
        if self.generator is None:
            return batch
        m = self.batch_size // self.world.size
        return batch[self.world.rank * m : (self.world.rank + 1) * m]

    def state(self) -> torch.Tensor:
        """The permutation to checkpoint (the identity before the first step)."""
        return self.perm.cpu() if self.perm is not None else torch.arange(self.num_data)
