"""Compare stage: is the selection worth it on this corpus?

For each strategy (selection strategies at the run's budget, and `full`: every scored row) and
each seed, fine-tune the base model on that strategy's rows with identical settings (the warmup
trainer) and measure the model on held-out rows: mean response NLL, the scoring metric (per row,
then averaged over rows), and optionally a user command's metric. The base model itself is
measured once as the reference.

Each strategy x seed is a unit with its own directory and completion marker (rundir.py): a rerun
computes only the units without one, and a unit killed after training reuses its stamped model.
Units run as Ray tasks, as many at once as the cluster has room for (one actor's resources each).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import rundir
from .config import CompareConfig, ConfigError, RunConfig
from .corpus import Sample, load_plan, samples_digest
from .faults import armed, kill_point
from .progress import Progress
from .records import RunSummary
from .rundir import BASE_UNIT, unit_name

if TYPE_CHECKING:
    from .warmup import SampleSet

log = logging.getLogger(__name__)

FULL = "full"
EXACT_MATCH_RULE = "first-marker"  # evaluate.final_answer: the number after the first '####'; a new rule, a new name


class EvalCommandFailed(RuntimeError):
    """compare.eval_command failed or printed no JSON metric."""


def scores_of_run(run_dir: str) -> str:
    """The finished run's last-round scores (its ΔH and ΔNLL are what the final selection used)."""
    if not rundir.exists(rundir.join(run_dir, rundir.RUN_SUMMARY)):
        raise ConfigError(f"{run_dir} holds no finished run (no {rundir.RUN_SUMMARY}); run the job to its end first")
    last = RunSummary.from_dict(rundir.read_run_summary(run_dir)).rounds[-1].round
    return rundir.scores_dir(run_dir, last)


def config_for(run_dir: str, updates: dict[str, Any], overrides: list[tuple[str, Any]] = ()) -> RunConfig:
    """The run directory's own config (its last invocation) with its compare section updated."""
    from .config import build_config

    url = rundir.join(run_dir, rundir.RUN_CONFIG)
    if not rundir.exists(url):
        raise ConfigError(f"{run_dir} has no {rundir.RUN_CONFIG}: not a run directory made by `instructdiff run`")
    tree = rundir.read_json(url)["invocations"][-1]["config"] | {"out": run_dir}
    stored = dict(tree.get("compare") or {})
    if stored.pop("eval_command", None) and not updates.get("eval_command"):
        log.warning("the run directory's compare.eval_command is not run (a command is taken only from your own "
                    "config or --eval-command, never from files in a run directory)")
    section = stored | {k: v for k, v in updates.items() if v is not None}
    if "eval" not in section:
        raise ConfigError("compare needs held-out data: --eval HELD_OUT (or a compare: section in the run's config)")
    return build_config(tree | {"compare": section}, overrides)


def load_heldout(cfg: RunConfig) -> list[Sample]:
    """The held-out rows: compare.eval read with the corpus' field mapping, rows
    [eval_skip, eval_skip + eval_limit); rows that do not normalise are left out."""
    from .warmup import collect_samples

    c = cfg.compare
    data = cfg.data.model_copy(update={"paths": c.eval, "limit": None})
    shards = load_plan(data, None).shards
    n = sum(s.n_rows for s in shards)
    if c.eval_skip >= n:
        raise ConfigError(f"compare.eval_skip={c.eval_skip} skips all {n} rows of compare.eval")
    stop = n if c.eval_limit is None else min(n, c.eval_skip + c.eval_limit)
    samples = collect_samples(cfg.model_copy(update={"data": data}), shards, ordinals=set(range(c.eval_skip, stop)))
    if not samples:
        raise ConfigError(f"compare.eval: none of rows {c.eval_skip}..{stop - 1} is usable")
    return samples


def budget_settings(cfg: RunConfig) -> dict[str, Any]:
    """The selection settings every strategy's pick shares (the strategy and seed vary per unit)."""
    return cfg.selection.model_dump(include={"budget", "budget_unit", "gamma"})


def strategy_key(cfg: RunConfig, strategy: str, budget_unit: str) -> str:
    """A strategy at the run's budget unit is named as itself; at the other one, STRATEGY@UNIT."""
    return strategy if budget_unit == cfg.selection.budget_unit or strategy == FULL else f"{strategy}@{budget_unit}"


def parse_key(cfg: RunConfig, key: str) -> tuple[str, str]:
    """(strategy, budget unit) of a strategy key."""
    strategy, _, unit = key.partition("@")
    return strategy, unit or cfg.selection.budget_unit


def compared_keys(cfg: RunConfig) -> list[str]:
    """Every strategy at every compared budget unit (full once: it is every row)."""
    units = cfg.compare.budget_units or [cfg.selection.budget_unit]
    keys = [strategy_key(cfg, s, u) for u in units for s in cfg.compare.strategies]
    return list(dict.fromkeys(keys))


def training_settings(cfg: RunConfig):
    train = cfg.compare.train or cfg.warmup.model_copy(update={"num_workers": 1})  # one worker a unit
    if train.num_workers > 1:
        raise ConfigError("compare.train.num_workers must be 1: each unit trains on one worker, and units run in "
                          "parallel instead")
    return train


def comparable_training(cfg: RunConfig) -> dict[str, Any]:
    """The training settings two comparable units share. Gradient checkpointing is left out: it saves
    memory and trains the same model (tested), so a large unit such as full can turn it on alone."""
    return training_settings(cfg).model_dump(mode="json", exclude={"seed", "gradient_checkpointing"})


def fingerprint(cfg: RunConfig, scores_dir: str, heldout: list[Sample]) -> dict[str, Any]:
    """What makes two units comparable: the same base, scores, budget, training and held-out
    settings (strategies and seeds may be added to a comparison; these may not change)."""
    from .models import identity, pin

    c = cfg.compare
    manifest = rundir.read_manifest(scores_dir)
    return {
        "base_model": identity(pin(cfg.model.base)),
        "scores": manifest["fingerprint_hash"],
        "budget": budget_settings(cfg),
        "train": comparable_training(cfg),
        "template": cfg.template.model_dump(mode="json"),
        "dtype": cfg.model.dtype,
        "heldout": {"rows": len(heldout), "sha256": samples_digest(heldout)},
        "eval_command": c.eval_command,
        "metric": c.metric,
        # the judging rule is part of what an accuracy means (recorded only when exact match is on)
        "exact_match": [c.exact_match, c.max_new_tokens, *([EXACT_MATCH_RULE] if c.exact_match else [])],
    }


def in_pool(scores_dir: str, ids: list[str]) -> list[str]:
    """The ids that are also rows of the pool (run as a task: it reads every score row's id)."""
    from .selection import load_scores

    pool = set(load_scores(scores_dir, ["sample_id"]).column("sample_id").to_pylist())
    return [i for i in ids if i in pool]


def plan_units(cfg: RunConfig, scores_dir: str, units: list[tuple[str, int]]) -> dict[str, dict[str, Any]]:  # (key, seed)
    """{unit: its training rows}, each strategy's pick written as a committed selection under
    compare/selections/ (run as a task: it reads every score row, or above
    ray.select_in_memory_rows, runs the distributed search once per pick, as the run's selection does)."""
    from .config import SelectionConfig
    from .selection import write_selection
    from .selection_search import ScoresSelector

    pick = ScoresSelector(scores_dir, cfg.ray.select_in_memory_rows)
    out: dict[str, dict[str, Any]] = {}
    for key, seed in units:
        strategy, budget_unit = parse_key(cfg, key)
        # full: every ok row once (a selection of all samples); random: its pick depends on the seed
        settings = (dict(strategy="longest", budget=1.0, budget_unit="samples") if strategy == FULL else
                    budget_settings(cfg) | {"strategy": strategy, "seed": seed, "budget_unit": budget_unit})
        name = f"{key}-seed-{seed}" if strategy == "random" else key
        sel_dir = rundir.compare_selection_dir(cfg.out, name)
        commit = rundir.committed_selection(sel_dir)
        if commit is None:
            sel = pick(SelectionConfig(**settings))
            paths, stats = write_selection(sel, sel_dir, export="never"), sel.stats
        else:
            paths, stats = commit["paths"], rundir.read_json(commit["paths"]["stats"])
        out[unit_name(key, seed)] = {"strategy": key, "seed": seed, "budget_unit": budget_unit, "selection": sel_dir,
                                          "scores": paths["scores"],
                                          "n_rows": stats["selected_rows"], "tokens": stats["selected_response_tokens"]}
    return out


def heldout_nll(cfg: RunConfig, model_dir: str, heldout: list[Sample]) -> dict[str, Any]:
    """Mean response NLL of the held-out rows under one model, computed as scoring computes it."""
    from .engines import make_engine
    from .engines.base import engine_settings
    from .models import load_tokenizer
    from .template import tokenize_samples

    toks = [t for t in tokenize_samples(heldout, cfg.template, load_tokenizer(model_dir)) if t.status == "ok"]
    if not toks:
        raise ConfigError("no held-out row survives templating (all empty or over template.max_length)")
    engine = make_engine("hf", model_dir, None, engine_settings(cfg, ("base",)))
    res = engine.score([t.input_ids for t in toks], [t.response_mask for t in toks], "base")
    ok = np.isfinite(res.nll)
    tokens = np.array([t.n_response_tokens for t in toks], dtype=np.float64)
    return {"rows": int(ok.sum()), "rows_failed": int((~ok).sum()), "nll": float(res.nll[ok].mean()),
            "nll_per_token": float((res.nll * tokens)[ok].sum() / tokens[ok].sum()),
            "entropy": float(res.entropy[ok].mean()), "tokens": int(tokens[ok].sum()), "seconds": res.seconds,
            "per_row_nll": [float(x) if np.isfinite(x) else None for x in res.nll]}


def user_metrics(command: str, model_dir: str, heldout: list[Sample]) -> dict[str, float]:
    """Run the user's evaluation on one model; the numbers of the last JSON-object line it prints."""
    with tempfile.TemporaryDirectory(prefix="instructdiff-eval-") as tmp:
        path = Path(tmp) / "heldout.jsonl"
        with path.open("w") as f:
            for s in heldout:
                f.write(json.dumps({"sample_id": s.sample_id, "instruction": s.instruction, "input": s.input,
                                    "response": s.response, "messages": s.messages}, ensure_ascii=False) + "\n")
        cmd = command.replace("{model_dir}", shlex.quote(model_dir)).replace("{heldout}", shlex.quote(str(path)))
        env = os.environ | {"INSTRUCTDIFF_MODEL_DIR": model_dir, "INSTRUCTDIFF_HELDOUT": str(path)}
        proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise EvalCommandFailed(f"compare.eval_command exited {proc.returncode} on {model_dir}: "
                                f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    for line in reversed(proc.stdout.splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return {k: float(v) for k, v in obj.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    raise EvalCommandFailed(f"compare.eval_command printed no JSON object line on {model_dir}; "
                            f"its output ended: {proc.stdout.strip()[-300:]!r}")


def pick_metric(c: CompareConfig, metrics: dict[str, float]) -> tuple[str, float]:
    if c.metric:
        if c.metric not in metrics:
            raise EvalCommandFailed(f"compare.metric {c.metric!r} is not in the command's output {sorted(metrics)}")
        return c.metric, metrics[c.metric]
    if len(metrics) != 1:
        raise EvalCommandFailed(f"compare.eval_command printed {len(metrics)} numbers {sorted(metrics)}; "
                                "name the one to compare with compare.metric")
    return next(iter(metrics.items()))


def peak_rss_mb() -> float:
    """This process's peak resident memory: a unit's own, as each unit runs in a fresh worker (max_calls=1)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_unit(cfg: RunConfig, unit: str, samples: SampleSet | list[Sample] | None, heldout: list[Sample],
             info: dict[str, Any]) -> dict[str, Any]:
    """Train (unless `samples` is None: the base model), evaluate, then write the unit's marker."""
    from .models import pin, resolve_model
    from .runtime import quiet_libraries
    from .warmup import step_printer, train_warmup

    quiet_libraries(cfg.progress)
    t0 = time.monotonic()
    train = None
    if samples is None:
        model_dir = resolve_model(pin(cfg.model.base))
    else:
        result = train_warmup(cfg, samples, rundir.unit_model_dir(cfg.out, unit),
                              on_step=step_printer(cfg, f"compare {unit}"), in_process=True)
        train = asdict(result)
        model_dir = resolve_model(result.merged_dir)
    t1 = time.monotonic()
    evaluation = heldout_nll(cfg, model_dir, heldout)
    metric = None
    if cfg.compare.eval_command:
        metrics = user_metrics(cfg.compare.eval_command, model_dir, heldout)
        name, value = pick_metric(cfg.compare, metrics)
        metric = {"name": name, "value": value, "all": metrics}
    exact = None
    if cfg.compare.exact_match:
        from .evaluate import exact_match_eval

        exact = exact_match_eval(cfg, model_dir, heldout)
    t2 = time.monotonic()
    out = {"unit": unit, **info, "train": train, "heldout": evaluation, "user_metric": metric, "exact_match": exact,
           "gradient_checkpointing": cfg.warmup.gradient_checkpointing if samples is not None else None,
           "train_seconds": t1 - t0, "eval_seconds": t2 - t1, "cpus": cfg.ray.cpus_per_actor, "finished_at": time.time(),
           "peak_rss_mb": peak_rss_mb()}
    if armed("compare.before_unit_marker") == unit:
        kill_point("compare.before_unit_marker")
    rundir.write_unit_result(cfg.out, unit, out)
    return out


def compare_run(cfg: RunConfig) -> dict[str, Any]:
    """Every missing unit, then comparison.json / comparison.md and the report. The caller holds
    the run directory's lease."""
    import ray

    from .runtime import init_ray, remote_call, training_gpus
    from .warmup import collect

    c = cfg.compare
    if c is None:
        raise ConfigError("nothing to compare against: give --eval HELD_OUT (or a compare: section with eval)")
    train = training_settings(cfg)
    init_ray(cfg)
    scores_dir = scores_of_run(cfg.out)
    heldout = load_heldout(cfg)
    overlap = remote_call(in_pool, scores_dir, [s.sample_id for s in heldout])
    if overlap:
        raise ConfigError(f"{len(overlap)} of {len(heldout)} held-out rows are also in the pool (first: {overlap[0]}); "
                          "a held-out set must not share a sample with what the models train on (see compare.eval_skip)")
    rundir.compare_stage(cfg.out).open(fingerprint(cfg, scores_dir, heldout), replace=False)
    wanted = [(k, seed) for k in compared_keys(cfg) for seed in (c.full_seeds if k == FULL and c.full_seeds else c.seeds)]
    plans = remote_call(plan_units, cfg, scores_dir, wanted)
    names = [BASE_UNIT, *plans]
    finished = rundir.compare_stage(cfg.out).items()
    done = {n: finished.get(n) for n in names}
    pending = [n for n in names if done[n] is None]
    progress = Progress("compare", len(names), cfg.progress, unit="units")
    progress.update(len(names) - len(pending))
    progress.note(f"{len(names)} units ({len(wanted)} strategy x seed + the base model), "
                  f"{len(names) - len(pending)} already done; held-out: {len(heldout)} rows")
    shards = load_plan(cfg.data, cfg.out).shards
    threads = cfg.engine.threads or max(1, int(cfg.ray.cpus_per_actor))
    gpus = training_gpus(cfg)  # asks the cluster: once
    devices = float(gpus) or cfg.ray.cpus_per_actor  # what one unit holds, for its cost
    # max_calls=1: a fresh worker per unit, so nothing one unit held stays in the next and peak_rss_mb is its own
    task = ray.remote(num_cpus=cfg.ray.cpus_per_actor, num_gpus=gpus, max_retries=1, max_calls=1)(run_unit)
    heldout_ref = ray.put(heldout)
    running: dict[Any, str] = {}
    queue = list(pending)
    # Units in flight: on GPUs as many as the scoring pool may take (ray.max_actors), so an autoscaler is
    # not asked for a node per unit; on CPUs as many as the cluster's CPUs hold.
    window = max(1, cfg.ray.max_actors if gpus else int(ray.cluster_resources().get("CPU", 1) // cfg.ray.cpus_per_actor))

    def submit(name: str) -> None:
        """A unit's training rows are read when it starts, by tasks, into the object store: the driver holds
        references, never the rows."""
        info = {k: v for k, v in plans.get(name, {"strategy": BASE_UNIT, "seed": None}).items() if k != "scores"}
        info["devices"] = devices  # what the unit holds, for its cost
        samples = None
        if name != BASE_UNIT:
            samples = collect(cfg, shards, selection=plans[name]["scores"])
        ucfg = cfg.model_copy(update={"warmup": train.model_copy(update={"seed": info["seed"] or 0}),
                                      "engine": cfg.engine.model_copy(update={"threads": threads})})
        running[task.remote(ucfg, name, samples, heldout_ref, info)] = name

    failed: dict[str, str] = {}
    while queue or running:
        while queue and len(running) < window:
            submit(queue.pop(0))
        ready, _ = ray.wait(list(running), num_returns=1)
        name = running.pop(ready[0])
        try:
            done[name] = ray.get(ready[0])
        except Exception as err:  # noqa: BLE001 - one unit's failure must not lose the others
            failed[name] = f"{type(err).__name__}: {str(err).splitlines()[-1][:500] if str(err) else ''}"
            progress.note(f"{name} failed: {failed[name]}")
            continue
        h = done[name]["heldout"]
        progress.update(1, extra=f"{name}: held-out NLL {h['nll']:.4f} "
                                 f"(train {done[name]['train_seconds']:.0f}s, eval {done[name]['eval_seconds']:.0f}s)")
    if failed:
        raise RuntimeError(f"{len(failed)} compare units failed ({'; '.join(f'{k}: {v}' for k, v in failed.items())}); "
                           f"the {len(names) - len(failed)} finished units are kept; rerun to compute the rest")
    table = summarize(cfg, [done[n] for n in names], len(heldout), selection_cost(cfg, devices))
    table["computed"], table["reused"] = pending, [n for n in names if n not in pending]
    write_comparison(cfg.out, table)
    from .report import write_run_report

    remote_call(write_run_report, cfg.out)
    return table


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _per_row(unit: dict[str, Any]) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in unit["heldout"]["per_row_nll"]], dtype=np.float64)


def selection_cost(cfg: RunConfig, per_device: float) -> float | None:
    """Device-minutes the run spent to select (warmup training and both scoring passes, summed over
    rounds), with `per_device` what one actor or unit holds (its GPUs on GPUs, else its CPUs)."""
    if not rundir.exists(rundir.join(cfg.out, rundir.RUN_SUMMARY)):
        return None
    summary = RunSummary.from_dict(rundir.read_run_summary(cfg.out))
    seconds = 0.0
    for rnd in summary.rounds:
        sc = rnd.scoring
        seconds += (sc.base_seconds + sc.warmup_seconds + sc.alone_seconds) * per_device
        seconds += float(rnd.warmup.get("seconds", 0.0)) * per_device * int(rnd.warmup.get("workers", 1) or 1)
    return seconds / 60


def summarize(cfg: RunConfig, units: list[dict[str, Any]], heldout_rows: int,
              selection_minutes: float | None = None) -> dict[str, Any]:
    """One row per strategy: the mean over seeds with its 95% t interval, the base model's row,
    and each strategy's held-out NLL minus random's, paired by held-out row and training seed
    (random's pick is redrawn per seed), with a paired bootstrap 95% interval over rows and seeds."""
    from .stats import excludes_zero, mean_interval, paired_bootstrap

    by: dict[str, list[dict[str, Any]]] = {}
    for u in units:
        by.setdefault(u["strategy"], []).append(u)
    rows = []
    for strategy, us in by.items():
        nll_mean, nll_std = _mean_std([u["heldout"]["nll"] for u in us])
        _, nll_lo, nll_hi = mean_interval([u["heldout"]["nll"] for u in us])
        metric = [u["user_metric"]["value"] for u in us if u.get("user_metric")]
        m_mean, m_std = _mean_std(metric)
        _, m_lo, m_hi = mean_interval(metric)
        steps = [u["train"]["steps"] for u in us if u.get("train")]
        em = [u["exact_match"]["accuracy"] for u in us if u.get("exact_match")]
        em_mean, em_lo, em_hi = mean_interval(em)
        row = {"strategy": strategy, "seeds": [u["seed"] for u in us], "rows": float(np.mean([u.get("n_rows") or 0 for u in us])),
               "tokens": float(np.mean([u.get("tokens") or 0 for u in us])), "steps": float(np.mean(steps)) if steps else None,
               "nll_mean": nll_mean, "nll_std": nll_std, "nll_ci": [nll_lo, nll_hi] if nll_lo is not None else None,
               "nll_per_token_mean": float(np.mean([u["heldout"]["nll_per_token"] for u in us])),
               "metric_mean": m_mean, "metric_std": m_std, "metric_ci": [m_lo, m_hi] if m_lo is not None else None,
               "exact_match_mean": em_mean, "exact_match_ci": [em_lo, em_hi] if em_lo is not None else None,
               "train_seconds": float(np.mean([u["train_seconds"] for u in us])),
               "peak_rss_mb": max((u["peak_rss_mb"] for u in us if u.get("peak_rss_mb")), default=None),
               # device-minutes: GPUs held on a GPU cluster, else CPUs (units before `devices` was recorded: CPUs)
               "cpu_minutes": float(sum((u["train_seconds"] + u["eval_seconds"]) * u.get("devices", u["cpus"]) for u in us) / 60)}
        # paired with random at the same budget unit and seed (full, at every row: with random at the run's unit)
        reference = {r["seed"]: _per_row(r) for r in by.get(strategy_key(cfg, "random", parse_key(cfg, strategy)[1]), [])}
        paired = [(_per_row(u), reference[u["seed"]]) for u in us if u["seed"] in reference]
        if paired and parse_key(cfg, strategy)[0] not in ("random", BASE_UNIT):
            mean, lo, hi = paired_bootstrap(np.stack([a - b for a, b in paired]))
            row.update(vs_random=mean, vs_random_ci=[lo, hi], vs_random_seeds=len(paired),
                       distinguishable=excludes_zero(lo, hi))
        rows.append(row)
    rows.sort(key=lambda r: (r["strategy"] != BASE_UNIT, r["nll_mean"]))
    metric_name = next((u["user_metric"]["name"] for u in units if u.get("user_metric")), None)
    return {"budget": budget_settings(cfg),
            "train": comparable_training(cfg),
            "heldout_rows": heldout_rows, "metric": metric_name, "higher_is_better": cfg.compare.higher_is_better,
            "exact_match_rows": cfg.compare.exact_match, "selection_minutes": selection_minutes,
            "strategies": rows, "cpu_minutes": float(sum(r["cpu_minutes"] for r in rows)),
            "units": {u["unit"]: {k: v for k, v in u.items() if k != "heldout"} | {"heldout": {
                k: v for k, v in u["heldout"].items() if k != "per_row_nll"}} for u in units}}


def write_comparison(run_dir: str, table: dict[str, Any]) -> None:
    from .report import comparison_markdown, comparison_plot

    files = rundir.compare_files(run_dir)
    rundir.write_json(files["json"], table, indent=2)
    rundir.write_bytes(files["md"], comparison_markdown(table).encode())
    rundir.write_bytes(files["png"], comparison_plot(table))
