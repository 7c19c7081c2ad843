"""How much the project's own loops cost against minimal versions of the same computation, on one thread.

    python benchmarks/overhead.py [--space search_spaces/lora.yaml] [--repeats 15]

Prints medians of interleaved runs (A, B, A, B, ...) on the same model (the space's base config, method
applied) and the same batch:

- P1 = minimal / ours for one adversarial training step: the trial's step (one batch through
  :func:`roli_sweep.core.train.adversarial_epoch`: PGD-k keeping the worst iterate per example, training
  forward, backward, optimiser and scheduler step, finiteness checks) against a hand-written PGD-AT
  step (random start, k signed-gradient steps, the last iterate, forward, backward, step);
- P2 = all-parameter / ours for one probe step: the probe's step (frozen backbone, head trained) against
  the same step with every backbone parameter requiring grad, so the training backward runs through the
  whole backbone;
- P3 = torchattacks / ours for PGD-20 robust accuracy on the batch: :func:`roli_sweep.core.attacks.pgd_broken`
  against ``torchattacks.PGD`` plus the forward that scores its output, with both robust accuracies.

A ratio above 1 means the project's version is faster. Numbers only, never asserted: they depend on the
machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from roli_sweep.core.attacks import pgd_broken
from roli_sweep.config import evaluation_attack, load_search_space
from roli_sweep.models.methods import apply_method, freeze_all_but_head
from roli_sweep.core.train import Runtime, adversarial_epoch, make_optimizer, step_size, warmup_cosine


def interleaved(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of ``first()`` and ``second()``, run alternately after one warm-up each."""
    first(), second()
    a, b = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        first()
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        second()
        b.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def minimal_pgd_at_step(model, x, y, optimizer, eps: float, alpha: float, steps: int, generator) -> None:
    """Madry et al.'s PGD-AT step as a minimal loop writes it: the last iterate, no scoring, no checks."""
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
    loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/lora.yaml")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from roli_sweep.core.trial import prepare

    cfg = load_search_space(args.space).base
    prep = prepare(cfg)
    x, y = prep.splits.train.tensors
    x, y = x[: cfg.finetune.batch_size], y[: cfg.finetune.batch_size]
    attack, alpha = cfg.attack, step_size(cfg.attack, cfg.attack.steps)
    loader = [(x, y)]
    runtime = Runtime(torch.device("cpu"), torch.Generator().manual_seed(0))

    # P1: the finetuning step, method applied, backbone modes as the trial sets them
    ours_model = copy.deepcopy(prep.model)
    apply_method(ours_model, cfg.finetune.method, cfg.finetune.method_params)
    minimal_model = copy.deepcopy(ours_model)
    opt = make_optimizer(ours_model, cfg.finetune)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.finetune.model_copy(update={"epochs": 10 ** 6}), 1))
    minimal_model.train()
    minimal_opt = make_optimizer(minimal_model, cfg.finetune)
    gen = torch.Generator().manual_seed(0)
    t_ours, t_min = interleaved(lambda: adversarial_epoch(ours_model, loader, opt, sched, attack, runtime),
                                lambda: minimal_pgd_at_step(minimal_model, x, y, minimal_opt, attack.eps, alpha,
                                                            attack.steps, gen), args.repeats)
    print(f"P1 training step: ours {1000 * t_ours:.1f} ms, minimal PGD-AT {1000 * t_min:.1f} ms, "
          f"P1 = {t_min / t_ours:.3f}")

    # P2: the probe step, frozen backbone vs every parameter requiring grad
    probe_model = copy.deepcopy(prep.model)
    freeze_all_but_head(probe_model)
    naive_model = copy.deepcopy(probe_model)
    for p in naive_model.parameters():
        p.requires_grad_(True)
    probe_opt = make_optimizer(probe_model, cfg.probe)
    naive_opt = torch.optim.SGD(naive_model.head.parameters(), lr=cfg.probe.lr, momentum=cfg.probe.momentum)
    probe_sched = torch.optim.lr_scheduler.LambdaLR(probe_opt, lambda i: 1.0)
    naive_sched = torch.optim.lr_scheduler.LambdaLR(naive_opt, lambda i: 1.0)
    head = list(probe_model.head.modules())
    t_probe, t_naive = interleaved(
        lambda: adversarial_epoch(probe_model, loader, probe_opt, probe_sched, attack, runtime, head),
        lambda: adversarial_epoch(naive_model, loader, naive_opt, naive_sched, attack, runtime,
                                  list(naive_model.head.modules())), args.repeats)
    print(f"P2 probe step: ours {1000 * t_probe:.1f} ms, all-parameter backward {1000 * t_naive:.1f} ms, "
          f"P2 = {t_naive / t_probe:.3f}")

    # P3: PGD-20 robust accuracy, ours vs torchattacks
    import torchattacks

    model = ours_model.eval()
    threat = evaluation_attack(cfg.attack, cfg.eval)
    steps = cfg.eval.test_steps
    eval_alpha = step_size(threat, steps)
    outcomes = {}

    def ours() -> None:
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        broken = pgd_broken(model, x, y, threat.eps, eval_alpha, steps, True, torch.Generator().manual_seed(1))
        outcomes["ours"] = (clean & ~broken).float().mean().item()

    def theirs() -> None:
        attack_ = torchattacks.PGD(model, eps=threat.eps, alpha=eval_alpha, steps=steps, random_start=True)
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        x_adv = attack_(x, y)
        with torch.no_grad():
            outcomes["torchattacks"] = (clean & (model(x_adv).argmax(1) == y)).float().mean().item()

    t_ours3, t_theirs = interleaved(ours, theirs, args.repeats)
    print(f"P3 PGD-{steps}: ours {1000 * t_ours3:.1f} ms (robust {outcomes['ours']:.3f}), torchattacks "
          f"{1000 * t_theirs:.1f} ms (robust {outcomes['torchattacks']:.3f}), P3 = {t_theirs / t_ours3:.3f}")


if __name__ == "__main__":
    main()
