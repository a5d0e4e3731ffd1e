"""The fast (traced) path computes exactly what eager Pyro computes, and falls back with a reason."""

import json

import pytest
import torch

import pyro.distributions as dist
from pyro_aevb.generative import priors
from pyro_aevb.config import Recipe, load_recipe
from pyro_aevb.infer.registry import make_estimator
from pyro_aevb.training.tracing import compile_loss
from pyro_aevb.training.loop import train
from pyro_aevb.generative.vae import build_vae


def _grads(vae):
    return {k: p.grad.clone() for k, p in vae.named_parameters()}


@pytest.mark.parametrize("backend", ["jit", "inductor"])
@pytest.mark.parametrize("name", ["sgvb-a", "sgvb-b"])
@pytest.mark.parametrize("particles", [1, 3])
def test_compiled_loss_and_gradients_equal_eager_pyro(backend, name, particles):
    torch.manual_seed(0)
    vae = build_vae(Recipe(latent_dim=5, hidden_dim=40), 784)
    x = torch.rand(30, 784).bernoulli()
    estimator = make_estimator(name, particles)
    compiled, reason = compile_loss(name, vae, estimator, x, num_data=600, backend=backend)
    assert compiled is not None, reason
    assert compiled.backend == backend
    for beta in (1.0, 0.3):  # beta is an input of the graph: no re-trace
        for seed in (1, 2):
            torch.manual_seed(seed)
            eager = estimator.differentiable_loss(vae.model, vae.guide, x, num_data=600, beta=beta)
            vae.zero_grad()
            eager.backward()
            g_eager = _grads(vae)
            torch.manual_seed(seed)
            fast = compiled(x, beta)
            vae.zero_grad()
            fast.backward()
            g_fast = _grads(vae)
            assert torch.allclose(fast, eager, rtol=1e-5, atol=0), (fast.item(), eager.item())
            for k in g_eager:
                assert torch.allclose(g_fast[k], g_eager[k], rtol=1e-4, atol=1e-3), k
    torch.manual_seed(3)
    a = compiled(x, 1.0)
    b = compiled(x, 1.0)
    assert a.item() != b.item()  # fresh noise at every call
    if backend == "inductor":  # specialised to the minibatch shape: another one is refused, with the way out
        with pytest.raises(ValueError, match=r"traced for minibatches of shape \(30, 784\), got \(10, 784\).*jit"):
            compiled(x[:10], 1.0)


@pytest.mark.parametrize("prior, options", [("gaussian", {}), ("mog", {"components": 3}), ("vamp", {"components": 4}),
                                            ("flow", {"kind": "affine-autoregressive"})])
def test_compiled_loss_with_each_learned_prior_equals_eager_pyro(prior, options):
    """Priors with parameters (and VampPrior's use of the encoder) are graph inputs too."""
    torch.manual_seed(0)
    vae = build_vae(Recipe(latent_dim=3, hidden_dim=16, prior=prior, prior_options=options), 784)
    x = torch.rand(20, 784).bernoulli()
    estimator = make_estimator("sgvb-a", 2)
    compiled, reason = compile_loss("sgvb-a", vae, estimator, x, num_data=400, backend="inductor")
    assert compiled is not None, reason
    torch.manual_seed(1)
    eager = estimator.differentiable_loss(vae.model, vae.guide, x, num_data=400)
    vae.zero_grad()
    eager.backward()
    g_eager = _grads(vae)
    torch.manual_seed(1)
    fast = compiled(x, 1.0)
    vae.zero_grad()
    fast.backward()
    assert torch.allclose(fast, eager, rtol=1e-5, atol=0), (fast.item(), eager.item())
    for k, g in _grads(vae).items():
        assert torch.allclose(g, g_eager[k], rtol=1e-4, atol=1e-4), k


def test_a_shape_that_depends_on_the_data_is_refused():
    """A spline flow indexes with a boolean mask (how many z fall inside its bound): make_fx would freeze
    that count, so the compiled backend refuses the graph instead of breaking later."""
    torch.manual_seed(0)
    vae = build_vae(Recipe(latent_dim=4, hidden_dim=16, prior="flow", prior_options={"kind": "spline-coupling"}), 784)
    x = torch.rand(30, 784).bernoulli()
    compiled, reason = compile_loss("sgvb-a", vae, make_estimator("sgvb-a", 2), x, num_data=600, backend="inductor")
    assert compiled is None and "a shape depends on the data: aten.index.Tensor with a boolean mask" in reason


def test_compiled_loss_draws_eager_pyros_noise():
    """With no patching at all, a seed gives the compiled loss the very noise eager Pyro draws,
    and an optimizer update reaches the compiled graph (parameters are inputs, not constants)."""
    torch.manual_seed(0)
    vae = build_vae(Recipe(latent_dim=5, hidden_dim=40), 784)
    x = torch.rand(30, 784).bernoulli()
    estimator = make_estimator("sgvb-a")
    compiled, reason = compile_loss("sgvb-a", vae, estimator, x, num_data=600, backend="inductor")
    assert compiled is not None, reason
    for step in range(2):
        torch.manual_seed(10 + step)
        eager = estimator.differentiable_loss(vae.model, vae.guide, x, num_data=600)
        torch.manual_seed(10 + step)
        fast = compiled(x, 1.0)
        assert torch.allclose(fast, eager, rtol=1e-5, atol=0), (fast.item(), eager.item())
        with torch.no_grad():
            vae.decoder.logits[2].bias.add_(0.5)  # what an optimizer step does: in place


def test_auto_compiles_long_cpu_runs_only():
    from pyro_aevb.training.tracing import COMPILE_MIN_STEPS, choose_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_backend("auto", cpu, COMPILE_MIN_STEPS) == "inductor"
    assert choose_backend("auto", cpu, COMPILE_MIN_STEPS - 1) == "jit"
    assert choose_backend("auto", cuda, 10 * COMPILE_MIN_STEPS) == "jit"  # CUDA graphs replay the JIT trace
    assert choose_backend("compile", cpu, 1) == "inductor"
    assert choose_backend("jit", cpu, 10 * COMPILE_MIN_STEPS) == "jit"
    assert choose_backend("off", cpu, 10 * COMPILE_MIN_STEPS) is None


class DynamicPrior(torch.nn.Module):
    """A prior a static trace cannot express."""

    def __init__(self, latent_dim):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))

    def forward(self):
        if torch._C._get_tracing_state():
            raise RuntimeError("value-dependent structure")
        return dist.Normal(self.loc, 1.0).to_event(1)


def test_falls_back_with_a_logged_reason(tmp_path, monkeypatch):
    vae = build_vae(Recipe(latent_dim=2, hidden_dim=8), 784)
    x = torch.rand(4, 784).bernoulli()
    compiled, reason = compile_loss("wake-sleep", vae, None, x, 40)
    assert compiled is None and "wake-sleep" in reason
    monkeypatch.setitem(priors.PRIORS, "dynamic", DynamicPrior)
    result = train(load_recipe(None, {"prior": "dynamic", "max_samples": 200, "eval_every": 200,
                                      "hidden_dim": 16, "latent_dim": 2}), tmp_path / "r", progress=False)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["fast_path"].startswith("eager Pyro: tracing failed") and "value-dependent" in info["fast_path"]
    assert result.run_info["status"] == "complete"


@pytest.mark.parametrize("fast_path, used", [("auto", "jit"), ("compile", "inductor"),
                                             ("off", 'off (fast_path = "off")')])
def test_fast_and_eager_training_agree(tmp_path, fast_path, used):
    # eval_train_size < batch_size: the traced example must still be a full minibatch
    recipe = load_recipe(None, {"max_samples": 1000, "eval_every": 1000, "hidden_dim": 32, "latent_dim": 2,
                                "kl_warmup": 500, "fast_path": fast_path, "eval_train_size": 50})
    result = train(recipe, tmp_path / "r", progress=False)
    assert result.run_info["fast_path"] == used
    ref = train(load_recipe(None, recipe.to_dict() | {"fast_path": "off"}), tmp_path / "ref", progress=False)
    for (k, a), b in zip(result.vae.state_dict().items(), ref.vae.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), k


def test_a_failed_compile_falls_back_to_the_jit(tmp_path, monkeypatch):
    """No working C++ compiler (a bare Windows machine, say): torch.compile fails, training goes on
    with the JIT trace and run.json says why."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # a cached kernel needs no compiler
    recipe = load_recipe(None, {"max_samples": 300, "eval_every": 300, "hidden_dim": 13, "latent_dim": 2,
                                "fast_path": "compile"})
    result = train(recipe, tmp_path / "r", progress=False)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["fast_path"].startswith("jit: torch.compile failed"), info["fast_path"]
    assert result.run_info["status"] == "complete"


@pytest.mark.parametrize("fast_path", ["auto", "off"])
def test_divergence_is_caught_on_both_paths(tmp_path, fast_path):
    """A step size of 1e4 blows the encoder's variance up within a few steps: a clean stop, naming it."""
    from pyro_aevb.errors import TrainingError

    recipe = load_recipe(None, {"max_samples": 2000, "eval_every": 2000, "checkpoint_every": 100,
                                "hidden_dim": 16, "latent_dim": 2, "lr": 1e4, "fast_path": fast_path})
    with pytest.raises(TrainingError, match=r"non-finite loss at step \d+ .*(parameter|site) '"):
        train(recipe, tmp_path / "r", progress=False)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "failed"


def test_a_nan_initial_parameter_is_named(tmp_path):
    from pyro_aevb.errors import TrainingError

    recipe = load_recipe(None, {"max_samples": 300, "eval_every": 300, "hidden_dim": 16, "latent_dim": 2})
    state = build_vae(recipe, 784).state_dict()
    state["decoder.logits.2.bias"][3] = float("nan")
    with pytest.raises(TrainingError, match="parameter 'decoder.logits.2.bias' is non-finite before training"):
        train(recipe, tmp_path / "r", progress=False, initial_state=state)
    assert not (tmp_path / "r").exists()


def test_compile_on_cuda_is_refused_in_one_line(tmp_path, monkeypatch):
    import pyro_aevb.training.setup as training_setup
    from pyro_aevb.errors import ConfigError

    monkeypatch.setattr(training_setup, "resolve_device", lambda name: torch.device(name))  # as if CUDA were here
    with pytest.raises(ConfigError, match='fast_path = "compile" is for the CPU; on CUDA use "auto"'):
        train(load_recipe(None, {"device": "cuda", "fast_path": "compile"}), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
