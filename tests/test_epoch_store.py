"""A trial's saved epoch: the newest complete one wins, a stop between the renames loses nothing, one is kept."""
from __future__ import annotations

import os
import shutil

from roli_sweep.tune.epoch_store import CURRENT, REPORT_FILE, EpochStore

CONFIG = {"finetune.lr": 0.01, "finetune.head_init": "roli"}


def _epoch(folder, epoch: int):
    folder.mkdir(exist_ok=True)
    (folder / "resume.pt").write_text(f"state of epoch {epoch}")
    return folder


def test_each_save_replaces_the_last_and_the_newest_is_read(tmp_path):
    store = EpochStore(tmp_path / "trial_state", "sweep", "abc_00001", CONFIG)
    assert store.latest() is None
    for epoch in range(3):
        store.save(_epoch(tmp_path / "work", epoch), {"stage": "finetune", "epoch": epoch})
        folder, report = store.latest()
        assert report == {"stage": "finetune", "epoch": epoch}
        assert (folder / "resume.pt").read_text() == f"state of epoch {epoch}"
        assert [p.name for p in store.root.iterdir()] == [CURRENT]  # one epoch on disk, never more
    assert store.root == tmp_path / "trial_state" / "sweep" / "abc_00001"


def test_a_stop_between_the_renames_or_while_copying_keeps_the_newest_complete_epoch(tmp_path):
    store = EpochStore(tmp_path / "s", "sweep", "t", CONFIG)
    store.save(_epoch(tmp_path / "work", 1), {"epoch": 1})
    store.save(_epoch(tmp_path / "work", 2), {"epoch": 2})
    # stopped after 'current' became '.old-*' and before '.next-*' became 'current'
    os.rename(store.root / CURRENT, store.root / ".old-a")
    shutil.copytree(store.root / ".old-a", store.root / ".next-b")
    (store.root / ".next-b" / "resume.pt").write_text("state of epoch 3")
    report = (store.root / ".next-b" / REPORT_FILE).read_text().replace('"seq": 1', '"seq": 2').replace(
        '"epoch": 2', '"epoch": 3')
    (store.root / ".next-b" / REPORT_FILE).write_text(report)
    # and a copy stopped before its report was written: not complete, never read
    shutil.copytree(store.root / ".old-a", store.root / ".next-c")
    (store.root / ".next-c" / REPORT_FILE).unlink()
    folder, report = store.latest()
    assert report == {"epoch": 3} and folder.name == ".next-b"
    store.save(_epoch(tmp_path / "work", 4), {"epoch": 4})  # the next save clears what the stop left
    assert store.latest()[1] == {"epoch": 4}
    assert [p.name for p in store.root.iterdir()] == [CURRENT]


def test_an_epoch_saved_for_another_config_is_not_resumed(tmp_path):
    EpochStore(tmp_path, "sweep", "t", CONFIG).save(_epoch(tmp_path / "work", 1), {"epoch": 1})
    assert EpochStore(tmp_path, "sweep", "t", {**CONFIG, "finetune.lr": 0.02}).latest() is None
    assert EpochStore(tmp_path, "confirmation", "t", CONFIG).latest() is None
    assert EpochStore(tmp_path, "sweep", "t", dict(reversed(CONFIG.items()))).latest()[1] == {"epoch": 1}
