"""Selection equals an independent row-by-row implementation of the authors' algorithm."""

import math

import numpy as np
import pyarrow as pa
import pytest

from instructdiff_ray.config import SelectionConfig
from instructdiff_ray.selection import select


def random_scores(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = [f"{i:08x}" for i in rng.permutation(n * 3)[:n]]
    status = np.where(rng.random(n) < 0.03, "too_long", "ok")
    dnll = np.round(rng.normal(0.5, 0.4, n), 2)  # rounded: many ties
    dh = np.round(rng.normal(-0.1, 0.2, n), 2)
    base_nll = np.round(rng.normal(1.5, 0.5, n), 2)
    ok = status == "ok"
    return pa.table({
        "sample_id": ids, "source_file": ["f.jsonl"] * n, "source_row": np.arange(n),
        "n_response_tokens": rng.integers(1, 400, n).astype(np.int32),
        "base_nll": pa.array(np.where(ok, base_nll, np.nan), from_pandas=True),
        "base_entropy": pa.array(np.where(ok, np.round(rng.normal(2, 0.5, n), 2), np.nan), from_pandas=True),
        "delta_nll": pa.array(np.where(ok, dnll, np.nan), from_pandas=True),
        "delta_entropy": pa.array(np.where(ok, dh, np.nan), from_pandas=True),
        "status": status,
    })


def authors_reference(rows: list[dict], beta: float, gamma: float, unit: str) -> list[str]:
    """Design brief §1 steps 4–5 as the authors' loop, with every tie broken by sample_id."""
    data = [r for r in rows if r["status"] == "ok"]
    total = sum(r["n_response_tokens"] for r in data)
    n = len(data)
    by_nll = sorted(data, key=lambda r: (r["delta_nll"], r["sample_id"]))
    trim = int(n * gamma)
    kept = by_nll if trim * 2 >= n else by_nll[trim : n - trim]
    ranked = sorted(kept, key=lambda r: (r["delta_entropy"], r["sample_id"]))
    if unit == "samples":
        return [r["sample_id"] for r in ranked[: math.floor(beta * n)]]
    budget = int(total * beta)
    out, taken = [], 0
    for r in ranked:
        out.append(r["sample_id"])
        taken += r["n_response_tokens"]
        if taken >= budget:
            break
    return out


@pytest.mark.parametrize("unit", ["tokens", "samples"])
@pytest.mark.parametrize("beta,gamma", [(0.1, 0.1), (0.2, 0.05), (0.15, 0.0)])
def test_matches_authors_algorithm_on_100k_rows(unit, beta, gamma):
    table = random_scores(100_000)
    sel = select(table, SelectionConfig(budget=beta, gamma=gamma, budget_unit=unit))
    expected = authors_reference(table.to_pylist(), beta, gamma, unit)
    assert sel.rows.column("sample_id").to_pylist() == expected
    assert sel.stats["selected_rows"] == len(expected) > 1000


def test_small_cases_and_determinism():
    table = random_scores(7, seed=3)
    sel = select(table, SelectionConfig(budget=0.5, gamma=0.1))  # floor(0.1 * 7) = 0: nothing trimmed
    assert sel.stats["trimmed_per_tail"] == 0
    assert sel.rows.column("sample_id").to_pylist() == authors_reference(table.to_pylist(), 0.5, 0.1, "tokens")
    tiny_budget = select(table, SelectionConfig(budget=1e-4))  # budget floors to 0: still one row, as the authors'
    assert tiny_budget.stats["budget"]["value"] == 0 and tiny_budget.stats["selected_rows"] == 1
    again = select(table, SelectionConfig(budget=0.5, gamma=0.1))
    assert again.rows.equals(sel.rows)


def test_duplicates_are_dropped_and_non_ok_rows_never_ranked():
    t = random_scores(1000, seed=5).to_pylist()
    t[10]["sample_id"] = t[20]["sample_id"]
    sel = select(pa.Table.from_pylist(t), SelectionConfig(budget=0.5))
    assert sel.stats["duplicates_dropped"] == 1
    chosen = set(sel.rows.column("source_row").to_pylist())
    assert not any(t[i]["status"] != "ok" for i in chosen) and 20 not in chosen


@pytest.mark.parametrize("strategy", ["random", "middle_dh", "highest_dh", "ppl_min", "ppl_max", "entropy_min", "entropy_max",
                                      "longest"])
def test_comparison_strategies_fill_the_same_budget(strategy):
    table = random_scores(5000, seed=9)
    ours = select(table, SelectionConfig(strategy="instructdiff"))
    other = select(table, SelectionConfig(strategy=strategy))
    budget = ours.stats["budget"]["value"]
    assert other.stats["budget"]["value"] == budget
    tok = other.stats["selected_response_tokens"]
    assert budget <= tok < budget + 400
    ids = other.rows.to_pydict()
    if strategy == "highest_dh":
        assert min(ids["delta_entropy"]) > max(ours.rows.column("delta_entropy").to_pylist())
    if strategy == "ppl_min":
        assert ids["base_nll"] == sorted(ids["base_nll"])
    if strategy == "longest":  # the longest responses, ties by sample_id, the row crossing the budget included
        ok = table.filter(pa.compute.equal(table.column("status"), "ok")).to_pydict()
        ranked = sorted(zip(ok["n_response_tokens"], ok["sample_id"]), key=lambda x: (-x[0], x[1]))
        taken, want = 0, []
        for n, sid in ranked:
            if taken >= budget:
                break
            want.append(sid)
            taken += n
        assert ids["sample_id"] == want
    if strategy == "middle_dh":
        med = np.median(np.array(ours.scored.column("delta_entropy").to_pylist())[ours.kept_mask])
        assert min(ids["delta_entropy"]) <= med <= max(ids["delta_entropy"])
    assert select(table, SelectionConfig(strategy=strategy)).rows.equals(other.rows)  # seeded, deterministic


def test_string_order_equals_arrows_stable_sort():
    """The prefix-key sort used for sample_id ties orders exactly as Arrow's stable string sort,
    including shared 8-byte prefixes, embedded NUL bytes, non-ASCII and empty strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from instructdiff_ray.selection import _string_order

    rng = np.random.default_rng(1)
    alphabet = ["", "a", "ab", "abcdefgh", "abcdefghi", "abcdefgh\x00", "é", "zz", "abcdefghij", "x" * 20]
    for _ in range(200):
        vals = [str(rng.choice(alphabet)) + str(rng.integers(0, 5)) * int(rng.integers(0, 3))
                for _ in range(int(rng.integers(1, 300)))]
        arr = pa.array(vals)
        want = pc.sort_indices(arr).to_numpy()
        order, repeat = _string_order(pa.chunked_array([arr.slice(0, len(vals) // 2), arr.slice(len(vals) // 2)]))
        assert (order == want).all()
        assert repeat.tolist() == [vals[want[i + 1]] == vals[want[i]] for i in range(len(vals) - 1)]
