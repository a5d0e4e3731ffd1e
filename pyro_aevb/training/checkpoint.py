"""Checkpoints: written atomically, read without unpickling.

A checkpoint is a plain dict of tensors, numbers and strings, so that
``torch.load(path, weights_only=True)`` reads it: PyTorch's restricted
unpickler refuses any other object, and with it any code a crafted file might
try to run. It is written to a temporary file in the same directory, fsynced,
and renamed over the old one, so a crash mid-write leaves the previous
checkpoint whole.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

FORMAT = "pyro-aevb-checkpoint"
VERSION = 1


def atomic_write(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as tensors and plain values (no pickled objects)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": repr(random.getstate()),  # a tuple of ints; repr/literal_eval round-trips it
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    random.setstate(ast.literal_eval(state["python"]))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, state["numpy_pos"], has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, **contents: Any) -> None:
    """Write ``contents`` (state dicts, step, recipe, ...) atomically to ``path``."""
    payload = {"format": FORMAT, "version": VERSION, **contents}
    atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; refuse anything else with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train a run first with `pyro-aevb train`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint ({first[:200]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pyro-aevb checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload.get('version')}, this pyro-aevb reads version {VERSION}"
        )
    return payload
