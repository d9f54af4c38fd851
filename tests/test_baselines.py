"""Baselines users compare InstructDiff against: IFD in both published definitions (from an extra
base pass over each response alone) and the length baseline, against float64 and the budget rule."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_config
from instructdiff_ray.config import SelectionConfig
from instructdiff_ray.pipeline import score_corpus
from instructdiff_ray.scoring import SCHEMA
from instructdiff_ray.selection import ifd, select
from reference import reference_scores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ifd_scores(tmp_path_factory, ray_local, tiny_model, tiny_full_warmup, gsm8k):
    tmp = tmp_path_factory.mktemp("ifd")
    cfg = make_config(tmp, [gsm8k], tiny_model, data={"limit": 24, "shard_rows": 8}, template={"ifd": True},
                      ray={"min_actors": 1, "max_actors": 1})
    summary = score_corpus(cfg, cfg.out, warmup=str(tiny_full_warmup))
    return summary, pq.read_table(cfg.out, schema=SCHEMA).sort_by("source_row")


def test_responses_alone_and_both_ifd_definitions_equal_float64(ifd_scores, tiny_model, gsm8k):
    summary, table = ifd_scores
    assert summary.status_counts == {"ok": 24} and summary.alone_tokens > 0 and summary.alone_seconds > 0
    tok = AutoTokenizer.from_pretrained(tiny_model)
    answers = [json.loads(line)["answer"] for line in gsm8k.read_text().splitlines()[:24]]
    alone_ids = [tok(a)["input_ids"] for a in answers]  # the IFD papers' direct answer score
    ref_alone = reference_scores(AutoModelForCausalLM.from_pretrained(tiny_model), alone_ids,
                                 [[False] + [True] * (len(x) - 1) for x in alone_ids])[:, 0]
    got = table.to_pydict()
    np.testing.assert_allclose(got["base_nll_alone"], ref_alone, atol=1e-4, rtol=0)
    rows = np.arange(table.num_rows)
    with_prompt = np.array(got["base_nll"])
    np.testing.assert_allclose(ifd(table, rows, "ifd_loss"), with_prompt / ref_alone, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ifd(table, rows, "ifd_ppl"), np.exp(with_prompt) / np.exp(ref_alone), rtol=1e-4)


@pytest.mark.parametrize("strategy", ["ifd_loss", "ifd_ppl"])
def test_ifd_strategies_rank_below_one_highest_first_within_the_budget(ifd_scores, strategy):
    _, table = ifd_scores
    sel = select(table, SelectionConfig(strategy=strategy, budget=0.3, budget_unit="samples"))
    chosen = sel.rows.to_pydict()
    values = dict(zip(table.column("sample_id").to_pylist(), ifd(table, np.arange(table.num_rows), strategy)))
    picked = [values[s] for s in chosen["sample_id"]]
    below = sorted((v for v in values.values() if v < 1), reverse=True)
    assert picked == below[: len(picked)] and len(picked) == min(7, len(below))


def test_ifd_needs_the_extra_pass(ifd_scores):
    _, table = ifd_scores
    with pytest.raises(ValueError, match="template.ifd"):
        select(table.drop_columns(["base_nll_alone"]), SelectionConfig(strategy="ifd_loss"))
