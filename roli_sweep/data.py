"""Datasets by name, split into train / val / test tensors with images in [0, 1].

Each registered loader returns the dataset's own train and test splits as uint8 / float tensors;
:func:`load_splits` then applies the options every dataset shares (class subset, stratified
train/val split by seed, size caps, resize). Everything is held in memory: the datasets a CPU
study uses are small, and a trial re-reads them in well under a second.

Registered here:
- ``digits``: scikit-learn's bundled handwritten digits (1797 images, 8x8, 10 classes), always
  available offline. It has no official test split, so a fixed stratified 20 % (seed 0, the same
  for every trial) is the test split.
- ``fashion_mnist``: Fashion-MNIST (Xiao et al., 2017; 60k train / 10k test, 28x28, 10 classes),
  read with torchvision from ``root``, else from Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``), else downloaded by torchvision when ``download: true``.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from roli_sweep._torchvision_compat import import_torchvision
from roli_sweep.config import DataConfig


@dataclass
class RawSplits:
    """A dataset's own splits. Images (N, C, H, W) float in [0, 1]; labels (N,) int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]


@dataclass
class DataSplits:
    """What a trial uses: three disjoint splits of (image (C, H, W) in [0, 1], label) pairs."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, Callable[[DataConfig], RawSplits]] = {}


def register_dataset(name: str) -> Callable[[Callable[[DataConfig], RawSplits]], Callable[[DataConfig], RawSplits]]:
    """Decorator: register a loader ``(DataConfig) -> RawSplits`` under ``name``."""

    def add(loader: Callable[[DataConfig], RawSplits]) -> Callable[[DataConfig], RawSplits]:
        DATASETS[name] = loader
        return loader

    return add


@register_dataset("digits")
def load_digits(cfg: DataConfig) -> RawSplits:
    """scikit-learn's digits: values 0..16 scaled to [0, 1]; fixed stratified 20 % test split (seed 0)."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels.numpy(), random_state=0
    )
    return RawSplits(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                     [str(d) for d in range(10)])


FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def cache_dir() -> Path:
    """Where roli_sweep keeps derived files: ``$ROLI_SWEEP_CACHE``, else ``~/.cache/roli_sweep``."""
    return Path(os.environ.get("ROLI_SWEEP_CACHE", Path.home() / ".cache" / "roli_sweep"))


def _fashion_mnist_torchvision_root(cfg: DataConfig) -> Path | None:
    """A folder torchvision's FashionMNIST reads (``<root>/FashionMNIST/raw/<IDX files>``), or None.

    A folder of gzipped IDX files (Debian's layout, or ``root`` holding ``*.gz``) is decompressed
    once into the cache: torchvision does not read symlinked or differently-checksummed .gz files.
    """
    places = [Path(cfg.root)] if cfg.root else []
    places.append(FASHION_MNIST_DEBIAN)
    for place in places:
        if all((place / "FashionMNIST" / "raw" / f).is_file() for f in FASHION_MNIST_FILES):
            return place
        if all((place / f"{f}.gz").is_file() for f in FASHION_MNIST_FILES):
            root = cache_dir() / "fashion_mnist" / hashlib.sha1(str(place.resolve()).encode()).hexdigest()[:12]
            raw = root / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for f in FASHION_MNIST_FILES:
                if not (raw / f).is_file():
                    with gzip.open(place / f"{f}.gz", "rb") as src, tempfile.NamedTemporaryFile(dir=raw, delete=False) as dst:
                        shutil.copyfileobj(src, dst)
                    os.replace(dst.name, raw / f)  # atomic: concurrent trials never see half a file
            return root
    return None


@register_dataset("fashion_mnist")
def load_fashion_mnist(cfg: DataConfig) -> RawSplits:
    """Fashion-MNIST through torchvision, from local files; downloads only with ``download: true``.

    Raises:
        FileNotFoundError: no local copy and ``download`` is false (the message says where it looked).
    """
    torchvision = import_torchvision()
    root = _fashion_mnist_torchvision_root(cfg)
    if root is None:
        if not cfg.download:
            looked = [cfg.root] if cfg.root else []
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {looked + [str(FASHION_MNIST_DEBIAN)]}: install Debian's "
                "'dataset-fashion-mnist', point data.root at the IDX files, or set data.download: true"
            )
        root = Path(cfg.root) if cfg.root else cache_dir() / "fashion_mnist" / "download"
    train = torchvision.datasets.FashionMNIST(str(root), train=True, download=cfg.download)
    test = torchvision.datasets.FashionMNIST(str(root), train=False, download=cfg.download)

    def images(ds) -> torch.Tensor:
        return ds.data.unsqueeze(1).float() / 255.0  # (N, 1, 28, 28)

    return RawSplits(images(train), train.targets.long(), images(test), test.targets.long(), list(train.classes))


def _stratified_take(labels: torch.Tensor, size: int | None, seed: int) -> np.ndarray:
    """Indices of a stratified subsample of ``size`` (all indices when size is None or too big)."""
    idx = np.arange(len(labels))
    if size is None or size >= len(labels):
        return idx
    taken, _ = train_test_split(idx, train_size=size, stratify=labels.numpy(), random_state=seed)
    return np.sort(taken)


def load_splits(cfg: DataConfig, seed: int) -> DataSplits:
    """Load a dataset and cut it into train / val / test as ``cfg`` says.

    The val split is a stratified ``val_fraction`` of the dataset's train split, drawn with
    ``seed``; the test split is the dataset's own and only ever capped (with a fixed seed 0, so
    every trial of a study tests on the same images).

    Returns:
        DataSplits with images (N, C, H, W) float32 in [0, 1] and labels (N,) int64 in 0..k-1.

    Raises:
        ValueError: a requested class does not exist in the dataset.
    """
    raw = DATASETS[cfg.name](cfg)
    names = raw.class_names
    train_x, train_y, test_x, test_y = raw.train_images, raw.train_labels, raw.test_images, raw.test_labels
    if cfg.classes is not None:
        missing = [c for c in cfg.classes if not 0 <= c < len(names)]
        if missing:
            raise ValueError(f"data.classes: {missing} not in {cfg.name} (classes 0..{len(names) - 1})")
        relabel = torch.full((len(names),), -1, dtype=torch.long)
        relabel[cfg.classes] = torch.arange(len(cfg.classes))
        keep_train, keep_test = relabel[train_y] >= 0, relabel[test_y] >= 0
        train_x, train_y = train_x[keep_train], relabel[train_y[keep_train]]
        test_x, test_y = test_x[keep_test], relabel[test_y[keep_test]]
        names = [names[c] for c in cfg.classes]

    fit_idx, val_idx = train_test_split(
        np.arange(len(train_y)), test_size=cfg.val_fraction, stratify=train_y.numpy(), random_state=seed
    )
    val_x, val_y = train_x[val_idx], train_y[val_idx]
    train_x, train_y = train_x[fit_idx], train_y[fit_idx]

    keep = _stratified_take(train_y, cfg.train_size, seed)
    train_x, train_y = train_x[keep], train_y[keep]
    keep = _stratified_take(val_y, cfg.val_size, seed)
    val_x, val_y = val_x[keep], val_y[keep]
    keep = _stratified_take(test_y, cfg.test_size, 0)
    test_x, test_y = test_x[keep], test_y[keep]

    def resize(x: torch.Tensor) -> torch.Tensor:
        if cfg.image_size is None or x.shape[-1] == cfg.image_size:
            return x.contiguous()
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp_(0.0, 1.0)

    return DataSplits(
        TensorDataset(resize(train_x), train_y),
        TensorDataset(resize(val_x), val_y),
        TensorDataset(resize(test_x), test_y),
        names,
    )
