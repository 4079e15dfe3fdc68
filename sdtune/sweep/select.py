"""Picking the best trial: by one metric, in one direction, tolerating up to ``max_failed`` failed trials."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from sdtune.errors import SdtuneError


class SweepFailed(SdtuneError):
    """Too many trials failed, or none produced the metric."""

    exit_code = 4


@dataclass
class TrialResult:
    """What a trial reports back (the trial component's return value, one JSON line)."""

    index: int
    name: str
    overrides: dict[str, Any]
    status: str  # FINISHED | FAILED
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    run_id: str = ""  # the trial's MLflow run
    train_run_id: str = ""
    evaluate_run_id: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict) -> TrialResult:
        data = json.loads(text) if isinstance(text, str) else dict(text)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["index"] = int(known["index"])  # dsl.Collected may turn ints into floats
        known["metrics"] = {k: float(v) for k, v in (known.get("metrics") or {}).items()}
        return cls(**known)


def sort_key(metric: str, direction: str):
    """Sort key putting the best trial first; trials without the metric (failed) last, by index."""

    def key(result: TrialResult) -> tuple:
        value = result.metrics.get(metric) if result.ok else None
        if value is None or math.isnan(value):
            return (1, 0.0, result.index)
        return (0, value if direction == "minimize" else -value, result.index)

    return key


def rank_trials(results: list[TrialResult], metric: str, direction: str) -> list[TrialResult]:
    return sorted(results, key=sort_key(metric, direction))


def select_best(results: list[TrialResult], metric: str, direction: str, max_failed: int) -> TrialResult:
    """The best finished trial. Raises :class:`SweepFailed` when more than ``max_failed`` trials failed or no
    trial has a value for ``metric``. Ties go to the lower trial index (deterministic)."""
    failed = [r for r in results if not r.ok]
    if len(failed) > max_failed:
        reasons = "; ".join(f"{r.name}: {r.error or 'failed'}" for r in failed[:3])
        raise SweepFailed(
            f"{len(failed)} of {len(results)} trials failed (max_failed={max_failed}): {reasons}"
        )
    ranked = rank_trials(results, metric, direction)
    if not ranked or not ranked[0].ok or metric not in ranked[0].metrics:
        have = sorted({k for r in results for k in r.metrics})
        raise SweepFailed(f"no trial has metric {metric!r} (trial metrics: {', '.join(have) or 'none'})")
    return ranked[0]
