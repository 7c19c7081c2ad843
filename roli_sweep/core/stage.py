"""One stage of a trial: its epochs of adversarial training with validation, the trainable state of its best robust
epoch, and everything the next epoch depends on as a state dict (exact resume). Stage 1 (the linear probe) and
stage 2 (finetuning) are both a :class:`Stage` (:mod:`roli_sweep.core.trial`).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from roli_sweep.config import StageConfig, TrialConfig, evaluation_attack
from roli_sweep.core.train import (
    DivergenceError,
    Runtime,
    adversarial_epoch,
    evaluate,
    make_loader,
    make_optimizer,
    order_generator,
    warmup_cosine,
)
from roli_sweep.data import DataSplits


class TrialOutOfMemoryError(RuntimeError):
    """CUDA ran out of memory in a trial; the message names the batch sizes and what to change."""


def state_of(model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """A detached copy of the named parameters and of every persistent buffer, as ``state_dict()`` holds them.

    Non-persistent buffers (Swin's ``relative_position_index`` and ``attn_mask``) are not in
    ``state_dict()`` and are rebuilt by the model itself, so they are never saved (torch
    ``Module.register_buffer(persistent=False)``); the same code serves every timm model.
    """
    parameters = {n for n, _ in model.named_parameters()}
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n in names or n not in parameters}


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load what :func:`state_of` saved: exactly the trainable parameters and persistent buffers of ``model``.

    Raises:
        RuntimeError: ``state`` holds keys the model does not have, or lacks one of its trainable
            parameters or persistent buffers (names the first few).
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    parameters = {n for n, _ in model.named_parameters()}
    expected = {n for n in model.state_dict() if n in trainable or n not in parameters}
    result = model.load_state_dict(state, strict=False)
    missing = sorted(expected - set(state))
    if result.unexpected_keys or missing:
        raise RuntimeError(f"{source} does not fit the model: unexpected {result.unexpected_keys[:5]}, "
                           f"missing {missing[:5]}")


class Stage:
    """Runs the epochs of one stage and remembers the trainable state of the best robust epoch."""

    def __init__(self, model: nn.Module, stage: StageConfig, cfg: TrialConfig, splits: DataSplits,
                 runtime: Runtime, seed: int, train_modules: list[nn.Module] | None = None) -> None:
        self.model, self.stage, self.cfg, self.runtime = model, stage, cfg, runtime
        self.train_modules = train_modules
        self.eval_attack = evaluation_attack(cfg.attack, cfg.eval)
        self.train_loader = make_loader(splits.train, stage.batch_size, shuffle=True, seed=seed, device=runtime.device)
        self.val_loader = make_loader(splits.val, cfg.eval.batch_size, shuffle=False, seed=seed, device=runtime.device)
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = make_optimizer(model, stage)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(stage, len(self.train_loader)))
        self.best: dict[str, float] = {"val_robust_acc": -1.0}
        self.best_state: dict[str, torch.Tensor] = {}
        self.epoch = 0  # the last finished epoch

    def state_dict(self) -> dict:
        """Everything the next epoch depends on: trainable state, optimiser, schedule, best epoch so far, and the
        RNGs (torch's global one for dropout, the attacks' generator, the data order's generator). Tensors and
        plain containers only, so it loads with ``torch.load(weights_only=True)``."""
        return {"epoch": self.epoch, "trainable": state_of(self.model, self.trainable),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "best": dict(self.best), "best_state": self.best_state,
                "rng": {"torch": torch.get_rng_state(), "attacks": self.runtime.generator.get_state(),
                        "data_order": order_generator(self.train_loader).get_state()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the epoch :meth:`state_dict` was taken at."""
        load_state(self.model, state["trainable"], "resume state")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best, self.best_state, self.epoch = state["best"], state["best_state"], state["epoch"]
        torch.set_rng_state(state["rng"]["torch"])
        self.runtime.generator.set_state(state["rng"]["attacks"])
        order_generator(self.train_loader).set_state(state["rng"]["data_order"])

    def epochs(self, label: str) -> Iterator[dict[str, float]]:
        """Run the epochs after :attr:`epoch`, yielding each one's metrics.

        Raises:
            DivergenceError: a non-finite loss or trainable parameter (the message names ``label``, the
                epoch, the step and the lr).
            TrialOutOfMemoryError: CUDA out of memory (the message names the batch sizes to lower).
        """
        for epoch in range(self.epoch + 1, self.stage.epochs + 1):
            try:
                stats = adversarial_epoch(self.model, self.train_loader, self.optimizer, self.scheduler,
                                          self.cfg.attack, self.runtime, self.train_modules)
                clean, robust = evaluate(self.model, self.val_loader, self.eval_attack, self.cfg.eval.val_steps,
                                         self.runtime)
            except DivergenceError as err:
                raise DivergenceError(err.what, err.step, err.lr, f"{label} epoch {epoch}") from None
            except torch.cuda.OutOfMemoryError as err:
                raise TrialOutOfMemoryError(
                    f"CUDA out of memory in {label} epoch {epoch} at batch size {self.stage.batch_size} "
                    f"({label}.batch_size; validation at eval.batch_size {self.cfg.eval.batch_size}): lower them, "
                    "train under precision: bf16, give each trial a whole GPU (resources.gpu: 1) or fewer trials per "
                    f"GPU (max_concurrent) ({str(err).splitlines()[0][:200]})") from None
            self.epoch = epoch
            metrics = {"epoch": epoch, "train_loss": stats.train_loss, "train_robust_acc": stats.train_robust_acc,
                       "lr": stats.lr, "train_images_per_s": stats.images_per_s,
                       "val_clean_acc": clean, "val_robust_acc": robust}
            if robust > self.best["val_robust_acc"]:
                self.best = {"best_epoch": epoch, "val_clean_acc": clean, "val_robust_acc": robust}
                self.best_state = state_of(self.model, self.trainable)
            metrics["best_val_robust_acc"] = self.best["val_robust_acc"]
            metrics["best_val_clean_acc"] = self.best["val_clean_acc"]
            yield metrics

    def restore_best(self) -> None:
        load_state(self.model, self.best_state, "best-epoch state")
