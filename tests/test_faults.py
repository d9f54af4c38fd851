"""Faults: kills at every named point and resume, systemic and per-row engine faults, raising
templates, the error limit, the lease, fingerprints, a fuzzed corpus, S3 storage."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import kill_processes_mentioning, make_config
from instructdiff_ray.cli import main
from instructdiff_ray.pipeline import score_corpus, score_job
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


def _run_cli(args, tag, fault=None, timeout=600):
    """The CLI in a subprocess with its own local Ray; returns (returncode, stderr)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", INSTRUCTDIFF_TEST_TAG=tag, INSTRUCTDIFF_FAULT=fault or "")
    env.pop("RAY_ADDRESS", None)
    env.pop("INSTRUCTDIFF_FAULT_FILE", None)
    proc = subprocess.Popen([sys.executable, "-m", "instructdiff_ray", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    _, err = proc.communicate(timeout=timeout)
    kill_processes_mentioning(tag)  # what a killed driver's local Ray leaves behind
    return proc.returncode, err.decode(errors="replace")


def _assert_no_truncated_file(root: Path) -> None:
    """Every committed file of a run directory reads back whole (temporaries are hidden names)."""
    for p in root.rglob("*"):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".parquet":
            pq.read_table(p)
        elif p.suffix == ".jsonl":
            [json.loads(x) for x in p.read_text().splitlines()]


def _chain_config(tmp, gsm8k, base):
    return {"out": str(tmp / "run"), "data": {"paths": [str(gsm8k)], "limit": 120, "shard_rows": 20},
            "model": {"base": str(base)}, "engine": {"threads": 1},
            "warmup": {"alpha": 0.1, "max_steps": 3, "batch_size": 4, "learning_rate": 1e-3},
            "run": {"lease_ttl_s": 2}, "progress": "off"}


def _kill_chain(tmp: Path, config: dict, view) -> None:
    """The job killed at each named point in turn (each run resuming the last), then run to the
    end; after every kill each committed file of the run directory (`view()`: a local copy of it)
    reads back whole. No wait between runs: a killed driver's lease on this host is taken at once."""
    from instructdiff_ray.faults import KILL_POINTS

    (tmp / "job.yaml").write_text(yaml.safe_dump(config))
    for point in (*KILL_POINTS, None):
        rc, err = _run_cli(["run", str(tmp / "job.yaml")], f"instructdiff-chain-{tmp.name}-{point}", fault=point)
        if point is not None:
            assert rc == -signal.SIGKILL, f"not killed at {point} (rc {rc}): {err[-3000:]}"
            _assert_no_truncated_file(view())
        else:
            assert rc == 0, err[-3000:]


@pytest.fixture(scope="module")
def killed_at_every_point(tmp_path_factory, ray_local, tiny_model, gsm8k):
    """One run killed at each named point in turn, then run to the end; and the same job run
    once without interruption."""
    from instructdiff_ray.config import build_config
    from instructdiff_ray.pipeline import run_job

    tmp = tmp_path_factory.mktemp("chain")
    config = _chain_config(tmp, gsm8k, tiny_model)
    _kill_chain(tmp, config, lambda: tmp / "run")
    ref = tmp_path_factory.mktemp("uninterrupted")
    run_job(build_config({**config, "out": str(ref / "run")}))
    return tmp / "run", ref / "run", tiny_model


def _assert_equal_runs(run: Path, ref: Path) -> None:
    got, want = _table(run / "round-1" / "scores"), _table(ref / "round-1" / "scores")
    assert got["source_row"] == list(range(120)) and got["sample_id"] == want["sample_id"]  # every row exactly once
    for col in SCORE_COLS:
        np.testing.assert_allclose(got[col], want[col], atol=1e-6, rtol=0)
    sel = lambda r: (r / "round-1" / "selection" / "selected_ids.txt").read_text()  # noqa: E731
    assert sel(run) == sel(ref) and len(sel(run).split()) > 5
    assert (run / "round-1" / "selection" / "selected.jsonl").read_text() == (ref / "round-1" / "selection" / "selected.jsonl").read_text()
    _assert_no_truncated_file(run)


def test_kill_at_every_named_point_on_s3_then_resume_equals_an_uninterrupted_run(s3, killed_at_every_point, tmp_path,
                                                                                 gsm8k):
    """The same chain with the run directory on S3: every commit there is a temporary key moved
    into place, so no kill leaves a partial object at a final key."""
    _, ref, base = killed_at_every_point
    s3.mkdir("kill-chain")
    # a longer lease: renewals on the S3 server can take over 2 s on a loaded machine (the killed driver's
    # lease on this host is taken at once anyway); temporaries left by a kill are removed by the first
    # driver that finds them older than the ttl
    config = _chain_config(tmp_path, gsm8k, base) | {"out": "s3://kill-chain/run", "run": {"lease_ttl_s": 20}}
    views = iter(range(100))

    def view() -> Path:
        local = tmp_path / f"view-{next(views)}"
        s3.invalidate_cache()
        s3.get("kill-chain/run", str(local), recursive=True)
        return local

    _kill_chain(tmp_path, config, view)
    run = view()
    _assert_equal_runs(run, ref)
    # the finished command's log was uploaded next to its results (killed drivers keep theirs locally)
    assert len(list((run / "_logs").glob("driver-*.log"))) == 1
    s3.invalidate_cache()  # this client's listings are from before the last run
    assert not [p for p in s3.find("kill-chain/run") if p.rsplit("/", 1)[-1].startswith(".")], "temporaries left behind"
    assert not s3.exists("kill-chain/run/_lease.json")


def test_kill_at_every_named_point_then_resume_equals_an_uninterrupted_run(killed_at_every_point):
    run, ref, _ = killed_at_every_point
    _assert_equal_runs(run, ref)
    assert not [p for p in run.rglob(".*") if p.name.endswith(".tmp")], "temporaries left behind"
    assert not (run / "_lease.json").exists()
    from instructdiff_ray.faults import KILL_POINTS

    history = json.loads((run / "_run_config.json").read_text())["invocations"]
    assert len(history) == len(KILL_POINTS)  # the first invocation died inside this very write
    stamp = json.loads((run / "round-1" / "warmup" / "_WARMUP_DONE.json").read_text())
    assert stamp["merged_digest"] and stamp["fingerprint"]["rows"]["count"] == 12


def test_changed_warmup_setting_or_base_model_is_refused(killed_at_every_point, tiny_full_warmup, gsm8k):
    from instructdiff_ray.config import build_config
    from instructdiff_ray.pipeline import FingerprintMismatch, run_job

    run, _, base = killed_at_every_point
    config = _chain_config(run.parent, gsm8k, base)
    with pytest.raises(FingerprintMismatch, match=r"differs in: warmup\.learning_rate\)"):
        run_job(build_config({**config, "warmup": {**config["warmup"], "learning_rate": 2e-3}}))
    with pytest.raises(FingerprintMismatch, match=r"differs in: base_model\.digest\)"):
        run_job(build_config({**config, "model": {"base": str(tiny_full_warmup)}}))


def test_same_size_edit_of_an_input_is_refused(tmp_path, ray_local, tiny_model, tiny_lora, gsm8k):
    from instructdiff_ray.pipeline import FingerprintMismatch

    data = tmp_path / "part.jsonl"
    data.write_text("".join(Path(gsm8k).read_text().splitlines(keepends=True)[:20]))
    cfg = make_config(tmp_path, [data], tiny_model, data={"shard_rows": 10})
    score_corpus(cfg, cfg.out, warmup=str(tiny_lora))
    stat = data.stat()
    text = data.read_text()
    at = text.index("72")
    data.write_text(text[:at] + "73" + text[at + 2:])
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and same mtime: only the content differs
    assert data.stat().st_size == stat.st_size
    with pytest.raises(FingerprintMismatch, match=r"differs in: files\)"):
        score_corpus(cfg, cfg.out, warmup=str(tiny_lora))


def test_systemic_fault_restarts_the_actor_and_loses_nothing(tmp_path, reference, ray_local, tiny_model, tiny_lora,
                                                              gsm8k, arm_fault):
    claim = tmp_path / "poisoned-actor"
    arm_fault(f"engine.cuda_error:{claim}")
    cfg = make_config(tmp_path, [gsm8k], tiny_model, data={"limit": 200, "shard_rows": 10})
    summary = score_corpus(cfg, cfg.out, warmup=str(tiny_lora))
    poisoned = int(claim.read_text())  # the actor that raised a CUDA error on every batch
    assert summary.status_counts == {"ok": 200}
    assert poisoned not in {int(m["actor"].split(":")[1]) for m in summary.markers}
    got = _table(cfg.out)
    assert got["source_row"] == list(range(200))
    for col in SCORE_COLS:
        np.testing.assert_allclose(got[col], reference[col], atol=1e-6, rtol=0)


def test_a_row_that_fails_alone_is_the_only_error(tmp_path, reference, ray_local, tiny_model, tiny_lora, gsm8k, arm_fault):
    from instructdiff_ray.config import DataConfig, TemplateConfig
    from instructdiff_ray.corpus import plan_shards, read_shard
    from instructdiff_ray.models import load_tokenizer
    from instructdiff_ray.faults import ids_digest
    from instructdiff_ray.template import tokenize_samples

    dcfg = DataConfig(paths=[str(gsm8k)], limit=40, shard_rows=40)
    toks = tokenize_samples(read_shard(plan_shards(dcfg)[0], dcfg), TemplateConfig(), load_tokenizer(str(tiny_model)))
    arm_fault(f"engine.poison_row:{ids_digest(toks[17].input_ids)}")
    cfg = make_config(tmp_path, [gsm8k], tiny_model, data={"limit": 40, "shard_rows": 10})
    summary = score_corpus(cfg, cfg.out, warmup=str(tiny_lora))
    assert summary.status_counts == {"error": 1, "ok": 39}
    got = _table(cfg.out)
    assert [r for r, s in zip(got["source_row"], got["status"]) if s != "ok"] == [17]
    assert got["reason"][17] == "base pass: RuntimeError: injected fault: poisoned row"
    ok = [i for i in range(40) if i != 17]
    for col in SCORE_COLS:
        np.testing.assert_allclose(np.array(got[col], dtype=float)[ok], np.array(reference[col][:40])[ok], atol=1e-6, rtol=0)
    # the fault is gone: a rerun scores the failed row's shard again, and only it
    arm_fault("")
    markers = {p.name: p.read_text() for p in (Path(cfg.out) / "_done").glob("*.json")}
    again = score_corpus(cfg, cfg.out, warmup=str(tiny_lora))
    assert again.status_counts == {"ok": 40} and again.shards_skipped == 3
    changed = [p.name for p in (Path(cfg.out) / "_done").glob("*.json") if p.read_text() != markers[p.name]]
    assert changed == ["shard-00000001.json"]
    got = _table(cfg.out)
    for col in SCORE_COLS:
        np.testing.assert_allclose(got[col], reference[col][:40], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def strict_chat_model(tmp_path_factory, tiny_model):
    """The tiny model with a chat template that raises on system turns, as Llama-2/Mistral/Gemma's do."""
    import shutil

    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("strict") / "model"
    shutil.copytree(tiny_model, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    tok.save_pretrained(out)
    return out


def _chat_corpus(path: Path, n: int, with_system: set[int]) -> None:
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"What is {i} times 3?"}, {"role": "assistant", "content": f"{3 * i}."}]
        if i in with_system:
            msgs.insert(0, {"role": "system", "content": "Be brief."})
        rows.append(json.dumps({"messages": msgs}))
    path.write_text("\n".join(rows) + "\n")


def test_raising_chat_template_gives_template_error_rows(tmp_path, ray_local, strict_chat_model):
    data = tmp_path / "chat.jsonl"
    _chat_corpus(data, 40, {5})
    cfg = make_config(tmp_path, [data], strict_chat_model, data={"shard_rows": 20}, template={"kind": "chat"})
    summary = score_corpus(cfg, cfg.out)
    assert summary.status_counts == {"ok": 39, "template_error": 1}
    got = _table(cfg.out)
    assert got["status"][5] == "template_error" and "System role not supported" in got["reason"][5]


def test_more_failed_rows_than_allowed_fail_the_run_with_exit_1(tmp_path, ray_local, strict_chat_model, capsys):
    from instructdiff_ray.cli import main

    data = tmp_path / "chat.jsonl"
    _chat_corpus(data, 40, {1, 9, 30})  # 7.5% > the default 5%
    code = main(["score", "--data", str(data), "--base", str(strict_chat_model), "--template", "chat", "--out",
                 str(tmp_path / "out"), "--shard-rows", "20", "--threads", "1", "--progress", "off"])
    err = capsys.readouterr().err
    assert code == 1 and "3 of 40 rows (7.5%) failed" in err and "run.max_error_fraction=0.05" in err
    assert len(list((tmp_path / "out" / "_done").glob("*.json"))) == 2  # everything was written first
    assert not (tmp_path / "out" / "_lease.json").exists()


def test_second_driver_refused_then_takes_over_after_the_lease_expires(tmp_path, tiny_model, tiny_lora, gsm8k):
    out = tmp_path / "scores"
    args = ["score", "--data", str(gsm8k), "--limit", "40", "--shard-rows", "10", "--base", str(tiny_model), "--warmup",
            str(tiny_lora), "--out", str(out), "--threads", "1", "--progress", "off", "--set", "run.lease_ttl_s=3"]
    reached = tmp_path / "first-driver-is-writing"
    tag = f"instructdiff-lease-{tmp_path.name}"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", INSTRUCTDIFF_TEST_TAG=tag,
               INSTRUCTDIFF_FAULT=f"shard.before_marker:pause={reached}")
    env.pop("RAY_ADDRESS", None)
    env.pop("INSTRUCTDIFF_FAULT_FILE", None)
    first = subprocess.Popen([sys.executable, "-m", "instructdiff_ray", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not reached.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert reached.exists(), "the first driver never reached its first shard"
        rc, err = _run_cli(args, tag + "-second")
        assert rc == 4 and f"pid {first.pid} on" in err and "in use by another driver" in err
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        kill_processes_mentioning(tag)
        first.wait()
    assert json.loads((out / "_lease.json").read_text())["pid"] == first.pid  # a dead driver's lease stays ...
    time.sleep(3.5)  # ... until its ttl runs out
    rc, err = _run_cli(args, tag + "-third")
    assert rc == 0, err[-3000:]
    markers = [json.loads(p.read_text()) for p in (out / "_done").glob("*.json")]
    assert sum(m["rows"] for m in markers) == 40 and len(markers) == 4


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
                      template={"max_length": 256}, run={"max_invalid_fraction": 1.0})
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


def test_bad_input_is_accounted_for_and_limited(tmp_path, ray_local, tiny_model, tiny_lora, gsm8k, capsys):
    """15 rows, 2 malformed and 1 of another shape: one line says so, and 20% bad input is over the limit."""
    lines = Path(gsm8k).read_text().splitlines()[:12]
    lines[3:3] = ['{"question": "broken', '{"question": "no answer here"}', "not json at all"]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = ["score", "--data", str(data), "--base", str(tiny_model), "--warmup", str(tiny_lora), "--threads", "1",
            "--progress", "on", "--out"]
    assert main(args + [str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    account = next(line for line in err.splitlines() if "15 rows:" in line)
    assert "15 rows: 12 ok, 2 malformed_json, 1 unknown_shape; most frequent: " in account and "_quarantine/" in account
    assert "3 of 15 rows (20.0%) are not usable input" in err and "run.max_invalid_fraction=0.05" in err
    assert len(list((tmp_path / "a" / "_done").glob("*.json"))) == 1  # everything was written first
    assert main(args + [str(tmp_path / "b"), "--set", "run.max_invalid_fraction=0.25"]) == 0


def test_s3_corpus_and_run_dir_with_resume(s3, s3_server, reference, tmp_path, ray_local, tiny_model, tiny_lora, gsm8k):
    from instructdiff_ray.config import SelectionConfig
    from instructdiff_ray.selection import load_scores, select, write_selection

    lines = Path(gsm8k).read_text().splitlines()[:200]
    s3.mkdir("instructdiff-test")
    with s3.open("instructdiff-test/corpus/gsm8k.jsonl", "w") as f:
        f.write("\n".join(lines) + "\n")
    out = "s3://instructdiff-test/run/scores"
    cfg = make_config(tmp_path, ["s3://instructdiff-test/corpus/gsm8k.jsonl"], tiny_model,
                      data={"shard_rows": 10}, out=out)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"warmup": str(tiny_lora)})})
    first = score_job(cfg)  # under a lease kept on the object store
    assert not s3.exists("instructdiff-test/run/scores/_lease.json")
    s3.rm("instructdiff-test/run/scores/_done/shard-00000004.json")
    s3.rm("instructdiff-test/run/scores/shard-00000007.parquet")
    s3.rm("instructdiff-test/run/scores/_done/shard-00000007.json")
    layer = s3_server.layer
    layer.reset()  # the store answers 503 to some marker and shard writes (the workers' own requests)
    layer.fail("PUT /instructdiff-test/run/scores/_done/", times=3)
    layer.fail("PUT /instructdiff-test/run/scores/.shard-00000007", times=2)
    try:
        again = score_job(cfg)
    finally:
        failed = list(layer.failed)
        layer.reset()
    assert len(failed) == 5, failed
    assert first.shards_skipped == 0 and again.shards_skipped == 18 and again.rows == 200
    table = load_scores(out)
    got = table.sort_by("source_row").to_pydict()
    assert got["source_row"] == list(range(200))
    for col in SCORE_COLS:
        np.testing.assert_allclose(got[col], reference[col], atol=1e-6, rtol=0)
    paths = write_selection(select(table, SelectionConfig()), "s3://instructdiff-test/run/selection")
    assert s3.exists(paths["data"]) and len(s3.cat(paths["data"]).splitlines()) > 10
