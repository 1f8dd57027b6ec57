"""What operators may do to a ramp, one list for the planner, the API and the command line."""

from __future__ import annotations

from typing import Literal, TypeGuard, get_args

Action = Literal["start", "pause", "resume", "abort"]
ACTIONS: tuple[str, ...] = get_args(Action)


def is_action(text: str) -> TypeGuard[Action]:
    return text in ACTIONS
