"""The demo's agents: a real mosquitto (password file, ACL) and one `regionshift agent` process
per vantage, each started as a deployment starts it, with its password in its environment.

The controller's side is the `AgentsSettings` this hands back; the agents take their plan from
the controller over the broker, as in production. Each agent's log goes to a file of its own
(`logs`), so the demo's timeline stays readable and a failure can still be looked into.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Self

from controller.demo.broker import CONTROLLER_USER, Broker
from controller.demo.world import terminate
from controller.settings.schema import AgentsSettings

if TYPE_CHECKING:
    from collections.abc import Sequence

CONTROLLER_PASSWORD_ENV = "REGIONSHIFT_DEMO_MQTT_PASSWORD"  # noqa: S105 - a variable's name
AGENT_PASSWORD_ENV = "REGIONSHIFT_AGENT_PASSWORD"  # noqa: S105 - a variable's name


class DemoAgents:
    """mosquitto on a free loopback port and one agent process per name in `vantages`."""

    def __init__(self, vantages: Sequence[str]) -> None:
        self.vantages = tuple(vantages)
        self._passwords = {name: secrets.token_urlsafe(16) for name in (CONTROLLER_USER, *self.vantages)}
        self.broker = Broker(dict(self._passwords))
        self.logs = Path(tempfile.mkdtemp(prefix="regionshift-demo-agents-"))
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    def settings(self) -> AgentsSettings:
        """The controller's `agents:` configuration for this broker and these vantages."""
        os.environ[CONTROLLER_PASSWORD_ENV] = self._passwords[CONTROLLER_USER]
        return AgentsSettings.model_validate(
            {
                "broker": self.broker.address,
                "username": CONTROLLER_USER,
                "password": {"env": CONTROLLER_PASSWORD_ENV},
                "vantages": list(self.vantages),
                "client_id": f"regionshift-demo-{secrets.token_hex(4)}",
            }
        )

    def start_agents(self) -> None:
        for vantage in self.vantages:
            env = {**os.environ, AGENT_PASSWORD_ENV: self._passwords[vantage]}
            env.pop(CONTROLLER_PASSWORD_ENV, None)  # an agent knows its own password only
            command = [
                sys.executable,
                "-m",
                "probes.agent",
                "--vantage",
                vantage,
                "--broker",
                self.broker.address,
                "--password-env",
                AGENT_PASSWORD_ENV,
            ]
            with (self.logs / f"{vantage}.log").open("wb") as log:
                self._processes[vantage] = subprocess.Popen(  # noqa: S603 - this interpreter, fixed arguments
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )

    def __enter__(self) -> Self:
        try:
            self.broker.start()
        except BaseException:
            self.broker.__exit__()
            shutil.rmtree(self.logs, ignore_errors=True)
            raise
        return self

    def __exit__(self, *_: object) -> None:
        for process in self._processes.values():  # SIGTERM: each says "offline" in order
            if process.poll() is None:
                process.terminate()
        for process in self._processes.values():
            terminate(process, 5.0)
        self.broker.__exit__()
        os.environ.pop(CONTROLLER_PASSWORD_ENV, None)
        # The agents' logs stay: the demo removes them once its story has played out, and says
        # where they are when it has not.
