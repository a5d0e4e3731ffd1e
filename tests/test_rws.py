r"""Reweighted wake-sleep (pyro_aevb.infer.rws) against closed forms of the linear-Gaussian model.

* Weights are normalised over K for each datapoint separately (columns of the
  (K, M) matrix sum to 1), not over the whole batch (Pyro's RWS).
* Wake-theta: with the exact posterior as guide, every weight is 1/K and
  E[grad_theta log p(x, z)] over the posterior is grad_theta log p(x) (Fisher's
  identity); with a poor guide and large K the self-normalised estimate
  converges to the same. Checked against autograd through ``log_marginal``.
* Wake-phi: with large K it estimates E_{p(z|x)}[grad_phi log q(z|x)], which
  for a diagonal Gaussian q = N(m, s^2) and the Gaussian posterior N(mu, Sigma)
  is d/dm = (mu - m)/s^2 and d/dlog s = (Sigma_jj + (mu - m)^2)/s^2 - 1.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import pyro

from linear_gaussian import DiagonalGuide
from pyro_aevb.config import load_recipe
from pyro_aevb.data import load_dataset
from pyro_aevb.infer.registry import make_estimator
from pyro_aevb.infer.rws import normalized_weights, wake_terms
from pyro_aevb.training.loop import train

NUM_DATA = 15  # for a batch of M = 5: the plate's N/M = 3


pytestmark = pytest.mark.usefixtures("float64_single_thread")
@pytest.fixture
def x(lg):
    """A batch where normalising over the whole batch would go wrong: a duplicate and an outlier."""
    x = lg.sample(3, torch.Generator().manual_seed(0))
    return torch.cat([x, x[:1], x[:1] + torch.tensor([4.0, -4.0, 4.0])])  # (5, 3)


def _poor_guide(lg, x):
    loc, scale = lg.offset_guide(0.5, 2.0).params(x)
    return DiagonalGuide(loc=loc.clone().requires_grad_(), log_scale=scale.log().clone().requires_grad_())


def test_weights_normalise_per_datapoint(lg, x):
    guide = _poor_guide(lg, x)
    pyro.set_rng_seed(0)
    log_w, log_p, log_q = wake_terms(lg.model, guide, x, num_particles=200, num_data=NUM_DATA)
    assert log_w.shape == (200, 5)
    w = normalized_weights(log_w)
    torch.testing.assert_close(w.sum(0), torch.ones(5), rtol=0, atol=1e-12)
    assert not w.requires_grad
    joint = torch.softmax(log_w.detach().reshape(-1), 0).reshape(200, 5)  # what batch-wide normalising gives
    print(f"\ncolumn sums, per datapoint: {w.sum(0).tolist()}, over the batch: {joint.sum(0).tolist()}")
    assert (joint.sum(0) - 1).abs().max() > 0.5
    assert not torch.allclose(w[:, 0], w[:, 3])  # a duplicate datapoint has its own particles and weights
    # gradient paths: log p reaches only the model, log q only the guide, and z reaches neither
    torch.testing.assert_close(log_p - log_q, log_w)
    g_p = torch.autograd.grad(log_p.sum(), [guide.loc_, guide.log_scale_, lg.W], allow_unused=True)
    assert (g_p[0] is None or g_p[0].abs().max() == 0) and (g_p[1] is None or g_p[1].abs().max() == 0)
    assert g_p[2].abs().max() > 0
    g_q = torch.autograd.grad(log_q.sum(), [lg.W, lg.b, guide.loc_], allow_unused=True)
    assert g_q[0] is None and g_q[1] is None and g_q[2].abs().max() > 0


@pytest.mark.parametrize("guide_kind", ["exact", "poor"])
def test_theta_gradient_matches_gradient_of_log_marginal(lg, x, guide_kind):
    guide = lg.exact_guide if guide_kind == "exact" else _poor_guide(lg, x)
    K, batches = 20000, 8
    expected = torch.autograd.grad(-(NUM_DATA / 5) * lg.log_marginal(x).sum(), [lg.W, lg.b])
    est = make_estimator("reweighted-wake-sleep", num_particles=K)
    grads = []
    for i in range(batches):
        lg.W.grad = lg.b.grad = None
        pyro.set_rng_seed(i)
        est.differentiable_loss(lg.model, guide, x, num_data=NUM_DATA).backward()
        grads.append([lg.W.grad.clone(), lg.b.grad.clone()])
    for j, name in enumerate(["W", "b"]):
        g = torch.stack([b[j] for b in grads])
        mean, se = g.mean(0), g.std(0) / math.sqrt(batches)
        rel = (mean - expected[j]).norm() / expected[j].norm()
        z = (mean - expected[j]) / se
        print(f"\n{guide_kind} guide, K={K}: d(loss)/d({name}) rel. error {rel.item():.2e}, "
              f"max |z| {z.abs().max().item():.2f}, |expected| {expected[j].norm().item():.2f}")
        assert rel < 0.01
        assert z.abs().max() < 5


def test_wake_phi_gradient_matches_posterior_expectation(lg, x):
    guide = _poor_guide(lg, x)
    K, batches = 20000, 8
    mu, cov = lg.posterior(x)
    m, s2 = guide.loc_.detach(), (2 * guide.log_scale_.detach()).exp()
    scale = NUM_DATA / 5
    expected = [-scale * (mu - m) / s2, -scale * ((cov.diagonal() + (mu - m) ** 2) / s2 - 1)]
    est = make_estimator("reweighted-wake-sleep", num_particles=K, mixing=1.0)  # wake-phi only
    grads = []
    for i in range(batches):
        guide.loc_.grad = guide.log_scale_.grad = None
        pyro.set_rng_seed(i)
        est.differentiable_loss(lg.model, guide, x, num_data=NUM_DATA).backward()
        grads.append([guide.loc_.grad.clone(), guide.log_scale_.grad.clone()])
    for j, name in enumerate(["loc", "log_scale"]):
        g = torch.stack([b[j] for b in grads])
        rel = (g.mean(0) - expected[j]).norm() / expected[j].norm()
        print(f"\nwake-phi d(loss)/d({name}) rel. error {rel.item():.2e}, |expected| {expected[j].norm().item():.2f}")
        assert rel < 0.02


def test_loss_is_the_elbo_estimate_and_scales_with_num_data(lg, x):
    guide = _poor_guide(lg, x)
    est = make_estimator("reweighted-wake-sleep", num_particles=50)
    loc, scale = guide.params(x)
    elbo = lg.closed_form_elbo(x, loc.detach(), scale.detach()).sum().item()
    values = []
    for i in range(40):
        pyro.set_rng_seed(i)
        values.append(est.differentiable_loss(lg.model, guide, x).item())
    values = torch.tensor(values)
    se = values.std().item() / math.sqrt(len(values))
    print(f"\nmean loss {values.mean().item():.4f} +- {se:.4f}, closed-form -ELBO {-elbo:.4f}")
    assert abs(values.mean().item() + elbo) < 4 * se
    pyro.set_rng_seed(3)
    full = est.loss(lg.model, guide, x)
    pyro.set_rng_seed(3)
    scaled = est.loss(lg.model, guide, x, num_data=NUM_DATA, beta=0.3)  # beta is ignored
    assert scaled == pytest.approx(NUM_DATA / 5 * full, rel=1e-10)


@functools.lru_cache(maxsize=None)
def _mnist5k():
    return load_dataset("mnist-5k")


def test_trains_the_tiny_default_recipe(tmp_path):
    torch.set_default_dtype(torch.float32)
    recipe = load_recipe(None, {"estimator": "reweighted-wake-sleep", "num_particles": 3, "max_samples": 300,
                                "eval_every": 300, "hidden_dim": 32, "latent_dim": 2, "eval_train_size": 500})
    row = train(recipe, tmp_path / "run", progress=False, dataset=_mnist5k()).metrics[-1]
    assert row["samples"] == 300 and math.isfinite(row["train_elbo"]) and math.isfinite(row["test_elbo"])
