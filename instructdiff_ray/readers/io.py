"""Opening corpus files: local, object stores and Hub files, gzip unwrapped, reads sized to the work."""

from __future__ import annotations

import contextlib
import io
from typing import Any, Iterator

import fsspec

from .. import rundir, sources

PLAN_BUFFER = 16 << 20  # object stores: bytes per range request while planning (sequential scans)
READ_BUFFER = 256 << 10  # object stores: bytes per range request while reading a unit
MAX_READ_BUFFER = 8 << 20  # a JSONL shard of known span is fetched in requests of its size, up to this


@contextlib.contextmanager
def open_file(path: str, buffer: int = READ_BUFFER) -> Iterator[Any]:
    """A binary reader of a corpus file. On object stores, reads are range requests of exactly
    `buffer` bytes through a buffered reader: lines are split from those buffers (fsspec's own
    readline refetches a cache block per line) and nothing is read ahead of what is consumed."""
    url = sources.local(path)
    if rundir.is_local(url):
        with fsspec.open(url, "rb", compression="infer") as f:
            yield f
        return
    from fsspec.compression import compr
    from fsspec.utils import infer_compression

    fs, p = rundir.fs_of(url)
    with fs.open(p, "rb", block_size=buffer, cache_type="none") as raw:
        f: Any = io.BufferedReader(raw, buffer_size=buffer)
        codec = infer_compression(p)
        yield compr[codec](f, mode="rb") if codec else f


def size(path: str) -> int:
    fs, local = rundir.fs_of(sources.local(path))
    return int(fs.info(local)["size"])
