"""Structured logs: the agent's and the controller's are one (`probes.logs`): the agent loads none
of the controller, and its lines went to stdout in structlog's defaults."""

from __future__ import annotations

from probes.logs import LogFormat, configure

__all__ = ["LogFormat", "configure"]
