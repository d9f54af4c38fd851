"""Command line: `instructdiff <command>` (also `python -m instructdiff_ray`).

Every command takes a YAML config and/or flags; flags and `--set key=value` override the
YAML. Exit codes: 0 success, 1 runtime failure, 2 bad configuration, 3 output directory
holds a different configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from . import __version__
from .config import ConfigError, RunConfig, load_config, parse_overrides

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_MISMATCH = 0, 1, 2, 3

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
    overrides: list[tuple[str, Any]] = []
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides.append((key, value))
    if getattr(args, "fields", None):
        overrides += _fields(args.fields)
    if getattr(args, "actors", None):
        overrides += _actors(args.actors)
    overrides += parse_overrides(getattr(args, "set", None) or [])
    return load_config(getattr(args, "config", None), overrides)


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
    g.add_argument("--progress", choices=["auto", "on", "off"])


def cmd_score(args: argparse.Namespace) -> int:
    from .pipeline import check_config, score_corpus

    cfg = config_from_args(args)
    check_config(cfg)
    summary = score_corpus(cfg, cfg.out, warmup=cfg.model.warmup)
    print(json.dumps(summary.to_dict(), indent=2))
    return EXIT_OK


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, str]] = {
    "score": (
        cmd_score,
        "score every sample under base and warmup models into Parquet",
        "example:\n  instructdiff score --data ../shared/data/gsm8k_train.jsonl --base smollm2 \\\n"
        "      --warmup runs/x/models/round-1/adapter --out runs/scores --limit 500",
    ),
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
        if name in ("score",):
            _common(p)
            p.add_argument("--out", help="output directory for score shards")
            if name == "score":
                p.add_argument("--warmup", help="warmup model: peft adapter dir or full model dir")
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .pipeline import FingerprintMismatch

    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except FingerprintMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_MISMATCH
