"""Export stage: the user's original records of a selection, in rank order, in their format.

Work that scales with the corpus runs on the cluster: the read units (corpus.py) that hold a
selected row are read by at most `MAX_PARTS` tasks, each writing its records sorted by rank to
a part file; the driver then streams a k-way merge of the parts into `selected.<fmt>`, holding
one record per part at a time. Every field is kept across rows of different shapes: a Parquet
export writes the union of all rows' fields (missing ones null), a CSV export the union of
their columns; `hf` writes a `datasets` directory (`datasets.load_from_disk`).
"""

from __future__ import annotations

import csv
import heapq
import json
import logging
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import rundir
from .config import ConfigError, DataConfig
from .corpus import Shard, iter_unit, plan_shards, read_units, rows_by_shard
from .readers import format_of

log = logging.getLogger(__name__)

MAX_PARTS = 64
PARQUET_ROWS = 8192  # records per Parquet batch while merging
EXPORT_MODES = ("auto", "always", "never")


class SourceMissing(ConfigError):
    """The corpus is not reachable from here, and the export was asked for."""


def output_format(sources: list[str], requested: str) -> str:
    """The user's format when all sources share one (jsonl for .jsonl.gz, a `datasets` directory
    for Arrow files of save_to_disk), else jsonl."""
    if requested != "auto":
        return requested
    formats = {format_of(src) or "jsonl" for src in sources}
    fmt = formats.pop() if len(formats) == 1 else "jsonl"
    return "hf" if fmt == "arrow" else fmt


def missing_sources(sources: list[str]) -> list[str]:
    out = []
    for src in sources:
        fs, path = rundir.fs_of(src)
        if not fs.exists(path):
            out.append(src)
    return out


def export_selection(rows: pa.Table, plan: list[Shard] | None, sel_dir: str, fmt: str) -> tuple[str, int]:
    """Write the records of `rows` (selected score rows with source_file, source_row, rank) to
    sel_dir/selected.<fmt>; returns the path and the number of records written."""
    from .runtime import map_tasks

    src = rows.column("source_file")
    row = rows.column("source_row").to_numpy()
    rank = rows.column("rank").to_numpy()
    shards = plan or _plan_of(sorted(set(pc.unique(src.cast(pa.string())).to_pylist())))
    picks = {sid: np.stack([row[i], rank[i]]) for sid, i in rows_by_shard(shards, src, row).items()}
    units = read_units([s for s in shards if s.shard_id in picks])
    per_task = max(1, -(-len(units) // MAX_PARTS))
    parts_dir = rundir.export_parts_dir(sel_dir)
    rundir.clear_dir(parts_dir)
    jobs = []
    for i in range(0, len(units), per_task):
        group = units[i : i + per_task]
        jobs.append((group, {s.shard_id: picks[s.shard_id] for u in group for s in u},
                     rundir.join(parts_dir, f"part-{len(jobs):05d}.jsonl")))
    parts = map_tasks(_export_part, jobs)
    written = sum(p["records"] for p in parts)
    if written != len(rank):
        raise RuntimeError(f"export found {written} of {len(rank)} selected records; the input changed since it was scored")
    out = rundir.export_path(sel_dir, fmt)
    records = heapq.merge(*(_read_part(p["url"]) for p in parts), key=lambda x: x[0])
    _WRITERS[fmt](out, (rec for _, rec in records), parts)
    rundir.clear_dir(parts_dir)
    return out, written


def _plan_of(sources: list[str]) -> list[Shard]:
    """A plan for scores that came without one (a directory of score files from elsewhere)."""
    return plan_shards(DataConfig(paths=sources, shard_rows=100_000))


def _export_part(units: list[list[Shard]], picks: dict[int, np.ndarray], url: str) -> dict[str, Any]:
    """Task: the selected records of some read units, sorted by rank, into one part file
    (`picks`: per shard, its selected source rows over their ranks)."""
    found: list[tuple[int, Any]] = []
    for unit in units:
        for shard, raw in iter_unit(unit):
            want = dict(zip(*picks[shard.shard_id].tolist()))
            found += [(want[r], rec) for r, rec, err, _ in raw if r in want and err is None]
    found.sort(key=lambda x: x[0])
    with rundir.open_atomic(url, "w") as f:
        for rank, rec in found:
            f.write(json.dumps([rank, rec], ensure_ascii=False) + "\n")
    columns: dict[str, None] = {}
    for _, rec in found:
        columns.update(dict.fromkeys(rec) if isinstance(rec, dict) else {})
    return {"url": url, "records": len(found), "columns": list(columns), "type": _arrow_type(rec for _, rec in found)}


def _arrow_type(records: Iterator[Any]) -> str | None:
    """The Arrow type of the part's records (serialised), None when they do not form one."""
    try:
        typ = pa.array(list(records)).type
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    return pa.schema([pa.field("r", typ)]).serialize().to_pybytes().hex()


def _read_part(url: str) -> Iterator[tuple[int, Any]]:
    fs, path = rundir.fs_of(url)
    with fs.open(path, "rb") as f:
        for line in f:
            rank, rec = json.loads(line)
            yield rank, rec


def _write_jsonl(url: str, records: Iterator[Any], parts: list[dict[str, Any]]) -> None:
    with rundir.open_atomic(url, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _write_json(url: str, records: Iterator[Any], parts: list[dict[str, Any]]) -> None:
    with rundir.open_atomic(url, "w") as f:
        f.write("[")
        for i, rec in enumerate(records):
            f.write(("\n" if i == 0 else ",\n") + json.dumps(rec, ensure_ascii=False))
        f.write("\n]\n")


def _write_csv(url: str, records: Iterator[Any], parts: list[dict[str, Any]]) -> None:
    columns: dict[str, None] = {}
    for p in parts:
        columns.update(dict.fromkeys(p["columns"]))
    with rundir.open_atomic(url, "w") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="", lineterminator="\n")
        writer.writeheader()
        for rec in records:
            writer.writerow({k: v if isinstance(v, str) or v is None else json.dumps(v, ensure_ascii=False)
                             for k, v in rec.items()})


def unified_schema(parts: list[dict[str, Any]]) -> pa.Schema:
    """The union of the fields of every part's records (a field's types promoted where they differ)."""
    schemas = []
    for p in parts:
        if p["records"] == 0:
            continue
        if p["type"] is None:
            raise ConfigError("the selected records do not form one table (a field holds values of "
                              "incompatible types); use selection.output_format=jsonl")
        typ = pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(p["type"]))).field("r").type
        if not pa.types.is_struct(typ):
            raise ConfigError("the selected records are not objects; use selection.output_format=jsonl")
        schemas.append(pa.schema(list(typ)))
    try:
        return pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ConfigError(f"the selected records do not form one table ({err}); use selection.output_format=jsonl") from None


def _write_parquet(url: str, records: Iterator[Any], parts: list[dict[str, Any]]) -> None:
    schema = unified_schema(parts)
    with rundir.open_atomic(url, "wb") as f:
        writer = pq.ParquetWriter(f, schema)
        batch: list[Any] = []
        for rec in records:
            batch.append(rec)
            if len(batch) == PARQUET_ROWS:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch or not schema:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        writer.close()


def _write_hf(url: str, records: Iterator[Any], parts: list[dict[str, Any]]) -> None:
    """A `datasets` directory (`load_from_disk`): the records as Parquet in a local scratch file
    (streamed, unified schema), then `save_to_disk`; locally into a temporary directory renamed
    into place, so the directory is complete or absent."""
    import os
    import tempfile

    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        _write_parquet(os.path.join(tmp, "selected.parquet"), records, parts)
        ds = datasets.Dataset.from_parquet(os.path.join(tmp, "selected.parquet"), cache_dir=os.path.join(tmp, "cache"))
        target = url + rundir.TMP_SUFFIX if rundir.is_local(url) else url
        rundir.clear_dir(target)
        ds.save_to_disk(target)
        if target != url:
            rundir.clear_dir(url)
            os.replace(target, url)


_WRITERS = {"jsonl": _write_jsonl, "json": _write_json, "csv": _write_csv, "parquet": _write_parquet, "hf": _write_hf}
