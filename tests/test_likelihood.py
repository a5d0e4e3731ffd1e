"""pyro_aevb.evaluation.marginal_likelihood.log_likelihood against the linear-Gaussian model's closed-form log p(x), in float64.

* Exact posterior as the guide: every importance weight equals p(x_i), so the
  estimate is exact for every K and every draw, and ESS = K.
* A poor guide: the estimate converges to log p(x_i) per datapoint, rises with
  K (Burda et al. 2016, Theorem 1), and ESS / K approaches 1 / (1 + chi^2).
* Chunking. Draws come from the guide through torch's global RNG, so a different
  chunking draws different numbers; no per-(row, particle) seeding is possible
  for an arbitrary guide. Independence of ``chunk_size`` is therefore shown
  (a) exactly for the streaming accumulation, on a fixed weight matrix and on
  the very weights drawn in a run (kept with ``keep_log_weights``), (b)
  exactly end to end with the exact guide, whose weights do not depend on the
  draws, and (c) within Monte Carlo error end to end with a poor guide.

Every random draw is seeded; tolerances on Monte Carlo quantities are a few SEs.
"""
from __future__ import annotations

import math

import pytest
import torch

import pyro

from linear_gaussian import offset_guide_chi2
from pyro_aevb.evaluation.marginal_likelihood import LikelihoodResult, accumulate, chunk_shape, log_likelihood

M = 5  # datapoints


pytestmark = pytest.mark.usefixtures("float64_single_thread")
@pytest.fixture
def x(lg):
    return lg.sample(M, torch.Generator().manual_seed(0))


def _ll(model, guide, x, k, **kwargs) -> LikelihoodResult:
    return log_likelihood(model, guide, x, k, return_diagnostics=True, progress=False, **kwargs)


# --------------------------------------------------------------------------- exact posterior guide
@pytest.mark.parametrize("num_samples", [1, 7, 100])
def test_exact_guide_gives_exact_log_marginal_and_full_ess(lg, x, num_samples):
    pyro.set_rng_seed(0)
    result = _ll(lg.model, lg.exact_guide, x, num_samples)
    exact = lg.log_marginal(x).detach()
    err = (result.log_likelihood - exact).abs().max().item()
    print(f"\nK={num_samples}: max |estimate - log p(x)| = {err:.1e}, ESS = {result.ess.tolist()}")
    assert result.log_likelihood.shape == (M,)
    assert result.num_samples == num_samples
    assert err < 1e-6
    torch.testing.assert_close(result.ess, torch.full((M,), float(num_samples)), rtol=1e-9, atol=0)


def test_returns_a_tensor_by_default(lg, x):
    estimate = log_likelihood(lg.model, lg.exact_guide, x, 3, progress=False)
    assert isinstance(estimate, torch.Tensor) and estimate.shape == (M,)


# --------------------------------------------------------------------------- a poor guide
#: Wide and shifted: loc + 0.3 (0.6-0.7 posterior sds), 1.5 x the posterior sd. Finite-variance weights.
WIDE = (0.3, 1.5)
#: Shifted by 1.0 (2-2.3 posterior sds): slow, pre-asymptotic convergence, so the rise with K is visible.
SHIFTED = (1.0, 1.0)


def test_poor_guide_converges_per_datapoint_and_ess_matches_chi2(lg):
    x = lg.sample(20, torch.Generator().manual_seed(1))
    guide = lg.offset_guide(*WIDE)
    exact = lg.log_marginal(x).detach()
    loc, scale = guide.params(x)
    gap = (exact - lg.closed_form_elbo(x, loc, scale).detach()).mean().item()
    pyro.set_rng_seed(0)
    result = _ll(lg.model, guide, x, 5000)
    err = result.log_likelihood - exact
    ess_ratio = (result.ess / 5000).mean().item()
    expected_ratio = (1 / (1 + offset_guide_chi2(lg, x, *WIDE))).mean().item()
    sd = math.sqrt(offset_guide_chi2(lg, x, *WIDE)[0].item() / 5000)  # delta method: sd of one estimate
    print(f"\nELBO gap {gap:.3f} nats/datapoint; K=5000: max |error| {err.abs().max().item():.4f} "
          f"(predicted sd {sd:.4f}), mean error {err.mean().item():+.4f}; "
          f"ESS/K {ess_ratio:.4f} vs 1/(1+chi^2) = {expected_ratio:.4f}")
    assert gap > 0.5  # the guide is poor: its bound is far below log p(x)
    assert err.abs().max() < 0.05  # each of the 20 datapoints, about 4 predicted sds
    assert ess_ratio == pytest.approx(expected_ratio, rel=0.03)


def test_estimate_rises_with_num_samples(lg, x):
    """The mean over datapoints rises with K; R replicate rows per datapoint make the rises resolvable.

    Same seed at every K (common random numbers), so each rise is judged by the
    SE of the paired per-row differences.
    """
    replicates = 200
    rows = x.repeat(replicates, 1)  # (R * M, d): independent estimates of each datapoint
    exact = lg.log_marginal(rows).detach()
    guide = lg.offset_guide(*SHIFTED)
    errors = {}
    for k in [1, 10, 100, 1000, 5000]:
        pyro.set_rng_seed(0)
        errors[k] = log_likelihood(lg.model, guide, rows, k, progress=False) - exact
    ks = list(errors)
    lines = [f"K={k}: mean error {errors[k].mean().item():+.4f} +- {errors[k].std().item() / math.sqrt(rows.shape[0]):.4f}"
             for k in ks]
    print("\n" + "\n".join(lines))
    for small, large in zip(ks, ks[1:]):
        diff = errors[large] - errors[small]
        z = diff.mean().item() / (diff.std().item() / math.sqrt(diff.numel()))
        print(f"rise K={small}->{large}: {diff.mean().item():+.4f} ({z:.1f} SE)")
        assert z > 3
    for k in ks:  # a stochastic lower bound: below log p(x) on average
        assert errors[k].mean() < 3 * errors[k].std() / math.sqrt(rows.shape[0])
    assert errors[1].mean() < -1.0  # K = 1 (the ELBO) is clearly below


# --------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("chunk_size", [1, 5, 36, 37, 74, 400, 10_000])
def test_accumulation_is_exact_for_any_chunking(chunk_size):
    k, n = 37, 11
    lw = 10 * torch.randn(k, n, generator=torch.Generator().manual_seed(0)) - 300
    visits = torch.zeros(k, n, dtype=torch.long)

    def weight_fn(r0, r1, k0, k1):
        visits[k0:k1, r0:r1] += 1
        return lw[k0:k1, r0:r1]

    rows, samples = chunk_shape(n, k, chunk_size)
    assert rows * samples <= max(chunk_size, 1)
    lse_w, lse_w2, kept = accumulate(weight_fn, n, k, rows, samples, keep_log_weights=4)
    assert torch.all(visits == 1)
    torch.testing.assert_close(lse_w, lw.logsumexp(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(lse_w2, (2 * lw).logsumexp(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(kept, lw[:, :4], rtol=0, atol=0)


@pytest.mark.parametrize("chunk_size", [3, 7, 250, 100_000])
def test_streamed_estimate_equals_one_shot_formula_on_the_same_draws(lg, x, chunk_size):
    """The K log-weights actually drawn (kept), put through the one-shot formulas, give the streamed result."""
    pyro.set_rng_seed(0)
    result = _ll(lg.model, lg.offset_guide(*WIDE), x, 100, chunk_size=chunk_size, keep_log_weights=M)
    lw = result.log_weights  # (K, M)
    assert lw.shape == (100, M)
    torch.testing.assert_close(result.log_likelihood, lw.logsumexp(0) - math.log(100), rtol=0, atol=1e-10)
    ess = lw.logsumexp(0).mul(2).sub((2 * lw).logsumexp(0)).exp()
    torch.testing.assert_close(result.ess, ess, rtol=1e-10, atol=0)


def test_exact_guide_result_does_not_depend_on_chunk_size(lg, x):
    exact = lg.log_marginal(x).detach()
    results = []
    for chunk_size in [1, 3, 7, 100, 250, 100_000]:  # K-chunks of 1, 3, 7; whole rows of 100; 2 rows; all
        pyro.set_rng_seed(chunk_size)
        results.append(_ll(lg.model, lg.exact_guide, x, 100, chunk_size=chunk_size).log_likelihood)
    spread = max((r - results[0]).abs().max().item() for r in results)
    print(f"\nexact guide: max spread over chunk sizes {spread:.1e}")
    assert spread < 1e-6
    for r in results:
        assert (r - exact).abs().max() < 1e-6


def test_poor_guide_result_does_not_depend_on_chunk_size_beyond_monte_carlo_error(lg, x):
    rows = x.repeat(20, 1)  # 100 rows
    estimates = {}
    for chunk_size in [90, 1000, 100_000]:  # K-chunks of 90 on single rows; 1 row of 1000; all rows at once
        pyro.set_rng_seed(0)
        estimates[chunk_size] = log_likelihood(lg.model, lg.offset_guide(*WIDE), rows, 1000,
                                               chunk_size=chunk_size, progress=False)
    base = estimates[100_000]
    for chunk_size, est in estimates.items():
        diff = est - base
        se = diff.std().item() / math.sqrt(diff.numel())
        print(f"\nchunk_size {chunk_size}: mean {est.mean().item():.4f}, difference from one pass "
              f"{diff.mean().item():+.4f} +- {se:.4f}")
        assert abs(diff.mean().item()) <= 4 * se + 1e-12


def test_the_compiled_passes_give_the_eager_estimates_on_the_same_noise():
    """compile=True records one pass and replays it compiled: the same noise from the same seed, the
    same per-datapoint log-likelihood to float rounding (and the shorter last pass runs eagerly)."""
    import pyro

    from pyro_aevb.config import Recipe
    from pyro_aevb.generative.vae import build_vae

    torch.manual_seed(0)
    vae = build_vae(Recipe(hidden_dim=60, latent_dim=5), 784)
    x = torch.rand(9, 784).bernoulli()  # 9 rows, 2 a pass: 4 compiled passes and a shorter eager one
    results = {}
    for compile in (False, True):
        pyro.set_rng_seed(3)
        results[compile] = log_likelihood(vae.model, vae.guide, x, num_samples=400, chunk_size=800, compile=compile,
                                          return_diagnostics=True, keep_log_weights=3)
    eager, compiled = results[False], results[True]
    assert eager.compiled == "eager" and compiled.compiled == "inductor"
    torch.testing.assert_close(compiled.log_likelihood, eager.log_likelihood, rtol=1e-5, atol=0)
    torch.testing.assert_close(compiled.ess, eager.ess, rtol=1e-3, atol=0)
    torch.testing.assert_close(compiled.log_weights, eager.log_weights, rtol=1e-5, atol=0)
    pyro.set_rng_seed(4)
    other = log_likelihood(vae.model, vae.guide, x, num_samples=400, chunk_size=800, compile=True)
    assert not torch.equal(other, compiled.log_likelihood)  # fresh noise with another seed: the test can fail
