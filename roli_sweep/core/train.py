"""The adversarial training epoch and the clean + robust evaluation, shared by both stages of a trial.

Schedules and optimisers are explicit (../shared/PAPER.md lists what the reference code got
wrong): linear warm-up whose first step already has a non-zero learning rate, then cosine decay
to zero, stepped once per batch; SGD or AdamW exactly as configured, whatever the weight decay.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from roli_sweep.core.attacks import pgd, pgd_broken
from roli_sweep.config import AttackConfig, StageConfig
from roli_sweep.image_stream import SeededSampler, StreamedImages


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu.

    Raises:
        RuntimeError: ``cuda`` asked for but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(name)


@dataclass
class Runtime:
    """Where and how a stage computes: the device, the attacks' RNG, and the autocast dtype (None = fp32)."""

    device: torch.device
    generator: torch.Generator
    autocast_dtype: torch.dtype | None = None

    def autocast(self) -> torch.autocast:
        """Mixed precision for forward passes (attacks included); a no-op context in fp32."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def for_test(self, seed: int) -> Runtime:
        """The runtime of the final test: same device, fresh attack RNG, fp32 (reported numbers never come
        from reduced precision)."""
        return Runtime(self.device, torch.Generator(self.device).manual_seed(seed), None)


def make_runtime(device: str, precision: str, seed: int) -> Runtime:
    """Resolve ``device`` and ``precision`` (``auto`` = bf16 autocast on CUDA, fp32 elsewhere; ``bf16``; ``fp32``).

    bf16 keeps fp32's exponent range, so no loss scaling is needed (torch.autocast docs).
    """
    resolved = resolve_device(device)
    bf16 = precision == "bf16" or (precision == "auto" and resolved.type == "cuda")
    return Runtime(resolved, torch.Generator(resolved).manual_seed(seed), torch.bfloat16 if bf16 else None)


def step_size(attack: AttackConfig, steps: int) -> float:
    """The configured PGD step, or 2.5 * eps / steps (Madry et al., 2018) when unset; [0, 1] pixel units."""
    if attack.step_size is not None:
        return attack.step_size
    return 2.5 * attack.eps / max(steps, 1)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, device: torch.device) -> DataLoader:
    """A loader whose order (and, for a streamed dataset, whose crops and flips) ``seed`` fixes; pinned memory for
    CUDA. In-memory datasets are read in the trial's process; a :class:`StreamedImages` by its ``workers``
    persistent worker processes (torch DataLoader docs: workers, pin_memory, persistent_workers), its samples
    drawn with :class:`SeededSampler` so the seed fixes them whatever the workers do."""
    generator = torch.Generator().manual_seed(seed)
    options = {"batch_size": batch_size, "generator": generator, "drop_last": False, "pin_memory": device.type == "cuda"}
    if not isinstance(dataset, StreamedImages):
        return DataLoader(dataset, shuffle=shuffle, **options)
    if dataset.workers:
        options.update(num_workers=dataset.workers, persistent_workers=True)
    # the loader draws its workers' base seed from its own generator once per iterator (with persistent workers,
    # once per loader), so the order and the crops come from a generator of their own
    order = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, sampler=SeededSampler(len(dataset), shuffle, order), **options)


def order_generator(loader: DataLoader) -> torch.Generator:
    """The generator whose state fixes ``loader``'s next epochs (order, and crops and flips of a streamed dataset):
    what a resumable stage saves and restores."""
    return loader.sampler.generator if isinstance(loader.sampler, SeededSampler) else loader.generator


def parameter_groups(model: nn.Module, stage: StageConfig) -> list[dict]:
    """The trainable parameters of ``model`` in two optimiser groups: with ``stage.weight_decay``, and with
    weight decay 0 for those whose name contains one of ``stage.no_weight_decay`` (biases, norms, ...).
    Empty groups are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if any(part in name for part in stage.no_weight_decay) else decay).append(param)
    groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, stage: StageConfig) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over the trainable parameters of ``model`` at the stage's peak lr,
    exactly as configured whatever the weight decay (the RoLI reference silently switched to SGD when
    it was 0), with the groups of :func:`parameter_groups`."""
    groups = parameter_groups(model, stage)
    if stage.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=stage.lr, momentum=stage.momentum)
    return torch.optim.AdamW(groups, lr=stage.lr)


def warmup_cosine(stage: StageConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """lr factor for optimiser step ``i`` (0-based): ``(i + 1) / warmup`` during warm-up, then cosine to 0."""
    total = stage.epochs * steps_per_epoch
    warmup = round(stage.warmup_epochs * steps_per_epoch)

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = (i - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def set_train_modes(model: nn.Module, train_modules: list[nn.Module] | None) -> None:
    """``model.train()``, or eval mode for all but ``train_modules`` (their own flag only)."""
    if train_modules is None:
        model.train()
        return
    model.eval()
    for module in train_modules:
        module.training = True


class DivergenceError(FloatingPointError):
    """Training diverged: a non-finite loss or trainable parameter. The trial stops at once and fails."""

    def __init__(self, what: str, step: int, lr: float, where: str = "") -> None:
        super().__init__(what, step, lr, where)  # all in args: it pickles (Ray sends it to the driver)
        self.what, self.step, self.lr, self.where = what, step, lr, where

    def __str__(self) -> str:
        """E.g. ``non-finite loss at finetune epoch 3, step 12, lr 0.02``."""
        return f"{self.what} at {self.where + ', ' if self.where else ''}step {self.step}, lr {self.lr:.3g}"


@dataclass
class EpochStats:
    """One training epoch: mean adversarial cross-entropy, accuracy on the adversarial batches, throughput."""

    train_loss: float
    train_robust_acc: float
    images_per_s: float
    lr: float


def adversarial_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    attack: AttackConfig,
    runtime: Runtime,
    train_modules: list[nn.Module] | None = None,
) -> EpochStats:
    """Train one epoch on PGD adversarial examples of every batch (attack computed in eval mode).

    Args:
        loader: batches of images (B, C, H, W) in [0, 1] and labels (B,).
        attack: the training threat model (eps, steps, step size, random start).
        runtime: device, attack RNG and autocast dtype.
        train_modules: only these modules (each one itself, not its children) run in train mode, the
            rest in eval mode, so a frozen backbone's dropout, drop-path and BatchNorm statistics stay
            off while it is finetuned around (RoLI reference, ``src/models/vit_models.py``). None = the
            whole model.

    Raises:
        DivergenceError: the loss of a batch or a trainable parameter after a step is not finite; the
            epoch stops at that step.
    """
    set_train_modes(model, train_modules)
    step = step_size(attack, attack.steps)
    params = [p for p in model.parameters() if p.requires_grad]
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for index, (x, y) in enumerate(loader, start=1):
        x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
        with runtime.autocast():
            x_adv = pgd(model, x, y, attack.eps, step, attack.steps, attack.random_start, runtime.generator)
            logits = model(x_adv)
            loss = F.cross_entropy(logits, y)
        lr = scheduler.get_last_lr()[0]
        if not torch.isfinite(loss):
            raise DivergenceError("non-finite loss", index, lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if params and not torch.stack([torch.isfinite(p).all() for p in params]).all():
            raise DivergenceError("non-finite trainable parameters", index, lr)
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    elapsed = time.perf_counter() - start
    return EpochStats(total_loss / seen, correct / seen, seen / elapsed, scheduler.get_last_lr()[0])


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    attack: AttackConfig,
    steps: int,
    runtime: Runtime,
) -> tuple[float, float]:
    """Clean accuracy and PGD-``steps`` robust accuracy at ``attack.eps``, model in eval mode, in fp32.

    An example counts as robust only if it is classified correctly clean and on its adversarial
    example. The attack always runs in fp32, also when training uses bf16 autocast: model selection
    and the reported numbers never see an attack weakened by reduced precision.

    Returns:
        ``(clean_acc, robust_acc)``, fractions in [0, 1].
    """
    was_training = model.training
    model.eval()
    step = step_size(attack, steps)
    clean, robust, seen = 0, 0, 0
    for x, y in loader:
        x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
        correct = _correct(model, x, y)
        broken = pgd_broken(model, x, y, attack.eps, step, steps, attack.random_start, runtime.generator)
        clean += correct.sum().item()
        robust += (correct & ~broken).sum().item()
        seen += len(y)
    model.train(was_training)
    return clean / seen, robust / seen
