"""Pareto fronts of two-objective studies and the rule that picks one member: plain Python, no Optuna
or MLflow, so that the selection is tested against fronts worked out by hand.

A point is (trial number, values); values[0] is the validation metric, values[1] the cost objective
(MACs, minimized, or CPU img/s, maximized). `directions` says, per value, "maximize" or "minimize".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import PipelineError

Point = tuple[int, Sequence[float]]
PICK_BEST = "best"
PICK_FASTEST = "fastest_within:"


@dataclass(frozen=True)
class PickRule:
    """best: the front member with the best metric. fastest_within:D: the one with the best second
    objective among those whose metric is within D (absolute, the metric's units) of the best."""

    kind: str  # "best" | "fastest_within"
    tolerance: float = 0.0


def parse_pick(text: str) -> PickRule:
    """register_pick's text -> a PickRule; the error names the accepted forms."""
    if text == PICK_BEST:
        return PickRule(PICK_BEST)
    if text.startswith(PICK_FASTEST):
        try:
            tolerance = float(text[len(PICK_FASTEST):])
        except ValueError:
            tolerance = math.nan
        if math.isfinite(tolerance) and tolerance >= 0:
            return PickRule("fastest_within", tolerance)
    raise PipelineError(
        f"register_pick={text!r} is not supported; use best or fastest_within:D (D >= 0 in the metric's units, "
        "e.g. fastest_within:0.01 = the fastest model within 1 point of the best)"
    )


def _better_or_equal(a: float, b: float, direction: str) -> bool:
    return a >= b if direction == "maximize" else a <= b


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """a is at least as good as b in every value and differs from it (so is better in one)."""
    return all(_better_or_equal(x, y, d) for x, y, d in zip(a, b, directions)) and tuple(a) != tuple(b)


def pareto_front(points: Sequence[Point], directions: Sequence[str]) -> list[Point]:
    """The points no other point dominates, in trial order; equal points are all kept (as Optuna's
    best_trials does). Quadratic, which is nothing for a study's tens or hundreds of trials."""
    front = [p for p in points if not any(dominates(q[1], p[1], directions) for q in points)]
    return sorted(front, key=lambda p: p[0])


def _sort_key(value: float, direction: str) -> float:
    """Smaller is better, whatever the direction."""
    return -value if direction == "maximize" else value


def pick(front: Sequence[Point], directions: Sequence[str], rule: PickRule) -> Point:
    """The member `rule` selects; ties go to the better metric, then to the lower trial number."""
    if not front:
        raise ValueError("an empty front has no member to pick")
    metric_dir, cost_dir = directions[0], directions[1]
    by_metric = sorted(front, key=lambda p: (_sort_key(p[1][0], metric_dir), p[0]))
    if rule.kind == PICK_BEST:
        return by_metric[0]
    best = by_metric[0][1][0]
    # The tolerance is absolute: within 0.01 of a best accuracy of 0.95 means 0.94 or better.
    floor = best - rule.tolerance if metric_dir == "maximize" else best + rule.tolerance
    near = [p for p in front if _better_or_equal(p[1][0], floor, metric_dir) or math.isclose(p[1][0], floor)]
    return min(near, key=lambda p: (_sort_key(p[1][1], cost_dir), _sort_key(p[1][0], metric_dir), p[0]))
