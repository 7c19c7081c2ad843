"""The paper presets: they state the RoLI reference's settings, and each runs a whole sweep at small scale.

The whole run uses a preset as shipped with a few changes: the Swin-B is scaled down (same timm
family and code path, 2 stages of 1 block, width 16, 56 px, random weights: the presets' checkpoints
are the users' files), the data are small files in the preset's own on-disk format at the dataset's
native resolution (CIFAR 32 px, resized inside the model as the preset does), and epochs, sizes and
the final evaluation's attacks are cut. Then, as a user would: the sweep (stage-1 probe, 2 finetune
epochs, restore best, test, save the trained state; the final evaluation rebuilds it with
``load_trained``), ``export``, and ``train --config`` on the exported file.

By default three presets run, two on CIFAR-10 (torchvision's pickled batches) and one on CUB-200 (the
JSON split files with image folders; every preset is Swin-B). ``-m paper_presets`` runs the other 27
(``.ci/run`` does), the adapter and prompt methods and CIFAR-100's own batch layout among them.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from roli_sweep.cli import main
from roli_sweep.config import parse_search_space
from tests.conftest import write_yaml
from tests.preset_data import CIFAR, trust_test_cifar, write_cifar, write_image_list

PAPER = Path(__file__).resolve().parent.parent / "search_spaces" / "paper"
PRESETS = sorted(PAPER.glob("*.yaml"))
EPOCHS = {"cifar10": 20, "cifar100": 20, "caltech256": 40, "cub200": 60, "stanford_dogs": 40}
METHODS = ("linear", "full", "lora", "adapter", "prompt", "bias")
LR_SCALE = 64 / 256
"""The reference scales its BASE_LR by batch size / 256 (its train.py); the presets state the scaled lr."""
# Reference stage-2 (BASE_LR, WEIGHT_DECAY) per (method, dataset) and head init, from the RoLI code's
# configs/ (github.com/DongXzz/RoLI, commit 5f34b8f; linear and VPT have RanLI files only).
REF = {
 ("adapter", "caltech256"): {"ranli": (0.005, 0.0001), "roli": (0.0005, 0.0)},
 ("adapter", "cifar10"): {"ranli": (0.05, 0.01), "roli": (0.05, 0.01)},
 ("adapter", "cifar100"): {"ranli": (0.005, 0.0001), "roli": (0.05, 0.0001)},
 ("adapter", "cub200"): {"ranli": (0.05, 0.0001), "roli": (0.05, 0.001)},
 ("adapter", "stanford_dogs"): {"ranli": (0.005, 0.0001), "roli": (0.0001, 0.0001)},
 ("bias", "caltech256"): {"ranli": (0.001, 0.01), "roli": (0.00001, 0.0)},
 ("bias", "cifar10"): {"ranli": (0.005, 0.001), "roli": (0.005, 0.001)},
 ("bias", "cifar100"): {"ranli": (0.005, 0.001), "roli": (0.005, 0.01)},
 ("bias", "cub200"): {"ranli": (0.005, 0.001), "roli": (0.0005, 0.0001)},
 ("bias", "stanford_dogs"): {"ranli": (0.001, 0.0001), "roli": (0.00005, 0.0001)},
 ("full", "caltech256"): {"ranli": (0.0005, 0.0001), "roli": (0.0001, 0.0001)},
 ("full", "cifar10"): {"ranli": (0.0005, 0.01), "roli": (0.0001, 0.01)},
 ("full", "cifar100"): {"ranli": (0.0005, 0.001), "roli": (0.0001, 0.001)},
 ("full", "cub200"): {"ranli": (0.0005, 0.001), "roli": (0.0001, 0.01)},
 ("full", "stanford_dogs"): {"ranli": (0.0005, 0.01), "roli": (0.00005, 0.001)},
 ("linear", "caltech256"): {"ranli": (0.5, 0.01)},
 ("linear", "cifar10"): {"ranli": (0.05, 0.01)},
 ("linear", "cifar100"): {"ranli": (0.1, 0.001)},
 ("linear", "cub200"): {"ranli": (1.0, 0.001)},
 ("linear", "stanford_dogs"): {"ranli": (1.0, 0.01)},
 ("lora", "caltech256"): {"ranli": (0.001, 0.0001), "roli": (0.0001, 0.0001)},
 ("lora", "cifar10"): {"ranli": (0.01, 0.0001), "roli": (0.001, 0.0001)},
 ("lora", "cifar100"): {"ranli": (0.05, 0.0), "roli": (0.001, 0.0001)},
 ("lora", "cub200"): {"ranli": (0.005, 0.0001), "roli": (0.005, 0.0001)},
 ("lora", "stanford_dogs"): {"ranli": (0.005, 0.0001), "roli": (0.001, 0.01)},
 ("prompt", "caltech256"): {"ranli": (0.05, 0.001)},
 ("prompt", "cifar10"): {"ranli": (0.5, 0.001)},
 ("prompt", "cifar100"): {"ranli": (0.5, 0.01)},
 ("prompt", "cub200"): {"ranli": (0.05, 0.001)},
 ("prompt", "stanford_dogs"): {"ranli": (0.05, 0.0001)},
}
SCALED_SWIN = {"img_size": 56, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 7}
SCALED_SIDE = 56
DEFAULT_RUN = {"cifar10_linear", "cub200_full", "cifar10_lora"}
"""Three presets in the default test run (it stays under 10 minutes on 2 cores), both data formats among them;
the other 27, bias, adapter and prompt among them, run under ``-m paper_presets``."""


def _load(path: Path) -> dict:
    tree = yaml.safe_load(path.read_text())
    tree.setdefault("name", path.stem)
    return tree


def test_a_preset_for_every_dataset_and_method():
    assert {p.stem for p in PRESETS} == {f"{d}_{m}" for d in EPOCHS for m in METHODS}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_states_the_reference_setting(path):
    tree = _load(path)
    tree["base"]["backbone"]["weights"] = None  # the users' checkpoint file
    space = parse_search_space(tree, str(path))
    cfg = space.base
    dataset, method = cfg.data.name, cfg.finetune.method
    assert path.stem == f"{dataset}_{method}"
    assert cfg.attack.eps == pytest.approx(8 / 255) and cfg.attack.steps == 7
    assert cfg.attack.step_size == pytest.approx(2 / 255)
    assert cfg.eval.eps == pytest.approx(8 / 255) and (cfg.eval.val_steps, cfg.eval.test_steps) == (10, 20)
    assert cfg.finetune.batch_size == 64 and cfg.finetune.epochs == EPOCHS[dataset]
    assert cfg.finetune.warmup_epochs == cfg.probe.warmup_epochs == 10
    assert space.scheduler.grace_period > cfg.finetune.warmup_epochs
    assert space.resources.gpu > 0
    # the reference's model: Swin-B everywhere (VPT too), drop-path 0.5, its head init and module modes
    assert cfg.backbone.name == "swin_base_patch4_window7_224"
    assert cfg.backbone.kwargs == {"drop_path_rate": 0.5}
    assert cfg.finetune.random_head_init == "reference" and cfg.finetune.backbone_mode == "auto"
    # the reference's train-time crop and flip where the images are streamed (CIFAR stays in memory, unaugmented)
    assert cfg.data.augment == ("reference" if dataset in ("caltech256", "cub200", "stanford_dogs") else "none")
    # the reference's optimisers: lr = BASE_LR x 64 / 256; SGD probe; AdamW with weight decay 0.01 (hard-coded)
    # and no decay on names containing 'bias'; SGD without weight decay where its config says 0
    probe_lr, probe_wd = REF[("linear", dataset)]["ranli"]
    assert (cfg.probe.lr, cfg.probe.weight_decay, cfg.probe.optimizer) == (probe_lr * LR_SCALE, probe_wd, "sgd")
    assert cfg.probe.no_weight_decay == cfg.finetune.no_weight_decay == ["bias"]
    refs = REF[(method, dataset)]
    # RoLI's and RanLI's reference lrs each inside its own arm's range, with room: out of the outer tenths where a
    # range-edge warning fires (an arm the reference has no file for is checked against RanLI's reference)
    if method == "linear":
        assert space.arms is None and space.parameters["finetune.lr"].distribution == "log_uniform_values"
        ranges = {"ranli": space.parameters["finetune.lr"]}
    else:
        assert space.arms == "finetune.head_init" and space.parameters["finetune.lr"].given == "finetune.head_init"
        ranges = {"roli": space.parameters["finetune.lr"].cases["roli"],
                  "ranli": space.parameters["finetune.lr"].cases["random"]}
    for arm, lr in ranges.items():
        ref_lr = refs.get(arm, refs["ranli"])[0]
        assert lr.distribution == "log_uniform_values"
        position = math.log(ref_lr * LR_SCALE / lr.min) / math.log(lr.max / lr.min)
        assert 0.1 < position < 0.9, (arm, ref_lr, position)
    base_ref = refs["ranli"] if method == "linear" else refs.get("roli", refs["ranli"])
    assert cfg.finetune.lr == pytest.approx(base_ref[0] * LR_SCALE)
    if method == "linear":
        assert (cfg.finetune.optimizer, cfg.finetune.weight_decay) == ("sgd", base_ref[1])
    elif base_ref[1] == 0:
        assert (cfg.finetune.optimizer, cfg.finetune.weight_decay) == ("sgd", 0.0)
    else:
        assert (cfg.finetune.optimizer, cfg.finetune.weight_decay) == ("adamw", 0.01)
    if any(wd == 0 for _, wd in refs.values()) and method != "linear":
        assert "falls back to SGD whenever weight decay is 0" in path.read_text()


def _scaled(path: Path, data_root: Path) -> dict:
    """The preset as shipped, scaled down: Swin architecture, data files, epochs, sizes and attack budgets."""
    tree = _load(path)
    base = tree["base"]
    tree.update(num_samples=2 if tree.get("arms") else 1, max_concurrent=1, resources={"cpu": 1, "gpu": 0},
                scheduler={"grace_period": 1, "reduction_factor": 2, "max_t": 2},
                confirm={**tree.get("confirm", {}), "seeds": 1})  # one trial per arm, each confirmed on one seed
    base["device"] = "cpu"
    base["backbone"].update(weights=None, input_size=SCALED_SIDE,
                            kwargs={**SCALED_SWIN, **base["backbone"]["kwargs"]})
    data = base["data"]
    if data["name"] in CIFAR:
        data.update(root=str(write_cifar(data_root, data["name"])), val_fraction=0.5)
    else:
        images, splits = write_image_list(data_root, data["name"])
        data.update(root=str(images), split_dir=str(splits), image_size=SCALED_SIDE)
    base["eval"].update(batch_size=128, final={
        "n_examples": 4, "pgd_restarts": 1,
        "autoattack": {"apgd_steps": 5, "fab_steps": 5, "target_classes": 2, "square_queries": 20},
        "masking": {"n_examples": 4, "more_steps": 20, "square_queries": 20}})
    base["probe"].update(epochs=1, warmup_epochs=0.5, batch_size=32)
    base["finetune"].update(epochs=2, warmup_epochs=0.5, batch_size=32)
    if base["finetune"]["method"] == "prompt":
        base["finetune"]["method_params"]["length"] = 2
    return tree


def _whole_run(path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    trust_test_cifar_here(monkeypatch)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = write_yaml(tmp_path / f"{path.stem}.yaml", _scaled(path, tmp_path / "data"))
    assert main(["--space", str(space), "--name", "run", "--tracking-uri", uri]) == 0

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    children = client.search_runs(experiments, filter_string="tags.sweep = 'run' and tags.sweep_role = 'trial'")
    armed = "arms" in yaml.safe_load(space.read_text())
    assert len(children) == (2 if armed else 1)
    for child in children:  # each arm's one trial: completed and given the final evaluation
        assert child.data.tags["status"] == "completed", child.data.tags
        assert {"test_clean_acc", "test_robust_acc", "final_pgd_acc", "final_autoattack_acc"} <= set(child.data.metrics)
        assert child.data.tags["final_eval"] == "done"
        assert child.data.params["final_eval.autoattack.version"] == "custom"  # cut for the test, and labelled so
    confirmed = client.search_runs(experiments, filter_string="tags.sweep = 'run' and tags.sweep_role = 'confirmation'")
    assert sorted(c.data.params["seed"] for c in confirmed) == ["1"] * len(children)
    assert all(c.data.tags["status"] == "completed" for c in confirmed)

    out = tmp_path / "exported"
    assert main(["export", "--name", "run", "--top-k", "1", "--out", str(out), "--tracking-uri", uri]) == 0
    files = sorted(out.glob("*.yaml"))
    assert len(files) == len(children)  # the best of each arm
    exported = files[0]
    run_id = exported.read_text().split("MLflow run ", 1)[1].split()[0]
    child = client.get_run(run_id)
    assert main(["train", "--config", str(exported), "--tracking-uri", uri, "--experiment", "rerun"]) == 0
    (rerun,) = client.search_runs([client.get_experiment_by_name("rerun").experiment_id])
    assert rerun.data.tags["status"] == "completed" and "final_autoattack_acc" in rerun.data.metrics
    # the same trial config, seed and data: the rerun repeats the sweep's trial, epoch by epoch

    def losses(run) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]

    assert len(losses(child)) == 2 and losses(rerun) == pytest.approx(losses(child), rel=1e-5)


def trust_test_cifar_here(monkeypatch) -> None:
    """:func:`trust_test_cifar` in this process, undone after the test."""
    from roli_sweep._torchvision_compat import import_torchvision

    datasets = import_torchvision().datasets
    for cls in (datasets.CIFAR10, datasets.CIFAR100):
        for attr in ("train_list", "test_list", "meta"):
            monkeypatch.setattr(cls, attr, getattr(cls, attr))
    trust_test_cifar()


@pytest.mark.parametrize("path", [p for p in PRESETS if p.stem in DEFAULT_RUN], ids=lambda p: p.stem)
def test_preset_whole_run(path, tmp_path, monkeypatch, ray_runtime):
    _whole_run(path, tmp_path, monkeypatch)


@pytest.mark.paper_presets
@pytest.mark.parametrize("path", [p for p in PRESETS if p.stem not in DEFAULT_RUN], ids=lambda p: p.stem)
def test_other_preset_whole_run(path, tmp_path, monkeypatch, ray_runtime):
    _whole_run(path, tmp_path, monkeypatch)

