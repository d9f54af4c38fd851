"""Input formats as readers, by name: the one table to extend when adding a format (a module here
with a `base.Reader` subclass; gzip is a wrapper every format gets).

    base.py      Shard, the raw row, the Reader contract, cutting record batches into shards
    io.py        opening files (local, object stores, Hub), reads sized to the work
    jsonl.py     JSON Lines: byte-range plans, one seek per shard
    tables.py    JSON arrays and CSV: parsed whole
    parquet.py   Parquet: footers and row groups
    arrow.py     Arrow IPC (`datasets` save_to_disk)
"""

from __future__ import annotations

from .arrow import ArrowReader
from .base import Reader
from .jsonl import JsonlReader
from .parquet import ParquetReader
from .tables import CsvReader, JsonReader

READERS: dict[str, Reader] = {r.name: r for r in (JsonlReader(), JsonReader(), ParquetReader(), CsvReader(), ArrowReader())}
EXTENSIONS = {ext: name for name, r in READERS.items() for ext in r.extensions}


def reader_for(fmt: str) -> Reader:
    return READERS[fmt]


def format_of(path: str, fmt: str = "auto") -> str | None:
    """`fmt` unless auto, else the format its name says (with or without .gz), else None."""
    if fmt != "auto":
        return fmt
    name = path.lower()
    for ext, kind in EXTENSIONS.items():
        if name.endswith(ext) or name.endswith(ext + ".gz"):
            return kind
    return None
