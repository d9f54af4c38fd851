"""The selection strategies by name: what each ranks by and which scores it needs.

A leaf (imports nothing from the package), so config can validate a strategy name wherever a
SelectionConfig is built without importing the selection machinery; selection.py implements
the orders.
"""

from __future__ import annotations

STRATEGIES = {
    "instructdiff": "NLL two-tailed filter, then lowest signed ΔH first (the method)",
    "middle_dh": "NLL filter, then the ΔH window around the median",
    "highest_dh": "NLL filter, then highest ΔH first",
    "random": "uniform random rows (seeded), no filter",
    "ppl_min": "lowest base-model perplexity first, no filter",
    "ppl_max": "highest base-model perplexity first, no filter",
    "entropy_min": "lowest base-model entropy first, no filter",
    "entropy_max": "highest base-model entropy first, no filter",
    "longest": "most response tokens first (the length baseline), no filter",
    "ifd_loss": "highest IFD = NLL(response | prompt) / NLL(response alone) first, IFD >= 1 dropped (Cherry-LLM, "
                "Data-Juicer); needs template.ifd",
    "ifd_ppl": "highest IFD = PPL(response | prompt) / PPL(response alone) first, IFD >= 1 dropped (Superfiltering); "
               "needs template.ifd",
}
IFD_STRATEGIES = ("ifd_loss", "ifd_ppl")
FILTERED_STRATEGIES = ("instructdiff", "middle_dh", "highest_dh")  # NLL filter first; need ΔNLL and ΔH
BASE_SCORE_STRATEGIES = ("ppl_min", "ppl_max", "entropy_min", "entropy_max")  # rank by a base-model score


def check_strategy(name: str, extra: tuple[str, ...] = ()) -> str:
    """`name` if it is a strategy (or one of `extra`), else a ValueError listing the choices."""
    if name in STRATEGIES or name in extra:
        return name
    import difflib

    choices = sorted([*STRATEGIES, *extra])
    near = difflib.get_close_matches(name, choices, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise ValueError(f"unknown strategy {name!r}; {hint}choose from {', '.join(choices)}")
