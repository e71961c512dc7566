"""`python -m birbal <stage> --profile NAME --run-dir DIR [--set key=value ...]`: the one entrypoint.

The containers' ENTRYPOINT and the native path (`invoke` tasks) both call this. Library code raises typed
errors; only this module turns them into one line on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from birbal.errors import (
    BirbalError,
    ConfigError,
    DataError,
    EvaluateError,
    ExportError,
    ModelError,
    RunDirError,
    ServeError,
    TrainError,
)

EXIT_CODES = {ConfigError: 2, RunDirError: 3, DataError: 4, ModelError: 5, TrainError: 6, ExportError: 7,
              ServeError: 8, EvaluateError: 9}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for a bad config
        self.exit(2, f"birbal: error: {message}\n")


def _common(parser: argparse.ArgumentParser, run_dir: bool = True) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", help="recipe profile name under configs/ (e.g. birbal-4090, smoke)")
    source.add_argument("--config", help="path to a recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set train.learning_rate=1e-5 (repeatable)")
    if run_dir:
        parser.add_argument("--run-dir", required=True, help="the run directory (created if absent)")
        parser.add_argument("--force", action="store_true", help="run the stage even if it is already complete")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="birbal", description=__doc__.splitlines()[0])
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE", parser_class=_Parser)
    _common(stages.add_parser("prepare-data", help="build train/eval splits and the data manifest"))
    train = stages.add_parser("train", help="4-bit QLoRA training inside the wall-clock budget (resumable)")
    _common(train)
    train.add_argument("--budget-hours", type=float, help="override train.budget_hours for this run")
    _common(stages.add_parser("export", help="check the adapter and merge it into a bf16 base"))
    serve = stages.add_parser("serve", help="start the challenge HTTP API on the exported model")
    _common(serve)
    serve.add_argument("--host", help="address to bind (default: serve.host)")
    serve.add_argument("--port", type=int, help="port to bind (default: serve.port)")
    evaluate = stages.add_parser("evaluate", help="score the running server (quick offline suite or HELM)")
    _common(evaluate)
    evaluate.add_argument("--url", help="base URL of the server (default: http://serve.host:serve.port)")
    evaluate.add_argument("--suite", choices=["quick", "open"], help="default: evaluate.suite")
    evaluate.add_argument("--max-eval-instances", type=int, help="cap instances per scenario")
    report = stages.add_parser("report", help="rebuild report.md and its plots from the run directory alone")
    report.add_argument("--run-dir", required=True, help="the run directory (must exist)")
    verify = stages.add_parser("verify", help="re-hash every recorded output; budget and memory cap (read only)")
    verify.add_argument("--run-dir", required=True, help="the run directory to check (nothing is written)")
    verify.add_argument("--against", help="a manifest.json (or run directory) whose outputs must match")
    compare = stages.add_parser("compare", help="compare this run's scores and model with another run's")
    compare.add_argument("--run-dir", required=True, help="this run (the comparison is written to its compare/)")
    compare.add_argument("--against", required=True, help="the other run directory (only read)")
    compare.add_argument("--rows", type=int, default=16, help="eval split rows in the probe set (default 16)")
    compare.add_argument("--helm-prompts", type=int, default=4, help="HELM-shaped prompts per quick scenario (4)")
    compare.add_argument("--max-tokens", type=int, default=512, help="tokens per probe, longer ones cut (512)")
    compare.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    compare.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                         help="load both models in this dtype (default: each run's serve.dtype)")
    compare.add_argument("--against-dtype", choices=["bfloat16", "float16", "float32"],
                         help="the other run's model in this dtype instead (e.g. to measure rounding noise)")
    compare.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    compare.add_argument("--seed", type=int, default=20231215, help="bootstrap seed (default 20231215)")
    compare.add_argument("--no-models", action="store_true", help="scores only: load no model")
    validate = stages.add_parser("validate", help="validate a recipe and print it resolved (loads no model)")
    _common(validate, run_dir=False)
    return parser


def _recipe(args):
    from birbal.config import load_recipe

    overrides = list(args.overrides)
    if getattr(args, "budget_hours", None) is not None:
        overrides.append(f"train.budget_hours={args.budget_hours}")
    # --config is always a file (a Path), --profile a name or something that looks like a file path
    return load_recipe(Path(args.config) if args.config else args.profile, overrides)


def _run(args) -> int:
    from birbal import stages
    from birbal.rundir import RunDir, flatten

    if args.stage == "validate":
        print(_recipe(args).to_yaml(), end="")
        return 0
    if args.stage == "report":
        from birbal.evaluate.report import build_report

        run_dir = RunDir(args.run_dir, writable=False)  # a typo'd path is an error, not a new empty report
        if not (run_dir.path / "manifest.json").is_file():
            raise RunDirError(f"{run_dir.path} holds no run (no manifest.json): give the folder a stage ran in")
        print(build_report(run_dir))
        return 0
    if args.stage == "verify":
        from birbal.verify import verify_run

        problems = verify_run(args.run_dir, args.against)
        for problem in problems:
            print(f"- {problem}", file=sys.stderr)
        if problems:
            print(f"birbal: {len(problems)} problem(s) in {args.run_dir}", file=sys.stderr)
            return 1
        print(f"{args.run_dir}: every recorded output matches; budget and memory cap respected")
        return 0
    if args.stage == "compare":
        return _compare(args)
    recipe = _recipe(args)
    run_dir = RunDir(args.run_dir)
    # recipe.yaml is written when a stage completes, never by a call that fails (it describes finished stages)
    run_dir.recipe_yaml = recipe.to_yaml()
    run_dir.recipe_values = flatten(recipe.model_dump(mode="json"))
    if args.stage == "prepare-data":
        stages.prepare_data_stage(recipe, run_dir, args.force)
    elif args.stage == "train":
        stages.train_stage(recipe, run_dir, args.force)
    elif args.stage == "export":
        stages.export_stage(recipe, run_dir, args.force)
    elif args.stage == "serve":
        from birbal.serve.stage import serve_stage  # torch and fastapi are imported inside, timed

        serve_stage(recipe, run_dir, args.host, args.port)
    elif args.stage == "evaluate":
        from birbal.evaluate.stage import evaluate_stage

        url = args.url or f"http://{recipe.serve.host if recipe.serve.host != '0.0.0.0' else '127.0.0.1'}:{recipe.serve.port}"
        evaluate_stage(recipe, run_dir, url, args.suite, args.max_eval_instances)
    return 0


def _compare(args) -> int:
    from birbal.evaluate.compare import ProbeConfig, compare_runs
    from birbal.evaluate.report import build_report

    path = compare_runs(args.run_dir, args.against, device=args.device, dtype=args.dtype,
                        against_dtype=args.against_dtype, resamples=args.resamples, seed=args.seed,
                        probes=ProbeConfig(args.rows, args.helm_prompts, args.max_tokens), models=not args.no_models)
    print(path)
    print(build_report(args.run_dir))
    return 0


LOGIN_NAME_VARIABLES = ("LOGNAME", "USER", "LNAME", "USERNAME")  # what getpass.getuser() reads before pwd


def name_a_passwdless_uid(environ=os.environ) -> str | None:
    """Give a uid with no passwd entry a login name (`uid_<n>`), as torch >= 2.11 does itself.

    `docker run --user $(id -u):$(id -g)` runs as a uid the image's /etc/passwd lacks, and torch 2.10 (the images'
    lock) calls getpass.getuser() at import in torch._dynamo and inductor's code cache, which then raises
    KeyError('getpwuid(): uid not found') before any stage starts (issue 13 item 2). Returns the name set, or None.
    """
    if any(environ.get(name) for name in LOGIN_NAME_VARIABLES) or not hasattr(os, "getuid"):
        return None
    import pwd

    try:
        pwd.getpwuid(os.getuid())
        return None
    except KeyError:
        environ["LOGNAME"] = f"uid_{os.getuid()}"
        return environ["LOGNAME"]


def main(argv: list[str] | None = None) -> int:
    from birbal.serve.startup import PHASES  # the serve stage's start-up breakdown (a small module: os, time)

    PHASES.mark("main")
    args = build_parser().parse_args(argv)
    name_a_passwdless_uid()
    try:
        return _run(args)
    except BirbalError as err:
        code = next((c for cls, c in EXIT_CODES.items() if isinstance(err, cls)), 1)
        print(f"birbal: error: {err}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("birbal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
