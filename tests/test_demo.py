"""The README's first command, on a prefix of HumanEval to keep CI short (the full demo is the same path)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_command_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)  # Ray's default, as a user has it (its token warning must not reach the terminal)
    res = subprocess.run([sys.executable, "-m", "instructdiff_ray", "demo", "--out", str(out), "--limit", "40"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    # what a person reads: the project's own lines (progress on by default), not pages of Ray output
    lines = (res.stdout + res.stderr).splitlines()
    assert len(lines) < 60, "\n".join(lines)
    assert any(line.startswith("[score r1] 40/40 rows (100%)") for line in lines)
    assert "[score r1] 40 rows: 40 ok" in lines
    first = res.stderr.splitlines()[:3]
    assert any("instructdiff status" in x for x in first)  # how to watch it, first
    assert any(x.startswith("[run] full log") for x in first)
    # Ray's start-up, token and actor-pool lines are in the run directory's log, not on the terminal
    (log,) = (out / "_logs").glob("driver-*.log")
    kept = log.read_text()
    assert "core_worker.cc" not in res.stderr and "Token authentication" not in res.stderr and "\x1b[" not in res.stderr
    assert "Token authentication" in kept and all(line in kept for line in res.stderr.splitlines())
    assert "selected data:" in res.stdout and "HumanEval tasks selected" in res.stdout
    stats = json.loads((out / "round-1" / "selection" / "stats.json").read_text())
    assert stats["rows_total"] == 40 and stats["status_counts"] == {"ok": 40}
    rows = [json.loads(x) for x in (out / "round-1" / "selection" / "selected.jsonl").read_text().splitlines()]
    assert rows and all(r["task_id"].startswith("HumanEval/") and "canonical_solution" in r for r in rows)
    assert (out / "report" / "index.html").stat().st_size > 50_000
    assert Path(out / "round-1" / "warmup" / "adapter" / "adapter_config.json").exists()
