"""Datasets: splits are disjoint, stratified, deterministic, in [0, 1]; Fashion-MNIST reads IDX files."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from roli_sweep.config import DataConfig
from roli_sweep.data import load_splits


def test_digits_splits_are_disjoint_in_range_and_deterministic():
    cfg = DataConfig(name="digits", val_fraction=0.2, image_size=16)
    a, b = load_splits(cfg, seed=1), load_splits(cfg, seed=1)
    x, y = a.train.tensors
    assert x.shape[1:] == (1, 16, 16) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert a.num_classes == 10 and set(y.tolist()) == set(range(10))
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])  # same seed, same split
    c = load_splits(cfg, seed=2)
    assert not torch.equal(a.val.tensors[1], c.val.tensors[1])  # the seed moves the val split
    assert torch.equal(a.test.tensors[0], c.test.tensors[0])  # the test split never moves
    # no image of val is in train (rows compared as bytes)
    train_rows = {r.numpy().tobytes() for r in a.train.tensors[0]}
    overlap = sum(r.numpy().tobytes() in train_rows for r in a.val.tensors[0])
    assert overlap <= 2, "digits has a few duplicate images, never a shared split"


def test_class_subset_relabels_and_caps_stratify():
    cfg = DataConfig(name="digits", classes=[7, 3], train_size=40, val_size=10, test_size=20)
    s = load_splits(cfg, seed=0)
    assert s.class_names == ["7", "3"]
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 20)
    assert torch.bincount(s.train.tensors[1]).tolist() == [20, 20]
    with pytest.raises(ValueError, match="12"):
        load_splits(DataConfig(name="digits", classes=[1, 12]), seed=0)


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_gzipped_idx_files(tmp_path, monkeypatch):
    monkeypatch.setenv("ROLI_SWEEP_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 100), ("t10k", 30)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    s = load_splits(DataConfig(name="fashion_mnist", root=str(tmp_path), classes=[0, 1, 2, 3, 4]), seed=0)
    assert s.class_names[:2] == ["T-shirt/top", "Trouser"]
    assert len(s.train) + len(s.val) == 50 and len(s.test) == 15
    assert s.train.tensors[0].shape[1:] == (1, 28, 28) and s.train.tensors[0].max() <= 1.0


def test_fashion_mnist_missing_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr("roli_sweep.data.FASHION_MNIST_DEBIAN", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="download"):
        load_splits(DataConfig(name="fashion_mnist", root=str(tmp_path)), seed=0)
