"""PGD-7 adversarial training steps of the paper's backbones on one GPU: images/s and the share of the GPU's peak.

    python benchmarks/gpu_step.py [--models vit_base_patch16_224,swin_base_patch4_window7_224] [--batch 64]
                                  [--steps 10] [--device cuda] [--peak-tflops auto]

Each step is what a finetuning step of a trial does (roli_sweep.core.attacks.pgd, 7 steps of 2/255 at eps 8/255
with a random start, then one forward and backward on the adversarial batch and an AdamW step), on random
weights (timm builds the architecture; no download) and random [0, 1] images at 224 px, under bf16 autocast
(the trials' ``precision: auto`` on CUDA). The FLOPs of one forward pass are counted with
``torch.utils.flop_counter.FlopCounterMode``; a step costs about 7 x (forward + input backward) + (forward +
backward) = 7 x 2 + 3 = 17 forwards (a backward is about two forwards, one when only the input's gradient is
needed). The share of the peak divides the achieved FLOP/s by the GPU's dense bf16 peak (``--peak-tflops``, or
the table below by device name). Numbers only, never asserted.
"""
from __future__ import annotations

import argparse
import time

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16 tensor-core peaks from the vendors' data sheets (SXM parts; no sparsity)."""

FORWARDS_PER_STEP = 7 * 2 + 3


def _peak(device: torch.device, given: str) -> float | None:
    if given != "auto":
        return float(given)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def measure(name: str, batch: int, steps: int, device: torch.device) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from roli_sweep.core.attacks import pgd
    from roli_sweep.models.backbone import timm

    model = timm.create_model(name, pretrained=False, num_classes=100).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast:
        model(x[:1])
    forward_flops = counter.get_total_flops()

    def step() -> None:
        model.eval()
        with autocast:
            x_adv = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=7, random_init=True)
        model.train()
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x_adv), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: kernels chosen, memory allocated
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    rate = steps * batch / seconds
    return {"model": name, "batch": batch, "images_per_s": rate, "forward_gflops": forward_flops / 1e9,
            "tflops": rate * forward_flops * FORWARDS_PER_STEP / 1e12,
            "memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_base_patch16_224,swin_base_patch4_window7_224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", default="auto", help="dense bf16 peak of the GPU; auto = by device name")
    args = parser.parse_args()
    device = torch.device(args.device)
    peak = _peak(device, args.peak_tflops)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {label}; bf16 peak {peak or 'unknown'} TFLOP/s; batch {args.batch}, PGD-7 training steps")
    for name in args.models.split(","):
        r = measure(name, args.batch, args.steps, device)
        share = f"{100 * r['tflops'] / peak:.1f} % of peak" if peak else "peak unknown"
        memory = f", {r['memory_gib']:.1f} GiB peak memory" if r["memory_gib"] is not None else ""
        print(f"{name}: {r['images_per_s']:.0f} img/s; forward {r['forward_gflops']:.1f} GFLOP/image; "
              f"{r['tflops']:.1f} TFLOP/s = {share}{memory}")


if __name__ == "__main__":
    main()
