"""Corpus stage: find files, plan shards once, read and normalise rows.

A shard is a contiguous row range of one file and the unit of work, output and resume. The
plan depends only on the input files (by content) and the data settings; it is computed once
per run directory (`_plan.json`) and reused by every round, `status` and resume. How each
format is planned and read is its reader's (readers/); here: listing files, fingerprints, the
plan, and turning raw rows into samples with a status.

Every physical row of the input comes out of `iter_unit` exactly once, either as a normalised
sample or with a status and reason; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from . import rundir, sources
from .config import ConfigError, DataConfig
from .readers import READERS, format_of, reader_for
from .readers.base import INVALID_UTF8, MALFORMED, Raw, Shard

FULL_DIGEST_BYTES = 256 << 20  # local files up to this size are digested whole
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 16, 1 << 20

# Status codes a row can end with before it reaches a model (MALFORMED and INVALID_UTF8: its reader's).
BAD_TYPE = "bad_type"
MISSING_FIELD = "missing_field"
EMPTY_PROMPT = "empty_prompt"
EMPTY_RESPONSE = "empty_response"
UNKNOWN_SHAPE = "unknown_shape"
# Rows whose input cannot become a sample (they count against run.max_invalid_fraction).
INVALID_STATUSES = (MALFORMED, INVALID_UTF8, BAD_TYPE, MISSING_FIELD, EMPTY_PROMPT, EMPTY_RESPONSE, UNKNOWN_SHAPE)


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


def _hidden(relative: str) -> bool:
    """Hidden (`.ipynb_checkpoints`, `.git`) and `_`-prefixed (`_SUCCESS`, `_manifest.json`) names
    are bookkeeping of other tools, never data."""
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def _is_data(relative: str) -> bool:
    return not _hidden(relative) and format_of(relative) is not None


def list_files(cfg: DataConfig) -> list[tuple[str, str]]:
    """Expand directories (skipping hidden and `_` names), keep known formats, in a sorted, stable
    order; Hub datasets and `save_to_disk` directories become their data files (sources.py)."""
    if cfg.format != "auto" and cfg.format not in READERS:
        raise ConfigError(f"data.format: unknown format {cfg.format!r}; choose from auto, {', '.join(READERS)}")
    out: list[tuple[str, str]] = []
    for p in cfg.paths:
        if sources.is_hub(p):
            out += [(f, format_of(f, cfg.format)) for f in sources.hub_files(p, cfg.split, _is_data)]
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
            found = [(protocol + n if protocol else n, format_of(n, cfg.format)) for n in names]
            found = [(n, f) for n, f in found if f]
            if not found:
                raise ConfigError(f"data.paths: no .jsonl/.json/.parquet/.csv files under {p}")
            out.extend(found)
        elif fs.exists(root):
            kind = format_of(p, cfg.format)
            if kind is None:
                raise ConfigError(f"data.paths: cannot tell the format of {p}; set data.format")
            out.append((p, kind))
        else:
            raise ConfigError(f"data.paths: {p} does not exist")
    return out


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


def plan_shards(cfg: DataConfig, files: list[tuple[str, str]] | None = None) -> list[Shard]:
    """Deterministic shard plan over all input files (`list_files`, unless given); honours
    `limit` in file order. Each file's reader says how to scan it; the scans run in parallel."""
    from .runtime import map_tasks

    jobs: list[tuple[str, tuple]] = []  # (format, scan arguments), in file order
    for path, fmt in files if files is not None else list_files(cfg):
        jobs += [(fmt, args) for args in reader_for(fmt).jobs(path, cfg.shard_rows)]
    if cfg.limit is None:
        results = map_tasks(_scan_job, jobs)
    else:  # in file order, stopping at the limit
        results, left = [], cfg.limit
        for fmt, args in jobs:
            if left <= 0:
                break
            results.append(_scan_job(fmt, args, left))
            left -= reader_for(fmt).rows_of(results[-1])
    shards: list[Shard] = []
    left = cfg.limit if cfg.limit is not None else float("inf")
    by_file: dict[str, tuple[str, list[Any]]] = {}  # path -> (format, its scan results), in file order
    for (fmt, args), res in zip(jobs, results):
        by_file.setdefault(args[0], (fmt, []))[1].append(res)
    for path, (fmt, found) in by_file.items():
        new = reader_for(fmt).shards(path, found, cfg.shard_rows, left, len(shards))
        left -= sum(s.n_rows for s in new)
        shards += new
    if not shards:
        raise ConfigError("data.paths: the corpus has no rows")
    return shards


def _scan_job(fmt: str, args: tuple, max_rows: int | None = None) -> Any:
    return reader_for(fmt).scan(*args, max_rows=max_rows)


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


def samples_digest(samples: list[Sample]) -> str:
    """sha256 of the samples' normalised contents, in order: what a model was trained or measured on."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.instruction, s.input, s.response, s.messages], ensure_ascii=False).encode())
    return h.hexdigest()


def rows_by_shard(shards: list[Shard], files: Any, rows: np.ndarray) -> dict[int, np.ndarray]:
    """shard id -> positions i (into `files`/`rows`, sorted by row) of the rows (files[i], rows[i])
    that the shard holds; vectorised per file. `files` (an Arrow or numpy array of paths) is read
    as dictionary codes: millions of rows cost 4 bytes each, not a Python string."""
    import pyarrow as pa

    by_file: dict[str, list[Shard]] = {}
    for s in shards:
        by_file.setdefault(s.path, []).append(s)
    arr = files if isinstance(files, (pa.Array, pa.ChunkedArray)) else pa.array(files, pa.string())
    arr = pa.chunked_array([arr]) if isinstance(arr, pa.Array) else arr
    arr = arr.cast(pa.dictionary(pa.int32(), pa.string())).unify_dictionaries()
    chunks = [c for c in arr.chunks if len(c)]
    paths = chunks[0].dictionary.to_pylist() if chunks else []
    codes = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in chunks]) if chunks else np.zeros(0, np.int32)
    out: dict[int, np.ndarray] = {}
    for code in np.unique(codes):
        idx = np.flatnonzero(codes == code)
        idx = idx[np.argsort(rows[idx], kind="stable")]
        sorted_rows = rows[idx]
        for s in by_file.get(paths[code], []):
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
    return reader_for(order[0].fmt).read(order)


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
    return reader_for(fmt).records(path, wanted)


__all__ = ["Shard", "Sample", "Plan", "plan_shards", "load_plan", "read_units", "iter_unit", "normalize_rows",
           "read_shard", "read_rows", "rows_by_shard", "list_files", "normalize", "file_fingerprint"]
