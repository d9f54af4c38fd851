"""Parquet: planned from the footer alone; shards never cross a row group, and a row group is one
read unit, streamed in batches (never converted whole)."""

from __future__ import annotations

from typing import Any, Iterator

from . import io
from .base import Raw, Reader, Shard, batch_records, slice_batches

BATCH = 4096  # rows decoded at a time from a row group


class ParquetReader(Reader):
    name = "parquet"
    extensions = (".parquet",)

    def scan(self, path: str, *args: Any, max_rows: int | None = None) -> Any:
        """Rows per row group, from the footer."""
        import pyarrow.parquet as pq

        with io.open_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    def rows_of(self, result: Any) -> int:
        return sum(result)

    def shards(self, path: str, results: list[Any], shard_rows: int, left: float, first_id: int) -> list[Shard]:
        return self.cut(path, results[0], shard_rows, left, first_id, grouped=True)

    def read(self, order: list[Shard]) -> Iterator[tuple[Shard, list[Raw]]]:
        import pyarrow.parquet as pq

        path, group = order[0].path, order[0].group
        with io.open_file(path) as f:
            pf = pq.ParquetFile(f)
            first = sum(pf.metadata.row_group(g).num_rows for g in range(group))  # file row of the group's first row
            batches = pf.iter_batches(batch_size=BATCH, row_groups=[group])
            yield from slice_batches(order, batches, first, f"{path}: row group {group} is shorter than planned")

    def records(self, path: str, wanted: set[int]) -> Iterator[tuple[int, Any]]:
        import pyarrow.parquet as pq

        with io.open_file(path) as f:
            yield from batch_records(pq.ParquetFile(f).iter_batches(batch_size=BATCH), wanted)
