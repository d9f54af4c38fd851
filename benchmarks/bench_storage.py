"""Corpus I/O on an object store against the same file on local disk: planning and reading a
JSONL corpus (what a `score` run does before any model sees a row), with the bytes the store
served per corpus byte.

A local S3-compatible server (moto, in this process) serves the file; a WSGI layer in front of it
counts the bytes of every response. moto copies a whole object out of its store for every
range request, so S3 MB/s here is bound by the test server; the bytes per corpus byte are what
a real store would serve. `--legacy-mb` also measures, on a smaller file, reads through
fsspec's default buffered file (per-line readline with a 50 MiB read-ahead cache), which is
how the corpus was read before.

    python benchmarks/bench_storage.py --mb 1024 --files 16 --legacy-mb 16
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_corpus(folder: Path, mb: int, files: int) -> int:
    """GSM8K rows repeated with unique ids, `mb` MiB in `files` JSONL files; returns the row count."""
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines() if line.strip()]
    folder.mkdir(parents=True)
    n = 0
    for i in range(files):
        target, written = (mb << 20) // files, 0
        with open(folder / f"part-{i:03d}.jsonl", "w") as f:
            while written < target:
                line = json.dumps({"id": f"r{n}", **rows[n % len(rows)]}) + "\n"
                f.write(line)
                written += len(line.encode())
                n += 1
    return n


def measure(url: str, shard_rows: int, layer=None) -> dict[str, float]:
    from instructdiff_ray.config import DataConfig
    from instructdiff_ray.corpus import iter_unit, load_plan, read_units

    cfg = DataConfig(paths=[url], shard_rows=shard_rows)
    if layer:
        layer.reset()
    t = time.perf_counter()
    plan = load_plan(cfg, None)
    plan_s = time.perf_counter() - t
    plan_bytes = layer.bytes_out if layer else 0
    if layer:
        layer.reset()
    t, rows = time.perf_counter(), 0
    for unit in read_units(plan.shards):
        for _, raw in iter_unit(unit):
            rows += len(raw)
    read_s = time.perf_counter() - t
    return {"plan_s": plan_s, "read_s": read_s, "rows": rows, "shards": len(plan.shards),
            "plan_bytes": plan_bytes, "read_bytes": layer.bytes_out if layer else 0}


def legacy_open():
    """readers.io.open_file as it was: fsspec's default file (block cache with read-ahead, per-line readline)."""
    import contextlib

    import fsspec

    from instructdiff_ray import sources

    @contextlib.contextmanager
    def _open(path, buffer=None):
        with fsspec.open(sources.local(path), "rb", compression="infer") as f:
            yield f
    return _open


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=1024, help="corpus size in MiB")
    ap.add_argument("--legacy-mb", type=int, default=0, help="also time the old reader on a corpus of this size")
    ap.add_argument("--files", type=int, default=16, help="JSONL files the corpus is split into")
    ap.add_argument("--shard-rows", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement (medians are printed)")
    args = ap.parse_args()

    port = free_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    sys.path.insert(0, str(ROOT / "tests"))
    import s3fs
    from s3server import Server

    import instructdiff_ray.readers.io as reader_io

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = Server(port).start()
    s3 = s3fs.S3FileSystem()
    s3.mkdir("bench")
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    import shutil
    results = []
    try:
        cases = [("current", args.mb, args.files, None)]
        if args.legacy_mb:
            cases.append(("legacy", args.legacy_mb, 1, legacy_open()))
        for name, mb, files, opener in cases:
            local = tmp / f"corpus-{mb}"
            if not local.exists():
                t = time.perf_counter()
                make_corpus(local, mb, files)
                s3.put(str(local), f"bench/corpus-{mb}", recursive=True)
                print(f"# {name}: {mb} MiB corpus in {files} files written and uploaded in {time.perf_counter() - t:.0f} s",
                      file=sys.stderr, flush=True)
            size = sum(p.stat().st_size for p in local.iterdir())
            saved = reader_io.open_file
            if opener:
                reader_io.open_file = opener
            try:
                runs = {"local": [], "s3": []}
                for _ in range(args.repeat):
                    runs["local"].append(measure(str(local), args.shard_rows))
                    runs["s3"].append(measure(f"s3://bench/corpus-{mb}", args.shard_rows, server.layer))
            finally:
                reader_io.open_file = saved
            med = {where: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for where, rs in runs.items()}
            lo, s3r = med["local"], med["s3"]
            row = {"reader": name, "corpus_mb": round(size / 2**20, 1), "files": files, "rows": int(lo["rows"]), "shards": int(lo["shards"]),
                   "plan_s_local": round(lo["plan_s"], 2), "plan_s_s3": round(s3r["plan_s"], 2),
                   "plan_mb_per_s_local": round(size / 2**20 / lo["plan_s"], 1),
                   "plan_mb_per_s_s3": round(size / 2**20 / s3r["plan_s"], 1),
                   "plan_s3_vs_local": round(s3r["plan_s"] / lo["plan_s"], 2),
                   "read_mb_per_s_local": round(size / 2**20 / lo["read_s"], 1),
                   "read_mb_per_s_s3": round(size / 2**20 / s3r["read_s"], 1),
                   "bytes_per_corpus_byte_plan": round(s3r["plan_bytes"] / size, 3),
                   "bytes_per_corpus_byte_read": round(s3r["read_bytes"] / size, 3),
                   "bytes_per_corpus_byte_total": round((s3r["plan_bytes"] + s3r["read_bytes"]) / size, 3)}
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| reader | corpus MiB (files) | plan s (local / S3) | plan S3/local | read MB/s (local / S3) | store bytes per corpus byte (plan + read) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['reader']} | {r['corpus_mb']} ({r['files']}) | {r['plan_s_local']} / {r['plan_s_s3']} | {r['plan_s3_vs_local']}x | "
              f"{r['read_mb_per_s_local']} / {r['read_mb_per_s_s3']} | {r['bytes_per_corpus_byte_plan']} + "
              f"{r['bytes_per_corpus_byte_read']} = {r['bytes_per_corpus_byte_total']} |")


if __name__ == "__main__":
    main()
