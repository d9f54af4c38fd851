"""Cluster-launcher configs against Ray's autoscaler schema; KubeRay manifests; job configs."""

import copy
from pathlib import Path

import pytest
import yaml

from instructdiff_ray.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_pass_the_autoscaler_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster" / name).read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    types = raw["available_node_types"]
    gpu = [t for t in types if t != raw["head_node_type"]]
    assert len(gpu) == 2 and all(types[t]["max_workers"] > types[t]["min_workers"] == 0 for t in gpu)
    spot = [types[t]["node_config"] for t in gpu]
    assert any("InstanceMarketOptions" in c or any("preemptible" in s for s in c.get("scheduling", [])) for c in spot)
    assert any("instructdiff_ray" in cmd for cmd in raw["setup_commands"])
    assert any("vllm" in cmd for cmd in raw["worker_setup_commands"])  # GPU nodes get the vllm engine


def test_kuberay_rayjob_manifest():
    docs = list(yaml.safe_load_all((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    assert job["spec"]["entrypoint"].startswith("instructdiff run ")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] < group["maxReplicas"]
    for spec in (cluster["headGroupSpec"]["template"]["spec"], group["template"]["spec"]):
        env_from = spec["containers"][0]["envFrom"]  # credentials from a Secret on every pod
        assert {"secretRef": {"name": "instructdiff-credentials"}} in env_from
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    cfg = RunConfig.model_validate(yaml.safe_load(cm["data"]["job.yaml"]))
    assert cfg.ray.max_actors == group["maxReplicas"] and cfg.out.startswith("s3://")
    mount = job["spec"]["entrypoint"].split()[-1]
    assert mount.startswith("/config/")


@pytest.mark.parametrize("name", ["math.yaml", "code.yaml", "general.yaml"])
def test_job_configs_validate_and_name_nothing_beside_the_repository(name):
    text = (ROOT / "jobs" / name).read_text()
    assert "../" not in text and "/shared/" not in text
    cfg = RunConfig.model_validate(yaml.safe_load(text))
    assert all(p.startswith("hf://datasets/") for p in cfg.data.paths)


def test_math_job_plans_as_shipped_from_a_cached_hub_copy(tmp_path, capsys):
    """`instructdiff run jobs/math.yaml --dry-run` against GSM8K laid out as the Hub serves it
    (openai/gsm8k, config folder main/, Parquet per split) in the offline cache."""
    import json
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    import tiny
    from instructdiff_ray.cli import main

    repo = tmp_path / "gsm8k"
    (repo / "main").mkdir(parents=True)
    rows = [json.loads(line) for line in tiny.GSM8K.read_text().splitlines()[:300]]
    pq.write_table(pa.Table.from_pylist(rows[:250]), repo / "main" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[250:]), repo / "main" / "test-00000-of-00001.parquet")
    tiny.add_to_hub_cache(Path(os.environ["HF_HOME"]), "openai/gsm8k", repo, "ab" * 20, repo_type="dataset")
    assert main(["run", str(ROOT / "jobs" / "math.yaml"), "--set", f"out={tmp_path / 'run'}", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["rows"] == 250 and plan["files"] == [f"hf://datasets/openai/gsm8k@{'ab' * 20}/main/train-00000-of-00001.parquet"]
