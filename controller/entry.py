"""The `regionshift` command. `regionshift agent ...` runs the probe agent (`probes.agent`) without
loading the controller: an agent in a region is a small process, with none of the controller's
dependencies (no scipy, no Route 53 client). Every other subcommand is the controller's CLI."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["agent"]:
        from probes.agent import main as agent  # noqa: PLC0415 - the agent alone, on purpose

        return agent(args[1:])
    from controller.cli import main as controller  # noqa: PLC0415

    return controller(args)
