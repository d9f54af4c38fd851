"""`instructdiff compare`: each strategy's pick fine-tuned and measured on held-out rows, the
held-out NLL exact against an independent float64 command (which is also the user-metric path),
and a killed compare resumed computing only the units without markers."""

import json
import signal
import sys
from pathlib import Path

import pytest

from instructdiff_ray.config import ConfigError, build_config

pytestmark = pytest.mark.slow

EVAL = Path(__file__).with_name("compare_eval.py")
STRATEGIES = ["instructdiff", "random", "full"]


def _config(tmp, gsm8k, base):
    return {"out": str(tmp / "run"), "data": {"paths": [str(gsm8k)], "limit": 40, "shard_rows": 20},
            "model": {"base": str(base)}, "engine": {"threads": 1},
            "warmup": {"alpha": 0.1, "max_steps": 2, "batch_size": 4, "learning_rate": 1e-3},
            "selection": {"budget": 0.2}, "run": {"lease_ttl_s": 20}, "progress": "off",
            "compare": {"eval": [str(gsm8k)], "eval_skip": 1000, "eval_limit": 10, "strategies": STRATEGIES,
                        "seeds": [0, 1], "full_seeds": [0], "train": {"batch_size": 4, "learning_rate": 1e-3},
                        "eval_command": f"{sys.executable} {EVAL} {{model_dir}} {{heldout}}", "metric": "nll64",
                        "higher_is_better": False}}


@pytest.fixture(scope="module")
def compared(tmp_path_factory, ray_local, tiny_model, gsm8k):
    """`run` with a compare section: the rounds, then 3 strategies x 2 seeds + the base model."""
    from instructdiff_ray.pipeline import run_job

    tmp = tmp_path_factory.mktemp("compare")
    cfg = build_config(_config(tmp, gsm8k, tiny_model))
    result = run_job(cfg)
    return Path(cfg.out), result


def _table(run: Path) -> dict:
    return json.loads((run / "compare" / "comparison.json").read_text())


def test_every_strategy_trained_and_measured_exactly(compared):
    run, result = compared
    table = _table(run)
    assert [r["strategy"] for r in table["strategies"]][0] == "base"
    assert {r["strategy"] for r in table["strategies"]} == {"base", *STRATEGIES}
    assert set(table["units"]) == {"base", "full/seed-0"} | {f"{s}/seed-{k}" for s in STRATEGIES[:2] for k in (0, 1)}
    assert table["heldout_rows"] == 10 and table["metric"] == "nll64"
    for name, unit in table["units"].items():
        # the user command's independent float64 NLL is the package's held-out NLL
        assert unit["user_metric"]["name"] == "nll64" and unit["user_metric"]["all"]["rows"] == 10
        assert abs(unit["user_metric"]["value"] - unit["heldout"]["nll"]) < 1e-4, name
        assert unit["heldout"]["rows"] == 10 and unit["heldout"]["rows_failed"] == 0
        assert unit["peak_rss_mb"] > 100  # the unit's own worker: torch and the model at least
        if name != "base":
            assert unit["train"]["samples"] == unit["n_rows"] > 0 and unit["train"]["steps"] >= 1
            assert abs(unit["heldout"]["nll"] - table["units"]["base"]["heldout"]["nll"]) > 1e-6  # it trained
    final = result.rounds[-1]
    picked = (run / "compare" / "selections" / "instructdiff" / "selected_ids.txt").read_text()
    assert picked == Path(final.paths["ids"]).read_text()  # the run's own pick, same budget
    assert table["units"]["full/seed-0"]["n_rows"] == 40 and table["units"]["instructdiff/seed-0"]["n_rows"] < 40
    rows = {r["strategy"]: r for r in table["strategies"]}
    assert rows["random"]["nll_std"] is not None and rows["full"]["seeds"] == [0]  # compare.full_seeds
    assert "vs_random" in rows["instructdiff"] and rows["base"]["cpu_minutes"] > 0
    # intervals: t over the 2 seeds; the paired difference from random over rows and seeds (2 pairs; full: 1)
    lo, hi = rows["random"]["nll_ci"]
    assert lo < rows["random"]["nll_mean"] < hi
    lo, hi = rows["instructdiff"]["vs_random_ci"]
    assert lo <= rows["instructdiff"]["vs_random"] <= hi and rows["instructdiff"]["vs_random_seeds"] == 2
    assert rows["full"]["vs_random_seeds"] == 1 and isinstance(rows["full"]["distinguishable"], bool)
    assert rows["instructdiff"]["steps"] >= 1 and table["selection_minutes"] > 0


def test_table_in_summary_report_and_run_summary(compared):
    run, result = compared
    summary = (run / "report" / "summary.md").read_text()
    assert "## Comparison" in summary and "nll64" in summary and "| full |" in summary
    assert "Cost in device-minutes: selecting (warmup and scoring)" in summary and "paired 95% CI" in summary
    assert "| peak RSS (GB) | device-min |" in summary
    page = (run / "report" / "index.html").read_text()
    assert "Comparison" in page and 'data-name="comparison.png"' in page and "<table" in page
    assert (run / "report" / "comparison.png").stat().st_size > 1000
    assert {r["strategy"] for r in result.compare["strategies"]} == {"base", *STRATEGIES}


def test_killed_compare_resumes_computing_only_missing_units(compared, tiny_model, gsm8k):
    """Adding a seed makes 2 new units (full keeps its seeds); the driver is killed as one of them finishes; the rerun
    (with gradient checkpointing turned on, which leaves units comparable) computes exactly the units without
    markers, and reuses the killed unit's trained model."""
    from test_faults import _run_cli

    run, _ = compared
    before = {p.parent.relative_to(run / "compare" / "units").as_posix(): p.read_text()
              for p in (run / "compare" / "units").rglob("_UNIT_DONE.json")}
    assert len(before) == 6
    # the eval command is given again: one stored in the run directory is never run
    args = ["compare", str(run), "--seeds", "0,1,2", "--progress", "off", "--eval-command",
            _config(run.parent, gsm8k, tiny_model)["compare"]["eval_command"]]
    tag = f"instructdiff-compare-{run.parent.name}"
    rc, err = _run_cli(args, tag + "-killed", fault="compare.before_unit_marker:random/seed-2")
    assert rc == -signal.SIGKILL, err[-3000:]
    stamp = run / "compare" / "units" / "random" / "seed-2" / "model" / "_WARMUP_DONE.json"
    stamped = stamp.read_text()
    marked = {p.parent.relative_to(run / "compare" / "units").as_posix()
              for p in (run / "compare" / "units").rglob("_UNIT_DONE.json")}
    assert "random/seed-2" not in marked and set(before) <= marked
    # a record from before checkpointing left the fingerprint still matches; turning it on reuses every finished unit
    record = run / "compare" / "_compare.json"
    recorded = json.loads(record.read_text())
    recorded["fingerprint"]["train"]["gradient_checkpointing"] = False
    record.write_text(json.dumps(recorded))
    args += ["--set", "compare.train.gradient_checkpointing=true"]
    rc, err = _run_cli(args, tag + "-resumed")  # the killed driver's lease (this host, process gone) is taken at once
    assert rc == 0, err[-3000:]
    table = _table(run)
    missing = {f"{s}/seed-2" for s in STRATEGIES[:2]} - marked
    assert set(table["computed"]) == missing and "random/seed-2" in missing
    assert set(table["reused"]) == marked
    for name, text in before.items():  # finished units untouched
        assert (run / "compare" / "units" / name / "_UNIT_DONE.json").read_text() == text
    assert stamp.read_text() == stamped  # trained before the kill, not retrained
    assert len({r["strategy"] for r in table["strategies"]}) == 4
    assert [len(r["seeds"]) for r in table["strategies"] if r["strategy"] not in ("base", "full")] == [3, 3]
    from instructdiff_ray.report import run_status

    assert "compare: 8 units finished (base, full/seed-0, instructdiff/seed-0," in run_status(str(run))


def test_heldout_rows_in_the_pool_are_refused(compared):
    from instructdiff_ray.compare import compare_run, config_for

    run, _ = compared
    cfg = config_for(str(run), {"eval_skip": 30, "eval_limit": 20})
    with pytest.raises(ConfigError, match="10 of 20 held-out rows are also in the pool"):
        compare_run(cfg)


def test_compare_settings_are_checked_before_anything_runs(tmp_path, gsm8k, tiny_model):
    tree = _config(tmp_path, gsm8k, tiny_model)
    with pytest.raises(ConfigError, match="unknown strategy 'best'"):
        build_config(tree | {"compare": {**tree["compare"], "strategies": ["instructdiff", "best"]}})
    with pytest.raises(ConfigError, match="template.ifd"):
        build_config(tree | {"compare": {**tree["compare"], "strategies": ["ifd_loss"]}})
    with pytest.raises(ConfigError, match="compare.eval"):
        build_config(tree | {"compare": {**tree["compare"], "eval": [str(tmp_path / "missing.jsonl")]}})
    from instructdiff_ray.cli import main

    assert main(["compare", str(tmp_path / "nowhere"), "--eval", str(gsm8k)]) == 2


def test_eval_command_failures_name_the_command_and_its_output(tmp_path):
    from instructdiff_ray.compare import EvalCommandFailed, pick_metric, user_metrics
    from instructdiff_ray.config import CompareConfig
    from instructdiff_ray.corpus import Sample

    rows = [Sample(source_file="f", source_row=0, sample_id="a", instruction="q", response="r")]
    with pytest.raises(EvalCommandFailed, match="exited 3 .*no such model"):
        user_metrics("echo no such model >&2; exit 3", str(tmp_path), rows)
    with pytest.raises(EvalCommandFailed, match="no JSON object line"):
        user_metrics("echo accuracy: 0.5", str(tmp_path), rows)
    got = user_metrics("echo '{not json'; cat {heldout} | wc -l | xargs -I N echo '{\"rows\": N, \"name\": \"x\"}'; "
                       "echo done", str(tmp_path), rows)
    assert got == {"rows": 1.0}  # the last JSON-object line; its numbers only
    c = CompareConfig(eval=["x"])
    with pytest.raises(EvalCommandFailed, match="name the one to compare with compare.metric"):
        pick_metric(c, {"acc": 0.5, "f1": 0.4})
    assert pick_metric(CompareConfig(eval=["x"], metric="f1"), {"acc": 0.5, "f1": 0.4}) == ("f1", 0.4)


def test_a_second_budget_unit_makes_its_own_picks(compared):
    """compare.budget_units [tokens, samples]: each strategy also at β of the rows (STRATEGY@samples),
    full once; its pick fills ⌊β·n⌋ rows, committed beside the token-budget picks."""
    from instructdiff_ray.compare import compared_keys, config_for, plan_units, scores_of_run

    run, _ = compared
    cfg = config_for(str(run), {"budget_units": ["tokens", "samples"]})
    assert compared_keys(cfg) == ["instructdiff", "random", "full", "instructdiff@samples", "random@samples"]
    plans = plan_units(cfg, scores_of_run(str(run)), [("instructdiff@samples", 0), ("random@samples", 1)])
    assert set(plans) == {"instructdiff@samples/seed-0", "random@samples/seed-1"}
    stats = json.loads((run / "compare" / "selections" / "instructdiff@samples" / "stats.json").read_text())
    assert stats["budget"]["unit"] == "samples" and stats["selected_rows"] == int(0.2 * stats["rows_scored"])
    assert plans["instructdiff@samples/seed-0"]["n_rows"] == stats["selected_rows"]
    assert (run / "compare" / "selections" / "random@samples-seed-1" / "_SELECTION_DONE.json").exists()


def test_picks_above_the_in_memory_limit_are_the_same(compared, tmp_path):
    """A pool above ray.select_in_memory_rows is picked by the distributed search: the same rows."""
    import shutil

    from instructdiff_ray.compare import config_for, plan_units, scores_of_run

    run, _ = compared
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("compare"))
    keys = [("instructdiff", 0), ("random", 1), ("full", 0)]
    cfg = config_for(str(copy), {}, [("ray.select_in_memory_rows", 0)])
    searched = plan_units(cfg, scores_of_run(str(copy)), keys)
    for name, plan in plan_units(config_for(str(run), {}), scores_of_run(str(run)), keys).items():
        assert Path(searched[name]["selection"], "selected_ids.txt").read_text() == \
            Path(plan["selection"], "selected_ids.txt").read_text(), name
        assert searched[name]["n_rows"] == plan["n_rows"] > 0
