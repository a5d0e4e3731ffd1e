"""The GPU path, where CUDA is: a captured CUDA graph step computes what the uncaptured step computes, a
non-finite step stops a run with a finite checkpoint, a CUDA run resumes exactly, ``bench --device cuda``
times the graph, and the data stays on the device. Any fallback from the CUDA graph is a failure here.

Skipped on machines without CUDA (the CPU tests of the same code are in test_cuda_graphs.py);
``benchmarks/gpu_check.sh`` runs this file on a GPU machine.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch

import pyro

from pyro_aevb.config import load_recipe
from pyro_aevb.data import Dataset
from pyro_aevb.errors import TrainingError
from pyro_aevb.training.checkpoint import load_checkpoint
from pyro_aevb.training.loop import train
from pyro_aevb.training.setup import build_run
from pyro_aevb.training.steps import GraphStep, TracedStep, choose_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

RECIPE = {"device": "cuda", "hidden_dim": 64, "latent_dim": 8, "eval_train_size": 500, "batch_size": 100,
          "max_samples": 4000, "eval_every": 2000, "checkpoint_every": 1000}


@functools.lru_cache(maxsize=None)
def _binary_data() -> Dataset:
    """2,000 training and 500 test binary images of 784 pixels (synthetic: no data files needed)."""
    gen = torch.Generator().manual_seed(0)
    means = torch.rand(10, 784, generator=gen)
    pick = lambda n: torch.bernoulli(means[torch.randint(10, (n,), generator=gen)], generator=gen)  # noqa: E731
    return Dataset(name="synthetic-binary", train=pick(2000), test=pick(500), image_shape=(28, 28), binary=True)


def _steps(fast_path: str):
    run = build_run(load_recipe(None, RECIPE | {"fast_path": fast_path}), dataset=_binary_data())
    step = choose_step(run, skip_nonfinite=False, total_steps=40)
    return run, step


def test_the_graph_step_equals_the_uncaptured_step_for_20_steps():
    graph_run, graph = _steps("auto")
    eager_run, eager = _steps("jit")
    assert isinstance(graph, GraphStep) and isinstance(eager, TracedStep), (graph.fast_path, eager.fast_path)
    for run, step in ((graph_run, graph), (eager_run, eager)):
        pyro.set_rng_seed(1)
        order = torch.Generator().manual_seed(2)
        for _ in range(20):
            idx = torch.randperm(2000, generator=order)[:100].to("cuda")
            loss, finite = step(idx, 1.0)
        assert bool(finite)
    assert graph.captured.graph is not None and graph.fast_path == "cuda-graph", graph.fast_path
    moved = max((p - q).abs().max().item() for p, q in zip(graph_run.vae.parameters(), _steps("jit")[0].vae.parameters()))
    assert moved > 1e-3  # training moved the parameters: the comparison below can fail
    for (name, p), q in zip(graph_run.vae.named_parameters(), eager_run.vae.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_a_run_on_cuda_uses_the_graph_and_records_it(tmp_path):
    result = train(load_recipe(None, RECIPE), tmp_path / "run", progress=False, dataset=_binary_data())
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["fast_path"] == "cuda-graph" and info["device"].startswith("cuda"), info["fast_path"]
    assert result.metrics[-1]["test_elbo"] > -800


def test_a_non_finite_step_stops_the_run_with_a_finite_checkpoint(tmp_path, monkeypatch):
    import pyro_aevb.training.loop as loop

    recipe = load_recipe(None, RECIPE | {"sync_every": 4, "checkpoint_every": 1000})
    runs = []
    monkeypatch.setattr(loop, "build_run", lambda *a, **k: runs.append(build_run(*a, **k)) or runs[-1])

    def poison_after_step_11(step):
        if step == 11:  # a parameter turns NaN: step 12 computes a NaN loss inside the graph
            with torch.no_grad():
                next(runs[-1].vae.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"step 12 .*seen at step 12"):
        train(recipe, tmp_path / "run", progress=False, dataset=_binary_data(), callback=poison_after_step_11)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved["step"] == 10 and all(torch.isfinite(v).all() for v in saved["model"].values())
    assert json.loads((tmp_path / "run" / "run.json").read_text())["fast_path"] == "cuda-graph"


class _Crash(Exception):
    pass


def test_a_cuda_run_resumes_exactly(tmp_path):
    recipe = load_recipe(None, RECIPE)
    reference = train(recipe, tmp_path / "reference", progress=False, dataset=_binary_data())

    def crash(step):
        if step == 25:
            raise _Crash

    with pytest.raises(_Crash):
        train(recipe, tmp_path / "resumed", progress=False, dataset=_binary_data(), callback=crash)
    assert "cuda" in load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["rng"]  # the CUDA generator's state
    resumed = train(recipe, tmp_path / "resumed", progress=False, dataset=_binary_data(), resume=True)
    assert resumed.run_info["resumed_fast_paths"] == ["cuda-graph"]
    for (name, a), b in zip(reference.vae.state_dict().items(), resumed.vae.state_dict().values()):
        assert torch.equal(a, b), name


def test_bench_on_cuda_times_the_graph():
    proc = subprocess.run([sys.executable, "-m", "pyro_aevb", "bench", "--device", "cuda", "--quick", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    paths = {row["path"] for row in json.loads(proc.stdout)}
    assert {"sgvb-a cuda-graph (default)", "sgvb-b cuda-graph (default)"} <= paths, paths


def test_the_data_stays_on_the_device(tmp_path):
    """No host-to-device copy per step: the minibatch is gathered on the GPU, beta is written only when it changes."""
    from torch.profiler import ProfilerActivity, profile

    recipe = load_recipe(None, RECIPE | {"max_samples": 6000, "eval_every": 6000, "checkpoint_every": 6000})
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train(recipe, tmp_path / "run", progress=False, dataset=_binary_data())
    copies = [e for e in prof.events() if "HtoD" in e.name or "Memcpy HtoD" in e.name]
    steps = 60
    assert len(copies) < steps // 3, f"{len(copies)} host-to-device copies in {steps} steps"
