"""Scoring throughput of both engines (hf, vllm) vs the authors' scoring loop.

Prints tokens/s per model pass and the fraction of this machine's measured matmul peak
(fp32 and bf16), for SmolLM2-135M on the same GSM8K samples: the bare engines (each in an
identical Ray actor, medians of repeated runs), the whole scoring pipeline per engine (base +
LoRA warmup, Ray Data), and the authors' style of loop (batch size 1, fp16, no inference mode,
full-vocabulary logits) measured in the same run as the baseline.

    python benchmarks/bench_scoring.py --samples 500 --baseline-samples 100
    python benchmarks/bench_scoring.py --engines hf        # without vLLM installed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 7) -> float:
    """Median GFLOP/s of an n×n matmul on all cores."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def tokenized(model_dir: str, n: int):
    from instructdiff_ray.config import DataConfig, TemplateConfig
    from instructdiff_ray.corpus import plan_shards, read_shard
    from instructdiff_ray.models import load_tokenizer
    from instructdiff_ray.template import tokenize_samples

    cfg = DataConfig(paths=[str(GSM8K)], limit=n, shard_rows=n)
    toks = tokenize_samples(read_shard(plan_shards(cfg)[0], cfg), TemplateConfig(), load_tokenizer(model_dir))
    return [t.input_ids for t in toks], [t.response_mask for t in toks]


def authors_loop(model_dir: str, ids, masks) -> tuple[float, int]:
    """Batch size 1, fp16 weights, autograd on, full logits for every position (their scoring loop)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16).eval()
    tokens = 0
    t = time.perf_counter()
    for x, m in zip(ids, masks):
        logits = model(torch.tensor([x])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        pos = torch.tensor([j for j, v in enumerate(m) if v])
        _ = -(logp[pos - 1].gather(-1, torch.tensor(x)[pos][:, None])).mean()
        _ = -(logp[pos - 1].exp() * logp[pos - 1]).sum(-1).mean()
        tokens += len(x)
    return time.perf_counter() - t, tokens


def engine_host(ray, threads: int):
    """Both engines are measured in the same kind of process: a Ray actor with `threads` CPUs
    (vLLM must not run in the driver: it can abort at interpreter exit)."""

    @ray.remote(num_cpus=threads)
    class EngineHost:
        def __init__(self, name: str, model_dir: str, settings):
            from instructdiff_ray.engines import make_engine

            t = time.perf_counter()
            self.engine = make_engine(name, model_dir, None, settings)
            self.start_s = time.perf_counter() - t

        def run(self, ids, masks) -> tuple[int, float, float]:
            r = self.engine.score(ids, masks, "base")
            assert not r.errors, r.errors
            return r.tokens, r.seconds, self.start_s

    return EngineHost


def bench_engine(ray, name: str, model_dir: str, dtype: str, args, ids, masks) -> dict:
    from instructdiff_ray.engines.base import EngineSettings

    settings = EngineSettings(dtype=dtype, device="cpu", threads=args.threads, max_batch_tokens=args.batch_tokens,
                              max_batch_size=args.batch_size, max_model_len=2048, passes=("base",),
                              max_num_batched_tokens=args.vllm_batched_tokens, max_num_seqs=args.vllm_seqs,
                              enforce_eager=not args.vllm_compile)
    host = engine_host(ray, args.threads).remote(name, model_dir, settings)
    try:
        _, _, start_s = ray.get(host.run.remote(ids[:16], masks[:16]))  # load + warm up kernels
        runs = [ray.get(host.run.remote(ids, masks)) for _ in range(args.repeats)]
    finally:
        ray.kill(host)
    return {"tokens_per_s": statistics.median(tok / sec for tok, sec, _ in runs), "start_s": start_s,
            "runs_tokens_per_s": [tok / sec for tok, sec, _ in runs]}


def bench_pipeline(name: str, model_dir: str, adapter: Path, tmp: str, args) -> dict:
    from instructdiff_ray.config import build_config
    from instructdiff_ray.pipeline import score_corpus

    cfg = build_config({
        "out": f"{tmp}/scores-{name}", "data": {"paths": [str(GSM8K)], "limit": args.samples, "shard_rows": 100},
        "model": {"base": model_dir, "device": "cpu"}, "progress": "off",
        "engine": {"name": name, "threads": args.threads, "max_batch_tokens": args.batch_tokens,
                   "max_batch_size": args.batch_size, "max_num_batched_tokens": args.vllm_batched_tokens,
                   "max_num_seqs": args.vllm_seqs, "enforce_eager": not args.vllm_compile},
    })
    t = time.perf_counter()
    s = score_corpus(cfg, cfg.out, warmup=str(adapter))
    wall = time.perf_counter() - t
    return {"wall_s": wall, "tokens_per_s_wall_both_passes": (s.base_tokens + s.warmup_tokens) / wall,
            "base_pass_tokens_per_s": s.base_tokens / s.base_seconds,
            "warmup_pass_tokens_per_s": s.warmup_tokens / s.warmup_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--baseline-samples", type=int, default=100, help="prefix of the same samples for the slow baseline")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch-tokens", type=int, default=2048, help="hf: padded tokens per batch")
    ap.add_argument("--batch-size", type=int, default=8, help="hf: rows per batch")
    ap.add_argument("--vllm-batched-tokens", type=int, default=2048, help="vllm: max_num_batched_tokens")
    ap.add_argument("--vllm-seqs", type=int, default=64, help="vllm: max_num_seqs")
    ap.add_argument("--vllm-compile", action="store_true", help="vllm: torch.compile instead of eager (slow start)")
    ap.add_argument("--engine-samples", type=int, default=150, help="prefix used for the repeated bare-engine runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    engines = [e for e in args.engines.split(",") if e]
    dtypes = [d for d in args.dtypes.split(",") if d]

    import ray

    from instructdiff_ray.models import resolve_model

    model_dir = resolve_model("smollm2")
    params = 134_515_008
    peak = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    ids, masks = tokenized(model_dir, args.samples)
    n_tok = sum(map(len, ids))
    res: dict = {"samples": args.samples, "tokens_per_pass": n_tok, "threads": args.threads,
                 "matmul_peak_gflops": peak, "params": params, "engines": {}, "pipeline": {}}

    def mfu(tok_s: float, dtype: str) -> float:
        return 2 * params * tok_s / (peak[dtype] * 1e9)

    ray.init(num_cpus=args.threads, include_dashboard=False, logging_level="WARNING")
    e_ids, e_masks = ids[: args.engine_samples], masks[: args.engine_samples]
    for name in engines:
        for dtype in dtypes:
            r = bench_engine(ray, name, model_dir, dtype, args, e_ids, e_masks)
            r.update(mfu_vs_own_dtype_peak=mfu(r["tokens_per_s"], dtype), mfu_vs_fp32_peak=mfu(r["tokens_per_s"], "float32"))
            res["engines"][f"{name}_{dtype}"] = r

    b_ids, b_masks = ids[: args.baseline_samples], masks[: args.baseline_samples]
    secs, tok = authors_loop(model_dir, b_ids, b_masks)
    res["authors_loop_fp16_bs1"] = {"samples": len(b_ids), "tokens_per_s": tok / secs, "mfu_vs_fp32_peak": mfu(tok / secs, "float32")}

    if not args.skip_pipeline:
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny

        with tempfile.TemporaryDirectory() as tmp:
            adapter = tiny.build_lora_adapter(Path(model_dir), Path(tmp) / "adapter")
            for name in engines:
                res["pipeline"][name] = bench_pipeline(name, model_dir, adapter, tmp, args)

    base = res["authors_loop_fp16_bs1"]["tokens_per_s"]
    print(f"\nSmolLM2-135M, GSM8K: {args.engine_samples} samples x {args.repeats} (engines), {args.samples} (pipelines)")
    print(f"matmul peak: fp32 {peak['float32']:.0f} GFLOP/s, bf16 {peak['bfloat16']:.0f} GFLOP/s ({args.threads} threads)")
    print(f"{'what':48s} {'tok/s':>9s} {'x base':>7s} {'MFU fp32':>9s} {'MFU own':>8s} {'start s':>8s}")
    label = "authors' loop (bs 1, fp16, autograd on)"
    print(f"{label:48s} {base:9.0f} {1:7.1f} {res['authors_loop_fp16_bs1']['mfu_vs_fp32_peak']:9.2f}")
    for key, r in res["engines"].items():
        name, dtype = key.split("_", 1)
        print(f"{f'{name} engine, {dtype} (Ray actor)':48s} {r['tokens_per_s']:9.0f} {r['tokens_per_s'] / base:7.1f} "
              f"{r['mfu_vs_fp32_peak']:9.2f} {r['mfu_vs_own_dtype_peak']:8.2f} {r['start_s']:8.1f}")
    for name, p in res["pipeline"].items():
        for label, key in (("base pass", "base_pass_tokens_per_s"), ("warmup pass", "warmup_pass_tokens_per_s"),
                           ("wall clock, both passes", "tokens_per_s_wall_both_passes")):
            tok_s = p[key]
            print(f"{f'pipeline {name} fp32, {label}':48s} {tok_s:9.0f} {tok_s / base:7.1f} {mfu(tok_s, 'float32'):9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())
