"""Issue 16: a mutation test of the input parser (hypothesis).

Starting from every shipped search space and paper preset, single generated mutations — a value's type
swapped, a key deleted or given twice, a number pushed out of range, a string with markup or ``../``, a list
where a mapping goes — each end in exit 2 or in a valid space (``--check``), never in a traceback, and never
create ``mlflow.db`` or ``ray_results``. It runs in-process on the validation path (``--check`` starts neither
Ray nor MLflow). The presets point at the users' weights and data, so their copies here point at the tiny
test backbone and small files in each dataset's own format, to let mutations reach every check.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roli_sweep.cli import main
from tests.preset_data import CIFAR, trust_test_cifar, write_cifar, write_image_list

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "search_spaces").glob("*.yaml")) + sorted((ROOT / "search_spaces" / "paper").glob("*.yaml"))
KINDS = ("type_swapped", "key_deleted", "key_duplicated", "number_out_of_range", "hostile_string", "list_for_mapping")
OTHER_TYPES = [0, -1, 1.5, "text", True, None, [1, 2], {"k": 1}]
OUT_OF_RANGE = [-1, 0, -1e-9, 1e-30, 1e30, 2**31, 2**64, float("nan"), float("inf"), float("-inf")]
HOSTILE = ["[/]", "[bold]x[/bold]", "../../escape", "..", "a b", "naïve", "x'\"y", "", "\\", "%s{0}", "\x1b[31m"]
SEEN: Counter = Counter()
"""Cases run, by mutation kind and by outcome (for the closing note)."""


@pytest.fixture(scope="module")
def spaces(tmp_path_factory, tiny_weights) -> dict[str, dict]:
    """{source file name: its tree}, presets pointed at the tiny backbone, small local data and one CPU."""
    trust_test_cifar()
    data_root = tmp_path_factory.mktemp("mutation_data")
    trees = {}
    for path in SOURCES:
        tree = yaml.safe_load(path.read_text())
        if path.parent.name == "paper":
            tree["base"]["backbone"]["weights"] = str(tiny_weights)
            tree["resources"] = {"cpu": 1, "gpu": 0}
            data = tree["base"]["data"]
            if data["name"] in CIFAR:
                data["root"] = str(write_cifar(data_root / data["name"], data["name"]))
            else:
                images, splits = write_image_list(data_root / data["name"], data["name"])
                data.update(root=str(images), split_dir=str(splits))
        trees[f"{path.parent.name}/{path.name}"] = tree
    return trees


def _paths(node, prefix=()) -> list[tuple]:
    """Every key path into ``node`` (mapping keys and list indices), parents before children."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found.append(prefix + (key,))
        found += _paths(value, prefix + (key,))
    return found


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _mutated(tree: dict, kind: str, data: st.DataObject) -> str:
    """The YAML text of ``tree`` with one mutation of ``kind`` drawn from ``data``."""
    tree = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy
    paths = _paths(tree)
    if kind == "key_duplicated":
        lines = yaml.safe_dump(tree, sort_keys=False).splitlines()
        keyed = [i for i, line in enumerate(lines) if ":" in line and not line.lstrip().startswith("- ")]
        at = data.draw(st.sampled_from(keyed))
        return "\n".join(lines[:at + 1] + [lines[at]] + lines[at + 1:]) + "\n"
    if kind == "number_out_of_range":
        paths = [p for p in paths if isinstance(_get(tree, p), (int, float)) and not isinstance(_get(tree, p), bool)]
        new = data.draw(st.sampled_from(OUT_OF_RANGE))
    elif kind == "hostile_string":
        paths = [p for p in paths if isinstance(_get(tree, p), str)] + [("name",)]
        new = data.draw(st.sampled_from(HOSTILE))
    elif kind == "list_for_mapping":
        paths = [p for p in paths if isinstance(_get(tree, p), dict)]
    path = data.draw(st.sampled_from(paths))
    parent, leaf = _get(tree, path[:-1]), path[-1]
    if kind == "type_swapped":
        new = data.draw(st.sampled_from([v for v in OTHER_TYPES if type(v) is not type(parent[leaf])]))
    elif kind == "list_for_mapping":
        new = list(parent[leaf].values())
    if kind == "key_deleted":
        del parent[leaf]
    else:
        parent[leaf] = new
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


def _check_mutations(spaces: dict[str, dict], examples: int, derandomize: bool) -> None:
    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(source=st.sampled_from(sorted(spaces)), kind=st.sampled_from(KINDS), data=st.data())
    def one(source: str, kind: str, data: st.DataObject) -> None:
        text = _mutated(spaces[source], kind, data)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "space.yaml").write_text(text)
            here = os.getcwd()
            out = io.StringIO()
            try:
                os.chdir(folder)
                with contextlib.redirect_stdout(out):
                    status = main(["--space", "space.yaml", "--check"])  # default store and storage, in folder
            finally:
                os.chdir(here)
            assert status in (0, 2), out.getvalue()
            assert "Traceback" not in out.getvalue()
            assert sorted(p.name for p in Path(folder).iterdir()) == ["space.yaml"], "nothing may be created"
        SEEN[kind] += 1
        SEEN["valid" if status == 0 else "refused"] += 1

    one()


def test_single_mutations_of_every_shipped_space_end_in_exit_2_or_a_valid_space(spaces):
    SEEN.clear()
    _check_mutations(spaces, examples=300, derandomize=True)
    print(f"mutation cases: {dict(SEEN)}")
    assert sum(SEEN[k] for k in KINDS) >= 300 and SEEN["refused"] > 0


@pytest.mark.extended
def test_many_more_random_mutations(spaces):
    SEEN.clear()
    _check_mutations(spaces, examples=3000, derandomize=False)
    print(f"mutation cases: {dict(SEEN)}")
