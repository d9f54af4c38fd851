"""The selection strategies: the one table to extend when adding a strategy.

Each strategy declares the score columns it reads, the scores it derives from them, whether the
ΔNLL two-tailed trim comes first, and its order: a function of the columns (over the ok rows, in
sample_id order, so a stable sort breaks ties by sample_id), the trim's keep-mask and the seed,
returning row indices best first. selection.py fills the budget in that order. A leaf: it imports
nothing of the package, so config validates names here without the selection machinery.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

Columns = dict[str, np.ndarray]
ALONE = "base_nll_alone"  # the response scored without its prompt: scored only with template.ifd


def stable_order(values: np.ndarray, order: str = "ascending") -> np.ndarray:
    """Stable sort of rows already in sample_id order: ties stay ordered by sample_id."""
    return np.argsort(values if order == "ascending" else -values, kind="stable")


@dataclass(frozen=True)
class Strategy:
    description: str
    order: Callable[[Columns, np.ndarray, int], np.ndarray]  # (columns, keep-mask of the trim, seed) -> rows
    columns: tuple[str, ...] = ()  # score columns read besides delta_nll and delta_entropy
    derived: dict[str, Callable[[Columns], np.ndarray]] = field(default_factory=dict)  # scores made from columns
    trim: bool = False  # the ΔNLL two-tailed trim first (needs ΔNLL and ΔH on every ok row)
    threshold: bool = False  # stats report the ΔH of the last row taken

    @property
    def needs_alone(self) -> bool:
        """Whether it reads the extra pass over responses alone (template.ifd)."""
        return ALONE in self.columns


def _by_dh(direction: str) -> Callable[[Columns, np.ndarray, int], np.ndarray]:
    def order(cols: Columns, keep: np.ndarray, seed: int) -> np.ndarray:
        kept = np.flatnonzero(keep)
        return kept[stable_order(cols["delta_entropy"][kept], direction)]
    return order


def _middle_dh(cols: Columns, keep: np.ndarray, seed: int) -> np.ndarray:
    kept = np.flatnonzero(keep)
    rank = stable_order(cols["delta_entropy"][kept])
    mid = (len(rank) - 1) / 2
    return kept[rank[np.argsort(np.abs(np.arange(len(rank)) - mid), kind="stable")]]


def _by(column: str, direction: str) -> Callable[[Columns, np.ndarray, int], np.ndarray]:
    return lambda cols, keep, seed: stable_order(cols[column], direction)


def _random(cols: Columns, keep: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(len(keep))


def _ifd(ratio: str) -> Callable[[Columns], np.ndarray]:
    """IFD per row from the base NLL with and without the prompt: a ratio of mean losses (loss) or
    of perplexities (ppl); NaN where the response was not scored alone."""
    def ifd(cols: Columns) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return cols["base_nll"] / cols[ALONE] if ratio == "loss" else np.exp(cols["base_nll"] - cols[ALONE])
    return ifd


def _highest_ifd(cols: Columns, keep: np.ndarray, seed: int) -> np.ndarray:
    """Highest IFD first; IFD >= 1 (the prompt does not help) and unscored rows dropped."""
    valid = np.flatnonzero(np.isfinite(cols["ifd"]) & (cols["ifd"] < 1))
    return valid[stable_order(cols["ifd"][valid], "descending")]


STRATEGIES: dict[str, Strategy] = {
    "instructdiff": Strategy("NLL two-tailed filter, then lowest signed ΔH first (the method)", _by_dh("ascending"),
                             trim=True, threshold=True),
    "middle_dh": Strategy("NLL filter, then the ΔH window around the median", _middle_dh, trim=True),
    "highest_dh": Strategy("NLL filter, then highest ΔH first", _by_dh("descending"), trim=True),
    "random": Strategy("uniform random rows (seeded), no filter", _random),
    "ppl_min": Strategy("lowest base-model perplexity first, no filter", _by("base_nll", "ascending"), ("base_nll",)),
    "ppl_max": Strategy("highest base-model perplexity first, no filter", _by("base_nll", "descending"), ("base_nll",)),
    "entropy_min": Strategy("lowest base-model entropy first, no filter", _by("base_entropy", "ascending"),
                            ("base_entropy",)),
    "entropy_max": Strategy("highest base-model entropy first, no filter", _by("base_entropy", "descending"),
                            ("base_entropy",)),
    "longest": Strategy("most response tokens first (the length baseline), no filter",
                        _by("n_response_tokens", "descending")),
    "ifd_loss": Strategy("highest IFD = NLL(response | prompt) / NLL(response alone) first, IFD >= 1 dropped "
                         "(Cherry-LLM, Data-Juicer); needs template.ifd", _highest_ifd, ("base_nll", ALONE),
                         {"ifd": _ifd("loss")}),
    "ifd_ppl": Strategy("highest IFD = PPL(response | prompt) / PPL(response alone) first, IFD >= 1 dropped "
                        "(Superfiltering); needs template.ifd", _highest_ifd, ("base_nll", ALONE), {"ifd": _ifd("ppl")}),
}


def check_strategy(name: str, extra: tuple[str, ...] = ()) -> str:
    """`name` if it is a strategy (or one of `extra`), else a ValueError listing the choices."""
    if name in STRATEGIES or name in extra:
        return name
    choices = sorted([*STRATEGIES, *extra])
    near = difflib.get_close_matches(name, choices, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise ValueError(f"unknown strategy {name!r}; {hint}choose from {', '.join(choices)}")
