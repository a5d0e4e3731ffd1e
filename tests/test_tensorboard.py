"""``--tensorboard``: the scalars of ``metrics.jsonl`` as TensorBoard events; a clear error without the package."""

from __future__ import annotations

import json
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TINY = ["--set", "max_samples=600", "--set", "eval_every=200", "--set", "hidden_dim=16", "--set", "latent_dim=2",
        "--set", "eval_train_size=200", "--no-progress"]


def _cli(*args, prelude: str = ""):
    code = f"import sys\n{prelude}\nfrom pyro_aevb.commands.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_tensorboard_gets_the_metrics_scalars(tmp_path):
    proc = _cli("train", *TINY, "--tensorboard", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for key in ("train_elbo", "test_elbo", "test_elbo_se", "beta"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [r["samples"] for r in rows]
        assert [s.value for s in scalars] == [float(__import__("numpy").float32(r[key])) for r in rows]


def test_without_the_package_the_error_names_it_and_nothing_is_written(tmp_path):
    proc = _cli("train", *TINY, "--tensorboard", "--out", str(tmp_path / "run"),
                prelude="sys.modules['tensorboard'] = None  # as if it were not installed")
    assert proc.returncode == 2
    assert "pip install tensorboard" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
