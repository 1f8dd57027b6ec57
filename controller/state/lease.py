"""The writer lease (guardrail 9: one writer at a time), as a protocol with a fencing token.

A backend keeps who holds the lease and until when. The reconciler writes to Route 53 only
while it holds the lease, and checks right before each write that it still does with the same
token: the token grows each time the lease changes hands, so a writer that lost it (paused,
partitioned) is recognised by its old token even while it still believes it leads. Backends
live in `controller.state.leases`, one module each, unaware of one another.
"""

from __future__ import annotations

from typing import Protocol


class Lease(Protocol):
    """One named lease, seen from one would-be holder."""

    @property
    def holder(self) -> str:
        """Who this side is, as the backend records it."""
        ...

    async def acquire(self, now: float) -> int | None:
        """Take the lease when it is free, expired or its holder provably gone; renew it when this
        holder has it. The fencing token while this holder has it, None while another does."""
        ...

    async def renew(self, token: int, now: float) -> bool:
        """Extend the lease held with `token`; False when it is no longer held with it."""
        ...

    async def release(self, token: int) -> None:
        """Give the lease up at once (an orderly stop), if still held with `token`."""
        ...

    async def held_by(self, now: float) -> tuple[str, int] | None:
        """Who holds the lease now and with which token (this side or another); None when nobody does."""
        ...

    async def holds(self, token: int, now: float) -> bool:
        """Whether this holder still has the lease with `token`: checked right before every write."""
        ...
