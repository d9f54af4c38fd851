"""The report's figures and page without a run: which plots appear, captions, rendered summary."""

import numpy as np

from instructdiff_ray.report import CAPTIONS, _md_html, _plots


class _Fake:
    def __init__(self, sources):
        rng = np.random.default_rng(0)
        n = 200
        self.filter_ok = {"sample_id": np.array([f"s{i}" for i in range(n)]),
                          "source_file": np.array([sources[i % len(sources)] for i in range(n)]),
                          "n_response_tokens": rng.integers(5, 200, n), "delta_entropy": rng.normal(size=n),
                          "delta_nll": rng.normal(size=n)}


def test_plots_have_captions_and_one_source_has_no_breakdown():
    stats = {"delta_nll_kept_range": [-1.0, 1.0], "trimmed_per_tail": 20}
    sel = {"sample_id": [f"s{i}" for i in range(0, 200, 10)]}
    one = _plots(_Fake(["a.jsonl"]), sel, stats, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    two = _plots(_Fake(["a.jsonl", "b.jsonl"]), sel, stats, None)
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
