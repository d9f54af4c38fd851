"""The end-to-end job: rounds, base-score reuse, CLI behaviour, selection output, report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from instructdiff_ray.cli import main
from instructdiff_ray.records import RunSummary

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, ray_local, tiny_model, gsm8k):
    tmp = tmp_path_factory.mktemp("run")
    config = {
        "out": str(tmp / "run"),
        "data": {"paths": [str(gsm8k)], "limit": 1000, "shard_rows": 250},
        "model": {"base": str(tiny_model)},
        "warmup": {"alpha": 0.1, "max_steps": 6, "batch_size": 8, "learning_rate": 1e-3},
        "engine": {"threads": 1},
        "ray": {"min_actors": 2, "max_actors": 2},
        "rounds": 2,
        "progress": "off",
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--set", "selection.budget=0.1"]) == 0
    return tmp / "run"


def _markers(scores_dir):
    return [json.loads(p.read_text()) for p in sorted((scores_dir / "_done").glob("*.json"))]


def test_two_rounds_reuse_base_scores_and_change_the_selection(two_rounds):
    r1, r2 = two_rounds / "round-1", two_rounds / "round-2"
    assert sum(m["base_tokens"] for m in _markers(r1 / "scores")) > 0
    assert sum(m["base_tokens"] for m in _markers(r2 / "scores")) == 0  # no second base pass
    assert sum(m["warmup_tokens"] for m in _markers(r2 / "scores")) > 0
    s1 = pq.read_table(r1 / "scores").sort_by("source_row").to_pydict()
    s2 = pq.read_table(r2 / "scores").sort_by("source_row").to_pydict()
    assert s1["base_nll"] == s2["base_nll"] and s1["base_entropy"] == s2["base_entropy"]
    assert not np.allclose(s1["warmup_nll"], s2["warmup_nll"])
    ids1 = (r1 / "selection" / "selected_ids.txt").read_text().split()
    ids2 = (r2 / "selection" / "selected_ids.txt").read_text().split()
    assert ids1 != ids2 and len(ids1) > 50
    # round 2's warmup was trained on round 1's selection, starting from the base
    w2 = json.loads((r2 / "warmup" / "_WARMUP_DONE.json").read_text())
    assert w2["result"]["samples"] == len(ids1) and w2["fingerprint"]["rows"]["count"] == len(ids1)
    stats = json.loads((r2 / "selection" / "stats.json").read_text())
    assert stats["rows_total"] == 1000 and stats["trimmed_per_tail"] == 100


@pytest.fixture
def rerun_dir(two_rounds, tmp_path):
    """A copy of the finished two-round run (with its config), to rerun with other settings."""
    import shutil

    shutil.copytree(two_rounds, tmp_path / "run")
    config = yaml.safe_load((two_rounds.parent / "job.yaml").read_text()) | {"out": str(tmp_path / "run")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_rerun_with_another_selection_setting_selects_again(rerun_dir, capsys):
    """Selection is cheap: a changed budget selects again (one line says so); the round-2 warmup
    it feeds was trained on the old pick and is refused (exit 3) unless --recompute warmup."""
    run, job = rerun_dir / "run", str(rerun_dir / "job.yaml")
    stats = lambda k: json.loads((run / f"round-{k}" / "selection" / "stats.json").read_text())  # noqa: E731
    before = stats(1)
    assert before["budget"]["beta"] == 0.1
    assert main(["run", job, "--set", "selection.budget=0.1", "--set", "rounds=1"]) == 0  # unchanged: reused
    assert stats(1) == before
    assert main(["run", job, "--set", "selection.budget=0.3", "--set", "rounds=1", "--set", "progress=on"]) == 0
    err = capsys.readouterr().err
    assert "selecting again" in err and "selection.budget" in err
    after = stats(1)
    assert after["budget"]["beta"] == 0.3 and after["selected_rows"] > before["selected_rows"]
    ids = (run / "round-1" / "selection" / "selected_ids.txt").read_text().split()
    assert len(ids) == after["selected_rows"] == len((run / "round-1" / "selection" / "selected.jsonl").read_text().splitlines())
    summary = json.loads((run / "_run_summary.json").read_text())
    assert summary["rounds"][-1]["selection"]["budget"]["beta"] == 0.3
    assert RunSummary.from_dict(summary).to_dict() == summary  # the typed record reads back what was written
    warm = (run / "round-2" / "warmup" / "_WARMUP_DONE.json").read_text()
    assert main(["run", job, "--set", "selection.budget=0.3"]) == 3  # round 2's warmup was trained on the 0.1 pick
    err = capsys.readouterr().err
    assert "round-2/warmup" in err and "rows" in err and "--recompute warmup" in err
    assert (run / "round-2" / "warmup" / "_WARMUP_DONE.json").read_text() == warm  # refused: nothing touched
    assert len(err.strip().splitlines()) == 1


def test_warmup_command_on_a_run_directory_writes_only_its_stage(rerun_dir, capsys):
    run = rerun_dir / "run"

    def files():  # the run's files but its invocation history and each command's log
        return sorted(p.relative_to(run) for p in run.rglob("*")
                      if p.is_file() and p.name != "_run_config.json" and p.parent.name != "_logs")

    logs = lambda: sorted((run / "_logs").glob("driver-*.log"))  # noqa: E731
    before, logs_before = files(), logs()
    config = yaml.safe_load((rerun_dir / "job.yaml").read_text())
    args = ["warmup", "--data", *config["data"]["paths"], "--limit", "1000", "--shard-rows", "250", "--base",
            config["model"]["base"], "--out", str(run), "--threads", "1", "--progress", "off"]
    # too few rows for one optimizer step: refused before anything is touched
    assert main(args + ["--set", "warmup.count=4", "--set", "warmup.batch_size=8", "--set", "warmup.max_steps=6",
                        "--set", "warmup.learning_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "fewer than one global batch of 8" in err and len(err.strip().splitlines()) == 1
    assert logs() == logs_before  # a refused command leaves no log either
    # the same settings as the run: round 1's warmup is reused, nothing else is written
    sets = [f"warmup.{k}={v}" for k, v in config["warmup"].items()]
    assert main(args + [x for kv in sets for x in ("--set", kv)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["out_dir"].endswith("round-1/warmup")
    assert files() == before
    assert len(logs()) == len(logs_before) + 1  # the warmup command's own log, beside the run's


def test_select_refuses_unfinished_scores_unless_partial(rerun_dir, capsys):
    import instructdiff_ray as idr
    from instructdiff_ray.config import ConfigError

    scores = rerun_dir / "run" / "round-1" / "scores"
    (scores / "_done" / "shard-00000002.json").unlink()  # as if scoring were still running
    args = ["select", "--scores", str(scores), "--out", str(rerun_dir / "sel")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "is not finished (1 of 4 shards, 250 rows, have no output yet)" in err and "--partial" in err
    assert len(err.splitlines()) == 1 and not (rerun_dir / "sel").exists()
    with pytest.raises(ConfigError, match="is not finished"):
        idr.select(str(scores))
    assert main(args + ["--partial"]) == 0
    stats = json.loads((rerun_dir / "sel" / "stats.json").read_text())
    assert stats["rows_total"] == 750
    assert idr.select(str(scores), partial=True).stats["rows_total"] == 750


def test_selected_rows_keep_the_users_fields(two_rounds):
    lines = (two_rounds / "round-2" / "selection" / "selected.jsonl").read_text().splitlines()
    ids = (two_rounds / "round-2" / "selection" / "selected_ids.txt").read_text().split()
    assert len(lines) == len(ids)
    assert all(set(json.loads(x)) == {"question", "answer"} for x in lines)


def test_reselect_with_another_budget_without_rescoring(two_rounds, tmp_path, capsys):
    out = tmp_path / "sel"
    code = main(["select", "--scores", str(two_rounds / "round-1" / "scores"), "--out", str(out),
                 "--budget", "0.2", "--budget-unit", "samples", "--format", "parquet"])
    assert code == 0
    rows = pq.read_table(out / "selected.parquet")
    assert rows.num_rows == 200 and set(rows.column_names) == {"question", "answer"}
    assert main(["select", "--scores", str(two_rounds / "round-1" / "scores"), "--out", str(tmp_path / "r"),
                 "--strategy", "random"]) == 0


def test_report_plots_decode_and_html_references_every_plot(two_rounds):
    import matplotlib.image as mpimg

    report = two_rounds / "report"
    html = (report / "index.html").read_text()
    pngs = sorted(report.glob("round-*/*.png"))
    assert len(pngs) == 10  # five per round: one input file, so no per-source breakdown
    for p in pngs:
        assert p.stat().st_size > 5000
        img = mpimg.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 300
        assert f'data-name="{p.parent.name}/{p.name}"' in html
    summary = (report / "summary.md").read_text()
    assert "## Round 2" in summary and "| ok | 1000 |" in summary
    assert "- rows skipped for length (too_long): 0 (0.0%)" in summary


CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# Flags for a machine without network: no background connections, no first-run or sync traffic.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]
IMAGE_CHECK = """<script>window.addEventListener('load', () => {
  const bad = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const uncaptioned = [...document.images].filter(i => {
    const c = i.closest('figure') && i.closest('figure').querySelector('figcaption');
    return !c || c.innerText.trim().split(' ').length < 8;
  }).map(i => i.alt);
  const text = document.body.innerText;
  const raw = ['**', '|---', '| ---', '`', '## '].filter(m => text.includes(m));
  document.body.setAttribute('data-check', JSON.stringify({images: document.images.length, bad: bad,
    uncaptioned: uncaptioned, raw_markdown: raw, tables: document.querySelectorAll('table').length}));
});</script>"""


def test_report_renders_in_headless_chromium(two_rounds, tmp_path):
    """The report opened in a real browser: every image decodes, no console errors, a screenshot
    kept in test-artifacts/report.png."""
    import os
    import re
    import shutil

    if not Path(CHROMIUM).exists():
        if os.environ.get("INSTRUCTDIFF_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing: .ci/install installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed")
    page = tmp_path / "index.html"
    html = (two_rounds / "report" / "index.html").read_text()
    page.write_text(html.replace("</body>", IMAGE_CHECK + "</body>"))
    run = lambda *extra: subprocess.run(  # noqa: E731
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra, page.as_uri()],
        capture_output=True, text=True, timeout=120)
    dom = run("--dump-dom")
    check = re.search(r"data-check=\"([^\"]*)\"", dom.stdout)
    assert check, dom.stderr[-2000:]
    result = json.loads(check.group(1).replace("&quot;", '"'))
    assert result == {"images": 10, "bad": [], "uncaptioned": [], "raw_markdown": [], "tables": 2}
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    shot = run("--screenshot=" + str(tmp_path / "report.png"), "--window-size=1100,2400")
    assert (tmp_path / "report.png").exists(), shot.stderr[-2000:]
    import matplotlib.image as mpimg

    img = mpimg.imread(tmp_path / "report.png")
    assert img.shape[:2] == (2400, 1100) and img[..., :3].std() > 0.05  # a rendered page, not a blank one
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(tmp_path / "report.png", ARTIFACTS / "report.png")


def test_status_and_inspect(two_rounds, capsys):
    assert main(["status", str(two_rounds)]) == 0
    out = capsys.readouterr().out
    assert "round-2: stage selected" in out and "shards 4/4 done" in out
    assert main(["inspect", str(two_rounds), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "lowest 2 by delta_entropy" in out and '"question"' in out
    # read one score file at a time, the rows shown are those of a sort of all of them
    from instructdiff_ray.selection import load_scores

    ok = load_scores(str(two_rounds / "round-2" / "scores")).to_pandas().query("status == 'ok'")
    picked = set((two_rounds / "round-2" / "selection" / "selected_ids.txt").read_text().split())
    assert f"round-2: {len(ok)} scored rows ({len(picked)} selected)" in out
    for col in ("delta_entropy", "delta_nll"):
        for head, ascending in (("lowest", True), ("highest", False)):
            block = out.split(f"=== {head} 2 by {col} ===")[1].split("===")[0]
            lines = [x for x in block.splitlines() if x.startswith("- ")]
            want = ok.sort_values([col, "sample_id"], ascending=[ascending, True], kind="stable")["sample_id"][:2]
            assert [x.split()[1] for x in lines] == list(want), (col, head)
            assert ["[selected]" in x for x in lines] == [i in picked for i in want]


def test_config_errors_fail_fast_with_exit_2(tmp_path, gsm8k, capsys):
    base = ["run", "--data", str(gsm8k), "--base", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(base + ["--set", "selection.budgett=0.1"]) == 2
    assert "selection.budgett" in capsys.readouterr().err
    assert main(base + ["--set", "selection.gamma=0.7"]) == 2
    assert "selection.gamma" in capsys.readouterr().err
    assert main(base + ["--set", "selection.strategy=best"]) == 2
    assert main(["run", "--data", str(tmp_path / "missing.jsonl"), "--base", "x", "--out", "o"]) == 2
    assert "does not exist" in capsys.readouterr().err
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text('{"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": true}')
    assert main(["run", "--data", str(gsm8k), "--base", str(t5), "--out", str(tmp_path / "o"), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "encoder-decoder" in err or "vLLM is not installed" in err


def test_model_dependent_config_errors_fail_before_any_model_loads(tmp_path, gsm8k, tiny_model, capsys):
    import shutil

    args = ["run", "--data", str(gsm8k), "--out", str(tmp_path / "o"), "--dry-run"]
    assert main(args + ["--base", str(tiny_model), "--max-length", "5000"]) == 2
    assert "exceeds the context length of model.base (4096 positions)" in capsys.readouterr().err
    plain = tmp_path / "no-chat-template"
    shutil.copytree(tiny_model, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    conf = json.loads((plain / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(conf))
    assert main(args + ["--base", str(plain), "--template", "chat"]) == 2
    assert "has no chat template" in capsys.readouterr().err
    assert main(args + ["--base", str(tiny_model), "--template", "chat"]) == 0


def test_many_rows_over_max_length_warn():
    from instructdiff_ray.pipeline import length_note
    from instructdiff_ray.records import ScoreSummary

    many = ScoreSummary("o", 1, 0, 1000, {"ok": 980, "too_long": 20}, 0, 0, 0.0, 0.0, 0.0)
    few = ScoreSummary("o", 1, 0, 1000, {"ok": 995, "too_long": 5}, 0, 0, 0.0, 0.0, 0.0)
    note = length_note(many, 512)
    assert note and "20 of 1000 rows (2.0%)" in note and "template.max_length=512" in note
    assert length_note(few, 512) is None and many.to_dict()["too_long_share"] == 0.02


def test_dry_run_prints_the_plan_without_models(tmp_path, gsm8k, tiny_model, capsys):
    assert main(["run", "--data", str(gsm8k), "--base", str(tiny_model), "--out", str(tmp_path / "o"),
                 "--limit", "300", "--shard-rows", "100", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["rows"] == 300 and plan["shards"] == 3


def test_console_entry_points():
    out = subprocess.run([sys.executable, "-m", "instructdiff_ray", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "instructdiff-ray" in out.stdout
    helps = subprocess.run([sys.executable, "-m", "instructdiff_ray", "run", "--help"], capture_output=True, text=True)
    assert "example" in helps.stdout and "--dry-run" in helps.stdout


def test_outputs_read_with_pandas_polars_duckdb_and_datasets(two_rounds):
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    scores = two_rounds / "round-1" / "scores"
    assert len(pd.read_parquet(scores)) == 1000
    assert pl.read_parquet(f"{scores}/*.parquet").height == 1000
    assert duckdb.sql(f"select count(*) from read_parquet('{scores}/*.parquet') where status = 'ok'").fetchall()[0][0] == 1000
    ds = datasets.load_dataset("parquet", data_files=f"{scores}/*.parquet", split="train")
    assert ds.num_rows == 1000 and "delta_entropy" in ds.column_names
    sel = datasets.load_dataset("json", data_files=str(two_rounds / "round-1" / "selection" / "selected.jsonl"), split="train")
    assert sel.column_names == ["question", "answer"]


def test_python_api_run_equals_the_cli_run(two_rounds, tmp_path, monkeypatch):
    """The public API inside the Ray session the caller started (ray_local): round 1 of the same
    config gives the CLI's scores and selection; select() works in memory and on disk; the run
    is logged to MLflow's local file store and reads back with MLflow's client."""
    import instructdiff_ray as idr

    config = yaml.safe_load((two_rounds.parent / "job.yaml").read_text())
    config["out"] = str(tmp_path / "api")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    uri = f"file://{tmp_path}/mlruns"
    res = idr.run(config, rounds=1, selection__budget=0.1, tracking__mlflow=True, tracking__mlflow_uri=uri,
                  tracking__experiment="api-test")
    assert isinstance(res, idr.RunResult) and [r.round for r in res.rounds] == [1]
    assert res.rounds[0].rows_scored == 1000 and res.rounds[0].status_counts == {"ok": 1000}
    cli = idr.load_scores(str(two_rounds / "round-1" / "scores")).sort_by("source_row").to_pydict()
    api = idr.load_scores(res.rounds[0].scores_dir).sort_by("source_row").to_pydict()
    assert api["sample_id"] == cli["sample_id"]
    for col in ("base_nll", "base_entropy", "warmup_nll", "warmup_entropy"):
        assert np.max(np.abs(np.array(api[col]) - np.array(cli[col]))) < 1e-6
    ids = (two_rounds / "round-1" / "selection" / "selected_ids.txt").read_text().split()
    assert open(res.selected_ids).read().split() == ids and res.stats["selected_rows"] == len(ids)
    assert res.selected_data.endswith("selected.jsonl") and res.report.endswith("index.html")
    memory = idr.select(res.rounds[0].scores_dir, budget=0.2, budget_unit="samples")
    assert memory.selected_rows == 200 and memory.paths == {} and memory.rows.num_rows == 200
    written = idr.select(res.rounds[0].scores_dir, out=str(tmp_path / "sel"), budget=0.2, budget_unit="samples",
                         output_format="hf")
    as_jsonl = idr.select(res.rounds[0].scores_dir, out=str(tmp_path / "sel2"), budget=0.2, budget_unit="samples")
    import datasets

    hf = datasets.load_from_disk(written.data)
    assert hf["question"] == [json.loads(line)["question"] for line in open(as_jsonl.data)] and len(hf) == 200
    with pytest.raises(idr.config.ConfigError):
        idr.select(res.rounds[0].scores_dir, budget=2.0)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    logged = client.get_run(res.mlflow_run_id)
    assert client.get_experiment(logged.info.experiment_id).name == "api-test" and logged.info.run_name == "api"
    assert logged.data.params["data.shard_rows"] == "250" and logged.data.params["selection.budget"] == "0.1"
    assert logged.data.metrics["rows_scored"] == 1000 and logged.data.metrics["selected_rows"] == len(ids)
    assert logged.data.metrics["status_ok"] == 1000 and logged.data.metrics["base_tokens_per_s"] > 0
    arts = {a.path for a in client.list_artifacts(res.mlflow_run_id, "report")}
    assert {"report/index.html", "report/summary.md", "report/round-1"} <= arts
    pngs = [a.path for a in client.list_artifacts(res.mlflow_run_id, "report/round-1")]
    assert len(pngs) >= 3 and all(p.endswith(".png") for p in pngs)
    stats = json.loads(open(client.download_artifacts(res.mlflow_run_id, "round-1/selection_stats.json", str(tmp_path))).read())
    assert stats["selected_rows"] == len(ids)
