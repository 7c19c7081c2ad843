"""A 4-trial sweep of the CIFAR-10 LoRA paper preset on one GPU, two trials sharing it at 0.5 each, with its
final evaluation on the GPU.

    python benchmarks/gpu_sweep.py [--out /tmp/gpu_sweep] [--cpu-smoke]

The preset as shipped (Swin-B, LoRA, bf16 autocast for training, PGD-7 at 8/255, arms RoLI / RanLI) with what a
machine without the users' files needs: random backbone weights (no download), synthetic CIFAR-10 files in
torchvision's format (``tests/preset_data.py``: 100 train and 20 test images, 32 px, resized to 224 inside the
model), epochs cut to 1 probe + 2 finetuning, 4 trials (2 per arm) at ``resources: {cpu: 4, gpu: 0.5}``, each
arm's best confirmed on 1 seed, and the final evaluation (clean, PGD-20 x 2 restarts, standard AutoAttack,
the masking checks) on 16 test images. ``--cpu-smoke`` runs the same on the CPU with the Swin scaled down
(the tests' size), to check the script itself. Prints the wall time of the whole command and what each trial
reported; numbers only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "search_spaces" / "paper" / "cifar10_lora.yaml"
SMOKE_SWIN = {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 7, "img_size": 56}


def space(out: Path, smoke: bool) -> Path:
    """The preset, cut as the module doc says, written to ``out/cifar10_lora_gpu.yaml``."""
    sys.path.insert(0, str(REPO))
    from tests.preset_data import write_cifar

    tree = yaml.safe_load(PRESET.read_text())
    base = tree["base"]
    tree.update(num_samples=4, max_concurrent=2, resources={"cpu": 1, "gpu": 0} if smoke else {"cpu": 4, "gpu": 0.5},
                confirm={**tree.get("confirm", {}), "seeds": 1})
    base["backbone"]["weights"] = None
    if smoke:
        base["device"] = "cpu"
        base["backbone"].update(input_size=56, kwargs={**SMOKE_SWIN, **base["backbone"]["kwargs"]})
    base["data"].update(root=str(write_cifar(out / "data", "cifar10")), val_fraction=0.5)
    base["eval"]["final"] = {"n_examples": 16, "pgd_restarts": 2, "masking": {"n_examples": 16}}
    base["probe"].update(epochs=1, warmup_epochs=0.5)
    base["finetune"].update(epochs=2, warmup_epochs=0.5)
    tree["scheduler"] = {"grace_period": 1, "reduction_factor": 2, "max_t": 2}
    path = out / "cifar10_lora_gpu.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu_sweep"))
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    os.chdir(args.out)
    import ray
    from mlflow.tracking import MlflowClient

    from roli_sweep.cli import main as roli_sweep

    path = space(args.out, args.cpu_smoke)
    # every worker trusts the synthetic CIFAR files' checksums, as in the tests
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "tests.preset_data.trust_test_cifar"})
    from tests.preset_data import trust_test_cifar

    trust_test_cifar()
    uri = f"sqlite:///{args.out}/mlflow.db"
    started = time.perf_counter()
    status = roli_sweep(["--space", str(path), "--name", "gpu", "--tracking-uri", uri])
    seconds = time.perf_counter() - started
    ray.shutdown()
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="tags.sweep = 'gpu'")
    print(f"sweep exit status {status} in {seconds:.0f} s; runs:")
    for run in sorted(runs, key=lambda r: r.info.start_time):
        m, t = run.data.metrics, run.data.tags
        print(f"  {t.get('sweep_role')} {t.get('arm', '')} {t.get('status')}: "
              f"{', '.join(f'{k} {m[k]:.3f}' for k in ('test_clean_acc', 'test_robust_acc', 'final_autoattack_acc', 'train_images_per_s') if k in m)}"
              f"{'; final_eval ' + t['final_eval'] if 'final_eval' in t else ''}")


if __name__ == "__main__":
    main()
