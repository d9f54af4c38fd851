"""Model specs resolved on the node that needs them: Hub ids from an offline cache, object-store
directories keyed by content, pinned commits in the fingerprint."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

import tiny
from conftest import HF_HOME, make_config
from instructdiff_ray.models import ModelNotFound, identity, kind, pin, resolve_model

SHA1, SHA2 = "1" * 40, "2" * 40
REPO = "instructdiff-test/tiny-llama"


@pytest.fixture(scope="module")
def hub_model(tiny_model):
    tiny.add_to_hub_cache(HF_HOME, REPO, tiny_model, SHA1)
    yield REPO
    shutil.rmtree(HF_HOME / "hub" / f"models--{REPO.replace('/', '--')}", ignore_errors=True)


def test_spec_kinds(tiny_model):
    assert [kind(s) for s in ("smollm2", "s3://b/m", "gs://b/m", "x/model.gguf", str(tiny_model), "org/name",
                              "org/name@v1.0", "hf://org/name", "./org/name")] == [
        "builtin", "remote", "remote", "gguf", "local", "hub", "hub", "hub", "local"]


def test_hub_id_resolves_offline_and_pins_its_commit(hub_model, tiny_model):
    path = resolve_model(hub_model)
    assert path.endswith(f"snapshots/{SHA1}") and (tiny_model / "config.json").read_bytes() == open(f"{path}/config.json", "rb").read()
    assert pin(hub_model) == f"{REPO}@{SHA1}" and pin(f"{REPO}@main") == f"{REPO}@{SHA1}"
    assert identity(pin(hub_model)) == {"hub": REPO, "commit": SHA1}
    with pytest.raises(ModelNotFound, match="not in the Hugging Face cache"):
        resolve_model("instructdiff-test/no-such-model")


def test_hub_model_scores_like_its_local_copy_and_a_moved_branch_is_refused(hub_model, tmp_path, ray_local, tiny_model,
                                                                            tiny_full_warmup, gsm8k):
    from instructdiff_ray.pipeline import FingerprintMismatch, score_corpus

    hub = make_config(tmp_path / "hub", [gsm8k], hub_model, data={"limit": 20, "shard_rows": 10})
    local = make_config(tmp_path / "local", [gsm8k], tiny_model, data={"limit": 20, "shard_rows": 10})
    score_corpus(hub, hub.out)
    score_corpus(local, local.out)
    a, b = (pq.read_table(c.out).sort_by("source_row").to_pydict() for c in (hub, local))
    np.testing.assert_array_equal(a["base_nll"], b["base_nll"])
    manifest = json.loads((tmp_path / "hub" / "out" / "_manifest.json").read_text())
    assert manifest["fingerprint"]["base_model"] == {"hub": REPO, "commit": SHA1}
    tiny.add_to_hub_cache(HF_HOME, REPO, tiny_full_warmup, SHA2)  # `main` moves to a new commit
    try:
        with pytest.raises(FingerprintMismatch, match=r"differs in: base_model\.commit"):
            score_corpus(hub, hub.out)
    finally:
        tiny.add_to_hub_cache(HF_HOME, REPO, tiny_model, SHA1)


def test_missing_models_are_config_errors(tmp_path, gsm8k, capsys):
    from instructdiff_ray.cli import main

    base = ["score", "--data", str(gsm8k), "--out", str(tmp_path / "o"), "--limit", "5"]
    assert main(base + ["--base", "instructdiff-test/no-such-model"]) == 2
    assert "not in the Hugging Face cache and the Hub is not reachable" in capsys.readouterr().err
    assert main(base + ["--base", str(tmp_path / "nothing-here")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_object_store_model_is_cached_by_content(s3, tmp_path, tiny_model, monkeypatch):
    import os

    monkeypatch.setenv("INSTRUCTDIFF_CACHE", str(tmp_path / "cache"))
    s3.mkdir("instructdiff-models")
    s3.put(str(tiny_model) + "/", "instructdiff-models/tiny/", recursive=True)
    url = "s3://instructdiff-models/tiny"
    first = resolve_model(url)
    assert open(f"{first}/model.safetensors", "rb").read() == (tiny_model / "model.safetensors").read_bytes()
    assert resolve_model(url) == first  # once per node
    tok = resolve_model(url, tokenizer_only=True)
    assert not any(p.endswith(".safetensors") for p in os.listdir(tok)) and os.path.exists(f"{tok}/tokenizer.json")
    s3.pipe("instructdiff-models/tiny/config.json", (tiny_model / "config.json").read_bytes() + b"\n")
    second = resolve_model(url)  # a changed file is a new cache entry, never the stale one
    assert second != first and open(f"{second}/config.json", "rb").read() == (tiny_model / "config.json").read_bytes() + b"\n"
    fp1 = identity(url)
    s3.pipe("instructdiff-models/tiny/config.json", (tiny_model / "config.json").read_bytes())
    assert identity(url) != fp1
    (tmp_path / "cache" / "remote" / os.path.basename(first) / ".complete.json").write_text("{}")
    assert resolve_model(url) == first  # an entry whose record does not match is fetched again
