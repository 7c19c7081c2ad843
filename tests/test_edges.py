"""Range-edge warnings on made-up trial results (the sweep test checks the parent-run tag end to end)."""
from __future__ import annotations

from roli_sweep.config import ParameterSpec
from roli_sweep.edges import edge_warnings, grid_end_warning

LR = {"finetune.lr": ParameterSpec(distribution="log_uniform_values", min=1e-4, max=1e-2)}


def _scored(lrs, accs, **extra):
    return [({"finetune.lr": lr, **{k: v[i] for k, v in extra.items()}}, acc) for i, (lr, acc) in enumerate(zip(lrs, accs))]


def test_an_optimum_past_the_upper_bound_warns_naming_the_bound_and_a_new_one():
    # accuracy keeps rising with lr up to the fence
    scored = _scored([1e-4, 3e-4, 1e-3, 3e-3, 8.5e-3, 9e-3, 9.5e-3], [0.1, 0.15, 0.2, 0.3, 0.38, 0.4, 0.41])
    (warning,) = edge_warnings(LR, scored)
    assert warning.parameter == "finetune.lr" and warning.bound == "max"
    assert "range [0.0001, 0.01] (log)" in warning.message and "move max to 0.1" in warning.message


def test_a_bracketed_optimum_does_not_warn():
    scored = _scored([1e-4, 3e-4, 8e-4, 1e-3, 1.3e-3, 3e-3, 9.5e-3], [0.1, 0.3, 0.4, 0.42, 0.41, 0.3, 0.1])
    assert edge_warnings(LR, scored) == []


def test_the_lower_bound_and_linear_and_ordered_categorical_ranges():
    space = {**LR, "attack.steps": ParameterSpec(distribution="int_uniform", min=2, max=12),
             "finetune.method_params.r": ParameterSpec(values=[4, 8, 16])}
    scored = _scored([1.1e-4, 1.2e-4, 1.05e-4, 5e-3], [0.5, 0.49, 0.48, 0.1],
                     **{"attack.steps": [12, 12, 11, 3], "finetune.method_params.r": [16, 16, 16, 4]})
    found = {w.parameter: w for w in edge_warnings(space, scored)}
    assert found["finetune.lr"].bound == "min" and "move min to 1e-05" in found["finetune.lr"].message
    assert found["attack.steps"].bound == "max" and "move max to 22" in found["attack.steps"].message
    assert found["finetune.method_params.r"].bound == "max" and "largest value 16" in found["finetune.method_params.r"].message


def test_too_few_completed_trials_say_nothing():
    assert edge_warnings(LR, _scored([9.9e-3, 9.8e-3], [0.5, 0.4])) == []


def test_a_grid_search_won_at_an_end_of_its_grid_warns_with_one_more_step():
    lrs = [1e-3, 3e-3, 1e-2]
    high = grid_end_warning("finetune.lr", lrs, 1e-2, "a-digits-lora-roli")
    assert high.bound == "max" and "a-digits-lora-roli: finetune.lr 0.01 won, the largest of its grid" in high.message
    assert high.message.endswith("add 0.0333")
    assert grid_end_warning("finetune.lr", lrs, 1e-3, "x").bound == "min"
    assert grid_end_warning("finetune.lr", lrs, 3e-3, "x") is None
    assert grid_end_warning("finetune.lr", [1e-3, 1e-2], 1e-2, "x") is None  # two values: always an end

