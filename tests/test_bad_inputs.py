"""Every bad input gets one line: non-zero exit, the offending key/file/value and the fix, no traceback,
and nothing new in the output directory. Table-driven, through the command line's entry point."""

import os
import shutil

import numpy as np
import pytest
import scipy.io
import torch

from pyro_aevb import data
from pyro_aevb.commands import cli
from pyro_aevb.config import load_recipe
from pyro_aevb.training.loop import train


@pytest.fixture(scope="module")
def work(tmp_path_factory, shared_data):
    """A scratch folder with bad recipes, bad data directories and bad checkpoints."""
    root = tmp_path_factory.mktemp("bad")
    recipes = {
        "unknown_key.toml": "latent_dims = 3\n",
        "wrong_type.toml": 'latent_dim = "big"\n',
        "zero_batch.toml": "batch_size = 0\n",
        "negative_lr.toml": "lr = -0.1\n",
        "bad_dataset.toml": 'dataset = "cifar10"\n',
        "bad_prior.toml": 'prior = "uniformish"\n',
        "bad_estimator.toml": 'estimator = "sgvb-c"\n',
        "bad_toml.toml": "latent_dim = 3\nhidden_dim = = 4\n",
        "bad_option.toml": 'prior = "standard-normal"\n[prior_options]\ncomponents = 3\n',
        "bad_choice.toml": 'on_nan = "ignore"\n',
        "huge_batch.toml": "batch_size = 5000\nmax_samples = 10000\n",
        "negative_budget.toml": "max_samples = -100\n",
        "not_a_table.toml": "prior_options = 3\n",
    }
    for name, text in recipes.items():
        (root / name).write_text(text)

    def amat_dir(name, train_text):
        d = root / name / "binarized_mnist"
        d.mkdir(parents=True)
        for split in ("valid", "test"):  # links, not copies
            os.symlink(shared_data / "binarized_mnist" / f"binarized_mnist_{split}.amat",
                       d / f"binarized_mnist_{split}.amat")
        (d / "binarized_mnist_train.amat").write_text(train_text)

    row = " ".join(["0"] * 784) + "\n"
    amat_dir("truncated", row * 3 + " ".join(["1"] * 200) + "\n")
    amat_dir("twos", row * 6 + " ".join(["2"] + ["0"] * 783) + "\n")
    amat_dir("short", row * 5)  # well-formed lines, but 5 instead of 50,000
    (root / "missing").mkdir()

    def frey_dir(name, **mat):
        d = root / name / "frey_faces"
        d.mkdir(parents=True)
        if mat:
            scipy.io.savemat(d / "frey_rawface.mat", mat)
        else:
            (d / "frey_rawface.mat").write_bytes(b"<html>404 not found</html>")

    frey_dir("no_ff", faces=np.zeros((560, 10), np.uint8))
    frey_dir("wrong_shape", ff=np.zeros((28, 20), np.uint8))
    frey_dir("nan_frey", ff=np.full((560, 10), np.nan))
    frey_dir("grey_out_of_range", ff=np.full((560, 10), 300.0))
    frey_dir("html_frey")

    # A good tiny run, then broken copies of it.
    good = root / "good_run"
    train(load_recipe(None, {"max_samples": 200, "eval_every": 200, "hidden_dim": 16, "latent_dim": 2}),
          good, progress=False)
    for name in ("v99", "truncated_ckpt", "mismatch", "no_ckpt", "garbage"):
        shutil.copytree(good, root / name)
    payload = torch.load(good / "checkpoint.pt", weights_only=True)
    torch.save(payload | {"version": 99}, root / "v99" / "checkpoint.pt")
    blob = (good / "checkpoint.pt").read_bytes()
    (root / "truncated_ckpt" / "checkpoint.pt").write_bytes(blob[: len(blob) // 3])
    torch.save(payload | {"recipe": payload["recipe"] | {"latent_dim": 5}}, root / "mismatch" / "checkpoint.pt")
    (root / "no_ckpt" / "checkpoint.pt").unlink()
    (root / "garbage" / "checkpoint.pt").write_text("not a checkpoint")
    (root / "a_file").write_text("x")
    return root


CASES = [
    # (id, argv with {w} for the scratch folder and {out} for a fresh output dir, expected code, words)
    ("recipe-unknown-key", ["train", "{w}/unknown_key.toml"], 2, ["latent_dims", "latent_dim", "valid keys"]),
    ("recipe-wrong-type", ["train", "{w}/wrong_type.toml"], 2, ["latent_dim", "int", "str"]),
    ("recipe-zero-size", ["train", "{w}/zero_batch.toml"], 2, ["batch_size", "> 0"]),
    ("recipe-negative-lr", ["train", "{w}/negative_lr.toml"], 2, ["lr", "> 0"]),
    ("recipe-negative-budget", ["train", "{w}/negative_budget.toml"], 2, ["max_samples", "> 0"]),
    ("recipe-unknown-dataset", ["train", "{w}/bad_dataset.toml"], 2, ["cifar10", "binarized-mnist", "mnist-5k"]),
    ("recipe-unknown-prior", ["train", "{w}/bad_prior.toml"], 2, ["uniformish", "standard-normal"]),
    ("recipe-unknown-estimator", ["train", "{w}/bad_estimator.toml"], 2, ["sgvb-c", "sgvb-a", "sgvb-b"]),
    ("recipe-unparseable-toml", ["train", "{w}/bad_toml.toml"], 2, ["bad_toml.toml", "not valid TOML", "line 2"]),
    ("recipe-unknown-option", ["train", "{w}/bad_option.toml"], 2, ["components", "prior_options"]),
    ("recipe-bad-choice", ["train", "{w}/bad_choice.toml"], 2, ["on_nan", "error", "skip"]),
    ("recipe-table-as-value", ["train", "{w}/not_a_table.toml"], 2, ["prior_options", "dict"]),
    ("recipe-batch-larger-than-data", ["train", "{w}/huge_batch.toml"], 2, ["batch_size", "5000", "4000"]),
    ("recipe-missing-file", ["train", "{w}/nope.toml"], 2, ["nope.toml", "not found"]),
    ("set-no-equals", ["train", "--set", "latent_dim"], 2, ["KEY=VALUE"]),
    ("set-unknown-key", ["train", "--set", "latnt_dim=3"], 2, ["latnt_dim", "latent_dim"]),
    ("set-wrong-type", ["train", "--set", "max_samples=lots"], 2, ["max_samples", "int"]),
    ("set-infinite-lr", ["train", "--set", "lr=inf"], 2, ["'lr'", "finite", "inf"]),
    ("set-nan-grad-clip", ["train", "--set", "grad_clip=nan"], 2, ["'grad_clip'", "finite"]),
    ("set-prior-factory-raises", ["train", "--set", "prior=os:system"], 2,
     ["recipe key 'prior'", "os:system", "raised TypeError"]),
    ("cli-bad-seed", ["train", "--seed", "abc"], 2, ["--seed", "invalid int"]),
    ("cli-unknown-command", ["fly"], 2, ["invalid choice", "fly"]),
    ("cli-force-without-resume", ["train", "--force"], 2, ["--force", "--resume"]),
    ("cli-cuda-missing", ["train", "--device", "cuda"], 2, ["cuda", "not available", "--device cpu"]),
    ("cli-out-is-a-file", ["train", "--set", "max_samples=100"], 2, ["a_file", "is a file"]),
    ("data-missing-file", ["train", "--data-dir", "{w}/missing", "--set", "dataset=binarized-mnist"], 1,
     ["binarized_mnist_train.amat", "PYRO_AEVB_DATA", "--data-dir", "file://"]),
    ("data-truncated-amat", ["train", "--data-dir", "{w}/truncated", "--set", "dataset=binarized-mnist"], 1,
     ["binarized_mnist_train.amat", "line 4", "expected 784 values, found 200"]),
    ("data-bad-value-amat", ["train", "--data-dir", "{w}/twos", "--set", "dataset=binarized-mnist"], 1,
     ["binarized_mnist_train.amat", "line 7", "'2' is not 0 or 1"]),
    ("data-short-amat", ["train", "--data-dir", "{w}/short", "--set", "dataset=binarized-mnist"], 1,
     ["binarized_mnist_train.amat", "expected 50000 lines, found 5"]),
    ("data-mat-without-ff", ["train", "--data-dir", "{w}/no_ff", "--set", "dataset=frey-faces"], 1,
     ["frey_rawface.mat", "no variable 'ff'", "faces"]),
    ("data-mat-wrong-shape", ["train", "--data-dir", "{w}/wrong_shape", "--set", "dataset=frey-faces"], 1,
     ["frey_rawface.mat", "560 x N"]),
    ("data-mat-nan", ["train", "--data-dir", "{w}/nan_frey", "--set", "dataset=frey-faces"], 1,
     ["frey_rawface.mat", "0..255"]),
    ("data-mat-out-of-range", ["train", "--data-dir", "{w}/grey_out_of_range", "--set", "dataset=frey-faces"], 1,
     ["frey_rawface.mat", "0..255"]),
    ("data-not-a-mat", ["train", "--data-dir", "{w}/html_frey", "--set", "dataset=frey-faces"], 1,
     ["frey_rawface.mat", "not a MATLAB .mat file"]),
    ("run-exists", ["train", "--set", "max_samples=100"], 2, ["already exists", "--resume", "--overwrite"]),
    ("resume-without-checkpoint", ["train", "--resume", "{w}/no_ckpt"], 2, ["no_ckpt", "no checkpoint.pt"]),
    ("resume-changed-recipe", ["train", "--resume", "{w}/good_run", "--set", "lr=0.3"], 2,
     ["lr: 0.01 -> 0.3", "--force"]),
    ("resume-with-out", ["train", "--resume", "{w}/good_run", "--out", "{out}"], 2, ["--resume", "--out"]),
    ("checkpoint-version", ["evaluate", "{w}/v99"], 1, ["version 99", "version 1"]),
    ("checkpoint-truncated", ["evaluate", "{w}/truncated_ckpt"], 1, ["checkpoint.pt", "cannot read checkpoint"]),
    ("checkpoint-garbage", ["evaluate", "{w}/garbage"], 1, ["checkpoint.pt"]),
    ("checkpoint-recipe-mismatch", ["evaluate", "{w}/mismatch"], 1, ["does not match its recipe"]),
    ("checkpoint-missing", ["sample", "{w}/no_ckpt", "--out", "{out}/s.png"], 1, ["no checkpoint", "pyro-aevb train"]),
    ("evaluate-no-run", ["evaluate", "{w}/nowhere"], 2, ["nowhere", "does not exist"]),
    ("sample-zero", ["sample", "{w}/good_run", "-n", "0", "--out", "{out}/s.png"], 2, ["-n", "positive"]),
]


@pytest.mark.parametrize("case_id, argv, code, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line(case_id, argv, code, words, work, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on a GPU machine too: as if it had none
    monkeypatch.chdir(tmp_path)
    # No network: downloads go to dead local URLs, so the test is offline and fast.
    monkeypatch.setattr(data, "BINARIZED_MNIST_URL", f"file://{tmp_path}/no-such-mirror/")
    monkeypatch.setattr(data, "FREY_FACES_URL", f"file://{tmp_path}/no-such-mirror/")
    out = tmp_path / "out"
    argv = [a.format(w=work, out=out) for a in argv]
    if argv[0] == "train" and "--resume" not in argv and "--out" not in argv:
        target = {"run-exists": work / "good_run", "cli-out-is-a-file": work / "a_file"}.get(case_id, out)
        argv += ["--out", str(target), "--no-progress"]
    snapshot = lambda: {p: p.stat().st_mtime_ns if p.is_file() else None for p in work.rglob("*")}  # noqa: E731
    before = snapshot()

    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("pyro-aevb: error: ")
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    assert not out.exists() or not any(out.iterdir())  # nothing new was written
    assert snapshot() == before  # nothing earlier was touched or left behind


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30
    kinds = {c[0].split("-")[0] for c in CASES}
    assert {"recipe", "set", "cli", "data", "run", "resume", "checkpoint"} <= kinds


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(Exception):
        cli.main(["--debug", "train", "--set", "latent_dim=oops"])
