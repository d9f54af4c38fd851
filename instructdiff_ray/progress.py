"""Progress lines while long work runs: rows/s, tok/s and an ETA, sparse outside a terminal."""

from __future__ import annotations

import sys
import threading
import time

from .runtime import progress_enabled


class Progress:
    """Rows/tokens per second and an ETA for a stage with a known total.

    On a terminal it prints a line per update; elsewhere (CI, log files) at most one line
    per `quiet_every` seconds plus the final line, so logs stay short.
    """

    def __init__(self, label: str, total: int, mode: str = "auto", quiet_every: float = 30.0, unit: str = "rows"):
        self.label, self.total, self.unit = label, max(total, 1), unit
        self.tty = progress_enabled(mode)
        self.off = mode == "off"
        self.quiet_every = quiet_every
        self.done = self.tokens = 0
        self.start = self.last = time.monotonic()
        self._stop = threading.Event()

    def __enter__(self) -> "Progress":
        """While inside, a line at least every `quiet_every` seconds even when nothing finished
        (a shard of long rows can take minutes)."""
        if not self.off:
            threading.Thread(target=self._tick, name=f"progress-{self.label}", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _tick(self) -> None:
        while not self._stop.wait(max(0.05, self.quiet_every - (time.monotonic() - self.last))):
            if time.monotonic() - self.last >= self.quiet_every and self.done < self.total:
                self.update(0, extra="working")

    def update(self, rows: int, tokens: int = 0, extra: str = "") -> None:
        self.done += rows
        self.tokens += tokens
        now = time.monotonic()
        final = self.done >= self.total
        due = now - self.last >= self.quiet_every
        if self.off or not ((self.tty and rows) or final or due):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = "0s" if final else (f"{(self.total - self.done) / rate:.0f}s" if rate > 0 else "?")
        line = (
            f"[{self.label}] {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)  "
            + (f"{rate:.1f} rows/s  {self.tokens / elapsed:.0f} tok/s  " if self.unit == "rows" else "")
            + f"elapsed {elapsed:.0f}s  eta {eta}"
        )
        print(line + (f"  {extra}" if extra else ""), file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        if not self.off:
            print(f"[{self.label}] {message}", file=sys.stderr, flush=True)
