"""Reliability: exact resume after SIGKILL, atomic checkpoints, clean stops, NaN handling, no pickle."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pyro.distributions as dist
from pyro_aevb.generative import priors
from pyro_aevb.training.checkpoint import load_checkpoint
from pyro_aevb.config import load_recipe
from pyro_aevb.errors import CheckpointError, DataError, TrainingError
from pyro_aevb.training.loop import train

TINY = ["--set", "max_samples=4000", "--set", "eval_every=500", "--set", "checkpoint_every=700",
        "--set", "hidden_dim=32", "--set", "latent_dim=2", "--seed", "7", "--no-progress"]
TOTAL_STEPS = 40


#: pyro-aevb with the crash and signal hooks of these tests (the library has none)
HOOKED_CLI = str(Path(__file__).with_name("hooked_cli.py"))


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, HOOKED_CLI, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def params(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def metric_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = cli("train", *TINY, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def assert_same_run(run, reference):
    a, b = params(run), params(reference)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert metric_rows(run) == metric_rows(reference)
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


def test_sigkill_at_random_steps_then_resume_is_bit_identical(reference, tmp_path):
    """Five SIGKILLs at random steps of one run, each followed by --resume: the end is bit-identical."""
    kills = sorted(random.Random(2026).sample(range(1, TOTAL_STEPS), 5))
    run = tmp_path / "run"
    proc = cli("train", *TINY, "--out", str(run), env={"PYRO_AEVB_TEST_KILL_AT_STEP": str(kills[0])})
    assert proc.returncode == -signal.SIGKILL
    for at in kills[1:] + [None]:
        env = {"PYRO_AEVB_TEST_KILL_AT_STEP": str(at)} if at else {}
        proc = cli("train", "--resume", str(run), "--no-progress", env=env)
        done = json.loads((run / "run.json").read_text())["status"] == "complete"
        # A kill before the next checkpoint leaves nothing new; the run still resumes from the last one.
        assert proc.returncode == (0 if at is None else -signal.SIGKILL) or done, proc.stderr
    assert_same_run(run, reference)
    info = json.loads((run / "run.json").read_text())
    assert len(info["resumed_at_steps"]) == 5
    assert info["resumed_fast_paths"] == [info["fast_path"]] * 5  # each segment's path, recorded


def test_sigkill_at_a_random_moment_then_resume(reference, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pyro_aevb", "train", *TINY, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(random.Random(1).uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if json.loads((run / "run.json").read_text())["status"] != "complete":
        resumed = cli("train", "--resume", str(run), "--no-progress")
        assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run, reference)


def test_kill_inside_a_checkpoint_write_leaves_the_previous_one(reference, tmp_path):
    run = tmp_path / "run"
    proc = cli("train", *TINY, "--out", str(run), env={"PYRO_AEVB_TEST_KILL_IN_WRITE": "checkpoint.pt:3"})
    assert proc.returncode == -signal.SIGKILL
    payload = load_checkpoint(run / "checkpoint.pt")  # writes: step 0, 700 samples, then 1400 is cut
    assert payload["samples"] == 700
    assert any(p.name.endswith(".tmp") for p in run.iterdir())  # the half-written 3rd is beside it
    proc = cli("train", "--resume", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(run, reference)


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_stops_cleanly_with_a_checkpoint(reference, tmp_path, sig, code):
    run = tmp_path / "run"
    proc = cli("train", *TINY, "--out", str(run), env={"PYRO_AEVB_TEST_SIGNAL_AT_STEP": f"13:{sig}"})
    assert proc.returncode == code, proc.stderr
    assert f"stopped by {sig} at step 13" in proc.stderr and "--resume" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 13
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    proc = cli("train", "--resume", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(run, reference)


def test_resume_with_changed_recipe_is_refused_unless_forced(reference, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    proc = cli("train", "--resume", str(run), "--set", "lr=0.5", "--set", "max_samples=5000")
    assert proc.returncode == 2
    assert "lr: 0.01 -> 0.5" in proc.stderr and "max_samples: 4000 -> 5000" in proc.stderr
    assert "--force" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = cli("train", "--resume", str(run), "--set", "max_samples=5000", "--force", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(run / "checkpoint.pt")["samples"] == 5000
    assert [r["samples"] for r in metric_rows(run)][-2:] == [4500, 5000]


class PoisonedPrior(torch.nn.Module):
    """N(0, I), except that its calls numbered in ``poison`` return a NaN location."""

    poison: set = set()

    def __init__(self, latent_dim):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.calls = 0

    def forward(self):
        self.calls += 1
        loc = self.loc * float("nan") if self.calls in self.poison else self.loc
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)


def _poisoned_recipe(**extra):
    # eager Pyro: the poisoned prior counts its Python calls, which a traced graph does not make
    return load_recipe(None, {"prior": "poisoned", "fast_path": "off", "max_samples": 1000, "eval_every": 1000,
                              "checkpoint_every": 200, "hidden_dim": 16, "latent_dim": 2, **extra})


def test_nan_stops_the_run_naming_step_and_site(tmp_path, monkeypatch):
    monkeypatch.setitem(priors.PRIORS, "poisoned", PoisonedPrior)
    # calls: 1 build check, 2 kl_status, then one per training step: step 5 is call 7
    monkeypatch.setattr(PoisonedPrior, "poison", {7, 8, 9})
    with pytest.raises(TrainingError) as e:
        train(_poisoned_recipe(), tmp_path / "r", progress=False)
    msg = str(e.value)
    assert "step 5" in msg and "site 'z'" in msg and "checkpoint" in msg and "on_nan" in msg
    good = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert good["step"] == 4 and all(torch.isfinite(v).all() for v in good["model"].values())
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "failed"


def test_nan_skip_counts_skips_and_has_a_limit(tmp_path, monkeypatch):
    monkeypatch.setitem(priors.PRIORS, "poisoned", PoisonedPrior)
    # each poisoned step calls the prior twice: the step itself, then the diagnosis of what went wrong
    monkeypatch.setattr(PoisonedPrior, "poison", {5, 6, 8, 9})
    result = train(_poisoned_recipe(on_nan="skip"), tmp_path / "a", progress=False)
    assert result.run_info["nan_skips"] == 2 and result.metrics[-1]["nan_skips"] == 2
    assert all(torch.isfinite(p).all() for p in result.vae.parameters())
    monkeypatch.setattr(PoisonedPrior, "poison", set(range(5, 100)))
    with pytest.raises(TrainingError, match="after 3 skipped steps"):
        train(_poisoned_recipe(on_nan="skip", max_nan_skips=3), tmp_path / "b", progress=False)


def test_gradient_clipping_bounds_the_update(tmp_path):
    result = train(load_recipe(None, {"max_samples": 200, "eval_every": 200, "hidden_dim": 16,
                                      "grad_clip": 1e-3, "optimizer": "adam", "lr": 0.1}),
                   tmp_path / "r", progress=False)
    assert result.run_info["status"] == "complete"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pyro_aevb_pwned",))


def test_a_pickle_payload_is_refused(tmp_path, reference):
    import shutil

    marker = "/tmp/pyro_aevb_pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    run = tmp_path / "evil"
    shutil.copytree(reference, run)
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    payload["hook"] = _RunsCode()
    torch.save(payload, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(run / "checkpoint.pt")
    proc = cli("evaluate", str(run))
    assert proc.returncode != 0 and "refusing to load" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(marker)
    with open(run / "raw.pkl", "wb") as f:
        pickle.dump(_RunsCode(), f)
    with pytest.raises(CheckpointError):
        load_checkpoint(run / "raw.pkl")
    assert not os.path.exists(marker)


def test_bernoulli_decoder_rejects_grey_data_with_advice():
    from pyro_aevb.config import Recipe
    from pyro_aevb.generative.vae import build_vae

    vae = build_vae(Recipe(latent_dim=2, hidden_dim=8), 784)
    with pytest.raises(DataError, match="binarize.*gaussian"):
        vae.model(torch.full((3, 784), 0.5))
