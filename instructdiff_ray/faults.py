"""Deterministic fault injection at named points, for the tests that prove nothing is lost.

Off unless `INSTRUCTDIFF_FAULT` holds a spec, or `INSTRUCTDIFF_FAULT_FILE` names a file holding
one (re-read at every check, so a test can arm a fault in Ray workers that are already running).
A spec is `POINT` or `POINT:ARG`; several are separated by `;`.

Kill points (`kill_point`): the process SIGKILLs itself, after SIGKILLing the driver when it runs
inside a Ray worker of a local cluster (the driver's pid travels in `INSTRUCTDIFF_DRIVER_PID`):
a kill at a named point, never at a timed guess. `POINT:pause=PATH` instead creates PATH and
blocks forever, so a test can act while the driver is known to be at that point.

Engine faults (checked by the engines before each forward):
- `engine.cuda_error:CLAIM` raises a fake CUDA error on every batch in the one process that first
  creates the file CLAIM (so exactly one actor is poisoned, and its restart is healthy);
- `engine.poison_row:DIGEST` raises when a batch holds the row whose `ids_digest` is DIGEST;
- `engine.encode_fault` (vllm engine) raises inside vLLM's engine loop after the first request of a
  call finished, while the others are still queued in the engine (`encode_progress`).
"""

from __future__ import annotations

import hashlib
import os
import signal
import time

ENV, ENV_FILE, DRIVER_PID = "INSTRUCTDIFF_FAULT", "INSTRUCTDIFF_FAULT_FILE", "INSTRUCTDIFF_DRIVER_PID"

# Every kill point, in the order a run reaches them (README: "Fault injection").
KILL_POINTS = (
    "run_config.mid_write",  # half of _run_config.json's temporary written
    "warmup.before_stamp",  # warmup weights saved, stamp not yet written
    "manifest.mid_write",  # half of a scores manifest's temporary written
    "shard.before_marker",  # shard Parquet moved into place, its marker not yet written (Ray worker)
    "marker.mid_write",  # half of a shard marker's temporary written (Ray worker)
    "selection.between_files",  # selection.parquet written, the user's rows not yet exported (a Ray task)
    "selection.before_commit",  # every selection file written, its commit marker not yet (a Ray task)
    "run_summary.mid_write",  # half of _run_summary.json's temporary written
)

_claimed: dict[str, bool] = {}


def _specs() -> dict[str, str]:
    raw = os.environ.get(ENV, "")
    path = os.environ.get(ENV_FILE)
    if path:
        try:
            with open(path) as f:
                raw += ";" + f.read()
        except OSError:
            pass
    out = {}
    for item in raw.replace("\n", ";").split(";"):
        if item.strip():
            name, _, arg = item.strip().partition(":")
            out[name] = arg
    return out


def armed(name: str) -> str | None:
    """The argument of the fault armed at `name` ('' when it has none), or None."""
    if not (os.environ.get(ENV) or os.environ.get(ENV_FILE)):
        return None
    return _specs().get(name)


def kill_point(name: str) -> None:
    """Die here (or pause) when the fault `name` is armed; otherwise do nothing."""
    arg = armed(name)
    if arg is None:
        return
    if arg.startswith("pause="):
        with open(arg[len("pause="):], "w") as f:
            f.write(f"{os.getpid()} at {name}\n")
        while True:
            time.sleep(3600)
    driver = int(os.environ.get(DRIVER_PID, "0") or 0)
    if driver and driver != os.getpid():
        try:
            os.kill(driver, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def ids_digest(ids: list[int]) -> str:
    """A row's identity as the engines see it (its token ids)."""
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:16]


def engine_faults(batch_ids: list[list[int]]) -> None:
    """Raise the engine faults armed for this batch (see the module docstring)."""
    if not (os.environ.get(ENV) or os.environ.get(ENV_FILE)):
        return
    specs = _specs()
    claim = specs.get("engine.cuda_error")
    if claim:
        if claim not in _claimed:
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                _claimed[claim] = True
            except FileExistsError:
                _claimed[claim] = False
        if _claimed[claim]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected fault)")
    poison = specs.get("engine.poison_row")
    if poison and any(ids_digest(list(x)) == poison for x in batch_ids):
        raise RuntimeError("injected fault: poisoned row")


def encode_progress():
    """vLLM's `use_tqdm` for an encode call: False, or with `engine.encode_fault` armed a progress
    bar whose first update raises, i.e. an exception inside vLLM's engine loop that leaves the
    call's other requests queued in the engine (as an error in a step does)."""
    if armed("engine.encode_fault") is None:
        return False

    class FailingBar:
        def __init__(self, total: int = 0, **_):
            self.n, self.total, self.postfix = 0, total, ""

        def update(self, n: int = 1) -> None:
            raise RuntimeError("injected fault: inside vLLM's engine loop")

        def refresh(self) -> None:
            pass

        def close(self) -> None:
            pass

    return FailingBar
