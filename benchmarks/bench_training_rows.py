"""What a training worker holds: the tokenized training rows read on demand from the object store,
against the previous way (every sample resolved and tokenized in the worker) measured in the same run.

Writes N GSM8K rows (cycled, each question made unique) as Parquet, reads them all as training
samples (tasks, into the object store), then, each in a fresh one-task worker:
  - rows: tokenize by tasks (one table per read unit), then a worker builds its reader, shuffles an
    epoch and fetches its first --steps micro-batches of --batch rows (what training steps fetch);
  - baseline: a worker resolves every sample and tokenizes them all (what each worker did before).
Prints wall times, tokens/s, and each measured worker's heap (anonymous memory, sampled in the
worker; object-store pages it maps are shared, not counted) at its start and peak, and peak RSS.

    python benchmarks/bench_training_rows.py --rows 200000 --tokenizer ../shared/data/qwen2_tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"
PER_FILE = 50_000


def write_corpus(root: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    for f, lo in enumerate(range(0, rows, PER_FILE)):
        part = range(lo, min(lo + PER_FILE, rows))
        pq.write_table(pa.table({"question": [f"({r}) {src[r % len(src)]['question']}" for r in part],
                                 "answer": [src[r % len(src)]["answer"] for r in part]}),
                       root / f"part-{f:04d}.parquet", row_group_size=10_000)


def _reader_steps(rows, steps: int, batch: int, seed: int) -> dict:
    from instructdiff_ray.warmup import RowReader, global_batches

    t = time.perf_counter()
    reader = RowReader(rows)
    built = time.perf_counter() - t
    t = time.perf_counter()
    batches = global_batches(len(reader), batch, seed, 0)  # an epoch's order, as the training loop makes it
    shuffled = time.perf_counter() - t
    t = time.perf_counter()
    tokens = 0
    for b in batches[:steps]:
        ids, _masks = reader.take(b)
        tokens += sum(len(x) for x in ids)
    return {"rows": len(reader), "build_s": built, "shuffle_s": shuffled,
            "take_ms": 1000 * (time.perf_counter() - t) / steps, "tokens": tokens}


def _resolve_and_tokenize(samples, template, tokenizer: str) -> dict:
    from instructdiff_ray.models import load_tokenizer
    from instructdiff_ray.template import tokenize_samples

    t = time.perf_counter()
    toks = [x for x in tokenize_samples(samples.resolve(), template, load_tokenizer(tokenizer)) if x.status == "ok"]
    return {"rows": len(toks), "seconds": time.perf_counter() - t, "tokens": sum(len(x.input_ids) for x in toks)}


def _heap() -> int:
    """This process's anonymous memory (its heap), bytes: object-store pages it maps are not counted."""
    with open("/proc/self/smaps_rollup") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith("Anonymous:")), 0)


def _sampled(fn, *args) -> dict:
    """fn(*args) with this process's heap sampled every 50 ms: at the start and at its peak."""
    import resource

    start, peak, stop = _heap(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _heap())
            stop.wait(0.05)
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out = fn(*args)
    stop.set()
    watcher.join()
    return out | {"heap_start_gb": start / 2**30, "heap_peak_gb": max(peak[0], _heap()) / 2**30,
                  "rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def measure(fn, *args) -> dict:
    """fn(*args) in a fresh worker that runs only it (its memory is its own): a runtime env of its
    own keeps Ray from handing it a worker that ran earlier tasks."""
    import uuid

    import ray

    fresh = {"env_vars": {"BENCH_WORKER": uuid.uuid4().hex}}
    return ray.get(ray.remote(num_cpus=1, max_calls=1, runtime_env=fresh)(_sampled).remote(fn, *args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "data" / "qwen2_tokenizer"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--dir", help="where to write the corpus (default: a temporary directory)")
    args = ap.parse_args()
    import ray

    from instructdiff_ray.config import build_config
    from instructdiff_ray.corpus import plan_shards
    from instructdiff_ray.warmup import collect, draw_rows, tokenize

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        write_corpus(Path(tmp), args.rows)
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, logging_level="ERROR")
        cfg = build_config({"out": str(Path(tmp) / "out"), "data": {"paths": [tmp], "preset": "qa"},
                            "model": {"base": args.tokenizer}, "progress": "off", "warmup": {"count": args.rows}})
        shards = plan_shards(cfg.data)
        t = time.perf_counter()
        samples = collect(cfg, shards, draw=draw_rows(shards, cfg.warmup))
        ray.wait(samples.parts, num_returns=len(samples.parts))
        print(f"read {args.rows:,} rows into {len(samples.parts)} parts in {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        rows = tokenize(cfg, args.tokenizer, samples, here=False)
        tok_s = time.perf_counter() - t
        out = measure(_reader_steps, rows, args.steps, args.batch, 0)
        tokens = out["tokens"] / (args.steps * args.batch)
        print(json.dumps({"mode": "rows", "tokenize_s": tok_s, **out}), flush=True)
        print(f"rows: tokenized {len(rows):,} rows by {len(rows.parts)} tasks in {tok_s:.1f} s; the worker's reader "
              f"built in {out['build_s']:.2f} s, an epoch's shuffle in {out['shuffle_s']:.2f} s, {out['take_ms']:.2f} ms per micro-batch of {args.batch} "
              f"(~{tokens:.0f} tokens a row); worker heap {out['heap_start_gb']:.2f} GB at start, peak "
              f"{out['heap_peak_gb']:.2f} GB, peak RSS {out['rss_peak_gb']:.2f} GB", flush=True)
        if not args.skip_baseline:
            base = measure(_resolve_and_tokenize, samples, cfg.template, args.tokenizer)
            print(json.dumps({"mode": "baseline", **base}), flush=True)
            print(f"baseline: the worker resolved and tokenized {base['rows']:,} rows in {base['seconds']:.1f} s "
                  f"({base['tokens'] / base['seconds']:,.0f} tokens/s, one process); worker heap {base['heap_start_gb']:.2f} GB "
                  f"at start, peak {base['heap_peak_gb']:.2f} GB, peak RSS {base['rss_peak_gb']:.2f} GB", flush=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
