"""Monte Carlo EM (pyro_aevb.infer.mcem) and ``figure3``: the E-step's posterior, the M-step's gradient, end to end.

The E-step and M-step checks use the linear-Gaussian model's closed forms in
float64: the chains' draws against the exact posterior (within Monte Carlo
error, estimated from the spread of independent chains), and the M-step's
gradient against autograd on the closed-form log joint.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import pytest
import torch

import pyro

from linear_gaussian import DTYPE, W_CORRELATED, LinearGaussian
from pyro_aevb.commands import figure3 as figure3_module
from pyro_aevb.commands.compare import compare
from pyro_aevb.config import load_recipe, make_recipe
from pyro_aevb.data import load_dataset
from pyro_aevb.errors import ConfigError
from pyro_aevb.infer.registry import ESTIMATORS, make_estimator
from pyro_aevb.infer.mcem import MonteCarloEM
from pyro_aevb.infer.traces import log_joint
from pyro_aevb.training.loop import train

TINY = {"max_samples": 300, "eval_every": 100, "checkpoint_every": 100, "hidden_dim": 16, "latent_dim": 2,
        "eval_train_size": 200, "batch_size": 50}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _mnist5k():
    return load_dataset("mnist-5k")


# --------------------------------------------------------------------------- E-step
def test_e_step_samples_the_exact_posterior_and_adapts_to_the_target_acceptance():
    pyro.set_rng_seed(0)
    lg = LinearGaussian(W=W_CORRELATED)  # full-covariance posterior
    N = 200
    x = lg.sample(N, torch.Generator().manual_seed(0))
    est = make_estimator("mcem", step_size=0.02, target_accept=0.9)
    assert isinstance(est, MonteCarloEM) and est.needs_indices
    idx = torch.arange(N)
    for _ in range(100):  # burn-in and adaptation
        est.e_step(lg.model, idx, x)
    assert est.chains.shape == (N, 2) and est.chains.dtype == DTYPE
    draws, accepts = [], []
    for _ in range(200):
        draws.append(est.e_step(lg.model, idx, x).clone())
        accepts.append(float(est.accept_rate))
    mu, cov = lg.posterior(x)
    r = torch.stack(draws) - mu.detach()  # (T, N, 2): draws minus the exact posterior mean
    # Per-chain time averages are independent across datapoints: their spread gives the Monte Carlo error.
    chain_mean = r.mean(0)  # (N, 2)
    se = chain_mean.std(0) / N**0.5
    assert (chain_mean.mean(0).abs() < 4 * se).all(), (chain_mean.mean(0), se)
    chain_cov = torch.einsum("tni,tnj->nij", r, r) / r.shape[0]  # (N, 2, 2), E[(z - mu)(z - mu)^T] per chain
    cov_se = chain_cov.std(0) / N**0.5
    assert ((chain_cov.mean(0) - cov.detach()).abs() < 4 * cov_se).all(), (chain_cov.mean(0), cov, cov_se)
    mean_accept = sum(accepts) / len(accepts)
    assert abs(mean_accept - 0.9) < 0.05, mean_accept
    assert est.step_size > 0.02  # adapted up from a too-small start


# --------------------------------------------------------------------------- M-step
def test_m_step_gradient_is_the_closed_form_log_joint_gradient_at_the_chains():
    pyro.set_rng_seed(1)
    lg = LinearGaussian(W=W_CORRELATED)
    N, M = 40, 8
    data = lg.sample(N, torch.Generator().manual_seed(2))
    idx = torch.tensor([3, 17, 5, 0, 39, 22, 8, 11])
    x = data[idx]
    est = MonteCarloEM(leapfrog_steps=5, e_steps=2)
    loss = est.differentiable_loss(lg.model, None, x, num_data=N, beta=0.5, indices=idx)
    loss.backward()
    grads = {"W": lg.W.grad.clone(), "b": lg.b.grad.clone()}
    z = est.chains[idx].detach()  # the states the M-step used, fixed
    lg.zero_grad()
    closed = -(N / M) * (lg.prior().log_prob(z) + lg.likelihood(z).log_prob(x)).sum()
    closed.backward()
    torch.testing.assert_close(loss.detach(), closed.detach(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(grads["W"], lg.W.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads["b"], lg.b.grad, rtol=1e-10, atol=1e-10)
    # only the minibatch's chains moved from their prior draws; the rest were left alone
    assert est.chains.shape == (N, 2)
    torch.testing.assert_close(log_joint(lg.model, {"z": z}, x), lg.prior().log_prob(z) + lg.likelihood(z).log_prob(x))


def test_bad_options_are_config_errors():
    assert "mcem" in ESTIMATORS
    for options in ({"num_particles": 2}, {"leapfrog_steps": 0}, {"e_steps": 0}, {"target_accept": 1.0},
                    {"step_size": 0.0}):
        with pytest.raises(ConfigError, match="mcem"):
            MonteCarloEM(**options)
    with pytest.raises(ConfigError, match="unknown key 'm_steps'"):
        make_recipe({"estimator": "mcem", "estimator_options": {"m_steps": 5}})


# --------------------------------------------------------------------------- end to end
def test_mcem_trains_inside_compare_and_resumes_its_chains_exactly(tmp_path):
    recipe = load_recipe(None, TINY)
    dataset = _mnist5k()
    comparison = compare(recipe, ["sgvb-b", "mcem"], tmp_path / "cmp", dataset=dataset)
    r = comparison["estimators"]["mcem"]
    assert r["samples"] == [100, 200, 300]
    saved = torch.load(tmp_path / "cmp" / "mcem" / "checkpoint.pt", weights_only=False)["estimator"]
    assert saved["chains"].shape == (dataset.train.shape[0], 2) and torch.isfinite(saved["chains"]).all()
    assert int(saved["adapt_count"]) == 6  # 6 steps of one transition

    # continue to 500 samples; equal to one uninterrupted run to 500 from the same start
    mcem_recipe = make_recipe({"estimator": "mcem", "max_samples": 500}, base=recipe)
    resumed = train(mcem_recipe, tmp_path / "cmp" / "mcem", progress=False, dataset=dataset, resume=True, force=True)
    from pyro_aevb.commands.compare import initial_state

    straight = train(mcem_recipe, tmp_path / "straight", progress=False, dataset=dataset,
                     initial_state=initial_state(recipe, dataset))
    a = torch.load(tmp_path / "cmp" / "mcem" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    assert int(a["estimator"]["adapt_count"]) == 10
    for key in ("chains", "log_step_size", "adapt_count"):
        torch.testing.assert_close(a["estimator"][key], b["estimator"][key], rtol=0, atol=0)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    assert [m["samples"] for m in resumed.metrics] == [m["samples"] for m in straight.metrics]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-aevb")
    sub = parser.add_subparsers(dest="command", required=True)
    figure3_module.register(sub)
    return parser


def test_figure3_end_to_end(tmp_path, capsys, shared_data):
    """The shipped recipe, in a tiny form: 1,000 training points, two budgets, 3 points, short chains."""
    out = tmp_path / "fig3"
    args = _parser().parse_args(["figure3", "figure3_mnist_n1000", "--estimators", "sgvb-b,mcem", "--budgets",
                                 "100,200", "--train-size", "1000", "--eval-points", "3", "--hmc-samples", "25",
                                 "--warmup-steps", "40", "--data-dir", str(shared_data), "--out", str(out),
                                 "--no-progress", "--set", "eval_train_size=200", "--set", "hidden_dim=16"])
    args.func(args)
    table = capsys.readouterr().out
    assert "mcem" in table and "test log p(x)" in table
    figure = json.loads((out / "figure3.json").read_text())
    assert list(figure["estimators"]) == ["sgvb-b", "mcem"]
    assert figure["n_train"] == 1000 and figure["eval_points"] == {"train": 3, "test": 3}
    assert figure["hmc"]["points_per_chain"] == figure3_module.DEFAULT_POINTS_PER_CHAIN  # the 3 points in one chain
    for r in figure["estimators"].values():
        assert r["samples"] == [100, 200]
        for key in ("train_log_likelihood", "test_log_likelihood"):
            assert len(r[key]) == 2 and all(v < 0 for v in r[key])  # log p(x) of 784 binary pixels
        for split in ("train", "test"):
            assert [len(v) for v in r[f"{split}_values"]] == [3, 3]
            mean, se = figure3_module.mean_se(r[f"{split}_values"][1])
            assert mean == pytest.approx(r[f"{split}_log_likelihood"][1]) and se == pytest.approx(
                r[f"{split}_log_likelihood_se"][1])
    assert "paired differences from sgvb-b" in table
    fake = {"estimators": {"a": {"train_values": [[1.0, 2.0, 4.0]]}, "b": {"train_values": [[2.0, 2.5, 4.5]]}}}
    (mean, se), = figure3_module.paired_differences(fake, "train")["b"]
    assert mean == pytest.approx(2 / 3) and se == pytest.approx(1 / 6)  # differences 1, 0.5, 0.5
    assert (out / "figure3.png").is_file()
    with pytest.raises(ConfigError, match="increasing"):
        figure3_module.parse_budgets("1e3,1e2")
    with pytest.raises(ConfigError, match="train-size"):
        figure3_module.subset_dataset(_mnist5k(), 10**6)


def test_figure3_subsets_are_fixed_random_samples_of_each_split():
    """mnist-5k's splits are sorted by digit: the first 1,000 training points are 0s, 1s and 2s, the random
    subset covers all ten. The random evaluation points are the rows `evaluate --max-datapoints` scores."""
    from pyro_aevb.commands.evaluate import datapoint_subset

    data = _mnist5k()
    first = figure3_module.subset_dataset(data, 1000, "first")
    assert torch.equal(first.train, data.train[:1000]) and first.train_labels.unique().tolist() == [0, 1, 2]
    random = figure3_module.subset_dataset(data, 1000)
    assert random.train.shape == (1000, 784) and random.train_labels.unique().numel() == 10
    assert torch.equal(random.train, figure3_module.subset_dataset(data, 1000).train)  # the same on every call
    rows = torch.arange(data.train.shape[0]).unsqueeze(1)
    kept = datapoint_subset(rows, 1000)[:, 0].sort().values  # in the split's order
    assert torch.equal(random.train, data.train[kept]) and torch.equal(random.train_labels, data.train_labels[kept])
    assert "fixed random 1,000 (seed 0)" in random.source and "first 1,000" in first.source
    assert figure3_module.subset_dataset(data, None) is data

    recipe = load_recipe("figure3_mnist_n1000")  # Bernoulli: grey points are binarized once; these are binary
    binary = dataclasses.replace(random, train=(random.train > 0.5).float(), test=(data.test > 0.5).float(),
                                 binary=True)
    train_x, test_x = figure3_module.evaluation_points(recipe, binary, 100)
    assert torch.equal(test_x, datapoint_subset(binary.test, 100))
    assert torch.equal(train_x, datapoint_subset(binary.train, 100))
    test_rows = datapoint_subset(torch.arange(data.test.shape[0]).unsqueeze(1), 100)[:, 0]
    assert data.test_labels[test_rows].unique().numel() == 10 and data.test_labels[:100].unique().numel() == 1
    train_first, test_first = figure3_module.evaluation_points(recipe, binary, 100, "first")
    assert torch.equal(train_first, binary.train[:100]) and torch.equal(test_first, binary.test[:100])
    with pytest.raises(ConfigError, match="subset"):
        figure3_module.evaluation_points(recipe, data, 100, "last")
