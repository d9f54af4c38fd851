"""Everything persisted: paths, atomic writes, the lease, manifests and fingerprints, shard
markers, stage stamps and the selection commit. No other module names a file of the run
directory or writes one in place.

A run directory (`out`):

    _lease.json                  who drives this run (holder, heartbeat, ttl)
    _plan.json                   the shard plan and what it was made from (input fingerprints, data settings)
    _run_config.json             every invocation: when, where, code version, config
    _run_summary.json            the finished job's summary
    round-K/warmup/              adapter/, merged/, loss.json, then _WARMUP_DONE.json (the stamp)
    round-K/scores/              _manifest.json, shard-NNNNN.parquet, _done/shard-NNNNN.json (markers),
                                 _quarantine/, _summary.json
    round-K/selection/           selected_ids.txt, selection.parquet, stats.json, selected.<fmt>
                                 (via _export/part-*.jsonl), then _SELECTION_DONE.json (the commit)

Commit rules: a file is complete or absent. On a local disk every file is written to a
temporary name beside it and renamed into place; on object stores an object appears only when
its upload completes. A shard counts as finished only once its marker exists (written after its
Parquet file), a warmup only with its stamp, a selection only with its commit marker.
Temporaries left by a killed writer are removed when the next driver takes the lease.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .faults import kill_point

log = logging.getLogger(__name__)

LEASE = "_lease.json"
RUN_CONFIG = "_run_config.json"
RUN_SUMMARY = "_run_summary.json"
PLAN = "_plan.json"
MANIFEST = "_manifest.json"
SCORES_SUMMARY = "_summary.json"
DONE_DIR = "_done"
QUARANTINE_DIR = "_quarantine"
WARMUP_STAMP = "_WARMUP_DONE.json"
SELECTION_COMMIT = "_SELECTION_DONE.json"
COMPARE_DIR = "compare"
COMPARE_MANIFEST = "_compare.json"
UNIT_DONE = "_UNIT_DONE.json"
EXPORT_PARTS = "_export"  # part files of an export in progress
TMP_SUFFIX = ".tmp"


class FingerprintMismatch(RuntimeError):
    """The directory holds results of a different configuration."""


class LeaseHeld(RuntimeError):
    """Another live driver holds the run directory."""


# ---------------------------------------------------------------- paths and atomic writes


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def fs_of(url: str):
    """(filesystem, path inside it) for a local path or an fsspec URL."""
    return fsspec.core.url_to_fs(url)


def is_local(url: str) -> bool:
    return isinstance(fs_of(url)[0], LocalFileSystem)


def exists(url: str) -> bool:
    fs, path = fs_of(url)
    return fs.exists(path)


@contextlib.contextmanager
def open_atomic(url: str, mode: str = "wb", point: str | None = None) -> Iterator[Any]:
    """A file handle whose content appears at `url` whole or not at all.

    `point` names a fault-injection point reached after the first half of the data is written
    (used by `write_bytes`)."""
    fs, path = fs_of(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        with fs.open(path, mode) as f:  # object stores: the object exists only once the upload completes
            yield f
        return
    name = path.rsplit("/", 1)[-1]
    tmp = join(parent, f".{name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(url: str, data: bytes, point: str | None = None) -> None:
    with open_atomic(url, "wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        if point:
            f.flush()
            kill_point(f"{point}.mid_write")
        f.write(data[half:])


def write_json(url: str, obj: Any, point: str | None = None, indent: int | None = 1) -> None:
    write_bytes(url, json.dumps(obj, indent=indent, default=str, ensure_ascii=False).encode("utf-8"), point)


def read_json(url: str) -> Any:
    fs, path = fs_of(url)
    with fs.open(path, "r") as f:
        return json.load(f)


def write_parquet(url: str, table) -> None:
    import pyarrow.parquet as pq

    with open_atomic(url, "wb") as f:
        pq.write_table(table, f)


def clean_temporaries(url: str) -> int:
    """Remove temporaries that a killed writer left under `url` (local disks only); return how many."""
    if not is_local(url) or not os.path.isdir(url):
        return 0
    n = 0
    for dirpath, dirnames, filenames in os.walk(url):
        for name in filenames + dirnames:
            if name.startswith(".") and (name.endswith(TMP_SUFFIX) or name.startswith(".tmp-")):
                target = os.path.join(dirpath, name)
                if os.path.isdir(target):
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(target)
                n += 1
    return n


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Top-level keys (and `key.sub` for nested dicts) whose values differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in differing_keys(a, b)]
        else:
            out.append(key)
    return out


# ---------------------------------------------------------------- the lease


class Lease:
    """One driver per run directory.

    The holder writes `_lease.json` and refreshes its heartbeat every ttl/4 seconds from a thread;
    a lease whose heartbeat is older than its ttl belongs to a dead driver and may be taken over.
    Taking it is write-then-confirm: after writing, the driver waits a moment and reads the lease
    back, so of two drivers racing for it exactly one finds its own id. A holder that finds
    another id on a heartbeat has lost the lease (it was paused past the ttl) and stops at the
    next stage boundary (`check`).
    """

    def __init__(self, run_dir: str, ttl_s: float, settle_s: float | None = None):
        self.url = join(run_dir, LEASE)
        self.run_dir = run_dir
        self.ttl = ttl_s
        self.settle = settle_s if settle_s is not None else (0.2 if is_local(run_dir) else 1.0)
        self.id = uuid.uuid4().hex
        self.info = {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(), "argv": sys.argv,
                     "started_at": time.time(), "ttl_s": ttl_s}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return read_json(self.url)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def _write(self) -> None:
        write_json(self.url, {**self.info, "heartbeat_at": time.time()})

    @staticmethod
    def describe(holder: dict[str, Any]) -> str:
        age = time.time() - float(holder.get("heartbeat_at", 0))
        return (f"pid {holder.get('pid')} on {holder.get('host')} (started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started_at', 0)))}, "
                f"heartbeat {age:.0f}s ago, expires after {holder.get('ttl_s')}s without one)")

    def acquire(self) -> "Lease":
        holder = self._read()
        if holder and holder.get("id") != self.id and time.time() - float(holder.get("heartbeat_at", 0)) <= float(holder.get("ttl_s", self.ttl)):
            raise LeaseHeld(f"{self.run_dir} is in use by another driver: {self.describe(holder)}; "
                            "wait for it to finish, or for its lease to expire if it died")
        self._write()
        time.sleep(self.settle)
        holder = self._read()
        if not holder or holder.get("id") != self.id:
            raise LeaseHeld(f"{self.run_dir}: another driver took the lease at the same time: "
                            f"{self.describe(holder) if holder else 'unknown'}")
        self._thread = threading.Thread(target=self._beat, name="instructdiff-lease", daemon=True)
        self._thread.start()
        removed = clean_temporaries(self.run_dir)
        if removed:
            log.info("removed %d temporaries left by an interrupted run", removed)
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            holder = self._read()
            if holder and holder.get("id") != self.id:
                self.lost = f"lease on {self.run_dir} taken over by {self.describe(holder)}"
                log.error(self.lost)
                return
            try:
                self._write()
            except OSError as err:  # a flaky store: the next beat tries again
                log.warning("lease heartbeat failed: %s", err)

    def check(self) -> None:
        """Raise at a stage boundary if the lease was lost."""
        if self.lost:
            raise LeaseHeld(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder and holder.get("id") == self.id:
            fs, path = fs_of(self.url)
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------- invocations and summaries


def record_invocation(run_dir: str, config: dict[str, Any], environment: dict[str, Any]) -> None:
    """Append this invocation to `_run_config.json` (the history is kept, never overwritten)."""
    url = join(run_dir, RUN_CONFIG)
    history: list[dict[str, Any]] = []
    if exists(url):
        old = read_json(url)
        history = old["invocations"] if isinstance(old, dict) and "invocations" in old else [{"config": old}]
    history.append({"at": time.time(), "host": socket.gethostname(), "pid": os.getpid(), "argv": sys.argv,
                    "environment": environment, "config": config})
    write_json(url, {"invocations": history}, point="run_config")


def write_run_summary(run_dir: str, summary: dict[str, Any]) -> None:
    write_json(join(run_dir, RUN_SUMMARY), summary, point="run_summary", indent=2)


def read_run_summary(run_dir: str) -> dict[str, Any]:
    return read_json(join(run_dir, RUN_SUMMARY))


def round_dir(run_dir: str, k: int) -> str:
    return join(run_dir, f"round-{k}")


def round_dirs(run_dir: str) -> list[str]:
    """round-K directories of a run, in order."""
    fs, root = fs_of(run_dir)
    prefix = run_dir.split("://")[0] + "://" if "://" in run_dir else ""
    found = [p for p in fs.glob(join(root, "round-*")) if p.rsplit("-", 1)[-1].isdigit()]
    return [prefix + p for p in sorted(found, key=lambda p: int(p.rsplit("-", 1)[-1]))]


# ---------------------------------------------------------------- scores: manifest and shard markers


def read_plan(run_dir: str) -> dict[str, Any] | None:
    url = join(run_dir, PLAN)
    return read_json(url) if exists(url) else None


def write_plan(run_dir: str, plan: dict[str, Any]) -> None:
    write_json(url := join(run_dir, PLAN), plan, indent=None)
    log.debug("wrote %s", url)


def shard_name(shard_id: int) -> str:
    """Eight digits sort by name up to 10^8 shards; listings are ordered by the parsed id anyway."""
    return f"shard-{shard_id:08d}"


def shard_id_of(name: str) -> int:
    return int(name.rsplit("/", 1)[-1].split("-", 1)[1].split(".", 1)[0])


def shard_file(scores_dir: str, shard_id: int) -> str:
    return join(scores_dir, shard_name(shard_id) + ".parquet")


def is_scores_dir(url: str) -> bool:
    return exists(join(url, MANIFEST))


def read_manifest(scores_dir: str) -> dict[str, Any]:
    return read_json(join(scores_dir, MANIFEST))


def check_or_write_manifest(scores_dir: str, fp: dict[str, Any], plan: list[dict[str, Any]],
                            environment: dict[str, Any]) -> None:
    """Write the manifest of a new scores directory, or refuse one written for other inputs."""
    url = join(scores_dir, MANIFEST)
    if exists(url):
        old = read_json(url)
        diffs = differing_keys(old["fingerprint"], fp) if old["fingerprint_hash"] != digest(fp) else []
        if old["plan_hash"] != digest(plan):
            diffs.append("shard plan")
        if diffs:
            raise FingerprintMismatch(
                f"{scores_dir} holds scores of a different configuration (differs in: {', '.join(diffs)}); "
                "use a new output directory or remove this one")
        return
    write_json(url, {"fingerprint": fp, "fingerprint_hash": digest(fp), "plan_hash": digest(plan), "plan": plan,
                     "environment": environment, "created_at": time.time()}, point="manifest")


def write_shard_output(scores_dir: str, shard_id: int, table, quarantine: list[dict[str, Any]],
                       marker: dict[str, Any]) -> None:
    """The shard's Parquet file, its quarantine lines, then its marker: the marker commits the
    shard (and records how long writing the files took)."""
    name = shard_name(shard_id)
    t = time.perf_counter()
    write_parquet(shard_file(scores_dir, shard_id), table)
    if quarantine:
        lines = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantine)
        write_bytes(join(scores_dir, QUARANTINE_DIR, name + ".jsonl"), lines.encode("utf-8"))
    marker = {**marker, "write_seconds": time.perf_counter() - t}
    kill_point("shard.before_marker")
    write_json(join(scores_dir, DONE_DIR, name + ".json"), marker, point="marker", indent=None)


def finished_markers(scores_dir: str) -> dict[int, dict[str, Any]]:
    """shard id -> marker of every finished shard (fetched concurrently on object stores)."""
    fs, root = fs_of(scores_dir)
    paths = fs.glob(join(root, DONE_DIR, "shard-*.json"))
    if not paths:
        return {}
    blobs = fs.cat(paths)
    out = {}
    for blob in blobs.values():
        marker = json.loads(blob)
        out[int(marker["shard_id"])] = marker
    return out


def score_files(scores_dir: str) -> list[str]:
    """The Parquet files of finished shards (all *.parquet for a directory without markers)."""
    fs, root = fs_of(scores_dir)
    prefix = scores_dir.split("://")[0] + "://" if "://" in scores_dir else ""
    markers = sorted(fs.glob(join(root, DONE_DIR, "shard-*.json")), key=shard_id_of)
    if markers:
        return [prefix + join(root, p.rsplit("/", 1)[-1][: -len(".json")] + ".parquet") for p in markers]
    return [prefix + p for p in sorted(fs.glob(join(root, "*.parquet")))]


def unmarked_shard_files(scores_dir: str, done: set[int]) -> list[str]:
    fs, root = fs_of(scores_dir)
    return [p for p in fs.glob(join(root, "shard-*.parquet")) if shard_id_of(p) not in done]


def write_scores_summary(scores_dir: str, summary: dict[str, Any]) -> None:
    write_json(join(scores_dir, SCORES_SUMMARY), summary, indent=2)


# ---------------------------------------------------------------- warmup stamp


def warmup_stamp(warmup_dir: str) -> dict[str, Any] | None:
    url = join(warmup_dir, WARMUP_STAMP)
    return read_json(url) if exists(url) else None


def check_warmup_stamp(warmup_dir: str, fp: dict[str, Any]) -> dict[str, Any] | None:
    """The stamp of a finished warmup trained with `fp`, None if unfinished; refuses another `fp`."""
    stamp = warmup_stamp(warmup_dir)
    if stamp is None:
        return None
    old = stamp.get("fingerprint", {})
    if digest(old) != digest(fp):
        raise FingerprintMismatch(
            f"{warmup_dir} holds a warmup model trained differently (differs in: {', '.join(differing_keys(old, fp))}); "
            "use a new run directory or remove this one")
    return stamp


def clear_dir(url: str) -> None:
    """Remove an unfinished stage's leftovers before it runs again."""
    fs, path = fs_of(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_warmup_stamp(warmup_dir: str, stamp: dict[str, Any]) -> None:
    kill_point("warmup.before_stamp")
    write_json(join(warmup_dir, WARMUP_STAMP), stamp, indent=2)


def merged_digest_ok(merged_url: str, digest_of_copy: str) -> bool:
    """A warmup's merged/ is trusted only when its digest equals the one its stamp recorded."""
    stamp = warmup_stamp(merged_url.rstrip("/").rsplit("/", 1)[0])
    return bool(stamp and stamp.get("merged_digest") and stamp["merged_digest"] == digest_of_copy)


# ---------------------------------------------------------------- selection commit


def selection_paths(sel_dir: str) -> dict[str, str]:
    return {k: join(sel_dir, v) for k, v in
            {"ids": "selected_ids.txt", "scores": "selection.parquet", "stats": "stats.json"}.items()}


def commit_selection(sel_dir: str, paths: dict[str, str], stats: dict[str, Any]) -> None:
    kill_point("selection.before_commit")
    write_json(join(sel_dir, SELECTION_COMMIT), {"paths": paths, "selected_rows": stats["selected_rows"],
                                                  "committed_at": time.time()})


def committed_selection(sel_dir: str) -> dict[str, Any] | None:
    """The commit record of a finished selection, or None (files without a commit are not trusted)."""
    url = join(sel_dir, SELECTION_COMMIT)
    return read_json(url) if exists(url) else None


# ---------------------------------------------------------------- compare units


def compare_dir(run_dir: str) -> str:
    return join(run_dir, COMPARE_DIR)


def unit_dir(run_dir: str, unit: str) -> str:
    """A compare unit's directory: `strategy/seed-S`, or `base` (the base model, not fine-tuned)."""
    return join(compare_dir(run_dir), "units", unit)


def check_or_write_compare_manifest(run_dir: str, fp: dict[str, Any]) -> None:
    """A compare directory holds units of one set of training and evaluation settings; adding a
    strategy or a seed is fine, anything else is refused (its units would not be comparable)."""
    url = join(compare_dir(run_dir), COMPARE_MANIFEST)
    if exists(url):
        old = read_json(url)["fingerprint"]
        if digest(old) != digest(fp):
            raise FingerprintMismatch(
                f"{compare_dir(run_dir)} holds a comparison made with other settings (differs in: "
                f"{', '.join(differing_keys(old, fp))}); remove that directory to compare afresh")
        return
    write_json(url, {"fingerprint": fp, "created_at": time.time()})


def unit_result(unit: str) -> dict[str, Any] | None:
    """A finished compare unit's result (written last, after its model and evaluation), or None."""
    url = join(unit, UNIT_DONE)
    return read_json(url) if exists(url) else None


def finished_units(run_dir: str) -> list[str]:
    """Names of the compare units with a marker (`strategy/seed-S`, `base`)."""
    root = join(compare_dir(run_dir), "units")
    fs, path = fs_of(root)
    if not fs.exists(path):
        return []
    return sorted(p[len(path.rstrip("/")) + 1 : -len(UNIT_DONE) - 1] for p in fs.glob(f"{path.rstrip('/')}/**/{UNIT_DONE}"))


def write_unit_result(unit: str, result: dict[str, Any]) -> None:
    write_json(join(unit, UNIT_DONE), result, indent=2)
