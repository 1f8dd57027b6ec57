"""Numbers every layer agrees on: Route 53's limits, and the float noise shares are compared within."""

from __future__ import annotations

MAX_WEIGHT = 255


MAX_TTL = 2_147_483_647  # Route 53's limit, seconds


MAX_WEIGHTED_RECORDS = 100  # per name and type


# Shares (percent) closer than this are equal: float noise, not a change.
SHARE_EPSILON = 1e-9
