"""What a widened space may change of the sweep it continues (no Ray: the end-to-end run is in test_sweep)."""
from __future__ import annotations

import copy

import pytest

from roli_sweep.config import ConfigError, parse_search_space
from roli_sweep.widening import load_sweep_space, save_sweep_space, widened_parameters


def _pair(space_dict, change):
    new = copy.deepcopy(space_dict)
    change(new)
    return parse_search_space(space_dict, "old"), parse_search_space(new, "new")


def test_the_same_space_or_one_that_only_runs_more_widens_nothing(space_dict):
    old, new = _pair(space_dict, lambda t: t.update(num_samples=20, max_concurrent=1))
    assert widened_parameters(old, new) == []


def test_wider_bounds_and_added_values_are_named(space_dict):
    def widen(tree):
        tree["parameters"]["finetune.lr"]["max"] = 1e-1
        tree["parameters"]["finetune.method_params.r"]["values"] = [2, 4, 8]

    assert widened_parameters(*_pair(space_dict, widen)) == ["finetune.lr", "finetune.method_params.r"]


@pytest.mark.parametrize("change, key", [
    (lambda t: t["parameters"]["finetune.lr"].update(max=1e-3), "parameters.finetune.lr.max"),
    (lambda t: t["parameters"]["finetune.lr"].update(min=1e-3), "parameters.finetune.lr.min"),
    (lambda t: t["parameters"]["finetune.lr"].update(distribution="uniform"), "parameters.finetune.lr"),
    (lambda t: t["parameters"]["finetune.method_params.r"].update(values=[4]), "parameters.finetune.method_params.r"),
    (lambda t: t["parameters"].pop("finetune.head_init"), "parameters.finetune.head_init"),
    (lambda t: t["base"]["finetune"].update(epochs=3), "base.finetune.epochs"),
    (lambda t: t.update(seed=1), "seed"),
    (lambda t: t["scheduler"].update(grace_period=2), "scheduler.grace_period"),
])
def test_anything_else_is_refused_naming_the_key(space_dict, change, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        widened_parameters(*_pair(space_dict, change))


def test_a_sweep_folder_keeps_its_space(space_dict, tmp_path):
    space = parse_search_space(space_dict, "space")
    save_sweep_space(space, tmp_path / "sweep")
    assert load_sweep_space(tmp_path / "sweep") == space
    with pytest.raises(FileNotFoundError, match="not the folder of a roli_sweep sweep"):
        load_sweep_space(tmp_path / "elsewhere")
