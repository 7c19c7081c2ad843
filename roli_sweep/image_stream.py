"""Streaming the image-list datasets: samples read from the decoded-image cache and cropped per sample, with the
reference code's transforms, in DataLoader workers.

The reference (DongXzz/RoLI ``src/data/transforms.py``) trains on ``Resize(256)`` -> ``RandomCrop(224)`` ->
``RandomHorizontalFlip`` and tests on ``Resize(256)`` -> ``CenterCrop(224)``; the resize is done once, in the
cache (:mod:`roli_sweep.image_cache`), the crops and flips here with torchvision's transforms v2 on uint8
(C, H, W) tensors, and the result is float32 (C, size, size) in [0, 1], so attacks see [0, 1] images at the
attacked resolution and normalisation stays inside the model.

Determinism: a training sample's crop and flip are drawn from a seed that :class:`SeededSampler` hands over
with its index, drawn from the loader's data-order generator. So the seed fixes the order and the augmentation,
whatever the number of workers and which worker reads which sample, and a resumed trial (which restores that
generator, :class:`roli_sweep.core.stage.Stage`) draws the crops an uninterrupted one would have.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from roli_sweep._torchvision_compat import import_torchvision
from roli_sweep.image_cache import DecodedImages


class StreamedImages(Dataset):
    """(image (3, size, size) float32 in [0, 1], label) pairs read from a :class:`DecodedImages` cache.

    ``dataset[i]`` is sample ``i`` centre-cropped; ``dataset[(i, seed)]`` (what :class:`SeededSampler` yields) is
    sample ``i`` random-cropped and flipped with ``seed`` when :attr:`augments`, else centre-cropped.
    ``workers`` is how many DataLoader worker processes read it (0: the trial's own process).
    """

    def __init__(self, images: DecodedImages, rows: torch.Tensor, labels: torch.Tensor, size: int,
                 augments: bool, workers: int) -> None:
        import_torchvision()
        from torchvision.transforms import v2

        self.images, self.rows, self.labels = images, rows, labels
        self.size, self.augments, self.workers = size, augments, workers
        self.random = v2.Compose([v2.RandomCrop(size), v2.RandomHorizontalFlip()])
        self.centre = v2.CenterCrop(size)
        self.to_float = v2.ToDtype(torch.float32, scale=True)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = torch.from_numpy(self.images.image(int(self.rows[index]))).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        if self.augments and seed is not None:
            with torch.random.fork_rng(devices=[]):  # v2 draws from torch's global RNG: seed it for this sample only
                torch.manual_seed(seed)
                image = self.random(image)
        else:
            image = self.centre(image)
        return self.to_float(image), self.labels[index]


class SeededSampler(Sampler):
    """Indices of an epoch, each with the seed of its augmentation: ``(index, seed)`` pairs, both drawn from
    ``generator`` (a shuffled order when ``shuffle``), so one generator state fixes the whole epoch."""

    def __init__(self, length: int, shuffle: bool, generator: torch.Generator) -> None:
        self.length, self.shuffle, self.generator = length, shuffle, generator

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.length, generator=self.generator) if self.shuffle else torch.arange(self.length)
        seeds = torch.randint(0, 2**62, (self.length,), generator=self.generator)
        return iter(zip(order.tolist(), seeds.tolist()))
