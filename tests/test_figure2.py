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


def test_the_papers_curves_are_the_ones_read_from_its_pdf():
    # models/figure2_paper.csv as written by benchmarks/paper_figure2.py from arXiv:1312.6114v10
    import hashlib

    assert hashlib.sha256(figure2_module.PAPER_CSV.read_bytes()).hexdigest() == \
        "984f21fbca7122ca77c9c2f8a5c68379461b9fa81b7469fd3c8d4c3bd7a86830"
    curves = figure2_module.paper_curves()
    assert set(curves) == {(p, e, s) for p in figure2_module.PANELS for e in figure2_module.ESTIMATORS
                           for s in ("train", "test")}
    # values read by eye from the rendered figure, to its drawing's precision (a few nats)
    assert figure2_module.paper_bound("mnist_nz20", "sgvb-b", "test", 1e8) == pytest.approx(-100, abs=2)
    assert figure2_module.paper_bound("mnist_nz3", "sgvb-b", "train", 2e8) == pytest.approx(-129, abs=2)
    assert figure2_module.paper_bound("frey_nz20", "sgvb-b", "train", 1e8) == pytest.approx(1490, abs=20)
    assert figure2_module.paper_bound("frey_nz5", "wake-sleep", "test", 1e7) == pytest.approx(570, abs=15)
    # interpolated in log10 samples between the stored points (every 0.05 decade)
    x, y = curves[("mnist_nz10", "wake-sleep", "test")]
    i = int((x == 7.0).nonzero()[0][0])
    assert figure2_module.paper_bound("mnist_nz10", "wake-sleep", "test", 10**7.025) == \
        pytest.approx((y[i] + y[i + 1]) / 2)
    # outside the printed panel: no reading (the PDF's paths run on below -150, where the figure clips them)
    assert figure2_module.paper_bound("mnist_nz20", "sgvb-b", "test", 1e4) is None
    assert figure2_module.paper_bound("mnist_nz3", "sgvb-b", "test", 1e6) is None
    assert all(y.min() >= -150 for (p, _, _), (_, y) in curves.items() if p.startswith("mnist"))
    assert figure2_module.paper_bound("frey_nz2", "sgvb-b", "test", 1e9) is None
    assert figure2_module.paper_bound("mnist_nz20", "iwae", "test", 1e7) is None


def test_the_table_and_the_figure_set_the_paper_beside_each_run(tmp_path, monkeypatch):
    rows = [{"samples": s, "train_elbo": -100.0 - s / 1e6, "test_elbo": -101.0 - s / 1e6, "test_elbo_se": 0.3}
            for s in (10**6, 10**7)]
    curve = {"action": "collected", "run_dir": "", "samples": [r["samples"] for r in rows],
             "train_elbo": [r["train_elbo"] for r in rows], "test_elbo": [r["test_elbo"] for r in rows],
             "final": rows[-1], "paper_train": figure2_module.paper_bound("mnist_nz20", "sgvb-b", "train", 1e7),
             "paper_test": figure2_module.paper_bound("mnist_nz20", "sgvb-b", "test", 1e7)}
    figure = {"panels": {"mnist_nz20": {"sgvb-b": curve, "wake-sleep": {**curve, "paper_test": None}}}}
    lines = figure2_module.format_table(figure).splitlines()
    line = lines[1].split()
    assert line[:3] == ["mnist_nz20", "sgvb-b", "10,000,000"]
    assert float(line[7]) == pytest.approx(curve["paper_test"], abs=0.05) and -110 < curve["paper_test"] < -100
    assert lines[2].split()[7] == "-"

    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at its lines
    figure2_module.plot_figure2(figure, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 10_000
    lines = figures[0].axes[0].get_lines()
    for estimator, label in (("sgvb-b", "AEVB"), ("wake-sleep", "wake-sleep")):
        ours = {ln.get_color() for ln in lines if ln.get_label().startswith(f"{label} ")}
        paper = [ln for ln in lines if ln.get_alpha() == 0.3 and ln.get_color() in ours]
        assert len(ours) == 1 and len(paper) == 2  # the paper's train and test, in our colour
        x, y = figure2_module.paper_curves()[("mnist_nz20", estimator, "train")]
        assert any(list(ln.get_ydata()) == list(y) for ln in paper)
