"""What `compare` reports as evidence: intervals checked against closed forms, the built-in exact-match
evaluator on hand-made answers, and gradient checkpointing (same model, less kept for backward)."""

import json
from pathlib import Path

import numpy as np
import pytest

from instructdiff_ray import rundir
from instructdiff_ray.evaluate import exact_match, final_answer
from instructdiff_ray.stats import excludes_zero, mean_interval, paired_bootstrap


def test_mean_interval_is_the_t_interval():
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0])  # sd 1, n 3: half-width t(2) / sqrt(3)
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 / np.sqrt(3)) and mean - lo == pytest.approx(4.303 / np.sqrt(3))
    assert mean_interval([0.5]) == (0.5, None, None) and mean_interval([]) == (None, None, None)


def test_paired_bootstrap_matches_the_normal_interval_of_a_known_variance():
    """One seed, 2,000 paired differences ~ N(0.03, 0.2^2): the bootstrap 95% interval of the mean is
    the closed form mean ± 1.96·σ/√n (σ known) within 10% of its width, and excludes zero."""
    rng = np.random.default_rng(7)
    diff = rng.normal(0.03, 0.2, size=2000)
    mean, lo, hi = paired_bootstrap(diff[None, :])
    half = 1.96 * 0.2 / np.sqrt(2000)
    assert mean == pytest.approx(diff.mean())
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert lo < 0.03 < hi and excludes_zero(lo, hi)


def test_paired_bootstrap_carries_the_seed_to_seed_variation():
    """Three seeds whose mean differences disagree (+0.05, -0.05, +0.01): resampling seeds widens the
    interval past what the rows alone give, and it no longer excludes zero."""
    rng = np.random.default_rng(3)
    rows = rng.normal(0.0, 0.05, size=(3, 500))
    diff = rows + np.array([[0.05], [-0.05], [0.01]])
    _, lo, hi = paired_bootstrap(diff)
    _, lo1, hi1 = paired_bootstrap(diff[:1])
    assert hi - lo > 3 * (hi1 - lo1) and not excludes_zero(lo, hi) and excludes_zero(lo1, hi1)
    diff[0, :10] = np.nan  # a row that failed in one model is left out of its seed
    assert np.isfinite(paired_bootstrap(diff)[0])


@pytest.mark.parametrize("text,answer", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("so the total is 42.", "42"),
    ("She pays $42 in all", "42"),
    ("The answer is 1,234 apples", "1234"),
    ("#### -3.50", "-3.5"),
    ("First 5, then 7 #### 12 (checked: 12)", "12"),
    ("#### $1,000.00", "1000"),
    ("= $23.50.\n#### 23.50\n#### 23.50\n#### 2", "23.5"),  # repeated until the token limit cut it
    ("no number here", None),
])
def test_final_answer_of_gsm8k_style_texts(text, answer):
    assert final_answer(text) == answer


def test_exact_match_compares_final_answers():
    refs = ["step... #### 72", "#### 5", "#### 1,200", "#### 3"]
    preds = ["I think 70 + 2 = 72.", "#### 5.0", "so $1200", "the answer"]
    assert exact_match(preds, refs) == [True, True, True, False]


def test_generation_stops_a_row_once_its_marked_answer_line_ends(tiny_model):
    """Rows of a batch stop on their own: after `#### N` and its newline, not before, and never
    without a marker (whose answer is the last number, so every token may matter)."""
    from instructdiff_ray.evaluate import answered
    from instructdiff_ray.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    prompt = "Question: 2 + 2?\nAnswer:"
    rows = [" so 2 + 2 = 4.\n#### 4\n", " so 2 + 2 = 4.\n#### 4", " 4\n5\n", " ####\n4\n"]
    enc = tok([prompt + r for r in rows], return_tensors="pt", padding=True)
    start = len(tok(prompt)["input_ids"])
    assert answered(tok, start)(enc["input_ids"], None).tolist() == [True, False, False, False]


def _unit_config(tmp, gsm8k, base, checkpointing):
    from instructdiff_ray.config import build_config

    return build_config({
        "out": str(tmp / "run"), "data": {"paths": [str(gsm8k)], "limit": 40}, "model": {"base": str(base)},
        "engine": {"threads": 1}, "progress": "off",
        "warmup": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3, "gradient_checkpointing": checkpointing},
        "compare": {"eval": [str(gsm8k)], "eval_skip": 1000, "eval_limit": 8, "exact_match": 2, "max_new_tokens": 8}})


def test_a_unit_trained_with_gradient_checkpointing_equals_one_without_at_less_memory(tmp_path, tiny_model, gsm8k):
    """The same compare unit (training, held-out NLL, exact match) with and without gradient
    checkpointing: held-out NLL equal to 1e-4; the activations kept for the backward pass (every
    tensor autograd saves, summed over the steps) are far fewer with it."""
    import torch

    from instructdiff_ray.compare import load_heldout, run_unit
    from instructdiff_ray.corpus import normalize

    lines = gsm8k.read_text().splitlines()[:16]
    results, kept, configs = {}, {}, {}
    for on in (False, True):
        cfg = _unit_config(tmp_path / str(on), gsm8k, tiny_model, on)
        samples = [normalize(str(gsm8k), i, json.loads(x), cfg.data) for i, x in enumerate(lines)]
        heldout = load_heldout(cfg)
        saved = [0]

        def pack(t, saved=saved):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            results[on] = run_unit(cfg, "instructdiff/seed-0", samples, heldout,
                                   {"strategy": "instructdiff", "seed": 0, "n_rows": 16, "tokens": 0})
        kept[on] = saved[0]
        merged = rundir.warmup_files(rundir.unit_model_dir(cfg.out, "instructdiff/seed-0"))["merged"]
        configs[on] = json.loads(Path(merged, "config.json").read_text())
    off, on = results[False], results[True]
    assert off["train"]["steps"] == on["train"]["steps"] == 3
    assert abs(off["heldout"]["nll"] - on["heldout"]["nll"]) < 1e-4
    print(f"kept for backward: {kept[False] / 2**20:.1f} MiB without, {kept[True] / 2**20:.1f} MiB with checkpointing")
    assert kept[True] < 0.5 * kept[False], kept
    assert configs[True] == configs[False]  # checkpointing leaves nothing in the saved model's config
    assert on["exact_match"]["rows"] == 2 and 0.0 <= on["exact_match"]["accuracy"] <= 1.0


def test_units_with_and_without_checkpointing_stay_comparable(tmp_path, gsm8k):
    """Checkpointing may be turned on for one unit (full) without invalidating the others; a setting
    that changes the model may not."""
    from instructdiff_ray.compare import comparable_training

    off, on = (_unit_config(tmp_path, gsm8k, "smollm2", c) for c in (False, True))
    assert comparable_training(off) == comparable_training(on)
    faster = off.model_copy(update={"warmup": off.warmup.model_copy(update={"learning_rate": 1e-2})})
    assert comparable_training(faster) != comparable_training(off)


def test_one_training_setting_set_for_a_compare_keeps_the_rest_of_the_runs_warmup(tmp_path, gsm8k):
    """`--set compare.train.gradient_checkpointing=true` on a run whose compare trains with its warmup's
    settings: the other settings stay the warmup's (so finished units stay comparable)."""
    from instructdiff_ray.compare import comparable_training, config_for
    from instructdiff_ray.config import build_config

    run = tmp_path / "run"
    run.mkdir()
    tree = {"out": str(run), "data": {"paths": [str(gsm8k)]}, "model": {"base": "smollm2"},
            "warmup": {"learning_rate": 1e-3, "batch_size": 4}, "compare": {"eval": [str(gsm8k)], "train": None}}
    (run / rundir.RUN_CONFIG).write_text(json.dumps({"invocations": [{"config": tree}]}))
    plain = config_for(str(run), {})
    on = config_for(str(run), {}, [("compare.train.gradient_checkpointing", True)])
    assert on.compare.train.gradient_checkpointing and on.compare.train.learning_rate == 1e-3
    assert comparable_training(on) == comparable_training(plain)
    # the same from the API and from `run --set`: a part given changes the warmup's settings, keeps the rest
    api_way = config_for(str(run), {"train": {"gradient_checkpointing": True}})
    run_way = build_config({k: v for k, v in tree.items() if k != "compare"} | {"compare": {"eval": [str(gsm8k)]}},
                           [("compare.train.gradient_checkpointing", True)])
    assert comparable_training(api_way) == comparable_training(run_way) == comparable_training(plain)
    # a preset given for compare starts from that preset
    paper = config_for(str(run), {}, [("compare.train.preset", "paper")])
    assert (paper.compare.train.method, paper.compare.train.epochs, paper.compare.train.learning_rate) == ("full", 3.0, 2e-5)
