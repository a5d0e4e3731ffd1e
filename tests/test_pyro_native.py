"""The VAE as a Pyro user takes it: plain ``SVI`` with ``pyro.optim``, every Pyro ELBO, Pyro's
``ELBOModule`` with ``torch.optim``, ``Predictive``, ``Importance``, ``vectorized_importance_weights``,
``poutine.trace`` and ``render_model``. Nothing here goes through this package's own training loop."""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

import pyro
import pyro.optim
from pyro import poutine
from pyro.infer import (SVI, Importance, JitTrace_ELBO, Predictive, RenyiELBO, Trace_ELBO, TraceGraph_ELBO,
                        TraceMeanField_ELBO)
from pyro.infer.importance import vectorized_importance_weights

import pyro_aevb
from pyro_aevb.data import load_dataset
from pyro_aevb.evaluation.bounds import log_weights

M = 100


@functools.lru_cache(maxsize=None)
def _data():
    ds = load_dataset("mnist-5k")
    gen = torch.Generator().manual_seed(0)
    return torch.bernoulli(ds.train, generator=gen), torch.bernoulli(ds.test[:500], generator=gen)


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _vae(hidden_dim: int = 500, prior: str = "gaussian"):
    pyro.set_rng_seed(0)
    recipe = pyro_aevb.load_recipe(None, {"prior": prior, "hidden_dim": hidden_dim})
    return pyro_aevb.build_vae(recipe, 784)


def _test_bound(vae) -> float:
    return pyro_aevb.average_bound(vae.model, vae.guide, _data()[1]).mean


def _minibatches(steps: int):
    train = _data()[0]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield train[torch.randint(train.shape[0], (M,), generator=gen)]


def test_plain_svi_with_pyro_optim_trains_every_parameter():
    vae = _vae()
    before = _test_bound(vae)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    N = _data()[0].shape[0]
    for x in _minibatches(300):
        svi.step(x, num_data=N)
    store = pyro.get_param_store()
    stored = {id(store[name]) for name in store.keys()}
    named = dict(vae.named_parameters())
    assert {id(p) for p in named.values()} <= stored, [n for n, p in named.items() if id(p) not in stored]
    assert any(n.startswith("prior.") for n in named)  # the learnable prior's too
    after = _test_bound(vae)
    assert after - before > 50, (before, after)


@pytest.mark.parametrize("elbo", [Trace_ELBO(), TraceMeanField_ELBO(), JitTrace_ELBO(),
                                  RenyiELBO(alpha=0.5, num_particles=2, vectorize_particles=True, max_plate_nesting=1),
                                  TraceGraph_ELBO()],
                         ids=["Trace_ELBO", "TraceMeanField_ELBO", "JitTrace_ELBO", "RenyiELBO", "TraceGraph_ELBO"])
def test_every_pyro_elbo_trains_the_pair(elbo):
    vae = _vae(hidden_dim=100)
    before = _test_bound(vae)
    svi = SVI(vae.model, vae.guide, pyro.optim.ClippedAdam({"lr": 3e-3}), elbo)
    for x in _minibatches(100):
        svi.step(x, num_data=4000)
    after = _test_bound(vae)
    assert after - before > 30, (before, after)


def test_elbo_module_with_torch_optim_trains_the_pair():
    """Pyro's Lightning example: ``TraceMeanField_ELBO()(model, guide)`` is an ``nn.Module``."""
    vae = _vae()
    before = _test_bound(vae)
    elbo = TraceMeanField_ELBO()(vae.model, vae.guide)
    params = list(elbo.parameters())
    assert {id(p) for p in params} == {id(p) for p in vae.parameters()}
    optimizer = torch.optim.Adam(params, lr=1e-3)
    for x in _minibatches(300):
        optimizer.zero_grad()
        elbo(x, num_data=4000).backward()
        optimizer.step()
    assert _test_bound(vae) - before > 50


def test_module_local_params_leave_the_param_store_empty():
    with pyro.settings.context(module_local_params=True):
        vae = _vae(hidden_dim=100)
        elbo = Trace_ELBO()(vae.model, vae.guide)
        optimizer = torch.optim.Adam(elbo.parameters(), lr=3e-3)
        before = _test_bound(vae)
        for x in _minibatches(100):
            optimizer.zero_grad()
            elbo(x, num_data=4000).backward()
            optimizer.step()
        assert _test_bound(vae) - before > 30
    assert len(pyro.get_param_store()) == 0


def test_clear_param_store_keeps_the_trained_values_and_two_vaes_never_share():
    a, b = _vae(hidden_dim=50), _vae(hidden_dim=50)
    x = next(_minibatches(1))
    for vae in (a, b):
        poutine.trace(vae.model).get_trace(x)
        poutine.trace(vae.guide).get_trace(x)
    with torch.no_grad():
        a.decoder.logits[0].weight.add_(1.0)  # a and b now differ; the store must not make them equal
    poutine.trace(b.model).get_trace(x)
    assert not torch.equal(a.decoder.logits[0].weight, b.decoder.logits[0].weight)
    saved = b.decoder.logits[0].weight.detach().clone()
    pyro.clear_param_store()
    trace = poutine.trace(b.model).get_trace(x)
    params = [site for site in trace.nodes.values() if site["type"] == "param"]
    assert params and torch.equal(b.decoder.logits[0].weight, saved)
    import copy

    c = copy.deepcopy(b)  # a copy gets its own names
    poutine.trace(c.model).get_trace(x)
    assert len(pyro.get_param_store()) == 2 * len([p for n, p in b.named_parameters() if not n.startswith("encoder")])


def test_predictive_returns_z_and_x_per_sample():
    vae, S = _vae(hidden_dim=50), 7
    x = _data()[1][:M]
    samples = Predictive(vae.model, guide=vae.guide, num_samples=S)(x)
    assert samples["z"].shape == (S, M, 20) and samples["x"].shape == (S, M, 784)
    draws = Predictive(poutine.uncondition(vae.model), guide=vae.guide, num_samples=S, parallel=True)(x)
    assert draws["z"].shape == (S, M, 20) and draws["x"].shape == (S, M, 784)
    assert not torch.equal(draws["x"][0], x) and set(draws["x"].unique().tolist()) <= {0.0, 1.0}


def test_importance_and_vectorized_importance_weights_agree_with_ours():
    vae, K = _vae(hidden_dim=50), 9
    x = _data()[1][:20]
    pyro.set_rng_seed(3)
    log_w, _, _ = vectorized_importance_weights(vae.model, vae.guide, x, num_samples=K, max_plate_nesting=1)
    pyro.set_rng_seed(3)
    ours = log_weights(vae.model, vae.guide, x, K)  # (K, 20) per datapoint; Pyro's sums over the batch
    torch.testing.assert_close(log_w, ours.sum(1), rtol=1e-5, atol=1e-3)
    posterior = Importance(vae.model, guide=vae.guide, num_samples=K).run(x)
    assert torch.isfinite(torch.as_tensor(posterior.get_log_normalizer()))


def test_trace_and_render_model():
    vae = _vae(hidden_dim=20)
    x = _data()[1][:5]
    trace = poutine.trace(vae.model).get_trace(x)
    assert {"z", "x"} <= set(trace.nodes) and trace.nodes["x"]["is_observed"]
    if importlib.util.find_spec("graphviz") is None:
        pytest.skip("graphviz is not installed: pyro.render_model needs it")
    graph = pyro.render_model(vae.model, model_args=(x,))
    assert "z" in graph.source and "x" in graph.source


def test_the_top_level_names_are_honest():
    import subprocess
    import sys

    code = "import pyro_aevb; [getattr(pyro_aevb, n) for n in pyro_aevb.__all__]; print(len(pyro_aevb.__all__))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("log_likelihood", "hmc_log_likelihood", "amortization_gap", "average_bound", "train", "load"):
        assert name in pyro_aevb.__all__


def test_library_functions_show_no_progress_bar_unless_asked(capsys):
    vae = _vae(hidden_dim=20)
    x = _data()[1][:10]
    pyro_aevb.log_likelihood(vae.model, vae.guide, x, num_samples=50)
    assert "log p(x)" not in capsys.readouterr().err
    pyro_aevb.log_likelihood(vae.model, vae.guide, x, num_samples=50, progress=True)
    assert "log p(x)" in capsys.readouterr().err


@pytest.mark.parametrize("prior", ["vamp", "mog"])
def test_plain_svi_and_predictive_with_the_mixture_priors(prior):
    # their density is DiagonalNormalMixture's (a MixtureSameFamily subclass): Pyro's own loop must not notice
    vae = _vae(hidden_dim=50, prior=prior)
    before = _test_bound(vae)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    N = _data()[0].shape[0]
    for x in _minibatches(100):
        svi.step(x, num_data=N)
    assert _test_bound(vae) - before > 50
    samples = Predictive(vae.model, guide=vae.guide, num_samples=3, parallel=True)(_data()[1][:M])
    assert samples["z"].shape == (3, M, 20) and samples["x"].shape == (3, M, 784)
