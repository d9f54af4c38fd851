"""The benchmark scripts run (on CPU, tiny shapes), so that they never rot between GPU loans."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_with_a_tiny_shape():
    pytest.importorskip("vllm")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--device", "cpu",
                          "--samples", "8", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert {(r["engine"], r["placement"]) for r in rows} == {(e, p) for e in ("vllm", "hf") for p in ("together", "pools")}
    for r in rows:
        assert "error" not in r, r
        assert [p["pass"] for p in r["passes"]] == ["base", "warmup"]
        assert all(p["tokens_per_s"] > 0 and p["start_s"] >= 0 for p in r["passes"])
    assert "| tiny | vllm | pools | warmup |" in out.stdout


def test_warmup_draw_benchmark_runs_small(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_warmup_draw.py"), "--rows", "200000",
                          "--max-samples", "500", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "read 500 samples" in out.stdout and "two draws identical: True" in out.stdout, out.stdout


def test_selection_benchmark_runs_small(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_selection.py"), "--rows", "200000",
                          "--modes", "memory", "search", "--repeats", "1", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "identical ids in identical order: True" in out.stdout, out.stdout


def test_training_rows_benchmark_runs_small(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_training_rows.py"), "--rows", "2000",
                          "--steps", "20", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows, base = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows["rows"] == base["rows"] > 1900 and rows["tokens"] > 0 and base["heap_peak_gb"] > 0, out.stdout
