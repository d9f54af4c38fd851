"""Everything persisted: paths, atomic writes, the lease, stages and their fingerprints. No other
module names a file of the run directory or writes one in place.

A run directory (`out`):

    _lease.json                  who drives this run (holder, heartbeat, ttl)
    _plan.json                   the shard plan and what it was made from (input fingerprints, data settings)
    _run_config.json             every invocation: when, where, code version, config
    _run_summary.json            the finished job's summary
    _logs/driver-*.log           everything each command printed (console.run_log)
    round-K/warmup/              adapter/, merged/, loss.json, then _WARMUP_DONE.json (done record)
    round-K/scores/              _manifest.json (fingerprint, first), shard-NNNNNNNN.parquet,
                                 _done/shard-NNNNNNNN.json (item markers), _quarantine/, _summary.json (done)
    round-K/selection/           selected_ids.txt, selection.parquet, stats.json, selected.<fmt>
                                 (via _export/part-*.jsonl), then _SELECTION_DONE.json (done record)
    compare/                     _compare.json (fingerprint, first), selections/<strategy>/,
                                 units/<unit>/{model/, _UNIT_DONE.json (item marker)}, comparison.{json,md,png}
    report/                      index.html, summary.md, round-K/*.png, comparison.png

Every stage that persists is a `Stage`: its own directory, the fingerprint of what determines its
output, item markers, and a done record written last; `Stage.open` alone decides, on a rerun,
between reuse, refusal (naming the differing keys) and starting the stage anew.

Commit rules: a file is complete or absent. On a local disk every file is written to a
temporary name beside it and renamed into place; on object stores to a temporary key moved into
place once the upload completed. A shard counts as finished only once its marker exists (written
after its Parquet file), a warmup only with its done record, a selection only with its commit.
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
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .config import ConfigError
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
LOGS_DIR = "_logs"  # one log file per command run on the run directory (console.run_log)
TMP_SUFFIX = ".tmp"


class FingerprintMismatch(RuntimeError):
    """The directory holds results of a different configuration."""


class LeaseHeld(RuntimeError):
    """Another live driver holds the run directory."""


# ---------------------------------------------------------------- paths and atomic writes


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def fs_of(url: str):
    """(filesystem, path inside it) for a local path or an fsspec URL. Object stores get a client
    without fsspec's listings cache: Ray workers on other nodes write markers and records while
    the driver runs, and a cached listing or size would hide them (or truncate a rewritten file)."""
    if "://" in url and not url.startswith("file://"):
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    return fsspec.core.url_to_fs(url)


def is_local(url: str) -> bool:
    return isinstance(fs_of(url)[0], LocalFileSystem)


def exists(url: str) -> bool:
    fs, path = fs_of(url)
    return fs.exists(path)


@contextlib.contextmanager
def open_atomic(url: str, mode: str = "wb") -> Iterator[Any]:
    """A file handle whose content appears at `url` whole or not at all.

    Local disks: a temporary beside the file, fsynced and renamed into place. Object stores:
    a temporary key beside the final one, moved there (copy + delete) only after the upload
    completed; on an exception the temporary is deleted and the final key is left as it was
    (fsspec's close() would otherwise finish the upload of a partial object)."""
    fs, path = fs_of(url)
    parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
    tmp_name = f".{name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    tmp = join(parent, tmp_name) if parent else tmp_name
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        try:
            with fs.open(tmp, mode) as f:
                yield f
            fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm(tmp)
            raise
        return
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


def read_record(url: str) -> dict[str, Any] | None:
    """A marker, stamp or commit record, or None when absent. An unreadable one (truncated by a
    writer from before atomic commits, or damaged by hand) counts as absent, with a warning:
    its stage is redone instead of every resume failing on it."""
    fs, path = fs_of(url)
    try:
        with fs.open(path, "rb") as f:
            record = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as err:
        log.warning("%s is unreadable (%s); treating it as absent", url, err)
        return None
    if not isinstance(record, dict):
        log.warning("%s is not a record; treating it as absent", url)
        return None
    return record


def write_parquet(url: str, table) -> None:
    import pyarrow.parquet as pq

    with open_atomic(url, "wb") as f:
        pq.write_table(table, f)


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and (name.endswith(TMP_SUFFIX) or name.startswith(".tmp-"))


def clean_temporaries(url: str, older_than_s: float = 0.0) -> int:
    """Remove temporaries that a killed writer left under `url` and that are older than
    `older_than_s` (a live writer's temporaries are younger than the lease's ttl); return how many."""
    fs, root = fs_of(url)
    now = time.time()
    if isinstance(fs, LocalFileSystem):
        if not os.path.isdir(root):
            return 0
        found = [(os.path.join(d, n), _local_mtime(os.path.join(d, n)))
                 for d, dirs, files in os.walk(root) for n in files + dirs if _is_temporary(n)]
    else:
        try:
            listing = fs.find(root, detail=True)
        except FileNotFoundError:
            return 0
        found = [(p, _mtime(info)) for p, info in listing.items() if _is_temporary(p.rsplit("/", 1)[-1])]
    n = 0
    for target, mtime in found:
        if older_than_s > 0 and (mtime is None or now - mtime < older_than_s):
            continue  # possibly a live writer's (an unknown age counts as young)
        with contextlib.suppress(OSError, FileNotFoundError):
            if isinstance(fs, LocalFileSystem) and os.path.isdir(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                fs.rm(target)
            n += 1
    return n


def _local_mtime(path: str) -> float | None:
    try:
        return os.lstat(path).st_mtime
    except OSError:  # renamed into place or removed meanwhile
        return None


def _mtime(info: dict[str, Any]) -> float | None:
    value = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "timestamp"):
        return value.timestamp()
    from datetime import datetime

    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return None


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Settings that earlier versions recorded in fingerprints and that do not decide what a stage holds
# (gradient checkpointing trains the same weights): ignored where an old record still has them.
RETIRED_KEYS = (("warmup", "gradient_checkpointing"), ("train", "gradient_checkpointing"))


def without_retired(fp: dict[str, Any]) -> dict[str, Any]:
    """`fp` without the RETIRED_KEYS it holds."""
    out = dict(fp)
    for parent, key in RETIRED_KEYS:
        if isinstance(out.get(parent), dict) and key in out[parent]:
            out[parent] = {k: v for k, v in out[parent].items() if k != key}
    return out


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


class LeaseLost(LeaseHeld):
    """This driver could not keep its lease (taken over, or not renewed within its ttl)."""


def _pid_namespace() -> str | None:
    """This process's PID namespace (containers that share a host name may not share it)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _boot_id() -> str | None:
    """This boot of this machine (PID namespaces of different machines can have the same id)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _process_gone(pid: Any) -> bool:
    """Whether no process with this id runs in this PID namespace."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError, OverflowError):
        return False
    return False


class Lease:
    """One driver per run directory.

    The holder writes `_lease.json` and renews its heartbeat every ttl/4 seconds (`beat_s`) from a thread;
    a lease whose heartbeat is older than its ttl belongs to a dead driver and may be taken over,
    at once when its holder ran on this host (and PID namespace) and its process is gone. Taking it is
    write-then-confirm: after writing, the driver waits a moment and reads the lease back, so of
    two drivers racing for it exactly one finds its own id.

    A renewal that fails (a store error of any kind) is retried with backoff; the lease is kept
    through an outage shorter than its ttl. A holder that finds another id, or cannot renew
    before its ttl runs out, has lost the lease: the thread interrupts the main thread, and
    leaving the `with` block raises LeaseLost instead of the interruption; `check` raises it too.
    """

    def __init__(self, run_dir: str, ttl_s: float, settle_s: float | None = None, interrupt: bool = True,
                 beat_s: float | None = None):
        self.url = join(run_dir, LEASE)
        self.run_dir = run_dir
        self.ttl = ttl_s
        self.settle = settle_s if settle_s is not None else (0.2 if is_local(run_dir) else 1.0)
        self.interrupt = interrupt
        self.beat = beat_s if beat_s is not None else ttl_s / 4
        self.id = uuid.uuid4().hex
        self.info = {"id": self.id, "host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
                     "pid_ns": _pid_namespace(), "argv": sys.argv, "started_at": time.time(), "ttl_s": ttl_s}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None
        self.renewed_at = 0.0
        self._main = False

    def _read(self) -> dict[str, Any] | None:
        return read_record(self.url)

    def _write(self) -> None:
        now = time.time()  # what other drivers count the ttl from, so the holder counts from it too
        write_json(self.url, {**self.info, "heartbeat_at": now})
        self.renewed_at = now

    @staticmethod
    def describe(holder: dict[str, Any]) -> str:
        age = time.time() - float(holder.get("heartbeat_at", 0))
        return (f"pid {holder.get('pid')} on {holder.get('host')} (started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started_at', 0)))}, "
                f"heartbeat {age:.0f}s ago, expires after {holder.get('ttl_s')}s without one)")

    def _holder_alive(self, holder: dict[str, Any]) -> bool:
        if time.time() - float(holder.get("heartbeat_at", 0)) > float(holder.get("ttl_s", self.ttl)):
            return False
        same_processes = all(holder.get(k) == self.info[k] and self.info[k] is not None
                             for k in ("host", "boot_id", "pid_ns"))
        if same_processes and _process_gone(holder.get("pid")):
            log.info("taking over the lease of pid %s on this host: that process is gone", holder.get("pid"))
            return False
        return True

    def acquire(self) -> "Lease":
        holder = self._read()
        if holder and holder.get("id") != self.id and self._holder_alive(holder):
            raise LeaseHeld(f"{self.run_dir} is in use by another driver: {self.describe(holder)}; "
                            "wait for it to finish, or for its lease to expire if it died")
        self._write()
        time.sleep(self.settle)
        holder = self._read()
        if not holder or holder.get("id") != self.id:
            raise LeaseHeld(f"{self.run_dir}: another driver took the lease at the same time: "
                            f"{self.describe(holder) if holder else 'unknown'}")
        self._main = threading.current_thread() is threading.main_thread()  # only that thread is interrupted
        if self._main and self.interrupt:
            import signal

            if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # `cmd &` from a script: interrupt_main would do nothing
                signal.signal(signal.SIGINT, signal.default_int_handler)
        self._thread = threading.Thread(target=self._beat, name="instructdiff-lease", daemon=True)
        self._thread.start()
        try:
            removed = clean_temporaries(self.run_dir, older_than_s=self.ttl)
        except BaseException:
            self.release()
            raise
        if removed:
            log.info("removed %d temporaries left by an interrupted run", removed)
        return self

    def _renew(self) -> bool:
        """One renewal; False when the lease was taken over (raises on store errors). An attempt
        that ends after the lease was released or lost writes nothing."""
        if self._stop.is_set() or self.lost:
            return False
        try:
            holder = read_json(self.url)
        except FileNotFoundError:
            holder = None
        if isinstance(holder, dict) and holder.get("id") != self.id:
            self._lose(f"the lease on {self.run_dir} was taken over by {self.describe(holder)}")
            return False
        self._write()
        return True

    def _beat(self) -> None:
        """Renew every beat; retry failed renewals with backoff while the lease has more than
        half a beat left, each attempt bounded by that time (a store call can hang in retries)."""
        interval = self.beat
        while not self._stop.wait(interval):
            backoff, error = min(0.25, interval / 4), "no answer"
            while not self._stop.is_set():
                left = self.renewed_at + self.ttl - interval / 2 - time.time()
                if left <= 0:
                    self._lose(f"could not renew the lease on {self.run_dir} within its ttl of {self.ttl:g}s "
                               f"(last error: {error}); stopped so that no second driver writes beside this one")
                    return
                try:
                    if not self._bounded(self._renew, left):
                        return
                    break
                except TimeoutError:
                    error = f"a renewal took longer than {left:.1f}s"
                except Exception as err:  # any store error: retried while the lease lasts
                    error = f"{type(err).__name__}: {err}"
                    log.warning("lease renewal failed (%s); retrying", error)
                    self._stop.wait(min(backoff, max(left, 0)))
                    backoff = min(backoff * 2, interval)

    @staticmethod
    def _bounded(fn, timeout: float):
        """fn() in a daemon thread, waited for at most `timeout` seconds (TimeoutError after that;
        the call may go on, and a renewal that ends late writes nothing)."""
        out: dict[str, Any] = {}

        def run() -> None:
            try:
                out["value"] = fn()
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                out["error"] = err

        t = threading.Thread(target=run, name="instructdiff-lease-io", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"no answer within {timeout:.1f}s")
        if "error" in out:
            raise out["error"]
        return out["value"]

    def _lose(self, why: str) -> None:
        if self._stop.is_set():  # released meanwhile: nothing to stop
            return
        self.lost = why
        log.error(why)
        if self.interrupt and self._main:
            import _thread

            _thread.interrupt_main()

    def check(self) -> None:
        """Raise at a stage boundary if the lease was lost."""
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.lost:
            return
        with contextlib.suppress(Exception):
            holder = self._read()
            if holder and holder.get("id") == self.id:
                fs, path = fs_of(self.url)
                fs.rm(path)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.release()
        if self.lost:
            raise LeaseLost(self.lost) from exc
        return False


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


def check_run_dir(url: str) -> None:
    """Refuse a path that holds no run (status, report, inspect on a typo or a wrong folder)."""
    if not exists(url):
        raise ConfigError(f"{url} does not exist")
    if not (any(exists(join(url, name)) for name in (RUN_CONFIG, PLAN, LEASE, MANIFEST)) or round_dirs(url)):
        raise ConfigError(f"{url} is not a run directory (no {RUN_CONFIG}, {PLAN}, {MANIFEST} or round-*/); "
                          "give the --out of a run or score command")


def log_file(run_dir: str, name: str) -> str:
    return join(run_dir, LOGS_DIR, name)


def round_dir(run_dir: str, k: int) -> str:
    return join(run_dir, f"round-{k}")


def stage_dirs(round_url: str) -> dict[str, str]:
    """The stage directories of one round directory (`round-K`)."""
    return {name: join(round_url, name) for name in ("warmup", "scores", "selection")}


def warmup_dir(run_dir: str, k: int) -> str:
    return stage_dirs(round_dir(run_dir, k))["warmup"]


def scores_dir(run_dir: str, k: int) -> str:
    return stage_dirs(round_dir(run_dir, k))["scores"]


def selection_dir(run_dir: str, k: int) -> str:
    return stage_dirs(round_dir(run_dir, k))["selection"]


def round_dirs(run_dir: str) -> list[str]:
    """round-K directories of a run, in order."""
    fs, root = fs_of(run_dir)
    prefix = run_dir.split("://")[0] + "://" if "://" in run_dir else ""
    found = [p for p in fs.glob(join(root, "round-*")) if p.rsplit("-", 1)[-1].isdigit()]
    return [prefix + p for p in sorted(found, key=lambda p: int(p.rsplit("-", 1)[-1]))]


# ---------------------------------------------------------------- stages


@dataclass(frozen=True)
class StageKind:
    """What a kind of stage keeps in its directory, and what a user is told when it differs."""

    record: str  # the file holding the fingerprint: written first by stages with items, else last
    holds: str  # "STAGE_DIR holds <holds> (differs in: ...)"
    remedy: str  # how to get past a refusal
    done: str | None = None  # stages with items: the record written once all are finished
    item: str | None = None  # an item's marker, relative to the stage directory ("{}": the item's name)
    item_glob: str | None = None
    commit_point: str | None = None  # the kill point just before the done record
    record_point: str | None = None  # the kill points inside the write of a record written first
    hints: tuple[tuple[str, str], ...] = ()  # (differing key prefix, what it means)


STAGES: dict[str, StageKind] = {
    "warmup": StageKind(
        WARMUP_STAMP, "a warmup model trained differently",
        "rerun with --recompute warmup to train it again (the scores that depend on it are scored again), "
        "or use a new run directory", commit_point="warmup.before_stamp",
        hints=(("rows", "it was trained on other rows (for round 2 and later, the previous round's selection)"),)),
    "scores": StageKind(
        MANIFEST, "scores of a different configuration",
        "rerun with --recompute scores to score again (its scores are replaced), or use a new run directory",
        done=SCORES_SUMMARY, item=DONE_DIR + "/{}.json", item_glob=DONE_DIR + "/shard-*.json", record_point="manifest"),
    "selection": StageKind(SELECTION_COMMIT, "a selection made with other settings or scores",
                           "it is selected again", commit_point="selection.before_commit"),
    "compare": StageKind(
        COMPARE_MANIFEST, "a comparison made with other settings",
        "remove that directory to compare afresh (adding a strategy or a seed is fine)",
        item="units/{}/" + UNIT_DONE, item_glob="units/**/" + UNIT_DONE),
}


class Stage:
    """One persisted stage of a run (warmup, scores, selection, compare): its own directory, the
    fingerprint of exactly the inputs and settings that determine its output, the markers of the
    items it has finished, and a done record written last.

    Stages that finish at once (warmup, selection) keep their fingerprint in the done record;
    stages whose items finish one by one (scores: shards; compare: units) write it first, so
    that a resume knows what the finished items were made from. `open` is the one place where a
    rerun is compared with what the directory holds; only the stage's own directory is cleared.
    """

    def __init__(self, kind: str, directory: str):
        self.name, self.kind, self.dir = kind, STAGES[kind], directory.rstrip("/")

    def path(self, *parts: str) -> str:
        return join(self.dir, *parts)

    @property
    def has_items(self) -> bool:
        return self.kind.item is not None

    def done(self) -> dict[str, Any] | None:
        """The done record, or None while unfinished (an unreadable one counts as absent)."""
        return read_record(self.path(self.kind.done or self.kind.record))

    def changes(self, fp: dict[str, Any], extra: dict[str, Any] | None = None) -> list[str] | None:
        """None when nothing is recorded, [] when the stage was made from exactly `fp` (and the
        `extra` values of its record), else what differs."""
        url = self.path(self.kind.record)
        record = read_record(url)
        if record is None:  # an unreadable record written first leaves its items' origin unknown
            return ["(unreadable record)"] if self.has_items and exists(url) else None
        return self.differs(record, fp, extra)

    @staticmethod
    def differs(record: dict[str, Any], fp: dict[str, Any], extra: dict[str, Any] | None = None) -> list[str]:
        """What differs between a record already read and `fp` (and the `extra` values)."""
        old = without_retired(record.get("fingerprint") or {})
        diffs = differing_keys(old, fp) if digest(old) != digest(fp) else []
        return diffs + [key for key, value in (extra or {}).items() if record.get(key) != value]

    def refusal(self, diffs: list[str]) -> FingerprintMismatch:
        if diffs == ["(unreadable record)"]:
            return FingerprintMismatch(f"{self.path(self.kind.record)} is unreadable, so what {self.dir} holds was "
                                       f"made from is unknown; {self.kind.remedy}")
        why = ", ".join(diffs)
        for prefix, meaning in self.kind.hints:
            if any(d.startswith(prefix) for d in diffs):
                why += f": {meaning}"
        return FingerprintMismatch(f"{self.dir} holds {self.kind.holds} (differs in: {why}); {self.kind.remedy}")

    def open(self, fp: dict[str, Any], replace: bool, extra: dict[str, Any] | None = None,
             record: dict[str, Any] | None = None) -> list[str]:
        """Make the stage ready to run for `fp`; returns what differed from the recorded stage
        ([] when it is new or unchanged: finished items, or a done record, are then reused).

        A changed stage is refused, naming the differing keys, unless `replace`: then its own
        directory is cleared (item markers first, so a kill while clearing leaves no item
        looking finished). Stages with items then record `fp` (with `extra` and `record`)."""
        diffs = self.changes(fp, extra)
        if diffs:
            if not replace:
                raise self.refusal(diffs)
            self.clear()
        if self.has_items and diffs != []:
            write_json(self.path(self.kind.record),
                       {"fingerprint": fp, "fingerprint_hash": digest(fp), **(extra or {}), **(record or {}),
                        "created_at": time.time()}, point=self.kind.record_point)
        return diffs or []

    def clear(self) -> None:
        """Remove this stage's directory (only it), item markers first."""
        if self.kind.item:
            clear_dir(self.path(self.kind.item.split("/", 1)[0]))
        clear_dir(self.dir)

    def finish(self, record: dict[str, Any], fp: dict[str, Any] | None = None, indent: int | None = 2) -> None:
        """Write the done record, last: the stage counts as finished from here on."""
        if self.kind.commit_point:
            kill_point(self.kind.commit_point)
        write_json(self.path(self.kind.done or self.kind.record),
                   {**record, "fingerprint": fp} if fp is not None else record, indent=indent)

    def retract(self) -> None:
        """Remove the done record: while a stage is rewritten in place it counts as unfinished."""
        clear_dir(self.path(self.kind.done or self.kind.record))

    def item_path(self, name: str) -> str:
        return self.path(self.kind.item.format(name))

    def finish_item(self, name: str, record: dict[str, Any], point: str | None = None) -> None:
        write_json(self.item_path(name), record, point=point, indent=None if point else 2)

    def items(self) -> dict[str, dict[str, Any]]:
        """name -> record of every finished item (fetched concurrently on object stores); an
        unreadable marker counts as unfinished, with a warning."""
        fs, root = fs_of(self.dir)
        head, tail = self.kind.item.split("{}")
        paths = fs.glob(join(root, self.kind.item_glob))
        if not paths:
            return {}
        out = {}
        for path, blob in fs.cat(paths).items():
            name = path[len(root.rstrip("/") + "/" + head):][: -len(tail) or None]
            try:
                record = json.loads(blob)
                if not isinstance(record, dict):
                    raise ValueError("not a record")
                out[name] = record
            except (ValueError, UnicodeDecodeError) as err:
                log.warning("%s is unreadable (%s); treating it as absent", path, err)
        return dict(sorted(out.items()))

    def unmark(self, names: list[str]) -> None:
        """Make finished items pending again."""
        fs, root = fs_of(self.dir)
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(join(root, self.kind.item.format(name)))


def clear_dir(url: str) -> None:
    fs, path = fs_of(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ---------------------------------------------------------------- scores: the plan and shards


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


def open_scores(scores_dir: str, fp: dict[str, Any], plan: list[dict[str, Any]], environment: dict[str, Any],
                recompute: bool = False) -> None:
    """A new scores directory records what it is scored from, before any shard; a resume with the
    same inputs keeps its finished shards; other inputs are refused (or, with `recompute`, the
    scores directory, and only it, starts anew)."""
    diffs = Stage("scores", scores_dir).open(fp, recompute, extra={"plan_hash": digest(plan)},
                                             record={"plan": plan, "environment": environment})
    if diffs:
        log.warning("%s: scoring again (differs in: %s; --recompute scores)", scores_dir, ", ".join(diffs))


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
    Stage("scores", scores_dir).finish_item(name, marker, point="marker")


def finished_markers(scores_dir: str) -> dict[int, dict[str, Any]]:
    """shard id -> marker of every finished shard."""
    return {shard_id_of(name): marker for name, marker in Stage("scores", scores_dir).items().items()}


def error_shards(markers: dict[int, dict[str, Any]]) -> dict[int, int]:
    """shard id -> rows that failed while being scored (status `error` from a fault such as running
    out of memory; not rows no engine can run, like token ids outside the vocabulary): such shards
    are scored again by the next run."""
    retry = {sid: int(m.get("retry_rows", m.get("status_counts", {}).get("error", 0))) for sid, m in markers.items()}
    return {sid: n for sid, n in retry.items() if n > 0}


def unmark_shards(scores_dir: str, shard_ids: list[int]) -> None:
    """Make finished shards pending again (their marker goes first, so a kill leaves them pending)."""
    Stage("scores", scores_dir).unmark([shard_name(sid) for sid in shard_ids])


def score_files(scores_dir: str) -> list[str]:
    """The Parquet files of finished shards (all *.parquet for a directory without markers)."""
    fs, root = fs_of(scores_dir)
    prefix = scores_dir.split("://")[0] + "://" if "://" in scores_dir else ""
    markers = sorted(fs.glob(join(root, DONE_DIR, "shard-*.json")), key=shard_id_of)
    if markers:
        return [prefix + join(root, p.rsplit("/", 1)[-1][: -len(".json")] + ".parquet") for p in markers]
    return [prefix + p for p in sorted(fs.glob(join(root, "*.parquet")))]


DICTIONARY_COLUMNS = ["source_file", "status", "reason"]  # repetitive strings, read dictionary-encoded


def read_score_file(path: str, columns: list[str] | None = None):
    """One score file (or some of its columns), its repetitive strings dictionary-encoded so that
    millions of rows stay small."""
    import pyarrow.parquet as pq

    fs, p = fs_of(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=columns, read_dictionary=DICTIONARY_COLUMNS)


def read_score_columns(path: str, columns: list[str]):
    """Those of `columns` a score file has, read as read_score_file reads them, and the schema
    read_score_file would give the whole file (from its footer, in the same open)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, p = fs_of(path)
    with fs.open(p, "rb") as f:
        schema = pq.ParquetFile(f).schema_arrow
        table = pq.read_table(f, columns=[c for c in columns if c in schema.names], read_dictionary=DICTIONARY_COLUMNS)
    for name in DICTIONARY_COLUMNS:
        if name in schema.names:
            i = schema.get_field_index(name)
            schema = schema.set(i, pa.field(name, pa.dictionary(pa.int32(), schema.field(i).type)))
    return table, schema


def unmarked_shard_files(scores_dir: str, done: set[int]) -> list[str]:
    fs, root = fs_of(scores_dir)
    return [p for p in fs.glob(join(root, "shard-*.parquet")) if shard_id_of(p) not in done]


def write_scores_summary(scores_dir: str, summary: dict[str, Any]) -> None:
    Stage("scores", scores_dir).finish(summary)


# ---------------------------------------------------------------- warmup


def warmup_stamp(warmup_dir: str) -> dict[str, Any] | None:
    return Stage("warmup", warmup_dir).done()


def warmup_files(warmup_dir: str) -> dict[str, str]:
    """Where a warmup's adapter (LoRA), merged model and loss history are written."""
    return {"adapter": join(warmup_dir, "adapter"), "merged": join(warmup_dir, "merged"), "loss": join(warmup_dir, "loss.json")}


def merged_digest_ok(merged_url: str, digest_of_copy: str) -> bool:
    """A warmup's merged/ is trusted only when its digest equals the one its stamp recorded."""
    stamp = warmup_stamp(merged_url.rstrip("/").rsplit("/", 1)[0])
    return bool(stamp and stamp.get("merged_digest") and stamp["merged_digest"] == digest_of_copy)


# ---------------------------------------------------------------- selection


def selection_paths(sel_dir: str) -> dict[str, str]:
    return {k: join(sel_dir, v) for k, v in
            {"ids": "selected_ids.txt", "scores": "selection.parquet", "stats": "stats.json"}.items()}


def export_path(sel_dir: str, fmt: str) -> str:
    """The user's selected records in format `fmt` (hf: a datasets directory)."""
    return join(sel_dir, "selected_dataset" if fmt == "hf" else f"selected.{fmt}")


def export_parts_dir(sel_dir: str) -> str:
    return join(sel_dir, EXPORT_PARTS)


def commit_selection(sel_dir: str, paths: dict[str, str], stats: dict[str, Any],
                     fingerprint: dict[str, Any] | None = None) -> None:
    """The record that makes a selection count; `fingerprint` is what it was made from (its
    settings and the scores it read), so that a rerun with other settings selects again."""
    names = {k: v.rstrip("/").rsplit("/", 1)[-1] for k, v in paths.items()}  # a moved run directory stays valid
    Stage("selection", sel_dir).finish({"paths": names, "selected_rows": stats["selected_rows"],
                                        "committed_at": time.time()}, fingerprint or {}, indent=1)


def committed_selection(sel_dir: str, fingerprint: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The commit record of a finished selection, or None (files without a commit are not trusted).
    With `fingerprint`, `stale` lists what differs when the selection was made from other settings or scores."""
    commit = Stage("selection", sel_dir).done()
    if commit is None:
        return None
    if fingerprint is not None and (stale := Stage.differs(commit, fingerprint)):
        commit["stale"] = stale
    commit["paths"] = {k: join(sel_dir, v.rstrip("/").rsplit("/", 1)[-1]) for k, v in commit.get("paths", {}).items()}
    return commit


# ---------------------------------------------------------------- compare units


def compare_dir(run_dir: str) -> str:
    return join(run_dir, COMPARE_DIR)


def compare_stage(run_dir: str) -> Stage:
    return Stage("compare", compare_dir(run_dir))


def compare_files(run_dir: str) -> dict[str, str]:
    return {ext: join(compare_dir(run_dir), f"comparison.{ext}") for ext in ("json", "md", "png")}


def compare_selection_dir(run_dir: str, strategy: str) -> str:
    return join(compare_dir(run_dir), "selections", strategy)


BASE_UNIT = "base"  # the compare unit of the base model, not fine-tuned


def unit_name(strategy: str, seed: int) -> str:
    """A compare unit: one strategy's pick fine-tuned with one seed."""
    return f"{strategy}/seed-{seed}"


def unit_dir(run_dir: str, unit: str) -> str:
    """A compare unit's directory: `strategy/seed-S`, or `base` (the base model, not fine-tuned)."""
    return join(compare_dir(run_dir), "units", unit)


def unit_model_dir(run_dir: str, unit: str) -> str:
    return join(unit_dir(run_dir, unit), "model")


def finished_units(run_dir: str) -> list[str]:
    """Names of the compare units with a marker (`strategy/seed-S`, `base`)."""
    return list(compare_stage(run_dir).items())


def write_unit_result(run_dir: str, unit: str, result: dict[str, Any]) -> None:
    compare_stage(run_dir).finish_item(unit, result)


# ---------------------------------------------------------------- report


def report_dir(run_dir: str) -> str:
    return join(run_dir, "report")


def report_files(run_dir: str) -> dict[str, str]:
    return {"html": join(report_dir(run_dir), "index.html"), "summary": join(report_dir(run_dir), "summary.md")}


def report_plot(run_dir: str, name: str, k: int | None = None) -> str:
    """A report plot: per round (`round-K/NAME.png`) or of the whole run (`NAME.png`)."""
    return join(report_dir(run_dir), *([f"round-{k}"] if k is not None else []), f"{name}.png")
