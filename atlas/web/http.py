"""Request plumbing of the read-only HTTP API (:mod:`atlas.web.app`): the bounds of every
response, the :class:`Atlas` every endpoint reads with, query parameters read by name with
bounds (:class:`Params`), lookups of prompts, features and supernodes, JSON and error responses
(:func:`endpoint` turns the exception tree into one-line 4xx/5xx answers), and the guard that
refuses other hosts and methods and adds the page's security headers (:class:`Guard`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import neo4j
from starlette.requests import Request
from starlette.responses import Response

from atlas.errors import (
    AtlasError,
    CypherRefused,
    InputError,
    ServiceError,
    StoreError,
)
from atlas.settings import AtlasSettings
from atlas.store import queries as Q
from atlas.store.connection import read_rows

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
#: Most rows any list endpoint returns in one response.
MAX_LIMIT = 500
#: Largest JSON body (bytes); a bigger answer is a 413 that asks for a narrower request.
MAX_RESPONSE_BYTES = 8 * 2**20
#: Longest text parameter (search text, a spec, a name) and longest Cypher text accepted.
MAX_TEXT = 500
MAX_CYPHER = 10_000
#: Prompt text and tokens sent with a prompt (a list shows the start of each text).
LIST_TEXT_CHARS = 300
PROMPT_TEXT_CHARS = 20_000
PROMPT_MAX_TOKENS = 4096
#: Caps of a circuit picture (the defaults are ``atlas draw``'s).
MAX_PICTURE_NODES = 400
MAX_PICTURE_EDGES = 4000
#: Strongest inputs and outputs listed for a clicked node.
NODE_EDGES = 12

_HEX = re.compile(r"^[0-9a-f]{1,64}$")
NODE_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,80}$")
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,80}$")
INTERVENTION_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)


class ApiError(Exception):
    """A request the API refuses: an HTTP status and one line for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def not_found(message: str) -> ApiError:
    return ApiError(404, message)


@dataclass
class Atlas:
    """What every endpoint reads with: the settings and one driver (opened by the app's
    lifespan unless given), and a lock that serialises drawing (matplotlib)."""

    settings: AtlasSettings
    driver: neo4j.Driver | None = None
    draw_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def database(self) -> str:
        return str(self.settings.neo4j_database)

    @property
    def timeout_s(self) -> float:
        return float(self.settings.query_timeout_s)

    def rows(self, text: str, params: dict[str, Any], what: str) -> list[dict[str, Any]]:
        """One read query (READ transaction, server timeout)."""
        assert self.driver is not None
        return read_rows(
            self.driver, text, params, database=self.database, timeout_s=self.timeout_s, what=what
        )

    def ask(self, question: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A named query of :mod:`atlas.store.read` with this atlas's database and timeout."""
        return question(
            self.driver, *args, database=self.database, timeout_s=self.timeout_s, **kwargs
        )


# --------------------------------------------------------------------------- parameters
class Params:
    """A request's query parameters, read by name with bounds; names the endpoint does not know
    are refused, so a typo is an error rather than a silently ignored filter."""

    def __init__(self, request: Request, allowed: Iterable[str]) -> None:
        self.values = request.query_params
        allowed = set(allowed)
        unknown = sorted(set(self.values.keys()) - allowed)
        if unknown:
            raise ApiError(400, f"unknown parameter {unknown[0]!r}")
        for key in set(self.values.keys()):
            if len(self.values.getlist(key)) > 1:
                raise ApiError(400, f"parameter {key!r} given more than once")

    def text(self, name: str, default: str | None = None, *, max_len: int = MAX_TEXT) -> str | None:
        value = self.values.get(name)
        if value is None or value.strip() == "":
            return default
        if len(value) > max_len:
            raise ApiError(400, f"parameter {name!r} is longer than {max_len} characters")
        if any(ord(c) < 32 and c not in "\t\n\r" for c in value):
            raise ApiError(400, f"parameter {name!r} contains control characters")
        return value

    def required(self, name: str, *, max_len: int = MAX_TEXT) -> str:
        value = self.text(name, max_len=max_len)
        if value is None:
            raise ApiError(400, f"parameter {name!r} is required")
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.values.get(name)
        if raw is None or raw.strip() == "":
            return default
        if not re.fullmatch(r"\s*-?\d{1,12}\s*", raw):
            raise ApiError(400, f"parameter {name!r} must be an integer")
        value = int(raw)
        if not low <= value <= high:
            raise ApiError(400, f"parameter {name!r} must be between {low} and {high}")
        return value

    def optional_integer(self, name: str, low: int, high: int) -> int | None:
        if (self.values.get(name) or "").strip() == "":
            return None
        return self.integer(name, 0, low, high)

    def number(self, name: str, default: float, low: float, high: float) -> float:
        raw = self.values.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ApiError(400, f"parameter {name!r} must be a number") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise ApiError(400, f"parameter {name!r} must be between {low:g} and {high:g}")
        return value

    def limit(self, default: int = 50) -> int:
        return self.integer("limit", default, 1, MAX_LIMIT)


# --------------------------------------------------------------------------- responses
def json_response(obj: Any, status: int = 200) -> Response:
    """``obj`` as JSON (NaN and infinities as null), refused with 413 past the size cap."""
    from atlas.present import to_json

    body = to_json(obj, indent=None).encode()
    if len(body) > MAX_RESPONSE_BYTES:
        mb = MAX_RESPONSE_BYTES / 2**20
        return error_response(413, f"response over {mb:g} MB; lower the limit or narrow the query")
    return Response(body, status, media_type="application/json")


def error_response(status: int, message: str) -> Response:
    line = " ".join(message.split())[:500] or "error"
    body = json.dumps({"error": line}, ensure_ascii=True)
    return Response(body, status, media_type="application/json")


def _status_of(exc: Exception) -> tuple[int, str]:
    """The HTTP status and line of an error an endpoint raised."""
    from atlas.store.cypher import ResultTooLarge

    if isinstance(exc, ApiError):
        return exc.status, exc.message
    if isinstance(exc, ResultTooLarge):
        return 413, str(exc)
    if isinstance(exc, CypherRefused | InputError):
        return 400, str(exc)
    if isinstance(exc, StoreError) and "TimedOut" in str(exc):
        return 400, f"the query ran past {QUERY_TIMEOUT_NAME}; narrow it"
    if isinstance(exc, ServiceError):
        return 503, str(exc)
    if isinstance(exc, AtlasError):
        return 500, str(exc)
    log.exception("unexpected error in the web API", exc_info=exc)
    return 500, f"internal error: {type(exc).__name__}"


QUERY_TIMEOUT_NAME = "the query timeout (QUERY_TIMEOUT_S)"

Handler = Callable[[Request, Atlas], Response]


def endpoint(handler: Handler) -> Callable[[Request], Response]:
    """A sync endpoint (Starlette runs it in its thread pool) with the atlas, whose errors become
    one-line JSON."""

    def run(request: Request) -> Response:
        try:
            return handler(request, request.app.state.atlas)
        except Exception as exc:
            status, message = _status_of(exc)
            if status >= 500:
                log.warning("%s %s: %s", request.method, request.url.path, message)
            return error_response(status, message)

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


# --------------------------------------------------------------------------- lookups
def prompt_id(atlas: Atlas, raw: str) -> str:
    """The full id of a stored prompt (its id or a unique prefix): 400 malformed, 404 unknown."""
    if not _HEX.fullmatch(raw):
        raise ApiError(400, f"bad prompt id {raw[:80]!r}: expected hexadecimal")
    found = atlas.rows(Q.FIND_PROMPT_BY_PREFIX, {"prefix": raw}, "finding prompt")
    if not found:
        raise not_found(f"no stored prompt with id {raw!r}")
    if len(found) > 1:
        raise ApiError(400, f"prompt id prefix {raw!r} is ambiguous")
    return str(found[0]["id"])


def feature_spec(atlas: Atlas, layer: int, index: int) -> str:
    """``feature:L/I`` of a stored feature, 404 when no transcoder set has it."""
    refs = atlas.rows(Q.FEATURES_BY_LAYER_INDEX, {"layer": layer, "index": index}, "feature")
    if not refs:
        raise not_found(f"no stored feature {layer}/{index}")
    return f"feature:{layer}/{index}"


def supernode_name(atlas: Atlas, raw: str) -> str:
    from atlas.store.supernodes import validate_name

    name = validate_name(raw)
    if not atlas.rows(Q.SUPERNODE_EXISTS, {"name": name}, "supernode"):
        raise not_found(f"no supernode named {name!r}")
    return name


def checked_spec(atlas: Atlas, spec: str) -> str:
    """An endpoint spec whose supernode (``supernode:NAME``) exists: 404 otherwise."""
    if spec.startswith("supernode:"):
        return "supernode:" + supernode_name(atlas, spec.split(":", 1)[1])
    return spec


def path_int(request: Request, name: str) -> int:
    value = request.path_params[name]
    if not isinstance(value, int) or not 0 <= value < 1 << 40:
        raise ApiError(400, f"bad {name}")
    return value


class Guard:
    """Refuses requests whose ``Host`` is not one this server answers (DNS rebinding) and
    methods other than GET and HEAD (the API only reads), with one line of JSON; adds the
    page's Content-Security-Policy and friends to every response."""

    def __init__(self, app: Any, hosts: list[str]) -> None:
        self.app = app
        self.hosts = hosts

    def _host_ok(self, scope: Any) -> bool:
        if "*" in self.hosts:
            return True
        raw = next((v for k, v in scope.get("headers", []) if k == b"host"), b"")
        host = raw.decode("latin-1").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in self.hosts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = None
        if not self._host_ok(scope):
            refused = error_response(400, "this server answers requests for its own address only")
        elif scope["method"] not in ("GET", "HEAD"):
            refused = error_response(405, "read-only: only GET and HEAD are served")
            refused.headers["Allow"] = "GET, HEAD"
        if refused is not None:
            await refused(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def allowed_hosts(host: str) -> list[str]:
    """The ``Host`` names a server bound to ``host`` answers: loopback names for a loopback
    address, any for a wildcard bind (the operator chose to expose it), else the address."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return ["127.0.0.1", "localhost", "[::1]"]
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    return [f"[{host.lower()}]"] if ":" in host else [host.lower()]
