"""Large-corpus paths at small sizes: byte-range JSONL plans, gzip / Parquet row-group / JSON /
CSV read units, the stored plan, export from many shards, selection without the corpus."""

import csv
import gzip
import json
import logging

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_config
from instructdiff_ray import corpus, rundir
from instructdiff_ray.readers import jsonl as readers_jsonl
from instructdiff_ray.config import DataConfig, SelectionConfig
from instructdiff_ray.corpus import iter_unit, load_plan, plan_shards, read_units
from instructdiff_ray.export import export_selection
from instructdiff_ray.pipeline import score_corpus
from instructdiff_ray.selection import select, write_selection
from instructdiff_ray.scoring import SCHEMA


def _rows(n, start=0):
    return [{"instruction": f"Task {i}: add {i} and {i * 7 % 13}", "input": "", "output": f"The sum is {i + i * 7 % 13}."}
            for i in range(start, start + n)]


def _every_row(shards):
    out = []
    for unit in read_units(shards):
        for shard, raw in iter_unit(unit):
            assert len(raw) == shard.n_rows
            out += [(shard.path, r, rec, err) for r, rec, err, _ in raw]
    return out


def test_jsonl_byte_ranges_account_for_every_line(tmp_path, monkeypatch):
    """Blank lines, CRLF, a byte-order mark, a malformed line and no final newline, cut into
    37-byte planning ranges: every non-blank line lands in exactly one shard, with its line number."""
    lines = [json.dumps(r) for r in _rows(40)]
    lines[0] = "\ufeff" + lines[0]
    lines[5], lines[9], lines[22] = "", "   ", "{not json"
    body = "\r\n".join(lines[:20]) + "\r\n" + "\n".join(lines[20:])
    path = tmp_path / "c.jsonl"
    path.write_bytes(body.encode("utf-8"))
    expected = [i for i, line in enumerate(lines) if line.strip()]
    monkeypatch.setattr(readers_jsonl, "RANGE_BYTES", 37)
    for shard_rows in (1, 4, 1000):
        shards = plan_shards(DataConfig(paths=[str(path)], shard_rows=shard_rows))
        got = _every_row(shards)
        assert [r for _, r, _, _ in got] == expected
        assert all(s.n_rows <= shard_rows for s in shards)
        assert [rec["instruction"] for _, r, rec, err in got if err is None] == \
            [json.loads(lines[i].lstrip("\ufeff"))["instruction"] for i in expected if i != 22]
    limited = plan_shards(DataConfig(paths=[str(path)], shard_rows=4, limit=13))
    assert [r for _, r, _, _ in _every_row(limited)] == expected[:13]


def test_gzip_and_parquet_row_group_are_read_in_one_pass_per_unit(tmp_path):
    rows = _rows(50)
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    pqf = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pqf, row_group_size=10_000)
    shards = plan_shards(DataConfig(paths=[str(gz), str(pqf)], shard_rows=7))
    assert len(shards) == 16 and len(read_units(shards)) == 2  # one unit per gzip file and per row group
    got = _every_row(shards)
    assert [(p.endswith("gz"), r) for p, r, _, _ in got] == [(True, i) for i in range(50)] + [(False, i) for i in range(50)]
    assert [rec for _, _, rec, _ in got] == rows + rows
    pending = [s for s in shards if s.shard_id % 3 == 0]  # a resume reads only what is pending
    assert [s.shard_id for s, _ in (x for u in read_units(pending) for x in iter_unit(u))] == [s.shard_id for s in pending]


def test_plan_is_stored_once_and_reused_until_an_input_changes(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(30)))
    cfg = DataConfig(paths=[str(path)], shard_rows=8)
    first = load_plan(cfg, str(tmp_path / "run"))
    assert rundir.read_plan(str(tmp_path / "run"))["shards"] == [s.to_dict() for s in first.shards]
    calls = []
    monkeypatch.setattr(corpus, "plan_shards", lambda c, files=None: calls.append(c) or [])
    assert load_plan(cfg, str(tmp_path / "run")).shards == first.shards and calls == []
    monkeypatch.undo()
    with path.open("a") as f:
        f.write(json.dumps(_rows(1, 30)[0]) + "\n")
    again = load_plan(cfg, str(tmp_path / "run"))
    assert sum(s.n_rows for s in again.shards) == 31 and again.files != first.files


def test_hidden_and_underscore_entries_are_not_data(tmp_path):
    (tmp_path / "d" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "d" / "_tmp").mkdir()
    good = "".join(json.dumps(r) + "\n" for r in _rows(3))
    for name in ("d/a.jsonl", "d/.ipynb_checkpoints/a-checkpoint.jsonl", "d/_tmp/x.jsonl", "d/_SUCCESS.json", "d/.hidden.jsonl"):
        (tmp_path / name).write_text(good)
    files = corpus.list_files(DataConfig(paths=[str(tmp_path / "d")]))
    assert [p for p, _ in files] == [str(tmp_path / "d" / "a.jsonl")]


def test_export_keeps_every_field_of_heterogeneous_rows(tmp_path, monkeypatch):
    rows = [{"instruction": f"i{i}", "output": f"o{i}"} for i in range(30)]
    rows[3]["tags"] = ["math", "easy"]
    rows[17]["meta"] = {"source": "forum", "score": 4}
    rows[25]["score"] = 0.5
    src = tmp_path / "h.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(readers_jsonl, "RANGE_BYTES", 100)
    shards = plan_shards(DataConfig(paths=[str(src)], shard_rows=4))
    chosen = [25, 3, 17, 0, 29]
    sel = pa.table({"source_file": [str(src)] * 5, "source_row": chosen, "rank": list(range(5))})
    monkeypatch.setattr("instructdiff_ray.export.MAX_PARTS", 2)  # parts hold several units, merged by rank
    out, n = export_selection(sel, shards, str(tmp_path / "sel"), "parquet")
    got = pq.read_table(out).to_pylist()
    assert n == 5 and [g["instruction"] for g in got] == [f"i{i}" for i in chosen]
    assert {k for g in got for k in g} == {"instruction", "output", "tags", "meta", "score"}
    assert got[1]["tags"] == ["math", "easy"] and got[2]["meta"] == {"source": "forum", "score": 4}
    assert got[0]["score"] == 0.5 and got[0]["tags"] is None
    out, _ = export_selection(sel, shards, str(tmp_path / "sel"), "csv")
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert set(table[0]) == {"instruction", "output", "tags", "meta", "score"} and json.loads(table[1]["tags"]) == ["math", "easy"]
    assert not (tmp_path / "sel" / rundir.EXPORT_PARTS).exists()


def _scores_table(n, path):
    import numpy as np

    rng = np.random.default_rng(0)
    return pa.table({"sample_id": [f"s{i}" for i in range(n)], "source_file": [path] * n, "source_row": list(range(n)),
                     "n_response_tokens": rng.integers(1, 50, n).astype("int32"), "base_nll": rng.random(n),
                     "base_entropy": rng.random(n), "delta_nll": rng.normal(size=n), "delta_entropy": rng.normal(size=n),
                     "status": ["ok"] * n})


def test_select_without_the_corpus_writes_ids_and_scores_and_warns(tmp_path, caplog):
    sel = select(_scores_table(100, str(tmp_path / "gone.jsonl")), SelectionConfig(budget=0.2))
    with caplog.at_level(logging.WARNING):
        paths = write_selection(sel, str(tmp_path / "sel"), export="auto")
    assert "data" not in paths and "not reachable" in caplog.text
    assert rundir.committed_selection(str(tmp_path / "sel")) is not None
    assert len((tmp_path / "sel" / "selected_ids.txt").read_text().split()) == sel.stats["selected_rows"]
    from instructdiff_ray.export import SourceMissing

    with pytest.raises(SourceMissing, match="--export never"):
        write_selection(sel, str(tmp_path / "sel2"), export="always")
    assert "data" not in write_selection(sel, str(tmp_path / "sel3"), export="never")


@pytest.mark.slow
def test_many_shards_score_like_one_per_file(tmp_path, ray_local, tiny_model, tiny_full_warmup, monkeypatch):
    """A Parquet file with one big row group, a .jsonl.gz, a JSON array and a CSV (quoted newlines,
    byte-order mark), split into many shards, give the scores and accounting of one shard per file."""
    rows = _rows(24)
    rows[4]["output"] = "Line one,\nline \"two\"."
    d = tmp_path / "data"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), d / "a.parquet", row_group_size=1000)
    (d / "b.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in _rows(24, 100)).encode()))
    (d / "c.json").write_text(json.dumps(_rows(24, 200)))
    (d / "d.csv").write_bytes(b"\xef\xbb\xbf" + pd.DataFrame(_rows(24, 300)).to_csv(index=False).encode())
    tables = []
    for shard_rows in (5, 1000):
        cfg = make_config(tmp_path / str(shard_rows), [d], tiny_model, data={"shard_rows": shard_rows},
                          ray={"min_actors": 1, "max_actors": 1})
        summary = score_corpus(cfg, cfg.out, warmup=str(tiny_full_warmup))
        assert summary.rows == 96 and summary.status_counts == {"ok": 96}
        assert summary.shards_total == (20 if shard_rows == 5 else 4)
        tables.append(pq.read_table(cfg.out, schema=SCHEMA).sort_by([("source_file", "ascending"), ("source_row", "ascending")]))
    many, one = (t.drop_columns(["shard_id"]).to_pydict() for t in tables)
    assert many["sample_id"] == one["sample_id"] and many["source_row"] == one["source_row"]
    for col in ("base_nll", "base_entropy", "warmup_nll", "warmup_entropy"):
        assert max(abs(a - b) for a, b in zip(many[col], one[col])) < 1e-6
