"""Reading the YAML files a user gives (search spaces, trial, study and pretraining configs).

PyYAML's ``safe_load`` keeps the last of two equal keys silently, reads a file of any size and expands
aliases without limit. Here a file is read only up to :data:`MAX_BYTES`; a mapping that gives one key
twice is refused, naming the key and both lines; and a document whose aliases expand to more than
:data:`MAX_VALUES` values is refused. Merge keys (``<<: *base``) keep their documented meaning: a key
given next to a merge overrides the merged one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20
"""Largest YAML file read (1 MiB): a search space is a few kilobytes."""

MAX_VALUES = 100_000
"""Most values (mappings, lists and scalars, aliases counted at every use) one document may expand to."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlInputError(ValueError):
    """The file cannot be read as one of the tool's YAML inputs; the message says why, naming lines."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping giving one key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            line = key_node.start_mark.line + 1
            first = seen.setdefault((key_node.tag, key_node.value), line)
            if first != line:
                raise YamlInputError(f"key {key_node.value!r} is given twice, on line {first} and on line {line}")
        return super().construct_mapping(node, deep=deep)


def _count_values(tree: Any) -> None:
    """Raise YamlInputError once ``tree`` holds more than :data:`MAX_VALUES` values (stops counting there)."""
    count, stack = 0, [tree]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise YamlInputError(f"it expands to more than {MAX_VALUES:,} values (YAML aliases used many times?)")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of the YAML file ``path``.

    Raises:
        YamlInputError: not a regular file, larger than :data:`MAX_BYTES`, not UTF-8, not valid YAML, a
            key given twice (both lines named), too many values, or a top level that is not a mapping.
    """
    if not path.is_file():
        found = "a folder" if path.is_dir() else "not a regular file" if path.exists() else "missing"
        raise YamlInputError(f"file {str(path)!r} does not exist as a file ({found})")
    with open(path, "rb") as f:
        raw = f.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise YamlInputError(f"file {str(path)!r} is larger than {MAX_BYTES:,} bytes: not a config file")
    try:
        tree = yaml.load(raw.decode("utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except UnicodeDecodeError:
        raise YamlInputError(f"file {str(path)!r} is not UTF-8 text") from None
    except YamlInputError as err:
        raise YamlInputError(f"file {str(path)!r}: {err}") from None
    except (yaml.YAMLError, RecursionError) as err:
        raise YamlInputError(f"file {str(path)!r} is not valid YAML: {str(err)[:300]}") from None
    try:
        _count_values(tree)
    except YamlInputError as err:
        raise YamlInputError(f"file {str(path)!r}: {err}") from None
    if not isinstance(tree, dict):
        raise YamlInputError(f"file {str(path)!r}: the top level must be a mapping, got {type(tree).__name__}")
    if any(not isinstance(key, str) for key in tree):
        bad = next(key for key in tree if not isinstance(key, str))
        raise YamlInputError(f"file {str(path)!r}: top-level key {bad!r} is a {type(bad).__name__}, not a name")
    return tree
