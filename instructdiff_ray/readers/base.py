"""What every input reader shares: the shard (a contiguous row range of one file: the unit of work,
output and resume), the raw row, the statuses a row can get while it is read, and the reader
contract: plan a file (scan jobs, then shards), read a read unit, fetch a few records."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Iterator

Raw = tuple[int, Any, "str | None", "str | None"]  # (source_row, record, error status, raw text)
MALFORMED = "malformed_json"
INVALID_UTF8 = "invalid_utf8"


def compressed(path: str) -> bool:
    """gzip is a wrapper around any format: read sequentially, never seeked."""
    return path.lower().endswith(".gz")


@dataclass(frozen=True)
class Shard:
    shard_id: int
    path: str
    fmt: str
    row_start: int  # first row index (for jsonl: physical line number) in the file
    row_stop: int  # one past the last row (jsonl: the line after the shard's last line)
    n_rows: int  # rows this shard yields (jsonl: non-blank lines in the range)
    byte_start: int | None = None  # jsonl only: where row_start begins (in the decompressed stream for .gz)
    byte_stop: int | None = None  # jsonl only: one past the shard's last line (reads fetch exactly this span)
    group: int | None = None  # parquet only: the row group that holds the shard

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Shard":
        return Shard(**{k: d.get(k) for k in Shard.__dataclass_fields__})

    @property
    def unit(self) -> str:
        """Shards with the same unit are read together, in one sequential pass: a byte span of a
        seekable file alone, a row group, or else the whole file (gzip, JSON, CSV, Arrow streams)."""
        if self.byte_start is not None and not compressed(self.path):
            return f"{self.path}#{self.shard_id}"
        if self.group is not None:
            return f"{self.path}#rg{self.group}"
        return self.path


class Reader:
    """One input format. Planning runs `scan` on each of `jobs(path)` (in Ray tasks when attached),
    then `shards` cuts the results into shards; reading runs `read` on the shards of one read unit."""

    name: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]  # also recognised with .gz appended

    def jobs(self, path: str, shard_rows: int) -> list[tuple]:
        """Arguments of the scans that plan one file (several for a file cut into byte ranges)."""
        return [(path,)]

    def scan(self, path: str, *args: Any, max_rows: int | None = None) -> Any:
        """What planning needs of (part of) a file: by default its row count."""
        raise NotImplementedError

    def rows_of(self, result: Any) -> int:
        return int(result)

    def shards(self, path: str, results: list[Any], shard_rows: int, left: float, first_id: int) -> list[Shard]:
        """The file's shards from its scan results, at most `left` rows (the data.limit still open)."""
        return self.cut(path, [results[0]], shard_rows, left, first_id)

    def cut(self, path: str, sizes: list[int], shard_rows: int, left: float, first_id: int,
            grouped: bool = False) -> list[Shard]:
        """Consecutive blocks of `sizes` rows (row groups when `grouped`, else one block: the file) cut
        into shards of `shard_rows` that never cross a block, at most `left` rows in all."""
        out: list[Shard] = []
        start = 0
        for g, size in enumerate(sizes):
            take = int(min(size, left))
            left -= take
            for a in range(start, start + take, shard_rows):
                b = min(a + shard_rows, start + take)
                out.append(Shard(first_id + len(out), path, self.name, a, b, b - a, group=g if grouped else None))
            start += size
        return out

    def read(self, order: list[Shard]) -> Iterator[tuple[Shard, list[Raw]]]:
        """The raw rows of each shard of one read unit (sorted by row), in one sequential pass."""
        raise NotImplementedError

    def records(self, path: str, wanted: set[int]) -> Iterator[tuple[int, Any]]:
        """The original records at a few row indices, streaming (the report's examples)."""
        raise NotImplementedError


def slice_batches(order: list[Shard], batches: Iterator[Any], row: int, short: str) -> Iterator[tuple[Shard, list[Raw]]]:
    """Cut a stream of record batches (starting at file row `row`) into the rows of the given
    shards (sorted, non-overlapping); only the rows of those shards become Python objects."""
    pending = iter(order)
    s = next(pending, None)
    rows: list[Raw] = []
    for batch in batches:
        end = row + batch.num_rows
        while s is not None and s.row_start < end:
            a, b = max(s.row_start, row), min(s.row_stop, end)
            rows += [(a + i, rec, None, None) for i, rec in enumerate(batch.slice(a - row, b - a).to_pylist())]
            if s.row_stop > end:
                break
            yield s, rows
            rows, s = [], next(pending, None)
        if s is None:
            return
        row = end
    if s is not None:
        raise RuntimeError(f"{short} (the input changed since it was planned); plan the run again")


def batch_records(batches: Iterator[Any], wanted: set[int]) -> Iterator[tuple[int, Any]]:
    row = 0
    for batch in batches:
        for i in [i for i in sorted(wanted) if row <= i < row + batch.num_rows]:
            yield i, batch.slice(i - row, 1).to_pylist()[0]
        row += batch.num_rows
