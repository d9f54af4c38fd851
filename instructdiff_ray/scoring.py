"""Scoring stage: the three per-shard steps that Ray Data runs.

1. `tokenize_unit` (CPU task): read + normalise + template + tokenize the shards of one read
   unit (corpus.py), yielding one Arrow row per shard.
2. `ScoreActor` (actor pool, GPU or CPU): both model passes over the shard's ok rows.
3. `write_shard` (CPU task): the shard's Parquet file, then its marker (rundir.write_shard_output).

A shard is finished exactly when its marker exists; the marker holds the shard's counts, so
status and resume never read the score files themselves.

Failures: a fault that poisons the process (EngineFault: a CUDA error, a dead vLLM engine, the
same error on every row) ends the actor, and Ray restarts it and retries the shard
(`ray.max_restarts`, `ray.max_task_retries`); only a row that fails alone becomes `error`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import sys
import time
from collections import Counter
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import rundir
from .config import RunConfig
from .corpus import Sample, Shard, iter_unit, normalize_rows
from .engines.base import INVALID_ROW
from .template import TEMPLATE_ERROR, response_alone, tokenize_samples

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("shard_id", pa.int32()),
        ("n_prompt_tokens", pa.int32()),
        ("n_response_tokens", pa.int32()),
        ("base_nll", pa.float64()),
        ("base_entropy", pa.float64()),
        ("warmup_nll", pa.float64()),
        ("warmup_entropy", pa.float64()),
        ("delta_nll", pa.float64()),
        ("delta_entropy", pa.float64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("base_nll_alone", pa.float64()),  # template.ifd: the response scored without its prompt (else null)
    ]
)
SCORE_ERROR = "error"
NONFINITE = "nonfinite"
QUARANTINE_STATUSES = {"malformed_json", "invalid_utf8"}
# Statuses that count against `run.max_error_fraction` (the others are properties of the data).
ERROR_STATUSES = {SCORE_ERROR, TEMPLATE_ERROR, NONFINITE}


# One tokenized shard per row, as Arrow columns (no pickled Python lists between stages).
TOKENIZED = pa.schema([
    ("shard_id", pa.int64()),
    ("source_file", pa.string()),
    ("sample_id", pa.list_(pa.string())),
    ("source_row", pa.list_(pa.int64())),
    ("input_ids", pa.list_(pa.list_(pa.int32()))),
    ("response_mask", pa.list_(pa.list_(pa.bool_()))),
    ("n_prompt", pa.list_(pa.int32())),
    ("n_resp", pa.list_(pa.int32())),
    ("status", pa.list_(pa.string())),
    ("reason", pa.list_(pa.string())),
    ("alone_ids", pa.list_(pa.list_(pa.int32()))),  # template.ifd: each response tokenized alone (else empty)
    ("alone_mask", pa.list_(pa.list_(pa.bool_()))),
    ("quarantine", pa.string()),  # JSON list of the shard's unparseable lines
    ("tokenize_seconds", pa.float64()),  # read + normalise + template + tokenize of this shard
])


def tokenize_unit(batch: dict[str, np.ndarray], cfg: RunConfig, tokenizer: str) -> Iterator[pa.Table]:
    """CPU task: one read unit in (shard specs as JSON), one tokenized shard out per yield: the
    unit's file is read in one sequential pass. The tokenizer is the base model's, resolved on
    this node (`tokenizer` is the pinned model spec)."""
    tok = _cached_tokenizer(tokenizer)
    for spec in batch["shards"]:
        shards = [Shard.from_dict(d) for d in json.loads(spec)]
        started = time.perf_counter()
        for shard, rows in iter_unit(shards):
            yield tokenize_rows(shard, normalize_rows(shard, rows, cfg.data), cfg, tok, started)
            started = time.perf_counter()


def tokenize_rows(shard: Shard, samples: list[Sample], cfg: RunConfig, tokenizer: Any, started: float) -> pa.Table:
    """One shard's tokenized rows as a one-row Arrow table; `started` is when reading it began."""
    toks = tokenize_samples(samples, cfg.template, tokenizer)
    alone = response_alone(samples, toks, cfg.template, tokenizer) if cfg.template.ifd else [([], [])] * len(samples)
    quarantine = [{"source_file": s.source_file, "line": s.source_row + 1, "status": s.status, "raw": s.raw}
                  for s in samples if s.status in QUARANTINE_STATUSES]
    columns = {
        "shard_id": [shard.shard_id],
        "source_file": [shard.path],
        "sample_id": [[s.sample_id for s in samples]],
        "source_row": [[s.source_row for s in samples]],
        "input_ids": [[t.input_ids for t in toks]],
        "response_mask": [[t.response_mask for t in toks]],
        "n_prompt": [[t.n_prompt_tokens for t in toks]],
        "n_resp": [[t.n_response_tokens for t in toks]],
        "status": [[t.status for t in toks]],
        "reason": [[t.reason for t in toks]],
        "alone_ids": [[a[0] for a in alone]],
        "alone_mask": [[a[1] for a in alone]],
        "quarantine": [json.dumps(quarantine, ensure_ascii=False)],
        "tokenize_seconds": [time.perf_counter() - started],
    }
    return pa.table(columns, schema=TOKENIZED)


_TOKENIZERS: dict[str, Any] = {}


def _cached_tokenizer(spec: str):
    from .models import load_tokenizer, resolve_model

    if spec not in _TOKENIZERS:
        _TOKENIZERS[spec] = load_tokenizer(resolve_model(spec, tokenizer_only=True))
    return _TOKENIZERS[spec]


# What the base pool adds to a tokenized shard for the warmup pool (engine.placement: pools).
BASE_PASS = [("base_nll", pa.list_(pa.float64())), ("base_entropy", pa.list_(pa.float64())),
             ("base_nll_alone", pa.list_(pa.float64())), ("base_stats", pa.string())]


class ScoreActor:
    """Holds its models for its lifetime and scores whole shards.

    stage "all": base + warmup models in one actor (engine.placement: together). With
    `base_scores_dir` set (rounds ≥ 2) the base columns are read from that directory's shard
    file instead of being recomputed: base scores never change across rounds.
    stage "base" / "warmup" (engine.placement: pools): one model per actor; the base pool adds
    the base columns to the tokenized shard, the warmup pool finishes it.
    """

    def __init__(self, cfg: RunConfig, base: str, warmup: str | None, base_scores_dir: str | None, stage: str = "all"):
        from .engines import engine_class, make_engine
        from .engines.base import engine_settings
        from .models import is_adapter, merged_warmup, resolve_model
        from .runtime import quiet_libraries

        quiet_libraries(cfg.progress)
        # Models are resolved here, on the node that runs them (once per node, into its cache).
        base_dir = resolve_model(base)
        warmup_dir = resolve_model(warmup) if warmup else None
        if warmup and not engine_class(cfg.engine.name).loads_adapters and is_adapter(warmup_dir):
            warmup_dir = merged_warmup(warmup, base_dir)  # the warmup stage's merged/ when it checks out
        if stage == "warmup" and cfg.ray.warmup_pool.gpus_per_actor is not None:  # its own GPU share (memory.py)
            cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"gpus_per_actor": cfg.ray.warmup_pool.gpus_per_actor})})
        self.cfg = cfg
        self.base_scores_dir = base_scores_dir
        self.stage = stage
        passes = {"base": ("base",), "warmup": ("warmup",)}.get(stage, ("warmup",) if base_scores_dir else ("base", "warmup"))
        settings = engine_settings(cfg, passes)
        self.passes = [q for q in passes if q == "base" or warmup_dir]
        self.engine = make_engine(cfg.engine.name, base_dir, warmup_dir if stage != "base" else None, settings)

    def __call__(self, batch: pa.Table) -> dict[str, list] | pa.Table:
        from .engines.base import EngineFault

        out: dict[str, list] = {"shard_id": [], "payload": [], "stats": []}
        partial = []
        for payload in batch.to_pylist():
            shard_id = payload["shard_id"]
            payload["quarantine"] = json.loads(payload["quarantine"])
            try:
                if self.stage == "base":
                    partial.append(self.base_pass(payload))
                    continue
                table, stats = self.score_payload(int(shard_id), payload)
            except EngineFault as err:
                # The process is poisoned: end it so that Ray restarts the actor and retries the shard.
                print(f"[score] {socket.gethostname()}:{os.getpid()} systemic fault on {rundir.shard_name(int(shard_id))}: "
                      f"{err}; ending this actor so Ray restarts it", file=sys.stderr, flush=True)
                os._exit(70)
            out["shard_id"].append(int(shard_id))
            out["payload"].append(pickle.dumps({"table": table, "quarantine": payload["quarantine"]}))
            out["stats"].append(json.dumps(stats))
        if self.stage == "base":
            return pa.Table.from_pylist(partial, schema=pa.schema([*TOKENIZED, *BASE_PASS]))
        return out

    def base_pass(self, p: dict[str, Any]) -> dict[str, Any]:
        """The base pool's part: the shard as it came, plus its base columns and statuses."""
        cols, status, reason, stats = self._run_passes(p, list(p["status"]), list(p["reason"]))
        return {**p, "quarantine": json.dumps(p["quarantine"], ensure_ascii=False), "status": status, "reason": reason,
                "base_nll": cols["base_nll"].tolist(), "base_entropy": cols["base_entropy"].tolist(),
                "base_nll_alone": cols["base_nll_alone"].tolist(), "base_stats": json.dumps(stats)}

    def _run_passes(self, p: dict[str, Any], status: list[str], reason: list[str]):
        """This actor's model passes over the shard's ok rows (base columns from the base pool, or
        from round 1's files, when this actor runs only the warmup)."""
        n = len(p["sample_id"])
        cols = {k: np.full(n, np.nan) for k in ("base_nll", "base_entropy", "warmup_nll", "warmup_entropy", "base_nll_alone")}
        stats = {"base_tokens": 0, "base_seconds": 0.0, "warmup_tokens": 0, "warmup_seconds": 0.0,
                 "alone_tokens": 0, "alone_seconds": 0.0,
                 "tokenize_seconds": p.get("tokenize_seconds", 0.0),
                 "actor": f"{socket.gethostname()}:{os.getpid()}", "node": _node_id()}
        if p.get("base_nll") is not None:  # scored by the base pool
            cols["base_nll"][:] = np.array(p["base_nll"], dtype=float)
            cols["base_entropy"][:] = np.array(p["base_entropy"], dtype=float)
            cols["base_nll_alone"][:] = np.array(p["base_nll_alone"], dtype=float)
            base = json.loads(p["base_stats"])
            stats.update({k: base[k] for k in ("base_tokens", "base_seconds", "alone_tokens", "alone_seconds")},
                         base_actor=base["actor"])
        elif self.base_scores_dir:
            self._reuse_base(int(p["shard_id"]), p, cols, status, reason)
        ok = [i for i in range(n) if status[i] == "ok"]
        for which in self.passes:
            run = [i for i in ok if status[i] == "ok"]  # a row that failed the base pass is not run again
            res = self.engine.score([p["input_ids"][i] for i in run], [p["response_mask"][i] for i in run], which)
            cols[f"{which}_nll"][run] = res.nll
            cols[f"{which}_entropy"][run] = res.entropy
            stats[f"{which}_tokens"] += res.tokens
            stats[f"{which}_seconds"] += res.seconds
            for j, msg in res.errors.items():
                status[run[j]], reason[run[j]] = SCORE_ERROR, f"{which} pass: {msg}"
            if which == "base" and self.cfg.template.ifd:  # the IFD baselines' extra pass: responses alone
                alone = [i for i in ok if status[i] == "ok" and p["alone_ids"][i]]
                res = self.engine.score([p["alone_ids"][i] for i in alone], [p["alone_mask"][i] for i in alone], "base")
                cols["base_nll_alone"][alone] = res.nll  # a row whose alone pass failed keeps null: no IFD
                stats["alone_tokens"] += res.tokens
                stats["alone_seconds"] += res.seconds
        return cols, status, reason, stats

    def score_payload(self, shard_id: int, p: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
        n = len(p["sample_id"])
        ok = [i for i in range(n) if p["status"][i] == "ok"]
        cols, status, reason, stats = self._run_passes(p, list(p["status"]), list(p["reason"]))
        has_warmup = self.engine.has_warmup or p.get("base_nll") is not None
        alone = cols.pop("base_nll_alone")
        delta_nll = cols["base_nll"] - cols["warmup_nll"]
        delta_ent = cols["base_entropy"] - cols["warmup_entropy"]
        for i in ok:
            if status[i] != "ok":
                continue
            vals = [cols[k][i] for k in cols] if has_warmup else [cols["base_nll"][i], cols["base_entropy"][i]]
            if not np.all(np.isfinite(vals)):
                status[i], reason[i] = NONFINITE, "a score is NaN or inf"
        good = np.array([s == "ok" for s in status])
        for arr in (*cols.values(), delta_nll, delta_ent, alone):
            arr[~good] = np.nan  # only ok rows carry scores
        table = pa.table(
            {
                "sample_id": p["sample_id"],
                "source_file": [p["source_file"]] * n,
                "source_row": p["source_row"],
                "shard_id": [shard_id] * n,
                "n_prompt_tokens": p["n_prompt"],
                "n_response_tokens": p["n_resp"],
                **{k: pa.array(v, from_pandas=True) for k, v in cols.items()},
                "delta_nll": pa.array(delta_nll, from_pandas=True),
                "delta_entropy": pa.array(delta_ent, from_pandas=True),
                "status": status,
                "reason": reason,
                "base_nll_alone": pa.array(alone, from_pandas=True),
            },
            schema=SCHEMA,
        )
        return table, stats

    def _reuse_base(self, shard_id, p, cols, status, reason) -> None:
        path = rundir.shard_file(self.base_scores_dir, shard_id)
        with fsspec.open(path, "rb") as f:
            prev = pq.read_table(f, columns=["sample_id", "source_row", "base_nll", "base_entropy", "base_nll_alone",
                                             "status"]).to_pydict()
        if prev["source_row"] != p["source_row"]:
            raise RuntimeError(f"{path}: rows differ from this shard's plan; the base scores belong to another input")
        for i in range(len(status)):
            if status[i] == "ok" and prev["status"][i] != "ok":
                status[i], reason[i] = prev["status"][i], "base pass (earlier round): " + prev["status"][i]
        cols["base_nll"][:] = np.array(prev["base_nll"], dtype=float)
        cols["base_entropy"][:] = np.array(prev["base_entropy"], dtype=float)
        cols["base_nll_alone"][:] = np.array(prev["base_nll_alone"], dtype=float)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def write_shard(row: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """CPU task: commit the shard's file and then its marker; return the marker."""
    shard_id = int(row["shard_id"])
    data = pickle.loads(row["payload"])
    table: pa.Table = data["table"]
    status = table.column("status").to_pylist()
    statuses = Counter(status)
    reason = table.column("reason").to_pylist()
    reasons = Counter(f"{s}: {r}" for s, r in zip(status, reason) if s != "ok")
    n_resp = int(np.sum(table.column("n_response_tokens").to_numpy()))
    marker = {
        "shard_id": shard_id,
        "rows": table.num_rows,
        "status_counts": dict(statuses),
        "reasons": dict(reasons.most_common(5)),  # the shard's most frequent ones, for the run's account
        # rows that failed while being scored (out of memory, ...), which a rerun tries again
        "retry_rows": sum(s == SCORE_ERROR and not (r or "").startswith(INVALID_ROW) for s, r in zip(status, reason)),
        "tokens": int(np.sum(table.column("n_prompt_tokens").to_numpy())) + n_resp,
        "response_tokens": n_resp,
        "finished_at": time.time(),
        **json.loads(row["stats"]),
    }
    rundir.write_shard_output(out_dir, shard_id, table, data["quarantine"], marker)
    return marker
