"""A real PostgreSQL primary and streaming replica on loopback ports, for the replication tests.

Debian's `postgresql` package (installed by `make test`) provides the binaries. `initdb` refuses
to run as root, so as root every server command runs as the `postgres` user. The primary is
created with `initdb`, the replica with `pg_basebackup -R` (standby.signal and the primary's
address written for it); both listen on 127.0.0.1 only, with fsync off, and are stopped
(immediate mode) and removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


def pg_bin() -> Path | None:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    primary_port: int
    replica_port: int
    root: Path

    def dsn(self, port: int) -> str:
        return f"postgresql://postgres@127.0.0.1:{port}/postgres"

    @property
    def primary(self) -> str:
        return self.dsn(self.primary_port)

    @property
    def replica(self) -> str:
        return self.dsn(self.replica_port)


def _run(bin_dir: Path, *args: str) -> None:
    command = [str(bin_dir / args[0]), *args[1:]]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    subprocess.run(command, check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def primary_and_replica() -> Iterator[Cluster]:
    bin_dir = pg_bin()
    assert bin_dir is not None, "PostgreSQL is not installed: `make test` installs Debian's postgresql"
    root = Path(tempfile.mkdtemp(prefix="regionshift-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    primary, replica = root / "primary", root / "replica"
    cluster = Cluster(_free_port(), _free_port(), root)
    started: list[Path] = []
    try:
        _run(bin_dir, "initdb", "-D", str(primary), "-U", "postgres", "--auth=trust", "--no-sync")
        conf = (
            f"listen_addresses = '127.0.0.1'\nport = {cluster.primary_port}\nunix_socket_directories = '{root}'\n"
            "fsync = off\nfull_page_writes = off\nwal_level = replica\n"
            "max_wal_senders = 4\nhot_standby = on\nwal_receiver_status_interval = 1s\n"
        )
        with (primary / "postgresql.conf").open("a") as f:
            f.write(conf)
        _run(bin_dir, "pg_ctl", "-D", str(primary), "-l", str(root / "primary.log"), "-w", "start")
        started.append(primary)
        _run(
            bin_dir,
            "pg_basebackup",
            "-h", "127.0.0.1", "-p", str(cluster.primary_port), "-U", "postgres",
            "-D", str(replica), "-R", "-X", "stream", "--no-sync",
        )  # fmt: skip
        with (replica / "postgresql.conf").open("a") as f:
            f.write(f"port = {cluster.replica_port}\n")
        _run(bin_dir, "pg_ctl", "-D", str(replica), "-l", str(root / "replica.log"), "-w", "start")
        started.append(replica)
        yield cluster
    finally:
        for data in reversed(started):
            with contextlib.suppress(subprocess.SubprocessError):
                _run(bin_dir, "pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
