"""Closing a listening server without leaving a connection half made.

asyncio accepts a connection in one step of the event loop and makes its transport in the next.
On Python 3.11 a transport made after its server closed fails (the server asserts it still
listens), and the accepted socket is left unclosed for the garbage collector to warn of: a probe
connecting just as its region stopped listening did that in a clean-clone test run. So accepting
stops first, the loop runs once (a connection accepted already gets its transport while the
server still listens, and is served or closed by its owner), and only then does the server close.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web


async def stop_accepting(*servers: asyncio.AbstractServer | None) -> None:
    """Stop `servers` accepting connections and let the loop run once; close them after."""
    loop = asyncio.get_running_loop()
    for server in servers:
        if isinstance(server, asyncio.base_events.Server):  # the loop's own (not uvloop's)
            for sock in server.sockets:
                loop.remove_reader(sock.fileno())
    await asyncio.sleep(0)


def servers_of(*sites: web.BaseSite) -> list[asyncio.AbstractServer | None]:
    """The asyncio servers behind aiohttp sites (aiohttp offers no pause of its own)."""
    return [site._server for site in sites]  # noqa: SLF001


async def close_runner(runner: web.BaseRunner) -> None:
    """`runner.cleanup()`, once its sites have stopped accepting (see the module)."""
    await stop_accepting(*servers_of(*runner.sites))
    await runner.cleanup()
