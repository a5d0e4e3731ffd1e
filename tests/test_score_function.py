"""The score-function estimator (pyro_aevb.infer.score_function) against the linear-Gaussian closed forms.

Unbiasedness: with every baseline, the mean of many score-function gradients
equals the analytic gradient of the closed-form ELBO (float64, a few standard
errors, SE from the spread of independent batch means). Also: the loss is the
-ELBO, the guide's z really has no reparameterised path, and the neural
baseline's parameters are trained by the loop's optimizer.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.distributions import kl_divergence

import pyro
import pyro.distributions as dist
from pyro import poutine

from linear_gaussian import DiagonalGuide, LinearGaussian
from pyro_aevb.config import Recipe, load_recipe
from pyro_aevb.data import load_dataset
from pyro_aevb.infer.registry import backward, estimator_parameters, make_estimator
from pyro_aevb.infer.handlers import NonReparam, without_rsample
from pyro_aevb.infer.score_function import ScoreFunctionELBO
from pyro_aevb.infer.traces import plate_scale
from pyro_aevb.training.loop import train
from pyro_aevb.generative.vae import build_vae

M, NUM_DATA = 5, 10  # datapoints of the linear-Gaussian model; num_data = 2M exercises the plate's N/M
PARTICLES, BATCHES = 2000, 25
PARAMS = ["loc", "log_scale", "W", "b"]


pytestmark = pytest.mark.usefixtures("float64_single_thread")
def _setup(beta: float):
    lg = LinearGaussian()
    x = lg.sample(M, torch.Generator().manual_seed(0))
    loc0, scale0 = lg.offset_guide(0.5, 2.0).params(x)  # a poor guide: the gradient is far from 0
    loc = loc0.detach().clone().requires_grad_()
    log_scale = scale0.log().detach().clone().requires_grad_()
    guide = DiagonalGuide(loc=loc, log_scale=log_scale)
    params = [loc, log_scale, lg.W, lg.b]
    scale = log_scale.exp()
    kl = kl_divergence(dist.Normal(loc, scale), dist.Normal(torch.zeros_like(loc), torch.ones_like(loc))).sum(-1)
    elbo = (NUM_DATA / M) * (lg.closed_form_elbo(x, loc, scale) + (1 - beta) * kl).sum()  # E log p(x|z) - beta KL
    analytic = torch.autograd.grad(-elbo, params)
    return lg, x, guide, params, analytic, elbo.item()


@pytest.mark.parametrize("baseline,beta", [("none", 1.0), ("decaying-average", 1.0), ("neural", 1.0),
                                           ("decaying-average", 0.5)],
                         ids=["none", "decaying-average", "neural", "decaying-average-beta0.5"])
def test_gradient_is_unbiased(baseline, beta):
    lg, x, guide, params, analytic, elbo = _setup(beta)
    est = make_estimator("score-function", num_particles=PARTICLES, baseline=baseline, data_dim=3, hidden_dim=8)
    if baseline == "neural":  # an untrained net starts at 0; make it a real, x-dependent baseline
        torch.nn.init.normal_(est.baseline_net.net[2].weight, std=3.0)
        assert est.baseline_net(x).std() > 0.1
    grads, losses = [], []
    for i in range(BATCHES):
        for p in params:
            p.grad = None
        pyro.set_rng_seed(100 + i)
        losses.append(est.loss_and_grads(lg.model, guide, x, num_data=NUM_DATA, beta=beta))
        grads.append([p.grad.clone() for p in params])
    for j, name in enumerate(PARAMS):
        g = torch.stack([b[j] for b in grads])
        mean, se = g.mean(0), g.std(0) / math.sqrt(BATCHES)
        z = (mean - analytic[j]) / se
        rel = (mean - analytic[j]).norm() / analytic[j].norm()
        print(f"\n{baseline} beta={beta} d(loss)/d({name}): max |z| = {z.abs().max().item():.2f}, "
              f"rel. error {rel.item():.2e}, median SE {se.median().item():.2e}, |analytic| {analytic[j].norm().item():.3f}")
        assert torch.all(se > 0)
        assert z.abs().max() < 4.5
        assert rel < 0.1
    losses = torch.tensor(losses)
    loss_se = losses.std().item() / math.sqrt(BATCHES)
    print(f"mean loss {losses.mean().item():.4f} +- {loss_se:.4f}, closed-form -ELBO {-elbo:.4f}")
    assert abs(losses.mean().item() + elbo) < 4 * loss_se  # the loss is the (beta-)ELBO's -estimate
    assert not any(k.startswith("__baseline") for k in pyro.get_param_store().keys())


def test_baselines_reduce_variance_on_the_linear_gaussian():
    """Same draws (seeds) for each baseline: the decaying average cuts the variance of the loc gradient."""
    lg, x, guide, params, _, _ = _setup(1.0)
    variances = {}
    for baseline in ("none", "decaying-average"):
        est = make_estimator("score-function", num_particles=1, baseline=baseline)
        gs = []
        for i in range(250):
            params[0].grad = None
            pyro.set_rng_seed(i)
            est.loss_and_grads(lg.model, guide, x, num_data=NUM_DATA)
            gs.append(params[0].grad.clone())
        variances[baseline] = torch.stack(gs[30:]).var(0).mean().item()  # after the average has warmed up
    print(f"\nloc-gradient variance: {variances}")
    assert variances["decaying-average"] < 0.5 * variances["none"]


def test_without_rsample_copies_and_detaches():
    loc = torch.zeros(4, 2, requires_grad=True)
    fn = dist.Normal(loc, 1.0).to_event(1)
    new = without_rsample(fn)
    assert fn.has_rsample and not new.has_rsample  # the original is untouched
    assert not new().requires_grad and fn().requires_grad
    assert new.log_prob(torch.ones(4, 2)).requires_grad  # the score function still has a path
    ld, sf, ent = new.score_parts(torch.ones(4, 2))
    assert torch.is_tensor(sf) and not torch.is_tensor(ent)  # REINFORCE term, no pathwise term


def test_non_reparam_leaves_model_replay_and_observations_alone():
    lg = LinearGaussian()
    x = lg.sample(M, torch.Generator().manual_seed(0))
    with NonReparam():
        guide_trace = poutine.trace(lg.exact_guide).get_trace(x, num_data=NUM_DATA)
        model_trace = poutine.trace(poutine.replay(lg.model, trace=guide_trace)).get_trace(x, num_data=NUM_DATA)
    assert not guide_trace.nodes["z"]["fn"].has_rsample
    assert model_trace.nodes["z"]["fn"].has_rsample  # replayed: untouched
    assert model_trace.nodes["x"]["fn"].has_rsample  # observed: untouched
    assert plate_scale(guide_trace.nodes["z"]) == NUM_DATA / M


def test_decaying_average_is_the_estimators_own_state():
    lg = LinearGaussian()
    x = lg.sample(M, torch.Generator().manual_seed(0))
    guide = lg.offset_guide(0.5, 2.0)
    a = make_estimator("score-function", baseline="decaying-average")
    b = make_estimator("score-function", baseline="decaying-average", baseline_beta=0.5)
    pyro.set_rng_seed(0)
    a.loss_and_grads(lg.model, guide, x)
    a.loss_and_grads(lg.model, guide, x)
    b.loss_and_grads(lg.model, guide, x)
    assert a.averages["z"].shape == (M,) and b.averages["z"].shape == (M,)
    assert not torch.allclose(a.averages["z"], b.averages["z"])
    assert not any(k.startswith("__baseline") for k in pyro.get_param_store().keys())
    a.loss_and_grads(lg.model, guide, x[:3])  # a new batch shape restarts the average instead of failing
    assert a.averages["z"].shape == (3,)


# --------------------------------------------------------------------------- the VAE and the loop
@pytest.fixture
def vae():
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    return build_vae(Recipe(latent_dim=2, hidden_dim=16, init="pytorch"), data_dim=784)


def test_neural_baseline_parameters_get_gradients_and_change(vae):
    torch.set_default_dtype(torch.float32)
    images = torch.rand(20, 784, generator=torch.Generator().manual_seed(1)).bernoulli()
    est = make_estimator("score-function", baseline="neural", data_dim=784, hidden_dim=16)
    params = estimator_parameters(est)
    assert len(params) == 4 and params == list(est.baseline_net.parameters())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adagrad(list(vae.parameters()) + params, lr=0.02)
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        loss = backward(est, vae.model, vae.guide, images, num_data=200)
        assert torch.isfinite(loss)
        if step > 0:  # the output layer starts at 0, so the hidden layer's first gradient is 0
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))


def test_neural_baseline_needs_data_dim():
    from pyro_aevb.errors import ConfigError

    with pytest.raises(ConfigError, match="data_dim"):
        make_estimator("score-function", baseline="neural")
    with pytest.raises(ConfigError, match="unknown baseline"):
        make_estimator("score-function", baseline="average")


@functools.lru_cache(maxsize=None)
def _mnist5k():
    return load_dataset("mnist-5k")


@pytest.mark.parametrize("baseline", ["none", "decaying-average", "neural"])
def test_trains_the_tiny_default_recipe(tmp_path, baseline):
    torch.set_default_dtype(torch.float32)
    options = {"baseline": baseline} | ({"data_dim": 784} if baseline == "neural" else {})
    recipe = load_recipe(None, {"estimator": "score-function", "estimator_options": options, "max_samples": 300,
                                "eval_every": 300, "hidden_dim": 32, "latent_dim": 2, "eval_train_size": 500})
    result = train(recipe, tmp_path / "run", progress=False, dataset=_mnist5k())
    row = result.metrics[-1]
    assert row["samples"] == 300 and math.isfinite(row["train_elbo"]) and math.isfinite(row["test_elbo"])
    assert isinstance(make_estimator("score-function", **options), ScoreFunctionELBO)
