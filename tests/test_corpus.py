import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructdiff_ray.config import ConfigError, DataConfig
from instructdiff_ray.corpus import plan_shards, read_shard

ROWS = [{"instruction": f"Task {i}", "input": "", "output": f"Answer {i}"} for i in range(7)]


def _all(cfg):
    return [s for sh in plan_shards(cfg) for s in read_shard(sh, cfg)]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv"])
def test_formats_read_the_same_rows(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=3)
    else:
        pd.DataFrame(ROWS).to_csv(path, index=False)
    cfg = DataConfig(paths=[str(path)], shard_rows=3)
    samples = _all(cfg)
    assert [s.instruction for s in samples] == [r["instruction"] for r in ROWS]
    assert [s.source_row for s in samples] == list(range(7))
    assert len(plan_shards(cfg)) == 3 and all(s.status == "ok" for s in samples)
    assert len({s.sample_id for s in samples}) == 7


def test_presets_and_explicit_mapping(tmp_path):
    rows = [
        {"question": "Q?", "answer": "A."},
        {"prompt": "P", "completion": "C"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]},
        {"instruction": "I", "response": "R"},
    ]
    p = tmp_path / "mixed.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = _all(DataConfig(paths=[str(p)]))
    assert [x.status for x in s] == ["ok"] * 5
    assert (s[0].instruction, s[0].response) == ("Q?", "A.")
    assert (s[1].instruction, s[1].response) == ("P", "C")
    assert s[3].messages == [{"role": "user", "content": "h"}, {"role": "assistant", "content": "g"}]
    q = tmp_path / "custom.jsonl"
    q.write_text(json.dumps({"q": "x", "a": "y", "uid": 17}) + "\n")
    (m,) = _all(DataConfig(paths=[str(q)], fields={"instruction": "q", "response": "a"}, id_field="uid"))
    assert (m.instruction, m.response, m.sample_id) == ("x", "y", "17")


def test_bad_rows_get_status_and_reason(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(
        b'{"instruction": "ok", "output": "fine"}\n'
        b'{"instruction": "broken", \n'
        b"\n"
        b'{"instruction": "x", "output": ""}\n'
        b'{"instruction": "", "output": "y"}\n'
        b'{"instruction": 5, "output": "y"}\n'
        b'{"nothing": 1}\n'
        b'[1, 2]\n'
        b'{"instruction": "caf\xe9", "output": "z"}\n'
    )
    got = [(s.source_row, s.status) for s in _all(DataConfig(paths=[str(p)], preset="alpaca"))]
    assert got == [(0, "ok"), (1, "malformed_json"), (3, "empty_response"), (4, "empty_prompt"),
                   (5, "bad_type"), (6, "missing_field"), (7, "bad_type"), (8, "invalid_utf8")]


def test_shard_plan_is_deterministic_and_honours_limit(gsm8k):
    a = plan_shards(DataConfig(paths=[str(gsm8k)], shard_rows=100, limit=250))
    b = plan_shards(DataConfig(paths=[str(gsm8k)], shard_rows=100, limit=250))
    assert a == b and [s.n_rows for s in a] == [100, 100, 50]
    rows = [s.source_row for sh in a for s in read_shard(sh, DataConfig(paths=[str(gsm8k)]))]
    assert rows == list(range(250))


def test_missing_and_unreadable_inputs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        plan_shards(DataConfig(paths=[str(tmp_path / "nope.jsonl")]))
    bad = tmp_path / "bad.json"
    bad.write_text("[{oops")
    with pytest.raises(ConfigError, match="not a valid JSON array"):
        plan_shards(DataConfig(paths=[str(bad)]))
