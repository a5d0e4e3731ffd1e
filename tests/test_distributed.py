"""Data-parallel AEVB under torchrun, on the CPU (gloo): W processes compute the single-process update, a run
killed anywhere resumes bit-identically, a dead rank stops the others, two agents rendezvous as two nodes,
and the evaluation shards its data."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TINY = ["--set", "max_samples=3000", "--set", "eval_every=1000", "--set", "checkpoint_every=500",
        "--set", "hidden_dim=32", "--set", "latent_dim=2", "--set", "eval_train_size=200", "--no-progress"]


def torchrun(*args, nproc=2, env=None, timeout=240, extra=(), new_session=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          start_new_session=new_session)


def cli(*args):
    return ["-m", "pyro_aevb", *args]


def hooked(*args):
    return [str(HERE / "hooked_cli.py"), *args]


def _params(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def test_two_ranks_compute_the_single_process_gradient():
    proc = torchrun(str(HERE / "ddp_gradients.py"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 2 and result["moved"] > 1e-2  # training moved the parameters
    assert result["first_gradient_error"] < 1e-6 and result["parameter_error_after_50"] < 1e-5, result


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun(*cli("train", *TINY, "--out", str(out)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_a_two_rank_run_writes_one_run_directory_and_matches_one_process(two_rank_run, tmp_path):
    info = json.loads((two_rank_run / "run.json").read_text())
    assert info["status"] == "complete" and info["world_size"] == 2 and info["backend"] == "gloo"
    assert info["fast_path"] == "jit"  # the traced path, inside DistributedDataParallel
    longer = ["--set", "max_samples=30000", "--set", "eval_every=30000", "--set", "checkpoint_every=30000",
              "--set", "lr=0.05", "--set", "hidden_dim=32", "--set", "latent_dim=2", "--set", "eval_train_size=200",
              "--no-progress"]  # long enough that two runs' bounds differ by less than their standard errors
    two, one = tmp_path / "two", tmp_path / "one"
    assert torchrun(*cli("train", *longer, "--out", str(two))).returncode == 0
    proc = subprocess.run([sys.executable, *cli("train", *longer, "--out", str(one))], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    a, b = (json.loads((d / "run.json").read_text())["final"] for d in (two, one))
    se = (a["test_elbo_se"] ** 2 + b["test_elbo_se"] ** 2) ** 0.5
    assert abs(a["test_elbo"] - b["test_elbo"]) < 2 * se, (a, b)  # the same update, in distribution
    assert sorted(p.name for p in two_rank_run.iterdir()) == sorted(p.name for p in one.iterdir())  # one writer


def test_killed_anywhere_the_two_rank_run_resumes_bit_identically(two_rank_run, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(*hooked("train", *TINY, "--out", str(run)), env={"PYRO_AEVB_TEST_KILL_GROUP_AT_STEP": "17"})
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 15
    proc = torchrun(*cli("train", "--resume", str(run), "--no-progress"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _params(run), _params(two_rank_run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(run) == _rows(two_rank_run)
    one = subprocess.run([sys.executable, *cli("train", "--resume", str(run))], capture_output=True, text=True,
                         timeout=120)
    assert one.returncode == 2 and "2 process(es) wrote it" in one.stderr and "--force" in one.stderr


def test_a_dead_rank_stops_the_run_with_its_name(tmp_path):
    start = time.time()
    proc = torchrun(*hooked("train", *TINY, "--out", str(tmp_path / "run")),
                    env={"PYRO_AEVB_TEST_KILL_AT_STEP": "9", "PYRO_AEVB_TEST_KILL_RANK": "1"}, timeout=120)
    assert proc.returncode != 0 and time.time() - start < 60
    assert "rank      : 1" in proc.stderr or "rank 1" in proc.stderr, proc.stderr[-2000:]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 5  # intact


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine_train_together(tmp_path):
    port, out = _free_port(), tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=pyro-aevb-test",
            *cli("train", *TINY, "--out", str(out))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    results = [agent.communicate(timeout=240) for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), [err[-1500:] for _, err in results]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete" and info["world_size"] == 2


def test_the_evaluation_shards_its_data(two_rank_run):
    args = ["evaluate", str(two_rank_run), "--num-samples", "500", "--json", "--no-progress", "--seed", "0"]
    two = torchrun(*cli(*args))
    one = subprocess.run([sys.executable, *cli(*args)], capture_output=True, text=True, timeout=240)
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-1500:] + one.stderr
    a, b = json.loads(two.stdout.strip().splitlines()[-1]), json.loads(one.stdout)
    assert a["world_size"] == 2 and a["n"] == b["n"] == 1000
    assert abs(a["log_likelihood"] - b["log_likelihood"]) < 0.05, (a["log_likelihood"], b["log_likelihood"])
    assert abs(a["elbo"] - b["elbo"]) < 3 * b["elbo_se"]


@pytest.mark.parametrize("args, words", [
    (["train", "--set", "batch_size=101", "--set", "max_samples=500"], ["batch_size 101", "divisible", "2 processes"]),
    (["compare", "--set", "max_samples=500"], ["runs in one process", "without torchrun"]),
    (["train", "--set", "estimator=mcem", "--set", "max_samples=500"], ["mcem", "one process"]),
])
def test_what_cannot_run_data_parallel_is_one_line(args, words, tmp_path):
    proc = torchrun(*cli(*args, "--out", str(tmp_path / "o")))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pyro-aevb: error")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), proc.stderr[-1500:]
    assert not (tmp_path / "o").exists()
