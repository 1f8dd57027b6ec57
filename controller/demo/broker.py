"""A real mosquitto broker on a loopback port, configured as a deployment would be: no anonymous
clients, a password file, and an ACL under which an agent may publish only under its own vantage
(its user name) and read only its own plan. For the demo and the tests; Debian's `mosquitto`
package provides the binaries (`make test` and `make demo` install it when it is missing).

Optionally TLS: a CA, the server's certificate and key (PEM paths) and, with `require_certificate`,
client certificates too.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from controller.demo.world import free_port, terminate

MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd"  # noqa: S105 - a program, not a password
CONTROLLER_USER = "controller"

# The controller reads every result and presence and writes every plan; an agent (its user name is
# its vantage) writes its own results and status and reads its own plan, nothing else.
ACL = f"""user {CONTROLLER_USER}
topic read regionshift/v1/results/#
topic readwrite regionshift/v1/agents/#

pattern write regionshift/v1/results/+/+/%u
pattern readwrite regionshift/v1/agents/%u/status
pattern read regionshift/v1/agents/%u/plan
pattern read regionshift/v1/agents/%u/hurry
"""


class BrokerError(RuntimeError):
    pass


def mosquitto_missing() -> str | None:
    """What to install when Debian's mosquitto is not there (the launch demo's agents need it)."""
    if Path(MOSQUITTO).exists() and Path(MOSQUITTO_PASSWD).exists():
        return None
    return "the launch demo's agents need an MQTT broker: apt-get install mosquitto (make demo installs it)"


@dataclass(frozen=True, slots=True)
class BrokerTlsFiles:
    ca_file: str
    cert_file: str
    key_file: str
    require_certificate: bool = False


@dataclass
class Broker:
    """mosquitto with `users` (name -> password), on a free loopback port; `restart` keeps the port."""

    users: dict[str, str]
    tls: BrokerTlsFiles | None = None
    port: int = field(default_factory=free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="regionshift-mqtt-")))
    _process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self.root / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _configure(self) -> Path:
        if (missing := mosquitto_missing()) is not None:
            raise BrokerError(missing)
        passwords = self.root / "passwd"
        passwords.unlink(missing_ok=True)
        for user, password in self.users.items():
            flags = ["-b", "-c"] if not passwords.exists() else ["-b"]
            command = [MOSQUITTO_PASSWD, *flags, str(passwords), user, password]
            subprocess.run(command, check=True, capture_output=True)  # noqa: S603 - fixed program
        (self.root / "acl").write_text(ACL)
        lines = [
            "user root",  # run as root, it would otherwise drop to `mosquitto`, who cannot read this directory
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {passwords}",
            f"acl_file {self.root / 'acl'}",
            # Sessions and queued QoS 1 messages outlive a broker restart, as in a deployment.
            "persistence true",
            f"persistence_location {self.root}/",
            "max_queued_messages 100000",
            f"log_dest file {self.root / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            f"listener {self.port} 127.0.0.1",
        ]
        if self.tls is not None:
            lines += [f"cafile {self.tls.ca_file}", f"certfile {self.tls.cert_file}", f"keyfile {self.tls.key_file}"]
            if self.tls.require_certificate:
                lines.append("require_certificate true")
        conf = self.root / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> None:
        conf = self._configure()
        self._process = subprocess.Popen(  # noqa: S603 - a fixed program and its configuration
            # A session of its own, as each process of the world: a Ctrl-C at the terminal goes to
            # the whole foreground group, and the world stopped under the daemon before the demo
            # stopped it in order (the launch demo then failed reading Route 53: "a bug").
            [MOSQUITTO, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                error = (self._process.stderr.read() if self._process.stderr else b"").decode(errors="replace")
                said = [line for line in (error + self.log).splitlines() if "rror" in line] or error.splitlines()
                raise BrokerError(f"mosquitto exited at start: {' '.join(said[-3:]).strip()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.address} within 10 s")

    def stop(self) -> None:
        if self._process is not None:
            terminate(self._process, 5.0)
            if self._process.stderr is not None:
                self._process.stderr.close()
        self._process = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
