"""A cluster whose nodes share nothing but object storage, on one machine: a head that offers no
resources for work, and worker nodes that each run in their own mount namespace (the tests'
temporary root replaced by an empty tmpfs, holding the node's own $HOME, model cache and Hugging
Face cache) and advertise one logical GPU while the engine runs on CPU. The corpus, the run directory and a LoRA warmup live on the local S3 server; the base model
is a Hugging Face Hub id that each worker finds in its own offline cache. Jobs go in with
`ray job submit`; a worker node is lost mid-run and the resubmitted job completes."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

import tiny
from conftest import kill_processes_mentioning

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
BUCKET = "instructdiff-cluster"
REPO, SHA = "instructdiff-test/cluster-llama", "c" * 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TAKEN: set[int] = set()


def _unique_port() -> int:
    """A free port not handed out before in this session (the OS may offer a just-released one again)."""
    while (port := _free_port()) in _TAKEN:
        pass
    _TAKEN.add(port)
    return port


def _node_ports() -> list[str]:
    """Nodes on one machine must not share the per-node ports (fixed defaults otherwise)."""
    return ["--dashboard-agent-listen-port", str(_unique_port()), "--dashboard-agent-grpc-port", str(_unique_port()),
            "--metrics-export-port", str(_unique_port()), "--runtime-env-agent-port", str(_unique_port()),
            "--node-manager-port", str(_unique_port()), "--object-manager-port", str(_unique_port())]


def _env(**extra):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}:{os.environ['PATH']}", **extra)
    for key in ("RAY_ADDRESS", "INSTRUCTDIFF_FAULT_FILE", "INSTRUCTDIFF_CACHE"):
        env.pop(key, None)
    return env


def _worker_node(port: int, hf_cache: Path, env: dict, private: Path) -> subprocess.Popen:
    """`ray start` in a new mount namespace where `private` (the tests' temporary root, holding every
    file the tests made: models, corpora, run directories) is a fresh, empty tmpfs; this node's $HOME,
    model cache and HF cache live there, the HF cache filled from a tar stream of `hf_cache`. The
    installed code stays visible, as on a real node; nothing the tests wrote does."""
    script = ("mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray && "  # Ray's own per-node session files, as on a real node
              f"mount -t tmpfs tmpfs {private} && mkdir -p {private}/home {private}/hf && tar -C {private}/hf -xf - && "
              f"exec {BIN}/ray start --address 127.0.0.1:{port} --num-cpus 2 --num-gpus 1 --block "
              + " ".join(_node_ports()))
    tar = subprocess.Popen(["tar", "-C", str(hf_cache), "-cf", "-", "."], stdout=subprocess.PIPE)
    node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", script], stdin=tar.stdout,
                            env=dict(env, HOME=f"{private}/home", HF_HOME=f"{private}/hf"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    tar.stdout.close()
    tar.wait()
    return node


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3, tiny_model):
    import ray

    ray.shutdown()  # this module drives its own cluster; the session's local one must not linger
    hf = tmp_path_factory.mktemp("hf-template")
    tiny.add_to_hub_cache(hf, REPO, tiny_model, SHA)
    port, dash = _free_port(), _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # unix socket paths must stay under 108 bytes
    env = _env(INSTRUCTDIFF_TEST_TAG=ray_tmp, HF_HOME=str(hf), HF_HUB_OFFLINE="1")

    def teardown():
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
                w.wait(timeout=60)
        kill_processes_mentioning(ray_tmp)  # only this cluster's processes (`ray stop` would kill every Ray here)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    workers: list[subprocess.Popen] = []
    try:
        head = subprocess.run(
            [BIN / "ray", "start", "--head", "--port", str(port), "--num-cpus", "0", "--num-gpus", "0",
             "--dashboard-port", str(dash), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--temp-dir", ray_tmp, *_node_ports()], env=env, capture_output=True, text=True, timeout=120)
        assert head.returncode == 0, head.stderr[-2000:]
        private = tmp_path_factory.getbasetemp()
        assert not Path(BIN).resolve().is_relative_to(private.resolve())  # the code must survive the mount
        for n in (1, 2):  # one at a time: two nodes starting together on one machine race for ports and files
            workers.append(_worker_node(port, hf, env, private))
            deadline = time.time() + 120
            while time.time() < deadline:
                out = subprocess.run([BIN / "ray", "status", "--address", f"127.0.0.1:{port}"], env=env,
                                     capture_output=True, text=True)
                if f"/{n}.0 GPU" in out.stdout:
                    break
                time.sleep(2)
            else:
                pytest.fail(f"worker node {n} never joined:\n" + out.stdout[-2000:])
        s3.mkdir(BUCKET)
    except BaseException:
        teardown()  # a cluster that failed to start leaves nothing running
        raise
    yield {"dashboard": f"http://127.0.0.1:{dash}", "workers": workers, "env": env, "s3": s3}
    teardown()


def _write_job(where: Path, out: str, data: str, base: str, warmup: str | None, limit: int, shard_rows: int) -> Path:
    cfg = {"out": out, "data": {"paths": [data], "limit": limit, "shard_rows": shard_rows},
           "model": {"base": base, "warmup": warmup}, "engine": {"threads": 1},
           "ray": {"min_actors": 2, "max_actors": 2, "cpus_per_actor": 1}, "progress": "off"}
    where.mkdir(parents=True, exist_ok=True)
    (where / "job.yaml").write_text(yaml.safe_dump(cfg))
    return where / "job.yaml"


def _submit(cluster, job_dir: Path, wait=True):
    cmd = [BIN / "ray", "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(job_dir)]
    cmd += [] if wait else ["--no-wait"]
    cmd += ["--", str(BIN / "python"), "-m", "instructdiff_ray", "run", "job.yaml"]
    for _ in range(30):  # the dashboard's job agent comes up a little after the node
        res = subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in res.stderr:
            return res
        time.sleep(2)
    return res


def _wait_for_job(cluster, job_id: str, timeout: float = 900) -> str:
    """The job's terminal status (its driver has exited, so its lease is released or dead)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster["dashboard"])
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status.value)
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not finish:\n{client.get_job_logs(job_id)[-3000:]}")


def _upload_inputs(s3, prefix: str, gsm8k: Path, lora: Path, limit: int) -> tuple[str, str]:
    lines = gsm8k.read_text().splitlines()[:limit]
    s3.pipe(f"{BUCKET}/{prefix}/corpus/gsm8k.jsonl", ("\n".join(lines) + "\n").encode())
    s3.put(str(lora) + "/", f"{BUCKET}/{prefix}/models/lora/", recursive=True)
    return f"s3://{BUCKET}/{prefix}/corpus/gsm8k.jsonl", f"s3://{BUCKET}/{prefix}/models/lora"


def _scores(s3, run: str) -> dict:
    files = sorted(s3.glob(f"{run[5:]}/round-1/scores/shard-*.parquet"))
    tables = [pq.read_table(s3.open(f, "rb")) for f in files]
    import pyarrow as pa

    return pa.concat_tables(tables).sort_by("source_row").to_pydict()


def test_share_nothing_cluster_equals_a_single_process(cluster, tmp_path, tiny_model, tiny_lora, gsm8k):
    s3 = cluster["s3"]
    data, warm = _upload_inputs(s3, "a", gsm8k, tiny_lora, 120)
    run = f"s3://{BUCKET}/a/run"
    job = _write_job(tmp_path / "job", run, data, REPO, warm, 120, 10)
    res = _submit(cluster, job.parent)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    got = _scores(s3, run)
    assert got["source_row"] == list(range(120)) and set(got["status"]) == {"ok"}
    markers = [json.loads(s3.cat(p)) for p in s3.glob(f"{BUCKET}/a/run/round-1/scores/_done/*.json")]
    assert len({m["node"] for m in markers}) == 2  # scoring actors on both worker nodes, none on the head
    manifest = json.loads(s3.cat(f"{BUCKET}/a/run/round-1/scores/_manifest.json"))
    assert manifest["fingerprint"]["base_model"] == {"hub": REPO, "commit": SHA}
    local = tmp_path / "local"
    (local / "data.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (local / "data.jsonl").write_bytes(s3.cat(data[5:]))
    ref_job = _write_job(local, str(local / "run"), str(local / "data.jsonl"), str(tiny_model), str(tiny_lora), 120, 10)
    ref = subprocess.run([BIN / "python", "-m", "instructdiff_ray", "run", str(ref_job), "--set", "ray.min_actors=1",
                          "--set", "ray.max_actors=1"], env=_env(), capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = pq.read_table(local / "run" / "round-1" / "scores").sort_by("source_row").to_pydict()
    for col in ("base_nll", "base_entropy", "warmup_nll", "warmup_entropy"):
        np.testing.assert_allclose(got[col], want[col], atol=1e-6, rtol=0)
    ids = s3.cat(f"{BUCKET}/a/run/round-1/selection/selected_ids.txt").decode()
    assert ids == (local / "run" / "round-1" / "selection" / "selected_ids.txt").read_text()


def test_local_paths_are_refused_on_a_share_nothing_cluster(cluster, tmp_path, tiny_lora, gsm8k):
    job = _write_job(tmp_path / "job", str(tmp_path / "run"), str(gsm8k), REPO, str(tiny_lora), 40, 10)
    res = _submit(cluster, job.parent)
    assert res.returncode != 0
    assert "out: " in res.stdout + res.stderr and "is a local path, but this Ray cluster has several nodes" in res.stdout + res.stderr


def test_losing_a_worker_node_mid_scoring(cluster, tmp_path, tiny_lora, gsm8k):
    s3 = cluster["s3"]
    data, warm = _upload_inputs(s3, "b", gsm8k, tiny_lora, 400)
    run = f"s3://{BUCKET}/b/run"
    job = _write_job(tmp_path / "job", run, data, REPO, warm, 400, 10)
    res = _submit(cluster, job.parent, wait=False)
    assert res.returncode == 0, res.stderr[-2000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", res.stdout).group(0)
    done = f"{BUCKET}/b/run/round-1/scores/_done"
    deadline = time.time() + 300
    while time.time() < deadline and len(s3.glob(f"{done}/*.json")) < 3:
        s3.invalidate_cache()
        time.sleep(0.5)
    finished_before = len(s3.glob(f"{done}/*.json"))
    assert 3 <= finished_before < 40, "scoring finished before the node could be killed"
    victim = cluster["workers"][1]
    os.killpg(victim.pid, signal.SIGKILL)  # the node's raylet and its workers die at once
    status = _wait_for_job(cluster, job_id)
    if status != "SUCCEEDED":  # documented recovery: resubmit the same job, it resumes
        again = _submit(cluster, job.parent)
        assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    s3.invalidate_cache()
    got = _scores(s3, run)
    assert got["source_row"] == list(range(400))  # every row exactly once
    assert s3.exists(f"{BUCKET}/b/run/round-1/selection/_SELECTION_DONE.json")


def test_builtin_model_and_a_warmup_trained_into_an_s3_run_dir(cluster, tmp_path, gsm8k):
    """The built-in SmolLM2 (converted from GGUF on each node, into that node's private cache) with
    a LoRA warmup trained on a worker node and written to the S3 run directory, from where every
    scoring actor fetches it: base scores equal a single process on this machine, warmup scores
    equal the hf engine run here with the adapter the job wrote."""
    from instructdiff_ray.engines.base import EngineSettings
    from instructdiff_ray.engines.hf import HFEngine
    from instructdiff_ray.models import load_tokenizer, resolve_model
    from instructdiff_ray.template import tokenize_samples
    from instructdiff_ray.config import DataConfig, TemplateConfig
    from instructdiff_ray.corpus import plan_shards, read_shard

    s3 = cluster["s3"]
    local = tmp_path / "local"
    local.mkdir()
    (local / "data.jsonl").write_text("\n".join(gsm8k.read_text().splitlines()[:40]) + "\n")
    s3.put(str(local / "data.jsonl"), f"{BUCKET}/c/corpus.jsonl")
    run = f"s3://{BUCKET}/c/run"
    job = _write_job(tmp_path / "job", run, f"s3://{BUCKET}/c/corpus.jsonl", "smollm2", None, 40, 10)
    tree = yaml.safe_load(job.read_text())
    tree["model"].pop("warmup")
    tree["warmup"] = {"count": 8, "max_steps": 2, "batch_size": 4}
    tree["template"] = {"max_length": 512}
    job.write_text(yaml.safe_dump(tree))
    res = _submit(cluster, job.parent)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    stamp = json.loads(s3.cat(f"{BUCKET}/c/run/round-1/warmup/_WARMUP_DONE.json"))
    assert stamp["result"]["adapter_dir"] == f"{run}/round-1/warmup/adapter"
    got = _scores(s3, run)
    assert got["source_row"] == list(range(40)) and set(got["status"]) == {"ok"}
    base_dir = resolve_model("smollm2")
    adapter = tmp_path / "adapter"
    s3.get(f"{BUCKET}/c/run/round-1/warmup/adapter/", str(adapter), recursive=True)
    dcfg = DataConfig(paths=[str(local / "data.jsonl")], shard_rows=40)
    toks = tokenize_samples(read_shard(plan_shards(dcfg)[0], dcfg), TemplateConfig(max_length=512), load_tokenizer(base_dir))
    ids, masks = [t.input_ids for t in toks], [t.response_mask for t in toks]
    engine = HFEngine(base_dir, str(adapter), EngineSettings(threads=2))
    for which in ("base", "warmup"):
        r = engine.score(ids, masks, which)
        np.testing.assert_allclose(got[f"{which}_nll"], r.nll, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got[f"{which}_entropy"], r.entropy, atol=1e-5, rtol=0)
