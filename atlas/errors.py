"""The exception tree. Every error a user can cause or meet derives from :class:`AtlasError`.

    AtlasError
    ├── ConfigError            bad settings, unknown model family, missing Java, ...
    ├── InputError             bad prompt, malformed file, over-long prompt, unknown node id
    │   └── CypherRefused      user Cypher that is not read-only or otherwise refused
    ├── ModelLoadError         model directory missing or unreadable
    ├── TranscoderError        transcoder files missing, corrupted, or not matching the model
    ├── AttributionError       the computation itself failed
    │   └── OutOfMemory        the accelerator (or host) ran out of memory: retry smaller
    ├── ServiceError           an external service misbehaves
    │   ├── ServiceUnavailable Neo4j / Redis not reachable (transient: retry)
    │   └── AuthError          wrong credentials (permanent)
    └── StoreError             Neo4j answered but the write or query failed
        └── StoreBusy          ... in a way the driver deems retryable (transient: retry)

Lower-layer exceptions (driver, broker, torch, OS) are translated at the boundary with
``raise ... from exc`` so the CLI can print one line and exit non-zero.
"""

from __future__ import annotations


class AtlasError(Exception):
    """Root of every error Circuit Atlas raises on purpose."""

    #: Whether retrying the same operation later may succeed (used by the workers).
    transient: bool = False


class ConfigError(AtlasError):
    """Settings or environment are wrong (unknown model family, Java missing, port in use)."""


class InputError(AtlasError):
    """The user's input is invalid: malformed file, over-long prompt, unknown id."""


class CypherRefused(InputError):
    """Raw Cypher refused because it is not a read-only query (or otherwise unsafe)."""


class ModelLoadError(AtlasError):
    """A model could not be loaded from the given directory or hub id."""


class TranscoderError(AtlasError):
    """Transcoders are missing, corrupted, or do not match the model."""


class AttributionError(AtlasError):
    """The attribution computation failed."""


class OutOfMemory(AttributionError):
    """The computation ran out of memory. Raised where torch reports it, so callers can react to
    the type (halve the batch) instead of matching the message text."""


class ServiceError(AtlasError):
    """An external service (Neo4j, Redis) misbehaved."""


class ServiceUnavailable(ServiceError):
    """A service could not be reached. Transient: retrying later may succeed."""

    transient = True


class AuthError(ServiceError):
    """A service refused our credentials."""


class StoreError(AtlasError):
    """Neo4j answered, but a write or query failed."""


class StoreBusy(StoreError):
    """Neo4j answered, but the transaction failed in a way the driver deems retryable (a
    deadlock, a database not available yet) and its own retries ran out. Transient."""

    transient = True
