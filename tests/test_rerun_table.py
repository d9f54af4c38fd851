"""The rerun table (config.RERUN), checked key by key against the stage fingerprints.

Every leaf key of the config schema is changed in turn; the stages whose fingerprints change
decide what a rerun into an existing run directory does (warmup or scores refused unless
--recompute, selection made again, compare refused, or everything reused). A key added to the
config without a RERUN entry fails here, so none can be forgotten.
"""

import json
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from instructdiff_ray.config import ConfigError, RunConfig, build_config, rerun_effect

# Values for keys a generic rule cannot invent (strings, lists, dicts, optional sections).
SPECIAL = {
    "out": lambda ctx: str(ctx["tmp"] / "other-run"),
    "data.paths": lambda ctx: [str(ctx["data2"])],
    "data.split": lambda ctx: "validation",
    "data.fields": lambda ctx: {"instruction": "question", "response": "answer", "input": "question"},
    "data.id_field": lambda ctx: "question",
    "data.limit": lambda ctx: 30,
    "model.base": lambda ctx: str(ctx["other_base"]),
    "model.warmup": lambda ctx: str(ctx["other_base"]),
    "engine.name": lambda ctx: "vllm",  # another registered engine
    "data.format": lambda ctx: "jsonl",  # another registered reader
    "template.raw_separator": lambda ctx: " => ",
    "warmup.target_modules": lambda ctx: ["q_proj", "v_proj"],
    "warmup.preset": lambda ctx: "paper",
    "ray.address": lambda ctx: "auto",
    "compare.eval": lambda ctx: [str(ctx["data2"])],
    "compare.strategies": lambda ctx: ["instructdiff", "random"],
    "compare.seeds": lambda ctx: [0, 1, 2, 3],
    "compare.budget_units": lambda ctx: ["tokens", "samples"],
    "compare.full_seeds": lambda ctx: [0],
    "compare.eval_command": lambda ctx: "python -c 'print(1)'",
    "compare.metric": lambda ctx: "accuracy",
    "compare.eval_limit": lambda ctx: 5,
    "tracking.mlflow": lambda ctx: True,
    "tracking.mlflow_uri": lambda ctx: "file:///tmp/mlruns-elsewhere",
    "tracking.run_name": lambda ctx: "other",
    "run.recompute": lambda ctx: ["scores"],
    "rounds": lambda ctx: 2,
    "data.preset": lambda ctx: "qa",
    "selection.strategy": lambda ctx: "random",
}


def _unwrap(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return args[0]
    if type(None) in typing.get_args(annotation) and len(args) == 1:
        return args[0]
    return annotation


def leaf_keys(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = _unwrap(field.annotation)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from leaf_keys(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field, ann


def _bound(field, kind):
    for m in field.metadata:
        if hasattr(m, kind):
            return getattr(m, kind)
    return None


def new_value(key, field, ann, current, ctx):
    alias = key.replace("compare.train.", "warmup.", 1)  # compare.train is a WarmupConfig
    if key in SPECIAL or alias in SPECIAL:
        return SPECIAL.get(key, SPECIAL.get(alias))(ctx)
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return next(v for v in typing.get_args(ann) if v != current)
    if ann is bool:
        return not current
    if ann is int:
        hi = _bound(field, "le") or _bound(field, "lt")
        value = (current if current is not None else max(_bound(field, "ge") or 1, 1)) + 1
        return value if hi is None or value <= hi else current - 1
    if ann is float:
        lo = _bound(field, "gt") or _bound(field, "ge") or 0.0
        hi = _bound(field, "le") or _bound(field, "lt")
        value = (current if current is not None else 1.0) * 0.5
        return value if value > lo and (hi is None or value < hi) else (lo + (hi or 1.0)) / 2
    if ann is str and current:
        return current + "-changed"
    raise AssertionError(f"{key}: add a value to SPECIAL")


def _set(tree, key, value):
    node = tree
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def _get(cfg, key):
    node = cfg
    for p in key.split("."):
        node = getattr(node, p) if node is not None else None
    return node


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_model, tiny_lora, tiny_full_warmup, gsm8k):
    tmp = tmp_path_factory.mktemp("rerun-table")
    rows = [json.loads(x) for x in Path(gsm8k).read_text().splitlines()[:110]]
    # alpaca-shaped (what preset auto finds) and qa-shaped at once, so that another preset reads other text
    rows = [r | {"instruction": "Solve: " + r["question"], "output": r["answer"].split("####")[-1]} for r in rows]
    write = lambda name, part: (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in part))  # noqa: E731
    write("data.jsonl", rows[:40])
    write("data2.jsonl", rows[40:80])
    write("heldout.jsonl", rows[100:110])
    scores = tmp / "scores"
    scores.mkdir()
    (scores / "_manifest.json").write_text(json.dumps({"fingerprint_hash": "fixed"}))
    return {"tmp": tmp, "data": tmp / "data.jsonl", "data2": tmp / "data2.jsonl", "heldout": tmp / "heldout.jsonl",
            "base": tiny_model, "other_base": tiny_full_warmup, "lora": tiny_lora, "scores": scores}


def base_tree(ctx):
    return {"out": str(ctx["tmp"] / "run"), "data": {"paths": [str(ctx["data"])], "shard_rows": 10},
            "model": {"base": str(ctx["base"])}, "progress": "off", "ray": {"max_actors": 4},
            "warmup": {"alpha": 0.5, "batch_size": 2},
            "compare": {"eval": [str(ctx["heldout"])], "train": {"batch_size": 2}}}


def fingerprints(cfg: RunConfig, ctx) -> dict[str, str]:
    """Each persisted stage's fingerprint digest for this config, as the pipeline computes it."""
    from instructdiff_ray import pipeline, records, rundir
    from instructdiff_ray.compare import fingerprint as compare_fingerprint
    from instructdiff_ray.compare import load_heldout
    from instructdiff_ray.corpus import load_plan
    from instructdiff_ray.models import pin
    from instructdiff_ray.warmup import collect, count_and_digest, draw_rows, warmup_fingerprint

    plan = load_plan(cfg.data, None)
    base = pin(cfg.model.base)
    samples = collect(cfg, plan.shards, draw=draw_rows(plan.shards, cfg.warmup))
    warm = warmup_fingerprint(cfg, base, count_and_digest(samples))
    # the scores' warmup model: the given one, else the one trained from `warm` (its identity follows it)
    warm_model = cfg.model.warmup or str(ctx["lora"])
    scores = pipeline.fingerprint(cfg, plan, base, warm_model, None)
    summary = records.ScoreSummary(str(ctx["scores"]), 1, 0, 1, {"ok": 1}, 0, 0, 0.0, 0.0, 0.0,
                                    markers=[{"shard_id": 0, "rows": 1, "status_counts": {"ok": 1}}])
    sel = pipeline.selection_fingerprint(cfg, summary)
    cmp = compare_fingerprint(cfg, str(ctx["scores"]), load_heldout(cfg)) if cfg.compare else None
    return {"warmup": rundir.digest(warm), "scores": rundir.digest([scores, plan.shards and [s.to_dict() for s in plan.shards]]),
            "select": rundir.digest(sel), "compare": rundir.digest(cmp)}


def observed(before: dict[str, str], after: dict[str, str]) -> str:
    for stage in ("warmup", "scores", "select", "compare"):
        if before[stage] != after[stage]:
            return stage
    return "unchanged"


def test_every_config_key_has_a_rerun_entry_that_its_fingerprints_confirm(ctx):
    tree = base_tree(ctx)
    cfg0 = build_config(tree)
    fp0 = fingerprints(cfg0, ctx)
    keys = list(leaf_keys(RunConfig))
    assert len(keys) > 80
    wrong, refused = [], []
    for key, field, ann in keys:
        effect = rerun_effect(key)  # KeyError: a key without an entry in config.RERUN
        changed = json.loads(json.dumps(tree))
        value = new_value(key, field, ann, _get(cfg0, key), ctx)
        assert value != _get(cfg0, key), key
        _set(changed, key, value)
        try:
            got = observed(fp0, fingerprints(build_config(changed), ctx))
        except ConfigError as err:
            refused.append((key, str(err).splitlines()[-1]))
            continue
        want = "unchanged" if effect in ("reuse", "extend", "new") else effect
        if got != want:
            wrong.append(f"{key}: table says {effect}, fingerprints say {got}")
    assert not wrong, "\n".join(wrong)
    # keys whose changed value the config itself refuses are few and named here
    assert [k for k, _ in refused] == ["compare.train.num_workers"], refused  # units train on one worker each
