"""The distributed selection search gives the in-memory selection's rows, in its order, with its
stats: every strategy, both budget units, duplicates across files, rows not ok, heavy ties (which
the search resolves down to the sample_ids' bytes), and a 1M-row corpus with ties."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructdiff_ray.config import SelectionConfig
from instructdiff_ray.selection import load_scores, select
from instructdiff_ray.selection_search import search_select
from instructdiff_ray.strategies import STRATEGIES


def write_scores(root, n, files, seed=0, decimals=1, prefix="sample-"):
    """Score files as scoring writes them; values rounded to `decimals` so ties are everywhere, and
    ids drawn from 90% of n so some repeat (across and within files)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    m = n // files
    for f in range(files):
        ids = pa.compute.binary_join_element_wise(prefix, pa.compute.cast(pa.array(rng.integers(0, int(n * 0.9), m)),
                                                                          pa.string()), "")
        status = np.where(rng.random(m) < 0.03, "too_long", "ok")

        def r(v):
            return np.round(v, decimals) if decimals is not None else v

        pq.write_table(pa.table({
            "sample_id": ids, "source_file": ["c.jsonl"] * m, "source_row": np.arange(m) + f * m,
            "n_response_tokens": rng.integers(1, 50, m).astype(np.int32),
            "base_nll": r(rng.normal(1.5, .5, m)), "base_entropy": r(rng.normal(2, .5, m)),
            "base_nll_alone": r(rng.normal(1.6, .5, m)), "delta_nll": r(rng.normal(.5, .4, m)),
            "delta_entropy": r(rng.normal(-.1, .2, m)), "status": status}), root / f"shard-{f:05d}.parquet")
    return root


def same(a, b):
    stats = dict(b.stats)
    assert stats.pop("search")["partitions"] > 1
    assert b.rows is None and len(b.parts) >= 1  # held as rank ranges in the object store
    b = b.table()
    assert b.column("sample_id").to_pylist() == a.rows.column("sample_id").to_pylist()
    assert b.column("rank").to_pylist() == a.rows.column("rank").to_pylist()
    assert stats == a.stats
    assert b.drop_columns(["rank"]).to_pylist() == a.rows.drop_columns(["rank"]).to_pylist()


@pytest.fixture(scope="module")
def ties(tmp_path_factory):
    root = write_scores(tmp_path_factory.mktemp("ties") / "scores", 12_000, 5)
    return root, load_scores(str(root))


@pytest.mark.parametrize("unit", ["tokens", "samples"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_gives_the_in_memory_pick(strategy, unit, ties, ray_local):
    root, table = ties
    cfg = SelectionConfig(strategy=strategy, budget_unit=unit, seed=3)
    same(select(table, cfg), search_select(str(root), cfg, partition_rows=2500, fetch_rows=40, range_rows=300))


def test_edges_budget_zero_no_trim_and_all_ties(tmp_path, ray_local):
    root = write_scores(tmp_path / "scores", 3000, 3, decimals=0)  # ΔNLL and ΔH take a handful of values
    table = load_scores(str(root))
    for cfg in (SelectionConfig(budget=1e-9), SelectionConfig(budget=1e-9, budget_unit="samples"),
                SelectionConfig(gamma=0.49), SelectionConfig(gamma=0.0), SelectionConfig(budget=1.0), SelectionConfig(budget=1.0, budget_unit="samples")):
        same(select(table, cfg), search_select(str(root), cfg, partition_rows=700, fetch_rows=5, range_rows=300))
    one_value = tmp_path / "flat"
    write_scores(one_value, 3000, 3, decimals=None)
    for f in one_value.glob("*.parquet"):  # every row the same ΔNLL and ΔH: only the sample_ids order them
        t = pq.read_table(f)
        t = t.set_column(t.schema.get_field_index("delta_nll"), "delta_nll", pa.array(np.full(t.num_rows, 0.25)))
        t = t.set_column(t.schema.get_field_index("delta_entropy"), "delta_entropy", pa.array(np.full(t.num_rows, -0.5)))
        pq.write_table(t, f)
    same(select(load_scores(str(one_value)), SelectionConfig()),
         search_select(str(one_value), SelectionConfig(), partition_rows=700, fetch_rows=5, range_rows=100))


def test_a_million_rows_with_ties(tmp_path, ray_local):
    root = write_scores(tmp_path / "scores", 1_000_000, 10, seed=1, decimals=2, prefix="gsm8k/train/row-")
    table = load_scores(str(root))
    cfg = SelectionConfig()
    a = select(table, cfg)
    b = search_select(str(root), cfg, partition_rows=250_000, fetch_rows=20_000, range_rows=20_000)
    assert len(b.parts) > 2
    assert a.stats["duplicates_dropped"] > 10_000 and a.stats["selected_rows"] > 50_000
    same(a, b)


def test_api_select_above_the_in_memory_limit_writes_the_same_selection(ties, tmp_path, ray_local):
    from instructdiff_ray import api

    root, _ = ties
    small = api.select(str(root), out=str(tmp_path / "memory"), export="never")
    large = api.select(str(root), out=str(tmp_path / "search"), export="never", in_memory_rows=0)
    assert large.stats.pop("search")["rounds"] > 0
    assert (tmp_path / "memory" / "selected_ids.txt").read_text() == (tmp_path / "search" / "selected_ids.txt").read_text()
    assert small.stats == large.stats
    # written one rank range at a time, the same rows as the in-memory table
    streamed = pq.read_table(tmp_path / "search" / "selection.parquet")
    assert streamed.to_pylist() == pq.read_table(tmp_path / "memory" / "selection.parquet").to_pylist()
    assert large.rows is None and small.rows.num_rows == streamed.num_rows  # not gathered when written
    unwritten = api.select(str(root), export="never", in_memory_rows=0)
    assert unwritten.rows.to_pylist() == small.rows.to_pylist()  # gathered when asked for without `out`


def test_many_file_buckets_and_files_that_differ(tmp_path, ray_local):
    """Rows read back by many buckets of files (small groups, tiny pieces), an empty first file with
    its columns in another order, and one file with a column the others lack: the same rows, columns,
    column order and written file as in memory."""
    from instructdiff_ray.selection import write_selection

    root = write_scores(tmp_path / "scores", 6000, 6, seed=2)
    first = pq.read_table(root / "shard-00000.parquet")
    pq.write_table(first.select(list(reversed(first.column_names))).slice(0, 0), root / "shard-00000.parquet")
    extra = pq.read_table(root / "shard-00003.parquet")
    pq.write_table(extra.append_column("reason", pa.array(["checked"] * extra.num_rows)), root / "shard-00003.parquet")
    cfg = SelectionConfig(seed=1)
    a = select(load_scores(str(root)), cfg)
    b = search_select(str(root), cfg, partition_rows=1500, split_rows=1000, range_rows=100, piece_bytes=1)
    assert b.schema.names == a.rows.schema.names and b.schema.names[0] == "status"
    assert len(b.parts) > 2
    same(a, b)
    written = {}
    for name, sel in (("memory", a), ("search", b)):
        paths = write_selection(sel, str(tmp_path / name), export="never")
        written[name] = pq.read_table(paths["scores"])
    assert written["search"].schema.names == written["memory"].schema.names
    assert written["search"].to_pylist() == written["memory"].to_pylist()


def test_a_score_file_rewritten_during_the_search_is_refused(tmp_path):
    """A row read back whole must be the sample the search chose (checked by its id's hash)."""
    from instructdiff_ray.selection_search import _fetch, _id_hash

    root = write_scores(tmp_path / "scores", 100, 1)
    path = str(root / "shard-00000.parquet")
    first = pq.read_table(path).column("sample_id")[0].as_py()
    picks = pa.table({"_file": pa.array([0], pa.int32()), "_row": pa.array([0], pa.int32()),
                      "_key": pa.array([7], pa.uint64()), "_range": pa.array([0], pa.int32()),
                      "_hash": _id_hash(pa.array([first]))})
    assert _fetch([path], 0, 1, picks).column("sample_id").to_pylist() == [first]
    moved = picks.set_column(4, "_hash", pa.array(_id_hash(pa.array([first + "-other"]))))
    with pytest.raises(RuntimeError, match="changed while the selection read it"):
        _fetch([path], 0, 1, moved)
