"""The GPU step (one CUDA graph) on a CPU machine: the captured body computes what the ordinary loop
computes, a failed capture falls back with its reason, and deferred finiteness checks stop a run at
the right step with a finite checkpoint on disk."""

import json

import pytest
import torch

import pyro_aevb.training.setup as training_setup
import pyro_aevb.training.steps as steps_module
from pyro_aevb.generative import priors
from pyro_aevb.training.checkpoint import load_checkpoint
from pyro_aevb.config import load_recipe
from pyro_aevb.training.cuda_graphs import WARMUP_STEPS, capture_plan
from pyro_aevb.errors import ConfigError, TrainingError
from pyro_aevb.training.loop import train
from pyro_aevb.training.setup import make_optimizer

from test_reliability import PoisonedPrior

SMALL = {"max_samples": 2000, "eval_every": 1000, "checkpoint_every": 1000, "hidden_dim": 24,
         "latent_dim": 3, "eval_train_size": 500}


def _final(result):
    return {k: v.detach().clone() for k, v in result.vae.state_dict().items()}


def test_capture_plan_names_what_stands_in_the_way():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "CUDA" in capture_plan(load_recipe(None), "sgvb-b", cpu)
    assert capture_plan(load_recipe(None), "sgvb-b", cuda) is None
    assert capture_plan(load_recipe(None), "sgvb-a", cuda) is None
    assert "wake-sleep" in capture_plan(load_recipe(None), "wake-sleep", cuda)
    assert "skip" in capture_plan(load_recipe(None, {"on_nan": "skip"}), "sgvb-b", cuda)
    assert "off" in capture_plan(load_recipe(None, {"fast_path": "off"}), "sgvb-b", cuda)


@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_capturable_optimizers_take_the_same_steps(name):
    torch.manual_seed(0)
    recipe = load_recipe(None, {"optimizer": name, "lr": 0.05})
    a = [torch.randn(30, 7, requires_grad=True), torch.randn(7, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    start = [p.detach().clone() for p in a]
    opt_a, opt_b = make_optimizer(recipe, a), make_optimizer(recipe, b, capturable=True)
    if name == "adagrad":  # fused: its step count stays on the device (Adam's capturable needs a GPU)
        assert opt_b.param_groups[0]["fused"]
    for _ in range(5):
        g = [torch.randn_like(p) for p in a]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        opt_a.step()
        opt_b.step()
    for p, q, p0 in zip(a, b, start):
        assert (p - p0).abs().max() > 0.05  # both moved, and by the same steps
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_failed_capture_falls_back_and_trains_as_the_ordinary_loop(tmp_path, monkeypatch):
    """Force the CUDA-graph path on a CPU: the warm-up steps run the step's body eagerly, capture then
    fails (the data is not on a GPU), the run says why and goes on; the result equals eager Pyro's."""
    warm = SMALL | {"kl_warmup": 1500}  # beta changes at every step: the static beta buffer must follow
    reference = train(load_recipe(None, warm | {"fast_path": "off"}), tmp_path / "ref", progress=False)
    monkeypatch.setattr(training_setup, "capture_plan", lambda *a: None)
    monkeypatch.setattr(steps_module, "capture_plan", lambda *a: None)
    result = train(load_recipe(None, warm), tmp_path / "graph", progress=False)
    info = json.loads((tmp_path / "graph" / "run.json").read_text())
    assert info["fast_path"].startswith("jit: CUDA graph capture failed")
    assert "CUDA device" in info["fast_path"]
    ref, got = _final(reference), _final(result)
    moved = max((ref[k] - v).abs().max().item() for k, v in _final(train(
        load_recipe(None, SMALL | {"fast_path": "off", "max_samples": 100 * WARMUP_STEPS}),
        tmp_path / "short", progress=False)).items())
    assert moved > 1e-3  # the comparison below can fail: training moves the parameters this far
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-5), k
    for a, b in zip(reference.metrics, result.metrics):
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], abs=1e-3)


def test_deferred_checks_stop_at_the_first_bad_step_with_a_finite_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(priors.PRIORS, "poisoned", PoisonedPrior)
    # calls: 1 build check, 2 kl_status, then one per training step: step 5 is call 7
    monkeypatch.setattr(PoisonedPrior, "poison", set(range(7, 1000)))
    recipe = load_recipe(None, {"prior": "poisoned", "fast_path": "off", "max_samples": 1000, "eval_every": 1000,
                                "checkpoint_every": 1000, "hidden_dim": 16, "latent_dim": 2, "sync_every": 4})
    with pytest.raises(TrainingError) as e:
        train(recipe, tmp_path / "r", progress=False)
    msg = str(e.value)
    assert "step 5 " in msg and "seen at step 8" in msg and "every 4 steps" in msg
    good = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert good["step"] == 0 and all(torch.isfinite(v).all() for v in good["model"].values())
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "failed"


def test_deferred_checks_change_nothing_in_a_finite_run(tmp_path):
    a = train(load_recipe(None, SMALL | {"sync_every": 1}), tmp_path / "a", progress=False)
    b = train(load_recipe(None, SMALL | {"sync_every": 7}), tmp_path / "b", progress=False)
    assert b.run_info["sync_every"] == 7 and a.run_info["sync_every"] == 1
    for k, v in _final(a).items():
        assert torch.equal(v, _final(b)[k]), k
    assert [r["test_elbo"] for r in a.metrics] == [r["test_elbo"] for r in b.metrics]


def test_negative_sync_every_is_refused():
    with pytest.raises(ConfigError, match="sync_every"):
        load_recipe(None, {"sync_every": -1})
