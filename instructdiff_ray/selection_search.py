"""Selection at any N: the pick of selection.select (the same rows in the same order, the same
stats), found by a distributed search, so that no process holds every score row.

1. Partition. Tasks read groups of score files (only the columns the search reads, and where
   each row lies) and split their ok rows by a hash of sample_id into P partitions of about
   `partition_rows` rows (each split task reads about `split_rows`); one task per partition puts
   its pieces in file order and keeps the first row of each sample_id (as the in-memory path
   does). Partitions stay in Ray's object store; this process holds references.
2. Search. Every cut the method needs (the ⌊γ·n⌋-th row from each end of the ΔNLL order, the
   median a centred key needs, the row where the budget fills, the rows at the stats' quantiles)
   is the first row, in (key, sample_id) order over some rows, at which a running count or token
   sum reaches a target. Each round asks every partition for counts and sums over 4,096 bins of
   the key interval still in question, and the interval shrinks to the bin where the target
   falls; when it holds at most `fetch_rows` rows they are fetched and the cut found exactly; a
   single key value shared by more rows goes on to the sample_ids' bytes, 8 at a time.
3. Rank ranges. The same count search finds the first row of each range of at most `range_rows`
   selected rows; each partition sends where its selected rows lie, and their range, to the
   group of score files that holds them; one task per group reads those rows whole from its
   files and splits them by range; one task per range sorts its rows by (key, sample_id) and
   numbers them from the range's first rank. The ranges stay in the object store; the writer
   (selection.write_selection) reads them one at a time, in order.

Keys are uint64 whose unsigned order is the order of the values (strategies.sortable), so a bin
is an exact range and the search ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import rundir
from .config import SelectionConfig
from .selection import QUANTILES
from .strategies import ALONE, STRATEGIES, SIGN, sortable

log = logging.getLogger(__name__)

BINS = 4096
U64 = np.uint64
PICK_BYTES = 28  # a selected row's address sent to its files: file, row, key, rank range, id hash


# ------------------------------------------------------------------ partitions


def _release() -> None:
    """Hand back to the OS what Arrow's allocator kept from an earlier task in this (reused) worker,
    so a worker's memory is its current task's."""
    pa.default_memory_pool().release_unused()


def _split(files: list[str], first: int, parts: int, columns: list[str]) -> tuple:
    """A group of score files' ok rows (the `columns` the search reads, with `_file`, the file's
    index among all score files from `first`, and `_row`, the row's in it) cut into `parts`
    pieces by a hash of sample_id, and what the stats need of every row (status counts, rows,
    whether responses were scored alone, each file's schema as read whole)."""
    import pandas as pd

    _release()
    tables, schemas = [], []
    for i, path in enumerate(files):
        t, schema = rundir.read_score_columns(path, columns)
        schemas.append(schema)
        tables.append(t.append_column("_file", pa.array(np.full(t.num_rows, first + i, np.int32)))
                      .append_column("_row", pa.array(np.arange(t.num_rows, dtype=np.int32))))
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    status = table.column("status").cast(pa.string())
    counts = {str(d["values"]): int(d["counts"]) for d in pc.value_counts(status).to_pylist()}
    alone = ALONE in table.column_names and table.column(ALONE).null_count < table.num_rows
    ok = table.filter(pc.equal(status, "ok"))
    ids = ok.column("sample_id").to_numpy(zero_copy_only=False).astype(object)
    bucket = (pd.util.hash_array(ids, categorize=False) % U64(parts)).astype(np.int64) if len(ids) else np.zeros(0, np.int64)
    order = np.argsort(bucket, kind="stable")  # file order kept within a piece
    ok = ok.take(pa.array(order))
    bounds = np.searchsorted(bucket[order], np.arange(parts + 1))
    pieces = [ok.slice(int(bounds[p]), int(bounds[p + 1] - bounds[p])) for p in range(parts)]
    return (*pieces, {"rows": table.num_rows, "status": counts, "alone": alone, "schemas": schemas})


@dataclass
class Partition:
    """What the search reads of one partition's rows (ok, one per sample_id, in sample_id order):
    ids, scores, tokens, the strategy's key, and where each row lies; the selected rows are read
    whole from their files only at the end."""
    ids: pa.Array
    dnll: np.ndarray
    dh: np.ndarray
    tokens: np.ndarray  # int32
    file: np.ndarray  # int32: the row's score file, an index into rundir.score_files
    row: np.ndarray  # int32: the row's index in that file
    cols: dict[str, Any] = field(default_factory=dict)  # what the strategy's key reads (centred keys only)
    duplicates: int = 0
    skey: np.ndarray | None = None  # the strategy's key, when it needs no global value
    eligible: np.ndarray | None = None

    @property
    def dnll_key(self) -> np.ndarray:
        return sortable(self.dnll)[0]

    @property
    def dh_key(self) -> np.ndarray:
        return sortable(self.dh)[0]


def _build(strategy: str, seed: int, *pieces: pa.Table) -> Partition:
    """A partition from its pieces (in file order): first row of each sample_id kept, in id order,
    with the strategy's key computed once."""
    from .selection import _by_id

    _release()
    st = STRATEGIES[strategy]
    table = pa.concat_tables(list(pieces), promote_options="permissive")
    rows, duplicates = _by_id(table, np.arange(table.num_rows))
    table = table.take(pa.array(rows))
    cols: dict[str, Any] = {}
    for c in ("delta_nll", "delta_entropy", *st.columns):
        if c == "sample_id":
            cols[c] = table.column(c).to_numpy(zero_copy_only=False)
        elif c in table.column_names:
            cols[c] = table.column(c).to_numpy(zero_copy_only=False).astype(float)
        else:
            cols[c] = np.full(table.num_rows, np.nan)
    for name, derive in st.derived.items():
        cols[name] = derive(cols)
    cols["n_response_tokens"] = table.column("n_response_tokens").to_numpy().astype(np.int64)
    part = Partition(table.column("sample_id").combine_chunks(), cols["delta_nll"], cols["delta_entropy"],
                     cols["n_response_tokens"].astype(np.int32), table.column("_file").to_numpy(),
                     table.column("_row").to_numpy(), cols, duplicates)
    if not st.center:  # a key that needs no global value: computed once here, its inputs dropped
        part.skey, part.eligible = sortable(st.key(cols, {"seed": float(seed)}), st.descending)
        part.cols = {}
    return part


# ------------------------------------------------------------------ one partition's answers


def _chunk(ids: pa.Array, j: int) -> np.ndarray:
    """Bytes [8j, 8j+8) of each id as a big-endian uint64 (zero-padded): a chunk-wise order of ids."""
    from .selection import _prefix_keys

    if j == 0:
        return _prefix_keys(ids)
    return _prefix_keys(pc.binary_slice(ids.cast(pa.binary()), 8 * j, 8 * j + 8).cast(pa.string(), safe=False))


def _before(keys: np.ndarray, ids: pa.Array, cut: tuple[int, str], inclusive: bool) -> np.ndarray:
    """Rows whose (key, sample_id) is before the cut row (or is it, when inclusive)."""
    key, sid = U64(cut[0]), cut[1]
    out = keys < key
    tie = np.flatnonzero(keys == key)
    if len(tie):
        cmp = pc.less_equal if inclusive else pc.less
        out[tie] = cmp(ids.take(pa.array(tie)), pa.scalar(sid, ids.type)).to_numpy(zero_copy_only=False)
    return out


def _view(part: Partition, cfg: SelectionConfig, ctx: dict[str, Any]) -> dict[str, Any]:
    """The rows and keys each search reads, for what is known so far (ctx: trim cuts, centre, fill cut)."""
    strategy = STRATEGIES[cfg.strategy]
    dnll_key, dh_key = part.dnll_key, part.dh_key
    dnll_ok, dh_ok = ~np.isnan(part.dnll), ~np.isnan(part.dh)
    n = len(part.tokens)
    keep = np.ones(n, dtype=bool)
    if ctx.get("low") is not None:
        keep &= ~_before(dnll_key, part.ids, ctx["low"], inclusive=True)
        keep &= _before(dnll_key, part.ids, ctx["high"], inclusive=False)
    view: dict[str, Any] = {"scored": (np.ones(n, bool), dnll_key), "kept": (keep, dh_key),
                            "finite_dh": (dh_ok & np.isfinite(part.dh), dh_key),
                            "finite_dnll": (dnll_ok & np.isfinite(part.dnll), dnll_key), "keep": keep}
    if "seed" in ctx and (not strategy.center or "center" in ctx):
        if part.skey is not None:
            skey, eligible = part.skey, part.eligible
        else:
            skey, eligible = sortable(strategy.key(part.cols, ctx), strategy.descending)
        ranked = keep & eligible
        view["ranked"] = (ranked, skey)
        if "fill" in ctx:
            fill = ctx["fill"]
            if fill == "none":
                chosen = np.zeros(n, dtype=bool)
            elif fill == "all":
                chosen = ranked.copy()
            else:
                chosen = ranked & _before(skey, part.ids, tuple(fill), inclusive=True)
            view["chosen"] = chosen
            view["chosen_ranked"] = (chosen, skey)
            view["chosen_dh"] = (chosen & np.isfinite(part.dh), dh_key)
            view["chosen_dnll"] = (chosen & np.isfinite(part.dnll), dnll_key)
    return view


@dataclass
class Search:
    """The first row, in (key, sample_id) order over `subset`, where the running `weight` reaches
    `target`; `exact` also resolves the sample_id (else the key value is the answer)."""
    subset: str
    weight: str  # count | tokens
    target: int
    exact: bool = True
    level: int = 0  # 0: the key; j > 0: chunk j-1 of the sample_id, among rows equal so far
    lo: int = 0
    hi: int = (1 << 64) - 1
    fixed: tuple[int, ...] = ()  # the key, then the id chunks, fixed by earlier levels
    before: int = 0  # weight of the rows before the interval
    fetch: bool = False  # the next round fetches the interval's rows
    fetch_rows: int = 200_000  # an interval with at most this many rows is fetched
    answer: Any = None  # (key, sample_id) or the key; None while open
    done: bool = False


def _in_interval(view: dict[str, Any], part: Partition, s: Search) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the search's subset inside its current interval, and their values at its level."""
    mask, keys = view[s.subset]
    rows = np.flatnonzero(mask)
    values = keys[rows]
    for j, fixed in enumerate(s.fixed):
        if j == 0:
            sel = values == U64(fixed)
        else:
            sel = _chunk(part.ids.take(pa.array(rows)), j - 1) == U64(fixed)
        rows = rows[sel]
        values = values[sel]
    if s.level > 0:
        values = _chunk(part.ids.take(pa.array(rows)), s.level - 1)
    inside = (values >= U64(s.lo)) & (values <= U64(s.hi))
    return rows[inside], values[inside]


def _shift(lo: int, hi: int) -> int:
    return max(0, (hi - lo).bit_length() - 12)


def _answer(part: Partition, view: dict[str, Any], s: Search) -> dict[str, Any]:
    rows, values = _in_interval(view, part, s)
    weights = part.tokens[rows].astype(np.int64) if s.weight == "tokens" else np.ones(len(rows), np.int64)
    if s.fetch:
        keys = view[s.subset][1][rows]
        return {"keys": keys, "ids": part.ids.take(pa.array(rows)), "weights": weights}
    bins = ((values - U64(s.lo)) >> U64(_shift(s.lo, s.hi))).astype(np.int64)
    return {"count": np.bincount(bins, minlength=BINS), "weight": np.bincount(bins, weights, minlength=BINS).astype(np.int64)}


def _aggregates(part: Partition, view: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": len(part.tokens), "duplicates": part.duplicates,
                           "kept": int(view["keep"].sum()), "tokens": int(part.tokens.sum()),
                           "nonfinite": int((~(np.isfinite(part.dnll) & np.isfinite(part.dh))).sum())}
    for name, value in view.items():
        if isinstance(value, tuple):
            out[f"n_{name}"] = int(value[0].sum())
    kept = part.dnll[view["keep"]]
    out["kept_range"] = [float(kept.min()), float(kept.max())] if len(kept) else None
    if "ranked" in view:
        out["ranked"] = int(view["ranked"][0].sum())
    if "chosen" in view:
        chosen = view["chosen"]
        out["chosen"] = int(chosen.sum())
        out["chosen_tokens"] = int(part.tokens[chosen].sum())
        out["chosen_dh_max"] = float(part.dh[chosen].max()) if chosen.any() else None
    return out


def _round(part: Partition, cfg: SelectionConfig, ctx: dict[str, Any], searches: list[Search]) -> dict[str, Any]:
    """One partition's answers to the open searches, and its aggregates for what is known."""
    view = _view(part, cfg, ctx)
    return {"answers": [_answer(part, view, s) for s in searches], "aggregates": _aggregates(part, view)}


def _id_hash(ids: pa.Array) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(ids.to_numpy(zero_copy_only=False).astype(object), categorize=False)


def _cut(part: Partition, cfg: SelectionConfig, ctx: dict[str, Any], starts: list[tuple[int, str]],
         bucket_of: np.ndarray, buckets: int) -> tuple:
    """Where a partition's selected rows lie (`_file`, `_row`), with their key (for the ranking),
    their rank range (the ranges begin at `starts`) and a hash of their sample_id (to check the row
    read back is the same), one piece per bucket of score files (`bucket_of`: each file's bucket)."""
    _release()
    view = _view(part, cfg, ctx)
    rows = np.flatnonzero(view["chosen"])
    keys = view["ranked"][1][rows]
    ids = part.ids.take(pa.array(rows))
    rank_range = np.zeros(len(rows), dtype=np.int32)
    for start in starts:
        rank_range += ~_before(keys, ids, start, inclusive=False)
    files = part.file[rows]
    bucket = bucket_of[files]
    order = np.argsort(bucket, kind="stable")
    picks = pa.table({"_file": files, "_row": part.row[rows], "_key": keys, "_range": rank_range,
                      "_hash": _id_hash(ids)}).take(pa.array(order))
    bounds = np.searchsorted(bucket[order], np.arange(buckets + 1))
    out = tuple(picks.slice(int(bounds[b]), int(bounds[b + 1] - bounds[b])) for b in range(buckets))
    return out if len(out) > 1 else out[0]


def _fetch(files: list[str], first: int, ranges: int, *pieces: pa.Table) -> tuple:
    """The selected rows of a bucket of score files, read whole (one file at a time, each once), with
    their key, split by rank range."""
    _release()
    picks = pa.concat_tables(list(pieces))
    at = picks.column("_file").to_numpy()
    order = np.argsort(at, kind="stable")
    picks = picks.take(pa.array(order))
    bounds = np.searchsorted(at[order], np.arange(first, first + len(files) + 1))
    tables = []
    for i, path in enumerate(files):
        sub = picks.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i]))
        if not sub.num_rows:
            continue
        rows = rundir.read_score_file(path).take(sub.column("_row"))
        if not np.array_equal(_id_hash(rows.column("sample_id")), sub.column("_hash").to_numpy()):
            raise RuntimeError(f"score file {path} changed while the selection read it (a row holds another "
                               "sample than when the search began); select again")
        tables.append(rows.append_column("_key", sub.column("_key")).append_column("_range", sub.column("_range")))
    if not tables:  # no selected row in these files (the range's columns come from the selection's schema)
        tables = [pa.table({"_key": pa.array([], pa.uint64()), "_range": pa.array([], pa.int32())})]
    table = pa.concat_tables(tables, promote_options="permissive")
    rank_range = table.column("_range").to_numpy()
    table = table.drop_columns(["_range"])
    out = tuple(table.filter(pa.array(rank_range == r)) for r in range(ranges))
    return out if len(out) > 1 else out[0]


def _rank(offset: int, *pieces: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
    """One rank range: its rows from every bucket in (key, sample_id) order, ranked from `offset`."""
    _release()
    table = pa.concat_tables(list(pieces), promote_options="permissive")
    if table.num_rows:
        table = table.take(pc.sort_indices(table, sort_keys=[("_key", "ascending"), ("sample_id", "ascending")]))
    table = table.drop_columns(["_key"]).append_column("rank", pa.array(np.arange(offset, offset + table.num_rows,
                                                                                  dtype=np.int64)))
    sources = pc.unique(table.column("source_file").cast(pa.string())).to_pylist() if table.num_rows else []
    return table, {"rows": table.num_rows, "sources": sources}


# ------------------------------------------------------------------ the search


def _advance(s: Search, answers: list[dict[str, Any]]) -> None:
    """Move a search on with every partition's answer for it."""
    if s.fetch:
        keys = np.concatenate([a["keys"] for a in answers])
        weights = np.concatenate([a["weights"] for a in answers])
        ids = pa.concat_arrays([a["ids"].cast(pa.string()) for a in answers])
        order = pc.sort_indices(pa.table({"k": keys, "id": ids}), sort_keys=[("k", "ascending"), ("id", "ascending")])
        order = order.to_numpy()
        running = s.before + np.cumsum(weights[order])
        i = int(np.searchsorted(running, s.target, side="left"))
        if i < len(order):
            s.answer = (int(keys[order[i]]), ids[int(order[i])].as_py()) if s.exact else int(keys[order[i]])
        s.done = True
        return
    count = np.sum([a["count"] for a in answers], axis=0)
    weight = np.sum([a["weight"] for a in answers], axis=0)
    running = s.before + np.cumsum(weight)
    b = int(np.searchsorted(running, s.target, side="left"))
    if b >= BINS:  # the target is beyond every row
        s.done = True
        return
    shift = _shift(s.lo, s.hi)
    s.before = int(running[b] - weight[b])
    lo = s.lo + (b << shift)
    s.lo, s.hi = lo, min(s.hi, lo + (1 << shift) - 1)
    if count[b] <= s.fetch_rows:
        s.fetch = True
    elif s.lo == s.hi:  # one value at this level
        if not s.exact and s.level == 0:
            s.answer, s.done = s.lo, True
        elif s.level >= 1 + 64:  # ids equal in every chunk read: fetch them whatever their number
            s.fetch = True
        else:
            s.fixed, s.level, s.lo, s.hi = (*s.fixed, s.lo), s.level + 1, 0, (1 << 64) - 1


def _value(key: int) -> float:
    """The float whose sortable key this is."""
    k = U64(key)
    bits = k ^ SIGN if k & SIGN else ~k
    return float(np.array([bits], dtype=U64).view(np.float64)[0])


class _Runner:
    """Rounds of tasks over the partitions until every search of a phase is answered."""

    def __init__(self, parts: list[Any], cfg: SelectionConfig, fetch_rows: int):
        import ray

        self.parts, self.cfg, self.fetch_rows = parts, cfg, fetch_rows
        self.task = ray.remote(num_cpus=1, max_retries=2)(_round)
        self.rounds = 0

    def run(self, ctx: dict[str, Any], searches: list[Search]) -> dict[str, Any]:
        """Answer the searches; returns the aggregates over the partitions for `ctx`."""
        import ray

        for s in searches:
            s.fetch_rows = self.fetch_rows
        while True:
            open_ = [s for s in searches if not s.done]
            results = ray.get([self.task.remote(p, self.cfg, ctx, open_) for p in self.parts])
            self.rounds += 1
            for i, s in enumerate(open_):
                _advance(s, [r["answers"][i] for r in results])
            if all(s.done for s in searches):
                return _combine([r["aggregates"] for r in results])


def _combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in parts:
        for k, v in a.items():
            if k == "kept_range":
                if v is not None:
                    old = out.get(k)
                    out[k] = v if old is None else [min(old[0], v[0]), max(old[1], v[1])]
                else:
                    out.setdefault(k, None)
            elif k == "chosen_dh_max":
                out[k] = v if out.get(k) is None else (out[k] if v is None else max(out[k], v))
            else:
                out[k] = out.get(k, 0) + v
    return out


def _lerp_quantile(a: float, b: float, q: float, m: int) -> float:
    """np.quantile's linear interpolation between the order statistics around q·(m−1)."""
    pos = q * (m - 1)
    g = pos - np.floor(pos)
    if a == b:
        return a
    return a + (b - a) * g if g < 0.5 else b - (b - a) * (1 - g)


def _quantile_searches(subset: str, m: int) -> list[tuple[float, Search, Search]]:
    """For each quantile, the value searches for the two order statistics around q·(m−1)."""
    out = []
    for q in QUANTILES:
        pos = q * (m - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, m - 1)
        out.append((q, Search(subset, "count", lo + 1, exact=False), Search(subset, "count", hi + 1, exact=False)))
    return out


def _quantiles(plan: list[tuple[float, Search, Search]], m: int) -> dict[str, float | None]:
    return {f"q{int(q * 100):02d}": (_lerp_quantile(_value(a.answer), _value(b.answer), q, m) if m else None)
            for q, a, b in plan}


def _footer_rows(files: list[str]) -> list[int]:
    """Rows per score file, from the Parquet footers (one task's share of count_rows)."""
    out = []
    for path in files:
        fs, p = rundir.fs_of(path)
        with fs.open(p, "rb") as f:
            out.append(pq.ParquetFile(f).metadata.num_rows)
    return out


def count_rows(files: list[str]) -> list[int]:
    """Rows per score file, from the footers, read by tasks of 256 files (in this process without Ray)."""
    from .runtime import map_tasks

    groups = [(files[i : i + 256],) for i in range(0, len(files), 256)]
    return [n for part in map_tasks(_footer_rows, groups, num_cpus=0.25) for n in part]


def _groups(files: list[str], rows: list[int], most: int) -> list[list[str]]:
    """Consecutive files, at most `most` rows a group (a larger file alone)."""
    groups: list[list[str]] = [[]]
    held = 0
    for path, n in zip(files, rows):
        if groups[-1] and held + n > most:
            groups.append([])
            held = 0
        groups[-1].append(path)
        held += n
    return groups


def _range_starts(chosen: int, range_rows: int) -> tuple[int, list[Search]]:
    """Rows per rank range (of at most `range_rows`, as even as can be) and the searches for the
    first row of each range after the first."""
    ranges = max(1, -(-chosen // range_rows))
    per = -(-chosen // ranges) if chosen else 0
    return per, [Search("chosen_ranked", "count", r * per + 1) for r in range(1, ranges)]


def _buckets(groups: list[list[str]], chosen: int, parts: int, piece_bytes: int) -> list[list[str]]:
    """Consecutive groups of files merged into buckets, so few that each partition's picks for one
    bucket (PICK_BYTES a row) come to about `piece_bytes`: pieces under Ray's 100 KB inline limit
    would be kept by this process, not the object store."""
    n = int(np.clip(chosen * PICK_BYTES // max(1, parts * piece_bytes), 1, len(groups)))
    edges = np.linspace(0, len(groups), n + 1).round().astype(int)
    return [[f for g in groups[edges[b] : edges[b + 1]] for f in g] for b in range(n)]


def _ranked_parts(runner: _Runner, groups: list[list[str]], ctx: dict[str, Any], chosen: int, per: int,
                  cuts: list[tuple[int, str]], piece_bytes: int) -> tuple[list[Any], list[str]]:
    """The selected rows as consecutive rank ranges of `per` rows (the last fewer) beginning at
    `cuts`, each sorted by a task, in the object store: no process holds more than one range, and
    only the selected rows are read whole, once, by the bucket of files that holds them."""
    import ray

    ranges = len(cuts) + 1
    buckets = _buckets(groups, chosen, len(runner.parts), piece_bytes)
    firsts = np.cumsum([0] + [len(b) for b in buckets])
    bucket_of = np.repeat(np.arange(len(buckets), dtype=np.int32), [len(b) for b in buckets])
    cut = ray.remote(num_cpus=1, max_retries=2, num_returns=len(buckets))(_cut)
    picks = [cut.remote(p, runner.cfg, ctx, cuts, bucket_of, len(buckets)) for p in runner.parts]
    if len(buckets) == 1:
        picks = [[p] for p in picks]
    fetch = ray.remote(num_cpus=1, max_retries=2, num_returns=ranges)(_fetch)
    pieces = [fetch.remote(files, int(firsts[b]), ranges, *[p[b] for p in picks]) for b, files in enumerate(buckets)]
    del picks
    if ranges == 1:
        pieces = [[p] for p in pieces]
    rank = ray.remote(num_cpus=1, max_retries=2, num_returns=2)(_rank)
    ranked = [rank.remote(r * per, *[p[r] for p in pieces]) for r in range(ranges)]
    del pieces
    meta = ray.get([m for _, m in ranked])
    expected = [min(per, chosen - r * per) for r in range(ranges)]
    if [m["rows"] for m in meta] != expected:  # the ranges must tile the ranking exactly
        raise RuntimeError(f"rank ranges of {[m['rows'] for m in meta]} rows, expected {expected}")
    return [t for t, _ in ranked], sorted({f for m in meta for f in m["sources"]})


def search_select(scores_dir: str, cfg: SelectionConfig, partition_rows: int = 2_500_000, fetch_rows: int = 200_000,
                  split_rows: int = 1_000_000, range_rows: int = 1_000_000, file_rows: list[int] | None = None,
                  piece_bytes: int = 256 << 10):
    """What `select(load_scores(scores_dir), cfg)` returns (its rows and stats), by the distributed
    search; Ray must be attached. The selected rows stay in the object store as rank ranges of at
    most `range_rows` rows (Selection.batches reads them in order). `file_rows`: the rows of each
    score file, when the caller has read the footers already. `piece_bytes`: the size the picks sent
    from a partition to a bucket of files aim at (smaller: more buckets)."""
    import ray

    from .selection import Selection

    strategy = STRATEGIES[cfg.strategy]
    files = rundir.score_files(scores_dir)
    if not files:
        raise FileNotFoundError(f"no score files (*.parquet) in {scores_dir}")
    rows = file_rows if file_rows is not None else count_rows(files)
    if len(rows) != len(files):
        raise RuntimeError(f"{scores_dir} holds {len(files)} score files, {len(rows)} when their rows were counted: "
                           "it changed while selecting; select again")
    groups = _groups(files, rows, split_rows)  # each split task reads about split_rows rows
    n_parts = max(1, -(-sum(rows) // partition_rows))
    columns = list(dict.fromkeys(["sample_id", "status", "n_response_tokens", "delta_nll", "delta_entropy", ALONE,
                                  *strategy.columns]))
    firsts = np.cumsum([0] + [len(g) for g in groups])
    split = ray.remote(num_cpus=1, max_retries=2, num_returns=n_parts + 1)(_split)
    pieces = [split.remote(g, int(firsts[i]), n_parts, columns) for i, g in enumerate(groups)]
    info = ray.get([p[-1] for p in pieces])
    counts: dict[str, int] = {}
    for i in info:
        for k, v in i["status"].items():
            counts[k] = counts.get(k, 0) + v
    if strategy.needs_alone and not any(i["alone"] for i in info):
        raise ValueError(f"strategy {cfg.strategy} needs the responses scored alone: score with template.ifd: true")
    build = ray.remote(num_cpus=1, max_retries=2)(_build)
    parts = [build.remote(cfg.strategy, cfg.seed, *[p[j] for p in pieces]) for j in range(n_parts)]
    del pieces  # each piece is freed once its partition is built
    runner = _Runner(parts, cfg, fetch_rows)
    ctx: dict[str, Any] = {}
    agg = runner.run(ctx, [])
    n, duplicates = agg["rows"], agg["duplicates"]
    if strategy.trim and agg["nonfinite"]:
        raise ValueError(f"{agg['nonfinite']} ok rows lack warmup scores; strategy {cfg.strategy} needs ΔNLL and ΔH")
    total_tokens = agg["tokens"]
    k = int(np.floor(cfg.gamma * n)) if strategy.trim else 0
    if not (k > 0 and 2 * k < n):
        k = 0
    if k:
        low, high = Search("scored", "count", k), Search("scored", "count", n - k + 1)
        runner.run(ctx, [low, high])
        ctx["low"], ctx["high"] = low.answer, high.answer
    if strategy.center:
        m = n - 2 * k
        center = Search("kept", "count", (m - 1) // 2 + 1, exact=False)
        if m:
            runner.run(ctx, [center])
        ctx["center"] = _value(center.answer) if m else 0.0
    ctx["seed"] = float(cfg.seed)
    budget = int(np.floor(cfg.budget * (total_tokens if cfg.budget_unit == "tokens" else n)))
    ranked = runner.run(ctx, [])["ranked"]
    if cfg.budget_unit == "samples":
        fill = Search("ranked", "count", budget) if budget > 0 else None
    else:  # the row whose tokens reach the budget is taken; a budget of 0 still takes the first row
        fill = Search("ranked", "tokens", budget) if budget > 0 else Search("ranked", "count", 1)
    if fill is None or not ranked:
        ctx["fill"] = "none"
    else:
        runner.run(ctx, [fill])
        ctx["fill"] = fill.answer if fill.answer is not None else "all"
    agg = runner.run(ctx, [])
    plans = {name: _quantile_searches(name, agg[f"n_{name}"]) for name in ("finite_dh", "finite_dnll", "chosen_dh", "chosen_dnll")}
    per, starts = _range_starts(agg["chosen"], range_rows)  # searched in the same rounds as the quantiles
    runner.run(ctx, [s for name, plan in plans.items() if agg[f"n_{name}"] for _, a, b in plan for s in (a, b)] + starts)
    q = {name: _quantiles(plan, agg[f"n_{name}"]) for name, plan in plans.items()}
    ranges, sources = _ranked_parts(runner, groups, ctx, agg["chosen"], per, [s.answer for s in starts], piece_bytes)
    # the columns of every file as read whole, in file order (what load_scores' concatenation gives), then rank
    schema = pa.unify_schemas([sc for i in info for sc in i["schemas"]], promote_options="permissive")
    schema = schema.append(pa.field("rank", pa.int64()))
    stats = {
        "strategy": cfg.strategy,
        "rows_total": sum(i["rows"] for i in info),
        "status_counts": dict(sorted(counts.items())),
        "rows_scored": n,
        "duplicates_dropped": duplicates,
        "gamma": cfg.gamma,
        "trimmed_per_tail": k,
        "rows_after_nll_filter": agg["kept"],
        "delta_nll_kept_range": agg["kept_range"] if strategy.trim and agg["kept"] else None,
        "budget": {"unit": cfg.budget_unit, "beta": cfg.budget, "value": budget, "total_response_tokens": total_tokens},
        "selected_rows": agg["chosen"],
        "selected_response_tokens": agg["chosen_tokens"],
        "delta_entropy_threshold": agg["chosen_dh_max"] if agg["chosen"] and strategy.threshold else None,
        "delta_entropy": {"all": q["finite_dh"], "selected": q["chosen_dh"]},
        "delta_nll": {"all": q["finite_dnll"], "selected": q["chosen_dnll"]},
        "search": {"partitions": n_parts, "rounds": runner.rounds},
    }
    log.info("selection: distributed search over %d partitions, %d rounds", n_parts, runner.rounds)
    return Selection(rows=None, stats=stats, kept_mask=None, source=None, scored_idx=None, parts=ranges, schema=schema,
                     sources=sources)


class ScoresSelector:
    """Picks from one scores directory for any number of selection settings, reading what they
    share once: in one process up to `in_memory_rows` score rows (the fastest; the table is loaded
    at the first pick), else by the distributed search (the same rows and stats, bounded memory per
    task; attaches to Ray, or starts a local one, when not attached)."""

    def __init__(self, scores_dir: str, in_memory_rows: int):
        self.scores_dir = scores_dir
        self.file_rows = count_rows(rundir.score_files(scores_dir))
        self.in_memory = sum(self.file_rows) <= in_memory_rows
        self._table: pa.Table | None = None

    def __call__(self, cfg: SelectionConfig):
        import ray

        from .selection import load_scores, select

        if self.in_memory:
            if self._table is None:
                self._table = load_scores(self.scores_dir)
            return select(self._table, cfg)
        if not ray.is_initialized():
            ray.init(logging_level="ERROR")
        return search_select(self.scores_dir, cfg, file_rows=self.file_rows)


def select_scores(scores_dir: str, cfg: SelectionConfig, in_memory_rows: int):
    """The selection of a scores directory (ScoresSelector, for one pick)."""
    return ScoresSelector(scores_dir, in_memory_rows)(cfg)
