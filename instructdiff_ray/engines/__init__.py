"""Engines stage: load the models and run teacher-forced forward passes.

    base.py        the Engine protocol, settings, results, row checks, split-and-retry
    hf.py          transformers (reference and CPU engine)
    vllm.py        vLLM pooling models (the GPU engine); vllm_model.py runs inside vLLM
    memory.py      the vllm engine's GPU memory plan
    registry.py    engines by name: add an engine with one module here and one entry there

Importing this package loads neither torch nor vLLM.
"""

from .registry import ENGINES, check_engine, engine_class, make_engine, register_vllm_models

__all__ = ["ENGINES", "check_engine", "engine_class", "make_engine", "register_vllm_models"]
