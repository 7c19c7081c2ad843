"""Make a source backbone: standard or PGD adversarial training on a source task, with a model card.

The two backbones shipped in ``roli_sweep/backbones/`` were made with this module from the YAML
files next to them (``run_sweep.py pretrain --config roli_sweep/backbones/<name>.yaml``). The
model card records the architecture and its kwargs, the source data and classes, the threat model,
the training settings, clean and PGD-10 accuracy on the source test split, the sha256 of the
weights file, package versions and the git commit.
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from roli_sweep.config import AttackConfig, PretrainConfig, evaluation_attack
from roli_sweep.data import load_splits
from roli_sweep.models.backbone import build_backbone
from roli_sweep.provenance import git_commit, package_versions
from roli_sweep.core.train import adversarial_epoch, evaluate, make_loader, make_optimizer, make_runtime, step_size, warmup_cosine
from roli_sweep.core.trial import seed_everything


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def threat_model(attack: AttackConfig, steps: int) -> dict[str, Any]:
    """The threat model of a PGD attack as recorded with every number."""
    return {"norm": "Linf", "eps": attack.eps, "eps_in_255ths": round(attack.eps * 255, 3), "attack": f"PGD-{steps}",
            "steps": steps, "step_size": step_size(attack, steps), "random_start": attack.random_start,
            "restarts": 1, "pixel_range": [0.0, 1.0]}


def pretrain(cfg: PretrainConfig, on_epoch: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train a backbone from scratch on the source task; write ``<out>.safetensors`` and ``<out>.json``.

    The model card holds the resolved config; the config file itself is not rewritten.

    Returns:
        The model card (also written to ``<cfg.out>.json``).
    """
    started, commit = time.perf_counter(), git_commit()  # the code that runs is the code at the start
    seed_everything(cfg.seed)
    runtime = make_runtime(cfg.device, cfg.precision, cfg.seed)
    splits = load_splits(cfg.data, cfg.seed)
    model = build_backbone(cfg.backbone, splits.num_classes).to(runtime.device)
    training_attack = cfg.attack if cfg.adversarial else cfg.attack.model_copy(update={"steps": 0})
    loader = make_loader(splits.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed, device=runtime.device)
    optimizer = make_optimizer(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.train, len(loader)))
    val_loader = make_loader(splits.val, cfg.eval.batch_size, shuffle=False, seed=cfg.seed, device=runtime.device)
    eval_attack = evaluation_attack(cfg.attack, cfg.eval)
    for epoch in range(1, cfg.train.epochs + 1):
        stats = adversarial_epoch(model, loader, optimizer, scheduler, training_attack, runtime)
        val_clean, val_robust = evaluate(model, val_loader, eval_attack, cfg.eval.val_steps, runtime)
        if on_epoch:
            on_epoch({"epoch": epoch, "train_loss": stats.train_loss, "images_per_s": stats.images_per_s,
                      "val_clean_acc": val_clean, "val_robust_acc": val_robust})
    test_loader = make_loader(splits.test, cfg.eval.batch_size, shuffle=False, seed=cfg.seed, device=runtime.device)
    test_clean, test_robust = evaluate(model, test_loader, eval_attack, cfg.eval.val_steps, runtime.for_test(cfg.seed + 2))

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = out.with_suffix(".safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}, str(weights))
    card = {
        "name": out.name,
        "architecture": cfg.backbone.name,
        "kwargs": cfg.backbone.kwargs,
        "mean": cfg.backbone.mean,
        "std": cfg.backbone.std,
        "weights_file": weights.name,
        "sha256": sha256(weights),
        "parameters": sum(p.numel() for p in model.net.parameters()),
        "source": {"dataset": cfg.data.name, "classes": cfg.data.classes, "class_names": splits.class_names,
                   "image_size": int(splits.train.tensors[0].shape[-1]),
                   "train_images": len(splits.train), "val_images": len(splits.val), "test_images": len(splits.test)},
        "training": {"kind": "adversarial" if cfg.adversarial else "standard",
                     "threat_model": threat_model(cfg.attack, cfg.attack.steps) if cfg.adversarial else None,
                     **cfg.train.model_dump(), "seed": cfg.seed},
        "evaluation": {"split": "test", "images": len(splits.test), "clean_acc": test_clean,
                       "pgd_acc": test_robust, "threat_model": threat_model(eval_attack, cfg.eval.val_steps),
                       "model_mode": "eval"},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "git_commit": commit,
        "config": cfg.model_dump(mode="json"),
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card
