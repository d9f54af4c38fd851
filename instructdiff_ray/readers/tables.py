"""Formats parsed whole: a JSON array (`.json`, also `{"key": [...]}`) and CSV (`.csv`, quoted
fields, a byte-order mark allowed). Planning parses the file once to count its rows; reading
parses it once per read unit (the file)."""

from __future__ import annotations

import json
from typing import Any, Iterator

from ..config import ConfigError
from . import io
from .base import Raw, Reader, Shard


class _Whole(Reader):
    def load(self, path: str) -> list[Any]:
        raise NotImplementedError

    def scan(self, path: str, *args: Any, max_rows: int | None = None) -> Any:
        return len(self.load(path))

    def read(self, order: list[Shard]) -> Iterator[tuple[Shard, list[Raw]]]:
        rows = self.load(order[0].path)
        for s in order:
            yield s, [(i, rows[i], None, None) for i in range(s.row_start, s.row_stop)]

    def records(self, path: str, wanted: set[int]) -> Iterator[tuple[int, Any]]:
        for i, rec in enumerate(self.load(path)):
            if i in wanted:
                yield i, rec


class JsonReader(_Whole):
    name = "json"
    extensions = (".json",)

    def load(self, path: str) -> list[Any]:
        with io.open_file(path) as f:
            try:
                data = json.loads(f.read().decode("utf-8-sig"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ConfigError(f"{path}: not a valid JSON array ({err}); use JSONL for line-level recovery") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
        if not isinstance(data, list):
            raise ConfigError(f"{path}: a .json corpus must be an array of objects")
        return data


class CsvReader(_Whole):
    name = "csv"
    extensions = (".csv",)

    def load(self, path: str) -> list[Any]:
        import pandas as pd

        with io.open_file(path) as f:
            frame = pd.read_csv(f, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        return frame.to_dict("records")
