"""Checks of a job's inputs before anything starts (no Ray import, no Ray runtime, no MLflow store, no trial).

Every dataset a job reads must have its files under its root (or cache) and hold the classes asked for,
every weights file must be readable and valid, the MLflow tracking URI must name a store MLflow has,
the storage folder must be a folder this user can write, a sweep to resume or to seed from must exist,
a Ray cluster to join must answer, and a trial's resources must fit a local runtime. A problem found later
would fail every trial the same way, after minutes of scheduling, or leave files behind.
"""
from __future__ import annotations

import os
import socket
from argparse import Namespace
from pathlib import Path
from urllib.parse import urlparse

from roli_sweep.config import ConfigError, Resources, SearchSpace, TrialConfig, load_search_space
from roli_sweep.console import command
from roli_sweep.messages import shown
from roli_sweep.names import check_name, default_sweep_name

ADDRESS_TIMEOUT_S = 5.0
"""How long a Ray cluster's address gets to accept a TCP connection."""

RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
"""Where ``ray start`` records the address that ``--address auto`` joins (``ray._private.services``,
``find_bootstrap_address``; Ray's default temp folder)."""


def check_inputs(configs: list[TrialConfig]) -> None:
    """Check the dataset files, the class subset and the weights file of each distinct data / backbone
    setting in ``configs``.

    Raises:
        ConfigError: naming the key (``data.root``, ``data.split_dir``, ``data.classes``, ``backbone.weights``),
            the path and what was found there: missing, a folder or a device, empty, truncated, not a
            safetensors file, not a torch checkpoint, or a pickle with objects other than tensors.
    """
    from roli_sweep.data import check_files
    from roli_sweep.models.backbone import check_weights_file, resolve_weights

    problems: list[str] = []
    for data in {c.data.model_dump_json(): c.data for c in configs}.values():
        try:
            check_files(data)
        except (OSError, ValueError) as err:
            problems.append(str(err))
    for weights in sorted({c.backbone.weights for c in configs if c.backbone.weights}):
        try:
            check_weights_file(resolve_weights(weights))
        except ValueError as err:
            problems.append(str(err) if str(err).startswith("backbone.weights") else f"backbone.weights: {err}")
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))


def check_tracking_uri(uri: str, key: str = "--tracking-uri") -> None:
    """The MLflow tracking URI names a store MLflow has (its own scheme registry, plugins included), and for
    SQLite, a database file in a folder that exists and this user can write.

    Raises:
        ConfigError: naming ``key``, the URI and the schemes MLflow supports, or the folder that is missing.
    """
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry  # the schemes MLflow resolves
    from sqlalchemy.engine import make_url

    try:
        _tracking_store_registry.get_store_builder(uri)
    except Exception:
        schemes = sorted(s for s in _tracking_store_registry._registry if s)
        raise ConfigError(f"{key}: value {shown(uri)} is not an MLflow tracking URI; its scheme must be one of "
                          f"{schemes} (e.g. sqlite:///mlflow.db, http://127.0.0.1:5000)") from None
    scheme = urlparse(uri).scheme
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise ConfigError(f"{key}: value {shown(uri)} is MLflow's file store, which MLflow 3 keeps in maintenance "
                          "mode and refuses unless MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///mlflow.db")
    if scheme.split("+")[0] != "sqlite":
        return
    try:
        database = make_url(uri).database  # as SQLAlchemy, which MLflow's store uses, reads it
    except Exception:
        database = None
    if not database or database == ":memory:":
        raise ConfigError(f"{key}: value {shown(uri)}: a SQLite store needs a file, sqlite:///PATH")
    path = Path(database)
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: value {shown(uri)}: the folder {str(folder)!r} of the SQLite file "
                          f"{'does not exist' if not folder.exists() else 'is not a folder this user can write'}")
    if path.exists() and (not path.is_file() or not os.access(path, os.R_OK | os.W_OK)):
        raise ConfigError(f"{key}: value {shown(uri)}: {str(path)!r} is not a file this user can read and write")


def check_study_storage(url: str | None, key: str = "--study-storage") -> None:
    """The database URL for a sweep's Optuna studies is one SQLAlchemy reads, with its driver installed
    (``postgresql+psycopg2://`` needs the ``cluster`` extra), and for SQLite names a file in a folder that exists.

    Raises:
        ConfigError: naming ``key``, the URL (password hidden) and what is allowed.
    """
    if url is None:
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"{key}: value {shown(url)} is not a database URL; give DIALECT[+DRIVER]://USER@HOST[:PORT]/"
                          "DATABASE (e.g. postgresql+psycopg2://roli@127.0.0.1:5432/optuna) or sqlite:///PATH") from None
    hidden = shown(parsed.render_as_string(hide_password=True))
    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(f"{key}: value {hidden}: SQLAlchemy has no dialect {parsed.drivername!r}; "
                          "postgresql+psycopg2 and sqlite are the tested ones") from None
    except ImportError as error:
        raise ConfigError(f"{key}: value {hidden}: its database driver is not installed ({error}); for PostgreSQL "
                          "install roli_sweep's cluster extra (pip install -e '.[cluster]')") from None
    if parsed.get_backend_name() == "sqlite":
        folder = Path(parsed.database or "").parent
        if not parsed.database or parsed.database == ":memory:" or not folder.is_dir():
            raise ConfigError(f"{key}: value {hidden}: a SQLite study storage needs a file in a folder that exists, "
                              "sqlite:///PATH")


def check_storage_path(path: Path, key: str = "--storage-path") -> None:
    """``path`` is a folder this user can write, or can be made in one (nothing is created here).

    Raises:
        ConfigError: naming ``key``, the path and what is there instead.
    """
    probe = path.expanduser().absolute()
    while not probe.exists():
        if probe.is_symlink():
            raise ConfigError(f"{key}: {str(path)!r}: {str(probe)!r} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}: {str(path)!r} must be a folder, but {str(probe)!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {str(path)!r}: the folder {str(probe)!r} is not writable by this user")


def check_sweep_exists(storage_path: Path, name: str, key: str, marker: str) -> None:
    """``<storage_path>/<name>`` is a sweep folder holding ``marker`` (Ray Tune's ``tuner.pkl`` for
    ``--resume``, the sweep's kept space for ``--seed-from``).

    Raises:
        ConfigError: naming ``key``, the sweep and the folder looked in.
    """
    folder = storage_path / name
    if not (folder / marker).is_file():
        found = "no such folder" if not folder.exists() else f"no {marker} in it"
        raise ConfigError(f"{key}: no sweep {name!r} under --storage-path {str(storage_path)!r} ({found}); "
                          "give the --storage-path the sweep ran with")


def check_address(address: str, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """The Ray cluster at ``address`` (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``) accepts a TCP connection
    within ``timeout`` seconds. ``auto`` is resolved as Ray does: ``RAY_ADDRESS``, else the address ``ray start``
    recorded in :data:`RAY_CURRENT_CLUSTER`.

    Raises:
        ConfigError: naming ``--address``, what was tried and what happened.
    """
    target = address
    if address == "auto":
        target = os.environ.get("RAY_ADDRESS") or ""
        if not target:
            try:
                target = RAY_CURRENT_CLUSTER.read_text().strip()
            except OSError:
                raise ConfigError(f"--address auto: no running Ray cluster found (RAY_ADDRESS is unset and "
                                  f"{RAY_CURRENT_CLUSTER} does not exist); start one with 'ray start --head' or give "
                                  "HOST:PORT") from None
    if address == "local":
        raise ConfigError("--address: 'local' starts a local runtime; leave --address out for that")
    parsed = urlparse(target if "://" in target else f"tcp://{target}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if not host or not port or parsed.scheme not in ("tcp", "ray"):
        raise ConfigError(f"--address: value {shown(address)} not allowed: HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        tried = f"{host}:{port}" + (f" (from {address})" if address != target else "")
        raise ConfigError(f"--address: no Ray cluster answers at {tried} within {timeout:g} s: "
                          f"{err.strerror or type(err).__name__}") from None


def check_local_resources(resources: Resources, num_cpus: int | None) -> None:
    """A trial's resources fit the local runtime a sweep starts (``num_cpus`` or all CPUs; the GPUs torch sees):
    Ray Tune would otherwise keep every trial pending for ever.

    Raises:
        ConfigError: naming ``resources.cpu`` / ``resources.gpu``, what a trial asks and what the runtime has.
    """
    import torch

    cpus = num_cpus or os.cpu_count() or 1
    gpus = torch.cuda.device_count()
    problems = []
    if resources.cpu > cpus:
        problems.append(f"resources.cpu: a trial asks for {resources.cpu:g} CPUs, the local runtime has {cpus} "
                        f"({'--num-cpus' if num_cpus else 'this machine'})")
    if resources.gpu > gpus:
        problems.append(f"resources.gpu: a trial asks for {resources.gpu:g} GPUs, torch sees {gpus} here")
    if problems:
        raise ConfigError("\n".join(problems))


MAX_COUNT = 1_000_000
"""The largest trial count, concurrency, CPU count, top-k or seed count a flag takes."""


def check_count(value: int | None, flag: str, maximum: int = MAX_COUNT) -> None:
    if value is not None and not 1 <= value <= maximum:
        raise ConfigError(f"{flag}: value {value} not allowed: an integer from 1 to {maximum:,}")


def check_flag_name(value: str | None, flag: str) -> None:
    """A name given by ``flag`` follows :mod:`roli_sweep.names`' rule (None: not given).

    Raises:
        ConfigError: naming the flag, the value and what is allowed.
    """
    if value is not None:
        try:
            check_name(value, flag)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _check_continuation(args: Namespace, space: SearchSpace) -> None:
    """``--resume`` continues a sweep on the space it started with; ``--seed-from`` may widen it
    (:mod:`roli_sweep.widening`). ``num_samples``, ``max_concurrent`` and ``resources`` may differ: a resumed
    sweep keeps those Ray Tune stored, a seeded one runs with the new ones.

    Raises:
        ConfigError: the space changes more than bounds and values, or ``--resume`` was given a widened space
            (Ray Tune restores the search space it stored); the message gives the ``--seed-from`` command.
    """
    from roli_sweep.widening import SPACE_FILE, load_sweep_space, widened_parameters

    old_name = args.name if args.resume else args.seed_from
    if args.resume and not (args.storage_path / old_name / SPACE_FILE).exists():
        return  # started before sweeps kept their space: Ray Tune restores what it stored
    widened = widened_parameters(load_sweep_space(args.storage_path / old_name), space)
    if args.resume and widened:
        raise ConfigError(
            f"--resume: {args.space} widens {', '.join(widened)} of sweep {old_name}, and Ray Tune restores a sweep "
            "with the search space it stored. Search the widened space in a new sweep that starts from the "
            "finished trials:\n  " + command("--space", args.space, "--seed-from", old_name, "--tracking-uri",
                                              args.tracking_uri, "--storage-path", args.storage_path))


def check_sweep(args: Namespace) -> tuple[SearchSpace, str]:
    """Everything a sweep checks before it imports Ray: flags, names, the space, the dataset and weights files,
    the tracking URI, the storage folder, the sweep to resume or seed from, the cluster to join, the resources.

    Returns:
        The validated space (flags applied) and the sweep's name.

    Raises:
        ConfigError: naming each key or flag, the value and what is allowed.
    """
    check_count(args.num_samples, "--num-samples")
    check_count(args.max_concurrent, "--max-concurrent")
    check_count(args.num_cpus, "--num-cpus", 65_536)
    check_flag_name(args.name, "--name")
    check_flag_name(args.seed_from, "--seed-from")
    if args.resume and not args.name:
        raise ConfigError("--resume needs --name: the sweep to continue")
    if args.seed_from and (args.resume or args.name == args.seed_from):
        raise ConfigError("--seed-from starts a new sweep: it does not go with --resume, and --name must differ "
                          f"from {args.seed_from!r}")
    check_storage_path(args.storage_path)
    check_tracking_uri(args.tracking_uri)
    check_study_storage(args.study_storage)
    if args.resume or args.seed_from:
        check_sweep_exists(args.storage_path, args.name if args.resume else args.seed_from,
                           "--resume --name" if args.resume else "--seed-from",
                           "tuner.pkl" if args.resume else "search_space.yaml")
    space = load_search_space(args.space)
    overrides = {k: v for k, v in (("num_samples", args.num_samples), ("max_concurrent", args.max_concurrent)) if v}
    space = space.model_copy(update=overrides)
    inputs = [space.base] + [space.trial_config({**condition, key: value}) for key in space.parameters
                             if key.startswith(("data.", "backbone.")) for condition, spec in space.conditions(key)
                             for value in spec.candidates()]
    check_inputs(inputs)
    if args.resume or args.seed_from:
        _check_continuation(args, space)
    if args.address:
        check_address(args.address)
    else:
        check_local_resources(space.resources, args.num_cpus)
    return space, args.name or default_sweep_name(space.name)
