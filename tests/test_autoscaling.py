"""Autoscaling and preemption with Ray's own fake multi-node autoscaler: a CPU head that offers
nothing, one worker type that advertises a logical GPU (min 0, max 3) while the engine runs on
CPU. The autoscaler adds GPU nodes while shards are queued, a node that is scoring is killed
(spot preemption), every row ends up scored exactly once, and idle nodes are removed afterwards."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import tiny
from conftest import HF_HOME, kill_processes_mentioning

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
BUCKET = "instructdiff-autoscale"
REPO, SHA = "instructdiff-test/autoscale-llama", "a" * 40
ROWS = 2000  # enough queued shards (100) that the pool outgrows its first node


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _autoscaling_config(port: int) -> dict:
    return {
        "cluster_name": "instructdiff-fake", "max_workers": 3, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "fake_gpu": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 3},
        },
        "head_node_type": "ray.head.default", "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.fixture()
def fake_cluster(tmp_path, s3):
    import ray

    ray.shutdown()
    port = _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    (tmp_path / "autoscaler.yaml").write_text(yaml.safe_dump(_autoscaling_config(port)))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
               INSTRUCTDIFF_TEST_TAG=ray_tmp, PATH=f"{BIN}:{os.environ['PATH']}")
    for key in ("RAY_ADDRESS", "INSTRUCTDIFF_FAULT_FILE"):
        env.pop(key, None)
    head = subprocess.run([BIN / "ray", "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                           "--num-cpus", "0", "--num-gpus", "0", "--include-dashboard", "false", "--temp-dir", ray_tmp,
                           f"--autoscaling-config={tmp_path / 'autoscaler.yaml'}"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert head.returncode == 0, head.stderr[-2000:]
    yield {"address": f"127.0.0.1:{port}", "env": env}
    ray.shutdown()
    kill_processes_mentioning(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _alive_worker_nodes(ray) -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]


def test_autoscaling_grows_the_pool_survives_preemption_and_scales_down(fake_cluster, tmp_path, s3, tiny_model, tiny_lora, gsm8k):
    import ray

    tiny.add_to_hub_cache(HF_HOME, REPO, tiny_model, SHA)
    s3.mkdir(BUCKET)
    lines = gsm8k.read_text().splitlines()[:ROWS]
    s3.pipe(f"{BUCKET}/corpus.jsonl", ("\n".join(lines) + "\n").encode())
    s3.put(str(tiny_lora) + "/", f"{BUCKET}/lora/", recursive=True)
    cfg = {"out": f"s3://{BUCKET}/run", "data": {"paths": [f"s3://{BUCKET}/corpus.jsonl"], "shard_rows": 20},
           "model": {"base": REPO, "warmup": f"s3://{BUCKET}/lora"}, "engine": {"threads": 1},
           # Autoscaler v1 (the VM launcher's default) does not publish its node types to the driver, so with no
           # GPU node up yet the GPU request is stated; autoscaler v2 publishes them (runtime.cluster_offers_gpus).
           "ray": {"min_actors": 2, "max_actors": 3, "cpus_per_actor": 1, "gpus_per_actor": 1, "max_restarts": 5,
                   "max_task_retries": 5},
           "progress": "off"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(fake_cluster["env"], RAY_ADDRESS=fake_cluster["address"])
    cmd = [BIN / "python", "-m", "instructdiff_ray", "run", str(tmp_path / "job.yaml")]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ray.init(address=fake_cluster["address"], logging_level="ERROR")
    done = f"{BUCKET}/run/round-1/scores/_done"
    seen_nodes: set[str] = set()
    killed = None
    deadline = time.time() + 600
    while driver.poll() is None and time.time() < deadline:
        nodes = _alive_worker_nodes(ray)
        seen_nodes.update(nodes)
        if killed is None:
            s3.invalidate_cache()
            paths = s3.glob(f"{done}/*.json") if s3.exists(done) else []
            scoring_nodes = {json.loads(b)["node"] for b in s3.cat(paths).values()} if paths else set()
            if len(scoring_nodes) >= 2:  # the pool has grown onto a second node: preempt one of them
                killed = sorted(scoring_nodes)[-1]
                kill_processes_mentioning(killed)  # a spot node vanishes: its raylet and workers die at once
        time.sleep(0.5)
    err = driver.communicate(timeout=60)[1].decode()
    if driver.returncode != 0:  # documented recovery from a lost node: rerun the same command, it resumes
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, (err + again.stderr)[-4000:]
    assert killed is not None, f"the pool never scored on two nodes before the end (nodes seen {seen_nodes}):\n{err[-3000:]}"
    assert len(seen_nodes) >= 2  # the autoscaler added GPU nodes for a driver on a CPU head
    s3.invalidate_cache()
    files = sorted(s3.glob(f"{BUCKET}/run/round-1/scores/shard-*.parquet"))
    table = pa.concat_tables([pq.read_table(s3.open(f, "rb")) for f in files])
    assert sorted(table.column("source_row").to_pylist()) == list(range(ROWS))  # every row exactly once
    markers = [json.loads(s3.cat(p)) for p in s3.glob(f"{done}/*.json")]
    assert len({m["actor"] for m in markers}) >= 2 and set(table.column("status").to_pylist()) == {"ok"}
    deadline = time.time() + 120
    while _alive_worker_nodes(ray) and time.time() < deadline:  # idle nodes go away
        time.sleep(2)
    assert not _alive_worker_nodes(ray), "idle worker nodes were not removed"


def test_a_head_only_autoscaling_cluster_refuses_local_paths_and_sizes_training_by_gpus(fake_cluster, tmp_path,
                                                                                          tiny_model, gsm8k):
    """Before any worker exists: the cluster's configuration (an autoscaler, a head that offers
    nothing) makes it multi-node, so local paths are refused before anything is written; scoring
    actors of a TP-2 vllm engine ask for two GPUs, each training worker for one."""
    import ray

    env = dict(fake_cluster["env"], RAY_ADDRESS=fake_cluster["address"])
    out = tmp_path / "run"
    res = subprocess.run([BIN / "python", "-m", "instructdiff_ray", "run", "--data", str(gsm8k), "--limit", "20",
                          "--base", str(tiny_model), "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: out: {out} is a local path")
    assert "Traceback" not in res.stderr and not out.exists()  # nothing written, not even the log

    from instructdiff_ray import runtime
    from instructdiff_ray.config import build_config

    ray.init(address=fake_cluster["address"], logging_level="ERROR")
    try:
        assert [n for n in ray.nodes() if n["Alive"]] and not _alive_worker_nodes(ray)  # still head-only
        assert runtime._is_multi_node()
        deadline = time.time() + 30  # the autoscaler's own report (a head with CPUs would be told apart by it)
        while not runtime._autoscaler_v1_running() and time.time() < deadline:
            time.sleep(0.5)
        assert runtime._autoscaler_v1_running()
        cfg = build_config({"out": "s3://b/run", "data": {"paths": ["s3://b/c.jsonl"]}, "model": {"base": "smollm2"},
                            "engine": {"name": "vllm", "tensor_parallel_size": 2}, "ray": {"gpus_per_actor": 2}})
        assert runtime.gpus_per_actor(cfg) == 2 and runtime.training_gpus(cfg) == 1
    finally:
        ray.shutdown()
