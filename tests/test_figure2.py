"""``pyro-aevb figure2`` end to end on a tiny budget: two panels, one run found half-finished, then a larger
budget continues every run, then a rerun only collects."""

from __future__ import annotations

import json

import pytest

from pyro_aevb.commands import figure2 as figure2_module
from pyro_aevb.commands.cli import main
from pyro_aevb.config import load_recipe
from pyro_aevb.training.loop import train

PANELS = ["frey_nz2", "mnist_nz3"]


class _Crash(Exception):
    pass


def test_figure2_trains_resumes_continues_and_collects(tmp_path, shared_data, capsys):
    out = tmp_path / "fig2"
    overrides = ["hidden_dim=16", "eval_train_size=200", "eval_every=400", "checkpoint_every=400",
                 f"data_dir={str(shared_data)!r}".replace("'", '"')]
    # one run of the figure was stopped half-way (after its checkpoint at 400 samples)
    half = figure2_module.panel_recipe("mnist_nz3", "wake-sleep", 1200, overrides)

    def crash(step):
        if step == 6:
            raise _Crash

    with pytest.raises(_Crash):
        train(half, out / "mnist_nz3" / "wake-sleep", progress=False, callback=crash)

    argv = ["figure2", "--out", str(out), "--panels", ",".join(PANELS), "--budget", "1200", "--no-progress",
            *[a for o in overrides for a in ("--set", o)]]
    assert main(argv) == 0
    figure = json.loads((out / "figure2.json").read_text())
    actions = {(p, e): c["action"] for p, curves in figure["panels"].items() for e, c in curves.items()}
    assert actions == {("frey_nz2", "sgvb-b"): "trained", ("frey_nz2", "wake-sleep"): "trained",
                       ("mnist_nz3", "sgvb-b"): "trained", ("mnist_nz3", "wake-sleep"): "resumed"}
    for panel in PANELS:
        for estimator in ("sgvb-b", "wake-sleep"):
            c = figure["panels"][panel][estimator]
            assert c["samples"] == [400, 800, 1200] and len(c["test_elbo"]) == 3
            info = json.loads((out / panel / estimator / "run.json").read_text())
            assert info["status"] == "complete" and info["estimator"] == estimator
    assert (out / "figure2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wake-sleep" in capsys.readouterr().out

    argv[argv.index("--budget") + 1] = "2000"
    assert main(argv) == 0
    figure = json.loads((out / "figure2.json").read_text())
    assert {c["action"] for curves in figure["panels"].values() for c in curves.values()} == {"continued"}
    assert figure["panels"]["frey_nz2"]["sgvb-b"]["samples"][-1] == 2000
    assert main(argv) == 0  # all done: nothing trains
    figure = json.loads((out / "figure2.json").read_text())
    assert {c["action"] for curves in figure["panels"].values() for c in curves.values()} == {"collected"}


def test_both_estimators_of_a_panel_start_from_the_same_parameters(tmp_path):
    a, b = (figure2_module.panel_recipe("frey_nz2", e, 1000, ["hidden_dim=16"]) for e in ("sgvb-b", "wake-sleep"))
    assert a.seed == b.seed and {k: v for k, v in a.to_dict().items() if k != "estimator"} == \
        {k: v for k, v in b.to_dict().items() if k != "estimator"}
    assert load_recipe("frey_nz2").eval_every != a.eval_every == 10  # budget / 100 unless set
