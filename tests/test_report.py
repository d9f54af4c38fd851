"""The report's figures and page without a run: which plots appear, captions, rendered summary."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from instructdiff_ray import report
from instructdiff_ray.report import CAPTIONS, _md_html, _plots, distributions


def _scores(root, sources, n=3000, files=4, seed=0):
    """Score files as scoring writes them (a few rows not ok), and a selection.parquet of every 10th ok row."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    tables = []
    for f in range(files):
        m = n // files
        status = np.where(rng.random(m) < 0.05, "too_long", "ok")
        t = pa.table({"sample_id": [f"s{f}-{i}" for i in range(m)], "source_file": [sources[i % len(sources)] for i in range(m)],
                      "n_response_tokens": rng.integers(5, 200, m).astype(np.int32),
                      "delta_entropy": np.round(rng.normal(size=m), 2), "delta_nll": rng.normal(size=m), "status": status})
        pq.write_table(t, root / f"shard-{f:05d}.parquet")
        tables.append(t)
    every = pa.concat_tables(tables)
    ok = every.filter(pa.compute.equal(every.column("status"), "ok"))
    sel = ok.take(np.arange(0, ok.num_rows, 10))
    pq.write_table(sel, root / "selection.parquet")
    return ok, sel


def test_distributions_are_exact_counts_from_bounded_reads(tmp_path, monkeypatch):
    ok, sel = _scores(tmp_path / "scores", ["a.jsonl", "b.jsonl"])
    (tmp_path / "scores" / "selection.parquet").rename(tmp_path / "selection.parquet")
    monkeypatch.setattr(report, "SCATTER_POINTS", 100)
    dist = distributions(str(tmp_path / "scores"), str(tmp_path / "selection.parquet"), group=3)
    for c in report.COLUMNS:
        values = ok.column(c).to_numpy().astype(float)
        assert dist.edges[c][0] == values.min() and dist.edges[c][-1] == values.max()
        assert np.array_equal(dist.all[c], np.histogram(values, bins=dist.edges[c])[0])
        chosen = sel.column(c).to_numpy().astype(float)
        assert np.array_equal(dist.selected[c], np.histogram(chosen, bins=dist.edges[c])[0])
    assert dist.all["grid"].sum() == dist.n_all == ok.num_rows and dist.n_selected == sel.num_rows
    assert 50 < len(dist.points) < 200  # a sample of the 285 selected points, not all of them
    assert dist.sources == {"a.jsonl": (int(np.sum(ok.column("source_file").to_numpy(zero_copy_only=False) == "a.jsonl")),
                                        int(np.sum(sel.column("source_file").to_numpy(zero_copy_only=False) == "a.jsonl"))),
                            "b.jsonl": dist.sources["b.jsonl"]}
    assert sum(a for a, _ in dist.sources.values()) == ok.num_rows


def test_plots_have_captions_and_one_source_has_no_breakdown(tmp_path):
    stats = {"delta_nll_kept_range": [-1.0, 1.0], "trimmed_per_tail": 20}
    figs = {}
    for name, sources in (("one", ["a.jsonl"]), ("two", ["a.jsonl", "b.jsonl"])):
        _scores(tmp_path / name, sources)
        (tmp_path / name / "selection.parquet").rename(tmp_path / f"{name}.parquet")
        dist = distributions(str(tmp_path / name), str(tmp_path / f"{name}.parquet"))
        figs[name] = _plots(dist, stats, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}] if name == "one" else None)
    one, two = figs["one"], figs["two"]
    assert "per_source" not in one and "per_source" in two
    assert set(two) <= set(CAPTIONS) and all(len(CAPTIONS[k].split()) >= 8 for k in two)
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in two.values())


def test_summary_markdown_renders_as_html():
    page = _md_html("| status | rows |\n|---|---:|\n| ok | 3 |\n| **total** | **3** |\n\n- strategy: `instructdiff`\n"
                    "- selected: **1 rows**")
    assert "<table>" in page and "<strong>total</strong>" in page and "<code>instructdiff</code>" in page
    assert "<li>" in page and "**" not in page and "|---" not in page


def test_progress_prints_while_nothing_finishes(capsys):
    """A stage whose first shard takes minutes still prints a line every `quiet_every` seconds."""
    import time

    from instructdiff_ray.progress import Progress

    with Progress("score", 100, "on", quiet_every=0.3) as p:
        time.sleep(1.2)
        p.update(100, 1000)
    lines = capsys.readouterr().err.splitlines()
    working = [x for x in lines if x.endswith("working")]
    assert len(working) >= 2 and all("0/100 rows" in x and "eta ?" in x for x in working)
    assert lines[-1].startswith("[score] 100/100 rows (100%)")
