"""The records a run writes and reads back: score summary, selection stats, round record, run
summary. One typed definition each; `to_dict` is what goes to JSON (`_summary.json`,
`stats.json`, `_run_summary.json`) and `from_dict` reads it back, ignoring keys it does not know
(derived figures, or fields of a newer version). A leaf module: it imports nothing of the package."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class ScoreSummary:
    """Totals of one scores directory, summed from its shard markers."""

    out_dir: str
    shards_total: int
    shards_skipped: int  # finished before this call
    rows: int
    status_counts: dict[str, int]
    base_tokens: int
    warmup_tokens: int
    base_seconds: float
    warmup_seconds: float
    wall_seconds: float
    tokenize_seconds: float = 0.0  # worker-seconds of read + tokenize, summed over shards
    alone_tokens: int = 0  # template.ifd: the extra base pass over responses alone (its cost)
    alone_seconds: float = 0.0
    write_seconds: float = 0.0  # worker-seconds of writing shard files
    markers: list[dict[str, Any]] = field(default_factory=list, repr=False)  # not persisted

    @property
    def base_tokens_per_s(self) -> float | None:
        return self.base_tokens / self.base_seconds if self.base_seconds else None

    @property
    def warmup_tokens_per_s(self) -> float | None:
        return self.warmup_tokens / self.warmup_seconds if self.warmup_seconds else None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "markers"}  # not asdict: it would deep-copy every marker
        d["base_tokens_per_s"], d["warmup_tokens_per_s"] = self.base_tokens_per_s, self.warmup_tokens_per_s
        d["too_long_share"] = self.status_counts.get("too_long", 0) / self.rows if self.rows else 0.0
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScoreSummary":
        return cls(**_known(cls, d))


@dataclass
class SelectionStats:
    """What a selection did (`stats.json`)."""

    strategy: str
    rows_total: int
    status_counts: dict[str, int]
    rows_scored: int  # ok rows, duplicates dropped
    duplicates_dropped: int
    gamma: float
    trimmed_per_tail: int
    rows_after_nll_filter: int
    delta_nll_kept_range: list[float] | None
    budget: dict[str, Any]  # unit, beta, value, total_response_tokens
    selected_rows: int
    selected_response_tokens: int
    delta_entropy_threshold: float | None
    delta_entropy: dict[str, Any]  # quantiles of all and of the selected rows
    delta_nll: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SelectionStats":
        return cls(**_known(cls, d))


@dataclass
class RoundRecord:
    """One round: its warmup, scoring and selection."""

    round: int
    warmup: dict[str, Any]  # the warmup result, or {"given": MODEL}
    scoring: ScoreSummary
    selection: SelectionStats
    paths: dict[str, str]  # ids, scores, stats and (when exported) data of the selection
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "warmup": self.warmup, "scoring": self.scoring.to_dict(),
                "selection": self.selection.to_dict(), "paths": self.paths, "timings": self.timings}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RoundRecord":
        return cls(round=d["round"], warmup=d["warmup"], scoring=ScoreSummary.from_dict(d["scoring"]),
                   selection=SelectionStats.from_dict(d["selection"]), paths=d["paths"], timings=d["timings"])


@dataclass
class RunSummary:
    """A finished run (`_run_summary.json`)."""

    run_dir: str
    rounds: list[RoundRecord]
    wall_seconds: float
    compare: dict[str, Any] | None = None  # strategies, metric, heldout_rows, cpu_minutes
    mlflow_run_id: str | None = None

    @property
    def final_selection(self) -> dict[str, str]:
        return self.rounds[-1].paths

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"run_dir": self.run_dir, "rounds": [r.to_dict() for r in self.rounds],
                             "final_selection": self.final_selection, "wall_seconds": self.wall_seconds}
        if self.compare is not None:
            d["compare"] = self.compare
        if self.mlflow_run_id is not None:
            d["mlflow_run_id"] = self.mlflow_run_id
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSummary":
        return cls(run_dir=d["run_dir"], rounds=[RoundRecord.from_dict(r) for r in d["rounds"]],
                   wall_seconds=d["wall_seconds"], compare=d.get("compare"), mlflow_run_id=d.get("mlflow_run_id"))
