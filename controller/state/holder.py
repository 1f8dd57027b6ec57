"""Who holds the writer lease, and whether a holder on this host is provably gone.

A lease holder names itself by host, boot, PID namespace, process id and the process's start
time. A daemon restarted on the same host (after a crash or a SIGKILL) finds its predecessor's
lease still running; waiting out the lease there would cost a whole lease lifetime of no
actuation for a process that no longer exists. When the holder ran on this host, in this boot
and in this PID namespace, and its process is gone (or its pid now belongs to a process that
started at another time), the lease can be taken at once, with a higher fencing token. Anything
else (another host or container, an older holder name, a process this one may not look at, a
system without /proc) still waits for the lease to expire.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
_FIELDS = 6


def _boot_id() -> str:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return str((_PROC / "self/ns/pid").stat().st_ino)
    except OSError:
        return ""


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot; None when there is no such process,
    or only its zombie (state Z or X: it has exited, and its parent has not reaped it yet; a
    daemon killed under a parent that does not reap, such as a container's shell, stays one,
    and a restart waited out the whole lease for it). Raises PermissionError when it may not be
    looked at (/proc mounted with hidepid)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its closing one.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # field 3 of the whole line: the state
        return None
    return fields[19]  # field 22 of the whole line


@dataclass(frozen=True, slots=True)
class Holder:
    host: str
    pid: int
    nonce: str
    boot: str
    start: str
    namespace: str

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.nonce}:{self.boot}:{self.start}:{self.namespace}"

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        parts = text.rsplit(":", _FIELDS - 1)
        if len(parts) != _FIELDS or not parts[1].isdigit():
            return None
        host, pid, nonce, boot, start, namespace = parts
        return cls(host, int(pid), nonce, boot, start, namespace)


def this_process() -> Holder:
    pid = os.getpid()
    try:
        start = start_time(pid) or ""
    except OSError:
        start = ""
    return Holder(socket.gethostname(), pid, uuid.uuid4().hex[:8], _boot_id(), start, _pid_namespace())


def provably_gone(holder: str) -> bool:
    """Whether `holder` ran on this host, in this boot and PID namespace, and its process no
    longer runs. Anything that cannot be told for sure counts as alive."""
    other = Holder.parse(holder)
    if other is None or not (other.boot and other.start and other.namespace):
        return False
    me = this_process()
    if (other.host, other.boot, other.namespace) != (me.host, me.boot, me.namespace):
        return False
    if other.pid == me.pid:
        return other.start != me.start
    try:
        return start_time(other.pid) != other.start
    except OSError:  # e.g. hidepid: not ours to see, so not provably gone
        return False
