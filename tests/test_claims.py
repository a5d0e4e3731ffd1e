"""Claims the code makes, each with a test that fails when the claim is false: gradient clipping, the fused
optimizer, exact resume on every path and estimator state, the Gaussian decoder's density, IWAE's gradient,
a CUDA checkpoint on a CPU, ``--overwrite`` and a second Ctrl-C."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.stats
import torch

import pyro
import pyro.distributions as dist

import pyro_aevb
from pyro_aevb.config import load_recipe
from pyro_aevb.data import load_dataset
from pyro_aevb.generative import priors
from pyro_aevb.generative.vae import GaussianDecoder
from pyro_aevb.infer.registry import backward, make_estimator
from pyro_aevb.training.checkpoint import load_checkpoint
from pyro_aevb.training.loop import train
from pyro_aevb.training.setup import build_run, make_optimizer
from pyro_aevb.training.steps import EagerStep

HOOKED_CLI = str(Path(__file__).with_name("hooked_cli.py"))
SMALL = {"hidden_dim": 16, "latent_dim": 2, "eval_train_size": 200}


@functools.lru_cache(maxsize=None)
def _mnist5k():
    return load_dataset("mnist-5k")


# --------------------------------------------------------------------------- gradient clipping
def test_clipping_rescales_the_gradient_to_the_norm_asked_for():
    """The step's gradient is the unclipped one times C / ||g||, with ||g|| computed here from eager Pyro."""
    clip = 1e-3
    run = build_run(load_recipe(None, SMALL | {"grad_clip": clip, "fast_path": "off", "optimizer": "adam"}),
                    dataset=_mnist5k())
    idx = torch.arange(100)
    x = run.data.train[idx].round()  # binary without the step's own draw
    run.data.dynamic_binarization = False
    run.data.train = run.data.train.round()
    params = list(run.params.values())
    pyro.set_rng_seed(5)
    backward(run.estimator, *run.vae.local_pair(), x, num_data=run.num_data, beta=1.0)
    raw = [p.grad.detach().clone() for p in params]
    norm = torch.sqrt(sum((g**2).sum() for g in raw))
    assert norm > 100 * clip  # clipping must bite
    for p in params:
        p.grad = None
    pyro.set_rng_seed(5)
    EagerStep(run, skip_nonfinite=False, fast_path="off")(idx, 1.0)
    for p, g in zip(params, raw):
        torch.testing.assert_close(p.grad, g * (clip / norm), rtol=1e-5, atol=1e-12)


# --------------------------------------------------------------------------- the optimizer
@pytest.mark.parametrize("weight_decay", [0.0, 1.0])
def test_fused_adagrad_equals_the_per_parameter_loop_over_100_steps(weight_decay):
    torch.manual_seed(0)
    recipe = load_recipe(None, {"weight_decay": weight_decay, "lr": 0.01})
    a = [torch.randn(500, 20, requires_grad=True), torch.randn(1000, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    fused = make_optimizer(recipe, a)
    loop = torch.optim.Adagrad(b, lr=0.01, weight_decay=weight_decay, foreach=False)
    assert fused.param_groups[0]["fused"] and not loop.param_groups[0].get("fused")
    for _ in range(100):
        for p, q in zip(a, b):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        loop.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- exact resume
class _Crash(Exception):
    pass


class CountingPoisonedPrior(torch.nn.Module):
    """N(0, I), with a NaN location on the calls numbered in ``poison``, counting only calls with gradients
    on (training steps); the no-gradient call after a poisoned one (the NaN guard's diagnosis) is NaN too.
    The count is a buffer, so a resumed run continues it."""

    poison: set = set()

    def __init__(self, latent_dim):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_poisoned", torch.zeros((), dtype=torch.bool))

    def forward(self):
        if torch.is_grad_enabled():
            self.calls += 1
            self.last_poisoned.fill_(int(self.calls) in self.poison)
        loc = self.loc * float("nan") if self.last_poisoned else self.loc
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)


RESUMES = {
    "compile path": {"fast_path": "compile"},
    "jit, adam, kl warm-up": {"fast_path": "jit", "optimizer": "adam", "lr": 0.003, "kl_warmup": 800},
    "neural baseline": {"estimator": "score-function",
                        "estimator_options": {"baseline": "neural", "data_dim": 784}},
    "mcem": {"estimator": "mcem", "estimator_options": {"leapfrog_steps": 3}},
    "skipped nan steps": {"prior": "counting-poisoned", "fast_path": "off", "on_nan": "skip"},
    "diffusion, sampled steps": {"model": "diffusion", "optimizer": "adam", "lr": 0.001,
                                 "model_options": {"steps": 50, "width": 32, "depth": 1, "time_samples": 3}},
}


@pytest.mark.parametrize("case", RESUMES)
def test_a_run_stopped_anywhere_resumes_bit_identically(case, tmp_path, monkeypatch):
    monkeypatch.setitem(priors.PRIORS, "counting-poisoned", CountingPoisonedPrior)
    monkeypatch.setattr(CountingPoisonedPrior, "poison", {3, 11})  # call 1 is the build check: steps 2 and 10
    recipe = load_recipe(None, SMALL | {"max_samples": 1200, "eval_every": 300, "checkpoint_every": 300,
                                        "batch_size": 100} | RESUMES[case])
    reference = train(recipe, tmp_path / "reference", progress=False, dataset=_mnist5k())

    def crash_at_step_8(step):
        if step == 8:
            raise _Crash

    with pytest.raises(_Crash):
        train(recipe, tmp_path / "resumed", progress=False, dataset=_mnist5k(), callback=crash_at_step_8)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 6  # the last one before the crash
    resumed = train(recipe, tmp_path / "resumed", progress=False, dataset=_mnist5k(), resume=True)
    ref, got = (torch.load(r.run_dir / "checkpoint.pt", weights_only=True) for r in (reference, resumed))
    for part in ("model", "optimizer") + (("estimator",) if "estimator" in ref else ()):
        _assert_same(ref[part], got[part], part)
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # noqa: E731
    assert strip(resumed.metrics) == strip(reference.metrics)
    assert resumed.run_info["nan_skips"] == reference.run_info["nan_skips"]
    if case == "skipped nan steps":  # step 2, before the crash, and step 10, after it
        assert reference.run_info["nan_skips"] == 2
        assert load_checkpoint(tmp_path / "reference" / "checkpoint.pt")["nan_skips"] == reference.run_info["nan_skips"]
    if case == "compile path":
        assert reference.run_info["fast_path"] == "inductor" and resumed.run_info["resumed_fast_paths"] == ["inductor"]


def _assert_same(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same(u, v, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


# --------------------------------------------------------------------------- densities and gradients
def test_gaussian_decoder_density_is_scipys():
    torch.manual_seed(0)
    decoder = GaussianDecoder(3, 8, 5).double()
    with torch.no_grad():
        decoder.log_var.copy_(torch.randn(5, dtype=torch.float64))
    z, x = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 5, dtype=torch.float64)
    mean = decoder.mean(z).detach().numpy()
    sd = torch.exp(0.5 * decoder.log_var).detach().numpy()
    expected = scipy.stats.norm.logpdf(x.numpy(), loc=mean, scale=sd).sum(-1)
    torch.testing.assert_close(decoder(z).log_prob(x).detach(), torch.as_tensor(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("float64_single_thread")
def test_iwae_gradient_in_theta_is_the_gradient_of_log_marginal(lg):
    """IWAE's gradient in (W, b) is self-normalised importance sampling of E_{p(z|x)} grad log p(x, z), which
    is grad log p(x) (Fisher's identity): with K = 20,000 draws from a proposal twice as wide as the
    posterior, it matches the closed form; the ELBO's gradient from the same proposal (K = 1) does not."""
    x = lg.sample(4, torch.Generator().manual_seed(0))
    mu, cov = lg.posterior(x)
    sd = cov.diagonal().sqrt().detach()

    def wide_guide(x, num_data=None, beta=1.0):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(mu.detach(), 2 * sd).to_event(1))

    exact = torch.autograd.grad(-lg.log_marginal(x).sum(), [lg.W, lg.b])
    pyro.set_rng_seed(0)
    iwae = make_estimator("iwae", num_particles=20_000).differentiable_loss(lg.model, wide_guide, x)
    grads = torch.autograd.grad(iwae, [lg.W, lg.b])
    scale = max(e.abs().max() for e in exact)
    assert max((g - e).abs().max() for g, e in zip(grads, exact)) < 0.02 * scale
    pyro.set_rng_seed(0)
    elbo = make_estimator("sgvb-a", num_particles=20_000).differentiable_loss(lg.model, wide_guide, x)
    elbo_grads = torch.autograd.grad(elbo, [lg.W, lg.b])
    assert max((g - e).abs().max() for g, e in zip(elbo_grads, exact)) > 0.2 * scale  # the test can tell


# --------------------------------------------------------------------------- run directories
def _cli(*args, env=None):
    return subprocess.run([sys.executable, HOOKED_CLI, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


TINY = ["--set", "max_samples=2000", "--set", "eval_every=1000", "--set", "checkpoint_every=500",
        "--set", "hidden_dim=16", "--set", "latent_dim=2", "--set", "eval_train_size=200", "--no-progress"]


def test_a_run_written_on_cuda_loads_and_evaluates_on_a_cpu(tmp_path):
    run = tmp_path / "run"
    assert _cli("train", *TINY, "--out", str(run)).returncode == 0
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    payload["recipe"]["device"] = "cuda"
    # Write it as a GPU machine would: every tensor's storage tagged "cuda:0", so loading it without a
    # map_location on this CPU machine would fail.
    import torch.serialization as serialization

    real_tag = serialization.location_tag
    serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(payload, run / "checkpoint.pt")
    finally:
        serialization.location_tag = real_tag
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(run / "checkpoint.pt", weights_only=True)
    vae = pyro_aevb.load(run)
    assert next(vae.parameters()).device.type == "cpu" and vae.recipe.device == "cuda"
    proc = _cli("evaluate", str(run), "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert math.isfinite(json.loads(proc.stdout)["elbo"])


def test_overwrite_moves_the_old_run_aside(tmp_path):
    run = tmp_path / "run"
    assert _cli("train", *TINY, "--out", str(run)).returncode == 0
    (run / "notes.txt").write_text("mine")
    old_metrics = (run / "metrics.jsonl").read_text()
    proc = _cli("train", *TINY, "--seed", "9", "--out", str(run), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    (moved,) = tmp_path.glob("run.old-*")
    assert (moved / "notes.txt").read_text() == "mine" and (moved / "metrics.jsonl").read_text() == old_metrics
    assert json.loads((run / "run.json").read_text())["seed"] == 9 and not (run / "notes.txt").exists()


def test_a_second_ctrl_c_stops_at_once_and_the_last_checkpoint_stays_whole(tmp_path):
    run = tmp_path / "run"
    proc = _cli("train", *TINY, "--out", str(run), env={"PYRO_AEVB_TEST_SIGNAL_AT_STEP": "13:SIGINT:2"})
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "pyro-aevb: interrupted"
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 10  # the periodic one before step 13
    proc = _cli("train", "--resume", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
