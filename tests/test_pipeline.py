"""The scoring pipeline on a real local Ray cluster: contract, accounting, actors, resume."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

from conftest import make_config
from instructdiff_ray.config import DataConfig, TemplateConfig
from instructdiff_ray.corpus import plan_shards, read_shard
from instructdiff_ray.models import load_tokenizer
from instructdiff_ray.pipeline import FingerprintMismatch, score_corpus
from instructdiff_ray.scoring import SCHEMA
from instructdiff_ray.template import tokenize_samples
from reference import reference_scores

pytestmark = pytest.mark.slow


def _table(out_dir):
    return pq.read_table(out_dir, schema=SCHEMA).sort_by([("source_file", "ascending"), ("source_row", "ascending")])


@pytest.fixture(scope="module")
def gsm_two_actors(tmp_path_factory, ray_local, tiny_model, tiny_full_warmup, gsm8k):
    tmp = tmp_path_factory.mktemp("two")
    cfg = make_config(tmp, [gsm8k], tiny_model, data={"limit": 60, "shard_rows": 10},
                      ray={"min_actors": 2, "max_actors": 2})
    summary = score_corpus(cfg, cfg.out, warmup=str(tiny_full_warmup))
    return cfg, summary


def test_output_contract_and_float64_exactness(gsm_two_actors, tiny_model, tiny_full_warmup, gsm8k):
    cfg, summary = gsm_two_actors
    t = _table(cfg.out)
    assert set(SCHEMA.names) <= set(t.column_names) and t.num_rows == 60
    assert summary.status_counts == {"ok": 60} and summary.rows == 60
    d = t.to_pydict()
    np.testing.assert_allclose(np.array(d["delta_nll"]), np.array(d["base_nll"]) - np.array(d["warmup_nll"]))
    np.testing.assert_allclose(np.array(d["delta_entropy"]), np.array(d["base_entropy"]) - np.array(d["warmup_entropy"]))
    dcfg = DataConfig(paths=[str(gsm8k)], limit=60, shard_rows=60)
    toks = tokenize_samples(read_shard(plan_shards(dcfg)[0], dcfg), TemplateConfig(), load_tokenizer(str(tiny_model)))
    ids, masks = [x.input_ids for x in toks], [x.response_mask for x in toks]
    ref_b = reference_scores(AutoModelForCausalLM.from_pretrained(tiny_model), ids, masks)
    ref_w = reference_scores(AutoModelForCausalLM.from_pretrained(tiny_full_warmup), ids, masks)
    np.testing.assert_allclose(np.c_[d["base_nll"], d["base_entropy"]], ref_b, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.c_[d["warmup_nll"], d["warmup_entropy"]], ref_w, atol=1e-4, rtol=0)
    assert d["n_response_tokens"] == [x.n_response_tokens for x in toks]


def test_two_actors_are_two_processes_and_equal_one_actor(gsm_two_actors, tmp_path, tiny_model, tiny_full_warmup, gsm8k):
    cfg2, summary2 = gsm_two_actors
    assert len({m["actor"] for m in summary2.markers}) == 2
    cfg1 = make_config(tmp_path, [gsm8k], tiny_model, data={"limit": 60, "shard_rows": 10},
                       engine={"max_batch_size": 3, "padding_side": "left", "threads": 1})
    score_corpus(cfg1, cfg1.out, warmup=str(tiny_full_warmup))
    a, b = _table(cfg1.out).to_pydict(), _table(cfg2.out).to_pydict()
    assert a["sample_id"] == b["sample_id"]
    for col in ("base_nll", "base_entropy", "warmup_nll", "warmup_entropy"):
        np.testing.assert_allclose(a[col], b[col], atol=1e-5, rtol=0)


def test_every_row_accounted_for_with_status(tmp_path, ray_local, tiny_model, tiny_lora):
    lines = []
    for i in range(30):
        lines.append(json.dumps({"instruction": f"Compute {i} plus {i}.", "output": f"The answer is {2 * i}."}))
    lines[3] = json.dumps({"instruction": "Empty", "output": ""})
    lines[7] = json.dumps({"instruction": "Long " * 400, "output": "x"})
    lines[11] = '{"instruction": "broken"'
    lines[15] = json.dumps({"instruction": "Whitespace answer", "output": "   "})
    lines[20] = json.dumps({"question": "no mapping", "answer": 3})
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = make_config(tmp_path, [data], tiny_model, data={"shard_rows": 8, "preset": "alpaca"}, template={"max_length": 256},
                      run={"max_invalid_fraction": 0.5})  # 4 of 30 rows are unusable input: over the default limit
    summary = score_corpus(cfg, cfg.out, warmup=str(tiny_lora))
    t = _table(cfg.out).to_pydict()
    assert t["source_row"] == list(range(30))
    status = dict(zip(t["source_row"], t["status"]))
    assert {r: s for r, s in status.items() if s != "ok"} == {
        3: "empty_response", 7: "too_long", 11: "malformed_json", 15: "empty_response", 20: "missing_field"}
    assert summary.status_counts == {"ok": 25, "empty_response": 2, "too_long": 1, "malformed_json": 1, "missing_field": 1}
    assert all(t["delta_entropy"][r] is None for r in (3, 7, 11, 15, 20))  # null, never a NaN in the ranking
    assert all(np.isfinite(t["delta_entropy"][r]) for r, s in status.items() if s == "ok")
    quarantine = (tmp_path / "out" / "_quarantine" / "shard-00000001.jsonl").read_text().splitlines()
    assert [json.loads(q)["line"] for q in quarantine] == [12]


def test_resume_skips_finished_shards_and_refuses_other_configs(tmp_path, ray_local, tiny_model, tiny_lora, gsm8k):
    cfg = make_config(tmp_path, [gsm8k], tiny_model, data={"limit": 40, "shard_rows": 10})
    first = score_corpus(cfg, cfg.out, warmup=str(tiny_lora))
    before = _table(cfg.out)
    out = tmp_path / "out"
    (out / "_done" / "shard-00000002.json").unlink()  # as if killed after the file, before the marker
    (out / "shard-00000003.parquet").unlink()
    (out / "_done" / "shard-00000003.json").unlink()
    again = score_corpus(cfg, cfg.out, warmup=str(tiny_lora))
    assert first.shards_skipped == 0 and again.shards_skipped == 2 and again.rows == 40
    assert _table(cfg.out).equals(before)
    other = make_config(tmp_path, [gsm8k], tiny_model, data={"limit": 40, "shard_rows": 10}, template={"max_length": 999})
    with pytest.raises(FingerprintMismatch, match="template"):
        score_corpus(other, other.out, warmup=str(tiny_lora))
