"""``export`` on a real sqlite MLflow store made by hand: it never creates a store, refuses an ``--out`` in the
way and files it would overwrite (unless ``force``), and quotes the sweep name safely in MLflow filters."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from roli_sweep.cli import main
from roli_sweep.export import ExportError, export_best, find_parent_run
from roli_sweep.tracking import ROLE_TAG, TRIAL_CONFIG_ARTIFACT, filter_value

TRIALS = (("t1", 0.5), ("t2", 0.7), ("t3", 0.6))
"""(trial id, best_val_robust_acc) of the hand-made sweep's completed trials."""


def make_store(root: Path, sweep: str = "s1", trials=TRIALS) -> str:
    """A sqlite store under ``root``: one experiment, the sweep's parent run, a completed child run per trial
    (metric and ``trial_config.yaml`` as a sweep logs them) and one pruned child run. Returns its URI."""
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("space", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp, run_name=sweep, tags={"sweep": sweep, ROLE_TAG: "parent", "status": "finished"})
    for trial_id, acc in trials + (("pruned", 0.9),):
        run = client.create_run(exp, run_name=f"{sweep}/{trial_id}", tags={
            "mlflow.parentRunId": parent.info.run_id, "trial_id": trial_id, "sweep": sweep, ROLE_TAG: "trial",
            "status": "pruned" if trial_id == "pruned" else "completed"})
        client.log_metric(run.info.run_id, "best_val_robust_acc", acc)
        client.log_text(run.info.run_id, f"seed: 7\nnote: {trial_id}\n", TRIAL_CONFIG_ARTIFACT)
        client.set_terminated(run.info.run_id, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")
    return uri


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def one_error(capsys) -> str:
    """The single line ``main`` printed, which is an error message."""
    out = capsys.readouterr().out.strip()
    assert out.startswith("error:") and len(out.splitlines()) == 1, out
    return out


@pytest.fixture
def store(tmp_path) -> str:
    return make_store(tmp_path / "store")


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """An empty current folder: nothing an export should leave (``mlflow.db``, ``mlruns``) may appear in it."""
    path = tmp_path / "cwd"
    path.mkdir()
    monkeypatch.chdir(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# no store is ever created


def test_default_uri_without_store_creates_nothing(cwd, capsys):
    assert main(["export", "--name", "s1", "--out", "exported"]) == 2
    message = one_error(capsys)
    assert "no MLflow store at" in message and "mlflow.db" in message and "--tracking-uri" in message
    assert list(cwd.iterdir()) == []
    with pytest.raises(ExportError) as err:
        export_best("sqlite:///mlflow.db", "s1", 3, Path("exported"))
    assert str(err.value) == (f"no MLflow store at sqlite:///mlflow.db: {cwd / 'mlflow.db'} does not exist; "
                              "--tracking-uri names the store the sweep logged to")
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("kind", ["sqlite-missing", "sqlite-folder", "sqlite-empty", "sqlite-not-a-db",
                                  "sqlite-not-mlflow", "file-uri-missing", "path-missing", "path-is-file"])
def test_no_local_store_is_refused_before_mlflow(kind, tmp_path, cwd, capsys):
    where = tmp_path / "elsewhere"
    where.mkdir()
    target = where / "mlflow.db"
    if kind == "sqlite-folder":
        target.mkdir()
    elif kind == "sqlite-empty":
        target.touch()
    elif kind in ("sqlite-not-a-db", "path-is-file"):
        target.write_text("not a database\n" * 20)
    elif kind == "sqlite-not-mlflow":
        import sqlite3

        with sqlite3.connect(target) as connection:
            connection.execute("CREATE TABLE notes (text TEXT)")
        connection.close()
    uri = {"file-uri-missing": (where / "mlruns").as_uri(), "path-missing": str(where / "mlruns"),
           "path-is-file": str(target)}.get(kind, f"sqlite:///{target}")
    before = tree(tmp_path)
    assert main(["export", "--name", "s1", "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 2
    message = one_error(capsys)
    assert "--tracking-uri" in message
    with pytest.raises(ExportError) as err:  # export_best itself, whatever the command line checks first
        export_best(uri, "s1", 3, tmp_path / "out")
    assert str(err.value).startswith(f"no MLflow store at {uri}: ")
    assert tree(tmp_path) == before  # no mlflow.db, no mlruns, no tables added, no --out folder


def test_export_from_an_existing_store_writes_only_the_files(store, tmp_path, cwd, capsys):
    """Opening an existing sqlite store writes nothing next to it, and no ``./mlruns``."""
    before = tree(tmp_path / "store")
    assert main(["export", "--name", "s1", "--top-k", "2", "--out", str(tmp_path / "out"),
                 "--tracking-uri", store]) == 0
    assert tree(tmp_path / "store") == before and list(cwd.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s1-rank1-t2.yaml", "s1-rank2-t3.yaml"]


# ---------------------------------------------------------------------------------------------------------
# the sweep name


def test_unknown_sweep_in_existing_store(store, tmp_path, cwd, capsys):
    assert main(["export", "--name", "nope", "--tracking-uri", store, "--out", str(tmp_path / "out")]) == 2
    message = one_error(capsys)
    assert "no sweep named 'nope'" in message and store in message
    assert not (tmp_path / "out").exists()


def test_name_with_a_quote_is_one_message(store, tmp_path, cwd, capsys):
    assert main(["export", "--name", "it's", "--tracking-uri", store, "--out", str(tmp_path / "out")]) == 2
    message = one_error(capsys)
    assert "--name" in message and "it's" in message and "MlflowException" not in message
    assert not (tmp_path / "out").exists()


def test_find_parent_run_with_quotes_in_the_name(store):
    """The filter quotes the name: a quote is looked up like any name (no MlflowException)."""
    client = MlflowClient(store)
    for name in ("it's", 'say "hi"'):
        with pytest.raises(ExportError, match="no sweep named"):
            find_parent_run(client, name)
    assert find_parent_run(client, "s1").data.tags["sweep"] == "s1"


# ---------------------------------------------------------------------------------------------------------
# --out and the files it holds


@pytest.mark.parametrize("sub", ["", "deeper"])
def test_out_is_an_existing_file(sub, store, tmp_path, cwd, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("mine\n")
    out = blocker / sub if sub else blocker
    assert main(["export", "--name", "s1", "--tracking-uri", store, "--out", str(out)]) == 2
    message = one_error(capsys)
    assert "--out" in message and str(blocker) in message and "is a file" in message
    assert blocker.read_text() == "mine\n"
    with pytest.raises(ExportError, match="--out: .* is a file"):
        export_best(store, "s1", 3, out)
    assert blocker.read_text() == "mine\n"


def test_existing_files_are_kept_without_force(store, tmp_path, cwd, capsys):
    out = tmp_path / "out"
    assert main(["export", "--name", "s1", "--tracking-uri", store, "--out", str(out)]) == 0
    capsys.readouterr()
    (out / "s1-rank1-t2.yaml").write_text("edited by hand\n")
    before = tree(out)
    assert main(["export", "--name", "s1", "--tracking-uri", store, "--out", str(out)]) == 2
    message = one_error(capsys)
    assert "already holds 3 of the 3 files" in message and "--force overwrites" in message
    assert "s1-rank1-t2.yaml, s1-rank2-t3.yaml, s1-rank3-t1.yaml" in message
    assert tree(out) == before
    # one file in the way is enough to write none
    (out / "s1-rank2-t3.yaml").unlink()
    (out / "s1-rank3-t1.yaml").unlink()
    before = tree(out)
    assert main(["export", "--name", "s1", "--tracking-uri", store, "--out", str(out)]) == 2
    assert "already holds 1 of the 3 files to write (s1-rank1-t2.yaml)" in one_error(capsys)
    assert tree(out) == before


def test_files_in_the_way_are_listed_bounded(tmp_path):
    trials = tuple((f"t{i}", i / 10) for i in range(1, 7))
    uri = make_store(tmp_path / "store", trials=trials)
    out = tmp_path / "out"
    assert len(export_best(uri, "s1", 6, out)) == 6
    with pytest.raises(ExportError) as err:
        export_best(uri, "s1", 6, out)
    message = str(err.value)
    assert "s1-rank1-t6.yaml, s1-rank2-t5.yaml, s1-rank3-t4.yaml and 3 more" in message
    assert "rank4" not in message and "\n" not in message


def test_force_overwrites(store, tmp_path, cwd, capsys):
    out = tmp_path / "out"
    written = export_best(store, "s1", 2, out)
    fresh = tree(out)
    written[0].write_text("edited by hand\n")
    assert export_best(store, "s1", 2, out, force=True) == written
    assert tree(out) == fresh  # overwritten as a first export writes them, no temporary file left behind
    written[1].write_text("edited by hand\n")
    assert main(["export", "--name", "s1", "--top-k", "2", "--tracking-uri", store, "--out", str(out),
                 "--force"]) == 0
    assert tree(out) == fresh and capsys.readouterr().out.count("wrote ") == 2


def test_target_that_is_a_folder_is_refused_even_with_force(store, tmp_path):
    out = tmp_path / "out"
    (out / "s1-rank1-t2.yaml").mkdir(parents=True)
    with pytest.raises(ExportError, match="holds folders named as the files to write: s1-rank1-t2.yaml"):
        export_best(store, "s1", 2, out, force=True)
    assert [p.name for p in out.iterdir()] == ["s1-rank1-t2.yaml"]


def test_export_writes_ranked_configs_with_a_header(store, tmp_path, cwd, capsys):
    out = tmp_path / "out"
    assert main(["export", "--name", "s1", "--top-k", "5", "--tracking-uri", store, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    names = ["s1-rank1-t2.yaml", "s1-rank2-t3.yaml", "s1-rank3-t1.yaml"]  # completed only, best first
    assert sorted(p.name for p in out.iterdir()) == names
    assert [line.split()[-1] for line in printed.strip().splitlines()] == [str(out / n) for n in names]
    text = (out / names[0]).read_text()
    assert text.startswith("# sweep s1, rank 1 of 3 by best val_robust_acc\n# trial t2, MLflow run ")
    assert "val robust 0.7000" in text and yaml.safe_load(text) == {"seed": 7, "note": "t2"}


# ---------------------------------------------------------------------------------------------------------
# filter_value: MLflow's filter syntax has single- and double-quoted strings and no escape


@pytest.mark.parametrize("value", ["plain", "it's", 'say "hi"', "a and b = 'c", "x;y%_\\z", ""])
def test_filter_value_finds_the_run_tagged_so(value, tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    wanted = client.create_run(exp, tags={"sweep": value, ROLE_TAG: "parent"}).info.run_id
    for other in ("plain ", "its", "say hi", "x", "it''s", "it\\'s"):
        client.create_run(exp, tags={"sweep": other, ROLE_TAG: "parent"})
    found = client.search_runs([exp], filter_string=(
        f"tags.sweep = {filter_value(value)} and tags.{ROLE_TAG} = {filter_value('parent')}"))
    assert [r.info.run_id for r in found] == [wanted]


def test_filter_value_quotes_and_refusals(tmp_path):
    assert filter_value("s1") == "'s1'" and filter_value("it's") == '"it\'s"' and filter_value('a"b') == "'a\"b'"
    for value in ("it's \"both\"", "ends in \\"):
        with pytest.raises(ValueError, match="cannot quote"):
            filter_value(value)
    # why no escaping: MLflow keeps the escape as part of the value, so an escaped quote matches nothing
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_run(exp, tags={"sweep": "it's"})
    assert client.search_runs([exp], filter_string="tags.sweep = 'it''s'") == []
