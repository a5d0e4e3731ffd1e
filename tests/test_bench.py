"""The benchmark's reference step computes our loss; the bench command runs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pyro_aevb.commands.bench import reference_loss
from pyro_aevb.config import Recipe
from pyro_aevb.infer.registry import make_estimator
from pyro_aevb.generative.vae import build_vae
from gradients import seeded_loss_and_grads


@pytest.mark.parametrize("init", ["pytorch", "normal"])
def test_reference_step_equals_pyro_loss_and_gradients(init):
    torch.manual_seed(0)
    vae = build_vae(Recipe(latent_dim=20, hidden_dim=500, init=init), 784)
    x = torch.rand(100, 784).bernoulli()
    estimator = make_estimator("sgvb-b")
    for seed in (1, 2, 3):
        pyro_loss, g_pyro = seeded_loss_and_grads(
            vae, seed, lambda: estimator.differentiable_loss(vae.model, vae.guide, x, num_data=50_000))
        ref, g_ref = seeded_loss_and_grads(vae, seed, lambda: reference_loss(vae, x, num_data=50_000))
        assert torch.allclose(ref, pyro_loss, rtol=1e-5, atol=0), (ref.item(), pyro_loss.item())
        for k, grad in g_ref.items():
            assert torch.allclose(grad, g_pyro[k], rtol=1e-4, atol=1e-2), k


def test_bench_quick_runs_and_reports():
    proc = subprocess.run([sys.executable, "-m", "pyro_aevb", "bench", "--quick", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    paths = {r["path"] for r in rows}
    assert {"reference", "sgvb-a eager", "sgvb-b eager", "sgvb-b jit (< 20,000 steps)"} <= paths
    assert not any("compile" in p for p in paths)  # --quick leaves torch.compile out
    for r in rows:
        assert {"path", "device", "batch_size", "median_step_seconds", "steps_per_second",
                "ratio_to_reference"} <= set(r)
        assert r["median_step_seconds"] > 0 and r["device"] == "cpu"
    assert [r["ratio_to_reference"] for r in rows if r["path"] == "reference"] == [1.0]
    mm, ll = [r for r in rows if "num_samples" in r]
    assert mm["path"] == "torch.mm, same shapes" and ll["path"] == "log_likelihood K=500, eager"
    assert ll["ratio_to_reference"] == pytest.approx(ll["median_step_seconds"] / mm["median_step_seconds"])
    assert 0 < ll["matmul_share"] < 2 and ll["gflops_per_second"] > 0


def test_bench_times_every_cpu_path_on_the_same_parameters():
    from pyro_aevb.commands.bench import time_paths, training_paths

    torch.manual_seed(0)
    x = torch.rand(20, 784).bernoulli()
    paths = training_paths(Recipe(hidden_dim=16, latent_dim=2, init="pytorch"), x, num_data=1000)
    assert set(paths) == {"reference"} | {f"{e} {p}" for e in ("sgvb-a", "sgvb-b")
                                          for p in ("eager", "jit (< 20,000 steps)", "compile (default)")}
    for e in ("sgvb-a", "sgvb-b"):  # the first step: the same parameters and, from one seed, the same noise
        torch.manual_seed(1)
        eager = paths[f"{e} eager"]()
        torch.manual_seed(1)
        assert torch.allclose(paths[f"{e} compile (default)"](), eager, rtol=1e-5, atol=0), e
    times = time_paths(paths, rounds=1, steps=2, sync=lambda: None, warmup=1)
    assert set(times) == set(paths) and all(t > 0 for t in times.values())


def test_bench_cuda_without_cuda_is_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # on a GPU machine too: as if it had none
    proc = subprocess.run([sys.executable, "-m", "pyro_aevb", "bench", "--device", "cuda"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "CUDA is not available" in proc.stderr


def test_matmul_shapes_count_the_flops_of_an_importance_sampling_pass():
    """The raw-mm side of the evaluation benchmark does the same matrix products as log_likelihood."""
    from torch.utils.flop_counter import FlopCounterMode

    from pyro_aevb.commands.bench import matmul_shapes
    from pyro_aevb.evaluation.marginal_likelihood import log_likelihood

    vae = build_vae(Recipe(latent_dim=7, hidden_dim=30), 784)
    x = torch.rand(6, 784).bernoulli()
    with FlopCounterMode(display=False) as counter:
        log_likelihood(vae.model, vae.guide, x, num_samples=40, chunk_size=10_000, progress=False)
    expected = sum(2 * m * k * n for m, k, n in matmul_shapes(vae, rows=6, samples=40))
    assert counter.get_total_flops() == expected


def test_mixture_density_benchmark_prints_its_measurement():
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "mixture_density.py"
    proc = subprocess.run([sys.executable, str(script), "--components", "20", "--dim", "5", "--rows", "400",
                           "--rounds", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["rows"] == 400 and result["speedup"] > 0 and result["max_abs_difference"] < 1e-4
