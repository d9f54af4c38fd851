"""Where corpus files come from, besides plain paths: Hugging Face Hub datasets and `datasets`'
`save_to_disk` directories. The corpus stage asks this module for a list of data files and for
a local path to read each one.

Hub datasets: `hf://datasets/ORG/NAME[@REVISION][/SUBDIR]`. The driver pins the revision to a
commit (recorded in the fingerprint); every file of the plan is named with that commit, and each
node fetches the files it reads into its own Hugging Face cache (`huggingface_hub`, so
`HF_HUB_OFFLINE=1` reads a pre-populated cache and never the network). `SUBDIR` picks a config's
folder (GSM8K's `main`); `data.split` keeps the files of one split by the `datasets` naming
convention (`train-00000-of-00001.parquet`, `train.jsonl`, `data/train/...`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path


from . import rundir
from .config import ConfigError

log = logging.getLogger(__name__)

HUB_PREFIX = "hf://datasets/"
_HUB = re.compile(r"^hf://datasets/([^/@]+/[^/@]+)(?:@([^/]+))?(?:/(.*))?$")


class DatasetNotFound(ConfigError):
    """A Hub dataset that is neither reachable nor in the local cache."""


def is_hub(url: str) -> bool:
    return url.startswith(HUB_PREFIX)


def parse_hub(url: str) -> tuple[str, str | None, str]:
    """(repo id, revision or None, path inside the repo) of a Hub dataset URL."""
    m = _HUB.match(url.rstrip("/"))
    if not m:
        raise ConfigError(f"data.paths: {url} is not hf://datasets/ORG/NAME[@REVISION][/PATH]")
    return m.group(1), m.group(2), m.group(3) or ""


def _snapshot(repo: str, revision: str | None, patterns: list[str] | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=patterns))
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise DatasetNotFound(f"hf://datasets/{repo}: no such dataset or revision on the Hub ({type(err).__name__})") from None
    except LocalEntryNotFoundError:
        raise DatasetNotFound(f"hf://datasets/{repo}@{revision or 'main'}: not in the local Hugging Face cache and the "
                              "Hub is not reachable (HF_HUB_OFFLINE=1?)") from None


def _split_of(relative: str, split: str) -> bool:
    parts = relative.split("/")
    name = parts[-1].split(".")[0]
    return split in parts[:-1] or name == split or name.startswith(split + "-") or name.startswith(split + "_")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def repo_files(repo: str, revision: str | None) -> tuple[str, list[str]]:
    """(commit, every file) of a dataset repository: the Hub's own listing, so nothing is downloaded
    to choose files; offline (or with the Hub unreachable) the files of the cached snapshot."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if not _offline():
        try:
            info = HfApi().dataset_info(repo, revision=revision)
            return str(info.sha), sorted(s.rfilename for s in info.siblings or [])
        except GatedRepoError:
            raise DatasetNotFound(f"hf://datasets/{repo} is gated: accept its terms on the Hub and set HF_TOKEN") from None
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise DatasetNotFound(f"hf://datasets/{repo}: no such dataset or revision on the Hub "
                                  f"({type(err).__name__})") from None
        except Exception as err:  # noqa: BLE001 - unreachable: the cache may still hold it
            log.warning("hf://datasets/%s: the Hub is not reachable (%s); listing the local cache", repo, err)
    snap = _snapshot(repo, revision, None)
    return snap.name, sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())


def hub_files(url: str, split: str | None, is_data) -> list[str]:
    """The data files of a Hub dataset URL, named `hf://datasets/REPO@COMMIT/PATH` (sorted): chosen
    from the repository's listing (the config's folder, then the split), none downloaded here."""
    repo, revision, sub = parse_hub(url)
    commit, listed = repo_files(repo, revision)
    prefix = f"{sub}/" if sub else ""
    files = [f for f in listed if f.startswith(prefix) and is_data(f[len(prefix):])]
    if split:
        files = [f for f in files if _split_of(f[len(prefix):], split)]
    if not files:
        raise ConfigError(f"data.paths: no data files in {url}" + (f" for split {split!r}" if split else ""))
    return [f"{HUB_PREFIX}{repo}@{commit}/{f}" for f in files]


def hub_local(url: str) -> str:
    """This node's local copy of one file of a pinned Hub dataset URL (fetched once into its cache)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, commit, path = parse_hub(url)
    try:
        return hf_hub_download(repo, path, repo_type="dataset", revision=commit)
    except LocalEntryNotFoundError:
        raise DatasetNotFound(f"{url}: not in this node's Hugging Face cache and the Hub is not reachable") from None


def local(url: str) -> str:
    """A path fsspec can open for a corpus file (Hub files through this node's cache)."""
    return hub_local(url) if is_hub(url) else url


def disk_dataset_files(url: str, split: str | None) -> list[str] | None:
    """The Arrow files of a `save_to_disk` directory (a Dataset, or one split of a DatasetDict),
    or None when `url` is not one. Its JSON sidecars are metadata, never data."""
    fs, root = rundir.fs_of(url)
    protocol = url.split("://")[0] + "://" if "://" in url else ""
    join = lambda *p: "/".join([root.rstrip("/"), *p])  # noqa: E731
    if fs.exists(join("dataset_dict.json")):
        splits = json.loads(fs.cat(join("dataset_dict.json")))["splits"]
        chosen = split or ("train" if "train" in splits or len(splits) != 1 else splits[0])
        if chosen not in splits:
            raise ConfigError(f"data.split={chosen!r}: {url} has splits {splits}; set data.split")
        return disk_dataset_files(protocol + join(chosen), None)
    if not fs.exists(join("state.json")):
        return None
    state = json.loads(fs.cat(join("state.json")))
    return [protocol + join(f["filename"]) for f in state["_data_files"]]
