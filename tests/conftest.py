import os
from pathlib import Path

import pytest
import torch

import pyro

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PYRO_AEVB_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture
def lg():
    """The float64 linear-Gaussian model with closed-form log p(x) (tests/linear_gaussian.py)."""
    from linear_gaussian import LinearGaussian

    return LinearGaussian()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $PYRO_AEVB_DATA). Missing data is a failure, not a skip: CI has it."""
    assert (SHARED_DATA / "binarized_mnist" / "binarized_mnist_test.amat").is_file(), (
        f"shared data not found at {SHARED_DATA}; set PYRO_AEVB_DATA to the folder holding "
        "binarized_mnist/ and frey_faces/"
    )
    return SHARED_DATA


@pytest.fixture
def float64_single_thread():
    """float64 for closed-form comparisons; one thread, since tiny float64 ops only lose to a second one."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
