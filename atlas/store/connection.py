"""Opening the Neo4j driver: one seam, errors translated to :mod:`atlas.errors`.

The driver is created at entry points and passed down; nothing below keeps a global one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import neo4j
import neo4j.exceptions as neo4j_errors

from atlas.errors import AuthError, ConfigError, ServiceUnavailable

if TYPE_CHECKING:
    from atlas.services.neo4j_local import Progress
    from atlas.settings import AtlasSettings

logger = logging.getLogger(__name__)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _auth(settings: AtlasSettings) -> tuple[str, str] | None:
    password = settings.neo4j_password.get_secret_value()
    return (settings.neo4j_user, password) if password else None


def open_driver(
    settings: AtlasSettings,
    *,
    connection_timeout_s: float = 10.0,
    max_transaction_retry_time_s: float = 30.0,
) -> neo4j.Driver:
    """A connected driver for ``settings.resolved_neo4j_uri`` (connectivity verified).

    ``max_transaction_retry_time_s`` bounds how long ``execute_read`` / ``execute_write`` retry
    retryable failures (an unreachable server, a deadlock) before raising (30 s: the driver's
    default). Callers with their own, visible retry loop (``atlas import``) set it lower.

    Raises:
        ServiceUnavailable: nothing answers at the URI.
        AuthError: the server refused the user name / password.
        ConfigError: the URI is malformed.
    """
    uri = settings.resolved_neo4j_uri
    try:
        driver = neo4j.GraphDatabase.driver(
            uri,
            auth=_auth(settings),
            connection_timeout=connection_timeout_s,
            max_transaction_retry_time=max_transaction_retry_time_s,
        )
    except (neo4j_errors.ConfigurationError, ValueError) as exc:
        raise ConfigError(f"bad Neo4j URI {uri!r}: {_one_line(exc)}") from exc
    try:
        driver.verify_connectivity()
    except neo4j_errors.AuthError as exc:
        driver.close()
        raise AuthError(
            f"Neo4j at {uri} refused the credentials for user {settings.neo4j_user}"
        ) from exc
    except (neo4j_errors.ServiceUnavailable, neo4j_errors.SessionExpired, OSError) as exc:
        driver.close()
        raise ServiceUnavailable(f"Neo4j at {uri} is not reachable: {_one_line(exc)}") from exc
    except neo4j_errors.Neo4jError as exc:
        driver.close()
        if "auth" in (exc.code or "").lower():
            raise AuthError(
                f"Neo4j at {uri} refused the credentials for user {settings.neo4j_user}"
            ) from exc
        raise ServiceUnavailable(f"Neo4j at {uri} is not usable: {_one_line(exc)}") from exc
    except neo4j_errors.DriverError as exc:
        driver.close()
        raise ServiceUnavailable(f"Neo4j at {uri} is not reachable: {_one_line(exc)}") from exc
    logger.debug("connected to Neo4j at %s", uri)
    return driver


def ensure_local_neo4j(settings: AtlasSettings, *, progress: Progress | None = None) -> str:
    """Make sure the Neo4j the settings point at can be used; return its URI.

    With ``NEO4J_URI`` set this does nothing (the server is someone else's). Otherwise it starts
    the local launcher unless it already runs on ``settings.local_neo4j_home``.
    """
    if not settings.uses_local_neo4j:
        return settings.resolved_neo4j_uri
    from atlas.services import neo4j_local

    state = neo4j_local.status(settings)
    if state.running:
        return state.uri
    try:
        return neo4j_local.start(settings, progress=progress)
    except neo4j_local.LauncherAlreadyRunning as exc:  # lost a race with another starter
        return exc.uri
