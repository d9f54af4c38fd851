import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny.build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_lora(tiny_model, tmp_path_factory) -> Path:
    return tiny.build_lora_adapter(tiny_model, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="session")
def tiny_full_warmup(tiny_model, tmp_path_factory) -> Path:
    return tiny.build_full_warmup(tiny_model, tmp_path_factory.mktemp("fullwarm") / "model")


@pytest.fixture(scope="session")
def gsm8k() -> Path:
    if not tiny.GSM8K.exists():
        pytest.fail(f"{tiny.GSM8K} is missing: the shared corpora must sit beside the checkout")
    return tiny.GSM8K


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the session, with room for two 1-CPU actors plus light tasks."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def make_config(tmp_path, data_paths, base, **sections):
    from instructdiff_ray.config import build_config

    tree = {"out": str(tmp_path / "out"), "data": {"paths": [str(p) for p in data_paths]}, "model": {"base": str(base)},
            "progress": "off", "engine": {"threads": 1}}
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value) if isinstance(value, dict) else tree.__setitem__(key, value)
    return build_config(tree)
