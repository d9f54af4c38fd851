"""The warmup draw at scale: plan, draw and read the drawn rows of a generated Parquet corpus, with
the driver's peak RSS, against the previous draw (a set of ⌊α·N⌋ global ordinals on the driver)
measured in the same run.

Writes N qa rows (Parquet, 1M-row row groups, 10M rows per file), then in fresh processes:
  - baseline: numpy's seeded choice of ⌊α·N⌋ of N ordinals, kept as a Python set (what the driver
    held before; peak RSS and time);
  - draw: plan the corpus, draw (per-shard counts on the driver), read the drawn rows by Ray tasks
    into the object store (capped at --max-samples) and digest them in a task, twice with one seed.

    python benchmarks/bench_warmup_draw.py --rows 100000000 --max-samples 10000
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

GROUP = 1_000_000
PER_FILE = 10_000_000


def write_corpus(root: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = pa.schema([("question", pa.string()), ("answer", pa.string())])
    for f, lo in enumerate(range(0, rows, PER_FILE)):
        with pq.ParquetWriter(root / f"part-{f:04d}.parquet", schema) as w:
            for g in range(lo, min(lo + PER_FILE, rows), GROUP):
                ids = pc.cast(pa.array(range(g, min(g + GROUP, rows, lo + PER_FILE))), pa.string())
                w.write_table(pa.table({"question": pc.binary_join_element_wise("What is item ", ids, "?", ""),
                                        "answer": pc.binary_join_element_wise("It is ", ids, ".", "")},
                                       schema=schema), row_group_size=GROUP)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def baseline(rows: int, alpha: float) -> dict:
    import numpy as np

    t = time.perf_counter()
    drawn = set(np.random.default_rng(0).choice(rows, size=int(alpha * rows), replace=False).tolist())
    return {"drawn": len(drawn), "draw_s": time.perf_counter() - t, "driver_peak_mb": peak_mb()}


def draw(root: str, alpha: float, cap: int) -> dict:
    import ray

    from instructdiff_ray.config import build_config
    from instructdiff_ray.corpus import plan_shards
    from instructdiff_ray.warmup import collect, count_and_digest, draw_rows

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    cfg = build_config({"out": str(Path(root) / "out"), "data": {"paths": [root], "preset": "qa"},
                        "model": {"base": "unused"}, "progress": "off", "warmup": {"alpha": alpha, "max_samples": cap}})
    out = {}
    t = time.perf_counter()
    shards = plan_shards(cfg.data)
    out["plan_s"], out["shards"], out["after_plan_mb"] = time.perf_counter() - t, len(shards), peak_mb()
    digests = []
    for _ in range(2):
        t = time.perf_counter()
        d = draw_rows(shards, cfg.warmup)
        out["draw_s"] = time.perf_counter() - t
        t = time.perf_counter()
        samples = collect(cfg, shards, draw=d)
        ray.wait(samples.parts, num_returns=len(samples.parts))
        out["read_s"], out["read_units"] = time.perf_counter() - t, len(samples.parts)
        digests.append(count_and_digest(samples))
    out["samples"], out["identical"] = digests[0][0], digests[0] == digests[1]
    out["driver_peak_mb"] = peak_mb()
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        fn = {"baseline": lambda: baseline(int(sys.argv[3]), float(sys.argv[4])),
              "draw": lambda: draw(sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))}[sys.argv[2]]
        print(json.dumps(fn()))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--max-samples", type=int, default=10_000)
    ap.add_argument("--dir", help="where to write the corpus (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t = time.perf_counter()
        write_corpus(Path(tmp), args.rows)
        print(f"wrote {args.rows:,} rows in {time.perf_counter() - t:.0f} s")

        def run(*a: str) -> dict:
            res = subprocess.run([sys.executable, __file__, "--child", *a], capture_output=True, text=True)
            if res.returncode:
                sys.exit(res.stderr[-3000:])
            return json.loads(res.stdout.strip().splitlines()[-1])

        base = run("baseline", str(args.rows), str(args.alpha))
        print(f"baseline (set of ⌊α·N⌋ ordinals): {base['drawn']:,} drawn in {base['draw_s']:.1f} s, "
              f"driver peak {base['driver_peak_mb']:,.0f} MB")
        d = run("draw", tmp, str(args.alpha), str(args.max_samples))
        print(f"per read unit: plan {d['plan_s']:.2f} s ({d['shards']:,} shards, driver {d['after_plan_mb']:,.0f} MB), "
              f"draw {d['draw_s']:.3f} s, read {d['samples']:,} samples from {d['read_units']} read units in "
              f"{d['read_s']:.1f} s; two draws identical: {d['identical']}; driver peak {d['driver_peak_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
