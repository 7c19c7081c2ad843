"""Datasets by name, split into train / val / test tensors with images in [0, 1].

Each registered loader returns the dataset's own train and test splits as uint8 / float tensors;
:func:`load_splits` then applies the options every dataset shares (class subset, stratified
train/val split by seed, size caps, resize). The small datasets (digits, Fashion-MNIST, CIFAR) are held in
memory: a trial re-reads them in well under a second. The image-list datasets are decoded once per node into
an on-disk cache (:mod:`roli_sweep.image_cache`) and streamed from it by DataLoader workers with the
reference's crops and flips (:mod:`roli_sweep.image_stream`).

Registered here:
- ``digits``: scikit-learn's bundled handwritten digits (1797 images, 8x8, 10 classes), always
  available offline. It has no official test split, so a fixed stratified 20 % (seed 0, the same
  for every trial) is the test split.
- ``fashion_mnist``: Fashion-MNIST (Xiao et al., 2017; 60k train / 10k test, 28x28, 10 classes),
  read with torchvision from ``root``, else from Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``), else downloaded by torchvision when ``download: true``.
- ``cifar10``, ``cifar100``: CIFAR-10 / CIFAR-100 (Krizhevsky, 2009; 50k train / 10k test, 32x32 RGB,
  10 / 100 classes), read with torchvision from ``root`` in its on-disk format
  (``<root>/cifar-10-batches-py/``, ``<root>/cifar-100-python/``), downloaded by torchvision only
  when ``download: true``.
- ``imagefolder``: image files listed in fixed split files in the RoLI reference code's format
  (github.com/DongXzz/RoLI, ``src/data/datasets/json_dataset.py``): one JSON object per split,
  ``{image path relative to root: integer label}``, in ``split_dir``: ``train.json``,
  ``test.json`` and, if the dataset has a fixed validation split, ``val.json``.
- ``caltech256`` (257 classes), ``cub200`` (CUB-200-2011, 200 classes), ``stanford_dogs`` (120
  classes): ``imagefolder`` presets whose split files must have exactly that many labels, e.g. the
  reference code's ``data_splits/caltech256/`` with ``root`` at ``256_ObjectCategories``.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from roli_sweep._torchvision_compat import import_torchvision
from roli_sweep.messages import shown

if TYPE_CHECKING:
    from roli_sweep.config import DataConfig
    from roli_sweep.image_cache import DecodedImages
    from roli_sweep.image_stream import StreamedImages


@dataclass
class RawSplits:
    """A dataset's own splits. Images (N, C, H, W), float in [0, 1] or uint8 in 0..255; labels (N,) int64.

    ``val_images`` / ``val_labels`` are a fixed validation split where the dataset has one
    (``imagefolder`` with ``val.json``); otherwise None and :func:`load_splits` draws one from train.
    With ``decoded`` (the image-list datasets), the "images" are (N,) int64 rows of that cache instead, and the
    images are streamed from it (:mod:`roli_sweep.image_stream`).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    decoded: DecodedImages | None = None


class ImageDataset(TensorDataset):
    """(image, label) pairs over in-memory tensors; uint8 images are held as such (a quarter of float32's
    memory) and each sample is returned as float32 (C, H, W) in [0, 1]."""

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return (image.float() / 255.0 if image.dtype == torch.uint8 else image), label


@dataclass
class DataSplits:
    """What a trial uses: three disjoint splits of (image (C, H, W) float in [0, 1], label) pairs, in memory
    (:class:`ImageDataset`) or streamed from the decoded-image cache (:class:`StreamedImages`)."""

    train: ImageDataset | StreamedImages
    val: ImageDataset | StreamedImages
    test: ImageDataset | StreamedImages
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, Callable[[DataConfig], RawSplits]] = {}
"""Every dataset's loader by name."""

FILE_CHECKS: dict[str, Callable[[DataConfig], int]] = {}
"""Every dataset's preflight check by name: it finds the files without loading them and returns the number of
classes (:func:`check_files`)."""


def register_dataset(name: str, check: Callable[[DataConfig], int]
                     ) -> Callable[[Callable[[DataConfig], RawSplits]], Callable[[DataConfig], RawSplits]]:
    """Decorator: register a loader ``(DataConfig) -> RawSplits`` under ``name``, with ``check``, which finds its
    files without loading them (raising FileNotFoundError / ValueError naming the key and path, as the loader
    would) and returns its number of classes.

    Raises:
        ValueError: ``name`` is registered already (a second loader would silently replace the first).
    """

    def add(loader: Callable[[DataConfig], RawSplits]) -> Callable[[DataConfig], RawSplits]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered already (by {DATASETS[name].__qualname__})")
        DATASETS[name], FILE_CHECKS[name] = loader, check
        return loader

    return add


@register_dataset("digits", check=lambda cfg: 10)
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


def _fashion_mnist_root(cfg: DataConfig) -> Path:
    """The folder torchvision reads Fashion-MNIST from (a download goes there with ``download: true``).

    Raises:
        FileNotFoundError: no local copy and ``download`` is false (the message says where it looked).
    """
    root = _fashion_mnist_torchvision_root(cfg)
    if root is not None:
        return root
    if not cfg.download:
        looked = [cfg.root] if cfg.root else []
        raise FileNotFoundError(
            f"data.root: Fashion-MNIST not found in {looked + [str(FASHION_MNIST_DEBIAN)]}: install Debian's "
            "'dataset-fashion-mnist', point data.root at the IDX files, or set data.download: true"
        )
    return Path(cfg.root) if cfg.root else cache_dir() / "fashion_mnist" / "download"


def _check_fashion_mnist(cfg: DataConfig) -> int:
    _fashion_mnist_root(cfg)
    return 10


@register_dataset("fashion_mnist", check=_check_fashion_mnist)
def load_fashion_mnist(cfg: DataConfig) -> RawSplits:
    """Fashion-MNIST through torchvision, from local files; downloads only with ``download: true``.

    Raises:
        FileNotFoundError: no local copy and ``download`` is false (the message says where it looked).
    """
    torchvision = import_torchvision()
    root = _fashion_mnist_root(cfg)
    train = torchvision.datasets.FashionMNIST(str(root), train=True, download=cfg.download)
    test = torchvision.datasets.FashionMNIST(str(root), train=False, download=cfg.download)

    def images(ds) -> torch.Tensor:
        return ds.data.unsqueeze(1).float() / 255.0  # (N, 1, 28, 28)

    return RawSplits(images(train), train.targets.long(), images(test), test.targets.long(), list(train.classes))


def _cifar_root(cfg: DataConfig, dataset_cls: type) -> Path:
    """The root folder torchvision reads ``dataset_cls`` from (``<root>/<base_folder>/``).

    Raises:
        FileNotFoundError: a file is missing and ``download`` is false (names the folder and the files).
    """
    root = Path(cfg.root) if cfg.root else cache_dir() / "cifar"
    folder = root / dataset_cls.base_folder
    files = [name for name, _ in dataset_cls.train_list + dataset_cls.test_list] + [dataset_cls.meta["filename"]]
    absent = [f for f in files if not (folder / f).is_file()]
    if absent and not cfg.download:
        raise FileNotFoundError(
            f"data.root: {cfg.name} not found: {str(folder)!r} lacks {absent}; point data.root at the folder "
            f"holding {dataset_cls.base_folder}/ (torchvision's layout, unpacked from {dataset_cls.filename}), "
            "or set data.download: true"
        )
    return root


def _load_cifar(cfg: DataConfig, dataset_cls: type) -> RawSplits:
    """CIFAR-10 / CIFAR-100 through torchvision's ``dataset_cls`` from ``<root>/<base_folder>/``.

    ``root`` defaults to ``<cache>/cifar`` (where a download without ``root`` goes). torchvision
    checks every file against the md5 of the official release, so a truncated or altered copy is
    refused rather than read.

    Returns:
        RawSplits with images (N, 3, 32, 32) float32 in [0, 1].

    Raises:
        FileNotFoundError: a file is missing and ``download`` is false (the message names the folder
            and the files).
        RuntimeError: torchvision's md5 check failed (a corrupt copy).
    """
    root = _cifar_root(cfg, dataset_cls)
    train = dataset_cls(str(root), train=True, download=cfg.download)
    test = dataset_cls(str(root), train=False, download=cfg.download)

    def images(ds) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))).float() / 255.0  # NHWC -> NCHW

    def labels(ds) -> torch.Tensor:
        return torch.tensor(ds.targets, dtype=torch.long)

    return RawSplits(images(train), labels(train), images(test), labels(test), list(train.classes))


def _check_cifar(classes: int) -> Callable[[DataConfig], int]:
    """The preflight check of CIFAR-``classes``: torchvision's files (and checksums) under ``root``."""

    def check(cfg: DataConfig) -> int:
        datasets = import_torchvision().datasets
        _cifar_root(cfg, datasets.CIFAR10 if classes == 10 else datasets.CIFAR100)
        return classes

    return check


@register_dataset("cifar10", check=_check_cifar(10))
def load_cifar10(cfg: DataConfig) -> RawSplits:
    """CIFAR-10 (``<root>/cifar-10-batches-py/``), see :func:`_load_cifar`."""
    return _load_cifar(cfg, import_torchvision().datasets.CIFAR10)


@register_dataset("cifar100", check=_check_cifar(100))
def load_cifar100(cfg: DataConfig) -> RawSplits:
    """CIFAR-100 with its 100 fine labels (``<root>/cifar-100-python/``), see :func:`_load_cifar`."""
    return _load_cifar(cfg, import_torchvision().datasets.CIFAR100)


IMAGE_LIST_DATASETS: dict[str, int | None] = {"imagefolder": None, "caltech256": 257, "cub200": 200, "stanford_dogs": 120}
"""Datasets read from JSON split files, with the number of labels their split files must have (None: any)."""

SPLIT_FILES = ("train", "val", "test")
"""Split file stems in ``split_dir``; ``val`` is optional."""

CROP_FRACTION = 224 / 256
"""Centre crop after resizing the shorter side, as the reference code evaluates (Resize(256), CenterCrop(224))."""


def _read_split_file(path: Path) -> dict[str, int]:
    """One split file: a JSON object ``{image path relative to root: integer label}``.

    Raises:
        ValueError: the file is not such a non-empty object (the message names the file).
    """
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"split file {str(path)!r} is not valid JSON: {str(err)[:200]}") from None
    if not (isinstance(entries, dict) and entries and all(type(label) is int for label in entries.values())):
        raise ValueError(f"split file {str(path)!r}: expected a non-empty JSON object {{image path: integer label}}")
    return entries


def _class_names(splits: dict[str, dict[str, int]], ids: list[int]) -> list[str]:
    """Per label id: the one folder all its images sit in (e.g. ``001.ak47``), else the id itself."""
    folders: dict[int, set[str]] = {i: set() for i in ids}
    for entries in splits.values():
        for rel, label in entries.items():
            folders[label].add(Path(rel).parent.name)

    def name(i: int) -> str:
        only = next(iter(folders[i])) if len(folders[i]) == 1 else ""
        return only or str(i)

    return [name(i) for i in ids]


def _image_list_splits(cfg: DataConfig) -> tuple[dict[str, dict[str, int]], list[int]]:
    """The split files' entries ({split: {image path: label}}) and the sorted label ids, every image checked present.

    Raises:
        FileNotFoundError: ``train.json`` / ``test.json`` or an image file is missing.
        ValueError: a split file is malformed, or a preset's split files do not have its number of labels.
    """
    split_dir = Path(cfg.split_dir or cfg.root)
    present = {s: split_dir / f"{s}.json" for s in SPLIT_FILES if (split_dir / f"{s}.json").is_file()}
    if "train" not in present or "test" not in present:
        raise FileNotFoundError(f"data.split_dir: {cfg.name}: {str(split_dir)!r} needs train.json and test.json "
                                f"(val.json optional); found {sorted(p.name for p in present.values())}")
    splits = {s: _read_split_file(path) for s, path in present.items()}
    ids = sorted({label for entries in splits.values() for label in entries.values()})
    expected = IMAGE_LIST_DATASETS[cfg.name]
    if expected is not None and len(ids) != expected:
        raise ValueError(f"{cfg.name} has {expected} classes, but the split files in {str(split_dir)!r} have "
                         f"{len(ids)} labels; use data.name: imagefolder for another class set")
    root = Path(cfg.root)
    absent = [rel for entries in splits.values() for rel in entries if not (root / rel).is_file()]
    if absent:
        raise FileNotFoundError(f"data.root: {cfg.name}: {len(absent)} images of the split files are not under "
                                f"{str(root)!r}, e.g. {absent[:3]}")
    return splits, ids


def load_image_list(cfg: DataConfig) -> RawSplits:
    """Images listed in JSON split files (the reference code's format), decoded once per node into the
    decoded-image cache (:mod:`roli_sweep.image_cache`) and streamed from it.

    Split files come from ``cfg.split_dir`` (default ``cfg.root``); image paths in them are relative
    to ``cfg.root``. Every image is converted to RGB and its shorter side resized to
    ``image_size / CROP_FRACTION`` (the reference's ``Resize(256)`` for 224) in the cache; the crops to
    ``image_size`` happen per sample (:class:`roli_sweep.image_stream.StreamedImages`). Label ids are mapped to
    0..k-1 in sorted order over all split files together, so every split uses the same mapping
    (the reference maps each split on its own).

    Returns:
        RawSplits whose "images" are (N,) int64 rows of ``decoded``, with the val split from ``val.json`` when
        it exists.

    Raises:
        FileNotFoundError: ``train.json`` / ``test.json`` or an image file is missing.
        ValueError: a split file is malformed, or a preset's split files do not have its number of labels.
        OSError: an image file cannot be read or is not an image (the message names it).
    """
    from roli_sweep.image_cache import decoded_images

    splits, ids = _image_list_splits(cfg)
    split_dir = Path(cfg.split_dir or cfg.root)
    contiguous = {label: i for i, label in enumerate(ids)}
    listed = list(dict.fromkeys(rel for entries in splits.values() for rel in entries))
    decoded, _ = decoded_images(Path(cfg.root), listed, [split_dir / f"{s}.json" for s in splits],
                                round(cfg.image_size / CROP_FRACTION), cache_dir(), loader_workers(cfg))

    def read(entries: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(decoded.rows(entries))
        return rows, torch.tensor([contiguous[label] for label in entries.values()], dtype=torch.long)

    data = {s: read(entries) for s, entries in splits.items()}
    val_images, val_labels = data.get("val", (None, None))
    return RawSplits(*data["train"], *data["test"], _class_names(splits, ids), val_images, val_labels, decoded)


def loader_workers(cfg: DataConfig) -> int:
    """DataLoader workers for a streamed dataset: ``data.num_workers``, else the threads torch was given (the
    trial's CPUs, :func:`roli_sweep.tune.trainable.trainable`)."""
    return cfg.num_workers if cfg.num_workers is not None else torch.get_num_threads()


for _name in IMAGE_LIST_DATASETS:  # imagefolder and its presets share one loader
    register_dataset(_name, check=lambda cfg: len(_image_list_splits(cfg)[1]))(load_image_list)


def check_files(cfg: DataConfig) -> None:
    """Check, without loading them, that the dataset's files are where ``cfg`` says (before a sweep starts).

    Raises:
        FileNotFoundError / ValueError: as the dataset's loader would, naming the key and the path.
    """
    num_classes = FILE_CHECKS[cfg.name](cfg)
    if cfg.classes is not None:
        missing = [c for c in cfg.classes if c >= num_classes]
        if missing:
            raise ValueError(f"data.classes: {shown(missing)} not in {cfg.name} (classes 0..{num_classes - 1})")

NATIVE_SIDES = {"digits": 8, "fashion_mnist": 28, "cifar10": 32, "cifar100": 32}
"""Native image side in pixels of the datasets that have one (image lists need ``image_size``)."""


def input_side(cfg: DataConfig) -> int:
    """The side in pixels of the images a trial attacks: ``image_size`` if set, else the dataset's native one."""
    return cfg.image_size or NATIVE_SIDES[cfg.name]


def _stratified_take(labels: torch.Tensor, size: int | None, seed: int) -> np.ndarray:
    """Indices of a stratified subsample of ``size`` (all indices when size is None or too big).

    A stratified draw needs at least one image per class on each side of the cut and two images in every class
    (scikit-learn's ``train_test_split``); when ``size`` is below the number of classes (64 images of Caltech-256's
    257 classes) or the rest would be, or a class has one image, it is a uniform draw of ``size`` from ``seed``."""
    idx = np.arange(len(labels))
    if size is None or size >= len(labels):
        return idx
    y = labels.numpy()
    classes, counts = np.unique(y, return_counts=True)
    if min(size, len(y) - size) < len(classes) or counts.min() < 2:
        return np.sort(np.random.default_rng(seed).choice(idx, size=size, replace=False))
    taken, _ = train_test_split(idx, train_size=size, stratify=y, random_state=seed)
    return np.sort(taken)


def _keep_classes(images: torch.Tensor, labels: torch.Tensor, relabel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The images whose class ``relabel`` keeps (entry >= 0), with their labels mapped through it."""
    keep = relabel[labels] >= 0
    return images[keep], relabel[labels[keep]]


def load_splits(cfg: DataConfig, seed: int) -> DataSplits:
    """Load a dataset and cut it into train / val / test as ``cfg`` says.

    The val split is the dataset's own where it has one (``imagefolder`` with ``val.json``; then
    ``val_fraction`` is unused), else a stratified ``val_fraction`` of the dataset's train split,
    drawn with ``seed``; the test split is the dataset's own and only ever capped (with a fixed
    seed 0, so every trial of a study tests on the same images).

    Returns:
        DataSplits whose samples are images (C, H, W) float32 in [0, 1] and labels int64 in 0..k-1
        (image lists are stored as uint8 and converted per sample).

    Raises:
        ValueError: a requested class does not exist in the dataset.
    """
    raw = DATASETS[cfg.name](cfg)
    names = raw.class_names
    train_x, train_y, test_x, test_y = raw.train_images, raw.train_labels, raw.test_images, raw.test_labels
    val_x, val_y = raw.val_images, raw.val_labels
    if cfg.classes is not None:
        missing = [c for c in cfg.classes if not 0 <= c < len(names)]
        if missing:
            raise ValueError(f"data.classes: {missing} not in {cfg.name} (classes 0..{len(names) - 1})")
        relabel = torch.full((len(names),), -1, dtype=torch.long)
        relabel[cfg.classes] = torch.arange(len(cfg.classes))
        train_x, train_y = _keep_classes(train_x, train_y, relabel)
        test_x, test_y = _keep_classes(test_x, test_y, relabel)
        if val_y is not None:
            val_x, val_y = _keep_classes(val_x, val_y, relabel)
        names = [names[c] for c in cfg.classes]

    if val_y is None:
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

    if raw.decoded is not None:
        from roli_sweep.image_stream import StreamedImages

        def stream(rows: torch.Tensor, labels: torch.Tensor, augments: bool) -> StreamedImages:
            return StreamedImages(raw.decoded, rows, labels, cfg.image_size, augments, loader_workers(cfg))

        reference = cfg.augment == "reference"
        return DataSplits(stream(train_x, train_y, reference), stream(val_x, val_y, False),
                          stream(test_x, test_y, False), names)

    def resize(x: torch.Tensor) -> torch.Tensor:
        if cfg.image_size is None or x.shape[-2:] == (cfg.image_size, cfg.image_size):
            return x.contiguous()
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp_(0.0, 1.0)

    return DataSplits(
        ImageDataset(resize(train_x), train_y),
        ImageDataset(resize(val_x), val_y),
        ImageDataset(resize(test_x), test_y),
        names,
    )
