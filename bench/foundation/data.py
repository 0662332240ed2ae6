"""Datasets as tensors in [0, 1], NCHW, with fixed splits — read straight from the published files.

No torchvision: MNIST-style IDX files and CIFAR-10's pickle batches are parsed here. Each file is
read into memory once, its bytes checked against the pinned checksums, and those same bytes parsed
(for CIFAR, unpickled): a file swapped between the check and the parse is never trusted. Downloads
stop at the file's published size, and a failed one leaves no partial file behind.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO

import numpy as np
import torch

from bench.foundation.errors import RobustMatrixError

DOWNLOAD_TIMEOUT_S = 30
MAX_DOWNLOAD_BYTES = 256 << 20
"""The cap on a download whose published size is not pinned: a mirror streaming without end must
not fill the disk."""


TrainSplit = Callable[[], "tuple[torch.Tensor, torch.Tensor]"]
"""Reads the training split when it is first needed (MNIST's training files are not needed to
evaluate a model trained elsewhere)."""


@dataclass(frozen=True)
class Dataset:
    """A classification dataset with a fixed train/test split; images NCHW float32 in [0, 1].

    ``train`` is the training split's (images, labels), or a callable reading them on first use:
    evaluating a pretrained model needs only the test files, and a missing training file is an
    error only for whoever trains."""

    name: str
    train: tuple[torch.Tensor, torch.Tensor] | TrainSplit
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @cached_property
    def _train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train() if callable(self.train) else self.train

    @property
    def x_train(self) -> torch.Tensor:
        return self._train[0]

    @property
    def y_train(self) -> torch.Tensor:
        return self._train[1]

    def has_train(self) -> bool:
        """Whether the training split can be read (its files present and verified)."""
        try:
            self._train  # noqa: B018 - reads it
        except RobustMatrixError:
            return False
        return True

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_test.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """Digest of the exact tensors, so a cached checkpoint is never reused on different data.
        Without a readable training split (only MNIST's t10k files at hand), of the test split alone
        and marked so: such a key is never that of a run that had the training files."""
        digest = hashlib.sha256(self.name.encode())
        tensors = (self.x_train, self.y_train) if self.has_train() else ()
        if not tensors:
            digest.update(b"test split only")
        for tensor in (*tensors, self.x_test, self.y_test):
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def eval_indices(self, n: int) -> torch.Tensor:
        """The first ``n`` test examples in a fixed class-interleaved order: every run and every
        cell sees the same examples, and any prefix is (nearly) class-balanced."""
        if n > len(self.y_test):
            raise RobustMatrixError(f"n_eval = {n} but {self.name} has only {len(self.y_test)} test examples")
        return torch.from_numpy(_interleaved_order(self.y_test.numpy())[:n])


def _interleaved_order(labels: np.ndarray, seed: int = 1) -> np.ndarray:
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = order[labels[order] == cls]
        rank[members] = np.arange(len(members))
    return np.lexsort((labels, rank))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a per-class random split; the legacy RandomState keeps it stable across numpy versions."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(members) * test_fraction))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))


def _split_dataset(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, classes: int) -> Dataset:
    train, test = stratified_split(y, test_fraction, seed=0)
    x_test, y_test = _to_tensors(x[test], y[test])
    return Dataset(name, _to_tensors(x[train], y[train]), x_test, y_test, classes)


def load_digits_dataset(data_dir: Path | None = None, download: bool = True) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), 75/25 stratified split; no download."""
    pixels, target = _bundled_digits()
    x = (pixels / 16.0).reshape(-1, 1, 8, 8)
    return _split_dataset("digits", x, target, 0.25, 10)


def _bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits file scikit-learn ships, read as ``load_digits`` reads it — without importing
    scikit-learn, which costs every worker process two seconds (SciPy); ``load_digits`` itself
    where the file is not where this version of scikit-learn keeps it."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1].astype(int)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


# ---------------------------------------------------------------------------------------------- IDX


@dataclass(frozen=True)
class RemoteFile:
    """A published file: where to get it and how to recognise it.

    ``md5``: the checksum the publisher (CIFAR-10, Fashion-MNIST) or torchvision (MNIST, whose site
    gives none) lists for the file. ``sha256`` and ``size``: of the same file, pinned from TensorFlow
    Datasets' checksum lists (``tensorflow_datasets/url_checksums``), since no publisher gives a
    sha256; both digests must match, so an MD5 collision alone is not enough. ``size`` also caps the
    download. ``content_sha256`` (optional): of the decompressed payload, which also accepts a
    faithful re-compression of the same bytes (the shared MNIST test files are one)."""

    name: str
    md5: str
    sha256: str | None = None
    size: int | None = None
    content_sha256: str | None = None


MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_FILES = {
    "train-images": RemoteFile(
        "train-images-idx3-ubyte.gz",
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        9912422,
    ),
    "train-labels": RemoteFile(
        "train-labels-idx1-ubyte.gz",
        "d53e105ee54ea40749a09fcbcd1e9432",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        28881,
    ),
    "test-images": RemoteFile(
        "t10k-images-idx3-ubyte.gz",
        "9fb629c4189551a2d022fa330f9573f3",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        1648877,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "test-labels": RemoteFile(
        "t10k-labels-idx1-ubyte.gz",
        "ec29112dd5afa0611ce80d1b7f02629c",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        4542,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}
FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
FASHION_FILES = {
    "train-images": RemoteFile(
        "train-images-idx3-ubyte.gz",
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        26421880,
    ),
    "train-labels": RemoteFile(
        "train-labels-idx1-ubyte.gz",
        "25c81989df183df01b3e8a0aad5dffbe",
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        29515,
    ),
    "test-images": RemoteFile(
        "t10k-images-idx3-ubyte.gz",
        "bef4ecab320f06d8554ea6380940ec79",
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        4422102,
    ),
    "test-labels": RemoteFile(
        "t10k-labels-idx1-ubyte.gz",
        "bb300cfdad3c16e7a12a480ee83cd310",
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        5148,
    ),
}
CIFAR10_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)
CIFAR10_ARCHIVE = RemoteFile(
    "cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
    "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    170498071,
)
CIFAR10_BATCHES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
"""MD5 of each extracted batch (torchvision's list). No sha256 of the batches is published or pinned
anywhere we could check, so they keep MD5; an archive this code extracts is sha256-checked first."""


def _verified(raw: bytes, remote: RemoteFile) -> bool:
    """Whether these bytes are the published file (both pinned digests), or a re-compression of its
    exact payload."""
    if hashlib.md5(raw).hexdigest() == remote.md5 and (  # noqa: S324 - one of two digests, not alone
        remote.sha256 is None or hashlib.sha256(raw).hexdigest() == remote.sha256
    ):
        return True
    if remote.content_sha256 is None:
        return False
    try:
        return hashlib.sha256(gzip.decompress(raw)).hexdigest() == remote.content_sha256
    except (OSError, EOFError):
        return False


class _TooLarge(Exception):
    pass


def _copy_capped(source: IO[bytes], out: IO[bytes], limit: int) -> None:
    """Copy at most ``limit`` bytes; one more is an error (a wrong file or an endless stream)."""
    written = 0
    for chunk in iter(lambda: source.read(1 << 20), b""):
        written += len(chunk)
        if written > limit:
            raise _TooLarge(f"more than {limit} bytes, the file's published size; aborted")
        out.write(chunk)


def _download(remote: RemoteFile, mirrors: tuple[str, ...], target: Path) -> str | None:
    """Fetch into ``target`` atomically, at most the published size (else MAX_DOWNLOAD_BYTES); returns
    None on success, else the last error. The partial ``.part`` file is removed whatever happens."""
    target.parent.mkdir(parents=True, exist_ok=True)
    limit = remote.size if remote.size is not None else MAX_DOWNLOAD_BYTES
    error = "no mirror"
    for mirror in mirrors:
        url = mirror + remote.name
        tmp: str | None = None
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310
                fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
                with os.fdopen(fd, "wb") as out:
                    _copy_capped(response, out, limit)
            os.replace(tmp, target)
            tmp = None
            return None
        except (_TooLarge, urllib.error.URLError, OSError, TimeoutError) as exc:
            error = f"{url}: {getattr(exc, 'reason', exc)}"
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    return error


def _fetch(dataset: str, remote: RemoteFile, mirrors: tuple[str, ...], data_dir: Path, download: bool) -> bytes:
    """The file's verified bytes, read once: callers parse these, never the file again."""
    path = data_dir / remote.name
    if not path.exists():
        reason = "downloads are disabled" if not download else _download(remote, mirrors, path)
        if reason is not None:
            raise RobustMatrixError(
                f"{dataset}: {remote.name} is missing from {data_dir} and could not be downloaded "
                f"({reason}); put the file there (from {mirrors[0]}) or pass --data-dir"
            )
    raw = path.read_bytes()
    if not _verified(raw, remote):
        pinned = f"sha256 {remote.sha256}" if remote.sha256 else f"md5 {remote.md5}"
        raise RobustMatrixError(
            f"{dataset}: {path} does not match its published checksum ({pinned}); "
            "delete it to download it again, or replace it with the original file"
        )
    return raw


def parse_idx(raw: bytes, source: str | Path) -> np.ndarray:
    """Parse the (decompressed) bytes of an IDX file of unsigned bytes (the MNIST format)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise RobustMatrixError(f"{source} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise RobustMatrixError(f"{source}: IDX header says {shape} but the payload size does not match")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzip-compressed IDX file of unsigned bytes (the MNIST format)."""
    return parse_idx(gzip.decompress(Path(path).read_bytes()), path)


def _load_idx_pair(
    dataset: str, files: dict[str, RemoteFile], mirrors: tuple[str, ...], data_dir: Path, split: str, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = files[f"{split}-images"], files[f"{split}-labels"]
    images = parse_idx(gzip.decompress(_fetch(dataset, images_file, mirrors, data_dir, download)), images_file.name)
    labels = parse_idx(gzip.decompress(_fetch(dataset, labels_file, mirrors, data_dir, download)), labels_file.name)
    if images.shape[0] != labels.shape[0]:
        raise RobustMatrixError(f"{dataset}: {len(images)} {split} images but {len(labels)} labels")
    return images.reshape(-1, 1, 28, 28) / np.float32(255.0), labels


def _idx_dataset(name: str, files: dict[str, RemoteFile], mirrors: tuple[str, ...]) -> Callable[..., Dataset]:
    def load(data_dir: Path | None = None, download: bool = True) -> Dataset:
        directory = Path(data_dir) if data_dir else default_data_dir(name)
        x_test, y_test = _load_idx_pair(name, files, mirrors, directory, "test", download)

        def train() -> tuple[torch.Tensor, torch.Tensor]:
            return _to_tensors(*_load_idx_pair(name, files, mirrors, directory, "train", download))

        return Dataset(name, train, *_to_tensors(x_test, y_test), 10)

    load.__doc__ = (
        f"{name}: the official 60,000/10,000 split from the four IDX files; the training files are read "
        "(and downloaded) only when the training split is first used."
    )
    return load


def load_mnist_t10k(data_dir: Path | None = None, download: bool = True) -> Dataset:
    """The MNIST *test* set alone, split 8,000/2,000 (stratified, fixed seed): for offline MNIST runs
    where only ``t10k-*`` files are at hand."""
    directory = Path(data_dir) if data_dir else default_data_dir("mnist")
    x, y = _load_idx_pair("mnist-t10k", MNIST_FILES, MNIST_MIRRORS, directory, "test", download)
    return _split_dataset("mnist-t10k", x, y, 0.2, 10)


def load_cifar10(data_dir: Path | None = None, download: bool = True) -> Dataset:
    """CIFAR-10 from the python-pickle batches (``cifar-10-batches-py/``), or the archive holding them."""
    directory = Path(data_dir) if data_dir else default_data_dir("cifar10")
    batches = directory / "cifar-10-batches-py"
    if not batches.is_dir():
        archive = _fetch("cifar10", CIFAR10_ARCHIVE, CIFAR10_MIRRORS, directory, download)
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("cifar-10-batches-py/")]
            tar.extractall(directory, members=members, filter="data")
    arrays = {}
    for name, md5 in CIFAR10_BATCHES.items():
        path = batches / name
        raw = path.read_bytes() if path.is_file() else b""
        if hashlib.md5(raw).hexdigest() != md5:  # noqa: S324 - no sha256 of the batches is known
            raise RobustMatrixError(f"cifar10: {path} is missing or does not match its published md5 {md5}")
        batch = pickle.loads(raw, encoding="bytes")  # noqa: S301 - these very bytes were verified above
        arrays[name] = (batch[b"data"].reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"]))
    train = [arrays[f"data_batch_{i}"] for i in range(1, 6)]
    x_train = np.concatenate([x for x, _ in train]) / np.float32(255.0)
    y_train = np.concatenate([y for _, y in train])
    x_test, y_test = arrays["test_batch"]
    return Dataset("cifar10", _to_tensors(x_train, y_train), *_to_tensors(x_test / np.float32(255.0), y_test), 10)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits_dataset,
    "mnist": _idx_dataset("mnist", MNIST_FILES, MNIST_MIRRORS),
    "mnist-t10k": load_mnist_t10k,
    "fashion-mnist": _idx_dataset("fashion-mnist", FASHION_FILES, FASHION_MIRRORS),
    "cifar10": load_cifar10,
}


@dataclass(frozen=True)
class DatasetShape:
    """What a dataset's split looks like, known without its files: ``robustmatrix plan`` costs a
    matrix before anything is downloaded (a test checks it against the loaded digits and MNIST)."""

    train: int
    test: int
    image_shape: tuple[int, int, int]
    num_classes: int


DATASET_SHAPES: dict[str, DatasetShape] = {
    "digits": DatasetShape(1347, 450, (1, 8, 8), 10),
    "mnist": DatasetShape(60000, 10000, (1, 28, 28), 10),
    "mnist-t10k": DatasetShape(8000, 2000, (1, 28, 28), 10),
    "fashion-mnist": DatasetShape(60000, 10000, (1, 28, 28), 10),
    "cifar10": DatasetShape(50000, 10000, (3, 32, 32), 10),
}


OFFLINE_VARIABLE = "ROBUSTMATRIX_OFFLINE"
"""Set to 1 to never download, whatever a matrix or command line says (batch jobs, test suites)."""


def default_data_dir(name: str) -> Path:
    root = os.environ.get("ROBUSTMATRIX_DATA")
    base = Path(root) if root else Path.home() / ".cache" / "robustmatrix" / "data"
    return base / name


def load_dataset(name: str, data_dir: Path | str | None = None, download: bool = True) -> Dataset:
    """Load a dataset by name; files are looked for in ``data_dir`` (default: $ROBUSTMATRIX_DATA/<name>
    or ~/.cache/robustmatrix/data/<name>) and downloaded there when missing, unless ``download`` is
    false or $ROBUSTMATRIX_OFFLINE is set."""
    if name not in DATASETS:
        raise RobustMatrixError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    offline = os.environ.get(OFFLINE_VARIABLE, "") not in ("", "0")
    return DATASETS[name](Path(data_dir) if data_dir else None, download and not offline)
