"""Scoring throughput: the whole pipeline and the bare engine vs the authors' scoring loop.

Prints tokens/s per model pass and the fraction of this machine's measured matmul peak
(fp32 and bf16), for SmolLM2-135M on GSM8K samples, with the authors' style of loop
(batch size 1, fp16, no inference mode, full-vocabulary logits) measured in the same run.

    python benchmarks/bench_scoring.py --samples 500 --baseline-samples 100
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
    from instructdiff_ray.engines import load_tokenizer
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--baseline-samples", type=int, default=100, help="prefix of the same samples for the slow baseline")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--engine-samples", type=int, default=150, help="prefix used for the repeated bare-engine runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from instructdiff_ray.engines import EngineSettings, HFEngine, resolve_model

    model_dir = resolve_model("smollm2")
    params = 134_515_008
    peak = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    ids, masks = tokenized(model_dir, args.samples)
    n_tok = sum(map(len, ids))
    res: dict = {"samples": args.samples, "tokens_per_pass": n_tok, "threads": args.threads,
                 "matmul_peak_gflops": peak, "params": params}

    def mfu(tok_s: float, dtype: str) -> float:
        return 2 * params * tok_s / (peak[dtype] * 1e9)

    for dtype in ("float32", "bfloat16"):
        eng = HFEngine(model_dir, None, EngineSettings(dtype=dtype, threads=args.threads, max_batch_tokens=args.batch_tokens, max_batch_size=args.batch_size))
        eng.score(ids[:16], masks[:16], "base")  # warm up kernels
        e_ids, e_masks = ids[: args.engine_samples], masks[: args.engine_samples]
        runs = [eng.score(e_ids, e_masks, "base") for _ in range(args.repeats)]
        tok_s = statistics.median(r.tokens / r.seconds for r in runs)
        res[f"engine_{dtype}"] = {"tokens_per_s": tok_s, "mfu_vs_own_dtype_peak": mfu(tok_s, dtype),
                                  "mfu_vs_fp32_peak": mfu(tok_s, "float32")}

    b_ids, b_masks = ids[: args.baseline_samples], masks[: args.baseline_samples]
    secs, tok = authors_loop(model_dir, b_ids, b_masks)
    res["authors_loop_fp16_bs1"] = {"samples": len(b_ids), "tokens_per_s": tok / secs, "mfu_vs_fp32_peak": mfu(tok / secs, "float32")}

    if not args.skip_pipeline:
        import sys as _sys

        _sys.path.insert(0, str(ROOT / "tests"))
        import tiny

        from instructdiff_ray.config import build_config
        from instructdiff_ray.pipeline import score_corpus

        with tempfile.TemporaryDirectory() as tmp:
            adapter = tiny.build_lora_adapter(Path(model_dir), Path(tmp) / "adapter")
            cfg = build_config({
                "out": f"{tmp}/scores", "data": {"paths": [str(GSM8K)], "limit": args.samples, "shard_rows": 100},
                "model": {"base": model_dir, "device": "cpu"}, "progress": "off",
                "engine": {"threads": args.threads, "max_batch_tokens": args.batch_tokens, "max_batch_size": args.batch_size},
            })
            t = time.perf_counter()
            s = score_corpus(cfg, cfg.out, warmup=str(adapter))
            wall = time.perf_counter() - t
        res["pipeline_fp32_base_plus_lora_warmup"] = {
            "wall_s": wall,
            "tokens_per_s_wall_both_passes": (s.base_tokens + s.warmup_tokens) / wall,
            "base_pass_tokens_per_s": s.base_tokens / s.base_seconds,
            "warmup_pass_tokens_per_s": s.warmup_tokens / s.warmup_seconds,
            "base_pass_mfu_fp32": mfu(s.base_tokens / s.base_seconds, "float32"),
        }
    base = res["authors_loop_fp16_bs1"]["tokens_per_s"]
    print(f"\nmatmul peak: fp32 {peak['float32']:.0f} GFLOP/s, bf16 {peak['bfloat16']:.0f} GFLOP/s ({args.threads} threads)")
    print(f"{'what':44s} {'tok/s':>9s} {'x base':>7s} {'MFU fp32':>9s}")
    rows = [("authors' loop (bs 1, fp16, autograd on)", base, res["authors_loop_fp16_bs1"]["mfu_vs_fp32_peak"])]
    for d in ("float32", "bfloat16"):
        rows.append((f"engine forward, {d}", res[f"engine_{d}"]["tokens_per_s"], res[f"engine_{d}"]["mfu_vs_fp32_peak"]))
    if "pipeline_fp32_base_plus_lora_warmup" in res:
        p = res["pipeline_fp32_base_plus_lora_warmup"]
        rows.append(("pipeline fp32, base pass (in actor)", p["base_pass_tokens_per_s"], p["base_pass_mfu_fp32"]))
        rows.append(("pipeline fp32, LoRA warmup pass (in actor)", p["warmup_pass_tokens_per_s"], mfu(p["warmup_pass_tokens_per_s"], "float32")))
        rows.append(("pipeline fp32, wall clock, both passes", p["tokens_per_s_wall_both_passes"], mfu(p["tokens_per_s_wall_both_passes"], "float32")))
    for name, tok_s, m in rows:
        print(f"{name:44s} {tok_s:9.0f} {tok_s / base:7.1f} {m:9.2f}")
    print(f"bf16 engine vs bf16 peak: {res['engine_bfloat16']['mfu_vs_own_dtype_peak']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())
