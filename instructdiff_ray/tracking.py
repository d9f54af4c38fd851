"""Experiment tracking: a finished run logged to MLflow (`tracking.mlflow: true`).

Logged once the job has written its summary and report: the whole config as parameters
(dotted keys), per-round metrics (rows, statuses, selected rows and tokens, tokens/s per pass,
stage timings; `step` = round), the selection stats as JSON, and the report (index.html,
summary.md, every plot) as artifacts. The MLflow run id is returned and kept in the run summary.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from . import rundir
from .config import ConfigError, RunConfig
from .records import RoundRecord, RunSummary

PARAM_CHARS = 500  # long values (lists of paths) are cut, as a parameter is a label, not data


def check(cfg: RunConfig) -> None:
    """Config time: tracking asked for but MLflow not installed."""
    if cfg.tracking.mlflow:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("tracking.mlflow needs MLflow: pip install 'instructdiff-ray[tracking]'") from None


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:PARAM_CHARS]
    return out


def round_metrics(rnd: RoundRecord) -> dict[str, float]:
    sc, st = rnd.scoring.to_dict(), rnd.selection
    m = {"rows": sc["rows"], "rows_scored": st.rows_scored, "selected_rows": st.selected_rows,
         "selected_response_tokens": st.selected_response_tokens, "duplicates_dropped": st.duplicates_dropped,
         "base_tokens": sc["base_tokens"], "warmup_tokens": sc["warmup_tokens"], "shards": sc["shards_total"],
         "shards_resumed": sc["shards_skipped"], "too_long_share": sc["too_long_share"]}
    m.update({f"{k}_tokens_per_s": sc[f"{k}_tokens_per_s"] for k in ("base", "warmup") if sc.get(f"{k}_tokens_per_s")})
    m.update({f"status_{k}": v for k, v in sc["status_counts"].items()})
    m.update(rnd.timings)
    return {k: float(v) for k, v in m.items() if v is not None}


def log_run(cfg: RunConfig, result: RunSummary) -> str | None:
    """Log the finished run; returns the MLflow run id (None when tracking is off)."""
    if not cfg.tracking.mlflow:
        return None
    import mlflow

    from .version import __version__

    if cfg.tracking.mlflow_uri:
        mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    name = cfg.tracking.run_name or cfg.out.rstrip("/").rsplit("/", 1)[-1]
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags({"instructdiff.run_dir": cfg.out, "instructdiff.version": __version__})
        mlflow.log_params(_flat(cfg.model_dump(mode="json")))
        for rnd in result.rounds:
            mlflow.log_metrics(round_metrics(rnd), step=rnd.round)
            mlflow.log_dict(rnd.selection.to_dict(), f"round-{rnd.round}/selection_stats.json")
        mlflow.log_metric("wall_seconds", float(result.wall_seconds))
        for row in (result.compare or {}).get("strategies", []):  # compare: held-out NLL per strategy
            mlflow.log_metric(f"compare.{row['strategy']}.heldout_nll", row["nll_mean"])
            if row.get("metric_mean") is not None:
                mlflow.log_metric(f"compare.{row['strategy']}.{result.compare['metric']}", row["metric_mean"])
        fs, report = rundir.fs_of(rundir.report_dir(cfg.out))
        with tempfile.TemporaryDirectory() as tmp:
            fs.get(report, os.path.join(tmp, "report"), recursive=True)
            mlflow.log_artifacts(os.path.join(tmp, "report"), "report")
        return run.info.run_id
