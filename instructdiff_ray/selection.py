"""Selection stage: global, vectorised, deterministic selection over the score columns.

The method (InstructDiff, steps 4–5): among rows with status ok, sort by ΔNLL (ties by
sample_id) and drop ⌊γ·n⌋ from each end (nothing if 2⌊γ·n⌋ ≥ n); rank the rest by signed ΔH
ascending (ties by sample_id); fill the budget in that order, the row that crosses the token
budget included. The rows are put in sample_id order once (one string sort, which also drops
duplicate ids); every later sort is a stable numpy argsort, so ties keep sample_id order, and
every fill a cumsum. No Python loop over rows and no copy of the table but the selected rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import rundir
from .config import SelectionConfig
from .corpus import Shard
from .faults import kill_point
from .strategies import ALONE, STRATEGIES, Strategy, order, stable_order

log = logging.getLogger(__name__)

SCORE_COLUMNS = ["sample_id", "source_file", "source_row", "n_response_tokens", "base_nll", "base_entropy",
                 "delta_nll", "delta_entropy", "status"]
QUANTILES = [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0]


@dataclass
class Selection:
    rows: pa.Table | None  # the selected score rows in rank order, with a `rank` column (None: held as `parts`)
    stats: dict[str, Any]
    kept_mask: np.ndarray | None  # over the scored rows (in sample_id order): survived the NLL filter
    source: pa.Table | None  # the score rows the selection was made from (None: found by the distributed search)
    scored_idx: np.ndarray | None  # rows of `source` that were ranked: ok, deduplicated, in sample_id order
    parts: list[Any] = field(default_factory=list)  # the search's object refs of consecutive rank ranges
    schema: pa.Schema | None = None  # of every part (the parts' schemas unified)
    sources: list[str] | None = None  # the source files of the selected rows, when held as parts

    @property
    def scored(self) -> pa.Table:
        """The ok, deduplicated rows the selection was made from, in sample_id order."""
        if self.source is None:
            raise ValueError("a selection found by the distributed search keeps no copy of the scored rows")
        return self.source.take(self.scored_idx)

    def batches(self) -> Iterator[pa.Table]:
        """The selected rows in rank order, one rank range at a time: a selection found by the search
        is never held whole by the process that writes it."""
        if self.rows is not None:
            yield self.rows
            return
        import ray

        for ref in self.parts:
            yield conform(ray.get(ref), self.schema)

    def table(self) -> pa.Table:
        """Every selected row in one table (gathered from the parts when held as parts)."""
        return self.rows if self.rows is not None else pa.concat_tables(list(self.batches()))

    def source_files(self) -> list[str]:
        if self.sources is not None:
            return self.sources
        return sorted(set(self.rows.column("source_file").cast(pa.string()).to_pylist()))


def conform(table: pa.Table, schema: pa.Schema | None) -> pa.Table:
    """`table` with exactly `schema`'s columns and types (a column a part lacks is null)."""
    if schema is None or table.schema.equals(schema):
        return table
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def check_scores_finished(scores_dir: str, partial: bool = False) -> None:
    """Refuse to select from a scores directory whose scoring has not finished (a selection from
    some of the rows would look like a selection from all of them), unless `partial`."""
    from .config import ConfigError

    if not rundir.exists(scores_dir):
        raise ConfigError(f"--scores: {scores_dir} does not exist")
    if not rundir.is_scores_dir(scores_dir):
        if not rundir.score_files(scores_dir):
            raise ConfigError(f"--scores: {scores_dir} holds no score files (*.parquet); point it at a round's "
                              "scores directory, e.g. RUN/round-1/scores")
        return  # score files from elsewhere, without a plan: all there is
    planned = {d["shard_id"]: d["n_rows"] for d in rundir.read_manifest(scores_dir)["plan"]}
    done = rundir.finished_markers(scores_dir)
    missing = [sid for sid in planned if sid not in done]
    if missing and not partial:
        rows = sum(planned[s] for s in missing)
        raise ConfigError(f"--scores: scoring of {scores_dir} is not finished ({len(missing)} of {len(planned)} shards, "
                          f"{rows} rows, have no output yet); wait for it or rerun it to the end, or pass --partial to "
                          "select from the finished shards only")
    if missing:
        log.warning("selecting from %d of %d shards (--partial)", len(planned) - len(missing), len(planned))


def load_scores(scores_dir: str, columns: list[str] | None = None) -> pa.Table:
    """All shard files of a scores directory (those with completion markers when markers exist)."""
    files = rundir.score_files(scores_dir)
    if not files:
        raise FileNotFoundError(f"no score files (*.parquet) in {scores_dir}")
    return pa.concat_tables([rundir.read_score_file(f, columns) for f in files], promote_options="permissive")


def nll_filter(dnll: np.ndarray, gamma: float) -> tuple[np.ndarray, int]:
    """Boolean keep-mask after dropping ⌊γ·n⌋ rows at each end of the ΔNLL order, and that count."""
    n = len(dnll)
    k = int(np.floor(gamma * n))
    keep = np.ones(n, dtype=bool)
    if k > 0 and 2 * k < n:
        order = stable_order(dnll)
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


def _prefix_keys(ids: pa.Array) -> np.ndarray:
    """The first 8 bytes of each string as a big-endian uint64 (zero-padded): ordering by it is
    ordering by the strings, up to ties between strings that share those 8 bytes."""
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        ids = ids.cast(pa.string())
    n = len(ids)
    width = np.int64 if pa.types.is_large_string(ids.type) else np.int32
    offsets = np.frombuffer(ids.buffers()[1], dtype=width)[ids.offset : ids.offset + n + 1].astype(np.int64)
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8) if ids.buffers()[2] is not None else np.zeros(1, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    key = np.zeros(n, dtype=np.uint64)
    for j in range(8):
        has = lengths > j
        byte = np.zeros(n, dtype=np.uint64)
        byte[has] = data[starts[has] + j]
        key |= byte << np.uint64(8 * (7 - j))
    return key


def _string_order(ids: pa.Array | pa.ChunkedArray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stable argsort of the strings ids[rows] by byte order (as Arrow sorts them), and for each
    sorted position after the first whether it repeats its predecessor. A numpy sort of 8-byte
    prefix keys; Arrow's string sort runs only within runs of equal prefixes, on those rows."""
    chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
    key = np.concatenate([_prefix_keys(c) for c in chunks]) if chunks else np.zeros(0, np.uint64)
    rows = np.arange(len(key)) if rows is None else rows
    key = key[rows]
    order = np.argsort(key, kind="stable")
    repeat = np.zeros(max(len(order) - 1, 0), dtype=bool)
    sk = key[order]
    same = sk[1:] == sk[:-1]
    in_run = np.zeros(len(order), dtype=bool)
    in_run[1:] |= same
    in_run[:-1] |= same
    if in_run.any():
        pos = np.flatnonzero(in_run)
        sub = np.sort(order[pos])  # in row order, so that equal strings stay in row order
        strings = ids.take(pa.array(rows[sub]))
        by = pc.sort_indices(pa.table({"k": key[sub], "s": strings}), sort_keys=[("k", "ascending"), ("s", "ascending")])
        order[pos] = sub[by.to_numpy()]
        s = strings.take(by)
        equal = pc.equal(s.slice(1), s.slice(0, len(s) - 1)).to_numpy(zero_copy_only=False)
        adjacent = pos[1:] == pos[:-1] + 1
        repeat[pos[:-1][equal & adjacent]] = True
    return order, repeat


def _by_id(table: pa.Table, ok: np.ndarray) -> tuple[np.ndarray, int]:
    """The ok rows in sample_id order, keeping the first occurrence of each id (rows arrive in
    shard order, i.e. file/row order, and the sort is stable), and how many were dropped. The
    one string sort of the selection; every later sort is a stable numeric one."""
    order, repeat = _string_order(table.column("sample_id"), ok)
    first = np.concatenate([[True], ~repeat]) if len(order) else np.zeros(0, dtype=bool)
    return ok[order[first]], int(repeat.sum())


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {f"q{int(q * 100):02d}": None for q in QUANTILES}
    return {f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}


def _floats(table: pa.Table, name: str, rows: np.ndarray) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(float, copy=False)[rows]


def ifd(table: pa.Table, rows: np.ndarray, strategy: str) -> np.ndarray:
    """IFD per row (the derived score of the ifd strategies): NaN where not scored alone."""
    return _columns(table, rows, strategy)["ifd"]


def _columns(table: pa.Table, rows: np.ndarray, strategy: str) -> dict[str, np.ndarray]:
    """The columns a strategy reads (and the scores it derives), over the ranked rows."""
    st = STRATEGIES[strategy]
    if st.needs_alone and (ALONE not in table.column_names or table.column(ALONE).null_count == table.num_rows):
        raise ValueError(f"strategy {strategy} needs the responses scored alone: score with template.ifd: true")
    cols = {c: _floats(table, c, rows) for c in ("delta_nll", "delta_entropy", *st.columns) if c != "sample_id"}
    if "sample_id" in st.columns:
        cols["sample_id"] = table.column("sample_id").take(pa.array(rows)).to_numpy(zero_copy_only=False)
    for name, derive in st.derived.items():
        cols[name] = derive(cols)
    return cols


def lower_median(values: np.ndarray) -> float:
    """The value at rank ⌊(m−1)/2⌋ of m values: a value of a row, so both selection paths agree exactly."""
    return float(np.partition(values, (len(values) - 1) // 2)[(len(values) - 1) // 2]) if len(values) else 0.0


def context(strategy: Strategy, cols: dict[str, np.ndarray], keep: np.ndarray, seed: int) -> dict[str, float]:
    """What a strategy's key needs besides the row: the seed and, for a centred key, the median."""
    ctx = {"seed": float(seed)}
    if strategy.center:
        ctx["center"] = lower_median(cols[strategy.center][keep])
    return ctx


def select(table: pa.Table, cfg: SelectionConfig) -> Selection:
    """Run one selection strategy over a table of score rows (the scoring output contract).
    Works on row indices and numpy columns; only the selected rows are copied out of `table`."""
    status = table.column("status")
    counts = {str(d["values"]): int(d["counts"]) for d in pc.value_counts(status.cast(pa.string())).to_pylist()}
    counts = dict(sorted(counts.items()))
    ok = np.flatnonzero(pc.equal(status.cast(pa.string()), "ok").to_numpy(zero_copy_only=False))
    rows, duplicates = _by_id(table, ok)
    n = len(rows)
    strategy = STRATEGIES[cfg.strategy]
    cols = _columns(table, rows, cfg.strategy)
    dnll, dh = cols["delta_nll"], cols["delta_entropy"]
    finite = np.isfinite(dnll) & np.isfinite(dh)
    filtered = strategy.trim
    if filtered and not finite.all():
        raise ValueError(f"{int((~finite).sum())} ok rows lack warmup scores; strategy {cfg.strategy} needs ΔNLL and ΔH")
    tokens = table.column("n_response_tokens").to_numpy().astype(np.int64)[rows]
    cols["n_response_tokens"] = tokens
    total_tokens = int(tokens.sum())
    budget = int(np.floor(cfg.budget * (total_tokens if cfg.budget_unit == "tokens" else n)))
    keep, k = nll_filter(dnll, cfg.gamma) if filtered else (np.ones(n, dtype=bool), 0)
    chosen = fill_budget(order(strategy, cols, keep, context(strategy, cols, keep, cfg.seed)), tokens, budget,
                         cfg.budget_unit)
    picked = table.take(rows[chosen]).append_column("rank", pa.array(np.arange(len(chosen), dtype=np.int64)))
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
        "delta_entropy_threshold": float(dh[chosen].max()) if len(chosen) and strategy.threshold else None,
        "delta_entropy": {"all": _quantiles(dh[np.isfinite(dh)]), "selected": _quantiles(dh[chosen][np.isfinite(dh[chosen])])},
        "delta_nll": {"all": _quantiles(dnll[np.isfinite(dnll)]), "selected": _quantiles(dnll[chosen][np.isfinite(dnll[chosen])])},
    }
    return Selection(rows=picked, stats=stats, kept_mask=keep, source=table, scored_idx=rows)


def write_selection(sel: Selection, out_dir: str, output_format: str = "auto", export: str = "auto",
                    plan: list[Shard] | None = None, fingerprint: dict[str, Any] | None = None) -> dict[str, str]:
    """selected_ids.txt, selection.parquet (scores + rank), stats.json and the user's records
    (export.py), each written atomically, then the commit marker that makes the selection count.

    `export`: auto writes the records when every source file is reachable from here and warns
    otherwise (scores copied off a cluster); always fails without them; never skips them."""
    from .export import SourceMissing, export_selection, missing_sources
    from .export import output_format as choose_format

    sources = sel.source_files()
    missing = missing_sources(sources) if export != "never" else []
    if missing and export == "always":
        raise SourceMissing(f"cannot export the selected records: {len(missing)} source files are not reachable "
                            f"from here (first: {missing[0]}); use --export never to write ids and scores only")
    previous = rundir.committed_selection(out_dir)
    rundir.Stage("selection", out_dir).retract()  # a rewrite is uncommitted until it finishes
    if previous and previous.get("paths", {}).get("data"):  # records of another format must not linger beside the new ones
        rundir.clear_dir(previous["paths"]["data"])
    paths = rundir.selection_paths(out_dir)
    located = _write_rows(sel, paths)
    rundir.write_json(paths["stats"], sel.stats, indent=2)
    kill_point("selection.between_files")
    if export == "never":
        log.info("selection: export of the records skipped (export=never)")
    elif missing:
        log.warning("selection: %d source files are not reachable from here (first: %s); wrote the ids, "
                    "selection.parquet and stats, not the records (run `select` where the corpus is, or --export always)",
                    len(missing), missing[0])
    else:
        paths["data"], _ = export_selection(located, plan, out_dir, choose_format(sources, output_format))
    rundir.commit_selection(out_dir, paths, sel.stats, fingerprint)
    return paths


def _write_rows(sel: Selection, paths: dict[str, str]) -> pa.Table:
    """selected_ids.txt and selection.parquet, streamed one rank range at a time; returns where each
    selected row came from (source_file, source_row, rank), which the export reads, from the same pass."""
    located = []
    with rundir.open_atomic(paths["ids"], "wb") as ids, rundir.open_atomic(paths["scores"], "wb") as scores:
        writer = None
        for table in sel.batches():
            ids.write("".join(f"{sid}\n" for sid in table.column("sample_id").to_pylist()).encode())
            writer = writer or pq.ParquetWriter(scores, table.schema)
            writer.write_table(table)
            located.append(table.select(["source_file", "source_row", "rank"]))
        if writer is not None:
            writer.close()
    return pa.concat_tables(located)


def scores_plan(scores_dir: str) -> list[Shard] | None:
    """The shard plan a scores directory was made with (its manifest), if it has one: the export
    reads the corpus by it."""
    if not rundir.is_scores_dir(scores_dir):
        return None
    return [Shard.from_dict(d) for d in rundir.read_manifest(scores_dir)["plan"]]
