"""Cluster-launcher configs against Ray's autoscaler schema; KubeRay manifests; job configs."""

import copy
from pathlib import Path

import pytest
import yaml

from instructdiff_ray.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


# What each shipped GPU node type carries (instance types and accelerators of cluster/*.yaml):
# GPUs per node and GB per GPU. A new node type must be added here, so its GPUs are checked.
AWS_INSTANCES = {"g6e.xlarge": (1, 48)}  # 1x L40S
GCP_ACCELERATORS = {"nvidia-l4": 24, "nvidia-tesla-a100": 40}


def gpu_node_types(name: str) -> dict[str, tuple[int, float]]:
    """node type -> (GPUs, GB per GPU) for each GPU node type of a launcher config."""
    raw = yaml.safe_load((ROOT / "cluster" / name).read_text())
    out = {}
    for key, t in raw["available_node_types"].items():
        if key == raw["head_node_type"]:
            continue
        nc = t["node_config"]
        if name == "aws.yaml":
            out[key] = AWS_INSTANCES[nc["InstanceType"]]
        else:
            (acc,) = nc["guestAccelerators"]
            out[key] = (acc["acceleratorCount"], GCP_ACCELERATORS[acc["acceleratorType"]])
    return out


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
    # every node installs through the script the container image uses; GPU workers get the vllm engine
    assert raw["head_setup_commands"] == ["bash /home/ubuntu/instructdiff_ray/cluster/install.sh head"]
    assert raw["worker_setup_commands"] == ["bash /home/ubuntu/instructdiff_ray/cluster/install.sh gpu"]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_every_gpu_node_type_advertises_its_gpus(name):
    """The autoscaler starts a node type for GPU actors only if it advertises `GPU`: GCP's provider
    fills in TPUs only, so each type declares its GPUs, matching its accelerators; drivers and
    images work in any region."""
    raw = yaml.safe_load((ROOT / "cluster" / name).read_text())
    for key, (gpus, _) in gpu_node_types(name).items():
        t = raw["available_node_types"][key]
        assert t["resources"].get("GPU") == gpus and t["resources"].get("CPU", 0) >= 4, key
        nc = t["node_config"]
        if name == "gcp.yaml":
            assert {"key": "install-nvidia-driver", "value": "True"} in nc["metadata"]["items"], key
            assert "deeplearning-platform-release" in nc["disks"][0]["initializeParams"]["sourceImage"]
        else:
            assert nc["ImageId"] == "latest_dlami", key  # Ray's per-region Deep Learning AMI
    head = raw["available_node_types"][raw["head_node_type"]]
    assert "GPU" not in head["resources"]


def test_install_script_is_what_the_image_and_the_nodes_run():
    import subprocess

    docker = (ROOT / "docker" / "Dockerfile").read_text()
    assert "cluster/install.sh gpu" in docker and "FROM rayproject/ray:2.60.0-" in docker
    env = {"DRY_RUN": "1", "PATH": "/usr/bin:/bin", "PYTHON": "python3"}
    for role, extras in (("head", "[s3,gcs,hf]"), ("gpu", "[s3,gcs,hf,vllm]")):
        out = subprocess.run(["bash", str(ROOT / "cluster" / "install.sh"), role], env=env, capture_output=True,
                             text=True, check=True).stdout.splitlines()
        assert out[0] == "python3 -m pip install -q ray[default,data]==2.60.0"
        assert out[1].startswith("python3 -m pip install -q -e ") and out[1].split()[-1].endswith(extras)
    bad = subprocess.run(["bash", str(ROOT / "cluster" / "install.sh"), "cpu"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown role" in bad.stderr
    manifest = (ROOT / "cluster" / "kuberay-rayjob.yaml").read_text()
    assert "docker/Dockerfile" in manifest


@pytest.fixture(scope="module")
def general_job_inputs(tmp_path_factory):
    """jobs/general.yaml's model and dataset as the Hub serves them, in the offline cache: the real
    Qwen2.5-7B-Instruct config.json numbers with the Qwen2 tokenizer, and a few UltraChat rows."""
    import json
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    import tiny

    hf_home = Path(os.environ["HF_HOME"])
    model = tmp_path_factory.mktemp("qwen7b")
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
              "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
              "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (model / "config.json").write_text(json.dumps(config))
    for f in tiny.QWEN2_TOKENIZER.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    tiny.add_to_hub_cache(hf_home, "Qwen/Qwen2.5-7B-Instruct", model, "cd" * 20)
    data = tmp_path_factory.mktemp("ultrachat")
    (data / "data").mkdir()
    rows = [{"prompt": f"q{i}", "prompt_id": str(i), "messages": [{"role": "user", "content": f"question {i}"},
                                                                  {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(50)]
    pq.write_table(pa.Table.from_pylist(rows), data / "data" / "train_sft-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:5]), data / "data" / "test_sft-00000-of-00001.parquet")
    tiny.add_to_hub_cache(hf_home, "HuggingFaceH4/ultrachat_200k", data, "ef" * 20, repo_type="dataset")


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_the_gpu_job_plans_on_every_gpu_node_type(name, general_job_inputs, tmp_path, capsys):
    """`instructdiff run jobs/general.yaml --dry-run` with the GPU of each node type the config may
    start: the memory plan accepts it (two 7B pools in bf16), and a GPU too small is refused."""
    import json

    from instructdiff_ray.cli import main

    job = str(ROOT / "jobs" / "general.yaml")
    for key, (gpus, gb) in gpu_node_types(name).items():
        args = ["run", job, "--set", f"out={tmp_path / key}", "--set", f"engine.gpu_memory_gb={gb}",
                "--set", f"ray.gpus_per_actor={gpus}", "--dry-run"]
        assert main(args) == 0, (key, capsys.readouterr().err)
        plan = json.loads(capsys.readouterr().out)
        assert plan["engine"] == "vllm" and plan["rows"] == 50, key
    small = ["run", job, "--set", f"out={tmp_path / 'small'}", "--set", "engine.gpu_memory_gb=16", "--dry-run"]
    assert main(small) == 2
    assert "model.base does not fit" in capsys.readouterr().err


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
