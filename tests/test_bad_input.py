"""Issue 16: every bad input a user or a shared machine really produces is refused up front with exit 2 and
one bounded message naming the key; nothing is written, no traceback, Ray is never imported."""
from __future__ import annotations

import copy
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from roli_sweep.cli import main
from roli_sweep.messages import MAX_LINE
from tests.conftest import write_yaml

ROOT = Path(__file__).resolve().parent.parent


def _refused(tmp_path: Path, capsys, argv: list[str], *expected: str) -> str:
    """Run ``main(argv)`` in ``tmp_path``: exit 2, each ``expected`` text in the one message, nothing written."""
    before = set(tmp_path.rglob("*"))
    status = main(argv)
    out = capsys.readouterr().out
    assert status == 2, out
    flat = " ".join(out.split())
    for text in expected:
        assert text in flat, out
    assert "Traceback" not in out and all(len(line) <= MAX_LINE + 10 for line in out.splitlines())
    assert set(tmp_path.rglob("*")) == before, "nothing may be written on bad input"
    return out


@pytest.fixture
def sweep_in(tmp_path, monkeypatch, space_dict):
    """(argv maker, tree) for a sweep of ``space_dict`` in ``tmp_path``, written as ``space.yaml``."""
    monkeypatch.chdir(tmp_path)

    def argv(tree=None, *flags: str, name: str = "space.yaml") -> list[str]:
        path = write_yaml(tmp_path / name, space_dict if tree is None else tree)
        return ["--space", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                "--storage-path", str(tmp_path / "ray_results"), *flags]

    return argv


@pytest.mark.parametrize("name", ["../../escape", "two words", "naïve", "x' or '1'='1", "a/b", ".hidden", "x" * 101])
def test_a_name_that_is_no_single_path_component_is_refused(tmp_path, capsys, space_dict, sweep_in, name):
    tree = copy.deepcopy(space_dict)
    tree["name"] = name
    _refused(tmp_path, capsys, sweep_in(tree), "key 'name'", "not allowed")
    _refused(tmp_path, capsys, sweep_in(None, "--name", name), "--name")
    _refused(tmp_path, capsys, sweep_in(None, "--seed-from", name), "--seed-from")
    assert not (tmp_path.parent / "escape").exists()


def test_a_space_named_by_its_file_stem_follows_the_same_rule(tmp_path, capsys, space_dict, sweep_in):
    tree = {k: v for k, v in space_dict.items() if k != "name"}
    _refused(tmp_path, capsys, sweep_in(tree, name="my space.yaml"), "key 'name'", "'my space'")


def test_user_text_is_never_read_as_markup(tmp_path, capsys, space_dict, sweep_in):
    tree = copy.deepcopy(space_dict)
    tree["base"]["finetune"]["[/]"] = "[bold]x[/bold]"
    tree["base"]["data"]["name"] = "[red]digits[/]"
    out = _refused(tmp_path, capsys, sweep_in(tree), "base.finetune.[/]")
    assert "'[bold]x[/bold]'" in out and "'[red]digits[/]'" in out


def _weights_file(kind: str, folder: Path, tiny_weights: Path) -> tuple[Path, str]:
    """A weights path of ``kind`` and the words its refusal must contain."""
    if kind == "three_byte_pickle":
        (path := folder / "short.pth").write_bytes(b"\x80\x02a")
        return path, "not a tensor pickle"
    if kind == "header_not_an_object":
        header = b"[1, 2]"
        (path := folder / "list.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
        return path, "not an object"
    if kind == "header_too_large":  # claims 256 MiB: refused from the length field, never allocated
        (path := folder / "huge.safetensors").write_bytes(struct.pack("<Q", 256 << 20) + b"{}" + bytes(64))
        return path, "limit of 100,000,000"
    if kind == "folder":
        (path := folder / "weights.safetensors").mkdir()
        return path, "is a folder"
    if kind == "device":
        return Path("/dev/null"), "is a device"
    if kind == "empty":
        (path := folder / "empty.safetensors").write_bytes(b"")
        return path, "is empty"
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}'  # offsets that do not fit the shape
    (path := folder / "bad_offsets.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    return path, "not a valid safetensors file"


@pytest.mark.parametrize("kind", ["three_byte_pickle", "header_not_an_object", "header_too_large", "folder", "device",
                                  "empty", "bad_offsets"])
def test_every_unreadable_weights_file_is_refused(tmp_path, capsys, space_dict, sweep_in, tiny_weights, kind):
    weights, expected = _weights_file(kind, tmp_path, tiny_weights)
    tree = copy.deepcopy(space_dict)
    tree["base"]["backbone"]["weights"] = str(weights)
    out = _refused(tmp_path, capsys, sweep_in(tree), "backbone.weights", str(weights), expected)
    assert out.count("backbone.weights") == 1


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, capsys, sweep_in):
    path = Path(sweep_in()[1])
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("num_samples:"))
    lines.insert(at + 3, "num_samples: 9")
    path.write_text("\n".join(lines) + "\n")
    _refused(tmp_path, capsys, ["--space", str(path), "--storage-path", str(tmp_path / "ray_results")],
             "key 'num_samples' is given twice", f"on line {at + 1} and on line {at + 4}")


def test_yaml_aliases_cannot_blow_up_a_message(tmp_path, capsys, space_dict, sweep_in):
    expanding = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(6))
    path = tmp_path / "laughs.yaml"
    path.write_text(expanding)
    _refused(tmp_path, capsys, ["--space", str(path)], "expands to more than 100,000 values")
    tree = copy.deepcopy(space_dict)  # a large (not exploding) wrong value: shown short, with its size
    tree["parameters"]["finetune.lr"] = {"values": [[0.1] * 500 for _ in range(40)]}
    out = _refused(tmp_path, capsys, sweep_in(tree), "parameters.finetune.lr")
    assert len(out.splitlines()) <= 31 and "(list of 500 items)" in out, out


@pytest.mark.parametrize("path,value,expected", [
    ("seed", -1, "key 'seed'"), ("seed", 2**40, "key 'seed'"), ("base/seed", 2**32, "key 'base.seed'"),
    ("resources/cpu", 0.00001, "key 'resources.cpu'"), ("resources/cpu", 4096, "resources.cpu: a trial asks for 4096"),
    ("resources/gpu", 1, "resources.gpu: a trial asks for 1 GPUs"),
    ("base/data/classes", [0, 3, 11], "data.classes: [11] not in digits (classes 0..9)"),
])
def test_numbers_their_consumers_refuse_are_refused_up_front(tmp_path, capsys, space_dict, sweep_in, path, value,
                                                             expected):
    if path == "resources/gpu" and torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    tree = copy.deepcopy(space_dict)
    node = tree
    *parents, leaf = path.split("/")
    for key in parents:
        node = node[key]
    node[leaf] = value
    _refused(tmp_path, capsys, sweep_in(tree), expected)


def test_stores_folders_and_sweeps_are_checked_before_anything_starts(tmp_path, capsys, sweep_in):
    argv = sweep_in()
    (afile := tmp_path / "a_file").write_text("x")
    _refused(tmp_path, capsys, argv + ["--tracking-uri", "nosuchscheme://host/x"], "--tracking-uri",
             "'nosuchscheme://host/x'", "sqlite")
    _refused(tmp_path, capsys, argv + ["--tracking-uri", f"sqlite:///{tmp_path}/missing/mlflow.db"], "does not exist")
    _refused(tmp_path, capsys, argv + ["--study-storage", "not a url"], "--study-storage", "'not a url'",
             "postgresql+psycopg2://")
    out = _refused(tmp_path, capsys, argv + ["--study-storage", "nosuchdb://u:secret@h/x"], "--study-storage",
                   "no dialect 'nosuchdb'", "***")
    assert "secret" not in out
    _refused(tmp_path, capsys, argv + ["--study-storage", f"sqlite:///{tmp_path}/missing/optuna.db"], "--study-storage",
             "a folder that exists")
    _refused(tmp_path, capsys, argv + ["--storage-path", str(afile)], "--storage-path", "is a file")
    _refused(tmp_path, capsys, argv + ["--storage-path", str(afile / "below")], "--storage-path", "is a file")
    _refused(tmp_path, capsys, argv + ["--resume", "--name", "never_ran"], "--resume --name: no sweep 'never_ran'")
    _refused(tmp_path, capsys, argv + ["--seed-from", "never_ran"], "--seed-from: no sweep 'never_ran'")
    _refused(tmp_path, capsys, argv + ["--num-samples", str(10**7)], "--num-samples")
    _refused(tmp_path, capsys, argv + ["--check", "--num-cpus", "0"], "--num-cpus")


def test_check_validates_everything_and_starts_nothing(tmp_path, capsys, sweep_in):
    assert main(sweep_in(None, "--check")) == 0
    assert "every input is valid, nothing was started" in capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_a_cluster_that_does_not_answer_and_an_unknown_resume_never_import_ray(tmp_path, space_dict):
    """In a fresh interpreter: ``--address`` to a port where nothing listens exits 2 within 30 s, and so does
    ``--resume`` of a sweep that never ran, and neither imports Ray."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    space = write_yaml(tmp_path / "space.yaml", space_dict)
    script = ("import sys; from roli_sweep.cli import main; status = main(sys.argv[1:]); "
              "print('ray imported' if 'ray' in sys.modules else 'ray not imported'); sys.exit(status)")
    base = [sys.executable, "-c", script, "--space", str(space), "--storage-path", str(tmp_path / "ray_results"),
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    for flags, expected in ([["--address", f"127.0.0.1:{port}"], f"--address: no Ray cluster answers at 127.0.0.1:{port}"],
                            [["--resume", "--name", "never_ran"], "--resume --name: no sweep 'never_ran'"]):
        started = time.monotonic()
        done = subprocess.run(base + flags, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        seconds = time.monotonic() - started
        out = " ".join(done.stdout.split())
        assert done.returncode == 2 and expected in out and "ray not imported" in out, done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr
        print(f"{flags[0]} refused in {seconds:.1f} s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]
