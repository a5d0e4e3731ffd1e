"""The run directory: ``recipe.toml``, ``run.json``, ``metrics.jsonl``, ``checkpoint.pt`` and ``figures/``.

:class:`RunDirectory` writes a run's files (nothing before every input is
checked; ``run.json`` and the checkpoint atomically; an existing directory is
moved aside, never deleted); :func:`load` reads a finished run back as the
trained VAE, ``pyro_aevb.load(DIR)``.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

import pyro

from ..version import __version__
from ..config import make_recipe
from ..errors import CheckpointError, ConfigError
from ..generative.registry import build_model
from ..generative.vae import VAE
from .checkpoint import atomic_write, load_checkpoint


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


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (none if it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


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


class RunDirectory:
    """An open run directory: ``info`` is ``run.json``'s content, ``metrics`` the evaluation rows so far."""

    def __init__(self, path: Path, info: dict, metrics: list[dict]):
        self.path = Path(path)
        self.info = info
        self.metrics = metrics
        self._metrics_file = open(self.path / "metrics.jsonl", "a")
        self._tensorboard = None

    @classmethod
    def create(cls, path: Path, overwrite: bool, recipe_toml: str, info: dict) -> "RunDirectory":
        """A new run: the directory (an old one moved aside with ``overwrite``), the resolved recipe,
        ``run.json`` and an empty ``metrics.jsonl``."""
        path = prepare_run_dir(path, overwrite)
        (path / "recipe.toml").write_text(recipe_toml)
        (path / "metrics.jsonl").write_text("")
        info = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), **info}
        return cls(path, info, [])

    @classmethod
    def reopen(cls, path: Path, step: int, fast_path: str) -> "RunDirectory":
        """A run resumed at ``step``: evaluation rows after it are dropped (they are recomputed), and
        ``run.json`` records the resume and the fast path of the new segment."""
        path = Path(path)
        info = json.loads((path / "run.json").read_text())
        info.setdefault("resumed_at_steps", []).append(step)
        info.setdefault("resumed_fast_paths", []).append(fast_path)  # may differ: max_samples, machine
        rows = [r for r in read_metrics(path / "metrics.jsonl") if r["step"] <= step]
        atomic_write(path / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
        return cls(path, info, rows)

    def open_tensorboard(self, writer_class, purge_after_samples: int = 0) -> None:
        """Also write every logged row's numbers as TensorBoard scalars (x axis: training samples) to
        ``RUN/tensorboard/``. A resumed run purges the events after its checkpoint, as it drops those rows."""
        self._tensorboard = writer_class(str(self.path / "tensorboard"), purge_step=purge_after_samples + 1)

    def update(self, **entries) -> None:
        """Set entries of ``run.json`` and write it (atomically)."""
        self.info.update(entries)
        write_json(self.path / "run.json", self.info)

    def log(self, row: dict) -> dict:
        """Append one evaluation row to ``metrics.jsonl`` (flushed: a crash loses no finished row); returns it."""
        self.metrics.append(row)
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        if self._tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "samples") and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, global_step=row["samples"])
            self._tensorboard.flush()
        return row

    def close(self) -> None:
        self._metrics_file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


class SilentRunDirectory(RunDirectory):
    """The run directory as a rank other than 0 sees it under torchrun: the same rows and ``run.json``
    content in memory, nothing written (rank 0 writes)."""

    def __init__(self, path: Path, info: dict, metrics: list[dict]):
        self.path, self.info, self.metrics = Path(path), info, metrics
        self._metrics_file = self._tensorboard = None

    @classmethod
    def open(cls, path: Path, resume_step: int | None) -> "SilentRunDirectory":
        """A new run (``resume_step`` None), or one resumed at that step (its rows up to there, read only)."""
        path = Path(path)
        if resume_step is None:
            return cls(path, {}, [])
        info = json.loads((path / "run.json").read_text())
        return cls(path, info, [r for r in read_metrics(path / "metrics.jsonl") if r["step"] <= resume_step])

    def open_tensorboard(self, writer_class, purge_after_samples: int = 0) -> None:
        pass

    def update(self, **entries) -> None:
        self.info.update(entries)

    def log(self, row: dict) -> dict:
        self.metrics.append(row)
        return row

    def close(self) -> None:
        pass


def tensorboard_writer():
    """``torch.utils.tensorboard.SummaryWriter``, imported only now; a one-line error if it cannot be."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard = true needs the tensorboard package, which is not installed: "
                          "pip install tensorboard (or pip install 'pyro-aevb[tensorboard]'), or drop "
                          "--tensorboard") from None
    return SummaryWriter


CHECKPOINTS = {"last": "checkpoint.pt", "best": "best.pt"}


def load(run_dir: str | Path, device: str | None = None, checkpoint: str = "last") -> VAE:
    """The trained VAE of a run directory, on the run's device (or ``device``).

    ``checkpoint``: ``"last"`` (``checkpoint.pt``, the end of training) or ``"best"`` (``best.pt``, the
    parameters with the best validation bound, in runs with ``validation_size > 0``).
    ``vae.model(x)`` and ``vae.guide(x)`` take a batch of shape (N, D) and work
    with any ``pyro.infer`` ELBO; ``vae.recipe`` is the resolved recipe,
    ``vae.metrics`` the evaluation rows and ``vae.run_dir`` the directory.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist; train one with `pyro-aevb train --out {run_dir}`")
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    if checkpoint == "best" and not (run_dir / "best.pt").is_file():
        raise ConfigError(f"{run_dir} has no best.pt: only runs with a validation split (validation_size > 0) "
                          "keep one; use the last checkpoint")
    payload = load_checkpoint(run_dir / CHECKPOINTS[checkpoint])
    recipe = make_recipe(payload["recipe"])
    device = device or recipe.device
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"  # a run trained on a GPU still loads on a laptop
    state = payload["model"]
    data_dim = payload.get("data_dim") or state["encoder.hidden.0.weight"].shape[1]  # older checkpoints: a VAE
    vae = build_model(recipe, data_dim)
    try:
        vae.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint in {run_dir} does not match its recipe: {str(e).splitlines()[0]}") from None
    vae.to(device).eval()
    vae.recipe = recipe
    vae.run_dir = run_dir
    vae.step = payload["step"]
    vae.checkpoint = checkpoint
    vae.image_shape = tuple(payload["image_shape"])
    vae.metrics = read_metrics(run_dir / "metrics.jsonl")
    return vae
