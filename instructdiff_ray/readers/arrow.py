"""Arrow IPC (`.arrow`): the stream format `datasets` writes (`save_to_disk` directories are
listed by sources.py as their Arrow files) and the file format. Counted from its batches' lengths
(no values decoded); a file is one read unit."""

from __future__ import annotations

from typing import Any, Iterator

from . import io
from .base import Raw, Reader, Shard, batch_records, slice_batches


def batches(f) -> Iterator[Any]:
    """Record batches of an Arrow IPC file: the stream format, else the file format."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.PythonFile(f, mode="r"))
    except pa.ArrowInvalid:
        f.seek(0)
        file_reader = pa.ipc.open_file(pa.BufferReader(f.read()))
        for i in range(file_reader.num_record_batches):
            yield file_reader.get_batch(i)
        return
    yield from reader


class ArrowReader(Reader):
    name = "arrow"
    extensions = (".arrow",)

    def scan(self, path: str, *args: Any, max_rows: int | None = None) -> Any:
        with io.open_file(path) as f:
            return sum(b.num_rows for b in batches(f))

    def read(self, order: list[Shard]) -> Iterator[tuple[Shard, list[Raw]]]:
        with io.open_file(order[0].path) as f:
            yield from slice_batches(order, batches(f), 0, f"{order[0].path} is shorter than planned")

    def records(self, path: str, wanted: set[int]) -> Iterator[tuple[int, Any]]:
        with io.open_file(path) as f:
            yield from batch_records(batches(f), wanted)
