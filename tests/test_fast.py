"""The fast (traced) path computes exactly what eager Pyro computes, and falls back with a reason."""

import json

import pytest
import torch

import pyro.distributions as dist
from pyro_aevb import priors
from pyro_aevb.config import Recipe, load_recipe
from pyro_aevb.estimators import make_estimator
from pyro_aevb.fast import compile_loss
from pyro_aevb.train import train
from pyro_aevb.vae import build_vae


def _grads(vae):
    return {k: p.grad.clone() for k, p in vae.named_parameters()}


@pytest.mark.parametrize("name", ["sgvb-a", "sgvb-b"])
@pytest.mark.parametrize("particles", [1, 3])
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_compiled_loss_and_gradients_equal_eager_pyro(name, particles, beta, traced_sampler):
    torch.manual_seed(0)
    vae = build_vae(Recipe(latent_dim=5, hidden_dim=40), 784)
    x = torch.rand(30, 784).bernoulli()
    estimator = make_estimator(name, particles)
    compiled, reason = compile_loss(name, vae, estimator, x, num_data=600)
    assert compiled is not None, reason
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
    a = compiled(x, beta)
    b = compiled(x, beta)
    assert a.item() != b.item()  # fresh noise at every call


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


@pytest.mark.parametrize("fast_path", ["auto", "off"])
def test_fast_and_eager_training_agree(tmp_path, fast_path, traced_sampler):
    recipe = load_recipe(None, {"max_samples": 1000, "eval_every": 1000, "hidden_dim": 32, "latent_dim": 2,
                                "kl_warmup": 500, "fast_path": fast_path})
    result = train(recipe, tmp_path / "r", progress=False)
    assert result.run_info["fast_path"] == ("jit" if fast_path == "auto" else 'off (fast_path = "off")')
    ref = train(load_recipe(None, recipe.to_dict() | {"fast_path": "off"}), tmp_path / "ref", progress=False)
    for (k, a), b in zip(result.vae.state_dict().items(), ref.vae.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), k


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
