"""Supernodes: named groups of global features.

A supernode is defined by an explicit feature list, by a regular expression over feature labels
or over their logit-lens top tokens, or imported from an interchange JSON graph's
``qParams.supernodes``. Patterns run here, in Python's ``regex`` dialect (the one they are checked
in), over the label strings read from Neo4j, under a time budget: a pattern that backtracks
without end stops with one line instead of holding a server thread past the query timeout. Names are user text: validated for shape, then always passed to Cypher
as parameters (a name like ``x"}) DETACH DELETE n //`` is stored as the data it is).

Each supernode keeps aggregated edges to the other supernodes (``SAGG``): rebuilt over every
stored prompt when the supernode is (re)defined, and updated by each later ingestion.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from pathlib import Path
from typing import Any

import neo4j
import regex

from atlas.errors import InputError
from atlas.graph import NodeKind
from atlas.store import queries as Q
from atlas.store.connection import read_rows, read_tx, write_tx
from atlas.store.ingest import feature_ref
from atlas.store.read import DEFAULT_TIMEOUT_S, parse_feature

log = logging.getLogger(__name__)

MAX_NAME_LEN = 200
MAX_PATTERN_LEN = 500


def validate_name(name: str) -> str:
    """A supernode name: 1..200 printable characters (no control characters), trimmed."""
    if not isinstance(name, str):
        raise InputError("supernode name must be text")
    name = name.strip()
    if not name:
        raise InputError("supernode name must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise InputError(f"supernode name longer than {MAX_NAME_LEN} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in name):
        raise InputError("supernode name contains control or unassigned characters")
    return name


def validate_pattern(pattern: str) -> str:
    """A regular expression in the ``regex`` dialect (the one :func:`matching_features` runs),
    matched in full; checked before anything is read."""
    compile_pattern(pattern)
    return pattern


def compile_pattern(pattern: str) -> regex.Pattern[str]:
    """``pattern`` compiled (1..500 characters), or :class:`InputError` naming the fault."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_LEN:
        raise InputError(f"pattern must be 1..{MAX_PATTERN_LEN} characters")
    try:
        return regex.compile(pattern)
    except regex.error as exc:
        raise InputError(f"bad regular expression {pattern!r}: {exc}") from exc


def matching_features(
    driver: neo4j.Driver,
    query: str,
    pattern: str,
    *,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    what: str = "matching features",
) -> list[str]:
    """Fids of the features one of whose texts (``query`` returns ``fid, texts``) matches
    ``pattern`` in full.

    The rows are streamed and matched as they arrive; the whole match, reading included, gets
    ``timeout_s`` seconds, and a pattern that needs longer is refused with one line.
    """
    compiled = compile_pattern(pattern)
    deadline = time.monotonic() + timeout_s

    def work(tx: neo4j.ManagedTransaction) -> list[str]:
        fids = []
        for record in tx.run(query):
            texts = [t for t in record["texts"] or [] if isinstance(t, str)]
            if any(_fullmatch(compiled, t, deadline, timeout_s) for t in texts):
                fids.append(record["fid"])
        return fids

    return read_tx(driver, work, database=database, what=what, timeout_s=timeout_s)


def _fullmatch(compiled: regex.Pattern[str], text: str, deadline: float, budget: float) -> bool:
    left = deadline - time.monotonic()
    try:
        if left <= 0:
            raise TimeoutError
        return compiled.fullmatch(text, timeout=left) is not None
    except TimeoutError:
        raise InputError(
            f"pattern {compiled.pattern!r} took longer than {budget:g} s over the stored "
            "texts; simplify it (nested or repeated quantifiers backtrack)"
        ) from None


def define(
    driver: neo4j.Driver,
    name: str,
    fids: list[str],
    *,
    kind: str = "features",
    pattern: str | None = None,
    database: str | None = None,
) -> int:
    """Create or redefine a supernode with the given feature refs; returns the member count.

    Membership and the supernode's aggregated edges are written in one transaction.
    """
    name = validate_name(name)
    fids = sorted(set(fids))

    def work(tx: neo4j.ManagedTransaction) -> int:
        return define_in(tx, name, fids, kind=kind, pattern=pattern)

    n = int(write_tx(driver, work, database=database, what=f"defining supernode {name!r}"))
    if n < len(fids):
        log.warning(
            "supernode %r: %d of %d features are not in the atlas", name, len(fids) - n, len(fids)
        )
    return n


def define_in(
    tx: neo4j.ManagedTransaction,
    name: str,
    fids: list[str],
    *,
    kind: str = "features",
    pattern: str | None = None,
) -> int:
    """:func:`define`'s statements inside the caller's transaction (``name`` already validated,
    ``fids`` sorted and unique); returns the member count."""
    rec = tx.run(Q.UPSERT_SUPERNODE, name=name, kind=kind, pattern=pattern, fids=fids).single()
    n = int(rec["n_members"]) if rec is not None else 0
    tx.run(Q.CLEAR_SUPERNODE_AGG, name=name).consume()
    tx.run(Q.REBUILD_SUPERNODE_AGG_OUT, name=name).consume()
    tx.run(Q.REBUILD_SUPERNODE_AGG_IN, name=name).consume()
    return n


def define_from_features(
    driver: neo4j.Driver,
    name: str,
    specs: list[str],
    *,
    tset: str | None = None,
    database: str | None = None,
) -> int:
    """Supernode from ``LAYER/INDEX`` specs: the features of the transcoder set whose content
    hash is ``tset``, or of every set in the atlas when ``tset`` is None."""
    pairs = [list(parse_feature(spec.removeprefix("feature:"))) for spec in specs]
    rows = read_rows(
        driver,
        Q.FEATURES_BY_PAIRS,
        {"pairs": pairs, "tset": tset},
        database=database,
        what="finding features",
    )
    if not rows:
        raise InputError(f"none of the features {specs} is in the atlas")
    return define(driver, name, [r["fid"] for r in rows], kind="features", database=database)


def define_from_label(
    driver: neo4j.Driver,
    name: str,
    pattern: str,
    *,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> int:
    """Supernode of every feature whose label matches ``pattern`` (a full-match regex)."""
    return _define_from_pattern(
        driver, name, pattern, Q.FEATURE_LABELS, "label", database=database, timeout_s=timeout_s
    )


def define_from_token(
    driver: neo4j.Driver,
    name: str,
    pattern: str,
    *,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> int:
    """Supernode of every feature one of whose logit-lens top tokens matches ``pattern``."""
    return _define_from_pattern(
        driver, name, pattern, Q.FEATURE_TOP_TOKENS, "token", database=database, timeout_s=timeout_s
    )


def _define_from_pattern(
    driver: neo4j.Driver,
    name: str,
    pattern: str,
    query: str,
    kind: str,
    *,
    database: str | None,
    timeout_s: float,
) -> int:
    name = validate_name(name)
    fids = matching_features(
        driver, query, pattern, database=database, timeout_s=timeout_s, what=f"matching {kind}s"
    )
    return define(driver, name, fids, kind=kind, pattern=pattern, database=database)


def import_from_json(
    driver: neo4j.Driver, path: str | Path, *, database: str | None = None
) -> dict[str, int]:
    """Define the supernodes of an interchange JSON graph's ``qParams`` (features only)."""
    from atlas.store.ingest import load_graph_file

    graph = load_graph_file(path)
    groups = graph.metadata.extra.get("supernodes") or []
    if not isinstance(groups, list):
        raise InputError(f"{path}: qParams.supernodes must be a list")
    by_id = {nid: i for i, nid in enumerate(graph.node_ids())}
    tset = graph.metadata.transcoders.content_hash
    result: dict[str, int] = {}
    for group in groups:
        if not isinstance(group, list) or not group or not isinstance(group[0], str):
            raise InputError(f"{path}: each supernode must be [label, node_id, ...]")
        label, members = group[0], group[1:]
        fids = []
        for nid in members:
            i = by_id.get(str(nid))
            if i is None:
                raise InputError(f"{path}: supernode {label!r} names unknown node id {nid!r}")
            if int(graph.kind[i]) != NodeKind.FEATURE:
                log.warning("supernode %r: skipping non-feature node %s", label, nid)
                continue
            fids.append(feature_ref(tset, int(graph.layer[i]), int(graph.feature[i])))
        result[validate_name(label)] = define(
            driver, label, fids, kind="qparams", pattern=str(path), database=database
        )
    return result


def list_supernodes(driver: neo4j.Driver, *, database: str | None = None) -> list[dict[str, Any]]:
    """Every supernode with its member count."""
    return read_rows(driver, Q.LIST_SUPERNODES, database=database, what="listing supernodes")


def show(driver: neo4j.Driver, name: str, *, database: str | None = None) -> dict[str, Any]:
    """One supernode: definition and members."""
    name = validate_name(name)
    rows = read_rows(driver, Q.SHOW_SUPERNODE, {"name": name}, database=database, what="supernode")
    if not rows:
        raise InputError(f"no supernode named {name!r}")
    return rows[0]


def delete(driver: neo4j.Driver, name: str, *, database: str | None = None) -> bool:
    """Delete a supernode (its features stay). Returns False when it did not exist."""
    name = validate_name(name)

    def work(tx: neo4j.ManagedTransaction) -> int:
        rec = tx.run(Q.DELETE_SUPERNODE, name=name).single()
        return int(rec["deleted"]) if rec is not None else 0

    return bool(write_tx(driver, work, database=database, what=f"deleting supernode {name!r}"))
