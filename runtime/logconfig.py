"""How jaula's programs log: structured key=value lines on stderr, quiet by default.

The library configures nothing at import; each program does, once, at its start: the
``jaula`` CLI (``--log-level``, default warning) and the per-container monitor (warning).
Unconfigured, structlog renders every call down to debug with its console renderer: in the
monitor that work fell inside a migration's downtime (the restorer logs while the tasks
wait), about 30 ms per restore on this host.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str) -> None:
    """Structured key=value logs on stderr at ``level`` (debug, info, warning, error) and
    above; an unknown name means warning."""
    lvl = getattr(logging, level.upper(), logging.WARNING)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"]),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # resolve sys.stderr at each call: it may be replaced (tests, daemons)
        logger_factory=lambda *args: structlog.PrintLogger(sys.stderr),
    )
