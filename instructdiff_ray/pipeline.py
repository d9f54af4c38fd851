"""The job driver: the Ray Data wiring of the scoring steps, and the K-round job (the checks that
run before it are in preflight.py).

Every file it persists goes through rundir.py (manifest, markers, summaries, the lease). A
scores directory is resumable: finished shards (those with markers) are skipped, and a
different fingerprint refuses to mix results.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from typing import Any

from . import rundir
from .config import RunConfig
from .corpus import INVALID_STATUSES, Plan, Shard, load_plan, read_units
from .console import current_log
from .engines.memory import placement
from .progress import Progress
from .records import RoundRecord, RunSummary, ScoreSummary, SelectionStats
from .rundir import FingerprintMismatch, LeaseHeld
from .runtime import code_version, environment, gpus_per_actor, init_ray
from .scoring import ERROR_STATUSES, QUARANTINE_STATUSES, ScoreActor, tokenize_unit, write_shard

log = logging.getLogger(__name__)

__all__ = ["FingerprintMismatch", "LeaseHeld", "TooManyErrors", "score_corpus", "run_job", "init_ray"]


class TooManyErrors(RuntimeError):
    """More rows failed (or were unusable input) than `run.max_error_fraction` (`run.max_invalid_fraction`)
    allows; everything scored is kept."""


def fingerprint(
    cfg: RunConfig, plan: Plan, base: str, warmup: str | None, base_scores_dir: str | None
) -> dict[str, Any]:
    """Everything that changes the numbers in a score file (not batch sizes or actor counts);
    `base` and `warmup` are pinned model specs (a Hub model by its commit)."""
    from .models import identity

    code = code_version()
    return {
        "data": cfg.data.model_dump(exclude={"paths"}),
        "files": sorted(plan.files, key=lambda f: f["path"]),
        "template": cfg.template.model_dump(),
        "base_model": identity(base),
        "warmup_model": identity(warmup) if warmup else None,
        "dtype": cfg.model.dtype,
        "engine": cfg.engine.name,
        "base_scores_from": base_scores_dir,
        "code": {"version": code["version"], "source_digest": code["source_digest"]},
    }


def prepare_out_dir(out_dir: str, fp: dict[str, Any], shards: list[Shard], recompute: bool = False,
                    note=None) -> list[Shard]:
    """Write or check the manifest (a different one is refused, or with `recompute` cleared);
    return the shards that still need work: those without a marker, and those whose rows
    ended in `error` (a fault while scoring, e.g. out of memory), which are scored again."""
    rundir.open_scores(out_dir, fp, [s.to_dict() for s in shards], environment(), recompute=recompute)
    done = rundir.finished_markers(out_dir)
    retry = rundir.error_shards(done)
    if retry:
        msg = (f"scoring again {sum(retry.values())} rows that ended in error (in {len(retry)} shards); "
               "rows whose input is at fault (too_long, template_error, malformed) are kept as they are")
        log.info(msg)
        if note:
            note(msg)
        rundir.unmark_shards(out_dir, sorted(retry))
    return [s for s in shards if s.shard_id not in done or s.shard_id in retry]


def score_corpus(
    cfg: RunConfig, out_dir: str, warmup: str | None = None, base_scores_dir: str | None = None,
    label: str = "score", plan: Plan | None = None, recompute: bool = False,
) -> ScoreSummary:
    """Score the corpus into `out_dir` on Ray Data, resuming from any finished shards; `plan` is
    the run directory's (else the one stored in `out_dir`, made if absent). Scores made with a
    different fingerprint are refused, unless `recompute` (or run.recompute names scores).

    The caller holds the run directory's lease. Raises TooManyErrors after everything is
    written when more rows failed than `run.max_error_fraction` allows."""
    import ray.data
    from ray.exceptions import RayError

    from .models import pin

    t0 = time.monotonic()
    base = pin(cfg.model.base)  # every node loads the same commit of a Hub model
    warmup = pin(warmup) if warmup else None
    plan = plan or load_plan(cfg.data, out_dir)
    shards = plan.shards
    fp = fingerprint(cfg, plan, base, warmup, base_scores_dir)
    progress = Progress(label, sum(s.n_rows for s in shards), cfg.progress)
    pending = prepare_out_dir(out_dir, fp, shards, recompute or "scores" in cfg.run.recompute, progress.note)
    todo = {s.shard_id for s in pending}
    progress.update(sum(s.n_rows for s in shards if s.shard_id not in todo))
    if len(pending) < len(shards):
        progress.note(f"resuming: {len(shards) - len(pending)} of {len(shards)} shards already done")
    if pending:
        init_ray(cfg)
        from ray.data import DataContext

        # Every block is one shard: a read unit (a gzip file, a Parquet row group) yields its
        # shards one by one, and each must flow on as soon as it is tokenized; by default Ray
        # Data buffers a task's outputs up to 128 MB (~100 shards) before passing them on.
        ctx = DataContext.get_current()
        block_size, ctx.target_max_block_size = ctx.target_max_block_size, 1
        units = [{"shards": json.dumps([s.to_dict() for s in u])} for u in read_units(pending)]
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = ds.map_batches(tokenize_unit, batch_size=1, fn_kwargs={"cfg": cfg, "tokenizer": base},
                            num_cpus=cfg.ray.tokenize_cpus)
        pools = warmup is not None and base_scores_dir is None and placement(cfg) == "pools"  # engines/memory.py
        stages = [("base", cfg.ray.min_actors, cfg.ray.max_actors, gpus_per_actor(cfg))] if pools else []
        pool = cfg.ray.warmup_pool
        stages.append(("warmup", pool.min_actors or cfg.ray.min_actors, pool.max_actors or cfg.ray.max_actors,
                       pool.gpus_per_actor if pool.gpus_per_actor is not None else gpus_per_actor(cfg))
                      if pools else ("all", cfg.ray.min_actors, cfg.ray.max_actors, gpus_per_actor(cfg)))
        for stage, lo, hi, gpus in stages:  # pools: a shard flows through the base pool, then the warmup pool
            with warnings.catch_warnings():
                # Ray 2.60 has no named parameter for an actor's restarts yet; its warning says to use one
                warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
                ds = ds.map_batches(
                    ScoreActor,
                    batch_format="pyarrow",
                    fn_constructor_kwargs={"cfg": cfg, "base": base, "warmup": warmup, "base_scores_dir": base_scores_dir,
                                           "stage": stage},
                    batch_size=1,
                    compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                    num_cpus=cfg.ray.cpus_per_actor,
                    num_gpus=gpus,
                    max_restarts=cfg.ray.max_restarts,
                    max_task_retries=cfg.ray.max_task_retries,
                )
        ds = ds.map(write_shard, fn_kwargs={"out_dir": out_dir}, num_cpus=cfg.ray.tokenize_cpus)
        try:
            with progress:
                for marker in ds.iter_rows():
                    progress.update(int(marker["rows"]), int(marker["tokens"]), rundir.shard_name(int(marker["shard_id"])))
        except RayError as err:
            done = len(rundir.finished_markers(out_dir))
            raise RuntimeError(
                f"scoring stopped: {type(err).__name__}: {str(err).splitlines()[0][:500]} ({done} of {len(shards)} shards "
                f"are finished and kept; scoring actors are restarted at most ray.max_restarts={cfg.ray.max_restarts} "
                "times after a systemic fault; rerun the same command to resume)") from err
        finally:
            ctx.target_max_block_size = block_size
    summary = summarize(out_dir, shards, len(shards) - len(pending), time.monotonic() - t0)
    progress.note(row_account(summary))
    note = length_note(summary, cfg.template.max_length)
    if note:
        log.warning(note)
        progress.note(note)
    check_row_limits(cfg, summary, out_dir)
    return summary


def selection_fingerprint(cfg: RunConfig, summary: ScoreSummary) -> dict[str, Any]:
    """What a round's selection is made from: its settings and the scores it reads (the scores'
    manifest, and each shard's row counts: a rescored shard whose failed rows now have scores
    counts as new; one rescored to the same statuses has the same scores)."""
    manifest = rundir.read_manifest(summary.out_dir)["fingerprint_hash"]
    shards = [(m["shard_id"], m["rows"], sorted(m["status_counts"].items())) for m in summary.markers]
    return {"selection": cfg.selection.model_dump(mode="json"), "scores": rundir.digest([manifest, shards])}


def select_round(cfg: RunConfig, scores_dir: str, sel_dir: str, shards: list[Shard],
                 fp: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """One round's selection, written and committed (run as a task: it reads every score row, or
    above ray.select_in_memory_rows, orchestrates the distributed search)."""
    from .selection import write_selection
    from .selection_search import select_scores

    sel = select_scores(scores_dir, cfg.selection, cfg.ray.select_in_memory_rows)
    return write_selection(sel, sel_dir, cfg.selection.output_format, cfg.selection.export, shards, fp), sel.stats


def stale_what(keys: list[str]) -> str:
    """'settings (selection.budget)' / 'scores' for a stale selection's differing keys."""
    settings = [k for k in keys if k.startswith("selection")]
    parts = [f"settings ({', '.join(settings)})"] if settings else []
    return " and ".join(parts + (["scores"] if "scores" in keys else [])) or "settings"


def row_account(summary: ScoreSummary) -> str:
    """One line: rows per status, the most frequent reasons, and where the unreadable raw lines are."""
    counts = sorted(summary.status_counts.items(), key=lambda kv: (kv[0] != "ok", -kv[1]))
    line = f"{summary.rows} rows: " + ", ".join(f"{n} {status}" for status, n in counts)
    reasons: dict[str, int] = {}
    for m in summary.markers:
        for reason, n in m.get("reasons", {}).items():
            reasons[reason] = reasons.get(reason, 0) + n
    if reasons:
        top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        line += "; most frequent: " + "; ".join(f"{' '.join(r.split())[:80]} ({n})" for r, n in top)
    if any(summary.status_counts.get(s) for s in QUARANTINE_STATUSES):
        line += f"; raw lines in {rundir.join(summary.out_dir, rundir.QUARANTINE_DIR)}/"
    return line


def check_row_limits(cfg: RunConfig, summary: ScoreSummary, out_dir: str) -> None:
    """Raise TooManyErrors (after everything is written) when more rows failed, or were unusable
    input, than run.max_error_fraction / run.max_invalid_fraction allow."""
    quarantine = rundir.join(out_dir, rundir.QUARANTINE_DIR)
    limits = [
        (ERROR_STATUSES, cfg.run.max_error_fraction, "failed", "max_error_fraction",
         f"every score is kept in {out_dir} (see the `reason` column); fix the cause or raise the limit, then rerun"),
        (INVALID_STATUSES, cfg.run.max_invalid_fraction, "are not usable input", "max_invalid_fraction",
         f"every row's status and reason is in {out_dir} (raw lines of unreadable ones in {quarantine}/); fix the "
         "input or raise the limit, then rerun"),
    ]
    for statuses, limit, what, key, advice in limits:
        bad = {k: v for k, v in summary.status_counts.items() if k in statuses}
        n = sum(bad.values())
        if summary.rows and n / summary.rows > limit:
            raise TooManyErrors(f"{n} of {summary.rows} rows ({100 * n / summary.rows:.1f}%) {what} ({bad}), more than "
                                f"run.{key}={limit}; {advice}")


def summarize(out_dir: str, shards: list[Shard], skipped: int, wall: float) -> ScoreSummary:
    """Totals from the markers; raises if any planned row is missing (nothing is lost silently)."""
    markers = rundir.finished_markers(out_dir)
    missing = [s.shard_id for s in shards if s.shard_id not in markers]
    if missing:
        raise RuntimeError(f"{len(missing)} shards have no output (first: {missing[:5]}); rerun to resume")
    expected = sum(s.n_rows for s in shards)
    counts: dict[str, int] = {}
    for m in markers.values():
        for k, v in m["status_counts"].items():
            counts[k] = counts.get(k, 0) + v
    rows = sum(counts.values())
    if rows != expected:
        raise RuntimeError(f"accounting error: planned {expected} rows, outputs hold {rows}")
    ms = [markers[s.shard_id] for s in shards]
    summary = ScoreSummary(
        out_dir=out_dir,
        shards_total=len(shards),
        shards_skipped=skipped,
        rows=rows,
        status_counts=dict(sorted(counts.items())),
        base_tokens=sum(m["base_tokens"] for m in ms),
        warmup_tokens=sum(m["warmup_tokens"] for m in ms),
        base_seconds=sum(m["base_seconds"] for m in ms),
        warmup_seconds=sum(m["warmup_seconds"] for m in ms),
        wall_seconds=wall,
        tokenize_seconds=sum(m.get("tokenize_seconds", 0.0) for m in ms),
        alone_tokens=sum(m.get("alone_tokens", 0) for m in ms),
        alone_seconds=sum(m.get("alone_seconds", 0.0) for m in ms),
        write_seconds=sum(m.get("write_seconds", 0.0) for m in ms),
        markers=ms,
    )
    rundir.write_scores_summary(out_dir, summary.to_dict())
    return summary


LENGTH_SKIP_WARN = 0.01  # a larger share of rows skipped for length biases the selection toward short samples


def length_note(summary: ScoreSummary, max_length: int) -> str | None:
    """A warning when many rows were skipped for length (template.length_policy=skip)."""
    n = summary.status_counts.get("too_long", 0)
    if not summary.rows or n / summary.rows <= LENGTH_SKIP_WARN:
        return None
    return (f"warning: {n} of {summary.rows} rows ({100 * n / summary.rows:.1f}%) are longer than "
            f"template.max_length={max_length} and were not scored, so the selection leans toward "
            "short samples; raise template.max_length or set template.length_policy=truncate")


def score_job(cfg: RunConfig) -> ScoreSummary:
    """`instructdiff score`: one scores directory (`cfg.out`) under the run directory's lease."""
    init_ray(cfg)  # attaches first: a multi-node cluster refuses local paths before anything is written
    with rundir.Lease(cfg.out, cfg.run.lease_ttl_s):
        return score_corpus(cfg, cfg.out, warmup=cfg.model.warmup)


def run_job(cfg: RunConfig) -> RunSummary:
    """warmup → score → select for K rounds in one run directory; every step resumes.

    Round 1 scores base and warmup; round k ≥ 2 trains a new warmup from the base on round
    k−1's selection, scores only the warmup pass and reuses round 1's base columns. The driver
    holds the run directory's lease throughout.
    """
    init_ray(cfg)  # attaches first: a multi-node cluster refuses local paths before anything is written
    with rundir.Lease(cfg.out, cfg.run.lease_ttl_s) as lease:
        return _run_rounds(cfg, lease)


def _run_rounds(cfg: RunConfig, lease: rundir.Lease) -> RunSummary:
    from .report import write_run_report
    from .runtime import remote_call
    from .tracking import log_run
    from .warmup import collect, draw_rows, train_warmup

    t0 = time.monotonic()
    log_at = current_log()
    Progress("run", 1, cfg.progress).note(f"run directory {cfg.out}; from another terminal: instructdiff status {cfg.out}"
                                          + (f"\n[run] full log (Ray's own output included): {log_at}" if log_at else ""))
    rundir.record_invocation(cfg.out, cfg.model_dump(mode="json"), environment())
    plan = load_plan(cfg.data, cfg.out)
    shards = plan.shards
    rounds: list[RoundRecord] = []
    train_from: tuple[str, int] | None = None  # the last round's selection Parquet and its row count
    for k in range(1, cfg.rounds + 1):
        timings: dict[str, float] = {}
        t = time.monotonic()
        if k == 1 and cfg.model.warmup:
            warm_model, warm_info = cfg.model.warmup, {"given": cfg.model.warmup}
        else:
            if k == 1:
                draw = draw_rows(shards, cfg.warmup)
                samples, drawn = collect(cfg, shards, draw=draw), sum(draw.counts.values())
            else:
                assert train_from is not None
                cap = cfg.warmup.max_samples
                samples = collect(cfg, shards, selection=train_from[0], cap=cap)
                drawn = train_from[1] if cap is None else min(train_from[1], cap)
            progress = Progress(f"warmup r{k}", 1, cfg.progress)
            progress.note(f"training on {drawn} rows ({cfg.warmup.method})")
            result = train_warmup(cfg, samples, rundir.warmup_dir(cfg.out, k))
            warm_model, warm_info = result.scoring_model, result.__dict__
        timings["warmup_s"] = time.monotonic() - t
        lease.check()
        t = time.monotonic()
        base_from = rundir.scores_dir(cfg.out, 1) if k > 1 else None
        retrained = "warmup" in cfg.run.recompute and not (k == 1 and cfg.model.warmup)  # its scores may be redone too
        summary = score_corpus(cfg, rundir.scores_dir(cfg.out, k), warm_model, base_from, f"score r{k}", plan, recompute=retrained)
        timings["score_s"] = time.monotonic() - t
        lease.check()
        t = time.monotonic()
        sel_dir = rundir.selection_dir(cfg.out, k)
        sel_fp = selection_fingerprint(cfg, summary)
        commit = rundir.committed_selection(sel_dir, sel_fp)
        if commit is None or commit.get("stale"):  # on the cluster: the driver never holds the N score rows
            if commit:
                Progress(f"select r{k}", 1, cfg.progress).note(
                    f"selecting again: the selection in {sel_dir} was made with other {stale_what(commit['stale'])}")
            paths, stats = remote_call(select_round, cfg, rundir.scores_dir(cfg.out, k), sel_dir, shards, sel_fp)
        else:
            paths, stats = commit["paths"], rundir.read_json(commit["paths"]["stats"])
        timings["select_s"] = time.monotonic() - t
        Progress(f"select r{k}", 1, cfg.progress).note(
            f"{stats['selected_rows']} of {stats['rows_scored']} rows selected -> {paths.get('data', 'ids and scores only (records not exported)')}")
        train_from = (paths["scores"], stats["selected_rows"])
        rounds.append(RoundRecord(round=k, warmup=warm_info, scoring=summary, selection=SelectionStats.from_dict(stats),
                                  paths=paths, timings=timings))
    result = RunSummary(run_dir=cfg.out, rounds=rounds, wall_seconds=time.monotonic() - t0)
    rundir.write_run_summary(cfg.out, result.to_dict())
    if cfg.compare:  # fine-tune on each strategy's pick; writes the report with its comparison
        from .compare import compare_run

        lease.check()
        table = compare_run(cfg)
        result.compare = {k: table[k] for k in ("strategies", "metric", "heldout_rows", "cpu_minutes")}
        rundir.write_run_summary(cfg.out, result.to_dict())
    else:
        remote_call(write_run_report, cfg.out)
    result.mlflow_run_id = log_run(cfg, result)
    if result.mlflow_run_id:
        rundir.write_run_summary(cfg.out, result.to_dict())
    return result
