"""Corpora from the Hugging Face ecosystem: an offline-cached Hub dataset (pinned to its commit in
the manifest) and save_to_disk directories as input; a datasets directory as output."""

import json
import os
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tiny
from conftest import make_config
from instructdiff_ray import rundir
from instructdiff_ray.config import ConfigError, DataConfig
from instructdiff_ray.corpus import list_files, plan_shards
from instructdiff_ray.export import export_selection
from instructdiff_ray.pipeline import score_corpus

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _rows(n, start=0):
    return [{"question": f"What is {i} plus {i % 7}?", "answer": f"It is {i + i % 7}."} for i in range(start, start + n)]


@pytest.fixture(scope="module")
def hub_dataset(tmp_path_factory):
    """acme/gsm-mini in this session's offline Hugging Face cache: config folder `main` with a
    train and a test split as Parquet, as the Hub's datasets lay them out."""
    repo = tmp_path_factory.mktemp("repo")
    (repo / "main").mkdir()
    pq.write_table(pa.Table.from_pylist(_rows(30)), repo / "main" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(_rows(10, 500)), repo / "main" / "test-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: main\n---\n")
    (repo / ".gitattributes").write_text("*.parquet filter=lfs\n")
    tiny.add_to_hub_cache(Path(os.environ["HF_HOME"]), "acme/gsm-mini", repo, COMMIT, repo_type="dataset")
    return "hf://datasets/acme/gsm-mini"


def test_hub_dataset_files_are_pinned_to_the_cached_commit(hub_dataset):
    files = list_files(DataConfig(paths=[hub_dataset + "/main"], split="train"))
    assert files == [(f"hf://datasets/acme/gsm-mini@{COMMIT}/main/train-00000-of-00001.parquet", "parquet")]
    both = list_files(DataConfig(paths=[hub_dataset + "@main"]))
    assert [f.rsplit("/", 1)[1] for f, _ in both] == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        list_files(DataConfig(paths=["hf://datasets/acme/never-downloaded"]))
    with pytest.raises(ConfigError, match="no data files"):
        list_files(DataConfig(paths=[hub_dataset + "/main"], split="validation"))


def test_save_to_disk_directories_are_read_as_their_arrow_files(tmp_path):
    ds = datasets.Dataset.from_list(_rows(25))
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(_rows(5, 900))}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "one" / ".ipynb_checkpoints").mkdir()  # never data
    for path, split, n in ((tmp_path / "one", None, 25), (tmp_path / "dd", None, 25), (tmp_path / "dd", "test", 5)):
        shards = plan_shards(DataConfig(paths=[str(path)], shard_rows=7, split=split))
        assert {s.fmt for s in shards} == {"arrow"} and sum(s.n_rows for s in shards) == n
    with pytest.raises(ConfigError, match="has splits"):
        list_files(DataConfig(paths=[str(tmp_path / "dd")], split="validation"))
    # a folder that holds such a directory one level down: refused naming it, not read as loose JSON
    (tmp_path / "outer").mkdir()
    ds.save_to_disk(str(tmp_path / "outer" / "mine"))
    with pytest.raises(ConfigError, match=r"outer/mine inside .* is a `datasets` save_to_disk directory"):
        list_files(DataConfig(paths=[str(tmp_path / "outer")]))


def test_selection_as_a_datasets_directory(tmp_path):
    src = tmp_path / "c.jsonl"
    rows = _rows(12)
    rows[4]["meta"] = {"level": 2}
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards = plan_shards(DataConfig(paths=[str(src)], shard_rows=5))
    sel = pa.table({"source_file": [str(src)] * 3, "source_row": [4, 0, 11], "rank": [0, 1, 2]})
    out, n = export_selection(sel, shards, str(tmp_path / "sel"), "hf")
    got = datasets.load_from_disk(out)
    assert n == 3 and got["question"] == [rows[4]["question"], rows[0]["question"], rows[11]["question"]]
    assert got["meta"] == [{"level": 2}, None, None]


@pytest.mark.slow
def test_hub_and_save_to_disk_corpora_score_with_the_commit_in_the_manifest(tmp_path, ray_local, tiny_model,
                                                                            tiny_full_warmup, hub_dataset):
    disk = tmp_path / "disk"
    datasets.Dataset.from_list(_rows(20, 100)).save_to_disk(str(disk))
    cfg = make_config(tmp_path, [hub_dataset + "/main", disk], tiny_model, data={"shard_rows": 8, "split": "train"},
                      ray={"min_actors": 1, "max_actors": 1})
    summary = score_corpus(cfg, cfg.out, warmup=str(tiny_full_warmup))
    assert summary.rows == 50 and summary.status_counts == {"ok": 50}
    files = rundir.read_manifest(cfg.out)["fingerprint"]["files"]
    hub = [f for f in files if "hub" in f]
    assert len(hub) == 1 and hub[0]["commit"] == COMMIT and hub[0]["hub"] == "acme/gsm-mini"
    scores = pq.read_table(cfg.out, columns=["source_file", "source_row"]).to_pydict()
    assert sum(f.startswith("hf://datasets/acme/gsm-mini@") for f in scores["source_file"]) == 30


def test_a_records_own_fields_are_read_back_from_arrow_files(tmp_path):
    """`inspect` reads examples by row from the corpus: Arrow files of save_to_disk included."""
    from instructdiff_ray.corpus import read_rows

    datasets.Dataset.from_list(_rows(25)).save_to_disk(str(tmp_path / "one"))
    (path, fmt), = list_files(DataConfig(paths=[str(tmp_path / "one")]))
    assert dict(read_rows(path, fmt, {3, 17})) == {3: _rows(25)[3], 17: _rows(25)[17]}


def test_online_listing_chooses_one_config_and_split_and_downloads_nothing(monkeypatch, tmp_path):
    """Online, a Hub dataset's files come from the Hub's listing (one API request, served here by a
    local stand-in for the Hub's API): the config's folder and the split are chosen from it, the
    files are pinned to the listed commit, and nothing is downloaded while planning."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from huggingface_hub import constants

    commit = "fedcba9876543210fedcba9876543210fedcba98"
    listing = ["README.md", "main/train-00000-of-00002.parquet", "main/train-00001-of-00002.parquet",
               "main/test-00000-of-00001.parquet", "socratic/train-00000-of-00001.parquet", ".gitattributes"]
    requests: list[str] = []

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server interface
            requests.append(self.path)
            body = json.dumps({"id": "acme/big", "sha": commit, "private": False,
                               "siblings": [{"rfilename": f} for f in listing]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
        files = list_files(DataConfig(paths=["hf://datasets/acme/big/main"], split="train"))
    finally:
        server.shutdown()
    assert files == [(f"hf://datasets/acme/big@{commit}/main/train-0000{i}-of-00002.parquet", "parquet") for i in (0, 1)]
    assert len([r for r in requests if r.startswith("/api/datasets/acme/big")]) == 1
    assert not [r for r in requests if "/resolve/" in r]  # no file downloaded
    assert not (tmp_path / "empty-cache").exists()  # nothing fetched to choose the files
