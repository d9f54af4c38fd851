"""Selection at scale: 10M score rows from Parquet, timed and with peak RSS.

Writes a synthetic scores directory (10 shard files following the scoring output contract,
ties included), then runs `select` in a fresh subprocess so its peak RSS is the selection's.

    python benchmarks/bench_selection.py --rows 10000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def write_scores(out: Path, rows: int, shards: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per = rows // shards
    for s in range(shards):
        ids = pc.cast(pa.array(rng.integers(0, 2**62, per)), pa.string())
        status = pa.array(np.where(rng.random(per) < 0.02, "too_long", "ok"))
        ok = pc.equal(status, "ok")
        f = lambda v: pc.if_else(ok, pa.array(np.round(v, 3)), pa.scalar(None, pa.float64()))  # noqa: E731
        t = pa.table({
            "sample_id": ids, "source_file": pa.array(["corpus.jsonl"] * per), "source_row": np.arange(s * per, (s + 1) * per),
            "shard_id": np.full(per, s, dtype=np.int32), "n_prompt_tokens": rng.integers(20, 300, per).astype(np.int32),
            "n_response_tokens": rng.integers(1, 500, per).astype(np.int32),
            "base_nll": f(rng.normal(1.5, .5, per)), "base_entropy": f(rng.normal(2, .5, per)),
            "warmup_nll": f(rng.normal(1, .5, per)), "warmup_entropy": f(rng.normal(2, .5, per)),
            "delta_nll": f(rng.normal(.5, .4, per)), "delta_entropy": f(rng.normal(-.1, .2, per)),
            "status": status, "reason": pa.array([""] * per),
        })
        pq.write_table(t, out / f"shard-{s:05d}.parquet")


def run_selection(scores: str) -> None:
    from instructdiff_ray.config import SelectionConfig
    from instructdiff_ray.selection import SCORE_COLUMNS, load_scores, select

    t0 = time.perf_counter()
    table = load_scores(scores, columns=SCORE_COLUMNS)
    t1 = time.perf_counter()
    sel = select(table, SelectionConfig())
    t2 = time.perf_counter()
    print(json.dumps({"rows": table.num_rows, "read_s": t1 - t0, "select_s": t2 - t1, "total_s": t2 - t0,
                      "selected": sel.stats["selected_rows"],
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        run_selection(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_scores(Path(tmp), args.rows)
        print(f"wrote {args.rows} score rows in {time.perf_counter() - t:.1f}s")
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--child", tmp], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(runs[-1])
        med = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]
        print(f"median over {len(runs)}: {med['rows']} rows, read {med['read_s']:.1f}s + select {med['select_s']:.1f}s "
              f"= {med['total_s']:.1f}s, peak RSS {med['peak_rss_gb']:.2f} GB, {med['selected']} selected")


if __name__ == "__main__":
    main()
