"""``compare`` and ``grad-variance``: end to end on a tiny budget, their inputs checked, and the variance claim.

The variance test is the paper's Sec. 2.2 claim on a tiny VAE: the
reparameterised gradient (sgvb-b) of the encoder has far lower variance than
the score-function gradient of the same bound.
"""

from __future__ import annotations

import argparse
import functools
import json

import pytest
import torch

from pyro_aevb.commands import compare as compare_module
from pyro_aevb.commands import grad_variance
from pyro_aevb.config import Recipe, load_recipe
from pyro_aevb.data import load_dataset
from pyro_aevb.errors import ConfigError
from pyro_aevb.generative.vae import build_vae

TINY = ["--set", "max_samples=200", "--set", "eval_every=100", "--set", "hidden_dim=16", "--set", "latent_dim=2",
        "--set", "eval_train_size=200", "--set", "batch_size=50", "--set", "checkpoint_every=200"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-aevb")
    sub = parser.add_subparsers(dest="command", required=True)
    compare_module.register(sub)
    grad_variance.register(sub)
    return parser


def _run(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    args.func(args)


@functools.lru_cache(maxsize=None)
def _mnist5k():
    return load_dataset("mnist-5k")


# --------------------------------------------------------------------------- the claim
def test_reparameterised_gradient_has_far_lower_variance_than_score_function():
    torch.manual_seed(0)
    vae = build_vae(Recipe(latent_dim=2, hidden_dim=16, init="pytorch"), data_dim=784)
    x = torch.bernoulli(_mnist5k().train[:20])
    estimators = {k: v for k, v in grad_variance.default_estimators(784).items()
                  if k in ("sgvb-b", "score-function/none")}
    results, _ = grad_variance.measure(vae, x, num_data=4000, draws=20, baseline_steps=0, estimators=estimators)
    ratio = results["score-function/none"]["encoder"]["variance_rel"]
    print(f"\nencoder gradient variance, score-function / sgvb-b = {ratio:.3g}; SNR "
          f"{results['sgvb-b']['encoder']['snr']:.3g} vs {results['score-function/none']['encoder']['snr']:.3g}")
    assert ratio > 10
    assert results["sgvb-b"]["encoder"]["variance_rel"] == 1.0
    assert results["sgvb-b"]["encoder"]["snr"] > results["score-function/none"]["encoder"]["snr"]


# --------------------------------------------------------------------------- end to end
def test_compare_then_grad_variance_end_to_end(tmp_path, monkeypatch, capsys):
    started_from = []
    real_train = compare_module.train

    def recording_train(recipe, out_dir, **kwargs):
        started_from.append(compare_module.state_digest(kwargs["initial_state"]))
        return real_train(recipe, out_dir, **kwargs)

    monkeypatch.setattr(compare_module, "train", recording_train)
    out = tmp_path / "cmp"
    _run(["compare", "--estimators", "sgvb-b,wake-sleep,score-function", "--option",
          "score-function:baseline=neural", "--out", str(out), "--no-progress", *TINY])
    table = capsys.readouterr().out
    assert "wake-sleep" in table and "test bound" in table
    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison["estimators"]) == ["sgvb-b", "wake-sleep", "score-function"]
    assert started_from == [comparison["initial_state_sha256"]] * 3  # the same start for every estimator
    for name, r in comparison["estimators"].items():
        assert r["samples"] == [100, 200]
        assert len(r["train_elbo"]) == len(r["test_elbo"]) == 2
        assert r["final_test_elbo"] == r["test_elbo"][-1]
        assert (out / name / "checkpoint.pt").is_file()
    assert comparison["estimators"]["score-function"]["estimator_options"] == {"baseline": "neural", "data_dim": 784}
    assert (out / "bound.png").is_file()
    # the same run directories again: refused before anything is trained
    with pytest.raises(ConfigError, match="already exists"):
        _run(["compare", "--estimators", "sgvb-b", "--out", str(out), *TINY])

    # grad-variance at a trained run's parameters
    gv = tmp_path / "gv"
    _run(["grad-variance", "--checkpoint", str(out / "sgvb-b"), "--draws", "3", "--baseline-steps", "5",
          "--out", str(gv)])
    results = json.loads((gv / "grad_variance.json").read_text())
    assert list(results) == list(grad_variance.default_estimators(784))
    for label, r in results.items():
        for group in ("encoder", "decoder"):
            assert r[group]["variance"] > 0 and r[group]["snr"] > 0
            assert "variance_rel" in r[group] and "snr_rel" in r[group]
    assert results["sgvb-b"]["decoder"]["variance_rel"] == 1.0
    assert "sleep" in results["wake-sleep"]["objective"]
    setup = json.loads((gv / "grad_variance_setup.json").read_text())
    assert setup["draws"] == 3 and "score-function/neural" in setup["baseline_fits"]
    assert (gv / "grad_variance.png").is_file()
    assert "score-function/none" in capsys.readouterr().out


def test_grad_variance_at_initialisation(tmp_path, capsys):
    _run(["grad-variance", "--draws", "2", "--baseline-steps", "2", "--out", str(tmp_path), *TINY])
    results = json.loads((tmp_path / "grad_variance.json").read_text())
    assert results["sgvb-b"]["encoder"]["variance_rel"] == 1.0
    assert "initialisation" in capsys.readouterr().out


# --------------------------------------------------------------------------- inputs
def test_bad_inputs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown estimator 'sgvb-c'"):
        compare_module.parse_estimators("sgvb-b,sgvb-c")
    with pytest.raises(ConfigError, match="twice"):
        compare_module.parse_estimators("sgvb-b,sgvb-b")
    with pytest.raises(ConfigError, match="NAME:KEY=VALUE"):
        compare_module.parse_options(["baseline=neural"], ["score-function"])
    with pytest.raises(ConfigError, match="not in --estimators"):
        compare_module.parse_options(["iwae:num_particles=3"], ["sgvb-b"])
    options = compare_module.parse_options(["score-function:baseline=neural", "iwae:num_particles=3"],
                                           ["score-function", "iwae"])
    assert options == {"score-function": {"baseline": "neural"}, "iwae": {"num_particles": 3}}
    recipe = load_recipe(None, {})
    r = compare_module.estimator_recipe(recipe, "iwae", options["iwae"], 784)
    assert r.estimator == "iwae" and r.num_particles == 3 and r.estimator_options == {}
    with pytest.raises(ConfigError, match="unknown key 'baseline'"):
        compare_module.estimator_recipe(recipe, "wake-sleep", {"baseline": "neural"}, 784)
    with pytest.raises(ConfigError, match="mixing"):
        compare_module.estimator_recipe(recipe, "reweighted-wake-sleep", {"mixing": "high"}, 784)
    with pytest.raises(ConfigError, match="drop RECIPE"):
        _run(["grad-variance", "mnist5k", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="draws"):
        _run(["grad-variance", "--draws", "1", "--out", str(tmp_path / "o")])
