"""Corpus stage: find files, plan shards once, read and normalise rows.

A shard is a contiguous row range of one file and the unit of work, output and resume. The
plan depends only on the input files (by content) and the data settings; it is computed once
per run directory (`_plan.json`) and reused by every round, `status` and resume.

Planning never parses a row twice per shard and never needs a driver-side pass per shard:
- JSONL: the file is cut into 64 MiB byte ranges, scanned in parallel (Ray tasks when attached,
  threads otherwise) for line starts; each range is split into shards of `shard_rows` non-blank
  lines (a range's last shard may be shorter). A shard is `(byte_start, n_rows)`, so reading it
  is one seek and a sequential read.
- gzip (`.jsonl.gz`): cannot seek, so the file is scanned by one sequential task and read by one
  sequential task that yields all of its shards in order (a read unit per file).
- Parquet: planned from the footer alone; shards never cross a row group, and a row group is one
  read unit, streamed in batches (never converted whole).
- JSON arrays and CSV: parsed once to count rows, once per read unit (the file) to read.

Every physical row of the input comes out of `iter_unit` exactly once, either as a normalised
sample or with a status and reason; nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import fsspec
import numpy as np

from . import rundir, sources
from .config import ConfigError, DataConfig

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv",
              ".arrow": "arrow"}
RANGE_BYTES = 64 << 20  # a JSONL planning range
PARQUET_BATCH = 4096  # rows decoded at a time from a row group
FULL_DIGEST_BYTES = 256 << 20  # local files up to this size are digested whole
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 16, 1 << 20
PLAN_BUFFER = 16 << 20  # object stores: bytes per range request while planning (sequential scans)
READ_BUFFER = 256 << 10  # object stores: bytes per range request while reading a unit
MAX_READ_BUFFER = 8 << 20  # a JSONL shard of known span is fetched in requests of its size, up to this

# Status codes a row can end with before it reaches a model.
MALFORMED = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
BAD_TYPE = "bad_type"
MISSING_FIELD = "missing_field"
EMPTY_PROMPT = "empty_prompt"
EMPTY_RESPONSE = "empty_response"
UNKNOWN_SHAPE = "unknown_shape"
# The reason prefix of an `error` row no engine can run (token ids outside the vocabulary, more tokens
# than the engine takes): a rerun does not retry it.
INVALID_ROW = "invalid row: "
# Rows whose input cannot become a sample (they count against run.max_invalid_fraction).
INVALID_STATUSES = (MALFORMED, INVALID_UTF8, BAD_TYPE, MISSING_FIELD, EMPTY_PROMPT, EMPTY_RESPONSE, UNKNOWN_SHAPE)


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
        """Shards with the same unit are read together, in one sequential pass."""
        if self.fmt == "jsonl" and not _compressed(self.path):
            return f"{self.path}#{self.shard_id}"
        if self.fmt == "parquet":
            return f"{self.path}#rg{self.group}"
        return self.path  # gzip, JSON, CSV and Arrow stream files: one pass per file


@dataclass
class Plan:
    shards: list[Shard]
    files: list[dict[str, Any]]  # file fingerprints, by content


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


def _compressed(path: str) -> bool:
    return path.lower().endswith(".gz")


def _hidden(relative: str) -> bool:
    """Hidden (`.ipynb_checkpoints`, `.git`) and `_`-prefixed (`_SUCCESS`, `_manifest.json`) names
    are bookkeeping of other tools, never data."""
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def _is_data(relative: str) -> bool:
    return not _hidden(relative) and _fmt_of(relative, "auto") is not None


def list_files(cfg: DataConfig) -> list[tuple[str, str]]:
    """Expand directories (skipping hidden and `_` names), keep known formats, in a sorted, stable
    order; Hub datasets and `save_to_disk` directories become their data files (sources.py)."""
    out: list[tuple[str, str]] = []
    for p in cfg.paths:
        if sources.is_hub(p):
            out += [(f, _fmt_of(f, cfg.format)) for f in sources.hub_files(p, cfg.split, _is_data)]
            continue
        fs, root = rundir.fs_of(p)
        protocol = p.split("://")[0] + "://" if "://" in p else ""
        arrow = sources.disk_dataset_files(p, cfg.split) if fs.isdir(root) else None
        if arrow is not None:
            out += [(f, "arrow") for f in arrow]
        elif fs.isdir(root):
            base = root.rstrip("/") + "/"
            names = sorted(n for n in fs.find(root) if not _hidden(n[len(base):] if n.startswith(base) else n))
            nested = sorted({n.rsplit("/", 1)[0] for n in names if n.rsplit("/", 1)[-1] in ("state.json", "dataset_dict.json")})
            if nested:  # its JSON sidecars would be read as rows, and its Arrow files as a format it is not
                raise ConfigError(f"data.paths: {protocol}{nested[0]} inside {p} is a `datasets` save_to_disk directory; "
                                  "give that directory itself in data.paths (it is read as a dataset)")
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


@contextlib.contextmanager
def _open(path: str, buffer: int = READ_BUFFER) -> Iterator[Any]:
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


def _size(path: str) -> int:
    fs, local = rundir.fs_of(sources.local(path))
    return int(fs.info(local)["size"])


def file_fingerprint(url: str) -> dict[str, Any]:
    """An input file by content, without reading it where that is costly: a local file by its
    sha256 (up to 256 MiB; larger ones by size, mtime and 16 sampled 1 MiB blocks), an object by
    the store's metadata (size, and its ETag, version id or generation, which change with the
    content; a store that gives none is sampled like a large local file), a Hub dataset file by
    its commit."""
    if sources.is_hub(url):
        repo, commit, path = sources.parse_hub(url)
        return {"path": url, "hub": repo, "commit": commit, "file": path}
    fs, path = rundir.fs_of(url)
    info = fs.info(path)
    size = int(info["size"])
    version = {k: str(info[k]) for k in ("ETag", "etag", "VersionId", "generation", "md5Hash", "crc32c") if info.get(k)}
    if version and not rundir.is_local(url):
        return {"path": url, "size": size, "version": version}
    h = hashlib.sha256()  # local files, and stores that give no content version: read the content
    with fs.open(path, "rb") as f:
        if rundir.is_local(url) and size <= FULL_DIGEST_BYTES:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
            return {"path": url, "size": size, "sha256": h.hexdigest()}
        span = max(size - SAMPLE_BLOCK_BYTES, 0)
        for i in range(SAMPLE_BLOCKS):
            f.seek(span * i // (SAMPLE_BLOCKS - 1))
            h.update(f.read(SAMPLE_BLOCK_BYTES))
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated")
    return {"path": url, "size": size, "mtime": str(mtime), "sampled_sha256": h.hexdigest()}


def scan_jsonl(path: str, byte_start: int, byte_stop: int | None, shard_rows: int,
               max_rows: int | None = None) -> dict[str, Any]:
    """The lines that START in [byte_start, byte_stop) of one file (the whole stream for None),
    cut into chunks of `shard_rows` non-blank lines: [byte offset, first line, rows, line after
    last, byte after last], line numbers relative to the range. Streams: memory does not grow with the range."""
    chunks: list[list[int]] = []
    lines = 0
    with _open(path, PLAN_BUFFER) as f:
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


def _arrow_batches(f) -> Iterator[Any]:
    """Record batches of an Arrow IPC file: the stream format `datasets` writes, or the file format."""
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


def _file_batches(f, fmt: str) -> Iterator[Any]:
    """Record batches of a whole Parquet or Arrow file, decoded a batch at a time."""
    if fmt == "arrow":
        return _arrow_batches(f)
    import pyarrow.parquet as pq

    return pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH)


def count_table_rows(path: str, fmt: str) -> int:
    """Rows of a JSON array or CSV (parsed once); rows of an Arrow file (its batches' lengths, no
    values decoded); rows of a Parquet file from its footer."""
    if fmt == "arrow":
        with _open(path) as f:
            return sum(b.num_rows for b in _arrow_batches(f))
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with _open(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    return len(_load_table_rows(path, fmt))


def _parquet_groups(path: str) -> list[int]:
    import pyarrow.parquet as pq

    with _open(path) as f:
        meta = pq.ParquetFile(f).metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def plan_shards(cfg: DataConfig, files: list[tuple[str, str]] | None = None) -> list[Shard]:
    """Deterministic shard plan over all input files (`list_files`, unless given); honours
    `limit` in file order."""
    from .runtime import map_tasks

    jobs: list[tuple[str, tuple]] = []  # (format, scan arguments), in file order
    for path, fmt in files if files is not None else list_files(cfg):
        if fmt == "jsonl" and not _compressed(path):
            size = _size(path)
            jobs += [(fmt, (path, b, min(b + RANGE_BYTES, size), cfg.shard_rows)) for b in range(0, size, RANGE_BYTES)]
        elif fmt == "jsonl":
            jobs.append((fmt, (path, 0, None, cfg.shard_rows)))
        else:
            jobs.append((fmt, (path, fmt)))
    if cfg.limit is None:
        results = map_tasks(_scan_job, jobs)
    else:  # in file order, stopping at the limit
        results, left = [], cfg.limit
        for fmt, args in jobs:
            if left <= 0:
                break
            results.append(_scan_job(fmt, args, left))
            left -= _rows_of(fmt, results[-1])
    shards: list[Shard] = []
    left = cfg.limit if cfg.limit is not None else float("inf")
    line_base: dict[str, int] = {}
    for (fmt, args), res in zip(jobs, results):
        path = args[0]
        if fmt == "jsonl":
            base = line_base.get(path, 0)
            for byte, first, n, stop, end in res["chunks"]:
                shards.append(Shard(len(shards), path, fmt, base + first, base + stop, n, byte, end))
                left -= n
            line_base[path] = base + res["lines"]
            continue
        groups = res if fmt == "parquet" else [res]
        start = 0
        for g, size in enumerate(groups):
            take = int(min(size, left))
            left -= take
            for a in range(start, start + take, cfg.shard_rows):
                b = min(a + cfg.shard_rows, start + take)
                shards.append(Shard(len(shards), path, fmt, a, b, b - a, group=g if fmt == "parquet" else None))
            start += size
    if not shards:
        raise ConfigError("data.paths: the corpus has no rows")
    return shards


def _scan_job(fmt: str, args: tuple, max_rows: int | None = None) -> Any:
    if fmt == "jsonl":
        return scan_jsonl(*args, max_rows=max_rows)
    if fmt == "parquet":
        return _parquet_groups(args[0])
    return count_table_rows(*args)


def _rows_of(fmt: str, res: Any) -> int:
    if fmt == "jsonl":
        return sum(c[2] for c in res["chunks"])
    return sum(res) if fmt == "parquet" else res


def load_plan(cfg: DataConfig, plan_dir: str | None) -> Plan:
    """The run directory's plan when it was made for these files (by content) and settings;
    otherwise a new plan, stored there for every later round, `status` and resume."""
    listed = list_files(cfg)
    files = [file_fingerprint(p) for p, _ in listed]
    key = {"data": cfg.model_dump(mode="json"), "files": files}
    if plan_dir:
        stored = rundir.read_plan(plan_dir)
        if stored is not None and stored.get("key") == key:
            return Plan([Shard.from_dict(d) for d in stored["shards"]], files)
    try:
        plan = Plan(plan_shards(cfg, listed), files)
    except ConfigError:
        raise
    except Exception as err:  # unreadable file, permission, a damaged Parquet footer
        raise ConfigError(f"data.paths: cannot plan shards: {type(err).__name__}: {err}") from err
    if plan_dir:
        rundir.write_plan(plan_dir, {"key": key, "shards": [s.to_dict() for s in plan.shards]})
    return plan


def _load_table_rows(path: str, fmt: str) -> list[Any]:
    if fmt == "json":
        with _open(path) as f:
            try:
                data = json.loads(f.read().decode("utf-8-sig"))
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
            frame = pd.read_csv(f, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        return frame.to_dict("records")
    raise ValueError(fmt)


Raw = tuple[int, Any, "str | None", "str | None"]  # (source_row, record, error status, raw text)


def samples_digest(samples: list[Sample]) -> str:
    """sha256 of the samples' normalised contents, in order: what a model was trained or measured on."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.instruction, s.input, s.response, s.messages], ensure_ascii=False).encode())
    return h.hexdigest()


def rows_by_shard(shards: list[Shard], files: np.ndarray, rows: np.ndarray) -> dict[int, np.ndarray]:
    """shard id -> positions i (into `files`/`rows`, sorted by row) of the rows (files[i], rows[i])
    that the shard holds; vectorised per file."""
    by_file: dict[str, list[Shard]] = {}
    for s in shards:
        by_file.setdefault(s.path, []).append(s)
    out: dict[int, np.ndarray] = {}
    for path in np.unique(files):
        idx = np.flatnonzero(files == path)
        idx = idx[np.argsort(rows[idx], kind="stable")]
        sorted_rows = rows[idx]
        for s in by_file.get(str(path), []):
            lo, hi = np.searchsorted(sorted_rows, [s.row_start, s.row_stop])
            if hi > lo:
                out[s.shard_id] = idx[lo:hi]
    return out


def read_units(shards: list[Shard]) -> list[list[Shard]]:
    """Shards grouped by read unit, in plan order."""
    units: dict[str, list[Shard]] = {}
    for s in shards:
        units.setdefault(s.unit, []).append(s)
    return list(units.values())


def iter_unit(shards: list[Shard]) -> Iterator[tuple[Shard, list[Raw]]]:
    """The raw rows of each shard of one read unit, in one sequential pass over the unit."""
    order = sorted(shards, key=lambda s: (s.row_start, s.shard_id))
    fmt = order[0].fmt
    if fmt == "jsonl":
        yield from _iter_jsonl(order)
    elif fmt == "parquet":
        yield from _iter_parquet(order)
    elif fmt == "arrow":
        with _open(order[0].path) as f:
            yield from _slice_batches(order, _arrow_batches(f), 0, f"{order[0].path} is shorter than planned")
    else:
        rows = _load_table_rows(order[0].path, fmt)
        for s in order:
            yield s, [(i, rows[i], None, None) for i in range(s.row_start, s.row_stop)]


def _iter_jsonl(order: list[Shard]) -> Iterator[tuple[Shard, list[Raw]]]:
    path = order[0].path
    seekable = not _compressed(path)
    spans = [s.byte_stop - s.byte_start for s in order if s.byte_stop is not None and s.byte_start is not None]
    buffer = min(max(max(spans), 64 << 10), MAX_READ_BUFFER) if seekable and spans else READ_BUFFER
    with _open(path, buffer) as f:
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
                    rows.append((lineno, *_parse_line(line)))
                pos, lineno = pos + len(line), lineno + 1
            yield s, rows


def _iter_parquet(order: list[Shard]) -> Iterator[tuple[Shard, list[Raw]]]:
    import pyarrow.parquet as pq

    path, group = order[0].path, order[0].group
    with _open(path) as f:
        pf = pq.ParquetFile(f)
        first = sum(pf.metadata.row_group(g).num_rows for g in range(group))  # file row of the group's first row
        batches = pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=[group])
        yield from _slice_batches(order, batches, first, f"{path}: row group {group} is shorter than planned")


def _slice_batches(order: list[Shard], batches: Iterator[Any], row: int, short: str) -> Iterator[tuple[Shard, list[Raw]]]:
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


def _parse_line(line: bytes) -> tuple[Any, str | None, str | None]:
    try:
        text = line.decode("utf-8").lstrip("\ufeff")  # a byte-order mark, as some editors write it
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


def normalize_rows(shard: Shard, rows: list[Raw], cfg: DataConfig) -> list[Sample]:
    """A shard's raw rows, normalised; unparseable rows keep their raw text for quarantine."""
    out = []
    for row, rec, err, raw in rows:
        if err:
            s = _bad(Sample(shard.path, row), err, f"line {row + 1}: {raw[-200:] if raw else ''}")
            s.raw = raw
            out.append(s)
        else:
            out.append(normalize(shard.path, row, rec, cfg))
    return out


def read_shard(shard: Shard, cfg: DataConfig) -> list[Sample]:
    """All rows of one shard, normalised (reads its whole unit up to the shard: for tests and
    small reads; the pipeline reads whole units with `iter_unit`)."""
    for s, rows in iter_unit([shard]):
        return normalize_rows(s, rows, cfg)
    return []


def read_rows(path: str, fmt: str, wanted: set[int]) -> Iterator[tuple[int, Any]]:
    """The user's original records at a few row indices, streaming (the report's examples)."""
    if fmt == "jsonl":
        with _open(path) as f:
            for lineno, line in enumerate(f):
                if lineno in wanted:
                    yield lineno, json.loads(line.decode("utf-8-sig"))
        return
    if fmt in ("parquet", "arrow"):
        with _open(path) as f:
            row = 0
            for batch in _file_batches(f, fmt):
                for i in [i for i in sorted(wanted) if row <= i < row + batch.num_rows]:
                    yield i, batch.slice(i - row, 1).to_pylist()[0]
                row += batch.num_rows
        return
    for i, rec in enumerate(_load_table_rows(path, fmt)):
        if i in wanted:
            yield i, rec


__all__ = ["Shard", "Sample", "Plan", "plan_shards", "load_plan", "read_units", "iter_unit", "normalize_rows",
           "read_shard", "read_rows", "rows_by_shard", "list_files", "normalize", "file_fingerprint"]
