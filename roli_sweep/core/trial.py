"""One trial: adversarial linear probing, then adversarial finetuning (RoLI, Hua et al., CVPR 2024).

Stage 1 trains only the head of the frozen pretrained backbone on PGD adversarial examples and
keeps the head of the epoch with the best validation robust accuracy. Stage 2 starts the head from
that probe (``head_init: roli``) or from the same random initialisation the probe started from
(``head_init: random``, RanLI), applies the transfer method and finetunes adversarially, reporting
every epoch. After the last epoch the epoch with the best validation robust accuracy (paper,
Sec. 5.1: model selection on robust validation accuracy) is restored and tested once.

The same :func:`run_trial` serves a sweep trial, ``run_sweep.py train`` and the tests; it knows
nothing of Ray: it calls the ``on_epoch`` callable it is given.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from roli_sweep.config import TrialConfig, evaluation_attack
from roli_sweep.data import DataSplits, load_splits
from roli_sweep.models.backbone import NormalizedModel, build_backbone
from roli_sweep.models.methods import METHODS, apply_method, freeze_all_but_head, trainable_parameter_count
from roli_sweep.core.probe_cache import ProbeCache, ProbeOutcome, probe_key
from roli_sweep.core.stage import Stage, load_state, state_of
from roli_sweep.core.train import Runtime, evaluate, make_loader, make_runtime

OnEpoch = Callable[[str, dict[str, float]], None]
"""Called as ``on_epoch(stage, metrics)`` after every epoch; stage is ``"probe"`` or ``"finetune"``."""


@dataclass
class TrialResult:
    """What a trial measured. Accuracies are fractions in [0, 1]."""

    metrics: dict[str, float]
    model: nn.Module | None = None
    """The model at its best val robust epoch (what was tested), in eval mode."""
    test_set: torch.utils.data.Dataset | None = None
    num_classes: int = 0


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Prepared:
    """A trial's model, data and RNG, ready for stage 1."""

    model: NormalizedModel
    splits: DataSplits
    runtime: Runtime
    initial_head: dict[str, torch.Tensor]


def prepare(cfg: TrialConfig) -> Prepared:
    """Seed everything, load the data and build the backbone with a fresh head (kept for RanLI)."""
    seed_everything(cfg.seed)
    runtime = make_runtime(cfg.device, cfg.precision, cfg.seed)
    splits = load_splits(cfg.data, cfg.seed)
    model = build_backbone(cfg.backbone, splits.num_classes).to(runtime.device)
    if cfg.finetune.random_head_init == "reference":
        reference_head_init(model.head, torch.Generator().manual_seed(cfg.seed))
    # fail now, not after the whole probe stage, if the method does not fit this backbone
    apply_method(copy.deepcopy(model), cfg.finetune.method, cfg.finetune.method_params)
    initial_head = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
    return Prepared(model, splits, runtime, initial_head)


REFERENCE_HEAD_PRIOR = 0.01
"""The class prior the RoLI reference's head bias encodes (``special_bias`` in its ``src/models/mlp.py``)."""


def reference_head_init(head: nn.Module, generator: torch.Generator) -> None:
    """Initialise a linear head as the RoLI reference code does (``MLP`` in its ``src/models/mlp.py``,
    with ``MLP_NUM = 0``): weight (K, D) from ``kaiming_normal_(mode='fan_out')``, i.e. normal with std
    ``sqrt(2 / K)``; every bias entry ``-ln((1 - 0.01) / 0.01)`` (about -4.595). The weight is drawn from
    ``generator`` (CPU), so it depends on the seed alone, not on the method or its parameters.

    Raises:
        TypeError: ``head`` is not an ``nn.Linear``.
    """
    if not isinstance(head, nn.Linear):
        raise TypeError(f"finetune.random_head_init 'reference' needs a linear head, not {type(head).__name__}; "
                        "set finetune.random_head_init: timm for this backbone")
    with torch.no_grad():
        weight = torch.empty(head.weight.shape)
        nn.init.kaiming_normal_(weight, a=0, mode="fan_out", generator=generator)
        head.weight.copy_(weight)
        if head.bias is not None:
            head.bias.fill_(-math.log((1 - REFERENCE_HEAD_PRIOR) / REFERENCE_HEAD_PRIOR))


def finetune_train_modules(cfg: TrialConfig, model: nn.Module, backbone_modules: set[nn.Module]) -> list[nn.Module] | None:
    """The modules that run in train mode during finetuning (None = all), per ``finetune.backbone_mode``.

    ``eval`` (the reference's choice for every method that freezes the backbone): the backbone's
    own modules (``backbone_modules``, taken before the method was applied) run in eval mode, so its
    dropout, drop-path and BatchNorm statistics stay as the probe saw them; the modules the method
    added (LoRA layers, adapters, prompts) and the head run in train mode.
    """
    mode = cfg.finetune.backbone_mode
    if mode == "auto":
        mode = "eval" if METHODS[cfg.finetune.method].freezes_backbone else "train"
    if mode == "train":
        return None
    return [m for m in model.modules() if m not in backbone_modules]


def run_probe(cfg: TrialConfig, prep: Prepared, on_epoch: OnEpoch) -> ProbeOutcome:
    """Stage 1: adversarial linear probing of the frozen backbone; leaves the best head in the model."""
    freeze_all_but_head(prep.model)
    probe = Stage(prep.model, cfg.probe, cfg, prep.splits, prep.runtime, cfg.seed,
                   train_modules=list(prep.model.head.modules()))
    for metrics in probe.epochs("probe"):
        on_epoch("probe", metrics)
    probe.restore_best()
    head = {k: v.detach().clone() for k, v in prep.model.head.state_dict().items()}
    return ProbeOutcome(head, {"probe_val_clean_acc": probe.best["val_clean_acc"],
                               "probe_val_robust_acc": probe.best["val_robust_acc"]})


def probe_and_test(cfg: TrialConfig, on_epoch: OnEpoch | None = None) -> ProbeOutcome:
    """Stage 1 alone, with the probe's own test accuracies added to its metrics.

    The adversarially probed linear head is a transfer result in its own right (paper, F2): its
    ``probe_test_clean_acc`` and ``probe_test_robust_acc`` (PGD-``eval.test_steps``, fp32) come
    from the test split, its model selection from validation.
    """
    prep = prepare(cfg)
    probe = run_probe(cfg, prep, on_epoch or (lambda stage, metrics: None))
    test_loader = make_loader(prep.splits.test, cfg.eval.batch_size, shuffle=False, seed=cfg.seed,
                              device=prep.runtime.device)
    clean, robust = evaluate(prep.model, test_loader, evaluation_attack(cfg.attack, cfg.eval), cfg.eval.test_steps,
                             prep.runtime.for_test(cfg.seed + 2))
    probe.metrics.update({"probe_test_clean_acc": clean, "probe_test_robust_acc": robust})
    return probe


def init_finetune_head(cfg: TrialConfig, prep: Prepared, probe: ProbeOutcome) -> None:
    """Set the stage-2 head: the probe's (``roli``) or the probe's own random start (``random``, RanLI)."""
    prep.model.head.load_state_dict(probe.head if cfg.finetune.head_init == "roli" else prep.initial_head)


BEST_STATE_FILE = "best_state.safetensors"


def save_trained_state(model: nn.Module, folder: Path) -> Path:
    """Write the trainable parameters and buffers of ``model`` (the head, the method's parameters) as
    ``folder/best_state.safetensors``; the frozen rest comes back from the pretrained weights."""
    folder.mkdir(parents=True, exist_ok=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v.detach().cpu().contiguous() for k, v in state_of(model, trainable).items()}
    save_file(state, str(folder / BEST_STATE_FILE))
    return folder / BEST_STATE_FILE


def load_trained(cfg: TrialConfig, state_file: Path) -> tuple[nn.Module, DataSplits, torch.device]:
    """Rebuild the model a trial tested: backbone with its pretrained weights, the method, then the saved state.

    Raises:
        RuntimeError: the saved state does not fit the model built from ``cfg``.
    """
    prep = prepare(cfg)
    apply_method(prep.model, cfg.finetune.method, cfg.finetune.method_params)
    prep.model.to(prep.runtime.device)
    with safe_open(str(state_file), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    load_state(prep.model, state, str(state_file))
    return prep.model.eval(), prep.splits, prep.runtime.device


PROBE_FILE = "probe.safetensors"
RESUME_FILE = "resume.pt"
"""A trial's checkpoint folder: the stage-1 outcome (:class:`ProbeOutcome`), the stage-2 state after the last
finished epoch (``torch.save`` of :meth:`roli_sweep.core.stage.Stage.state_dict`, read with ``weights_only=True``) and, after the
last epoch, the tested state (:data:`BEST_STATE_FILE`)."""


def run_trial(cfg: TrialConfig, on_epoch: OnEpoch | None = None, probe: ProbeOutcome | None = None,
              checkpoint_dir: Path | None = None, resume_dir: Path | None = None,
              probe_cache: ProbeCache | None = None) -> TrialResult:
    """Run stage 1 (adversarial linear probe) then stage 2 (adversarial finetuning) as ``cfg`` says.

    Every finetune epoch's metrics (``epoch``, ``train_loss``, ``val_clean_acc``,
    ``val_robust_acc`` under PGD-``eval.val_steps``, ``best_val_*``, ...) go to
    ``on_epoch("finetune", m)``, each carrying the probe's best ``probe_val_clean_acc`` /
    ``probe_val_robust_acc``; the last one also carries ``test_clean_acc`` and ``test_robust_acc``
    (PGD-``eval.test_steps``) of the restored best epoch, ``best_epoch`` and ``trial_seconds``.
    Probe epochs go to ``on_epoch("probe", m)``, and the end of stage 1 to ``on_epoch("probe_done",
    probe metrics with epoch 0, ``probe`` = ``computed`` / ``cached``, ``probe_key`` and ``probe_seconds``, the
    compute stage 1 took or, cached, saved)``. A ``probe`` computed earlier for the same data, backbone,
    probe and attack settings and seed replaces stage 1; so does the entry of ``probe_cache``
    (:mod:`roli_sweep.core.probe_cache`), which computes and stores it when missing. Stage 2 starts from RNGs
    reseeded with ``seed + 1`` either way, so all give the same result.

    With ``checkpoint_dir``, the trial keeps its checkpoint there (:data:`RESUME_FILE`), rewritten
    before ``on_epoch`` hears of the end of stage 1 and of every finetune epoch. With ``resume_dir``
    (such a folder from an interrupted run of the same config) it continues after the last finished
    epoch and gives the same metrics as an uninterrupted run.

    Raises:
        ValueError / FileNotFoundError: data or weights that cannot be loaded, or a transfer method
            that does not fit the backbone (found before stage 1 starts).
        DivergenceError: a non-finite loss or trainable parameter (the trial stops at that step).
    """
    started = time.perf_counter()

    def record(stage: str, metrics: dict[str, float]) -> None:
        if on_epoch is not None:
            on_epoch(stage, metrics)

    resumed = torch.load(resume_dir / RESUME_FILE, weights_only=True) \
        if resume_dir is not None and (resume_dir / RESUME_FILE).is_file() else None
    if resume_dir is not None and (resume_dir / PROBE_FILE).is_file():
        probe = ProbeOutcome.load(resume_dir / PROBE_FILE)
    prep = prepare(cfg)
    if probe is None:
        key = probe_key(cfg) if probe_cache is not None else ""
        if probe_cache is not None:
            probe, how, seconds = probe_cache.get_or_compute(key, lambda: run_probe(cfg, prep, record))
        else:
            probe, how, seconds = run_probe(cfg, prep, record), "computed", time.perf_counter() - started
        freeze_all_but_head(prep.model)
        if checkpoint_dir is not None:
            probe.save(checkpoint_dir / PROBE_FILE)
        record("probe_done", {"epoch": 0, **probe.metrics, "probe": how, "probe_key": key, "probe_seconds": seconds})
    else:
        freeze_all_but_head(prep.model)
        if checkpoint_dir is not None:
            probe.save(checkpoint_dir / PROBE_FILE)
    seed_everything(cfg.seed + 1)  # stage 2 does not depend on whether stage 1 ran here
    prep.runtime.generator.manual_seed(cfg.seed + 1)
    init_finetune_head(cfg, prep, probe)
    backbone_modules = set(prep.model.modules()) - set(prep.model.head.modules())
    apply_method(prep.model, cfg.finetune.method, cfg.finetune.method_params)
    prep.model.to(prep.runtime.device)
    constants = {**probe.metrics, "trainable_params": trainable_parameter_count(prep.model)}
    finetune = Stage(prep.model, cfg.finetune, cfg, prep.splits, prep.runtime, cfg.seed + 1,
                      finetune_train_modules(cfg, prep.model, backbone_modules))
    seconds_before = 0.0
    if resumed is not None:
        finetune.load_state_dict(resumed["stage"])
        seconds_before = resumed["seconds"]
    final: dict[str, float] = {}
    for metrics in finetune.epochs("finetune"):
        metrics.update(constants)
        seconds = seconds_before + time.perf_counter() - started
        if checkpoint_dir is not None:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"stage": finetune.state_dict(), "seconds": seconds}, checkpoint_dir / RESUME_FILE)
        if metrics["epoch"] == cfg.finetune.epochs:
            finetune.restore_best()
            test_loader = make_loader(prep.splits.test, cfg.eval.batch_size, shuffle=False, seed=cfg.seed,
                                      device=prep.runtime.device)
            test_clean, test_robust = evaluate(prep.model, test_loader, finetune.eval_attack, cfg.eval.test_steps,
                                               prep.runtime.for_test(cfg.seed + 2))
            if checkpoint_dir is not None:
                save_trained_state(prep.model, checkpoint_dir)
            final = {"best_epoch": finetune.best["best_epoch"], "test_clean_acc": test_clean,
                     "test_robust_acc": test_robust, "trial_seconds": seconds_before + time.perf_counter() - started}
            metrics.update(final)
        record("finetune", metrics)
    summary = {**constants, **final,
               "val_clean_acc": finetune.best["val_clean_acc"], "val_robust_acc": finetune.best["val_robust_acc"]}
    return TrialResult(summary, prep.model.eval(), prep.splits.test, prep.splits.num_classes)
