"""Where training rows come from: the seeded warmup draw (uniform, deterministic, per read unit)
and a selection's rows read by tasks, capped by warmup.max_samples, never gathered on the driver."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_config
from instructdiff_ray.config import WarmupConfig
from instructdiff_ray.corpus import plan_shards, read_units
from instructdiff_ray.warmup import collect, collect_samples, draw_rows, shard_offsets, warmup_size

ROWS = 1_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three Parquet files of unequal size, small row groups: many read units of unequal size."""
    root = tmp_path_factory.mktemp("draw")
    start = 0
    for i, (n, group) in enumerate([(600, 70), (300, 100), (100, 33)]):
        rows = np.arange(start, start + n)
        pq.write_table(pa.table({"question": [f"q{r}" for r in rows], "answer": [f"a{r}" for r in rows]}),
                       root / f"part-{i}.parquet", row_group_size=group)
        start += n
    return root


def _plan(corpus, tmp_path, shard_rows=50, **warmup):
    cfg = make_config(tmp_path, [corpus], "unused", data={"preset": "qa", "shard_rows": shard_rows}, warmup=warmup)
    return cfg, plan_shards(cfg.data)


def _global(shards, draw):
    """The drawn rows as global ordinals (for the test only: the job never builds this)."""
    offsets = shard_offsets(shards)
    base = np.cumsum([0] + [s.n_rows for s in shards])
    return np.concatenate([base[i] + draw.positions(s, offsets[s.shard_id]) for i, s in enumerate(shards)])


def test_the_draw_is_deterministic_and_sized(corpus, tmp_path):
    cfg, shards = _plan(corpus, tmp_path, alpha=0.1)
    assert len(read_units(shards)) > 10 and sum(s.n_rows for s in shards) == ROWS
    a, b = draw_rows(shards, cfg.warmup), draw_rows(shards, cfg.warmup)
    assert a == b and np.array_equal(_global(shards, a), _global(shards, b))
    assert sum(a.counts.values()) == 100 == len(np.unique(_global(shards, a)))
    # the draw does not depend on how the files are cut into shards
    cfg2, other_plan = _plan(corpus, tmp_path, alpha=0.1, shard_rows=17)
    assert np.array_equal(np.sort(_global(other_plan, draw_rows(other_plan, cfg2.warmup))), np.sort(_global(shards, a)))
    other = draw_rows(shards, cfg.warmup.model_copy(update={"seed": 1}))
    assert not np.array_equal(_global(shards, a), _global(shards, other))
    assert warmup_size(WarmupConfig(alpha=0.1, max_samples=30), ROWS) == 30
    assert warmup_size(WarmupConfig(count=5000), ROWS) == ROWS
    assert warmup_size(WarmupConfig(count=40, max_samples=30), ROWS) == 30


def test_the_draw_is_uniform_over_rows_and_read_units(corpus, tmp_path):
    """Every row is drawn with probability k/N: over 3,000 seeds each row's count is binomial, and the
    rows a read unit gives are hypergeometric around k·n_unit/N."""
    cfg, shards = _plan(corpus, tmp_path, alpha=0.1)
    seeds, k = 3000, 100
    hits = np.zeros(ROWS)
    per_shard = np.zeros(len(shards))
    offsets = shard_offsets(shards)
    for seed in range(seeds):
        draw = draw_rows(shards, cfg.warmup.model_copy(update={"seed": seed}))
        hits[_global(shards, draw)] += 1
        per_shard += [len(draw.positions(s, offsets[s.shard_id])) if s.path in draw.counts else 0 for s in shards]
    p = k / ROWS
    expected = seeds * p
    chi2 = float((((hits - expected) ** 2) / (expected * (1 - p))).sum())  # ~ chi-square with ROWS dof
    assert abs(chi2 - ROWS) < 5 * np.sqrt(2 * ROWS), chi2
    sizes = np.array([s.n_rows for s in shards])
    mean = per_shard / seeds
    sd = np.sqrt(k * sizes / ROWS * (1 - sizes / ROWS) * (ROWS - k) / (ROWS - 1) / seeds)
    assert np.all(np.abs(mean - k * sizes / ROWS) < 5 * sd)
    # halves of the corpus (first vs second half of every shard) are drawn equally often
    first = sum(hits[lo:lo + n // 2].sum() for lo, n in zip(np.cumsum([0] + list(sizes[:-1])), sizes))
    assert abs(first / hits.sum() - sum(n // 2 for n in sizes) / ROWS) < 0.01


def test_collect_reads_exactly_the_drawn_rows(corpus, tmp_path):
    cfg, shards = _plan(corpus, tmp_path, alpha=0.05, max_samples=40)
    draw = draw_rows(shards, cfg.warmup)
    samples = collect_samples(cfg, shards, draw=draw)
    wanted = sorted(_global(shards, draw).tolist())
    assert len(samples) == 40 and [int(s.instruction[1:]) for s in samples] == wanted


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """20,000 rows of ~400 characters in JSONL (one read unit per 1,000-row shard) and a selection
    of every other row, as a selection.parquet names them."""
    root = tmp_path_factory.mktemp("big")
    path = root / "big.jsonl"
    with open(path, "w") as f:
        for r in range(20_000):
            f.write(json.dumps({"question": f"q{r} " + "x" * 200, "answer": f"a{r} " + "y" * 200}) + "\n")
    picked = np.arange(0, 20_000, 2)
    pq.write_table(pa.table({"source_file": [str(path)] * len(picked), "source_row": picked}), root / "selection.parquet")
    return path, root / "selection.parquet", picked


def test_a_selections_rows_never_gather_on_the_driver(big_corpus, tmp_path, ray_local):
    """Round k+1's training rows (and a compare unit's): split by read unit in a task, read by tasks,
    left in the object store; the driver holds references, not rows."""
    path, selection, picked = big_corpus
    cfg = make_config(tmp_path, [path], "unused", data={"preset": "qa", "shard_rows": 1000})
    shards = plan_shards(cfg.data)
    worker = ray_local._private.worker.global_worker.core_worker
    before = worker.get_local_memory_store_bytes_used()
    rows = collect(cfg, shards, selection=str(selection))
    ray_local.wait(rows.parts, num_returns=len(rows.parts))
    held = worker.get_local_memory_store_bytes_used() - before
    assert all(isinstance(p, ray_local.ObjectRef) for p in rows.parts) and len(rows.parts) == 20
    samples = rows.resolve()
    size = sum(len(s.instruction) + len(s.response) for s in samples)
    assert [s.source_row for s in samples] == picked.tolist()
    assert size > 4_000_000 and held < size / 100, (held, size)  # the driver's own store holds references only
    capped = collect(cfg, shards, selection=str(selection), cap=500).resolve()
    again = collect(cfg, shards, selection=str(selection), cap=500).resolve()
    assert len(capped) == 500 and [s.source_row for s in capped] == [s.source_row for s in again]
    assert set(s.source_row for s in capped) <= set(picked.tolist())


def test_training_rows_are_tokenized_by_tasks_and_read_back_exactly(big_corpus, tmp_path, ray_local, tiny_model, monkeypatch):
    """The tokenized training rows stay in the object store, one table per part (the driver holds
    references and counts); a worker's reader gives, for any global index, exactly the tokens and
    mask the whole list tokenized at once gives, the rows the template refuses dropped in place."""
    from instructdiff_ray.models import load_tokenizer
    from instructdiff_ray import warmup
    from instructdiff_ray.template import tokenize_samples
    from instructdiff_ray.warmup import RowReader, tokenize

    path, selection, picked = big_corpus
    cfg = make_config(tmp_path, [path], str(tiny_model), data={"preset": "qa", "shard_rows": 1000},
                      template={"max_length": 499})
    shards = plan_shards(cfg.data)
    samples = collect(cfg, shards, selection=str(selection))
    worker = ray_local._private.worker.global_worker.core_worker
    before = worker.get_local_memory_store_bytes_used()
    rows = tokenize(cfg, str(tiny_model), samples, here=False)
    assert worker.get_local_memory_store_bytes_used() - before < 10_000  # references and counts, not tokens
    assert all(isinstance(p, ray_local.ObjectRef) for p in rows.parts)
    whole = [t for t in tokenize_samples(samples.resolve(), cfg.template, load_tokenizer(str(tiny_model))) if t.status == "ok"]
    assert 0 < len(whole) < len(picked) and len(rows) == len(whole)  # the length limit refused some rows
    reader = RowReader(rows)
    assert reader.n_response.tolist() == [t.n_response_tokens for t in whole]
    order = np.random.default_rng(0).permutation(len(whole))[:3000].tolist()
    ids, masks = reader.take(order)
    assert [x.tolist() for x in ids] == [whole[g].input_ids for g in order]
    assert [m.tolist() for m in masks] == [whole[g].response_mask for g in order]
    assert len(reader._open) <= RowReader.OPEN_PARTS  # a few parts mapped at a time, not every row
    monkeypatch.setattr(warmup, "TOKENIZE_SLICE", 7)  # slices that end mid-part and around refused rows
    here = tokenize(cfg, str(tiny_model), samples, here=True)  # a compare unit's path: in its own task
    assert here.sizes == rows.sizes
    ids, masks = RowReader(here).take(order)
    assert [x.tolist() for x in ids] == [whole[g].input_ids for g in order]
    assert [m.tolist() for m in masks] == [whole[g].response_mask for g in order]
