"""Measure the image-list pipeline at Caltech-256's size: decoded-image cache, streaming loader, memory per trial.

    python benchmarks/data_pipeline.py [--tree /tmp/caltech256_synthetic] [--images 30607] [--workers 1]
    python benchmarks/data_pipeline.py --train [--train-size 256]      # one whole trial of the preset on the tree

1. Writes (once; reused when it exists) a synthetic image tree of Caltech-256's shape: ``--images`` JPEGs in
   257 class folders (``001.class0`` ...), class sizes from 80 up, image sizes drawn like photographs of the
   real set (longer side log-normal around 350 px, clipped to 100..1000; aspect 4:3, 3:4, 1:1 or 3:2), smooth
   random content at JPEG quality 85, and ``train.json`` / ``val.json`` / ``test.json`` in the reference's
   format (3 val images per class: 771, as its split; 20 % test).
2. Runs "trials" as separate processes, each reading the data exactly as a trial of the caltech256 paper
   preset does (its ``base.data`` with ``root`` / ``split_dir`` pointed at the tree: ``augment: reference``,
   224 px): ``load_splits``, then the training loader of batch 64. Each reports its time to first batch, the
   loader's images/s over ``--batches`` batches (decode + augment + collate), and its memory after imports and
   after the batches: the trial process's RSS, and RSS and PSS (shared pages split between the processes that
   map them) summed over the trial and its loader workers.
   - cold: one trial on an empty cache (it decodes every image once);
   - warm: one trial on the built cache;
   - two trials started together on the built cache;
   - two trials started together on an empty cache (one decodes, the other waits for it).
3. Prints the cache's disk use, the decoded dataset's size, and the cores one GPU needs to be fed at
   ``--gpu-rate`` images/s (ViT-B PGD-7 training on one H100-class GPU: about 1,100).
4. With ``--train``, runs one whole trial of the preset on the tree (:func:`train_trial`): the reference augmentation
   at 224 px from the built cache, PGD-7 training, stage 1 then stage 2 (LoRA), on a Swin scaled down to run on a
   CPU (random weights: no pretrained file here) and ``--train-size`` training images; prints each epoch.

Numbers only, never asserted: they depend on the machine and on what else runs on it; run it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "search_spaces" / "paper" / "caltech256_lora.yaml"


def _write_one(job: tuple[str, int, int, int]) -> int:
    from PIL import Image

    path, width, height, seed = job
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 12, (height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=85)
    return os.path.getsize(path)


def write_tree(tree: Path, images: int, classes: int = 257, processes: int = 2) -> dict:
    """The synthetic Caltech-256-shaped tree under ``tree`` (``images/``, ``splits/``); returns its stats."""
    from multiprocessing import Pool

    done = tree / "splits" / "test.json"
    rng = np.random.default_rng(256)
    counts = np.full(classes, min(80, images // classes))  # every Caltech-256 class has at least 80 images
    extra = rng.multinomial(images - counts.sum(), rng.dirichlet(np.full(classes, 0.6)))
    counts += extra
    jobs, splits = [], {"train": {}, "val": {}, "test": {}}
    aspects = [(4, 3), (3, 4), (1, 1), (3, 2)]
    for label, n in enumerate(counts):
        folder = f"{label + 1:03d}.class{label}"
        n_test = round(0.2 * n)
        for i in range(n):
            longer = int(np.clip(rng.lognormal(np.log(350), 0.35), 100, 1000))
            a, b = aspects[rng.integers(len(aspects))]
            width, height = (longer, longer * b // a) if a >= b else (longer * a // b, longer)
            rel = f"{folder}/{label + 1:03d}_{i:04d}.jpg"
            split = "val" if i < 3 else "test" if i < 3 + n_test else "train"
            splits[split][rel] = label + 1
            jobs.append((str(tree / "images" / rel), width, height, label * 10_000 + i))
    if not done.is_file():
        for label in range(classes):
            (tree / "images" / f"{label + 1:03d}.class{label}").mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with Pool(processes) as pool:
            sizes = pool.map(_write_one, jobs, chunksize=64)
        (tree / "splits").mkdir(parents=True, exist_ok=True)
        for split, entries in splits.items():
            (tree / "splits" / f"{split}.json").write_text(json.dumps(entries))
        print(f"wrote {len(jobs)} JPEGs ({sum(sizes) / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f} s")
    return {"images": len(jobs), "classes": classes, **{s: len(e) for s, e in splits.items()},
            "jpeg_bytes": sum(os.path.getsize(j[0]) for j in jobs)}


def _memory(pid: int) -> dict[str, int]:
    """Bytes: the trial process's own RSS, and RSS and PSS summed over it and its children (the loader's workers).
    Forked workers share the trial's pages, which RSS counts once per process and PSS splits between them."""
    import psutil

    proc = psutil.Process(pid)
    total = {"rss_main": proc.memory_info().rss, "rss_tree": 0, "pss_tree": 0}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        total["rss_tree"] += info.rss
        total["pss_tree"] += info.pss
    return total


def trial(tree: Path, workers: int, batches: int, seed: int) -> dict:
    """One trial's data path, in this process: what the paper preset's trial does before and while it trains."""
    import torch
    import yaml

    from roli_sweep.config import DataConfig
    from roli_sweep.core.train import make_loader
    from roli_sweep.data import load_splits

    torch.set_num_threads(1)
    data = yaml.safe_load(PRESET.read_text())["base"]["data"]
    data.update(root=str(tree / "images"), split_dir=str(tree / "splits"), num_workers=workers)
    cfg = DataConfig.model_validate(data)
    before = _memory(os.getpid())
    started = time.perf_counter()
    splits = load_splits(cfg, seed)
    loaded = time.perf_counter()
    loader = make_loader(splits.train, 64, shuffle=True, seed=seed, device=torch.device("cpu"))
    batches_iter = iter(loader)
    first, _ = next(batches_iter)
    first_batch = time.perf_counter()
    count = 0
    for _ in range(batches):
        x, _ = next(batches_iter)
        count += len(x)
    rate = count / (time.perf_counter() - first_batch)
    after = _memory(os.getpid())
    return {"seed": seed, "workers": workers, "load_s": loaded - started, "first_batch_s": first_batch - started,
            "images_per_s": rate, "batch_shape": list(first.shape),
            **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
            "decoded_bytes": splits.train.images.nbytes}


def train_trial(tree: Path, train_size: int, workers: int) -> None:
    """One trial of the caltech256 LoRA preset on ``tree`` through :func:`roli_sweep.core.trial.run_trial`, as the
    preset says (data path, ``augment: reference`` at 224 px, PGD-7 at 8/255, optimisers, LoRA r 16 on qkv, RoLI)
    except: a Swin of the reference's shape cut to run on a CPU (embed 16, depths 1 + 1, images resized to 56 px
    inside the model, random weights), ``train_size`` training and 64 val / test images, one epoch per stage, no
    warm-up, batch 32, CPU."""
    import yaml

    from roli_sweep.config import parse_search_space
    from roli_sweep.core.trial import run_trial
    from roli_sweep.records import eps_fraction

    tree_yaml = yaml.safe_load(PRESET.read_text())
    base = tree_yaml["base"]
    base.update(device="cpu", precision="fp32")
    base["data"].update(root=str(tree / "images"), split_dir=str(tree / "splits"), num_workers=workers,
                        train_size=train_size, val_size=64, test_size=64)
    base["backbone"].update(weights=None, input_size=56, kwargs={**base["backbone"]["kwargs"], "img_size": 56,
                            "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 7})
    for stage in ("probe", "finetune"):
        base[stage].update(epochs=1, warmup_epochs=0, batch_size=32)
    base["eval"].update(batch_size=64)
    tree_yaml.update(name=PRESET.stem, scheduler={"grace_period": 1, "reduction_factor": 2, "max_t": 1})
    cfg = parse_search_space(tree_yaml, str(PRESET)).base
    print(f"trial of {PRESET.name} on {tree}: augment {cfg.data.augment}, {cfg.data.image_size} px, "
          f"PGD-{cfg.attack.steps} eps {eps_fraction(cfg.attack.eps)}, {cfg.finetune.method} "
          f"r {cfg.finetune.method_params['r']}, {cfg.finetune.head_init}, {train_size} training images", flush=True)
    started = time.perf_counter()

    def on_epoch(stage: str, metrics: dict) -> None:
        shown = {k: v for k, v in metrics.items() if k in ("epoch", "train_loss", "train_robust_acc", "val_clean_acc",
                                                          "val_robust_acc", "test_clean_acc", "test_robust_acc")}
        print(f"  {time.perf_counter() - started:6.1f} s  {stage}: "
              + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()), flush=True)

    result = run_trial(cfg, on_epoch=on_epoch)
    print(f"trial done in {time.perf_counter() - started:.1f} s: test clean {result.metrics['test_clean_acc']:.3f}, "
          f"test robust {result.metrics['test_robust_acc']:.3f} (random weights, synthetic images: chance is "
          f"{1 / 257:.4f})", flush=True)


def run_trials(tree: Path, cache: Path, count: int, workers: int, batches: int) -> list[dict]:
    """``count`` trial processes started together; their reports."""
    env = {**os.environ, "ROLI_SWEEP_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--trial", str(tree), "--workers", str(workers),
                               "--batches", str(batches), "--seed", str(i)], env=env, stdout=subprocess.PIPE,
                              text=True) for i in range(count)]
    reports = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"trial process failed with status {proc.returncode}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def _disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _line(label: str, r: dict) -> str:
    gib = 2**30
    return (f"{label:<34} first batch {r['first_batch_s']:7.1f} s (load {r['load_s']:6.1f} s)  "
            f"loader {r['images_per_s']:6.0f} img/s with {r['workers']} worker(s)  "
            f"trial RSS {r['rss_main_before'] / gib:.2f} -> {r['rss_main_after'] / gib:.2f} GiB, with workers "
            f"RSS {r['rss_tree_before'] / gib:.2f} -> {r['rss_tree_after'] / gib:.2f} / "
            f"PSS {r['pss_tree_before'] / gib:.2f} -> {r['pss_tree_after'] / gib:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=Path("/tmp/caltech256_synthetic"))
    parser.add_argument("--images", type=int, default=30_607)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per trial")
    parser.add_argument("--batches", type=int, default=30, help="batches of 64 timed after the first")
    parser.add_argument("--gpu-rate", type=float, default=1100.0, help="images/s one GPU trains at")
    parser.add_argument("--train", action="store_true", help="only: one whole trial of the preset on the tree "
                                                                 "(writes the tree first if needed)")
    parser.add_argument("--train-size", type=int, default=256, help="training images of the --train trial")
    parser.add_argument("--trial", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        print(json.dumps(trial(args.trial, args.workers, args.batches, args.seed)))
        return

    print(f"CPU: {_cpu_model()}, {os.cpu_count()} cores")
    stats = write_tree(args.tree, args.images)
    cache = args.tree.parent / f"{args.tree.name}_cache"
    if args.train:
        os.environ.setdefault("ROLI_SWEEP_CACHE", str(cache))
        train_trial(args.tree, args.train_size, args.workers)
        return
    print(f"tree: {stats['images']} JPEGs, {stats['classes']} classes, train {stats['train']} / val {stats['val']} / "
          f"test {stats['test']}, {stats['jpeg_bytes'] / 2**30:.2f} GiB of JPEG")
    shutil.rmtree(cache, ignore_errors=True)
    (cold,) = run_trials(args.tree, cache, 1, args.workers, args.batches)
    print(_line("1 trial, empty cache (decodes):", cold))
    (warm,) = run_trials(args.tree, cache, 1, args.workers, args.batches)
    print(_line("1 trial, built cache:", warm))
    pair = run_trials(args.tree, cache, 2, args.workers, args.batches)
    for r in pair:
        print(_line(f"2 trials, built cache, seed {r['seed']}:", r))
    entry_disk = _disk(cache)
    shutil.rmtree(cache)
    cold_pair = run_trials(args.tree, cache, 2, args.workers, args.batches)
    for r in cold_pair:
        print(_line(f"2 trials, empty cache, seed {r['seed']}:", r))
    decoded = warm["decoded_bytes"]
    print(f"decoded dataset (all splits, shorter side 256): {decoded / 2**30:.2f} GiB; cache on disk "
          f"{entry_disk / 2**30:.2f} GiB (one entry for the node)")
    for label, runs in (("built", pair), ("empty", cold_pair)):
        for r in runs:
            growth = {k: r[f"{k}_after"] - r[f"{k}_before"] for k in ("rss_main", "rss_tree", "pss_tree")}
            print(f"2 trials on the {label} cache, seed {r['seed']}: time to first batch {r['first_batch_s']:.1f} s; "
                  f"growth as a share of the decoded dataset: trial RSS {100 * growth['rss_main'] / decoded:.1f} %, "
                  f"with its workers RSS {100 * growth['rss_tree'] / decoded:.1f} % "
                  f"(PSS {100 * growth['pss_tree'] / decoded:.1f} %)")
    per_core = warm["images_per_s"] / max(1, args.workers)
    print(f"loader: {per_core:.0f} img/s per worker core (decode from cache + RandomCrop + flip + collate, 224 px); "
          f"cores per GPU at {args.gpu_rate:.0f} img/s: {args.gpu_rate / per_core:.1f}")


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
