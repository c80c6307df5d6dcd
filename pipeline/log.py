"""Structured logging: JSON lines, or console rendering on a TTY.

One event name per line; bind ``request_id`` wherever a request is in hand.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure(level: str | None = None, *, process: str | None = None, json: bool | None = None) -> None:
    """Configure structlog once per process (idempotent)."""
    global _configured
    level_name = (level or os.environ.get("PIPELINE_LOG_LEVEL", "info")).upper()
    numeric = getattr(logging, level_name, logging.INFO)
    if json is None:
        json = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    if process:
        structlog.contextvars.bind_contextvars(process=process)
    _configured = True


def get_logger(name: str | None = None) -> structlog.typing.FilteringBoundLogger:
    if not _configured:
        configure()
    # Lazy proxies: a logger made at import follows a later configure() (e.g. --log-level).
    return structlog.get_logger(component=name) if name else structlog.get_logger()
