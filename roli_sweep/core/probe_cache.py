"""The stage-1 probe cache: one adversarial linear probe per distinct probe setting, shared by the trials.

Stage 1 (:func:`roli_sweep.core.trial.run_probe`) depends only on the data, the backbone and its weights, the
probe, training-attack and validation settings, the random head it starts from, the device, the
precision and the seed, never on the finetuning settings (stage 2 reseeds every RNG, so a trial that
takes a cached probe gives the same metrics as one that computed it). :func:`probe_key` hashes exactly
those settings, the weights file by its sha256. A sweep keeps its cache in ``<sweep folder>/probe_cache/``,
on the sweep's storage (shared storage on a cluster), so it survives ``--resume``; the study keeps one in
its state folder.

Concurrent trials that need the same probe compute it once: the first takes a file lock
(``filelock``, which Ray itself uses) and computes, the others wait for the lock and then read the
file. Each entry is ``<key>.safetensors`` (:class:`ProbeOutcome`, written atomically)
with the seconds it took in its metadata, so a cached probe reports the compute it saved.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file

from roli_sweep.config import TrialConfig

if TYPE_CHECKING:
    import torch


@dataclass
class ProbeOutcome:
    """Stage 1's result: the head of its best robust epoch, and that epoch's val accuracies.

    It depends only on the data, backbone, probe, attack and eval settings and the seed, not on the
    finetuning settings, so a study computes it once and hands it to many trials (:func:`run_trial`).
    """

    head: dict[str, torch.Tensor]
    metrics: dict[str, float]

    def save(self, path: Path) -> None:
        """Write the head as safetensors with the metrics in its metadata."""
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.items()}, str(path),
                  metadata={"metrics": json.dumps(self.metrics)})

    @classmethod
    def load(cls, path: Path) -> ProbeOutcome:
        """Read what :meth:`save` wrote."""
        with safe_open(str(path), framework="pt") as f:
            head = {k: f.get_tensor(k) for k in f.keys()}
            metrics = json.loads(f.metadata()["metrics"])
        return cls(head, metrics)


_WEIGHT_HASHES: dict[tuple[str, int, int], str] = {}


def _weights_sha256(weights: str | None) -> str | None:
    """sha256 of the resolved weights file (cached per path, size and mtime within a process)."""
    if not weights:
        return None
    from roli_sweep.models.backbone import resolve_weights

    path = resolve_weights(weights)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _WEIGHT_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _WEIGHT_HASHES[key] = digest.hexdigest()
    return _WEIGHT_HASHES[key]


def probe_settings(cfg: TrialConfig) -> dict:
    """Everything stage 1 of ``cfg`` depends on, as plain data (the weights by their sha256)."""
    data = cfg.model_dump(mode="json")
    return {
        # the loader's worker count changes where images are read, not which (tests/test_image_stream.py)
        "data": {k: v for k, v in data["data"].items() if k != "num_workers"}, "backbone": data["backbone"], "weights_sha256": _weights_sha256(cfg.backbone.weights),
        "probe": data["probe"], "attack": data["attack"],
        "eval": {k: v for k, v in data["eval"].items() if k not in ("final", "test_steps")},
        "random_head_init": data["finetune"]["random_head_init"],
        "seed": cfg.seed, "device": cfg.device, "precision": cfg.precision,
    }


def probe_key(cfg: TrialConfig) -> str:
    """The first 16 hex digits of the sha256 of :func:`probe_settings` (canonical JSON)."""
    text = json.dumps(probe_settings(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ProbeCache:
    """Probes by :func:`probe_key` in ``folder``; :meth:`get_or_compute` computes each one once.

    Raises (from its methods): ``safetensors`` errors for an entry that is not a probe file.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> tuple[ProbeOutcome, float]:
        """The stored probe and the seconds it took to compute."""
        outcome = ProbeOutcome.load(self.path(key))
        return outcome, float(outcome.metrics.pop("probe_compute_seconds", 0.0))

    def store(self, key: str, outcome: ProbeOutcome, seconds: float) -> None:
        """Write an entry atomically (a reader never sees half a file)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(key).with_suffix(f".{os.getpid()}.tmp")
        ProbeOutcome(outcome.head, {**outcome.metrics, "probe_compute_seconds": seconds}).save(tmp)
        tmp.replace(self.path(key))

    def get_or_compute(self, key: str, compute: Callable[[], ProbeOutcome]) -> tuple[ProbeOutcome, str, float]:
        """The probe of ``key``: read if stored, else computed by ``compute()`` and stored, under a file lock so
        that concurrent callers compute it once (the others wait, then read it).

        Returns:
            ``(probe, how, seconds)``: ``how`` is ``computed`` or ``cached``; ``seconds`` the compute it took
            (here, or when it was computed).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.folder / f"{key}.lock")):
            if self.has(key):
                outcome, seconds = self.load(key)
                return outcome, "cached", seconds
            started = time.perf_counter()
            outcome = compute()
            seconds = time.perf_counter() - started
            self.store(key, outcome, seconds)
            return outcome, "computed", seconds
