"""Data loading: the embedded digits, the shared MNIST files, and clear errors for bad files."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch

from bench.foundation.data import load_dataset, read_idx
from bench.foundation.errors import RobustMatrixError


def test_digits_is_scaled_split_and_stratified(digits):
    assert digits.x_train.shape == (1347, 1, 8, 8) and digits.x_test.shape == (450, 1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert float(digits.x_train.min()) == 0.0 and float(digits.x_train.max()) == 1.0
    train_share = np.bincount(digits.y_train.numpy()) / len(digits.y_train)
    test_share = np.bincount(digits.y_test.numpy()) / len(digits.y_test)
    assert np.abs(train_share - test_share).max() < 0.01


def test_digits_are_exactly_scikit_learns(digits):
    """Read from scikit-learn's bundled file without importing scikit-learn: the same images and
    labels as ``load_digits``."""
    from sklearn.datasets import load_digits

    from bench.foundation.data import _bundled_digits

    pixels, target = _bundled_digits()
    reference = load_digits()
    assert np.array_equal(pixels, reference.data) and np.array_equal(target, reference.target)
    assert target.dtype == reference.target.dtype


def test_digits_split_is_fixed(digits):
    again = load_dataset("digits")
    assert torch.equal(again.x_test, digits.x_test) and torch.equal(again.y_train, digits.y_train)
    assert again.fingerprint() == digits.fingerprint()


def test_eval_examples_are_a_fixed_class_balanced_prefix(digits):
    first = digits.eval_indices(100)
    assert torch.equal(first, digits.eval_indices(100))
    assert torch.equal(digits.eval_indices(300)[:100], first)
    counts = np.bincount(digits.y_test[first].numpy(), minlength=10)
    assert counts.min() == counts.max() == 10
    with pytest.raises(RobustMatrixError, match="only 450 test examples"):
        digits.eval_indices(451)


def test_shared_mnist_test_set_loads_and_splits(shared_mnist_dir):
    data = load_dataset("mnist-t10k", shared_mnist_dir, download=False)
    assert data.x_train.shape == (8000, 1, 28, 28) and data.x_test.shape == (2000, 1, 28, 28)
    labels = torch.cat([data.y_train, data.y_test]).numpy()
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) == 1.0


def test_mnist_missing_training_files_is_a_clear_error_without_download(shared_mnist_dir, tmp_path):
    """Only the t10k files: the official 10,000 test images load; the training split is an error
    only when it is used (a model trained elsewhere is evaluated without it)."""
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(shared_mnist_dir / name, tmp_path / name)
    data = load_dataset("mnist", tmp_path, download=False)
    assert data.x_test.shape == (10000, 1, 28, 28) and data.image_shape == (1, 28, 28)
    assert not data.has_train()
    with pytest.raises(RobustMatrixError, match=r"train-images-idx3-ubyte.gz is missing from .* put the file there"):
        data.x_train  # noqa: B018
    assert len(data.eval_indices(10000)) == 10000
    with pytest.raises(RobustMatrixError, match="n_eval = 10001 but mnist has only 10000 test examples"):
        data.eval_indices(10001)
    # Its fingerprint is of the test split alone, and says so: never a full dataset's.
    assert data.fingerprint() != load_dataset("mnist-t10k", tmp_path, download=False).fingerprint()


def test_a_corrupted_file_fails_its_checksum(shared_mnist_dir, tmp_path):
    shutil.copy(shared_mnist_dir / "t10k-labels-idx1-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz")
    raw = gzip.decompress((shared_mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    tampered = bytearray(raw)
    tampered[-1] ^= 0xFF
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(tampered)))
    with pytest.raises(RobustMatrixError, match="does not match its published checksum"):
        load_dataset("mnist-t10k", tmp_path, download=False)


def test_download_failure_says_where_to_put_the_files(tmp_path):
    with pytest.raises(RobustMatrixError, match=r"could not be downloaded .* put the file there"):
        load_dataset("fashion-mnist", tmp_path, download=True)


def test_read_idx_rejects_non_idx_files(tmp_path):
    path = tmp_path / "bogus.gz"
    path.write_bytes(gzip.compress(b"not an idx file at all"))
    with pytest.raises(RobustMatrixError, match="not an IDX file"):
        read_idx(path)
    truncated = tmp_path / "short.gz"
    truncated.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2])))
    with pytest.raises(RobustMatrixError, match="payload size does not match"):
        read_idx(truncated)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(RobustMatrixError, match="unknown dataset 'imagenet'; choose one of digits, mnist"):
        load_dataset("imagenet")


def test_cifar10_missing_is_a_clear_error(tmp_path):
    with pytest.raises(RobustMatrixError, match="cifar-10-python.tar.gz is missing"):
        load_dataset("cifar10", tmp_path, download=False)


def test_offline_variable_never_downloads(tmp_path, monkeypatch):
    """ROBUSTMATRIX_OFFLINE=1 overrides a download the caller asked for (a batch job, a test run)."""
    attempts = []
    monkeypatch.setattr("urllib.request.urlopen", lambda *args, **kwargs: attempts.append(args))
    monkeypatch.setenv("ROBUSTMATRIX_OFFLINE", "1")
    with pytest.raises(RobustMatrixError, match="could not be downloaded \\(downloads are disabled\\)"):
        load_dataset("mnist", tmp_path, download=True)
    assert attempts == []


# ---------------------------------------------------------------------- downloads and CIFAR-10
class _Stream:
    """A fake HTTP response: ``total`` bytes in 64 KiB chunks, then end of file or ``error``."""

    def __init__(self, total: int, error: Exception | None = None) -> None:
        self.left, self.error = total, error

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            if self.error is not None:
                raise self.error
            return b""
        chunk = min(self.left, 1 << 16, size if size > 0 else 1 << 16)
        self.left -= chunk
        return b"\0" * chunk

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_download_that_fails_midway_leaves_no_part_file(tmp_path, monkeypatch):
    stream = _Stream(300_000, ConnectionResetError("connection reset by peer"))
    monkeypatch.setattr("urllib.request.urlopen", lambda *args, **kwargs: stream)
    with pytest.raises(RobustMatrixError, match=r"could not be downloaded \(.*connection reset by peer\)"):
        load_dataset("fashion-mnist", tmp_path, download=True)
    assert stream.left == 0, "the download started"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_download_beyond_the_published_size_is_aborted(tmp_path, monkeypatch):
    from bench.foundation.data import FASHION_FILES

    size = FASHION_FILES["test-images"].size  # the first file read (the training files only when used)
    stream = _Stream(size + (1 << 20))
    monkeypatch.setattr("urllib.request.urlopen", lambda *args, **kwargs: stream)
    with pytest.raises(RobustMatrixError, match=rf"more than {size} bytes, the file's published size; aborted"):
        load_dataset("fashion-mnist", tmp_path, download=True)
    assert stream.left > 0, "the stream was cut off, not read to its end"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_published_files_are_pinned_by_sha256_and_size():
    from bench.foundation.data import CIFAR10_ARCHIVE, FASHION_FILES, MNIST_FILES

    for remote in (*MNIST_FILES.values(), *FASHION_FILES.values(), CIFAR10_ARCHIVE):
        assert remote.sha256 and len(remote.sha256) == 64 and remote.size, remote.name


def _batch(value: int) -> bytes:
    import pickle

    return pickle.dumps({b"data": np.full((2, 3072), value, dtype=np.uint8), b"labels": [value % 10, 1]})


def test_cifar10_unpickles_the_bytes_it_verified(tmp_path, monkeypatch):
    """Each batch file is swapped for another the moment its checksum has been computed (a TOCTOU
    attack): what is loaded is still what was checked, because the checked bytes are unpickled."""
    import hashlib

    from bench.foundation import data as data_module

    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    genuine = {name: _batch(10 + i) for i, name in enumerate(names)}
    for name, raw in genuine.items():
        (batches / name).write_bytes(raw)
    digests = {hashlib.md5(raw).hexdigest(): name for name, raw in genuine.items()}
    monkeypatch.setattr(data_module, "CIFAR10_BATCHES", {name: md5 for md5, name in digests.items()})
    real_md5, real_new = hashlib.md5, hashlib.new

    class Swapping:
        def __init__(self, inner) -> None:
            self.inner = inner

        def update(self, chunk: bytes) -> None:
            self.inner.update(chunk)

        def hexdigest(self) -> str:
            digest = self.inner.hexdigest()
            if digest in digests:
                (batches / digests[digest]).write_bytes(_batch(255))
            return digest

    monkeypatch.setattr(hashlib, "md5", lambda *args, **kwargs: Swapping(real_md5(*args, **kwargs)))
    monkeypatch.setattr(hashlib, "new", lambda name, *args, **kwargs: Swapping(real_new(name, *args, **kwargs)))
    loaded = load_dataset("cifar10", tmp_path, download=False)
    monkeypatch.undo()
    assert (batches / "test_batch").read_bytes() == _batch(255), "the files were swapped"
    assert sorted(loaded.x_train.mul(255).round().unique().tolist()) == [10, 11, 12, 13, 14]
    assert loaded.x_test.mul(255).round().unique().tolist() == [15]
