"""The selection strategies: the one table to extend when adding a strategy.

Each strategy declares the score columns it reads, the scores it derives from them, whether the
ΔNLL two-tailed trim comes first, and its key: one number per row (NaN: not eligible), ranked
ascending or descending with ties by sample_id. selection.py fills the budget in that order, over
all rows in one process or, at any N, by a distributed search (selection_search.py): a key per
row is what lets both give the same rows. A leaf: it imports nothing of the package, so config
validates names here without the selection machinery.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

Columns = dict[str, Any]  # name -> values over the ranked rows (numpy arrays; sample_id as strings)
ALONE = "base_nll_alone"  # the response scored without its prompt: scored only with template.ifd
SIGN = np.uint64(1 << 63)


def stable_order(values: np.ndarray, order: str = "ascending") -> np.ndarray:
    """Stable sort of rows already in sample_id order: ties stay ordered by sample_id."""
    return np.argsort(values if order == "ascending" else -values, kind="stable")


def sortable(values: np.ndarray, descending: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys whose unsigned order is the order of `values` (reversed when descending; -0.0
    equals 0.0), and which rows are eligible (not NaN). uint64 values (hashes) are keys already."""
    if values.dtype == np.uint64:
        keys, ok = values.copy(), np.ones(len(values), dtype=bool)
    else:
        v = np.asarray(values, dtype=np.float64) + 0.0  # -0.0 + 0.0 is 0.0
        ok = ~np.isnan(v)
        bits = np.where(ok, v, 0.0).view(np.uint64)
        keys = np.where(bits & SIGN, ~bits, bits | SIGN)
    return (~keys if descending else keys), ok


@dataclass(frozen=True)
class Strategy:
    description: str
    key: Callable[[Columns, dict[str, float]], np.ndarray]  # (columns, context) -> a key per row, NaN: not eligible
    descending: bool = False
    columns: tuple[str, ...] = ()  # score columns read besides delta_nll and delta_entropy
    derived: dict[str, Callable[[Columns], np.ndarray]] = field(default_factory=dict)  # scores made from columns
    trim: bool = False  # the ΔNLL two-tailed trim first (needs ΔNLL and ΔH on every ok row)
    threshold: bool = False  # stats report the ΔH of the last row taken
    center: str | None = None  # the key needs this column's lower median over the kept rows (context["center"])

    @property
    def needs_alone(self) -> bool:
        """Whether it reads the extra pass over responses alone (template.ifd)."""
        return ALONE in self.columns


def _column(name: str) -> Callable[[Columns, dict[str, float]], np.ndarray]:
    return lambda cols, ctx: cols[name]


def _near_center(cols: Columns, ctx: dict[str, float]) -> np.ndarray:
    """Distance of ΔH from the kept rows' (lower) median ΔH: the window around the median first."""
    return np.abs(cols["delta_entropy"] - ctx["center"])


def _hashed(cols: Columns, ctx: dict[str, float]) -> np.ndarray:
    """A seeded hash of each sample_id: a uniformly random order that does not depend on N."""
    import pandas as pd

    salt = hashlib.sha256(str(int(ctx["seed"])).encode()).hexdigest()[:16]
    return pd.util.hash_array(np.asarray(cols["sample_id"], dtype=object), hash_key=salt, categorize=False)


def _ifd(ratio: str) -> Callable[[Columns], np.ndarray]:
    """IFD per row from the base NLL with and without the prompt: a ratio of mean losses (loss) or
    of perplexities (ppl); NaN where the response was not scored alone."""
    def ifd(cols: Columns) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return cols["base_nll"] / cols[ALONE] if ratio == "loss" else np.exp(cols["base_nll"] - cols[ALONE])
    return ifd


def _valid_ifd(cols: Columns, ctx: dict[str, float]) -> np.ndarray:
    """IFD where it is finite and below 1 (the prompt helps), else NaN (not eligible)."""
    ifd = cols["ifd"]
    return np.where(np.isfinite(ifd) & (ifd < 1), ifd, np.nan)


STRATEGIES: dict[str, Strategy] = {
    "instructdiff": Strategy("NLL two-tailed filter, then lowest signed ΔH first (the method)", _column("delta_entropy"),
                             trim=True, threshold=True),
    "middle_dh": Strategy("NLL filter, then ΔH nearest the kept rows' median ΔH first", _near_center, trim=True,
                          center="delta_entropy"),
    "highest_dh": Strategy("NLL filter, then highest ΔH first", _column("delta_entropy"), descending=True, trim=True),
    "random": Strategy("uniform random rows (a seeded hash of sample_id), no filter", _hashed, columns=("sample_id",)),
    "ppl_min": Strategy("lowest base-model perplexity first, no filter", _column("base_nll"), columns=("base_nll",)),
    "ppl_max": Strategy("highest base-model perplexity first, no filter", _column("base_nll"), descending=True,
                        columns=("base_nll",)),
    "entropy_min": Strategy("lowest base-model entropy first, no filter", _column("base_entropy"),
                            columns=("base_entropy",)),
    "entropy_max": Strategy("highest base-model entropy first, no filter", _column("base_entropy"), descending=True,
                            columns=("base_entropy",)),
    "longest": Strategy("most response tokens first (the length baseline), no filter", _column("n_response_tokens"),
                        descending=True),
    "ifd_loss": Strategy("highest IFD = NLL(response | prompt) / NLL(response alone) first, IFD >= 1 dropped "
                         "(Cherry-LLM, Data-Juicer); needs template.ifd", _valid_ifd, descending=True,
                         columns=("base_nll", ALONE), derived={"ifd": _ifd("loss")}),
    "ifd_ppl": Strategy("highest IFD = PPL(response | prompt) / PPL(response alone) first, IFD >= 1 dropped "
                        "(Superfiltering); needs template.ifd", _valid_ifd, descending=True,
                        columns=("base_nll", ALONE), derived={"ifd": _ifd("ppl")}),
}


def order(strategy: Strategy, cols: Columns, keep: np.ndarray, ctx: dict[str, float]) -> np.ndarray:
    """The rows (in sample_id order) a strategy ranks, best first: kept, eligible, by key, ties by sample_id."""
    keys, ok = sortable(strategy.key(cols, ctx), strategy.descending)
    rows = np.flatnonzero(keep & ok)
    return rows[np.argsort(keys[rows], kind="stable")]


def check_strategy(name: str, extra: tuple[str, ...] = ()) -> str:
    """`name` if it is a strategy (or one of `extra`), else a ValueError listing the choices."""
    if name in STRATEGIES or name in extra:
        return name
    choices = sorted([*STRATEGIES, *extra])
    near = difflib.get_close_matches(name, choices, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise ValueError(f"unknown strategy {name!r}; {hint}choose from {', '.join(choices)}")
