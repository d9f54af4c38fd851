"""What the terminal shows during a command, and the log file in the run directory that keeps the rest.

Everything the driver process writes to stdout and stderr (its own lines, Python logging, lines Ray
forwards from workers, and Ray's C++ core worker) goes to `RUN/_logs/driver-<time>-<pid>.log`. The terminal
gets the same lines minus Ray's start-up, info and warning output and the errors Ray itself calls
harmless, so a person sees the job's own progress and real errors. `--progress ray` and `-v` show
everything, as before. On an object store the log is written locally and uploaded when the
command ends, whether it succeeded or failed.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from typing import Iterator

from . import rundir
from .config import ConfigError

# Ray's C++ log lines: "[2026-11-30 08:44:56,380 E 6829 6829] core_worker.cc:2465: ..."
_CPP = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([DIWEF]) \d+ \d+\] ")
# Ray's Python log lines: "2026-11-30 08:44:33,635\tWARNING authentication_token_setup.py:85 -- ..."
_PY = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+:\d+ -- ")
# The prefix Ray puts on lines forwarded from a worker: "\x1b[36m(MapWorker pid=7044)\x1b[0m "
_WORKER = re.compile(rb"^(\x1b\[[0-9;]*m)?\([^()]*pid=\d+[^()]*\)(\x1b\[[0-9;]*m)? ?")
_COLOUR = re.compile(rb"\x1b\[[0-9;]*m")
MAX_PENDING = 1 << 16  # bytes of an unfinished line held back for the filter
# Error-level lines Ray prints about its own bookkeeping that need nothing from the user.
HARMLESS = (
    b"has constructor arguments in the object store and max_restarts > 0",  # Ray Data's actor pool
)


def to_terminal(line: bytes) -> bool:
    """Whether a line of output is for the person at the terminal (all lines go to the log)."""
    body = _WORKER.sub(b"", line, count=1)
    cpp = _CPP.match(body)
    if cpp:
        return cpp.group(1) in (b"E", b"F") and not any(h in body for h in HARMLESS)
    py = _PY.match(body)
    if py:
        return py.group(1) in (b"ERROR", b"CRITICAL")
    return True


_current: list[str] = []  # the log of the command running in this process (run_log), for its first line


def current_log() -> str | None:
    return _current[-1] if _current else None


def log_name() -> str:
    return f"driver-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


class _Split:
    """File descriptor `fd` (1 or 2) replaced by a pipe; a thread copies each line to the log and the
    wanted ones to where `fd` pointed before."""

    def __init__(self, fd: int, log_file, lock: threading.Lock, filtered: bool):
        self.fd, self.log, self.lock, self.filtered = fd, log_file, lock, filtered
        self.terminal = os.dup(fd)
        self.tty = os.isatty(self.terminal)
        read_end, self.write_end = os.pipe()
        self.reader = os.fdopen(read_end, "rb", buffering=0)
        _flush(fd)
        os.dup2(self.write_end, fd)
        self.thread = threading.Thread(target=self._copy, name=f"log-fd{fd}", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        pending = b""
        while chunk := self.reader.read(65536):
            if not self.filtered:  # everything shown, as it comes: progress bars redraw with \r, not lines
                self._write(chunk, show=True)
                continue
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                self._write(line + b"\n", show=to_terminal(line))
            if len(pending) > MAX_PENDING:  # a line that never ends (a bar redrawn with \r): pass it on as is
                self._write(pending, show=to_terminal(pending))
                pending = b""
        if pending:
            self._write(pending, show=to_terminal(pending))

    def _write(self, data: bytes, show: bool) -> None:
        plain = _COLOUR.sub(b"", data)
        with self.lock, contextlib.suppress(OSError, ValueError):
            self.log.write(plain)
        if show:
            with contextlib.suppress(OSError):
                os.write(self.terminal, data if self.tty else plain)

    def close(self) -> None:
        _flush(self.fd)
        os.dup2(self.terminal, self.fd)  # the pipe's last writer in this process: the reader sees its end
        os.close(self.write_end)
        self.thread.join(timeout=5)  # a child process holding the pipe must not hold this one up
        os.close(self.terminal)


def _flush(fd: int) -> None:
    with contextlib.suppress(Exception):
        (sys.stdout if fd == 1 else sys.stderr).flush()


@contextlib.contextmanager
def run_log(run_dir: str, progress: str = "auto", verbose: bool = False) -> Iterator[str]:
    """Keep this command's output in the run directory's log; yield the log's final location.

    A command refused for its configuration (ConfigError, e.g. a local path on a cluster whose
    nodes share no disk) leaves nothing behind: its log and the directories made for it go."""
    final = rundir.log_file(run_dir, log_name())
    created: list[str] = []
    if rundir.is_local(run_dir):
        d = os.path.dirname(os.path.abspath(final))
        while not os.path.isdir(d):  # every directory made for the log, deepest last
            created.insert(0, d)
            d = os.path.dirname(d)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        local = final
    else:
        local = os.path.join(tempfile.mkdtemp(prefix="instructdiff-log-"), os.path.basename(final))
    refused, story = False, ""
    with open(local, "ab", buffering=0) as log_file:
        lock = threading.Lock()
        splits = [_Split(fd, log_file, lock, filtered=progress != "ray" and not verbose) for fd in (1, 2)]
        _current.append(final)
        try:
            yield final
        except BaseException as err:  # the terminal gets one line from the CLI; the log keeps the whole story
            refused, story = isinstance(err, ConfigError), traceback.format_exc()
            raise
        finally:
            _current.pop()
            for split in splits:
                split.close()  # every line printed so far is in the log, so the traceback comes last
            log_file.write(story.encode())
            if refused:
                _discard(local, created)
            elif local != final:
                _upload(local, final)


def _discard(local: str, created: list[str]) -> None:
    with contextlib.suppress(OSError):
        os.unlink(local)
    for d in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(d)  # only if empty: nothing else was written there


def _upload(local: str, final: str) -> None:
    try:
        fs, path = rundir.fs_of(final)
        fs.put(local, path)
    except Exception as err:  # a lost log must not turn a finished job into a failure
        print(f"warning: the log could not be uploaded to {final} ({err}); it is at {local}", file=sys.stderr)
