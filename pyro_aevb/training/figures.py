"""The figures of a finished run, in ``figures/``: the bound against samples (the paper's Figure 2),
samples, reconstructions and, for Nz = 2, the learned manifold (Figure 4)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..infer.registry import estimator_label


@torch.no_grad()
def write_figures(vae, data, metrics: list[dict], run_dir: Path, recipe) -> None:
    """Write ``bound.png``, ``samples.png``, ``reconstructions.png`` and (Nz = 2) ``manifold.png``."""
    from ..plots import manifold_images, plot_bound, save_grid  # matplotlib only when figures are drawn

    fig_dir = Path(run_dir) / "figures"
    shape = data.dataset.image_shape
    title = f"{data.dataset.name}, $N_z$={recipe.latent_dim}, {recipe.estimator}"
    plot_bound({estimator_label(recipe.estimator): metrics}, fig_dir / "bound.png", title=title)
    save_grid(vae.sample(64), shape, fig_dir / "samples.png", title="samples (decoder means)")
    x = data.test[torch.linspace(0, data.test.shape[0] - 1, 32).long()]  # spread out: a split may be sorted by class
    pairs = torch.stack([x, vae.reconstruct(x)], 1).reshape(-1, x.shape[-1])  # original, reconstruction, ...
    save_grid(pairs, shape, fig_dir / "reconstructions.png", title="test images and reconstructions")
    if recipe.model == "vae" and recipe.latent_dim == 2:
        n = 20
        images = manifold_images(vae.decoder.mean, n, device=data.test.device)
        save_grid(images, shape, fig_dir / "manifold.png", nrow=n, title="learned 2-D manifold")
