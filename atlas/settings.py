"""The one settings object. Built at entry points (CLI, worker) and passed down; nothing below
the entry points reads the environment.

Every field can be set from the environment (the field name in upper case, e.g. ``NEO4J_URI``)
or from a ``.env`` file in the working directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    import torch


def _default_home() -> Path:
    return Path.home() / ".circuit-atlas"


#: ``scheme://userinfo@`` anywhere in a text (a URL with credentials in a message or a log line).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/@]*)@")


def redact_url(url: str | None) -> str:
    """``url`` as it may be shown: its user info (user and password) replaced by ``***``.

    REDIS_URL and NEO4J_URI may carry a password (``redis://:secret@host:6379/0``); every message
    and log line that names a service shows it through this, so a secret never reaches a terminal
    or a log file. A URL without user info is returned unchanged.
    """
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_urls(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def redact_urls(text: str) -> str:
    """Every URL in ``text`` with its user info replaced by ``***`` (for whole messages: an
    error from a library may quote the URL it was given)."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)


class AtlasSettings(BaseSettings):
    """Connection, storage and compute settings for Circuit Atlas."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", env_prefix="")

    atlas_home: Path = Field(default_factory=_default_home)
    """Root for everything the project keeps locally: the embedded Neo4j (data, logs, built
    launcher), the artifact store and the toy world. Env: ATLAS_HOME."""

    neo4j_uri: str | None = None
    """Bolt URI of an existing Neo4j (e.g. ``bolt://db:7687``). Unset: the local launcher is used
    (the embedded default) and its URI is ``bolt://127.0.0.1:{neo4j_bolt_port}``."""

    neo4j_user: str = "neo4j"
    """Neo4j user name."""

    neo4j_password: SecretStr = SecretStr("")
    """Neo4j password. Empty for the local launcher, which runs without auth on loopback."""

    neo4j_database: str = "neo4j"
    """Database name (Community Edition has exactly one user database, ``neo4j``)."""

    neo4j_bolt_port: int = 7697
    """Bolt port of the local launcher (not 7687, so it never collides with a real install)."""

    neo4j_heap: str = "1g"
    """JVM heap of the local launcher."""

    neo4j_pagecache: str = "1g"
    """Page cache of the local launcher."""

    redis_url: str | None = None
    """Celery broker and result backend, e.g. ``redis://127.0.0.1:6379/0``. Unset: ``enqueue``
    and ``batch`` run the task code inline (the embedded default)."""

    celery_visibility_timeout_s: int = 6 * 3600
    """Seconds before Redis hands an unacknowledged task to another worker. Must exceed the
    longest task (tasks are acked late), or long attributions run twice."""

    artifact_dir: Path | None = None
    """Content-addressed artifact store. Default: ``{atlas_home}/artifacts``."""

    device: str = "auto"
    """Torch device for attribution: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``,
    ``cuda:N``."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model and transcoder dtype for attribution."""

    batch_size: int = 64
    """Targets per backward pass in attribution."""

    chunk_size: int = Field(default=8, ge=1, le=1024)
    """Prompt specs per attribute message (one job-record round trip and one ingest message per
    chunk; a failing prompt still fails alone)."""

    query_timeout_s: float = 30.0
    """Server-side timeout for read queries, raw Cypher included."""

    cypher_row_cap: int = 10_000
    """Most rows a raw ``atlas cypher`` query returns."""

    cypher_result_mb: float = Field(default=64.0, gt=0)
    """Most megabytes of values a raw ``atlas cypher`` query may return (counted as records
    arrive; a larger result stops with one line, so client memory stays bounded)."""

    ingest_batch_size: int = 5000
    """Rows per ``UNWIND $rows`` write when ingesting a prompt into Neo4j."""

    ingest_min_abs_weight: float = 0.0
    """Edges with ``|weight|`` below this are not stored (0: keep every edge of the graph, which
    is the pruned graph when the artifact is pruned)."""

    ingest_max_edges: int | None = None
    """Keep at most this many edges per prompt (largest ``|weight|`` first); None: all."""

    heartbeat_interval_s: float = Field(default=30.0, gt=0)
    """How often a worker (or an inline batch) refreshes the heartbeat on the job items it
    holds, and how often each worker's reaper looks for items whose holder is gone."""

    stale_after_s: float = Field(default=150.0, gt=0)
    """A held job item whose heartbeat is older than this is taken as lost (its worker or inline
    batch died): workers and ``--wait`` send it again, ``atlas jobs status`` shows it as stale and
    ``atlas jobs retry`` sends it. Several heartbeat intervals, so a busy holder is never taken
    for a dead one."""

    atlas_test_pause_dir: Path | None = None
    """Tests only: while ``{dir}/pause`` exists, an attribute step that has claimed its chunk
    writes ``{dir}/held-{pid}`` and waits, so a test can kill a worker at a known point."""

    @model_validator(mode="after")
    def _stale_after_beats(self) -> AtlasSettings:
        """A threshold under two heartbeats would take live holders for dead ones."""
        if self.stale_after_s < 2 * self.heartbeat_interval_s:
            raise ValueError("stale_after_s must be at least twice heartbeat_interval_s")
        return self

    @property
    def shown_redis_url(self) -> str:
        """``redis_url`` as messages show it (no password)."""
        return redact_url(self.redis_url)

    @property
    def shown_neo4j_uri(self) -> str:
        """The Neo4j URI as messages show it (no password)."""
        return redact_url(self.resolved_neo4j_uri)

    image_max_pixels: int = Field(default=50_000_000, ge=1)
    """Largest image (width x height, read from the header before decoding) an image prompt
    may have: a decompression bomb is refused with one line before it can exhaust memory."""

    @property
    def resolved_artifact_dir(self) -> Path:
        return self.artifact_dir or (self.atlas_home / "artifacts")

    @property
    def local_neo4j_home(self) -> Path:
        return self.atlas_home / "neo4j"

    @property
    def uses_local_neo4j(self) -> bool:
        return self.neo4j_uri is None

    @property
    def resolved_neo4j_uri(self) -> str:
        return self.neo4j_uri or f"bolt://127.0.0.1:{self.neo4j_bolt_port}"

    def resolved_device(self) -> str:
        """The torch device string; ``auto`` becomes ``cuda`` when a GPU is present."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype`` (torch is imported only when this is called)."""
        import torch

        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype
