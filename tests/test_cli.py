"""The command line as a user runs it: a subprocess, a tiny budget, outputs that parse."""

import json
import os
import subprocess
import sys
import tomllib

import pytest
import torch

from pyro_aevb.training.checkpoint import load_checkpoint
from pyro_aevb.config import make_recipe


def run_cli(*args, cwd=None):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, on a GPU machine too
    return subprocess.run(
        [sys.executable, "-m", "pyro_aevb", *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=env
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("train", "--set", "max_samples=1000", "--set", "eval_every=500", "--set", "hidden_dim=50",
                   "--out", str(out), "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "test bound" in proc.stdout
    assert "AEVB" in proc.stderr  # the tqdm progress bar
    return out


def test_train_writes_a_run_directory(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in rows] == [500, 1000]
    for row in rows:
        assert {"step", "samples", "train_elbo", "test_elbo", "seconds"} <= set(row)
        assert -800 < row["test_elbo"] < 0
    info = json.loads((tiny_run / "run.json").read_text())
    assert info["status"] == "complete" and info["kl"] == "analytic" and info["estimator"] == "sgvb-b"
    assert info["seed"] == 3 and info["device"] == "cpu" and info["wall_seconds"] > 0
    assert {"torch", "pyro", "pyro_aevb"} <= set(info["versions"])
    recipe = make_recipe(tomllib.loads((tiny_run / "recipe.toml").read_text()))
    assert recipe.hidden_dim == 50 and recipe.seed == 3
    payload = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    assert payload["samples"] == 1000 and payload["recipe"] == recipe.to_dict()
    assert load_checkpoint(tiny_run / "checkpoint.pt")["step"] == 10
    for fig in ("bound.png", "samples.png", "reconstructions.png"):
        assert (tiny_run / "figures" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_json(tiny_run):
    proc = run_cli("evaluate", str(tiny_run), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["split"] == "test" and result["n"] == 1000
    last = json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[-1])
    # Same parameters, fresh noise: within a few standard errors of the logged bound.
    assert abs(result["elbo"] - last["test_elbo"]) < 5 * last["test_elbo_se"] + 0.5
    proc = run_cli("evaluate", str(tiny_run), "--split", "train")
    assert proc.returncode == 0 and "train: average lower bound" in proc.stdout


def test_sample(tiny_run, tmp_path):
    out = tmp_path / "s.png"
    proc = run_cli("sample", str(tiny_run), "-n", "16", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_existing_run_dir_is_refused(tiny_run):
    before = sorted(p.name for p in tiny_run.iterdir())
    proc = run_cli("train", "--set", "max_samples=100", "--out", str(tiny_run))
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tiny_run.iterdir()) == before


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "--set", "latent_dimm=3"], ["unknown recipe key", "latent_dim"]),
        (["train", "--set", "estimator=sgvb-c"], ["unknown estimator", "sgvb-a", "sgvb-b"]),
        (["train", "--set", "dataset=cifar"], ["unknown dataset", "mnist-5k"]),
        (["train", "--device", "cuda"], ["cuda", "not available"]),
        (["train", "no_such_recipe"], ["recipe", "not found", "mnist_nz20"]),
        (["frobnicate"], ["invalid choice"]),
        (["evaluate", "/nonexistent/run"], ["does not exist"]),
    ],
)
def test_usage_errors_are_one_line(args, words, tmp_path):
    proc = run_cli(*args, "--out", str(tmp_path / "o")) if args[0] == "train" else run_cli(*args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr
    assert not (tmp_path / "o").exists()


def test_evaluate_log_likelihood_json(tiny_run):
    proc = run_cli("evaluate", str(tiny_run), "--json", "--num-samples", "50", "--khat-points", "20",
                   "--seed", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["num_samples"] == 50 and 0 < result["ess_mean"] <= 50
    assert result["log_likelihood"] > result["elbo"] - 3 * result["elbo_se"]  # log p(x) >= ELBO (in expectation)
    assert result["khat"]["n"] == 20 and sum(result["khat"]["counts"].values()) == 20


def test_evaluate_amortization_gap_json(tiny_run):
    proc = run_cli("evaluate", str(tiny_run), "--json", "--amortization-gap", "5", "--gap-steps", "30",
                   "--num-samples", "50", "--seed", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    gap = json.loads(proc.stdout)["amortization_gap"]
    assert gap["n"] == 5
    assert abs(gap["approximation_gap"] + gap["amortization_gap"]
               - (gap["log_likelihood"] - gap["elbo_amortized"])) < 1e-6


def test_max_datapoints_is_a_fixed_random_subset():
    from pyro_aevb.commands.evaluate import datapoint_subset
    from pyro_aevb.data import load_dataset
    from pyro_aevb.errors import ConfigError

    x = torch.arange(1000.0).unsqueeze(1)
    a = datapoint_subset(x, 100)
    assert torch.equal(a, datapoint_subset(x, 100))  # the same rows on every call
    assert a.unique().numel() == 100 and not torch.equal(a, x[:100])
    assert (a[:, 0] // 100).unique().numel() == 10  # drawn from every tenth of the split
    assert torch.equal(datapoint_subset(x, 100, "first"), x[:100])
    assert datapoint_subset(x, None) is x and datapoint_subset(x, 5000).shape == x.shape
    with pytest.raises(ConfigError, match="positive"):
        datapoint_subset(x, 0)
    # Why random is the default: mnist-5k's test split is sorted by class, so its first 100 are all one digit.
    data = load_dataset("mnist-5k")
    rows = torch.arange(data.test.shape[0]).unsqueeze(1)
    assert data.test_labels[:100].unique().numel() == 1
    assert data.test_labels[datapoint_subset(rows, 100)[:, 0]].unique().numel() == 10


def test_evaluate_max_datapoints_json(tiny_run):
    proc = run_cli("evaluate", str(tiny_run), "--json", "--max-datapoints", "200")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["n"] == 200 and result["subset"] == "random"
    proc = run_cli("evaluate", str(tiny_run), "--json", "--max-datapoints", "200", "--subset", "first")
    assert proc.returncode == 0 and json.loads(proc.stdout)["subset"] == "first"


def test_progress_bar_names_the_estimator(tmp_path):
    proc = run_cli("train", "--set", "max_samples=200", "--set", "hidden_dim=20", "--set", "estimator=wake-sleep",
                   "--out", str(tmp_path / "ws"))
    assert proc.returncode == 0, proc.stderr
    assert "wake-sleep:" in proc.stderr and "AEVB" not in proc.stderr
