"""The engines by name: the one table to extend when adding an engine (a module in this package
with a class following `base.Engine`). Classes are imported when first asked for, so naming an
engine in a config loads neither torch nor vLLM, and this module imports nothing of the package."""

from __future__ import annotations

import difflib
import importlib
from typing import Any

ENGINES: dict[str, str] = {
    "hf": "instructdiff_ray.engines.hf:HFEngine",  # transformers: reference and CPU engine
    "vllm": "instructdiff_ray.engines.vllm:VLLMEngine",  # vLLM pooling models: the GPU engine
}


def check_engine(name: str) -> str:
    """`name` if registered, else a ValueError listing the engines (with the closest one)."""
    if name in ENGINES:
        return name
    close = difflib.get_close_matches(name, list(ENGINES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown engine {name!r}; {hint}choose from {', '.join(ENGINES)}")


def engine_class(name: str) -> Any:
    module, cls = ENGINES[check_engine(name)].split(":")
    return getattr(importlib.import_module(module), cls)


def make_engine(name: str, base_dir: str, warmup: str | None, settings: Any) -> Any:
    """A loaded engine: base (and warmup) models ready to score."""
    return engine_class(name)(base_dir, warmup, settings)


def register_vllm_models() -> None:
    """vLLM plugin entry point (`vllm.general_plugins`); see engines/vllm.py."""
    importlib.import_module("instructdiff_ray.engines.vllm").register_vllm_models()
