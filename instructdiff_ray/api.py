"""The Python API: what the CLI does, callable from a notebook or script, with typed results.

    from instructdiff_ray import RunConfig, run, score, select, load_scores

    cfg = RunConfig(out="runs/x", data={"paths": ["train.jsonl"]}, model={"base": "Qwen/Qwen2.5-0.5B"})
    result = run(cfg)                     # warmup -> score -> select, K rounds, resumable
    result.selected_data, result.stats["selected_rows"], result.report
    table = load_scores(result.rounds[0].scores_dir)          # a pyarrow Table
    pick = select(table, budget=0.2, out="runs/x-20pct")      # reselect without rescoring
    cmp = compare("runs/x", eval=["heldout.jsonl"], seeds=[0, 1])  # fine-tune on each pick, held-out NLL

Every function runs the CLI's configuration checks first (before any model loads) and attaches
to the Ray session the caller already started, if any (`ray.init(...)` beforehand), else
starts a local one. Errors are the CLI's: ConfigError, FingerprintMismatch, LeaseHeld,
TooManyErrors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import rundir
from .config import RunConfig, SelectionConfig, build_config, load_config

__all__ = ["RunConfig", "RunResult", "RoundResult", "ScoreResult", "SelectionResult", "CompareResult", "load_config",
           "run", "score", "warmup", "select", "load_scores", "compare", "plan", "report", "status", "inspect"]


@dataclass(frozen=True)
class SelectionResult:
    """A written (or in-memory) selection."""

    # the selected score rows in rank order, with `rank`; None when the distributed search wrote them to `out`
    # (read paths["scores"] in batches: they are not gathered in this process)
    rows: pa.Table | None
    stats: dict[str, Any]
    paths: dict[str, str] = field(default_factory=dict)  # ids, scores, stats, data (absent when not exported)

    @property
    def selected_rows(self) -> int:
        return int(self.stats["selected_rows"])

    @property
    def data(self) -> str | None:
        """The user's selected records (selected.<fmt>), if exported."""
        return self.paths.get("data")


@dataclass(frozen=True)
class ScoreResult:
    scores_dir: str
    rows: int
    status_counts: dict[str, int]
    shards: int
    shards_resumed: int  # finished before this call (not recomputed)
    base_tokens_per_s: float | None
    warmup_tokens_per_s: float | None
    wall_seconds: float


@dataclass(frozen=True)
class RoundResult:
    round: int
    scores_dir: str
    selection_dir: str
    rows_scored: int
    selected_rows: int
    status_counts: dict[str, int]
    timings: dict[str, float]


@dataclass(frozen=True)
class RunResult:
    run_dir: str
    rounds: list[RoundResult]
    selected_data: str | None  # the final round's records in the corpus' format (None when not exported)
    selected_ids: str
    selection_scores: str  # selection.parquet of the final round
    stats: dict[str, Any]  # the final round's selection stats
    stats_file: str  # the final round's stats.json
    report: str  # report/index.html
    wall_seconds: float
    mlflow_run_id: str | None = None  # with tracking.mlflow


def _config(cfg: RunConfig | dict[str, Any] | str | Path, overrides: dict[str, Any] | None) -> RunConfig:
    pairs = list((overrides or {}).items())
    if isinstance(cfg, RunConfig):
        return build_config(cfg.model_dump(mode="json"), pairs) if pairs else cfg
    if isinstance(cfg, (str, Path)):
        return load_config(str(cfg), pairs)
    return build_config(cfg, pairs)


def run(cfg: RunConfig | dict[str, Any] | str | Path, **overrides: Any) -> RunResult:
    """`instructdiff run`: a RunConfig, a config dict or a YAML path; `overrides` are dotted keys
    given with `__` for dots (`run(cfg, selection__budget=0.2)`)."""
    from .pipeline import run_job
    from .preflight import check_config
    from .runtime import preload_torch

    preload_torch()  # before the data and object-store stacks load their libraries (runtime.py)
    config = _config(cfg, {k.replace("__", "."): v for k, v in overrides.items()})
    check_config(config)
    res = run_job(config)
    rounds = [RoundResult(round=r.round, scores_dir=rundir.scores_dir(config.out, r.round),
                          selection_dir=rundir.selection_dir(config.out, r.round),
                          rows_scored=r.selection.rows_scored, selected_rows=r.selection.selected_rows,
                          status_counts=r.scoring.status_counts, timings=r.timings)
              for r in res.rounds]
    final = res.final_selection
    return RunResult(run_dir=config.out, rounds=rounds, selected_data=final.get("data"), selected_ids=final["ids"],
                     selection_scores=final["scores"], stats=res.rounds[-1].selection.to_dict(), stats_file=final["stats"],
                     report=rundir.report_files(config.out)["html"], wall_seconds=res.wall_seconds,
                     mlflow_run_id=res.mlflow_run_id)


def score(cfg: RunConfig | dict[str, Any] | str | Path, **overrides: Any) -> ScoreResult:
    """`instructdiff score`: score `cfg.out` under `model.base` and `model.warmup` (given, not trained)."""
    from .pipeline import score_job
    from .preflight import check_config
    from .runtime import preload_torch

    preload_torch()  # before the data and object-store stacks load their libraries (runtime.py)
    config = _config(cfg, {k.replace("__", "."): v for k, v in overrides.items()})
    check_config(config)
    s = score_job(config)
    return ScoreResult(scores_dir=s.out_dir, rows=s.rows, status_counts=s.status_counts, shards=s.shards_total,
                       shards_resumed=s.shards_skipped, base_tokens_per_s=s.base_tokens_per_s,
                       warmup_tokens_per_s=s.warmup_tokens_per_s, wall_seconds=s.wall_seconds)


def warmup(cfg: RunConfig | dict[str, Any] | str | Path, **overrides: Any):
    """`instructdiff warmup`: train round 1's warmup model (the α draw) into `cfg.out`/round-1/warmup,
    which `run` with the same settings then reuses. Returns the WarmupResult."""
    from .corpus import load_plan
    from .preflight import check_config
    from .runtime import preload_torch
    from .runtime import init_ray
    from .warmup import collect, draw_rows, train_warmup

    preload_torch()
    config = _config(cfg, {k.replace("__", "."): v for k, v in overrides.items()})
    check_config(config)
    init_ray(config)  # attaches first: the draw is read by tasks on the cluster
    with rundir.Lease(config.out, config.run.lease_ttl_s):
        shards = load_plan(config.data, config.out).shards
        return train_warmup(config, collect(config, shards, draw=draw_rows(shards, config.warmup)),
                            rundir.warmup_dir(config.out, 1))


def plan(cfg: RunConfig | dict[str, Any] | str | Path, **overrides: Any) -> dict[str, Any]:
    """What `run` would do (rows, shards, files, models, actors, selection), without loading any model."""
    from .corpus import load_plan
    from .preflight import check_config

    config = _config(cfg, {k.replace("__", "."): v for k, v in overrides.items()})
    check_config(config)
    shards = load_plan(config.data, None).shards
    c = config.compare
    return {
        "run_dir": config.out,
        "rows": sum(s.n_rows for s in shards),
        "shards": len(shards),
        "files": sorted({s.path for s in shards}),
        "base_model": config.model.base,
        "warmup_model": config.model.warmup or f"trained per round ({config.warmup.method}, alpha={config.warmup.alpha})",
        "rounds": config.rounds,
        "engine": config.engine.name,
        "device": config.model.device,
        "actors": {"min": config.ray.min_actors, "max": config.ray.max_actors, "gpus_each": config.ray.gpus_per_actor,
                   "cpus_each": config.ray.cpus_per_actor},
        "selection": config.selection.model_dump(),
        "compare": {"units": len(c.strategies) * len(c.seeds) + 1, **c.model_dump(mode="json")} if c else None,
    }


def report(run_dir: str) -> dict[str, str]:
    """(Re)write a run's report: plots, index.html and summary.md; returns their paths."""
    from .report import write_run_report

    rundir.check_run_dir(run_dir)
    return write_run_report(run_dir)


def status(run_dir: str) -> str:
    """One screen on a run: driver, stage, shards done/pending/interrupted, rows per status, throughput, ETA."""
    from .report import run_status

    rundir.check_run_dir(run_dir)
    return run_status(run_dir)


def inspect(run_dir: str, n: int = 5, round_k: int | None = None) -> str:
    """The top and bottom samples by ΔH and by ΔNLL, with their text and whether they were selected."""
    from .report import inspect_run

    rundir.check_run_dir(run_dir)
    return inspect_run(run_dir, n=n, round_k=round_k)


def load_scores(scores_dir: str, columns: list[str] | None = None) -> pa.Table:
    """The score rows of a scores directory (finished shards only) as one Arrow table."""
    from .selection import load_scores as _load

    return _load(scores_dir, columns)


def select(scores: str | pa.Table, out: str | None = None, partial: bool = False, in_memory_rows: int = 20_000_000,
           **settings: Any) -> SelectionResult:
    """`instructdiff select`: from a scores directory or a table of score rows; `settings` are
    SelectionConfig fields (budget, budget_unit, gamma, strategy, seed, output_format, export).
    A scores directory of more than `in_memory_rows` rows is selected by the distributed search
    (Ray: the attached cluster, $RAY_ADDRESS, or a local one), with the same result; with `out` its
    rows are written range by range and not returned (`rows` is None: read paths["scores"]).
    With `out`, the selection is written there (ids, selection.parquet, stats and, when the
    corpus is reachable, the records); without, it is only returned. A scores directory whose
    scoring has not finished is refused unless `partial`."""
    from .config import check_out, section
    from .selection import check_scores_finished, scores_plan, write_selection
    from .selection import select as _select
    from .selection_search import select_scores

    scfg = section(SelectionConfig, "selection", **settings)
    if out:
        check_out(out, "out")
    shard_plan = None
    if isinstance(scores, str):
        check_scores_finished(scores, partial=partial)
        shard_plan = scores_plan(scores)
        sel = select_scores(scores, scfg, in_memory_rows)
    else:
        sel = _select(scores, scfg)
    paths = write_selection(sel, out, scfg.output_format, scfg.export, shard_plan) if out else {}
    return SelectionResult(rows=sel.rows if out else sel.table(), stats=sel.stats, paths=paths)


@dataclass(frozen=True)
class CompareResult:
    rows: list[dict[str, Any]]  # one per strategy (and the base model): rows, tokens, nll_mean, nll_std, metric_mean, ...
    markdown: str  # the table as in summary.md
    computed: list[str]  # units trained and evaluated by this call
    reused: list[str]  # units finished before (their markers)
    path: str  # compare/comparison.json
    metric: str | None = None


def compare(run: str | RunConfig, eval: str | list[str] | None = None, **settings: Any) -> CompareResult:
    """`instructdiff compare`: fine-tune the base on each strategy's pick of a finished run and
    measure each on held-out rows; `settings` are CompareConfig fields (eval_skip, eval_limit,
    strategies, seeds, train, eval_command, metric). `run` is the run directory, or a RunConfig
    whose compare section is already set (what the CLI builds). Resumable: finished units are reused."""
    from .compare import compare_run, config_for
    from .report import comparison_markdown
    from .runtime import preload_torch

    preload_torch()
    evals = [eval] if isinstance(eval, str) else eval
    cfg = run if isinstance(run, RunConfig) else config_for(run, {"eval": evals, **settings})
    with rundir.Lease(cfg.out, cfg.run.lease_ttl_s):
        table = compare_run(cfg)
    return CompareResult(rows=table["strategies"], markdown=comparison_markdown(table), computed=table["computed"],
                         reused=table["reused"], path=rundir.compare_files(cfg.out)["json"],
                         metric=table["metric"])
