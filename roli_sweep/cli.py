"""Command line: ``sweep`` (the default), ``train``, ``export`` and ``pretrain``.

Bad input (a malformed search space or config, an unknown sweep, a name that is not one path component,
a store, folder or cluster that cannot be used) prints one message per problem naming the key, the value
and what is allowed, exits with status 2 and starts nothing: everything is checked before Ray is imported
and before an MLflow store is opened (:mod:`roli_sweep.preflight`). Every command printed for the user is
quoted with :func:`shlex.join`, so it runs as printed.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from roli_sweep.config import (
    SEED_MAX,
    ConfigError,
    SearchSpace,
    load_pretrain_config,
    load_search_space,
    load_study_config,
    load_trial_config,
)
from roli_sweep.console import default_console, marked, print_error, print_sweep_end
from roli_sweep.names import check_name, default_sweep_name
from roli_sweep.preflight import (
    check_address,
    check_inputs,
    check_local_resources,
    check_storage_path,
    check_sweep_exists,
    check_tracking_uri,
)

COMMANDS = ("sweep", "train", "export", "pretrain", "study")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
console = default_console()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_sweep.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="run a study over a search space (default command)")
    sweep.add_argument("--space", type=Path, default=Path("search_spaces/lora.yaml"), help="search space YAML")
    sweep.add_argument("--num-samples", type=int, help="override the space's num_samples")
    sweep.add_argument("--max-concurrent", type=int, help="override the space's max_concurrent")
    sweep.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking URI")
    sweep.add_argument("--name", help="sweep name (default: <space name>-<timestamp>); required with --resume")
    sweep.add_argument("--resume", action="store_true", help="continue the interrupted sweep --name")
    sweep.add_argument("--seed-from", metavar="SWEEP",
                       help="a new sweep whose Optuna study starts with this finished sweep's trials; its --space "
                            "may only widen that sweep's ranges or add categorical values")
    sweep.add_argument("--address", help="join an existing Ray cluster (e.g. auto or ray://host:10001)")
    sweep.add_argument("--num-cpus", type=int, help="CPUs for a local Ray runtime (default: all)")
    sweep.add_argument("--storage-path", type=Path, default=Path("ray_results"), help="Ray Tune storage folder")
    sweep.add_argument("--no-probe-cache", action="store_true",
                       help="every trial computes its own stage-1 probe (default: one per distinct probe setting)")
    sweep.add_argument("--check", action="store_true",
                       help="check the space and every input as a sweep would, print what would run, start nothing")

    train = sub.add_parser("train", help="run one trial config without Ray and log it to MLflow")
    train.add_argument("--config", type=Path, required=True, help="trial config YAML (e.g. an exported one)")
    train.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    train.add_argument("--experiment", default="roli_sweep-train", help="MLflow experiment")
    train.add_argument("--seeds", type=int, default=1, help="rerun with this many seeds (seed, seed+1, ...): mean ± std")
    train.add_argument("--paired", action="store_true", help="run RoLI and RanLI per seed: paired difference")
    train.add_argument("--skip-final-eval", action="store_true",
                       help="no AutoAttack / PGD-restarts final evaluation and masking checks")

    export = sub.add_parser("export", help="write the best trials of a sweep as trial-config YAML files")
    export.add_argument("--name", required=True, help="sweep name")
    export.add_argument("--top-k", type=int, default=3)
    export.add_argument("--out", type=Path, default=Path("exported"))
    export.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    export.add_argument("--force", action="store_true", help="overwrite export files that already exist")

    pretrain = sub.add_parser("pretrain", help="make a source backbone with a model card")
    pretrain.add_argument("--config", type=Path, required=True, help="pretraining config YAML")
    study = sub.add_parser("study", help="the grid study of the paper's findings F1-F3 (resumable, in parts)")
    study.add_argument("--config", type=Path, default=Path("studies/mini_paper.yaml"), help="study YAML")
    study.add_argument("--out", type=Path, default=Path("study_results"), help="folder of study states and reports")
    study.add_argument("--only", action="append", default=[], metavar="KEY=VALUE[,VALUE]",
                       help="run only this part (backbone, target, method, head_init, seed); repeatable")
    study.add_argument("--report-only", action="store_true", help="write the report from what has finished")
    study.add_argument("--no-final", action="store_true", help="skip the final evaluation (AutoAttack, masking checks)")
    study.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    study.add_argument("--num-cpus", type=int, help="CPUs for a local Ray runtime (default: all)")
    study.add_argument("--address", help="join an existing Ray cluster")
    return parser


MAX_COUNT = 1_000_000
"""The largest trial count, concurrency, CPU count, top-k or seed count a flag takes."""


def _count(value: int | None, flag: str, maximum: int = MAX_COUNT) -> None:
    if value is not None and not 1 <= value <= maximum:
        raise ConfigError(f"{flag}: value {value} not allowed: an integer from 1 to {maximum:,}")


def _name(value: str | None, flag: str) -> None:
    if value is not None:
        try:
            check_name(value, flag)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _script() -> str:
    """How the user called the entry point (``run_sweep.py`` as typed), for the commands printed."""
    return sys.argv[0] if sys.argv and sys.argv[0].endswith("run_sweep.py") else "run_sweep.py"


def command(*words: object) -> str:
    """A command line for the user to run, every word quoted for a POSIX shell (:func:`shlex.join`)."""
    return shlex.join(["python", _script(), *map(str, words)])


def _check_continuation(args: argparse.Namespace, space: SearchSpace) -> None:
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


def check_sweep(args: argparse.Namespace) -> tuple[SearchSpace, str]:
    """Everything a sweep checks before it imports Ray: flags, names, the space, the dataset and weights files,
    the tracking URI, the storage folder, the sweep to resume or seed from, the cluster to join, the resources.

    Returns:
        The validated space (flags applied) and the sweep's name.

    Raises:
        ConfigError: naming each key or flag, the value and what is allowed.
    """
    _count(args.num_samples, "--num-samples")
    _count(args.max_concurrent, "--max-concurrent")
    _count(args.num_cpus, "--num-cpus", 65_536)
    _name(args.name, "--name")
    _name(args.seed_from, "--seed-from")
    if args.resume and not args.name:
        raise ConfigError("--resume needs --name: the sweep to continue")
    if args.seed_from and (args.resume or args.name == args.seed_from):
        raise ConfigError("--seed-from starts a new sweep: it does not go with --resume, and --name must differ "
                          f"from {args.seed_from!r}")
    check_storage_path(args.storage_path)
    check_tracking_uri(args.tracking_uri)
    if args.resume or args.seed_from:
        check_sweep_exists(args.storage_path, args.name if args.resume else args.seed_from,
                           "--resume --name" if args.resume else "--seed-from",
                           "tuner.pkl" if args.resume else "search_space.yaml")
    space = load_search_space(args.space)
    overrides = {k: v for k, v in (("num_samples", args.num_samples), ("max_concurrent", args.max_concurrent)) if v}
    space = space.model_copy(update=overrides)
    inputs = [space.base] + [space.trial_config({key: value}) for key, spec in space.parameters.items()
                             if key.startswith(("data.", "backbone.")) for value in spec.candidates()]
    check_inputs(inputs)
    if args.resume or args.seed_from:
        _check_continuation(args, space)
    if args.address:
        check_address(args.address)
    else:
        check_local_resources(space.resources, args.num_cpus)
    return space, args.name or default_sweep_name(space.name)


def cmd_sweep(args: argparse.Namespace) -> int:
    space, name = check_sweep(args)
    summary = (f"{space.num_samples} trials of {space.base.finetune.method}, "
               f"sampling {', '.join(space.parameters) or 'nothing'}")
    if args.check:
        console.print(marked("[bold]checked[/] sweep {}: {}; every input is valid, nothing was started", name,
                             summary), soft_wrap=True)
        return 0
    from roli_sweep.sweep import INTERRUPTED_EXIT, run_sweep  # imports Ray: after validation

    console.print(marked("[bold]sweep[/] {}: {}", name, summary))
    outcome = run_sweep(space, args.space, name, args.tracking_uri, args.storage_path, address=args.address,
                        num_cpus=args.num_cpus, resume=args.resume, probe_cache=not args.no_probe_cache,
                        seed_from=args.seed_from)
    resume = command("--space", args.space, "--name", name, "--resume", "--tracking-uri", args.tracking_uri,
                     "--storage-path", args.storage_path, *(("--address", args.address) if args.address else ()))
    print_sweep_end(console, outcome, space)
    console.print(marked("MLflow: experiment [bold]{}[/], parent run [bold]{}[/] ({}); browse with\n  {}\n"
                         "and open http://127.0.0.1:5000/#/experiments/{}/runs?workflowType=machine_learning "
                         "(MLflow 3.17's UI starts on its GenAI view otherwise)", outcome.experiment, name,
                         outcome.parent_run_id, shlex.join(["mlflow", "ui", "--backend-store-uri", outcome.tracking_uri]),
                         outcome.experiment_id), soft_wrap=True)
    console.print(f"Ray Tune results and the sweep's log: {outcome.storage_path / name}")
    if outcome.interrupted:
        console.print(marked("[bold yellow]interrupted[/]: finished epochs are kept; continue with\n  {}", resume),
                      soft_wrap=True)
        return INTERRUPTED_EXIT
    if outcome.rows and all(row.status == "failed" for row in outcome.rows):
        reasons = sorted({row.error or "unknown error" for row in outcome.rows})
        console.print(marked("[bold red]every trial failed[/] ({}); the reasons:", len(outcome.rows)))
        for reason in reasons:
            console.print(f"  {reason}", soft_wrap=True)
        return 1
    console.print("export the best: " + command("export", "--name", name, "--top-k", 3, "--out", "exported",
                                                "--tracking-uri", outcome.tracking_uri), soft_wrap=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _count(args.seeds, "--seeds")
    _name(args.experiment, "--experiment")
    check_tracking_uri(args.tracking_uri)
    cfg = load_trial_config(args.config)
    if cfg.seed + args.seeds - 1 > SEED_MAX:
        raise ConfigError(f"--seeds: seeds {cfg.seed} .. {cfg.seed + args.seeds - 1} go past the largest seed, {SEED_MAX}")
    check_inputs([cfg])
    from roli_sweep.single_run import train_logged, train_seeds

    if args.seeds > 1 or args.paired:
        train_seeds(cfg, args.config, args.seeds, args.paired, args.tracking_uri, args.experiment, console,
                    not args.skip_final_eval)
        return 0
    metrics = train_logged(cfg, args.config, args.tracking_uri, args.experiment, console, not args.skip_final_eval)
    console.print({k: round(v, 4) for k, v in metrics.items()})
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _count(args.top_k, "--top-k")
    _name(args.name, "--name")
    check_tracking_uri(args.tracking_uri)  # and export_best refuses a local store that does not exist
    from roli_sweep.export import ExportError, export_best

    try:
        paths = export_best(args.tracking_uri, args.name, args.top_k, args.out, force=args.force)
    except ExportError as err:
        raise ConfigError(str(err)) from None
    for path in paths:
        console.print(f"wrote {path}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_pretrain_config(args.config)
    check_storage_path(Path(cfg.out).parent, "out")
    check_inputs([cfg])
    from roli_sweep.pretrain import pretrain

    card = pretrain(cfg, on_epoch=lambda m: console.print({k: round(v, 4) for k, v in m.items()}))
    console.print(f"wrote {cfg.out}.safetensors and .json: test clean {card['evaluation']['clean_acc']:.4f}, "
                  f"PGD-{cfg.eval.val_steps} {card['evaluation']['pgd_acc']:.4f}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    _count(args.num_cpus, "--num-cpus", 65_536)
    check_tracking_uri(args.tracking_uri)
    check_storage_path(args.out, "--out")
    study = load_study_config(args.config)
    method = next(iter(study.methods))
    check_inputs([study.run_config(b, t, method, study.head_inits[0], study.methods[method].lrs[0], study.seeds[0])
                  for b in study.backbones for t in study.targets])
    if args.address:
        check_address(args.address)
    else:
        check_local_resources(study.resources, args.num_cpus)
    from roli_sweep.study import RunKey, StudyState, parse_filters, run_study
    from roli_sweep.tracking import StudyRecorder

    filters = parse_filters(args.only)
    state = StudyState(args.out / study.name, study)

    recorder = StudyRecorder(args.tracking_uri, study.name, args.config, args.config.read_text())
    if not args.report_only:
        def on_run(key: RunKey, record: dict) -> None:
            cfg = study.run_config(key.backbone, key.target, key.method, key.head_init, key.lr, key.seed)
            labels = {"backbone": key.backbone, "target": key.target, "lr": f"{key.lr:.3g}"}
            recorder.log_run(key.id, labels, cfg, record)
            m = record.get("metrics", {})
            line = (f"val robust {m['val_robust_acc']:.3f}, test clean {m['test_clean_acc']:.3f} "
                    f"robust {m['test_robust_acc']:.3f}, {record['seconds']:.0f} s"
                    if record["status"] == "completed" else "failed")
            console.print(f"{key.id}: {line}", style=None if record["status"] == "completed" else "red")

        def on_probe(key, record: dict) -> None:
            m = record.get("metrics", {})
            line = (f"probe test clean {m['probe_test_clean_acc']:.3f} robust {m['probe_test_robust_acc']:.3f}"
                    if record["status"] == "completed" else f"probe failed\n{record['error']}")
            console.print(f"probe {key.id}: {line}", style=None if record["status"] == "completed" else "red")

        def on_final(key: RunKey, record: dict) -> None:
            recorder.log_final(key.id, record)
            if record["status"] != "completed":
                console.print(f"final evaluation of {key.id} failed\n{record['error']}", style="red")
                return
            m = record["metrics"]
            console.print(f"final {key.id}: clean {m['final_clean_acc']:.3f}, PGD {m['final_pgd_acc']:.3f}, "
                          f"AutoAttack {m.get('final_autoattack_acc', float('nan')):.3f}, {record['seconds']:.0f} s")
            for name, status, detail in record["checks"]:
                if status != "pass":
                    console.print(marked("[bold red]  masking check {}: warning[/] ({})", name, detail))

        progress = run_study(study, state, filters, on_run, on_probe, on_final, num_cpus=args.num_cpus,
                             address=args.address, final=not args.no_final)
        console.print(f"study {study.name}: {progress.probes_run} probes, {progress.runs_completed} runs completed, "
                      f"{progress.runs_failed} failed, {progress.finals_done} final evaluations in "
                      f"{progress.seconds:.0f} s")
    from roli_sweep.study_report import write_report

    report = write_report(study, state)
    recorder.finish(report.folder, report.summary,
                    {f"search_space.edge.finetune.lr.{where}": w.message for where, w in report.edges.items()})
    for warning in report.edges.values():
        console.print(marked("[bold yellow]lr grid edge:[/] {}", warning.message), soft_wrap=True)
    console.print(f"report: {report.folder / 'RESULTS.md'} (also in MLflow, experiment {study.name!r}, "
                  f"parent run {recorder.parent_run_id})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``run_sweep.py``; returns the exit status (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "sweep")
    args = _parser().parse_args(argv)
    handler = {"sweep": cmd_sweep, "train": cmd_train, "export": cmd_export, "pretrain": cmd_pretrain,
               "study": cmd_study}[args.command]
    try:
        return handler(args)
    except (ConfigError, FileNotFoundError) as err:
        print_error(console, str(err))
        return 2
    except KeyboardInterrupt:  # Ctrl+C outside a sweep's trials (which handles its own)
        console.print("interrupted", style="bold yellow")
        return 130
