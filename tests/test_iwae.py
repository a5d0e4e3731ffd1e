"""The per-datapoint IWAE bound (pyro_aevb.infer.iwae) against the linear-Gaussian closed forms.

With the exact posterior as guide every importance weight is p(x), so the
bound equals log p(x) for any K and any draw. With a poor guide the expected
bound rises with K towards log p(x), from the ELBO at K = 1.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import pyro

from pyro_aevb.config import load_recipe
from pyro_aevb.data import load_dataset
from pyro_aevb.infer.registry import make_estimator
from pyro_aevb.evaluation.bounds import log_weights
from pyro_aevb.infer.iwae import iwae_bound
from pyro_aevb.training.loop import train

M = 5


pytestmark = pytest.mark.usefixtures("float64_single_thread")
@pytest.fixture
def x(lg):
    return lg.sample(M, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("K", [1, 3, 50])
def test_exact_posterior_gives_log_marginal_for_every_draw(lg, x, K):
    est = make_estimator("iwae", num_particles=K)
    log_px = lg.log_marginal(x).sum().item()
    for seed in range(5):
        pyro.set_rng_seed(seed)
        assert -est.loss(lg.model, lg.exact_guide, x) == pytest.approx(log_px, abs=1e-9)
        pyro.set_rng_seed(seed)
        assert -est.loss(lg.model, lg.exact_guide, x, num_data=4 * M) == pytest.approx(4 * log_px, abs=1e-8)


def test_poor_guide_bound_rises_with_K_towards_log_marginal(lg, x):
    guide = lg.offset_guide(0.5, 2.0)
    log_px = lg.log_marginal(x).sum().item()
    loc, scale = guide.params(x)
    elbo = lg.closed_form_elbo(x, loc, scale).sum().item()
    means, ses = {}, {}
    for K in (1, 3, 10, 100):
        est = make_estimator("iwae", num_particles=K)
        values = []
        for seed in range(200):
            pyro.set_rng_seed(seed)
            values.append(-est.loss(lg.model, guide, x))
        values = torch.tensor(values)
        means[K], ses[K] = values.mean().item(), values.std().item() / math.sqrt(len(values))
    print(f"\nlog p(x) {log_px:.4f}, ELBO {elbo:.4f}; IWAE: "
          + ", ".join(f"K={K}: {means[K]:.4f} +- {ses[K]:.4f}" for K in means))
    assert abs(means[1] - elbo) < 4 * ses[1]  # K = 1 is the ELBO
    Ks = sorted(means)
    for a, b in zip(Ks, Ks[1:]):
        assert means[b] - means[a] > 3 * math.hypot(ses[a], ses[b])
    assert means[100] < log_px + 4 * ses[100]
    assert log_px - means[100] < 0.1 * (log_px - elbo)  # most of the gap is closed


def test_bound_is_per_datapoint_not_batch_wide(lg, x):
    """The batch's bound is the sum of the datapoints' bounds, computed from the same (K, M) log-weights."""
    guide = lg.offset_guide(0.5, 2.0)
    pyro.set_rng_seed(0)
    log_w = log_weights(lg.model, guide, x, 7)
    pyro.set_rng_seed(0)
    value = -make_estimator("iwae", num_particles=7).loss(lg.model, guide, x)
    assert value == pytest.approx(iwae_bound(log_w).sum().item(), rel=1e-12)
    batch_wide = (torch.logsumexp(log_w.sum(1), 0) - math.log(7)).item()  # RenyiELBO(alpha=0)'s reading
    assert abs(value - batch_wide) > 0.1


def test_gradient_is_that_of_the_bound(lg, x):
    """differentiable_loss is differentiable in theta (directly) and in the guide (through z)."""
    loc = lg.posterior(x)[0].detach().clone().requires_grad_()
    from linear_gaussian import DiagonalGuide

    guide = DiagonalGuide(loc=loc, log_scale=torch.zeros_like(loc, requires_grad=True))
    loss = make_estimator("iwae", num_particles=4).differentiable_loss(lg.model, guide, x)
    g = torch.autograd.grad(loss, [lg.W, loc])
    assert all(t.abs().sum() > 0 for t in g)


@functools.lru_cache(maxsize=None)
def _mnist5k():
    return load_dataset("mnist-5k")


def test_trains_the_tiny_default_recipe(tmp_path):
    torch.set_default_dtype(torch.float32)
    recipe = load_recipe(None, {"estimator": "iwae", "num_particles": 3, "max_samples": 300, "eval_every": 300,
                                "hidden_dim": 32, "latent_dim": 2, "eval_train_size": 500})
    row = train(recipe, tmp_path / "run", progress=False, dataset=_mnist5k()).metrics[-1]
    assert row["samples"] == 300 and math.isfinite(row["train_elbo"]) and math.isfinite(row["test_elbo"])
