"""SGVB estimators A and B (pyro_aevb.infer.registry) against closed forms and against each other.

The closed forms come from the linear-Gaussian model in ``linear_gaussian.py``
(exact log p(x), exact posterior, exact ELBO of a diagonal Gaussian guide and
its gradients). The VAE tests check A against B, beta and num_data scaling
under fixed noise.

Monte Carlo checks draw many particles in vectorized batches and estimate the
standard error (SE) of the mean from the spread of the batch means. Every
random draw is seeded, so each test is deterministic; tolerances are a few SEs.
All computations are float64.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.distributions import kl_divergence

import pyro
from pyro import poutine

from linear_gaussian import W_CORRELATED, DiagonalGuide, LinearGaussian
from pyro_aevb.config import Recipe
from pyro_aevb.infer.registry import kl_status, make_estimator
from pyro_aevb.evaluation.bounds import elbo_per_datapoint
from pyro_aevb.generative.vae import build_vae

ESTIMATORS = ["sgvb-a", "sgvb-b"]
M = 5  # datapoints of the linear-Gaussian model
# The poor (non-exact) diagonal guide: posterior mean + 0.5, twice the posterior sd.
LOC_OFFSET, SCALE_MULT = 0.5, 2.0


@contextlib.contextmanager
def float64_single_thread():
    """float64 by default, one intra-op thread (the tiny ops here only lose from more), clean param store."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    pyro.clear_param_store()
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        pyro.clear_param_store()


@pytest.fixture(autouse=True)
def _float64():
    with float64_single_thread():
        yield


@pytest.fixture
def x(lg):
    return lg.sample(M, torch.Generator().manual_seed(0))


def batched_neg_loss(name, model, guide, x, batches, particles, seed=0, **kwargs):
    """-loss of ``batches`` vectorized calls of ``particles`` draws each: (mean, SE of the mean, batch means)."""
    est = make_estimator(name, num_particles=particles)
    values = []
    for i in range(batches):
        pyro.set_rng_seed(seed + i)
        values.append(-est.loss(model, guide, x, **kwargs))
    values = torch.tensor(values)
    return values.mean().item(), values.std().item() / math.sqrt(batches), values


# --------------------------------------------------------------------------- the helper itself
def test_closed_forms_are_consistent(lg, x):
    """Bayes' rule with the exact posterior, and the closed-form ELBO at the exact posterior, give log p(x)."""
    log_px = lg.log_marginal(x)
    mu, cov = lg.posterior(x)
    # log p(x) = log p(x|z) + log p(z) - log p(z|x) at any z
    z = torch.randn(M, 2, generator=torch.Generator().manual_seed(1))
    posterior = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov)
    bayes = lg.likelihood(z).log_prob(x) + lg.prior().log_prob(z) - posterior.log_prob(z)
    torch.testing.assert_close(bayes, log_px, rtol=0, atol=1e-10)
    # orthogonal W columns: diagonal posterior covariance, and the ELBO is tight there
    assert torch.allclose(cov, torch.diag(cov.diagonal()), atol=1e-14)
    elbo_exact = lg.closed_form_elbo(x, mu, cov.diagonal().sqrt().expand_as(mu))
    torch.testing.assert_close(elbo_exact, log_px, rtol=0, atol=1e-10)
    loc, scale = lg.offset_guide(LOC_OFFSET, SCALE_MULT).params(x)
    gap = (log_px - lg.closed_form_elbo(x, loc, scale)).sum().item()
    print(f"\nsum log p(x) = {log_px.sum().item():.4f}, gap of the poor guide = {gap:.4f} nats")
    assert gap > 1.0


# --------------------------------------------------------------------------- 1. ELBO <= log p(x)
@pytest.mark.parametrize("name", ESTIMATORS)
def test_poor_guide_bound_is_below_log_marginal_and_equals_closed_form(lg, x, name):
    guide = lg.offset_guide(LOC_OFFSET, SCALE_MULT)
    assert kl_status(lg.model, guide, x) == "analytic"  # so sgvb-b really uses the analytic KL
    mean, se, _ = batched_neg_loss(name, lg.model, guide, x, batches=40, particles=500)  # 20,000 draws
    log_px = lg.log_marginal(x).sum().item()
    loc, scale = guide.params(x)
    elbo = lg.closed_form_elbo(x, loc, scale).sum().item()
    print(f"\n{name}: mean -loss {mean:.4f} +- {se:.4f} (SE), closed-form ELBO {elbo:.4f}, "
          f"sum log p(x) {log_px:.4f}; (log p - mean)/SE = {(log_px - mean) / se:.1f}, "
          f"(mean - ELBO)/SE = {(mean - elbo) / se:.2f}")
    assert log_px - mean > 5 * se
    assert abs(mean - elbo) < 4 * se


# --------------------------------------------------------------------------- 2. exact posterior guide
@pytest.mark.parametrize("posterior", ["diagonal", "full-covariance"])
def test_estimator_a_is_exact_for_every_draw_with_exact_posterior(posterior):
    if posterior == "diagonal":
        lg = LinearGaussian()
        guide = lg.exact_guide
    else:
        lg = LinearGaussian(W=W_CORRELATED)
        guide = lg.exact_mvn_guide
    x = lg.sample(M, torch.Generator().manual_seed(0))
    _, cov = lg.posterior(x)
    if posterior == "full-covariance":
        assert cov[0, 1].abs() > 0.01  # not secretly diagonal
    log_px = lg.log_marginal(x).sum().item()
    est = make_estimator("sgvb-a")
    values, zs = [], []
    for seed in range(20):
        pyro.set_rng_seed(seed)
        values.append(-est.loss(lg.model, guide, x))
        pyro.set_rng_seed(seed)
        zs.append(guide(x))
    errors = [abs(v - log_px) for v in values]
    print(f"\n{posterior}: sum log p(x) = {log_px:.6f}, max |(-loss) - log p(x)| over 20 draws = {max(errors):.2e}")
    assert max(errors) < 1e-5
    assert torch.stack(zs).std(0).min() > 0.05  # the draws of z really differ


def test_estimator_b_with_exact_posterior_is_unbiased_but_not_exact(lg, x):
    guide = lg.exact_guide
    assert kl_status(lg.model, guide, x) == "analytic"
    log_px = lg.log_marginal(x).sum().item()
    est = make_estimator("sgvb-b")
    single = []
    for seed in range(20):
        pyro.set_rng_seed(seed)
        single.append(-est.loss(lg.model, guide, x))
    single_std = torch.tensor(single).std().item()
    mean, se, _ = batched_neg_loss("sgvb-b", lg.model, guide, x, batches=40, particles=500)
    print(f"\nsgvb-b, exact guide: per-draw std {single_std:.4f}; mean of 20,000 draws {mean:.4f} +- {se:.4f} "
          f"vs sum log p(x) {log_px:.4f} ({(mean - log_px) / se:.2f} SE)")
    assert single_std > 1e-3
    assert abs(mean - log_px) < 4 * se


# --------------------------------------------------------------------------- 3. gradients
GRAD_BATCHES, GRAD_PARTICLES = 25, 800  # 20,000 draws per estimator
PARAMS = ["guide-loc", "guide-log_scale", "model-W", "model-b"]


@pytest.fixture(scope="module")
def gradient_stats():
    """For each estimator: per parameter, (mean gradient of the loss over all draws, its SE, analytic gradient)."""
    with float64_single_thread():
        lg = LinearGaussian()
        x = lg.sample(M, torch.Generator().manual_seed(0))
        loc0, scale0 = lg.offset_guide(LOC_OFFSET, SCALE_MULT).params(x)
        loc = loc0.detach().clone().requires_grad_()
        log_scale = scale0.log().detach().clone().requires_grad_()
        guide = DiagonalGuide(loc=loc, log_scale=log_scale)
        params = [loc, log_scale, lg.W, lg.b]
        # the exact gradient of the loss, -ELBO, from the closed form
        analytic = torch.autograd.grad(-lg.closed_form_elbo(x, loc, log_scale.exp()).sum(), params)
        stats = {}
        for name in ESTIMATORS:
            est = make_estimator(name, num_particles=GRAD_PARTICLES)
            batches = []
            for i in range(GRAD_BATCHES):
                pyro.set_rng_seed(100 + i)
                loss = est.differentiable_loss(lg.model, guide, x)
                batches.append(torch.autograd.grad(loss, params))
            stats[name] = {}
            for j, p in enumerate(PARAMS):
                g = torch.stack([b[j] for b in batches])
                stats[name][p] = (g.mean(0), g.std(0) / math.sqrt(GRAD_BATCHES), analytic[j])
        return stats


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("param", PARAMS)
def test_gradient_matches_closed_form(gradient_stats, name, param):
    mean, se, analytic = gradient_stats[name][param]
    z = (mean - analytic) / se
    rel = (mean - analytic).norm() / analytic.norm()
    print(f"\n{name} d(loss)/d({param}): max |z| = {z.abs().max().item():.2f}, "
          f"relative error (norm) = {rel.item():.2e}, median SE = {se.median().item():.2e}, "
          f"|analytic| = {analytic.norm().item():.3f}")
    assert torch.all(se > 0)
    assert z.abs().max() < 4.5  # each component within a few SEs (SE from 25 batches of 800 draws)
    assert rel < 5e-2  # and close overall (the expected error here is ~1e-2, SE-limited)


# --------------------------------------------------------------------------- VAE helpers
@pytest.fixture
def vae():
    torch.manual_seed(0)
    return build_vae(Recipe(latent_dim=5, hidden_dim=50, init="pytorch"), data_dim=784)


@pytest.fixture
def images():
    return torch.rand(20, 784, generator=torch.Generator().manual_seed(1)).bernoulli()


# --------------------------------------------------------------------------- 4. A against B on the VAE
def test_vae_estimators_agree_in_mean_and_b_has_lower_variance(vae, images):
    assert kl_status(vae.model, vae.guide, images) == "analytic"
    R, M_img = 2000, images.shape[0]
    # R independent single-particle draws of the whole batch's bound: the batch repeated R times.
    # Same seed for A and B: common random numbers, so A - B has a small paired SE.
    draws = {}
    for name, analytic_kl in [("sgvb-a", False), ("sgvb-b", True)]:
        pyro.set_rng_seed(7)
        per_point = elbo_per_datapoint(vae.model, vae.guide, images.repeat(R, 1), num_particles=1,
                                       analytic_kl=analytic_kl)
        draws[name] = per_point.reshape(R, M_img).sum(1)
    a, b = draws["sgvb-a"], draws["sgvb-b"]
    se_a, se_b = a.std().item() / math.sqrt(R), b.std().item() / math.sqrt(R)
    se_paired = (a - b).std().item() / math.sqrt(R)
    diff = (a - b).mean().item()
    ratio = b.var().item() / a.var().item()
    print(f"\nA: mean {a.mean().item():.3f} +- {se_a:.3f}, var {a.var().item():.2f}; "
          f"B: mean {b.mean().item():.3f} +- {se_b:.3f}, var {b.var().item():.2f}; "
          f"mean(A - B) = {diff:.4f} +- {se_paired:.4f} (paired SE); var ratio B/A = {ratio:.4f}")
    assert abs(diff) < 4 * se_paired
    assert abs(diff) < 4 * math.hypot(se_a, se_b)
    assert b.var() < a.var()

    # The registry's estimators (one vectorized call of R particles, fresh noise) agree with those draws.
    for name in ESTIMATORS:
        pyro.set_rng_seed(8)
        value = -make_estimator(name, num_particles=R).loss(vae.model, vae.guide, images)
        ref, se = draws[name].mean().item(), draws[name].std().item() / math.sqrt(R)
        print(f"{name}: vectorized -loss {value:.3f} vs per-draw mean {ref:.3f} ({(value - ref) / se / math.sqrt(2):.2f} SE)")
        assert abs(value - ref) < 4 * math.sqrt(2) * se


@pytest.mark.parametrize("num_particles", [1, 50])
@pytest.mark.parametrize("name", ESTIMATORS)
def test_vae_estimator_equals_elbo_per_datapoint_under_fixed_noise(vae, images, name, num_particles):
    """The estimator's -loss and evaluation.elbo_per_datapoint's sum draw the same z under the same seed."""
    pyro.set_rng_seed(3)
    value = -make_estimator(name, num_particles=num_particles).loss(vae.model, vae.guide, images)
    pyro.set_rng_seed(3)
    ref = elbo_per_datapoint(vae.model, vae.guide, images, num_particles=num_particles,
                             analytic_kl=name == "sgvb-b").sum().item()
    assert value == pytest.approx(ref, rel=1e-10)


# --------------------------------------------------------------------------- 5. beta
def _terms_at_beta_one(vae, images, seed):
    """(reconstruction, KL, log p(z) - log q(z|x)), each summed over the batch, from traces with beta = 1."""
    pyro.set_rng_seed(seed)
    guide_trace = poutine.trace(vae.guide).get_trace(images, beta=1.0)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(images, beta=1.0)
    q, p = guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]
    z = guide_trace.nodes["z"]["value"]
    recon = model_trace.nodes["x"]["fn"].log_prob(images).sum().item()
    kl = kl_divergence(q, p).sum().item()
    log_ratio = (p.log_prob(z) - q.log_prob(z)).sum().item()
    return recon, kl, log_ratio


@pytest.mark.parametrize("name", ESTIMATORS)
def test_beta_scales_the_latent_terms(vae, images, name):
    beta, seed = 0.3, 11
    recon, kl, log_ratio = _terms_at_beta_one(vae, images, seed)
    pyro.set_rng_seed(seed)
    loss = make_estimator(name).loss(vae.model, vae.guide, images, beta=beta)
    expected = -(recon - beta * kl) if name == "sgvb-b" else -(recon + beta * log_ratio)
    print(f"\n{name}: loss {loss:.6f}, expected {expected:.6f} (recon {recon:.3f}, KL {kl:.4f}, "
          f"log p(z) - log q(z|x) {log_ratio:.4f})")
    assert loss == pytest.approx(expected, rel=1e-10, abs=1e-8)
    # and beta really changes the loss (KL is not negligible here)
    assert abs(beta * kl - kl) > 1e-3


# --------------------------------------------------------------------------- 6. num_data
@pytest.mark.parametrize("num_particles", [1, 4])
@pytest.mark.parametrize("name", ESTIMATORS)
def test_num_data_scales_the_loss(vae, images, name, num_particles):
    est = make_estimator(name, num_particles=num_particles)
    pyro.set_rng_seed(5)
    full = est.loss(vae.model, vae.guide, images)
    pyro.set_rng_seed(5)
    scaled = est.loss(vae.model, vae.guide, images, num_data=10 * images.shape[0])
    assert scaled == pytest.approx(10 * full, rel=1e-10)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_num_data_scales_the_loss_linear_gaussian(lg, x, name):
    guide = lg.offset_guide(LOC_OFFSET, SCALE_MULT)
    est = make_estimator(name)
    pyro.set_rng_seed(5)
    full = est.loss(lg.model, guide, x)
    pyro.set_rng_seed(5)
    scaled = est.loss(lg.model, guide, x, num_data=10 * M)
    assert scaled == pytest.approx(10 * full, rel=1e-10)
