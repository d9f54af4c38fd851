"""Preflight: every check that can fail a job before Ray starts work or any model loads.

`config.build_config` already validated the settings and checked that local inputs exist (and ran
the engine's own checks); here the file system and the models' small files are read: the corpus
can be listed, the base model's config and tokenizer fit the template, the engine accepts the
model (the vllm engine: the weights fit the GPUs), tracking is installed.
"""

from __future__ import annotations

from .config import MODEL_FORMS, ConfigError, RunConfig
from .corpus import list_files
from .engines import engine_class


def check_config(cfg: RunConfig) -> None:
    """Config-time checks that need the file system but no model weights: the input files, and
    for a local model directory its context length and (template.kind=chat) its chat template."""
    from .tracking import check as check_tracking

    check_tracking(cfg)
    list_files(cfg.data)  # the shard plan itself is made once, in the run directory
    check_model_fits_template(cfg)


def check_model_fits_template(cfg: RunConfig) -> None:
    """Against the base model's config and tokenizer (Hub and object-store models bring only
    those files to the driver, never weights)."""
    import json
    from pathlib import Path

    from .models import ModelNotFound, kind, load_tokenizer, resolve_model

    for name in ("base", "warmup"):
        spec = getattr(cfg.model, name)
        if spec and kind(spec) == "gguf" and not Path(spec).is_file():
            raise ConfigError(f"model.{name}: {spec} does not exist")
        if spec and kind(spec) == "local" and not Path(spec).exists():
            forms = MODEL_FORMS if name == "base" else "a peft adapter directory or a full model directory"
            raise ConfigError(f"model.{name}: {spec} does not exist; give {forms}")
    if kind(cfg.model.base) in ("builtin", "gguf"):
        return  # converted where they are loaded
    try:
        base = Path(resolve_model(cfg.model.base, tokenizer_only=True))
    except ModelNotFound as err:
        raise ConfigError(f"model.base: {err}") from None
    if not (base / "config.json").is_file():
        raise ConfigError(f"model.base: {cfg.model.base} has no config.json")
    config = json.loads((base / "config.json").read_text())
    context = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    if context and cfg.template.max_length > context:
        raise ConfigError(f"template.max_length={cfg.template.max_length} exceeds the context length of "
                          f"model.base ({context} positions); lower template.max_length")
    engine_class(cfg.engine.name).check_model(cfg, config)
    if cfg.template.kind == "chat" and not getattr(load_tokenizer(str(base)), "chat_template", None):
        raise ConfigError(f"template.kind=chat but the tokenizer of {cfg.model.base} has no chat template; "
                          "use template.kind=alpaca or raw, or a model that ships one")
