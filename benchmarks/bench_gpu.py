"""Scoring throughput of both engines and both placements on real model shapes (random weights).

Llama-3-8B and Qwen2.5-7B shapes in bf16 (vLLM `load_format="dummy"`, transformers
`from_config`), synthetic samples of a 300-token prompt and a 200-token response (lengths drawn
±20%), scored under the base and the warmup model as the scoring actor does:

- together: one process holds both models (the vllm engines split the memory);
- pools: one model per process, the base then the warmup (what each pool's actor holds; the hf
  engine's warmup actor also holds the base, which a LoRA warmup shares).

Each configuration runs in a fresh subprocess. Printed per row: engine start seconds, tokens/s
per model pass (all tokens of the sample, as vLLM counts them), MFU against the GPU's dense bf16
peak (2 x parameters x tokens/s; H100/H200 989 TFLOP/s), and peak GPU memory.

    python benchmarks/bench_gpu.py                                   # on a GPU machine
    python benchmarks/bench_gpu.py --tiny --device cpu --samples 8   # the CPU smoke test (tests/)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "llama-3-8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
                   "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "tiny": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
             "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 64, "vocab_size": 512, "max_position_embeddings": 4096, "tie_word_embeddings": False},
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}


def samples(n: int, prompt: int, response: int, vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for _ in range(n):
        p = int(prompt * rng.uniform(0.8, 1.2))
        r = int(response * rng.uniform(0.8, 1.2))
        ids.append(rng.integers(10, vocab - 10, p + r).tolist())
        masks.append([False] * p + [True] * r)
    return ids, masks


def child(spec: dict) -> dict:
    """One configuration in this process: start its engine(s), score both passes, measure."""
    import instructdiff_ray  # noqa: F401 - first: hides unloadable torch extensions
    import torch

    from instructdiff_ray.engines import make_engine
    from instructdiff_ray.engines.base import EngineSettings
    from instructdiff_ray.engines.memory import param_count

    model_dir, device = spec["model_dir"], spec["device"]
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    ids, masks = samples(spec["samples"], spec["prompt"], spec["response"], cfg["vocab_size"])
    settings = dict(dtype=spec["dtype"], device=device, load_format="dummy", max_model_len=spec["max_len"],
                    max_batch_tokens=spec["batch_tokens"], max_batch_size=spec["batch_size"], threads=spec.get("threads"),
                    enforce_eager=device == "cpu", max_num_batched_tokens=spec["batch_tokens"],
                    max_num_seqs=spec["batch_size"])
    passes = {"together": [("base", "warmup")], "pools": [("base",), ("warmup",)]}[spec["placement"]]
    rows = []
    for group in passes:
        t = time.perf_counter()
        engine = make_engine(spec["engine"], model_dir, model_dir if "warmup" in group else None,
                             EngineSettings(passes=group, **settings))
        start_s = time.perf_counter() - t
        engine.score(ids[:2], masks[:2], group[0])  # warm-up (kernels, graphs)
        for which in group:
            res = engine.score(ids, masks, which)
            assert not res.errors, res.errors
            tps = res.tokens / res.seconds
            flops = 2 * param_count(cfg) * tps
            rows.append({"pass": which, "tokens_per_s": round(tps, 1), "start_s": round(start_s, 1),
                         "mfu": round(flops / (spec["peak_tflops"] * 1e12), 4) if spec["peak_tflops"] else None})
        del engine
    mem = None
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        mem = {"max_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 1),
               "used_now_gb": round((total - free) / 2**30, 1)}
    return {**{k: spec[k] for k in ("shape", "engine", "placement", "dtype")}, "passes": rows, "gpu_memory": mem}


def peak_tflops(device: str, given: float | None) -> float | None:
    if given or device != "cuda":
        return given
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llama-3-8b", "qwen2.5-7b"])
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama shape (the CPU smoke test)")
    ap.add_argument("--engines", nargs="+", default=["vllm", "hf"])
    ap.add_argument("--placements", nargs="+", default=["together", "pools"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--response", type=int, default=200)
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU (default: from its name)")
    ap.add_argument("--threads", type=int, help="CPU threads (cpu only)")
    args = ap.parse_args()
    shapes = ["tiny"] if args.tiny else args.shapes
    peak = peak_tflops(args.device, args.peak_tflops)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            model_dir = Path(tmp) / shape
            model_dir.mkdir()
            (model_dir / "config.json").write_text(json.dumps({**SHAPES[shape], "torch_dtype": args.dtype}))
            for engine in args.engines:
                for placement in args.placements:
                    spec = {"shape": shape, "engine": engine, "placement": placement, "dtype": args.dtype,
                            "model_dir": str(model_dir), "device": args.device, "samples": args.samples,
                            "prompt": args.prompt, "response": args.response, "peak_tflops": peak,
                            "max_len": 2048, "batch_tokens": 16384 if args.device == "cuda" else 2048,
                            "batch_size": 256 if args.device == "cuda" else 16, "threads": args.threads}
                    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                          capture_output=True, text=True)
                    if proc.returncode != 0:
                        print(json.dumps({**{k: spec[k] for k in ("shape", "engine", "placement")},
                                          "error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr else "?"}))
                        continue
                    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    print(json.dumps(results[-1]), flush=True)
    print(f"\n| shape | engine | placement | pass | tokens/s | MFU | engine start s |")
    print("|---|---|---|---|---:|---:|---:|")
    for r in results:
        for p in r["passes"]:
            mfu = f"{p['mfu']:.2f}" if p["mfu"] is not None else "-"
            print(f"| {r['shape']} | {r['engine']} | {r['placement']} | {p['pass']} | {p['tokens_per_s']:,.0f} | {mfu} | {p['start_s']} |")
    if results:
        print(f"median tokens/s per pass: {statistics.median(p['tokens_per_s'] for r in results for p in r['passes']):,.0f}")


if __name__ == "__main__":
    main()
