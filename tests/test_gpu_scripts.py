import subprocess
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_the_gpu_scripts_parse(script):
    """The GPU check runs where no one can fix it mid-run: at least its shell must parse here."""
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_there_is_a_gpu_check():
    assert {s.name for s in SCRIPTS} >= {"gpu_check.sh", "gpu_wheels.sh"}
