"""Selection at scale: N synthetic score rows from Parquet, in one process and by the distributed
search, timed, with peak memory, and the two picks compared.

Writes a scores directory (1M-row shard files following the scoring output contract; sample_ids of
20-40 characters, 2% repeated, 2% not ok; ΔNLL and ΔH rounded to 3 decimals, so ties are
everywhere), then runs each mode in a fresh subprocess:
  - memory: `select(load_scores(dir))`, the whole table in one process (its peak RSS);
  - search: `search_select(dir)` on a fresh local Ray (2 CPUs): the driver's peak RSS, and the
    largest resident and private (USS) memory any Ray worker reached, sampled every 0.5 s.
Each then writes the selection as a run does (selected_ids.txt and selection.parquet; no export) and
prints the digest of the ids file: equal digests are the same pick in the same order.

    python benchmarks/bench_selection.py --rows 10000000 --modes memory search
    python benchmarks/bench_selection.py --rows 100000000 --modes search --repeats 1 --dir /work
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PER_FILE = 1_000_000


def write_scores(out: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for s, lo in enumerate(range(0, rows, PER_FILE)):
        per = min(PER_FILE, rows - lo)
        number = np.arange(lo, lo + per)
        repeat = rng.random(per) < 0.02
        number[repeat] = rng.integers(0, max(lo, 1), int(repeat.sum()))  # an id seen before
        digits = pc.utf8_lpad(pc.cast(pa.array(rng.integers(0, 10**12, per)), pa.string()), 12, "0")
        lengths = rng.integers(0, 14, per)  # ids of 22 to 35 characters
        order = np.argsort(lengths, kind="stable")
        cuts = np.searchsorted(lengths[order], np.arange(15))
        suffix = pa.concat_arrays([pc.utf8_slice_codeunits(digits.take(pa.array(order[cuts[n]:cuts[n + 1]])), 0, n)
                                   for n in range(14)]).take(pa.array(np.argsort(order)))
        ids = pc.binary_join_element_wise("om2/train/", pc.utf8_lpad(pc.cast(pa.array(number), pa.string()), 12, "0"),
                                          suffix, "")
        status = pa.array(np.where(rng.random(per) < 0.02, "too_long", "ok"))
        ok = pc.equal(status, "ok")
        f = lambda v: pc.if_else(ok, pa.array(np.round(v, 3)), pa.scalar(None, pa.float64()))  # noqa: E731
        t = pa.table({
            "sample_id": ids, "source_file": pa.array(["corpus.jsonl"] * per), "source_row": np.arange(lo, lo + per),
            "shard_id": np.full(per, s, dtype=np.int32), "n_prompt_tokens": rng.integers(20, 300, per).astype(np.int32),
            "n_response_tokens": rng.integers(1, 500, per).astype(np.int32),
            "base_nll": f(rng.normal(1.5, .5, per)), "base_entropy": f(rng.normal(2, .5, per)),
            "warmup_nll": f(rng.normal(1, .5, per)), "warmup_entropy": f(rng.normal(2, .5, per)),
            "delta_nll": f(rng.normal(.5, .4, per)), "delta_entropy": f(rng.normal(-.1, .2, per)),
            "status": status, "reason": pa.array([""] * per),
        })
        pq.write_table(t, out / f"shard-{s:08d}.parquet")


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _anonymous(pid: int) -> int:
    """A process's anonymous memory (its heap: what it allocated itself), in bytes. Private (USS)
    also counts pages of Ray's shared-memory object store that only this process has touched, which
    a long-lived worker accumulates over every task it ran."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


def _watch_workers(peak: dict, stop: threading.Event) -> None:
    """Peak resident, private (USS) and anonymous memory of any Ray worker, and this process's
    private memory (its resident figure also counts the object store pages it maps)."""
    import os

    import psutil

    me = psutil.Process(os.getpid())
    while not stop.is_set():
        peak["driver_uss"] = max(peak.get("driver_uss", 0), me.memory_full_info().uss)
        for p in psutil.process_iter(["cmdline"]):
            try:
                if not p.info["cmdline"] or not p.info["cmdline"][0].startswith("ray::"):
                    continue
                mem = p.memory_full_info()
                peak["rss"] = max(peak.get("rss", 0), mem.rss)
                peak["uss"] = max(peak.get("uss", 0), mem.uss)
                peak["anon"] = max(peak.get("anon", 0), _anonymous(p.pid))
            except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
                pass
        stop.wait(0.5)


def child(mode: str, scores: str) -> None:
    from instructdiff_ray.config import SelectionConfig
    from instructdiff_ray.selection import write_selection

    cfg = SelectionConfig()
    t0 = time.perf_counter()
    out: dict = {"mode": mode}
    if mode == "memory":
        from instructdiff_ray.selection import load_scores, select

        sel = select(load_scores(scores), cfg)  # every column, as the run's selection task reads them
    else:
        import ray

        from instructdiff_ray.selection_search import search_select

        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        peak: dict = {}
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_workers, args=(peak, stop), daemon=True)
        watcher.start()
        sel = search_select(scores, cfg)
        out["search_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=Path(scores).parent) as written:
        paths = write_selection(sel, written, export="never")
        digest = _digest(paths["ids"])
    if mode == "search":
        stop.set()
        watcher.join()
        out |= {"driver_peak_uss_gb": peak.get("driver_uss", 0) / 2**30, "worker_peak_rss_gb": peak.get("rss", 0) / 2**30, "worker_peak_uss_gb": peak.get("uss", 0) / 2**30,
                "worker_peak_anon_gb": peak.get("anon", 0) / 2**30,
                "partitions": sel.stats["search"]["partitions"], "rounds": sel.stats["search"]["rounds"]}
    out |= {"total_s": time.perf_counter() - t0, "rows": sel.stats["rows_total"], "selected": sel.stats["selected_rows"],
            "driver_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "ids_sha256": digest}
    print(json.dumps(out))


def main() -> None:
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["memory"], choices=["memory", "search"])
    ap.add_argument("--dir", help="where to write the score files (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t = time.perf_counter()
        write_scores(Path(tmp), args.rows)
        print(f"wrote {args.rows:,} score rows in {time.perf_counter() - t:.1f}s", flush=True)
        digests = {}
        for mode in args.modes:
            runs = []
            for _ in range(args.repeats):
                res = subprocess.run([sys.executable, __file__, "--child", mode, tmp], capture_output=True, text=True)
                if res.returncode:
                    sys.exit(res.stderr[-3000:])
                runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(runs[-1], flush=True)
            med = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]
            digests[mode] = {r["ids_sha256"] for r in runs}
            extra = (f" ({med['driver_peak_uss_gb']:.2f} GB private), largest worker {med['worker_peak_rss_gb']:.2f} GB resident / {med['worker_peak_uss_gb']:.2f} GB "
                     f"private / {med['worker_peak_anon_gb']:.2f} GB anonymous (heap), {med['partitions']} partitions, {med['rounds']} rounds" if mode == "search" else "")
            print(f"{mode}: median of {len(runs)}: {med['rows']:,} rows selected and written in {med['total_s']:.1f} s "
                  f"(spread {statistics.pstdev([r['total_s'] for r in runs]):.1f} s), driver peak {med['driver_peak_rss_gb']:.2f} GB"
                  f"{extra}, {med['selected']:,} selected", flush=True)
        if len(digests) == 2:
            print(f"identical ids in identical order: {digests['memory'] == digests['search'] and len(digests['memory']) == 1}")


if __name__ == "__main__":
    main()
