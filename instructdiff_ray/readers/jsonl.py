"""JSON Lines (`.jsonl`, `.ndjson`, gzip or not): one record per non-blank line.

Planning cuts the file into 64 MiB byte ranges, scanned in parallel for line starts; each range
is split into shards of `shard_rows` non-blank lines, so reading a shard is one seek and a
sequential read of exactly its bytes. A gzip file cannot seek: one sequential scan plans it and
one sequential pass reads all of its shards in order. A line that is not JSON (or not UTF-8)
becomes a row with that status, never a failure of the file.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from . import io
from .base import INVALID_UTF8, MALFORMED, Raw, Reader, Shard, compressed

RANGE_BYTES = 64 << 20  # a planning range


class JsonlReader(Reader):
    name = "jsonl"
    extensions = (".jsonl", ".ndjson")

    def jobs(self, path: str, shard_rows: int) -> list[tuple]:
        if compressed(path):
            return [(path, 0, None, shard_rows)]
        size = io.size(path)
        return [(path, b, min(b + RANGE_BYTES, size), shard_rows) for b in range(0, size, RANGE_BYTES)]

    def scan(self, path: str, *args: Any, max_rows: int | None = None) -> Any:
        return scan_jsonl(path, *args, max_rows=max_rows)

    def rows_of(self, result: Any) -> int:
        return sum(c[2] for c in result["chunks"])

    def shards(self, path: str, results: list[Any], shard_rows: int, left: float, first_id: int) -> list[Shard]:
        """Line numbers of each range are relative to it: the ranges before it give its base (the
        limit was already applied by the scans)."""
        out, base = [], 0
        for res in results:
            for byte, first, n, stop, end in res["chunks"]:
                out.append(Shard(first_id + len(out), path, self.name, base + first, base + stop, n, byte, end))
            base += res["lines"]
        return out

    def read(self, order: list[Shard]) -> Iterator[tuple[Shard, list[Raw]]]:
        return _read(order)

    def records(self, path: str, wanted: set[int]) -> Iterator[tuple[int, Any]]:
        with io.open_file(path) as f:
            for lineno, line in enumerate(f):
                if lineno in wanted:
                    yield lineno, json.loads(line.decode("utf-8-sig"))


def scan_jsonl(path: str, byte_start: int, byte_stop: int | None, shard_rows: int,
               max_rows: int | None = None) -> dict[str, Any]:
    """The lines that START in [byte_start, byte_stop) of one file (the whole stream for None),
    cut into chunks of `shard_rows` non-blank lines: [byte offset, first line, rows, line after
    last, byte after last], line numbers relative to the range. Streams: memory does not grow with the range."""
    chunks: list[list[int]] = []
    lines = 0
    with io.open_file(path, io.PLAN_BUFFER) as f:
        pos = 0
        if byte_start > 0:
            f.seek(byte_start - 1)
            pos = byte_start - 1 + len(f.readline())  # the first line that starts at or after byte_start
        rows = 0
        for line in f:
            if byte_stop is not None and pos >= byte_stop:
                break
            if line.strip():
                if max_rows is not None and rows >= max_rows:
                    break
                if not chunks or chunks[-1][2] == shard_rows:
                    chunks.append([pos, lines, 0, 0, 0])
                chunks[-1][2] += 1
                chunks[-1][3] = lines + 1
                chunks[-1][4] = pos + len(line)
                rows += 1
            lines += 1
            pos += len(line)
    return {"chunks": chunks, "lines": lines}


def _read(order: list[Shard]) -> Iterator[tuple[Shard, list[Raw]]]:
    path = order[0].path
    seekable = not compressed(path)
    spans = [s.byte_stop - s.byte_start for s in order if s.byte_stop is not None and s.byte_start is not None]
    buffer = min(max(max(spans), 64 << 10), io.MAX_READ_BUFFER) if seekable and spans else io.READ_BUFFER
    with io.open_file(path, buffer) as f:
        pos, lineno = 0, 0
        for s in order:
            if seekable:
                f.seek(s.byte_start)
                pos, lineno = s.byte_start, s.row_start
            while pos < s.byte_start:  # gzip: decompress forward to the shard (one pass per file)
                line = f.readline()
                if not line:
                    break
                pos, lineno = pos + len(line), lineno + 1
            if pos != s.byte_start or lineno != s.row_start:
                raise RuntimeError(f"{path} changed since it was planned (shard {s.shard_id} starts at byte "
                                   f"{s.byte_start}, line {s.row_start + 1}); plan the run again")
            rows: list[Raw] = []
            while len(rows) < s.n_rows:
                line = f.readline()
                if not line:
                    raise RuntimeError(f"{path} ended before its planned row {s.row_start + len(rows)}; plan the run again")
                if line.strip():
                    rows.append((lineno, *parse_line(line)))
                pos, lineno = pos + len(line), lineno + 1
            yield s, rows


def parse_line(line: bytes) -> tuple[Any, str | None, str | None]:
    try:
        text = line.decode("utf-8").lstrip("\ufeff")  # a byte-order mark, as some editors write it
    except UnicodeDecodeError as err:
        return None, INVALID_UTF8, line[:2000].decode("utf-8", "replace") + f"  [{err}]"
    try:
        return json.loads(text), None, None
    except json.JSONDecodeError as err:
        return None, MALFORMED, text[:2000] + f"  [{err}]"
