"""Cluster-launcher configs against Ray's autoscaler schema; KubeRay manifests; job configs."""

import copy
from pathlib import Path

import pytest
import yaml

from instructdiff_ray.config import RunConfig, build_config

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
def test_job_configs_validate(name, monkeypatch):
    tree = yaml.safe_load((ROOT / "jobs" / name).read_text())
    if name == "general.yaml":  # points at the user's data and a GPU model: schema only
        RunConfig.model_validate(tree)
    else:
        monkeypatch.chdir(ROOT)
        build_config(tree)
