"""AutoAttack as published against torchattacks 3.3's own ``AutoAttack(version='standard')``, on one model.

    python benchmarks/autoattack_versions.py [--space search_spaces/lora.yaml] [--set finetune.lr=0.01] [--n 100]

Trains the space's base trial (probe, then finetuning; the default space's base is LoRA r 8, RoLI,
lr 1e-3; ``--set dotted.key=value`` changes it) and evaluates its tested best epoch on the first ``n`` test images at the space's
evaluation eps with:

- the published standard version (roli_sweep.evaluation.autoattack: APGD-CE 100, APGD-T 100 x 9 targets,
  FAB-T 100 x 9 targets, Square 5000 queries, only on clean-correct points);
- torchattacks' ``AutoAttack(version='standard')`` (10 steps, K - 1 targets, Square with the
  rescaled schedule), scored the same way (robust = correct clean and after the attack).

Prints clean accuracy, both robust accuracies, how many examples the two disagree on, and the
seconds each took. Numbers only, no assertions.
"""
from __future__ import annotations

import argparse
import time

import torch
import yaml

from roli_sweep.evaluation.autoattack import ROBUST, autoattack_outcomes
from roli_sweep.config import apply_overrides, evaluation_attack, load_search_space
from roli_sweep.core.trial import run_trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/lora.yaml")
    parser.add_argument("--n", type=int, default=100, help="first n test images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the base trial (YAML value), e.g. finetune.lr=0.01")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.set)}
    cfg = apply_overrides(load_search_space(args.space).base, overrides)
    started = time.perf_counter()
    result = run_trial(cfg)
    print(f"trained {args.space} base trial {overrides or ''} in {time.perf_counter() - started:.0f} s: "
          f"val robust {result.metrics['val_robust_acc']:.3f}, test clean {result.metrics['test_clean_acc']:.3f}")
    model, eps = result.model.eval(), evaluation_attack(cfg.attack, cfg.eval).eps
    n = min(args.n, len(result.test_set))
    x = torch.stack([result.test_set[i][0] for i in range(n)])
    y = torch.stack([torch.as_tensor(result.test_set[i][1]) for i in range(n)])
    with torch.no_grad():
        clean = model(x).argmax(1) == y

    started = time.perf_counter()
    published = autoattack_outcomes(model, x, y, clean, eps, result.num_classes, cfg.eval.final.autoattack,
                                    seed=0) == ROBUST
    published_s = time.perf_counter() - started

    import torchattacks

    started = time.perf_counter()
    library = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=result.num_classes,
                                      seed=0)
    with torch.no_grad():
        library_robust = clean & (model(library(x, y)).argmax(1) == y)
    library_s = time.perf_counter() - started

    print(f"{n} test images, L-inf eps {eps:.4g}, {args.threads} threads; clean {clean.float().mean():.3f}")
    print(f"published standard AutoAttack (100 steps, {min(9, result.num_classes - 1)} targets, Square 5000): "
          f"robust {published.float().mean():.3f} in {published_s:.0f} s")
    print(f"torchattacks AutoAttack(version='standard') (10 steps, {result.num_classes - 1} targets): "
          f"robust {library_robust.float().mean():.3f} in {library_s:.0f} s")
    print(f"examples robust under one but not the other: {(published != library_robust).sum().item()} "
          f"(robust only under the published: {(published & ~library_robust).sum().item()})")


if __name__ == "__main__":
    main()
