"""Reading a finished run back: ``pyro_aevb.load(DIR)``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .config import make_recipe
from .errors import CheckpointError, ConfigError
from .vae import VAE, build_vae


def load(run_dir: str | Path, device: str | None = None) -> VAE:
    """The trained VAE of a run directory, on the run's device (or ``device``).

    ``vae.model(x)`` and ``vae.guide(x)`` take a batch of shape (N, D) and work
    with any ``pyro.infer`` ELBO; ``vae.recipe`` is the resolved recipe,
    ``vae.metrics`` the evaluation rows and ``vae.run_dir`` the directory.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist; train one with `pyro-aevb train --out {run_dir}`")
    payload = load_checkpoint(run_dir / "checkpoint.pt")
    recipe = make_recipe(payload["recipe"])
    device = device or recipe.device
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"  # a run trained on a GPU still loads on a laptop
    state = payload["model"]
    data_dim = state["encoder.hidden.0.weight"].shape[1]
    vae = build_vae(recipe, data_dim)
    try:
        vae.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint in {run_dir} does not match its recipe: {str(e).splitlines()[0]}") from None
    vae.to(device).eval()
    vae.recipe = recipe
    vae.run_dir = run_dir
    vae.step = payload["step"]
    vae.image_shape = tuple(payload["image_shape"])
    metrics_path = run_dir / "metrics.jsonl"
    vae.metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    return vae
