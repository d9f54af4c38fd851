"""Corpus stage: find files, plan shards deterministically, read and normalise rows.

A shard is a contiguous row range of one file and the unit of work, output and resume. The
plan depends only on the input files and `shard_rows`, so a rerun plans the same shards.
Every physical row of the input comes out of `read_shard` exactly once, either as a normalised
sample or with a status and reason; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import fsspec

from .config import ConfigError, DataConfig

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# Status codes a row can end with before it reaches a model.
MALFORMED = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
BAD_TYPE = "bad_type"
MISSING_FIELD = "missing_field"
EMPTY_PROMPT = "empty_prompt"
EMPTY_RESPONSE = "empty_response"
UNKNOWN_SHAPE = "unknown_shape"


@dataclass(frozen=True)
class Shard:
    shard_id: int
    path: str
    fmt: str
    row_start: int  # first row index (for jsonl: physical line number) in the file
    row_stop: int
    n_rows: int  # rows this shard yields (jsonl: non-blank lines in the range)
    byte_start: int | None = None  # jsonl only: where row_start begins

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Shard":
        return Shard(**{k: d[k] for k in Shard.__dataclass_fields__})


@dataclass
class Sample:
    """One input row after normalisation; `messages` is set for chat-shaped data."""

    source_file: str
    source_row: int
    sample_id: str = ""
    instruction: str = ""
    input: str = ""
    response: str = ""
    messages: list[dict[str, str]] | None = None
    status: str = "ok"
    reason: str = ""
    raw: str | None = field(default=None, repr=False)  # kept only for quarantined rows


def _fmt_of(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for ext, kind in EXTENSIONS.items():
        if name.endswith(ext) or name.endswith(ext + ".gz"):
            return kind
    return None


def list_files(cfg: DataConfig) -> list[tuple[str, str]]:
    """Expand directories, keep known formats, in a sorted, stable order."""
    out: list[tuple[str, str]] = []
    for p in cfg.paths:
        fs, root = fsspec.core.url_to_fs(p)
        protocol = p.split("://")[0] + "://" if "://" in p else ""
        if fs.isdir(root):
            names = sorted(fs.find(root))
            found = [(protocol + n if protocol else n, _fmt_of(n, cfg.format)) for n in names]
            found = [(n, f) for n, f in found if f]
            if not found:
                raise ConfigError(f"data.paths: no .jsonl/.json/.parquet/.csv files under {p}")
            out.extend(found)
        elif fs.exists(root):
            kind = _fmt_of(p, cfg.format)
            if kind is None:
                raise ConfigError(f"data.paths: cannot tell the format of {p}; set data.format")
            out.append((p, kind))
        else:
            raise ConfigError(f"data.paths: {p} does not exist")
    return out


def _open(path: str, mode: str = "rb"):
    return fsspec.open(path, mode, compression="infer")


def _jsonl_line_starts(path: str) -> Iterator[tuple[int, int]]:
    """(line number, byte offset) of every non-blank line, streaming (constant memory)."""
    with _open(path) as f:
        offset = 0
        for lineno, line in enumerate(f):
            if line.strip():
                yield lineno, offset
            offset += len(line)


def _count_rows(path: str, fmt: str) -> int:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with _open(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    return len(_load_table_rows(path, fmt))


def plan_shards(cfg: DataConfig) -> list[Shard]:
    """Deterministic shard plan over all input files; honours `limit` in file order."""
    shards: list[Shard] = []
    remaining = cfg.limit if cfg.limit is not None else float("inf")
    for path, fmt in list_files(cfg):
        if remaining <= 0:
            break
        if fmt == "jsonl":
            group: list[tuple[int, int]] = []
            for lineno, offset in _jsonl_line_starts(path):
                if remaining <= 0:
                    break
                group.append((lineno, offset))
                remaining -= 1
                if len(group) == cfg.shard_rows:
                    shards.append(_jsonl_shard(len(shards), path, group))
                    group = []
            if group:
                shards.append(_jsonl_shard(len(shards), path, group))
        else:
            n = min(_count_rows(path, fmt), remaining)
            remaining -= n
            for start in range(0, int(n), cfg.shard_rows):
                stop = int(min(start + cfg.shard_rows, n))
                shards.append(Shard(len(shards), path, fmt, start, stop, stop - start))
    if not shards:
        raise ConfigError("data.paths: the corpus has no rows")
    return shards


def _jsonl_shard(shard_id: int, path: str, group: list[tuple[int, int]]) -> Shard:
    return Shard(shard_id, path, "jsonl", group[0][0], group[-1][0] + 1, len(group), group[0][1])


def _load_table_rows(path: str, fmt: str) -> list[Any]:
    if fmt == "json":
        with _open(path) as f:
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ConfigError(f"{path}: not a valid JSON array ({err}); use JSONL for line-level recovery") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
        if not isinstance(data, list):
            raise ConfigError(f"{path}: a .json corpus must be an array of objects")
        return data
    if fmt == "csv":
        import pandas as pd

        with _open(path) as f:
            frame = pd.read_csv(f, dtype=str, keep_default_na=False)
        return frame.to_dict("records")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with _open(path) as f:
            return pq.read_table(f).to_pylist()
    raise ValueError(fmt)


def read_raw(shard: Shard) -> Iterator[tuple[int, Any, str | None, str | None]]:
    """Yield (source_row, record, error_status, raw_text) for every row of the shard."""
    if shard.fmt == "jsonl":
        with _open(shard.path) as f:
            f.seek(shard.byte_start or 0)  # gzip streams seek too (by decompressing)
            lineno = shard.row_start if shard.byte_start is not None else 0
            for line in f:
                if lineno >= shard.row_stop:
                    break
                if lineno >= shard.row_start and line.strip():
                    yield (lineno, *_parse_line(line))
                lineno += 1
        return
    if shard.fmt == "parquet":
        import pyarrow.parquet as pq

        with _open(shard.path) as f:
            pf = pq.ParquetFile(f)
            seen = 0
            for rg in range(pf.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                if seen + n > shard.row_start and seen < shard.row_stop:
                    rows = pf.read_row_group(rg).to_pylist()
                    for i, rec in enumerate(rows):
                        if shard.row_start <= seen + i < shard.row_stop:
                            yield seen + i, rec, None, None
                seen += n
        return
    rows = _load_table_rows(shard.path, shard.fmt)
    for i in range(shard.row_start, shard.row_stop):
        yield i, rows[i], None, None


def _parse_line(line: bytes) -> tuple[Any, str | None, str | None]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, INVALID_UTF8, line[:2000].decode("utf-8", "replace") + f"  [{err}]"
    try:
        return json.loads(text), None, None
    except json.JSONDecodeError as err:
        return None, MALFORMED, text[:2000] + f"  [{err}]"


PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "alpaca": {"instruction": ("instruction",), "input": ("input",), "response": ("output", "response")},
    "qa": {"instruction": ("question",), "response": ("answer",)},
    "prompt_completion": {"instruction": ("prompt",), "response": ("completion",)},
    "messages": {"messages": ("messages",)},
    "sharegpt": {"messages": ("conversations",)},
}
# ShareGPT exports name the assistant after the product that answered (chatgpt, bing, bard).
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "model": "assistant", "bot": "assistant", "chatgpt": "assistant", "bing": "assistant",
                "bard": "assistant", "system": "system", "tool": "tool"}


def _detect(rec: dict[str, Any]) -> str | None:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec:
        return "alpaca"
    if "question" in rec and "answer" in rec:
        return "qa"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    return None


def _mapping(rec: dict[str, Any], cfg: DataConfig) -> dict[str, tuple[str, ...]] | None:
    if cfg.fields:
        alias = {"prompt": "instruction", "completion": "response", "output": "response"}
        return {alias.get(k, k): (v,) for k, v in cfg.fields.items()}
    preset = cfg.preset if cfg.preset != "auto" else _detect(rec)
    return PRESETS.get(preset) if preset else None


def _content_id(sample: Sample) -> str:
    payload = json.dumps([sample.instruction, sample.input, sample.response, sample.messages], ensure_ascii=False)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]


def normalize(source_file: str, source_row: int, rec: Any, cfg: DataConfig) -> Sample:
    """Map one parsed record onto instruction/input/response or messages, or give it a status."""
    s = Sample(source_file, source_row)
    if not isinstance(rec, dict):
        return _bad(s, BAD_TYPE, f"row is {type(rec).__name__}, expected an object")
    mapping = _mapping(rec, cfg)
    if mapping is None:
        return _bad(s, UNKNOWN_SHAPE, f"cannot map fields {sorted(rec)[:8]}; set data.preset or data.fields")
    for canon, names in mapping.items():
        col = next((n for n in names if n in rec and rec[n] is not None), None)
        if col is None:
            if canon == "input":
                continue
            return _bad(s, MISSING_FIELD, f"missing field {'/'.join(names)}")
        value = rec[col]
        if canon == "messages":
            msgs = _messages(value)
            if isinstance(msgs, str):
                return _bad(s, BAD_TYPE, f"{col}: {msgs}")
            s.messages = msgs
        elif isinstance(value, str):
            setattr(s, canon, value)
        else:
            return _bad(s, BAD_TYPE, f"{col} is {type(value).__name__}, expected a string")
    if s.messages is not None:
        if not any(m["role"] == "assistant" and m["content"].strip() for m in s.messages):
            return _bad(s, EMPTY_RESPONSE, "no non-empty assistant turn")
        if not any(m["role"] != "assistant" and m["content"].strip() for m in s.messages):
            return _bad(s, EMPTY_PROMPT, "no non-empty user/system turn")
    else:
        if not s.instruction.strip() and not s.input.strip():
            return _bad(s, EMPTY_PROMPT, "empty instruction")
        if not s.response.strip():
            return _bad(s, EMPTY_RESPONSE, "empty response")
    if cfg.id_field:
        if rec.get(cfg.id_field) in (None, ""):
            return _bad(s, MISSING_FIELD, f"missing id field {cfg.id_field}")
        s.sample_id = str(rec[cfg.id_field])
    else:
        s.sample_id = _content_id(s)
    return s


def _messages(value: Any) -> list[dict[str, str]] | str:
    if not isinstance(value, list) or not value:
        return "expected a non-empty list of turns"
    out = []
    for turn in value:
        if not isinstance(turn, dict):
            return "a turn is not an object"
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES or not isinstance(content, str):
            return f"bad turn (role={role!r}, content type {type(content).__name__})"
        out.append({"role": ROLE_ALIASES[role], "content": content})
    return out


def _bad(s: Sample, status: str, reason: str) -> Sample:
    s.status, s.reason = status, reason
    if not s.sample_id:
        s.sample_id = "row-" + hashlib.sha1(f"{s.source_file}:{s.source_row}".encode()).hexdigest()[:16]
    return s


def read_shard(shard: Shard, cfg: DataConfig) -> list[Sample]:
    """All rows of one shard, normalised; unparseable rows keep their raw text for quarantine."""
    out = []
    for row, rec, err, raw in read_raw(shard):
        if err:
            s = _bad(Sample(shard.path, row), err, f"line {row + 1}: {raw[-200:] if raw else ''}")
            s.raw = raw
            out.append(s)
        else:
            out.append(normalize(shard.path, row, rec, cfg))
    return out


def read_rows(path: str, fmt: str, wanted: set[int]) -> Iterator[tuple[int, Any]]:
    """The user's original records at the given row indices (for writing the selection)."""
    if fmt == "jsonl":
        with _open(path) as f:
            for lineno, line in enumerate(f):
                if lineno in wanted:
                    yield lineno, json.loads(line)
        return
    for i, rec in enumerate(_load_table_rows(path, fmt)):
        if i in wanted:
            yield i, rec


__all__ = ["Shard", "Sample", "plan_shards", "read_shard", "read_rows", "list_files", "normalize"]
