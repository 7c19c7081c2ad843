"""Measure adversarial-training and evaluation throughput of a trial config on this machine.

    python benchmarks/throughput.py [--space search_spaces/lora.yaml] [--threads 2] [--batches 5]

Prints images/s for: clean forward+backward, PGD-k adversarial training (k = attack.steps) with
the finetune method applied, adversarial linear probing, and PGD-10 evaluation. Numbers only, no
assertions: they depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from roli_sweep.core.attacks import pgd
from roli_sweep.config import load_search_space
from roli_sweep.models.methods import apply_method, freeze_all_but_head, trainable_parameter_count
from roli_sweep.core.train import step_size
from roli_sweep.core.trial import prepare


def _rate(fn, batch: torch.Tensor, labels: torch.Tensor, batches: int) -> float:
    fn(batch, labels)  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        fn(batch, labels)
    return batches * len(labels) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/lora.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_search_space(args.space).base
    prep = prepare(cfg)
    model, attack = prep.model, cfg.attack
    x, y = prep.splits.train.tensors
    x, y = x[: cfg.finetune.batch_size], y[: cfg.finetune.batch_size]

    def train_step(images, labels, adversarial: bool) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if adversarial:
            images = pgd(model, images, labels, attack.eps, step_size(attack, attack.steps), attack.steps)
        loss = F.cross_entropy(model(images), labels)
        grads = torch.autograd.grad(loss, params)
        del grads

    freeze_all_but_head(model)
    probe = _rate(lambda a, b: train_step(a, b, True), x, y, args.batches)
    apply_method(model, cfg.finetune.method, cfg.finetune.method_params)
    clean = _rate(lambda a, b: train_step(a, b, False), x, y, args.batches)
    adv = _rate(lambda a, b: train_step(a, b, True), x, y, args.batches)
    model.eval()
    evaluation = _rate(lambda a, b: pgd(model, a, b, attack.eps, step_size(attack, 10), 10), x, y, args.batches)
    print(f"{cfg.backbone.name} {cfg.backbone.kwargs}, method {cfg.finetune.method} "
          f"({trainable_parameter_count(model)} trainable params), batch {len(y)}, {args.threads} threads")
    print(f"clean fwd+bwd            {clean:8.1f} images/s")
    print(f"PGD-{attack.steps} adversarial train  {adv:8.1f} images/s")
    print(f"PGD-{attack.steps} linear probe       {probe:8.1f} images/s")
    print(f"PGD-10 evaluation        {evaluation:8.1f} images/s")


if __name__ == "__main__":
    main()
