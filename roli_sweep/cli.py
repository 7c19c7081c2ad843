"""Command line: ``sweep`` (the default), ``train``, ``export`` and ``pretrain``.

Bad input (a malformed search space or config, an unknown sweep, a name that is not one path component,
a store, folder or cluster that cannot be used) prints one message per problem naming the key, the value
and what is allowed, exits with status 2 and starts nothing: everything is checked before Ray is imported
and before an MLflow store is opened (:mod:`roli_sweep.preflight`). Every command printed for the user is
quoted with :func:`shlex.join`, so it runs as printed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from roli_sweep.config import (
    SEED_MAX,
    ConfigError,
    load_pretrain_config,
    load_study_config,
    load_trial_config,
)
from roli_sweep.console import (
    StudyLines,
    command,
    default_console,
    marked,
    print_error,
    print_study_progress,
    print_study_report,
    print_sweep_end,
    print_sweep_next_steps,
)
from roli_sweep.live_view import TerminalWriter, interactive
from roli_sweep.preflight import (
    check_address,
    check_count,
    check_flag_name,
    check_inputs,
    check_local_resources,
    check_storage_path,
    check_sweep,
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
    sweep.add_argument("--study-storage", metavar="URL",
                       help="database of the Optuna studies, e.g. postgresql+psycopg2://USER@HOST/optuna for a "
                            "cluster (default: SQLite in the sweep's folder, <storage-path>/<name>/optuna.db)")
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


def cmd_sweep(args: argparse.Namespace) -> int:
    space, name = check_sweep(args)
    summary = (f"{space.num_samples} trials of {space.base.finetune.method}, "
               f"sampling {', '.join(space.parameters) or 'nothing'}")
    if args.check:
        console.print(marked("[bold]checked[/] sweep {}: {}; every input is valid, nothing was started", name,
                             summary), soft_wrap=True)
        return 0
    from roli_sweep.sweep import run_sweep  # imports Ray: after validation
    from roli_sweep.tune.interrupt import INTERRUPTED_EXIT

    console.print(marked("[bold]sweep[/] {}: {}", name, summary))
    outcome = run_sweep(space, args.space, name, args.tracking_uri, args.storage_path, address=args.address,
                        num_cpus=args.num_cpus, resume=args.resume, probe_cache=not args.no_probe_cache,
                        seed_from=args.seed_from, study_storage=args.study_storage)
    resume = command("--space", args.space, "--name", name, "--resume", "--tracking-uri", args.tracking_uri,
                     "--storage-path", args.storage_path, *(("--address", args.address) if args.address else ()),
                     *(("--study-storage", args.study_storage) if args.study_storage else ()))
    print_sweep_end(console, outcome, space)
    print_sweep_next_steps(console, outcome, resume)
    return INTERRUPTED_EXIT if outcome.interrupted else 1 if outcome.all_failed() else 0


def cmd_train(args: argparse.Namespace) -> int:
    check_count(args.seeds, "--seeds")
    check_flag_name(args.experiment, "--experiment")
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
    check_count(args.top_k, "--top-k")
    check_flag_name(args.name, "--name")
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
    from roli_sweep.core.pretrain import pretrain

    card = pretrain(cfg, on_epoch=lambda m: console.print({k: round(v, 4) for k, v in m.items()}))
    console.print(f"wrote {cfg.out}.safetensors and .json: test clean {card['evaluation']['clean_acc']:.4f}, "
                  f"PGD-{cfg.eval.val_steps} {card['evaluation']['pgd_acc']:.4f}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    check_count(args.num_cpus, "--num-cpus", 65_536)
    check_tracking_uri(args.tracking_uri)
    check_storage_path(args.out, "--out")
    study = load_study_config(args.config)
    method = next(iter(study.methods))
    check_inputs([study.run_config(b, t, method, study.head_inits[0], study.methods[method].grid(study.head_inits[0])[0],
                                   study.seeds[0])
                  for b in study.backbones for t in study.targets])
    if args.address:
        check_address(args.address)
    else:
        check_local_resources(study.resources, args.num_cpus)
    from roli_sweep.study.report import write_report
    from roli_sweep.study.run import StudyState, parse_filters, run_study
    from roli_sweep.tracking import StudyRecorder

    filters = parse_filters(args.only)
    state = StudyState(args.out / study.name, study)
    recorder = StudyRecorder(args.tracking_uri, study, args.config)
    if not args.report_only:
        progress = run_study(study, state, filters, [recorder, StudyLines(console)], num_cpus=args.num_cpus,
                             address=args.address, final=not args.no_final)
        print_study_progress(console, study.name, progress)
    report = write_report(study, state)
    recorder.finish(report)
    print_study_report(console, study.name, report, recorder.parent_run_id)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``run_sweep.py``; returns the exit status (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "sweep")
    args = _parser().parse_args(argv)
    if interactive():  # every write to a lagging terminal waits instead of failing (roli_sweep.live_view)
        sys.stdout.flush()
        sys.stdout = TerminalWriter(sys.stdout)
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
