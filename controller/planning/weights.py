"""Shares to Route 53 weights and back.

Route 53 splits a weighted group's answers by weight over the sum of weights, with integer
weights 0..255. An operator thinks in shares ("1% to eu-west-1"); this module finds integer
weights whose achieved shares come as close as possible to the intended ones, so 1% comes out as
1 against 99 (exactly 1%), not 0 or 2%. It also keeps two promises the guardrails depend on: a
member meant to get nothing gets weight 0, and a member meant to get something gets at least 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from controller.settings.limits import MAX_WEIGHT, SHARE_EPSILON

if TYPE_CHECKING:
    from collections.abc import Mapping


@dataclass(frozen=True, slots=True)
class Allocation:
    """Integer weights per set identifier, with the shares (percent) they achieve."""

    weights: dict[str, int]
    intended: dict[str, float]

    @property
    def achieved(self) -> dict[str, float]:
        return shares(self.weights)

    @property
    def max_error(self) -> float:
        """Largest difference, in percentage points, between achieved and intended share."""
        achieved = self.achieved
        return max(abs(achieved[k] - self.intended[k]) for k in self.weights)


def shares(weights: Mapping[str, int]) -> dict[str, float]:
    """Percent of answers each member gets; an all-zero group splits equally, as Route 53 does."""
    total = sum(weights.values())
    if total == 0:
        return {k: 100.0 / len(weights) for k in weights} if weights else {}
    return {k: 100.0 * w / total for k, w in weights.items()}


def to_weights(intended: Mapping[str, float]) -> Allocation:
    """The integer weights (0..255) whose shares are closest to `intended` (percent, summing to 100).

    Among totals 1..255*n, each is split by largest remainder; the split with the smallest worst
    error wins, the smallest total on ties (so 50/50 is 1:1 and 1/99 is 1:99).
    """
    if not intended:
        raise ValueError("no members to weigh")
    if any(v < 0 or math.isnan(v) for v in intended.values()):
        raise ValueError(f"shares must be 0 or more: {dict(intended)}")
    total_share = sum(intended.values())
    if total_share <= 0:
        raise ValueError("at least one member must have a share above 0 (an all-zero group splits equally)")
    norm = {k: 100.0 * v / total_share for k, v in intended.items()}
    positive = [k for k, v in intended.items() if v > 0]  # before normalising, which can underflow
    best: dict[str, int] | None = None
    best_error = math.inf
    for total in range(len(positive), MAX_WEIGHT * len(positive) + 1):
        weights = _largest_remainder(norm, positive, total)
        if weights is None:
            continue
        error = max(abs(100.0 * weights[k] / total - norm[k]) for k in norm)
        if error < best_error - SHARE_EPSILON:
            best, best_error = weights, error
            if error <= SHARE_EPSILON:
                break
    if best is None:  # pragma: no cover - total = len(positive) always fits
        raise ValueError(f"no weights fit {dict(intended)}")
    return Allocation(best, norm)


def _largest_remainder(norm: Mapping[str, float], positive: list[str], total: int) -> dict[str, int] | None:
    quotas = {k: norm[k] * total / 100.0 for k in positive}
    weights = {k: max(1, math.floor(q)) for k, q in quotas.items()}
    left = total - sum(weights.values())
    while left < 0:  # the promised 1 for tiny shares overshot: take it from the most over-served
        donors = [k for k in positive if weights[k] > 1]
        if not donors:
            return None
        weights[max(donors, key=lambda k: weights[k] - quotas[k])] -= 1
        left += 1
    for k in sorted(positive, key=lambda k: quotas[k] - math.floor(quotas[k]), reverse=True)[:left]:
        weights[k] += 1
    if sum(weights.values()) != total or max(weights.values()) > MAX_WEIGHT:
        return None
    return {k: weights.get(k, 0) for k in norm}
