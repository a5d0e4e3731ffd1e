"""The diffusion model (issue 18): closed forms of a linear-Gaussian diffusion, the forward marginals, and the
recipe through train / resume / evaluate / sample."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import pyro
import pyro.infer
import pyro.optim

from diffusion_gaussian import DTYPE, exact_elbo, exact_log_marginal, linear_diffusion
from gradients import seeded_loss_and_grads
from pyro_aevb.config import load_recipe
from pyro_aevb.errors import ConfigError
from pyro_aevb.evaluation.bounds import average_bound, bound_values, elbo_per_datapoint
from pyro_aevb.evaluation.marginal_likelihood import log_likelihood
from pyro_aevb.generative.diffusion import Schedule, beta_schedule, build_diffusion
from pyro_aevb.infer.registry import kl_status

ELBOS = {"A": pyro.infer.Trace_ELBO, "B": pyro.infer.TraceMeanField_ELBO}


def _data(n: int = 3, dim: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.5 * torch.randn(n, dim, generator=g, dtype=DTYPE)


def _losses(elbo: str, model, guide, x, draws: int) -> torch.Tensor:
    """``draws`` single-particle evaluations of Pyro's ELBO loss (the negative bound summed over x's rows)."""
    estimator = ELBOS[elbo](max_plate_nesting=3)
    with torch.no_grad():
        return torch.tensor([estimator.loss(model, guide, x) for _ in range(draws)], dtype=DTYPE)


@pytest.mark.parametrize("pair", ["every step", "one step sampled"])
def test_both_estimators_match_the_closed_form_elbo_and_b_has_lower_variance(pair):
    d = linear_diffusion(steps=6, dim=2, time_samples=5 if pair == "every step" else 1, perturb=0.2)
    x = _data()
    exact = -exact_elbo(d, x).sum().item()
    pyro.set_rng_seed(0)
    losses = {name: _losses(name, d.model, d.guide, x, 1500) for name in ELBOS}
    for name, values in losses.items():
        se = values.std().item() / math.sqrt(values.numel())
        assert abs(values.mean().item() - exact) < 3 * se, (name, values.mean().item(), exact, se)
    assert losses["B"].var() < 0.8 * losses["A"].var()
    assert kl_status(d.model, d.guide, x) == "analytic"  # every site's KL is registered: B is exact per site


def test_time_subsampling_is_unbiased_for_the_full_sum():
    """Per datapoint, the time-sampled bound (k = 2 of T - 1 = 7) averages to the every-step bound, and both
    to the closed form; a wrong scale (T - 1)/k would move the mean by the steps' whole KL."""
    d = linear_diffusion(steps=8, dim=3, time_samples=2, perturb=0.2)
    x = _data(4, 3)
    pyro.set_rng_seed(0)
    sampled = torch.stack([elbo_per_datapoint(d.model, d.guide, x, num_particles=200) for _ in range(40)])
    with d.exact():
        every = torch.stack([elbo_per_datapoint(d.model, d.guide, x, num_particles=200) for _ in range(40)])
    exact = exact_elbo(d, x)
    for values in (sampled, every):
        se = values.std(0) / math.sqrt(values.shape[0])
        assert ((values.mean(0) - exact).abs() < 3.5 * se).all(), (values.mean(0), exact, se)
    assert (sampled.std(0) > every.std(0)).all()  # sampling t adds variance, not bias
    assert (exact - exact_log_marginal(d, x) < -1.0).all()  # a real gap: the steps' KLs are not negligible


def test_each_datapoint_draws_its_own_steps_so_the_se_over_datapoints_is_honest():
    """Each row (and particle) draws its own k steps through the site t_uniform (k, L, M), the same in model
    and guide, so rows' bounds are independent: over 40 repeats the SE over datapoints that training reports
    matches the spread of the estimate. (Steps shared by a minibatch's rows would make that SE several
    times too small.)"""
    d = linear_diffusion(steps=8, dim=3, time_samples=1, perturb=0.3)
    x = 0.3 + 0.5 * torch.randn(2000, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    pyro.set_rng_seed(0)
    means, naive = [], []
    for _ in range(40):
        values = bound_values(d.model, d.guide, x, 1, True, 100)
        means.append(values.mean().item())
        naive.append(values.std().item() / math.sqrt(values.numel()))
    spread = torch.tensor(means).std().item()
    assert 0.6 < sum(naive) / len(naive) / spread < 1.6
    guide_trace = pyro.poutine.trace(d.guide).get_trace(x[:100])
    model_trace = pyro.poutine.trace(pyro.poutine.replay(d.model, trace=guide_trace)).get_trace(x[:100])
    u = guide_trace.nodes["t_uniform"]["value"]
    assert u.shape == (1, 1, 100) and torch.equal(model_trace.nodes["t_uniform"]["value"], u)
    assert len(set((u * 7).long().flatten().tolist())) == 7  # 100 rows cover all T - 1 = 7 steps


def test_the_per_step_terms_sum_to_the_bound():
    """bound_terms: L_T + sum_t L_{t-1} + L_0 averages to the closed-form bound; L_T is a KL of closed forms."""
    d = linear_diffusion(steps=6, dim=2, perturb=0.2)
    x = _data(3)
    pyro.set_rng_seed(0)
    draws = [d.bound_terms(x) for _ in range(3000)]
    totals = torch.stack([t["L_T"] + t["L_t"].sum(0) + t["L_0"] for t in draws])  # (draws, M)
    se = totals.std(0) / math.sqrt(totals.shape[0])
    assert ((totals.mean(0) - exact_elbo(d, x)).abs() < 3.5 * se).all()
    assert draws[0]["L_t"].shape == (5, 3)
    ab = d.schedule.alpha_bar[-1]
    kl_T = 0.5 * (ab * x**2 + (1 - ab) - 1 - torch.log(1 - ab)).sum(-1)  # KL(N(sqrt(ab) x, 1 - ab) || N(0, 1))
    assert torch.allclose(draws[0]["L_T"], -kl_T)


def test_the_chain_pair_gives_the_same_bound_and_its_is_estimate_converges_to_log_px():
    d = linear_diffusion(steps=6, dim=2, perturb=0.2)
    x = _data(8)
    exact_px, exact_bound = exact_log_marginal(d, x), exact_elbo(d, x)
    pyro.set_rng_seed(0)
    chain = elbo_per_datapoint(*d.likelihood_pair(), x, num_particles=20_000)
    assert torch.allclose(chain, exact_bound, atol=0.1)
    errors = [(log_likelihood(*d.likelihood_pair(), x, num_samples=k) - exact_px).abs().mean().item()
              for k in (10, 1000, 100_000)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors
    assert (exact_px - exact_bound).mean() > 2.0  # K = 1 is the bound, nats below


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_marginals_sampled_step_by_step_match_the_closed_form(schedule):
    """z_t from the chain, on 2,000 copies of one binarized image (784 pixels): mean sqrt(ab_t)(2x - 1) and
    variance 1 - ab_t, by the average over pixels of the squared standardised errors (about 1 each)."""
    recipe = load_recipe(None, {"model": "diffusion", "model_options": {"schedule": schedule, "width": 8, "depth": 1}})
    d = build_diffusion(recipe, 784)
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(784, generator=g) < 0.3).float().expand(2000, 784)
    torch.manual_seed(0)
    steps = [1, 10, 300, 1000]
    n = x.shape[0]
    for t, z in zip(steps, d.forward_chain(x, steps)):
        loc, scale = d.schedule.marginal(t, 2 * x[0] - 1)
        z = z.double()
        mean_err = (z.mean(0) - loc) / (scale / math.sqrt(n))
        var_err = (z.var(0) - scale**2) / (scale**2 * math.sqrt(2 / (n - 1)))
        assert 0.8 < (mean_err**2).mean() < 1.2 and 0.8 < (var_err**2).mean() < 1.2, (t, mean_err, var_err)
    assert d.schedule.alpha_bar[-1] < 1e-4  # by T the chain is white noise


def test_schedules_and_posteriors_agree_with_their_definitions():
    for kind in ("linear", "cosine"):
        betas = beta_schedule(kind, 50)
        s = Schedule(betas).double()
        assert torch.allclose(s.alpha_bar, torch.cumprod(1 - betas, 0))
        # q(z_{t-1}|z_t, x) by Bayes: N(sqrt(ab_{t-1}) x, 1 - ab_{t-1}) times N(z_t; sqrt(1 - b_t) z_{t-1}, b_t)
        t, x0, zt = 7, torch.tensor(0.4, dtype=DTYPE), torch.tensor(-0.3, dtype=DTYPE)
        ab_prev, b = s.alpha_bar[t - 2], betas[t - 1]
        precision = 1 / (1 - ab_prev) + (1 - b) / b
        mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + (1 - b).sqrt() * zt / b) / precision
        loc, scale = s.posterior(t, zt, x0)
        assert torch.allclose(loc, mean) and torch.allclose(scale**2, 1 / precision)
    with pytest.raises(ConfigError, match="schedule"):
        beta_schedule("quadratic", 10)


def test_pyro_svi_trains_the_pair_towards_the_closed_form_optimum():
    """Pyro's own SVI and pyro.optim on the PyroModule pair: the closed-form bound of the data rises."""
    d = linear_diffusion(steps=5, dim=2, perturb=0.5)
    x = _data(64)
    before = exact_elbo(d, x).mean().item()
    svi = pyro.infer.SVI(d.model, d.guide, pyro.optim.Adam({"lr": 0.02}), pyro.infer.TraceMeanField_ELBO(max_plate_nesting=3))
    pyro.set_rng_seed(0)
    for _ in range(300):
        svi.step(x)
    assert exact_elbo(d, x).mean().item() > before + 0.5


def test_the_traced_training_loss_computes_eager_pyros_and_draws_fresh_steps():
    """The steps are drawn inside the graph (t_uniform), so the time-sampled ELBO traces (the JIT fast path).
    With the Gaussian noise held fixed, the steps are the only draw: seed for seed, the traced loss and
    gradients equal eager Pyro's, for every step and for 4 sampled per datapoint, and another seed draws
    other steps. With the noise sampled too, traced and eager losses agree in distribution (seed for seed
    they differ: the JIT may run the independent draws in another order)."""
    from unittest import mock

    from pyro_aevb.infer.registry import make_estimator
    from pyro_aevb.training.tracing import compile_loss

    def fixed(shape, dtype, device):
        return torch.full(shape, 0.3, dtype=dtype, device=device)

    torch.manual_seed(0)
    x = torch.rand(20, 784).bernoulli()
    estimator = make_estimator("sgvb-b", max_plate_nesting=3)
    for k in (49, 4):  # every step, then 4 sampled per datapoint
        recipe = load_recipe(None, {"model": "diffusion",
                                    "model_options": {"steps": 50, "width": 16, "depth": 1, "time_samples": k}})
        d = build_diffusion(recipe, 784)
        with torch.no_grad():  # away from the zero init, so that every parameter has a gradient
            for p in d.parameters():
                p.add_(0.1 * torch.randn_like(p))
        with mock.patch.object(torch.distributions.normal, "_standard_normal", fixed), \
                mock.patch("pyro_aevb.training.tracing._standard_normal_as_eager", fixed):
            compiled, reason = compile_loss("sgvb-b", d, estimator, x, num_data=600, backend="jit")
            assert compiled is not None, reason
            values = []
            for seed in (1, 2):
                eager, g_eager = seeded_loss_and_grads(
                    d, seed, lambda: estimator.differentiable_loss(d.model, d.guide, x, num_data=600))
                fast, g_fast = seeded_loss_and_grads(d, seed, lambda: compiled(x, 1.0))
                assert torch.allclose(fast, eager, rtol=1e-5, atol=0), (k, fast.item(), eager.item())
                for name, grad in g_fast.items():
                    assert torch.allclose(grad, g_eager[name], rtol=1e-4, atol=1e-4), (k, name)
                values.append(fast.item())
            assert (values[0] != values[1]) == (k == 4)  # only the sampled steps are random
    compiled, reason = compile_loss("sgvb-b", d, estimator, x, num_data=600, backend="jit")
    with torch.no_grad():
        losses = {"eager": torch.tensor([estimator.loss(d.model, d.guide, x, num_data=600) for _ in range(60)]),
                  "traced": torch.stack([compiled(x, 1.0).detach() for _ in range(60)])}
    se = math.sqrt(sum(v.var().item() / v.numel() for v in losses.values()))
    assert abs(losses["eager"].mean().item() - losses["traced"].mean().item()) < 3.5 * se


def test_frey_face_takes_the_gaussian_decoder_and_trains(tmp_path, shared_data):
    """likelihood = "gaussian" gives p(x|z_1) = N(sigmoid(a z_1 + b), e^s) per pixel, scored as scipy scores
    it, and the grey skip: at initialization the KLs of steps 2..10 on Frey Face are a small fraction of
    what the binary skip costs there; a few hundred samples of training raise the exact bound."""
    import scipy.stats

    from pyro_aevb.data import load_dataset
    from pyro_aevb.generative.diffusion import PixelGaussian
    from pyro_aevb.training.loop import train

    recipe = load_recipe(None, {"model": "diffusion", "dataset": "frey-faces", "likelihood": "gaussian",
                                "optimizer": "adam", "lr": 0.01, "max_samples": 3000, "eval_every": 3000,
                                "checkpoint_every": 3000, "batch_size": 50,
                                "model_options": {"steps": 50, "width": 32, "depth": 1}})
    d = build_diffusion(recipe, 560)
    assert isinstance(d.decoder, PixelGaussian)
    z, x = torch.randn(3, 560), torch.rand(3, 560)
    with torch.no_grad():
        d.decoder.log_var.copy_(torch.randn(560))
    mean, sd = d.decoder.mean(z), torch.exp(0.5 * d.decoder.log_var)
    expected = scipy.stats.norm.logpdf(x.numpy(), mean.detach().numpy(), sd.detach().numpy()).sum(-1)
    torch.testing.assert_close(d.decoder(z).log_prob(x).detach().double(), torch.as_tensor(expected),
                               rtol=1e-5, atol=1e-3)
    frey = load_dataset("frey-faces", data_dir=str(shared_data))
    early = {}
    for binary in (True, False):  # the "x" skip for +-1 pixels, and the grey one the Gaussian decoder gets
        torch.manual_seed(0)
        d = build_diffusion(recipe, 560)
        d.reverse.binary = binary
        early[binary] = -d.bound_terms(frey.test[:20])["L_t"][:9].sum(0).mean().item()  # KLs of t = 2..10
    assert early[False] < 0.05 * early[True], early  # a binary skip pushes grey pixels to +-1
    run = train(recipe, tmp_path / "frey", progress=False, dataset=frey)
    assert all(math.isfinite(row["test_elbo"]) for row in run.metrics)
    torch.manual_seed(0)
    exact = [average_bound(*m.evaluation_pair(), frey.test, chunk_size=50).mean for m in (d, run.vae)]
    assert exact[1] > exact[0] + 100, exact  # the exact bound (every step; the time-sampled one is noisy)


def test_recipe_checks_are_one_line():
    with pytest.raises(ConfigError, match="model 'diffusion' trains with estimator"):
        load_recipe(None, {"model": "diffusion", "estimator": "wake-sleep"})
    with pytest.raises(ConfigError, match="model_options"):
        load_recipe(None, {"model": "diffusion", "model_options": {"stepz": 10}})
    with pytest.raises(ConfigError, match="steps must be >= 2"):
        build_diffusion(load_recipe(None, {"model": "diffusion", "model_options": {"steps": 1}}), 4)


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "pyro_aevb", *args], capture_output=True, text=True, **kwargs)


def test_the_recipe_trains_evaluates_and_samples(tmp_path, shared_data):
    """The shipped recipe (T = 1000) for 300 samples, through the CLI: run directory, exact bound and IS
    log-likelihood from evaluate, a PNG grid from sample."""
    env = {**os.environ, "PYRO_AEVB_DATA": str(shared_data), "MPLBACKEND": "Agg"}
    run = tmp_path / "run"
    out = _cli("train", "diffusion_mnist", "--out", str(run), "--no-progress", "--set", "max_samples=300",
               "--set", "eval_every=300", "--set", "checkpoint_every=300", "--set", "eval_train_size=100", env=env)
    assert out.returncode == 0, out.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["kl"] == "analytic" and info["fast_path"] == "jit"  # a short CPU run: the traced ELBO
    out = _cli("evaluate", str(run), "--max-datapoints", "3", "--num-samples", "2", "--json", "--no-progress", env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 3 and math.isfinite(result["elbo"]) and math.isfinite(result["log_likelihood"])
    assert result["compiled"] == "eager"  # the chain pair's passes run eagerly
    out = _cli("sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png"), "--seed", "0", env=env)
    assert out.returncode == 0, out.stderr
    from PIL import Image

    assert Image.open(tmp_path / "s.png").size[0] >= 2 * 28


def test_the_x_parameterization_gets_the_steps_near_t1_right_from_the_start(shared_data):
    """At initialization, on binarized MNIST, the per-pixel posterior skip of the "x" parameterization makes
    the KLs of steps 2..10 vanish, where epsilon = 0 costs hundreds of nats (what the skip is for)."""
    from pyro_aevb.data import load_dataset

    x = load_dataset("binarized-mnist", data_dir=str(shared_data)).test[:20]
    early = {}
    for parameterization in ("x", "epsilon"):
        recipe = load_recipe(None, {"model": "diffusion", "model_options": {"parameterization": parameterization,
                                                                             "width": 16, "depth": 1}})
        torch.manual_seed(0)
        early[parameterization] = -build_diffusion(recipe, 784).bound_terms(x)["L_t"][:9].mean(1).sum().item()
    assert early["x"] < 1.0 and early["epsilon"] > 100, early
    with pytest.raises(ConfigError, match="parameterization"):
        build_diffusion(load_recipe(None, {"model": "diffusion", "model_options": {"parameterization": "v"}}), 4)
