"""Small datasets in the paper datasets' own on-disk formats, for whole runs of the paper presets.

- CIFAR-10 / CIFAR-100: torchvision's pickled batches (``cifar-10-batches-py/``, ``cifar-100-python/``),
  32x32 RGB, the native resolution.
- Caltech-256, CUB-200, Stanford Dogs: JSON split files ``{image path: label}`` plus image folders (the
  RoLI reference's format), one image per class in train (the loaders check the class count), a few
  in val and test, each image its own size.

torchvision checks every CIFAR file against the md5 of the official release. The files written here
are deterministic, so their md5s are known: :func:`trust_test_cifar` points torchvision's checksum
tables at them, and the session's Ray runtime runs it in every worker (``worker_process_setup_hook``),
so the loader's own reader and integrity check run unchanged in the trials too.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np

CIFAR = {"cifar10": 10, "cifar100": 100}
IMAGE_LISTS = {"caltech256": 257, "cub200": 200, "stanford_dogs": 120}
CIFAR_IMAGES = {"cifar10": 20, "cifar100": 200}
"""Images per CIFAR batch file: CIFAR-10 has five train batches and a test batch, CIFAR-100 one of each."""


def _cifar_class(name: str):
    from roli_sweep._torchvision_compat import import_torchvision

    datasets = import_torchvision().datasets
    return datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100


@lru_cache(maxsize=None)
def cifar_files(name: str) -> dict[str, bytes]:
    """The deterministic files of the small ``name`` (``cifar10`` / ``cifar100``): {file name: bytes}."""
    cls, classes = _cifar_class(name), CIFAR[name]
    label_key = "fine_labels" if name == "cifar100" else "labels"
    rng = np.random.default_rng(0)
    files = {}
    for file, _ in cls.train_list + cls.test_list:
        n = CIFAR_IMAGES[name]
        batch = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 label_key: [i % classes for i in range(n)]}
        files[file] = pickle.dumps(batch, protocol=4)
    files[cls.meta["filename"]] = pickle.dumps({cls.meta["key"]: [f"class{c}" for c in range(classes)]}, protocol=4)
    return files


def trust_test_cifar() -> None:
    """Point torchvision's CIFAR checksum tables at the files of :func:`cifar_files` (test processes only)."""
    for name in CIFAR:
        cls, files = _cifar_class(name), cifar_files(name)
        md5 = {file: hashlib.md5(data).hexdigest() for file, data in files.items()}
        cls.train_list = [[f, md5[f]] for f, _ in cls.train_list]
        cls.test_list = [[f, md5[f]] for f, _ in cls.test_list]
        cls.meta = dict(cls.meta, md5=md5[cls.meta["filename"]])


def write_cifar(root: Path, name: str) -> Path:
    """Write the small ``name`` under ``root/<torchvision's folder>/``; returns ``root``."""
    folder = root / _cifar_class(name).base_folder
    folder.mkdir(parents=True, exist_ok=True)
    for file, data in cifar_files(name).items():
        (folder / file).write_bytes(data)
    return root


def write_image_list(root: Path, name: str, val: int = 8, test: int = 8) -> tuple[Path, Path]:
    """PNG images under ``root/images/<NNN.classN>/`` and ``train/val/test.json`` under ``root/splits/``.

    Train holds one image per class (the loader checks the dataset's class count), val and test the
    first ``val`` / ``test`` classes. Images are RGB noise of differing sizes around 40 px.
    Returns (image root, split folder).
    """
    from PIL import Image

    images, splits = root / "images", root / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    counts = {"train": IMAGE_LISTS[name], "val": val, "test": test}
    for split, n in counts.items():
        entries = {}
        for label in range(n):
            folder = images / f"{label + 1:03d}.class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            rel = f"{folder.name}/{split}.png"
            height, width = 36 + label % 9, 44 - label % 7
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images / rel)
            entries[rel] = label + 1  # the reference's label ids need not start at 0
        (splits / f"{split}.json").write_text(json.dumps(entries))
    return images, splits
