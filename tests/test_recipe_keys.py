"""The recipe keys that published set-ups need, each checked for what it changes: ``activation``,
``hidden_dims``, the step schedule (``lr_milestones``, ``lr_gamma``), and ``validation_size`` with the
best checkpoint beside the last."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

import pyro_aevb
from pyro_aevb.config import load_recipe, make_recipe, parse_override
from pyro_aevb.data import load_dataset
from pyro_aevb.errors import ConfigError
from pyro_aevb.training.checkpoint import load_checkpoint
from pyro_aevb.training.loop import Best, train
from pyro_aevb.training.schedule import lr_at
from pyro_aevb.training.setup import build_run

SMALL = {"hidden_dim": 16, "latent_dim": 2, "eval_train_size": 200}


@functools.lru_cache(maxsize=None)
def _mnist5k():
    return load_dataset("mnist-5k")


def _linears(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("name, cls", [("tanh", nn.Tanh), ("relu", nn.ReLU), ("softplus", nn.Softplus)])
def test_activation_is_the_hidden_layers_nonlinearity(name, cls):
    vae = pyro_aevb.build_vae(load_recipe(None, {"activation": name, "hidden_dims": [30, 20]}), 784)
    acts = [m for m in list(vae.encoder.modules()) + list(vae.decoder.modules())
            if isinstance(m, (nn.Tanh, nn.ReLU, nn.Softplus))]
    assert len(acts) == 4 and all(type(a) is cls for a in acts)
    with pytest.raises(ConfigError, match="activation.*choose one of.*relu"):
        load_recipe(None, {"activation": "swishh"})


def test_hidden_dims_give_the_layers_and_the_decoder_mirrors_them():
    vae = pyro_aevb.build_vae(load_recipe(None, {"hidden_dims": [300, 200], "latent_dim": 7}), 784)
    assert _linears(vae.encoder) == [(784, 300), (300, 200), (200, 7), (200, 7)]
    assert _linears(vae.decoder) == [(7, 200), (200, 300), (300, 784)]
    one = pyro_aevb.build_vae(load_recipe(None, {"hidden_dim": 50}), 784)  # [] is [hidden_dim]: the paper's
    assert _linears(one.encoder) == [(784, 50), (50, 20), (50, 20)] and _linears(one.decoder) == [(20, 50), (50, 784)]
    assert list(one.state_dict()) == ["prior.loc", "prior.scale", "encoder.hidden.0.weight", "encoder.hidden.0.bias",
                                      "encoder.loc.weight", "encoder.loc.bias", "encoder.log_var.weight",
                                      "encoder.log_var.bias", "decoder.logits.0.weight", "decoder.logits.0.bias",
                                      "decoder.logits.2.weight", "decoder.logits.2.bias"]  # old checkpoints load
    assert parse_override("hidden_dims=[300, 300]") == ("hidden_dims", [300, 300])
    recipe = load_recipe(None, ["hidden_dims=[300, 300]"])
    import tomllib

    assert make_recipe(tomllib.loads(recipe.to_toml())).hidden_dims == [300, 300]  # the saved recipe reads back
    for bad in ([0], [30, -1], ["wide"], 300):
        with pytest.raises(ConfigError, match="hidden_dims"):
            load_recipe(None, {"hidden_dims": bad})


def test_decoder_variance_network_is_the_papers_per_datapoint_variance():
    """decoder_variance = "network": log sigma^2 = W5 h + b5 from the decoder's hidden layer h = tanh(W3 z + b3)
    (Appendix C.2), written out here and scored by scipy; "pixel" (the default) keeps one per pixel."""
    import scipy.stats

    torch.manual_seed(0)
    recipe = load_recipe(None, {"likelihood": "gaussian", "decoder_variance": "network", "latent_dim": 3,
                                "hidden_dim": 8})
    decoder = pyro_aevb.build_vae(recipe, 5).decoder.double()
    z, x = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 5, dtype=torch.float64)
    w3, w4, w5 = decoder.loc[0], decoder.loc[2], decoder.log_var
    h = torch.tanh(z @ w3.weight.T + w3.bias)
    mean, sd = torch.sigmoid(h @ w4.weight.T + w4.bias), torch.exp(0.5 * (h @ w5.weight.T + w5.bias))
    expected = scipy.stats.norm.logpdf(x.numpy(), loc=mean.detach().numpy(), scale=sd.detach().numpy()).sum(-1)
    torch.testing.assert_close(decoder(z).log_prob(x).detach(), torch.as_tensor(expected), rtol=1e-12, atol=1e-12)
    assert decoder(z).base_dist.scale.std(0).min() > 0  # each datapoint its own variances
    pixel = pyro_aevb.build_vae(load_recipe(None, {"likelihood": "gaussian", "latent_dim": 3}), 5).decoder
    assert isinstance(pixel.log_var, nn.Parameter) and pixel.log_var.shape == (5,)
    with pytest.raises(ConfigError, match="decoder_variance.*likelihood = \"gaussian\""):
        load_recipe(None, {"decoder_variance": "network"})  # a Bernoulli decoder has no variance
    with pytest.raises(ConfigError, match="decoder_variance.*choose one of: pixel, network"):
        load_recipe(None, {"likelihood": "gaussian", "decoder_variance": "z"})


def test_the_step_schedule_gives_the_lr_of_each_step():
    recipe = load_recipe(None, SMALL | {"lr": 0.1, "lr_milestones": [250, 600], "lr_gamma": 0.5, "batch_size": 100})
    assert [lr_at(recipe, k) for k in range(1, 9)] == [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025]
    run = build_run(recipe, dataset=_mnist5k())
    used = []
    for k in range(1, 9):  # what the optimizer really steps with: MultiStepLR, stepped after each update
        used.append(run.optimizer.param_groups[0]["lr"])
        run.optimizer.step()  # no gradients: moves nothing, but keeps the order the loop has
        run.scheduler.step()
    assert used == pytest.approx([lr_at(recipe, k) for k in range(1, 9)])
    for bad in ([600, 250], [0], [250, 250]):
        with pytest.raises(ConfigError, match="lr_milestones"):
            load_recipe(None, {"lr_milestones": bad})


def test_a_schedule_reaches_training_and_survives_a_resume(tmp_path):
    recipe = load_recipe(None, SMALL | {"optimizer": "adam", "lr": 0.01, "lr_milestones": [300], "lr_gamma": 0.1,
                                        "max_samples": 600, "eval_every": 100, "checkpoint_every": 400})
    result = train(recipe, tmp_path / "a", progress=False, dataset=_mnist5k())
    assert [r["lr"] for r in result.metrics] == pytest.approx([0.01] * 3 + [0.001] * 3)
    payload = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert payload["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001)


def test_the_best_checkpoint_is_the_best_validation_bound_on_a_synthetic_curve():
    best, curve = Best(), [-150.0, -120.0, -125.0, float("nan"), -110.0, -110.0, -130.0]
    kept = []
    for step, value in enumerate(curve, 1):
        if best.improves(value):
            best.value, best.step = value, step
        kept.append(best.step)
    assert kept == [1, 2, 2, 2, 5, 5, 5] and best.value == -110.0


def test_validation_split_and_best_checkpoint_in_a_run(tmp_path):
    recipe = load_recipe(None, SMALL | {"validation_size": 300, "max_samples": 2000, "eval_every": 200,
                                        "checkpoint_every": 2000, "lr": 0.05})
    result = train(recipe, tmp_path / "run", progress=False, dataset=_mnist5k())
    assert result.run_info["data"]["n_train"] == 4000 - 300  # mnist-5k has no validation split: held out
    rows = result.metrics
    assert all("valid_elbo" in r for r in rows)
    best_row = max(rows, key=lambda r: r["valid_elbo"])
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["step"] == best_row["step"] and best["valid_elbo"] == best_row["valid_elbo"]
    assert result.run_info["best"] == {"step": best_row["step"], "valid_elbo": best_row["valid_elbo"]}
    vae = pyro_aevb.load(tmp_path / "run", checkpoint="best")
    assert vae.step == best_row["step"]
    for k, v in best["model"].items():
        assert torch.equal(vae.state_dict()[k], v)
    if best_row["step"] != rows[-1]["step"]:  # the last and the best differ
        last = pyro_aevb.load(tmp_path / "run")
        assert any(not torch.equal(a, b) for a, b in zip(last.state_dict().values(), vae.state_dict().values()))
    with pytest.raises(ConfigError, match="best.pt"):
        pyro_aevb.load(train(load_recipe(None, SMALL | {"max_samples": 100, "eval_every": 100}), tmp_path / "nv",
                             progress=False, dataset=_mnist5k()).run_dir, checkpoint="best")


def test_binarized_mnist_validates_on_its_own_validation_split(shared_data):
    dataset = load_dataset("binarized-mnist", shared_data)
    run = build_run(load_recipe(None, SMALL | {"dataset": "binarized-mnist", "validation_size": 500}), dataset=dataset)
    assert run.data.num_data == 50_000 and torch.equal(run.data.valid, dataset.valid[:500])


def test_evaluate_scores_the_best_or_the_last_checkpoint(tmp_path):
    import subprocess
    import sys

    recipe = load_recipe(None, SMALL | {"validation_size": 200, "max_samples": 1000, "eval_every": 250,
                                        "checkpoint_every": 1000})
    train(recipe, tmp_path / "run", progress=False, dataset=_mnist5k())
    steps = {}
    for which in ("last", "best"):
        proc = subprocess.run([sys.executable, "-m", "pyro_aevb", "evaluate", str(tmp_path / "run"), "--json",
                               "--checkpoint", which, "--split", "valid"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        steps[which] = json.loads(proc.stdout)["step"]
    assert steps["last"] == 10 and steps["best"] == load_checkpoint(tmp_path / "run" / "best.pt")["step"]
