"""Warmup stage: fine-tune the base on a small calibration set to get the warmup model.

Same template and response-only loss as scoring (tokens outside the response mask carry no
loss). LoRA (peft) by default, full fine-tuning optional. One process on CPU or one GPU;
data-parallel with Ray Train's TorchTrainer when `warmup.num_workers > 1`. The vocabulary is
never resized, so base and warmup always share it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import fsspec
import numpy as np
import torch

from . import rundir
from .config import RunConfig
from .corpus import Sample, Shard, read_shard


@dataclass
class WarmupResult:
    out_dir: str
    adapter_dir: str | None  # peft adapter (LoRA only): the hf engine serves both passes from one base copy
    merged_dir: str  # full weights of the warmup model (what a second vLLM engine would load)
    samples: int
    steps: int
    seconds: float
    final_loss: float

    @property
    def scoring_model(self) -> str:
        return self.adapter_dir or self.merged_dir


def draw_rows(shards: list[Shard], alpha: float, count: int | None, seed: int) -> set[int]:
    """Seeded draw of ⌊α·N⌋ (or `count`) global row ordinals; warmup rows stay in the pool."""
    n = sum(s.n_rows for s in shards)
    k = min(n, count if count is not None else int(math.floor(alpha * n)))
    return set(np.random.default_rng(seed).choice(n, size=max(k, 1), replace=False).tolist())


def collect_samples(cfg: RunConfig, shards: list[Shard], ordinals: set[int] | None = None,
                    rows: dict[str, set[int]] | None = None) -> list[Sample]:
    """The ok samples at the given global ordinals, or at (file, row) positions; only shards
    that hold a wanted row are read."""
    wanted = np.array(sorted(ordinals or ()), dtype=np.int64)
    out, base = [], 0
    for shard in shards:
        lo, hi = np.searchsorted(wanted, [base, base + shard.n_rows])
        if hi > lo or (rows and shard.path in rows):
            hits = set(wanted[lo:hi].tolist())
            for i, s in enumerate(read_shard(shard, cfg.data)):
                hit = (base + i) in hits if ordinals else s.source_row in rows.get(shard.path, ())
                if hit and s.status == "ok":
                    out.append(s)
        base += shard.n_rows
    return out


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _loss(model, ids: list[list[int]], masks: list[list[bool]], device) -> torch.Tensor:
    """Mean cross-entropy over response tokens only; LM head applied at response positions."""
    width = max(len(x) for x in ids)
    inp = torch.zeros((len(ids), width), dtype=torch.long)
    attn = torch.zeros_like(inp)
    target = torch.zeros((len(ids), width), dtype=torch.bool)
    for r, (x, m) in enumerate(zip(ids, masks)):
        inp[r, : len(x)] = torch.tensor(x)
        attn[r, : len(x)] = 1
        target[r, : len(x)] = torch.tensor(m)
    inp, attn, target = inp.to(device), attn.to(device), target.to(device)
    core = model.module if hasattr(model, "module") else model
    hidden = core.get_decoder()(input_ids=inp, attention_mask=attn).last_hidden_state
    rows, cols = target.nonzero(as_tuple=True)
    logits = core.get_output_embeddings()(hidden[rows, cols - 1]).float()
    return torch.nn.functional.cross_entropy(logits, inp[rows, cols])


def train_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """The training loop; runs as a plain call or as a Ray Train worker (DDP when world > 1)."""
    from transformers import AutoModelForCausalLM

    from .engines import DTYPES, load_tokenizer
    from .template import tokenize_samples

    cfg: RunConfig = spec["cfg"]
    w = cfg.warmup
    world, rank, report = 1, 0, spec.get("on_step")
    if spec.get("ray_train"):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        world, rank = ctx.get_world_size(), ctx.get_world_rank()
    torch.manual_seed(w.seed)
    device = torch.device("cuda" if cfg.resolved_device() == "cuda" and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cfg.torch_threads())  # Ray sets OMP_NUM_THREADS to the task's CPUs
    tok = load_tokenizer(spec["base_dir"])
    toks = [t for t in tokenize_samples(spec["samples"], cfg.template, tok) if t.status == "ok"]
    if not toks:
        raise ValueError("no warmup sample survived templating (all empty or over max_length)")
    dtype = DTYPES[cfg.model.dtype] if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["base_dir"], dtype=dtype).to(device)
    if w.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=w.lora_r, lora_alpha=w.lora_alpha, lora_dropout=w.lora_dropout,
                                                 target_modules=w.target_modules, task_type="CAUSAL_LM"))
    if spec.get("ray_train"):
        model = ray.train.torch.prepare_model(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=w.learning_rate, weight_decay=w.weight_decay)
    per_step = w.batch_size * w.grad_accum * world
    steps = w.max_steps or max(1, math.ceil(w.epochs * len(toks) / per_step))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    history, step, epoch = [], 0, 0
    t0 = time.monotonic()
    while step < steps:
        batches = _batches(len(toks), w.batch_size, w.seed, epoch)[rank::world]
        epoch += 1
        for i in range(0, len(batches) - w.grad_accum + 1, w.grad_accum):
            total = 0.0
            for b in batches[i : i + w.grad_accum]:
                loss = _loss(model, [toks[j].input_ids for j in b], [toks[j].response_mask for j in b], device)
                (loss / w.grad_accum).backward()
                total += loss.item() / w.grad_accum
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            history.append({"step": step, "loss": total, "lr": sched.get_last_lr()[0], "seconds": time.monotonic() - t0})
            if report and rank == 0:
                report(history[-1])
            if spec.get("ray_train"):
                ray.train.report({"loss": total, "step": step})
            if step >= steps:
                break
    merged_digest = None
    if rank == 0:
        core = model.module if hasattr(model, "module") else model
        merged_digest = _save(core, tok, spec["out_dir"], history, lora=w.method == "lora")
    if spec.get("ray_train"):
        ray.train.report({"step": step, "merged_digest": merged_digest or ""})  # every rank reports; rank 0's is kept
    return {"steps": step, "samples": len(toks), "seconds": time.monotonic() - t0, "merged_digest": merged_digest,
            "final_loss": history[-1]["loss"] if history else float("nan")}


def _save(model, tok, out_dir: str, history: list[dict[str, Any]], lora: bool) -> str:
    """adapter/ (LoRA), merged/ and loss.json; written locally, then uploaded for s3:// run dirs.
    Returns the merged weights' digest (the stamp records it; nothing trusts merged/ without it)."""
    from .engines import model_digest

    local = Path(out_dir if "://" not in out_dir else tempfile.mkdtemp(prefix="instructdiff-warmup-"))
    local.mkdir(parents=True, exist_ok=True)
    if lora:
        model.save_pretrained(local / "adapter")
        merged = model.merge_and_unload()
    else:
        merged = model
    merged.save_pretrained(local / "merged")
    tok.save_pretrained(local / "merged")
    (local / "loss.json").write_text(json.dumps(history))
    merged_digest = model_digest(str(local / "merged"))
    if "://" in out_dir:
        fs, root = fsspec.core.url_to_fs(out_dir)
        fs.put(str(local) + "/", root, recursive=True)
        shutil.rmtree(local, ignore_errors=True)
    return merged_digest


def warmup_fingerprint(cfg: RunConfig, base_dir: str, samples: list[Sample]) -> dict[str, Any]:
    """What decides the warmup weights: base model, settings, template, and the rows trained on."""
    from .engines import model_digest

    rows = hashlib.sha256()
    for s in samples:
        rows.update(json.dumps([s.instruction, s.input, s.response, s.messages], ensure_ascii=False).encode())
    return {
        "base_model": model_digest(base_dir),
        "warmup": cfg.warmup.model_dump(mode="json"),
        "template": cfg.template.model_dump(mode="json"),
        "dtype": cfg.model.dtype,
        "rows": {"count": len(samples), "sha256": rows.hexdigest()},
    }


def train_warmup(cfg: RunConfig, samples: list[Sample], out_dir: str,
                 on_step: Callable[[dict[str, Any]], None] | None = None, in_process: bool = False) -> WarmupResult:
    """Train π_w from the base on `samples` into `out_dir`.

    A directory with a stamp is reused when its fingerprint matches, refused when it does not;
    without a stamp (never trained, or killed before it) it is cleared and trained again.
    Training runs in a Ray task (one GPU on CUDA) so the driver's memory stays small; its step
    lines reach the driver through Ray's log forwarding. `in_process` trains right here.
    """
    from .engines import resolve_model

    base_dir = resolve_model(cfg.model.base)
    fp = warmup_fingerprint(cfg, base_dir, samples)
    stamp = rundir.check_warmup_stamp(out_dir, fp)
    if stamp is not None:
        return WarmupResult(**stamp["result"])
    rundir.clear_dir(out_dir)
    spec = {"cfg": cfg, "base_dir": base_dir, "samples": samples, "out_dir": out_dir, "on_step": on_step}
    if cfg.warmup.num_workers > 1:
        stats = _train_with_ray(spec, cfg)
    elif in_process:
        stats = train_loop(spec)
    else:
        stats = _train_in_task(spec, cfg)
    result = WarmupResult(
        out_dir=out_dir,
        adapter_dir=f"{out_dir.rstrip('/')}/adapter" if cfg.warmup.method == "lora" else None,
        merged_dir=f"{out_dir.rstrip('/')}/merged",
        samples=stats["samples"], steps=stats["steps"], seconds=stats["seconds"], final_loss=stats["final_loss"],
    )
    rundir.write_warmup_stamp(out_dir, {"result": asdict(result), "fingerprint": fp, "merged_digest": stats["merged_digest"]})
    return result


def _train_in_task(spec: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    import ray

    from .runtime import init_ray

    init_ray(cfg)
    remote = ray.remote(num_cpus=cfg.ray.cpus_per_actor, num_gpus=cfg.gpus_per_actor(), max_retries=1)(_train_and_print)
    return ray.get(remote.remote({k: v for k, v in spec.items() if k != "on_step"}))


def _train_and_print(spec: dict[str, Any]) -> dict[str, Any]:
    every = 1 if spec["cfg"].progress == "on" else 10
    spec["on_step"] = lambda h: h["step"] % every == 0 and print(
        f"[warmup] step {h['step']}  loss {h['loss']:.4f}  lr {h['lr']:.2e}  {h['seconds']:.0f}s", flush=True)
    return train_loop(spec)


def _train_with_ray(spec: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """Data-parallel training on `num_workers` Ray Train workers (one GPU each on CUDA)."""
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from .runtime import init_ray

    init_ray(cfg)
    use_gpu = cfg.resolved_device() == "cuda"
    ray_spec = {k: v for k, v in spec.items() if k != "on_step"} | {"ray_train": True}
    trainer = TorchTrainer(
        lambda conf: train_loop(conf),
        train_loop_config=ray_spec,
        scaling_config=ScalingConfig(num_workers=cfg.warmup.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=TrainRunConfig(storage_path=tempfile.mkdtemp(prefix="instructdiff-train-")),
    )
    fit = trainer.fit()
    with fsspec.open(f"{spec['out_dir'].rstrip('/')}/loss.json", "r") as f:
        history = json.load(f)  # written by rank 0
    return {"steps": len(history), "samples": len(spec["samples"]), "seconds": history[-1]["seconds"] if history else 0.0,
            "final_loss": history[-1]["loss"] if history else float("nan"),
            "merged_digest": (fit.metrics or {}).get("merged_digest")}
