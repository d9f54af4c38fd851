"""Pipeline stage: wire the scoring steps onto Ray Data, with a resumable run directory.

An output directory of scores holds `manifest.json` (config fingerprint + shard plan), one
Parquet file per shard and a marker per finished shard in `_done/`. Rerunning skips shards
with markers; a different fingerprint refuses to mix results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec

from . import __version__
from .config import ConfigError, RunConfig
from .corpus import Shard, plan_shards
from .report import Progress, progress_enabled
from .scoring import ScoreActor, join, shard_name, tokenize_shard, write_shard

log = logging.getLogger(__name__)


class FingerprintMismatch(RuntimeError):
    """The output directory holds results of a different configuration."""


@dataclass
class ScoreSummary:
    out_dir: str
    shards_total: int
    shards_skipped: int
    rows: int
    status_counts: dict[str, int]
    base_tokens: int
    warmup_tokens: int
    base_seconds: float
    warmup_seconds: float
    wall_seconds: float
    markers: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "markers"}
        d["base_tokens_per_s"] = self.base_tokens / self.base_seconds if self.base_seconds else None
        d["warmup_tokens_per_s"] = self.warmup_tokens / self.warmup_seconds if self.warmup_seconds else None
        return d


def init_ray(cfg: RunConfig) -> None:
    """Attach to `ray.address` / $RAY_ADDRESS, or start a local Ray (the embedded default)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    quiet = not progress_enabled(cfg.progress)
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Logical CPUs are a scheduling budget here (torch threads are set per actor), so the
        # local cluster gets room for the whole actor pool plus the light tokenize/write tasks;
        # otherwise a pool that claims every core starves them and the job never progresses.
        need = math.ceil(cfg.ray.max_actors * cfg.ray.cpus_per_actor + 2 * cfg.ray.tokenize_cpus)
        ray.init(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, need), **kwargs)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def fingerprint(
    cfg: RunConfig, shards: list[Shard], base_dir: str, warmup: str | None, base_scores_dir: str | None
) -> dict[str, Any]:
    """Everything that changes the numbers in a score file (not batch sizes or actor counts)."""
    from .engines import model_digest

    files = []
    for p in sorted({s.path for s in shards}):
        fs, root = fsspec.core.url_to_fs(p)
        files.append({"path": p, "size": fs.size(root)})
    return {
        "data": cfg.data.model_dump(exclude={"paths"}),
        "files": files,
        "template": cfg.template.model_dump(),
        "base_model": model_digest(base_dir),
        "warmup_model": model_digest(warmup) if warmup else None,
        "dtype": cfg.model.dtype,
        "engine": cfg.engine.name,
        "base_scores_from": base_scores_dir,
        "package_version": __version__,
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_out_dir(out_dir: str, fp: dict[str, Any], shards: list[Shard]) -> list[Shard]:
    """Write or check the manifest; return the shards that still need work."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    manifest_path = join(root, "_manifest.json")
    plan = [s.to_dict() for s in shards]
    if fs.exists(manifest_path):
        with fs.open(manifest_path, "r") as f:
            old = json.load(f)
        if old["fingerprint_hash"] != _digest(fp) or old["plan_hash"] != _digest(plan):
            diffs = [k for k in fp if json.dumps(fp[k], default=str) != json.dumps(old["fingerprint"].get(k), default=str)]
            if old["plan_hash"] != _digest(plan):
                diffs.append("shard plan")
            raise FingerprintMismatch(
                f"{out_dir} holds scores of a different configuration (differs in: {', '.join(diffs) or 'unknown'}); "
                "use a new output directory or remove this one"
            )
    else:
        fs.makedirs(root, exist_ok=True)
        manifest = {
            "fingerprint": fp,
            "fingerprint_hash": _digest(fp),
            "plan_hash": _digest(plan),
            "plan": plan,
            "created_at": time.time(),
        }
        with fs.open(manifest_path, "w") as f:
            f.write(json.dumps(manifest, indent=1, default=str))
    done = finished_markers(out_dir)
    return [s for s in shards if s.shard_id not in done]


def finished_markers(out_dir: str) -> dict[int, dict[str, Any]]:
    fs, root = fsspec.core.url_to_fs(out_dir)
    out = {}
    for path in fs.glob(join(root, "_done", "shard-*.json")):
        with fs.open(path, "r") as f:
            marker = json.load(f)
        out[int(marker["shard_id"])] = marker
    return out


def score_corpus(
    cfg: RunConfig, out_dir: str, warmup: str | None = None, base_scores_dir: str | None = None, label: str = "score"
) -> ScoreSummary:
    """Score the corpus into `out_dir` on Ray Data, resuming from any finished shards."""
    import ray.data

    from .engines import resolve_model

    t0 = time.monotonic()
    base_dir = resolve_model(cfg.model.base)
    warmup = resolve_model(warmup) if warmup else None
    shards = plan_shards(cfg.data)
    fp = fingerprint(cfg, shards, base_dir, warmup, base_scores_dir)
    pending = prepare_out_dir(out_dir, fp, shards)
    progress = Progress(label, sum(s.n_rows for s in shards), cfg.progress)
    progress.update(sum(s.n_rows for s in shards if s not in pending))
    if len(pending) < len(shards):
        progress.note(f"resuming: {len(shards) - len(pending)} of {len(shards)} shards already done")
    if pending:
        init_ray(cfg)
        ds = ray.data.from_items([s.to_dict() for s in pending], override_num_blocks=len(pending))
        ds = ds.map(tokenize_shard, fn_kwargs={"cfg": cfg, "tokenizer_dir": base_dir}, num_cpus=cfg.ray.tokenize_cpus)
        ds = ds.map_batches(
            ScoreActor,
            fn_constructor_kwargs={"cfg": cfg, "base_dir": base_dir, "warmup": warmup, "base_scores_dir": base_scores_dir},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=cfg.ray.min_actors, max_size=cfg.ray.max_actors),
            num_cpus=cfg.ray.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor(),
            max_restarts=cfg.ray.max_restarts,
            max_task_retries=cfg.ray.max_task_retries,
        )
        ds = ds.map(write_shard, fn_kwargs={"out_dir": out_dir}, num_cpus=cfg.ray.tokenize_cpus)
        for marker in ds.iter_rows():
            progress.update(int(marker["rows"]), int(marker["tokens"]), f"shard {shard_name(int(marker['shard_id']))}")
    return summarize(out_dir, shards, len(shards) - len(pending), time.monotonic() - t0)


def summarize(out_dir: str, shards: list[Shard], skipped: int, wall: float) -> ScoreSummary:
    """Totals from the markers; raises if any planned row is missing (nothing is lost silently)."""
    markers = finished_markers(out_dir)
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
        markers=ms,
    )
    fs, root = fsspec.core.url_to_fs(out_dir)
    with fs.open(join(root, "_summary.json"), "w") as f:
        f.write(json.dumps(summary.to_dict(), indent=2))
    return summary


def check_config(cfg: RunConfig) -> None:
    """Config-time checks that need the file system but no model (planning the shards)."""
    try:
        plan_shards(cfg.data)
    except ConfigError:
        raise
    except Exception as err:  # unreadable file, permission, bad parquet
        raise ConfigError(f"data.paths: cannot plan shards: {err}") from err


def round_dir(run_dir: str, k: int) -> str:
    return join(run_dir, f"round-{k}")


def run_job(cfg: RunConfig) -> dict[str, Any]:
    """warmup → score → select for K rounds in one run directory; every step resumes.

    Round 1 scores base and warmup; round k ≥ 2 trains a new warmup from the base on round
    k−1's selection, scores only the warmup pass and reuses round 1's base columns.
    """
    from .report import write_run_report
    from .selection import load_scores, select, write_selection
    from .warmup import collect_samples, draw_rows, selected_rows, train_warmup

    t0 = time.monotonic()
    fs, root = fsspec.core.url_to_fs(cfg.out)
    fs.makedirs(root, exist_ok=True)
    with fs.open(join(root, "_run_config.json"), "w") as f:
        f.write(cfg.model_dump_json(indent=2))
    shards = plan_shards(cfg.data)
    rounds: list[dict[str, Any]] = []
    train_rows: dict[str, set[int]] | None = None
    for k in range(1, cfg.rounds + 1):
        rdir = round_dir(cfg.out, k)
        timings: dict[str, float] = {}
        t = time.monotonic()
        if k == 1 and cfg.model.warmup:
            warm_model, warm_info = cfg.model.warmup, {"given": cfg.model.warmup}
        else:
            if k == 1:
                ordinals = draw_rows(shards, cfg.warmup.alpha, cfg.warmup.count, cfg.warmup.seed)
                samples = collect_samples(cfg, shards, ordinals=ordinals)
            else:
                samples = collect_samples(cfg, shards, rows=train_rows)
            progress = Progress(f"warmup r{k}", 1, cfg.progress)
            progress.note(f"training on {len(samples)} samples ({cfg.warmup.method})")
            result = train_warmup(cfg, samples, join(rdir, "warmup"))
            warm_model, warm_info = result.scoring_model, result.__dict__
        timings["warmup_s"] = time.monotonic() - t
        t = time.monotonic()
        base_from = join(round_dir(cfg.out, 1), "scores") if k > 1 else None
        summary = score_corpus(cfg, join(rdir, "scores"), warmup=warm_model, base_scores_dir=base_from, label=f"score r{k}")
        timings["score_s"] = time.monotonic() - t
        t = time.monotonic()
        sel = select(load_scores(join(rdir, "scores")), cfg.selection)
        paths = write_selection(sel, join(rdir, "selection"), cfg.selection.output_format)
        timings["select_s"] = time.monotonic() - t
        Progress(f"select r{k}", 1, cfg.progress).note(
            f"{sel.stats['selected_rows']} of {sel.stats['rows_scored']} rows selected -> {paths['data']}")
        train_rows = selected_rows(paths["scores"])
        rounds.append({"round": k, "warmup": warm_info, "scoring": summary.to_dict(), "selection": sel.stats,
                       "paths": paths, "timings": timings})
    result = {"run_dir": cfg.out, "rounds": rounds, "final_selection": rounds[-1]["paths"],
              "wall_seconds": time.monotonic() - t0}
    with fs.open(join(root, "_run_summary.json"), "w") as f:
        f.write(json.dumps(result, indent=2, default=str))
    write_run_report(cfg.out)
    return result

