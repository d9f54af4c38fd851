"""Report stage: the summary a user reads afterwards (plots, HTML, summary.md), status and inspect."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import rundir
from .records import RunSummary


CAPTIONS = {
    "delta_entropy_hist": "ΔH per row (base entropy minus warmup entropy, nats per response token), grey for every "
                          "scored row, red for the selected ones. The method takes rows from the lowest ΔH up until "
                          "the budget is filled; gaps in the red are rows the ΔNLL filter removed first.",
    "delta_nll_hist": "ΔNLL per row (base NLL minus warmup NLL). The shaded tails are the rows trimmed before ranking "
                      "(γ per tail): outliers the warmup learned far more or less than the rest.",
    "dh_vs_dnll": "Every scored row by ΔNLL (x) and ΔH (y); the colour is how many rows fall in a cell (log scale, a "
                  "single row is visible), red dots are the selected rows. They sit low in ΔH and inside the kept "
                  "ΔNLL range.",
    "response_length": "Response length in tokens, all scored rows against the selected ones (each normalised). A "
                       "selected curve far to one side means the budget favours short or long responses.",
    "per_source": "Rows scored and selected per input file: a file with few selected rows contributes little.",
    "warmup_loss": "Loss on the response tokens of the warmup rows, per optimizer step: it should fall.",
}


SCATTER_POINTS = 5000  # selected rows drawn over the density plot at most (a seeded sample beyond that)
COLUMNS = {"delta_entropy": 60, "delta_nll": 60, "n_response_tokens": 40}  # histogram bins per column
GRID = 40  # cells per axis of the ΔNLL x ΔH density


@dataclass
class Distributions:
    """What the plots show, accumulated file by file (exact counts per bin; a sample of the selected
    points): memory independent of the number of rows."""
    edges: dict[str, np.ndarray]  # per column, and "grid_x" / "grid_y" (ΔNLL, ΔH) for the density
    all: dict[str, np.ndarray]  # counts per bin of every scored (ok) row, and "grid"
    selected: dict[str, np.ndarray]  # counts per bin of the selected rows
    sources: dict[str, tuple[int, int]] = field(default_factory=dict)  # source file -> (scored, selected)
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (ΔNLL, ΔH) of selected rows, sampled
    n_all: int = 0
    n_selected: int = 0


def _ok(table: pa.Table) -> dict[str, np.ndarray]:
    ok = table.filter(pc.equal(table.column("status").cast(pa.string()), "ok")) if "status" in table.column_names else table
    out = {c: ok.column(c).to_numpy(zero_copy_only=False).astype(float) for c in COLUMNS}
    out["source_file"] = ok.column("source_file").cast(pa.string()).to_numpy(zero_copy_only=False)
    return out


def _read(path: str) -> pa.Table:
    return rundir.read_score_file(path, ["status", *COLUMNS, "source_file"])


def _ranges(files: list[str]) -> dict[str, list[float]]:
    """[min, max] per column over the ok rows of some score files."""
    out: dict[str, list[float]] = {}
    for path in files:
        cols = _ok(_read(path))
        for c in COLUMNS:
            v = cols[c][np.isfinite(cols[c])]
            if len(v):
                lo, hi = out.get(c, [np.inf, -np.inf])
                out[c] = [min(lo, float(v.min())), max(hi, float(v.max()))]
    return out


def _histograms(cols: dict[str, np.ndarray], edges: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {c: np.histogram(cols[c], bins=edges[c])[0] for c in COLUMNS}
    both = np.isfinite(cols["delta_nll"]) & np.isfinite(cols["delta_entropy"])
    out["grid"] = np.histogram2d(cols["delta_nll"][both], cols["delta_entropy"][both],
                                 bins=[edges["grid_x"], edges["grid_y"]])[0]
    return out


def _counts(files: list[str], edges: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, int], int]:
    """Counts per bin, rows per source file and the row count over the ok rows of some score files."""
    total: dict[str, np.ndarray] = {}
    sources: dict[str, int] = {}
    n = 0
    for path in files:
        cols = _ok(_read(path))
        for k, v in _histograms(cols, edges).items():
            total[k] = total.get(k, 0) + v
        names, counts = np.unique(cols["source_file"], return_counts=True)
        for name, c in zip(names, counts):
            sources[str(name)] = sources.get(str(name), 0) + int(c)
        n += len(cols["source_file"])
    return total, sources, n


def _edges(lo: float, hi: float, bins: int) -> np.ndarray:
    return np.histogram_bin_edges(np.array([lo, hi]), bins=bins)


def distributions(scores_dir: str, selection_parquet: str, group: int = 32) -> Distributions:
    """Two passes over the score files (ranges, then counts) as tasks over groups of files, then the
    selection file batch by batch; no pass holds more than one file's columns."""
    from .runtime import map_tasks

    files = rundir.score_files(scores_dir)
    groups = [(files[i : i + group],) for i in range(0, len(files), group)]
    ranges: dict[str, list[float]] = {}
    for part in map_tasks(_ranges, groups):
        for c, (lo, hi) in part.items():
            a, b = ranges.get(c, [np.inf, -np.inf])
            ranges[c] = [min(a, lo), max(b, hi)]
    edges = {c: _edges(*ranges.get(c, [0.0, 1.0]), bins) for c, bins in COLUMNS.items()}
    edges["grid_x"] = _edges(*ranges.get("delta_nll", [0.0, 1.0]), GRID)
    edges["grid_y"] = _edges(*ranges.get("delta_entropy", [0.0, 1.0]), GRID)
    dist = Distributions(edges, {}, {})
    scored: dict[str, int] = {}
    for counts, sources, n in map_tasks(_counts, [(g[0], edges) for g in groups]):
        for k, v in counts.items():
            dist.all[k] = dist.all.get(k, 0) + v
        for name, c in sources.items():
            scored[name] = scored.get(name, 0) + c
        dist.n_all += n
    fs, p = rundir.fs_of(selection_parquet)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        keep = min(1.0, SCATTER_POINTS / max(pf.metadata.num_rows, 1))
        rng = np.random.default_rng(0)
        chosen: dict[str, int] = {}
        points = []
        for batch in pf.iter_batches(columns=[*COLUMNS, "source_file"]):
            cols = _ok(pa.Table.from_batches([batch]))
            for k, v in _histograms(cols, edges).items():
                dist.selected[k] = dist.selected.get(k, 0) + v
            names, counts = np.unique(cols["source_file"], return_counts=True)
            for name, c in zip(names, counts):
                chosen[str(name)] = chosen.get(str(name), 0) + int(c)
            take = rng.random(len(cols["delta_nll"])) < keep
            points.append(np.column_stack([cols["delta_nll"][take], cols["delta_entropy"][take]]))
            dist.n_selected += len(cols["delta_nll"])
    dist.points = np.concatenate(points) if points else np.zeros((0, 2))
    dist.sources = {name: (scored[name], chosen.get(name, 0)) for name in sorted(scored)}
    return dist


def _plots(dist: Distributions, stats: dict, loss: list[dict] | None) -> dict[str, bytes]:
    """The per-round figures as PNG bytes, keyed by name (CAPTIONS says what each shows)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.colors
    import matplotlib.ticker

    edges, every, picked = dist.edges, dist.all, dist.selected
    figs: dict[str, bytes] = {}

    def save(name: str, fig) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        figs[name] = buf.getvalue()

    fig, ax = plt.subplots(figsize=(7, 3.6))
    if dist.n_all:
        ax.stairs(every["delta_entropy"], edges["delta_entropy"], fill=True, color="#b0b7c3", label=f"all scored ({dist.n_all})")
        ax.stairs(picked["delta_entropy"], edges["delta_entropy"], fill=True, color="#d9534f",
                  label=f"selected ({dist.n_selected})")
    ax.set_xlabel("ΔH = H_base − H_warmup (nats/token)")
    ax.set_ylabel("rows")
    ax.set_title("ΔH distribution and the selected region")
    ax.legend()
    save("delta_entropy_hist", fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    if dist.n_all:
        ax.stairs(every["delta_nll"], edges["delta_nll"], fill=True, color="#5b8bd9")
        rng = stats.get("delta_nll_kept_range")
        if rng:
            lo, hi = rng
            ax.axvspan(edges["delta_nll"][0], lo, color="#999", alpha=0.35, label=f"trimmed ({stats['trimmed_per_tail']} per tail)")
            ax.axvspan(hi, edges["delta_nll"][-1], color="#999", alpha=0.35)
            ax.legend()
    ax.set_xlabel("ΔNLL = NLL_base − NLL_warmup")
    ax.set_ylabel("rows")
    ax.set_title("ΔNLL distribution and the two trimmed tails")
    save("delta_nll_hist", fig)

    fig, ax = plt.subplots(figsize=(6.5, 5))
    if dist.n_all:
        grid = np.ma.masked_equal(every["grid"].T, 0)  # empty cells white; 1 row: dark, not white
        cells = ax.pcolormesh(edges["grid_x"], edges["grid_y"], grid, cmap="viridis",
                              norm=matplotlib.colors.LogNorm(vmin=1, vmax=max(2, grid.max())))
        bar = fig.colorbar(cells, ax=ax, label="rows per cell (log scale)")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        bar.ax.yaxis.set_major_formatter(plain)
        bar.ax.yaxis.set_minor_formatter(plain)
        label = "selected" if len(dist.points) == dist.n_selected else f"selected (a sample of {len(dist.points)})"
        ax.scatter(dist.points[:, 0], dist.points[:, 1], s=14, color="#ff4d4d", edgecolors="white", linewidths=0.5,
                   label=label)
        ax.legend()
    ax.set_xlabel("ΔNLL")
    ax.set_ylabel("ΔH")
    ax.set_title("ΔH vs ΔNLL (density) with the selection")
    save("dh_vs_dnll", fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    if dist.n_all:
        e = edges["n_response_tokens"]
        for counts, label in ((every["n_response_tokens"], "all scored"), (picked["n_response_tokens"], "selected")):
            ax.stairs(counts / max(counts.sum(), 1) / np.diff(e), e, fill=True, alpha=0.6, label=label)
        ax.legend()
    ax.set_xlabel("response tokens")
    ax.set_ylabel("density")
    ax.set_title("Response length: all vs selected")
    save("response_length", fig)

    names = list(dist.sources)
    if len(names) > 1:  # one source: nothing to break down
        fig, ax = plt.subplots(figsize=(7, 3.6))
        short = [n.rsplit("/", 1)[-1][:30] for n in names]
        all_n = [dist.sources[n][0] for n in names]
        sel_n = [dist.sources[n][1] for n in names]
        x = np.arange(len(names))
        ax.bar(x - 0.2, all_n, 0.4, label="scored")
        ax.bar(x + 0.2, sel_n, 0.4, label="selected")
        ax.set_xticks(x, short, rotation=20, ha="right")
        ax.set_ylabel("rows")
        ax.set_title("Per-source breakdown")
        ax.legend()
        save("per_source", fig)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    if loss:
        ax.plot([h["step"] for h in loss], [h["loss"] for h in loss], marker=".")
    else:
        ax.text(0.5, 0.5, "warmup model given, not trained in this run", ha="center", va="center")
    ax.set_xlabel("step")
    ax.set_ylabel("response-token loss")
    ax.set_title("Warmup loss curve")
    save("warmup_loss", fig)
    return figs


def write_run_report(run_dir: str) -> dict[str, str]:
    """PNG plots per round, one self-contained index.html and summary.md, under RUN/report/."""
    import base64
    import html

    summary = RunSummary.from_dict(rundir.read_run_summary(run_dir))
    sections, md = [], [f"# InstructDiff run summary\n\nRun directory: `{run_dir}`  \nWall time: {summary.wall_seconds:.1f} s\n"]
    for rnd in summary.rounds:
        k = rnd.round
        dist = distributions(rundir.scores_dir(run_dir, k), rnd.paths["scores"])
        loss_url = rundir.warmup_files(rundir.warmup_dir(run_dir, k))["loss"]
        loss = rundir.read_json(loss_url) if rundir.exists(loss_url) else None
        stats = rnd.selection.to_dict()
        figs = _plots(dist, stats, loss)
        imgs = []
        for name, data in figs.items():
            rundir.write_bytes(rundir.report_plot(run_dir, name, k), data)
            b64 = base64.b64encode(data).decode()
            imgs.append(f'<figure><img alt="{name}" data-name="round-{k}/{name}.png" src="data:image/png;base64,{b64}">'
                        f"<figcaption>{html.escape(CAPTIONS[name])}</figcaption></figure>")
        sc = rnd.scoring.to_dict()
        budget = stats["budget"]
        lines = [
            f"## Round {k}\n",
            "| status | rows |\n|---|---:|",
            *[f"| {s} | {n} |" for s, n in stats["status_counts"].items()],
            f"| **total** | **{stats['rows_total']}** |\n",
            f"- strategy: `{stats['strategy']}`; γ = {stats['gamma']} → {stats['trimmed_per_tail']} rows trimmed per ΔNLL tail"
            + (f" (kept ΔNLL in [{stats['delta_nll_kept_range'][0]:.4f}, {stats['delta_nll_kept_range'][1]:.4f}])" if stats["delta_nll_kept_range"] else ""),
            f"- budget: β = {budget['beta']} of {budget['unit']} = {budget['value']} (of {budget['total_response_tokens']} response tokens)",
            f"- selected: **{stats['selected_rows']} rows**, {stats['selected_response_tokens']} response tokens"
            + (f"; ΔH threshold {stats['delta_entropy_threshold']:.4f}" if stats["delta_entropy_threshold"] is not None else ""),
            f"- duplicates dropped: {stats['duplicates_dropped']}",
            _length_line(stats["status_counts"], stats["rows_total"]),
            f"- ΔH median all {_num(stats['delta_entropy']['all']['q50'])} vs selected {_num(stats['delta_entropy']['selected']['q50'])}",
            f"- scoring: {sc['rows']} rows in {sc['shards_total']} shards ({sc['shards_skipped']} resumed); "
            f"base pass {sc['base_tokens']} tok ({_rate(sc['base_tokens_per_s'])}), warmup pass {sc['warmup_tokens']} tok ({_rate(sc['warmup_tokens_per_s'])})",
            "- timings: " + ", ".join(f"{k2} {v:.1f}" for k2, v in rnd.timings.items()),
            f"- selected data: `{rnd.paths.get('data', '(not exported)')}`\n",
        ]
        md += lines
        sections.append(f"<h2>Round {k}</h2>{_md_html(chr(10).join(lines[1:]))}" + "".join(imgs))
    compare_files = rundir.compare_files(run_dir)
    compare_url = compare_files["json"]
    if rundir.exists(compare_url):  # instructdiff compare: fine-tuned on each strategy's pick
        text = comparison_markdown(rundir.read_json(compare_url))
        fs, png_path = rundir.fs_of(compare_files["png"])
        png = fs.cat_file(png_path)
        rundir.write_bytes(rundir.report_plot(run_dir, "comparison"), png)
        md += ["## Comparison: fine-tuned on each strategy's pick\n", text]
        sections.append("<h2>Comparison: fine-tuned on each strategy's pick</h2>" + _md_html(text)
                        + f'<figure><img alt="comparison" data-name="comparison.png" src="data:image/png;base64,'
                          f'{base64.b64encode(png).decode()}"><figcaption>Held-out mean response NLL of the base model '
                          "fine-tuned on each strategy's pick (lower is better), mean over seeds with the spread of "
                          "the seeds.</figcaption></figure>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>InstructDiff run report</title>"
            "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}img{max-width:100%}figure{margin:1em 0}"
            "figcaption{color:#444;font-size:0.9em}table{border-collapse:collapse}td,th{border:1px solid #bbb;"
            "padding:2px 8px}td{text-align:right}code{background:#f2f2f2}</style>"
            f"</head><body><h1>InstructDiff run report</h1><p>{html.escape(run_dir)}</p>{''.join(sections)}</body></html>")
    paths = rundir.report_files(run_dir)
    rundir.write_bytes(paths["html"], page.encode("utf-8"))
    rundir.write_bytes(paths["summary"], ("\n".join(md) + "\n").encode("utf-8"))
    return paths


def _md_html(text: str) -> str:
    """summary.md's Markdown (tables, lists, bold, code) as HTML for the report page."""
    import markdown

    return markdown.markdown(text, extensions=["tables", "sane_lists"])


def _length_line(counts: dict[str, int], total: int) -> str:
    n = counts.get("too_long", 0)
    share = n / total if total else 0.0
    flag = " **(over 1%: the selection leans toward short samples)**" if share > 0.01 else ""
    return f"- rows skipped for length (too_long): {n} ({100 * share:.1f}%){flag}"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _rate(value) -> str:
    return f"{value:.0f} tok/s" if value else "reused"


def _scores_dirs(run_dir: str) -> list[tuple[str, str]]:
    """(label, scores dir) for a run directory (every round) or a bare scores directory."""
    if rundir.is_scores_dir(run_dir):
        return [("scores", run_dir)]
    return [(r.rsplit("/", 1)[-1], rundir.stage_dirs(r)["scores"]) for r in rundir.round_dirs(run_dir)]


def run_status(run_dir: str) -> str:
    """A one-screen status: lease holder, stage, shards done/pending/interrupted, rows per status, speed, ETA."""
    import json
    import time

    dirs = _scores_dirs(run_dir)
    if not dirs:
        return f"{run_dir}: no run here yet (no round-*/scores or _manifest.json)"
    out = [f"run: {run_dir}"]
    lease = rundir.Lease(run_dir, ttl_s=0)._read()
    if lease:
        alive = time.time() - float(lease.get("heartbeat_at", 0)) <= float(lease.get("ttl_s", 0))
        out.append(f"driver: {'running' if alive else 'gone (lease expired)'}, {rundir.Lease.describe(lease)}")
    for label, sdir in dirs:
        stages = rundir.stage_dirs(sdir.rsplit("/", 1)[0])
        warm = "done" if rundir.warmup_stamp(stages["warmup"]) else ("given" if label != "scores" else "-")
        if not rundir.is_scores_dir(sdir):
            out.append(f"{label}: warmup {warm}; scoring not started")
            continue
        manifest = rundir.read_manifest(sdir)
        plan = manifest["plan"]
        markers = list(rundir.finished_markers(sdir).values())
        done_ids = {m["shard_id"] for m in markers}
        interrupted = rundir.unmarked_shard_files(sdir, done_ids)
        rows_total = sum(s["n_rows"] for s in plan)
        rows_done = sum(m["rows"] for m in markers)
        counts: dict[str, int] = {}
        for m in markers:
            for k, v in m["status_counts"].items():
                counts[k] = counts.get(k, 0) + v
        tokens = sum(m["base_tokens"] + m["warmup_tokens"] for m in markers)
        secs = sum(m["base_seconds"] + m["warmup_seconds"] for m in markers)
        elapsed = (max(m["finished_at"] for m in markers) - manifest["created_at"]) if markers else 0
        rate = rows_done / elapsed if elapsed > 0 else 0
        eta = (rows_total - rows_done) / rate if rate else None
        commit = rundir.committed_selection(stages["selection"])
        stage = "selected" if commit else ("scoring" if len(done_ids) < len(plan) else "scored")
        out.append(
            f"{label}: stage {stage}; warmup {warm}; shards {len(done_ids)}/{len(plan)} done, "
            f"{len(plan) - len(done_ids)} pending, {len(interrupted)} interrupted; rows {rows_done}/{rows_total}"
        )
        out.append("  rows per status: " + json.dumps(dict(sorted(counts.items()))))
        out.append(f"  tokens scored: {tokens}" + (f" ({tokens / secs:.0f} tok/s in model passes)" if secs else "")
                   + (f"; eta {eta:.0f} s" if eta and rows_done < rows_total else ""))
        if commit:
            st = rundir.read_json(commit["paths"]["stats"])
            out.append(f"  selection: {st['selected_rows']} rows, {st['selected_response_tokens']} response tokens ({st['strategy']})")
    done = rundir.finished_units(run_dir)
    if done:  # instructdiff compare
        out.append(f"compare: {len(done)} units finished ({', '.join(done)})")
    out.append(f"(as of {time.strftime('%Y-%m-%d %H:%M:%S')})")
    return "\n".join(out)


def inspect_run(run_dir: str, n: int = 5, round_k: int | None = None) -> str:
    """Top and bottom samples by ΔH and by ΔNLL, with their text and whether they were selected."""
    import json

    from .corpus import read_rows
    from .readers import format_of

    dirs = _scores_dirs(run_dir)
    if not dirs:
        return f"{run_dir}: nothing scored yet"
    label, sdir = dirs[-1] if round_k is None else dirs[round_k - 1]
    # one score file at a time, keeping the n first rows of each order: memory bounded at any N
    columns = ["sample_id", "status", "delta_entropy", "delta_nll", "n_response_tokens", "source_file", "source_row"]
    orders = [(col, order) for col in ("delta_entropy", "delta_nll") for order in ("ascending", "descending")]
    best: dict[tuple[str, str], pa.Table] = {}
    scored = 0
    for path in rundir.score_files(sdir):
        part = rundir.read_score_file(path, columns)
        part = part.filter(pc.equal(part.column("status"), "ok"))
        scored += part.num_rows
        for col, order in orders:
            both = pa.concat_tables([best[col, order], part], promote_options="permissive") if (col, order) in best else part
            best[col, order] = both.take(pc.sort_indices(both, sort_keys=[(col, order), ("sample_id", "ascending")])[:n])
    shown = pa.array(sorted({i for t in best.values() for i in t.column("sample_id").to_pylist()}), pa.string())
    commit = rundir.committed_selection(rundir.stage_dirs(sdir.rsplit("/", 1)[0])["selection"])
    selected: set[str] = set()  # which of the rows shown were selected (the selection read in batches)
    n_selected = 0
    if commit:
        fs, sel_path = rundir.fs_of(commit["paths"]["scores"])
        with fs.open(sel_path, "rb") as f:
            pf = pq.ParquetFile(f)
            n_selected = pf.metadata.num_rows
            for batch in pf.iter_batches(columns=["sample_id"]):
                ids = batch.column(0)
                selected |= set(ids.filter(pc.is_in(ids, value_set=shown)).to_pylist())
    out = [f"{label}: {scored} scored rows ({n_selected} selected)"]
    for col, order in orders:
        out.append(f"\n=== {'lowest' if order == 'ascending' else 'highest'} {n} by {col} ===")
        for r in best[col, order].to_pylist() if (col, order) in best else []:
            rec = next(iter(read_rows(r["source_file"], format_of(r["source_file"]) or "jsonl", {r["source_row"]})), (0, {}))[1]
            text = json.dumps(rec, ensure_ascii=False)
            out.append(f"- {r['sample_id']} {col}={r[col]:.4f} T={r['n_response_tokens']} "
                       f"{'[selected]' if r['sample_id'] in selected else ''}\n    {text[:400]}")
    return "\n".join(out)


# ---------------------------------------------------------------- compare's table and plot


def comparison_markdown(table: dict[str, Any]) -> str:
    """The comparison table (summary.md and comparison.md): means over seeds with 95% intervals,
    the paired difference from random with its bootstrap interval, optimizer steps and cost."""
    b = table["budget"]
    metric = table["metric"]
    head = ["strategy", "seeds", "rows", "response tokens", "steps", "held-out NLL: mean [95% CI]",
            "Δ NLL vs random: mean [paired 95% CI] (< 0: better)"]
    if metric:
        head.append(f"{metric}: mean [95% CI] ({'higher' if table['higher_is_better'] else 'lower'} is better)")
    exact = table.get("exact_match_rows")
    if exact:
        head.append(f"exact match on {exact} rows: mean [95% CI]")
    head += ["peak RSS (GB)", "device-min"]
    lines = [f"Held-out: {table['heldout_rows']} rows; budget β = {b['budget']} of {b['budget_unit']}, γ = {b['gamma']}; "
             f"training: {table['train']['method']}, {table['train']['epochs']} epoch(s), lr {table['train']['learning_rate']}; "
             f"lower NLL is better; total {table['cpu_minutes']:.1f} device-minutes (GPUs held, or CPUs on CPU machines). Intervals: t over seeds; Δ: bootstrap "
             "over held-out rows and seeds, paired with random's unit of the same seed; **bold**: the interval "
             "excludes 0.\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ci(mean, interval, digits=4):
        if mean is None:
            return "n/a"
        return f"{mean:.{digits}f}" + (f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else "")

    by = {r["strategy"]: r for r in table["strategies"]}
    if table.get("selection_minutes") is not None:  # what selecting cost, next to what training on it costs
        cost = f"Cost in device-minutes: selecting (warmup and scoring) {table['selection_minutes']:.1f}"
        if "instructdiff" in by:
            cost += f"; fine-tuning on its pick {by['instructdiff']['cpu_minutes'] / len(by['instructdiff']['seeds']):.1f} per seed"
        if "full" in by:
            cost += f"; fine-tuning on every row {by['full']['cpu_minutes'] / len(by['full']['seeds']):.1f} per seed"
        lines.insert(1, cost + ".\n")
    if any("@" in r["strategy"] for r in table["strategies"]):
        lines.insert(1, f"STRATEGY@UNIT: the same β of the other budget unit ({b['budget_unit']} elsewhere), paired with "
                        "random at that unit.\n")
    for r in table["strategies"]:
        base = r["strategy"] == rundir.BASE_UNIT
        delta = "-"
        if "vs_random" in r:
            delta = ci(r["vs_random"], r.get("vs_random_ci"))
            delta = f"**{delta}**" if r.get("distinguishable") else delta
        cells = [f"{r['strategy']}" + (" (no fine-tuning)" if base else ""), "-" if base else str(len(r["seeds"])),
                 "-" if base else f"{r['rows']:.0f}", "-" if base else f"{r['tokens']:.0f}",
                 "-" if base or r.get("steps") is None else f"{r['steps']:.0f}", ci(r["nll_mean"], r.get("nll_ci")), delta]
        if metric:
            cells.append(ci(r["metric_mean"], r.get("metric_ci")))
        if exact:
            cells.append(ci(r.get("exact_match_mean"), r.get("exact_match_ci"), 3))
        cells += ["-" if not r.get("peak_rss_mb") else f"{r['peak_rss_mb'] / 1024:.2f}", f"{r['cpu_minutes']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_plot(table: dict[str, Any]) -> bytes:
    """Held-out NLL per strategy (bars: mean over seeds, whiskers: 95% interval, dots: seeds) and,
    beside it, each model's NLL against what it cost: fine-tuning and evaluating one seed, plus the
    selection's warmup and scoring for the picks that need scores (not random, full or base)."""
    import io

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["strategies"]
    base = [r["strategy"] == rundir.BASE_UNIT for r in rows]
    low = [r["nll_mean"] - (r["nll_ci"] or [r["nll_mean"]] * 2)[0] for r in rows]
    high = [(r["nll_ci"] or [r["nll_mean"]] * 2)[1] - r["nll_mean"] for r in rows]
    fig, (ax, cost_ax) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(rows))
    colors = ["#999" if b else "#4477aa" for b in base]
    ax.bar(x, [r["nll_mean"] for r in rows], yerr=[low, high], capsize=4, color=colors)
    for i, r in enumerate(rows):
        seeds = [table["units"][rundir.BASE_UNIT if base[i] else rundir.unit_name(r["strategy"], s)]["heldout"]["nll"]
                 for s in (r["seeds"] if not base[i] else [None])]
        ax.plot([i] * len(seeds), seeds, "k.", ms=4)
    lo = min(r["nll_mean"] - d for r, d in zip(rows, low))
    hi = max(r["nll_mean"] + d for r, d in zip(rows, high))
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    ax.set_xticks(x, [r["strategy"] for r in rows], rotation=25, ha="right")
    ax.set_ylabel("held-out response NLL (nats)")
    ax.set_title(f"fine-tuned on each strategy's pick ({table['heldout_rows']} held-out rows, 95% CI)")
    selecting = table.get("selection_minutes") or 0.0
    for i, r in enumerate(rows):
        own = r["cpu_minutes"] / max(1, len(r["seeds"]) if not base[i] else 1)
        scored = not base[i] and r["strategy"].split("@")[0] not in ("random", "full")
        cost = own + (selecting if scored else 0.0)
        cost_ax.errorbar(cost, r["nll_mean"], yerr=[[low[i]], [high[i]]], fmt="o", color=colors[i], capsize=3)
        cost_ax.annotate(r["strategy"], (cost, r["nll_mean"]), fontsize=7,
                         xytext=(4, 2), textcoords="offset points")
    if selecting:
        cost_ax.axvline(selecting, color="#cc6677", ls="--", lw=1)
        cost_ax.annotate("selection cost", (selecting, cost_ax.get_ylim()[1]), fontsize=7, color="#cc6677",
                         xytext=(3, -10), textcoords="offset points")
    cost_ax.set_xlabel("device-minutes per model (selection included where it needs scores)")
    cost_ax.set_ylabel("held-out response NLL (nats)")
    cost_ax.set_title("benefit against cost")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
