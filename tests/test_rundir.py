"""The run directory's storage guarantees, on a local disk and on S3 (moto behind a layer that
injects 503s and outages): atomic writes, unreadable records, the lease through store faults,
temporaries, object keys, reads sized to the work."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from instructdiff_ray import rundir
from instructdiff_ray.rundir import Lease, LeaseHeld, LeaseLost


class Boom(RuntimeError):
    pass


def _write_then_fail(url: str) -> None:
    with pytest.raises(Boom):
        with rundir.open_atomic(url, "wb") as f:
            f.write(b'{"half": ')
            raise Boom()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_exception_mid_write_leaves_the_final_key_as_it_was(where, tmp_path, request):
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        s3.mkdir("atomic")
        root = "s3://atomic/run"
    else:
        root = str(tmp_path / "run")
    fs, path = rundir.fs_of(root)
    url = rundir.join(root, "_done", "shard-00000001.json")
    _write_then_fail(url)
    assert not fs.exists(rundir.fs_of(url)[1])  # nothing at the final key
    rundir.write_json(url, {"shard_id": 1, "ok": True})
    _write_then_fail(url)
    assert rundir.read_json(url) == {"shard_id": 1, "ok": True}  # the committed record is untouched
    leftovers = [p for p in fs.find(path) if p.rsplit("/", 1)[-1].startswith(".")]
    assert leftovers == []


def test_unreadable_records_count_as_absent_with_a_warning(tmp_path, caplog):
    scores = tmp_path / "scores"
    rundir.write_json(str(scores / "_done" / "shard-00000000.json"), {"shard_id": 0, "status_counts": {"ok": 3}})
    (scores / "_done" / "shard-00000001.json").write_text('{"shard_id": 1, "status_co')  # truncated by an old writer
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / rundir.WARMUP_STAMP).write_bytes(b"\x00\x00")
    (tmp_path / "selection").mkdir()
    (tmp_path / "selection" / rundir.SELECTION_COMMIT).write_text("[1, 2")
    assert set(rundir.finished_markers(str(scores))) == {0}
    assert rundir.warmup_stamp(str(tmp_path / "warmup")) is None
    assert rundir.committed_selection(str(tmp_path / "selection")) is None
    assert "shard-00000001.json is unreadable" in caplog.text and "treating it as absent" in caplog.text


def test_only_old_temporaries_are_removed(tmp_path):
    old, young = tmp_path / ".a.json.1234.tmp", tmp_path / ".b.json.5678.tmp"
    old.write_text("x")
    young.write_text("y")
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert rundir.clean_temporaries(str(tmp_path), older_than_s=50) == 1
    assert not old.exists() and young.exists()


def test_a_lease_left_by_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    holder = {"id": "x", "host": __import__("socket").gethostname(), "pid": pid, "pid_ns": os.readlink("/proc/self/ns/pid"),
              "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(), "started_at": time.time(),
              "heartbeat_at": time.time(), "ttl_s": 120}
    rundir.write_json(str(tmp_path / rundir.LEASE), holder)
    with Lease(str(tmp_path), ttl_s=120) as lease:
        assert rundir.read_json(str(tmp_path / rundir.LEASE))["id"] == lease.id
    # a live process (this one's parent), another host, another container on this host, another machine of the same
    # host name: refused until the ttl runs out
    for other in ({"pid": os.getppid()}, {"host": "another-host"}, {"pid_ns": "pid:[1]"}, {"boot_id": "another-boot"}):
        rundir.write_json(str(tmp_path / rundir.LEASE), {**holder, **other, "heartbeat_at": time.time()})
        with pytest.raises(LeaseHeld, match="in use by another driver"):
            Lease(str(tmp_path), ttl_s=120).acquire()


@pytest.fixture
def faults(s3_server):
    s3_server.layer.reset()
    yield s3_server.layer
    s3_server.layer.reset()


def _hold(lease: Lease, seconds: float) -> float:
    """Work inside the lease for `seconds`; returns when it stopped (the lease may stop it early)."""
    t0 = time.time()
    with lease:
        while time.time() - t0 < seconds:
            time.sleep(0.05)
    return time.time() - t0


def test_lease_renewals_survive_503s_and_a_short_outage(s3, faults):
    s3.mkdir("lease-ok")
    run = "s3://lease-ok/run"
    lease = Lease(run, ttl_s=30, settle_s=0.1, beat_s=0.5)  # one renewal can take 10 s in the store client's retries
    done = {}

    def work():
        done["held"] = _hold(lease, 12.0)

    t = threading.Thread(target=work)
    t.start()
    time.sleep(1.0)
    faults.fail("PUT /lease-ok/run/", times=4)  # renewals (and their copies into place) fail
    time.sleep(1.5)
    # every request of this bucket fails for 6 s: longer than the store client's backoff after the 503s, so
    # renewals are certain to meet the outage (a 2 s one could pass while a renewal was backing off)
    faults.outage(6.0, match="/lease-ok/")
    time.sleep(6.5)
    with pytest.raises(LeaseHeld, match="in use by another driver"):  # a second driver, after the outage
        Lease(run, ttl_s=30, settle_s=0.1).acquire()
    t.join()
    assert lease.lost is None and done["held"] >= 12.0
    assert sum("_lease.json" in line for line in faults.failed) > 4  # renewals failed, during the outage too
    assert not s3.exists("lease-ok/run/_lease.json")  # released at the end


def test_a_driver_that_cannot_renew_its_lease_stops(s3, faults):
    s3.mkdir("lease-lost")
    lease = Lease("s3://lease-lost/run", ttl_s=2, settle_s=0.1)
    t0 = time.time()
    with pytest.raises(LeaseLost, match="could not renew the lease"):
        with lease:
            faults.outage(30.0, match="/lease-lost/")
            while time.time() - t0 < 30:
                time.sleep(0.05)
    assert time.time() - t0 < 2 + 1.5  # within its ttl, not after the outage


def test_object_keys_outside_a_model_directory_are_refused(s3):
    from instructdiff_ray.models import ModelNotFound, _listing

    s3.mkdir("models")
    s3.pipe("models/tiny/config.json", b"{}")
    s3.pipe("models/tiny/../escape.txt", b"x")  # a key, not a path: S3 stores it as written
    found = s3.find("models/tiny")
    if not any(".." in p for p in found):
        pytest.skip("this S3 server normalises '..' in keys")
    with pytest.raises(ModelNotFound, match="outside the model's directory"):
        _listing("s3://models/tiny")


def test_compare_never_runs_a_command_read_from_the_run_directory(tmp_path, gsm8k, tiny_model, caplog):
    from instructdiff_ray.compare import config_for

    run = tmp_path / "run"
    tree = {"out": str(run), "data": {"paths": [str(gsm8k)]}, "model": {"base": str(tiny_model)},
            "compare": {"eval": [str(gsm8k)], "eval_command": f"touch {tmp_path}/pwned"}}
    rundir.write_json(str(run / rundir.RUN_CONFIG), {"invocations": [{"config": tree}]})
    cfg = config_for(str(run), {})
    assert cfg.compare.eval_command is None
    assert "is not run" in caplog.text
    mine = config_for(str(run), {"eval_command": "echo '{\"x\": 1}'"})
    assert mine.compare.eval_command == "echo '{\"x\": 1}'"


def test_jsonl_on_s3_fetches_each_byte_about_once(s3, faults, tmp_path, gsm8k):
    """Planning and reading a JSONL corpus on S3: bytes served per corpus byte (fsspec's
    readline fetched a 50 MiB block per line, and every read unit read ahead 50 MiB)."""
    from instructdiff_ray.config import DataConfig
    from instructdiff_ray.corpus import iter_unit, load_plan, read_units

    lines = Path(gsm8k).read_text().splitlines(keepends=True)
    body = "".join(lines * 2).encode()  # ~8 MB, 14,946 rows
    s3.mkdir("corpus-bytes")
    s3.pipe("corpus-bytes/c.jsonl", body)
    faults.reset()
    plan = load_plan(DataConfig(paths=["s3://corpus-bytes/c.jsonl"], shard_rows=500), None)
    plan_bytes = faults.bytes_out
    faults.reset()
    rows = sum(len(raw) for unit in read_units(plan.shards) for _, raw in iter_unit(unit))
    assert rows == len(lines) * 2
    assert plan_bytes <= 1.05 * len(body), plan_bytes / len(body)  # the fingerprint reads nothing
    assert faults.bytes_out <= 1.1 * len(body), faults.bytes_out / len(body)
    local = tmp_path / "c.jsonl"
    local.write_bytes(body)
    same = load_plan(DataConfig(paths=[str(local)], shard_rows=500), None)
    assert [(s.byte_start, s.byte_stop, s.n_rows) for s in same.shards] == [(s.byte_start, s.byte_stop, s.n_rows) for s in plan.shards]


def _root(where: str, tmp_path, request, bucket: str) -> str:
    if where == "s3":
        request.getfixturevalue("s3").mkdir(bucket)
        return f"s3://{bucket}/run"
    return str(tmp_path / "run")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_stage_that_finishes_at_once_is_reused_refused_or_replaced(where, tmp_path, request):
    """Warmup-like stage: the fingerprint is in the done record, written last."""
    from instructdiff_ray.rundir import FingerprintMismatch, Stage

    stage = Stage("warmup", rundir.join(_root(where, tmp_path, request, "stage-once"), "round-1", "warmup"))
    fp = {"lr": 1e-4, "rows": {"n": 10}}
    assert stage.open(fp, replace=False) == [] and stage.done() is None  # new
    rundir.write_bytes(stage.path("adapter", "weights.bin"), b"w")
    stage.finish({"result": 1}, fp)
    assert stage.open(fp, replace=False) == [] and stage.done()["result"] == 1  # unchanged: reused
    other = {"lr": 2e-4, "rows": {"n": 11}}
    with pytest.raises(FingerprintMismatch, match=r"differs in: lr, rows\.n: it was trained on other rows.*--recompute warmup"):
        stage.open(other, replace=False)
    assert stage.done()["result"] == 1 and rundir.exists(stage.path("adapter", "weights.bin"))  # refused: untouched
    assert stage.open(other, replace=True) == ["lr", "rows.n"]
    assert stage.done() is None and not rundir.exists(stage.path("adapter", "weights.bin"))  # only its own directory
    stage.finish({"result": 2}, other)
    stage.retract()
    assert stage.done() is None


def test_a_record_holding_a_retired_setting_still_matches(tmp_path):
    """A warmup trained before gradient checkpointing left its fingerprint is reused whatever the
    setting is now; every other setting still decides."""
    from instructdiff_ray.config import build_config
    from instructdiff_ray.rundir import FingerprintMismatch, Stage
    from instructdiff_ray.warmup import warmup_fingerprint

    cfg = build_config({"out": str(tmp_path / "run"), "data": {"paths": [str(tmp_path)]}, "model": {"base": "smollm2"}})
    fp = warmup_fingerprint(cfg, "smollm2", (10, "abc"))
    assert "gradient_checkpointing" not in fp["warmup"]
    stage = Stage("warmup", str(tmp_path / "warmup"))
    stage.finish({"result": 1}, {**fp, "warmup": {**fp["warmup"], "gradient_checkpointing": True}})  # as recorded before
    on = cfg.model_copy(update={"warmup": cfg.warmup.model_copy(update={"gradient_checkpointing": True})})
    assert warmup_fingerprint(on, "smollm2", (10, "abc")) == fp
    assert stage.open(fp, replace=False) == [] and stage.done()["result"] == 1
    with pytest.raises(FingerprintMismatch, match="warmup.learning_rate"):
        stage.open({**fp, "warmup": {**fp["warmup"], "learning_rate": 1.0}}, replace=False)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_stage_with_items_records_its_fingerprint_first_and_keeps_finished_items(where, tmp_path, request, caplog):
    """Scores-like stage: manifest first, item markers, unreadable markers absent, an unreadable
    manifest refused; compare-like items have nested names."""
    from instructdiff_ray.rundir import FingerprintMismatch, Stage

    root = _root(where, tmp_path, request, "stage-items")
    scores = Stage("scores", rundir.join(root, "round-1", "scores"))
    fp = {"engine": "hf"}
    assert scores.open(fp, replace=False, extra={"plan_hash": "p1"}, record={"plan": [1, 2]}) == []
    assert rundir.read_manifest(scores.dir)["plan"] == [1, 2]
    scores.finish_item("shard-00000000", {"shard_id": 0})
    rundir.write_bytes(scores.item_path("shard-00000001"), b'{"shard_id": 1')  # damaged by hand
    assert scores.open(fp, replace=False, extra={"plan_hash": "p1"}) == []  # a resume keeps finished items
    assert list(scores.items()) == ["shard-00000000"] and "treating it as absent" in caplog.text
    with pytest.raises(FingerprintMismatch, match=r"differs in: plan_hash\).*--recompute scores"):
        scores.open(fp, replace=False, extra={"plan_hash": "p2"})
    assert scores.open({"engine": "vllm"}, replace=True, extra={"plan_hash": "p2"}) == ["engine", "plan_hash"]
    assert scores.items() == {} and rundir.read_manifest(scores.dir)["fingerprint"] == {"engine": "vllm"}
    rundir.write_bytes(scores.path(rundir.MANIFEST), b"{")
    with pytest.raises(FingerprintMismatch, match="is unreadable, so what .* was made from is unknown"):
        scores.open({"engine": "vllm"}, replace=False, extra={"plan_hash": "p2"})

    compare = Stage("compare", rundir.join(root, "compare"))
    compare.open({"heldout": 1}, replace=False)
    for unit in ("random/seed-0", "base", "instructdiff/seed-1"):
        compare.finish_item(unit, {"unit": unit})
    assert list(compare.items()) == ["base", "instructdiff/seed-1", "random/seed-0"]
    with pytest.raises(FingerprintMismatch, match="remove that directory"):
        compare.open({"heldout": 2}, replace=False)


def test_marker_writes_commits_and_reads_survive_connection_resets(s3, faults):
    """Connections cut before a response (on the temporary's upload, the copy into place and the
    reads) and responses cut off halfway: the store client retries, and every record reads back
    whole, never as the half that arrived."""
    from s3server import RESET, TRUNCATE

    from instructdiff_ray.rundir import Stage

    s3.mkdir("resets")
    scores = Stage("scores", "s3://resets/run/round-1/scores")
    faults.fail("PUT /resets/run/round-1/scores/_done/.shard-00000001", times=2, status=RESET)  # the temporary
    faults.fail("PUT /resets/run/round-1/scores/_done/shard-00000001.json", times=2, status=RESET)  # copy into place
    faults.fail("POST /resets?delete", times=1, status=RESET)  # the temporary's removal
    marker = {"shard_id": 1, "status_counts": {"ok": 100}, "pad": "x" * 5000}
    scores.finish_item("shard-00000001", marker, point="marker")
    selection = Stage("selection", "s3://resets/run/round-1/selection")
    faults.fail("PUT /resets/run/round-1/selection/", times=3, status=RESET)
    selection.finish({"paths": {}, "selected_rows": 3}, {"budget": 0.1})
    assert [rule.times for rule in faults.rules] == [0, 0, 0, 0], faults.failed  # every cut happened
    faults.reset()
    faults.fail("GET /resets/run/round-1/scores/_done/shard-00000001.json", times=2, status=TRUNCATE)
    assert scores.items() == {"shard-00000001": marker}
    faults.fail("GET /resets/run/round-1/selection/_SELECTION_DONE.json", times=2, status=TRUNCATE)
    assert selection.done()["selected_rows"] == 3
    faults.fail("GET /resets/run/round-1/selection/_SELECTION_DONE.json", times=2, status=RESET)
    assert selection.changes({"budget": 0.1}) == []
    assert len(faults.failed) == 6
    assert not [p for p in s3.find("resets/run") if p.rsplit("/", 1)[-1].startswith(".")]  # no temporary left


def test_lease_renewals_survive_connection_resets(s3, faults):
    from s3server import RESET

    s3.mkdir("lease-resets")
    run = "s3://lease-resets/run"
    lease = Lease(run, ttl_s=30, settle_s=0.1, beat_s=0.3)
    done = {}
    t = threading.Thread(target=lambda: done.update(held=_hold(lease, 5.0)))
    t.start()
    time.sleep(0.5)
    faults.fail("/lease-resets/run/", times=6, status=RESET)  # renewals' reads, uploads and copies are cut
    time.sleep(3.0)
    with pytest.raises(LeaseHeld, match="in use by another driver"):
        Lease(run, ttl_s=30, settle_s=0.1).acquire()
    t.join()
    assert lease.lost is None and done["held"] >= 5.0 and len(faults.failed) == 6
