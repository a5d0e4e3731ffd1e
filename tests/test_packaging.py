"""pyro-aevb as a user who installs it gets it: a wheel with the recipes inside, a command that trains from
a folder outside the checkout, ``--version``."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_listed_packages_are_every_folder_of_the_package():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "pyro_aevb").rglob("__init__.py")}
    assert listed == folders | {"pyro_aevb.recipes"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           str(REPO), "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("pyro_aevb-*.whl")
    return path


def test_the_wheel_holds_every_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = sorted(p.name for p in (REPO / "models").glob("*.toml"))
    assert recipes and all(f"pyro_aevb/recipes/{name}" in names for name in recipes)
    assert "pyro_aevb/recipes/figure2_paper.csv" in names  # figure2's paper curves
    assert "pyro_aevb/commands/cli.py" in names and "pyro_aevb/infer/traces.py" in names


def test_installed_from_the_wheel_it_trains_a_shipped_recipe(wheel, tmp_path, shared_data):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)  # torch comes from the system: no download
    bin_dir = env_dir / "bin"
    proc = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    outside = tmp_path / "elsewhere"  # not the checkout: nothing can be found through the source tree
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYRO_AEVB_DATA")}
    where = subprocess.run([str(bin_dir / "python"), "-c", "import pyro_aevb; print(pyro_aevb.__file__)"],
                           capture_output=True, text=True, cwd=outside, env=env, timeout=120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(env_dir), where.stdout
    version = subprocess.run([str(bin_dir / "pyro-aevb"), "--version"], capture_output=True, text=True, cwd=outside,
                             env=env, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("pyro-aevb 0.")
    run = subprocess.run([str(bin_dir / "pyro-aevb"), "train", "mnist_nz20", "--set", "max_samples=2000",
                          "--set", "eval_train_size=500", "--data-dir", str(shared_data), "--out", "run",
                          "--no-progress"], capture_output=True, text=True, cwd=outside, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "test bound" in run.stdout and (outside / "run" / "checkpoint.pt").is_file()
