r"""Data-parallel AEVB under ``torchrun``: W processes compute the single-process update.

``torchrun --standalone --nproc_per_node=W -m pyro_aevb train RECIPE --out DIR`` starts W processes;
the command sees torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and starts the
process group (:func:`init`): gloo on the CPU, NCCL on CUDA with one device per local rank. Without
torchrun nothing here runs and nothing changes.

The semantics. ``batch_size`` stays the global M; every rank draws the same permutation of the N
training points from the run's seed (a generator of its own, the same on every rank) and takes its
own contiguous M/W rows of each global minibatch. The data plate then scales the rank's minibatch
by N/(M/W), and ``DistributedDataParallel`` averages the W gradients:

.. math::

    \frac1W \sum_{r=1}^{W} \frac{N}{M/W} \sum_{i \in \text{rank } r} \nabla \ell_i
    = \frac{N}{M} \sum_{i=1}^{M} \nabla \ell_i,

the single-process gradient of the same minibatch with the same latent noise. Each rank draws its
noise from its own stream (seeded from the run's seed and the rank), and every rank's random state
goes into the checkpoint, so a resumed run continues exactly.

Only rank 0 writes the run directory; evaluations split each data set across the ranks and add up
sums and counts (:func:`all_sum`). A rank that dies makes the others fail within the process group's
timeout instead of hanging (torchrun then names the failed rank).

References:
  [1] S. Li et al. PyTorch Distributed: Experiences on Accelerating Data Parallel Training. VLDB 2020.
"""

from __future__ import annotations

import ast
import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

#: seconds a collective waits for a silent peer before it fails (torchrun's own default is 30 minutes)
TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, number of processes, local rank, collective backend."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """Was this process started by torchrun (or another launcher that sets ``WORLD_SIZE``)?"""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init() -> World:
    """Join the process group torchrun's environment describes: gloo, plus NCCL where CUDA is."""
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_SECONDS))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return world()


def world() -> World:
    """This process's :class:`World`; a single process (rank 0 of 1) when no process group is running."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                 str(dist.get_backend()))


def shutdown(finished: bool = True) -> None:
    """Leave the process group; after a successful command, only once every rank is done (so that no rank
    tears its connections down while another still writes or reads)."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def device_for(name: str, w: World) -> torch.device:
    """The device of this rank: its own GPU (``cuda:LOCAL_RANK``) on CUDA."""
    return torch.device("cuda", w.local_rank) if name == "cuda" and w.distributed else torch.device(name)


def shard(n: int, w: World) -> slice:
    """This rank's contiguous part of n rows (the first ranks get one more where W does not divide n)."""
    base, extra = divmod(n, w.size)
    start = w.rank * base + min(w.rank, extra)
    return slice(start, start + base + (w.rank < extra))


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` added up over the ranks (float64, on the collective's device); itself in one process."""
    if not world().distributed:
        return values
    out = values.detach().to(torch.float64).clone()
    dist.all_reduce(out)
    return out


def every_rank(flag: torch.Tensor) -> torch.Tensor:
    """A boolean 0-d tensor, true only where it is true on every rank (one small collective)."""
    if not world().distributed:
        return flag
    t = flag.to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t[0].bool()


def wrap(module: torch.nn.Module, w: World) -> torch.nn.Module:
    """``module`` inside ``DistributedDataParallel`` (one device per process on CUDA): backward averages the
    gradients of its parameters over the ranks."""
    cuda = next(module.parameters()).is_cuda
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[w.local_rank] if cuda else None)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Is ``flag`` true on some rank? (one small collective; the flag itself in one process)"""
    if not world().distributed:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------------------- random state
def pack_rng(state: dict) -> dict[str, torch.Tensor]:
    """A :func:`~pyro_aevb.training.checkpoint.rng_state` as fixed-shape tensors, to gather over ranks."""
    version, internal, gauss = ast.literal_eval(state["python"])
    packed = {
        "torch": state["torch"],
        "numpy_keys": state["numpy_keys"],
        "numpy_rest": torch.tensor([state["numpy_pos"], state["numpy_gauss"][0]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([state["numpy_gauss"][1]], dtype=torch.float64),
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
    }
    if "cuda" in state:
        packed["cuda"] = torch.stack(state["cuda"])
    return packed


def unpack_rng(packed: dict[str, torch.Tensor]) -> dict:
    """The inverse of :func:`pack_rng`."""
    version, *internal = packed["python"].tolist()
    gauss = packed["python_gauss"].item()
    state = {
        "torch": packed["torch"],
        "python": repr((version, tuple(internal), None if gauss != gauss else gauss)),
        "numpy_keys": packed["numpy_keys"],
        "numpy_pos": int(packed["numpy_rest"][0]),
        "numpy_gauss": [int(packed["numpy_rest"][1]), packed["numpy_gauss"].item()],
    }
    if "cuda" in packed:
        state["cuda"] = list(packed["cuda"])
    return state


def gather_rng(packed: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Every rank's packed random state, in rank order (a collective: every rank calls it)."""
    w = world()
    if not w.distributed:
        return [packed]
    device = torch.device("cuda", w.local_rank) if "nccl" in (w.backend or "") and torch.cuda.is_available() \
        else torch.device("cpu")
    ranks = [{} for _ in range(w.size)]
    for key, tensor in packed.items():
        parts = [torch.empty_like(tensor, device=device) for _ in range(w.size)]
        dist.all_gather(parts, tensor.to(device))
        for r, part in enumerate(parts):
            ranks[r][key] = part.cpu()
    return ranks


def seed_rank_streams(seed: int, w: World) -> None:
    """Each rank's own noise: torch, numpy and random seeded from the run's seed and the rank."""
    rank_seed = seed * 1_000_003 + w.rank + 1
    torch.manual_seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    random.seed(rank_seed)
