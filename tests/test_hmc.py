"""The Appendix D estimator (pyro_aevb.evaluation.appendix_d) against the linear-Gaussian model's closed forms, in float64.

NUTS chains are short (warm-up 100, 2 x 200 draws per datapoint) to keep the
module to a few seconds a datapoint; every chain is seeded. HMC's posterior
draws themselves are checked against the exact posterior in
``test_diagnostics.py`` (through the ArviZ export).
"""
from __future__ import annotations

import pytest
import torch

import pyro

from linear_gaussian import W_CORRELATED, LinearGaussian
from pyro_aevb.evaluation.appendix_d import fit_gaussian, hmc_log_likelihood, hmc_posterior_samples, log_joint_at
from pyro_aevb.infer.traces import latent_site

L, WARMUP = 200, 100


pytestmark = pytest.mark.usefixtures("float64_single_thread")
def test_log_joint_is_prior_plus_likelihood():
    lg = LinearGaussian(W=W_CORRELATED)
    x = lg.sample(1, torch.Generator().manual_seed(0))
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    expected = lg.prior().log_prob(z) + lg.likelihood(z).log_prob(x)
    assert latent_site(lg.model, x) == ("z", 2)
    torch.testing.assert_close(log_joint_at(lg.model, x, z), expected.detach(), rtol=0, atol=1e-12)
    # a one-dimensional x row is taken as one datapoint
    torch.testing.assert_close(log_joint_at(lg.model, x[0], z), expected.detach(), rtol=0, atol=1e-12)


def test_hmc_log_likelihood_matches_closed_form_on_a_2d_latent():
    """Correlated posterior (full covariance), so the fitted q is a full-covariance Gaussian."""
    lg = LinearGaussian(W=W_CORRELATED)
    x = lg.sample(2, torch.Generator().manual_seed(0))
    pyro.set_rng_seed(0)
    estimate = hmc_log_likelihood(lg.model, x, num_samples=L, warmup_steps=WARMUP)
    exact = lg.log_marginal(x).detach()
    print(f"\nAppendix D (L={L}, warm-up {WARMUP}): {estimate.tolist()} vs exact {exact.tolist()}; "
          f"errors {(estimate - exact).tolist()}")
    assert estimate.shape == (2,)
    assert (estimate - exact).abs().max() < 0.1


def test_datapoints_sharing_one_chain_match_the_closed_form():
    """points_per_chain = 3: one NUTS chain on the product of three posteriors; each datapoint's estimate
    must still match its exact log p(x), as the per-datapoint chains do."""
    lg = LinearGaussian(W=W_CORRELATED)
    x = lg.sample(3, torch.Generator().manual_seed(0))
    pyro.set_rng_seed(0)
    estimate = hmc_log_likelihood(lg.model, x, num_samples=L, warmup_steps=WARMUP, points_per_chain=3)
    exact = lg.log_marginal(x).detach()
    print(f"\nAppendix D, 3 points per chain: errors {(estimate - exact).tolist()}")
    assert estimate.shape == (3,)
    assert (estimate - exact).abs().max() < 0.1
    with pytest.raises(ValueError, match="points_per_chain"):
        hmc_log_likelihood(lg.model, x, num_samples=5, points_per_chain=0)


def test_warns_for_five_or_more_latent_dimensions():
    lg = LinearGaussian(W=torch.eye(6, 5, dtype=torch.float64), b=torch.zeros(6, dtype=torch.float64))
    x = lg.sample(1, torch.Generator().manual_seed(0))
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match="low-dimensional"):
        estimate = hmc_log_likelihood(lg.model, x, num_samples=50, warmup_steps=50)
    assert torch.isfinite(estimate).all()


def test_a_chain_that_does_not_move_is_an_error():
    with pytest.raises(ValueError, match="singular"):
        fit_gaussian(torch.ones(10, 2))


def test_rejects_more_than_one_datapoint_per_chain():
    lg = LinearGaussian()
    with pytest.raises(ValueError, match="one datapoint"):
        hmc_posterior_samples(lg.model, lg.sample(2), num_samples=5, warmup_steps=5)
