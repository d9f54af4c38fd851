"""Warmup stage: fine-tune the base on a small calibration set to get the warmup model.

Same template and response-only loss as scoring (tokens outside the response mask carry no
loss). LoRA (peft) by default, full fine-tuning optional. One process on CPU or one GPU;
data-parallel with Ray Train's TorchTrainer when `warmup.num_workers > 1`. The vocabulary is
never resized, so base and warmup always share it.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import rundir
from .config import ConfigError, DataConfig, RunConfig, TemplateConfig, WarmupConfig
from .corpus import Sample, Shard, iter_unit, normalize_rows, read_units, rows_by_shard, samples_digest
from .runtime import quiet_libraries

log = logging.getLogger(__name__)


@dataclass
class WarmupResult:
    out_dir: str
    adapter_dir: str | None  # peft adapter (LoRA only): the hf engine serves both passes from one base copy
    merged_dir: str  # full weights of the warmup model (what a second vLLM engine would load)
    samples: int
    steps: int
    seconds: float
    final_loss: float
    global_batch: int = 0  # samples per optimizer step: batch_size x workers x grad_accum
    workers: int = 1
    rank_divergence: float = 0.0  # max |difference| of per-tensor weight sums between workers (0: identical)

    @property
    def scoring_model(self) -> str:
        return self.adapter_dir or self.merged_dir


def warmup_size(w: WarmupConfig, n: int) -> int:
    """How many rows round 1 draws from N: ⌊α·N⌋ or `count`, at most `max_samples`, at least 1."""
    k = w.count if w.count is not None else int(math.floor(w.alpha * n))
    return max(1, min(n, k, w.max_samples or n))


@dataclass(frozen=True)
class Draw:
    """A seeded uniform draw of rows without replacement, kept as how many rows each file gives
    (a multivariate hypergeometric split of the total: the driver holds O(files), never a set of
    ordinals); a read task draws its file's positions from (seed, the file's place in the corpus)
    and keeps its shards' share. Independent of how files are cut into shards."""
    counts: dict[str, int]  # file -> rows drawn from it
    sizes: dict[str, int]  # file -> rows it has
    index: dict[str, int]  # file -> its place in the corpus
    seed: int

    def file_positions(self, path: str) -> np.ndarray:
        """The drawn row ordinals of one file, ascending."""
        rng = np.random.default_rng([self.seed, self.index[path]])
        return np.sort(rng.choice(self.sizes[path], size=self.counts[path], replace=False))

    def positions(self, shard: Shard, offset: int) -> np.ndarray:
        """The drawn positions within one shard, whose first row is the file's row ordinal `offset`."""
        if shard.path not in self.counts:
            return np.zeros(0, dtype=np.int64)
        drawn = self.file_positions(shard.path)
        return drawn[(drawn >= offset) & (drawn < offset + shard.n_rows)] - offset


def shard_offsets(shards: list[Shard]) -> dict[int, int]:
    """shard id -> the ordinal of its first row within its file."""
    out, seen = {}, {}
    for s in sorted(shards, key=lambda s: (s.path, s.row_start)):
        out[s.shard_id] = seen.get(s.path, 0)
        seen[s.path] = out[s.shard_id] + s.n_rows
    return out


def draw_rows(shards: list[Shard], w: WarmupConfig) -> Draw:
    """Round 1's warmup rows (warmup_size of them, uniform over the rows); they stay in the pool."""
    sizes: dict[str, int] = {}
    for s in shards:
        sizes[s.path] = sizes.get(s.path, 0) + s.n_rows
    k = warmup_size(w, sum(sizes.values()))
    counts = np.random.default_rng(w.seed).multivariate_hypergeometric(np.array(list(sizes.values()), np.int64), k,
                                                                       method="marginals")
    drawn = {p: int(c) for p, c in zip(sizes, counts) if c}
    return Draw(drawn, {p: sizes[p] for p in drawn}, {p: i for i, p in enumerate(sizes) if p in drawn}, w.seed)


@dataclass
class SampleSet:
    """Training samples left where the read tasks put them (the object store when attached), one
    part per read unit: the driver holds references, the training side resolves them part by part."""
    parts: list[Any]

    def iter_parts(self) -> Iterator[list[Sample]]:
        """Each part resolved in turn (one part in memory at a time)."""
        import ray

        for p in self.parts:
            yield ray.get(p) if isinstance(p, ray.ObjectRef) else p

    def resolve(self) -> list[Sample]:
        return [s for part in self.iter_parts() for s in part]


def count_and_digest(samples: list[Sample] | SampleSet) -> tuple[int, str]:
    """How many samples and their digest (what the warmup fingerprint records); for a SampleSet
    computed in a task reading one part at a time, so the samples never gather in one place."""
    from .runtime import remote_call

    if isinstance(samples, SampleSet):
        return remote_call(_count_and_digest, samples, num_cpus=0)
    return len(samples), samples_digest(samples)


def _count_and_digest(samples: SampleSet) -> tuple[int, str]:
    n = 0

    def counted() -> Iterator[Sample]:
        nonlocal n
        for part in samples.iter_parts():
            n += len(part)
            yield from part
    digest = samples_digest(counted())
    return n, digest


@dataclass
class TrainingRows:
    """The training samples tokenized as the loss reads them, one Arrow table per part (columns
    `input_ids`, `response_mask`, `n_response`), left where the tokenizing tasks put them: the
    object store when attached. The driver holds references and one count per part; a training
    worker fetches the rows of its own micro-batches (`RowReader`), so no process holds every row."""
    parts: list[Any]
    sizes: list[int]

    def __len__(self) -> int:
        return sum(self.sizes)


_TOKENIZERS: dict[tuple, Any] = {}
TOKENIZE_SLICE = 2048  # samples tokenized at once: Python token lists exist for one slice, not a whole part


def _tokenizer(base: str):
    """The base model's tokenizer, loaded once per process and per version of its files (a local or
    object-store model rewritten between two runs in one Ray session is loaded again)."""
    from .models import load_tokenizer, resolve_model

    path = Path(resolve_model(base, tokenizer_only=True))
    key = (str(path), tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size)
                                   for f in path.iterdir() if f.is_file())))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(str(path))
    return _TOKENIZERS[key]


def tokenize_part(template: TemplateConfig, base: str, samples: list[Sample]) -> tuple[pa.Table, int]:
    """One part's samples tokenized (rows the template refuses are dropped, as training always
    dropped them), in order, as a compact table: 4 bytes a token id, 1 its mask, 4 a row's count.
    Tokenized a slice at a time, so the task holds Python token lists for one slice only."""
    from .template import tokenize_samples

    tok = _tokenizer(base)
    lengths, counts, ids, masks = [], [], [], []
    for lo in range(0, len(samples), TOKENIZE_SLICE):
        toks = [t for t in tokenize_samples(samples[lo : lo + TOKENIZE_SLICE], template, tok) if t.status == "ok"]
        lengths += [len(t.input_ids) for t in toks]
        counts += [t.n_response_tokens for t in toks]
        n = sum(len(t.input_ids) for t in toks)
        ids.append(np.fromiter(chain.from_iterable(t.input_ids for t in toks), dtype=np.int32, count=n))
        masks.append(np.fromiter(chain.from_iterable(t.response_mask for t in toks), dtype=np.int8, count=n))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
    table = pa.table({"input_ids": pa.LargeListArray.from_arrays(offsets, pa.array(np.concatenate([np.zeros(0, np.int32), *ids]))),
                      "response_mask": pa.LargeListArray.from_arrays(offsets, pa.array(np.concatenate([np.zeros(0, np.int8), *masks]))),
                      "n_response": pa.array(counts, type=pa.int32())})
    return table, len(counts)


def tokenize(cfg: RunConfig, base: str, samples: list[Sample] | SampleSet, here: bool) -> TrainingRows:
    """The training rows, tokenized: by one task per part when attached (`here` False), else in this
    process one part at a time, each table put in the object store when attached (a compare unit
    tokenizes inside its own task: waiting there on tasks that need CPUs the units hold could stall)."""
    import ray

    if here or not ray.is_initialized():
        tables, sizes = [], []
        for part in (samples.iter_parts() if isinstance(samples, SampleSet) else [samples]):
            table, n = tokenize_part(cfg.template, base, part)
            if n:
                tables.append(ray.put(table) if ray.is_initialized() else table)
                sizes.append(n)
        return TrainingRows(tables, sizes)
    task = ray.remote(num_cpus=1, max_retries=2, num_returns=2)(tokenize_part)
    refs = [task.remote(cfg.template, base, p) for p in (samples.parts if isinstance(samples, SampleSet) else [samples])]
    sizes = ray.get([r[1] for r in refs])
    return TrainingRows([r[0] for r, n in zip(refs, sizes) if n], [n for n in sizes if n])


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    """A column as one array, without a copy when it is one already (combine_chunks always copies)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


class RowReader:
    """A training worker's view of TrainingRows: every row's response-token count (4 bytes a row,
    what a step's loss is divided by) and the rows themselves fetched on demand, a few parts mapped
    at a time (zero-copy from the object store)."""

    OPEN_PARTS = 16

    def __init__(self, rows: TrainingRows):
        self.rows = rows
        self.starts = np.concatenate([[0], np.cumsum(rows.sizes, dtype=np.int64)])
        self._open: dict[int, tuple[np.ndarray, ...]] = {}
        self.n_response = np.zeros(len(rows), dtype=np.int32)
        for i in range(len(rows.parts)):
            self.n_response[self.starts[i] : self.starts[i + 1]] = self._part(i)[4]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _part(self, i: int) -> tuple[np.ndarray, ...]:
        """Part i as (token offsets, token ids, mask offsets, mask, response counts)."""
        if i in self._open:
            self._open[i] = self._open.pop(i)  # most recently used last
            return self._open[i]
        import ray

        part = self.rows.parts[i]
        table = ray.get(part) if isinstance(part, ray.ObjectRef) else part
        ids, mask, n = (_one_chunk(table.column(c)) for c in ("input_ids", "response_mask", "n_response"))
        self._open[i] = (ids.offsets.to_numpy(), ids.values.to_numpy(), mask.offsets.to_numpy(), mask.values.to_numpy(),
                         n.to_numpy())
        if len(self._open) > self.OPEN_PARTS:
            self._open.pop(next(iter(self._open)))
        return self._open[i]

    def take(self, rows: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The token ids and response masks of rows (global indices in part order)."""
        ids, masks = [], []
        for g in rows:
            p = int(np.searchsorted(self.starts, g, side="right")) - 1
            offsets, values, mask_offsets, mask, _ = self._part(p)
            r = g - self.starts[p]
            ids.append(values[offsets[r] : offsets[r + 1]].astype(np.int64))
            masks.append(mask[mask_offsets[r] : mask_offsets[r + 1]].astype(bool))
        return ids, masks


def selection_picks(selection_parquet: str, shards: list[Shard], cap: int | None, seed: int) -> tuple:
    """The rows of a selection (its source_file / source_row), as source rows per shard, one dict
    per read unit in plan order (a seeded uniform subset of `cap` rows when it has more), then a
    list of whether each unit holds any (run as a task, only that list comes back: a unit without
    rows starts no read task)."""
    with fsspec.open(selection_parquet, "rb") as f:
        t = pq.read_table(f, columns=["source_file", "source_row"])
    files = t.column("source_file")
    rows = t.column("source_row").to_numpy()
    if cap is not None and len(rows) > cap:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=cap, replace=False))
        files, rows = files.take(pa.array(keep)), rows[keep]
    by_shard = rows_by_shard(shards, files, rows)
    picks = [{s.shard_id: rows[by_shard[s.shard_id]] for s in unit if s.shard_id in by_shard} for unit in read_units(shards)]
    return (*picks, [bool(p) for p in picks])


def collect(cfg: RunConfig, shards: list[Shard], draw: Draw | None = None, selection: str | None = None,
            cap: int | None = None) -> SampleSet:
    """The ok samples of a draw, or of a selection's rows (at most `cap` of them, a seeded uniform
    subset), read by one task per read unit that holds any; on a cluster the samples stay in the
    object store (the driver holds references and, for a selection, nothing per row: the
    selection is split by read unit in a task)."""
    import ray

    from .runtime import map_tasks

    units = read_units(shards)
    if draw is not None:
        offsets = shard_offsets(shards)
        jobs = [(cfg.data, u, {s.shard_id: offsets[s.shard_id] for s in u}, draw)
                for u in units if any(s.path in draw.counts for s in u)]
    else:
        seed = cfg.warmup.seed
        if ray.is_initialized():  # the split stays in the object store; only which units hold rows comes back
            task = ray.remote(num_cpus=1, max_retries=1, num_returns=len(units) + 1)(selection_picks)
            refs = task.remote(selection, shards, cap, seed)
            picks, held = list(refs[:-1]), ray.get(refs[-1])
        else:
            *picks, held = selection_picks(selection, shards, cap, seed)
        jobs = [(cfg.data, u, p, None) for u, p, h in zip(units, picks, held) if h]
    if not ray.is_initialized():
        return SampleSet(map_tasks(_collect_unit, jobs))
    remote = ray.remote(num_cpus=1, max_retries=2)(_collect_unit)
    return SampleSet([remote.remote(*job) for job in jobs])


def collect_samples(cfg: RunConfig, shards: list[Shard], ordinals: set[int] | None = None,
                    draw: Draw | None = None, selection: str | None = None) -> list[Sample]:
    """The ok samples of a draw, of a selection's rows, or at given global ordinals (a small held-out
    range), here on the driver."""
    if ordinals is None:
        return collect(cfg, shards, draw, selection).resolve()
    from .runtime import map_tasks

    picks: dict[int, np.ndarray] = {}  # shard id -> wanted positions within the shard
    wanted, base = np.array(sorted(ordinals), dtype=np.int64), 0
    for shard in shards:
        lo, hi = np.searchsorted(wanted, [base, base + shard.n_rows])
        if hi > lo:
            picks[shard.shard_id] = wanted[lo:hi] - base
        base += shard.n_rows
    units = read_units([s for s in shards if s.shard_id in picks])
    jobs = [(cfg.data, u, {s.shard_id: picks[s.shard_id] for s in u}, "positions") for u in units]
    return [s for part in map_tasks(_collect_unit, jobs) for s in part]


def _collect_unit(data: DataConfig, unit: list[Shard], picks: dict[int, Any], by: Draw | str | None) -> list[Sample]:
    """One read unit's wanted rows, normalised (only those): positions within each shard (drawn
    here from `by` when it is a Draw, with each shard's file offset in `picks`; given when
    "positions"), else source rows."""
    if isinstance(by, Draw):
        picks = {s.shard_id: p for s in unit if s.shard_id in picks and len(p := by.positions(s, picks[s.shard_id]))}
    out: list[Sample] = []
    wanted = [s for s in unit if s.shard_id in picks]
    for shard, raw in iter_unit(wanted) if wanted else ():
        if isinstance(by, Draw) or by == "positions":
            chosen = [raw[i] for i in picks[shard.shard_id]]
        else:
            rows = set(np.asarray(picks[shard.shard_id]).tolist())
            chosen = [r for r in raw if r[0] in rows]
        out += [s for s in normalize_rows(shard, chosen, data) if s.status == "ok"]
    return out


def global_batches(n: int, global_batch: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's global batches, one per row: a seeded shuffle cut into full batches (the tail that
    does not fill one is dropped, so every worker runs the same number of micro-batches). Python's
    shuffle, on an 8-byte-per-row array rather than a list (same order, a fifth of the memory)."""
    order = array.array("q", range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return np.frombuffer(order, dtype=np.int64)[: n // global_batch * global_batch].reshape(-1, global_batch)


class ResponseLoss(torch.nn.Module):
    """The causal LM wrapped so that its whole loss runs inside `forward`, which is what
    DistributedDataParallel synchronises; the LM head (and the architecture's logit transform,
    as in scoring) is applied only at response positions.

    Returns the SUM of the response-token cross-entropies, in fp32: the caller divides by the
    response tokens of the whole global batch."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, inp: torch.Tensor, attn: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from .metrics import logit_transform

        hidden = self.lm.get_decoder()(input_ids=inp, attention_mask=attn).last_hidden_state
        rows, cols = target.nonzero(as_tuple=True)  # token (row, col) is predicted from (row, col - 1)
        logits = self.lm.get_output_embeddings()(hidden[rows, cols - 1])
        post = logit_transform(self.lm.config)
        if post:
            logits = post(logits)
        return torch.nn.functional.cross_entropy(logits.float(), inp[rows, cols], reduction="sum")


def _tensors(ids: Sequence[Sequence[int]], masks: Sequence[Sequence[bool]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    inp = torch.zeros((len(ids), width), dtype=torch.long)
    attn = torch.zeros_like(inp)
    target = torch.zeros((len(ids), width), dtype=torch.bool)
    for r, (x, m) in enumerate(zip(ids, masks)):
        inp[r, : len(x)] = torch.as_tensor(np.asarray(x, dtype=np.int64))
        attn[r, : len(x)] = 1
        target[r, : len(x)] = torch.as_tensor(np.asarray(m, dtype=bool))
    return inp.to(device), attn.to(device), target.to(device)


def response_loss(model, ids: list[list[int]], masks: list[list[bool]], device) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of a batch (what one training step minimises)."""
    with torch.no_grad():
        total = ResponseLoss(model)(*_tensors(ids, masks, device))
    return total / sum(sum(m) for m in masks)


def _param_checksum(module: torch.nn.Module) -> torch.Tensor:
    return torch.stack([p.detach().double().sum() for p in module.parameters() if p.requires_grad])


def train_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """The training loop; runs as a plain call or as a Ray Train worker (DDP when world > 1).

    A step consumes one global batch of batch_size × workers × grad_accum samples: worker r runs
    micro-batches r, r + workers, ... of it, each loss is the micro-batch's summed cross-entropy
    divided by the response tokens of the whole global batch (times the world size, which DDP's
    gradient averaging divides out), so N workers take the step one process would take."""
    from transformers import AutoModelForCausalLM

    from .engines.base import DTYPES
    from .models import load_tokenizer, resolve_model

    cfg: RunConfig = spec["cfg"]
    quiet_libraries(cfg.progress)
    w = cfg.warmup
    world, rank, report = 1, 0, spec.get("on_step")
    ray_train = bool(spec.get("ray_train"))
    if ray_train:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        world, rank = ctx.get_world_size(), ctx.get_world_rank()
        device = ray.train.torch.get_device()
    else:
        device = torch.device("cuda" if cfg.resolved_device() == "cuda" and torch.cuda.is_available() else "cpu")
    torch.manual_seed(w.seed)
    if device.type == "cpu":
        torch.set_num_threads(cfg.torch_threads())  # Ray sets OMP_NUM_THREADS to the task's CPUs
    base_dir = resolve_model(spec["base"])  # on this node
    tok = load_tokenizer(base_dir)
    rows = RowReader(spec["rows"])
    n = len(rows)
    global_batch = w.batch_size * world * w.grad_accum
    if n < global_batch:
        raise ValueError(f"{n} warmup samples cannot fill one global batch of {global_batch} "
                         f"(batch_size {w.batch_size} x {world} workers x grad_accum {w.grad_accum}); lower batch_size")
    low = DTYPES[cfg.model.dtype] if device.type == "cuda" else torch.float32
    # Full fine-tuning keeps fp32 master weights and optimizer state and runs the forward in the
    # model dtype under autocast; LoRA keeps the frozen base in the model dtype (peft makes the adapters fp32).
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=low if w.method == "lora" else torch.float32)
    model = model.to(device)
    if w.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=w.lora_r, lora_alpha=w.lora_alpha, lora_dropout=w.lora_dropout,
                                                 target_modules=w.target_modules, task_type="CAUSAL_LM"))
    use_cache = model.config.use_cache
    if w.gradient_checkpointing:  # non-reentrant: also right for LoRA's frozen inputs, RNG (dropout) replayed
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_module: torch.nn.Module = ResponseLoss(model)
    if ray_train:
        loss_module = ray.train.torch.prepare_model(loss_module)  # DDP over the whole loss when world > 1
    loss_module.train()
    autocast = torch.autocast(device.type, dtype=low, enabled=device.type == "cuda" and low != torch.float32)
    params = [p for p in loss_module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=w.learning_rate, weight_decay=w.weight_decay)
    per_epoch = n // global_batch
    steps = w.max_steps or max(1, math.ceil(w.epochs * per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    if rank == 0:
        print(f"[warmup] {n} samples, {steps} steps of a global batch of {global_batch} "
              f"({w.batch_size} per micro-batch x {world} workers x {w.grad_accum} accumulation)", flush=True)
    history, step, epoch = [], 0, 0
    t0 = time.monotonic()
    while step < steps:
        for batch in global_batches(n, global_batch, w.seed, epoch):
            micro = [batch[i : i + w.batch_size] for i in range(0, global_batch, w.batch_size)][rank::world]
            n_tokens = int(rows.n_response[batch].sum())
            total = torch.zeros((), dtype=torch.float64, device=device)
            for k, b in enumerate(micro):
                sync = contextlib.nullcontext()
                if k < len(micro) - 1 and hasattr(loss_module, "no_sync"):
                    sync = loss_module.no_sync()  # all-reduce once per step, after the last micro-batch
                with sync:
                    with autocast:
                        loss_sum = loss_module(*_tensors(*rows.take(b), device))
                    (loss_sum * world / n_tokens).backward()
                total += loss_sum.detach().double()
            if world > 1:
                torch.distributed.all_reduce(total)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            history.append({"step": step, "loss": total.item() / n_tokens, "lr": sched.get_last_lr()[0],
                            "seconds": time.monotonic() - t0})
            if report and rank == 0:
                report(history[-1])
            if ray_train:
                ray.train.report({"loss": history[-1]["loss"], "step": step})
            if step >= steps:
                break
        epoch += 1
    divergence = 0.0
    if world > 1:  # every worker must hold the same weights; measured, not assumed
        mine = _param_checksum(loss_module)
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(gathered, mine)
        divergence = max(float((g - gathered[0]).abs().max()) for g in gathered)
    merged_digest = None
    if rank == 0:
        core = loss_module.module if hasattr(loss_module, "module") else loss_module
        core.lm.config.use_cache = use_cache  # the saved model is the same whether or not training checkpointed
        merged_digest = _save(core.lm, tok, spec["out_dir"], history, lora=w.method == "lora")
    if ray_train:
        ray.train.report({"step": step, "merged_digest": merged_digest or "", "rank_divergence": divergence,
                          "samples": n})
    return {"steps": step, "samples": n, "seconds": time.monotonic() - t0, "merged_digest": merged_digest,
            "global_batch": global_batch, "rank_divergence": divergence,
            "final_loss": history[-1]["loss"] if history else float("nan")}


def _save(model, tok, out_dir: str, history: list[dict[str, Any]], lora: bool) -> str:
    """adapter/ (LoRA), merged/ and loss.json; written locally, then uploaded for s3:// run dirs.
    Returns the merged weights' digest (the stamp records it; nothing trusts merged/ without it)."""
    from .models import model_digest

    local = Path(out_dir if "://" not in out_dir else tempfile.mkdtemp(prefix="instructdiff-warmup-"))
    local.mkdir(parents=True, exist_ok=True)
    files = rundir.warmup_files(str(local))
    if lora:
        model.save_pretrained(files["adapter"])
        merged = model.merge_and_unload()
    else:
        merged = model
    merged.save_pretrained(files["merged"])
    tok.save_pretrained(files["merged"])
    Path(files["loss"]).write_text(json.dumps(history))
    merged_digest = model_digest(files["merged"])
    if "://" in out_dir:
        fs, root = rundir.fs_of(out_dir)
        fs.put(str(local) + "/", root, recursive=True)
        shutil.rmtree(local, ignore_errors=True)
    return merged_digest


def warmup_fingerprint(cfg: RunConfig, base: str, rows: tuple[int, str]) -> dict[str, Any]:
    """What decides the warmup weights: base model (pinned spec), settings (not gradient checkpointing,
    which trains the same weights), template, and the rows trained on."""
    from .models import identity

    return {
        "base_model": identity(base),
        "warmup": cfg.warmup.model_dump(mode="json", exclude={"gradient_checkpointing"}),
        "template": cfg.template.model_dump(mode="json"),
        "dtype": cfg.model.dtype,
        "rows": {"count": rows[0], "sha256": rows[1]},
    }


def check_warmup_size(cfg: RunConfig, n_samples: int) -> None:
    """Refuse, before anything is touched, a draw that cannot fill one optimizer step."""
    w = cfg.warmup
    global_batch = w.batch_size * w.num_workers * w.grad_accum
    if n_samples < global_batch:
        raise ConfigError(
            f"the warmup has {n_samples} usable samples, fewer than one global batch of {global_batch} (warmup.batch_size "
            f"{w.batch_size} x num_workers {w.num_workers} x grad_accum {w.grad_accum}); lower warmup.batch_size or "
            "raise warmup.alpha / warmup.count")


def train_warmup(cfg: RunConfig, samples: list[Sample] | SampleSet, out_dir: str,
                 on_step: Callable[[dict[str, Any]], None] | None = None, in_process: bool = False) -> WarmupResult:
    """Train π_w from the base on `samples` into `out_dir`.

    A directory with a stamp is reused when its fingerprint matches, refused when it does not;
    without a stamp (never trained, or killed before it) it is cleared and trained again.
    Training runs in a Ray task (one GPU on CUDA) so the driver's memory stays small; its step
    lines reach the driver through Ray's log forwarding. `in_process` trains right here.
    """
    from .models import pin

    base = pin(cfg.model.base)
    rows = count_and_digest(samples)
    check_warmup_size(cfg, rows[0])
    fp = warmup_fingerprint(cfg, base, rows)
    stage = rundir.Stage("warmup", out_dir)
    changed = stage.open(fp, replace="warmup" in cfg.run.recompute)
    if changed:
        log.warning("%s: training again (differs in: %s; --recompute warmup)", out_dir, ", ".join(changed))
    elif (stamp := stage.done()) is not None:
        return WarmupResult(**stamp["result"])
    stage.clear()  # leftovers of an unfinished training: the warmup stage's own directory, never the run directory
    if not in_process or cfg.warmup.num_workers > 1:
        from .runtime import init_ray

        init_ray(cfg)
    training = tokenize(cfg, base, samples, here=in_process)
    if not len(training):
        raise ValueError("no warmup sample survived templating (all empty or over max_length)")
    spec = {"cfg": cfg, "base": base, "rows": training, "out_dir": out_dir, "on_step": on_step}
    if cfg.warmup.num_workers > 1:
        stats = _train_with_ray(spec, cfg)
    elif in_process:
        stats = train_loop(spec)
    else:
        stats = _train_in_task(spec, cfg)
    result = WarmupResult(
        out_dir=out_dir,
        adapter_dir=rundir.warmup_files(out_dir)["adapter"] if cfg.warmup.method == "lora" else None,
        merged_dir=rundir.warmup_files(out_dir)["merged"],
        samples=stats["samples"], steps=stats["steps"], seconds=stats["seconds"], final_loss=stats["final_loss"],
        global_batch=stats["global_batch"], workers=cfg.warmup.num_workers, rank_divergence=stats["rank_divergence"],
    )
    if result.rank_divergence != 0.0:
        raise RuntimeError(f"warmup workers ended with different weights (divergence {result.rank_divergence}); "
                           "gradients were not synchronised")
    stage.finish({"result": asdict(result), "merged_digest": stats["merged_digest"]}, fp)
    return result


def _train_in_task(spec: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    import ray

    from .runtime import init_ray, training_gpus

    init_ray(cfg)
    remote = ray.remote(num_cpus=cfg.ray.cpus_per_actor, num_gpus=training_gpus(cfg), max_retries=1)(_train_and_print)
    return ray.get(remote.remote({k: v for k, v in spec.items() if k != "on_step"}))


def step_printer(cfg: RunConfig, label: str = "warmup") -> Callable[[dict[str, Any]], None]:
    """A step line (every step with progress on, else every 10th); from a Ray task it reaches the
    driver through Ray's log forwarding."""
    every = 1 if cfg.progress == "on" else 10

    def report(h: dict[str, Any]) -> None:
        if h["step"] % every == 0 and cfg.progress != "off":
            print(f"[{label}] step {h['step']}  loss {h['loss']:.4f}  lr {h['lr']:.2e}  {h['seconds']:.0f}s", flush=True)
    return report


def _train_and_print(spec: dict[str, Any]) -> dict[str, Any]:
    spec["on_step"] = step_printer(spec["cfg"])
    return train_loop(spec)


def _train_with_ray(spec: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """Data-parallel training on `num_workers` Ray Train workers (one GPU each on CUDA)."""
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from .runtime import init_ray, training_gpus

    init_ray(cfg)
    use_gpu = training_gpus(cfg) > 0
    ray_spec = {k: v for k, v in spec.items() if k != "on_step"} | {"ray_train": True}
    trainer = TorchTrainer(
        lambda conf: train_loop(conf),
        train_loop_config=ray_spec,
        scaling_config=ScalingConfig(num_workers=cfg.warmup.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=TrainRunConfig(storage_path=tempfile.mkdtemp(prefix="instructdiff-train-")),
    )
    fit = trainer.fit()
    metrics = fit.metrics or {}
    with fsspec.open(rundir.warmup_files(spec["out_dir"])["loss"], "r") as f:
        history = json.load(f)  # written by rank 0
    w = cfg.warmup
    return {"steps": len(history), "samples": metrics.get("samples", 0), "seconds": history[-1]["seconds"] if history else 0.0,
            "final_loss": history[-1]["loss"] if history else float("nan"), "merged_digest": metrics.get("merged_digest"),
            "global_batch": w.batch_size * w.num_workers * w.grad_accum, "rank_divergence": metrics.get("rank_divergence", 0.0)}
