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


class _Ours(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure` puts on the root logger, and replaces when called again (a test
    runner's own handlers stay)."""


def _redact(_: object, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """No credential in a URL ever reaches a log line, whoever logged it."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in event.items()}


def configure(level: str = "info", fmt: LogFormat = "console") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
    )
    stamped: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *stamped,
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    # The libraries' own lines (paho's "failed to receive on socket" as a broker goes) in the same
    # format, naming their logger: they came bare, with no time or level, and broke JSON readers.
    handler = _Ours(_Stderr())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamped, structlog.processors.format_exc_info],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _redact, renderer],
        )
    )
    # Their warnings and errors only, but with `--log-level debug`: at info, aiohttp's access log
    # would log every scrape and every API request.
    numeric = logging.getLevelNamesMapping()[level.upper()]
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _Ours)] + [handler]
    root.setLevel(numeric if numeric == logging.DEBUG else max(numeric, logging.WARNING))
    for chatty in ("botocore", "boto3", "urllib3"):  # at debug, botocore logs requests' signed headers
        logging.getLogger(chatty).setLevel(max(numeric, logging.INFO))
