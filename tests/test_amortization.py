"""pyro_aevb.evaluation.amortization against the linear-Gaussian model's closed forms (float64).

The default W has orthogonal columns, so the exact posterior is a diagonal
Gaussian: the guide's family contains it, the approximation gap is 0, and
ELBO(q*_i) = log p(x_i).

* Exact-posterior encoder: both gaps are 0 (within Monte Carlo error), and q*_i
  stays at the posterior.
* Biased encoder (loc offset, wrong scale): the amortization gap equals
  KL(q || p(z|x_i)) = log p(x_i) - ELBO(q), computed in closed form, and the
  local optimisation closes it: ELBO(q*_i) reaches log p(x_i).

A tiny VAE checks the API on the real model/guide pair.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import pyro

from pyro_aevb.evaluation.amortization import AmortizationGap, amortization_gap, amortization_gap_summary, local_guide
from pyro_aevb.config import Recipe
from pyro_aevb.evaluation.bounds import elbo_per_datapoint
from pyro_aevb.generative.vae import build_vae

M = 5
#: Loc shifted by 1.0 (2-2.6 posterior sds), 1.5 x the posterior sd: a clearly suboptimal encoder.
BIASED = (1.0, 1.5)


pytestmark = pytest.mark.usefixtures("float64_single_thread")
@pytest.fixture
def x(lg):
    return lg.sample(M, torch.Generator().manual_seed(0))


def _gap(lg, guide, x, **kwargs) -> AmortizationGap:
    options = dict(num_steps=300, lr=0.05, num_samples=2000, elbo_particles=10, eval_particles=2000)
    options.update(kwargs)
    pyro.set_rng_seed(0)
    return amortization_gap(lg.model, guide, x, **options)


# --------------------------------------------------------------------------- exact-posterior encoder
def test_exact_encoder_has_no_gaps(lg, x):
    result = _gap(lg, lg.exact_guide, x)
    exact = lg.log_marginal(x).detach()
    mu, cov = lg.posterior(x)
    print(f"\napproximation gap {result.approximation_gap.tolist()}"
          f"\namortization gap {result.amortization_gap.tolist()}")
    # Estimator A has zero variance at the exact posterior: ELBO(q_phi) = log p(x) to rounding.
    torch.testing.assert_close(result.elbo_amortized, exact, rtol=0, atol=1e-9)
    # q*_i starts at the posterior and stays there, up to the optimiser's noise.
    assert (result.locs["z"] - mu).abs().max() < 0.05
    assert (result.scales["z"] / cov.diagonal().sqrt() - 1).abs().max() < 0.1
    assert result.approximation_gap.abs().max() < 0.02
    assert result.amortization_gap.abs().max() < 0.02
    assert result.log_likelihood.sub(exact).abs().max() < 0.01
    assert result.ess.min() > 0.9 * 2000


def test_exact_encoder_as_proposal_gives_exact_log_likelihood(lg, x):
    """Importance sampling from the exact posterior: every weight is p(x_i), for any chunking."""
    exact = lg.log_marginal(x).detach()
    for num_samples, chunk_size in ((10, 7), (50, 20), (10, 1000)):  # one row per pass, particle chunks, all rows
        result = _gap(lg, lg.exact_guide, x, num_steps=2, num_samples=num_samples, chunk_size=chunk_size,
                      eval_particles=3, proposal="amortized")
        torch.testing.assert_close(result.log_likelihood, exact, rtol=0, atol=1e-9)
        torch.testing.assert_close(result.ess, torch.full((M,), float(num_samples)), rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- biased encoder
def test_biased_encoder_gap_is_the_kl_and_local_optimisation_closes_it(lg, x):
    guide = lg.offset_guide(*BIASED)
    exact = lg.log_marginal(x).detach()
    elbo_biased = lg.closed_form_elbo(x, *guide.params(x)).detach()
    kl = exact - elbo_biased  # KL(q || p(z|x_i)), closed form: the whole gap, all of it amortization
    result = _gap(lg, guide, x, eval_particles=20_000)
    print(f"\nKL {kl.tolist()}\namortization gap {result.amortization_gap.tolist()}"
          f"\napproximation gap {result.approximation_gap.tolist()}")
    assert kl.min() > 2.0  # clearly positive
    # The estimated ELBO of the biased encoder: estimator A's sd is ~4.6 nats per draw, so SE ~0.03.
    assert (result.elbo_amortized - elbo_biased).abs().max() < 0.15
    assert (result.amortization_gap - kl).abs().max() < 0.15
    assert abs(result.amortization_gap.mean() - kl.mean()) < 0.07
    # q*_i is the exact posterior, so its closed-form ELBO is log p(x_i) ...
    elbo_local = lg.closed_form_elbo(x, result.locs["z"], result.scales["z"]).detach()
    assert (elbo_local - exact).abs().max() < 5e-3
    # ... and the estimated ELBO(q*_i) and log p(x_i) agree with it: the approximation gap is 0.
    assert (result.elbo_optimized - exact).abs().max() < 0.02
    assert result.approximation_gap.abs().max() < 0.02
    assert (result.log_likelihood - exact).abs().max() < 0.01
    # The optimised guide, for a subset of rows, is the posterior of those rows (estimator A: zero variance).
    rows = [3, 1]
    elbo_rows = elbo_per_datapoint(lg.model, result.optimized_guide(guide, rows), x[rows], 10, analytic_kl=False)
    torch.testing.assert_close(elbo_rows, exact[rows], rtol=0, atol=0.02)


def test_summary_is_json_and_consistent(lg, x):
    result = _gap(lg, lg.offset_guide(*BIASED), x, num_steps=50, num_samples=100, eval_particles=100)
    summary = json.loads(json.dumps(result.summary()))
    assert summary["n"] == M
    for key in ("log_likelihood", "elbo_amortized", "elbo_optimized", "approximation_gap", "amortization_gap",
                "inference_gap"):
        assert math.isfinite(summary[key]) and math.isfinite(summary[f"{key}_se"])
    assert summary["inference_gap"] == pytest.approx(summary["approximation_gap"] + summary["amortization_gap"])
    assert summary["amortization_fraction"] == pytest.approx(summary["amortization_gap"] / summary["inference_gap"])
    assert summary["num_samples"] == 100 and summary["num_steps"] == 50 and summary["proposal"] == "optimized"
    assert result.elbo_history.shape == (50,)
    assert result.elbo_history[-10:].mean() > result.elbo_history[:5].mean()  # the optimisation climbs


def test_local_guide_keeps_plate_and_replaces_the_site(lg, x):
    loc = torch.zeros(M, 2)
    log_scale = torch.full((M, 2), math.log(0.5))
    q = local_guide(lg.exact_guide, {"z": (loc, log_scale, 1)})
    with pyro.plate("particles", 7, dim=-2):
        trace = pyro.poutine.trace(q).get_trace(x)
    site = trace.nodes["z"]
    assert site["value"].shape == (7, M, 2)
    assert site["fn"].batch_shape == (7, M) and site["fn"].event_shape == (2,)
    assert {f.name for f in site["cond_indep_stack"]} == {"data", "particles"}  # the guide's own plate, kept
    torch.testing.assert_close(site["fn"].base_dist.scale, torch.full((7, M, 2), 0.5))
    # ELBO of the local guide, in closed form vs. the traces (estimator B, 20k draws).
    pyro.set_rng_seed(1)
    estimate = elbo_per_datapoint(lg.model, q, x, 20_000, analytic_kl=True)
    closed = lg.closed_form_elbo(x, loc, log_scale.exp()).detach()
    assert (estimate - closed).abs().max() < 0.1


def test_summary_on_a_fixed_subset(lg, x):
    """The evaluate command's entry point: a JSON dict on the same seeded subset of rows every time."""
    options = dict(num_points=3, num_steps=5, num_samples=10, eval_particles=10, proposal="amortized")
    pyro.set_rng_seed(0)
    first = amortization_gap_summary(lg.model, lg.exact_guide, x, **options)
    pyro.set_rng_seed(0)
    again = amortization_gap_summary(lg.model, lg.exact_guide, x, **options)
    assert json.loads(json.dumps(first)) == again
    assert first["n"] == 3 and first["subset_seed"] == 0
    rows = torch.randperm(M, generator=torch.Generator().manual_seed(0))[:3]
    assert first["log_likelihood"] == pytest.approx(lg.log_marginal(x[rows]).mean().item(), abs=1e-6)
    assert amortization_gap_summary(lg.model, lg.exact_guide, x, num_points=100, num_steps=1, num_samples=2,
                                    eval_particles=2)["n"] == M  # more than N: all rows
    with pytest.raises(ValueError, match="num_points"):
        amortization_gap_summary(lg.model, lg.exact_guide, x, num_points=0)


# --------------------------------------------------------------------------- errors
def test_rejects_a_non_diagonal_guide_and_bad_options(lg, x):
    with pytest.raises(ValueError, match="diagonal Normal"):
        amortization_gap(lg.model, lg.exact_mvn_guide, x, num_steps=1)
    with pytest.raises(ValueError, match="proposal"):
        amortization_gap(lg.model, lg.exact_guide, x, proposal="prior")
    with pytest.raises(ValueError, match="num_samples"):
        amortization_gap(lg.model, lg.exact_guide, x, num_samples=0)
    with pytest.raises(ValueError, match="shape"):
        amortization_gap(lg.model, lg.exact_guide, x[0])


# --------------------------------------------------------------------------- the VAE
def test_tiny_vae_model_unchanged_and_gap_non_negative():
    torch.set_default_dtype(torch.float32)
    pyro.set_rng_seed(0)
    vae = build_vae(Recipe(latent_dim=2, hidden_dim=16), data_dim=12)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    x = torch.rand(6, 12).bernoulli()
    result = amortization_gap(vae.model, vae.guide, x, num_steps=100, lr=0.05, num_samples=200, eval_particles=500)
    print(f"\n{result.summary()}")
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(p.grad is None for p in vae.parameters())
    assert result.log_likelihood.shape == result.elbo_amortized.shape == result.elbo_optimized.shape == (6,)
    assert result.locs["z"].shape == result.scales["z"].shape == (6, 2)
    assert torch.isfinite(result.log_likelihood).all()
    # Optimising each q_i can only help (up to the evaluation's Monte Carlo error).
    assert result.amortization_gap.mean() > -0.05
    assert result.approximation_gap.mean() > -0.05
