"""The decoded-image cache of the image-list datasets: each image decoded and resized once per node, then read
by every trial from one file on disk.

An image-list dataset (``imagefolder``, ``caltech256``, ``cub200``, ``stanford_dogs``) is a set of JPEGs in
fixed split files. Decoding them is the expensive part of reading them (Caltech-256: 30,607 images), and
eight trials on one node would otherwise decode them eight times and hold eight copies. So the first trial
that needs them decodes every image of every split file once, resizes its shorter side to ``resize``
(the reference's ``Resize(256)`` for 224 crops, DongXzz/RoLI ``src/data/transforms.py``; aspect kept, so
the random crops of training see the same area as the reference's) and writes them, uint8 HWC, one after
the other into ``pixels.u8`` with an index of (offset, height, width) per image. It does so under a file
lock (``filelock``, as Ray and the probe cache use), in a temporary folder renamed into place at the end,
so a killed build never leaves a half cache and concurrent trials wait for the first one's build instead of
decoding too. Trials read an image with ``os.preadv`` at its offset: the pages live once in the node's page
cache, shared by every trial, and are not counted in any trial's resident memory, as memory-mapped pages
would be.

The cache key is a BLAKE2b digest of the format version, ``resize``, every split file's name and bytes,
and every listed image's path and bytes: edit one image or one split file and the cache is rebuilt. Entries
live in ``<cache>/decoded_images/<key>/`` (:func:`roli_sweep.data.cache_dir`: ``$ROLI_SWEEP_CACHE``, else
``~/.cache/roli_sweep``), a folder local to the node.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from filelock import FileLock

FORMAT = 1
"""Bump when the cache's layout changes: older entries are then left alone and rebuilt under a new key."""


def cache_key(split_files: Sequence[Path], images: Sequence[Path], resize: int, workers: int = 1) -> str:
    """The key of the decoded cache of ``images`` listed in ``split_files``, resized to ``resize`` (see module doc).

    Images are hashed on ``workers`` threads (hashlib releases the GIL on large buffers).
    """
    digest = hashlib.blake2b(f"roli_sweep decoded images v{FORMAT} resize {resize}".encode(), digest_size=16)
    for path in split_files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())

    def one(path: Path) -> bytes:
        return hashlib.blake2b(path.read_bytes(), digest_size=16).digest()

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for path, image_digest in zip(images, pool.map(one, images, chunksize=64)):
            digest.update(str(path).encode() + b"\0" + image_digest)
    return digest.hexdigest()


def _decode(path: Path, resize: int) -> np.ndarray:
    """One image file as uint8 (H, W, 3) RGB with its shorter side resized to ``resize`` (bilinear, antialiased,
    as torchvision's ``Resize`` on PIL images)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = resize / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return np.asarray(img.resize(size, Image.BILINEAR, reducing_gap=None), dtype=np.uint8)


@dataclass
class DecodedImages:
    """A built cache entry: ``len(self)`` images of shorter side :attr:`resize`, read one at a time.

    ``index`` is (N, 3) int64: byte offset in ``pixels.u8``, height, width. The entry's ``paths`` are the images in
    the order they were written (the order the split files list them, split by split).
    """

    folder: Path
    index: np.ndarray
    paths: list[str]
    resize: int
    _fd: int | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:  # a file descriptor does not travel to a DataLoader worker: it reopens
        return {**self.__dict__, "_fd": None}

    def image(self, row: int) -> np.ndarray:
        """Image ``row`` as uint8 (H, W, 3), read with ``os.preadv`` from the shared file.

        Raises:
            OSError: the file is shorter than the index says (truncated on disk).
        """
        if self._fd is None:
            self._fd = os.open(self.folder / "pixels.u8", os.O_RDONLY)
        offset, height, width = (int(v) for v in self.index[row])
        pixels = np.empty((height, width, 3), dtype=np.uint8)
        if os.preadv(self._fd, [pixels], offset) != pixels.nbytes:
            raise OSError(f"decoded-image cache {str(self.folder)!r}: pixels.u8 is shorter than its index says "
                          f"(row {row}); delete the folder to rebuild it")
        return pixels

    def rows(self, paths: Iterable[str]) -> np.ndarray:
        """The rows of ``paths`` (as written in the split files)."""
        where = {p: i for i, p in enumerate(self.paths)}
        return np.array([where[p] for p in paths], dtype=np.int64)

    @property
    def nbytes(self) -> int:
        """Bytes of decoded pixels on disk."""
        return int((self.index[:, 1] * self.index[:, 2] * 3).sum())

    @classmethod
    def load(cls, folder: Path) -> DecodedImages:
        meta = json.loads((folder / "meta.json").read_text())
        return cls(folder, np.load(folder / "index.npy"), meta["paths"], meta["resize"])


def decoded_images(root: Path, relative_paths: Sequence[str], split_files: Sequence[Path], resize: int,
                   cache: Path, workers: int = 1) -> tuple[DecodedImages, bool]:
    """The cache entry of ``relative_paths`` (under ``root``), building it if no trial on this node has.

    Returns:
        The entry, and whether this call built it (False: read an entry another trial or run built).

    Raises:
        OSError: an image cannot be read; PIL's ``UnidentifiedImageError`` (an OSError): a file is not an
            image. Nothing is left in the cache then.
    """
    images = [root / rel for rel in relative_paths]
    key = cache_key(split_files, images, resize, workers)
    folder = cache / "decoded_images" / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    if (folder / "meta.json").is_file():
        return DecodedImages.load(folder), False
    with FileLock(str(folder) + ".lock"):
        if (folder / "meta.json").is_file():  # built by the trial that held the lock before us
            return DecodedImages.load(folder), False
        started = time.perf_counter()
        building = folder.with_name(f"{key}.building-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir()
        index = np.zeros((len(images), 3), dtype=np.int64)
        offset = 0
        try:
            with open(building / "pixels.u8", "wb") as out, ThreadPoolExecutor(max(1, workers)) as pool:
                # PIL decodes and resizes without the GIL; written in order, so the rows follow the split files
                for row, pixels in enumerate(pool.map(lambda p: _decode(p, resize), images)):
                    out.write(pixels.tobytes())
                    index[row] = (offset, pixels.shape[0], pixels.shape[1])
                    offset += pixels.nbytes
            np.save(building / "index.npy", index)
            seconds = time.perf_counter() - started
            (building / "meta.json").write_text(json.dumps(
                {"format": FORMAT, "resize": resize, "root": str(root), "paths": list(relative_paths),
                 "build_seconds": seconds}))
            os.rename(building, folder)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    return DecodedImages.load(folder), True
