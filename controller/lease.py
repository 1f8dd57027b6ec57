"""Who holds the writer lease, and whether a holder on this host is provably gone.

A lease holder names itself by host, boot, process id and the process's start time. A daemon
restarted on the same host (after a crash or a SIGKILL) finds its predecessor's lease still
running; waiting out the lease there would cost a whole lease lifetime of no actuation for a
process that no longer exists. When the holder ran on this host, in this boot, and its process
is gone (or its pid now belongs to a process that started at another time), the lease can be
taken at once, with a higher fencing token. Anything else (another host, an older holder name,
a system without /proc) still waits for the lease to expire.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


def _boot_id() -> str:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
    except OSError:
        return ""


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot; None when there is no such process."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its closing one.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19]  # field 22 of the whole line


@dataclass(frozen=True, slots=True)
class Holder:
    host: str
    pid: int
    nonce: str
    boot: str
    start: str

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.nonce}:{self.boot}:{self.start}"

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        parts = text.rsplit(":", 4)
        if len(parts) != 5 or not parts[1].isdigit():  # noqa: PLR2004 - the five fields above
            return None
        host, pid, nonce, boot, start = parts
        return cls(host, int(pid), nonce, boot, start)


def this_process() -> Holder:
    pid = os.getpid()
    return Holder(socket.gethostname(), pid, uuid.uuid4().hex[:8], _boot_id(), start_time(pid) or "")


def provably_gone(holder: str) -> bool:
    """Whether `holder` ran on this host in this boot and its process no longer runs."""
    other = Holder.parse(holder)
    if other is None or not other.boot or not other.start:
        return False
    me = this_process()
    if other.host != me.host or other.boot != me.boot:
        return False
    if other.pid == me.pid:
        return other.start != me.start
    return start_time(other.pid) != other.start
