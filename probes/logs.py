"""Structured logs: one event per line, key=value for people or JSON for collectors."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

from probes.spec import redact

LogFormat = Literal["console", "json"]


class _Stderr:
    """Whatever `sys.stderr` is when a line is written (it may be replaced after configuration)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _redact(_: object, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """No credential in a URL ever reaches a log line, whoever logged it."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in event.items()}


def configure(level: str = "info", fmt: LogFormat = "console") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
