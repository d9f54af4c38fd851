"""Selection stage: global, vectorised, deterministic selection over the score columns.

The method (design brief §1 steps 4–5): among rows with status ok, sort by ΔNLL (ties by
sample_id) and drop ⌊γ·n⌋ from each end (nothing if 2⌊γ·n⌋ ≥ n); rank the rest by signed ΔH
ascending (ties by sample_id); fill the budget in that order, the row that crosses the token
budget included. Every sort is a pyarrow sort_indices, every fill a numpy cumsum: no Python
loop over rows, so 10M rows take seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import rundir
from .config import SelectionConfig
from .corpus import Shard
from .faults import kill_point

log = logging.getLogger(__name__)

STRATEGIES = {
    "instructdiff": "NLL two-tailed filter, then lowest signed ΔH first (the method)",
    "middle_dh": "NLL filter, then the ΔH window around the median",
    "highest_dh": "NLL filter, then highest ΔH first",
    "random": "uniform random rows (seeded), no filter",
    "ppl_min": "lowest base-model perplexity first, no filter",
    "ppl_max": "highest base-model perplexity first, no filter",
    "entropy_min": "lowest base-model entropy first, no filter",
    "entropy_max": "highest base-model entropy first, no filter",
}
SCORE_COLUMNS = ["sample_id", "source_file", "source_row", "n_response_tokens", "base_nll", "base_entropy",
                 "delta_nll", "delta_entropy", "status"]
QUANTILES = [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0]


@dataclass
class Selection:
    rows: pa.Table  # the selected score rows in rank order, with a `rank` column
    stats: dict[str, Any]
    kept_mask: np.ndarray  # over the scored (ok, deduplicated) rows: survived the NLL filter
    scored: pa.Table  # the ok, deduplicated rows the selection was made from


def load_scores(scores_dir: str, columns: list[str] | None = None) -> pa.Table:
    """All shard files of a scores directory (those with completion markers when markers exist)."""
    files = rundir.score_files(scores_dir)
    if not files:
        raise FileNotFoundError(f"no score files (*.parquet) in {scores_dir}")
    tables = []
    for path in files:
        fs, p = rundir.fs_of(path)
        with fs.open(p, "rb") as f:  # repetitive strings dictionary-encoded: 10M rows stay small
            tables.append(pq.read_table(f, columns=columns, read_dictionary=["source_file", "status", "reason"]))
    return pa.concat_tables(tables, promote_options="permissive")


def _sorted(table: pa.Table, column: str, order: str) -> np.ndarray:
    return pc.sort_indices(table, sort_keys=[(column, order), ("sample_id", "ascending")]).to_numpy()


def nll_filter(scored: pa.Table, gamma: float) -> tuple[np.ndarray, int]:
    """Boolean keep-mask after dropping ⌊γ·n⌋ rows at each end of the ΔNLL order, and that count."""
    n = scored.num_rows
    k = int(np.floor(gamma * n))
    keep = np.ones(n, dtype=bool)
    if k > 0 and 2 * k < n:
        order = _sorted(scored, "delta_nll", "ascending")
        keep[order[:k]] = False
        keep[order[n - k:]] = False
    else:
        k = 0
    return keep, k


def fill_budget(order: np.ndarray, tokens: np.ndarray, budget: int, unit: str) -> np.ndarray:
    """Prefix of `order` that fills the budget.

    Tokens: rows are taken while the tokens taken before them are under the budget, so the row
    that crosses it is included and at least one row is taken (the authors' append-then-check).
    """
    if unit == "samples":
        return order[:budget]
    before = np.cumsum(tokens[order]) - tokens[order]  # tokens taken before each row
    return order[: max(int(np.searchsorted(before, budget, side="left")), min(1, len(order)))]


def _dedupe(ok: pa.Table) -> tuple[pa.Table, int]:
    """Keep the first occurrence of each sample_id (rows arrive in shard order, i.e. file/row order;
    Arrow's sort is stable, so the first of each run of equal ids is the earliest row)."""
    order = pc.sort_indices(ok, sort_keys=[("sample_id", "ascending")])
    ids = ok.column("sample_id").take(order)
    if len(ids) < 2:
        return ok, 0
    repeat = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
    if not repeat.any():
        return ok, 0
    first = np.concatenate([[True], ~repeat])
    return ok.take(np.sort(order.to_numpy()[first])), int(repeat.sum())


def _order(scored: pa.Table, keep: np.ndarray, cfg: SelectionConfig) -> np.ndarray:
    s = cfg.strategy
    if s == "random":
        by_id = pc.sort_indices(scored, sort_keys=[("sample_id", "ascending")]).to_numpy()
        return by_id[np.random.default_rng(cfg.seed).permutation(len(by_id))]
    if s in ("ppl_min", "ppl_max", "entropy_min", "entropy_max"):
        col = "base_nll" if s.startswith("ppl") else "base_entropy"
        return _sorted(scored, col, "ascending" if s.endswith("min") else "descending")
    kept_idx = np.flatnonzero(keep)
    sub = scored.take(kept_idx)
    rank = _sorted(sub, "delta_entropy", "descending" if s == "highest_dh" else "ascending")
    if s == "middle_dh":
        mid = (len(rank) - 1) / 2
        rank = rank[np.argsort(np.abs(np.arange(len(rank)) - mid), kind="stable")]
    return kept_idx[rank]


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {f"q{int(q * 100):02d}": None for q in QUANTILES}
    return {f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}


def select(table: pa.Table, cfg: SelectionConfig) -> Selection:
    """Run one selection strategy over a table of score rows (the scoring output contract)."""
    counts = {str(d["values"]): int(d["counts"]) for d in pc.value_counts(table.column("status").cast(pa.string())).to_pylist()}
    counts = dict(sorted(counts.items()))
    ok = table.filter(pc.equal(table.column("status").cast(pa.string()), "ok"))
    finite = np.isfinite(ok.column("delta_nll").to_numpy(zero_copy_only=False).astype(float)) & np.isfinite(
        ok.column("delta_entropy").to_numpy(zero_copy_only=False).astype(float))
    if cfg.strategy in ("instructdiff", "middle_dh", "highest_dh") and not finite.all():
        raise ValueError(f"{int((~finite).sum())} ok rows lack warmup scores; strategy {cfg.strategy} needs ΔNLL and ΔH")
    scored, duplicates = _dedupe(ok)
    n = scored.num_rows
    tokens = scored.column("n_response_tokens").to_numpy().astype(np.int64)
    total_tokens = int(tokens.sum())
    budget = int(np.floor(cfg.budget * (total_tokens if cfg.budget_unit == "tokens" else n)))
    filtered = cfg.strategy in ("instructdiff", "middle_dh", "highest_dh")
    keep, k = nll_filter(scored, cfg.gamma) if filtered else (np.ones(n, dtype=bool), 0)
    chosen = fill_budget(_order(scored, keep, cfg), tokens, budget, cfg.budget_unit)
    rows = scored.take(chosen).append_column("rank", pa.array(np.arange(len(chosen), dtype=np.int64)))
    dnll = scored.column("delta_nll").to_numpy(zero_copy_only=False).astype(float)
    dh = scored.column("delta_entropy").to_numpy(zero_copy_only=False).astype(float)
    stats = {
        "strategy": cfg.strategy,
        "rows_total": table.num_rows,
        "status_counts": counts,
        "rows_scored": n,
        "duplicates_dropped": duplicates,
        "gamma": cfg.gamma,
        "trimmed_per_tail": k,
        "rows_after_nll_filter": int(keep.sum()),
        "delta_nll_kept_range": [float(dnll[keep].min()), float(dnll[keep].max())] if filtered and keep.any() else None,
        "budget": {"unit": cfg.budget_unit, "beta": cfg.budget, "value": budget, "total_response_tokens": total_tokens},
        "selected_rows": len(chosen),
        "selected_response_tokens": int(tokens[chosen].sum()),
        "delta_entropy_threshold": float(dh[chosen].max()) if len(chosen) and cfg.strategy == "instructdiff" else None,
        "delta_entropy": {"all": _quantiles(dh[np.isfinite(dh)]), "selected": _quantiles(dh[chosen][np.isfinite(dh[chosen])])},
        "delta_nll": {"all": _quantiles(dnll[np.isfinite(dnll)]), "selected": _quantiles(dnll[chosen][np.isfinite(dnll[chosen])])},
    }
    return Selection(rows=rows, stats=stats, kept_mask=keep, scored=scored)


def write_selection(sel: Selection, out_dir: str, output_format: str = "auto", export: str = "auto",
                    plan: list[Shard] | None = None) -> dict[str, str]:
    """selected_ids.txt, selection.parquet (scores + rank), stats.json and the user's records
    (export.py), each written atomically, then the commit marker that makes the selection count.

    `export`: auto writes the records when every source file is reachable from here and warns
    otherwise (scores copied off a cluster); always fails without them; never skips them."""
    from .export import SourceMissing, export_selection, missing_sources
    from .export import output_format as choose_format

    sources = sorted(set(sel.rows.column("source_file").cast(pa.string()).to_pylist()))
    missing = missing_sources(sources) if export != "never" else []
    if missing and export == "always":
        raise SourceMissing(f"cannot export the selected records: {len(missing)} source files are not reachable "
                            f"from here (first: {missing[0]}); use --export never to write ids and scores only")
    rundir.clear_dir(rundir.join(out_dir, rundir.SELECTION_COMMIT))  # a rewrite is uncommitted until it finishes
    paths = rundir.selection_paths(out_dir)
    rundir.write_bytes(paths["ids"], "".join(f"{sid}\n" for sid in sel.rows.column("sample_id").to_pylist()).encode())
    rundir.write_parquet(paths["scores"], sel.rows)
    rundir.write_json(paths["stats"], sel.stats, indent=2)
    kill_point("selection.between_files")
    if export == "never":
        log.info("selection: export of the records skipped (export=never)")
    elif missing:
        log.warning("selection: %d source files are not reachable from here (first: %s); wrote the ids, "
                    "selection.parquet and stats, not the records (run `select` where the corpus is, or --export always)",
                    len(missing), missing[0])
    else:
        paths["data"], _ = export_selection(sel.rows, plan, out_dir, choose_format(sources, output_format))
    rundir.commit_selection(out_dir, paths, sel.stats)
    return paths


def selected_rows(selection_parquet: str) -> dict[str, set[int]]:
    """(file -> rows) of a round's selection: the next round's warmup training set."""
    with fsspec.open(selection_parquet, "rb") as f:
        t = pq.read_table(f, columns=["source_file", "source_row"]).to_pydict()
    out: dict[str, set[int]] = {}
    for src, row in zip(t["source_file"], t["source_row"]):
        out.setdefault(src, set()).add(row)
    return out
