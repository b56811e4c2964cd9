"""The Neo4j boundary: opening the driver, sessions and transactions, error translation.

The driver is created at entry points and passed down; nothing below keeps a global one. Every
query of the store runs through :func:`read_tx` / :func:`write_tx` (or the row helpers beside
them), which pass ``database=``, turn server notifications off and translate driver errors to
:mod:`atlas.errors` with one-line messages, so no driver exception crosses this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import neo4j
import neo4j.exceptions as neo4j_errors

from atlas.errors import (
    AtlasError,
    AuthError,
    ConfigError,
    ServiceUnavailable,
    StoreBusy,
    StoreError,
)

if TYPE_CHECKING:
    from atlas.services.neo4j_local import Progress
    from atlas.settings import AtlasSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _describe(exc: BaseException) -> str:
    return one_line(exc) or type(exc).__name__


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
        raise ConfigError(f"bad Neo4j URI {uri!r}: {_describe(exc)}") from exc
    try:
        driver.verify_connectivity()
    except neo4j_errors.AuthError as exc:
        driver.close()
        raise AuthError(
            f"Neo4j at {uri} refused the credentials for user {settings.neo4j_user}"
        ) from exc
    except (neo4j_errors.ServiceUnavailable, neo4j_errors.SessionExpired, OSError) as exc:
        driver.close()
        raise ServiceUnavailable(f"Neo4j at {uri} is not reachable: {_describe(exc)}") from exc
    except neo4j_errors.Neo4jError as exc:
        driver.close()
        if "auth" in (exc.code or "").lower():
            raise AuthError(
                f"Neo4j at {uri} refused the credentials for user {settings.neo4j_user}"
            ) from exc
        raise ServiceUnavailable(f"Neo4j at {uri} is not usable: {_describe(exc)}") from exc
    except neo4j_errors.DriverError as exc:
        driver.close()
        raise ServiceUnavailable(f"Neo4j at {uri} is not reachable: {_describe(exc)}") from exc
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


# --------------------------------------------------------------------------- the boundary
#: Neo4j status codes of a server that ran out of memory for one query (the transaction memory
#: limit, the global transaction pool, or the heap). The driver deems them retryable, but the
#: same query needs the same memory again: they are permanent for us.
_MEMORY_CODES = ("MemoryPoolOutOfMemoryError", "OutOfMemoryError", "TransactionMemoryLimit")


def one_line(text: object, limit: int = 300) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed, at most ``limit``
    characters: driver and server messages span lines, the CLI promises one."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def is_memory_error(exc: BaseException) -> bool:
    """Whether the server refused the query for lack of memory (not worth retrying)."""
    code = getattr(exc, "code", None) or ""
    return isinstance(exc, neo4j_errors.Neo4jError) and any(c in code for c in _MEMORY_CODES)


def translate_neo4j_error(exc: Exception, what: str) -> AtlasError:
    """Map a driver exception to the project's exception tree (call as ``raise ... from exc``).

    Unreachable server: :class:`ServiceUnavailable`; refused credentials: :class:`AuthError`; a
    server out of memory: a permanent :class:`StoreError` that says so; any other failure the
    driver deems retryable (a deadlock, a database starting): :class:`StoreBusy`; the rest:
    :class:`StoreError`. Messages are one line.
    """
    if isinstance(exc, neo4j_errors.ServiceUnavailable | neo4j_errors.SessionExpired):
        return ServiceUnavailable(f"{what}: Neo4j unreachable: {one_line(exc)}")
    if isinstance(exc, neo4j_errors.AuthError):
        return AuthError(f"{what}: Neo4j refused the credentials")
    if is_memory_error(exc):
        message = getattr(exc, "message", None) or exc
        return StoreError(
            f"{what}: Neo4j ran out of memory for this query ({one_line(message, 200)}); "
            "narrow the query"
        )
    error = StoreBusy if _retryable(exc) else StoreError
    if isinstance(exc, neo4j_errors.Neo4jError):
        return error(f"{what}: {exc.code}: {one_line(exc.message or exc)}")
    return error(f"{what}: {one_line(exc)}")


def _retryable(exc: Exception) -> bool:
    """Whether the driver deems the failure retryable (``Neo4jError`` / ``DriverError``)."""
    is_retryable = getattr(exc, "is_retryable", None)
    return bool(callable(is_retryable) and is_retryable())


class _PermanentInTransaction(Exception):
    """Carries a translated error out of a unit of work, so the driver does not retry it (it
    retries only its own retryable exceptions)."""

    def __init__(self, error: AtlasError) -> None:
        super().__init__(str(error))
        self.error = error


def session(
    driver: neo4j.Driver,
    database: str | None,
    *,
    read: bool = False,
    fetch_size: int | None = None,
) -> neo4j.Session:
    """A session on ``database`` with server notifications off (an empty atlas would otherwise
    warn about every label and property a query names) and the access mode of the work;
    ``fetch_size`` records per round trip (None: the driver's default)."""
    extra: dict[str, Any] = {} if fetch_size is None else {"fetch_size": fetch_size}
    return driver.session(
        database=database,
        default_access_mode=neo4j.READ_ACCESS if read else neo4j.WRITE_ACCESS,
        notifications_min_severity="OFF",
        **extra,
    )


def _run(
    driver: neo4j.Driver,
    work: Callable[[neo4j.ManagedTransaction], T],
    *,
    database: str | None,
    what: str,
    read: bool,
    timeout_s: float | None,
    fetch_size: int | None = None,
) -> T:
    def guarded(tx: neo4j.ManagedTransaction) -> T:
        try:
            return work(tx)
        except neo4j_errors.Neo4jError as exc:
            if is_memory_error(exc):
                raise _PermanentInTransaction(translate_neo4j_error(exc, what)) from exc
            raise

    unit = neo4j.unit_of_work(timeout=timeout_s)(guarded) if timeout_s else guarded
    try:
        with session(driver, database, read=read, fetch_size=fetch_size) as s:
            return s.execute_read(unit) if read else s.execute_write(unit)
    except _PermanentInTransaction as exc:
        raise exc.error from exc.__cause__
    except (neo4j_errors.Neo4jError, neo4j_errors.DriverError) as exc:
        raise translate_neo4j_error(exc, what) from exc


def read_tx(
    driver: neo4j.Driver,
    work: Callable[[neo4j.ManagedTransaction], T],
    *,
    database: str | None,
    what: str,
    timeout_s: float | None = None,
    fetch_size: int | None = None,
) -> T:
    """Run ``work`` in a managed READ transaction on ``database`` with a server timeout.

    The driver retries retryable failures (within its ``max_transaction_retry_time``); a server
    out of memory is not retried; every driver error leaves as an :mod:`atlas.errors` one.
    """
    return _run(
        driver,
        work,
        database=database,
        what=what,
        read=True,
        timeout_s=timeout_s,
        fetch_size=fetch_size,
    )


def write_tx(
    driver: neo4j.Driver,
    work: Callable[[neo4j.ManagedTransaction], T],
    *,
    database: str | None,
    what: str,
    timeout_s: float | None = None,
) -> T:
    """Run ``work`` in a managed WRITE transaction (see :func:`read_tx`); ``work`` must be
    idempotent, since the driver may run it again after a retryable failure."""
    return _run(driver, work, database=database, what=what, read=False, timeout_s=timeout_s)


def read_rows(
    driver: neo4j.Driver,
    query: str,
    params: dict[str, Any] | None = None,
    *,
    database: str | None,
    what: str,
    timeout_s: float | None = None,
) -> list[dict[str, Any]]:
    """The records of one read query, as dicts (:func:`read_tx`)."""

    def work(tx: neo4j.ManagedTransaction) -> list[dict[str, Any]]:
        return [record.data() for record in tx.run(query, params or {})]

    return read_tx(driver, work, database=database, what=what, timeout_s=timeout_s)


def write_rows(
    driver: neo4j.Driver,
    query: str,
    params: dict[str, Any] | None = None,
    *,
    database: str | None,
    what: str,
) -> list[dict[str, Any]]:
    """The records of one write query, as dicts (:func:`write_tx`)."""

    def work(tx: neo4j.ManagedTransaction) -> list[dict[str, Any]]:
        return [record.data() for record in tx.run(query, params or {})]

    return write_tx(driver, work, database=database, what=what)


def run_autocommit(
    driver: neo4j.Driver,
    query: str,
    params: dict[str, Any] | None = None,
    *,
    database: str | None,
    what: str,
) -> None:
    """Run one statement in an auto-commit transaction, for the statements a managed one
    cannot hold (``CALL { } IN TRANSACTIONS``); not retried."""
    try:
        with session(driver, database) as s:
            s.run(query, params or {}).consume()
    except (neo4j_errors.Neo4jError, neo4j_errors.DriverError) as exc:
        raise translate_neo4j_error(exc, what) from exc
