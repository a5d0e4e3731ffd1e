"""Figures of a run: the bound against training samples (the paper's Fig. 2),
image grids of samples and reconstructions, and the 2-D learned manifold (Fig. 4).

The backend is left to matplotlib (inline in a notebook); the ``pyro-aevb`` command
chooses the non-interactive Agg for itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import torch
from torchvision.utils import make_grid


def plot_train_test(
    series: dict[str, tuple[list, list, list]], path: Path, ylabel: str, title: str = "", ax=None,
    colours: Sequence[str] | None = None, marker: str = "",
):
    """``label -> (samples, train values, test values)`` against training samples, log x-axis:
    train solid, test dashed, as in the paper's Figures 2 and 3. Saves to ``path`` unless ``ax`` is given."""
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(5.5, 4))
    colours = colours or plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, (samples, train, test)), colour in zip(series.items(), colours):
        ax.plot(samples, train, "-" + marker, color=colour, ms=3, label=f"{label} train")
        ax.plot(samples, test, "--" + marker, color=colour, ms=3, label=f"{label} test")
    ax.set_xscale("log")
    ax.set_xlabel("# training samples evaluated")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    if own:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return ax


def plot_bound(
    curves: dict[str, list[dict]], path: Path, title: str = "", ax=None, colours: Sequence[str] | None = None
):
    """Average lower bound per datapoint against training samples evaluated, log x-axis.

    ``curves`` maps a label to its metrics rows (``samples``, ``train_elbo``,
    ``test_elbo``); train is solid, test dashed, as in the paper's Figure 2.
    """
    series = {label: ([r["samples"] for r in rows], [r["train_elbo"] for r in rows], [r["test_elbo"] for r in rows])
              for label, rows in curves.items()}
    return plot_train_test(series, path, r"average lower bound per datapoint $\mathcal{L}$ (nats)", title, ax, colours,
                           marker="o")  # the evaluation points: a run evaluated once still shows its bound


def save_grid(images: torch.Tensor, image_shape: tuple[int, int], path: Path, nrow: int = 8, title: str = ""):
    """Save images of shape (n, D) in [0, 1] as one grey-scale grid (torchvision's make_grid)."""
    h, w = image_shape
    grid = make_grid(images.detach().cpu().reshape(-1, 1, h, w).clamp(0, 1), nrow=nrow, padding=1, pad_value=1.0)
    fig, ax = plt.subplots(figsize=(grid.shape[2] / 40, grid.shape[1] / 40 + (0.3 if title else 0)))
    ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize="small")
    fig.tight_layout(pad=0.1)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def manifold_images(decoder_mean, n: int = 20, device="cpu") -> torch.Tensor:
    """Decoder means on an n x n grid of z = Phi^{-1}(u), u evenly spaced in (0, 1): shape (n*n, D).

    Mapping a uniform grid through the inverse Gaussian CDF spaces the grid by
    prior probability mass, as the paper's Figure 4 does.
    """
    u = torch.linspace(0.5 / n, 1 - 0.5 / n, n, device=device)
    z1 = torch.distributions.Normal(0.0, 1.0).icdf(u)
    # rows go from high z2 (top) to low z2 (bottom), like a plot's y-axis
    grid = torch.stack(torch.meshgrid(z1.flip(0), z1, indexing="ij"), -1).reshape(-1, 2)[:, [1, 0]]
    return decoder_mean(grid)
