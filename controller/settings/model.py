"""The strict base every settings model shares (the probes' own: unknown keys refused, values
frozen, no boolean taken for a number), and the
error a cross-field check raises so that the loader can say which field it belongs to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from probes.spec import StrictModel

if TYPE_CHECKING:
    from collections.abc import Sequence


class SettingsModel(StrictModel):
    pass


class LocatedError(ValueError):
    """A cross-field error that knows which field it belongs to."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def no_duplicates(names: Sequence[str], what: str, field: str | None = "name") -> None:
    """Raise at the second occurrence, located relative to the list (e.g. `[2].name`; `[2]` for
    a list of plain names, `field` None)."""
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in first:
            at = f"[{index}]" + (f".{field}" if field else "")
            raise LocatedError(at, f"duplicate {what} {name!r} (also at [{first[name]}]): each must appear once")
        first[name] = index
