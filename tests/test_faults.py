"""Faults: driver SIGKILL and resume, a killed scoring actor, a fuzzed corpus, S3 storage."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import kill_processes_mentioning, make_config
from instructdiff_ray.pipeline import score_corpus
from instructdiff_ray.scoring import SCHEMA

pytestmark = pytest.mark.slow
SCORE_COLS = ["base_nll", "base_entropy", "warmup_nll", "warmup_entropy"]


def _table(out):
    return pq.read_table(out, schema=SCHEMA).sort_by([("source_row", "ascending")]).to_pydict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_local, tiny_model, tiny_lora, gsm8k):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = make_config(tmp, [gsm8k], tiny_model, data={"limit": 200, "shard_rows": 10})
    score_corpus(cfg, cfg.out, warmup=str(tiny_lora))
    return _table(cfg.out)


def test_driver_sigkill_at_several_points_then_resume(tmp_path, reference, tiny_model, tiny_lora, gsm8k):
    out = tmp_path / "scores"
    cmd = [sys.executable, "-m", "instructdiff_ray", "score", "--data", str(gsm8k), "--limit", "200", "--shard-rows", "10",
           "--base", str(tiny_model), "--warmup", str(tiny_lora), "--out", str(out), "--actors", "2", "--threads", "1",
           "--progress", "off"]
    rescored = []
    for kill_at in (2, 9, None):
        tag = f"instructdiff-kill-{tmp_path.name}-{kill_at}"
        env = dict(os.environ, RAY_AUTH_MODE="disabled", INSTRUCTDIFF_TEST_TAG=tag)
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        if kill_at is None:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err.decode()[-3000:]
            break
        deadline = time.time() + 300
        while time.time() < deadline and len(list((out / "_done").glob("*.json"))) < kill_at and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        kill_processes_mentioning(tag)  # the driver's local Ray (raylet, actors) dies with it
        proc.wait()
        done = {p.stem for p in (out / "_done").glob("*.json")}
        files = {p.stem for p in out.glob("shard-*.parquet")}
        assert len(done) < 20, "the run finished before it could be killed"
        rescored.append(len(files - done))  # written but unmarked: recomputed on resume
    assert all(n <= 2 for n in rescored)  # at most one shard per actor is scored twice
    got = _table(out)
    assert got["source_row"] == list(range(200)) and got["sample_id"] == reference["sample_id"]
    for col in SCORE_COLS:
        np.testing.assert_allclose(got[col], reference[col], atol=1e-6, rtol=0)


def test_killed_scoring_actor_is_replaced(tmp_path, reference, ray_local, tiny_model, tiny_lora, gsm8k):
    cfg = make_config(tmp_path, [gsm8k], tiny_model, data={"limit": 200, "shard_rows": 10},
                      ray={"min_actors": 2, "max_actors": 2})
    killed = []

    def assassin():
        done = Path(cfg.out) / "_done"
        deadline = time.time() + 300
        while time.time() < deadline:
            markers = [json.loads(p.read_text()) for p in done.glob("*.json")] if done.exists() else []
            if markers:
                pid = int(markers[0]["actor"].split(":")[1])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    t = threading.Thread(target=assassin)
    t.start()
    summary = score_corpus(cfg, cfg.out, warmup=str(tiny_lora))
    t.join()
    assert killed and summary.rows == 200
    got = _table(cfg.out)
    assert got["source_row"] == list(range(200))
    for col in SCORE_COLS:
        np.testing.assert_allclose(got[col], reference[col], atol=1e-6, rtol=0)
    assert killed[0] in {int(m["actor"].split(":")[1]) for m in summary.markers}


def _fuzz_corpus(path: Path, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    rows: list[tuple[bytes, str]] = []
    good = lambda i: {"id": f"g{i}", "instruction": f"Add {i} and {i + 1}.", "output": f"It is {2 * i + 1}."}  # noqa: E731
    for i in range(300):
        rows.append((json.dumps(good(i)).encode(), "ok"))
    for i in range(120):
        rows.append((json.dumps(good(i))[: rng.randint(5, 30)].encode(), "malformed_json"))
        rows.append((json.dumps(good(1000 + i)).encode().replace(b"Add", b"Add \xff\xfe"), "invalid_utf8"))
        rows.append((json.dumps({"id": f"t{i}", "instruction": rng.choice([5, 1.5, ["x"], {"a": 1}]), "output": "y"}).encode(), "bad_type"))
        rows.append((json.dumps({"id": f"m{i}", "instruction": "no answer"}).encode(), "missing_field"))
        rows.append((json.dumps({"id": f"p{i}", "instruction": rng.choice(["", "   "]), "output": "an answer"}).encode(), "empty_prompt"))
        rows.append((json.dumps({"id": f"r{i}", "instruction": "question?", "output": rng.choice(["", " \n "])}).encode(), "empty_response"))
        rows.append((json.dumps({"id": f"l{i}", "instruction": "long " * rng.randint(300, 3000), "output": "ok"}).encode(), "too_long"))
        rows.append((json.dumps({"id": f"n{i}", "instruction": None, "output": "x"}).encode(), "missing_field"))
        rows.append((json.dumps(["not", "an", "object"]).encode(), "bad_type"))
    for i in range(100):  # duplicate ids: scored, and dropped once at selection
        rows.append((json.dumps({**good(i), "instruction": f"Dup {i}"}).encode(), "ok"))
    rng.shuffle(rows)
    path.write_bytes(b"\n".join(r for r, _ in rows) + b"\n")
    counts: dict[str, int] = {}
    for _, status in rows:
        counts[status] = counts.get(status, 0) + 1
    return counts


def test_fuzzed_corpus_every_row_accounted(tmp_path, ray_local, tiny_model, tiny_lora):
    from instructdiff_ray.config import SelectionConfig
    from instructdiff_ray.selection import load_scores, select

    data = tmp_path / "fuzz.jsonl"
    expected = _fuzz_corpus(data)
    cfg = make_config(tmp_path, [data], tiny_model, data={"shard_rows": 100, "id_field": "id", "preset": "alpaca"},
                      template={"max_length": 256})
    summary = score_corpus(cfg, cfg.out, warmup=str(tiny_lora))
    assert summary.status_counts == dict(sorted(expected.items()))
    assert summary.rows == sum(expected.values())
    t = _table(cfg.out)
    assert t["source_row"] == list(range(sum(expected.values())))
    ok = [i for i, s in enumerate(t["status"]) if s == "ok"]
    assert all(np.isfinite(t["delta_entropy"][i]) for i in ok)
    assert all(t["reason"][i] for i, s in enumerate(t["status"]) if s != "ok")
    quarantined = sum(len(p.read_text().splitlines()) for p in (Path(cfg.out) / "_quarantine").glob("*.jsonl"))
    assert quarantined == expected["malformed_json"] + expected["invalid_utf8"]
    sel = select(load_scores(cfg.out), SelectionConfig())
    assert sel.stats["duplicates_dropped"] == 100 and sel.stats["rows_scored"] == 300


@pytest.fixture(scope="module")
def s3(ray_local):
    from moto.server import ThreadedMotoServer

    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("instructdiff-test")
    yield fs
    server.stop()


def test_s3_corpus_and_run_dir_with_resume(s3, reference, tmp_path, ray_local, tiny_model, tiny_lora, gsm8k):
    from instructdiff_ray.config import SelectionConfig
    from instructdiff_ray.selection import load_scores, select, write_selection

    lines = Path(gsm8k).read_text().splitlines()[:200]
    with s3.open("instructdiff-test/corpus/gsm8k.jsonl", "w") as f:
        f.write("\n".join(lines) + "\n")
    out = "s3://instructdiff-test/run/scores"
    cfg = make_config(tmp_path, ["s3://instructdiff-test/corpus/gsm8k.jsonl"], tiny_model,
                      data={"shard_rows": 10}, out=out)
    first = score_corpus(cfg, out, warmup=str(tiny_lora))
    s3.rm("instructdiff-test/run/scores/_done/shard-00004.json")
    s3.rm("instructdiff-test/run/scores/shard-00007.parquet")
    s3.rm("instructdiff-test/run/scores/_done/shard-00007.json")
    again = score_corpus(cfg, out, warmup=str(tiny_lora))
    assert first.shards_skipped == 0 and again.shards_skipped == 18 and again.rows == 200
    table = load_scores(out)
    got = table.sort_by("source_row").to_pydict()
    assert got["source_row"] == list(range(200))
    for col in SCORE_COLS:
        np.testing.assert_allclose(got[col], reference[col], atol=1e-6, rtol=0)
    paths = write_selection(select(table, SelectionConfig()), "s3://instructdiff-test/run/selection")
    assert s3.exists(paths["data"]) and len(s3.cat(paths["data"]).splitlines()) > 10
