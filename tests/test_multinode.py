"""A real multi-node Ray cluster on one machine: head + worker started with `ray start`, the job
submitted with `ray job submit`, scoring actors on both nodes; then a worker node lost mid-run."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import kill_processes_mentioning

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Two nodes on one machine must not share the per-node agent ports (fixed defaults otherwise)."""
    return ["--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
            "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port())]


def _env():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture()
def cluster(tmp_path):
    import ray

    ray.shutdown()  # this module drives its own cluster; the session's local one must not linger
    port, dash = _free_port(), _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # unix socket paths must stay under 108 bytes
    env = dict(_env(), INSTRUCTDIFF_TEST_TAG=ray_tmp)  # inherited by every process of this cluster
    head = subprocess.run(
        [BIN / "ray", "start", "--head", "--port", str(port), "--num-cpus", "3", "--dashboard-port", str(dash),
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--temp-dir", ray_tmp, *_node_ports()],
        env=env, capture_output=True, text=True, timeout=120)
    assert head.returncode == 0, head.stderr[-2000:]
    worker = subprocess.Popen([BIN / "ray", "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "3", "--block",
                               *_node_ports()],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        out = subprocess.run([BIN / "ray", "status", "--address", f"127.0.0.1:{port}"], env=env, capture_output=True, text=True)
        if out.stdout.count("node_") >= 2:
            break
        time.sleep(2)
    else:
        pytest.fail("the worker node never joined")
    yield {"dashboard": f"http://127.0.0.1:{dash}", "worker": worker, "env": env}
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=60)
    kill_processes_mentioning(ray_tmp)  # only this cluster's processes (`ray stop` would kill every Ray here)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _job(tmp_path, tiny_model, gsm8k, out, limit, shard_rows, min_actors=1):
    # 2-CPU actors on 3-CPU nodes: two actors can only run on two different nodes
    cfg = {"out": str(out), "data": {"paths": [str(gsm8k)], "limit": limit, "shard_rows": shard_rows},
           "model": {"base": str(tiny_model)}, "warmup": {"count": 40, "max_steps": 3},
           "engine": {"threads": 1}, "ray": {"min_actors": min_actors, "max_actors": 2, "cpus_per_actor": 2},
           "progress": "off"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "job.yaml"


def _submit(cluster, tmp_path, wait=True):
    cmd = [BIN / "ray", "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(tmp_path)]
    cmd += [] if wait else ["--no-wait"]
    cmd += ["--", str(BIN / "python"), "-m", "instructdiff_ray", "run", "job.yaml"]
    for _ in range(30):  # the dashboard's job agent comes up a little after the node
        res = subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in res.stderr:
            return res
        time.sleep(2)
    return res


def _single_process_selection(tmp_path, tiny_model, gsm8k, limit, shard_rows):
    local = tmp_path / "local"
    local.mkdir()
    job = _job(local, tiny_model, gsm8k, local / "run", limit, shard_rows)
    code = subprocess.run([BIN / "python", "-m", "instructdiff_ray", "run", str(job), "--set", "ray.max_actors=1",
                           "--set", "ray.cpus_per_actor=1"],
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert code.returncode == 0, code.stderr[-3000:]
    return (local / "run" / "round-1" / "selection" / "selected_ids.txt").read_text()


def _rows_once(run_dir: Path, limit: int):
    import pyarrow.parquet as pq

    t = pq.read_table(run_dir / "round-1" / "scores").to_pydict()
    assert sorted(t["source_row"]) == list(range(limit))
    return [json.loads(p.read_text()) for p in (run_dir / "round-1" / "scores" / "_done").glob("*.json")]


def test_job_on_two_nodes_equals_single_process(cluster, tmp_path, tiny_model, gsm8k):
    _job(tmp_path, tiny_model, gsm8k, tmp_path / "run", 240, 20, min_actors=2)
    res = _submit(cluster, tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    markers = _rows_once(tmp_path / "run", 240)
    assert len({m["node"] for m in markers}) == 2  # scoring actors ran on both nodes
    expected = _single_process_selection(tmp_path, tiny_model, gsm8k, 240, 20)
    assert (tmp_path / "run" / "round-1" / "selection" / "selected_ids.txt").read_text() == expected


def test_losing_a_worker_node_mid_scoring(cluster, tmp_path, tiny_model, gsm8k):
    run = tmp_path / "run"
    _job(tmp_path, tiny_model, gsm8k, run, 400, 10)
    res = _submit(cluster, tmp_path, wait=False)
    assert res.returncode == 0, res.stderr[-2000:]
    job_id = next(w for w in res.stdout.split() if w.startswith("raysubmit_"))
    done = run / "round-1" / "scores" / "_done"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(done.glob("*.json"))) < 3:
        time.sleep(0.5)
    finished_before = len(list(done.glob("*.json")))
    assert 3 <= finished_before < 40, "scoring finished before the node could be killed"
    os.killpg(cluster["worker"].pid, signal.SIGKILL)  # the node's raylet and its workers die at once
    logs = subprocess.run([BIN / "ray", "job", "logs", "--address", cluster["dashboard"], "--follow", job_id],
                          env=cluster["env"], capture_output=True, text=True, timeout=900)
    status = subprocess.run([BIN / "ray", "job", "status", "--address", cluster["dashboard"], job_id],
                            env=cluster["env"], capture_output=True, text=True, timeout=60).stdout
    if "SUCCEEDED" not in status:  # documented recovery: resubmit the same job, it resumes
        again = _submit(cluster, tmp_path)
        assert again.returncode == 0, (again.stdout + again.stderr + logs.stdout)[-3000:]
    _rows_once(run, 400)
    assert (run / "round-1" / "selection" / "selected_ids.txt").exists()
