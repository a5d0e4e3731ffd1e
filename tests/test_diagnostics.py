"""PSIS k-hat, the ArviZ exports and likelihood_summary (pyro_aevb.evaluation.diagnostics).

k-hat and the exports are checked on the linear-Gaussian model (float64),
where the exact posterior is known; likelihood_summary on a tiny VAE (float32).
"""
from __future__ import annotations

import json
import math

import arviz as az
import numpy as np
import pytest
import torch

import pyro

from linear_gaussian import LinearGaussian
from pyro_aevb.config import Recipe
from pyro_aevb.evaluation.diagnostics import (
    guide_inference_data,
    hmc_inference_data,
    khat_summary,
    likelihood_summary,
    psis_khat,
)
from pyro_aevb.evaluation.bounds import log_weights
from pyro_aevb.generative.vae import build_vae

M = 5


@pytest.fixture
def float64():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture
def lg(float64):
    return LinearGaussian()


@pytest.fixture
def x(lg):
    return lg.sample(M, torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- k-hat
def _khat(lg, guide, x, k=5000, seed=0):
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        return psis_khat(log_weights(lg.model, guide, x, k))


def test_khat_of_the_exact_guide_is_good(lg, x):
    khat = _khat(lg, lg.exact_guide, x)
    print(f"\nexact guide: k-hat {khat.tolist()}")
    assert khat.shape == (M,)
    assert torch.all(khat < 0.5)  # all weights equal: -inf by definition (see psis_khat)


def test_khat_of_a_slightly_wide_guide_is_good(lg, x):
    """1.2 x the posterior sd: bounded weights, so the fitted k-hat is below 0 in theory, < 0.5 in practice."""
    khat = _khat(lg, lg.offset_guide(0.0, 1.2), x)
    print(f"\n1.2 x posterior sd: k-hat {khat.tolist()}")
    assert torch.isfinite(khat).all()
    assert torch.all(khat < 0.5)


def test_khat_of_a_far_too_narrow_guide_is_bad(lg, x):
    """0.1 x the posterior sd: the ratio p/q grows like exp(c z^2); tail shape 1 - 0.1^2 = 0.99 in theory.

    A k-hat from 10,000 draws has a sd of about 0.12 here (seeds 0-5 at K=5000: mean 0.94, sd 0.14), so
    the average over the datapoints is held to > 0.7 and each datapoint only to > 0.5 (not good).
    """
    khat = _khat(lg, lg.offset_guide(0.0, 0.1), x, k=10_000)
    print(f"\n0.1 x posterior sd: k-hat {khat.tolist()}, mean {khat.mean().item():.3f}")
    assert khat.mean() > 0.7
    assert torch.all(khat > 0.5)
    summary = khat_summary(khat)
    assert summary["counts"]["good"] == 0 and summary["mean"] > 0.7


def test_khat_uses_the_sample_dimension_of_arviz():
    """Columns are datapoints; ArviZ wants samples last, so (K, M) is transposed before psislw."""
    gen = torch.Generator().manual_seed(0)
    lw = torch.stack([torch.randn(2000, generator=gen), 3 * torch.randn(2000, generator=gen)], 1).double()  # (K, 2)
    expected = az.psislw(lw.T.numpy().copy())[1]
    torch.testing.assert_close(psis_khat(lw), torch.as_tensor(expected, dtype=torch.float64))
    assert psis_khat(lw)[1] > psis_khat(lw)[0]  # the heavier log-normal tail has the larger k-hat


def test_khat_summary_bins():
    khat = torch.tensor([-math.inf, 0.3, 0.5, 0.6, 0.7, 0.9, 1.0, 1.5, math.nan])
    summary = khat_summary(khat)
    assert summary["n"] == 9
    assert summary["counts"] == {"good": 3, "ok": 2, "bad": 2, "very_bad": 2}
    assert summary["fractions"]["good"] == pytest.approx(3 / 9)
    assert sum(summary["fractions"].values()) == pytest.approx(1.0)
    assert summary["max"] == 1.5  # over the fitted (non-NaN) values
    json.dumps(summary)


# --------------------------------------------------------------------------- ArviZ exports
def test_guide_inference_data_groups_dims_and_shapes(lg, x):
    pyro.set_rng_seed(0)
    idata = guide_inference_data(lg.exact_guide, x, num_samples=300)
    assert set(idata.groups()) == {"posterior", "observed_data"}
    z = idata.posterior["z"]
    assert z.dims == ("chain", "draw", "datapoint", "latent")
    assert z.shape == (1, 300, M, 2)
    assert idata.observed_data["x"].dims == ("datapoint", "feature")
    np.testing.assert_allclose(idata.observed_data["x"].values, x.numpy())
    # draws really come from q(z|x_i): the mean of each datapoint's draws is near the exact posterior mean
    mu, cov = lg.posterior(x)
    se = cov.detach().diagonal().sqrt().numpy() / math.sqrt(300)
    assert np.all(np.abs(z.mean(("chain", "draw")).values - mu.detach().numpy()) < 5 * se)


@pytest.fixture(scope="module")
def hmc_idata():
    """Two chains of NUTS (warm-up 100, 250 draws) for each of 2 datapoints, in float64."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        lg = LinearGaussian()
        x = lg.sample(2, torch.Generator().manual_seed(0))
        pyro.set_rng_seed(0)
        return lg, x, hmc_inference_data(lg.model, x, num_samples=250, warmup_steps=100, num_chains=2)
    finally:
        torch.set_default_dtype(dtype)


def test_hmc_inference_data_groups_dims_and_shapes(hmc_idata):
    _, _, idata = hmc_idata
    assert set(idata.groups()) == {"posterior", "sample_stats", "observed_data"}
    assert idata.posterior["z"].dims == ("chain", "draw", "datapoint", "latent")
    assert idata.posterior["z"].shape == (2, 250, 2, 2)
    assert idata.sample_stats["diverging"].dims == ("chain", "draw", "datapoint")
    assert idata.sample_stats["diverging"].dtype == bool
    rhat = az.rhat(idata)["z"].values
    ess = az.ess(idata)["z"].values
    print(f"\nHMC: r-hat {rhat.ravel().round(3).tolist()}, bulk ESS {ess.ravel().round(0).tolist()}")
    assert rhat.shape == (2, 2) and np.all(rhat < 1.05)
    assert np.all(ess > 100)


def test_hmc_and_exact_guide_posterior_means_agree(hmc_idata, float64):
    lg, x, hmc = hmc_idata
    pyro.set_rng_seed(1)
    guide = guide_inference_data(lg.exact_guide, x, num_samples=4000)
    hmc_mean = hmc.posterior["z"].mean(("chain", "draw")).values
    hmc_mcse = az.mcse(hmc, method="mean")["z"].values  # (datapoint, latent), from the chains' ESS
    guide_mean = guide.posterior["z"].mean(("chain", "draw")).values
    guide_se = guide.posterior["z"].std(("chain", "draw")).values / math.sqrt(4000)
    z = (hmc_mean - guide_mean) / np.sqrt(hmc_mcse**2 + guide_se**2)
    print(f"\nposterior means: HMC {hmc_mean.round(4).tolist()} vs exact guide {guide_mean.round(4).tolist()}; "
          f"z = {z.round(2).tolist()}")
    assert np.all(np.abs(z) < 4)
    # and the spreads agree to within 15%
    hmc_sd = hmc.posterior["z"].std(("chain", "draw")).values
    guide_sd = guide.posterior["z"].std(("chain", "draw")).values
    np.testing.assert_allclose(hmc_sd, guide_sd, rtol=0.15)


# --------------------------------------------------------------------------- likelihood_summary
def test_likelihood_summary_on_a_tiny_vae():
    torch.manual_seed(0)
    vae = build_vae(Recipe(latent_dim=2, hidden_dim=16), 784)
    images = torch.rand(12, 784, generator=torch.Generator().manual_seed(1)).bernoulli()
    pyro.set_rng_seed(0)
    # chunk_size 250 < K * 12: passes of 2 datapoints x 100 samples
    summary = likelihood_summary(vae.model, vae.guide, images, num_samples=100, chunk_size=250, khat_points=5,
                                 progress=False)
    print(f"\n{json.dumps(summary)}")
    assert set(summary) == {"log_likelihood", "log_likelihood_se", "n", "num_samples", "ess_mean", "ess_min", "khat",
                            "compiled"}
    assert summary["n"] == 12 and summary["num_samples"] == 100
    for key in ["log_likelihood", "log_likelihood_se", "ess_mean", "ess_min"]:
        assert math.isfinite(summary[key]), key
    assert 1 <= summary["ess_min"] <= summary["ess_mean"] <= 100
    assert summary["khat"]["n"] == 5 and math.isfinite(summary["khat"]["max"])
    assert sum(summary["khat"]["counts"].values()) == 5
    json.loads(json.dumps(summary))
