"""Logging set-up shared by the CLI and the workers: one line per event, no secrets.

Two things every entry point wants from its log handlers:

* :func:`redact_handlers`: URLs with user info (``redis://:password@host``, a Bolt URI with a
  password) are shown as ``scheme://***@host`` in every record, whoever logged it (a library
  may quote the URL it was given).
* :func:`quiet_service_loggers`: the Neo4j driver and the broker client log every retry of a
  fault the project reports (and retries) itself: a flood of warnings for one outage. They are
  kept to errors unless debugging. ``neo4j.notifications`` (the server's hints about a query,
  several lines each) likewise.
"""

from __future__ import annotations

import logging

from atlas.settings import redact_urls

#: Loggers whose warnings repeat what the project says in its own one line.
SERVICE_LOGGERS = ("neo4j", "neo4j.notifications", "neo4j.pool", "kombu", "amqp", "redis")


class RedactingFilter(logging.Filter):
    """Replaces the user info of every URL in a record's message by ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let the handler report it
            return True
        redacted = redact_urls(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redact_handlers(logger: logging.Logger | None = None) -> None:
    """Put a :class:`RedactingFilter` on every handler of ``logger`` (default: the root)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def quiet_service_loggers(*, debug: bool = False) -> None:
    """Keep the service clients' retry chatter to errors (everything when ``debug``)."""
    for name in SERVICE_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)
