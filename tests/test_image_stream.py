"""The image-list pipeline: decoded once per node into a shared cache keyed by content, streamed by DataLoader
workers with the reference's crops and flips, the same batches for the same seed whatever the workers."""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from roli_sweep.config import DataConfig
from roli_sweep.core.train import make_loader, order_generator
from roli_sweep.data import CROP_FRACTION, load_splits
from roli_sweep.image_cache import decoded_images

SIZE = 8


def _write_noise_list(tmp_path: Path, per_class: int = 6, classes: int = 3) -> tuple[Path, Path]:
    """RGB noise PNGs of differing sizes and aspect ratios, with train.json and test.json."""
    root, split_dir = tmp_path / "images", tmp_path / "splits"
    split_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        entries = {}
        for label in range(classes):
            folder = root / f"{label:03d}.c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rel = f"{folder.name}/{split}_{i}.png"
                shape = (10 + i, 14 + 3 * i, 3)  # (height, width): landscape, growing
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / rel)
                entries[rel] = label
        (split_dir / f"{split}.json").write_text(json.dumps(entries))
    return root, split_dir


def _cfg(root: Path, split_dir: Path, **extra) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), split_dir=str(split_dir), image_size=SIZE,
                      val_fraction=0.25, **extra)


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "decoded_images").iterdir() if p.is_dir())


def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_images_are_decoded_once_and_the_cache_is_keyed_by_their_content(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ROLI_SWEEP_CACHE", str(cache))
    root, split_dir = _write_noise_list(tmp_path)
    a = load_splits(_cfg(root, split_dir), seed=0)
    entry = _entries(cache)
    assert len(entry) == 1
    resize = round(SIZE / CROP_FRACTION)
    assert all(min(a.train.images.image(r).shape[:2]) == resize for r in range(len(a.train.images)))
    stamp = (entry[0] / "pixels.u8").stat().st_mtime_ns
    b = load_splits(_cfg(root, split_dir), seed=1)  # another trial: reads, does not decode
    assert _entries(cache) == entry and (entry[0] / "pixels.u8").stat().st_mtime_ns == stamp
    assert torch.equal(a.test[0][0], b.test[0][0])
    # one image's bytes change: a new entry, and its pixels are the new ones
    changed = root / "000.c0" / "test_0.png"
    Image.fromarray(np.zeros((10, 14, 3), dtype=np.uint8)).save(changed)
    c = load_splits(_cfg(root, split_dir), seed=0)
    assert len(_entries(cache)) == 2
    assert c.test[0][0].abs().sum() == 0 and a.test[0][0].abs().sum() > 0


def _build(args) -> bool:
    root, rels, split_files, cache = args
    return decoded_images(Path(root), rels, [Path(p) for p in split_files], 9, Path(cache))[1]


def test_concurrent_trials_wait_for_one_build(tmp_path):
    root, split_dir = _write_noise_list(tmp_path, per_class=20)
    rels = [rel for split in ("train", "test") for rel in json.loads((split_dir / f"{split}.json").read_text())]
    job = (str(root), rels, [str(split_dir / "train.json"), str(split_dir / "test.json")], str(tmp_path / "cache"))
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        built = pool.map(_build, [job] * 3)
    assert sorted(built) == [False, False, True]  # one decoded, the others waited and read its entry
    assert len(_entries(tmp_path / "cache")) == 1


def test_reference_augmentation_is_fixed_by_the_seed_whatever_the_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("ROLI_SWEEP_CACHE", str(tmp_path / "cache"))
    root, split_dir = _write_noise_list(tmp_path)

    def train_loader(seed: int, workers: int):
        splits = load_splits(_cfg(root, split_dir, augment="reference", num_workers=workers), seed=0)
        return make_loader(splits.train, 4, shuffle=True, seed=seed, device=torch.device("cpu")), splits

    in_process, splits = train_loader(seed=5, workers=0)
    with_workers, _ = train_loader(seed=5, workers=2)
    assert with_workers.num_workers == 2 and with_workers.persistent_workers
    first = _epoch(in_process)
    x, y = first
    assert x.shape[1:] == (3, SIZE, SIZE) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert all(torch.equal(a, b) for a, b in zip(first, _epoch(with_workers)))  # same batches, 0 or 2 workers
    # the crops and flips are random: two epochs differ, and differ from the centre crop of the same images
    second = _epoch(in_process)
    assert torch.equal(torch.sort(first[1]).values, torch.sort(second[1]).values)
    assert not torch.equal(first[0], second[0])
    centre = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    assert not any(torch.equal(img, c) for img in first[0][:4] for c in centre)
    assert not torch.equal(first[0], _epoch(train_loader(seed=6, workers=0)[0])[0])  # another seed, other batches
    # a resumed trial restores the data-order generator (Stage.state_dict) and draws the same next epoch
    loader, _ = train_loader(seed=5, workers=2)
    _epoch(loader)
    state = order_generator(loader).get_state()
    expected = _epoch(loader)
    resumed, _ = train_loader(seed=5, workers=2)
    order_generator(resumed).set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, _epoch(resumed)))


def test_a_file_that_is_not_an_image_is_named_and_leaves_no_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ROLI_SWEEP_CACHE", str(cache))
    root, split_dir = _write_noise_list(tmp_path)
    (root / "001.c1" / "train_3.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match="train_3.png"):
        load_splits(_cfg(root, split_dir), seed=0)
    assert _entries(cache) == []
