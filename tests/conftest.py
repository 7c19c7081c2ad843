"""Shared fixtures: a tiny ViT with local weights, a tiny trial config, a real Ray runtime."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

torch.set_num_threads(1)
# derived files (the decoded-image cache, Fashion-MNIST's unpacked IDX files) go to a folder of this test session,
# set before any Ray runtime starts so that its trials inherit it
os.environ.setdefault("ROLI_SWEEP_CACHE", tempfile.mkdtemp(prefix="roli_sweep_cache_"))

TINY_KWARGS = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny ViT's weights as safetensors (a 'source backbone' with a 5-class head)."""
    from safetensors.torch import save_file

    from roli_sweep.models.backbone import timm

    torch.manual_seed(123)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **TINY_KWARGS)
    path = tmp_path_factory.mktemp("weights") / "tiny_vit.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture
def trial_dict(tiny_weights) -> dict:
    """A complete trial config (as a dict) that runs in about a second on one core."""
    return {
        "seed": 0,
        "device": "cpu",
        "data": {"name": "digits", "train_size": 64, "val_size": 32, "test_size": 32},
        "backbone": {"name": "vit_tiny_patch16_224", "kwargs": dict(TINY_KWARGS), "weights": str(tiny_weights),
                     "mean": [0.5], "std": [0.5]},
        "attack": {"eps": "8/255", "steps": 2, "step_size": "4/255"},
        "eval": {"val_steps": 2, "test_steps": 3, "batch_size": 64,
                 "final": {"n_examples": 16, "pgd_restarts": 2,
                           "masking": {"n_examples": 16, "more_steps": 10, "square_queries": 50}}},
        "probe": {"epochs": 1, "lr": 0.05, "optimizer": "sgd", "batch_size": 32},
        "finetune": {"method": "lora", "method_params": {"r": 4, "alpha": 4}, "head_init": "roli",
                     "epochs": 2, "lr": 1e-3, "optimizer": "adamw", "batch_size": 32},
    }


@pytest.fixture
def space_dict(trial_dict) -> dict:
    """A complete small search space (as a dict) around ``trial_dict``."""
    return {
        "name": "tiny",
        "metric": {"name": "val_robust_acc", "goal": "maximize"},
        "num_samples": 4,
        "max_concurrent": 2,
        "seed": 0,
        "resources": {"cpu": 1, "gpu": 0},
        "scheduler": {"grace_period": 1, "reduction_factor": 2, "max_t": 2},
        "confirm": {"seeds": 0},  # tests of the confirmation set their own
        "base": trial_dict,
        "parameters": {
            "finetune.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
            "finetune.method_params.r": {"values": [2, 4]},
            "finetune.head_init": {"values": ["roli", "random"]},
        },
    }


def write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def ray_runtime():
    """A real local Ray runtime with 2 CPUs for the whole session."""
    import ray

    # workers import tests.preset_data (for the hook below) from the repository root
    root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    # every worker trusts the small CIFAR files the preset tests write (tests/preset_data.py)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "tests.preset_data.trust_test_cifar"})
    yield ray
    ray.shutdown()
