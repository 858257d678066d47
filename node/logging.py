"""structlog, configured once: console lines on a terminal, JSON lines everywhere else.

Loggers are never cached on first use, so ``structlog.testing.capture_logs()`` sees the
events of module-level loggers even after the node configured logging. The standard
library's loggers (nats-py logs through them) are routed through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
FORMATS = ("auto", "json", "console")


class _InfernodeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the root handler we installed, so configuring again replaces it."""


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> bool:
    """Configure structlog and stdlib logging; calling it again reconfigures, never stacks.

    Returns whether lines are JSON, so a command knows to say everything as events too.
    """
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)} (got {level!r})")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    out = stream or sys.stderr
    renderer = _renderer(fmt, out)
    shared = _shared_processors()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    _configure_stdlib(LEVELS[level], out, shared, renderer)
    return isinstance(renderer, structlog.processors.JSONRenderer)


def get_logger(**bind: Any) -> Any:
    """A structlog logger with ``bind`` already bound (``actor=...``, ``session=...``)."""
    return structlog.get_logger(**bind)


def library_logger(name: str) -> Any:
    """A structlog logger over the stdlib logger ``infernode.<name>``, for client-side code.

    A program that embeds the client decides where its lines go with ``logging`` (nothing
    below WARNING shows without its configuration, and never on stdout); under
    ``configure_logging`` the same lines are the node's own structured events.
    """
    return structlog.wrap_logger(logging.getLogger(f"infernode.{name}"))


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _renderer(fmt: str, out: TextIO) -> Processor:
    console = fmt == "console" or (fmt == "auto" and _is_tty(out))
    if console:
        return structlog.dev.ConsoleRenderer(colors=_is_tty(out))
    return structlog.processors.JSONRenderer()


def _configure_stdlib(
    level: int, out: TextIO, shared: list[Processor], renderer: Processor
) -> None:
    # JSON needs the traceback as a string field; the console renderer formats its own.
    finish: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if isinstance(renderer, structlog.processors.JSONRenderer):
        finish.append(structlog.processors.format_exc_info)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[*finish, renderer],
    )
    handler = _InfernodeHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _InfernodeHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def _is_tty(out: TextIO) -> bool:
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty())
